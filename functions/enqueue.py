"""Enqueue a task in your own database transaction: `enqueue` and `enqueue_async`.

The task is written on the connection you pass, in the transaction it is in: it exists once
that transaction commits, with the rows written beside it, and not at all if it rolls back.
It never commits or rolls back itself. Workers are woken by a NOTIFY sent in the same
transaction (as the API's creates send, for a task due within queries.NOTIFY_HORIZON_S):
PostgreSQL delivers it at the commit, and not before.

The rules are the API's, read by the same code (`parsing`, `tasks.check_payload`) with the
same settings (`TASKRUNNER_MAX_PAYLOAD_BYTES`, `TASKRUNNER_MAX_ATTEMPTS`) and the same kinds
(loaded as every process loads them: `TASKRUNNER_KINDS` and the `taskrunner.kinds` entry
points), read once, at the first call. What the API answers 422 raises EnqueueRefused,
before anything is sent to the database: the transaction is not spoiled, and nothing is
written. The statements are the store's (`store.insert_task_steps`).

Imports neither FastAPI nor the worker; SQLAlchemy only when given one of its connections.
"""

from __future__ import annotations

import re
from collections.abc import Generator
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import psycopg
from psycopg.rows import namedtuple_row

from functions import kinds
from functions.errors import EnqueueRefused, IdempotencyKeyReused, InvalidPayload, InvalidValue
from functions.model import MAX_PAYLOAD_DEPTH, NewTask
from functions.parsing import (
    excerpt,
    parse_execute_at,
    parse_idempotency_key,
    parse_kind,
    parse_max_attempts,
    parse_priority,
    parse_timeout_s,
)
from functions.settings import Settings
from functions.store import insert_task_steps
from functions.tasks import check_payload, check_timeout

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

__all__ = ["EnqueueRefused", "IdempotencyKeyReused", "enqueue", "enqueue_async"]

SyncConnection: TypeAlias = "psycopg.Connection[Any] | SAConnection | Session"
AsyncConnection: TypeAlias = "psycopg.AsyncConnection[Any] | SAAsyncConnection | AsyncSession"
_Steps = Generator[tuple[str, dict[str, Any]], list[Any], tuple[Any, bool]]


def enqueue(
    conn: SyncConnection,
    type: str,
    execute_at: datetime | float | str,
    *,
    payload: Any = None,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
    priority: int | None = 0,
    idempotency_key: str | None = None,
) -> int:
    """Schedule a task on `conn` (psycopg `Connection`, SQLAlchemy `Connection` or
    `Session`), in its current transaction; return the task's id.

    `execute_at`: an aware datetime (a naive one is refused: its time zone is unknown),
    Unix seconds, or an RFC 3339 string with an offset, as the API takes. `max_attempts`
    (None: TASKRUNNER_MAX_ATTEMPTS), `timeout_s` (None: the kind's own) and `priority` are
    the API's options, by its rules. Raises EnqueueRefused (nothing written) for what the
    API refuses with a 422, and IdempotencyKeyReused when `idempotency_key` holds a task
    asked for with another type, time, payload or option (a repeat with the same ones
    returns that task's id).
    """
    run = _sync_runner(conn)
    steps = _steps(type, execute_at, payload, max_attempts, timeout_s, priority, idempotency_key)
    try:
        sql, params = next(steps)
        while True:
            sql, params = steps.send(run(sql, params))
    except StopIteration as done:
        row, _ = done.value
        return int(row.id)


async def enqueue_async(
    conn: AsyncConnection,
    type: str,
    execute_at: datetime | float | str,
    *,
    payload: Any = None,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
    priority: int | None = 0,
    idempotency_key: str | None = None,
) -> int:
    """`enqueue` for a psycopg `AsyncConnection`, or SQLAlchemy's `AsyncConnection` or
    `AsyncSession`."""
    run = _async_runner(conn)
    steps = _steps(type, execute_at, payload, max_attempts, timeout_s, priority, idempotency_key)
    try:
        sql, params = next(steps)
        while True:
            sql, params = steps.send(await run(sql, params))
    except StopIteration as done:
        row, _ = done.value
        return int(row.id)


def _steps(
    kind: object,
    execute_at: object,
    payload: Any,
    max_attempts: object,
    timeout_s: object,
    priority: object,
    idempotency_key: object,
) -> _Steps:
    """The statements creating the task, once every argument is read (refused: raised
    before the first)."""
    settings = _settings()
    kind_name = _read("type", parse_kind, kind)
    new = NewTask(
        kind=kind_name,
        execute_at=_read_execute_at(execute_at),
        idempotency_key=(
            None
            if idempotency_key is None
            else _read("idempotency_key", parse_idempotency_key, idempotency_key)
        ),
        payload=_read_payload(kind_name, payload, settings.max_payload_bytes),
        max_attempts=None
        if max_attempts is None
        else _read("max_attempts", parse_max_attempts, max_attempts),
        timeout_s=_read("timeout_s", parse_timeout_s, timeout_s),
        priority=0 if priority is None else _read("priority", parse_priority, priority),
    )
    try:
        check_timeout(new.kind, new.timeout_s, settings, ("timeout_s",))
    except InvalidValue as exc:
        raise EnqueueRefused("timeout_s", str(exc)) from None
    return insert_task_steps(new, settings.max_attempts)


_read_once: Settings | None = None


