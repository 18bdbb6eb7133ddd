"""The task kinds: the built-in `foo`, `bar` and `baz`, and those of the user's own modules.

A kind is a function of a `Context`, declared with `@kind("name", timeout_s=..., concurrency=...)`
in any importable module; every process loads the modules named by `TASKRUNNER_KINDS` and those
of the entry point group `taskrunner.kinds` (`load`) before it serves or runs anything, and
`KINDS` holds what it loaded, beside the built-ins.

A kind returns the line it prints (the runner prints it to stdout and stores it as the task's
`output`) or None (nothing printed, `output` null). Raising fails the attempt (and retries it
while attempts remain); raising `Fail` fails the task for good at once. A kind that waits
(sleeps, network calls) is a coroutine function and each run is an asyncio task; a kind that
returns at once is a plain function, run inline by the worker without a task of its own.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import math
import random
import re
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from functions.errors import TaskrunnerError
from functions.settings import Settings

if TYPE_CHECKING:
    # Imported by the first `bar` to run: the API, and a tick with no `bar` to run, never
    # need httpx, which costs a cold start ~40 ms to import.
    import httpx

# The entry point group a package declares its kind modules in (`name = "module"`).
ENTRY_POINT_GROUP = "taskrunner.kinds"
# A kind's name: stored in every task, typed in URLs (`POST /{type}/{ts}`), a Prometheus label.
NAME_PATTERN = "^[a-z][a-z0-9_]{0,62}$"
_NAME = re.compile(NAME_PATTERN)
# The API's own first path segments: a kind named so would shadow them in `POST /{type}/{ts}`.
RESERVED_NAMES = frozenset(
    "tasks id taskstate schedules stats metrics healthz docs redoc static workers errors".split()
)
# A run of a coroutine kind that declares no `timeout_s` is stopped after this long. A plain
# function runs inline and cannot be stopped: without a `timeout_s` it is taken to need a
# second (as `baz`), which is what a tick near its deadline reckons with.
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_INSTANT_S = 1.0


class Fail(Exception):
    """Raised by a kind: the task fails for good now, whatever attempts it has left."""


class Retry(Exception):
    """Raised by a kind: this attempt failed, and the next (if attempts remain) is due in
    `after_s` seconds rather than after the usual backoff; capped at TASKRUNNER_RETRY_MAX_S
    (the `http` kind raises it for a `Retry-After`)."""

    def __init__(self, after_s: float, message: str = "") -> None:
        super().__init__(message or f"retry in {after_s:g} s")
        self.after_s = after_s


class KindError(TaskrunnerError):
    """A kind module that cannot be loaded: it names the module and the reason."""


@dataclass(frozen=True)
class Context:
    """What a kind may use while it runs."""

    task_id: int
    attempt: int
    settings: Settings
    # Lends one of the runner's HTTP clients for a request: `async with ctx.http() as client`.
    # `ctx.http(guarded=True)` lends one that connects only to the addresses the `http` kind
    # may (functions/egress.py: no loopback, private, link-local... unless allowed).
    http: Lend
    # The task's payload as stored: its JSON (jsonb's text), None when it has none. Read
    # into `payload` on first use only: a kind that never looks at its payload does not pay
    # for reading it (28 us for 1 KiB here, a third of what a worker spent on a baz task).
    payload_json: str | None = None

    @cached_property
    def payload(self) -> Any:
        """The task's payload, as the request that created it (or a PATCH) sent it: any JSON
        value as `json.loads` reads it; None when it has none."""
        return None if self.payload_json is None else json.loads(self.payload_json)


class Lend(Protocol):
    def __call__(self, *, guarded: bool = False) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        """Lend an HTTP client for a request (`guarded`: one that connects only where
        TASKRUNNER_HTTP_ALLOWED_HOSTS and functions/egress.py allow)."""
        ...


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
        # Free clients, plain ([False]) and guarded ([True]).
        self._free: dict[bool, list[httpx.AsyncClient]] = {False: [], True: []}
        self._made: list[httpx.AsyncClient] = []

    def _new(self, guarded: bool) -> httpx.AsyncClient:
        import httpx

        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        if guarded:
            from functions import egress

            client = httpx.AsyncClient(
                transport=egress.guarded_transport(self._tls, limits, self.settings),
                # No proxy from the environment: the address checked must be the one
                # connected to. Redirects and time limits are the caller's.
                trust_env=False,
                timeout=None,
                follow_redirects=False,
            )
        else:
            client = httpx.AsyncClient(
                verify=self._tls,
                timeout=httpx.Timeout(self.settings.bar_timeout_s),
                limits=limits,
                follow_redirects=True,
            )
        self._made.append(client)
        return client

    @asynccontextmanager
    async def lend(
        self, *, guarded: bool = False, timeout_s: float | None = None
    ) -> AsyncIterator[httpx.AsyncClient]:
        """Lend a client; a plain one's time limit is `timeout_s` (a user's kind's run
        lends with its own time limit), else TASKRUNNER_BAR_TIMEOUT_S (`bar`'s)."""
        free = self._free[guarded]
        client = free.pop() if free else self._new(guarded)
        if not guarded:
            import httpx

            client.timeout = httpx.Timeout(
                self.settings.bar_timeout_s if timeout_s is None else timeout_s
            )
        try:
            yield client
        finally:
            free.append(client)

    async def aclose(self) -> None:
        for client in self._made:
            await client.aclose()
        self._made.clear()
        for free in self._free.values():
            free.clear()


def _unlimited(settings: Settings) -> int | None:
    return None


Run = Callable[[Context], Awaitable[str | None]] | Callable[[Context], str | None]


@dataclass(frozen=True)
class Kind:
    name: str
    run: Run
    # The longest one run can take: a tick near its platform deadline claims only kinds that
    # fit, and a run that takes longer is stopped and fails its attempt.
    max_seconds: Callable[[Settings], float]
    # How many runs of this kind one worker has going at once (None: no limit). The rest wait
    # for a slot, claimed and leased, and their time limit starts when they do.
    concurrency: Callable[[Settings], int | None] = _unlimited
    # When a run is stopped: None for the built-ins, which are given twice their longest and
    # ten seconds more (`runner.time_limit_s`); a declared kind's `timeout_s`, exactly.
    limit_s: Callable[[Settings], float] | None = None
    # The module that declared it (for messages: which module a clash comes from).
    module: str = __name__
    # Checks a payload when a task of this kind is created or given a new payload (every
    # path: `tasks.check_payload`): raises ValueError saying what is wrong (a 422), or
    # returns. Given None for a task without one.
    check: Callable[[Any], None] | None = None
    # The payload as the API shows it (`responses.task_fields`): e.g. secrets masked. The
    # stored payload, which the kind receives, is left as it was.
    show: Callable[[Any], Any] | None = None
    # The JSON Schema of the payloads `check` takes, stated by the API's OpenAPI document for
    # a task of this kind (None: any payload).
    payload_schema: dict[str, Any] | None = None
    # The modules being imported when it was declared (a factory's or a decorator's kind
    # belongs to the module whose import called them): `load` takes it for any of them.
    importers: tuple[str, ...] = ()
    # A plain function, not a coroutine function: it must return without waiting.
    instant: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "instant", not waits(self.run))


