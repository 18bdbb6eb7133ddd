"""The SQLAlchemy engine: one per event loop, never shared across loops."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from functions.errors import TaskrunnerError
from functions.settings import Settings


def sqlalchemy_url(database_url: str | None) -> str:
    """Return `database_url` with SQLAlchemy's psycopg 3 driver named in it."""
    if not database_url:
        raise TaskrunnerError("TASKRUNNER_DATABASE_URL is not set (expected a postgresql:// URL)")
    url = make_url(database_url)
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise TaskrunnerError(
            f"TASKRUNNER_DATABASE_URL must be a postgresql:// URL, not {url.drivername}://"
        )
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def libpq_url(database_url: str | None) -> str:
    """Return `database_url` as libpq (and so psycopg) takes it, without a driver name."""
    url = make_url(sqlalchemy_url(database_url)).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def make_engine(settings: Settings) -> AsyncEngine:
    """Build an engine for the running event loop; the caller disposes of it."""
    connect_args: dict[str, Any] = {
        "connect_timeout": settings.db_connect_timeout_s,
        "application_name": "taskrunner",
    }
    if settings.transaction_pooler:
        # pgbouncer (transaction mode) and RDS Proxy hand each transaction to any server
        # connection, where a statement prepared on another one does not exist.
        connect_args["prepare_threshold"] = None
    # Every statement taskrunner runs is a transaction of its own: autocommit spares the
    # BEGIN and COMMIT round trips (two of the three per API request).
    options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT", "connect_args": connect_args}
    if settings.db_pool_size == 0:
        return create_async_engine(
            sqlalchemy_url(settings.database_url), poolclass=NullPool, **options
        )
    engine = create_async_engine(
        sqlalchemy_url(settings.database_url),
        pool_size=settings.db_pool_size,
        # No overflow: a connection opened past the pool is closed again on return, and
        # under a burst that means a new server process per request.
        max_overflow=0,
        **options,
    )
    _ping_when_idle(engine)
    return engine


# A connection idle this long is checked before use: it may have died with a database
# restart, a failover, or while its Lambda container was frozen. Checking every checkout
# (SQLAlchemy's pool_pre_ping) doubled the cost of a checkout (0.24 -> 0.48 ms of CPU); the
# API went from 520 to 930 POST /tasks per second without it.
PING_AFTER_IDLE_S = 1.0


def _ping_when_idle(engine: AsyncEngine) -> None:
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "checkin")
    def checked_in(dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def checked_out(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            cursor = dbapi_conn.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        except Exception as exc:
            # The pool drops this connection and hands out a new one.
            raise sqlalchemy.exc.DisconnectionError(str(exc)) from exc


class Database:
    """Hands out the engine of the running event loop, building it on first use.

    Lambda keeps a process warm across invocations and some adapters run each one on a
    new loop: a pooled async connection must never be used from a loop it was not made on.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: AsyncEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def engine(self) -> AsyncEngine:
        loop = asyncio.get_running_loop()
        if self._engine is None or self._loop is not loop:
            # The old loop is gone or not ours to run: drop its connections unclosed.
            if self._engine is not None:
                self._engine.sync_engine.dispose(close=False)
            self._engine = make_engine(self.settings)
            self._loop = loop
        return self._engine

    async def dispose(self) -> None:
        if self._engine is not None and self._loop is asyncio.get_running_loop():
            await self._engine.dispose()
        self._engine = None
        self._loop = None
