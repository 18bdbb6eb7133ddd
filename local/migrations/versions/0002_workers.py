"""Workers hold leases, not tasks; the requested time is kept apart from the next attempt's.

- `workers`: one row per running worker (a process's runner, a Lambda tick). A worker's
  lease covers everything it holds, running or waiting to be recorded, for as long as it
  heartbeats; it never touches task rows to stay alive. When a lease runs out, the
  worker's running tasks are rescued (queries.RESCUE_EXPIRED).
- `tasks.next_attempt_at`: when a retry (or a task handed back) is due; NULL means "at
  `execute_at`", which stays what the user asked for. So a row inserted with only the
  columns it always needed (kind, execute_at, max_attempts) is due at its time.
- `tasks.execute_at` is bounded to what the API accepts and Python can read back.

Revision ID: 0002
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCHEMA = """
CREATE TABLE workers (
    id               text        PRIMARY KEY,
    started_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_at     timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL
);

-- Workers of the old schema, for the tasks they are running now: they keep their leases
-- until these expire, then their tasks are rescued as before.
INSERT INTO workers (id, lease_expires_at)
SELECT claimed_by, max(lease_expires_at) FROM tasks WHERE state = 'running' GROUP BY claimed_by;

ALTER TABLE tasks ADD COLUMN next_attempt_at timestamptz;
ALTER TABLE tasks ALTER COLUMN max_attempts SET DEFAULT 3;

-- Times past year 9999 (once reachable through a float rounding) cannot be read back.
UPDATE tasks SET execute_at = '9999-12-31 23:59:59.999999+00'
WHERE execute_at > '9999-12-31 23:59:59.999999+00';

DROP INDEX tasks_due;
DROP INDEX tasks_lease;
ALTER TABLE tasks DROP CONSTRAINT running_iff_leased;
ALTER TABLE tasks DROP COLUMN lease_expires_at;

ALTER TABLE tasks
    ADD CONSTRAINT running_iff_claimed CHECK ((state = 'running') = (claimed_by IS NOT NULL)),
    ADD CONSTRAINT retry_only_when_scheduled CHECK (state = 'scheduled' OR next_attempt_at IS NULL),
    ADD CONSTRAINT execute_at_in_range
        CHECK (execute_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00');

-- Serves the claim and NEXT_DUE: their WHERE and ORDER BY (queries.DUE_AT), nothing else.
CREATE INDEX tasks_due ON tasks ((coalesce(next_attempt_at, execute_at)), id)
    WHERE state = 'scheduled';
-- Serves the rescue of a dead worker's tasks, and listing running tasks. Statements that
-- look a task up by id (finishing writes, releases) never say `state = 'running'`, so this
-- index cannot be chosen for them: with stale statistics it looks empty, and a plan
-- driven from it re-scans the batch for every running row (quadratic; see FINISH_MANY).
CREATE INDEX tasks_running ON tasks (claimed_by) WHERE state = 'running';
"""


def upgrade() -> None:
    op.execute(SCHEMA)


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX tasks_running;
        DROP INDEX tasks_due;
        ALTER TABLE tasks
            DROP CONSTRAINT execute_at_in_range,
            DROP CONSTRAINT retry_only_when_scheduled,
            DROP CONSTRAINT running_iff_claimed,
            ADD COLUMN lease_expires_at timestamptz;
        UPDATE tasks t SET lease_expires_at = w.lease_expires_at
        FROM workers w WHERE t.claimed_by = w.id;
        UPDATE tasks SET lease_expires_at = now() WHERE state = 'running'
            AND lease_expires_at IS NULL;
        UPDATE tasks SET execute_at = next_attempt_at WHERE next_attempt_at IS NOT NULL;
        ALTER TABLE tasks ALTER COLUMN max_attempts DROP DEFAULT;
        ALTER TABLE tasks DROP COLUMN next_attempt_at,
            ADD CONSTRAINT running_iff_leased CHECK ((state = 'running') =
                (claimed_by IS NOT NULL AND lease_expires_at IS NOT NULL));
        CREATE INDEX tasks_due ON tasks (execute_at, id) WHERE state = 'scheduled';
        CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE state = 'running';
        DROP TABLE workers;
        """
    )
