"""Connections to PostgreSQL: one pool per event loop, and no wait without a bound.

psycopg's own pool (psycopg_pool) rather than SQLAlchemy's: a checkout costs 21 us of CPU
against 208 us (measured here, 5,000 checkouts each), it grows and reconnects in the
background, and it bounds the wait for a connection. Statements go to psycopg directly.
SQLAlchemy stays the migrations' toolkit (Alembic), off the request path.

Every wait is bounded, so a database that is down, slow or frozen (a stalled host answers
nothing and closes nothing) costs a request at most `db_connect_timeout_s` +
`db_statement_timeout_s` and then a 503, never a hang:
- the wait for a pooled connection, by the pool's timeout (`db_connect_timeout_s`);
- opening a connection, by libpq's `connect_timeout`;
- each statement, by the server's `statement_timeout` (when connected directly) and by a
  client-side bound a second longer, which closes the connection outright: a frozen server
  would answer neither the statement nor a cancel request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from functions.errors import DatabaseError, DatabaseUnavailable, SchemaOutdated, TaskrunnerError
from functions.settings import Settings

logger = logging.getLogger(__name__)
# psycopg_pool logs every checkout at INFO.
logging.getLogger("psycopg.pool").setLevel(logging.WARNING)

T = TypeVar("T")

# A connection idle this long is checked before use: it may have died with a database
# restart, a failover, or while its Lambda container was frozen. Checking every checkout
# doubled its cost; the API went from 520 to 930 POST /tasks per second without it.
PING_AFTER_IDLE_S = 1.0
# The client-side bound on a statement is the server's statement_timeout plus this, so that
# a server that is alive reports the timeout itself (and ends the statement).
_CLIENT_GRACE_S = 1.0


def libpq_url(database_url: str | None) -> str:
    """Return `database_url` as libpq takes it (a `postgresql+psycopg://` prefix removed)."""
    if not database_url:
        raise TaskrunnerError("TASKRUNNER_DATABASE_URL is not set (expected a postgresql:// URL)")
    scheme, sep, rest = database_url.partition("://")
    if sep and scheme.startswith(("postgresql+", "postgres+")):
        return f"postgresql://{rest}"
    return database_url


def connect_kwargs(settings: Settings, application_name: str = "taskrunner") -> dict[str, Any]:
    """psycopg connection arguments for `settings` (autocommit: every statement is its own
    transaction, which spares the BEGIN and COMMIT round trips)."""
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": settings.db_connect_timeout_s,
        "application_name": application_name,
    }
    if settings.transaction_pooler:
        # pgbouncer (transaction mode) and RDS Proxy hand each transaction to any server
        # connection, where a statement prepared on another one does not exist; and they
        # refuse startup options, so the statement bound is client-side only.
        kwargs["prepare_threshold"] = None
    else:
        timeout_ms = int(settings.db_statement_timeout_s * 1000)
        kwargs["options"] = f"-c statement_timeout={timeout_ms}"
    return kwargs


class StatementTimeout(DatabaseUnavailable):
    """A statement got no answer within the bound; its connection was closed."""


class Database:
    """Hands out connections of the running event loop's pool, building it on first use.

    Lambda keeps a process warm across invocations and some adapters run each one on a
    new loop: a pooled async connection must never be used from a loop it was not made on.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._url = libpq_url(settings.database_url)
        self._kwargs = connect_kwargs(settings)
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle_since: weakref.WeakKeyDictionary[AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        self.statement_bound_s = settings.db_statement_timeout_s + _CLIENT_GRACE_S

    def _current_pool(self) -> AsyncConnectionPool[AsyncConnection[Any]] | None:
        if self.settings.db_pool_size == 0:
            return None
        loop = asyncio.get_running_loop()
        if self._pool is None or self._loop is not loop:
            # The old loop is gone or not ours to run: its connections are left to close.
            # Connections are opened as needed (min_size 0), not all at once: thirty ticks
            # starting together must not open thirty pools' worth of connections.
            self._pool = AsyncConnectionPool(
                self._url,
                kwargs=self._kwargs,
                min_size=0,
                max_size=self.settings.db_pool_size,
                timeout=self.settings.db_connect_timeout_s,
                check=self._check,
                reset=self._returned,
                open=False,
                name="taskrunner",
            )
            self._loop = loop
        return self._pool

    async def _check(self, conn: AsyncConnection[Any]) -> None:
        idle_since = self._idle_since.get(conn)
        if idle_since is not None and time.monotonic() - idle_since >= PING_AFTER_IDLE_S:
            # A failure here makes the pool drop this connection and hand out another.
            await self.bounded(conn, conn.execute("SELECT 1"))

    async def _returned(self, conn: AsyncConnection[Any]) -> None:
        self._idle_since[conn] = time.monotonic()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection for one statement or a few; driver errors become domain errors."""
        pool = self._current_pool()
        try:
            if pool is None:
                conn = await AsyncConnection.connect(self._url, **self._kwargs)
                try:
                    yield conn
                finally:
                    await conn.close()
                return
            if pool.closed:
                await pool.open(wait=False)
            async with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise DatabaseUnavailable(
                f"database unavailable: no connection within {self.settings.db_connect_timeout_s}s"
            ) from exc
        except psycopg.errors.QueryCanceled as exc:
            raise StatementTimeout(f"database statement timed out: {first_line(exc)}") from exc
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            raise SchemaOutdated() from exc
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            raise DatabaseUnavailable(f"database unavailable: {first_line(exc)}") from exc
        except psycopg.Error as exc:
            raise DatabaseError(f"the database refused a statement: {first_line(exc)}") from exc

    async def bounded(
        self, conn: AsyncConnection[Any], work: Awaitable[T], timeout_s: float | None = None
    ) -> T:
        """Await `work` on `conn`, at most `timeout_s` (default `statement_bound_s`); past
        it, close `conn`.

        Closing is the only way out that does not wait on the server: psycopg would send a
        cancel request and wait for the statement to end, and a frozen server does neither.
        """
        bound_s = self.statement_bound_s if timeout_s is None else timeout_s
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=bound_s)
        except asyncio.CancelledError:
            conn.pgconn.finish()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        if task in done:
            return task.result()
        conn.pgconn.finish()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise StatementTimeout(
            f"database statement got no answer within {bound_s:.1f}s; its connection was closed"
        )

    async def dispose(self) -> None:
        pool, self._pool, loop, self._loop = self._pool, None, self._loop, None
        if pool is not None and loop is asyncio.get_running_loop():
            await pool.close()


def first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
