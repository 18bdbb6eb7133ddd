"""What a task is: its states, its fields, a new one, a page of them, and the limits on each.

The bottom of the package: it imports nothing of ours, so anything may import it. Reading
these from input is `parsing`'s; doing something with them is `tasks`'s (through `store`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any


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
    # Set by a cancel (the API's, one task or by filter; a schedule's when disabled or
    # deleted) of a task that had not finished. A worker running it stops it and records
    # nothing.
    CANCELLED = "cancelled"


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
    # Any JSON value, given to the kind as `ctx.payload`; None when there is none (JSON null).
    payload: Any = None
    # The schedule that made this task, and the occurrence it is (None for any other task).
    schedule: str | None = None
    scheduled_for: datetime | None = None
    # 0 (the default) to 9: among tasks that are due, a lower number runs first.
    priority: int = 0
    # A run still going after this long is stopped; None: the kind's own limit.
    timeout_s: float | None = None
    # While it runs: the worker that holds it, when this attempt was claimed, and until when
    # the worker's lease covers it (renewed by its heartbeat); None otherwise.
    worker: str | None = None
    running_since: datetime | None = None
    lease_expires_at: datetime | None = None


@dataclass(frozen=True)
class Worker:
    """A worker or tick, as GET /workers lists it."""

    id: str
    # Who it is (None for one registered by a version before these were kept).
    host: str | None
    pid: int | None
    started_at: datetime
    kinds: list[str] | None
    # Its running tasks now.
    running: int
    last_heartbeat_at: datetime
    version: str | None
    # A tick (Lambda, `taskrunner tick`) rather than a long-lived worker.
    tick: bool
    # live; left (it signed off); dead (its lease ran out: its tasks were rescued).
    state: str
    # Until when its lease covers what it holds; when it left or died, for the others.
    lease_expires_at: datetime
    # How many of its tasks were rescued once its lease ran out.
    rescued: int


@dataclass(frozen=True)
class NewTask:
    kind: str
    execute_at: datetime
    # A repeat of a request with this key gets the task the first one made, not a new one.
    idempotency_key: str | None = None
    # Any JSON value (as `json.loads` reads it); checked by `parsing.payload_json`.
    payload: Any = None
    # The task's options (`parsing.parse_max_attempts`, `parse_timeout_s`, `parse_priority`):
    # None for max_attempts is TASKRUNNER_MAX_ATTEMPTS, for timeout_s the kind's own limit.
    max_attempts: int | None = None
    timeout_s: float | None = None
    priority: int = 0

    def same_request(self, kind: str, execute_at: datetime) -> bool:
        """Whether a task made for `kind` at `execute_at` is what this request asks for."""
        return (kind, execute_at) == (self.kind, self.execute_at)

    def options(self, default_max_attempts: int) -> tuple[int, float | None, int]:
        """(max_attempts, timeout_s, priority) as the task is made with them: what an
        idempotency key stands for besides the kind, the time and the payload."""
        max_attempts = default_max_attempts if self.max_attempts is None else self.max_attempts
        return max_attempts, self.timeout_s, self.priority


class CatchUp(StrEnum):
    """What a schedule creates for the occurrences it missed (everything was stopped)."""

    # One task, for the most recent occurrence missed.
    LATEST = "latest"
    # One task per occurrence missed, the most recent MAX_CATCH_UP of them.
    ALL = "all"
    # None: only occurrences still to come (and those due less than a minute ago).
    NONE = "none"


@dataclass(frozen=True)
class Schedule:
    """A task that recurs: each occurrence of `cron` in `timezone` becomes one task."""

    name: str
    kind: str
    # Five fields, or @hourly, @daily, @weekly, @monthly, @yearly.
    cron: str
    # An IANA name, read with zoneinfo.
    timezone: str
    payload: Any = None
    # The options each of its tasks gets; None: the deployment's defaults.
    max_attempts: int | None = None
    timeout_s: float | None = None
    priority: int | None = None
    catch_up: CatchUp = CatchUp.LATEST
    enabled: bool = True
    # The last occurrence it created a task for (None: none yet).
    last_occurrence_at: datetime | None = None
    # The first occurrence it has not created yet; None while disabled.
    next_run_at: datetime | None = None
    # Occurrences missed while everything was stopped that catch_up did not create.
    skipped_occurrences: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # The task of the last occurrence made, and its state (None: none, or it was deleted).
    last_task_id: int | None = None
    last_task_state: TaskState | None = None


@dataclass(frozen=True)
class SchedulePage:
    items: list[Schedule]
    next_cursor: str | None


# A schedule's name: what a URL path segment holds as it is.
SCHEDULE_NAME_PATTERN = "^[a-z0-9][a-z0-9_.-]{0,127}$"
# The most occurrences one schedule catches up with `catch_up: all` after downtime.
MAX_CATCH_UP = 1_000


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks a listing, a bulk cancel or a bulk retry is about: every condition given
    holds (an empty tuple or None: no condition). Times bound a range: `_after` exclusive,
    `_before` exclusive."""

    # In any of these states, of any of these kinds.
    states: tuple[TaskState, ...] = ()
    kinds: tuple[str, ...] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    execute_after: datetime | None = None
    execute_before: datetime | None = None
    finished_after: datetime | None = None
    finished_before: datetime | None = None
    # A substring of the task's last error, in any case (tasks that never failed have none).
    error: str | None = None
    # Made by this schedule.
    schedule: str | None = None
    # The payload contains this JSON (jsonb's `@>`), given as compact JSON text; "null": the
    # task has no payload.
    payload: str | None = None


