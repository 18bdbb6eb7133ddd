"""The HTTP API: routes that parse requests, call the domain, and shape responses.

Domain errors become status codes here and nowhere else.
"""

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import AfterValidator

from functions import original, tasks
from functions.asgi import BasePath, HeadWithoutBody
from functions.bodies import (
    BatchIn,
    IdempotencyKey,
    IdsOut,
    PageOut,
    RescheduleIn,
    TaskId,
    TaskIn,
    TaskOut,
)
from functions.db import Database
from functions.docs import add_docs
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
from functions.settings import Settings
from functions.store import Store
from functions.tasks import NewTask, TaskState

logger = logging.getLogger(__name__)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def build_app(settings: Settings) -> FastAPI:
    """Build the API for `settings`; the database is first reached by the first request."""
    database = Database(settings)

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
        # Ours instead (functions/docs.py): FastAPI's load their scripts from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    add_docs(app)
    app.add_middleware(HeadWithoutBody)
    if settings.base_path:
        app.add_middleware(BasePath, base_path=settings.base_path)

    store = Store(database)

    async def get_store() -> Store:
        return store

    expected_token = None if settings.api_token is None else settings.api_token.encode()

    async def check_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if expected_token is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        # The scheme is case-insensitive (RFC 9110). Compare bytes: compare_digest refuses a
        # str with non-ASCII characters, and headers arrive as latin-1, so this gets the bytes
        # the client sent back.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("latin-1"), expected_token
        ):
            raise Unauthorized("missing or wrong `Authorization: Bearer <token>` header")

    async def require_json(request: Request) -> None:
        # A body sent without a content-type is read as JSON (clients and test consoles omit
        # it; nothing else could be meant); one that says it is something else gets a 415
        # that says what to send, rather than a 422 about a string that is not an object.
        content_type = request.headers.get("content-type", "").strip()
        media = content_type.partition(";")[0].strip().lower()
        if media and media != "application/json" and not media.endswith("+json"):
            raise NotJson(
                f"the body must be JSON, sent as `content-type: application/json`, not {media}"
            )

    StoreDep = Annotated[Store, Depends(get_store)]
    Authorized = [Depends(check_token)]
    # Every route that takes a body: the token first, then the content-type.
    TakesJson = [Depends(check_token), Depends(require_json)]

    @app.exception_handler(TaskrunnerError)
    async def on_domain_error(request: Request, exc: TaskrunnerError) -> JSONResponse:
        if isinstance(exc, TaskNotFound):
            return _error(404, str(exc))
        if isinstance(exc, TaskRunning | WrongState | IdempotencyKeyReused):
            return _error(409, str(exc))
        if isinstance(exc, InvalidInput):
            return _error(400, str(exc))
        if isinstance(exc, Forbidden):
            return _error(403, str(exc))
        if isinstance(exc, Unauthorized):
            return _error(401, str(exc), {"WWW-Authenticate": "Bearer"})
        if isinstance(exc, NotJson):
            return _error(415, str(exc))
        if isinstance(exc, DatabaseUnavailable):
            logger.warning("action=request path=%s: %s", request.url.path, exc)
            return _error(503, "database unavailable, try again shortly", {"Retry-After": "1"})
        if isinstance(exc, SchemaOutdated):
            logger.error("action=request path=%s: %s", request.url.path, exc)
            return _error(503, str(exc), {"Retry-After": "30"})
        logger.exception("action=request path=%s: unexpected error", request.url.path)
        return _error(500, "internal error")

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this, so the server logs the traceback once.
        return _error(500, "internal error")

    @app.get("/healthz")
    async def healthz(store: StoreDep) -> dict[str, str]:
        """200 when the database answers, 503 when it does not."""
        await store.ping()
        return {"status": "ok"}

    # HEAD answers as GET does, without the body (HeadWithoutBody); kept out of the schema,
    # where it would repeat GET's operation.
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.post("/tasks", status_code=201, response_model=TaskOut, dependencies=TakesJson)
    async def create_task(
        body: TaskIn,
        request: Request,
        response: Response,
        store: StoreDep,
        idempotency_key: Annotated[IdempotencyKey | None, Header(alias="Idempotency-Key")] = None,
    ) -> TaskOut:
        """Schedule a task to run once, at or after `execute_at`.

        With an `Idempotency-Key`, a repeat of this request gets the same task back (200).
        """
        new = NewTask(kind=body.type, execute_at=body.execute_at, idempotency_key=idempotency_key)
        task, created = await tasks.create_task(store, new, settings.max_attempts)
        if created:
            # root_path: the base path the API is served under (BasePath), so the URL works.
            path = app.url_path_for("get_task", task_id=str(task.id))
            response.headers["Location"] = request.scope.get("root_path", "") + path
        else:
            response.status_code = 200
        return TaskOut.of(task)

    @app.post("/tasks/batch", status_code=201, response_model=IdsOut, dependencies=TakesJson)
    async def create_tasks(body: BatchIn, store: StoreDep) -> IdsOut:
        """Schedule up to 10,000 tasks: all are written or none (the error names the item)."""
        new = [item.to_new() for item in body.tasks]
        return IdsOut(ids=await tasks.create_tasks(store, new, settings.max_attempts))

    @app.get("/tasks", response_model=PageOut, dependencies=Authorized)
    async def list_tasks(
        store: StoreDep,
        state: Annotated[
            TaskState | None, Query(description="scheduled, running, succeeded or failed")
        ] = None,
        type: Annotated[
            str | None, AfterValidator(lambda v: v and tasks.parse_kind(v)), Query()
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> PageOut:
        """List tasks by ascending id, optionally filtered by state and type."""
        page = await tasks.list_tasks(store, state=state, kind=type, limit=limit, cursor=cursor)
        return PageOut(items=[TaskOut.of(t) for t in page.items], next_cursor=page.next_cursor)

    @app.get("/tasks/{task_id}", response_model=TaskOut, dependencies=Authorized)
    async def get_task(task_id: TaskId, store: StoreDep) -> TaskOut:
        """Show one task."""
        return TaskOut.of(await tasks.get_task(store, task_id))

    @app.post("/tasks/{task_id}/run", response_model=TaskOut, dependencies=Authorized)
    async def run_task(task_id: TaskId, store: StoreDep) -> TaskOut:
        """Make a scheduled task due now; 409 once it is running or finished."""
        return TaskOut.of(await tasks.run_task(store, task_id))

    @app.post("/tasks/{task_id}/retry", response_model=TaskOut, dependencies=Authorized)
    async def retry_task(task_id: TaskId, store: StoreDep) -> TaskOut:
        """Schedule a failed task again, due now, with a fresh budget of attempts.

        `attempts` counts on and the last `error` stays until the next attempt ends.
        409 unless the task failed.
        """
        return TaskOut.of(await tasks.retry_task(store, task_id, settings.max_attempts))

    @app.patch("/tasks/{task_id}", response_model=TaskOut, dependencies=TakesJson)
    async def reschedule_task(task_id: TaskId, body: RescheduleIn, store: StoreDep) -> TaskOut:
        """Move a scheduled task to a new `execute_at`; 409 once it is running or finished."""
        return TaskOut.of(await tasks.reschedule_task(store, task_id, body.execute_at))

    @app.delete(
        "/tasks/{task_id}", status_code=204, response_class=Response, dependencies=Authorized
    )
    async def delete_task(task_id: TaskId, store: StoreDep) -> Response:
        """Delete a task; a running one cannot be deleted (409)."""
        await tasks.delete_task(store, task_id)
        return Response(status_code=204)

    # Last: its `POST /{type}/{unix_seconds}` must not shadow a route above.
    app.include_router(original.build_router(settings, store, Authorized))
    return app
