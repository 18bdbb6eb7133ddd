"""The long-running local processes: the API server and the timer loop, alone or together.

The timer loop emulates the cloud's schedule by calling the same `tick` the Lambda handler
calls; locally one tick keeps polling (woken by LISTEN/NOTIFY) until the process is told
to stop, so a task due now starts within milliseconds rather than at the next minute.

The server listens at once, whether or not the database answers: until it answers with a
schema this version can use, every request gets a 503 (`Readiness`), so a load balancer or
a probe sees a live process that is not ready rather than a refused connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from functions import tasks
from functions.answers import send_detail
from functions.app import build_app
from functions.db import Database
from functions.errors import DatabaseUnavailable, SchemaOutdated
from functions.logs import setup_logging
from functions.settings import Settings
from functions.store import Store
from functions.tick import tick

logger = logging.getLogger(__name__)

# While the database does not answer, or its schema is behind, the same news is logged at
# most this often.
_REPEAT_LOG_S = 60.0


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
            logger.info("action=ready schema=%s: the database answers; serving", revision)
            self._open = True
            self.ready.set()
            return

    def _not_ready(self, detail: str, retry_after: str) -> None:
        self._detail, self._retry_after = detail, retry_after

    def _log(self, news: str) -> None:
        """Log `news`, unless it is the same kind of news as last time and under a minute old."""
        kind, now = news.partition(":")[0], time.monotonic()
        last = self._logged
        if last is None or last[0] != kind or now - last[1] >= _REPEAT_LOG_S:
            logger.warning("action=ready: %s", news)
            self._logged = (kind, now)


def build_served_app(settings: Settings, *, migrate: bool = False) -> Readiness:
    """The app `taskrunner api` and `dev` serve: the API behind `Readiness`."""
    store = Store(Database(settings))
    return Readiness(build_app(settings, store=store), store, migrate=migrate)


class _Server(uvicorn.Server):
    """uvicorn's server, leaving signals to `serve` so the timer loop can drain first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_timer(
    settings: Settings, stop: asyncio.Event, *, after: asyncio.Event | None = None
) -> None:
    """Call the tick until `stop` is set; when the database is down, retry with backoff.

    With `after`, start once it is set (or return if `stop` is set first).
    """
    if after is not None:
        waits = [asyncio.ensure_future(after.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
    retry_s = 0.5
    while not stop.is_set():
        try:
            summary = await tick(settings, keep_polling=True, stop=stop)
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
    server: _Server | None = None
    app: Readiness | None = None
    if port is not None:
        app = build_served_app(settings, migrate=migrate)
        config = uvicorn.Config(
            app,
            host=host or "127.0.0.1",
            port=port,
            log_config=None,  # our logging: everything to stderr, stdout is for task output
            lifespan="on",
        )
        server = _Server(config)

    main = asyncio.current_task()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1 and main is not None:
            logger.warning("action=shutdown: second signal, stopping now")
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
        jobs.append(run_timer(settings, stop, after=None if app is None else app.ready))
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
    )