class SortKey(StrEnum):
    ID = "id"
    EXECUTE_AT = "execute_at"
    # Only finished tasks (succeeded, failed, cancelled) have a finished_at: a listing in
    # this order holds those alone.
    FINISHED_AT = "finished_at"


@dataclass(frozen=True)
class TaskOrder:
    """The order a listing is in: by `key`, then by id, both ascending or both descending."""

    key: SortKey = SortKey.ID
    descending: bool = True

    @property
    def name(self) -> str:
        """As the `sort` parameter spells it: `-id`, `execute_at`, ..."""
        return ("-" if self.descending else "") + self.key.value


# The order of a listing when none is asked for: newest first.
DEFAULT_ORDER = TaskOrder()
# The `sort` values a listing takes.
SORTS = tuple(f"{sign}{key.value}" for key in SortKey for sign in ("", "-"))


@dataclass(frozen=True)
class Position:
    """Where a page ended in its order: the last task's sort key (a time in microseconds
    since the epoch, for the time keys; its id for `id`) and id. A cursor holds it."""

    order: TaskOrder
    key: int
    id: int


@dataclass(frozen=True, slots=True)
class ListedTask:
    """A task as a listing reads it (GET /tasks, the original routes' lists): what places
    it in an order, what its answer writes in Python (the timeout, and the payload through
    its kind's `show`), and `head`, the JSON of its other fields as the database wrote it
    (queries.LISTED_JSON): a page is not a Task built and encoded in Python per row."""

    id: int
    kind: str
    execute_at: datetime
    finished_at: datetime | None
    timeout_s: float | None
    payload: Any
    # `{"id":...` up to the value of `lease_expires_at`, without the closing brace.
    head: str


@dataclass(frozen=True)
class Page:
    items: list[Task] | list[ListedTask]
    next_cursor: str | None
    # The order the items are in: a cursor made from one of them goes on in it.
    order: TaskOrder = DEFAULT_ORDER


@dataclass(frozen=True)
class WrittenPage:
    """A page of tasks whose JSON the database wrote whole (tasks.list_tasks): the answer's
    `items`, comma separated, as `Page`'s would be written, and its cursor."""

    items_json: bytes
    next_cursor: str | None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def microseconds(when: datetime) -> int:
    """`when` as whole microseconds since the Unix epoch (negative before 1970)."""
    return (when - _EPOCH) // timedelta(microseconds=1)


def from_microseconds(us: int) -> datetime:
    """The time `us` microseconds after the epoch, held within MIN/MAX_EXECUTE_AT."""
    first, last = microseconds(MIN_EXECUTE_AT), microseconds(MAX_EXECUTE_AT)
    return _EPOCH + timedelta(microseconds=min(max(us, first), last))


