"""The connection pool: every wait bounded, failing at once when it can, recovering at once."""

import asyncio
import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import tuple_row

from functions.db import Database, StatementTimeout, bounded
from functions.errors import DatabaseUnavailable
from functions.settings import Settings
from functions.store import Store
from tests.pgservers import Server

# Nothing listens on port 1 of 127.0.0.1: a connection is refused at once.
NOWHERE = "postgresql://postgres@127.0.0.1:1/none"


@pytest.fixture
async def database(own_server: Server) -> AsyncIterator[Database]:
    settings = Settings(
        database_url=own_server.url,
        db_pool_size=2,
        db_connect_timeout_s=2,
        db_statement_timeout_s=1.0,
    )
    database = Database(settings)
    yield database
    await database.dispose()


async def select_one(database: Database) -> int:
    async with database.connection() as conn:
        cursor = conn.cursor()
        await database.bounded(conn, cursor.execute("SELECT 1"))
        [(one,)] = await cursor.fetchall()
        return int(one)


async def refused_while_frozen(database: Database, own_server: Server) -> float:
    """Freeze the server, ask for a row; return how long the refusal took."""
    own_server.freeze()
    try:
        asked = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await select_one(database)
        return time.monotonic() - asked
    finally:
        own_server.thaw()


async def test_a_refused_connection_fails_at_once_not_after_the_timeout() -> None:
    database = Database(Settings(database_url=NOWHERE, db_connect_timeout_s=30))
    asked = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match=r"Connection refused|connection failed"):
        await select_one(database)
    assert time.monotonic() - asked < 10, "not the 30 s connect timeout"
    await database.dispose()


async def test_the_first_request_after_an_outage_succeeds(
    database: Database, own_server: Server
) -> None:
    assert await select_one(database) == 1  # a pooled connection, idle from here on
    own_server.stop()
    with pytest.raises(DatabaseUnavailable):
        await select_one(database)
    own_server.start()
    await asyncio.sleep(PING_WAIT_S)
    assert await select_one(database) == 1, "no backoff, no broken connection handed out"


PING_WAIT_S = 1.1  # past functions.db.PING_AFTER_IDLE_S: pooled connections are checked


async def test_waiting_for_a_connection_is_bounded(database: Database) -> None:
    async with database.connection(), database.connection():
        # Both of the pool's connections are in use.
        with pytest.raises(DatabaseUnavailable, match="no free connection within 2s"):
            await select_one(database)
    assert await select_one(database) == 1


