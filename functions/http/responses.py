"""What the API answers: a task's fields, the status of a domain error, and JSON answers
sent as plain ASGI messages.

Shared by the FastAPI app (`app`) and the routes served without it (`fastpath`, `middleware`), so
an error reads the same whichever served the request. No FastAPI or Starlette here: the
Lambda handler imports this on a cold start.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from functions.errors import (
    DatabaseUnavailable,
    Forbidden,
    IdempotencyKeyReused,
    InvalidInput,
    InvalidValue,
    NotJson,
    OccurrenceHeld,
    ScheduleExists,
    ScheduleNotFound,
    SchemaOutdated,
    TaskNotFound,
    TaskrunnerError,
    TaskRunning,
    Unauthorized,
    WrongState,
)
from functions.kinds import KINDS
from functions.model import (
    MAX_PAGE_BYTES,
    PAGE_ROOM,
    ListedTask,
    WrittenPage,
    enveloped_size,
    position_of,
)
from functions.parsing import encode_cursor

if TYPE_CHECKING:
    from functions.model import Page, Task

logger = logging.getLogger("functions.app")


def task_fields(task: Task) -> dict[str, Any]:
    """A task as `schemas.TaskOut` shows it, without building one: the routes answer with
    this, and the schema of TaskOut documents it (a unit test holds the two equal)."""
    return {**_fields(task), "timeout_s": task.timeout_s, "payload": shown_payload(task)}


def shown_payload(task: Task) -> Any:
    """The task's payload as answers show it (`shown`)."""
    return shown(task.kind, task.payload)


def shown(kind: str, payload: Any) -> Any:
    """A payload of `kind` (a task's, a schedule's) as answers show it: as its kind's `show`
    has it (the `http` kind's header values masked), or as stored."""
    declared = KINDS.get(kind)
    if declared is None or declared.show is None or payload is None:
        return payload
    return declared.show(payload)


def _fields(task: Task) -> dict[str, Any]:
    """`task_fields` but the timeout and the payload, which come last, written by the json
    module."""
    return {
        "id": task.id,
        "type": task.kind,
        # The value, not the enum: pydantic-core wrote a page of 100 in 634 us with the
        # StrEnum, 312 us with its str.
        "state": task.state.value,
        "execute_at": task.execute_at,
        "next_attempt_at": task.next_attempt_at,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "output": task.output,
        "error": task.error,
        "idempotency_key": task.idempotency_key,
        "schedule": task.schedule,
        "scheduled_for": task.scheduled_for,
        "priority": task.priority,
        "worker": task.worker,
        "running_since": task.running_since,
        "lease_expires_at": task.lease_expires_at,
    }


def task_json(task: Task) -> bytes:
    """`task_fields` as JSON, the one JSON of a task whichever path answers. Its fields but
    the payload are the bytes pydantic-core's `to_json` writes: where pydantic-core is
    loaded already (a server builds the FastAPI app at start) it writes them, at a quarter
    of the json module's time; a Lambda cold start has not loaded it, and spares ~30 ms by
    writing them with the json module. The timeout and the payload are always the json
    module's (the two write some numbers differently: 1e-07, 1e-7), compact, as
    `parsing.payload_json`."""
    core = sys.modules.get("pydantic_core")
    if core is None:
        return plain_task_json(task)
    head: bytes = core.to_json(_fields(task))
    tail = _dumps(task.timeout_s), ',"payload":', _dumps(shown_payload(task)), "}"
    return b"".join((head[:-1], b',"timeout_s":', "".join(tail).encode()))


def listed_json(item: ListedTask) -> bytes:
    """`task_json` of a listed task: the JSON the database wrote of its fields
    (queries.LISTED_JSON, the same bytes) and the timeout and payload as `task_json`
    writes them."""
    if item.timeout_s is None and item.payload is None:
        return (item.head + _NOTHING_AFTER).encode()
    shown_one = shown(item.kind, item.payload)
    tail = _dumps(item.timeout_s), ',"payload":', _dumps(shown_one), "}"
    return "".join((item.head, ',"timeout_s":', *tail)).encode()


# The end of a task's JSON without a timeout or a payload (most tasks).
_NOTHING_AFTER = ',"timeout_s":null,"payload":null}'


def _item_json(item: Task | ListedTask) -> bytes:
    return listed_json(item) if isinstance(item, ListedTask) else task_json(item)


def plain_task_json(task: Task) -> bytes:
    """`task_json` by the json module alone (a unit test holds the two equal)."""
    fields = task_fields(task)
    for name in _TIMES:
        when = fields[name]
        if when is not None:
            fields[name] = datetime_text(when)
    return _dumps(fields).encode()


def _fitting(items: list[Task] | list[ListedTask]) -> list[bytes]:
    """The JSON of `items`, from the first, while they fit in one answer of MAX_PAGE_BYTES
    measured as Lambda's response envelope holds them (`enveloped_size`: a page of 5 MB of
    `"é"` payloads was 14.9 MB there, over Lambda's 6 MB limit); always the first."""
    out: list[bytes] = []
    size = PAGE_ROOM
    for task in items:
        one = _item_json(task)
        size += enveloped_size(one) + 1
        if out and size > MAX_PAGE_BYTES:
            break
        out.append(one)
    return out


def page_json(page: Page | WrittenPage) -> bytes:
    """A page of tasks as `schemas.PageOut`, at most MAX_PAGE_BYTES: its items while they
    fit, and a `next_cursor` after the last one sent when some did not (a WrittenPage fits
    whole: tasks.list_tasks made sure)."""
    if isinstance(page, WrittenPage):
        items, cursor = page.items_json, page.next_cursor
    else:
        out = _fitting(page.items)
        cursor = page.next_cursor
        if len(out) < len(page.items):
            cursor = encode_cursor(position_of(page.items[len(out) - 1], page.order))
        items = b",".join(out)
    return b"".join((b'{"items":[', items, b'],"next_cursor":', _dumps(cursor).encode(), b"}"))


