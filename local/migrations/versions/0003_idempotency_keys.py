"""Idempotency keys: a client's retry of a create finds the task its first try made.

- `tasks.idempotency_key`: what the client sent in `Idempotency-Key` (or an item's
  `idempotency_key`); 1 to 255 printable ASCII characters without spaces, the API's own rule.
  Unique among the tasks that have one, for as long as the task exists: deleting the task
  (by hand, or a retention job) frees its key.
- `tasks.idempotency_execute_at`: the `execute_at` the keyed request asked for. A repeat is
  compared with it, not with `execute_at`, which `/run` and `PATCH` move: a client retrying
  its create after someone ran the task now still gets its task back, not a 409.

The unique index is partial (only keyed tasks), so tasks created without a key, the usual
case, add no entry to it. Built in the migration's transaction: it scans the table once and
holds writes meanwhile, a few seconds for millions of rows, all of which have no key yet.

Revision ID: 0003
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = r"""
ALTER TABLE tasks
    ADD COLUMN idempotency_key text,
    ADD COLUMN idempotency_execute_at timestamptz,
    ADD CONSTRAINT idempotency_key_printable
        CHECK (idempotency_key ~ '^[\x21-\x7e]{1,255}$'),
    ADD CONSTRAINT idempotency_key_with_its_request
        CHECK ((idempotency_key IS NULL) = (idempotency_execute_at IS NULL));

CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"""


def upgrade() -> None:
    op.execute(SCHEMA)


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX tasks_idempotency_key;
        ALTER TABLE tasks
            DROP CONSTRAINT idempotency_key_with_its_request,
            DROP CONSTRAINT idempotency_key_printable,
            DROP COLUMN idempotency_execute_at,
            DROP COLUMN idempotency_key;
        """
    )
