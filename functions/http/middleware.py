"""ASGI middleware between the server (Mangum or uvicorn) and the app: base path, the token,
HEAD, the limits on request bodies, the fast path; and their order (`layers`).

Plain ASGI, without Starlette's request and response classes: the Lambda handler wraps the
app in these on a cold start, before FastAPI is imported (`fastpath.Lazy`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from functions.errors import Unauthorized
from functions.http import rules
from functions.http.fastpath import HotPath
from functions.http.responses import send_detail, status_of
from functions.settings import Settings
from functions.store import Store


class BasePath:
    """Serve the app under `base_path` (`/prod`), whether or not the request's path carries it.

    API Gateway passes `/prod/tasks` behind a custom domain's base-path mapping, and `/tasks`
    for a REST API stage on its own domain; a reverse proxy may strip the prefix or not. In every
    case the app sees `root_path` = `/prod` and a path that starts with it, as ASGI specifies, so
    routes match and the URLs it makes (`Location`, redirects, `/docs`) carry the prefix.
    Mangum's `api_gateway_base_path` only strips the prefix: the app would not know it.
    """

    def __init__(self, app: ASGIApp, base_path: str) -> None:
        self.app = app
        self.base_path = base_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            if not (path == self.base_path or path.startswith(self.base_path + "/")):
                path = self.base_path + path
            scope = {**scope, "root_path": self.base_path, "path": path}
        await self.app(scope, receive, send)


class Authorize:
    """Answer 401 to a request that needs the token and does not carry it, reading nothing of
    its body; pass every other request to `app`.

    Outside every layer but BasePath (`layers`): the 401 comes before the body is counted,
    read or parsed, on every path (the fast path, the FastAPI app, the Lambda handler).
    Every route but the public ones (`rules.is_public`) needs the token, so a request without
    it learns nothing, not even whether its path or method names a route (401, not 404 or 405).
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and not rules.bearer_ok(scope["headers"], self.token)
            and not rules.is_public(scope["method"], rules.route_path(scope))
        ):
            await send_detail(send, *status_of(Unauthorized(rules.NO_TOKEN), scope["path"]))
            return
        await self.app(scope, receive, send)


class HeadWithoutBody:
    """Answer HEAD with the headers GET would have and no body.

    uvicorn drops the body of a HEAD response itself; Mangum would hand it to API Gateway.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, send_headers_only)


# A request body must keep arriving: within BODY_GRACE_S of the request's start, plus one
# second for every BODY_MIN_RATE bytes received so far. Any client on a working link sends
# far faster (a full 10,000-task batch, 3.4 MB, needs 63 s even at this rate); one that
# trickles a byte at a time holds a connection and a request for BODY_GRACE_S, not forever.
BODY_GRACE_S = 10.0
BODY_MIN_RATE = 64 * 1024


class BodyRefused(Exception):
    """A body refused by BodyLimit: `_refuse` makes it."""

    status_code: int
    detail: str
    headers: Mapping[str, str] | None


@functools.cache
def _refusal_type() -> Callable[..., BodyRefused]:
    """Raised from `receive` while the app reads the body; also Starlette's HTTPException, so
    FastAPI's own body reading lets it through to the app's error handler. Made by the first
    refusal: a Lambda cold start does without importing Starlette's exceptions (~15 ms)."""
    from starlette.exceptions import HTTPException

    class BodyRefusedHTTP(BodyRefused, HTTPException):
        pass

    return BodyRefusedHTTP


def _refuse(status_code: int, detail: str) -> BodyRefused:
    # The rest of the body is never read: the connection cannot be reused.
    return _refusal_type()(status_code, detail, headers={"Connection": "close"})


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413 without reading it whole, and a body
    that arrives too slowly with 408.

    A Content-Length over the limit is refused before the app runs; a body without one
    (chunked) as soon as the bytes received pass the limit. Pure ASGI around `receive`, so
    nothing buffers the body before it is counted.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        grace_s: float = BODY_GRACE_S,
        min_rate: float = BODY_MIN_RATE,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.grace_s = grace_s
        self.min_rate = min_rate

    def too_large(self) -> BodyRefused:
        return _refuse(413, f"the request body is over the limit of {self.max_bytes} bytes")

    def too_slow(self) -> BodyRefused:
        return _refuse(
            408,
            "the request body did not arrive in time: send it at"
            f" {self.min_rate / 1024:.0f} KiB/s or faster",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"content-length"), None
        )
        if declared is not None:
            refused = None
            if not declared.strip().isascii() or not declared.strip().isdigit():
                refused = _refuse(400, "the Content-Length header is not a number")
            elif int(declared) > self.max_bytes:
                refused = self.too_large()
            if refused is not None:
                await _send_refusal(refused, send)
                return

        loop = asyncio.get_running_loop()
        started = loop.time()
        received = 0
        complete = False

        async def limited() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            left_s = started + self.grace_s + received / self.min_rate - loop.time()
            try:
                async with asyncio.timeout(left_s):
                    message = await receive()
            except TimeoutError:
                raise self.too_slow() from None
            if message["type"] != "http.request":
                complete = True
                return message
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self.too_large()
            complete = not message.get("more_body", False)
            return message

        response_started = False

        async def tracked(message: Message) -> None:
            nonlocal response_started
            response_started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except BodyRefused as refused:
            # Read by something other than FastAPI's routes (which answer it themselves).
            if response_started:
                raise
            await _send_refusal(refused, send)


async def _send_refusal(refused: BodyRefused, send: Send) -> None:
    await send_detail(send, refused.status_code, refused.detail, dict(refused.headers or {}))


def layers(settings: Settings, store: Store) -> list[tuple[Any, dict[str, Any]]]:
    """The middleware between the server and the FastAPI app, innermost first, with their
    arguments: `app.build_app` adds them to the app, the Lambda handler wraps them around it."""
    found: list[tuple[Any, dict[str, Any]]] = [
        (HotPath, {"settings": settings, "store": store}),
        # Outside all that reads a body: no body is read before it is counted.
        (BodyLimit, {"max_bytes": settings.max_body_bytes}),
        (HeadWithoutBody, {}),
    ]
    if settings.api_token is not None:
        # Outside the body's limits: without the token, 401 before a 413 or a 408, and not a
        # byte of the body read.
        found.append((Authorize, {"token": settings.api_token}))
    if settings.base_path:
        found.append((BasePath, {"base_path": settings.base_path}))
    return found


def wrap(app: ASGIApp, settings: Settings, store: Store) -> ASGIApp:
    """`app` inside `layers`."""
    for middleware, kwargs in layers(settings, store):
        app = middleware(app, **kwargs)
    return app
