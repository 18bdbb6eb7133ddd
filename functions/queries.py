"""Every SQL statement taskrunner runs, named like the `Store` method that runs it.

The schema is in `local/migrations/versions/`. Time is always the database's `now()`: an
instance's clock is never compared with a task's time (the claim, the lease and the rescue
read it as `NOW`, which a test may set). Each statement is its own short transaction; no row
lock is held while a task runs.

Plans that do not depend on statistics. A user's table is often fresh, or bulk-loaded a
moment ago, and never analyzed before the tasks in it run; the planner's estimates can then
be off by orders of magnitude. So every statement here has one good plan whatever the
estimates say: batches are bounded (`Store.WRITE_BATCH`), statements that touch a batch of
tasks by id find them by primary key, and only statements that must scan a state say
`state = '...'` (the partial indexes that match it are the only ones that serve it). A
statement that said both `id = ...` and `state = 'running'` could be planned as a scan of
`tasks_running` (estimated at one row, when statistics were taken before the burst) with the
batch re-scanned for each running row: quadratic, and it once took four and a half minutes
to write 40,000 results. `tests/integration/test_plans.py` checks these plans on a freshly
loaded, never-analyzed table.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from functions.model import (
    ERROR_OUTCOMES,
    MAX_ERROR_GROUPS,
    MAX_PRIORITY,
    MIN_PRIORITY,
    SCAN_ROWS,
    SortKey,
    TaskFilter,
    TaskOrder,
    TaskState,
)

# "Now" of the claim, the lease and the rescue: the database's, or a test's (River's
# `coalesce(sqlc.narg('now'), now())`); the store passes NULL in production. A NULL folds
# away before planning: the plans are those of `now()` (tests/integration/test_plans.py).
NOW = "coalesce(CAST(%(now)s AS timestamptz), now())"

# Workers LISTEN here; creating tasks NOTIFYs with the earliest new due time.
CHANNEL = "taskrunner_tasks"

# When a scheduled task is due: at `execute_at` (what the user asked for), or at the time a
# retry or a hand-back set. Written exactly so everywhere: the `tasks_due` index is on it.
DUE_AT = "coalesce(next_attempt_at, execute_at)"

# Every priority a task may have (a literal, so every plan of a statement, generic ones too,
# sees it). The `tasks_due` index is on (priority, DUE_AT, id) of scheduled tasks (migration
# 0009): `priority = ANY(PRIORITIES)` with `DUE_AT <= now` reads it as one index range per
# priority, in order, each ending at its first task not yet due. So a statement written so
# reads only due tasks however many are scheduled later: PostgreSQL 15 has no skip scan, and
# without the ten levels named it would read the index from its start, future tasks and
# all, to find the due ones among them. Measured with 1,000,000 future tasks over the ten
# levels (tests/integration/test_plans.py).
_LEVELS = ",".join(str(level) for level in range(MIN_PRIORITY, MAX_PRIORITY + 1))
PRIORITIES = f"CAST('{{{_LEVELS}}}' AS smallint[])"


def _first_due_by_priority(where: str, due: str = DUE_AT) -> str:
    """The earliest due time among scheduled tasks that match `where`: the first task of
    each priority's range of `tasks_due`, ten index probes in all, never a scan of them
    (`due`: what is read of each first task, its due time by default)."""
    return f"""(
        SELECT min(first.due) FROM unnest({PRIORITIES}) AS level(priority)
        CROSS JOIN LATERAL (
            SELECT {due} AS due FROM tasks
            WHERE state = 'scheduled' AND tasks.priority = level.priority AND {where}
            -- priority first: the index's order (it is one value here).
            ORDER BY tasks.priority, {DUE_AT}, id
            LIMIT 1
        ) AS first
    )"""


def _due_tasks(where: str = "true") -> str:
    """Scheduled tasks due now that match `where` (their kind), a subquery to count: read
    from `tasks_due` a range per priority, in the index's order, which no other index gives
    without a sort, so that under PINNED_PLAN (no sort) nothing else can serve it. Without
    the order, a planner with statistics chose to read every scheduled task through
    `tasks_scheduled_id`, in the table's order (1,000,000 rows to count 500 due)."""
    return f"""(
        SELECT kind FROM tasks
        WHERE state = 'scheduled' AND priority = ANY({PRIORITIES}) AND {DUE_AT} <= now()
          AND {where}
        ORDER BY priority, {DUE_AT}, id
    ) AS due"""


# When a task became due, for its start lateness (`started_at` less this): the request that
# made it due (run now, retry, a reschedule to a past time: `made_due_at`, migration 0005),
# or else the latest of the time asked for and the time it was created (a task created with
# `execute_at: 0` is not 56 years late). The one definition of lateness: the claim reports
# it to /stats, /metrics and the dashboard, and `taskrunner bench` reads it from the table.
BECAME_DUE = "coalesce(made_due_at, greatest(execute_at, created_at))"

# A running task's worker, when its attempt was claimed, and the worker's lease (which
# covers it): NULL for a task not running (`claimed_by` is set only while it runs). A
# CASE, so that the lease is looked up (by the primary key of `workers`) for running
# tasks only.
_WHILE_RUNNING = """claimed_by AS worker,
    CASE WHEN claimed_by IS NOT NULL THEN claimed_at END AT TIME ZONE 'UTC' AS running_since,
    CASE WHEN claimed_by IS NOT NULL THEN
        (SELECT lease_expires_at FROM workers WHERE workers.id = claimed_by)
    END AT TIME ZONE 'UTC' AS lease_expires_at"""

# Timestamps are read as UTC `timestamp`s (`AT TIME ZONE 'UTC'`), so the session's time
# zone cannot change a value, nor push 9999-12-31 UTC past what Python can hold.
TASK_COLUMNS = f"""
    id, kind, state,
    execute_at AT TIME ZONE 'UTC' AS execute_at,
    CASE WHEN state = 'scheduled' THEN {DUE_AT} END AT TIME ZONE 'UTC' AS next_attempt_at,
    created_at AT TIME ZONE 'UTC' AS created_at,
    started_at AT TIME ZONE 'UTC' AS started_at,
    finished_at AT TIME ZONE 'UTC' AS finished_at,
    attempts, max_attempts, output, error, idempotency_key, payload, priority, timeout_s,
    schedule, scheduled_for AT TIME ZONE 'UTC' AS scheduled_for,
    {_WHILE_RUNNING}
"""

# Creating a task due within NOTIFY_HORIZON wakes listening workers (in the same
# transaction: they hear of it once it is committed). The payload is its due time in Unix
# seconds, so a worker sleeping until later wakes up, and one already due sooner does not.
# Tasks due later need no notification: no worker sleeps longer than its poll interval,
# which is at most the horizon. (NOTIFY serialises commits on a queue lock: a notification
# for every task cost 25% of single-create throughput, measured 3,800 -> 2,900 inserts/s.)
NOTIFY_HORIZON_S = 60
_NOTIFY_IF_SOON = f"""
    CASE WHEN min(execute_at) < now() + interval '{NOTIFY_HORIZON_S} seconds'
        THEN pg_notify('{CHANNEL}', CAST(extract(epoch FROM min(execute_at)) AS text))
    END
"""

# A time sent as `at_us`, whole microseconds since the Unix epoch (bigint), as a
# timestamptz: exact over the whole range, where a float of seconds is 30 us coarse near
# year 9999. Whole seconds and the microseconds apart, so no step goes through a float.
_AT_FROM_US = """timestamptz 'epoch' + make_interval(secs => at_us / 1000000)
            + make_interval(secs => mod(at_us, 1000000) / 1e6)"""

INSERT_TASK = f"""
WITH inserted AS (
    INSERT INTO tasks (kind, execute_at, max_attempts, payload, priority, timeout_s)
    VALUES (%(kind)s, %(execute_at)s, %(max_attempts)s, CAST(%(payload)s AS jsonb),
        %(priority)s, %(timeout_s)s)
    RETURNING *
), notified AS (
    SELECT {_NOTIFY_IF_SOON} FROM inserted
)
SELECT {TASK_COLUMNS} FROM inserted CROSS JOIN notified
"""

# Creates of one task each, made at once by concurrent requests, in one statement
# (Store.insert_task): their rows, in the order given (see INSERT_TASKS on ids). A payload
# travels as a JSON value inside the parameter (absent or null: none).
INSERT_TASK_MANY = f"""
WITH new AS (
    SELECT kind, n, max_attempts, payload, priority, timeout_s,
        {_AT_FROM_US} AS at
    FROM ROWS FROM (
        json_to_recordset(CAST(%(tasks)s AS json)) AS (kind text, at_us bigint,
            max_attempts int, payload jsonb, priority smallint, timeout_s float8)
    ) WITH ORDINALITY AS new(kind, at_us, max_attempts, payload, priority, timeout_s, n)
), inserted AS (
    INSERT INTO tasks (kind, execute_at, max_attempts, payload, priority, timeout_s)
    SELECT kind, at, max_attempts, payload, priority, timeout_s FROM new
    ORDER BY n
    RETURNING *
), notified AS (
    SELECT {_NOTIFY_IF_SOON} FROM inserted
)
SELECT {TASK_COLUMNS} FROM inserted CROSS JOIN notified
ORDER BY id
"""

# Many tasks in one statement (all or none). The batch travels as one JSON parameter (see
# FINISH_MANY); times as whole microseconds (_AT_FROM_US), cheaper to make than 10,000 ISO
# strings. A task's options are in its row when it has them (else the defaults: the
# `max_attempts` parameter, the kind's timeout, priority 0). Ids come from one identity
# sequence in row order, so sorting them restores the order given.
INSERT_TASKS = f"""
WITH new AS (
    SELECT kind, n, payload, max_attempts, priority, timeout_s,
        {_AT_FROM_US} AS at
    FROM ROWS FROM (
        json_to_recordset(CAST(%(tasks)s AS json)) AS (kind text, at_us bigint, payload jsonb,
            max_attempts int, priority smallint, timeout_s float8)
    ) WITH ORDINALITY AS new(kind, at_us, payload, max_attempts, priority, timeout_s, n)
), inserted AS (
    INSERT INTO tasks (kind, execute_at, max_attempts, payload, priority, timeout_s)
    SELECT kind, at, coalesce(max_attempts, %(max_attempts)s), payload, coalesce(priority, 0),
        timeout_s
    FROM new
    ORDER BY n
    RETURNING id, execute_at
), notified AS (
    SELECT {_NOTIFY_IF_SOON} FROM inserted
)
SELECT inserted.id FROM inserted CROSS JOIN notified
ORDER BY id
"""

# --- idempotency keys (migration 0003) ---------------------------------------------------
# A create with a key inserts unless a task holds the key already. ON CONFLICT waits for a
# concurrent insert of the same key to commit or roll back, so of any number of concurrent
# requests with one key exactly one inserts; the others get no row, and read the winner
# with GET_TASK_BY_KEY (a statement of its own: a new snapshot, which sees it). A create
# without a key stays on INSERT_TASK / INSERT_TASKS, which pay nothing for keys. What the
# request asked for is kept apart (`idempotency_execute_at`, `idempotency_payload`): PATCH
# may move the task's time and payload, and a retry its max_attempts (kept as asked in
# `idempotency_max_attempts`, migration 0009): a repeat is compared with what was asked.
# The payload is stored once: `idempotency_payload` holds `[original]` only once a PATCH has
# changed it (migration 0010); until then the task's own payload is what the key stands for.
INSERT_TASK_KEYED = f"""
WITH inserted AS (
    INSERT INTO tasks (kind, execute_at, max_attempts, idempotency_key, idempotency_execute_at,
        payload, priority, timeout_s, idempotency_max_attempts)
    VALUES (%(kind)s, %(execute_at)s, %(max_attempts)s, %(key)s, %(execute_at)s,
        CAST(%(payload)s AS jsonb), %(priority)s, %(timeout_s)s, %(max_attempts)s)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING *
), notified AS (
    SELECT {_NOTIFY_IF_SOON} FROM inserted
)
SELECT {TASK_COLUMNS} FROM inserted CROSS JOIN notified
"""


