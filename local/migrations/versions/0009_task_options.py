"""A task's own options: its priority, its timeout, and the attempts a keyed request asked for.

- `tasks.priority`: 0 to 9, 0 (the default) first: among due tasks, a lower number runs
  first. A constant default: added without rewriting the table (its check is validated by
  one scan of it, with writes held).
- `tasks.timeout_s`: how long a run may take before it is stopped; NULL (every task before
  this one) means the kind's own limit, as before.
- `tasks.idempotency_max_attempts`: the `max_attempts` a keyed request asked for, as
  `idempotency_execute_at` is its time: a retry raises `max_attempts`, and a repeat of the
  request is compared with what it asked (queries.GET_TASK_BY_KEY). NULL on tasks keyed
  before: any max_attempts repeats those.
- `tasks_due` becomes (priority, due time, id) of scheduled tasks: the claim reads it a range
  per priority (queries.PRIORITIES), only due tasks, in the order it takes them. Rebuilt in
  the migration's transaction, with writes to `tasks` held meanwhile: it reads the table
  once. The version before this one still runs on it while it is applied and rolled out:
  its claim then reads the index in full (it orders by due time alone), slower with many
  scheduled tasks, never wrong.

Revision ID: 0009
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

SCHEMA = """
ALTER TABLE tasks
    ADD COLUMN priority smallint NOT NULL DEFAULT 0,
    ADD COLUMN timeout_s double precision,
    ADD COLUMN idempotency_max_attempts integer,
    ADD CONSTRAINT priority_in_range CHECK (priority BETWEEN 0 AND 9),
    -- Above 0 and finite (NaN is above every number in PostgreSQL, 'Infinity' too).
    ADD CONSTRAINT timeout_s_positive CHECK (timeout_s > 0 AND timeout_s < 'Infinity');

DROP INDEX tasks_due;
-- Serves the claim, NEXT_DUE and the counts of due tasks: their WHERE and ORDER BY
-- (queries.PRIORITIES, queries.DUE_AT), nothing else.
CREATE INDEX tasks_due ON tasks (priority, (coalesce(next_attempt_at, execute_at)), id)
    WHERE state = 'scheduled';
"""


def upgrade() -> None:
    op.execute(SCHEMA)


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX tasks_due;
        CREATE INDEX tasks_due ON tasks ((coalesce(next_attempt_at, execute_at)), id)
            WHERE state = 'scheduled';
        ALTER TABLE tasks
            DROP CONSTRAINT timeout_s_positive,
            DROP CONSTRAINT priority_in_range,
            DROP COLUMN idempotency_max_attempts,
            DROP COLUMN timeout_s,
            DROP COLUMN priority;
        """
    )
