"""The operations the API and the worker offer on tasks: create, list, show, delete, act on,
prune. Nothing here knows about HTTP or SQL: routes call these functions, these call the store.

What a task is lives in `model`, how one is read from input in `parsing`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from functions.errors import (
    Forbidden,
    IdempotencyKeyReused,
    InvalidPayload,
    InvalidTimeout,
    InvalidValue,
    OccurrenceHeld,
    SchemaOutdated,
    TaskNotFound,
    TaskRunning,
    WrongState,
)
from functions.kinds import KINDS
from functions.model import (
    DEFAULT_ORDER,
    MAX_PAGE_BYTES,
    AttemptPage,
    BulkAction,
    ErrorGroup,
    ListedTask,
    NewTask,
    Page,
    Position,
    SortKey,
    Task,
    TaskFilter,
    TaskOrder,
    TaskState,
    WrittenPage,
    fits_one_answer,
    from_microseconds,
    microseconds,
    position_of,
)
from functions.parsing import (
    decode_cursor,
    encode_cursor,
    excerpt,
    payload_json,
    read_batch,
    same_payload,
)
from functions.queries import SCHEMA_REVISION
from functions.settings import Settings
from functions.store import Acted, Store, WrittenRows


async def check_schema(store: Store) -> str:
    """Return the database's schema revision; raise SchemaOutdated if it is behind this code.

    A newer one is fine: migrations keep the version before them working (they are applied
    while it still serves).
    """
    found = await store.schema_revision()
    if found is None or int(found) < int(SCHEMA_REVISION):
        raise SchemaOutdated(found, SCHEMA_REVISION)
    return found


def check_payload(kind: str, payload: Any, max_bytes: int, loc: tuple[str | int, ...]) -> None:
    """Raise InvalidPayload (422, at `loc`) unless `payload` is one a task may carry
    (`parsing.payload_json`) and one its kind takes (the kind's `check`, as `http`'s). The
    one place every create, and a PATCH of a payload, checks one."""
    try:
        if payload is not None:
            payload_json(payload, max_bytes)
        declared = KINDS.get(kind)
        if declared is not None and declared.check is not None:
            declared.check(payload)
    except ValueError as exc:
        raise InvalidPayload(loc, str(exc)) from None


def check_timeout(
    kind: str, timeout_s: float | None, settings: Settings, loc: tuple[str | int, ...]
) -> None:
    """Raise InvalidTimeout (422, at `loc`) if `timeout_s` is over the longest a run of
    `kind` may take (`Kind.max_seconds`: its declared `timeout_s`; a built-in's own figure)."""
    if timeout_s is not None:
        limit_s = KINDS[kind].max_seconds(settings)
        if timeout_s > limit_s:
            raise InvalidTimeout(
                loc,
                f"timeout_s {excerpt(timeout_s)} is over what kind {kind!r} allows: at most"
                f" {_seconds(limit_s)} s, its own timeout",
            )


def _seconds(value: float) -> str:
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


async def create_task(store: Store, new: NewTask, settings: Settings) -> tuple[Task, bool]:
    """Schedule one task; return it, and whether this call created it.

    With an idempotency key, a repeat of the request that created a task (same key, same
    kind, execute_at, payload and options) gets that task back, whatever its state now
    (False); the same key with another kind, time, payload or option raises
    IdempotencyKeyReused. Any number of concurrent requests with one key create one task. A
    payload over TASKRUNNER_MAX_PAYLOAD_BYTES, or one jsonb cannot store, raises
    InvalidPayload, and a timeout over its kind's InvalidTimeout, with nothing written.
    """
    check_payload(new.kind, new.payload, settings.max_payload_bytes, ("body", "payload"))
    check_timeout(new.kind, new.timeout_s, settings, ("body", "timeout_s"))
    if new.idempotency_key is None:
        return await store.insert_task(new, settings.max_attempts), True
    return await store.insert_task_keyed(new, settings.max_attempts)


async def create_tasks(store: Store, new: list[NewTask], settings: Settings) -> list[int]:
    """Schedule many tasks; all are written or none. Return their ids in the order given.

    An item whose idempotency key names an existing task gets that task's id and creates
    nothing; items sharing a key share one task. A key sent with another kind, time,
    payload or option (by an earlier request, or by another item here), or any item's
    payload or timeout refused (InvalidPayload, InvalidTimeout), fails the whole batch.
    """
    first: dict[str, int] = {}
    unique: list[NewTask] = []
    where: list[int] = []
    for i, item in enumerate(new):
        loc = ("body", "tasks", i)
        check_payload(item.kind, item.payload, settings.max_payload_bytes, (*loc, "payload"))
        check_timeout(item.kind, item.timeout_s, settings, (*loc, "timeout_s"))
    for i, item in enumerate(new):
        key = item.idempotency_key
        if key is None or key not in first:
            if key is not None:
                first[key] = i
            where.append(len(unique))
            unique.append(item)
            continue
        earlier = new[first[key]]
        if (
            not earlier.same_request(item.kind, item.execute_at)
            or not same_payload(earlier.payload, item.payload)
            or earlier.options(settings.max_attempts) != item.options(settings.max_attempts)
        ):
            raise IdempotencyKeyReused(
                f"tasks {first[key]} and {i} of the batch share idempotency key "
                f"{excerpt(key)} but differ in type, execute_at, payload, max_attempts,"
                " timeout_s or priority"
            )
        where.append(where[first[key]])
    ids = await store.insert_tasks(unique, settings.max_attempts)
    return [ids[j] for j in where]


# A batch is written a slice per statement, in one transaction, each sent as soon as it is
# read (Store.insert_tasks_streamed): the database writes one slice while the next is read. The
# first slice is small, so the database starts early; each next is twice as large, so a
# batch of 10,000 is five statements, and reading a slice (~1.3 us a task here, against
# ~6 us to write one) never keeps the database waiting. Measured on `taskrunner bench`'s
# batches (embedded PostgreSQL 18): 58-74% of the raw INSERT read whole, 82-117% in slices.
FIRST_SLICE = 500


def _slices(n: int) -> Iterator[tuple[int, int]]:
    """`(start, stop)` of each slice of a batch of `n` items."""
    start, size = 0, FIRST_SLICE
    while start < n:
        yield start, min(n, start + size)
        start, size = start + size, size * 2


async def create_tasks_streamed(
    store: Store, items: list[Any], settings: Settings
) -> list[int] | None:
    """Read a batch's tasks, as sent, by `read_batch`, and schedule them; all are written or
    none. Return their ids in the order given; None, with nothing written, if `read_batch`
    refuses any (then `create_tasks`, through the full schema, says why). A payload or a
    timeout refused raises InvalidPayload or InvalidTimeout, with nothing written."""
    max_payload_bytes = settings.max_payload_bytes

    # Kinds that check their payload (`http`): their items are checked with or without one.
    checked = {name for name, declared in KINDS.items() if declared.check is not None}

    def read() -> Iterator[list[dict[str, Any]]]:
        for start, stop in _slices(len(items)):
            rows = read_batch(items[start:stop])
            if rows is None:
                raise _ItemRefused
            for i, row in enumerate(rows, start):
                if len(row) == 2 and row["kind"] not in checked:
                    continue  # (a kind and a time alone: most items)
                if "payload" in row or row["kind"] in checked:
                    check_payload(
                        row["kind"],
                        row.get("payload"),
                        max_payload_bytes,
                        ("body", "tasks", i, "payload"),
                    )
                if "timeout_s" in row:
                    loc = ("body", "tasks", i, "timeout_s")
                    check_timeout(row["kind"], row["timeout_s"], settings, loc)
            yield rows

    try:
        return await store.insert_tasks_streamed(read(), settings.max_attempts)
    except _ItemRefused:
        return None


class _ItemRefused(Exception):
    """An item of a batch `read_batch` refuses."""


async def get_task(store: Store, task_id: int) -> Task:
    task = await store.get_task(task_id)
    if task is None:
        raise TaskNotFound(task_id)
    return task


async def list_attempts(
    store: Store, task_id: int, *, limit: int, cursor: str | None
) -> AttemptPage:
    """A task's attempts, oldest first, a page of `limit` past `cursor` (the last attempt
    number of the page before: `next_cursor`)."""
    after = 0 if cursor is None else int(cursor)
    found = await store.list_attempts(task_id, after=after, limit=limit)
    if found is None:
        raise TaskNotFound(task_id)
    items, more = found
    return AttemptPage(items, str(items[-1].attempt) if more and items else None)


async def list_errors(
    store: Store, *, since: datetime | None, until: datetime | None, kind: str | None
) -> tuple[datetime, list[ErrorGroup]]:
    """The attempts that ended in an error in [since, until) (since: 24 hours ago by
    default; until: now), grouped by kind and normalised error, the most frequent first."""
    return await store.list_errors(since=since, until=until, kind=kind)


async def list_tasks(
    store: Store,
    matching: TaskFilter,
    *,
    limit: int,
    cursor: str | None,
    order: TaskOrder | None = None,
) -> Page | WrittenPage:
    """List the tasks `matching` in `order` (None: the cursor's, else DEFAULT_ORDER);
    `next_cursor` is None on the last page. A page may hold fewer than `limit` tasks and
    still have a `next_cursor` (a filter its order's index does not serve reads SCAN_ROWS
    rows a page at most: queries.Listing)."""
    after = decode_cursor(cursor) if cursor else None
    if after is not None and order is not None and after.order != order:
        raise InvalidValue(
            ("query", "sort"),
            f"the cursor goes on in the order sort={after.order.name} it was made in, not"
            f" sort={order.name}: send that sort with it, or none",
        )
    order = after.order if after is not None else order or DEFAULT_ORDER
    at = None
    if after is not None:
        at = (from_microseconds(after.key) if order.key is not SortKey.ID else after.key, after.id)
    # Most pages (no task on them with a timeout or a payload, within an answer's size) are
    # written whole by the database; any other is read as rows and written in Python.
    written = await store.list_page_text(matching, order, after=at, limit=limit + 1)
    if written is not None:
        items_json = written.text.encode()
        if fits_one_answer(items_json):
            return WrittenPage(items_json, _next_cursor(order, limit, written))
    rows, cut, stopped = await store.list_tasks(
        matching, order, after=at, limit=limit + 1, max_bytes=MAX_PAGE_BYTES
    )
    items = rows[:limit]
    if len(rows) > limit or cut:
        next_cursor: str | None = encode_cursor(position_of(items[-1], order))
    elif stopped is not None:
        key = stopped[0] if order.key is SortKey.ID else microseconds(stopped[0])
        next_cursor = encode_cursor(Position(order, key, stopped[1]))
    else:
        next_cursor = None
    return Page(items=items, next_cursor=next_cursor, order=order)


def _next_cursor(order: TaskOrder, limit: int, written: WrittenRows) -> str | None:
    """The cursor of a page `written` whole, as `list_tasks` makes one of rows."""
    if written.count > limit and written.last is not None:
        return encode_cursor(position_of(written.last, order))
    if written.bound is not None:
        key = written.bound[0] if order.key is SortKey.ID else microseconds(written.bound[0])
        return encode_cursor(Position(order, key, written.bound[1]))
    return None


async def list_in_states(store: Store, states: Sequence[TaskState], limit: int) -> list[ListedTask]:
    """The first `limit` tasks in any of `states`, oldest first."""
    found, _, _ = await store.list_tasks(
        TaskFilter(states=tuple(states)),
        _OLDEST_FIRST,
        after=None,
        limit=limit,
        max_bytes=MAX_PAGE_BYTES,
        bounded=False,
    )
    return found


_OLDEST_FIRST = TaskOrder(SortKey.ID, descending=False)


async def delete_all(store: Store, *, allowed: bool) -> int:
    """Delete every task that is not running (for testing); return how many went.

    Refused unless `allowed`: TASKRUNNER_ALLOW_DELETE_ALL=true.
    """
    if not allowed:
        raise Forbidden(
            "deleting every task is for testing, and refused unless the setting"
            " TASKRUNNER_ALLOW_DELETE_ALL=true"
        )
    return await store.delete_all()


async def delete_task(store: Store, task_id: int) -> None:
    """Delete a task that is not running."""
    found = await store.delete_task(task_id)
    if found is None:
        raise TaskNotFound(task_id)
    if found is TaskState.RUNNING:
        raise TaskRunning(task_id)


def _task_or_refusal(task_id: int, outcome: Acted, action: str, allowed: str) -> Task:
    found, task, held_by = outcome
    if found is None:
        raise TaskNotFound(task_id)
    if held_by is not None:
        raise OccurrenceHeld(task_id, held_by)
    if task is None:
        raise WrongState(task_id, found.value, action, allowed)
    return task


async def run_task(store: Store, task_id: int) -> Task:
    """Make a scheduled task due now; its execute_at stays the time the user asked for."""
    return _task_or_refusal(task_id, await store.run_task(task_id), "run now", "scheduled")


async def retry_task(store: Store, task_id: int, max_attempts: int) -> Task:
    """Schedule a failed or cancelled task again, due now, with `max_attempts` more runs;
    its attempts so far and last error stay."""
    outcome = await store.retry_task(task_id, max_attempts)
    return _task_or_refusal(task_id, outcome, "retried", "failed or cancelled")


# A cancel that finds the task neither cancellable nor cancelled (retried between the cancel
# and the read of what it found) tries again, this many times in all.
_CANCEL_TRIES = 3


async def cancel_task(store: Store, task_id: int) -> Task:
    """Cancel a scheduled or running task at once: nothing more runs for it, and no result
    is written over it. A task cancelled before comes back as it is; a task that succeeded
    or failed raises WrongState."""
    for tries_left in reversed(range(_CANCEL_TRIES)):
        task = await store.cancel_task(task_id)
        if task is not None:
            return task
        found = await store.get_task(task_id)
        if found is None:
            raise TaskNotFound(task_id)
        if found.state is TaskState.CANCELLED:
            return found
        if found.state in (TaskState.SUCCEEDED, TaskState.FAILED) or not tries_left:
            raise WrongState(task_id, found.state.value, "cancelled", "scheduled or running")
    raise AssertionError("unreachable: the last try returns or raises")


async def cancel_tasks(store: Store, matching: TaskFilter, limit: int) -> int:
    """Cancel up to `limit` scheduled or running tasks `matching`, lowest ids first; return
    how many. A task outside the filter is never touched."""
    return await store.cancel_matching(matching, limit=limit)


async def retry_tasks(store: Store, matching: TaskFilter, limit: int, max_attempts: int) -> int:
    """Schedule again, as `retry_task` does, up to `limit` failed or cancelled tasks
    `matching`, lowest ids first; return how many."""
    return await store.retry_matching(matching, limit=limit, max_attempts=max_attempts)


async def delete_tasks(store: Store, matching: TaskFilter, limit: int) -> int:
    """Delete up to `limit` tasks `matching` that are not running, lowest ids first, with
    all that is kept of each (as a prune deletes a task); return how many."""
    return await store.delete_matching(matching, limit=limit)


async def count_bulk(
    store: Store, action: BulkAction, matching: TaskFilter, limit: int
) -> tuple[int, bool]:
    """How many tasks `matching` the bulk `action` would act on now with `limit` (a dry
    run: nothing changes), and whether more than `limit` match."""
    found = await store.count_matching(action, matching, limit=limit + 1)
    return min(found, limit), found > limit


async def reschedule_task(
    store: Store,
    task_id: int,
    execute_at: datetime | None,
    *,
    set_payload: bool = False,
    payload: Any = None,
    max_payload_bytes: int = 0,
) -> Task:
    """Move a scheduled task to `execute_at` (None: its time stays), and, with
    `set_payload`, give it `payload` (None clears it). A payload refused raises
    InvalidPayload, with nothing changed."""
    if set_payload:
        # The kind's own rules need the kind, which a task keeps for good: read first. No
        # such task: 404, whatever the payload (one the rules refuse, U+0000, was sent to
        # the database unchecked, which refused it: a 500).
        task = await store.get_task(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        check_payload(task.kind, payload, max_payload_bytes, ("body", "payload"))
    outcome = await store.reschedule_task(
        task_id, execute_at, set_payload=set_payload, payload=payload
    )
    action = (
        "rescheduled"
        if not set_payload
        else "given a payload"
        if execute_at is None
        else ("rescheduled or given a payload")
    )
    return _task_or_refusal(task_id, outcome, action, TaskState.SCHEDULED)


async def prune(store: Store, *, older_than_s: float, budget_s: float | None = None) -> int:
    """Delete finished tasks older than `older_than_s`, a bounded batch at a time, until none
    is left or `budget_s` has passed; return how many. Their idempotency keys are free again.
    """
    started = time.monotonic()
    pruned = 0
    while True:
        batch = await store.prune_finished(older_than_s=older_than_s)
        pruned += batch
        if batch < store.WRITE_BATCH:
            break
        if budget_s is not None and time.monotonic() - started > budget_s:
            break
    await store.prune_activity()
    return pruned