def _same_options(max_attempts: str, priority: str, timeout_s: str) -> str:
    """Whether the keyed task in `tasks` was asked for with these options (SQL expressions).
    A task keyed before migration 0009 has no `idempotency_max_attempts`: it was made with
    the setting of its day, whatever that was, and any max_attempts repeats it."""
    return f"""(
        (tasks.idempotency_max_attempts IS NULL
            OR tasks.idempotency_max_attempts = {max_attempts})
        AND tasks.priority = {priority}
        AND tasks.timeout_s IS NOT DISTINCT FROM {timeout_s}
    )"""


# The task holding a key, and what the request that created it asked for (`requested_at`:
# execute_at may have moved since, by PATCH), and whether it asked for this payload (jsonb
# equality: key order and spacing do not matter) and these options.
# The payload a key stands for (see INSERT_TASK_KEYED). A payload is never the jsonb `null`
# (null is stored as NULL), so `[null]` reads back as NULL.
KEYED_PAYLOAD = """CASE WHEN tasks.idempotency_payload IS NULL THEN tasks.payload
    ELSE nullif(tasks.idempotency_payload -> 0, 'null') END"""
_SAME_OPTIONS_SENT = _same_options(
    "CAST(%(max_attempts)s AS int)",
    "CAST(%(priority)s AS smallint)",
    "CAST(%(timeout_s)s AS float8)",
)
GET_TASK_BY_KEY = f"""
SELECT {TASK_COLUMNS}, idempotency_execute_at AT TIME ZONE 'UTC' AS requested_at,
    {KEYED_PAYLOAD} IS NOT DISTINCT FROM CAST(%(payload)s AS jsonb) AS same_payload,
    {_SAME_OPTIONS_SENT} AS same_options
FROM tasks WHERE idempotency_key = %(key)s
"""

# A batch with keys (unique within it: the domain merges items that share one), run in a
# transaction with FIND_KEYS: rows whose key is taken are skipped. Keyed rows are inserted
# in the order of their keys, so concurrent batches sharing keys wait on each other in one
# order and never deadlock (in the order given, two batches with the same 200 keys in
# opposite orders locked each other until the statement timeout); they are matched to their
# items by key. Rows without a key come first, in the order given: their ids, sorted, are
# theirs in order (as INSERT_TASKS). The skipped keys' tasks are then read by FIND_KEYS, in
# a new snapshot that sees concurrent winners; a key sent with another kind or time rolls
# the whole batch back. Cost, 10,000 items with 255-character keys on a fresh table: 0.23 to
# 0.32 s (PostgreSQL 15, 18), against 0.07 to 0.12 s without keys; 4.8 s before the table's
# key check lost its counted repetition (migration 0006). The sort by key spills to disk at
# the default work_mem (5.5 MB), which costs nothing measurable: 566 against 582 ms at 16 MB.
INSERT_TASKS_KEYED = f"""
WITH new AS (
    SELECT kind, key, n, payload, max_attempts, priority, timeout_s,
        {_AT_FROM_US} AS at
    FROM ROWS FROM (
        json_to_recordset(CAST(%(tasks)s AS json)) AS (kind text, at_us bigint, key text,
            payload jsonb, max_attempts int, priority smallint, timeout_s float8)
    ) WITH ORDINALITY AS new(kind, at_us, key, payload, max_attempts, priority, timeout_s, n)
), inserted AS (
    INSERT INTO tasks (kind, execute_at, max_attempts, idempotency_key, idempotency_execute_at,
        payload, priority, timeout_s, idempotency_max_attempts)
    SELECT kind, at, max_attempts, key, CASE WHEN key IS NOT NULL THEN at END,
        payload, priority, timeout_s, CASE WHEN key IS NOT NULL THEN max_attempts END
    FROM new
    ORDER BY key COLLATE "C" NULLS FIRST, n
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, execute_at, idempotency_key
), notified AS (
    SELECT {_NOTIFY_IF_SOON} FROM inserted
)
SELECT inserted.id, inserted.idempotency_key FROM inserted CROSS JOIN notified
ORDER BY id
"""

# The tasks holding the keys sent (`[{"key", "payload", "max_attempts", "priority",
# "timeout_s"}]`), what their requests asked for, and whether that was the payload (jsonb
# equality, as GET_TASK_BY_KEY) and the options sent with the key now.
FIND_KEYS = f"""
SELECT tasks.idempotency_key, tasks.id, tasks.kind,
    tasks.idempotency_execute_at AT TIME ZONE 'UTC',
    {KEYED_PAYLOAD} IS NOT DISTINCT FROM sent.payload
        AND {_same_options("sent.max_attempts", "sent.priority", "sent.timeout_s")}
FROM json_to_recordset(CAST(%(sent)s AS json))
    AS sent(key text, payload jsonb, max_attempts int, priority smallint, timeout_s float8)
JOIN tasks ON tasks.idempotency_key = sent.key
"""

GET_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = %(id)s"
# Reads of one task each, made at once by concurrent requests (Store.get_task).
GET_TASK_MANY = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ANY(%(ids)s)"


# --- finding tasks: GET /tasks, and the filters the bulk cancel and retry share ---------------
def _json_text(column: str) -> str:
    """A text `column` of TASK_COLUMNS as a JSON string, null as `null`: escaped as the
    json module and pydantic-core escape (`"`, `\\`, and control characters, as `\\n` or
    `\\u001f`; everything else as it is, in UTF-8)."""
    return f"coalesce(CAST(to_json({column}) AS text), 'null')"


def _json_time(column: str) -> str:
    """A time `column` of TASK_COLUMNS (a UTC `timestamp`) as pydantic-core writes an aware
    datetime in UTC: `"0001-01-01T00:00:00Z"`, the microseconds after a `.` in six digits
    unless they are 0; null as `null`. One `to_char`, its `.000000` dropped: 13% less of the
    server's CPU than telling whole seconds apart first (two `to_char` and a `date_trunc`),
    and short enough text that psycopg keeps the page's statement parsed (it parses again
    every statement longer than 4,096 characters: ~0.2 ms of the API's CPU a page). The
    colons are quoted text of the format (`":"`), not bare: a bare `:MI` is a variable to
    pgbench, which runs this statement as the bench's raw reference."""
    return (
        f"""coalesce(replace(to_char({column},"""
        f""" '"\\""YYYY-MM-DD"T"HH24":"MI":"SS.US"Z\\""'), '.000000Z', 'Z'), 'null')"""
    )


# A listed task's JSON as responses.task_json writes it, from `{"id":` to its
# `lease_expires_at` (no closing brace): written by the database over the columns of
# TASK_COLUMNS, so a page of 100 is neither 100 Tasks built in Python nor 100 encodings
# (the API's GET /tasks?limit=100: 4.5 ms of the API process's CPU a page against 1.0 ms,
# measured in one process). The timeout and the payload, which come after, are the
# answer's to write (responses.listed_json): a float and a payload's JSON are written in
# Python, as for one task, and a payload goes through its kind's `show`.
# tests/integration/test_listed_json.py holds the bytes equal to task_json's.
_LISTED_FIELDS = (
    ("id", "id"),
    ("type", _json_text("kind")),
    ("state", _json_text("state")),
    *((name, _json_time(name)) for name in
      ("execute_at", "next_attempt_at", "created_at", "started_at", "finished_at")),
    ("attempts", "attempts"),
    ("max_attempts", "max_attempts"),
    *((name, _json_text(name)) for name in ("output", "error", "idempotency_key", "schedule")),
    ("scheduled_for", _json_time("scheduled_for")),
    ("priority", "priority"),
    ("worker", _json_text("worker")),
    ("running_since", _json_time("running_since")),
    ("lease_expires_at", _json_time("lease_expires_at")),
)  # fmt: skip


def _listed_json(*, plain: bool = False) -> str:
    """LISTED_JSON; `plain`: the whole JSON of a task without a timeout or a payload (both
    null, and the closing brace). One `format()` of the fields' values into the constant text
    around them: a sixth less of the server's CPU a page of 100 than the same text joined by
    `||` (1.56-2.09 ms against 1.93-2.48 ms, three alternating runs). `%%s`: psycopg's
    escape of `%` (and references.as_pgbench's); no `:` is followed by a name, which pgbench
    would read as its variable."""
    fields = [*_LISTED_FIELDS, *((("timeout_s", "'null'"), ("payload", "'null'")) * plain)]
    text = "{" + ",".join(f'"{name}":%%s' for name, _ in fields) + "}" * plain
    return f"format('{text}', {', '.join(value for _, value in fields)})"


LISTED_JSON = _listed_json()
# A task's whole JSON, for a page written whole (Listing.page_text).
_PLAIN_JSON = _listed_json(plain=True)


# Each row listed comes with what it holds of text that can be large, as stored
# (`stored_bytes`): the store stops reading a page once its rows hold an answer's limit
# (Store.list_tasks). jsonb's text has a space after each `,` and `:`: at least the compact
# JSON an answer writes, but for a few numbers (jsonb writes 1e-7 as 0.0000001).
STORED_BYTES = """coalesce(octet_length(CAST(payload AS text)), 0)
    + coalesce(octet_length(output), 0) + coalesce(octet_length(error), 0)"""

FINISHED = ("succeeded", "failed", "cancelled")
# The states whose partial index on id (tasks_scheduled_id, tasks_failed_id,
# tasks_cancelled_id) serves a listing of that state alone by id.
_STATES_BY_ID = ("scheduled", "failed", "cancelled")
# A listing's order key, as a column; the indexes on it and id (migration 0014:
# tasks_execute_at, tasks_finished) serve it with keyset paging.
_KEY_COLUMN = {SortKey.EXECUTE_AT: "execute_at", SortKey.FINISHED_AT: "finished_at"}


def states_condition(states: Sequence[str]) -> str:
    """`state IN (...)` of literals: only then can the planner use a state's partial index
    in a generic plan. Each is a TaskState's value (never a client's text)."""
    return f"state IN ({', '.join(repr(TaskState(s).value) for s in states)})"


def filter_conditions(matching: TaskFilter) -> dict[str, tuple[str, dict[str, Any]]]:
    """The SQL condition of each filter of `matching` but its states, by filter name, with
    its parameters (the filter's name is the parameter's). Each is written once here, for
    the listing and the bulk cancel and retry alike."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    if len(matching.kinds) == 1:
        found["kinds"] = ("kind = %(kind)s", {"kind": matching.kinds[0]})
    elif matching.kinds:
        found["kinds"] = ("kind = ANY(%(kinds)s)", {"kinds": list(matching.kinds)})
    for name, column, sign in _TIME_FILTERS:
        when = getattr(matching, name)
        if when is not None:
            found[name] = (f"{column} {sign} %({name})s", {name: when})
    if matching.error is not None:
        # strpos, not ILIKE: the text is searched for as it is, `%` and `_` included.
        # `error IS NOT NULL` is the predicate of `tasks_error_id` (migration 0014): tasks
        # that never failed hold no place in it.
        found["error"] = (
            "error IS NOT NULL AND strpos(lower(error), lower(%(error)s)) > 0",
            {"error": matching.error},
        )
    if matching.schedule is not None:
        found["schedule"] = ("schedule = %(schedule)s", {"schedule": matching.schedule})
    if matching.payload == "null":
        found["payload"] = ("payload IS NULL", {})
    elif matching.payload is not None:
        found["payload"] = ("payload @> CAST(%(payload)s AS jsonb)", {"payload": matching.payload})
    return found


_TIME_FILTERS = tuple(
    (f"{field}_{side}", column, ">" if side == "after" else "<")
    for field, column in (
        ("created", "created_at"), ("execute", "execute_at"), ("finished", "finished_at")
    )
    for side in ("after", "before")
)  # fmt: skip


def filter_condition(matching: TaskFilter) -> tuple[str, dict[str, Any]]:
    """All the filters of `matching` but its states, as one condition (`true`: none)."""
    found = filter_conditions(matching)
    params: dict[str, Any] = {}
    for _, more in found.values():
        params.update(more)
    return " AND ".join(f"({sql})" for sql, _ in found.values()) or "true", params


@dataclass(frozen=True)
class Listing:
    """The statements of a listing (GET /tasks) of the tasks `matching` in `order`.

    Its conditions are split in two. `served`: those the index read for the order also
    reads as a range (the order's key and id; a kind, a schedule, a state with an index on
    id, failed tasks for `error`, when the order is by id), so a page costs what it holds.
    `rest`: those checked on each row that index gives. With any of those, a page first
    finds how far SCAN_ROWS rows of the index go (`bound`) and reads no further: a filter
    that is rare in its order costs a bounded scan a page, and the page may hold fewer
    tasks than its limit, with a cursor that goes on from the last row read.

    Paging is by keyset, (key, id) after the last task read, never an offset: a task
    created or finished meanwhile takes its place in the order without moving any other
    from one page to the next."""

    order: TaskOrder
    served: str
    rest: str
    params: dict[str, Any]

    @property
    def order_by(self) -> str:
        # The table's columns, named so: a bare `execute_at` would be the output column of
        # TASK_COLUMNS (`execute_at AT TIME ZONE 'UTC'`), which no index is on (a sort).
        way = " DESC" if self.order.descending else ""
        key = _KEY_COLUMN.get(self.order.key)
        return f"tasks.{key}{way}, tasks.id{way}" if key else f"tasks.id{way}"

    def _keyset(self, name: str, *, inclusive: bool = False, after: bool = True) -> str:
        """The condition of the rows past (`after`) or up to (not `after`) the position
        `%(name_key)s, %(name_id)s` in the order."""
        greater = self.order.descending != after
        sign = (">" if greater else "<") + ("=" if inclusive else "")
        key = _KEY_COLUMN.get(self.order.key)
        if key is None:
            return f"id {sign} %({name}_id)s"
        return f"({key}, id) {sign} (%({name}_key)s, %({name}_id)s)"

    def bound(self, *, after: bool) -> str:
        """The position of the SCAN_ROWS-th row the order's index gives (past
        `%(after_*)s` when `after`): a page's bounded scan stops there. No row: the rest of
        the order is shorter."""
        key = _KEY_COLUMN.get(self.order.key, "id")
        where = [self.served, self._keyset("after") if after else "true"]
        conditions = " AND ".join(w for w in where if w != "true") or "true"
        return f"""SELECT {key}, id FROM tasks