def waits(run: object) -> bool:
    """A coroutine function: `async def`, a partial of one, or an object whose `__call__`
    is one."""
    return inspect.iscoroutinefunction(run) or inspect.iscoroutinefunction(
        inspect.getattr_static(run, "__call__", None)
    )


def _importers() -> tuple[str, ...]:
    """The modules whose import is running now (innermost first): the frames of their
    bodies on the stack, of modules importlib marks as initializing (not a script's)."""
    found = []
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            name = frame.f_globals.get("__name__")
            spec = frame.f_globals.get("__spec__")
            if isinstance(name, str) and getattr(spec, "_initializing", False):
                found.append(name)
        frame = frame.f_back  # type: ignore[assignment]
    return tuple(found)


# Every kind `@kind` declared, in the order declared; `load` takes those of its modules.
_DECLARED: list[Kind] = []
F = TypeVar("F", bound=Run)


def _per_settings(
    value: float | int | Callable[[Settings], float | int | None] | None,
) -> Callable[[Settings], float | int | None]:
    return value if callable(value) else lambda settings: value


def _number(value: object, *, above: float = 0, whole: bool = False) -> bool:
    """A finite number above `above` (and a whole one, with `whole`); no bool."""
    if isinstance(value, bool) or not isinstance(value, int if whole else int | float):
        return False
    return math.isfinite(value) and value > above


