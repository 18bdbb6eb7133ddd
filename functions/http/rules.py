"""The rules a request is read by, each written once and called by both paths that serve the
API, the FastAPI app and the fast path (`fastpath`), so that the two agree by construction:

- the token: which requests need it (`is_public`) and how it is checked (`bearer_ok`), by
  `middleware.Authorize`, and by the app's dependency when it is served without the middleware;
- the content type: `require_json` (the app's routes, `routes.Route`); the fast path reads
  only `PLAIN_JSON`, types that need no parameter parsed, and leaves any other to the app;
- the Idempotency-Key: `parsing.parse_idempotency_key`, on the header as Starlette decodes it
  (`idempotency_key`);
- a task's body: `read_task`, which `schemas.TaskIn` tries before pydantic's own reading (that
  runs only to say why a body is refused; its options' rules, `parsing.parse_max_attempts`,
  `parse_timeout_s` and `parse_priority`, are the schema's validators too), and a batch's
  envelope: `batch_items`, with its items read by `parsing.read_batch`;
- how much a body may hold: `parsing.count_values`, and the numbers it may hold
  (`parsing.tiny_number`): `body_issue`, which `routes.Route` raises;
- why a task's body is refused: `task_issues` says it as FastAPI's reading of
  `schemas.TaskIn` would (FastAPI's and pydantic's words: the same 422 to the byte), by the
  rules the schema's fields are read by (`TASK_FIELDS`), and `batch_issues` of a batch's
  items, so that the fast path answers it without FastAPI or pydantic; where they cannot say
  so exactly, the app does.
- GET /tasks' query: `list_query`, each parameter read by the function its FastAPI
  parameter's validator calls (`parsing`'s), the filter made by `task_filter`, a parameter
  that takes one value given once (`SINGLE_VALUED`); the fast path reads a query only when
  every parameter in it is well formed, and leaves any other to the app, which says why.

The JSON of a task is `responses.task_json`, and a domain error's status
`responses.status_of`, for both. No FastAPI, Starlette or pydantic here: the Lambda handler
imports this on a cold start.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from functions import model, parsing
from functions.errors import NotJson
from functions.model import MAX_BATCH, NewTask, TaskFilter, TaskOrder, TaskState

# HTTP's optional whitespace (RFC 9110, 5.6.3): all that is ignored around the credentials.
# (str.strip() would also drop \x85 and \xa0, which a client may have meant as the token's.)
_OWS = b" \t"
NO_TOKEN = "missing or wrong `Authorization: Bearer <token>` header"
# What GET and HEAD may read without the token: the dashboard's page (its script asks for the
# token), the health check, the documentation and static files. "" is the base path without
# its slash (redirected to it).
PUBLIC_PATHS = frozenset({"", "/", "/healthz", "/docs", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/static/", "/docs/assets/")


def bearer_ok(headers: Iterable[tuple[bytes, bytes]], token: bytes) -> bool:
    """Whether the first Authorization header of `headers` is `Bearer <token>`: the scheme in
    any case (RFC 9110), spaces and tabs around the credentials ignored, nothing else."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.strip(_OWS).partition(b" ")
            credentials = credentials.strip(_OWS)
            # compare_digest on bytes: the header's bytes as sent, whatever their encoding.
            return (
                scheme.lower() == b"bearer"
                and bool(credentials)
                and hmac.compare_digest(credentials, token)
            )
    return False


def is_public(method: str, path: str) -> bool:
    """Whether `method` on `path` (without the base path) is served without the token."""
    return method in ("GET", "HEAD") and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES))


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path as the routes name it: without the base path (`root_path`)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :]
    return path


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
            f" {parsing.excerpt(media or content_type)}"
        )


# Content-types (lowercased) that `require_json` takes and whose parameters need no parsing:
# the fast path reads a body sent with one of these (or none); any other goes to the app,
# which reads `+json` types, refuses the rest, and parses parameters its own way.
PLAIN_JSON = (b"application/json", b"application/json; charset=utf-8")