WHERE {conditions}
ORDER BY {self.order_by} OFFSET {SCAN_ROWS - 1} LIMIT 1"""

    def page(self, *, after: bool, bounded: bool) -> str:
        """Up to `%(limit)s` tasks matching, in order (past `%(after_*)s` when `after`, and
        up to `%(bound_*)s` when `bounded`)."""
        return f"""SELECT id, kind, execute_at, finished_at, timeout_s, payload, stored_bytes,
    {LISTED_JSON} AS listed_json
{self._rows(after=after, bounded=bounded)}
ORDER BY {self._outer_order}"""

    def page_text(self, *, after: bool, bounded: bool) -> str:
        """`page`'s rows as one row: how many there are (`%(limit)s` at most); whether
        none has a timeout or a payload (`plain`); and, when so, the JSON of the first
        `%(shown)s` as the answer's `items` writes them (each `task_json`'s, comma
        separated), with the id, `execute_at` and `finished_at` of the last of those, which
        a page that goes on makes its cursor from. A page of 100 is then one string to the
        API, not 101 rows to read (see Store.list_page_text for the figures)."""
        return f"""SELECT count(*), coalesce(bool_and(timeout_s IS NULL AND payload IS NULL), true),
    string_agg({_PLAIN_JSON}, ',' ORDER BY n)
        FILTER (WHERE n <= %(shown)s AND timeout_s IS NULL AND payload IS NULL),
    max(id) FILTER (WHERE n = %(shown)s),
    max(execute_at) FILTER (WHERE n = %(shown)s),
    max(finished_at) FILTER (WHERE n = %(shown)s)
FROM (
    SELECT page.*, row_number() OVER (ORDER BY {self._outer_order}) AS n
    {self._rows(after=after, bounded=bounded)}
) AS numbered"""

    @property
    def _outer_order(self) -> str:
        way = " DESC" if self.order.descending else ""
        return f"order_key{way}, id{way}" if self.order.key in _KEY_COLUMN else f"id{way}"

    def _rows(self, *, after: bool, bounded: bool) -> str:
        """`FROM` the page's rows (TASK_COLUMNS, `stored_bytes` and the order's key as
        `order_key`), a subquery named `page`."""
        where = [self.served]
        if after:
            where.append(self._keyset("after"))
        if bounded:
            where.append(self._keyset("bound", inclusive=True, after=False))
        where.append(self.rest)
        conditions = " AND ".join(w for w in where if w != "true") or "true"
        # The rows' JSON is written over the page's rows only (a subquery's LIMIT is kept),
        # never over every row a sort would read; the outer order is the inner one's, by
        # the same columns, so it costs no sort.
        key = _KEY_COLUMN.get(self.order.key)
        inner_key = f", tasks.{key} AS order_key" if key else ""
        return f"""FROM (
    SELECT {TASK_COLUMNS}, {STORED_BYTES} AS stored_bytes{inner_key}
    FROM tasks
    WHERE {conditions}
    ORDER BY {self.order_by} LIMIT %(limit)s
) AS page"""


def listing(matching: TaskFilter, order: TaskOrder) -> Listing:
    """The statements of a listing of the tasks `matching` in `order` (see Listing)."""
    found = filter_conditions(matching)
    states = [s.value for s in matching.states]
    served: list[str] = []
    key = _KEY_COLUMN.get(order.key)
    if key is not None:
        # The order's key as a range of its index; `finished_at` is the index of finished
        # tasks (its predicate: their states).
        for name in (f"{order.key.value.removesuffix('_at')}_after",
                     f"{order.key.value.removesuffix('_at')}_before"):  # fmt: skip
            if name in found:
                served.append(found.pop(name)[0])
        if order.key is SortKey.FINISHED_AT:
            # (Only finished tasks have a place in this order.)
            wanted = [s for s in states or FINISHED if s in FINISHED]
            served.append(states_condition(FINISHED) if wanted else "false")
            states = [] if len(wanted) in (0, len(FINISHED)) else wanted
    elif len(matching.kinds) == 1:
        served.append(found.pop("kinds")[0])
    elif "schedule" in found:
        served.append(found.pop("schedule")[0])
    elif len(states) == 1 and states[0] in _STATES_BY_ID:
        served.append(states_condition(states))
        states = []
    elif "error" in found:
        served.append("error IS NOT NULL")
    rest = [sql for sql, _ in found.values()]
    if states:
        rest.insert(0, states_condition(states))
    params: dict[str, Any] = {}
    for _, more in filter_conditions(matching).values():
        params.update(more)
    return Listing(
        order=order,
        served=" AND ".join(served) or "true",
        rest=" AND ".join(f"({sql})" for sql in rest) or "true",
        params=params,
    )


# Every statement that deletes tasks deletes their attempts (migration 0016 has no foreign
# key: its cascade, a trigger and an index probe per task deleted, made a prune of 100,000
# tasks with no attempts cost 3.4-6.7 s against 1.0-2.0 s so, and 7.7-10.3 s against
# 3.2-5.0 s with an attempt each). An attempt is written only by a statement that holds its
# task's row (FINISH_MANY_RECORDING, cancel_tasks, RESCUE_EXPIRED), so once a delete holds
# the rows no attempt is added to them. tests/unit/test_attempts.py checks each statement
# here that deletes tasks deletes their attempts too.

# A task deleted by DELETE_TASK: its attempts, in the same transaction, as a statement of its
# own (a snapshot taken after the delete's lock: the attempt of a finish that the delete
# waited for is seen). Only of tasks gone: a running task is not deleted.
DELETE_ATTEMPTS_OF_GONE = """
DELETE FROM attempts
WHERE task_id = ANY(CAST(%(ids)s AS bigint[]))
  AND NOT EXISTS (SELECT FROM tasks WHERE tasks.id = attempts.task_id)
"""

# The row lock waits for a claim that is starting this task, so a task is either deleted
# before any worker takes it, or reported running; never deleted under a worker. Its
# attempts: DELETE_ATTEMPTS_OF_GONE, after it.
DELETE_TASK = """
WITH target AS (
    SELECT id, state FROM tasks WHERE id = %(id)s FOR UPDATE
), removed AS (
    DELETE FROM tasks WHERE id IN (SELECT id FROM target WHERE state <> 'running')
)
SELECT state FROM target
"""

# DELETE / (the original challenge's, for testing): tasks that are not running, a batch at a
# time. SKIP LOCKED leaves a task that a claim or an action holds right now (a claimed one is
# running a moment later); the lock re-checks `state` on a task changed since the statement
# began, so none is deleted under a worker.
DELETE_NOT_RUNNING = """
WITH picked AS MATERIALIZED (
    SELECT id FROM tasks WHERE state <> 'running'
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM attempts WHERE task_id = ANY(ARRAY(SELECT id FROM picked))
), deleted AS (
    DELETE FROM tasks WHERE id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING 1
)
SELECT count(*) FROM deleted
"""

# --- actions on one task -----------------------------------------------------------------
# Each locks the row first, as DELETE_TASK does: the lock waits for a claim that is starting
# the task, so an action either happens before any worker takes the task, or finds it
# running and changes nothing; never a task under a worker. Each returns the state the task
# had (`found_state`; no row: no such task) and, when it acted, the task as it is now. A
# task made due within NOTIFY_HORIZON wakes the workers, as a new one does.
_NOTIFY_DUE_SOON = f"""
    CASE WHEN min({DUE_AT}) < now() + interval '{NOTIFY_HORIZON_S} seconds'
        THEN pg_notify('{CHANNEL}', CAST(extract(epoch FROM min({DUE_AT})) AS text))
    END
