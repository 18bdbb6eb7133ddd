"""`GET /stats` (JSON) and `GET /metrics` (Prometheus): what workers are doing, read from the
database, so every instance answers the same (functions/report.py says where each figure
comes from). Their answers are made in `reads` (served by the fast path too); `StatsOut`
declares /stats' shape in the OpenAPI document, and `metrics` /metrics' families."""

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from functions.http import reads
from functions.http.routes import Route, read_response
from functions.model import Worker
from functions.report import read_workers
from functions.store import Store


class MinuteOut(BaseModel):
    minute: datetime = Field(description="The minute's start, UTC.")
    started: int
    succeeded: int
    failed: int = Field(
        description="Attempts that failed: raised (the task failed for good), timed out or lost"
        " (whether or not another attempt follows)."
    )
    cancelled: int
    lateness_p99_ms: float


class LatenessOut(BaseModel):
    p50: float
    p99: float
    max: float


class TypeOut(BaseModel):
    started: int = Field(description="First attempts started.")
    succeeded: int
    failed: int = Field(description="Attempts that raised, the task failed for good.")
    retried: int = Field(description="Attempts that raised, another attempt is due.")
    cancelled: int = Field(description="Tasks cancelled by a request.")
    timed_out: int = Field(description="Attempts stopped at their time limit.")
    lost: int = Field(description="Attempts of a worker that died (rescued).")
    per_s: float = Field(
        description="Attempts ended a second (every outcome but cancelled), over the 5 minutes."
    )
    lateness_ms: LatenessOut = Field(
        description="Start lateness of first attempts started, as `lateness_ms` above."
    )


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
        description="How long the due task first in line has waited since it became due, as "
        "start lateness counts it (0 when none is due): whether workers keep up."
    )
    workers: int = Field(description="Distinct workers holding running tasks now.")
    workers_alive: int = Field(description="Workers alive now, busy or idle.")
    last_minute: dict[str, int] = Field(
        description="Attempts that ended in the last 60 s, by outcome: succeeded, failed "
        "(raised; the task failed for good), retried (raised; another attempt is due), "
        "timed_out (stopped at its time limit), cancelled (by a request), lost (its worker "
        "died; rescued)."
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
    by_type: dict[str, TypeOut] = Field(
        description="The last 5 minutes by type, each type that did anything then or has "
        'tasks due: `{"foo": {"started": 3, "succeeded": 3, ..., "per_s": 0.01, '
        '"lateness_ms": {"p50": 2.1, "p99": 6.3, "max": 6.3}}}`.'
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


def build_router(
    store: Store,
    authorized: Sequence[Any],
    fails: Callable[..., dict[int | str, dict[str, Any]]],
) -> APIRouter:
    router = APIRouter(tags=["monitoring"], route_class=Route, dependencies=list(authorized))

    @router.get("/stats", response_model=StatsOut, responses=fails())
    async def stats() -> Response:
        """Counts, due tasks, workers, the last minute, start lateness and the last hour."""
        return read_response(await reads.stats(store, ""))

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
        return read_response(await reads.metrics(store, ""))

    return router
