"""The only module that sees SQL and the driver.

It returns domain values and turns driver errors into `DatabaseUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from functions import queries
from functions.errors import DatabaseUnavailable
from functions.tasks import NewTask, Task, TaskState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """A task a worker now holds: attempt `attempt` is its to run."""

    id: int
    kind: str
    attempt: int
    max_attempts: int


@dataclass(frozen=True)
class Result:
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
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.begin() as conn:
                yield conn
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, OSError) as exc:
            raise DatabaseUnavailable(f"database unavailable: {_first_line(exc)}") from exc
        except sqlalchemy.exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise DatabaseUnavailable(f"database connection lost: {_first_line(exc)}") from exc
            raise

    async def _all(self, sql: str, **params: Any) -> Sequence[Any]:
        async with self._transaction() as conn:
            return (await conn.execute(text(sql), params)).all()

    async def ping(self) -> None:
        await self._all(queries.PING)

    async def insert_task(self, new: NewTask, max_attempts: int) -> Task:
        rows = await self._all(
            queries.INSERT_TASKS,
            kinds=[new.kind],
            execute_ats=[new.execute_at],
            max_attempts=max_attempts,
        )
        return _task(rows[0])

    async def insert_tasks(self, new: Sequence[NewTask], max_attempts: int) -> list[int]:
        if not new:
            return []
        rows = await self._all(
            queries.INSERT_TASKS,
            kinds=[n.kind for n in new],
            execute_ats=[n.execute_at for n in new],
            max_attempts=max_attempts,
        )
        return [row.id for row in rows]

    async def get_task(self, task_id: int) -> Task | None:
        rows = await self._all(queries.GET_TASK, id=task_id)
        return _task(rows[0]) if rows else None

    async def list_tasks(
        self, *, state: TaskState | None, kind: str | None, after_id: int, limit: int
    ) -> list[Task]:
        sql = queries.LIST_TASKS
        params: dict[str, Any] = {"after_id": after_id, "limit": limit}
        if state is not None:
            sql += " AND state = :state"
            params["state"] = state.value
        if kind is not None:
            sql += " AND kind = :kind"
            params["kind"] = kind
        rows = await self._all(sql + " ORDER BY id LIMIT :limit", **params)
        return [_task(row) for row in rows]

    async def delete_task(self, task_id: int) -> TaskState | None:
        """Delete the task unless it is running; return the state it had, None if missing."""
        rows = await self._all(queries.DELETE_TASK, id=task_id)
        return TaskState(rows[0].state) if rows else None

    async def claim_due(
        self, *, worker: str, kinds: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]:
        rows = await self._all(
            queries.CLAIM_DUE, worker=worker, kinds=list(kinds), limit=limit, lease_s=lease_s
        )
        return [Claimed(r.id, r.kind, r.attempts, r.max_attempts) for r in rows]

    async def next_due(self, *, kinds: Sequence[str]) -> NextDue:
        row = (await self._all(queries.NEXT_DUE, kinds=list(kinds)))[0]
        return NextDue(db_now=row.db_now, next_at=row.next_at)

    async def finish_many(self, *, worker: str, results: Sequence[Result]) -> set[int]:
        """Record results; return the ids written (the others had lost their lease)."""
        rows = await self._all(
            queries.FINISH_MANY,
            worker=worker,
            ids=[r.id for r in results],
            attempts=[r.attempt for r in results],
            states=[r.state.value for r in results],
            outputs=[r.output for r in results],
            errors=[r.error for r in results],
            retry_in_s=[r.retry_in_s for r in results],
        )
        return {row.id for row in rows}

    async def extend_leases(self, *, worker: str, ids: Sequence[int], lease_s: float) -> set[int]:
        rows = await self._all(queries.EXTEND_LEASES, worker=worker, ids=list(ids), lease_s=lease_s)
        return {row.id for row in rows}

    async def rescue_expired(self) -> list[tuple[int, TaskState]]:
        rows = await self._all(queries.RESCUE_EXPIRED)
        return [(row.id, TaskState(row.state)) for row in rows]

    async def release(self, *, worker: str, ids: Sequence[int]) -> set[int]:
        rows = await self._all(queries.RELEASE, worker=worker, ids=list(ids))
        return {row.id for row in rows}


async def listen(engine: AsyncEngine, on_created: Callable[[float | None], None]) -> None:
    """Call `on_created(execute_at)` for each batch of tasks created, until cancelled.

    Needs a session of its own (LISTEN), so not through a transaction pooler. Reconnects
    after an outage, then calls `on_created(None)`: it may have missed notifications.
    """
    retry_s = 0.1
    while True:
        try:
            async with engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.exec_driver_sql(f"LISTEN {queries.CHANNEL}")
                driver_conn = (await conn.get_raw_connection()).driver_connection
                assert isinstance(driver_conn, psycopg.AsyncConnection)
                on_created(None)
                retry_s = 0.1
                async for note in driver_conn.notifies():
                    try:
                        on_created(float(note.payload))
                    except ValueError:
                        on_created(None)
        except (sqlalchemy.exc.DBAPIError, psycopg.Error, OSError) as exc:
            logger.warning("action=listen: %s; reconnecting in %.1fs", _first_line(exc), retry_s)
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, 5.0)


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
