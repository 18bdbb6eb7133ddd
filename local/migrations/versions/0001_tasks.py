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
-- Serves GET /tasks?state=... ordered by id, for states that are rare in a big table.
CREATE INDEX tasks_state_id ON tasks (state, id);
"""


def upgrade() -> None:
    op.execute(SCHEMA)


def downgrade() -> None:
    op.execute("DROP TABLE tasks")
