"""The long-running local processes: the API server and the timer loop, alone or together.

The timer loop emulates the cloud's schedule by calling the same `tick` the Lambda handler
calls; locally one tick keeps polling (woken by LISTEN/NOTIFY) until the process is told
to stop, so a task due now starts within milliseconds rather than at the next minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Coroutine, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from functions.app import build_app
from functions.errors import DatabaseUnavailable
from functions.logs import setup_logging
from functions.settings import Settings
from functions.tick import tick

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, leaving signals to `serve` so the timer loop can drain first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_timer(settings: Settings, stop: asyncio.Event) -> None:
    """Call the tick until `stop` is set; when the database is down, retry with backoff."""
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
    settings: Settings, *, host: str | None = None, port: int | None = None, worker: bool = True
) -> None:
    """Serve the API (when `port` is given) and/or run the timer loop until SIGTERM or SIGINT."""
    # What is loaded by now lives as long as the process: keep it out of every garbage
    # collection. The last of 10,000 foo tasks due at once started 0.61 s after its time
    # before, 0.44 s after.
    gc.freeze()
    stop = asyncio.Event()
    server: _Server | None = None
    if port is not None:
        config = uvicorn.Config(
            build_app(settings),
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
        jobs.append(run_timer(settings, stop))
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


def api_app() -> FastAPI:
    """The app of one of `serve_processes`' children (uvicorn imports it by name)."""
    settings = Settings()
    setup_logging(settings, level=os.environ.get(_LOG_LEVEL, "INFO"))
    return build_app(settings)


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