def position_of(task: Task | ListedTask, order: TaskOrder) -> Position:
    """Where `task` stands in `order` (a page that ends with it goes on from there)."""
    if order.key is SortKey.ID:
        return Position(order, task.id, task.id)
    when = task.execute_at if order.key is SortKey.EXECUTE_AT else task.finished_at
    assert when is not None, "a listing by finished_at holds finished tasks only"
    return Position(order, microseconds(when), task.id)


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
# A task's own options: its attempts at create (a retry adds TASKRUNNER_MAX_ATTEMPTS more
# later, as it does to any task), and its priority, 0 running first (the table checks the
# same range: `priority_in_range`, migration 0009).
MAX_ATTEMPTS_AT_CREATE = 1_000
MIN_PRIORITY, MAX_PRIORITY = 0, 9
# The most tasks one batch creates; the largest task id (PostgreSQL's bigint).
MAX_BATCH = 10_000
# How many tasks a page reads at most, in its order, to find those a filter that its index
# does not serve (a time range, `error`, `payload`) selects: a page may then hold fewer than
# its limit, even none, with a `next_cursor` that goes on from the last task read. So the
# first page of any filter answers in about the same time, however rare its matches.
SCAN_ROWS = 5_000
# The longest `error` a listing searches for, in characters.
MAX_ERROR_SEARCH = 200
# The most bytes of the JSON a `payload` filter holds.
MAX_PAYLOAD_FILTER_BYTES = 4096
# The most tasks one bulk cancel, retry or delete acts on, and how many when not told.
MAX_BULK = 10_000
DEFAULT_BULK = 1_000


class BulkAction(StrEnum):
    """What POST /tasks/{action} does to the tasks matching its filters (and a `dry_run` of
    it counts)."""

    # Scheduled and running tasks become cancelled.
    CANCEL = "cancel"
    # Failed and cancelled tasks are scheduled again, due now.
    RETRY = "retry"
    # Every task but a running one is deleted.
    DELETE = "delete"


BIGINT_MAX = 2**63 - 1
# 1 to 255 printable ASCII characters, no space or comma: what fits a header value unchanged
# (a header's surrounding spaces are trimmed in transit, so a key with spaces could arrive as
# another key) and cannot be two keys (API Gateway joins a header sent twice with a comma).
# The table checks printable ASCII (`idempotency_key_printable`).
IDEMPOTENCY_KEY_PATTERN = "^[!-+\\--~]{1,255}$"
# How deep a payload may nest (`[[1]]` is 2): far below what json.loads, pydantic-core
# (200) and PostgreSQL's jsonb read, so a stored payload can always be read back, by any of
# them, in any stack.
MAX_PAYLOAD_DEPTH = 100
# The most bytes one answer listing tasks holds (`GET /tasks`, `GET /taskstate/{state}`):
# under Lambda's 6 MB response limit with room to spare, counted as Lambda's envelope holds
# the body (`responses.enveloped_size`); a page of large payloads is shorter.
MAX_PAGE_BYTES = 5_000_000
# The most bytes a payload may have (TASKRUNNER_MAX_PAYLOAD_BYTES at most): a task with one
# is an answer of its own under MAX_PAGE_BYTES, counted as Lambda's response carries it.
# There a character of 2 bytes in UTF-8 takes 6 (`\u00e9`) and one of 4 takes 12: a payload
# takes at most three times its bytes (4.7 MB for this one), and the rest of its task fits
# beside it. (At 4 MiB, a task with a payload of `é`s was a 12.6 MB answer, over Lambda's
# 6 MB.)
MAX_PAYLOAD_BYTES = 1536 * 1024


# The most JSON values any body may hold, whatever TASKRUNNER_MAX_BODY_BYTES allows: json.loads
# builds every one before a rule can look at them, ~75 bytes each at worst (212 MB for the 2.8
# million of 8 MiB of `{},`, measured), so a body is refused unread past this: ~53 MB at most.
# It is above what any request of this API holds: 10,000 tasks and 15 payloads of 64 KiB of the
# densest JSON (`[],` ... : 655,000 values) fit.
MAX_VALUES_READ = 700_000


