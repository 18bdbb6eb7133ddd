"""The HTTP API: routes that parse requests, call the domain, and shape responses.

Domain errors become status codes in `responses.status_of`, for these routes and the hot path
(`fastpath`), which serves the busiest requests before they reach FastAPI.
"""

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Response, Security
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from functions import tasks
from functions.db import Database
from functions.errors import TaskrunnerError, Unauthorized
from functions.http import auth, challenge, monitoring
from functions.http.dashboard import add_dashboard
from functions.http.docs import add_docs
from functions.http.middleware import layers
from functions.http.responses import status_of, task_fields
from functions.http.routes import Route, TaskId, answer
from functions.http.schemas import (
    KIND_SCHEMA,
    BatchIn,
    Cursor,
    IdempotencyKey,
    IdsOut,
    KindName,
    PageOut,
    RescheduleIn,
    TaskIn,
    TaskOut,
    errors,
    links,
)
from functions.settings import Settings
from functions.store import Store
from functions.tasks import NewTask, TaskState


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


# A 422 lists at most this many issues: a batch of 10,000 bad items says so in a few lines.
MAX_ISSUES = 20


def _cut(text: str, limit: int) -> str:
    """`text` at most `limit` characters long, and safe to encode (a lone surrogate from a
    JSON escape would fail the response)."""
    if len(text) > limit:
        text = f"{text[: limit - 5]}...{text[-2:]}"
    return text.encode("utf-8", "backslashreplace").decode()


