"""Lambda entry point for the HTTP API: API Gateway (HTTP API or REST API) -> Mangum -> FastAPI."""

from __future__ import annotations

import asyncio
from typing import Any

from mangum import Mangum

from functions.app import build_app
from functions.logs import handler_settings

_adapter: Mangum | None = None
_loop: asyncio.AbstractEventLoop | None = None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Serve one API Gateway event; the app is built on the first call and kept while warm."""
    global _adapter, _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    # Mangum runs each event on the thread's current loop; pin ours, so the pooled
    # connections made on it in an earlier (warm) invocation are used on it again.
    asyncio.set_event_loop(_loop)
    if _adapter is None:
        # lifespan="off": Mangum would run startup and shutdown around every event; the
        # app builds its engine on first use and keeps it for the life of the container.
        _adapter = Mangum(build_app(handler_settings("api")), lifespan="off")
    # Mangum fails on `"headers": null` (a v2 event without headers, or a hand-made test
    # event): read it as no headers.
    if event.get("headers") is None:
        event = {**event, "headers": {}}
    return _adapter(event, context)
