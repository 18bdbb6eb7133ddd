"""The long-running local processes: the API server and the timer loop, alone or together.

The timer loop emulates the cloud's schedule by calling the same `tick` the Lambda handler
calls; locally one tick keeps polling (woken by LISTEN/NOTIFY) until the process is told
to stop, so a task due now starts within milliseconds rather than at the next minute.

The server listens at once, whether or not the database answers: until it answers with a
schema this version can use, every request gets a 503 (`Readiness`), so a load balancer or
a probe sees a live process that is not ready rather than a refused connection.

Each process bounds its connections (`limited_protocol`): at most TASKRUNNER_MAX_CONNECTIONS
open, and none left open without a request's headers for TASKRUNNER_HEADER_TIMEOUT_S; uvicorn
bounds neither (its `limit_concurrency` answers only once the headers are complete).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import time
import typing
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from functions import kinds, tasks
from functions.db import Database
from functions.errors import DatabaseUnavailable, SchemaOutdated
from functions.http.app import build_app
from functions.http.responses import send_detail
from functions.logs import setup_logging
from functions.settings import Settings
from functions.store import Store
from functions.tick import tick
from functions.upkeep import PruneClock

logger = logging.getLogger(__name__)

# While the database does not answer, or its schema is behind, the same news is logged at
# most this often.
_REPEAT_LOG_S = 60.0
# How long startup waits for the first check to end (a database that does not answer at
# all, frozen, would otherwise hold the server from listening for its connect timeout).
_FIRST_CHECK_S = 2.0


class Readiness:
    """Answer every request 503 (with Retry-After) until the database answers with a schema
    this version can use; then step aside for good.

    A task started by the lifespan checks the database (with `migrate`, first brings the
    schema up to date, as `taskrunner dev` does): while it cannot be reached, again after 0.5
    s, then at most every 2 s; while its schema is behind, every second, so a deploy that
    migrates after starting the API is served as soon as `taskrunner migrate` is done. What
    happens after that (the database going away) is the app's to answer, request by request.
    """

    def __init__(self, app: ASGIApp, store: Store, *, migrate: bool = False) -> None:
        self.app = app
        self.store = store
        self.migrate = migrate
        self.ready = asyncio.Event()
        # Set once the first check has ended, ready or not.
        self.checked = asyncio.Event()
        self._open = False
        self._detail = "starting: the database has not been reached yet"
        self._retry_after = "1"
        self._watch: asyncio.Task[None] | None = None
        self._logged: tuple[str, float] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._open:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await send_detail(send, 503, self._detail, {"Retry-After": self._retry_after})
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._watch = asyncio.create_task(self._check_until_ready())

        async def receive_and_stop_checking() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # uvicorn listens once startup is complete: a database that answers is found
                # ready first (with --workers N, a process not ready yet would otherwise take
                # its share of the requests to answer 503); one that refuses is known at once
                # (the server listens then, answering 503), and one that does not answer at
                # all holds it back _FIRST_CHECK_S at most.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.checked.wait(), timeout=_FIRST_CHECK_S)
            if message["type"] == "lifespan.shutdown" and self._watch is not None:
                # Before the app's own shutdown closes the pool the checks use.
                self._watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watch
            return message

        await self.app(scope, receive_and_stop_checking, send)

    async def _check_until_ready(self) -> None:
        retry_s = 0.5
        while True:
            try:
                if self.migrate:
                    from local import migrate as migrations

                    url = self.store.database.settings.database_url
                    assert url is not None
                    await asyncio.to_thread(migrations.migrate, url)
                revision = await tasks.check_schema(self.store)
            except DatabaseUnavailable as exc:
                self._not_ready("database unavailable, try again shortly", "1")
                self._log(f"{exc}; answering 503 until it answers")
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, 2.0)
                continue
            except SchemaOutdated as exc:
                self._not_ready(str(exc), "5")
                self._log(f"{exc}; answering 503 until it is")
                await asyncio.sleep(1.0)
                continue
            except Exception as exc:
                # A database that refuses (a role that may not create tables, for `dev`'s
                # migrations): said in the log, which the 503 points to; tried again.
                self._not_ready("not ready: the database refused; the server's log says why", "5")
                self._log("the database refused: answering 503", exc)
                await asyncio.sleep(5.0)
                continue
            logger.info("action=ready schema=%s: the database answers; serving", revision)
            self._open = True
            self.ready.set()
            self.checked.set()
            return

    def _not_ready(self, detail: str, retry_after: str) -> None:
        self._detail, self._retry_after = detail, retry_after
        self.checked.set()

    def _log(self, news: str, error: BaseException | None = None) -> None:
        """Log `news`, unless it is the same kind of news as last time and under a minute old."""
        kind, now = news.partition(":")[0], time.monotonic()
        last = self._logged
        if last is None or last[0] != kind or now - last[1] >= _REPEAT_LOG_S:
            if error is None:
                logger.warning("action=ready: %s", news)
            else:
                logger.error("action=ready: %s", news, exc_info=error)
            self._logged = (kind, now)


# What a connection past TASKRUNNER_MAX_CONNECTIONS is sent, before it is closed.
_TOO_MANY_BODY = b'{"detail":"too many connections, try again soon"}'
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TOO_MANY_BODY), _TOO_MANY_BODY)
)
_last_refusal_logged = -_REPEAT_LOG_S


class _Limits:
    """One connection's bounds, for either of uvicorn's HTTP protocols (`protocol`).

    The header clock runs from the connection's start, and from the first byte of each later
    request (uvicorn's keep-alive timeout covers the wait between requests); a request whose
    headers are complete has begun a response cycle (`protocol.cycle`), which stops it.
    """

    def __init__(self, protocol: Any, max_connections: int, header_timeout_s: float) -> None:
        self.protocol = protocol
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.clock: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        if len(self.protocol.connections) > self.max_connections:
            global _last_refusal_logged
            if time.monotonic() - _last_refusal_logged >= _REPEAT_LOG_S:
                _last_refusal_logged = time.monotonic()
                logger.warning(
                    "action=connections open=%d: at TASKRUNNER_MAX_CONNECTIONS; answering 503",
                    len(self.protocol.connections) - 1,
                )
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._start_clock()

    def data_received(self, data: bytes, receive: Callable[[bytes], None]) -> None:
        cycle = self.protocol.cycle
        if self.clock is None and (cycle is None or cycle.response_complete):
            self._start_clock()  # the first byte of the next request
        receive(data)
        if self.protocol.cycle is not cycle:  # a request's headers are complete
            self.stop_clock()

    def stop_clock(self) -> None:
        if self.clock is not None:
            self.clock.cancel()
            self.clock = None

    def _start_clock(self) -> None:
        self.clock = self.protocol.loop.call_later(self.header_timeout_s, self._out_of_time)

    def _out_of_time(self) -> None:
        self.clock = None
        if not self.protocol.transport.is_closing():
            self.protocol.transport.close()


class _Limited:
    """What both of uvicorn's protocols get: `_Limits` on each connection."""

    limits: _Limits

    def __init__(
        self, *args: Any, max_connections: int, header_timeout_s: float, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.limits = _Limits(self, max_connections, header_timeout_s)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.limits.connection_made(typing.cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.limits.data_received(data, super().data_received)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self.limits.stop_clock()
        super().connection_lost(exc)  # type: ignore[misc]


class LimitedHttpTools(_Limited, HttpToolsProtocol):
    """uvicorn's httptools protocol (what it serves with when httptools is installed, as
    the `local` extra does), within `_Limits`."""


class LimitedH11(_Limited, H11Protocol):
    """uvicorn's h11 protocol (what it serves with when httptools is missing), within `_Limits`."""


# Descriptors a serving process keeps beside its connections: its pool, the worker's and
# LISTEN connections, pipes, logs (`taskrunner dev` holds 12 when idle).
_OTHER_DESCRIPTORS = 64
# asyncio accepts up to its server's backlog at once before any connection is handed to
# the protocol (which refuses those past the bound): under a flood, that many more open at
# once. uvloop hands each over as it accepts it.
_ASYNCIO_BACKLOG = 128


def max_connections(settings: Settings, *, burst: int = 0) -> int:
    """TASKRUNNER_MAX_CONNECTIONS, or fewer if this process may not open that many
    descriptors (RLIMIT_NOFILE) with room for its others and an accept `burst`."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - _OTHER_DESCRIPTORS - burst
    if soft == resource.RLIM_INFINITY or room >= settings.max_connections:
        return settings.max_connections
    held = max(room, 1)
    logger.warning(
        "action=connections: TASKRUNNER_MAX_CONNECTIONS=%d, but this process may open only %d"
        " descriptors (RLIMIT_NOFILE): holding at most %d connections",
        settings.max_connections, soft, held,
    )  # fmt: skip
    return held


def limited_protocol(
    settings: Settings,
    protocol: type[LimitedHttpTools | LimitedH11] = LimitedHttpTools,
    *,
    burst: int = 0,
) -> Any:
    """`protocol` with the bounds of `settings` on each connection, for uvicorn's `http`
    (which it calls as it would a class; a partial also pickles, for `--workers N`)."""
    return functools.partial(
        protocol,
        max_connections=max_connections(settings, burst=burst),
        header_timeout_s=settings.header_timeout_s,
    )


def build_served_app(settings: Settings, *, migrate: bool = False) -> Readiness:
    """The app `taskrunner api` and `dev` serve: the API behind `Readiness`."""
    store = Store(Database(settings))
    return Readiness(build_app(settings, store=store), store, migrate=migrate)


class _Server(uvicorn.Server):
    """uvicorn's server, leaving signals to `serve` so the timer loop can drain first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets=sockets)
        if self.force_exit:
            # Forced (a second signal), uvicorn skips the app's own shutdown: its lifespan
            # task was then cancelled at exit, and said so with a traceback.
            await self.lifespan.shutdown()


async def run_timer(
    settings: Settings,
    stop: asyncio.Event,
    *,
    after: asyncio.Event | None = None,
    hurry: asyncio.Event | None = None,
) -> None:
    """Call the tick until `stop` is set; when the database is down, retry with backoff.

    With `after`, start once it is set (or return if `stop` is set first). `hurry`: set
    once stopping, the running tasks get no more time (Runner.run).
    """
    if after is not None:
        waits = [asyncio.ensure_future(after.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
    retry_s = 0.5
    prune_clock = PruneClock()  # this process's: it prunes at most once a minute
    while not stop.is_set():
        try:
            summary = await tick(
                settings, keep_polling=True, stop=stop, hurry=hurry, prune_clock=prune_clock
            )
            logger.info("action=tick %s", summary.as_dict())
            retry_s = 0.5
        except DatabaseUnavailable as exc:
            logger.warning("action=tick: %s; retrying in %.1fs", exc, retry_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=retry_s)
            retry_s = min(retry_s * 2, 5.0)


async def serve(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    worker: bool = True,
    migrate: bool = False,
) -> None:
    """Serve the API (when `port` is given) and/or run the timer loop until SIGTERM or SIGINT.

    With the API, the timer loop starts once the database answers with a current schema
    (with `migrate`, once the API has brought it up to date).
    """
    # What is loaded by now lives as long as the process: keep it out of every garbage
    # collection. The last of 10,000 foo tasks due at once started 0.61 s after its time
    # before, 0.44 s after.
    gc.freeze()
    stop = asyncio.Event()
    hurry = asyncio.Event()
    server: _Server | None = None
    app: Readiness | None = None
    if port is not None:
        app = build_served_app(settings, migrate=migrate)
        on_uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        burst = 0 if on_uvloop else _ASYNCIO_BACKLOG
        config = uvicorn.Config(
            app,
            host=host or "127.0.0.1",
            port=port,
            log_config=None,  # our logging: everything to stderr, stdout is for task output
            lifespan="on",
            http=limited_protocol(settings, burst=burst),
            # uvicorn's 2048 unless asyncio's loop (`dev`): see _ASYNCIO_BACKLOG.
            backlog=2048 if on_uvloop else _ASYNCIO_BACKLOG,
        )
        server = _Server(config)

    main = asyncio.current_task()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 2:
            # Stop now, but cleanly: running tasks are stopped and handed back due again
            # (no attempt used), the worker signs off. Cancelling everything here left them
            # `running` for a lease, then rescued at the cost of an attempt, and exited 1
            # with a traceback.
            logger.warning(
                "action=shutdown: second signal, stopping running tasks and handing them back"
            )
            hurry.set()
            if server is not None:
                server.force_exit = True
            return
        if signals > 2 and main is not None:
            logger.warning("action=shutdown: third signal, stopping at once")
            main.cancel()
            return
        logger.info(
            "action=shutdown signal=%s: finishing running tasks", signal.Signals(signum).name
        )
        stop.set()
        if server is not None:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    jobs = []
    if server is not None:
        jobs.append(server.serve())
    if worker:
        jobs.append(
            run_timer(settings, stop, after=None if app is None else app.ready, hurry=hurry)
        )
    try:
        await asyncio.gather(*jobs)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run_api(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run the API's event loop: uvloop's when installed (the `local` extra has it), which
    takes a third less CPU per request here. Workers keep asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coroutine)


# How `serve_processes` tells its children the log level (`taskrunner --log-level`).
_LOG_LEVEL = "_TASKRUNNER_API_LOG_LEVEL"


def api_app() -> Readiness:
    """The app of one of `serve_processes`' children (uvicorn imports it by name)."""
    settings = Settings()
    setup_logging(settings, level=os.environ.get(_LOG_LEVEL, "INFO"))
    # Loaded already when functions.tick was imported (then a no-op), as every start does.
    kinds.load(settings.kinds)
    return build_served_app(settings)


def serve_processes(settings: Settings, *, host: str, port: int, processes: int) -> None:
    """Serve the API from `processes` processes on one port until SIGTERM or SIGINT.

    uvicorn's supervisor binds the socket, starts the children (each with its own pool of
    TASKRUNNER_DB_POOL_SIZE connections), restarts one that dies, and on a signal lets
    each finish its requests.
    """
    # The children read their settings again; the embedded database's URL is only here.
    assert settings.database_url is not None
    os.environ["TASKRUNNER_DATABASE_URL"] = settings.database_url
    os.environ[_LOG_LEVEL] = logging.getLevelName(logging.getLogger().level)
    uvicorn.run(
        "local.serve:api_app",
        factory=True,
        host=host,
        port=port,
        workers=processes,
        log_config=None,
        lifespan="on",
        # Each process holds at most TASKRUNNER_MAX_CONNECTIONS.
        http=limited_protocol(settings),
    )
