"""The only module that sees SQL and the driver.

It returns domain values and turns driver errors into `DatabaseUnavailable`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import psycopg
import sqlalchemy.exc
from psycopg import AsyncCursor
from psycopg.rows import RowFactory, namedtuple_row, tuple_row
from sqlalchemy.ext.asyncio import AsyncEngine

from functions import queries
from functions.db import libpq_url
from functions.errors import DatabaseUnavailable
from functions.settings import Settings
from functions.tasks import NewTask, Task, TaskState

logger = logging.getLogger(__name__)


# Claimed and Result are named tuples rather than frozen dataclasses: a worker makes
# tens of thousands of each a second, and a frozen dataclass's __init__ is the slower one.
class Claimed(NamedTuple):
    """A task a worker now holds: attempt `attempt` is its to run."""

    id: int
    kind: str
    attempt: int
    max_attempts: int


class Result(NamedTuple):
    """The outcome of one attempt. `state` SCHEDULED means retry after `retry_in_s`."""

    id: int
    attempt: int
    state: TaskState
    output: str | None = None
    error: str | None = None
    retry_in_s: float | None = None


@dataclass(frozen=True)
class NextDue:
    db_now: datetime
    next_at: datetime | None


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _task(row: Any) -> Task:
    return Task(
        id=row.id,
        kind=row.kind,
        state=TaskState(row.state),
        execute_at=row.execute_at.astimezone(UTC),
        created_at=row.created_at.astimezone(UTC),
        started_at=_utc(row.started_at),
        finished_at=_utc(row.finished_at),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        output=row.output,
        error=row.error,
    )


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @asynccontextmanager
    async def _cursor(
        self, row_factory: RowFactory[Any] = namedtuple_row
    ) -> AsyncIterator[AsyncCursor[Any]]:
        """A psycopg cursor; each statement is a transaction of its own (autocommit).

        SQLAlchemy keeps the pool (sizing, idle checks, one engine per loop); statements go to
        psycopg directly: building SQLAlchemy's result rows held a worker draining baz to
        17,300/s; with psycopg's tuples it reached 31,600/s.
        """
        try:
            async with self.engine.connect() as conn:
                raw = (await conn.get_raw_connection()).driver_connection
                assert isinstance(raw, psycopg.AsyncConnection)
                try:
                    async with raw.cursor(row_factory=row_factory) as cursor:
                        yield cursor
                except (psycopg.OperationalError, psycopg.InterfaceError):
                    if raw.closed or raw.broken:
                        # Out of the pool for good, rather than reset (and fail) on return.
                        await conn.invalidate()
                    raise
        except (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            psycopg.OperationalError,
            psycopg.InterfaceError,
            OSError,
        ) as exc:
            raise DatabaseUnavailable(f"database unavailable: {_first_line(exc)}") from exc
        except sqlalchemy.exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise DatabaseUnavailable(f"database connection lost: {_first_line(exc)}") from exc
            raise

    async def _all(
        self, sql: str, row_factory: RowFactory[Any] = namedtuple_row, **params: Any
    ) -> list[Any]:
        async with self._cursor(row_factory) as cursor:
            await cursor.execute(sql, params)
            return await cursor.fetchall() if cursor.description else []

    async def ping(self) -> None:
        await self._all(queries.PING)

    async def insert_task(self, new: NewTask, max_attempts: int) -> Task:
        rows = await self._all(
            queries.INSERT_TASK,
            kind=new.kind,
            execute_at=new.execute_at,
            max_attempts=max_attempts,
        )
        return _task(rows[0])

    async def insert_tasks(self, new: Sequence[NewTask], max_attempts: int) -> list[int]:
        if not new:
            return []
        payload = json.dumps(
            [{"kind": n.kind, "execute_at_s": n.execute_at.timestamp()} for n in new]
        )
        rows = await self._all(
            queries.INSERT_TASKS, tuple_row, tasks=payload, max_attempts=max_attempts
        )
        return [task_id for (task_id,) in rows]

    async def get_task(self, task_id: int) -> Task | None:
        rows = await self._all(queries.GET_TASK, id=task_id)
        return _task(rows[0]) if rows else None

    async def list_tasks(
        self, *, state: TaskState | None, kind: str | None, after_id: int, limit: int
    ) -> list[Task]:
        sql = queries.LIST_TASKS
        params: dict[str, Any] = {"after_id": after_id, "limit": limit}
        if state is not None:
            # A literal, not a parameter: only then can the planner use the partial index for
            # that state in a prepared statement's generic plan. `state` is a TaskState.
            sql += f" AND state = '{TaskState(state).value}'"
        if kind is not None:
            sql += " AND kind = %(kind)s"
            params["kind"] = kind
        rows = await self._all(sql + " ORDER BY id LIMIT %(limit)s", **params)
        return [_task(row) for row in rows]

    async def delete_task(self, task_id: int) -> TaskState | None:
        """Delete the task unless it is running; return the state it had, None if missing."""
        rows = await self._all(queries.DELETE_TASK, id=task_id)
        return TaskState(rows[0].state) if rows else None

    async def claim_due(
        self, *, worker: str, kinds: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]:
        rows = await self._all(
            queries.CLAIM_DUE,
            tuple_row,
            worker=worker,
            kinds=list(kinds),
            limit=limit,
            lease_s=lease_s,
        )
        return list(map(Claimed._make, rows))

    async def next_due(self, *, kinds: Sequence[str]) -> NextDue:
        row = (await self._all(queries.NEXT_DUE, kinds=list(kinds)))[0]
        return NextDue(db_now=row.db_now, next_at=row.next_at)

    async def finish_many(self, *, worker: str, results: Sequence[Result]) -> set[int]:
        """Record results; return the ids written (the others had lost their lease)."""
        payload = json.dumps(
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
        rows = await self._all(queries.FINISH_MANY, tuple_row, worker=worker, results=payload)
        return {task_id for (task_id,) in rows}

    async def extend_leases(self, *, worker: str, ids: Sequence[int], lease_s: float) -> set[int]:
        rows = await self._all(queries.EXTEND_LEASES, worker=worker, ids=list(ids), lease_s=lease_s)
        return {row.id for row in rows}

    async def rescue_expired(self) -> list[tuple[int, TaskState]]:
        rows = await self._all(queries.RESCUE_EXPIRED)
        return [(row.id, TaskState(row.state)) for row in rows]

    async def release(self, *, worker: str, ids: Sequence[int]) -> set[int]:
        rows = await self._all(queries.RELEASE, worker=worker, ids=list(ids))
        return {row.id for row in rows}


async def listen(settings: Settings, on_created: Callable[[float | None], None]) -> None:
    """Call `on_created(execute_at)` for each batch of tasks created, until cancelled.

    LISTEN needs a session of its own for as long as it listens, so it gets a connection of
    its own outside the pool (which may hold a single connection), and it cannot work through
    a transaction pooler. Reconnects after an outage, then calls `on_created(None)`: it may
    have missed notifications meanwhile.
    """
    retry_s = 0.1
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(
                libpq_url(settings.database_url),
                autocommit=True,
                connect_timeout=settings.db_connect_timeout_s,
                application_name="taskrunner-listen",
            )
            async with conn:
                await conn.execute(f"LISTEN {queries.CHANNEL}")
                on_created(None)
                retry_s = 0.1
                async for note in conn.notifies():
                    try:
                        on_created(float(note.payload))
                    except ValueError:
                        on_created(None)
        except (psycopg.Error, OSError) as exc:
            logger.warning("action=listen: %s; reconnecting in %.1fs", _first_line(exc), retry_s)
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, 5.0)


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
