"""What `/stats`, `/metrics` and `/workers` report, read from the database: the same on every
instance.

- Counts by state and kind come from the tasks table: exact where an index holds them
  (running, due; scheduled while no more than `SCHEDULED_EXACT_UP_TO` are), and for the
  finished states exact while the table is small, estimated once a count would read more
  than `EXACT_UP_TO` rows (`estimated` names them): their total from the table's live rows,
  as the server counts them, shared out among states and kinds as in a sample of its pages.
- Throughput and lateness come from `task_activity`: 10-second buckets by task type that
  workers and ticks add to as they claim and record (functions/counters.py), so reading the
  last hour is reading 360 small rows a type, however many tasks that hour ran (and pruning
  finished tasks does not rewrite history).
- /metrics's counters and histograms come from `task_totals`, running totals by type added
  to by the same writes: a row per type, never recounted from tasks.
  Start lateness is kept as a histogram of log-spaced buckets and a maximum per bucket:
  percentiles are within about 12% (the middle of a bucket 1.25 wide) of the exact value, up
  to 330 days late, and never above the maximum of the same rows, which is exact.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from functions.counters import LATENESS_BOUNDS_MS, OUTCOMES
from functions.kinds import KINDS
from functions.model import TaskState, Worker
from functions.store import StatsRows, Store

# Finished tasks are counted exactly up to this many rows of the table, estimated beyond
# from a sample of about SAMPLE_ROWS rows.
EXACT_UP_TO = 200_000
SAMPLE_ROWS = 20_000
# On a table that large, scheduled tasks are counted exactly while no more than this many are
# (about what the sample reads), estimated beyond with the finished ones (a count of 500,000
# scheduled tasks took 123 ms of every /stats, and grew with them). Due and running tasks are
# always counted: the figures that say whether workers keep up.
SCHEDULED_EXACT_UP_TO = 10_000
# And finished tasks too, while no more than this many have finished (after a prune, or with
# a short retention, beside many scheduled): the few a sample would take whole or miss.
FINISHED_EXACT_UP_TO = 10_000
# A sample that finds no finished task where the server counts some is taken again, wider,
# while it reads no more than this many rows: never more than a count at EXACT_UP_TO costs.
WIDEST_SAMPLE_ROWS = 200_000


def percentile_ms(histogram: Sequence[int], q: float, max_ms: float = math.inf) -> float:
    """Estimate the q-quantile (0..1) of a lateness histogram whose largest value is `max_ms`.

    The value of rank ceil(q x total), read as the geometric middle of its bucket, so within
    a factor of sqrt(1.25) (11.8%) of the true value: docs/api.md's "about 12%". (Interpolated
    within the bucket before, it could be 25% off, and above the maximum: one task 7,158.8 ms
    late read as 7,330 at p99, 6,571 at p50.) The highest non-empty bucket holds the maximum,
    so it ends at `max_ms`, and the last rank is `max_ms` itself: a percentile never exceeds
    the maximum, and one task's percentiles are its lateness. 0 for an empty histogram.
    """
    total = sum(histogram)
    if total == 0:
        return 0.0
    # (- 1e-9: 0.07 x 100 is 7.000000000000001, whose ceiling is not rank 7.)
    rank = max(1, math.ceil(q * total - 1e-9))
    if rank >= total and not math.isinf(max_ms):
        return max_ms
    top = max(i for i, n in enumerate(histogram) if n)
    i = bisect.bisect_left(list(itertools.accumulate(histogram)), rank)
    upper = min(LATENESS_BOUNDS_MS[i], max_ms) if i == top else LATENESS_BOUNDS_MS[i]
    lower = LATENESS_BOUNDS_MS[i - 1] if i else 0.0
    if math.isinf(upper):  # the open bucket, its maximum not known
        return lower
    middle = upper / 2 if lower == 0.0 else math.sqrt(lower * upper)
    return min(middle, max_ms)


def merge(histograms: Iterable[Sequence[int]]) -> list[int]:
    total = [0] * len(LATENESS_BOUNDS_MS)
    for histogram in histograms:
        for i, n in enumerate(histogram):
            total[i] += n
    return total


@dataclass(frozen=True)
class Minute:
    start: datetime
    started: int
    succeeded: int
    failed: int
    cancelled: int
    lateness_p99_ms: float


@dataclass(frozen=True)
class TypeActivity:
    """What one task type did in the last 5 minutes (/stats `by_type`)."""

    started: int
    # Attempts ended, by outcome (counters.OUTCOMES).
    outcomes: dict[str, int]
    # Attempts ended a second (every outcome but cancelled), over the 5 minutes.
    per_s: float
    lateness_ms: dict[str, float]


@dataclass(frozen=True)
class Totals:
    """The running totals of one task type (/metrics; migration 0017): attempts ended by
    outcome, and the histograms of run duration and start lateness, counts per bucket of
    counters.TOTAL_BOUNDS_S (not cumulative) and their sums in seconds."""

    kind: str
    outcomes: dict[str, int]
    duration: list[int]
    duration_sum_s: float
    lateness: list[int]
    lateness_sum_s: float


@dataclass(frozen=True)
class Stats:
    """What /stats answers (see the module docstring for where each figure comes from)."""

    # state -> kind -> tasks, every state and every kind present.
    counts: dict[str, dict[str, int]]
    # States whose counts are estimated from a sample of the table.
    estimated: list[str]
    due: int
    oldest_due_age_s: float
    # Workers holding running tasks; and workers alive (running or idle).
    workers: int
    workers_alive: int
    # Tasks that finished in the last 60 s, by how.
    last_minute: dict[str, int]
    # Start lateness (started_at less when the task became due: queries.BECAME_DUE) of first
    # attempts in the last 5 minutes.
    lateness_ms: dict[str, float]
    # The last hour, a minute at a time, oldest first.
    series: list[Minute]
    # Due tasks of kinds that no worker or tick ran in the last 5 minutes, by kind.
    unserved: dict[str, int]
    # The last 5 minutes by type: the types that did anything then or have tasks due.
    by_type: dict[str, TypeActivity]
    # The running totals by type (read for /metrics only: empty otherwise).
    totals: list[Totals]


# The outcomes in queries.STATS_ACTIVITY's order.
_ACTIVITY_OUTCOMES = ("succeeded", "failed", "retried", "timed_out", "cancelled", "lost")


def _finished_scale(rows: StatsRows) -> float:
    """What the finished counts of a sample of the table's pages are multiplied by.

    Their total is the table's live rows (the server's own count) less the scheduled and
    running tasks (counted exactly); the sample only shares it out among states and kinds.
    Scaled up by pages alone, the sample was far off: after a drain, most pages of a table
    hold no live row and the rest 60-80, and for a million tasks in a never-analyzed table
    (~200 pages sampled) the estimate ranged from 680,417 to 1,258,551 (stdev 11%), where
    the share of each state and kind in the sample is steady. By pages alone still where
    the server keeps no statistics (`track_counts` off) or they disagree with the sample.
    """
    sampled_states = rows.estimated_states
    sampled = sum(n for state, _, n in rows.counts if state in sampled_states)
    active = sum(n for state, _, n in rows.counts if state not in sampled_states)
    if rows.scheduled_estimated:  # (the sample's scheduled are those not yet due)
        active += sum(due for _, due, _ in rows.due_by_kind)
    if sampled and rows.live_rows > active:
        return (rows.live_rows - active) / sampled
    assert rows.sampled_percent
    return 100.0 / rows.sampled_percent


# GET /workers lists at most this many (the table keeps an hour of workers: a fleet of
# hundreds restarting every few minutes).
WORKERS_LIMIT = 1_000


@functools.cache
def build_version() -> str:
    """taskrunner's version as installed, for /metrics (`unknown` where it is not installed:
    a Lambda bundle, a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("taskrunner")
    except PackageNotFoundError:
        return "unknown"


