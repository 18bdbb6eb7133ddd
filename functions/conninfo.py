"""What a connection to PostgreSQL is opened with (libpq's "conninfo"): the URL, the session's
options, and whether a transaction pooler stands between, set (TASKRUNNER_TRANSACTION_POOLER)
or found by connecting (`connect`). `db` pools and bounds the connections opened here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection

from functions.errors import TaskrunnerError
from functions.settings import Settings

logger = logging.getLogger("functions.db")  # connections log as one, opened or pooled


def libpq_url(database_url: str | None) -> str:
    """Return `database_url` as libpq takes it (a `postgresql+psycopg://` prefix removed)."""
    if not database_url:
        raise TaskrunnerError("TASKRUNNER_DATABASE_URL is not set (expected a postgresql:// URL)")
    scheme, sep, rest = database_url.partition("://")
    if sep and scheme.startswith(("postgresql+", "postgres+")):
        return f"postgresql://{rest}"
    return database_url


def database_for_log(url: str | None) -> str:
    """The database a URL names, fit for a log line: its password replaced by ***."""
    if not url:
        return "(none)"
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "(not a URL)"
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = f"{userinfo.partition(':')[0]}:***"
    # The query may carry a password too (?password=..., ?sslpassword=...).
    hostpart, q, query = hostpart.partition("?")
    if q:
        options = [option.partition("=") for option in query.split("&")]
        query = "&".join(
            f"{name}{eq}***" if "password" in name.lower() else f"{name}{eq}{value}"
            for name, eq, value in options
        )
    return f"{scheme}://{userinfo}{at}{hostpart}{q}{query}"


# How a transaction pooler refuses the startup parameter `options`: pgbouncer says
# "unsupported startup parameter: options", RDS Proxy that it "doesn't support command-line
# options".
_POOLER_REFUSALS = ("unsupported startup parameter", "command-line options")
# Whether the server applied this connection's `options` (the statement bound it asked for).
_OPTIONS_APPLIED = """
SELECT setting = %(timeout_ms)s FROM pg_settings WHERE name = 'statement_timeout'
"""


@dataclass
class Found:
    """What connecting found in this process; every later connection follows it."""

    # Set once a pooler has refused `options` (or ignored them): from then on every
    # connection is made as in pooler mode, as if TASKRUNNER_TRANSACTION_POOLER were set.
    pooler: bool = False
    # Set once a connection made with `options` showed them applied. pgbouncer configured
    # with `ignore_startup_parameters = options` takes them without a word and drops them,
    # and then hands transactions to server connections where psycopg's prepared statements
    # do not exist (`GET /tasks/{id}` answered 500 "prepared statement _pg3_1 does not
    # exist" from its 6th run on): so the first such connection of a process reads back
    # what it asked for.
    options_applied: bool = False


found = Found()


def forget_found() -> None:
    """Forget what connecting found, as a new process (a new Lambda container) has."""
    found.pooler = found.options_applied = False


def behind_pooler(settings: Settings) -> bool:
    """Whether connections go through a transaction pooler: set, or found by connecting."""
    return settings.transaction_pooler or found.pooler


def connect_kwargs(settings: Settings, application_name: str = "taskrunner") -> dict[str, Any]:
    """psycopg connection arguments for `settings` (autocommit: every statement is its own
    transaction, which spares the BEGIN and COMMIT round trips)."""
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": settings.db_connect_timeout_s,
        "application_name": application_name,
    }
    if behind_pooler(settings):
        # pgbouncer (transaction mode) and RDS Proxy hand each transaction to any server
        # connection, where a statement prepared on another one does not exist; and they
        # refuse startup options, so the statement bound is client-side only.
        kwargs["prepare_threshold"] = None
    else:
        timeout_ms = int(settings.db_statement_timeout_s * 1000)
        # No JIT: every statement here is short, and compiling one costs 100-500 ms of the
        # server's CPU, which PostgreSQL before 18 spends on any plan it thinks costly (a
        # count over a large table, a plan with a disabled node; see queries.PINNED_PLAN).
        # A session left idle inside a transaction (its process stopped or frozen between
        # BEGIN and COMMIT) is ended after the same bound: the row locks it holds (its
        # worker's row) would otherwise keep its rescue waiting for as long as it is frozen.
        kwargs["options"] = (
            f"-c statement_timeout={timeout_ms} -c idle_in_transaction_session_timeout={timeout_ms}"
            " -c jit=off"
        )
    return kwargs


async def connect(settings: Settings, application_name: str = "taskrunner") -> AsyncConnection[Any]:
    """A new connection for `settings`.

    A transaction pooler reached with TASKRUNNER_TRANSACTION_POOLER unset refuses the
    startup options, or ignores them: that misconfiguration must not look like an outage
    (every request a 503, forever) nor break prepared statements. A refusal is recognised
    at any connection; options ignored, by reading them back on the first connection of
    the process that has them. Either is said once, with a warning, and this process goes
    on as in pooler mode.
    """
    url = libpq_url(settings.database_url)
    kwargs = connect_kwargs(settings, application_name)
    try:
        conn = await AsyncConnection.connect(url, **kwargs)
    except psycopg.OperationalError as exc:
        if "options" not in kwargs or not any(r in str(exc) for r in _POOLER_REFUSALS):
            raise
        _found_pooler("refused")
        return await AsyncConnection.connect(url, **connect_kwargs(settings, application_name))
    if "options" not in kwargs or found.options_applied:
        return conn
    try:
        timeout_ms = str(int(settings.db_statement_timeout_s * 1000))
        cursor = await conn.execute(_OPTIONS_APPLIED, {"timeout_ms": timeout_ms})
        row = await cursor.fetchone()
    except BaseException:
        await conn.close()
        raise
    if row is not None and row[0]:
        found.options_applied = True
        return conn
    await conn.close()
    _found_pooler("ignored")
    return await AsyncConnection.connect(url, **connect_kwargs(settings, application_name))


def _found_pooler(how: str) -> None:
    """From now on, connect as in pooler mode; say so once."""
    if found.pooler:
        return
    found.pooler = True
    logger.warning(
        "action=connect: the database %s startup options, as a transaction pooler"
        " (pgbouncer, RDS Proxy) does: going on without them, without prepared statements"
        " and without LISTEN; set TASKRUNNER_TRANSACTION_POOLER=true to say so",
        how,
    )
