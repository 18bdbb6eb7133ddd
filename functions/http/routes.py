"""taskrunner's own routes (`add_routes`: the health check and the tasks), and FastAPI's
side of every route: how it matches its path, reads its body, its task id parameter, and its
JSON answer. (The bodies: `schemas`; the rules both paths read a request by: `rules`.)"""

import inspect
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic_core import to_json
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from functions import parsing, schedules, tasks
from functions.http import reads, rules
from functions.http.responses import page_json, task_json
from functions.http.rules import body_issue, require_json
from functions.http.schemas import (
    AttemptPageOut,
    BatchIn,
    CountOut,
    CreatedAfter,
    CreatedBefore,
    Cursor,
    ErrorSearch,
    ErrorsOut,
    ErrorsSince,
    ErrorsUntil,
    ExecuteAfter,
    ExecuteBefore,
    FinishedAfter,
    FinishedBefore,
    IdempotencyKey,
    IdsOut,
    KindFilter,
    PageOut,
    PayloadFilter,
    RescheduleIn,
    ScheduleCursor,
    ScheduleIn,
    ScheduleName,
    ScheduleOut,
    SchedulePageOut,
    SchedulePatchIn,
    SchedulePutIn,
    Sort,
    TaskIn,
    TaskOut,
    attempt_fields,
    error_group_fields,
    errors,
    links,
    schedule_fields,
)
from functions.model import (
    BIGINT_MAX,
    DEFAULT_ATTEMPTS_PAGE,
    DEFAULT_BULK,
    MAX_ATTEMPTS_PAGE,
    MAX_BULK,
    BulkAction,
    Schedule,
    Task,
    TaskFilter,
    TaskState,
)
from functions.settings import Settings
from functions.store import Store

TaskId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]
_DIGITS = re.compile("[0-9]+")


