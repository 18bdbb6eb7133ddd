"""Lambda entry point for the HTTP API: API Gateway (HTTP API or REST API) -> Mangum -> FastAPI."""

from __future__ import annotations

from typing import Any

from mangum import Mangum

from functions.app import build_app
from functions.settings import Settings

_adapter: Mangum | None = None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Serve one API Gateway event; the app is built on the first call and kept while warm."""
    global _adapter
    if _adapter is None:
        # lifespan="off": Mangum would otherwise run startup and shutdown around every
        # event; the app builds its engine on first use and keeps it for the warm container.
        _adapter = Mangum(build_app(Settings()), lifespan="off")
    return _adapter(event, context)