def kind(
    name: str,
    *,
    timeout_s: float | Callable[[Settings], float] | None = None,
    concurrency: int | Callable[[Settings], int | None] | None = None,
    check: Callable[[Any], None] | None = None,
    show: Callable[[Any], Any] | None = None,
    payload_schema: dict[str, Any] | None = None,
) -> Callable[[F], F]:
    """Declare the decorated function as the kind `name`; the function is returned unchanged.

    `timeout_s`: a run still going after this long is stopped and fails its attempt (default
    DEFAULT_TIMEOUT_S; a plain function runs inline and cannot be stopped: it must return at
    once, and is reckoned to need DEFAULT_INSTANT_S). `concurrency`: how many runs one worker
    has going at once (None: no limit). Either may be a function of the `Settings`.
    `check(payload)`: raises ValueError, saying what is wrong, for a payload this kind cannot
    run with; every create (and a PATCH of the payload) answers it with a 422, nothing written.
    `show(payload)`: the payload as the API's answers show it (secrets masked).
    `payload_schema`: the JSON Schema of what `check` takes, for the OpenAPI document. The
    name is checked when the module is loaded (`load`).
    """
    if not (timeout_s is None or callable(timeout_s) or _number(timeout_s, above=0)):
        raise ValueError(f"kind {name!r}: timeout_s must be a number of seconds above 0")
    if not (concurrency is None or callable(concurrency) or _number(concurrency, whole=True)):
        raise ValueError(f"kind {name!r}: concurrency must be a whole number from 1, or None")

    def declare(run: F) -> F:
        default = DEFAULT_TIMEOUT_S if waits(run) else DEFAULT_INSTANT_S
        limit = _per_settings(default if timeout_s is None else timeout_s)
        importers = _importers()
        _DECLARED.append(
            Kind(
                name,
                run,
                max_seconds=limit,  # type: ignore[arg-type]
                concurrency=_per_settings(concurrency),  # type: ignore[arg-type]
                limit_s=limit,  # type: ignore[arg-type]
                # The module whose import declared it (a factory's or a decorator's kind is
                # its caller's), else the function's.
                module=(importers or (getattr(run, "__module__", None) or "?",))[0],
                check=check,
                show=show,
                payload_schema=payload_schema,
                importers=importers,
            )
        )
        return run

    return declare


async def foo(ctx: Context) -> str:
    await asyncio.sleep(ctx.settings.foo_delay_s)
    return f"Foo {ctx.task_id}"


_SMALL_BODY_BYTES = 64 * 1024


class RequestFailed(Exception):
    """`bar`'s request got no answer: its error says which URL, after how long, and why."""


async def bar(ctx: Context) -> str:
    url = ctx.settings.bar_url
    timeout_s = ctx.settings.bar_timeout_s
    started = time.monotonic()
    try:
        # httpx's timeout bounds each phase (connect, read...); this bounds the whole request.
        async with asyncio.timeout(timeout_s):
            # Streamed: only the status line and headers are read, however large the body (an
            # 800 MB body once took a worker to 1.9 GB). A small body is read to its end, which
            # is what lets the connection (and its TLS session) serve the next request.
            async with ctx.http() as client, client.stream("GET", url) as response:
                length = response.headers.get("content-length", "")
                if length.isdigit() and int(length) <= _SMALL_BODY_BYTES:
                    await response.aread()
                # Any response, 5xx included, is a success: the task reports its status code.
                return str(response.status_code)
    except TimeoutError:
        # (asyncio.timeout's own carries no message: this says what the wait was for.)
        raise TimeoutError(
            f"GET {url}: no answer within {timeout_s:g} s (TASKRUNNER_BAR_TIMEOUT_S)"
        ) from None
    except Exception as exc:
        waited_s = time.monotonic() - started
        why = f"{type(exc).__name__}: {exc}".rstrip(": ")
        raise RequestFailed(f"GET {url}: {why} (after {waited_s:.3f} s)") from exc


# baz's lines, `Baz 0` to `Baz 343`, made once: one is picked per run by a single call of
# `random.random()` (random.randint's three Python frames a run were 7% of a draining
# worker's event loop, py-spy). Each equally likely, as with randint.
_BAZ_LINES = tuple(f"Baz {n}" for n in range(344))


_random = random.random


def baz(ctx: Context) -> str:
    return _BAZ_LINES[int(_random() * 344)]


BUILT_IN: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("foo", foo, lambda s: s.foo_delay_s + 1.0),
        Kind("bar", bar, lambda s: s.bar_timeout_s + 1.0, lambda s: s.bar_concurrency),
        Kind("baz", baz, lambda s: 1.0),
    )
}
# Modules of the package that declare built-in kinds with `@kind`, as a user's module would:
# `load` always loads them (functions/http_target.py: the `http` kind).
BUILT_IN_MODULES = ("functions.http_target",)
# The kinds this process runs and its API takes: the built-ins, and those `load` loaded (the
# built-in modules' included). One dict, changed in place by `load`, so that every reader
# sees what was loaded.
KINDS: dict[str, Kind] = dict(BUILT_IN)
# What `load` was last given (False: not called yet), and the entry points' modules it found.
_loaded: str | bool | None = False
_entry_modules: list[tuple[str, str]] | None = None


