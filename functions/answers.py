"""What the API answers for a domain error, and JSON answers sent as plain ASGI messages.

Shared by the FastAPI app (`app`) and the routes served without it (`hotpath`, `asgi`), so
an error reads the same whichever served the request. No FastAPI or Starlette here: the
Lambda handler imports this on a cold start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from functions.errors import (
    DatabaseUnavailable,
    Forbidden,
    IdempotencyKeyReused,
    InvalidInput,
    NotJson,
    SchemaOutdated,
    TaskNotFound,
    TaskrunnerError,
    TaskRunning,
    Unauthorized,
    WrongState,
)

logger = logging.getLogger("functions.app")

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def status_of(exc: TaskrunnerError, path: str) -> tuple[int, str, dict[str, str]]:
    """The status, `detail` and headers the API answers `exc` with (raised serving `path`)."""
    if isinstance(exc, TaskNotFound):
        return 404, str(exc), {}
    if isinstance(exc, TaskRunning | WrongState | IdempotencyKeyReused):
        return 409, str(exc), {}
    if isinstance(exc, InvalidInput):
        return 400, str(exc), {}
    if isinstance(exc, Forbidden):
        return 403, str(exc), {}
    if isinstance(exc, Unauthorized):
        return 401, str(exc), {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, NotJson):
        return 415, str(exc), {}
    if isinstance(exc, DatabaseUnavailable):
        logger.warning("action=request path=%s: %s", path, exc)
        return 503, "database unavailable, try again shortly", {"Retry-After": "1"}
    if isinstance(exc, SchemaOutdated):
        logger.error("action=request path=%s: %s", path, exc)
        return 503, str(exc), {"Retry-After": "30"}
    logger.error("action=request path=%s: unexpected error", path, exc_info=exc)
    return 500, "internal error", {}


def json_answer(
    status: int, body: bytes, headers: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two ASGI messages answering `body` (JSON) with `status`: the headers a Starlette
    JSON response has, in its order (given ones, then content-length and content-type).
    Made before anything is sent, so a header that cannot be encoded fails here."""
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in
           (headers or {}).items()]  # fmt: skip
    raw.append((b"content-length", str(len(body)).encode()))
    raw.append((b"content-type", b"application/json"))
    start = {"type": "http.response.start", "status": status, "headers": raw}
    return start, {"type": "http.response.body", "body": body}


async def send_json(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    """Answer `body` (JSON) with `status` (see `json_answer`)."""
    for message in json_answer(status, body, headers):
        await send(message)


async def send_detail(
    send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    """Answer `{"detail": detail}` with `status`, encoded as Starlette's JSONResponse does."""
    body = json.dumps({"detail": detail}, ensure_ascii=False, separators=(",", ":"))
    await send_json(send, status, body.encode(), headers)
