"""Every SQL statement taskrunner runs, named like the `Store` method that runs it.

The schema is in `local/migrations/versions/`. Time is always the database's `now()`: an
instance's clock is never compared with `execute_at`. Each statement is its own short
transaction; no row lock is held while a task runs.
"""

# Workers LISTEN here; creating tasks NOTIFYs with the earliest new execute_at.
CHANNEL = "taskrunner_tasks"

TASK_COLUMNS = """
    id, kind, state, execute_at, created_at, started_at, finished_at,
    attempts, max_attempts, output, error
"""

# Creating a task due within NOTIFY_HORIZON wakes listening workers (in the same
# transaction: they hear of it once it is committed). The payload is its execute_at in Unix
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

INSERT_TASK = f"""
WITH inserted AS (
    INSERT INTO tasks (kind, execute_at, max_attempts)
    VALUES (%(kind)s, %(execute_at)s, %(max_attempts)s)
    RETURNING {TASK_COLUMNS}
), notified AS (
    SELECT {_NOTIFY_IF_SOON} FROM inserted
)
SELECT inserted.* FROM inserted CROSS JOIN notified
"""

# Many tasks in one statement (all or none). The batch travels as one JSON parameter (see
# FINISH_MANY), times as Unix seconds (formatting 10,000 ISO dates took half as long as the
# INSERT itself). Ids come from one identity sequence in row order, so sorting them restores the
# order given.
INSERT_TASKS = f"""
WITH inserted AS (
    INSERT INTO tasks (kind, execute_at, max_attempts)
    SELECT kind, to_timestamp(execute_at_s), %(max_attempts)s
    FROM ROWS FROM (
        json_to_recordset(CAST(%(tasks)s AS json)) AS (kind text, execute_at_s float8)
    ) WITH ORDINALITY AS new(kind, execute_at_s, n)
    ORDER BY n
    RETURNING id, execute_at
), notified AS (
    SELECT {_NOTIFY_IF_SOON} FROM inserted
)
SELECT inserted.id FROM inserted CROSS JOIN notified
ORDER BY id
"""

GET_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = %(id)s"

# `list_tasks` appends `AND state = '...'` / `AND kind = %(kind)s` as asked: a fixed
# "(%(state)s IS NULL OR ...)" form would get one generic plan for every filter.
LIST_TASKS = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id > %(after_id)s"

# The row lock waits for a claim that is starting this task, so a task is either deleted
# before any worker takes it, or reported running; never deleted under a worker.
DELETE_TASK = """
WITH target AS (
    SELECT id, state FROM tasks WHERE id = %(id)s FOR UPDATE
), removed AS (
    DELETE FROM tasks WHERE id IN (SELECT id FROM target WHERE state <> 'running')
)
SELECT state FROM target
"""

# The claim. One statement, committed before any task runs:
# - SKIP LOCKED lets any number of workers claim at once without waiting or sharing a row.
# - `id = ANY(ARRAY(...))` rather than `id IN (SELECT ...)`: measured about twice as fast
#   (the IN form's plan scans the table); the sub-select is served by the `tasks_due` index.
# - The attempt is counted here, so a worker that dies mid-task still uses one up.
# - The lease says how long the claim holds; a live worker extends it (`extend_leases`),
#   a dead worker's tasks go back by `rescue_expired`.
# - `kinds` holds only the kinds this worker can finish before its deadline.
CLAIM_DUE = """
UPDATE tasks
SET state = 'running',
    attempts = attempts + 1,
    started_at = now(),
    claimed_by = %(worker)s,
    lease_expires_at = now() + make_interval(secs => CAST(%(lease_s)s AS float8))
WHERE id = ANY(ARRAY(
    SELECT id FROM tasks
    WHERE state = 'scheduled'
      AND execute_at <= now()
      AND kind = ANY(CAST(%(kinds)s AS text[]))
    ORDER BY execute_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))
RETURNING id, kind, attempts, max_attempts
"""

# When the next task becomes due, and the database's time now: a worker sleeps for the
# difference (a duration, which its own clock measures well) rather than until a wall time.
NEXT_DUE = """
SELECT now() AS db_now, (
    SELECT execute_at FROM tasks
    WHERE state = 'scheduled' AND kind = ANY(CAST(%(kinds)s AS text[]))
    ORDER BY execute_at, id
    LIMIT 1
) AS next_at
"""

# Records a batch of results in one statement, each fenced: it is written only if this
# worker still holds that attempt. A row missing from RETURNING means the lease was lost
# (the task was rescued, maybe re-run): its result is dropped, never written over.
# A result with state 'scheduled' is a retry: it becomes due again after `retry_in_s`.
# The batch travels as one JSON parameter: psycopg dumps Python lists into SQL arrays in
# Python (1.6 s of a 9 s profile of 100,000 baz); JSON took a worker from 14,400 to 17,300
# baz/s.
FINISH_MANY = """
UPDATE tasks AS t
SET state = r.state,
    output = r.output,
    error = r.error,
    finished_at = CASE WHEN r.state IN ('succeeded', 'failed') THEN now() END,
    execute_at = CASE
        WHEN r.state = 'scheduled' THEN now() + make_interval(secs => r.retry_in_s)
        ELSE t.execute_at
    END,
    claimed_by = NULL,
    lease_expires_at = NULL
FROM json_to_recordset(CAST(%(results)s AS json))
    AS r(id bigint, attempt integer, state text, output text, error text, retry_in_s float8)
WHERE t.id = r.id
  AND t.state = 'running'
  AND t.claimed_by = %(worker)s
  AND t.attempts = r.attempt
RETURNING t.id
"""

# A live worker pushes its leases forward while its tasks run.
EXTEND_LEASES = """
UPDATE tasks
SET lease_expires_at = now() + make_interval(secs => CAST(%(lease_s)s AS float8))
WHERE id = ANY(CAST(%(ids)s AS bigint[]))
  AND state = 'running'
  AND claimed_by = %(worker)s
RETURNING id
"""

# Tasks whose lease ran out belong to a worker that died (kill -9, OOM, a FaaS timeout).
# They go back to `scheduled`, due at once, or to `failed` when their attempts are used up.
# SKIP LOCKED: two ticks rescuing at once split the rows instead of waiting on each other.
RESCUE_EXPIRED = """
UPDATE tasks
SET state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'scheduled' END,
    finished_at = CASE WHEN attempts >= max_attempts THEN now() END,
    error = 'lease expired: worker ' || claimed_by || ' stopped during attempt '
        || attempts || ' of ' || max_attempts,
    claimed_by = NULL,
    lease_expires_at = NULL
WHERE id = ANY(ARRAY(
    SELECT id FROM tasks
    WHERE state = 'running' AND lease_expires_at < now()
    FOR UPDATE SKIP LOCKED
))
RETURNING id, state
"""

# A worker shutting down gives back what it could not finish, due at once and without
# counting the interrupted attempt, instead of leaving it until its lease expires.
RELEASE = """
UPDATE tasks
SET state = 'scheduled',
    attempts = attempts - 1,
    claimed_by = NULL,
    lease_expires_at = NULL
WHERE id = ANY(CAST(%(ids)s AS bigint[]))
  AND state = 'running'
  AND claimed_by = %(worker)s
RETURNING id
"""

PING = "SELECT 1"
