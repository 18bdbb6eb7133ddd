"""The only module that sees SQL and the driver.

It returns domain values; `db.Database.connection` turns driver errors into domain errors
(`DatabaseUnavailable`, `SchemaOutdated`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import operator
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg import AsyncConnection, AsyncPipeline
from psycopg.pq import TransactionStatus
from psycopg.rows import RowFactory, namedtuple_row, tuple_row

from functions import queries
from functions.conninfo import behind_pooler, connect
from functions.counters import OUTCOMES, Activity, merge_activity
from functions.db import Coalescer, Database, first_line
from functions.errors import (
    DatabaseError,
    DatabaseUnavailable,
    IdempotencyKeyReused,
    SchemaOutdated,
)
from functions.model import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    Attempt,
    BulkAction,
    CatchUp,
    ErrorGroup,
    ListedTask,
    NewTask,
    Outcome,
    Schedule,
    SortKey,
    Task,
    TaskFilter,
    TaskOrder,
    TaskState,
    Worker,
)
from functions.parsing import excerpt
from functions.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The page statements prepared on each connection, by name (Store._prepared_rows).
_PREPARED_PAGES: weakref.WeakKeyDictionary[AsyncConnection[Any], set[str]] = (
    weakref.WeakKeyDictionary()
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


# Claimed and Result are named tuples rather than frozen dataclasses: a worker makes
# tens of thousands of each a second, and a frozen dataclass's __init__ is the slower one.
class Claimed(NamedTuple):
    """A task a worker now holds: attempt `attempt` is its to run."""

    id: int
    kind: str
    attempt: int
    max_attempts: int
    # How late a first attempt started (ms); None for later attempts.
    lateness_ms: float | None = None
    # The task's payload as stored, its JSON (None when it has none): only a kind that
    # reads `ctx.payload` pays for parsing it (kinds.Context).
    payload_json: str | None = None
    # Its own time limit (None: its kind's), and its priority.
    timeout_s: float | None = None
    priority: int = 0
    # Seconds from the claim's time until the task is due: more than 0 for a task claimed
    # ahead of its time (Store.claim_due's `ahead_s`), which starts only then.
    ahead_s: float = 0.0


_by_priority = operator.attrgetter("priority")


class Result(NamedTuple):
    """The outcome of one attempt. `state` SCHEDULED means retry after `retry_in_s`."""

    id: int
    attempt: int
    state: TaskState
    output: str | None = None
    error: str | None = None
    retry_in_s: float | None = None
    # For the totals of /metrics: how long the run took (None: not run here), and whether it
    # was stopped at its time limit (its outcome `timed_out`).
    duration_s: float | None = None
    timed_out: bool = False
    # Of an attempt that failed: its traceback (bounded); its error normalised
    # (model.normalise_error), for GET /errors.
    traceback: str | None = None
    error_group: str | None = None
    # Of a first attempt claimed ahead of its time: how long after its time it started, at
    # most, by the worker's clock (its `started_at`: queries.CLAIM_DUE).
    late_s: float | None = None

    @property
    def kept(self) -> bool:
        """Its attempt gets a row in `attempts`: all but a first attempt that succeeded."""
        return self.attempt != 1 or self.state is not TaskState.SUCCEEDED


@dataclass(frozen=True)
class StatsRows:
    """What /stats is computed from (functions/report.py)."""

    # (state, kind, count); finished states' counts are from a sample when `sampled_percent`
    # and `finished_estimated`, and scheduled ones when `scheduled_estimated`.
    counts: list[tuple[str, str, int]]
    sampled_percent: float | None
    # The table's live rows as the server's statistics count them (0 without statistics).
    live_rows: int
    due: int
    oldest_due_age_s: float | None
    workers: int
    workers_alive: int
    now_s: float
    # queries.STATS_ACTIVITY's rows: (bucket start in Unix seconds, kind ('': of before
    # migration 0017), started, succeeded, failed, retried, timed_out, cancelled, lost,
    # lateness histogram, lateness max ms), oldest first.
    activity: list[tuple[Any, ...]]
    # (kind, due tasks, whether nothing ran the kind in the last 5 minutes).
    due_by_kind: list[tuple[str, int, bool]] = field(default_factory=list)
    # queries.STATS_TOTALS's rows, when asked for (/metrics).
    totals: list[tuple[Any, ...]] = field(default_factory=list)
    scheduled_estimated: bool = False
    # Whether the finished states' counts are the sample's (with `sampled_percent`): not
    # when few enough have finished to count them.
    finished_estimated: bool = True

    @property
    def estimated_states(self) -> frozenset[str]:
        """The states whose counts are a sample's (empty: none)."""
        if not self.sampled_percent:
            return frozenset()
        return _estimated(finished=self.finished_estimated, scheduled=self.scheduled_estimated)


def _estimated(*, finished: bool, scheduled: bool) -> frozenset[str]:
    """What a sample estimates: the finished states, the scheduled tasks not yet due."""
    return frozenset([*(queries.FINISHED * finished), *(("scheduled",) * scheduled)])


_LEVELS = list(range(MIN_PRIORITY, MAX_PRIORITY + 1))


@dataclass(frozen=True)
class ClaimFrom:
    """Where a claim starts reading each priority's due tasks (queries._LEVELS_FROM): the
    due time (naive, UTC) and id of the first task NEXT_DUE found still scheduled at each
    level, lowest first; None where a level had none."""

    due: list[datetime | None]
    id: list[int | None]

    @classmethod
    def of(cls, levels: list[int], dues: list[datetime | None], ids: list[int | None]) -> ClaimFrom:
        """From NEXT_DUE's arrays, in the order its join read the levels: lowest first."""
        if levels != _LEVELS:
            order = sorted(range(len(levels)), key=levels.__getitem__)
            dues, ids = [dues[i] for i in order], [ids[i] for i in order]
        return cls(dues, ids)


@dataclass(frozen=True)
class NextDue:
    """The database's time (Unix seconds), how long until the next task is due (None: none
    is scheduled), and where the claim after this one may start (`ClaimFrom`)."""

    now_s: float
    wait_s: float | None
    claim_from: ClaimFrom | None = None
    # Of a claim that may take tasks ahead of their time: the database's time (Unix
    # seconds) once it had committed, which its answer comes back after.
    answered_s: float = 0.0


def _server_side(page_sql: str) -> str:
    """A page statement (queries.Listing.page_text) as PREPARE takes it: `%(limit)s` and
    `%(shown)s` as its parameters $1 and $2, and `%%` as the `%` psycopg would send."""
    text = page_sql.replace("%(limit)s", "$1").replace("%(shown)s", "$2")
    if "%(" in text:
        raise ValueError("a page statement with values besides its limit")
    return text.replace("%%", "%")


def _utc(value: datetime | None) -> datetime | None:
    # Timestamps are selected `AT TIME ZONE 'UTC'` (queries.TASK_COLUMNS): naive, in UTC.
    return None if value is None else value.replace(tzinfo=UTC)


def _task(row: Any) -> Task:
    return Task(
        id=row.id,
        kind=row.kind,
        state=TaskState(row.state),
        execute_at=row.execute_at.replace(tzinfo=UTC),
        next_attempt_at=_utc(row.next_attempt_at),
        created_at=row.created_at.replace(tzinfo=UTC),
        started_at=_utc(row.started_at),
        finished_at=_utc(row.finished_at),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        output=row.output,
        error=row.error,
        idempotency_key=row.idempotency_key,
        payload=row.payload,
        schedule=row.schedule,
        scheduled_for=_utc(row.scheduled_for),
        priority=row.priority,
        timeout_s=row.timeout_s,
        worker=row.worker,
        running_since=_utc(row.running_since),
        lease_expires_at=_utc(row.lease_expires_at),
    )


def _listed(row: tuple[Any, ...]) -> ListedTask:
    # The columns of queries.Listing.page, in order (tuples: a third of a namedtuple's cost).
    task_id, kind, execute_at, finished_at, timeout_s, payload, _, head = row
    return ListedTask(
        task_id, kind, execute_at.replace(tzinfo=UTC), _utc(finished_at), timeout_s, payload, head
    )


def _schedule(row: Any) -> Schedule:
    return Schedule(
        name=row.name,
        kind=row.kind,
        cron=row.cron,
        timezone=row.timezone,
        payload=row.payload,
        max_attempts=row.max_attempts,
        timeout_s=row.timeout_s,
        priority=row.priority,
        catch_up=CatchUp(row.catch_up),
        enabled=row.enabled,
        last_occurrence_at=_utc(row.last_occurrence_at),
        next_run_at=_utc(row.next_run_at),
        skipped_occurrences=row.skipped_occurrences,
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
        last_task_id=getattr(row, "last_task_id", None),
        last_task_state=None
        if getattr(row, "last_task_state", None) is None
        else TaskState(row.last_task_state),
    )


def _schedule_params(schedule: Schedule) -> dict[str, Any]:
    return {
        "name": schedule.name,
        "kind": schedule.kind,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "payload": _payload_param(schedule.payload),
        "max_attempts": schedule.max_attempts,
        "timeout_s": schedule.timeout_s,
        "priority": schedule.priority,
        "catch_up": schedule.catch_up.value,
        "enabled": schedule.enabled,
        "last_occurrence_at": schedule.last_occurrence_at,
        "next_run_at": schedule.next_run_at,
        "skipped_occurrences": schedule.skipped_occurrences,
    }


def _us(when: datetime | None) -> int | None:
    return None if when is None else (when - _EPOCH) // _MICROSECOND


class Occurrence(NamedTuple):
    """The task one occurrence of a schedule becomes."""

    schedule: str
    kind: str
    at: datetime
    max_attempts: int
    payload: Any = None
    timeout_s: float | None = None
    priority: int = 0


class ScheduleAdvance(NamedTuple):
    """How a schedule moves on once its due occurrences are made."""

    name: str
    next_run_at: datetime
    # The last occurrence made now (None: none was).
    last_occurrence_at: datetime | None
    # Missed occurrences its catch_up left out.
    skipped: int