class Route(APIRoute):
    """A route whose task id (`{task_id}`, or the original's `{id}`) matches digits only:
    `/tasks/batch` is never task "batch" (a PATCH there is a 405, not a 422 about an id),
    and `/tasks/abc` names no route (404). FastAPI then checks the number's range (422).

    A GET route answers HEAD too, as HTTP asks of every resource that answers GET (the
    body is dropped by middleware.HeadWithoutBody); the OpenAPI document lists GET alone."""

    def _as_get(self, scope: Scope) -> Scope:
        if scope.get("method") == "HEAD" and self.methods and "GET" in self.methods:
            return {**scope, "method": "GET"}
        return scope

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().handle(self._as_get(scope), receive, send)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, behind the checks of a body before it is parsed: its
        content-type (415), and how many values it holds and how small its numbers are
        (`rules.body_issue`: a 422 before json.loads builds them all)."""
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def read_body_first(request: Request) -> Response:
            require_json(request.headers.get("content-type", ""))
            issue = body_issue(await request.body(), request.app.state.max_body_bytes)
            if issue is not None:
                raise RequestValidationError([issue])
            # (FastAPI's handler reads the body this request has kept.)
            return await handler(request)

        return read_body_first

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(self._as_get(scope))
        if match is not Match.NONE:
            params = child.get("path_params", {})
            for name in ("task_id", "id"):
                if name in params and not _DIGITS.fullmatch(str(params[name])):
                    return Match.NONE, {}
        return match, child


# `async`, though it waits for nothing: FastAPI runs a plain `def` dependency in a thread,
# and that hop was 10% of the API process's CPU in a GET /tasks?limit=100 (py-spy).
async def task_filter(
    request: Request,
    state: Annotated[
        list[TaskState] | None,
        Query(
            description="scheduled, running, succeeded, failed or cancelled; repeated: any of"
            " them (`state=failed&state=cancelled`)"
        ),
    ] = None,
    type: Annotated[
        list[KindFilter] | None,
        Query(
            description="A kind's name, in any case: a loaded kind or a removed one's;"
            " repeated: any of them."
        ),
    ] = None,
    created_after: Annotated[
        CreatedAfter | None,
        Query(description="Tasks created after this time (RFC 3339, or Unix seconds)."),
    ] = None,
    created_before: Annotated[
        CreatedBefore | None, Query(description="Tasks created before this time.")
    ] = None,
    execute_after: Annotated[
        ExecuteAfter | None, Query(description="Tasks whose `execute_at` is after this time.")
    ] = None,
    execute_before: Annotated[
        ExecuteBefore | None, Query(description="Tasks whose `execute_at` is before this time.")
    ] = None,
    finished_after: Annotated[
        FinishedAfter | None, Query(description="Tasks that finished after this time.")
    ] = None,
    finished_before: Annotated[
        FinishedBefore | None, Query(description="Tasks that finished before this time.")
    ] = None,
    error: Annotated[ErrorSearch | None, Query()] = None,
    schedule: Annotated[
        ScheduleName | None, Query(description="Tasks made by this schedule.")
    ] = None,
    payload: Annotated[PayloadFilter | None, Query()] = None,
) -> TaskFilter:
    """The filters of `GET /tasks`, read the same way by the bulk cancel, retry and delete: a
    task matches when it meets every one given (a repeated one: any of its values). One that
    takes a single value, given twice, is a 422."""
    for name in rules.SINGLE_VALUED:
        if len(request.query_params.getlist(name)) > 1:
            msg = f"{name} is given more than once: it takes one value"
            issue = {"loc": ("query", name), "msg": msg, "type": "value_error"}
            raise RequestValidationError([issue])
    return rules.task_filter(
        state,
        type,
        created_after=created_after,
        created_before=created_before,
        execute_after=execute_after,
        execute_before=execute_before,
        finished_after=finished_after,
        finished_before=finished_before,
        error=error,
        schedule=schedule,
        payload=payload,
    )


Filters = Annotated[TaskFilter, Depends(task_filter)]

# What the routes that filter tasks read from their query: the filters, and `GET /tasks`'s
# page and order, or a bulk route's `limit` and `dry_run` (rules.LIST_QUERY says the first too,
# for the fast path).
_FILTERS = frozenset(inspect.signature(task_filter).parameters) - {"request"}
_LIST_QUERY = _FILTERS | {"limit", "cursor", "sort"}
_BULK_QUERY = _FILTERS | {"limit", "dry_run"}
assert _LIST_QUERY == rules.LIST_QUERY, "the fast path reads what the route reads"


def only_query(names: frozenset[str]) -> Callable[[Request], Awaitable[None]]:
    """A dependency: the route refuses a query parameter it does not read. `types=foo` (for
    `type`) would otherwise list every task, or act on every one, as if no filter was given."""

    async def refuse_others(request: Request) -> None:
        for name in request.query_params:
            if name not in names:
                msg = (
                    f"{parsing.excerpt(name)} is not a parameter of this route; it takes"
                    f" {', '.join(sorted(names))}"
                )
                issue = {"loc": ("query", name), "msg": msg, "type": "extra_forbidden"}
                raise RequestValidationError([issue])

    return refuse_others


BulkLimit = Annotated[
    int, Query(ge=1, le=MAX_BULK, description="the most tasks acted on, lowest ids first")
]


DryRun = Annotated[
    bool,
    Query(
        description="true: change nothing, and answer how many tasks this would act on now"
        " (at most `limit`) and whether more match (`more`): the count a confirmation shows."
    ),
]


def answer(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response, serialized once by pydantic-core (datetimes as pydantic writes them).

    A route returning a Response skips FastAPI's response_model step, which validates the
    returned model again and encodes it a second time: a fifth of a request's CPU, measured.
    The route's response_model still documents the body.
    """
    return Response(to_json(content), status_code, headers, media_type="application/json")


