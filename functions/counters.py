"""What a worker counts as it claims and records: its activity per 10-second bucket and task
type, which it adds to the `task_activity` table and to the running totals of `task_totals`
in one statement (Store.add_activity) for /stats and /metrics to read (functions/report.py).

Start lateness is counted as a histogram of log-spaced buckets and a maximum, so that any
number of workers' counts add up, and percentiles read from the sum stay within about 12%.

The running totals are what Prometheus reads (`/metrics`): attempts ended by outcome, and
histograms of run duration and start lateness with the fixed bounds of `TOTAL_BOUNDS_S`.
They are only ever added to, by the same write that adds the activity (never per task, never
recounted from task rows), so they survive retention and restarts; a worker that is killed
loses at most the counts it had not written yet (ACTIVITY_EVERY_S, 2 s).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

# Bucket upper bounds of the lateness histogram, in ms: 0.5 ms x 1.25^i up to 330 days,
# then one open bucket: 113 buckets. (Up to 72 before: a task an hour late or more
# was reported 50.6 minutes late. Rows written then merge into the first 72 buckets.)
LATENESS_BOUNDS_MS: tuple[float, ...] = (*(0.5 * 1.25**i for i in range(112)), math.inf)
BUCKET_S = 10

# The bucket upper bounds (`le`, seconds) of the Prometheus histograms of run duration and
# start lateness, the last one open (+Inf): 5 ms to an hour, about 2.5x apart, 18 series a
# type each. Fixed: the totals are counts per bucket since the table was made, so changing
# them needs a migration that starts the totals again.
TOTAL_BOUNDS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    900.0, 1800.0, 3600.0, math.inf,
)  # fmt: skip

# How an attempt ended (GET /tasks/{id}/attempts names them alike): each attempt once.
# `retried`: it raised and another attempt is due; `failed`: it raised and the task failed
# for good; `timed_out`: stopped at its time limit; `lost`: its worker died (rescued: run
# again, or failed when out of attempts); `cancelled`: by a request.
OUTCOMES = ("succeeded", "failed", "retried", "timed_out", "cancelled", "lost")


def bucket_of(db_time_s: float) -> int:
    """The start of the 10-second bucket holding `db_time_s` (Unix seconds)."""
    return int(db_time_s // BUCKET_S * BUCKET_S)


def _zeros(n: int) -> list[int]:
    return [0] * n


@dataclass
class Activity:
    """What one worker did in one bucket with one task type, to be added to the tables."""

    started: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    cancelled: int = 0
    lost: int = 0
    lateness: list[int] = field(default_factory=lambda: _zeros(len(LATENESS_BOUNDS_MS)))
    lateness_max_ms: float = 0.0
    # For the totals: the same starts in the Prometheus buckets, and their sum; the run
    # duration of the attempts recorded (every outcome but cancelled and lost).
    lateness_s: list[int] = field(default_factory=lambda: _zeros(len(TOTAL_BOUNDS_S)))
    lateness_sum_s: float = 0.0
    duration_s: list[int] = field(default_factory=lambda: _zeros(len(TOTAL_BOUNDS_S)))
    duration_sum_s: float = 0.0

    # Called for every task a worker claims and records: comparisons rather than max(), and
    # bisect_left bound here (0.41 µs a start, where the one histogram cost 0.72 with max()).
    def start(self, lateness_ms: float) -> None:
        self.started += 1
        self.lateness[bisect_left(LATENESS_BOUNDS_MS, lateness_ms)] += 1
        if lateness_ms > self.lateness_max_ms:
            self.lateness_max_ms = lateness_ms
        late_s = lateness_ms / 1000 if lateness_ms > 0 else 0.0
        self.lateness_s[bisect_left(TOTAL_BOUNDS_S, late_s)] += 1
        self.lateness_sum_s += late_s

    def ran(self, duration_s: float) -> None:
        self.duration_s[bisect_left(TOTAL_BOUNDS_S, duration_s)] += 1
        self.duration_sum_s += duration_s


_COUNTS = ("started", *OUTCOMES)
_HISTOGRAMS = ("lateness", "lateness_s", "duration_s")
_SUMS = ("lateness_sum_s", "duration_sum_s")


def merge_activity(into: Activity | None, more: Activity) -> Activity:
    """`into` with `more` added (a new Activity when `into` is None)."""
    total = into or Activity()
    for name in _COUNTS + _SUMS:
        setattr(total, name, getattr(total, name) + getattr(more, name))
    for name in _HISTOGRAMS:
        ours, theirs = getattr(total, name), getattr(more, name)
        setattr(total, name, [a + b for a, b in zip(ours, theirs, strict=True)])
    total.lateness_max_ms = max(total.lateness_max_ms, more.lateness_max_ms)
    return total
