"""`GET /stats` (JSON) and `GET /metrics` (Prometheus): what workers are doing, read from the
database, so every instance answers the same (functions/report.py says where each figure
comes from)."""

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from functions.http.routes import Route
from functions.model import Worker
from functions.report import Stats, read_stats, read_workers
from functions.store import Store


class MinuteOut(BaseModel):
    minute: datetime = Field(description="The minute's start, UTC.")
    started: int
    succeeded: int
    failed: int
    cancelled: int
    lateness_p99_ms: float


class StatsOut(BaseModel):
    counts: dict[str, dict[str, int]] = Field(
        description='Tasks by state, then by type: `{"scheduled": {"foo": 3, ...}, ...}`.'
    )
    estimated: list[str] = Field(
        description="States whose counts are estimated from a sample of the table (once it "
        "holds more than 200,000 tasks); the others are exact."
    )
    due: int = Field(description="Scheduled tasks whose time has come.")
    oldest_due_age_s: float = Field(
        description="How long the oldest due task has waited (0 when none is due): whether "
        "workers keep up."
    )
    workers: int = Field(description="Distinct workers holding running tasks now.")
    workers_alive: int = Field(description="Workers alive now, busy or idle.")
    last_minute: dict[str, int] = Field(
        description="Tasks that finished in the last 60 s: succeeded, failed, retried "
        "(an attempt failed, another is due) and cancelled."
    )
    lateness_ms: dict[str, float] = Field(
        description="p50, p95, p99 and max of the start lateness of first attempts started "
        "in the last 5 minutes: started_at less the moment the task became due (the latest of "
        "execute_at, created_at and the run-now or retry request that made it due); "
        "percentiles within ~12%, max exact."
    )
    series: list[MinuteOut] = Field(description="The last hour, a minute at a time.")
    unserved: dict[str, int] = Field(
        description="Due tasks of types that no worker or tick has run in the last 5 minutes, "
        'by type (`{"send_email": 12}`; empty when every due task\'s type is run): a type '
        "the workers do not load yet (the API deployed first) or any more. Nothing claims "
        "them; they run once a worker that runs their type starts."
    )

    @classmethod
    def of(cls, stats: Stats) -> "StatsOut":
        return cls(
            counts=stats.counts,
            estimated=stats.estimated,
            due=stats.due,
            oldest_due_age_s=round(stats.oldest_due_age_s, 3),
            workers=stats.workers,
            workers_alive=stats.workers_alive,
            last_minute=stats.last_minute,
            lateness_ms={k: round(v, 3) for k, v in stats.lateness_ms.items()},
            series=[
                MinuteOut(
                    minute=m.start,
                    started=m.started,
                    succeeded=m.succeeded,
                    failed=m.failed,
                    cancelled=m.cancelled,
                    lateness_p99_ms=round(m.lateness_p99_ms, 3),
                )
                for m in stats.series
            ],
            unserved=stats.unserved,
        )


class WorkerOut(BaseModel):
    id: str = Field(description="As a running task's `worker` names it: host:pid:random.")
    host: str | None = Field(description="Its host name (null: a worker of an older version).")
    pid: int | None = Field(description="Its process id on that host.")
    started_at: datetime
    kinds: list[str] | None = Field(description="The task types it runs.")
    running: int = Field(description="Its running tasks now (claimed, held by its lease).")
    last_heartbeat_at: datetime = Field(
        description="When it last renewed its lease (every third of TASKRUNNER_LEASE_SECONDS)."
    )
    version: str | None = Field(description="taskrunner's version (null where not installed).")
    tick: bool = Field(
        description="A tick (Lambda, `taskrunner tick`): listed while it runs and, if it "
        "died, an hour after; one that ended normally is not listed."
    )
    state: str = Field(
        description="`live`; `left` (it stopped, holding nothing); `dead` (its lease ran out: "
        "killed, or stalled; its running tasks are rescued). Those that left or died are "
        "listed an hour."
    )
    lease_expires_at: datetime = Field(
        description="Live: until when its lease covers its tasks. Left or dead: when it left, "
        "or its lease ran out."
    )
    rescued: int = Field(description="Its tasks rescued (run again, or failed) once it died.")

    @classmethod
    def of(cls, worker: Worker) -> "WorkerOut":
        return cls.model_validate(worker, from_attributes=True)


class WorkersOut(BaseModel):
    workers: list[WorkerOut] = Field(description="The newest first.")


def metric_families(stats: Stats) -> list[Any]:
    """The Prometheus metrics of `stats`."""
    # Imported here: only /metrics needs the client library.
    from prometheus_client.core import GaugeMetricFamily

    tasks = GaugeMetricFamily(
        "taskrunner_tasks",
        "Tasks by state and type (finished states estimated on large tables).",
        labels=["state", "type"],
    )
    for state, by_kind in stats.counts.items():
        for kind, n in by_kind.items():
            tasks.add_metric([state, kind], n)
    lateness = GaugeMetricFamily(
        "taskrunner_start_lateness_seconds",
        "Start lateness (started_at less the moment the task became due) of first attempts "
        "started in the last 5 minutes (quantile 1 is the maximum).",
        labels=["quantile"],
    )
    for quantile, key in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"), ("1", "max")):
        lateness.add_metric([quantile], stats.lateness_ms[key] / 1000)
    finished = GaugeMetricFamily(
        "taskrunner_finished_last_minute",
        "Tasks that finished in the last 60 s, by outcome (retried: another attempt is due;"
        " cancelled: by a request).",
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
        lateness,
        finished,
        unserved,
    ]


class _Families:
    """What prometheus_client's exposition reads: something with `collect()`."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        return iter(self.families)


def build_router(
    store: Store,
    authorized: Sequence[Any],
    fails: Callable[..., dict[int | str, dict[str, Any]]],
) -> APIRouter:
    router = APIRouter(tags=["monitoring"], route_class=Route, dependencies=list(authorized))

    @router.get("/stats", response_model=StatsOut, responses=fails())
    async def stats() -> StatsOut:
        """Counts, due tasks, workers, the last minute, start lateness and the last hour."""
        return StatsOut.of(await read_stats(store))

    @router.get("/workers", response_model=WorkersOut, responses=fails())
    async def workers() -> WorkersOut:
        """Live workers and ticks, and those that left or died in the last hour."""
        return WorkersOut(workers=[WorkerOut.of(w) for w in await read_workers(store)])

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, **fails()},
    )
    async def metrics() -> Response:
        """The same figures in the Prometheus text format."""
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        families = metric_families(await read_stats(store))
        body = generate_latest(_Families(families))
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