# Given the schedules found due (each with the database's time then), the tasks to make and
# how each schedule moves on (functions/schedules.py).
PlanOccurrences = Callable[
    [list[tuple[Schedule, datetime]]], tuple[list[Occurrence], list[ScheduleAdvance]]
]


# A payload as the statements take it: its compact JSON (checked before, by
# `parsing.payload_json`), or NULL for none.
_dump_payload = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _payload_param(payload: Any) -> str | None:
    return None if payload is None else _dump_payload(payload)


def _row(new: NewTask, default_max_attempts: int | None = None) -> dict[str, Any]:
    """`new` as a row of the JSON the insert statements read: with every option, made with
    `default_max_attempts`; without it, only the options it has (INSERT_TASKS fills in the
    rest)."""
    row = {
        "kind": new.kind,
        "at_us": (new.execute_at - _EPOCH) // _MICROSECOND,
        "payload": new.payload,
    }
    if default_max_attempts is not None:
        row["max_attempts"], row["timeout_s"], row["priority"] = new.options(default_max_attempts)
        return row
    if new.max_attempts is not None:
        row["max_attempts"] = new.max_attempts
    if new.timeout_s is not None:
        row["timeout_s"] = new.timeout_s
    if new.priority:
        row["priority"] = new.priority
    return row


# How often a keyed create tries again when the task holding its key vanished between the
# insert that found the key taken and the read of that task (deleted, or its creator rolled
# back): each try is a new race, lost only to another delete of the same key.
_KEY_TRIES = 3

# The states each bulk action takes its tasks from.
_BULK_STATES = {
    BulkAction.CANCEL: queries.CANCELLABLE,
    BulkAction.RETRY: queries.RETRYABLE,
    BulkAction.DELETE: queries.DELETABLE,
}
# What a bulk action takes besides its states and the filters (given the filters' SQL): a
# retry, one task of a schedule's occurrence, that no other task holds now.
_BULK_ALSO = {BulkAction.RETRY: queries.occurrence_retryable}


def _occurrence_taken(exc: DatabaseError) -> bool:
    """A retry's write refused because another task took the occurrence meanwhile (the
    `tasks_occurrence` index, written by a transaction its statement could not see): run
    again, the statement sees that task, and leaves the retried one as it is."""
    cause = exc.__cause__
    return (
        isinstance(cause, psycopg.errors.UniqueViolation)
        and cause.diag.constraint_name == "tasks_occurrence"
    )


class _KeyVanished(Exception):
    """The task holding a key was gone when read: try the create again."""


def _reused(key: str, task_id: int) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        f"idempotency key {excerpt(key)} was used for task {task_id} with another type,"
        " execute_at, payload, max_attempts, timeout_s or priority; a repeat must send the"
        " same ones, a new task a new key"
    )


class Acted(NamedTuple):
    """What an action on one task found and did: the state the task had (None: no such
    task), the task after it (None: the action did not apply), and the task that holds
    what it would have taken (a retry's occurrence: queries.OCCURRENCE_HOLDER)."""

    found: TaskState | None
    task: Task | None
    held_by: int | None = None


def _acted(rows: list[Any]) -> Acted:
    if not rows:
        return Acted(None, None)
    row = rows[0]
    return Acted(TaskState(row.found_state), None if row.id is None else _task(row), row.held_by)


class Cancelled(NamedTuple):
    """What a cancel did: the ids cancelled, ascending, and of those that were running,
    `(id, attempt)` by the worker that was running them; how many of each kind."""

    ids: list[int]
    held: dict[str, list[tuple[int, int]]]
    kinds: dict[str, int]


def _cancelled(rows: Iterable[Any]) -> Cancelled:
    """A cancel's rows (queries.cancel_tasks: the id first, `cancelled_kind`,
    `held_attempt` and `held_by` last) as what it did."""
    ids: list[int] = []
    held: dict[str, list[tuple[int, int]]] = {}
    kinds: dict[str, int] = {}
    for row in rows:
        ids.append(row[0])
        kinds[row[-3]] = kinds.get(row[-3], 0) + 1
        if row[-1] is not None:
            held.setdefault(row[-1], []).append((row[0], row[-2]))
    return Cancelled(ids, held, kinds)


# A notification's payload must be shorter than 8,000 bytes (PostgreSQL's limit).
_NOTE_BYTES = 7_999


def cancel_notes(held: dict[str, list[tuple[int, int]]]) -> list[str]:
    """The payloads that tell each worker of `held` which of its tasks (id, attempt) were
    cancelled: `[worker, [id, attempt, id, attempt, ...]]` in compact JSON (ASCII: a byte a
    character), as few as fit in PostgreSQL's limit."""
    notes = []
    for worker, tasks in sorted(held.items()):
        empty = json.dumps([worker, []], separators=(",", ":"))
        flat: list[int] = []
        size = len(empty)
        for task_id, attempt in tasks:
            added = len(f",{task_id},{attempt}") - (0 if flat else 1)
            if flat and size + added > _NOTE_BYTES:
                notes.append(json.dumps([worker, flat], separators=(",", ":")))
                flat, size, added = [], len(empty), added - 1
            flat += (task_id, attempt)
            size += added
        notes.append(json.dumps([worker, flat], separators=(",", ":")))
    return notes


def heard_cancel(payload: str) -> tuple[str, list[tuple[int, int]] | None]:
    """The worker a cancel's notification is for, and its tasks cancelled (id, attempt);
    None for the tasks when it does not name them (an older API's: the worker's id alone)."""
    try:
        worker, flat = json.loads(payload)
        tasks = list(zip(flat[::2], flat[1::2], strict=True))
    except (ValueError, TypeError):
        return payload, None
    if not isinstance(worker, str) or not all(
        type(task_id) is int and type(attempt) is int for task_id, attempt in tasks
    ):
        return payload, None
    return worker, tasks


# The key of a task in each order, as the store reads it (a datetime, or its id).
@dataclass(frozen=True)
class WrittenRows:
    """A page's rows as the database wrote them (Store.list_page_text)."""

    # The JSON of the rows shown, comma separated, as the answer's `items` holds them.
    text: str
    # How many rows were read: one more than those shown when the page goes on.
    count: int
    # The last row shown, where a page that goes on goes on from (no JSON: `head` "").
    last: ListedTask | None
    # Where a bounded scan stopped (Store.list_tasks).
    bound: tuple[Any, int] | None


_ORDER_KEYS: dict[SortKey, Callable[[ListedTask], Any]] = {
    SortKey.ID: lambda task: task.id,
    SortKey.EXECUTE_AT: lambda task: task.execute_at,
    SortKey.FINISHED_AT: lambda task: task.finished_at,
}


@asynccontextmanager
async def _pipelined(
    conn: AsyncConnection[Any],
    bounds: dict[str, str] | None = None,
    then: Callable[[], Awaitable[Any]] | None = None,
) -> AsyncIterator[AsyncPipeline]:
    """One transaction in one pipeline: BEGIN and the block's statements, a Sync, then
    COMMIT once their answers are in (a caller that gave up on them commits nothing);
    `psycopg.Rollback` out of the block, or a statement refused, rolls back. Any other
    exception leaves the connection mid-transaction, and the pool discards it (the server
    rolls back). `bounds`: queries.BOUND_TRANSACTION's, first (`Store._bounds`).

    Not psycopg's `transaction()`: in a pipeline it ends the block with a Sync and then a
    Flush, and sends COMMIT after. PostgreSQL arms its idle-in-transaction timeout at a Sync
    and disarms it at the next message, the Flush, without arming it again. A process
    frozen there (SIGSTOP, a paused VM) kept its row locks for as long as it was frozen:
    its worker's row and the tasks it was claiming, so no one rescued its tasks (three
    draining workers, one stopped at random for 40 s with a 6 s lease: it landed there 3
    times in 3, nothing rescued until it was resumed). Here the Sync is the
    last message inside the transaction, and the session ends within the timeout.
    `then`: a statement sent with the COMMIT, to run once it is done."""
    async with conn.pipeline() as pipeline:
        await conn.execute("BEGIN")
        if bounds is not None:
            await conn.execute(queries.BOUND_TRANSACTION, bounds)
        try:
            yield pipeline
            await pipeline.sync()
        except psycopg.Rollback:
            await conn.execute("ROLLBACK")
            return
        except psycopg.Error:
            # A statement refused (its error raised at the Sync): roll back, and the
            # connection goes on; one that broke is discarded.
            if not conn.broken:
                with suppress(psycopg.Error):
                    await conn.execute("ROLLBACK")
                    await pipeline.sync()
            raise
        await conn.execute("COMMIT")
        if then is not None:
            await then()


async def _bounded(
    conn: AsyncConnection[Any],
    bounds: dict[str, str],
    cursor: psycopg.AsyncCursor[Any],
    sql: str,
    params: dict[str, Any],
) -> None:
    """One statement behind a transaction pooler, as its own transaction under
    queries.BOUND_TRANSACTION, sent in one round trip (COMMIT in the pipeline): the server
    ends it at the statement bound, as it does on a direct session. Without, a write that
    waited on a lock past the client's bound was answered 503 and carried out once the lock
    was free. A statement refused rolls back, and the connection goes on."""
    try:
        async with conn.pipeline():
            await conn.execute("BEGIN")
            await conn.execute(queries.BOUND_TRANSACTION, bounds)
            await cursor.execute(sql, params)
            await conn.execute("COMMIT")
    except psycopg.Error:
        if not conn.broken and conn.info.transaction_status == TransactionStatus.INERROR:
            with suppress(psycopg.Error):
                await conn.execute("ROLLBACK")
        raise


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_ACTIVITY_FIELDS = ("started", *OUTCOMES, "lateness", "lateness_max_ms")


