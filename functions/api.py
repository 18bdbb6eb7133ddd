"""Lambda entry point for the HTTP API: API Gateway (HTTP API or REST API) -> Mangum -> the
middleware of `middleware.layers` -> FastAPI, built (and imported) by the first request the hot
path does not serve."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from mangum import Mangum

from functions.db import Database
from functions.http.fastpath import Lazy
from functions.http.middleware import wrap
from functions.http.responses import detail_json
from functions.logs import handler_kinds, handler_settings
from functions.settings import Settings
from functions.store import Store

_adapter: Mangum | None = None
_loop: asyncio.AbstractEventLoop | None = None
# The pool of the container's life (closed by nothing: a container is frozen, then gone).
_database: Database | None = None
# Every process loads the same kinds at start: here, the container's init.
handler_kinds("api")


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Serve one API Gateway event; the app is built on the first call and kept while warm."""
    global _adapter, _loop, _database
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    # Mangum runs each event on the thread's current loop; pin ours, so the pooled
    # connections made on it in an earlier (warm) invocation are used on it again.
    asyncio.set_event_loop(_loop)
    if _adapter is None:
        # lifespan="off": Mangum would run startup and shutdown around every event; the
        # app builds its engine on first use and keeps it for the life of the container.
        settings = handler_settings("api")
        _database = Database(settings)
        _adapter = Mangum(_build(settings, Store(_database)), lifespan="off")
    # Mangum fails on `"headers": null` (a v2 event without headers, or a hand-made test
    # event): read it as no headers.
    if event.get("headers") is None:
        event = {**event, "headers": {}}
    if (unreadable := _unreadable_base64(event)) is not None:
        return unreadable
    return _adapter(event, context)


def _unreadable_base64(event: dict[str, Any]) -> dict[str, Any] | None:
    """A 400 for a body marked base64 that is not (Mangum's decoding would raise, and the
    invocation fail); None for any other event. API Gateway never sends one; a hand-made
    event or another proxy may."""
    if not (event.get("isBase64Encoded") and event.get("body")):
        return None
    try:
        base64.b64decode(event["body"])  # as Mangum decodes it
    except (binascii.Error, ValueError) as exc:
        detail = f"the body is marked base64 (isBase64Encoded) and is not: {exc}"
        return {
            "statusCode": 400,
            "headers": {"content-type": "application/json"},
            "body": detail_json(detail).decode(),
            "isBase64Encoded": False,
        }
    return None


def _build(settings: Settings, store: Store) -> Any:
    def fastapi_app() -> Any:
        # Here, not at the top: most requests never need FastAPI (functions/http/fastpath.py).
        from functions.http.app import build_app

        return build_app(settings, store=store, middleware=False)

    return wrap(Lazy(fastapi_app), settings, store)