def list_json(items: list[Task] | list[ListedTask]) -> bytes:
    """Tasks as a JSON array, at most MAX_PAGE_BYTES: the first of `items` that fit."""
    return b"".join((b"[", b",".join(_fitting(items)), b"]"))


_TIMES = (
    "execute_at", "next_attempt_at", "created_at", "started_at", "finished_at", "scheduled_for",
    "running_since", "lease_expires_at",
)  # fmt: skip
# Compact, and characters as they are (UTF-8): what pydantic-core writes.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def datetime_text(when: datetime) -> str:
    """An aware datetime as pydantic-core writes it: "Z" for UTC, else the offset to the
    minute."""
    text = when.isoformat()
    if text.endswith("+00:00"):  # (the store's times are in UTC)
        return text[:-6] + "Z"
    offset = when.utcoffset()
    if offset is None or offset % _MINUTE == _ZERO:
        return text
    # Seconds of the offset dropped, toward zero.
    minutes = abs(offset) // _MINUTE
    sign = "+" if offset > _ZERO else "-"
    return f"{when.replace(tzinfo=None).isoformat()}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


_ZERO = timedelta(0)
_MINUTE = timedelta(minutes=1)

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


# A 422's detail is a list of issues (`loc`, `msg`, `type`); every other error's, a string.
Detail = str | list[dict[str, Any]]


def status_of(exc: TaskrunnerError, path: str) -> tuple[int, Detail, dict[str, str]]:
    """The status, `detail` and headers the API answers `exc` with (raised serving `path`)."""
    if isinstance(exc, InvalidValue):
        return 422, exc.issues, {}
    if isinstance(exc, TaskNotFound | ScheduleNotFound):
        return 404, str(exc), {}
    if isinstance(
        exc, TaskRunning | WrongState | OccurrenceHeld | IdempotencyKeyReused | ScheduleExists
    ):
        return 409, str(exc), {}
    if isinstance(exc, InvalidInput):
        return 400, str(exc), {}
    if isinstance(exc, Forbidden):
        return 403, str(exc), {}
    if isinstance(exc, Unauthorized):
        return 401, str(exc), {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, NotJson):
        return 415, str(exc), {}
    if isinstance(exc, DatabaseUnavailable):
        logger.warning("action=request path=%s: %s", path, exc)
        return 503, "database unavailable, try again shortly", {"Retry-After": "1"}
    if isinstance(exc, SchemaOutdated):
        logger.error("action=request path=%s: %s", path, exc)
        return 503, str(exc), {"Retry-After": "30"}
    logger.error("action=request path=%s: unexpected error", path, exc_info=exc)
    return 500, "internal error", {}


# A 422 lists at most this many issues: a batch of 10,000 bad items says so in a few lines.
MAX_ISSUES = 20


def cut(text: str, limit: int) -> str:
    """`text` at most `limit` characters long, and safe to encode (a lone surrogate from a
    JSON escape would fail the response)."""
    if len(text) > limit:
        text = f"{text[: limit - 5]}...{text[-2:]}"
    return text.encode("utf-8", "backslashreplace").decode()


def issues_detail(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """A 422's `detail`: validation errors (FastAPI's, or the fast path's in their shape,
    `rules.task_issues`) as `loc`, `msg` and `type` only: never the `input` (which can be
    the whole body) nor its `ctx`, and every string cut short."""
    issues = []
    for error in errors[:MAX_ISSUES]:
        msg = str(error.get("msg", ""))
        if error.get("type") == "json_invalid" and "error" in (error.get("ctx") or {}):
            msg = f"{msg}: {error['ctx']['error']}"
        issues.append(
            {
                "loc": [x if isinstance(x, int) else cut(str(x), 40) for x in error["loc"]],
                "msg": cut(msg, 300),
                "type": cut(str(error.get("type", "")), 40),
            }
        )
    if len(errors) > MAX_ISSUES:
        issues.append(
            {
                "loc": [cut(str(errors[0]["loc"][0]), 40)],
                "msg": f"and {len(errors) - MAX_ISSUES} more issues",
                "type": "too_many_issues",
            }
        )
    return issues


def json_answer(
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two ASGI messages answering `body` (JSON, or of `content_type`: a text type with
    its charset) with `status`: the headers a Starlette response has, in its order (given
    ones, then content-length and content-type). Made before anything is sent, so a header
    that cannot be encoded fails here."""
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in
           (headers or {}).items()]  # fmt: skip
    raw.append((b"content-length", str(len(body)).encode()))
    raw.append((b"content-type", content_type.encode("latin-1")))
    start = {"type": "http.response.start", "status": status, "headers": raw}
    return start, {"type": "http.response.body", "body": body}


async def send_json(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    """Answer `body` (JSON) with `status` (see `json_answer`)."""
    for message in json_answer(status, body, headers):
        await send(message)


async def send_detail(
    send: Send, status: int, detail: Detail, headers: dict[str, str] | None = None
) -> None:
    """Answer `{"detail": detail}` with `status` (`detail_json`)."""
    await send_json(send, status, detail_json(detail), headers)


def detail_json(detail: Detail) -> bytes:
    """`{"detail": detail}` encoded as Starlette's JSONResponse does."""
    return json.dumps({"detail": detail}, ensure_ascii=False, separators=(",", ":")).encode()