def task_answer(
    task: Task, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A task's JSON response: the bytes the fast path sends (`responses.task_json`)."""
    return Response(task_json(task), status_code, headers, media_type="application/json")


def read_response(read: reads.Read, status_code: int = 200) -> Response:
    """The response of a read made in `reads`: the bytes and headers the fast path sends."""
    body, content_type, headers = read
    return Response(body, status_code, headers, media_type=content_type)


# What every route that takes a body can answer besides its own errors. Its content-type, and
# how much it holds, are checked by `Route` before the body is parsed (`rules.require_json`,
# `parsing.count_values`); the token before anything, by `middleware.Authorize`.
BODY_ERRORS = (400, 408, 415, 422)


def add_routes(
    app: FastAPI,
    settings: Settings,
    store: Store,
    token_check: Sequence[Any],
    fails: Callable[..., dict[int | str, dict[str, Any]]],
) -> None:
    """Add taskrunner's own routes over `store` to `app`: the health check and the tasks.
    Every route but the health check depends on `token_check`; `fails(*codes)` is what a
    route declares it can answer besides success.

    Added to the app itself, as `Route`s (`app.router.route_class`), not as a router of
    their own: an included router is one entry of `app.routes` that hides its routes."""
    token_check = list(token_check)

    @app.get("/healthz", response_model=dict[str, str], responses=errors(503))
    async def healthz() -> Response:
        """200 when the database answers with a schema this version can use; 503 when it
        does not answer, or its schema is missing or behind (`taskrunner migrate`)."""
        return read_response(await reads.healthz(store, ""))

    # HEAD answers as GET does, without the body (HeadWithoutBody); kept out of the schema,
    # where it would repeat GET's operation.
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.post(
        "/tasks",
        status_code=201,
        response_model=TaskOut,
        dependencies=token_check,
        responses={
            200: {
                "model": TaskOut,
                "description": "A repeat of the request that created this task (same"
                " Idempotency-Key, type, execute_at, payload and options): nothing was"
                " created.",
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
        if len(request.headers.getlist("idempotency-key")) > 1:
            # (The fast path leaves such a request to this route.)
            msg = "Idempotency-Key is given more than once: send one key"
            issue = {"loc": ("header", "Idempotency-Key"), "msg": msg, "type": "value_error"}
            raise RequestValidationError([issue])
        new = body.to_new(idempotency_key)
        task, created = await tasks.create_task(store, new, settings)
        if not created:
            return task_answer(task)
        # root_path: the base path the API is served under (BasePath), so the URL works.
        location = f"{request.scope.get('root_path', '')}/tasks/{task.id}"
        return task_answer(task, 201, {"Location": location})

    @app.post(
        "/tasks/batch",
        status_code=201,
        response_model=IdsOut,
        dependencies=token_check,
        responses={**fails(*BODY_ERRORS, 409), 201: {"links": links("ids/0")}},
    )
    async def create_tasks(body: BatchIn) -> Response:
        """Schedule up to 10,000 tasks: all are written or none (the error names the item)."""
        ids = await tasks.create_tasks(store, body.to_new(), settings)
        return answer({"ids": ids}, 201)

    @app.get(
        "/tasks",
        response_model=PageOut,
        dependencies=[*token_check, Depends(only_query(_LIST_QUERY))],
        responses=fails(400, 422),
    )
    async def list_tasks(
        matching: Filters,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[
            Cursor | None, Query(description="`next_cursor` of the previous page")
        ] = None,
        sort: Annotated[Sort | None, Query()] = None,
    ) -> Response:
        """List tasks, newest first unless `sort` says otherwise, filtered as asked.

        A page ends with `next_cursor`, which goes on in the same order and filters (send
        the filters again with it), or null when nothing is left: tasks created meanwhile
        take their place in the order without shifting the pages. A filter the order's
        index does not serve (a time range but the order's own, `error`, `payload`, a state
        or kind among others) is checked on at most 5,000 tasks a page, in order: a page may
        then hold fewer than `limit` tasks, even none, and still have a `next_cursor`.

        An answer holds at most 5 MB (Lambda's limit is 6 MB): a page of large payloads has
        fewer than `limit` items, and its `next_cursor` goes on from the last one."""
        order = None if sort is None else parsing.parse_sort(sort)
        page = await tasks.list_tasks(store, matching, limit=limit, cursor=cursor, order=order)
        return Response(page_json(page), media_type="application/json")

    async def dry_run_answer(action: BulkAction, matching: TaskFilter, limit: int) -> Response:
        count, more = await tasks.count_bulk(store, action, matching, limit)
        return answer({"count": count, "more": more})

    # Before `/tasks/{task_id}`'s routes (which match digits only, so would not take these).
    @app.post(
        "/tasks/cancel",
        response_model=CountOut,
        dependencies=[*token_check, Depends(only_query(_BULK_QUERY))],
        responses=fails(422),
    )
    async def cancel_tasks(
        matching: Filters, limit: BulkLimit = DEFAULT_BULK, dry_run: DryRun = False
    ) -> Response:
        """Cancel the scheduled and running tasks that match the filters of `GET /tasks`,
        at most `limit`, lowest ids first; answer how many. A task outside the filters is
        never touched; a repeat acts only on tasks that still match."""
        if dry_run:
            return await dry_run_answer(BulkAction.CANCEL, matching, limit)
        return answer({"count": await tasks.cancel_tasks(store, matching, limit)})

    @app.post(
        "/tasks/retry",
        response_model=CountOut,
        dependencies=[*token_check, Depends(only_query(_BULK_QUERY))],
        responses=fails(422),
    )
    async def retry_tasks(
        matching: Filters, limit: BulkLimit = DEFAULT_BULK, dry_run: DryRun = False
    ) -> Response:
        """Retry, as `POST /tasks/{task_id}/retry` does, the failed and cancelled tasks that
        match the filters of `GET /tasks`, at most `limit`, lowest ids first; answer how
        many."""
        if dry_run:
            return await dry_run_answer(BulkAction.RETRY, matching, limit)
        count = await tasks.retry_tasks(store, matching, limit, settings.max_attempts)
        return answer({"count": count})

    @app.post(
        "/tasks/delete",
        response_model=CountOut,
        dependencies=[*token_check, Depends(only_query(_BULK_QUERY))],
        responses=fails(422),
    )
    async def delete_tasks(
        matching: Filters, limit: BulkLimit = DEFAULT_BULK, dry_run: DryRun = False
    ) -> Response:
        """Delete, as `DELETE /tasks/{task_id}` does, the tasks that match the filters of
        `GET /tasks` and are not running (a running task is never deleted), at most
        `limit`, lowest ids first; answer how many."""
        if dry_run:
            return await dry_run_answer(BulkAction.DELETE, matching, limit)
        return answer({"count": await tasks.delete_tasks(store, matching, limit)})

    @app.get(
        "/tasks/{task_id}",
        response_model=TaskOut,
        dependencies=token_check,
        responses=fails(404, 422),
    )
    async def get_task(task_id: TaskId) -> Response:
        """Show one task."""
        return task_answer(await tasks.get_task(store, task_id))

    @app.get(
        "/tasks/{task_id}/attempts",
        response_model=AttemptPageOut,
        dependencies=token_check,
        responses=fails(404, 422),
    )
    async def list_attempts(
        task_id: TaskId,
        limit: Annotated[int, Query(ge=1, le=MAX_ATTEMPTS_PAGE)] = DEFAULT_ATTEMPTS_PAGE,
        cursor: Annotated[
            str | None,
            Query(pattern="^[0-9]{1,9}$", description="`next_cursor` of the previous page"),
        ] = None,
    ) -> Response:
        """A task's attempts, oldest first: when each started and ended, its worker, how it
        ended (`outcome`: succeeded, failed, retried, timed_out, cancelled, lost; null while
        it runs), its error and traceback. A task not started yet has none."""
        page = await tasks.list_attempts(store, task_id, limit=limit, cursor=cursor)
        return answer(
            {"items": [attempt_fields(a) for a in page.items], "next_cursor": page.next_cursor}
        )

    @app.post(
        "/tasks/{task_id}/run",
        response_model=TaskOut,
        dependencies=token_check,
        responses=fails(404, 409, 422),
    )
    async def run_task(task_id: TaskId) -> Response:
        """Make a scheduled task due now; 409 once it is running or finished."""
        return task_answer(await tasks.run_task(store, task_id))

    @app.post(
        "/tasks/{task_id}/retry",
        response_model=TaskOut,
        dependencies=token_check,
        responses=fails(404, 409, 422),
    )
    async def retry_task(task_id: TaskId) -> Response:
        """Schedule a failed or cancelled task again, due now, with a fresh budget of
        attempts.

        `attempts` counts on and the last `error` stays until the next attempt ends.
        409 unless the task failed or was cancelled.
        """
        return task_answer(await tasks.retry_task(store, task_id, settings.max_attempts))

    @app.post(
        "/tasks/{task_id}/cancel",
        response_model=TaskOut,
        dependencies=token_check,
        responses=fails(404, 409, 422),
    )
    async def cancel_task(task_id: TaskId) -> Response:
        """Cancel a scheduled or running task at once: nothing more runs for it, and no
        result is written over it; the worker running it stops it within a second (within
        `TASKRUNNER_POLL_INTERVAL_S` behind a transaction pooler) and prints nothing more
        for it. A task cancelled before: 200, as it is. 409 once it succeeded or failed."""
        return task_answer(await tasks.cancel_task(store, task_id))

    @app.patch(
        "/tasks/{task_id}",
        response_model=TaskOut,
        dependencies=token_check,
        responses=fails(*BODY_ERRORS, 404, 409),
    )
    async def reschedule_task(task_id: TaskId, body: RescheduleIn) -> Response:
        """Move a scheduled task to a new `execute_at`, give it a new `payload` (null clears
        it), or both; what is absent stays. 409 once it is running or finished."""
        task = await tasks.reschedule_task(
            store,
            task_id,
            body.execute_at,
            set_payload="payload" in body.model_fields_set,
            payload=body.payload,
            max_payload_bytes=settings.max_payload_bytes,
        )
        return task_answer(task)

    @app.delete(
        "/tasks/{task_id}",
        status_code=204,
        response_class=Response,
        dependencies=token_check,
        responses=fails(404, 409, 422),
    )
    async def delete_task(task_id: TaskId) -> Response:
        """Delete a task; a running one cannot be deleted (409)."""
        await tasks.delete_task(store, task_id)
        return Response(status_code=204)

    @app.get("/errors", response_model=ErrorsOut, dependencies=token_check, responses=fails(422))
    async def list_errors(
        since: Annotated[
            ErrorsSince | None,
            Query(
                description="Attempts that ended at or after this time (RFC 3339, or Unix"
                " seconds); by default 24 hours ago."
            ),
        ] = None,
        until: Annotated[
            ErrorsUntil | None, Query(description="Attempts that ended before this time.")
        ] = None,
        type: Annotated[KindFilter | None, Query(description="One kind's attempts.")] = None,
    ) -> Response:
        """The attempts that ended in an error (failed, retried, timed_out, lost) in the
        window, grouped by type and error with its numbers and ids folded, the most frequent
        first, at most 200 groups."""
        start, groups = await tasks.list_errors(store, since=since, until=until, kind=type)
        return answer({"since": start, "items": [error_group_fields(g) for g in groups]})

    add_schedule_routes(app, settings, store, token_check, fails)


def schedule_answer(schedule: Schedule, status_code: int = 200) -> Response:
    return answer(schedule_fields(schedule), status_code)


ScheduleKey = Annotated[ScheduleName, Path(description="The schedule's name.")]


def add_schedule_routes(
    app: FastAPI,
    settings: Settings,
    store: Store,
    token_check: Sequence[Any],
    fails: Callable[..., dict[int | str, dict[str, Any]]],
) -> None:
    """The schedules' routes (functions/schedules.py): as `add_routes`."""
    token_check = list(token_check)

    @app.post(
        "/schedules",
        status_code=201,
        response_model=ScheduleOut,
        dependencies=token_check,
        responses=fails(*BODY_ERRORS, 409),
    )
    async def create_schedule(body: ScheduleIn, request: Request) -> Response:
        """Create a schedule: each occurrence of its cron becomes one task. 409 if one has
        that name (PUT replaces)."""
        schedule = await schedules.create_schedule(store, body.name, body.to_domain(), settings)
        location = f"{request.scope.get('root_path', '')}/schedules/{schedule.name}"
        return answer(schedule_fields(schedule), 201, {"Location": location})

    @app.put(
        "/schedules/{name}",
        response_model=ScheduleOut,
        dependencies=token_check,
        responses={201: {"model": ScheduleOut, "description": "Created."}, **fails(*BODY_ERRORS)},
    )
    async def put_schedule(name: ScheduleKey, body: SchedulePutIn) -> Response:
        """Create a schedule, or replace it whole (for deploy scripts): 201 when created, 200
        when replaced. A replaced schedule keeps the occurrences it made; the new cron takes
        effect from the next one not yet made. The same schedule sent again changes nothing."""
        if body.name is not None and body.name != name:
            issue = {"loc": ("body", "name"), "msg": f"name must be the path's, {name!r}",
                     "type": "value_error"}  # fmt: skip
            raise RequestValidationError([issue])
        schedule, created = await schedules.put_schedule(store, name, body.to_domain(), settings)
        return schedule_answer(schedule, 201 if created else 200)

    @app.get(
        "/schedules",
        response_model=SchedulePageOut,
        dependencies=token_check,
        responses=fails(400, 422),
    )
    async def list_schedules(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[ScheduleCursor | None, Query()] = None,
    ) -> Response:
        """List schedules by name."""
        page = await schedules.list_schedules(store, limit=limit, cursor=cursor)
        return answer(
            {"items": [schedule_fields(s) for s in page.items], "next_cursor": page.next_cursor}
        )

    @app.get(
        "/schedules/{name}",
        response_model=ScheduleOut,
        dependencies=token_check,
        responses=fails(404, 422),
    )
    async def get_schedule(name: ScheduleKey) -> Response:
        """Show one schedule, with its next occurrence."""
        return schedule_answer(await schedules.get_schedule(store, name))

    @app.patch(
        "/schedules/{name}",
        response_model=ScheduleOut,
        dependencies=token_check,
        responses=fails(*BODY_ERRORS, 404),
    )
    async def patch_schedule(name: ScheduleKey, body: SchedulePatchIn) -> Response:
        """Change some of a schedule's fields; what is absent stays. A new cron, zone or
        payload takes effect from the next occurrence not yet made; `enabled: false` makes
        nothing more and cancels the occurrences made that have not started."""
        schedule = await schedules.patch_schedule(store, name, body.changes(), settings)
        return schedule_answer(schedule)

    @app.delete(
        "/schedules/{name}",
        status_code=204,
        response_class=Response,
        dependencies=token_check,
        responses=fails(404, 422),
    )
    async def delete_schedule(name: ScheduleKey) -> Response:
        """Delete a schedule and cancel its occurrences that have not started; its other
        tasks stay as they are."""
        await schedules.delete_schedule(store, name)
        return Response(status_code=204)
