"""Lambda entry point for the HTTP API: API Gateway (HTTP API or REST API) -> Mangum -> the
middleware of `middleware.layers` -> FastAPI, built (and imported) by the first request the hot
path does not serve."""

from __future__ import annotations

import asyncio
from typing import Any

from mangum import Mangum

from functions.db import Database
from functions.http.fastpath import Lazy
from functions.http.middleware import wrap
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
    return _adapter(event, context)


def _build(settings: Settings, store: Store) -> Any:
    def fastapi_app() -> Any:
        # Here, not at the top: most requests never need FastAPI (functions/http/fastpath.py).
        from functions.http.app import build_app

        return build_app(settings, store=store, middleware=False)

    return wrap(Lazy(fastapi_app), settings, store)
