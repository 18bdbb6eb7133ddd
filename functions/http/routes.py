"""FastAPI's side of the routes: how a route matches its path, reads its body, its task id
parameter, and its JSON answer. (The bodies themselves, without FastAPI: `schemas`.)"""

import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic_core import to_json
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from functions import tasks
from functions.errors import NotJson
from functions.tasks import BIGINT_MAX

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
        content-type (415), and how many values it holds (`tasks.count_values`: 422 past
        MAX_VALUES, before json.loads builds them all)."""
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def read_body_first(request: Request) -> Response:
            require_json(request.headers.get("content-type", ""))
            if tasks.count_values(await request.body()) > tasks.MAX_VALUES:
                issue = {"loc": ("body",), "msg": tasks.TOO_MANY_VALUES, "type": "too_long"}
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


def answer(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response, serialized once by pydantic-core (datetimes as pydantic writes them).

    A route returning a Response skips FastAPI's response_model step, which validates the
    returned model again and encodes it a second time: a fifth of a request's CPU, measured.
    The route's response_model still documents the body.
    """
    return Response(to_json(content), status_code, headers, media_type="application/json")


def require_json(content_type: str) -> None:
    """Raise NotJson (415) unless a body sent with `content_type` is read as JSON.

    A body sent without a content-type is read as JSON (clients and test consoles omit it;
    nothing else could be meant); one that says it is something else gets a 415 that says
    what to send, rather than a 422 about a string that is not an object.
    """
    content_type = content_type.strip()
    media = content_type.partition(";")[0].strip().lower()
    # (A header with parameters and no media type, `; charset=utf-8`, says nothing either.)
    if (content_type and not media) or (
        media and media != "application/json" and not media.endswith("+json")
    ):
        raise NotJson(
            "the body must be JSON, sent as `content-type: application/json`, not"
            f" {tasks.excerpt(media or content_type)}"
        )
