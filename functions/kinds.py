"""The task kinds. Adding one is a function and a line in `KINDS`.

A kind returns the line it prints; the runner prints it to stdout and stores it as the task's
`output`. Raising fails the attempt (and retries it while attempts remain). A kind that waits
(sleeps, network calls) is a coroutine function and each run is an asyncio task; a kind that
returns at once is a plain function, run inline by the worker without a task of its own.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from functions.settings import Settings


@dataclass(frozen=True)
class Context:
    """What a kind may use while it runs."""

    task_id: int
    attempt: int
    settings: Settings
    # The runner's shared HTTP client, made on first use: building one (TLS context and
    # all) took 90 ms of every tick, most of which run no kind that needs it.
    client: Callable[[], httpx.AsyncClient]

    @property
    def http(self) -> httpx.AsyncClient:
        return self.client()


def _unlimited(settings: Settings) -> int | None:
    return None


@dataclass(frozen=True)
class Kind:
    name: str
    run: Callable[[Context], Awaitable[str]] | Callable[[Context], str]
    # The longest one run can take: a tick near its platform deadline claims only kinds that
    # fit, and a run that takes longer is stopped and fails its attempt.
    max_seconds: Callable[[Settings], float]
    # How many runs of this kind one worker has going at once (None: no limit). The rest wait
    # for a slot, claimed and leased, and their time limit starts when they do.
    concurrency: Callable[[Settings], int | None] = _unlimited
    # A plain function, not a coroutine function: it must return without waiting.
    instant: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "instant", not inspect.iscoroutinefunction(self.run))


async def foo(ctx: Context) -> str:
    await asyncio.sleep(ctx.settings.foo_delay_s)
    return f"Foo {ctx.task_id}"


async def bar(ctx: Context) -> str:
    # httpx's timeout bounds each phase (connect, read...); this bounds the whole request.
    async with asyncio.timeout(ctx.settings.bar_timeout_s):
        # Streamed, and closed unread: only the status line and headers are read, however
        # large the body (an 800 MB body once took a worker to 1.9 GB).
        async with ctx.http.stream("GET", ctx.settings.bar_url) as response:
            # Any response, 5xx included, is a success: the task is to report the status code.
            return str(response.status_code)


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """The HTTP client a worker's runs share: one connection per `bar` slot, so no request
    ever waits in the client's pool (where httpcore's queue costs O(waiting) per event, and
    the wait counted against the request's timeout)."""
    slots = settings.bar_concurrency
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.bar_timeout_s),
        limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
        follow_redirects=True,
    )


def baz(ctx: Context) -> str:
    return f"Baz {random.randint(0, 343)}"


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("foo", foo, lambda s: s.foo_delay_s + 1.0),
        Kind("bar", bar, lambda s: s.bar_timeout_s + 1.0, lambda s: s.bar_concurrency),
        Kind("baz", baz, lambda s: 1.0),
    )
}
