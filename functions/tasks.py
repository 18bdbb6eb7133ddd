"""The domain: what a task is, the rules for new ones, and the operations the API offers.

Nothing here knows about HTTP or SQL: routes call these functions, these call the store.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from functions.errors import InvalidInput, TaskNotFound, TaskRunning
from functions.kinds import KINDS

if TYPE_CHECKING:
    from functions.store import Store


class TaskState(StrEnum):
    # Set by create, by a retry after a failed attempt, by rescue after a worker died,
    # and by a worker that shuts down before its task finished.
    SCHEDULED = "scheduled"
    # Set by a worker's claim; the worker holds a lease on the task until it records a result.
    RUNNING = "running"
    # Set by the worker that ran the task, once its kind returned.
    SUCCEEDED = "succeeded"
    # Set by the worker when the last attempt raised, or by rescue when a crashed task has
    # no attempts left.
    FAILED = "failed"


@dataclass(frozen=True)
class Task:
    id: int
    kind: str
    state: TaskState
    execute_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    output: str | None
    error: str | None


@dataclass(frozen=True)
class NewTask:
    kind: str
    execute_at: datetime


@dataclass(frozen=True)
class Page:
    items: list[Task]
    next_cursor: str | None


# Python datetimes stop at year 9999; Postgres timestamptz would take more, we never need it.
_MAX_UNIX_S = datetime(9999, 12, 31, tzinfo=UTC).timestamp()


def parse_kind(value: object) -> str:
    """Return the kind named by `value`, matched case-insensitively."""
    if not isinstance(value, str):
        raise ValueError("type must be a string")
    name = value.strip().lower()
    if name not in KINDS:
        raise ValueError(f"unknown type {value!r}; expected one of {', '.join(sorted(KINDS))}")
    return name


def parse_execute_at(value: object) -> datetime:
    """Return an aware UTC datetime from ISO-8601 with an offset, or from Unix seconds.

    A date-time without an offset is rejected rather than guessed at.
    """
    if isinstance(value, bool):
        raise ValueError("execute_at must be an ISO-8601 date-time with an offset or Unix seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value) or not 0 <= value <= _MAX_UNIX_S:
            raise ValueError(f"execute_at {value!r} is not a Unix time between 1970 and 9999")
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"execute_at {value!r} is not an ISO-8601 date-time (e.g. 2030-01-01T12:00:00Z)"
            ) from None
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            raise ValueError(
                f"execute_at {value!r} has no UTC offset; add one, e.g. 'Z' or '+02:00'"
            )
        return parsed.astimezone(UTC)
    raise ValueError("execute_at must be an ISO-8601 date-time with an offset or Unix seconds")


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, last_id = raw.partition(":")
        if prefix != "after":
            raise ValueError(raw)
        return int(last_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput(f"cursor {cursor!r} is not one this API returned") from None


async def create_task(store: Store, new: NewTask, max_attempts: int) -> Task:
    """Schedule one task."""
    return await store.insert_task(new, max_attempts)


async def create_tasks(store: Store, new: list[NewTask], max_attempts: int) -> list[int]:
    """Schedule many tasks in one statement; all are written or none."""
    return await store.insert_tasks(new, max_attempts)


async def get_task(store: Store, task_id: int) -> Task:
    task = await store.get_task(task_id)
    if task is None:
        raise TaskNotFound(task_id)
    return task


async def list_tasks(
    store: Store,
    *,
    state: TaskState | None,
    kind: str | None,
    limit: int,
    cursor: str | None,
) -> Page:
    """List tasks by ascending id; `next_cursor` is None on the last page."""
    after_id = decode_cursor(cursor) if cursor else 0
    rows = await store.list_tasks(state=state, kind=kind, after_id=after_id, limit=limit + 1)
    items = rows[:limit]
    next_cursor = encode_cursor(items[-1].id) if len(rows) > limit else None
    return Page(items=items, next_cursor=next_cursor)


async def delete_task(store: Store, task_id: int) -> None:
    """Delete a task that is not running."""
    found = await store.delete_task(task_id)
    if found is None:
        raise TaskNotFound(task_id)
    if found is TaskState.RUNNING:
        raise TaskRunning(task_id)
