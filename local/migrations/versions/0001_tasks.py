"""The tasks table.

Revision ID: 0001
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = """
CREATE TABLE tasks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             text        NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_]*$'),
    state            text        NOT NULL DEFAULT 'scheduled'
                     CHECK (state IN ('scheduled', 'running', 'succeeded', 'failed')),
    execute_at       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer     NOT NULL CHECK (max_attempts >= 1),
    output           text,
    error            text,
    -- Who holds a running task, and until when (see queries.CLAIM_DUE).
    claimed_by       text,
    lease_expires_at timestamptz,
    CONSTRAINT finished_iff_done
        CHECK ((state IN ('succeeded', 'failed')) = (finished_at IS NOT NULL)),
    CONSTRAINT running_iff_leased
        CHECK ((state = 'running') = (claimed_by IS NOT NULL AND lease_expires_at IS NOT NULL))
);

-- Serves the claim: its WHERE and ORDER BY, and nothing else, so it stays small.
CREATE INDEX tasks_due ON tasks (execute_at, id) WHERE state = 'scheduled';
-- Serves the rescue of expired leases; holds only running tasks.
CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE state = 'running';
-- Serve GET /tasks?state=... ordered by id for the states a big table has few of. Partial,
-- so a task's claim and finish add no entry to them: one (state, id) index instead cost the
-- drain 10% (raw claim + finish 36,600 -> 40,400 tasks/s without it). `running` is served by
-- tasks_lease, `succeeded` (most rows) by the primary key.
CREATE INDEX tasks_scheduled_id ON tasks (id) WHERE state = 'scheduled';
CREATE INDEX tasks_failed_id ON tasks (id) WHERE state = 'failed';
"""


def upgrade() -> None:
    op.execute(SCHEMA)


def downgrade() -> None:
    op.execute("DROP TABLE tasks")