async def read_workers(store: Store) -> list[Worker]:
    """Live workers and ticks, and those that left or died in the last hour, newest first."""
    return await store.list_workers(limit=WORKERS_LIMIT)


async def read_stats(store: Store, *, totals: bool = False) -> Stats:
    """Read the figures /stats reports; /metrics's running totals too when `totals`."""
    rows = await store.stats_rows(
        exact_up_to=EXACT_UP_TO,
        sample_rows=SAMPLE_ROWS,
        widest_rows=WIDEST_SAMPLE_ROWS,
        scheduled_exact_up_to=SCHEDULED_EXACT_UP_TO,
        finished_exact_up_to=FINISHED_EXACT_UP_TO,
        totals=totals,
    )
    return stats_from(rows)


# /stats `by_type` covers this long.
BY_TYPE_S = 300


def _by_type(
    recent: dict[str, list[Any]], due_by_kind: list[tuple[str, int, bool]]
) -> dict[str, TypeActivity]:
    by_type = {}
    for kind in sorted(set(recent) | {kind for kind, *_ in due_by_kind}):
        started, outcomes, histograms, max_ms = recent.get(
            kind, [0, dict.fromkeys(OUTCOMES, 0), [], 0.0]
        )
        histogram = merge(histograms)
        ended = sum(n for outcome, n in outcomes.items() if outcome != "cancelled")
        by_type[kind] = TypeActivity(
            started=started,
            outcomes=outcomes,
            per_s=ended / BY_TYPE_S,
            lateness_ms={
                "p50": percentile_ms(histogram, 0.5, max_ms),
                "p99": percentile_ms(histogram, 0.99, max_ms),
                "max": max_ms,
            },
        )
    return by_type