def idempotency_key(value: bytes) -> str:
    """The Idempotency-Key header's value, decoded as Starlette decodes headers (latin-1);
    ValueError unless it is a key this API takes (`parsing.parse_idempotency_key`)."""
    return parsing.parse_idempotency_key(value.decode("latin-1"))


def read_task(sent: Any, idempotency_key: str | None = None) -> NewTask | None:
    """The task a body (read as JSON) asks for: an object with a `type`, an `execute_at`,
    perhaps a `payload` and options, and nothing else (`parsing.ITEM_KEYS`), read by
    `parsing.read_batch`; None if it is not one (the app's schema, `schemas.TaskIn`, then
    says why in pydantic's words). The rules that take a setting (the payload's size, a
    timeout within its kind's): `tasks.create_task` checks them, for both paths."""
    try:
        read = parsing.read_batch([sent])
    except Exception:  # (any failure is refused here, and explained by pydantic)
        return None
    if read is None:
        return None
    (item,) = read
    return parsing.new_task(item, idempotency_key)


def read_keyed_batch(items: list[Any]) -> list[NewTask] | None:
    """The tasks of a batch's items, each perhaps with an `idempotency_key` (a string, or
    null for none), read at once by the rules `read_task` reads a task by (`read_batch`
    for the rest of each item); None if any item is not one (the app's schema then reads
    them one by one, and says why)."""
    keys: list[str | None] = []
    bare: list[Any] = []
    for item in items:
        if item.__class__ is not dict or "idempotency_key" not in item:
            keys.append(None)
            bare.append(item)
            continue
        key = item["idempotency_key"]
        if key is None:
            keys.append(None)
        else:
            try:
                keys.append(parsing.parse_idempotency_key(key))
            except Exception:  # (refused here, and explained by pydantic)
                return None
        bare.append({name: value for name, value in item.items() if name != "idempotency_key"})
    read = parsing.read_batch(bare)
    if read is None:
        return None
    return [parsing.new_task(task, key) for task, key in zip(read, keys, strict=True)]


def batch_items(sent: Any) -> list[Any] | None:
    """The items of a batch's body, `{"tasks": [...]}` with 1 to MAX_BATCH items and nothing
    else (what `schemas.BatchIn` declares); None if it is not one."""
    if sent.__class__ is not dict or len(sent) != 1:
        return None
    items = sent.get("tasks")
    if items.__class__ is not list or not 1 <= len(items) <= MAX_BATCH:
        return None
    return items


def body_issue(body: bytes, max_body_bytes: int) -> dict[str, Any] | None:
    """Why `body` is refused before it is read as JSON, as a validation error: it holds more
    values than any request takes (`parsing.count_values`, against `model.max_values` of the
    body limit: json.loads would build them all), or a number too small for a double (it
    would read as 0); None if neither."""
    bound = model.max_values(max_body_bytes)
    if parsing.count_values(body, bound) > bound:
        msg = model.too_many_values(max_body_bytes)
        return {"loc": ("body",), "msg": msg, "type": "too_long"}
    tiny = parsing.tiny_number(body)
    if tiny is not None:
        msg = f"the number {parsing.excerpt(tiny)} is too small for a double: it reads as 0"
        return {"loc": ("body",), "msg": msg, "type": "value_error"}
    return None


# The fields of a task's body in the order `schemas.TaskIn` declares them, each with the
# rule its validator calls (None: it takes any value; the domain checks it) and whether it
# must be sent. A unit test holds this to the schema.
Fields = tuple[tuple[str, Callable[[Any], Any] | None, bool], ...]
TASK_FIELDS: Fields = (
    ("type", parsing.parse_kind, True),
    ("execute_at", parsing.parse_execute_at, True),
    ("payload", None, False),
    ("max_attempts", parsing.parse_max_attempts_or_default, False),
    ("timeout_s", parsing.parse_timeout_s, False),
    ("priority", parsing.parse_priority_or_default, False),
)
# What pydantic says of a field missing, a key no field has, a body that is no object (as
# FastAPI validates a body: from attributes), and a rule's ValueError (before its words); a
# unit test holds these to pydantic's own.
MISSING = "Field required"
EXTRA = "Extra inputs are not permitted"
NOT_AN_OBJECT = "Input should be a valid dictionary or object to extract fields from"
VALUE_ERROR = "Value error, "


