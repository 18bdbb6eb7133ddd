"""Connections to PostgreSQL: a small pool per event loop, and no wait without a bound.

Every wait is bounded, so a database that is down, slow or frozen (a stalled host answers
nothing and closes nothing) costs a request at most `db_connect_timeout_s` +
`db_statement_timeout_s` and then a 503, never a hang:
- the wait for a pooled connection, and opening one (libpq's `connect_timeout`), by
  `db_connect_timeout_s`;
- each statement, by the server's `statement_timeout` (when connected directly) and by a
  client-side bound a second longer, which closes the connection outright: a frozen server
  would answer neither the statement nor a cancel request.

What each connection is opened with (its URL and options, and a transaction pooler found by
connecting) is `conninfo`'s.

Why a pool of our own. It opens connections in the caller, when needed: a refused
connection is a 503 at once, and the first request after an outage connects at once. The
pools at hand did otherwise, measured here: psycopg_pool connects in background workers
with a growing backoff, so while PostgreSQL was down every request waited out the whole
timeout, and once it was back, requests still failed for 12 s (the workers were in their
backoff); its workers also swallow a cancellation, which kept `asyncio.run` from returning
when a pool was left open. SQLAlchemy's async pool behaves, but a checkout costs 208 us of
CPU (against 21 us for psycopg_pool, and ~5 us here), a fifth of a request. SQLAlchemy stays
the migrations' toolkit (Alembic), off the request path.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from functions.conninfo import connect, libpq_url
from functions.errors import DatabaseError, DatabaseUnavailable, SchemaOutdated
from functions.settings import Settings

T = TypeVar("T")
In = TypeVar("In")
Out = TypeVar("Out")

# A connection idle this long is checked before use: it may have died with a database
# restart, a failover, or while its Lambda container was frozen. Checking every checkout
# doubled its cost; the API went from 520 to 930 POST /tasks per second without it.
PING_AFTER_IDLE_S = 1.0
# Idle connections beyond this age are closed rather than reused (a server may drop them).
MAX_IDLE_S = 300.0
# The client-side bound on a statement is the server's statement_timeout plus this, so that
# a server that is alive reports the timeout itself (and ends the statement).
_CLIENT_GRACE_S = 1.0
# What a statement still gets once a deadline has passed: enough for a healthy server.
_PAST_DEADLINE_S = 0.05


class Coalescer(Generic[In, Out]):
    """Concurrent calls of one statement, sent as one statement while the database is busy.

    At most `max_inflight` statements run at once. A call made while they all run waits for
    the next one, which takes every call that came meanwhile (at most `max_size`): under
    load, N creates cost one round trip and one commit instead of N. A call made while a
    place is free runs at once, alone: nothing waits for company.

    The wait is bounded as a wait for a pooled connection is: a call still waiting after
    `max_wait_s` gives up (DatabaseUnavailable), and a statement gets what is left of its
    oldest call's `max_wait_s` to find a connection (`run(items, wait_s)`). So a request
    ends within the same bounds as one that never waited here, a frozen database included.
    """

    def __init__(
        self,
        run: Callable[[list[In], float | None], Awaitable[list[Out]]],
        *,
        max_inflight: int,
        max_size: int,
        max_wait_s: float,
    ) -> None:
        self._run = run
        self._max_inflight = max_inflight
        self._max_size = max_size
        self._max_wait_s = max_wait_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight = 0
        # (item, its answer, the loop time by which its statement must have a connection)
        self._waiting: list[tuple[In, asyncio.Future[Out], float]] = []
        self._batches: set[asyncio.Task[None]] = set()

    async def __call__(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new loop (a Lambda container's next one): what the old one held is gone.
            self._loop, self._inflight, self._waiting = loop, 0, []
        if self._inflight < self._max_inflight and not self._waiting:
            self._inflight += 1
            try:
                [out] = await self._run([item], None)
                return out
            finally:
                self._inflight -= 1
                self._next()
        future: asyncio.Future[Out] = loop.create_future()
        entry = (item, future, loop.time() + self._max_wait_s)
        self._waiting.append(entry)
        # Only a call still waiting gives up; one in a statement is bounded there.
        timer = loop.call_at(entry[2], self._give_up, entry)
        try:
            return await future
        finally:
            timer.cancel()
            if entry in self._waiting:  # cancelled while waiting: not sent
                self._waiting.remove(entry)

    def _give_up(self, entry: tuple[In, asyncio.Future[Out], float]) -> None:
        if entry in self._waiting:
            self._waiting.remove(entry)
            entry[1].set_exception(
                DatabaseUnavailable(
                    f"database unavailable: no statement could start within {self._max_wait_s}s"
                )
            )

    def _next(self) -> None:
        """Send the calls waiting, if a place is free."""
        if not self._waiting or self._inflight >= self._max_inflight:
            return
        batch = self._waiting[: self._max_size]
        del self._waiting[: self._max_size]
        self._inflight += 1
        # A task of its own: the call that freed the place has its answer and goes on.
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _send(self, batch: list[tuple[In, asyncio.Future[Out], float]]) -> None:
        wait_s = max(_PAST_DEADLINE_S, batch[0][2] - asyncio.get_running_loop().time())
        try:
            outs = await self._run([item for item, _, _ in batch], wait_s)
        except asyncio.CancelledError:
            for _, future, _ in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future, _), out in zip(batch, outs, strict=True):
                if not future.done():
                    future.set_result(out)
        finally:
            self._inflight -= 1
            self._next()


class StatementTimeout(DatabaseUnavailable):
    """A statement got no answer within the bound; its connection was closed."""


class Pool:
    """At most `size` connections of one event loop, opened when needed, handed out in turn.

    A connection given back is handed straight to the longest waiter, if any; a broken one
    is closed, and its place goes to a waiter, who opens a new one.
    """

    def __init__(self, settings: Settings, size: int, timeout_s: float) -> None:
        self._settings = settings
        self._size = size
        self._timeout_s = timeout_s
        self._open = 0  # open or being opened
        self._idle: list[tuple[AsyncConnection[Any], float]] = []  # (connection, since)
        # Each waiter gets a connection, or None: a place to open one.
        self._waiters: deque[asyncio.Future[AsyncConnection[Any] | None]] = deque()

    async def acquire(self, timeout_s: float | None = None) -> AsyncConnection[Any]:
        """A connection within `timeout_s` (default: the connect timeout), or
        DatabaseUnavailable. Never cancelled from outside for its bound: psycopg answers a
        cancelled statement by asking the server to cancel it, which waits on a frozen one."""
        bound_s = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        deadline = time.monotonic() + bound_s
        while True:
            conn, idle_s = await self._next(deadline)
            if conn is None:
                return await self._connect(deadline)
            if idle_s < PING_AFTER_IDLE_S:
                return conn
            try:
                answers = await self._answers(conn, max(0.0, deadline - time.monotonic()))
            except BaseException:
                self._discard(conn)  # cancelled mid-check: its place must not be lost
                raise
            if answers:
                return conn
            self._discard(conn)

    async def _next(self, deadline: float) -> tuple[AsyncConnection[Any] | None, float]:
        """An idle connection and how long it was idle; or None when there is room to open
        one. Else wait for either."""
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if now - since < MAX_IDLE_S and not conn.closed:
                return conn, now - since
            self._discard(conn)
        if self._open < self._size:
            self._open += 1
            return None, 0.0
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(0.0, deadline - now)):
                conn = await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return waiter.result(), 0.0  # handed over just as the time ran out
            raise DatabaseUnavailable(
                f"database unavailable: no free connection within {self._timeout_s:g}s"
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give(waiter.result())  # handed over as we were cancelled: pass it on
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        # Handed over by the last user (just now) or a free place (None): no check needed.
        return conn, 0.0

    async def _answers(self, conn: AsyncConnection[Any], bound_s: float) -> bool:
        try:
            await bounded(conn, conn.execute("SELECT 1"), bound_s)
        except (psycopg.Error, OSError, StatementTimeout):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled mid-check (psycopg may answer a cancel with its own error):
                # the caller is going away, it does not want a new connection.
                raise asyncio.CancelledError from None
            return False
        return True

    async def _connect(self, deadline: float) -> AsyncConnection[Any]:
        try:
            left_s = deadline - time.monotonic()
            # libpq's connect_timeout bounds it, or the time left when that is shorter (no
            # query is in flight yet, so cancelling the connect waits on nothing).
            try:
                async with asyncio.timeout(left_s if left_s < self._timeout_s else None):
                    return await connect(self._settings)
            except TimeoutError:
                raise DatabaseUnavailable(
                    "database unavailable: no connection within the time left"
                ) from None
        except BaseException:
            self._open -= 1
            self._give(None)  # the place is free again
            raise

    def release(self, conn: AsyncConnection[Any]) -> None:
        if conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
            self._discard(conn)  # broken, or left mid-transaction: not for the next user
            return
        self._give(conn)

    def _give(self, conn: AsyncConnection[Any] | None) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is not None:
            self._idle.append((conn, time.monotonic()))

    def _discard(self, conn: AsyncConnection[Any]) -> None:
        conn.pgconn.finish()
        self._open -= 1
        self._give(None)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            await conn.close()
        self._open -= len(idle)


class Database:
    """Hands out connections of the running event loop's pool, building it on first use.

    Lambda keeps a process warm across invocations and some adapters run each one on a
    new loop: a pooled async connection must never be used from a loop it was not made on.
    """

    def __init__(self, settings: Settings, *, deadline: float | None = None) -> None:
        self.settings = settings
        libpq_url(settings.database_url)  # a missing URL is an error now, not at first use
        self._pool: Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.statement_bound_s = settings.db_statement_timeout_s + _CLIENT_GRACE_S
        # A `time.monotonic()` by which every wait on the database ends (a tick's platform
        # deadline): a frozen server cannot hold the caller past it.
        self.deadline = deadline

    def _time_left_s(self, bound_s: float) -> float:
        if self.deadline is None:
            return bound_s
        return min(bound_s, max(_PAST_DEADLINE_S, self.deadline - time.monotonic()))

    def _current_pool(self) -> Pool:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._loop is not loop:
            # The old loop is gone or not ours to run: its connections are left to close.
            # Pool size 0 means no connection is kept: each use opens one and closes it.
            self._pool = Pool(
                self.settings,
                self.settings.db_pool_size or 1_000_000,
                self.settings.db_connect_timeout_s,
            )
            self._loop = loop
        return self._pool

    @asynccontextmanager
    async def connection(self, wait_s: float | None = None) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection for one statement or a few, within `wait_s` at most (and within
        the connect timeout); driver errors become domain errors."""
        pool = self._current_pool()
        try:
            conn = await pool.acquire(self._time_left_s(math.inf if wait_s is None else wait_s))
            try:
                yield conn
            except psycopg.DatabaseError as exc:
                # An error that ended the session is an outage to the caller, whatever its
                # class: the server's idle-in-transaction timeout (25P03) is an
                # InternalError, and was answered 500 where a lost connection is a 503.
                if conn.broken:
                    raise DatabaseUnavailable(f"database unavailable: {first_line(exc)}") from exc
                raise
            finally:
                if self.settings.db_pool_size == 0:
                    pool._discard(conn)
                else:
                    pool.release(conn)
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
        it, close `conn` and raise StatementTimeout (see `bounded` below)."""
        bound_s = self.statement_bound_s if timeout_s is None else timeout_s
        return await bounded(conn, work, self._time_left_s(bound_s))

    async def dispose(self) -> None:
        pool, self._pool, loop, self._loop = self._pool, None, self._loop, None
        if pool is not None and loop is asyncio.get_running_loop():
            await pool.close()


async def bounded(conn: AsyncConnection[Any], work: Awaitable[T], bound_s: float) -> T:
    """Await `work` on `conn` at most `bound_s`; past it, close `conn` and raise
    StatementTimeout.

    Closing first is the only way out that does not wait on the server: cancelled
    otherwise, psycopg sends a cancel request and waits for the statement to end, and a
    frozen server does neither. No task is made: the timer closes the connection and
    cancels the awaiting task itself.
    """
    task = asyncio.current_task()
    assert task is not None
    expired = False

    loop = asyncio.get_running_loop()

    def expire() -> None:
        nonlocal expired
        expired = True
        # psycopg's wait has the loop watch the socket until that wait unwinds, after the
        # cancel below: forgotten first, or a socket this process opens meanwhile (another
        # connection) is given the same number and found already watched, and its own wait
        # fails with ENOENT (192 claims of ticks sharing a process behind pgbouncer did).
        with suppress(psycopg.OperationalError):  # (no socket: nothing watched)
            fd = conn.pgconn.socket
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        conn.pgconn.finish()
        task.cancel()

    timer = loop.call_later(bound_s, expire)
    try:
        return await work
    except asyncio.CancelledError:
        # Not the timer's cancel alone: one from outside (a shutdown cancelling the loop
        # that waits here) came too, and is not swallowed. Within one step of the event
        # loop both can land, and the loop went on, past its shutdown, for good.
        if not expired or task.uncancel() > 0:
            raise
        raise StatementTimeout(
            f"database statement got no answer within {bound_s:g}s; its connection was closed"
        ) from None
    finally:
        timer.cancel()


def first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
