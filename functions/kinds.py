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
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from functions.settings import Settings

if TYPE_CHECKING:
    # Imported by the first `bar` to run: the API, and a tick with no `bar` to run, never
    # need httpx, which costs a cold start ~40 ms to import.
    import httpx


@dataclass(frozen=True)
class Context:
    """What a kind may use while it runs."""

    task_id: int
    attempt: int
    settings: Settings
    # Lends one of the runner's HTTP clients for a request: `async with ctx.http() as client`.
    http: Callable[[], AbstractAsyncContextManager[httpx.AsyncClient]]
    # The task's payload, as the request that created it (or a PATCH) sent it: any JSON
    # value as `json.loads` reads it; None when it has none.
    payload: Any = None


class HttpClients:
    """HTTP clients of one connection each, lent to one request at a time.

    One client with a pool of N connections costs O(N) on every request: httpcore checks
    each pooled connection (a system call each) whenever it assigns one. 3,000 requests to a
    local server, 100 at a time: one client of 100 connections, 261/s and 3.8 ms of CPU a
    request; 100 clients of one connection, 1,212/s and 0.7 ms. They share one TLS context,
    made on first use (it took 90 ms of every tick, most of which make no request).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tls: ssl.SSLContext | None = None
        self._free: list[httpx.AsyncClient] = []
        self._made: list[httpx.AsyncClient] = []

    def _new(self) -> httpx.AsyncClient:
        import httpx

        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        client = httpx.AsyncClient(
            verify=self._tls,
            timeout=httpx.Timeout(self.settings.bar_timeout_s),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            follow_redirects=True,
        )
        self._made.append(client)
        return client

    @asynccontextmanager
    async def lend(self) -> AsyncIterator[httpx.AsyncClient]:
        client = self._free.pop() if self._free else self._new()
        try:
            yield client
        finally:
            self._free.append(client)

    async def aclose(self) -> None:
        for client in self._made:
            await client.aclose()
        self._made.clear()
        self._free.clear()


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


_SMALL_BODY_BYTES = 64 * 1024


async def bar(ctx: Context) -> str:
    # httpx's timeout bounds each phase (connect, read...); this bounds the whole request.
    async with asyncio.timeout(ctx.settings.bar_timeout_s):
        # Streamed: only the status line and headers are read, however large the body (an
        # 800 MB body once took a worker to 1.9 GB). A small body is read to its end, which
        # is what lets the connection (and its TLS session) serve the next request.
        async with ctx.http() as client, client.stream("GET", ctx.settings.bar_url) as response:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) <= _SMALL_BODY_BYTES:
                await response.aread()
            # Any response, 5xx included, is a success: the task is to report the status code.
            return str(response.status_code)


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
