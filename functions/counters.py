"""What a worker counts as it claims and records: its activity per 10-second bucket, which it
adds to the `task_activity` table (Store.add_activity) for /stats and /metrics to read
(functions/report.py).

Start lateness is counted as a histogram of log-spaced buckets and a maximum, so that any
number of workers' counts add up, and percentiles read from the sum stay within about 12%.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

# Bucket upper bounds of the lateness histogram, in ms: 0.5 ms x 1.25^i up to 330 days,
# then one open bucket: 113 buckets. (Up to 72 before: a task an hour late or more
# was reported 50.6 minutes late. Rows written then merge into the first 72 buckets.)
LATENESS_BOUNDS_MS: tuple[float, ...] = (*(0.5 * 1.25**i for i in range(112)), math.inf)
BUCKET_S = 10


def bucket_of(db_time_s: float) -> int:
    """The start of the 10-second bucket holding `db_time_s` (Unix seconds)."""
    return int(db_time_s // BUCKET_S * BUCKET_S)


@dataclass
class Activity:
    """What one worker did in one bucket, to be added to the table."""

    started: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    lateness: list[int] = field(default_factory=lambda: [0] * len(LATENESS_BOUNDS_MS))
    lateness_max_ms: float = 0.0

    def start(self, lateness_ms: float) -> None:
        self.started += 1
        self.lateness[bisect.bisect_left(LATENESS_BOUNDS_MS, lateness_ms)] += 1
        self.lateness_max_ms = max(self.lateness_max_ms, lateness_ms)


def merge_activity(into: Activity | None, more: Activity) -> Activity:
    """`into` with `more` added (a new Activity when `into` is None)."""
    total = into or Activity()
    total.started += more.started
    total.succeeded += more.succeeded
    total.failed += more.failed
    total.retried += more.retried
    total.lateness = [a + b for a, b in zip(total.lateness, more.lateness, strict=True)]
    total.lateness_max_ms = max(total.lateness_max_ms, more.lateness_max_ms)
    return total
