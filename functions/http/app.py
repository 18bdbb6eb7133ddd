"""The FastAPI app: its routes (`routes`, `challenge`, `monitoring`, `docs`, `dashboard`),
the token's dependency, and the handlers that answer errors.

Domain errors become status codes in `responses.status_of`, for these routes and the fast
path (`fastpath`), which serves the busiest requests before they reach FastAPI.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response, Security
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from functions.db import Database
from functions.errors import TaskrunnerError, Unauthorized
from functions.http import challenge, monitoring, routes, rules
from functions.http.dashboard import add_dashboard
from functions.http.docs import add_docs
from functions.http.middleware import layers
from functions.http.responses import Detail, cut, issues_detail, status_of
from functions.http.routes import Route
from functions.http.schemas import errors, with_timeout_limits
from functions.settings import Settings
from functions.store import Store


def _error(status: int, detail: Detail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _unreadable(cause: BaseException) -> str:
    """Why FastAPI could not read a JSON body (it answers 400 with a generic message)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not JSON: byte {cause.start} is not UTF-8"
    if isinstance(cause, RecursionError):
        return "the body is not JSON this API reads: it nests too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return "the body is not JSON this API reads: a whole number has over 4,300 digits"
    if isinstance(cause, ValueError):
        return f"the body is not JSON this API reads: {cut(str(cause), 100)}"
    return "the body cannot be read as JSON"


def build_app(
    settings: Settings, *, store: Store | None = None, middleware: bool = True
) -> FastAPI:
    """Build the API for `settings`; the database is first reached by the first request.

    `middleware=False`: without `middleware.layers`, which the caller puts around it (the Lambda
    handler, with `store`: the one the hot path uses).
    """
    if store is None:
        store = Store(Database(settings))
    database = store.database

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await database.dispose()

    app = FastAPI(
        title="taskrunner",
        summary="Schedule foo, bar and baz tasks to run once, at or after their time.",
        lifespan=lifespan,
        # A body without a content-type is read as JSON (see `require_json`).
        strict_content_type=False,
        # Ours instead (functions/http/docs.py): FastAPI's load their scripts from a CDN.
        docs_url=None,
        redoc_url=None,
        # operationId: the route's function name (`get_task`), which the links refer to.
        generate_unique_id_function=lambda route: route.name,
    )
    app.router.route_class = Route
    make_document = app.openapi

    def document() -> dict[str, Any]:
        """FastAPI's document, with what it cannot say of a task's body (made once)."""
        if app.openapi_schema is None:
            app.openapi_schema = with_timeout_limits(make_document(), settings)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
    # What `Route` counts a body's values against (`model.max_values`).
    app.state.max_body_bytes = settings.max_body_bytes
    add_docs(app)
    # GET /: the dashboard's page (functions/http/dashboard.py); HEAD by `Route`.
    add_dashboard(app)
    if middleware:
        # Each added goes outside those added before it.
        for layer, kwargs in layers(settings, store):
            app.add_middleware(layer, **kwargs)

    # What every route but the public ones depends on: the token's check, where there is one.
    token_check: list[Any] = []
    auth_errors: tuple[int, ...] = ()
    if settings.api_token is not None:
        expected_token = settings.api_token.encode()
        # Declares the scheme in the OpenAPI document; the check is `rules.bearer_ok`, which
        # `middleware.Authorize` made already before the body was read (`middleware.layers`).
        # Made again here for an app served without those layers (`middleware=False`).
        bearer = HTTPBearer(auto_error=False, description="TASKRUNNER_API_TOKEN")

        async def check_token(
            request: Request,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        ) -> None:
            if not rules.bearer_ok(request.scope["headers"], expected_token):
                raise Unauthorized(rules.NO_TOKEN)

        token_check = [Depends(check_token)]
        auth_errors = (401,)

    def fails(*codes: int) -> dict[int | str, dict[str, Any]]:
        """What a route declares it can answer besides success: `codes`, the token's 401,
        413 (any request may send too large a body), and 503 (the database)."""
        return errors(*sorted({*codes, *auth_errors, 413, 503}))

    @app.exception_handler(TaskrunnerError)
    async def on_domain_error(request: Request, exc: TaskrunnerError) -> JSONResponse:
        return _error(*status_of(exc, request.url.path))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": issues_detail(exc.errors())}, status_code=422)

    def allowed(scope: Scope) -> str:
        """Every method some route answers at this path. Starlette's 405 names only the
        methods of the first route that matched the path (GET of /tasks/{task_id}, not its
        PATCH and DELETE, which are routes of their own)."""
        return ", ".join(
            method
            for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
            if any(
                route.matches({**scope, "method": method})[0] is Match.FULL
                for route in app.router.routes
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.__cause__ is not None:
            return _error(400, _unreadable(exc.__cause__))
        if exc.status_code == 405:
            # A mounted app's own (static files) where no route of ours answers the path.
            given = (exc.headers or {}).get("Allow", "")
            exc.headers = {**(exc.headers or {}), "Allow": allowed(request.scope) or given}
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this, so the server logs the traceback once.
        return _error(500, "internal error")

    routes.add_routes(app, settings, store, token_check, fails)
    app.include_router(monitoring.build_router(store, token_check, fails))
    # Last: its `POST /{type}/{unix_seconds}` must not shadow a route above.
    app.include_router(challenge.build_router(settings, store, token_check, fails))
    return app