def _entry_point_modules() -> list[tuple[str, str]]:
    """(module, where it was named) of each entry point of ENTRY_POINT_GROUP, read once.

    The scan reads every installed distribution's entry_points.txt: 2.0 ms with the Lambda
    bundle's 19 distributions, 4-8 ms with a development venv's 178 (measured): paid by each
    process at start, a cold start included.
    """
    global _entry_modules
    if _entry_modules is None:
        from importlib.metadata import entry_points

        found = []
        for point in entry_points(group=ENTRY_POINT_GROUP):
            dist = point.dist.name if point.dist is not None else "?"
            found.append((point.module, f"entry point {point.name!r} of {dist}"))
        _entry_modules = found
    return _entry_modules


def module_names(setting: str | None) -> list[str]:
    """The modules named in TASKRUNNER_KINDS (comma-separated), in order, each once."""
    names = [name.strip() for name in (setting or "").split(",")]
    return list(dict.fromkeys(name for name in names if name))


def load(setting: str | None) -> dict[str, Kind]:
    """Import BUILT_IN_MODULES, the modules of TASKRUNNER_KINDS (`setting`) and of the entry
    points, and make `KINDS` the built-ins and every kind they declare; return it.

    Raises KindError, naming the module and why, for a module that cannot be imported, a
    name that is not NAME_PATTERN or is one of the API's paths, or two kinds of one name (a
    built-in's included); `KINDS` is then left as it was. Loading again with the same
    setting does nothing (the handlers and the CLI may both ask).
    """
    global _loaded
    if _loaded is not False and _loaded == setting:
        return KINDS
    sources = [(name, "built in") for name in BUILT_IN_MODULES]
    sources += [(name, "TASKRUNNER_KINDS") for name in module_names(setting)]
    sources += [source for source in _entry_point_modules() if source[0] not in dict(sources)]
    found: dict[str, Kind] = dict(BUILT_IN)
    for module, named_by in sources:
        try:
            importlib.import_module(module)
        # Whatever the module raised, a sys.exit() included (a supervisor would take the
        # exit 0 it gave for a clean stop): it cannot be used. (Not KeyboardInterrupt: ^C.)
        except (Exception, SystemExit) as exc:
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            raise KindError(
                f"kind module {module} ({named_by}) cannot be imported: {reason}"
            ) from exc
        for declared in _declared_in(module):
            if found.get(declared.name) is declared:
                continue  # a submodule of two modules named
            _check(declared, module, found)
            found[declared.name] = declared
    KINDS.clear()
    KINDS.update(found)
    _loaded = setting
    return KINDS


def _declared_in(module: str) -> list[Kind]:
    """The kinds declared by `module` and its submodules, or while either was imported
    (by a factory or decorator of another module that it called)."""

    def within(name: str) -> bool:
        return name == module or name.startswith(f"{module}.")

    return [k for k in _DECLARED if within(k.module) or any(map(within, k.importers))]


def _check(declared: Kind, module: str, found: dict[str, Kind]) -> None:
    name = declared.name
    where = f"kind module {module}"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KindError(
            f"{where}: the kind name {name!r} is not a lowercase name of 1 to 63 letters,"
            f" digits and underscores starting with a letter ({NAME_PATTERN})"
        )
    if name in RESERVED_NAMES:
        raise KindError(
            f"{where}: the kind name {name!r} is a path of the API (reserved:"
            f" {', '.join(sorted(RESERVED_NAMES))})"
        )
    if name in BUILT_IN or (name in found and found[name].module in BUILT_IN_MODULES):
        raise KindError(f"{where}: the kind name {name!r} is a built-in kind's")
    if name in found:
        first, second = found[name].module, declared.module
        twice = f"in {first}" if first == second else f"({first} and {second})"
        raise KindError(f"{where}: the kind {name!r} is declared twice {twice}")


def check_base_path(base_path: str) -> None:
    """Raise KindError if a kind loaded is named as TASKRUNNER_BASE_PATH's first segment
    (`/prod`: `POST /prod/{ts}` would be read as the base path and `/{ts}`, a 404)."""
    first = base_path.strip("/").split("/")[0]
    if first in KINDS:
        raise KindError(
            f"kind module {KINDS[first].module}: the kind name {first!r} is the first"
            f" segment of TASKRUNNER_BASE_PATH ({base_path}): POST /{first}/... would be"
            " taken for the base path; rename the kind or the base path"
        )


def names() -> Sequence[str]:
    """The names of the kinds loaded, sorted."""
    return sorted(KINDS)
