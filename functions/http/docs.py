"""The API's documentation pages, /docs (Swagger UI) and /redoc, served without the internet.

FastAPI's own pages load their scripts from a CDN, so they are blank on an offline machine or in
a VPC with no route out. These load the same files (swagger-ui-dist 5, redoc 2) from the
fastapi-offline package under /docs/assets/, and every URL they hold carries the base path.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

from functions.http import static

ASSETS = "/docs/assets"
FAVICON = "/static/favicon.svg"


def add_docs(app: FastAPI) -> None:
    """Add /docs and /redoc to `app`, their assets under /docs/assets, and /static."""
    static.mount(app, ASSETS, static.package_dir("fastapi_offline", "static"), "docs-assets")
    static.mount(app, "/static", static.HERE, "static")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=root + FAVICON,
            # Its default would show a badge fetched from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=root + FAVICON,
            with_google_fonts=False,
        )
