"""The API's busiest requests, creating tasks, reading one and cancelling one, a page of
tasks (`GET /tasks`, its filters, order and cursor), and the reads that take nothing but their path
(`reads`: the health check, /stats, /metrics, the dashboard's page), served without FastAPI's
routing and dependency machinery.

Under load (wrk, 32 connections, one process) FastAPI's routing, dependency solving, and
its exception and exit-stack middleware were ~40% of the CPU of a `POST /tasks` or a
`GET /tasks/{id}`. A request is served here only when it is plainly well formed: the
method and path of one of these routes, a JSON body that the rules accept (`rules.read_task`,
`rules.batch_items`, the rules the FastAPI app reads a body by), at most one valid
`Idempotency-Key`. (The token was checked before, by `middleware.Authorize`.) Anything else
goes on to the FastAPI app (`app`) and is answered there as before, and the OpenAPI document
stays FastAPI's. A success, and a domain error once the request was read (404, 409, 503), is
answered with the same bytes the FastAPI routes send (`responses.task_json`,
`responses.status_of`); so is the 422 of a create's body that the rules refuse where they
can say why exactly as the FastAPI app says it (`rules.body_issue`, `rules.json_issues`,
`rules.task_issues`, `rules.batch_issues` for a batch's items, written as FastAPI's and
pydantic's errors, `responses.issues_detail` making the detail of both): any other refusal
is the app's.

On Lambda the FastAPI app is built, and FastAPI imported, by the first request it is needed
for (`Lazy`): a cold start that creates or reads a task, is one of `reads`, or refuses a
task's body, does without ~0.5 s of imports (pydantic's among them) and building the app.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from functions import tasks
from functions.errors import TaskrunnerError
from functions.http import reads, rules
from functions.http.responses import (
    detail_json,
    issues_detail,
    json_answer,
    page_json,
    send_detail,
    status_of,
    task_json,
)
from functions.model import BIGINT_MAX, NewTask
from functions.settings import Settings
from functions.store import Store

logger = logging.getLogger("functions.app")  # the API logs as one, on either path


_TASK_PREFIX = "/tasks/"
_CANCEL = "/cancel"
# A status, a JSON body, headers; or with the body's content type (`reads.Read`'s).
Answer = tuple[int, bytes, dict[str, str]] | tuple[int, bytes, dict[str, str], str]
_MAX_ID_DIGITS = len(str(BIGINT_MAX))
# A task's body nests two levels; one with more brackets than this goes to the FastAPI app.
_MAX_BRACKETS = 100


class HotPath:
    """ASGI middleware: serve `POST /tasks`, `POST /tasks/batch`, `GET`/`HEAD /tasks/{id}`,
    `POST /tasks/{id}/cancel` and `GET /tasks` (its query read by `rules.list_query`) when
    they are plainly well formed, and `GET`/`HEAD` of each path of `reads.PATHS` (whatever their
    query string: the FastAPI routes read none); pass everything else to `app`.

    Inside `middleware.Authorize` (`middleware.layers`): a request without the token never
    gets here."""

    def __init__(self, app: ASGIApp, settings: Settings, store: Store) -> None:
        self.app = app
        self.store = store
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = rules.route_path(scope)
            method = scope["method"]
            if method == "POST" and path in ("/tasks", "/tasks/batch"):
                await self._serve_create(scope, receive, send, batch=path == "/tasks/batch")
                return
            if method == "GET" and path == "/tasks":
                query = rules.list_query(scope["query_string"])
                if query is not None:
                    await self._send_answer(scope, send, self._list_tasks(query))
                    return
            if method in ("GET", "HEAD") and path in reads.PATHS:
                read = reads.PATHS[path](self.store, scope.get("root_path", ""))
                await self._send_answer(scope, send, _answer(read))
                return
            if method in ("GET", "HEAD") and path.startswith(_TASK_PREFIX):
                task_id = _task_id(path[len(_TASK_PREFIX) :])
                if task_id is not None:
                    await self._send_answer(scope, send, self._get_task(task_id))
                    return
            if method == "POST" and path.startswith(_TASK_PREFIX) and path.endswith(_CANCEL):
                # A body, if any, is not read: the FastAPI route reads none either.
                task_id = _task_id(path[len(_TASK_PREFIX) : -len(_CANCEL)])
                if task_id is not None:
                    await self._send_answer(scope, send, self._cancel_task(task_id))
                    return
        await self.app(scope, receive, send)

    async def _serve_create(
        self, scope: Scope, receive: Receive, send: Send, *, batch: bool
    ) -> None:
        content_type = key = None
        plain = True
        for name, value in scope["headers"]:
            if name == b"content-type":
                plain &= content_type is None and value.lower() in rules.PLAIN_JSON
                content_type = value
            elif name == b"idempotency-key" and not batch:  # (a batch's items carry theirs)
                plain &= key is None
                try:
                    key = rules.idempotency_key(value)
                except ValueError:
                    plain = False
        if not plain:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client left before sending its body: no one to answer
        work = self._work_for(scope, body, key, batch=batch)
        if work is None or not await self._send_answer(scope, send, work):
            # Refused in the FastAPI app's words (400 or 422), which reads the body again.
            await self.app(scope, _replay(body, receive), send)

    def _work_for(
        self, scope: Scope, body: bytes, key: str | None, *, batch: bool
    ) -> Awaitable[Answer | None] | None:
        """The work a body asks for, or None for the FastAPI app to answer. A body that
        holds more values than any request takes is not read here (`rules.body_issue`),
        and what was read is let go before the FastAPI app reads the body again. A task's
        body that is refused is answered here where `rules.task_issues` says why exactly
        as the FastAPI app would: a Lambda cold start then imports neither FastAPI nor
        pydantic for it (~0.5 s)."""
        issue = rules.body_issue(body, self.settings.max_body_bytes)
        if issue is not None:
            return _refused([issue])
        try:
            if batch:
                # Read by pydantic-core (a third of json.loads' time for 10,000 tasks, the
                # same values). Where the two differ it refuses, and the FastAPI app reads
                # the body as it always does: a lone surrogate, nesting past 200 levels
                # (json.loads' limit depends on the stack, which is deeper in FastAPI than
                # here). Imported here: a create or read alone does without it.
                from pydantic_core import from_json

                # Keys cached, not values: a third less time for 10,000 tasks.
                items = rules.batch_items(from_json(body, cache_strings="keys"))
                return None if items is None else self._create_tasks(items)
            # One task, read as the FastAPI app reads it (json.loads), where its nesting
            # cannot come near the stack's limit: fewer brackets than that in all.
            if body.count(b"[") + body.count(b"{") > _MAX_BRACKETS:
                return None
            try:
                sent = json.loads(body)
            except json.JSONDecodeError as exc:
                return _refused(rules.json_issues(body, exc))
            new = rules.read_task(sent, key)
            if new is None:
                return _refused(rules.task_issues(sent))
            return self._create_task(scope, new)
        except Exception:
            # Anything refused or failing here (a 422, an integer too long for a float) is
            # the FastAPI app's to answer, in its words.
            return None

    async def _create_tasks(self, items: list[Any]) -> Answer | None:
        # Its items are read by `parsing.read_batch` a slice at a time, as they are written.
        ids = await tasks.create_tasks_streamed(self.store, items, self.settings)
        if ids is None:
            # An item refused (nothing written): a 422 where the rules say why as the
            # FastAPI app would; else (a keyed batch, which it reads) the app's.
            refused = _refused(rules.batch_issues(items))
            return None if refused is None else await refused
        from pydantic_core import to_json  # (loaded: it read the batch)

        return 201, to_json({"ids": ids}), {}

    async def _create_task(self, scope: Scope, new: NewTask) -> Answer:
        task, created = await tasks.create_task(self.store, new, self.settings)
        if not created:
            return 200, task_json(task), {}
        # root_path: the base path the API is served under (middleware.BasePath), so the URL
        # works.
        location = f"{scope.get('root_path', '')}/tasks/{task.id}"
        return 201, task_json(task), {"Location": location}

    async def _get_task(self, task_id: int) -> Answer:
        return 200, task_json(await tasks.get_task(self.store, task_id)), {}

    async def _cancel_task(self, task_id: int) -> Answer:
        return 200, task_json(await tasks.cancel_task(self.store, task_id)), {}

    async def _list_tasks(self, query: rules.ListQuery) -> Answer:
        page = await tasks.list_tasks(
            self.store, query.matching, limit=query.limit, cursor=query.cursor, order=query.order
        )
        return 200, page_json(page), {}

    async def _send_answer(self, scope: Scope, send: Send, work: Awaitable[Answer | None]) -> bool:
        """Send what `work` answers; False, with nothing sent, if it refuses the request
        (a batch with an item `parsing.read_batch` refuses: nothing was written)."""
        try:
            answer = await work
            if answer is None:
                return False
            messages = json_answer(*answer)
        except TaskrunnerError as exc:
            await send_detail(send, *status_of(exc, scope["path"]))
            return True
        except Exception as exc:
            # As the FastAPI app's last handler answers: 500 in words, the traceback logged.
            logger.error("action=request path=%s: unexpected error", scope["path"], exc_info=exc)
            await send_detail(send, 500, "internal error")
            return True
        for message in messages:
            await send(message)
        return True


def _refused(issues: list[dict[str, Any]] | None) -> Awaitable[Answer | None] | None:
    """The 422 answering `issues` (FastAPI's validation errors, as its app answers them:
    `responses.issues_detail`); None where there are none (the FastAPI app answers)."""
    if not issues:
        return None
    return _ready((422, detail_json(issues_detail(issues)), {}))


async def _ready(answer: Answer) -> Answer:
    return answer


async def _answer(read: Awaitable[reads.Read]) -> Answer:
    body, content_type, headers = await read
    return 200, body, headers, content_type


def _task_id(digits: str) -> int | None:
    """The task id `digits` spell, as the FastAPI routes read `{task_id}`; None if they
    do not (the FastAPI app answers: a 404, or a 422 for an id out of range)."""
    if (
        0 < len(digits) <= _MAX_ID_DIGITS
        and digits.isascii()
        and digits.isdigit()
        and 1 <= int(digits) <= BIGINT_MAX
    ):
        return int(digits)
    return None


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client left before sending it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over `body` (already read) once, then waits on `receive`."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


class Lazy:
    """An ASGI app built by `build()` when its first request (or lifespan) comes."""

    def __init__(self, build: Callable[[], ASGIApp]) -> None:
        self._build = build
        self._app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            self._app = self._build()
        await self._app(scope, receive, send)