def json_issues(body: bytes, error: json.JSONDecodeError) -> list[dict[str, Any]]:
    """Why FastAPI refuses a body that json.loads refused with `error`: nothing sent (it does
    not read an empty body: the body is missing), or not JSON (where, and why)."""
    if not body:
        return [{"type": "missing", "loc": ("body",), "msg": MISSING}]
    return [
        {
            "type": "json_invalid",
            "loc": ("body", error.pos),
            "msg": "JSON decode error",
            "ctx": {"error": error.msg},
        }
    ]


def task_issues(sent: Any) -> list[dict[str, Any]] | None:
    """The validation errors FastAPI refuses a task's body (read as JSON: `sent`) with, in
    its shape (`type`, `loc`, `msg`) and pydantic's words and order: each field `TASK_FIELDS`
    names, missing or refused by its rule, then each key no field has. None when they cannot
    be told here as pydantic tells them (a rule failing otherwise than by ValueError) or the
    schema takes the body (its reading, `read_task`, or each field's): the app says it."""
    return _issues(sent, TASK_FIELDS, ("body",)) or None


def _key_or_none(value: object) -> str | None:
    """A batch item's `idempotency_key` as `schemas.BatchItemIn` reads it: null, or a key."""
    return None if value is None else parsing.parse_idempotency_key(value)


# A batch item's fields (`schemas.BatchItemIn`): a task's, then its own key.
ITEM_FIELDS: Fields = (*TASK_FIELDS, ("idempotency_key", _key_or_none, False))


def batch_issues(items: list[Any]) -> list[dict[str, Any]] | None:
    """`task_issues` of a batch's items (`batch_items` took its envelope), each item's
    errors after the last's, as FastAPI's reading of `schemas.BatchIn` has them; None where
    it takes the batch (`read_keyed_batch`) or an item's errors cannot be told here."""
    try:
        if read_keyed_batch(items) is not None:  # (what `schemas.BatchIn` tries first)
            return None
    except Exception:  # (pydantic would let it through: the app's to answer)
        return None
    issues: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        found = _issues(item, ITEM_FIELDS, ("body", "tasks", i))
        if found is None:
            return None
        issues += found
    return issues or None


def _issues(sent: Any, fields: Fields, at: tuple[Any, ...]) -> list[dict[str, Any]] | None:
    """The errors of one task (or batch item) `sent`, each `loc` after `at`: none if the
    schema takes it, None if they cannot be told here (see `task_issues`)."""
    if read_task(sent) is not None:  # (what `schemas.TaskIn` tries first)
        return []
    if sent.__class__ is not dict:
        return [{"type": "model_attributes_type", "loc": at, "msg": NOT_AN_OBJECT}]
    issues: list[dict[str, Any]] = []
    names = set()
    for name, rule, required in fields:
        names.add(name)
        if name not in sent:
            if required:
                issues.append({"type": "missing", "loc": (*at, name), "msg": MISSING})
            continue
        if rule is None:
            continue
        try:
            rule(sent[name])
        except ValueError as exc:
            msg = f"{VALUE_ERROR}{exc}"
            issues.append({"type": "value_error", "loc": (*at, name), "msg": msg})
        except Exception:  # (pydantic lets it through: a 500, the app's to answer)
            return None
    for key in sent:
        if key not in names:
            issues.append({"type": "extra_forbidden", "loc": (*at, key), "msg": EXTRA})
    return issues


