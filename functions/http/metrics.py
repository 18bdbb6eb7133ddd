"""The Prometheus metric families of /metrics (`metric_families`), made from `report.Stats`
read with its running totals; written out by prometheus_client (`reads.metrics`). No FastAPI or
pydantic here: the fast path serves /metrics."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from functions.counters import OUTCOMES, TOTAL_BOUNDS_S
from functions.report import Stats, Totals


def _histogram(
    name: str, doc: str, totals: list[Totals], of: Callable[[Totals], tuple[list[int], float]]
) -> Any:
    """A histogram by type of running totals: cumulative buckets, `_count` the +Inf one."""
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    family = HistogramMetricFamily(name, doc, labels=["type"])
    # As the client library writes `le` itself ("0.005", "1.0", "+Inf").
    bounds = [floatToGoString(bound) for bound in TOTAL_BOUNDS_S]  # type: ignore[no-untyped-call]
    for total in totals:
        counts, sum_s = of(total)
        counts = [*counts, *[0] * (len(TOTAL_BOUNDS_S) - len(counts))]
        buckets = list(zip(bounds, itertools.accumulate(counts), strict=True))
        family.add_metric([total.kind], buckets, sum_s)
    return family


def metric_families(stats: Stats, build_version: str) -> list[Any]:
    """The Prometheus metrics of `stats` (read with its totals)."""
    # Imported here: only /metrics needs the client library.
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    tasks = GaugeMetricFamily(
        "taskrunner_tasks",
        "Tasks by state and type (finished states, and scheduled ones past 10,000, estimated"
        " on large tables).",
        labels=["state", "type"],
    )
    for state, by_kind in stats.counts.items():
        for kind, n in by_kind.items():
            tasks.add_metric([state, kind], n)
    finished_total = CounterMetricFamily(
        "taskrunner_tasks_finished",
        "Attempts ended, by type and outcome (succeeded; failed: raised, the task failed for "
        "good; retried: raised, another attempt is due; timed_out: stopped at its time "
        "limit; cancelled: by a request; lost: its worker died), since migration 0017: "
        "running totals in the database, across restarts and retention.",
        labels=["type", "outcome"],
    )
    for total in stats.totals:
        for outcome in OUTCOMES:
            finished_total.add_metric([total.kind, outcome], total.outcomes[outcome])
    duration = _histogram(
        "taskrunner_task_duration_seconds",
        "Run time of attempts that ran to an end in a worker (succeeded, failed, retried, "
        "timed_out), by type.",
        stats.totals,
        lambda t: (t.duration, t.duration_sum_s),
    )
    lateness = _histogram(
        "taskrunner_start_lateness_seconds",
        "Start lateness of first attempts (started_at less the moment the task became due), "
        "by type.",
        stats.totals,
        lambda t: (t.lateness, t.lateness_sum_s),
    )
    finished = GaugeMetricFamily(
        "taskrunner_finished_last_minute",
        "Attempts that ended in the last 60 s, by outcome (as taskrunner_tasks_finished_total).",
        labels=["state"],
    )
    for state, n in stats.last_minute.items():
        finished.add_metric([state], n)
    unserved = GaugeMetricFamily(
        "taskrunner_unserved_due_tasks",
        "Due tasks of types that no worker or tick has run in the last 5 minutes.",
        labels=["type"],
    )
    for kind, n in stats.unserved.items():
        unserved.add_metric([kind], n)
    build = GaugeMetricFamily(
        "taskrunner_build_info", "The taskrunner version serving /metrics.", labels=["version"]
    )
    build.add_metric([build_version], 1)
    return [
        tasks,
        GaugeMetricFamily(
            "taskrunner_due_tasks", "Scheduled tasks whose time has come.", stats.due
        ),
        GaugeMetricFamily(
            "taskrunner_oldest_due_age_seconds",
            "How long the oldest due task has waited.",
            stats.oldest_due_age_s,
        ),
        GaugeMetricFamily(
            "taskrunner_workers", "Distinct workers holding running tasks.", stats.workers
        ),
        GaugeMetricFamily(
            "taskrunner_workers_alive", "Workers alive, busy or idle.", stats.workers_alive
        ),
        finished_total,
        duration,
        lateness,
        finished,
        unserved,
        build,
    ]


class Families:
    """What prometheus_client's exposition reads: something with `collect()`."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        return iter(self.families)
