"""The SQLAlchemy engine: one per event loop, never shared across loops."""

from __future__ import annotations

import asyncio
from typing import Any

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
    if settings.db_pool_size == 0:
        return create_async_engine(
            sqlalchemy_url(settings.database_url), poolclass=NullPool, connect_args=connect_args
        )
    return create_async_engine(
        sqlalchemy_url(settings.database_url),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        # A pooled connection may have died with a database restart or a frozen container.
        pool_pre_ping=True,
        connect_args=connect_args,
    )


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