def max_values(max_body_bytes: int) -> int:
    """The most JSON values (`parsing.count_values`) a body may hold: two in three bytes, as
    `[],` `{},` and `"",` do (no JSON is denser), up to MAX_VALUES_READ. A body with more is
    refused before it is read (json.loads would build them all first)."""
    return min(max_body_bytes * 2 // 3 + 2, MAX_VALUES_READ)


def too_many_values(max_body_bytes: int) -> str:
    """Why a body over `max_values` is refused."""
    most = max_values(max_body_bytes)
    if most == MAX_VALUES_READ:
        return (
            f"the body holds more than {most:,} JSON values (objects, arrays, strings and"
            " items), more than any request takes: at most 10,000 tasks, each payload at most"
            " TASKRUNNER_MAX_PAYLOAD_BYTES"
        )
    return (
        f"the body is not JSON this API reads: it holds more than {most:,}"
        f" JSON values (objects, arrays, strings and items), more than"
        f" TASKRUNNER_MAX_BODY_BYTES ({max_body_bytes:,}) bytes of JSON can"
    )


# --- attempts (migration 0016) -------------------------------------------------------------


class Outcome(StrEnum):
    """How an attempt ended (None in an answer: it is still running)."""

    SUCCEEDED = "succeeded"  # its worker: the run returned (a first attempt's is the task's)
    FAILED = "failed"  # its worker: the run raised, and no attempt is left (or `Fail`)
    RETRIED = "retried"  # its worker: the run raised, and the task is due again later
    TIMED_OUT = "timed_out"  # its worker: stopped at its time limit (retried or failed after)
    CANCELLED = "cancelled"  # a cancel of the task while it ran
    LOST = "lost"  # the rescue: its worker's lease ran out while it ran


# The outcomes GET /errors groups: the attempts that ended in an error.
ERROR_OUTCOMES = (Outcome.FAILED, Outcome.RETRIED, Outcome.TIMED_OUT, Outcome.LOST)
# A traceback is kept up to this many bytes (UTF-8): its end, where the error is.
MAX_TRACEBACK_BYTES = 8192
# An attempt's normalised error is kept up to this many characters.
MAX_ERROR_GROUP = 1000
# GET /errors answers at most this many groups, the most frequent first.
MAX_ERROR_GROUPS = 200
# GET /tasks/{id}/attempts: a page's default and largest sizes (an attempt holds up to
# 16 KiB of error and 8 KiB of traceback).
DEFAULT_ATTEMPTS_PAGE = 20
MAX_ATTEMPTS_PAGE = 50


@dataclass(frozen=True)
class Attempt:
    """One attempt of a task, as GET /tasks/{id}/attempts shows it."""

    attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    outcome: Outcome | None
    error: str | None
    traceback: str | None


@dataclass(frozen=True)
class AttemptPage:
    items: list[Attempt]
    next_cursor: str | None


@dataclass(frozen=True)
class ErrorGroup:
    """Attempts of one kind that ended with one normalised error, in a window (GET /errors)."""

    kind: str
    error: str
    count: int
    first_seen: datetime
    last_seen: datetime
    sample_task: int

    @property
    def search(self) -> str:
        """Text to find this group's tasks with GET /tasks?error=: the longest part of the
        normalised error that no placeholder cut (stripped), at most its first
        MAX_ERROR_SEARCH characters (code points). Each part is text of the error as it was,
        so it finds the tasks whose last error this is."""
        parts = _PLACEHOLDER.split(_CUT_PLACEHOLDER.sub("", self.error))
        longest = max((p.strip() for p in parts), key=len, default="")
        return longest[:MAX_ERROR_SEARCH].rstrip()


# The rule that folds an error's variable parts, in this order: UUIDs; timestamps (ISO 8601
# / RFC 3339: a date, `T` or a space, hours and minutes, maybe seconds and their fraction,
# maybe `Z` or an offset); IPv6 addresses (8 groups, or fewer around `::`, holding a digit,
# maybe an IPv4 address last); hex ids (`0x...`, or a word of 6 or more hex digits holding a
# digit and a letter: a worker's random part, a digest); numbers (digits, with the `.`- or
# `,`-separated groups and the exponent that follow: `5.5`, `1,000`, `127.0.0.1` are one
# each) that do not end a word (`http2`, `sha256` stay). Each becomes a placeholder below.
_UUID = re.compile(r"\b[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\b")
_TIME = re.compile(
    r"(?<![\w.:-])[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]+)?)?"
    r"(?:[Zz]|[-+][0-9]{2}(?::?[0-9]{2})?)?(?![\w:])"
)
_G, _V4 = r"[0-9a-fA-F]{1,4}", r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}"
_IPV6 = re.compile(
    rf"(?<![\w:.])(?=[0-9a-fA-F:.]*[0-9])(?:(?:{_G}:){{7}}{_G}|(?:{_G}:){{6}}{_V4}"
    rf"|(?:{_G}(?::{_G}){{0,6}})?::(?:(?:{_G}:){{0,6}}(?:{_V4}|{_G}))?)(?![\w:])"
)
_HEX = re.compile(
    r"\b(?:0[xX][0-9a-fA-F]+|(?=[0-9a-fA-F]*[0-9])(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{6,})\b"
)
_NUMBER = re.compile(r"(?<![A-Za-z0-9_])[0-9]+(?:[.,][0-9]+)*(?:[eE][-+]?[0-9]+)?")
# Every placeholder a normalised error holds: the folds above, and a lost attempt's worker
# (written by the rescue: queries.RESCUE_EXPIRED).
_NAMES = ("uuid", "time", "hex", "n", "worker")
_PLACEHOLDER = re.compile(r"<(?:" + "|".join(_NAMES) + r")>")
# A placeholder cut short at the end (`<uu`, by MAX_ERROR_GROUP): text no error held.
_CUT_PLACEHOLDER = re.compile(
    r"<(?:" + "|".join(name[:i] for name in _NAMES for i in range(len(name) + 1)) + r")\Z"
)