def stats_from(rows: StatsRows) -> Stats:
    """Make what /stats and /metrics report of the rows read for it (Store.stats_rows)."""
    counts = {state.value: dict.fromkeys(sorted(KINDS), 0) for state in TaskState}
    scale = _finished_scale(rows) if rows.sampled_percent else 1.0
    sampled_states = rows.estimated_states
    for state, kind, n in rows.counts:
        by_kind = counts[state]
        by_kind[kind] = by_kind.get(kind, 0) + (round(n * scale) if state in sampled_states else n)
    if rows.scheduled_estimated:
        # The sample's scheduled tasks are those not yet due; the due ones are exact.
        for kind, due, _ in rows.due_by_kind:
            counts["scheduled"][kind] = counts["scheduled"].get(kind, 0) + due

    now_s = rows.now_s
    last_minute = dict.fromkeys(OUTCOMES, 0)
    recent: list[Sequence[int]] = []
    recent_max_ms = 0.0
    minutes: dict[int, list[Any]] = {}
    # kind -> [started, outcomes, lateness histograms, lateness max ms] of the last 5 minutes.
    recent_by_kind: dict[str, list[Any]] = {}
    for bucket, kind, started, *ended, lateness, max_ms in rows.activity:
        outcomes = dict(zip(_ACTIVITY_OUTCOMES, ended, strict=True))
        if bucket >= now_s - 60:
            for outcome, n in outcomes.items():
                last_minute[outcome] += n
        if bucket >= now_s - BY_TYPE_S:
            recent.append(lateness)
            recent_max_ms = max(recent_max_ms, max_ms)
            if kind:  # ('': a row of before migration 0017, of no one type)
                of_kind = recent_by_kind.setdefault(kind, [0, dict.fromkeys(OUTCOMES, 0), [], 0.0])
                of_kind[0] += started
                for outcome, n in outcomes.items():
                    of_kind[1][outcome] += n
                of_kind[2].append(lateness)
                of_kind[3] = max(of_kind[3], max_ms)
        minute = minutes.setdefault(bucket // 60 * 60, [0, 0, 0, [], 0.0, 0])
        minute[0] += started
        minute[1] += outcomes["succeeded"]
        # (An attempt stopped at its limit, or lost with its worker, failed too.)
        minute[2] += outcomes["failed"] + outcomes["timed_out"] + outcomes["lost"]
        minute[3].append(lateness)
        minute[4] = max(minute[4], max_ms)
        minute[5] += outcomes["cancelled"]

    histogram = merge(recent)
    lateness_ms = {f"p{q}": percentile_ms(histogram, q / 100, recent_max_ms) for q in (50, 95, 99)}
    lateness_ms["max"] = recent_max_ms
    this_minute = int(now_s // 60 * 60)
    series = []
    for start in range(this_minute - 59 * 60, this_minute + 60, 60):
        started, succeeded, failed, histograms, max_ms, cancelled = minutes.get(
            start, [0, 0, 0, [], 0.0, 0]
        )
        series.append(
            Minute(
                start=datetime.fromtimestamp(start, UTC),
                started=started,
                succeeded=succeeded,
                failed=failed,
                cancelled=cancelled,
                # Bounded by this minute's own maximum, as the 5-minute figures are by theirs.
                lateness_p99_ms=percentile_ms(merge(histograms), 0.99, max_ms),
            )
        )
    return Stats(
        counts=counts,
        estimated=sorted(sampled_states),
        due=rows.due,
        oldest_due_age_s=max(0.0, rows.oldest_due_age_s or 0.0),
        workers=rows.workers,
        workers_alive=rows.workers_alive,
        last_minute=last_minute,
        lateness_ms=lateness_ms,
        series=series,
        unserved={kind: n for kind, n, unserved in rows.due_by_kind if unserved},
        by_type=_by_type(recent_by_kind, rows.due_by_kind),
        totals=[
            Totals(
                kind=kind,
                outcomes=dict(zip(OUTCOMES, outcomes, strict=True)),
                duration=duration,
                duration_sum_s=duration_sum_s,
                lateness=lateness,
                lateness_sum_s=lateness_sum_s,
            )
            for kind, *outcomes, duration, duration_sum_s, lateness, lateness_sum_s in rows.totals
        ],
    )
