"""The API's busiest requests, creating tasks and reading one, served without FastAPI's
routing and dependency machinery.

Under load (wrk, 32 connections, one process) FastAPI's routing, dependency solving, and
its exception and exit-stack middleware were ~40% of the CPU of a `POST /tasks` or a
`GET /tasks/{id}`. A request is served here only when it is plainly well formed: the
method and path of one of these routes, a JSON body that `tasks.read_batch` accepts (a
task or a batch, read by the rules of `schemas.TaskIn`), at most one valid
`Idempotency-Key`. (The token was checked before, by `auth.Authorize`.) Anything else,
every refusal in particular, goes on to the FastAPI app (`app`) and is answered there as
before: the two cannot disagree about a 4xx, and the OpenAPI document stays FastAPI's. A
success, and a domain error once the request was read (404, 409, 503), is answered with the
same bytes the FastAPI routes send (`responses.task_fields`, `responses.status_of`).

On Lambda the FastAPI app is built, and FastAPI imported, by the first request it is needed
for (`Lazy`): a cold start that creates or reads a task does without ~0.5 s of imports,
pydantic's among them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from functions import tasks
from functions.errors import TaskrunnerError
from functions.http.responses import json_answer, send_detail, status_of, task_json
from functions.settings import Settings
from functions.store import Store
from functions.tasks import BIGINT_MAX, MAX_BATCH, NewTask

logger = logging.getLogger(__name__)


# The content-types a body is read as JSON with here; any other goes to the FastAPI app,
# which reads `+json` types, refuses the rest with 415, and parses parameters its own way.
_JSON = (b"application/json", b"application/json; charset=utf-8")
_TASK_PREFIX = "/tasks/"
# A status, a JSON body, headers.
Answer = tuple[int, bytes, dict[str, str]]
_MAX_ID_DIGITS = len(str(BIGINT_MAX))
# A task's body nests two levels; one with more brackets than this goes to the FastAPI app.
_MAX_BRACKETS = 100


def _key_ok(key: bytes) -> bool:
    """Whether `key` matches tasks.IDEMPOTENCY_KEY_PATTERN: 1 to 255 of `!` to `~`."""
    return 1 <= len(key) <= 255 and all(0x21 <= c <= 0x7E for c in key)


class HotPath:
    """ASGI middleware: serve `POST /tasks`, `POST /tasks/batch` and `GET`/`HEAD
    /tasks/{id}` when they are plainly well formed; pass everything else to `app`.

    Inside `auth.Authorize` (`middleware.layers`): a request without the token never gets here."""

    def __init__(self, app: ASGIApp, settings: Settings, store: Store) -> None:
        self.app = app
        self.store = store
        self.max_attempts = settings.max_attempts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            method = scope["method"]
            if method == "POST" and path in ("/tasks", "/tasks/batch"):
                await self._create(scope, receive, send, batch=path == "/tasks/batch")
                return
            if method in ("GET", "HEAD") and path.startswith(_TASK_PREFIX):
                digits = path[len(_TASK_PREFIX) :]
                if (
                    0 < len(digits) <= _MAX_ID_DIGITS
                    and digits.isascii()
                    and digits.isdigit()
                    and 1 <= int(digits) <= BIGINT_MAX
                ):
                    await self._answer(scope, send, self._get(int(digits)))
                    return
        await self.app(scope, receive, send)

    async def _create(self, scope: Scope, receive: Receive, send: Send, *, batch: bool) -> None:
        content_type = key = None
        plain = True
        for name, value in scope["headers"]:
            if name == b"content-type":
                plain &= content_type is None and value.lower() in _JSON
                content_type = value
            elif name == b"idempotency-key" and not batch:  # (a batch's items carry theirs)
                plain &= key is None and _key_ok(value)
                key = value
        if not plain:
            await self.app(scope, receive, send)
            return
        body = await _read(receive)
        if body is None:
            return  # the client left before sending its body: no one to answer
        work = self._read(scope, body, key, batch=batch)
        if work is None or not await self._answer(scope, send, work):
            # Refused in the FastAPI app's words (400 or 422), which reads the body again.
            await self.app(scope, _replay(body, receive), send)

    def _read(
        self, scope: Scope, body: bytes, key: bytes | None, *, batch: bool
    ) -> Awaitable[Answer | None] | None:
        """The work a body asks for, or None for the FastAPI app to answer. A body that
        holds more values than any request takes is not read here (`tasks.count_values`),
        and what was read is let go before the FastAPI app reads the body again."""
        if tasks.count_values(body) > tasks.MAX_VALUES:
            return None  # (refused before it is read, in the FastAPI app's words)
        try:
            if batch:
                # Read by pydantic-core (a third of json.loads' time for 10,000 tasks, the
                # same values). Where the two differ it refuses, and the FastAPI app reads
                # the body as it always does: a lone surrogate, nesting past 200 levels
                # (json.loads' limit depends on the stack, which is deeper in FastAPI than
                # here). Imported here: a create or read alone does without it.
                from pydantic_core import from_json

                # Keys cached, not values: a third less time for 10,000 tasks.
                return self._many(from_json(body, cache_strings="keys"))
            # One task, read as the FastAPI app reads it (json.loads), where its nesting
            # cannot come near the stack's limit: fewer brackets than that in all.
            if body.count(b"[") + body.count(b"{") > _MAX_BRACKETS:
                return None
            return self._one(scope, json.loads(body), key)
        except Exception:
            # Anything refused or failing here (a 422, an integer too long for a float) is
            # the FastAPI app's to answer, in its words.
            return None

    def _one(self, scope: Scope, sent: Any, key: bytes | None) -> Awaitable[Answer] | None:
        # Read as a batch's item is, by the rules `schemas.TaskIn` reads a task by: no pydantic
        # model here, so a Lambda cold start need not import pydantic (~70 ms, measured).
        read = tasks.read_batch([sent])
        if read is None:
            return None
        (item,) = read
        key_text = None if key is None else key.decode("ascii")
        return self._created(scope, tasks.new_task(item["kind"], item["at_us"], key_text))

    def _many(self, sent: Any) -> Awaitable[Answer | None] | None:
        if sent.__class__ is not dict or len(sent) != 1:
            return None
        items = sent.get("tasks")
        if items.__class__ is not list or not 1 <= len(items) <= MAX_BATCH:
            return None
        return self._created_many(items)

    async def _created_many(self, items: list[Any]) -> Answer | None:
        ids = await tasks.create_batch(self.store, items, self.max_attempts)
        if ids is None:
            return None
        from pydantic_core import to_json  # (loaded: it read the batch)

        return 201, to_json({"ids": ids}), {}

    async def _created(self, scope: Scope, new: NewTask) -> Answer:
        task, created = await tasks.create_task(self.store, new, self.max_attempts)
        if not created:
            return 200, task_json(task), {}
        # root_path: the base path the API is served under (middleware.BasePath), so the URL works.
        location = f"{scope.get('root_path', '')}/tasks/{task.id}"
        return 201, task_json(task), {"Location": location}

    async def _get(self, task_id: int) -> Answer:
        return 200, task_json(await tasks.get_task(self.store, task_id)), {}

    async def _answer(self, scope: Scope, send: Send, work: Awaitable[Answer | None]) -> bool:
        """Send what `work` answers; False, with nothing sent, if it refuses the request
        (a batch with an item `tasks.read_batch` refuses: nothing was written)."""
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


async def _read(receive: Receive) -> bytes | None:
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
