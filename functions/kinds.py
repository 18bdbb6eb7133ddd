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


@dataclass(frozen=True)
class Kind:
    name: str
    run: Callable[[Context], Awaitable[str]] | Callable[[Context], str]
    # The longest one run can take: a tick near its platform deadline claims only kinds that fit.
    max_seconds: Callable[[Settings], float]
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
        response = await ctx.http.get(ctx.settings.bar_url)
    # Any response, 5xx included, is a success: the task is to report the status code.
    return str(response.status_code)


def baz(ctx: Context) -> str:
    return f"Baz {random.randint(0, 343)}"


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("foo", foo, lambda s: s.foo_delay_s + 1.0),
        Kind("bar", bar, lambda s: s.bar_timeout_s + 1.0),
        Kind("baz", baz, lambda s: 1.0),
    )
}