# The query parameters of GET /tasks and the bulk routes that take one value: FastAPI would
# read the last of several, so `payload=a&payload=b` would filter by `b` alone, unsaid (the
# app refuses a second one, routes.task_filter).
SINGLE_VALUED = (
    "created_after", "created_before", "execute_after", "execute_before", "finished_after",
    "finished_before", "error", "schedule", "payload", "limit", "cursor", "sort", "dry_run",
)  # fmt: skip
TIME_BOUNDS = (
    "created_after", "created_before", "execute_after", "execute_before", "finished_after",
    "finished_before",
)  # fmt: skip
# What GET /tasks reads from its query (the route refuses any other parameter).
LIST_QUERY = frozenset({"state", "type", *SINGLE_VALUED} - {"dry_run"})


def task_filter(
    states: Sequence[TaskState] | None,
    kinds: Sequence[str] | None,
    *,
    error: str | None = None,
    schedule: str | None = None,
    payload: str | None = None,
    **bounds: datetime | None,
) -> TaskFilter:
    """The filter of GET /tasks' parameters, each read already: a repeated state or type
    counts once, in the order first given."""
    return TaskFilter(
        states=tuple(dict.fromkeys(states or ())),
        kinds=tuple(dict.fromkeys(kinds or ())),
        error=error,
        schedule=schedule,
        payload=payload,
        **bounds,
    )


@dataclass(frozen=True)
class ListQuery:
    """What a GET /tasks asks for (`tasks.list_tasks`' arguments)."""

    matching: TaskFilter
    limit: int = 100
    cursor: str | None = None
    order: TaskOrder | None = None


def list_query(query: bytes) -> ListQuery | None:
    """GET /tasks' query (the bytes of the URL's), read as the FastAPI route reads it:
    split as Starlette splits it, each parameter by its validator's function. None when a
    parameter is refused, repeated where it takes one value, or not one the route reads
    (`LIST_QUERY`): the FastAPI app answers it, its 422 saying why."""
    states: list[TaskState] = []
    kinds: list[str] = []
    given: dict[str, str] = {}
    try:
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if name == "state":
                states.append(TaskState(value))
            elif name == "type":
                kinds.append(parsing.parse_kind_filter(value))
            elif name in LIST_QUERY:
                if name in given:
                    return None  # (the app's 422)
                given[name] = value
            else:
                return None  # not a parameter of the route (the app's 422)
        read: dict[str, Any] = {name: given[name] for name in ("error", "payload") if name in given}
        if "error" in read:
            read["error"] = parsing.parse_error_search(read["error"])
        if "payload" in read:
            read["payload"] = parsing.parse_payload_filter(read["payload"])
        if "schedule" in given:
            # Imported here: only a query that names a schedule needs the module.
            from functions.schedules import parse_name

            read["schedule"] = parse_name(given["schedule"])
        for name in TIME_BOUNDS:
            if name in given:
                read[name] = parsing.parse_time_bound(given[name], name)
        limit = _limit(given.get("limit", "100"))
        cursor = given.get("cursor")
        sort = given.get("sort")
        return ListQuery(
            task_filter(states, kinds, **read),
            limit,
            None if cursor is None else parsing.parse_cursor(cursor),
            None if sort is None else parsing.parse_sort(sort),
        )
    except Exception:  # (refused here, and explained by the app)
        return None


_MAX_LIMIT = 1000


def _limit(text: str) -> int:
    """A `limit` written plainly, 1 to 1,000 (the route's `Query(ge=1, le=1000)`); any
    other spelling pydantic may read (`+5`, ` 5`, `05`) is left to the app: ValueError."""
    if 0 < len(text) <= 4 and text.isascii() and text.isdigit() and text[0] != "0":
        limit = int(text)
        if limit <= _MAX_LIMIT:
            return limit
    raise ValueError(f"limit {parsing.excerpt(text)} is not written plainly")