def _counts_json(counts: Iterable[tuple[tuple[int | None, str], Activity]]) -> dict[str, Any]:
    """The parameters of queries.ADD_COUNTS: `counts` by (bucket or None for now, kind), and
    summed by kind for the totals."""
    activity = []
    totals: dict[str, Activity] = {}
    for (bucket, kind), of in counts:
        activity.append(
            {"bucket_s": bucket, "kind": kind, **{f: getattr(of, f) for f in _ACTIVITY_FIELDS}}
        )
        totals[kind] = merge_activity(totals.get(kind), of)
    return {
        "activity": json.dumps(activity),
        "totals": json.dumps(
            [
                {
                    "kind": kind,
                    **{f: getattr(of, f) for f in OUTCOMES},
                    "duration": of.duration_s,
                    "duration_sum_s": of.duration_sum_s,
                    "lateness": of.lateness_s,
                    "lateness_sum_s": of.lateness_sum_s,
                }
                for kind, of in totals.items()
            ]
        ),
    }


def _results_json(results: Iterable[Result], *, kept: bool = False) -> str:
    """The results as the statements read them; `kept`: with what `attempts` keeps too."""
    if kept:
        return json.dumps(
            [
                {
                    "id": r.id,
                    "attempt": r.attempt,
                    "state": r.state.value,
                    "output": r.output,
                    "error": r.error,
                    "retry_in_s": r.retry_in_s,
                    "timed_out": r.timed_out,
                    "traceback": r.traceback,
                    "error_group": r.error_group,
                    "late_s": r.late_s,
                }
                for r in results
            ]
        )
    return json.dumps(
        [
            {
                "id": r.id,
                "attempt": r.attempt,
                "state": r.state.value,
                "output": r.output,
                "error": r.error,
                "retry_in_s": r.retry_in_s,
            }
            for r in results
        ]
    )


def finish_statement(worker: str, results: Sequence[Result]) -> tuple[str, dict[str, Any]]:
    """The statement that records `results`: FINISH_MANY for a batch of first attempts that
    succeeded (a drain: their ids and lines, nothing more), else FINISH_MANY_RECORDING."""
    # In id order, the order a cancel of many tasks locks them in: two statements that
    # lock rows in one order never deadlock (queries.cancel_tasks).
    ordered = sorted(results, key=lambda r: r.id)
    if any(r.kept or r.late_s is not None for r in ordered):
        params = {"worker": worker, "results": _results_json(ordered, kept=True)}
        return queries.FINISH_MANY_RECORDING, params
    ids = json.dumps([r.id for r in ordered])
    return queries.FINISH_MANY, {
        "worker": worker,
        "ids": ids,
        "outputs": json.dumps([r.output for r in ordered]),
    }


def insert_task_steps(
    new: NewTask, default_max_attempts: int
) -> Generator[tuple[str, dict[str, Any]], list[Any], tuple[Any, bool]]:
    """Create one task: the statements, each yielded with its parameters and sent back its
    rows (with attribute access: `row.id`), and, returned, the task's row
    (queries.TASK_COLUMNS) and whether it was created.

    Whoever holds the connection runs them: the store on its pool, `functions.enqueue` on a
    caller's connection, in the caller's transaction. Nothing is checked here (parsing and
    tasks.check_payload / check_timeout do that before). With an idempotency key, a task
    holding the key already is returned (not created) if it was asked for with the same kind,
    time, payload and options; otherwise IdempotencyKeyReused is raised, with nothing
    written. Each statement reads a snapshot of its own (READ COMMITTED), so a key taken by a
    transaction that commits meanwhile is read after the insert waited for it.
    """
    max_attempts, timeout_s, priority = new.options(default_max_attempts)
    sent: dict[str, Any] = {
        "payload": _payload_param(new.payload),
        "max_attempts": max_attempts,
        "timeout_s": timeout_s,
        "priority": priority,
    }
    if new.idempotency_key is None:
        rows = yield queries.INSERT_TASK, {"kind": new.kind, "execute_at": new.execute_at, **sent}
        return rows[0], True
    key = new.idempotency_key
    sent["key"] = key
    for _ in range(_KEY_TRIES):
        rows = yield (
            queries.INSERT_TASK_KEYED,
            {"kind": new.kind, "execute_at": new.execute_at, **sent},
        )
        if rows:
            return rows[0], True
        rows = yield queries.GET_TASK_BY_KEY, sent
        if not rows:
            continue
        row = rows[0]
        requested_at = row.requested_at.replace(tzinfo=UTC)
        if (
            not new.same_request(row.kind, requested_at)
            or not row.same_payload
            or not row.same_options
        ):
            raise _reused(key, row.id)
        return row, False
    raise DatabaseUnavailable("the idempotency key's task kept vanishing; try again")