def _issues(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's validation errors as `loc`, `msg` and `type` only: never the `input` (which
    can be the whole body) nor its `ctx`, and every string cut short."""
    issues = []
    for error in errors[:MAX_ISSUES]:
        msg = str(error.get("msg", ""))
        if error.get("type") == "json_invalid" and "error" in (error.get("ctx") or {}):
            msg = f"{msg}: {error['ctx']['error']}"
        issues.append(
            {
                "loc": [x if isinstance(x, int) else _cut(str(x), 40) for x in error["loc"]],
                "msg": _cut(msg, 300),
                "type": _cut(str(error.get("type", "")), 40),
            }
        )
    if len(errors) > MAX_ISSUES:
        issues.append(
            {
                "loc": [_cut(str(errors[0]["loc"][0]), 40)],
                "msg": f"and {len(errors) - MAX_ISSUES} more issues",
                "type": "too_many_issues",
            }
        )
    return issues


def _unreadable(cause: BaseException) -> str:
    """Why FastAPI could not read a JSON body (it answers 400 with a generic message)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not JSON: byte {cause.start} is not UTF-8"
    if isinstance(cause, RecursionError):
        return "the body is not JSON this API reads: it nests too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return "the body is not JSON this API reads: a whole number has over 4,300 digits"
    if isinstance(cause, ValueError):
        return f"the body is not JSON this API reads: {_cut(str(cause), 100)}"
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
    add_docs(app)
    # GET /: the dashboard's page (functions/http/dashboard.py); HEAD by `Route`.
    add_dashboard(app)
    if middleware:
        # Each added goes outside those added before it.
        for layer, kwargs in layers(settings, store):
            app.add_middleware(layer, **kwargs)

    Authorized: list[Any] = []
    auth_errors: tuple[int, ...] = ()
    if settings.api_token is not None:
        expected_token = settings.api_token.encode()
        # Declares the scheme in the OpenAPI document; the check is `auth.authorized`, which
        # `auth.Authorize` made already before the body was read (`middleware.layers`). Made again
        # here for an app served without those layers (`middleware=False`).
        bearer = HTTPBearer(auto_error=False, description="TASKRUNNER_API_TOKEN")

        async def check_token(
            request: Request,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        ) -> None:
            if not auth.authorized(request.scope["headers"], expected_token):
                raise Unauthorized(auth.MISSING)

        Authorized = [Depends(check_token)]
        auth_errors = (401,)

    def fails(*codes: int) -> dict[int | str, dict[str, Any]]:
        """What a route declares it can answer besides success: `codes`, the token's 401,
        413 (any request may send too large a body), and 503 (the database)."""
        return errors(*sorted({*codes, *auth_errors, 413, 503}))

    # Every route that takes a body. Its content-type, and how much it holds, are checked
    # by `Route` before the body is parsed (`routes.require_json`, `tasks.count_values`);
    # the token before anything, by `auth.Authorize`.
    TakesJson = Authorized
    # What every route that takes a body can answer besides its own errors.
    BODY_ERRORS = (400, 408, 415, 422)

    @app.exception_handler(TaskrunnerError)
    async def on_domain_error(request: Request, exc: TaskrunnerError) -> JSONResponse:
        return _error(*status_of(exc, request.url.path))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _issues(exc.errors())}, status_code=422)

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

    @app.get("/healthz", responses=errors(503))
    async def healthz() -> dict[str, str]:
        """200 when the database answers with a schema this version can use; 503 when it
        does not answer, or its schema is missing or behind (`taskrunner migrate`)."""
        revision = await tasks.check_schema(store)
        return {"status": "ok", "schema": revision}

    # HEAD answers as GET does, without the body (HeadWithoutBody); kept out of the schema,
    # where it would repeat GET's operation.
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.post(
        "/tasks",
        status_code=201,
        response_model=TaskOut,
        dependencies=TakesJson,
        responses={
            200: {
                "model": TaskOut,
                "description": "A repeat of the request that created this task (same"
                " Idempotency-Key, type and execute_at): nothing was created.",
            },
            201: {"description": "Created.", "links": links("id")},
            **fails(*BODY_ERRORS, 409),
        },
    )
    async def create_task(
        body: TaskIn,
        request: Request,
        idempotency_key: Annotated[IdempotencyKey | None, Header(alias="Idempotency-Key")] = None,
    ) -> Response:
        """Schedule a task to run once, at or after `execute_at`.

        With an `Idempotency-Key`, a repeat of this request gets the same task back (200).
        """
        new = NewTask(kind=body.type, execute_at=body.execute_at, idempotency_key=idempotency_key)
        task, created = await tasks.create_task(store, new, settings.max_attempts)
        if not created:
            return answer(task_fields(task))
        # root_path: the base path the API is served under (BasePath), so the URL works.
        location = f"{request.scope.get('root_path', '')}/tasks/{task.id}"
        return answer(task_fields(task), 201, {"Location": location})

    @app.post(
        "/tasks/batch",
        status_code=201,
        response_model=IdsOut,
        dependencies=TakesJson,
        responses={**fails(*BODY_ERRORS, 409), 201: {"links": links("ids/0")}},
    )
    async def create_tasks(body: BatchIn) -> Response:
        """Schedule up to 10,000 tasks: all are written or none (the error names the item)."""
        new = [item.to_new() for item in body.tasks]
        return answer({"ids": await tasks.create_tasks(store, new, settings.max_attempts)}, 201)

    @app.get("/tasks", response_model=PageOut, dependencies=Authorized, responses=fails(400, 422))
    async def list_tasks(
        state: Annotated[
            TaskState | None, Query(description="scheduled, running, succeeded or failed")
        ] = None,
        type: Annotated[KindName | None, Query(description=KIND_SCHEMA["description"])] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[
            Cursor | None, Query(description="`next_cursor` of the previous page")
        ] = None,
    ) -> Response:
        """List tasks by ascending id, optionally filtered by state and type."""
        page = await tasks.list_tasks(store, state=state, kind=type, limit=limit, cursor=cursor)
        items = [task_fields(t) for t in page.items]
        return answer({"items": items, "next_cursor": page.next_cursor})

    @app.get(
        "/tasks/{task_id}",
        response_model=TaskOut,
        dependencies=Authorized,
        responses=fails(404, 422),
    )
    async def get_task(task_id: TaskId) -> Response:
        """Show one task."""
        return answer(task_fields(await tasks.get_task(store, task_id)))

    @app.post(
        "/tasks/{task_id}/run",
        response_model=TaskOut,
        dependencies=Authorized,
        responses=fails(404, 409, 422),
    )
    async def run_task(task_id: TaskId) -> Response:
        """Make a scheduled task due now; 409 once it is running or finished."""
        return answer(task_fields(await tasks.run_task(store, task_id)))

    @app.post(
        "/tasks/{task_id}/retry",
        response_model=TaskOut,
        dependencies=Authorized,
        responses=fails(404, 409, 422),
    )
    async def retry_task(task_id: TaskId) -> Response:
        """Schedule a failed task again, due now, with a fresh budget of attempts.

        `attempts` counts on and the last `error` stays until the next attempt ends.
        409 unless the task failed.
        """
        return answer(task_fields(await tasks.retry_task(store, task_id, settings.max_attempts)))

    @app.patch(
        "/tasks/{task_id}",
        response_model=TaskOut,
        dependencies=TakesJson,
        responses=fails(*BODY_ERRORS, 404, 409),
    )
    async def reschedule_task(task_id: TaskId, body: RescheduleIn) -> Response:
        """Move a scheduled task to a new `execute_at`; 409 once it is running or finished."""
        return answer(task_fields(await tasks.reschedule_task(store, task_id, body.execute_at)))

    @app.delete(
        "/tasks/{task_id}",
        status_code=204,
        response_class=Response,
        dependencies=Authorized,
        responses=fails(404, 409, 422),
    )
    async def delete_task(task_id: TaskId) -> Response:
        """Delete a task; a running one cannot be deleted (409)."""
        await tasks.delete_task(store, task_id)
        return Response(status_code=204)

    app.include_router(monitoring.build_router(store, Authorized, fails))
    # Last: its `POST /{type}/{unix_seconds}` must not shadow a route above.
    app.include_router(challenge.build_router(settings, store, Authorized, fails))
    return app