"""


def _act(from_states: tuple[str, ...], update: str, holder: str = "NULL") -> str:
    """An action on one task: `update` (an UPDATE of tasks without its WHERE) applied to the
    task `%(id)s` if it is in one of `from_states`, the row locked first, and unless
    `holder` (SQL over the row, `tasks`) names another task that holds what this one would
    take (`held_by`: OCCURRENCE_HOLDER).

    The UPDATE checks the state of the row it writes as well as the lock's: when the row
    changed twice while the lock waited (a worker's claim, then its finish), the lock's
    read found the last version, but the UPDATE can find the one between and write over
    it (a retry racing a worker wrote `scheduled` over the running version, which the
    `running_iff_claimed` constraint refused: a 500). Then nothing is written and `raced`
    says so: the caller runs the statement again (Store._act), which sees the row as it is
    now."""
    literals = ", ".join(f"'{state}'" for state in from_states)
    return f"""
WITH target AS (
    SELECT id, state, {holder} AS held_by FROM tasks WHERE id = %(id)s FOR UPDATE
), changed AS (
    {update}
    WHERE id IN (SELECT id FROM target WHERE state IN ({literals}) AND held_by IS NULL)
        AND state IN ({literals})
    RETURNING *
), notified AS (
    SELECT {_NOTIFY_DUE_SOON} FROM changed
)
SELECT target.state AS found_state, target.held_by,
    target.state IN ({literals}) AND target.held_by IS NULL AND task.id IS NULL AS raced,
    task.*
FROM target CROSS JOIN notified
LEFT JOIN (SELECT {TASK_COLUMNS} FROM changed) AS task ON true
"""


# POST /tasks/{id}/run: a scheduled task becomes due now. Like a retry, it sets when the
# next attempt may start (`next_attempt_at`) and leaves `execute_at`, the time the user asked
# for, as it was; a pending retry's wait is dropped. A task already due stays as it is, due
# since it was (`made_due_at` is set only by the request that made the task due).
RUN_TASK = _act(
    ("scheduled",),
    f"""UPDATE tasks
    SET next_attempt_at = CASE WHEN {DUE_AT} > now() THEN now() ELSE next_attempt_at END,
        made_due_at = CASE WHEN {DUE_AT} > now() THEN now() ELSE made_due_at END""",
)

# POST /tasks/{id}/retry: a failed or cancelled task is scheduled again, due now, with a
# fresh budget of `max_attempts` more runs. Its history stays: attempts counts on from where
# it was, and output and error keep the last failure until the next attempt ends.
_RETRIED = """state = 'scheduled',
        next_attempt_at = now(),
        made_due_at = now(),
        max_attempts = attempts + %(max_attempts)s,
        finished_at = NULL"""
# A schedule's occurrence is held by at most one task that is not cancelled (the
# `tasks_occurrence` index): a cancelled occurrence whose schedule, enabled again, made it
# anew cannot be retried beside the new task. The task that holds the occurrence of the row
# at hand (`tasks`), other than itself; NULL: none (or no schedule's).
OCCURRENCE_HOLDER = """(SELECT held.id FROM tasks AS held
    WHERE held.schedule = tasks.schedule AND held.scheduled_for = tasks.scheduled_for
      AND held.state <> 'cancelled' AND held.id <> tasks.id
    LIMIT 1)"""


def occurrence_retryable(condition: str) -> str:
    """Of the tasks a bulk retry matching `condition` (SQL over the columns of `tasks`, as
    `filter_condition` writes it) may take, those it takes, and its dry run counts: of a
    schedule's occurrence, the task that holds it (failed), or else the first of its
    cancelled tasks that `condition` matches too, when none holds it (migration 0018's index
    finds an earlier one). One task an occurrence, in any batch. (`condition` is read inside
    the subquery too, where its bare column names are the earlier task's.)"""
    return f"""(tasks.schedule IS NULL OR ({OCCURRENCE_HOLDER} IS NULL
    AND (tasks.state <> 'cancelled' OR NOT EXISTS (
        SELECT FROM tasks AS earlier
        WHERE earlier.schedule = tasks.schedule AND earlier.scheduled_for = tasks.scheduled_for
          AND earlier.state = 'cancelled' AND earlier.id < tasks.id
          AND ({condition})))))"""


RETRY_TASK = _act(("failed", "cancelled"), f"UPDATE tasks SET {_RETRIED}", holder=OCCURRENCE_HOLDER)

# PATCH /tasks/{id} with an execute_at: a scheduled task gets a new execute_at, and is due
# then (a pending retry's time is dropped with the old one). Moved to a time already past, a
# task that was not due became due now; one that was due already stays due since it was.
# Without one (NULL), its times stay as they were. With `set_payload`, its payload becomes
# `payload` (NULL: none); the payload its idempotency key stands for stays.
_MOVED = "CAST(%(execute_at)s AS timestamptz)"
RESCHEDULE_TASK = _act(
    ("scheduled",),
    f"""UPDATE tasks
    SET execute_at = coalesce({_MOVED}, execute_at),
        next_attempt_at = CASE WHEN {_MOVED} IS NULL THEN next_attempt_at END,
        made_due_at = CASE
            WHEN {_MOVED} IS NULL THEN made_due_at
            WHEN {_MOVED} > now() THEN NULL
            WHEN {DUE_AT} > now() THEN now()
            ELSE {BECAME_DUE}
        END,
        payload = CASE WHEN %(set_payload)s THEN CAST(%(payload)s AS jsonb) ELSE payload END,
        -- The first change of a keyed task's payload keeps the original (see GET_TASK_BY_KEY).
        idempotency_payload = CASE
            WHEN %(set_payload)s AND idempotency_key IS NOT NULL AND idempotency_payload IS NULL
                AND payload IS DISTINCT FROM CAST(%(payload)s AS jsonb)
            THEN jsonb_build_array(payload)
            ELSE idempotency_payload
        END""",
)

# --- schedules (migration 0011; functions/schedules.py) ------------------------------------

SCHEDULE_COLUMNS = """
    name, kind, cron, timezone, payload, max_attempts, timeout_s, priority, catch_up, enabled,
    last_occurrence_at AT TIME ZONE 'UTC' AS last_occurrence_at,
    next_run_at AT TIME ZONE 'UTC' AS next_run_at,
    skipped_occurrences,
    created_at AT TIME ZONE 'UTC' AS created_at,
    updated_at AT TIME ZONE 'UTC' AS updated_at
"""

# The time a change of a schedule is made at: the database's (or a test's, queries.NOW).
NOW_UTC = f"SELECT {NOW} AT TIME ZONE 'UTC'"

# A schedule as shown: with the task of the last occurrence made, and its state (the
# `tasks_occurrence` index, read backwards: one row).
_SHOWN_SCHEDULE = f"""
SELECT {SCHEDULE_COLUMNS}, last.id AS last_task_id, last.state AS last_task_state
FROM schedules
LEFT JOIN LATERAL (
    SELECT id, state FROM tasks
    WHERE tasks.schedule = schedules.name
    ORDER BY scheduled_for DESC
    LIMIT 1
) AS last ON true"""

GET_SCHEDULE = f"{_SHOWN_SCHEDULE}\nWHERE name = %(name)s"

# A change (create, replace, PATCH, DELETE) locks the schedule first: it waits for a creator
# of occurrences that holds it, and then reads the occurrences that creator made, so the new
# next occurrence is worked out from the last one made, never from one before it.
LOCK_SCHEDULE = f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = %(name)s FOR UPDATE"

LIST_SCHEDULES = f"""{_SHOWN_SCHEDULE}
WHERE name > %(after)s COLLATE "C"
ORDER BY name COLLATE "C"
LIMIT %(limit)s
"""

_SCHEDULE_VALUES = """
    %(kind)s, %(cron)s, %(timezone)s, CAST(%(payload)s AS jsonb), %(max_attempts)s,
    %(timeout_s)s, %(priority)s, %(catch_up)s, %(enabled)s, %(last_occurrence_at)s,
    %(next_run_at)s, %(skipped_occurrences)s"""

# Nothing when the name was taken meanwhile (a concurrent create): the change is tried again.
INSERT_SCHEDULE = f"""
INSERT INTO schedules (name, kind, cron, timezone, payload, max_attempts, timeout_s,
    priority, catch_up, enabled, last_occurrence_at, next_run_at, skipped_occurrences)
VALUES (%(name)s, {_SCHEDULE_VALUES})
ON CONFLICT (name) DO NOTHING
RETURNING {SCHEDULE_COLUMNS}
"""

UPDATE_SCHEDULE = f"""
UPDATE schedules
SET (kind, cron, timezone, payload, max_attempts, timeout_s, priority, catch_up, enabled,
    last_occurrence_at, next_run_at, skipped_occurrences) = ({_SCHEDULE_VALUES}),
    updated_at = now()
WHERE name = %(name)s
RETURNING {SCHEDULE_COLUMNS}
"""

DELETE_SCHEDULE = "DELETE FROM schedules WHERE name = %(name)s"

# The creator of occurrences, first half: the enabled schedules whose next occurrence is due
# within `ahead_s`, locked until the transaction that creates their tasks commits. Through
# the `schedules_next_run` index, in its order, at most `limit`: its cost is that of the due
# schedules, whatever the number of others. SKIP LOCKED: creators running at once split the
# due schedules, and none waits for a PATCH. With `now`, the time the occurrences are
# worked out at (functions/schedules.py).
PICK_DUE_SCHEDULES = f"""
SELECT {SCHEDULE_COLUMNS}, {NOW} AT TIME ZONE 'UTC' AS now
FROM schedules
WHERE enabled
  AND next_run_at <= {NOW} + make_interval(secs => CAST(%(ahead_s)s AS float8))
-- The column, not the output's `next_run_at` (in UTC), which ORDER BY would read first: the
-- index's order, no sort.
ORDER BY schedules.next_run_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

# Second half, in the same transaction: the occurrences' tasks, and each schedule moved past
# them (its next occurrence; its last one made; the missed ones it skipped). Times travel as
# whole microseconds (_AT_FROM_US). ON CONFLICT: an occurrence made already is not made again
# (the second guard; the locked row is the first). The tasks wake listening workers as any
# new task does.
CREATE_OCCURRENCES = f"""
WITH new AS (
    SELECT schedule, kind, max_attempts, payload, timeout_s, priority, {_AT_FROM_US} AS at
    FROM json_to_recordset(CAST(%(tasks)s AS json)) AS (schedule text, kind text,
        at_us bigint, max_attempts int, payload jsonb, timeout_s float8, priority smallint)
), inserted AS (
    INSERT INTO tasks (kind, execute_at, max_attempts, payload, timeout_s, priority, schedule,
        scheduled_for)
    SELECT kind, at, max_attempts, payload, timeout_s, priority, schedule, at FROM new
    ORDER BY schedule, at
    ON CONFLICT (schedule, scheduled_for) WHERE schedule IS NOT NULL AND state <> 'cancelled'
    DO NOTHING
    RETURNING execute_at
), moved AS (
    UPDATE schedules AS s
    SET next_run_at = timestamptz 'epoch' + make_interval(secs => m.next_us / 1e6),
        last_occurrence_at = coalesce(
            timestamptz 'epoch' + make_interval(secs => m.last_us / 1e6), s.last_occurrence_at
        ),
        skipped_occurrences = s.skipped_occurrences + m.skipped
    FROM json_to_recordset(CAST(%(schedules)s AS json))
        AS m(name text, next_us bigint, last_us bigint, skipped bigint)
    WHERE s.name = m.name
    RETURNING 1
), notified AS (
    SELECT {_NOTIFY_IF_SOON} FROM inserted
)
SELECT (SELECT count(*) FROM inserted) AS created, (SELECT count(*) FROM moved) AS moved
FROM notified
"""

# --- cancelling, and retrying many (migration 0012) -------------------------------------------
# Workers LISTEN here too: a cancel of running tasks NOTIFYs (ANNOUNCE_CANCELS) each worker
# that held some, naming it and the tasks with their attempts (store.cancel_notes), so the
# worker stops them without a query of its own. (It also reads which of its tasks it no
# longer holds, NO_LONGER_HELD, every poll interval while it runs tasks: behind a transaction
# pooler, which has no LISTEN, and in a tick that does not listen, that is how it learns.)
CANCEL_CHANNEL = "taskrunner_cancelled"

# States a task can be cancelled from (it has not finished), and retried from.
CANCELLABLE = ("scheduled", "running")
RETRYABLE = ("failed", "cancelled")


def _picks(states: tuple[str, ...], condition: str) -> str:
    """The ids of the tasks in `states` matching `condition`, at most `%(limit)s` of each
    state, as the rows of a UNION ALL."""
    if "succeeded" in states:
        # No index holds the succeeded tasks by id (they are most of the table): the primary
        # key is read in order, `limit` at most, for them and every other state asked for
        # (the running tasks it passes are no more than the workers hold).
        literals = ", ".join(f"'{state}'" for state in states)
        return f"""        (SELECT id FROM tasks WHERE state IN ({literals}) AND ({condition})
         ORDER BY id LIMIT %(limit)s)"""
    # A running task's id is read from `tasks_running`, which is not in id order: all the
    # running tasks that match (no more than the workers hold), sorted. The other states' id
    # indexes are read in order, `limit` at most.
    return "\n        UNION ALL\n".join(
        f"""        (SELECT id FROM tasks WHERE state = '{state}' AND ({condition})"""
        + (")" if state == "running" else "\n         ORDER BY id LIMIT %(limit)s)")
        for state in states
    )


def _locked_in_id_order(states: tuple[str, ...], condition: str) -> str:
    """A SELECT of up to `%(limit)s` tasks in `states` matching `condition`, lowest ids
    first, locked in id order; a row whose lock waited is re-read, and left out if it no
    longer matches. Each state's ids come from its partial index (tasks_scheduled_id,
    tasks_running, tasks_failed_id, tasks_cancelled_id): never a walk of the whole table.

    Every statement that locks many tasks and waits for their locks does so in id order
    (FINISH_MANY's results are sorted by id), so none of them deadlock."""
    picks = _picks(states, condition)
    literals = ", ".join(f"'{state}'" for state in states)
    return f"""SELECT id, claimed_by FROM tasks
    WHERE id = ANY(ARRAY(
        SELECT id FROM (
{picks}
        ) AS picked
        ORDER BY id LIMIT %(limit)s
    ))
      AND state IN ({literals}) AND ({condition})
    ORDER BY id
    FOR UPDATE"""


def cancel_tasks(
    condition: str = "true", states: tuple[str, ...] = CANCELLABLE, columns: str = "id"
) -> str:
    """Cancel up to `%(limit)s` tasks in `states` (CANCELLABLE or a part of it) matching
    `condition` (SQL over the columns of `tasks`, with its own parameters), lowest ids first
    (`_locked_in_id_order`); return `columns` of each, then `cancelled_kind` (counted by
    kind: ANNOUNCE_CANCELS), `held_attempt` and `held_by`: the worker that was running it
    (NULL: none) and the attempt it ran, by ascending id.

    A task claimed while the cancel waited for its lock is cancelled running; one finished
    meanwhile is left as it finished. A cancelled task is finished, holds no lease and waits
    for no retry: the rescue never takes it, and the worker that ran it cannot write over
    it (FINISH_MANY is fenced on `claimed_by`). Once this commits, ANNOUNCE_CANCELS tells
    the workers and counts the cancels."""
    assert states and set(states) <= set(CANCELLABLE)
    return f"""
WITH target AS (
    {_locked_in_id_order(states, condition)}
), cancelled AS (
    UPDATE tasks AS t
    SET state = 'cancelled',
        finished_at = now(),
        next_attempt_at = NULL,
        claimed_by = NULL
    FROM target
    WHERE t.id = target.id
    RETURNING t.*, target.claimed_by AS held_by
), recorded AS (
    -- A running attempt ends here (its worker's write is fenced out from now on).
    INSERT INTO attempts (task_id, attempt, kind, started_at, finished_at, worker, outcome)
    SELECT id, attempts, kind, claimed_at, now(), held_by, 'cancelled'
    FROM cancelled WHERE held_by IS NOT NULL
    ON CONFLICT (task_id, attempt) DO NOTHING
)
SELECT {columns}, kind AS cancelled_kind, attempts AS held_attempt, held_by FROM cancelled
ORDER BY id
"""


# After a cancel committed: wake the workers that were running the tasks (`notes`, the
# payloads: store.cancel_notes), and count the cancels by kind (`counts`, as ADD_ACTIVITY
# takes them, in the bucket of the database's now) in the activity of the moment (/stats) and
# the running totals (/metrics). A transaction of its own, committed without waiting for the
# disk: NOTIFY serialises the commits of every session that notifies (a lock on the database
# held through the commit: see NOTIFY_HORIZON_S), and the rows of the bucket and the totals
# those that count, so in the cancel's own transaction every cancel of a running task would
# wait for the ones before it to reach the disk. (With it apart, 1,000 cancels of running
# tasks from 32 clients took 5.5 s in one API process on a loaded 2-core machine, 1,000
# run-nows 6.1 s.) Lost in a crash, a notification only makes the worker learn at its next
# poll; a count goes missing.
ANNOUNCE_CANCELS = f"""
WITH quick AS (
    SELECT set_config('synchronous_commit', 'off', true)
), {{counts}}
SELECT count(pg_notify('{CANCEL_CHANNEL}', note))
FROM quick, unnest(CAST(%(notes)s AS text[])) AS note
"""


# POST /tasks/{id}/cancel: the tasks of `ids` (the cancels of one task each that came at
# the same moment share it: Store.cancel_task), scheduled or running; nothing of a task that
# has finished.
CANCEL_TASK = cancel_tasks("id = ANY(CAST(%(ids)s AS bigint[]))", columns=TASK_COLUMNS)


def retry_tasks(condition: str = "true", states: tuple[str, ...] = RETRYABLE) -> str:
    """Schedule again, due now, up to `%(limit)s` tasks in `states` (RETRYABLE or a part of
    it) matching `condition`, lowest ids first, each as RETRY_TASK does; return their ids.

    `condition` holds `occurrence_retryable` (Store.retry_matching): one task of a
    schedule's occurrence at most, and none that another task holds."""
    assert states and set(states) <= set(RETRYABLE)
    return f"""
WITH target AS (
    {_locked_in_id_order(states, condition)}
), retried AS (
    UPDATE tasks AS t
    SET {_RETRIED}
    FROM target
    WHERE t.id = target.id
    RETURNING t.*
), notified AS (
    SELECT {_NOTIFY_DUE_SOON} FROM retried
)
SELECT retried.id FROM retried CROSS JOIN notified
ORDER BY id
"""


# States a task can be deleted from: all but running (a worker holds it).
DELETABLE = ("scheduled", "succeeded", "failed", "cancelled")


def delete_tasks(condition: str = "true", states: tuple[str, ...] = DELETABLE) -> str:
    """Delete up to `%(limit)s` tasks in `states` (DELETABLE or a part of it) matching
    `condition`, lowest ids first, locked as the cancel locks them (`_locked_in_id_order`:
    a task claimed while this waited for it is running, and stays); return their ids.

    POST /tasks/delete. It deletes what DELETE_TASK and PRUNE_FINISHED delete with a task:
    its row and its attempts. (An attempt committed after this statement's snapshot, by a
    finish this statement's lock waited for, is not seen here: the store then runs
    DELETE_ATTEMPTS_OF_GONE on the ids deleted, as DELETE_TASK's does.)"""
    assert states and set(states) <= set(DELETABLE)
    return f"""
WITH target AS MATERIALIZED (
    {_locked_in_id_order(states, condition)}
), gone AS (
    DELETE FROM attempts WHERE task_id = ANY(ARRAY(SELECT id FROM target))
), deleted AS (
    DELETE FROM tasks AS t
    USING target
    WHERE t.id = target.id
    RETURNING t.id
)
SELECT id FROM deleted
ORDER BY id
"""


def count_tasks(condition: str, states: tuple[str, ...]) -> str:
    """How many of the tasks in `states` matching `condition` a bulk action would act on
    now, at most `%(limit)s`: the ids it would pick (`_locked_in_id_order`'s, without their
    locks), counted. A `dry_run` of POST /tasks/cancel, /retry and /delete."""
    return f"""
SELECT count(*) FROM (
    SELECT id FROM (
{_picks(states, condition)}
    ) AS picked
    ORDER BY id LIMIT %(limit)s
) AS counted
"""


# Which of the tasks a worker holds (`[{"id", "attempt"}]`) it should stop, and whether
# that attempt was cancelled: or else deleted since, or its attempt ended lost (rescued after
# the worker's lease ran out), or on another attempt since. What ended an attempt is read in
# `attempts` too: a task cancelled then retried within one poll is `scheduled` on the same
# attempt count, as one this worker retried itself is, and was counted `lost`, or not found,
# while the worker's run went on (it could then claim the task again over its own run). A
# task whose result this worker has just recorded is not among them: its attempt ended as
# the worker said.
NO_LONGER_HELD = """
SELECT h.id,
    coalesce(t.state = 'cancelled' AND t.attempts = h.attempt, false)
        OR coalesce(a.outcome = 'cancelled', false) AS cancelled
FROM json_to_recordset(CAST(%(held)s AS json)) AS h(id bigint, attempt integer)
LEFT JOIN tasks AS t ON t.id = h.id
LEFT JOIN attempts AS a
    ON a.task_id = h.id AND a.attempt = h.attempt AND a.outcome IN ('cancelled', 'lost')
WHERE t.id IS NULL
    OR t.attempts <> h.attempt
    OR t.state = 'cancelled'
    OR a.task_id IS NOT NULL
"""


# A schedule disabled or deleted: its occurrences that have not started are cancelled (a
# retry waiting after a first attempt has started: it stays, as a running one does).
CANCEL_UNSTARTED_OCCURRENCES = cancel_tasks(
    "schedule = %(name)s AND started_at IS NULL", ("scheduled",)
)


# --- workers ------------------------------------------------------------------------------

# A worker's lease covers every task it holds. It is renewed by every heartbeat and every
# claim, and only while it has not run out: a worker that missed its lease is dead to
# everyone, itself included (it stops, hands back what it can, and starts again as a new
# worker), even before anyone rescued its tasks.
#
# Registering and each heartbeat also record the kinds the worker runs (`kinds`, sorted, so
# that two workers lock the rows they update in one order) in `kinds_served` (migration
# 0008). A kind written less than a minute ago is left alone, so its row is written about
# once a minute whatever the number of workers; an unserved kind is one not run for 5.
_RECORD_KINDS = f"""
served AS (
    INSERT INTO kinds_served AS s (kind, last_run_at)
    SELECT k, {NOW} FROM unnest(CAST(%(kinds)s AS text[])) AS k
    WHERE NOT EXISTS (
        SELECT FROM kinds_served r
        WHERE r.kind = k AND r.last_run_at > {NOW} - interval '1 minute'
    )
    ORDER BY k
    ON CONFLICT (kind) DO UPDATE SET last_run_at = greatest(s.last_run_at, excluded.last_run_at)
)"""

# Registering also says who the worker is, for GET /workers (migration 0015).
REGISTER_WORKER = f"""
WITH {_RECORD_KINDS}
INSERT INTO workers (id, lease_expires_at, host, pid, kinds, version, tick)
VALUES (%(worker)s, now() + make_interval(secs => CAST(%(lease_s)s AS float8)), %(host)s,
    %(pid)s, CAST(%(kinds)s AS text[]), %(version)s, %(tick)s)
"""

HEARTBEAT = f"""
WITH {_RECORD_KINDS}
UPDATE workers
SET heartbeat_at = {NOW},
    lease_expires_at = {NOW} + make_interval(secs => CAST(%(lease_s)s AS float8))
WHERE id = %(worker)s AND lease_expires_at >= {NOW}
RETURNING id
"""

# The columns a worker's row and its record once it ended share (migration 0015).
_WHO = "id, host, pid, started_at, kinds, version, tick, heartbeat_at, rescued"

# A worker that stops goes away once it holds nothing, and is recorded as `left` for an hour
# (GET /workers); a tick that ends is not (one a minute would crowd the list). If it still
# holds tasks (it could not hand everything back), its row stays until its lease runs out
# and its tasks are rescued; it is then recorded as `dead` (FORGET_DEAD_WORKERS).
DEREGISTER_WORKER = f"""
WITH gone AS (
    DELETE FROM workers
    WHERE id = %(worker)s
      AND NOT EXISTS (SELECT 1 FROM tasks WHERE state = 'running' AND claimed_by = %(worker)s)
    RETURNING {_WHO}
)
INSERT INTO workers_ended ({_WHO}, ended_at, state)
SELECT {_WHO}, now(), 'left' FROM gone WHERE NOT tick
ON CONFLICT (id) DO NOTHING
"""

# GET /workers: live workers (and dead ones whose tasks are being rescued), then those that
# left or died in the last hour. `running`: its running tasks, counted on the `tasks_running`
# index. Few rows: a row per live worker, and an hour of ended ones.
LIST_WORKERS = """
SELECT id, host, pid, started_at AT TIME ZONE 'UTC' AS started_at, kinds,
    (SELECT count(*) FROM tasks WHERE state = 'running' AND claimed_by = w.id) AS running,
    heartbeat_at AT TIME ZONE 'UTC' AS last_heartbeat_at, version, tick,
    CASE WHEN lease_expires_at < now() THEN 'dead' ELSE 'live' END AS state,
    lease_expires_at AT TIME ZONE 'UTC' AS lease_expires_at, rescued
FROM workers AS w
UNION ALL
SELECT id, host, pid, started_at AT TIME ZONE 'UTC', kinds, 0, heartbeat_at AT TIME ZONE 'UTC',
    version, tick, state, ended_at AT TIME ZONE 'UTC', rescued
FROM workers_ended
WHERE ended_at >= now() - interval '1 hour'
  AND id NOT IN (SELECT id FROM workers)
ORDER BY started_at DESC, id
LIMIT %(limit)s
"""

# --- claim -> run -> record ----------------------------------------------------------------

# The plan the worker's batch statements are written for, pinned for their transaction
# (set_config(..., true) is SET LOCAL, which works through transaction poolers too; one
# statement for all, where seven SET LOCAL cost a cold tick ~8 ms each time). On a table
# without statistics, or bulk-loaded since they were taken, the planner's estimates can be
# wrong by orders of magnitude, and the plans it then picks cost what the table holds, not
# what the batch holds: the claim read all due tasks through a bitmap and sorted them to
# keep the first `limit` (6 ms for a claim of 10 among 20,000 due, against 2 ms in order); a
# finishing write scanned the running tasks and re-read its whole batch for each (four and a
# half minutes for 40,000 results). With these settings the one cheap plan left is the one
# written for: indexes walked in order, rows found by primary key, the batch read once
# (tests/integration/test_plans.py).
#
# And no JIT. Before PostgreSQL 18 a disabled plan node still costs 10^10 when nothing else
# can do its job (the rescue's scan of the small `workers` table), and a plan that costly
# is compiled with LLVM, inlined and optimized: on Debian's PostgreSQL 15 each rescue took
# 200-480 ms of the server's CPU for a statement that runs in 0.5 ms. That was the stall of
# a few hundred ms seen now and then in start lateness. (Connections made outside a
# transaction pooler also turn JIT off for the session: see functions/conninfo.py.)
#
# And a custom plan, made for the values at hand, every time. psycopg prepares a statement on
# its 6th run and PostgreSQL then keeps the generic plan it made at that moment, planned for
# the table as it was: a worker that ran a few dozen single tasks on a fresh table kept, for
# FINISH_MANY, a walk of the whole primary key with the batch's JSON re-read for every row
# (1,000 x 1,000 rows per write: 600-780 ms for 1,000 results on Debian's PostgreSQL 15) until
# autovacuum's first analyze, and the pinned settings cannot stop it (it was planned under
# them). Measured on 15 with a worker warmed by 30 single tasks, then 100,000 baz through POST
# /tasks/batch: 1,564 finished/s before, 14,000-23,500/s with custom plans, as with no prepared
# statements at all (TASKRUNNER_TRANSACTION_POOLER=true: 13,900-21,400/s in the same hour). A
# custom plan costs ~0.5 ms of planning per statement, a batch's, not a task's; a shape with one
# possible plan was no option: with hash and merge joins off, the nested loop can still be
# turned either way. A statement with no parameter always runs its generic plan (the setting
# cannot change that): the worker's one on `tasks`, FORGET_DEAD_WORKERS, is run under these
# settings too, so its plan is at least made under them.
# The server's idle-in-transaction timeout, off for one transaction (Store.finish_many_after).
NO_IDLE_TIMEOUT = "SELECT set_config('idle_in_transaction_session_timeout', '0', true)"
# Behind a transaction pooler, which refuses the startup options that bound a direct session
# (conninfo.connect_kwargs), the same bounds for one transaction: its statements, and how long
# it may sit idle holding its locks (a process frozen inside it). Set for the transaction
# alone, they leave the pooler's server connection as they found it.
BOUND_TRANSACTION = """
SELECT set_config('statement_timeout', %(ms)s, true),
    set_config('idle_in_transaction_session_timeout', %(ms)s, true)
"""


def _pinned_plan(plan_cache_mode: str) -> str:
    return f"""
SELECT set_config('enable_seqscan', 'off', true),
    set_config('enable_bitmapscan', 'off', true),
    set_config('enable_sort', 'off', true),
    set_config('enable_hashjoin', 'off', true),
    set_config('enable_mergejoin', 'off', true),
    set_config('jit', 'off', true),
    -- Nor parallel workers: on the same estimates, a statement that reads a few index
    -- pages was planned with two of them, which cost 7 ms of a 9 ms count to start.
    set_config('max_parallel_workers_per_gather', '0', true),
    set_config('plan_cache_mode', '{plan_cache_mode}', true)
"""


# A plan for the values at hand, each time: see above.
PINNED_PLAN = _pinned_plan("force_custom_plan")
# The same settings with the generic plan, for a statement whose plan no value can change:
# one with no value but its LIMIT, which under these settings only an index walked in its
# order can serve, whatever the LIMIT (the first page of every task, or of tasks in some
# states: Store.list_page_text). Planned once on each connection, not at each run; its plan is made
# under these settings, and so is the new one the server makes after an ANALYZE.
PINNED_GENERIC_PLAN = _pinned_plan("force_generic_plan")

# Which tasks a worker may take: those of `kinds` (each fits before its deadline, if it has
# one), and those of `short_kinds` whose own timeout fits in `fit_s` seconds.
_CLAIMABLE = """(kind = ANY(CAST(%(kinds)s AS text[]))
        OR (kind = ANY(CAST(%(short_kinds)s AS text[]))
            AND timeout_s <= CAST(%(fit_s)s AS float8)))"""

# Where the claim starts reading each priority's range of `tasks_due` (the worker's
# `from_due`/`from_id`, one per priority: NULL arrays, or NULLs, read the whole range). A
# claimed task stays in `tasks_due` until vacuum removes it, and a claim that reads from a
# range's start steps over every task claimed since the last vacuum: during a burst of
# 2,000,000 that grew to 2,843 index pages a claim of 1,000 (93 at first) and the drain slowed
# by half between autovacuum passes. So a worker in a backlog claims from where NEXT_DUE,
# in its last claim's transaction, found each range's first task still scheduled (run_state.
# ClaimFrom says when it may, and when it must read from the start again).
_LEVELS_FROM = f"""unnest({PRIORITIES},
        CAST(%(from_due)s AS timestamp[]), CAST(%(from_id)s AS bigint[]))
        AS level(priority, from_due, from_id)"""
_FROM_DUE = "coalesce(level.from_due AT TIME ZONE 'UTC', '-infinity')"
_FROM_ID = "coalesce(level.from_id, 0)"

# The claim. One statement, committed before any task runs (with PINNED_PLAN and NEXT_DUE in
# one transaction, sent together in one round trip):
# - `me` renews this worker's lease and holds its row lock until the claim commits, so a
#   claim and the rescue of this worker's tasks (which locks the same row) never overlap;
#   a worker whose lease ran out claims nothing (`me` is empty).
# - SKIP LOCKED lets any number of workers claim at once without waiting or sharing a row.
# - `id = ANY(ARRAY(...))` rather than `id IN (SELECT ...)`: measured about twice as fast
#   (the IN form's plan scans the table); `picked` is served by the `tasks_due` index.
# - The attempt is counted here, so a worker that dies mid-task still uses one up.
#   `started_at` is when the first attempt started; retries keep it.
# - `kinds` holds only the kinds this worker can finish before its deadline; of the others,
#   `short_kinds` (NULL `fit_s`: none), it takes tasks whose own timeout_s fits.
# - Among due tasks the lowest priority comes first, then the earliest due: one range of
#   `tasks_due` per priority (PRIORITIES), read in the index's order, so no row that is not
#   due is read and nothing is sorted. A claim of due tasks of priority 0 alone reads
#   exactly what it did before priorities (the first range fills the LIMIT); one that runs
#   out of due tasks probes the nine other ranges, a page each.
# - `caps` (JSON, `{"bar": 11}`): no more of a kind than the worker has slots free for
#   (run_state.Slots.caps), the first in claim order; what is left of it stays due for other
#   workers (a worker that took every due `bar` held them while it ran 100 at a time). Only
#   the claim's own rows of capped kinds are sorted, to rank each kind's (ranking every row
#   made a claim of 1,000 baz 4 ms slower, 24 against 28 ms at the median on a loaded
#   machine; so ranked, the same as before the caps). The rows past a cap were locked
#   for the claim's moment (SKIP LOCKED: another worker's claim meanwhile passes them by, and
#   its NEXT_DUE, which does not skip, says they are due, so it looks again at once). The
#   runner leaves a kind at its cap out of `kinds`, and claims no more than the caps' sum
#   when every kind it asks for has one. (A CTE: FOR UPDATE is not allowed beside a window.)
_CLAIMED_AT = f"greatest({NOW}, {DUE_AT}, {BECAME_DUE})"
CLAIM_DUE = f"""
WITH me AS (
    UPDATE workers
    SET heartbeat_at = {NOW},
        lease_expires_at = {NOW} + make_interval(secs => CAST(%(lease_s)s AS float8))
    WHERE id = %(worker)s AND lease_expires_at >= {NOW}
    RETURNING id
), picked AS MATERIALIZED (
    SELECT first.* FROM {_LEVELS_FROM}
    CROSS JOIN LATERAL (
        SELECT id, kind, priority, {DUE_AT} AS due FROM tasks
        WHERE state = 'scheduled'
          AND tasks.priority = level.priority
          AND ({DUE_AT}, id) >= ({_FROM_DUE}, {_FROM_ID})
          AND {DUE_AT} <= {NOW} + make_interval(secs => CAST(%(ahead_s)s AS float8))
          AND (next_attempt_at IS NULL OR next_attempt_at <= {NOW})
          AND {_CLAIMABLE}
          AND EXISTS (SELECT FROM me)
        -- priority first: the index's order (it is one value here).
        ORDER BY tasks.priority, {DUE_AT}, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS first
    LIMIT %(limit)s
), taken AS (
    SELECT id FROM picked WHERE NOT CAST(%(caps)s AS jsonb) ? kind
    UNION ALL
    SELECT id FROM (
        SELECT id, kind,
            row_number() OVER (PARTITION BY kind ORDER BY priority, due, id) AS n
        FROM picked
        WHERE CAST(%(caps)s AS jsonb) ? kind
    ) AS ranked
    WHERE n <= CAST(CAST(%(caps)s AS jsonb) ->> kind AS int)
)
UPDATE tasks
SET state = 'running',
    attempts = attempts + 1,
    started_at = coalesce(started_at, {_CLAIMED_AT}),
    claimed_at = {_CLAIMED_AT},
    next_attempt_at = NULL,
    claimed_by = %(worker)s
WHERE id = ANY(ARRAY(SELECT id FROM taken))
RETURNING id, kind, attempts, max_attempts,
    -- The start lateness of a first attempt, for the activity figures (functions/counters.py):
    -- from BECAME_DUE, which this UPDATE leaves as it was (it clears next_attempt_at).
    CASE WHEN attempts = 1
        THEN CAST(extract(epoch FROM claimed_at - {BECAME_DUE}) * 1000 AS float8)
    END AS lateness_ms,
    -- As text: the kind parses it if it reads it (functions/kinds.py Context.payload).
    CAST(payload AS text) AS payload, timeout_s, priority,
    -- How far ahead of its time it was claimed (Runner._on_time); 0 for one due already.
    CASE WHEN claimed_at > {NOW} THEN CAST(extract(epoch FROM claimed_at - {NOW}) AS float8)
        ELSE 0 END AS ahead_s
"""

# How long until the next task the claim would take is due, by the database's clock, as a
# duration (which a worker's own clock measures well) rather than a wall time; and the
# database's time now, in Unix seconds, to compare with the due times notifications carry.
# Neither is read as a timestamp, so no stored time can fail to load here.
NEXT_DUE = f"""
SELECT extract(epoch FROM {NOW})::float8 AS now_s,
       extract(epoch FROM min(first.due) - {NOW})::float8 AS wait_s,
       -- Each priority's first task still scheduled, where the next claim may start
       -- (_LEVELS_FROM). Not ORDER BY in the aggregates: it sorts what the join read.
       array_agg(level.priority) AS levels,
       array_agg(first.due AT TIME ZONE 'UTC') AS from_due,
       array_agg(first.id) AS from_id
FROM {_LEVELS_FROM}
LEFT JOIN LATERAL (
    SELECT {DUE_AT} AS due, id FROM tasks
    WHERE state = 'scheduled'
      AND tasks.priority = level.priority
      AND ({DUE_AT}, id) >= ({_FROM_DUE}, {_FROM_ID})
      AND {_CLAIMABLE}
    ORDER BY tasks.priority, {DUE_AT}, id
    LIMIT 1
) AS first ON true
"""

# The database's clock as the statement runs, in Unix seconds: sent with a claim's COMMIT, the
# time the server had reached once the claim was committed (Store.claim_due).
CLOCK = "SELECT extract(epoch FROM clock_timestamp())::float8"

# Due tasks of kinds a tick could not fit before its deadline, by kind, among the first
# `%(read)s` due of those kinds in claim order (Store.LEFT_READ). Counted at the end of every
# tick that could not fit a kind: all of them, with 666,666 foo due in a burst of 2,000,000,
# took 1.5-2.6 s each on PostgreSQL 15, in ticks that run every second.
COUNT_DUE_BY_KIND = f"""
WITH head AS MATERIALIZED (
    SELECT kind FROM {_due_tasks("kind = ANY(CAST(%(kinds)s AS text[]))")}
    LIMIT %(read)s
)
SELECT kind, count(*) FROM head GROUP BY kind ORDER BY kind
"""

# Records a batch of results in one statement, each fenced: it is written only if this
# worker still holds that attempt (`claimed_by` is set only while a task runs: see the
# `running_iff_claimed` constraint). A row missing from RETURNING means the worker lost it
# (its lease ran out and the task was rescued, maybe re-run): its result is dropped, never
# written over. A result with state 'scheduled' is a retry, due again after `retry_in_s`.
# No `state = 'running'` here: the rows are found by primary key (module docstring).
# The batch travels as one JSON parameter: psycopg dumps Python lists into SQL arrays in
# Python (1.6 s of a 9 s profile of 100,000 baz); JSON took a worker from 14,400 to 17,300
# baz/s.
_FINISH_SET = """SET state = r.state,
    output = r.output,
    error = r.error,
    finished_at = CASE WHEN r.state IN ('succeeded', 'failed') THEN now() END,
    next_attempt_at = CASE
        WHEN r.state = 'scheduled' THEN now() + make_interval(secs => r.retry_in_s)
    END,
    claimed_by = NULL,
    started_at = CASE WHEN r.late_s IS NULL THEN t.started_at
        ELSE t.claimed_at + make_interval(secs => r.late_s) END"""
# Fenced: the worker's own claim of this attempt, found by primary key.
_FINISH_FENCE = """WHERE t.id = r.id
  AND t.claimed_by = %(worker)s
  AND t.attempts = r.attempt"""
_RESULT_COLUMNS = (
    "id bigint, attempt integer, state text, output text, error text, retry_in_s float8"
)
# FINISH_MANY records a batch of first attempts that succeeded (a drain's), and nothing
# else: each task's id and line travel as two JSON arrays, read side by side. One object per
# result with its six fields, for a batch of 1,000 baz, was 2.0-2.9 ms of a worker's CPU to
# build and encode (py-spy: 15% of a draining worker's event loop); two arrays 0.4 ms.
FINISH_MANY = """
UPDATE tasks AS t
SET state = 'succeeded',
    output = r.output,
    error = NULL,
    finished_at = now(),
    next_attempt_at = NULL,
    claimed_by = NULL
FROM ROWS FROM (
    json_array_elements_text(CAST(%(ids)s AS json)),
    json_array_elements_text(CAST(%(outputs)s AS json))
) AS r(id, output)
WHERE t.id = CAST(r.id AS bigint)
  AND t.claimed_by = %(worker)s
  AND t.attempts = 1
RETURNING t.id
"""

# FINISH_MANY for a batch holding any result but a first attempt's success: each attempt
# written is kept in `attempts` too (migration 0016), in the same statement, from the rows
# the fenced UPDATE wrote (a result fenced out writes no attempt: the cancel or the rescue
# that took the task wrote its row). A first attempt that succeeded writes none: its fields
# are the task's. A batch of first successes alone (a drain) runs FINISH_MANY, which writes
# no attempt (Store.finish_many).
FINISH_MANY_RECORDING = f"""
WITH finished AS (
    UPDATE tasks AS t
    {_FINISH_SET}
    FROM json_to_recordset(CAST(%(results)s AS json))
        AS r({_RESULT_COLUMNS},
             timed_out boolean, traceback text, error_group text, late_s float8)
    {_FINISH_FENCE}
    RETURNING t.id, t.kind,
        t.claimed_at + make_interval(secs => coalesce(r.late_s, 0)) AS claimed_at,
        r.attempt, r.state, r.error, r.timed_out,
        r.traceback, r.error_group
), recorded AS (
    INSERT INTO attempts AS a
        (task_id, attempt, kind, started_at, finished_at, worker, outcome, error, error_group,
         traceback)
    SELECT id, attempt, kind, claimed_at, now(), %(worker)s,
        CASE WHEN timed_out THEN 'timed_out' WHEN state = 'scheduled' THEN 'retried'
            ELSE state END,
        error, error_group, traceback
    FROM finished
    WHERE NOT (state = 'succeeded' AND attempt = 1)
    ON CONFLICT (task_id, attempt) DO NOTHING
)
SELECT id FROM finished
"""

# Of results whose write may have committed before its connection was lost, those that are
# in the table now as written (the retry's fence then refuses them: they are no longer held).
RECORDED = """
SELECT t.id
FROM json_to_recordset(CAST(%(results)s AS json))
    AS r(id bigint, attempt integer, state text, output text, error text)
JOIN tasks AS t ON t.id = r.id
WHERE t.attempts = r.attempt
  AND t.claimed_by IS NULL
  AND t.state = r.state
  AND t.output IS NOT DISTINCT FROM r.output
  AND t.error IS NOT DISTINCT FROM r.error
"""

# The tasks the database says this worker holds. A claim whose answer was lost with its
# connection may have committed: its tasks are this worker's, though it never heard of them.
HELD_BY = "SELECT id FROM tasks WHERE state = 'running' AND claimed_by = %(worker)s"

# A worker hands back what it will not finish (shutting down, or tasks it never heard of):
# due at once, without counting the interrupted attempt; a task that never got to run its
# first attempt has not started. The ids handed back, and a notification: listening workers
# start them at once rather than at their next poll.
RELEASE = f"""
WITH released AS (
    UPDATE tasks
    SET state = 'scheduled',
        attempts = attempts - 1,
        started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END,
        next_attempt_at = greatest(now(), claimed_at),
        claimed_by = NULL
    WHERE id = ANY(CAST(%(ids)s AS bigint[]))
      AND claimed_by = %(worker)s
    RETURNING id, next_attempt_at, execute_at
)
SELECT coalesce(array_agg(id), '{{}}') AS ids, {_NOTIFY_DUE_SOON} FROM released
"""

# Tasks of workers whose lease ran out (kill -9, OOM, a FaaS timeout, a host that stalled)
# go back to `scheduled`, due at once, or to `failed` when their attempts are used up. The
# dead worker's row is locked first (SKIP LOCKED: one that is claiming right now is alive),
# so it cannot claim meanwhile; SKIP LOCKED on the tasks lets parallel ticks split the work.
# At most `limit` tasks a statement.
RESCUE_EXPIRED = f"""
WITH dead AS (
    SELECT id FROM workers
    WHERE lease_expires_at < {NOW}
    FOR UPDATE SKIP LOCKED
), picked AS MATERIALIZED (
    SELECT id, claimed_by, kind, attempts, max_attempts, claimed_at FROM tasks
    WHERE state = 'running' AND claimed_by IN (SELECT id FROM dead)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), recorded AS (
    -- Each attempt rescued ends `lost` (the rows are locked above: as they are updated below).
    INSERT INTO attempts
        (task_id, attempt, kind, started_at, finished_at, worker, outcome, error, error_group)
    SELECT id, attempts, kind, claimed_at, {NOW}, claimed_by, 'lost',
        'lease expired: worker ' || claimed_by || ' stopped during attempt '
            || attempts || ' of ' || max_attempts,
        'lease expired: worker <worker> stopped during attempt <n> of <n>'
    FROM picked
    ON CONFLICT (task_id, attempt) DO NOTHING
), counted AS (
    -- What was rescued from each, for GET /workers (the rows `dead` locked).
    UPDATE workers AS w SET rescued = w.rescued + p.n
    FROM (SELECT claimed_by, count(*) AS n FROM picked GROUP BY claimed_by) AS p
    WHERE w.id = p.claimed_by
)
UPDATE tasks
SET state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'scheduled' END,
    finished_at = CASE WHEN attempts >= max_attempts THEN {NOW} END,
    next_attempt_at = CASE WHEN attempts < max_attempts THEN greatest({NOW}, claimed_at) END,
    error = 'lease expired: worker ' || claimed_by || ' stopped during attempt '
        || attempts || ' of ' || max_attempts,
    claimed_by = NULL
WHERE id = ANY(ARRAY(SELECT id FROM picked))
RETURNING id, state, kind
"""

# Dead workers that hold nothing any more are forgotten, recorded as `dead` for an hour
# (GET /workers; a dead tick too), and ended workers' records past the hour deleted.
FORGET_DEAD_WORKERS = f"""
WITH gone AS (
    DELETE FROM workers AS w
    WHERE w.lease_expires_at < now()
      AND NOT EXISTS (SELECT 1 FROM tasks WHERE state = 'running' AND claimed_by = w.id)
    RETURNING {_WHO}, lease_expires_at
), recorded AS (
    INSERT INTO workers_ended ({_WHO}, ended_at, state)
    SELECT {_WHO}, lease_expires_at, 'dead' FROM gone
    ON CONFLICT (id) DO NOTHING
)
DELETE FROM workers_ended WHERE ended_at < now() - interval '1 hour'
"""

# --- retention ---------------------------------------------------------------------------

# Finished tasks older than `older_than_s`, the oldest first, at most `limit` a statement:
# served by the `tasks_finished` index, in its order. SKIP LOCKED: parallel ticks and
# workers pruning at once split the rows rather than wait on each other.
# Their attempts go in the same statement: an attempt is added to a finished task only by
# its finish, which committed before this snapshot saw it finished.
PRUNE_FINISHED = """
WITH picked AS MATERIALIZED (
    SELECT id FROM tasks
    WHERE state IN ('succeeded', 'failed', 'cancelled')
      AND finished_at < now() - make_interval(secs => CAST(%(older_than_s)s AS float8))
    ORDER BY finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM attempts WHERE task_id = ANY(ARRAY(SELECT id FROM picked))
), pruned AS (
    DELETE FROM tasks WHERE id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING 1
)
SELECT count(*) FROM pruned
"""

# Activity is kept a day (/stats reads the last hour).
PRUNE_ACTIVITY = "DELETE FROM task_activity WHERE bucket < now() - interval '1 day'"

# --- activity: what /stats and /metrics read (functions/report.py) ----------------------------


def _added(table: str, column: str) -> str:
    """Histogram `column` of `table`'s row plus the one being inserted, bucket by bucket (one
    of an older version is shorter: the buckets it lacks count as 0)."""
    return f"""{column} = ARRAY(
        SELECT coalesce(x, 0) + coalesce(y, 0)
        FROM unnest({table}.{column}, EXCLUDED.{column}) WITH ORDINALITY AS u(x, y, i)
        ORDER BY i
    )"""


_OUTCOMES = ("succeeded", "failed", "retried", "timed_out", "cancelled", "lost")
_COUNTS = ("started", *_OUTCOMES)

# Some counts by 10-second bucket and kind (`activity`: functions/counters.py; a bucket of
# null is the one of the database's now), added to what other workers counted; and the same
# counts summed by kind (`totals`), added to the running totals (migration 0017), in one
# statement: both or neither. No statement of it runs per task: a worker writes what it
# counted every couple of seconds (upkeep), a cancel once. Rows are locked in the order of
# their keys, the activity's then the totals', by every writer alike: no deadlock. CTEs to
# go inside a WITH (`quick` before them: ANNOUNCE_CANCELS's setting, or nothing).
ADD_COUNTS = f"""activity AS (
    INSERT INTO task_activity AS a
        (bucket, kind, {", ".join(_COUNTS)}, lateness, lateness_max_ms)
    SELECT coalesce(to_timestamp(b.bucket_s),
                    to_timestamp(floor(extract(epoch FROM now()) / 10) * 10)),
           b.kind, {", ".join(f"coalesce(b.{c}, 0)" for c in _COUNTS)},
           coalesce(b.lateness, '{{}}'), coalesce(b.lateness_max_ms, 0)
    FROM quick, json_to_recordset(CAST(%(activity)s AS json)) AS b(
        bucket_s bigint, kind text, {", ".join(f"{c} bigint" for c in _COUNTS)},
        lateness bigint[], lateness_max_ms float8
    )
    ORDER BY 1, 2
    ON CONFLICT (bucket, kind) DO UPDATE SET
        {", ".join(f"{c} = a.{c} + EXCLUDED.{c}" for c in _COUNTS)},
        {_added("a", "lateness")},
        lateness_max_ms = greatest(a.lateness_max_ms, EXCLUDED.lateness_max_ms)
), totals AS (
    INSERT INTO task_totals AS t
        (kind, {", ".join(_OUTCOMES)}, duration, duration_sum_s, lateness, lateness_sum_s)
    SELECT b.kind, {", ".join(f"coalesce(b.{c}, 0)" for c in _OUTCOMES)},
           coalesce(b.duration, '{{}}'), coalesce(b.duration_sum_s, 0),
           coalesce(b.lateness, '{{}}'), coalesce(b.lateness_sum_s, 0)
    FROM quick, json_to_recordset(CAST(%(totals)s AS json)) AS b(
        kind text, {", ".join(f"{c} bigint" for c in _OUTCOMES)},
        duration bigint[], duration_sum_s float8, lateness bigint[], lateness_sum_s float8
    )
    ORDER BY 1
    ON CONFLICT (kind) DO UPDATE SET
        {", ".join(f"{c} = t.{c} + EXCLUDED.{c}" for c in _OUTCOMES)},
        {_added("t", "duration")},
        duration_sum_s = t.duration_sum_s + EXCLUDED.duration_sum_s,
        {_added("t", "lateness")},
        lateness_sum_s = t.lateness_sum_s + EXCLUDED.lateness_sum_s
)"""

ANNOUNCE_CANCELS = ANNOUNCE_CANCELS.replace("{counts}", ADD_COUNTS)

# A worker's counts (ADD_COUNTS), written every couple of seconds.
ADD_ACTIVITY = f"""
WITH quick AS (SELECT), {ADD_COUNTS}
SELECT 1
"""

# What /stats reads, in one read-only transaction (one snapshot). Each is bounded by an
# index or a cap, so a table of a million finished tasks answers as fast as an empty one
# (the `stats` scenario of `taskrunner bench`):
# - running by kind: exact, through its partial index; scheduled by kind: exact while no more
#   than `exact` are scheduled, read through their partial index (`tasks_scheduled_id`), else
#   left to the sample below (a count of a million scheduled tasks read them all: 123 ms at
#   500,000, growing with them). The row of no state says how many scheduled tasks were seen,
#   `exact` + 1 at most, and never more rows than that are read to decide.
STATS_ACTIVE_COUNTS = """
WITH seen AS MATERIALIZED (
    SELECT count(*) AS n FROM (
        SELECT FROM tasks WHERE state = 'scheduled' LIMIT CAST(%(exact)s AS bigint) + 1
    ) AS upto
)
SELECT state, kind, count(*) FROM tasks
WHERE state = 'scheduled' AND (SELECT n FROM seen) <= CAST(%(exact)s AS bigint)
GROUP BY 1, 2
UNION ALL
SELECT state, kind, count(*) FROM tasks WHERE state = 'running' GROUP BY 1, 2
UNION ALL
SELECT '', '', n FROM seen
"""
# - the table's size, to choose between counting finished tasks and estimating them: its
#   pages now, and the rows per page when it was last analyzed; and its live rows, as the
#   server counts them (its statistics: each commit's inserts and deletes, within a second).
#   Those counts start again from 0 when the server's statistics are lost (a crash, a
#   failover, pg_stat_reset): then they count only the rows written since, and the table's
#   last vacuum or analyze, which those statistics would remember, is forgotten too, while
#   pg_class still holds the rows it counted and the pages they filled. The larger of the
#   server's count and the planner's own estimate then, the rows per page of pg_class over
#   the pages the table has now (a table of 2,100,000 read as 10,001 rows for minutes after
#   a crash, until autovacuum came by);
STATS_TABLE_SIZE = """
SELECT pages,
       CASE WHEN relpages > 0 AND reltuples >= 0 THEN reltuples / relpages END AS rows_per_page,
       CASE WHEN reltuples > 0 AND relpages > 0
                 AND pg_stat_get_last_vacuum_time(oid) IS NULL
                 AND pg_stat_get_last_autovacuum_time(oid) IS NULL
                 AND pg_stat_get_last_analyze_time(oid) IS NULL
                 AND pg_stat_get_last_autoanalyze_time(oid) IS NULL
            THEN greatest(pg_stat_get_live_tuples(oid),
                          CAST(reltuples / relpages * pages AS bigint))
            ELSE pg_stat_get_live_tuples(oid)
       END AS live_rows
FROM pg_class,
     LATERAL (SELECT pg_relation_size(oid) / current_setting('block_size')::int AS pages) AS now
WHERE oid = 'tasks'::regclass
"""
# - on a table too large to count, finished tasks by state and kind, exactly while no more
#   than `exact` have finished, read from the newest end of their partial index
#   (`tasks_finished`), else left to the sample below: a few thousand finished among
#   hundreds of thousands scheduled sit on a few pages, which a sample takes whole or misses
#   (0 on half of the calls, ~6,000 on the others, for 3,000). The row of no state says how
#   many were seen, `exact` + 1 at most;
STATS_FINISHED_FEW = """
WITH seen AS MATERIALIZED (
    SELECT count(*) AS n FROM (
        SELECT FROM tasks WHERE state IN ('succeeded', 'failed', 'cancelled')
        ORDER BY finished_at DESC, id DESC LIMIT CAST(%(exact)s AS bigint) + 1
    ) AS upto
)
SELECT state, kind, count(*) FROM tasks
WHERE state IN ('succeeded', 'failed', 'cancelled')
  AND (SELECT n FROM seen) <= CAST(%(exact)s AS bigint)
GROUP BY 1, 2
UNION ALL
SELECT '', '', n FROM seen
"""
# - finished tasks by state and kind, exactly (a small table) or in a sample of `percent` of
#   its pages (TABLESAMPLE SYSTEM reads only the pages it picks), scaled up (report.py); the
#   sample's scheduled tasks not yet due too, for when there are too many to count (the due
#   ones are counted exactly, STATS_DUE_BY_KIND: a burst created at once sits on a few pages,
#   which a sample takes whole or misses);
STATS_FINISHED_COUNTS = """
SELECT state, kind, count(*) FROM tasks
WHERE state IN ('succeeded', 'failed', 'cancelled') GROUP BY 1, 2
"""
STATS_FINISHED_SAMPLE = f"""
SELECT state, kind, count(*) FROM tasks TABLESAMPLE SYSTEM (CAST(%(percent)s AS float4))
WHERE state IN ('succeeded', 'failed', 'cancelled')
   OR (state = 'scheduled' AND {DUE_AT} > now())
GROUP BY 1, 2
"""
# When a due task became due, as start lateness counts it: a task created with
# `execute_at: 0` has waited since it was created, not for 56 years (BECAME_DUE), and one
# waiting for a retry since its retry's time.
_DUE_SINCE = f"greatest({DUE_AT}, {BECAME_DUE})"
# - how long the due task first in line has waited: the `tasks_due` index, its first due
#   task of each priority (PRIORITIES); workers holding running tasks: the `tasks_running`
#   index;
STATS_DUE_AND_WORKERS = f"""
SELECT CAST(extract(epoch FROM
           now() - {_first_due_by_priority(f"{DUE_AT} <= now()", _DUE_SINCE)}
       ) AS float8) AS oldest_due_age_s,
       (SELECT count(DISTINCT claimed_by) FROM tasks WHERE state = 'running') AS workers,
       (SELECT count(*) FROM workers WHERE lease_expires_at >= now()) AS workers_alive,
       CAST(extract(epoch FROM now()) AS float8) AS now_s
"""
# - due tasks by kind, and whether a worker or tick ran the kind in the last 5 minutes: a
#   range of `tasks_due` per priority, read once (`due` is their sum: with 2,000,000 due,
#   a count of them all beside this one took /stats from ~1.1 to ~2.2 s);
STATS_DUE_BY_KIND = f"""
SELECT kind, count(*),
       kind NOT IN (SELECT kind FROM kinds_served
                    WHERE last_run_at >= now() - interval '5 minutes') AS unserved
FROM {_due_tasks()}
GROUP BY kind ORDER BY kind
"""
# Due tasks of kinds that no worker or tick ran in the last 5 minutes, by kind (a worker's
# warning, at each heartbeat: upkeep), among the first UNSERVED_READ due tasks in claim order,
# and whether there were more (`full`). Reading them all grew with a backlog: with 4,000,000
# baz due (all served), each heartbeat's count ran into the 5 s statement timeout, and was
# tried again every 6 s. A kind nothing runs keeps its tasks due while the others are
# claimed: they come to the front.
UNSERVED_READ = 10_000
STATS_UNSERVED = f"""
WITH head AS MATERIALIZED (SELECT kind FROM {_due_tasks()} LIMIT {UNSERVED_READ})
SELECT kind, count(*), (SELECT count(*) FROM head) = {UNSERVED_READ} AS full FROM head
WHERE kind NOT IN (SELECT kind FROM kinds_served WHERE last_run_at >= now() - interval '5 minutes')
GROUP BY kind ORDER BY kind
"""
# - the last hour of activity: 360 rows a kind at most;
STATS_ACTIVITY = """
SELECT CAST(extract(epoch FROM bucket) AS bigint), kind, started, succeeded, failed, retried,
       timed_out, cancelled, lost, lateness, lateness_max_ms
FROM task_activity
WHERE bucket >= now() - interval '1 hour'
ORDER BY bucket
"""
# - for /metrics, the running totals: a row per kind (migration 0017).
STATS_TOTALS = f"""
SELECT kind, {", ".join(_OUTCOMES)}, duration, duration_sum_s, lateness, lateness_sum_s
FROM task_totals ORDER BY kind
"""

# --- attempts (migration 0016) -------------------------------------------------------------

# GET /tasks/{id}/attempts: the attempts kept, past `after`, oldest first; and the task's
# fields, for the attempt that has no row (a first that succeeded, one running now, the
# last of a task finished before attempts were kept). Both by key.
LIST_ATTEMPTS = """
SELECT attempt, started_at AT TIME ZONE 'UTC' AS started_at,
    finished_at AT TIME ZONE 'UTC' AS finished_at, worker, outcome, error, traceback
FROM attempts
WHERE task_id = %(id)s AND attempt > %(after)s
ORDER BY task_id, attempt
LIMIT %(limit)s
"""
ATTEMPTS_TASK = """
SELECT state, attempts,
    coalesce(claimed_at, started_at) AT TIME ZONE 'UTC' AS started_at,
    finished_at AT TIME ZONE 'UTC' AS finished_at, claimed_by AS worker, error,
    EXISTS (SELECT FROM attempts AS a WHERE a.task_id = t.id AND a.attempt = t.attempts)
        AS recorded
FROM tasks AS t WHERE id = %(id)s
"""

# GET /errors: the attempts that ended in an error in [since, until), of one kind or all,
# grouped by kind and normalised error, the most frequent first. The window is one range of
# `attempts_failures` (its predicate: these outcomes), however many rows lie outside it; a
# NULL `since` is the last 24 hours, a NULL `until` now. The window's start comes back too.
_FAILURES = ", ".join(f"'{outcome}'" for outcome in ERROR_OUTCOMES)
_SINCE = "coalesce(CAST(%(since)s AS timestamptz), now() - interval '24 hours')"
LIST_ERRORS = f"""
SELECT kind, error_group, count(*) AS count,
    min(finished_at) AT TIME ZONE 'UTC' AS first_seen,
    max(finished_at) AT TIME ZONE 'UTC' AS last_seen,
    max(task_id) AS sample_task
FROM attempts
WHERE outcome IN ({_FAILURES})
  AND finished_at >= {_SINCE}
  AND finished_at < coalesce(CAST(%(until)s AS timestamptz), 'infinity')
  AND (CAST(%(kind)s AS text) IS NULL OR kind = %(kind)s)
GROUP BY kind, error_group
ORDER BY count(*) DESC, max(finished_at) DESC, kind, error_group
LIMIT {MAX_ERROR_GROUPS}
"""
ERRORS_SINCE = f"SELECT {_SINCE} AT TIME ZONE 'UTC'"

PING = "SELECT 1"

# The schema revision these statements are written for (local/migrations/versions/); a
# unit test keeps it equal to the newest migration.
SCHEMA_REVISION = "0018"
SCHEMA_REVISION_IN_DATABASE = "SELECT version_num FROM alembic_version"