class Store:
    # The most rows one statement writes. A claim, a batch of results, a rescue: each is
    # bounded, so no statement's cost or lock time grows with a burst. (1,000: a write takes
    # ~20 ms here; larger batches bought no throughput.)
    WRITE_BATCH = 1_000
    # The most tasks one statement of `delete_all` deletes (DELETE /, for testing): bounded,
    # so it never runs into the statement timeout however many tasks there are.
    DELETE_BATCH = 10_000
    # The most runs of one action on a task that raced changes of its row (`_act`): each
    # run waits for the change before it, so a second sees the row as it is.
    ACT_RACES = 3

    # Creates, reads and cancels of one task, the API's busiest statements: at most this
    # many run at once, and calls made meanwhile share the next statement, at most
    # COALESCE_MAX in one (db.Coalescer). Measured with 32 clients on one process: 2 in
    # flight served 2,600-3,400 creates/s, p99 16-19 ms; 10 (one per pooled connection)
    # 1,700-2,300/s, p99 40 ms; none shared (before) ~1,100/s.
    COALESCE_INFLIGHT = 2
    COALESCE_MAX = 100

    def __init__(
        self, database: Database, *, clock: Callable[[], datetime | None] | None = None
    ) -> None:
        self.database = database
        self._clock = clock
        # A call waits for its statement at most as long as for a pooled connection.
        bounds: dict[str, Any] = {
            "max_inflight": self.COALESCE_INFLIGHT,
            "max_size": self.COALESCE_MAX,
            "max_wait_s": database.settings.db_connect_timeout_s,
        }
        self._creates = Coalescer(self._insert_task_many, **bounds)
        self._reads = Coalescer(self._get_task_many, **bounds)
        self._cancels = Coalescer(self._cancel_task_many, **bounds)

    async def _all(
        self,
        sql: str,
        row_factory: RowFactory[Any] = namedtuple_row,
        *,
        bound_s: float | None = None,
        wait_s: float | None = None,
        **params: Any,
    ) -> list[Any]:
        async with self.database.connection(wait_s) as conn:
            cursor = conn.cursor(row_factory=row_factory)
            bounds = self._bounds()
            work = (
                cursor.execute(sql, params)
                if bounds is None
                else _bounded(conn, bounds, cursor, sql, params)
            )
            await self.database.bounded(conn, work, bound_s)
            return await cursor.fetchall() if cursor.description else []

    def _bounds(self) -> dict[str, str] | None:
        """queries.BOUND_TRANSACTION's parameters behind a transaction pooler (each of the
        store's transactions that writes runs it first); None where the session is bounded
        by its startup options."""
        if not behind_pooler(self.database.settings):
            return None
        return {"ms": str(int(self.database.settings.db_statement_timeout_s * 1000))}

    async def _bound_transaction(self, conn: AsyncConnection[Any]) -> None:
        """Behind a transaction pooler, bound the transaction `conn` is in (`_bounds`)."""
        if (bounds := self._bounds()) is not None:
            await conn.execute(queries.BOUND_TRANSACTION, bounds)

    async def _transaction(self, work: Callable[[AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run `work` on one connection in one transaction, bounded as a statement is; an
        exception out of `work` rolls it back."""
        async with self.database.connection() as conn:

            async def run() -> T:
                async with conn.transaction():
                    await self._bound_transaction(conn)
                    return await work(conn)

            return await self.database.bounded(conn, run())

    async def _pinned(
        self,
        *statements: tuple[str, dict[str, Any]],
        row_factory: RowFactory[Any] = tuple_row,
        wait_s: float | None = None,
        then: str | None = None,
    ) -> list[list[Any]]:
        """Run `statements` in one transaction under queries.PINNED_PLAN, sent as one
        pipeline (`_pipelined`); return each one's rows (as tuples, or `row_factory`'s).
        COMMIT goes once their answers are in: a caller that gave up on them (`bounded`)
        commits nothing, as the server rolls back when it finds the connection gone
        (tests/integration/test_claims.py). `then`: a statement without values sent with
        the COMMIT, run once it is done, its rows last."""
        async with self.database.connection(wait_s) as conn:
            cursors = [conn.cursor(row_factory=row_factory) for _ in statements]
            after = None if then is None else conn.cursor(row_factory=row_factory)

            async def work() -> None:
                run_then = None if after is None else functools.partial(after.execute, then)
                async with _pipelined(conn, self._bounds(), run_then):
                    await conn.execute(queries.PINNED_PLAN)
                    for cursor, (sql, params) in zip(cursors, statements, strict=True):
                        await cursor.execute(sql, params)

            await self.database.bounded(conn, work())
            rows = [await cursor.fetchall() if cursor.description else [] for cursor in cursors]
            if after is not None:
                rows.append(await after.fetchall())
            return rows

    async def ping(self) -> None:
        await self._all(queries.PING)

    async def schema_revision(self) -> str | None:
        """The migration the database is at; None when it has no taskrunner schema."""
        try:
            rows = await self._all(queries.SCHEMA_REVISION_IN_DATABASE, tuple_row)
        except SchemaOutdated:
            return None
        return str(rows[0][0]) if rows else None

    # --- tasks, for the API --------------------------------------------------------------

    async def insert_task(self, new: NewTask, max_attempts: int) -> Task:
        return await self._creates((new, max_attempts))

    async def _insert_task_many(
        self, new: list[tuple[NewTask, int]], wait_s: float | None
    ) -> list[Task]:
        if len(new) == 1:
            [(one, default_max_attempts)] = new
            max_attempts, timeout_s, priority = one.options(default_max_attempts)
            rows = await self._all(
                queries.INSERT_TASK,
                wait_s=wait_s,
                kind=one.kind,
                execute_at=one.execute_at,
                max_attempts=max_attempts,
                payload=_payload_param(one.payload),
                priority=priority,
                timeout_s=timeout_s,
            )
            return [_task(rows[0])]
        sent = [_row(n, m) for n, m in new]
        rows = await self._all(queries.INSERT_TASK_MANY, wait_s=wait_s, tasks=_dump_payload(sent))
        return [_task(row) for row in rows]

    async def insert_task_keyed(self, new: NewTask, default_max_attempts: int) -> tuple[Task, bool]:
        """Insert `new` unless a task holds its key; return the task, and whether it is new.

        Raises IdempotencyKeyReused when the key's task was made for another kind, time,
        payload or options.
        """
        assert new.idempotency_key is not None
        steps = insert_task_steps(new, default_max_attempts)
        try:
            sql, params = next(steps)
            while True:
                sql, params = steps.send(await self._all(sql, **params))
        except StopIteration as done:
            row, created = done.value
            return _task(row), created

    async def insert_tasks(self, new: Sequence[NewTask], max_attempts: int) -> list[int]:
        """Insert `new` (keys unique among them); return the ids in order, an existing
        task's for an item whose key is taken. All are written or none."""
        if not new:
            return []
        if any(n.idempotency_key is not None for n in new):
            for _ in range(_KEY_TRIES):
                try:
                    return await self._transaction(
                        lambda conn: self._insert_keyed(conn, new, max_attempts)
                    )
                except _KeyVanished:
                    continue
            raise DatabaseUnavailable("an idempotency key's task kept vanishing; try again")
        return await self.insert_tasks_streamed([[_row(n) for n in new]], max_attempts)

    async def insert_tasks_streamed(
        self, slices: Iterable[list[dict[str, Any]]], max_attempts: int
    ) -> list[int]:
        """Insert tasks given as `{"kind", "at_us"}` (whole microseconds since the epoch:
        exact over the whole range, queries.INSERT_TASKS) and perhaps a `"payload"` (a JSON
        value, checked before) and options (`"max_attempts"`, else `max_attempts`;
        `"timeout_s"`, `"priority"`), one statement per slice, in one transaction; return
        their ids in order. All or none: an exception out of `slices`
        rolls back what was sent before it.

        The statements go out in a pipeline, each as soon as its slice comes: the server
        writes one slice while `slices` reads the next (tasks.create_tasks_streamed)."""
        # pydantic-core's to_json: 1.9 ms for 10,000 tasks, against 7.4 ms with json.dumps.
        # Imported here, by the API's batches: the tick's cold start imports no pydantic.
        from pydantic_core import to_json

        async with self.database.connection() as conn:
            cursors: list[psycopg.AsyncCursor[tuple[int]]] = []

            async def work() -> None:
                # COMMIT on its own, once every INSERT has answered, as one statement's commit
                # is. Sent down the pipeline behind them, a COMMIT the server had carried out
                # could be reported as a lost connection: a session ended meanwhile (a
                # failover, an idle timeout, pg_terminate_backend) ends right after the
                # commit, before the pipeline's Sync is answered, and a client that retries
                # the 503 writes the batch twice (a test ending sessions at random: 78 of 277
                # failed batches had been written; none this way).
                async with conn.transaction():
                    async with conn.pipeline():
                        await self._bound_transaction(conn)
                        for rows in slices:
                            cursor = conn.cursor(row_factory=tuple_row)
                            await cursor.execute(
                                queries.INSERT_TASKS,
                                {"tasks": to_json(rows).decode(), "max_attempts": max_attempts},
                            )
                            cursors.append(cursor)

            await self.database.bounded(conn, work())
            return [task_id for cursor in cursors for (task_id,) in await cursor.fetchall()]

    async def _insert_keyed(
        self, conn: AsyncConnection[Any], new: Sequence[NewTask], max_attempts: int
    ) -> list[int]:
        from pydantic_core import to_json  # as insert_tasks_streamed: 35 -> 10 ms for 10,000 keys

        payload = to_json(
            [{**_row(n, max_attempts), "key": n.idempotency_key} for n in new]
        ).decode()
        cursor = conn.cursor(row_factory=tuple_row)
        await cursor.execute(queries.INSERT_TASKS_KEYED, {"tasks": payload})
        inserted = await cursor.fetchall()
        taken = {key: task_id for task_id, key in inserted if key is not None}
        unkeyed = iter([task_id for task_id, key in inserted if key is None])
        ids: list[int] = [0] * len(new)
        skipped: list[int] = []
        for i, n in enumerate(new):
            if n.idempotency_key is None:
                ids[i] = next(unkeyed)
            elif n.idempotency_key in taken:
                ids[i] = taken[n.idempotency_key]
            else:
                skipped.append(i)
        if not skipped:
            return ids
        sent = to_json(
            [{**_row(new[i], max_attempts), "key": new[i].idempotency_key} for i in skipped]
        ).decode()
        await cursor.execute(queries.FIND_KEYS, {"sent": sent})
        found = {
            key: (task_id, kind, at, same)
            for key, task_id, kind, at, same in await cursor.fetchall()
        }
        for i in skipped:
            n = new[i]
            assert n.idempotency_key is not None
            if n.idempotency_key not in found:
                raise _KeyVanished
            task_id, kind, at, same_payload = found[n.idempotency_key]
            if not n.same_request(kind, at.replace(tzinfo=UTC)) or not same_payload:
                raise _reused(n.idempotency_key, task_id)
            ids[i] = task_id
        return ids

    async def get_task(self, task_id: int) -> Task | None:
        return await self._reads(task_id)

    async def _get_task_many(self, ids: list[int], wait_s: float | None) -> list[Task | None]:
        if len(ids) == 1:
            rows = await self._all(queries.GET_TASK, wait_s=wait_s, id=ids[0])
            return [_task(rows[0]) if rows else None]
        rows = await self._all(queries.GET_TASK_MANY, wait_s=wait_s, ids=ids)
        found = {row.id: _task(row) for row in rows}
        return [found.get(task_id) for task_id in ids]

    # A page is read a chunk of rows at a time: the first of at most this many (a default
    # page, 100 and one more, in one statement), the next sized by what the rows so far held.
    PAGE_CHUNK = 101

    async def list_tasks(
        self,
        matching: TaskFilter,
        order: TaskOrder,
        *,
        after: tuple[Any, int] | None,
        limit: int,
        max_bytes: int,
        bounded: bool = True,
    ) -> tuple[list[ListedTask], bool, tuple[Any, int] | None]:
        """Tasks `matching` in `order` (queries.listing), as listed (ListedTask: their JSON
        written by the database but for their timeout and payload), past `after` (the key,
        a datetime or an id, and the id of the last task read before; None: from the
        start); whether
        the reading stopped short of `limit` because the rows read held `max_bytes` (their
        payloads, outputs and errors as stored text, queries.STORED_BYTES): a page of large
        payloads is cut under its limit anyway (responses.page_json), and is not read whole
        first. Each chunk goes on from the last task read, as the next page would. And where
        a bounded scan stopped (queries.Listing): the position to go on from when the page is
        short, None if it read to the end of the order. Not `bounded`: read on until `limit` (the
        original routes', whose answer has no cursor to go on with)."""
        listing = queries.listing(matching, order)
        params, bound = await self._bound(listing, after, bounded=bounded)
        key = _ORDER_KEYS[listing.order.key]
        rows: list[ListedTask] = []
        held = 0
        chunk = min(limit, self.PAGE_CHUNK)
        while True:
            if after is not None:
                params.update(after_key=after[0], after_id=after[1])
            sql = listing.page(after=after is not None, bounded=bound is not None)
            [fetched] = await self._pinned((sql, {**params, "limit": chunk}))
            rows += map(_listed, fetched)
            held += sum(row[6] for row in fetched)
            if len(fetched) < chunk or len(rows) >= limit:
                return rows, False, bound
            if held >= max_bytes:
                return rows, True, bound
            after = (key(rows[-1]), rows[-1].id)
            per_row = max(1, held // len(rows))
            chunk = max(1, min(limit - len(rows), (max_bytes - held) // per_row + 1))

    async def _bound(
        self, listing: queries.Listing, after: tuple[Any, int] | None, *, bounded: bool
    ) -> tuple[dict[str, Any], tuple[Any, int] | None]:
        """The parameters of `listing`'s page past `after`, and where its bounded scan
        stops (queries.Listing.bound; None: it reads to the end of the order, or is not
        `bounded`)."""
        params: dict[str, Any] = dict(listing.params)
        if after is not None:
            params.update(after_key=after[0], after_id=after[1])
        if not (bounded and listing.rest != "true"):
            return params, None
        [found] = await self._pinned((listing.bound(after=after is not None), params))
        if not found:
            return params, None
        params.update(bound_key=found[0][0], bound_id=found[0][1])
        return params, (found[0][0], found[0][1])

    async def list_page_text(
        self,
        matching: TaskFilter,
        order: TaskOrder,
        *,
        after: tuple[Any, int] | None,
        limit: int,
    ) -> WrittenRows | None:
        """`list_tasks` of at most PAGE_CHUNK rows (`limit`), bounded, written whole by the
        database (queries.Listing.page_text) when none of them has a timeout or a payload
        (their JSON is Python's to write): the JSON of the first `limit - 1`, comma
        separated, and what the page's cursor is made from. None when a row has either,
        or `limit` is over PAGE_CHUNK: `list_tasks` reads the page then.

        One statement, sent with the planner's settings in one message (`_pinned_text`):
        under wrk (32 connections, a page of 100, alternating runs at load 3-6), the API
        process's CPU a page went from 1.6-1.9 ms (101 rows read in a pipeline) to
        0.65-1.0 ms. A statement with no value but its limit (a first page, unfiltered or
        by state) is run from its prepared plan (`_prepared_rows`)."""
        if limit > self.PAGE_CHUNK:
            return None
        listing = queries.listing(matching, order)
        params, bound = await self._bound(listing, after, bounded=True)
        sql = listing.page_text(after=after is not None, bounded=bound is not None)
        rows = await self._pinned_text(sql, params, limit=limit, shown=limit - 1)
        [(count, plain, text, last_id, last_execute_at, last_finished_at)] = rows
        if not plain:
            return None
        last = None
        if last_id is not None:
            last = ListedTask(
                last_id, "", last_execute_at.replace(tzinfo=UTC), _utc(last_finished_at),
                None, None, "",
            )  # fmt: skip
        return WrittenRows(text or "", count, last, bound)

    async def _pinned_text(
        self, sql: str, params: dict[str, Any], *, limit: int, shown: int
    ) -> list[Any]:
        """The rows of the page statement `sql` (its values `params`, `limit` and `shown`)
        run under queries.PINNED_PLAN, the two sent as one message (the simple query
        protocol, its parameters bound by the client): one implicit transaction, as
        `_pinned`'s pipeline is, at a third of its CPU (no pipeline to drive, no BEGIN and
        COMMIT), behind a transaction pooler too. One with no value but `limit` and `shown`
        is run from its plan prepared on the connection where it can be (`_prepared_rows`)."""
        async with self.database.connection() as conn:
            cursor = psycopg.AsyncClientCursor(conn)

            async def last_rows(statements: str, values: dict[str, Any] | None = None) -> list[Any]:
                await cursor.execute(statements, values)
                while cursor.nextset():
                    pass
                return await cursor.fetchall()

            async def work() -> list[Any]:
                # Asked once connected: a process's first connection may be what finds a
                # pooler.
                if not params and not behind_pooler(self.database.settings):
                    rows = await self._prepared_rows(conn, last_rows, sql, limit, shown)
                    if rows is not None:
                        return rows
                values = {**params, "limit": limit, "shown": shown}
                return await last_rows(f"{queries.PINNED_PLAN.strip()};\n{sql}", values)

            return await self.database.bounded(conn, work())

    # Page statements prepared on one connection at most (~25 KB of the server's memory
    # each); past that, a page is sent as text.
    MAX_PREPARED = 32

    async def _prepared_rows(
        self,
        conn: AsyncConnection[Any],
        last_rows: Callable[[str], Awaitable[list[Any]]],
        sql: str,
        limit: int,
        shown: int,
    ) -> list[Any] | None:
        """The rows of a page statement whose only values are `limit` and `shown`, run
        (`last_rows`) from the plan prepared for it on `conn` (PREPARE, once; then EXECUTE, in
        one message with queries.PINNED_GENERIC_PLAN): planned once, not at each page. Under
        wrk (32 connections, the first page of 100, three alternating runs) the server's CPU
        a page went from 1.16-1.19 ms to 0.66-0.69 ms, and pages from 1,139-1,174/s to
        1,663-1,772/s. None (sent as text, then): `conn` holds MAX_PREPARED already, or its
        session changes between messages (a pooler, which runs each message on any server
        connection, is never asked to)."""
        name = "taskrunner_page_" + hashlib.blake2b(sql.encode(), digest_size=8).hexdigest()
        run = f"{queries.PINNED_GENERIC_PLAN.strip()};\nEXECUTE {name}({limit:d}, {shown:d})"
        prepared = _PREPARED_PAGES.setdefault(conn, set())
        if name in prepared:
            try:
                return await last_rows(run)
            except psycopg.errors.InvalidSqlStatementName:
                prepared.discard(name)  # (DEALLOCATE, DISCARD ALL: prepared again)
        if len(prepared) >= self.MAX_PREPARED:
            return None
        prepare = f"PREPARE {name} AS {_server_side(sql)};\n{run}"
        try:
            rows = await last_rows(prepare)
        except psycopg.errors.DuplicatePreparedStatement:
            # Prepared in this session, unknown here: prepared anew, in the same message
            # (one session, whatever hands out sessions).
            try:
                rows = await last_rows(f"DEALLOCATE {name};\n{prepare}")
            except psycopg.errors.InvalidSqlStatementName:
                return None
        prepared.add(name)
        return rows

    async def cancel_task(self, task_id: int) -> Task | None:
        """Cancel the task if it is scheduled or running; return it cancelled (None: it was
        not cancelled now: missing, or finished, cancelled before included).

        Cancels made at the same moment share a statement and its notification, as creates
        do (db.Coalescer): one by one, each cancel's commit and NOTIFY cost a round trip and
        a flush, and 1,000 cancels from 32 clients took 4.7 s in the store alone."""
        return await self._cancels(task_id)

    async def _cancel_task_many(self, ids: list[int], wait_s: float | None) -> list[Task | None]:
        wanted = sorted(set(ids))
        # Pinned, as the cancels by filter are: a plan for the values at hand, by key.
        [rows] = await self._pinned(
            (queries.CANCEL_TASK, {"ids": wanted, "limit": len(wanted)}),
            row_factory=namedtuple_row,
            wait_s=wait_s,
        )
        if rows:
            await self.announce(_cancelled(rows))
        found = {row.id: _task(row) for row in rows}
        return [found.get(task_id) for task_id in ids]

    async def cancel_matching(self, matching: TaskFilter, *, limit: int) -> int:
        """Cancel up to `limit` tasks `matching` (of the cancellable ones; all of those when
        it names no state), lowest ids first; return how many."""
        return await self._in_batches(
            queries.cancel_tasks, queries.CANCELLABLE, matching, limit, {}, announce=True
        )

    async def retry_matching(self, matching: TaskFilter, *, limit: int, max_attempts: int) -> int:
        """Schedule again, due now with `max_attempts` more runs, up to `limit` failed or
        cancelled tasks `matching` (all of those when it names no state), lowest ids first;
        return how many."""
        return await self._in_batches(
            queries.retry_tasks,
            queries.RETRYABLE,
            matching,
            limit,
            {"max_attempts": max_attempts},
            also=_BULK_ALSO[BulkAction.RETRY],
        )

    async def delete_matching(self, matching: TaskFilter, *, limit: int) -> int:
        """Delete up to `limit` tasks `matching` that are not running (of those, all when it
        names no state), lowest ids first, with all that is kept of each; return how many."""
        return await self._in_batches(
            queries.delete_tasks, queries.DELETABLE, matching, limit, {}, then=self._sweep_attempts
        )

    async def _sweep_attempts(self, rows: list[Any]) -> None:
        """The attempts of the tasks deleted (`rows`, their ids first) that their delete's
        snapshot did not see (queries.delete_tasks), in a transaction of its own."""
        await self._all(queries.DELETE_ATTEMPTS_OF_GONE, ids=[row[0] for row in rows])

    async def count_matching(self, action: BulkAction, matching: TaskFilter, *, limit: int) -> int:
        """How many tasks `matching` the bulk `action` would take now, at most `limit`: the
        tasks `_in_batches` would pick for it, counted, untouched."""
        allowed = _BULK_STATES[action]
        wanted = tuple(s for s in allowed if not matching.states or s in matching.states)
        if not wanted:
            return 0
        condition, more = queries.filter_condition(matching)
        if action in _BULK_ALSO:
            condition = f"({condition}) AND {_BULK_ALSO[action](condition)}"
        [[(count,)]] = await self._pinned(
            (queries.count_tasks(condition, wanted), {**more, "limit": limit})
        )
        return int(count)

    async def _in_batches(
        self,
        statement_for: Callable[[str, tuple[str, ...]], str],
        allowed: tuple[str, ...],
        matching: TaskFilter,
        limit: int,
        params: dict[str, Any],
        *,
        announce: bool = False,
        then: Callable[[list[Any]], Awaitable[None]] | None = None,
        also: Callable[[str], str] | None = None,
    ) -> int:
        """Run `statement_for(condition, states)` over the tasks `matching` (of its states
        within `allowed`, and meeting `also` of their SQL), WRITE_BATCH at most a statement, until
        `limit` are done or none is left; return how many were. With `announce`, each batch
        is a cancel's; `then` is called with each batch's rows once it committed."""
        wanted = tuple(s for s in allowed if not matching.states or s in matching.states)
        if not wanted:
            return 0
        condition, more = queries.filter_condition(matching)
        # Each batch goes on past the last id of the one before: a task retried by one batch
        # that failed again before the next matched again, and was retried twice in one call.
        condition = f"({condition}) AND id > %(after_id)s"
        if also is not None:
            condition = f"{condition} AND {also(condition)}"
        more = {**more, "after_id": 0}
        statement = statement_for(condition, wanted)
        done = 0
        clashes = 0  # in a row (see below)
        while done < limit:
            batch = min(limit - done, self.WRITE_BATCH)
            # Pinned (queries.PINNED_PLAN): on a table never analyzed, the scheduled tasks'
            # ids were read through a bitmap and all sorted, 25,000 for a batch of 1,000
            # (tests/integration/test_plans.py); pinned, their index is read in order.
            try:
                [rows] = await self._pinned((statement, {**params, **more, "limit": batch}))
            except DatabaseError as exc:
                # A retry that raced the making of an occurrence (see _act): run again, and
                # the statement leaves that task. Each clash is another transaction that made
                # occurrences meanwhile (a creator's, a worker's or a tick's): a thousand in a
                # row cannot be that.
                clashes += 1
                if not _occurrence_taken(exc) or clashes > self.WRITE_BATCH:
                    raise
                continue
            clashes = 0
            done += len(rows)
            if rows:
                more["after_id"] = max(row[0] for row in rows)
                if announce:
                    await self.announce(_cancelled(rows))
                if then is not None:
                    await then(rows)
            if len(rows) < batch and not await self._any_left(condition, wanted, more):
                break
        return done

    async def _any_left(self, condition: str, states: tuple[str, ...], params: Any) -> bool:
        """Whether a task in `states` meets `condition` now. A bulk statement that found
        fewer than its limit may have waited for rows a concurrent one held, found them
        changed and dropped them without taking the next ones (PostgreSQL rechecks a locked
        row, not the LIMIT): it answered 0 while thousands still matched."""
        [[(count,)]] = await self._pinned(
            (queries.count_tasks(condition, states), {**params, "limit": 1})
        )
        return bool(count)

    async def delete_task(self, task_id: int) -> TaskState | None:
        """Delete the task unless it is running; return the state it had, None if missing."""
        # One transaction; the attempts' delete a statement of its own (its comment).
        rows, _ = await self._pinned(
            (queries.DELETE_TASK, {"id": task_id}),
            (queries.DELETE_ATTEMPTS_OF_GONE, {"ids": [task_id]}),
            row_factory=namedtuple_row,
        )
        return TaskState(rows[0].state) if rows else None

    async def delete_all(self) -> int:
        """Delete every task that is not running, a bounded batch per statement; return how
        many were deleted."""
        deleted = 0
        while True:
            [(count,)] = await self._all(
                queries.DELETE_NOT_RUNNING, tuple_row, limit=self.DELETE_BATCH
            )
            deleted += count
            if count < self.DELETE_BATCH:
                return int(deleted)

    async def _act(self, sql: str, **params: Any) -> Acted:
        """An action on one task (queries._act). Run again while it raced a change of the
        row that hid the row's state from it (a claim and a finish while it waited for the
        lock: each run waits for the last), or a retry raced the making of its occurrence."""
        rows: list[Any] = []
        for run in range(self.ACT_RACES):
            try:
                rows = await self._all(sql, **params)
            except DatabaseError as exc:
                if not _occurrence_taken(exc) or run == self.ACT_RACES - 1:
                    raise
                continue
            if not rows or not rows[0].raced:
                break
        return _acted(rows)

    async def run_task(self, task_id: int) -> Acted:
        """Make a scheduled task due now."""
        return await self._act(queries.RUN_TASK, id=task_id)

    async def retry_task(self, task_id: int, max_attempts: int) -> Acted:
        """Schedule a failed task again, due now, with `max_attempts` more runs."""
        return await self._act(queries.RETRY_TASK, id=task_id, max_attempts=max_attempts)

    async def reschedule_task(
        self,
        task_id: int,
        execute_at: datetime | None,
        *,
        set_payload: bool = False,
        payload: Any = None,
    ) -> Acted:
        """Move a scheduled task to `execute_at` (None: it stays), and with `set_payload`
        give it `payload` (None: none)."""
        return await self._act(
            queries.RESCHEDULE_TASK,
            id=task_id,
            execute_at=execute_at,
            set_payload=set_payload,
            payload=_payload_param(payload),
        )

    # --- schedules ---------------------------------------------------------------------------

    # The most schedules one transaction of the creator locks and makes occurrences for.
    SCHEDULE_BATCH = 1_000

    def clock(self) -> datetime | None:
        """A test's time for the schedules and the claim (queries.NOW), given as `clock`
        (River's injectable now); None, always in production: the database's."""
        return None if self._clock is None else self._clock()

    async def get_schedule(self, name: str) -> Schedule | None:
        rows = await self._all(queries.GET_SCHEDULE, name=name)
        return _schedule(rows[0]) if rows else None

    async def list_schedules(self, *, after: str, limit: int) -> list[Schedule]:
        """Schedules named after `after` (byte order), at most `limit`."""
        rows = await self._all(queries.LIST_SCHEDULES, after=after, limit=limit)
        return [_schedule(row) for row in rows]

    async def change_schedule(
        self, name: str, change: Callable[[Schedule | None, datetime], Schedule | None]
    ) -> tuple[Schedule | None, Schedule | None]:
        """Apply `change` to the schedule `name` in one transaction, the row locked: it gets
        the schedule (None: there is none) and the time now, and returns the schedule to
        write (None: delete it); an exception out of it changes nothing. A schedule deleted
        or disabled by it has its occurrences that have not started cancelled, in the same
        transaction. Returns the schedule as written and as it was."""
        for _ in range(_KEY_TRIES):
            cancelled: list[Cancelled] = []
            try:
                result = await self._transaction(
                    functools.partial(self._change, name=name, change=change, cancelled=cancelled)
                )
            except _KeyVanished:  # created meanwhile by another request: try again
                continue
            # Only once the change has committed (queries.ANNOUNCE_CANCELS says why).
            for done in cancelled:
                await self.announce(done)
            return result
        raise DatabaseUnavailable("the schedule kept changing under this request; try again")

    async def _change(
        self,
        conn: AsyncConnection[Any],
        name: str,
        change: Callable[[Schedule | None, datetime], Schedule | None],
        cancelled: list[Cancelled],
    ) -> tuple[Schedule | None, Schedule | None]:
        cursor = conn.cursor(row_factory=namedtuple_row)
        await cursor.execute(queries.NOW_UTC, {"now": self.clock()})
        [(now,)] = await cursor.fetchall()
        await cursor.execute(queries.LOCK_SCHEDULE, {"name": name})
        rows = await cursor.fetchall()
        before = _schedule(rows[0]) if rows else None
        after = change(before, now.replace(tzinfo=UTC))
        if after is before:  # nothing to write
            pass
        elif after is None:
            await cursor.execute(queries.DELETE_SCHEDULE, {"name": name})
        else:
            sql = queries.INSERT_SCHEDULE if before is None else queries.UPDATE_SCHEDULE
            await cursor.execute(sql, _schedule_params(after))
            if not await cursor.fetchall():
                raise _KeyVanished
        if after is not before and (after is None or not after.enabled):
            while True:
                done = await self.cancel_tasks(
                    queries.CANCEL_UNSTARTED_OCCURRENCES,
                    limit=self.WRITE_BATCH,
                    conn=conn,
                    name=name,
                )
                cancelled.append(done)
                if len(done.ids) < self.WRITE_BATCH:
                    break
        if after is not None:  # as shown, with its last task (cancelled by now, maybe)
            await cursor.execute(queries.GET_SCHEDULE, {"name": name})
            after = _schedule((await cursor.fetchall())[0])
        return after, before

    async def create_occurrences(self, plan: PlanOccurrences, *, ahead_s: float) -> int:
        """Make the tasks of the occurrences due within `ahead_s`: lock the schedules due
        (queries.PICK_DUE_SCHEDULES), `plan` their tasks, write them and move the schedules
        on, one transaction per SCHEDULE_BATCH schedules; return how many tasks were made."""
        made = 0
        while True:
            picked, created = await self._transaction(
                lambda conn: self._create_occurrences(conn, plan, ahead_s)
            )
            made += created
            if picked < self.SCHEDULE_BATCH:
                return made

    async def _create_occurrences(
        self, conn: AsyncConnection[Any], plan: PlanOccurrences, ahead_s: float
    ) -> tuple[int, int]:
        # The index, whatever the statistics say (a fresh table has none): see PINNED_PLAN.
        await conn.execute(queries.PINNED_PLAN)
        cursor = conn.cursor(row_factory=namedtuple_row)
        await cursor.execute(
            queries.PICK_DUE_SCHEDULES,
            {
                "now": self.clock(),
                "ahead_s": ahead_s,
                "limit": self.SCHEDULE_BATCH,
            },
        )
        rows: list[Any] = await cursor.fetchall()
        if not rows:
            return 0, 0
        tasks, moved = plan([(_schedule(row), row.now.replace(tzinfo=UTC)) for row in rows])
        await cursor.execute(
            queries.CREATE_OCCURRENCES,
            {
                "tasks": _dump_payload(
                    [
                        {
                            "schedule": t.schedule,
                            "kind": t.kind,
                            "at_us": _us(t.at),
                            "max_attempts": t.max_attempts,
                            "payload": t.payload,
                            "timeout_s": t.timeout_s,
                            "priority": t.priority,
                        }
                        for t in tasks
                    ]
                ),
                "schedules": _dump_payload(
                    [
                        {
                            "name": m.name,
                            "next_us": _us(m.next_run_at),
                            "last_us": _us(m.last_occurrence_at),
                            "skipped": m.skipped,
                        }
                        for m in moved
                    ]
                ),
            },
        )
        [(created, _)] = await cursor.fetchall()
        return len(rows), int(created)

    async def cancel_tasks(
        self,
        statement: str,
        *,
        limit: int,
        conn: AsyncConnection[Any] | None = None,
        **params: Any,
    ) -> Cancelled:
        """Run a cancel made by `queries.cancel_tasks` (its condition's `params` given) on at
        most `limit` tasks; return the ids cancelled, ascending, and who held them.

        On `conn` when given, in the caller's transaction: the caller then calls `announce`
        once that has committed. Else in a statement of its own, announced at once."""
        params = {**params, "limit": limit}
        if conn is not None:
            cursor = conn.cursor(row_factory=tuple_row)
            await cursor.execute(statement, params)
            rows = await cursor.fetchall()
        else:
            [rows] = await self._pinned((statement, params))
        cancelled = _cancelled(rows)
        if conn is None:
            await self.announce(cancelled)
        return cancelled

    async def announce(self, cancelled: Cancelled) -> None:
        """Tell the workers that held cancelled tasks, and count the cancels (/stats): once
        the cancel has committed (queries.ANNOUNCE_CANCELS says why apart)."""
        if cancelled.ids:
            await self._all(
                queries.ANNOUNCE_CANCELS,
                tuple_row,
                notes=cancel_notes(cancelled.held),
                **_counts_json(
                    ((None, kind), Activity(cancelled=n)) for kind, n in cancelled.kinds.items()
                ),
            )

    # --- workers ---------------------------------------------------------------------------

    async def register_worker(
        self,
        *,
        worker: str,
        lease_s: float,
        kinds: Sequence[str] = (),
        host: str | None = None,
        pid: int | None = None,
        version: str | None = None,
        tick: bool = False,
    ) -> None:
        """Register the worker with its lease and who it is, and record that it runs `kinds`."""
        await self._all(
            queries.REGISTER_WORKER,
            worker=worker,
            lease_s=lease_s,
            kinds=sorted(kinds),
            host=host,
            pid=pid,
            version=version,
            tick=tick,
            now=None,
        )

    async def list_workers(self, *, limit: int) -> list[Worker]:
        """Live workers, and those that left or died in the last hour, the newest first."""
        rows = await self._all(queries.LIST_WORKERS, limit=limit)
        return [
            Worker(
                id=row.id,
                host=row.host,
                pid=row.pid,
                started_at=row.started_at.replace(tzinfo=UTC),
                kinds=row.kinds,
                running=row.running,
                last_heartbeat_at=row.last_heartbeat_at.replace(tzinfo=UTC),
                version=row.version,
                tick=row.tick,
                state=row.state,
                lease_expires_at=row.lease_expires_at.replace(tzinfo=UTC),
                rescued=row.rescued,
            )
            for row in rows
        ]

    async def heartbeat(
        self,
        *,
        worker: str,
        lease_s: float,
        timeout_s: float,
        kinds: Sequence[str] = (),
        now: datetime | None = None,
    ) -> bool:
        """Renew the worker's lease (and record that it runs `kinds`); False when the lease
        had already run out. `now`: a test's clock (queries.NOW)."""
        rows = await self._all(
            queries.HEARTBEAT,
            worker=worker,
            lease_s=lease_s,
            bound_s=timeout_s,
            kinds=sorted(kinds),
            now=now,
        )
        return bool(rows)

    async def count_unserved(self) -> dict[str, tuple[int, bool]]:
        """Due tasks of the kinds nothing ran in the last 5 minutes, by kind, among the
        first queries.UNSERVED_READ due; and whether more were due (the count is then at
        least that)."""
        # Pinned, for its plan (queries._due_tasks).
        [rows] = await self._pinned((queries.STATS_UNSERVED, {}))
        return {kind: (n, full) for kind, n, full in rows}

    async def deregister_worker(self, *, worker: str) -> None:
        # Pinned as the claim is, for its plan (a custom one: see queries.PINNED_PLAN).
        await self._pinned((queries.DEREGISTER_WORKER, {"worker": worker}))

    # --- claim -> run -> record --------------------------------------------------------------

    async def claim_due(
        self,
        *,
        worker: str,
        kinds: Sequence[str],
        limit: int,
        lease_s: float,
        short_kinds: Sequence[str] = (),
        fit_s: float | None = None,
        caps: Mapping[str, int] | None = None,
        claim_from: ClaimFrom | None = None,
        ahead_s: float = 0.0,
        now: datetime | None = None,
    ) -> tuple[list[Claimed], NextDue]:
        """Claim up to `limit` due tasks of `kinds`, and of `short_kinds` those whose own
        timeout is at most `fit_s`, the lowest priority first, and no more of a kind in
        `caps` than its cap there; also say when the next one left is due. Returned in the
        order to start them: by priority, then by id.

        One transaction (NEXT_DUE sees the claim's own rows as taken), one round trip.
        `claim_from`: where to start reading each priority's due tasks (None: from the
        start; a task due before it is not claimed). `now`: a test's clock (queries.NOW; by
        default `clock()`'s)."""
        if now is None:
            now = self.clock()
        params = {
            "worker": worker,
            "kinds": list(kinds),
            "short_kinds": list(short_kinds),
            "fit_s": fit_s,
            "caps": json.dumps(caps or {}),
            "limit": min(limit, self.WRITE_BATCH),
            "lease_s": lease_s,
            "from_due": claim_from and claim_from.due,
            "from_id": claim_from and claim_from.id,
            "ahead_s": ahead_s,
            "now": now,
        }
        # A claim ahead of time also reads the database's clock once it has committed.
        then = queries.CLOCK if ahead_s > 0 else None
        rows, [(now_s, wait_s, levels, from_due, from_id)], *clock = await self._pinned(
            (queries.CLAIM_DUE, params), (queries.NEXT_DUE, params), then=then
        )
        answered_s = clock[0][0][0] if clock else now_s
        claimed = list(map(Claimed._make, rows))
        # The UPDATE returns its rows by id (it finds them through the primary key).
        if any(task.priority for task in claimed):
            claimed.sort(key=_by_priority)
        claim_from_next = ClaimFrom.of(levels, from_due, from_id)
        return claimed, NextDue(now_s, wait_s, claim_from_next, answered_s)

    # count_due_by_kind reads at most this many due tasks.
    LEFT_READ = 10_000

    async def count_due_by_kind(self, *, kinds: Sequence[str]) -> tuple[dict[str, int], bool]:
        """Due tasks of `kinds` by kind, among the first LEFT_READ due of them in claim
        order; and whether those were all read (False: there are more)."""
        params = {"kinds": list(kinds), "read": self.LEFT_READ}
        [rows] = await self._pinned((queries.COUNT_DUE_BY_KIND, params))
        counts = dict(rows)
        return counts, sum(counts.values()) < self.LEFT_READ

    async def finish_many(self, *, worker: str, results: Sequence[Result]) -> set[int]:
        """Record results; return the ids written (the others were no longer held)."""
        [rows] = await self._pinned(self._finish_statement(worker, results))
        return {task_id for (task_id,) in rows}

    async def finish_many_after(
        self,
        *,
        worker: str,
        results: Sequence[Result],
        before_commit: Callable[[set[int]], Awaitable[bool]],
    ) -> set[int] | None:
        """Record results as `finish_many` does, but commit only once `before_commit` (given
        the ids written) returns True: meanwhile their rows stay locked, and a cancel of one
        waits, then finds it finished. False rolls back: None, nothing written.

        The server's idle-in-transaction timeout is off for this transaction alone: once
        lines are out, their rows stay locked until this worker commits or its connection
        ends. A worker frozen between the two (SIGSTOP, a paused VM) would otherwise have
        them rolled back, rescued and run again, their lines printed twice (891 of 2,000
        with a worker stopped 40 s past a 6 s lease). Alive, it waits PRINT_WAIT_S at most."""
        async with self.database.connection() as conn:
            cursor = conn.cursor(row_factory=tuple_row)
            statement = self._finish_statement(worker, results)

            async def write() -> set[int]:
                await conn.execute("BEGIN")
                async with conn.pipeline():
                    await self._bound_transaction(conn)
                    await conn.execute(queries.PINNED_PLAN)
                    await conn.execute(queries.NO_IDLE_TIMEOUT)
                    await cursor.execute(*statement)
                return {task_id for (task_id,) in await cursor.fetchall()}

            # Each step bounded on its own, the wait for the lines by its own bound: a
            # worker that wakes from a freeze with its lines out still commits. (A step
            # that fails leaves the connection mid-transaction: rolled back here when it
            # can be, else the pool discards it and the server rolls back.)
            try:
                written = await self.database.bounded(conn, write())
            except psycopg.Error:
                if not conn.broken:
                    with suppress(psycopg.Error):
                        await self.database.bounded(conn, conn.execute("ROLLBACK"))
                raise
            if not await before_commit(written):
                await self.database.bounded(conn, conn.execute("ROLLBACK"))
                return None
            await self.database.bounded(conn, conn.execute("COMMIT"))
            return written

    def _finish_statement(
        self, worker: str, results: Sequence[Result]
    ) -> tuple[str, dict[str, Any]]:
        assert len(results) <= self.WRITE_BATCH, "the caller bounds its batches"
        return finish_statement(worker, results)

    async def recorded(self, results: Sequence[Result]) -> set[int]:
        """Of `results`, the ids whose result is in the table now exactly as given."""
        found: set[int] = set()
        for chunk in _chunks(results, self.WRITE_BATCH):
            [rows] = await self._pinned((queries.RECORDED, {"results": _results_json(chunk)}))
            found.update(task_id for (task_id,) in rows)
        return found

    async def no_longer_held(self, held: Sequence[Claimed]) -> dict[int, bool]:
        """Of the tasks a worker holds, those it should stop, each with whether its attempt
        was cancelled (False: deleted, or rescued since; queries.NO_LONGER_HELD)."""
        gone: dict[int, bool] = {}
        for chunk in _chunks(held, self.WRITE_BATCH):
            sent = json.dumps([{"id": c.id, "attempt": c.attempt} for c in chunk])
            [rows] = await self._pinned((queries.NO_LONGER_HELD, {"held": sent}))
            gone.update(rows)
        return gone

    async def held_by(self, *, worker: str) -> set[int]:
        [rows] = await self._pinned((queries.HELD_BY, {"worker": worker}))
        return {task_id for (task_id,) in rows}

    async def release(self, *, worker: str, ids: Sequence[int]) -> set[int]:
        released: set[int] = set()
        for chunk in _chunks(ids, self.WRITE_BATCH):
            [[(chunk_ids, _)]] = await self._pinned(
                (queries.RELEASE, {"worker": worker, "ids": list(chunk)})
            )
            released.update(chunk_ids)
        return released

    async def stats_rows(
        self,
        *,
        exact_up_to: int,
        sample_rows: int,
        widest_rows: int,
        scheduled_exact_up_to: int,
        finished_exact_up_to: int,
        totals: bool = False,
    ) -> StatsRows:
        """The rows /stats is made of (queries.STATS_*), in one snapshot but the sample's;
        and the running totals, for /metrics, when `totals`. Scheduled tasks are counted
        exactly on a table small enough to count, and while no more than
        `scheduled_exact_up_to` are scheduled; otherwise in the sample. Finished tasks
        likewise, with `finished_exact_up_to`."""
        [(pages, rows_per_page, live_rows)] = await self._all(queries.STATS_TABLE_SIZE, tuple_row)
        # A table never analyzed has no rows-per-page figure: ~100 fit a page of tasks.
        rows = int(pages * (rows_per_page or 100))
        percent = 100.0 if rows <= exact_up_to else max(0.01, 100.0 * sample_rows / rows)
        finished = (
            (queries.STATS_FINISHED_COUNTS, {})
            if percent >= 100.0
            else (queries.STATS_FINISHED_SAMPLE, {"percent": percent})
        )
        async with self.database.connection() as conn:
            statements: list[tuple[str, dict[str, Any]]] = [
                # (A table counted whole counts its scheduled tasks whole too.)
                (
                    queries.STATS_ACTIVE_COUNTS,
                    {"exact": exact_up_to if percent >= 100.0 else scheduled_exact_up_to},
                ),
                finished,
                (queries.STATS_DUE_AND_WORKERS, {}),
                (queries.STATS_ACTIVITY, {}),
                (queries.STATS_DUE_BY_KIND, {}),
                *([(queries.STATS_TOTALS, {})] if totals else []),
            ]
            if percent < 100.0:
                statements.append((queries.STATS_FINISHED_FEW, {"exact": finished_exact_up_to}))
            cursors = [conn.cursor(row_factory=tuple_row) for _ in statements]

            async def work() -> None:
                async with conn.pipeline(), conn.transaction():
                    await conn.execute("SET TRANSACTION READ ONLY")
                    # The partial indexes, whatever the statistics say: analyzed in the
                    # middle of a burst, they told the planner 200,000 tasks were scheduled
                    # when none was, and it counted them by reading all million rows of the
                    # table (140 ms, on every /stats, until the next analyze).
                    await conn.execute(queries.PINNED_PLAN)
                    for cursor, (sql, params) in zip(cursors, statements, strict=True):
                        await cursor.execute(sql, params)

            await self.database.bounded(conn, work())
            results = [await c.fetchall() for c in cursors]
        active, finished_rows, [waiting], activity, due_by_kind = results[:5]
        total_rows = results[5:6] if totals else []
        [scheduled_seen] = [n for state, _, n in active if not state]
        active = [row for row in active if row[0]]
        scheduled_estimated = percent < 100.0 and scheduled_seen > scheduled_exact_up_to
        finished_estimated = True
        if percent < 100.0:
            few = results[-1]
            [finished_seen] = [n for state, _, n in few if not state]
            if finished_seen <= finished_exact_up_to:
                finished_estimated = False
                active += [row for row in few if row[0]]
        sampled = _estimated(finished=finished_estimated, scheduled=scheduled_estimated)

        def estimated(rows: list[Any]) -> list[Any]:
            return [row for row in rows if row[0] in sampled]

        finished_rows = estimated(finished_rows)
        # A sample of a few pages can miss every row it estimates (a drained table: most
        # pages dead, the live ones few): the server counts them, so sample again, eight
        # times wider, while the sample reads at most `widest_rows` rows, rather than
        # report none.
        while (
            sampled
            and not finished_rows
            and live_rows > sum(n for *_, n in active)
            and percent < 100.0
            and rows * min(100.0, percent * 8) / 100.0 <= widest_rows
        ):
            percent = min(100.0, percent * 8)
            finished_rows = estimated(
                await self._all(queries.STATS_FINISHED_SAMPLE, tuple_row, percent=percent)
            )
        if not sampled:
            percent = 100.0  # every count exact
        return StatsRows(
            counts=[*active, *finished_rows],
            sampled_percent=None if percent >= 100.0 else percent,
            scheduled_estimated=scheduled_estimated and percent < 100.0,
            finished_estimated=finished_estimated,
            live_rows=live_rows,
            due=sum(n for _, n, _ in due_by_kind),
            oldest_due_age_s=waiting[0],
            workers=waiting[1],
            workers_alive=waiting[2],
            now_s=waiting[3],
            activity=activity,
            due_by_kind=due_by_kind,
            totals=total_rows[0] if total_rows else [],
        )

    async def prune_finished(self, *, older_than_s: float) -> int:
        """Delete up to WRITE_BATCH finished tasks older than `older_than_s`; return how many."""
        [[(pruned,)]] = await self._pinned(
            (
                queries.PRUNE_FINISHED,
                {"older_than_s": older_than_s, "limit": self.WRITE_BATCH},
            )
        )
        return int(pruned)

    async def prune_activity(self) -> None:
        await self._all(queries.PRUNE_ACTIVITY)

    async def add_activity(self, counts: dict[tuple[int, str], Activity]) -> None:
        """Add a worker's counts by 10-second bucket and kind (functions/counters.py) to the
        activity and to the running totals (queries.ADD_COUNTS)."""
        await self._all(queries.ADD_ACTIVITY, **_counts_json(counts.items()))

    async def rescue_expired(
        self, *, now: datetime | None = None
    ) -> list[tuple[int, TaskState, str]]:
        """Put back the tasks of workers whose lease ran out; forget those workers. `now`: a
        test's clock for the rescue (queries.NOW; forgetting stays on the database's).
        Returns each task's id, its state now and its kind."""
        rescued: list[tuple[int, TaskState, str]] = []
        params = {"limit": self.WRITE_BATCH, "now": now}
        while True:
            [rows] = await self._pinned((queries.RESCUE_EXPIRED, params))
            rescued += [(task_id, TaskState(state), kind) for task_id, state, kind in rows]
            if len(rows) < self.WRITE_BATCH:
                break
        await self._pinned((queries.FORGET_DEAD_WORKERS, {}))
        return rescued

    async def list_attempts(
        self, task_id: int, *, after: int, limit: int
    ) -> tuple[list[Attempt], bool] | None:
        """The attempts of a task past attempt `after`, oldest first, at most `limit`, and
        whether more follow; None: no such task. Its last attempt, when it has no row (a first
        that succeeded, one running, one that ended before attempts were kept), is made of the
        task's fields."""
        rows, task = await self._pinned(
            (queries.LIST_ATTEMPTS, {"id": task_id, "after": after, "limit": limit + 1}),
            (queries.ATTEMPTS_TASK, {"id": task_id}),
            row_factory=namedtuple_row,
        )
        if not task:
            return None
        items = [_attempt(row) for row in rows]
        [t] = task
        state = TaskState(t.state)
        if t.attempts > after and not t.recorded and len(items) <= limit:
            finished = state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)
            items.append(
                Attempt(
                    attempt=t.attempts,
                    started_at=_utc(t.started_at),
                    finished_at=_utc(t.finished_at) if finished else None,
                    worker=t.worker,
                    outcome=_OUTCOME_OF_STATE[state],
                    # (Running: the task's error is its previous attempt's, not this one's.)
                    error=None if state in (TaskState.SUCCEEDED, TaskState.RUNNING) else t.error,
                    traceback=None,
                )
            )
        return items[:limit], len(items) > limit

    async def list_errors(
        self, *, since: datetime | None, until: datetime | None, kind: str | None
    ) -> tuple[datetime, list[ErrorGroup]]:
        """The window's start (None `since`: 24 hours ago, by the database's clock) and the
        groups of attempts that ended in an error in it (queries.LIST_ERRORS)."""
        params = {"since": since, "until": until, "kind": kind}
        [(start,)], rows = await self._pinned(
            (queries.ERRORS_SINCE, params), (queries.LIST_ERRORS, params)
        )
        return start.replace(tzinfo=UTC), [
            ErrorGroup(
                kind=kind,
                error=error or "",
                count=count,
                first_seen=first.replace(tzinfo=UTC),
                last_seen=last.replace(tzinfo=UTC),
                sample_task=sample,
            )
            for kind, error, count, first, last, sample in rows
        ]


def _attempt(row: Any) -> Attempt:
    return Attempt(
        attempt=row.attempt,
        started_at=_utc(row.started_at),
        finished_at=_utc(row.finished_at),
        worker=row.worker,
        outcome=None if row.outcome is None else Outcome(row.outcome),
        error=row.error,
        traceback=row.traceback,
    )


# The outcome of a task's last attempt when it has no row of its own, by the task's state.
_OUTCOME_OF_STATE = {
    TaskState.RUNNING: None,
    TaskState.SUCCEEDED: Outcome.SUCCEEDED,
    TaskState.FAILED: Outcome.FAILED,
    TaskState.CANCELLED: Outcome.CANCELLED,
    TaskState.SCHEDULED: Outcome.RETRIED,
}


async def listen(
    settings: Settings,
    on_created: Callable[[float | None], None],
    on_cancelled: Callable[[str | None, list[tuple[int, int]] | None], None] | None = None,
) -> None:
    """Call `on_created(due_s)` for each batch of tasks created, and `on_cancelled(worker,
    tasks)` for each cancel of `tasks` (id, attempt) `worker` was running, until cancelled.

    LISTEN needs a session of its own for as long as it listens, so it gets a connection of
    its own outside the pool (which may hold a single connection), and it cannot work through
    a transaction pooler. Reconnects after an outage, then calls `on_created(None)` and
    `on_cancelled(None, None)`: it may have missed notifications meanwhile. Returns at once
    behind a transaction pooler, set or found by connecting (conninfo.connect): the worker
    polls instead.
    """
    retry_s = 0.1
    while not behind_pooler(settings):
        try:
            conn = await connect(settings, application_name="taskrunner-listen")
            async with conn:
                if behind_pooler(settings):
                    return
                await conn.execute(f"LISTEN {queries.CHANNEL}")
                if on_cancelled is not None:
                    await conn.execute(f"LISTEN {queries.CANCEL_CHANNEL}")
                    on_cancelled(None, None)
                on_created(None)
                retry_s = 0.1
                async for note in conn.notifies():
                    if note.channel == queries.CANCEL_CHANNEL:
                        if on_cancelled is not None:
                            on_cancelled(*heard_cancel(note.payload))
                        continue
                    try:
                        on_created(float(note.payload))
                    except ValueError:
                        on_created(None)
        except (psycopg.Error, OSError) as exc:
            logger.warning("action=listen: %s; reconnecting in %.1fs", first_line(exc), retry_s)
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, 5.0)
