"""A payload on every task: any JSON value the creating request sent, given to its kind.

`payload` is what the task carries now (PATCH may set or clear it); `idempotency_payload`
is what the request that created a keyed task sent, as `idempotency_execute_at` is its
time: a repeat of that request is compared with it (jsonb equality: key order and spacing
do not matter), not with what a PATCH made of it. Both nullable, with no default: adding
them changes the catalog only, and rewrites no row.

Revision ID: 0007
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE tasks ADD COLUMN payload jsonb, ADD COLUMN idempotency_payload jsonb")


def downgrade() -> None:
    op.execute("ALTER TABLE tasks DROP COLUMN payload, DROP COLUMN idempotency_payload")
