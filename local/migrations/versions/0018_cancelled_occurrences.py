"""The cancelled tasks of schedules' occurrences, by occurrence.

- `tasks_cancelled_occurrence` (schedule, scheduled_for, id) of cancelled tasks of a schedule
  only: a bulk retry takes, of the cancelled tasks of one occurrence that no other task holds,
  the first (queries.occurrence_retryable), and its dry run counts the same, each task
  checked in a lookup of this index. A schedule disabled, enabled again within the minute
  before an occurrence it had made, and disabled again, leaves two of them (`tasks_occurrence`
  holds the tasks that are not cancelled, one an occurrence). Tasks of no schedule, and those
  of schedules that are not cancelled, add nothing to it.

Plain CREATE INDEX in the migration's transaction, as the earlier ones (0014 says why): writes
to `tasks` wait while it is built. Versions before this one run beside it unchanged.

Revision ID: 0018
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX tasks_cancelled_occurrence ON tasks (schedule, scheduled_for, id)
            WHERE schedule IS NOT NULL AND state = 'cancelled';
        """
    )


def downgrade() -> None:
    op.execute("DROP INDEX tasks_cancelled_occurrence;")