async def test_a_wait_cancelled_during_the_idle_check_keeps_the_pool_whole(
    own_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's loops are cancelled at shutdown whatever they are doing; one cancelled
    while its connection was being checked must not take the pool's only place with it
    (a tick then waited 5 s per statement and overran its deadline)."""
    monkeypatch.setattr("functions.db.PING_AFTER_IDLE_S", 0.0)  # every checkout checks
    settings = Settings(database_url=own_server.url, db_pool_size=1, db_connect_timeout_s=2)
    database = Database(settings)
    try:
        assert await select_one(database) == 1
        own_server.freeze()  # the check hangs
        try:
            waiting = asyncio.create_task(select_one(database))
            await asyncio.sleep(0.3)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        finally:
            own_server.thaw()
        assert await select_one(database) == 1
    finally:
        await database.dispose()


async def test_a_connection_handed_over_as_the_wait_times_out_is_not_lost(
    own_server: Server,
) -> None:
    """The holder gives its connection back in the same turn of the loop as the waiter's
    time runs out: the waiter takes it (before, it raised and the connection was lost)."""
    settings = Settings(database_url=own_server.url, db_pool_size=1, db_connect_timeout_s=1)
    database = Database(settings)
    loop = asyncio.get_running_loop()
    try:
        async with database.connection() as conn:
            held = conn
        pool = database._current_pool()
        conn = await pool.acquire()
        assert conn is held
        # Block the loop across both moments, so the release (0.9 s) and the waiter's
        # timeout (1 s) fire in the same turn, release first.
        loop.call_later(0.5, time.sleep, 0.7)
        loop.call_later(0.9, pool.release, conn)
        assert await pool.acquire() is conn
        pool.release(conn)
        assert await select_one(database) == 1
    finally:
        await database.dispose()


async def test_a_frozen_server_is_given_up_on_and_its_connection_closed(
    database: Database, own_server: Server
) -> None:
    assert await select_one(database) == 1
    waited_s = await refused_while_frozen(database, own_server)
    # The statement bound (1 s + 1 s), or the ping of a connection idle too long, or the
    # connect timeout (2 s) for a new one: never more than about their sum.
    assert waited_s < 8
    assert await select_one(database) == 1


async def test_a_frozen_server_is_given_up_on_after_an_idle_spell(
    database: Database, own_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection had been idle, so it is checked first; the check is bounded like any
    statement (closed, not cancelled: a cancel request waits on the frozen server too), and
    the new connection then by the connect timeout. Before: 20 s with the defaults."""
    assert await select_one(database) == 1
    monkeypatch.setattr("functions.db.PING_AFTER_IDLE_S", 0.0)
    waited_s = await refused_while_frozen(database, own_server)
    # The check (2 s, the connect timeout), then a new connection (2 s): about 4 s.
    assert waited_s < 6
    assert await select_one(database) == 1


async def test_a_statement_that_overruns_is_cancelled_by_the_server(database: Database) -> None:
    with pytest.raises(StatementTimeout, match="timed out"):
        async with database.connection() as conn:
            await database.bounded(conn, conn.execute("SELECT pg_sleep(5)"))
    assert await select_one(database) == 1


async def test_sessions_run_without_jit(settings: Settings) -> None:
    """Compiling a plan costs 100-500 ms of the server's CPU, for statements that run in
    milliseconds (a rescue took 200-480 ms on PostgreSQL 15 for that alone): off per session."""
    database = Database(settings)
    try:
        async with database.connection() as conn:
            cursor = await conn.execute("SHOW jit")
            assert await cursor.fetchall() == [("off",)]
    finally:
        await database.dispose()


async def test_the_pinned_plan_holds_for_its_transaction_only(settings: Settings) -> None:
    settings = dataclasses.replace(settings, db_pool_size=1)  # one connection: the same session
    store = Store(Database(settings))
    names = ("enable_seqscan", "enable_bitmapscan", "enable_sort", "enable_hashjoin",
             "enable_mergejoin", "jit", "max_parallel_workers_per_gather")  # fmt: skip
    show = "SELECT " + ", ".join(f"current_setting('{name}')" for name in names)
    try:
        [[pinned]] = await store._pinned((show, {}))
        assert pinned == ("off",) * 6 + ("0",)
        [after] = await store._all(show, tuple_row)
        assert after[:5] == ("on",) * 5 and after[6] != "0"
    finally:
        await store.database.dispose()


async def test_a_session_the_server_ended_is_an_outage_not_a_refusal(database: Database) -> None:
    # The server's idle-in-transaction timeout ends the session with an InternalError
    # (25P03): a 503 to the API's callers, as any lost connection is, not a 500.
    with pytest.raises(DatabaseUnavailable, match="idle-in-transaction timeout"):
        async with database.connection() as conn, conn.transaction():
            await conn.execute("SET LOCAL idle_in_transaction_session_timeout = '10ms'")
            await asyncio.sleep(0.5)
            await conn.execute("SELECT 1")
    assert await select_one(database) == 1  # and the next use gets a working connection


@pytest.mark.one_server
async def test_a_socket_opened_as_a_statement_is_cut_off_is_watched_for_itself(
    database_url: str,
) -> None:
    # `bounded` closes the connection under psycopg's wait, which the event loop watches
    # until the wait unwinds: a socket opened right then takes the same descriptor number (a
    # connection being made, by another tick of the same process), and waiting for it to be
    # writable failed with ENOENT while the loop still held the old socket's entry.
    loop = asyncio.get_running_loop()
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    fd = conn.pgconn.socket
    opened: list[socket.socket] = []
    failed: list[BaseException] = []
    writable = asyncio.Event()

    def open_on_the_same_descriptor() -> None:
        spare: list[socket.socket] = []
        try:
            while not any(s.fileno() == fd for s in opened):
                pair = socket.socketpair()
                (opened if fd in (pair[0].fileno(), pair[1].fileno()) else spare).extend(pair)
                assert len(spare) < 200, f"descriptor {fd} not handed out again"
            loop.add_writer(fd, writable.set)
        except BaseException as exc:
            failed.append(exc)
        finally:
            for s in spare:
                s.close()

    class Hooked(asyncio.Task[None]):
        def cancel(self, msg: Any = None) -> bool:
            # `bounded` cancels the awaiting task right after closing the connection.
            open_on_the_same_descriptor()
            return super().cancel(msg)

    async def cut_off() -> None:
        await bounded(conn, conn.execute("SELECT pg_sleep(10)"), 0.2)

    try:
        with pytest.raises(StatementTimeout):
            await Hooked(cut_off())
        assert failed == []
        await asyncio.wait_for(writable.wait(), 10)
    finally:
        loop.remove_writer(fd)
        for s in opened:
            s.close()
        await conn.close()