def normalise_error(error: str) -> str:
    """`error` with UUIDs, timestamps, IPv6 addresses, hex ids and numbers folded (`<uuid>`,
    `<time>`, `<n>`, `<hex>`, `<n>`: IPv6 as IPv4), cut to MAX_ERROR_GROUP characters, never
    within a placeholder: the attempts GET /errors groups together."""
    folded = _TIME.sub("<time>", _UUID.sub("<uuid>", error))
    folded = _NUMBER.sub("<n>", _HEX.sub("<hex>", _IPV6.sub("<n>", folded)))
    end = MAX_ERROR_GROUP
    for placeholder in _PLACEHOLDER.finditer(folded, max(0, end - 8), end + 8):
        if placeholder.start() < end < placeholder.end():
            end = placeholder.start()
    return folded[:end]


# What a page's JSON holds besides its items: `{"items":[`, `],"next_cursor":`, a cursor
# (at most 36 characters, quoted) and `}`, rounded up, escaped as Lambda's envelope has it.
PAGE_ROOM = 100


def enveloped_size(text: bytes) -> int:
    """How many bytes the JSON `text` takes once it is the `body` string of a Lambda
    response, as the runtime sends it: JSON-escaped, `"` and `\\` as two bytes each, and every
    other character beyond ASCII as `\\uXXXX` (awslambdaric writes the response with
    `ensure_ascii`, as python3.11 does): a character of 2 or 3 bytes in UTF-8 takes 6, one of
    4 takes 12. Never less than `len(text)`, so a page measured by it is as short as ever
    served from a server. (`text` holds no raw control character: JSON escapes them.)"""
    if text.isascii():
        return len(text) + text.count(b'"') + text.count(b"\\")
    return len(json.dumps(text.decode())) - 2


def fits_one_answer(items_json: bytes) -> bool:
    """Whether a page whose items are `items_json` (comma separated) is one answer of at
    most MAX_PAGE_BYTES, as responses.page_json measures a page item by item: the sizes
    add up, the commas included. A page a third of that size or less fits, unmeasured:
    no byte takes more than 3 in the envelope (`enveloped_size`)."""
    if PAGE_ROOM + 3 * len(items_json) + 1 <= MAX_PAGE_BYTES:
        return True
    return PAGE_ROOM + enveloped_size(items_json) + 1 <= MAX_PAGE_BYTES
