"""FastAPI's side of the routes: how a route matches its path, its task id parameter, and
its JSON answer. (The bodies themselves, without FastAPI: `bodies`.)"""

import re
from typing import Annotated, Any

from fastapi import Path, Response
from fastapi.routing import APIRoute
from pydantic_core import to_json
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from functions.tasks import BIGINT_MAX

TaskId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]
_DIGITS = re.compile("[0-9]+")


class Route(APIRoute):
    """A route whose task id (`{task_id}`, or the original's `{id}`) matches digits only:
    `/tasks/batch` is never task "batch" (a PATCH there is a 405, not a 422 about an id),
    and `/tasks/abc` names no route (404). FastAPI then checks the number's range (422).

    A GET route answers HEAD too, as HTTP asks of every resource that answers GET (the
    body is dropped by asgi.HeadWithoutBody); the OpenAPI document lists GET alone."""

    def _as_get(self, scope: Scope) -> Scope:
        if scope.get("method") == "HEAD" and self.methods and "GET" in self.methods:
            return {**scope, "method": "GET"}
        return scope

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().handle(self._as_get(scope), receive, send)

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