def _settings() -> Settings:
    """The settings, and the kinds loaded, at the first call: as every process reads its own
    when it starts. (Each read walks the environment: ~0.25 ms, as much as the INSERT.)"""
    global _read_once
    if _read_once is None:
        settings = Settings()
        kinds.load(settings.kinds)
        _read_once = settings
    return _read_once


def _read(argument: str, parse: Any, value: object) -> Any:
    try:
        return parse(value)
    except ValueError as exc:
        raise EnqueueRefused(argument, str(exc)) from None


def _read_execute_at(value: object) -> datetime:
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise EnqueueRefused(
                "execute_at",
                f"execute_at {excerpt(value)} is a naive datetime (no time zone): give an aware"
                " one, e.g. datetime(2030, 1, 1, 12, tzinfo=UTC)",
            )
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise EnqueueRefused(
                "execute_at",
                f"execute_at {excerpt(value)} is outside 0001-01-01T00:00:00Z to"
                " 9999-12-31T23:59:59.999999Z once converted to UTC",
            ) from None
    if isinstance(value, date) or not isinstance(value, int | float | str | None):
        raise EnqueueRefused(
            "execute_at",
            f"execute_at must be an aware datetime, Unix seconds or an RFC 3339 date-time"
            f" with an offset, got {excerpt(value)}",
        )
    return _read("execute_at", parse_execute_at, value)  # type: ignore[no-any-return]


def _read_payload(kind: str, value: Any, max_bytes: int) -> Any:
    """`value` if it is a payload the API takes: JSON as `json.loads` reads it (dicts with
    str keys, lists, str, int, float, bool, None), within `max_bytes`, storable as jsonb, and
    one `kind` takes (its `check`, as `http`'s)."""
    if value is not None:
        _check_json_types(value)
    try:
        check_payload(kind, value, max_bytes, ("payload",))
    except InvalidPayload as exc:
        raise EnqueueRefused("payload", str(exc)) from None
    return value


def _check_json_types(value: Any) -> None:
    """Raise EnqueueRefused for the first value that is no JSON (a tuple, a set, a
    datetime, a dict key other than a str), naming where it is: json.dumps would write
    some as something else (a tuple as a list, 1 as "1"), and the kind would get that."""
    stack: list[tuple[Any, str, int]] = [(value, "payload", 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_PAYLOAD_DEPTH:
            return  # (check_payload says why, without walking a circle forever)
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise EnqueueRefused(
                        "payload",
                        f"{where} has the key {excerpt(key)}, a {type(key).__name__}: a JSON"
                        " object's keys are strings",
                    )
                stack.append((child, f"{where}[{excerpt(key, 20)}]", depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))
        elif item is not None and not isinstance(item, str | int | float):
            raise EnqueueRefused(
                "payload",
                f"{where} is a {type(item).__name__}, which is no JSON value: a payload holds"
                " dicts (of str keys), lists, str, int, float, bool and None",
            )


# --- the connections ---------------------------------------------------------------------


def _is_sqlalchemy(conn: object) -> bool:
    return type(conn).__module__.partition(".")[0] == "sqlalchemy"


def _sync_runner(conn: object) -> Any:
    """A function running one statement on `conn`, returning its rows."""
    if isinstance(conn, psycopg.Connection):

        def run_psycopg(sql: str, params: dict[str, Any]) -> list[Any]:
            cursor = conn.cursor(row_factory=namedtuple_row)
            cursor.execute(sql, params)
            return cursor.fetchall()

        return run_psycopg
    if _is_sqlalchemy(conn):
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session, scoped_session

        if isinstance(conn, Connection | Session | scoped_session):

            def run_sqlalchemy(sql: str, params: dict[str, Any]) -> list[Any]:
                return list(conn.execute(_text(sql), params).fetchall())

            return run_sqlalchemy
    raise _wrong_connection(conn, asynchronous=False)


def _async_runner(conn: object) -> Any:
    if isinstance(conn, psycopg.AsyncConnection):

        async def run_psycopg(sql: str, params: dict[str, Any]) -> list[Any]:
            cursor = conn.cursor(row_factory=namedtuple_row)
            await cursor.execute(sql, params)
            return await cursor.fetchall()

        return run_psycopg
    if _is_sqlalchemy(conn):
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

        if isinstance(conn, AsyncConnection | AsyncSession | async_scoped_session):

            async def run_sqlalchemy(sql: str, params: dict[str, Any]) -> list[Any]:
                return list((await conn.execute(_text(sql), params)).fetchall())

            return run_sqlalchemy
    raise _wrong_connection(conn, asynchronous=True)


def _wrong_connection(conn: object, *, asynchronous: bool) -> TypeError:
    name = f"{type(conn).__module__}.{type(conn).__qualname__}"
    if asynchronous:
        return TypeError(
            f"enqueue_async takes a psycopg AsyncConnection, or SQLAlchemy's AsyncConnection"
            f" or AsyncSession, not a {name} (for a connection that is not async: enqueue)"
        )
    return TypeError(
        f"enqueue takes a psycopg Connection, or a SQLAlchemy Connection or Session, not a"
        f" {name} (for an async one: enqueue_async)"
    )


_texts: dict[str, Any] = {}


def _text(sql: str) -> Any:
    """A statement of `queries` as SQLAlchemy's `text()`, made once: its `%(name)s`
    parameters as `:name` (it writes them back in its driver's style)."""
    found = _texts.get(sql)
    if found is None:
        from sqlalchemy import text

        found = _texts[sql] = text(re.sub(r"%\((\w+)\)s", r":\1", sql))
    return found
