"""The dashboard: `GET /` serves one HTML page that reads the JSON API from the browser.

The page (functions/http/static/dashboard/) holds no data, so it is served without the token: its
script asks for the token when the API answers 401 and sends it as a bearer header. Every
URL in it carries the base path, injected here from the request's `root_path`. The page is
sent as `page` makes it, on the fast path (`reads.dashboard`) and by the route `add_dashboard`
adds alike: FastAPI is imported only by the latter.
"""

import hashlib
import html
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from functions.kinds import KINDS

if TYPE_CHECKING:
    from fastapi import FastAPI

# (Not `static.HERE`: importing that package imports Starlette's static files, and FastAPI.)
DIRECTORY = Path(__file__).with_name("static") / "dashboard"
ASSETS = ("dashboard.css", "dashboard.js")

# What the page may load and where its script may connect: this site only. No inline script
# or style, so a task's output or error shown on the page can never run as code.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page changes with each release; its assets are named by their content below.
    "Cache-Control": "no-cache",
}


@cache
def _template() -> str:
    """index.html with each asset's URL made unique to its content, so a browser that cached
    an older release's script cannot pair it with this page. Read once per process."""
    page = (DIRECTORY / "index.html").read_text(encoding="utf-8")
    for name in ASSETS:
        digest = hashlib.sha256((DIRECTORY / name).read_bytes()).hexdigest()[:12]
        page = page.replace(f"/static/dashboard/{name}", f"/static/dashboard/{name}?v={digest}")
    return page


def render(root_path: str) -> str:
    """The page for an API served under `root_path` (`""` or `/prod`), offering the task
    types this version runs."""
    page = _template().replace("{{kinds}}", " ".join(sorted(KINDS)))
    return page.replace("{{base}}", html.escape(root_path, quote=True))


def page(root_path: str) -> tuple[bytes, str, dict[str, str]]:
    """The page (`render`) as sent, its content type and headers: `reads.dashboard` on the
    fast path, the route `add_dashboard` adds."""
    return render(root_path).encode(), "text/html; charset=utf-8", dict(HEADERS)


def add_dashboard(app: "FastAPI") -> None:
    """Serve the dashboard at `/`: GET in the OpenAPI document, as `text/html`, so that the
    document lists every method `/` answers (HEAD, as for every GET route, by the app's
    route class)."""
    from fastapi import Request, Response
    from fastapi.responses import HTMLResponse

    from functions.http.schemas import errors

    # (No `from __future__ import annotations` in this module: FastAPI reads these annotations
    # at run time, and their names are local.)
    async def dashboard(request: Request) -> Response:
        """The dashboard: an HTML page that reads this API from the browser (no token
        needed for the page; its script asks for one when the API answers 401)."""
        body, content_type, headers = page(request.scope.get("root_path", ""))
        return Response(body, 200, headers, media_type=content_type)

    app.add_api_route(
        "/",
        dashboard,
        methods=["GET"],
        response_class=HTMLResponse,
        summary="Dashboard",
        # 503 while `taskrunner api` or `dev` has not reached the database yet (local/serve.py).
        responses={200: {"description": "The dashboard's page."}, **errors(503)},
    )
