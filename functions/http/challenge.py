"""The calls of the original challenge this service grew from, for scripts written for it.

A thin layer: each call is one of the domain's operations under the original's path, with
the original's shape of answer. Routes are added after taskrunner's own, and
`POST /{type}/{unix_seconds}` matches only a known type (in any case) and digits, so it
never takes a path meant for another route (`/tasks/batch`, `/healthz`, ...).
"""

import re
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, PlainValidator, WithJsonSchema
from starlette.routing import Match
from starlette.types import Scope

from functions import model, parsing, tasks
from functions.http.responses import list_json
from functions.http.routes import Route, TaskId, task_answer
from functions.http.schemas import TaskOut
from functions.kinds import KINDS
from functions.model import NewTask, TaskState
from functions.settings import Settings
from functions.store import Store

# GET /taskstate/{state} answers at most this many tasks, oldest first.
LIST_LIMIT = 1_000
# The latest whole Unix second the API accepts: 9999-12-31T23:59:59Z.
MAX_UNIX_SECONDS = model.END_UNIX_S - 1


class OriginalState(StrEnum):
    """The original's task states, each one or more of taskrunner's."""

    NOTSTARTED = "NOTSTARTED"
    STARTED = "STARTED"
    COMPLETE = "COMPLETE"


STATES: dict[OriginalState, tuple[TaskState, ...]] = {
    OriginalState.NOTSTARTED: (TaskState.SCHEDULED,),
    OriginalState.STARTED: (TaskState.RUNNING,),
    OriginalState.COMPLETE: (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED),
}


STATE_PATTERN = parsing.any_case([s.value for s in OriginalState])
_DIGITS = re.compile("[0-9]+")


def parse_state(value: object) -> OriginalState:
    """The original's state named by `value`, in any case."""
    try:
        return OriginalState(str(value).upper())
    except ValueError:
        raise ValueError(
            f"unknown state {parsing.excerpt(value)}; expected one of"
            f" {', '.join(OriginalState)} (in any case)"
        ) from None


STATE_DESCRIPTION = (
    "NOTSTARTED (scheduled), STARTED (running) or COMPLETE (succeeded, failed or cancelled),"
    " any case"
)
StateName = Annotated[
    OriginalState,
    PlainValidator(parse_state),
    # The pattern for clients and schemathesis; parse_state's error says it in words.
    WithJsonSchema(
        {
            "type": "string",
            "pattern": STATE_PATTERN,
            "description": STATE_DESCRIPTION,
        }
    ),
]


class DeletedOut(BaseModel):
    deleted: int


class _CreateRoute(Route):
    """Matches only a known type and a number of seconds: anything else is another route's."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            params: dict[str, Any] = child.get("path_params", {})
            if str(params.get("type", "")).lower() not in KINDS or not _DIGITS.fullmatch(
                str(params.get("unix_seconds", ""))
            ):
                return Match.NONE, {}
        return match, child


def build_router(
    settings: Settings,
    store: Store,
    dependencies: Sequence[Any],
    fails: Callable[..., dict[int | str, dict[str, Any]]],
) -> APIRouter:
    """The original's routes over `store`, each behind `dependencies` (the token check);
    `fails(*codes)` is what a route declares it can answer besides success."""
    router = APIRouter(tags=["original"], dependencies=list(dependencies), route_class=Route)
    # The kinds loaded (`kinds.load`, before any app is built), as the path takes them.
    kind_pattern = parsing.any_case(sorted(KINDS))
    kind_names = f"{', '.join(sorted(KINDS))}, any case"

    async def original_create(
        type: Annotated[str, Path(pattern=kind_pattern, description=kind_names)],
        unix_seconds: Annotated[
            int, Path(ge=0, le=MAX_UNIX_SECONDS, description="when to run it, in Unix seconds")
        ],
    ) -> int:
        """Schedule a task of `type` at `unix_seconds`; answer its id."""
        new = NewTask(
            kind=parsing.parse_kind(type), execute_at=parsing.parse_execute_at(unix_seconds)
        )
        task, _ = await tasks.create_task(store, new, settings)
        return task.id

    router.add_api_route(
        "/{type}/{unix_seconds}",
        original_create,
        methods=["POST"],
        response_model=int,
        route_class_override=_CreateRoute,
        summary="Create a task (original)",
        # 404: the path does not name a type and a number of seconds (another route's).
        responses={
            **fails(404, 422),
            200: {
                "links": {
                    op: {"operationId": op, "parameters": {"id": "$response.body"}}
                    for op in ("original_get", "original_delete")
                }
            },
        },
    )

    @router.get(
        "/id/{id}",
        response_model=TaskOut,
        summary="Show a task (original)",
        responses=fails(404, 422),
    )
    async def original_get(id: TaskId) -> Response:
        """The task, as `GET /tasks/{task_id}` shows it."""
        return task_answer(await tasks.get_task(store, id))

    @router.delete(
        "/id/{id}",
        status_code=204,
        response_class=Response,
        summary="Delete a task (original)",
        responses=fails(404, 409, 422),
    )
    async def original_delete(id: TaskId) -> Response:
        """Delete a task, as `DELETE /tasks/{task_id}` does: 409 while it is running."""
        await tasks.delete_task(store, id)
        return Response(status_code=204)

    @router.get(
        "/taskstate/{state}",
        response_model=list[TaskOut],
        summary="List by state (original)",
        responses=fails(422),
    )
    async def original_list(
        state: Annotated[StateName, Path(description=STATE_DESCRIPTION)],
    ) -> Response:
        """The first 1,000 tasks in `state`, oldest first (`GET /tasks` pages through all),
        as many of them as fit in 5 MB (Lambda's limit is 6 MB): with large payloads, fewer.
        """
        found = await tasks.list_in_states(store, STATES[state], LIST_LIMIT)
        return Response(list_json(found), media_type="application/json")

    @router.delete(
        "/",
        response_model=DeletedOut,
        summary="Delete every task (original)",
        responses=fails(403),
    )
    async def original_delete_all() -> DeletedOut:
        """Delete every task that is not running, for testing: refused (403) unless
        `TASKRUNNER_ALLOW_DELETE_ALL=true`."""
        deleted = await tasks.delete_all(store, allowed=settings.allow_delete_all)
        return DeletedOut(deleted=deleted)

    return router
