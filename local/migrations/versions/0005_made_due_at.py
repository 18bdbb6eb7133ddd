"""When a request made a task due, so start lateness has one definition.

- `tasks.made_due_at`: the time of the request (run now, retry, a reschedule to a time
  already past) that made a task due that was not due yet; NULL when nothing did, and the
  task became due at the latest of its `execute_at` and `created_at`. `POST /tasks/{id}/run`
  no longer moves `execute_at` (the time the user asked for stays): like a retry, it sets
  `next_attempt_at`, and the claim, which clears `next_attempt_at`, still knows from this
  when the task became due (`queries.BECAME_DUE`).

A nullable column without a default: added without rewriting the table.

Revision ID: 0005
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE tasks ADD COLUMN made_due_at timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE tasks DROP COLUMN made_due_at")
