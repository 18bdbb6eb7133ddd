"""The domain: what a task is, the rules for new ones, and the operations the API offers.

Nothing here knows about HTTP or SQL: routes call these functions, these call the store.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from functions.errors import (
    Forbidden,
    IdempotencyKeyReused,
    InvalidInput,
    SchemaOutdated,
    TaskNotFound,
    TaskRunning,
    WrongState,
)
from functions.kinds import KINDS
from functions.queries import SCHEMA_REVISION

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
    # What the user asked for; never moved by retries or run now (only by a reschedule).
    execute_at: datetime
    # When a scheduled task is next due: execute_at at first, later a retry's or a run-now's
    # time.
    next_attempt_at: datetime | None
    created_at: datetime
    # When the first attempt started (retries keep it); None until a worker starts it.
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    output: str | None
    error: str | None
    # What the creating request sent as its idempotency key; held while the task exists.
    idempotency_key: str | None = None


@dataclass(frozen=True)
class NewTask:
    kind: str
    execute_at: datetime
    # A repeat of a request with this key gets the task the first one made, not a new one.
    idempotency_key: str | None = None

    def same_request(self, kind: str, execute_at: datetime) -> bool:
        """Whether a task made for `kind` at `execute_at` is what this request asks for."""
        return (kind, execute_at) == (self.kind, self.execute_at)


@dataclass(frozen=True)
class Page:
    items: list[Task]
    next_cursor: str | None


# The range of times a task may have: what Python's datetime holds, in UTC. The table
# enforces the same range (`execute_at_in_range`).
MIN_EXECUTE_AT = datetime(1, 1, 1, tzinfo=UTC)
MAX_EXECUTE_AT = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
# Unix seconds run from 0 up to, not including, END_UNIX_S: 10000-01-01T00:00:00Z. An
# exclusive bound, because a float cannot tell the last microsecond of 9999 from it
# (253402300799.999999 is the float 253402300800.0): every number below it is a time of
# 9999 or earlier, to the microsecond, and every number from it up is refused, whether
# written as an integer or not (JSON Schema's `exclusiveMaximum`, exactly).
END_UNIX_S = 253_402_300_800
# The most tasks one batch creates; the largest task id (PostgreSQL's bigint).
MAX_BATCH = 10_000
BIGINT_MAX = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# 1 to 255 printable ASCII characters, no space: what fits a header value unchanged (a
# header's surrounding spaces are trimmed in transit, so a key with spaces could arrive as
# another key). The table checks the same (`idempotency_key_printable`).
IDEMPOTENCY_KEY_PATTERN = "^[!-~]{1,255}$"
_FORMS = "an RFC 3339 date-time with an offset (e.g. 2030-01-01T12:00:00Z) or Unix seconds"
_RFC_3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?"  # (none: refused below, saying so)
)
# What a kind's name may have around it: ASCII spaces, tabs and line ends, nothing else, so
# that the API's schema can say exactly what it takes.
_BLANKS = " \t\n\r"


def any_case(words: Sequence[str], around: str = "") -> str:
    """A pattern matching exactly one of `words` in any case (with `around` repeated on
    either side), in a form every regex dialect reads alike (JSON Schema's, Python's,
    pydantic's), which inline flags are not."""
    spelled = ("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in w) for w in words)
    return f"^{around}(?:{'|'.join(spelled)}){around}$"


KIND_PATTERN = any_case(sorted(KINDS), around="[ \\t\\n\\r]*")

# The cursors `encode_cursor` makes, and only those: base64url (no padding) of "after:" and
# 1 to 19 ASCII digits. "after:" is "YWZ0ZXI6". Three digits (0011abcd 0011efgh 0011ijkl)
# make four characters: 0011ab (M, N, O: a digit is at most 1001), cd0011 (D, T, j, z; only
# D, T after O), efgh00 and 11ijkl; one or two digits left over make two or three.
_PAIR = "(?:[MN][DTjz]|O[DT])"
_THREE = f"{_PAIR}[AEIMQUYcgk][w-z0-5]"
_ONE = "(?:[MN][AQgw]|O[AQ])"
_TWO = f"{_PAIR}[AEIMQUYcgk]"
# 1 to 18 digits: up to five threes and a last group; 19: six threes and one.
CURSOR_PATTERN = (
    f"^YWZ0ZXI6(?:(?:{_THREE}){{0,5}}(?:{_THREE}|{_ONE}|{_TWO})|(?:{_THREE}){{6}}{_ONE})$"
)
_CURSOR = re.compile(CURSOR_PATTERN)


def parse_kind(value: object) -> str:
    """Return the kind named by `value`, matched case-insensitively."""
    if not isinstance(value, str):
        raise ValueError("type must be a string")
    name = value.strip(_BLANKS).lower()
    if name not in KINDS:
        raise ValueError(
            f"unknown type {excerpt(value)}; expected one of {', '.join(sorted(KINDS))}"
        )
    return name


def parse_idempotency_key(value: object) -> str:
    """Return `value` if it is an idempotency key this API takes (IDEMPOTENCY_KEY_PATTERN)."""
    if not isinstance(value, str) or not _IDEMPOTENCY_KEY.fullmatch(value):
        raise ValueError(
            f"idempotency key {excerpt(value)} is not 1 to 255 printable ASCII characters"
            " (`!` to `~`, no spaces)"
        )
    return value


_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


def parse_cursor(value: object) -> str:
    """Return `value` if it is a cursor this API issued (CURSOR_PATTERN), as it came."""
    if not isinstance(value, str) or not _CURSOR.fullmatch(value):
        raise ValueError(_NOT_A_CURSOR.format(excerpt(value)))
    return value


_NOT_A_CURSOR = (
    "cursor {} is not a cursor this API issued: send the `next_cursor` of the page before,"
    " as it came"
)


def excerpt(value: object, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters: errors never echo more of the input."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit] + value[-2:]
    try:
        text = repr(value)
    except ValueError:  # an integer of thousands of digits
        return "a number too long to show"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def parse_execute_at(value: object) -> datetime:
    """Return an aware UTC datetime from an RFC 3339 date-time with an offset, or from Unix seconds.

    A date-time without an offset is rejected rather than guessed at. Unix seconds are read
    to the microsecond from their decimal form (integers exactly).
    """
    if isinstance(value, bool):
        raise ValueError(f"execute_at must be {_FORMS}")
    if isinstance(value, int | float):
        return _from_unix_s(value)
    if isinstance(value, str):
        text = value.strip()
        # RFC 3339's form only: Python's parser also takes ISO 8601's others (20300101T1200Z,
        # week dates, hours alone) and offsets past 23:59 (+00:99, read as 1 h 39 min).
        if not _RFC_3339.fullmatch(text):
            raise ValueError(f"execute_at {excerpt(value)} is not {_FORMS}")
        try:
            # upper(): RFC 3339 allows a lowercase t and z, Python's parser does not.
            parsed = datetime.fromisoformat(text.upper())
        except ValueError:
            raise ValueError(f"execute_at {excerpt(value)} is not {_FORMS}") from None
        offset = parsed.utcoffset()
        if offset is None:
            raise ValueError(
                f"execute_at {excerpt(value)} has no UTC offset; add one, e.g. 'Z' or '+02:00'"
            )
        # On the range's first and last days, an offset that could leave it is refused even
        # where this time would not (0001-01-01T05:00+01:00): a rule the API's schema can
        # state exactly (DATE_TIME_PATTERN), unlike "the time is later than the offset".
        if (parsed.date() == MIN_EXECUTE_AT.date() and offset > timedelta(0)) or (
            parsed.date() == MAX_EXECUTE_AT.date() and offset < timedelta(0)
        ):
            raise ValueError(
                f"execute_at {excerpt(value)} is on the first or last day of the range with an"
                " offset that can take it out of 0001-01-01T00:00:00Z to"
                " 9999-12-31T23:59:59.999999Z: give it in UTC"
            )
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            # e.g. 9999-12-31T23:00:00-05:00, which is in year 10000 in UTC.
            raise ValueError(
                f"execute_at {excerpt(value)} is outside 0001-01-01T00:00:00Z to "
                "9999-12-31T23:59:59.999999Z once converted to UTC"
            ) from None
    raise ValueError(f"execute_at must be {_FORMS}")


# The date-time strings parse_execute_at refuses, among those of JSON Schema's `date-time`
# format (RFC 3339): year 0, a leap second (Python's datetime has none), and the offsets it
# refuses on the range's first and last days.
DATE_TIME_PATTERN = (
    "^(?!0000-"
    "|[^Tt ]*[Tt ][0-9]{2}:[0-9]{2}:60"
    "|0001-01-01[Tt ][^+]*[+](?!00:?00$)"
    "|9999-12-31[Tt ][^-]*-(?!00:?00$))"
)


def _from_unix_s(value: float) -> datetime:
    # (NaN and infinities fail the comparison; math.isfinite would raise on an integer of
    # over 308 digits.)
    if not 0 <= value < END_UNIX_S:
        raise ValueError(
            f"execute_at {excerpt(value)} is not a Unix time from 0 up to (not including)"
            f" {END_UNIX_S} (1970 to the end of 9999)"
        )
    us = _quick_us(value) if value.__class__ is float else None
    return _EPOCH + timedelta(microseconds=_unix_us(value) if us is None else us)


def _unix_us(value: float) -> int:
    """Unix seconds as whole microseconds, read from the number's shortest decimal form,
    not by float arithmetic: 1.000001 is one second and one microsecond, not a hair less;
    halves go to even. Below END_UNIX_S this stays in 9999: the largest float below it is
    30 us short of it."""
    text = repr(value)
    if "e" in text:  # below 1e-4 (never above END_UNIX_S)
        return int((Decimal(text) * 1_000_000).to_integral_value(ROUND_HALF_EVEN))
    whole, _, fraction = text.partition(".")
    us = int(whole) * 1_000_000 + int(fraction[:6].ljust(6, "0"))
    # The digits past the microsecond (a shortest form ends in no zero): over half, half.
    rest = fraction[6:]
    if rest > "5" or (rest == "5" and us % 2):
        us += 1
    return us


# The form most date-times come in: RFC 3339 in UTC, to the microsecond at most. Half the
# time of parse_execute_at (2.0 us against 4.2 here), with the same result.
_UTC_DATE_TIME = re.compile(
    "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:[.][0-9]{1,6})?Z"
)

# Below 2**31 s (2038), a float's shortest decimal form is within 2**-23 s of it (half its
# spacing there), and `value * 1e6` within 0.125 of its exact product (half the spacing of
# floats below 2**51): 0.2443 us in all. So when that product is within 0.25 of a whole
# number, the decimal form's microseconds round to that number, halves or not, and
# `_unix_us` need not be asked. (It costs ~1.7-5 us a value here; this, ~0.1 us.) Used
# below 2**30 s, where the exact reading that follows does not apply.
# From 2**30 s (2004) to 2**32 s (2106) a float is a whole number of 2**-22 s, so
# `value * 2**22 * 15625` is its product with 10**6 * 2**16, exactly, as an integer. There
# (ten digits before the point) its shortest decimal form is whole microseconds (16 digits
# or fewer), or the 17-digit decimal nearest it: within 0.05 us, 3276.8 in those units. When
# no half microsecond lies that close to the exact product, the decimal form rounds to the
# microsecond the product rounds to; a tenth of the values are that close, and go to
# `_unix_us`. (Measured: no mismatch past 3276 in 1.2 million floats next to halves.)
_EXACT_FROM_S = 2**30
_EXACT_BELOW_S = 2**32


def _quick_us(value: float) -> int | None:
    """`_unix_us(value)` where float arithmetic decides it (see above), else None."""
    if _EXACT_FROM_S <= value < _EXACT_BELOW_S:
        exact = int(value * 4194304.0) * 15625
        past_half = (exact & 0xFFFF) - 0x8000
        if -3276 <= past_half <= 3276:
            return None
        return (exact >> 16) + (past_half > 0)
    if value < _EXACT_FROM_S:
        us = round(product := value * 1e6)
        if abs(product - us) < 0.25:
            return us
    return None


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        parse_cursor(cursor)
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, last_id = raw.partition(":")
        if prefix != "after":
            raise ValueError(raw)
        return int(last_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput(_NOT_A_CURSOR.format(excerpt(cursor))) from None


async def check_schema(store: Store) -> str:
    """Return the database's schema revision; raise SchemaOutdated if it is behind this code.

    A newer one is fine: migrations keep the version before them working (they are applied
    while it still serves).
    """
    found = await store.schema_revision()
    if found is None or int(found) < int(SCHEMA_REVISION):
        raise SchemaOutdated(found, SCHEMA_REVISION)
    return found


async def create_task(store: Store, new: NewTask, max_attempts: int) -> tuple[Task, bool]:
    """Schedule one task; return it, and whether this call created it.

    With an idempotency key, a repeat of the request that created a task (same key, same
    kind and execute_at) gets that task back, whatever its state now (False); the same key
    with another kind or time raises IdempotencyKeyReused. Any number of concurrent
    requests with one key create one task.
    """
    if new.idempotency_key is None:
        return await store.insert_task(new, max_attempts), True
    return await store.insert_task_keyed(new, max_attempts)


async def create_tasks(store: Store, new: list[NewTask], max_attempts: int) -> list[int]:
    """Schedule many tasks; all are written or none. Return their ids in the order given.

    An item whose idempotency key names an existing task gets that task's id and creates
    nothing; items sharing a key share one task. A key sent with another kind or time (by
    an earlier request, or by another item here) fails the whole batch.
    """
    first: dict[str, int] = {}
    unique: list[NewTask] = []
    where: list[int] = []
    for i, item in enumerate(new):
        key = item.idempotency_key
        if key is None or key not in first:
            if key is not None:
                first[key] = i
            where.append(len(unique))
            unique.append(item)
            continue
        earlier = new[first[key]]
        if not earlier.same_request(item.kind, item.execute_at):
            raise IdempotencyKeyReused(
                f"tasks {first[key]} and {i} of the batch share idempotency key "
                f"{excerpt(key)} but differ in type or execute_at"
            )
        where.append(where[first[key]])
    ids = await store.insert_tasks(unique, max_attempts)
    return [ids[j] for j in where]


# The most JSON values a request body may hold (`count_values`): more than any body this
# API takes (a full batch with idempotency keys has 100,003), and few enough that reading
# them costs a few MB at most. Without it, 8 MiB of `{},` is 2.8 million dicts when read:
# ~200 MB for json.loads, as much again for pydantic-core, all before a 422.
MAX_VALUES = 12 * MAX_BATCH
TOO_MANY_VALUES = (
    f"the body holds more than {MAX_VALUES:,} JSON values (objects, arrays, strings and"
    f" items), more than any request takes: a batch holds at most {MAX_BATCH:,} tasks"
)


def count_values(body: bytes) -> int:
    """How many values a JSON body holds, without reading it: its strings, and its commas,
    `{` and `[` outside strings; a number no lower (a bracket or comma inside a string may
    count), and over MAX_VALUES only when the body holds more than MAX_VALUES.

    A few passes over the body in C (~0.1 s at most for 8 MiB): strings are told apart only
    when the bound counted with them is over MAX_VALUES.
    """

    def count(text: bytes) -> int:
        return text.count(b",") + text.count(b"{") + text.count(b"[")

    quotes = body.count(b'"')
    found = count(body) + quotes // 2
    if found <= MAX_VALUES or not quotes:
        return found
    # Without its escaped backslashes and quotes, every quote left in a body opens or closes
    # a string. (A backslash is JSON only inside a string: where there is one outside, the
    # body fails to parse there, and what follows is never read.)
    plain = body
    if b"\\" in body:
        plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = (plain.count(b'"') + 1) // 2
    if strings > MAX_VALUES:
        return strings
    return count(b"".join(plain.split(b'"')[::2])) + strings


def read_batch(items: list[Any]) -> list[dict[str, Any]] | None:
    """The batch's items as `store.insert_batch` takes them (kind, time in whole
    microseconds), if each is a task with a type and an execute_at and nothing else; None if
    any item has more (an idempotency key) or is refused (then `create_tasks`, through the
    full schema, says why).

    A 10,000-task batch is read here in a few milliseconds, by the rules a single task is
    read by: a type already in lowercase is taken as it is, any other goes through
    parse_kind; Unix seconds become microseconds as `_unix_us` makes them; a string goes
    through parse_execute_at.
    """
    out: list[dict[str, Any]] = []
    append = out.append
    # Seconds `_unix_us` read already: a batch often holds one time many times.
    read: dict[float, int] = {}
    for item in items:
        if item.__class__ is not dict or len(item) != 2:
            return None
        kind = item.get("type")
        at = item.get("execute_at")
        if kind.__class__ is not str or kind not in KINDS:
            try:
                kind = parse_kind(kind)
            except ValueError:
                return None
        if at.__class__ is float:
            # (NaN fails the comparison; a bool is not a float or an int by class.)
            if not 0 <= at < END_UNIX_S:
                return None
            us = _quick_us(at)
            if us is None:
                us = read.get(at)
                if us is None:
                    us = read[at] = _unix_us(at)
        elif at.__class__ is int:
            if not 0 <= at < END_UNIX_S:
                return None
            us = at * 1_000_000
        else:
            try:
                if at.__class__ is str and _UTC_DATE_TIME.fullmatch(at):
                    # In UTC: parse_execute_at's checks of offsets have nothing to check.
                    us = (datetime.fromisoformat(at) - _EPOCH) // _MICROSECOND
                else:
                    us = (parse_execute_at(at) - _EPOCH) // _MICROSECOND
            except ValueError:  # (year 0, a leap second: parse_execute_at says why)
                return None
        append({"kind": kind, "at_us": us})
    return out


def new_task(kind: str, at_us: int, idempotency_key: str | None = None) -> NewTask:
    """A task read by `read_batch`, to create on its own."""
    return NewTask(kind, _EPOCH + timedelta(microseconds=at_us), idempotency_key)


# A batch is written a slice per statement, in one transaction, each sent as soon as it is
# read (Store.insert_batch): the database writes one slice while the next is read. The
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


async def create_batch(store: Store, items: list[Any], max_attempts: int) -> list[int] | None:
    """Read a batch's tasks, as sent, by `read_batch`, and schedule them; all are written or
    none. Return their ids in the order given; None, with nothing written, if `read_batch`
    refuses any (then `create_tasks`, through the full schema, says why)."""

    def read() -> Iterator[list[dict[str, Any]]]:
        for start, stop in _slices(len(items)):
            rows = read_batch(items[start:stop])
            if rows is None:
                raise _Refused
            yield rows

    try:
        return await store.insert_batch(read(), max_attempts)
    except _Refused:
        return None


class _Refused(Exception):
    """An item of a batch `read_batch` refuses."""


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
    states = () if state is None else (state,)
    rows = await store.list_tasks(states=states, kind=kind, after_id=after_id, limit=limit + 1)
    items = rows[:limit]
    next_cursor = encode_cursor(items[-1].id) if len(rows) > limit else None
    return Page(items=items, next_cursor=next_cursor)


async def list_in_states(store: Store, states: Sequence[TaskState], limit: int) -> list[Task]:
    """The first `limit` tasks in any of `states`, oldest first."""
    return await store.list_tasks(states=states, kind=None, after_id=0, limit=limit)


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


def _acted(
    task_id: int,
    outcome: tuple[TaskState | None, Task | None],
    action: str,
    allowed: TaskState,
) -> Task:
    found, task = outcome
    if found is None:
        raise TaskNotFound(task_id)
    if task is None:
        raise WrongState(task_id, found.value, action, allowed.value)
    return task


async def run_task(store: Store, task_id: int) -> Task:
    """Make a scheduled task due now; its execute_at stays the time the user asked for."""
    return _acted(task_id, await store.run_task(task_id), "run now", TaskState.SCHEDULED)


async def retry_task(store: Store, task_id: int, max_attempts: int) -> Task:
    """Schedule a failed task again, due now, with `max_attempts` more runs; its attempts
    so far and last error stay."""
    outcome = await store.retry_task(task_id, max_attempts)
    return _acted(task_id, outcome, "retried", TaskState.FAILED)


async def reschedule_task(store: Store, task_id: int, execute_at: datetime) -> Task:
    """Move a scheduled task to `execute_at`."""
    outcome = await store.reschedule_task(task_id, execute_at)
    return _acted(task_id, outcome, "rescheduled", TaskState.SCHEDULED)


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
