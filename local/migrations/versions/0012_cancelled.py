"""A task can be `cancelled`: a finished state, as `succeeded` and `failed` are.

- The state's CHECK takes `cancelled`; `finished_iff_done` ties it to `finished_at` as the
  other finished states are. A cancelled task holds no lease (`running_iff_claimed`: only a
  running task has `claimed_by`) and waits for no retry (`retry_only_when_scheduled`), so a
  worker's fenced writes (`claimed_by = me`) can never land on it.
- `tasks_finished` (retention: the prune's order) holds cancelled tasks too.
- `tasks_cancelled_id` serves `GET /tasks?state=cancelled` and the retry of cancelled tasks,
  as `tasks_failed_id` serves failed ones: partial, so a claim or a finish adds nothing to it.
- `task_activity.cancelled`: tasks cancelled in each 10-second bucket, counted by the cancel
  itself (/stats). A constant default: added without rewriting the table.

Cost: the two constraints are replaced and validated, and the index rebuilt, in the
migration's transaction, which holds writes to `tasks` (ACCESS EXCLUSIVE) for a scan of the
table each (~0.3 s a million rows, as migration 0006's).

Revision ID: 0012
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE tasks
            DROP CONSTRAINT tasks_state_check,
            ADD CONSTRAINT tasks_state_check
                CHECK (state IN ('scheduled', 'running', 'succeeded', 'failed', 'cancelled')),
            DROP CONSTRAINT finished_iff_done,
            ADD CONSTRAINT finished_iff_done
                CHECK ((state IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL));
        DROP INDEX tasks_finished;
        CREATE INDEX tasks_finished ON tasks (finished_at)
            WHERE state IN ('succeeded', 'failed', 'cancelled');
        CREATE INDEX tasks_cancelled_id ON tasks (id) WHERE state = 'cancelled';
        ALTER TABLE task_activity ADD COLUMN cancelled bigint NOT NULL DEFAULT 0;
        """
    )


def downgrade() -> None:
    # Cancelled tasks have no place in the older schema: they go, as pruned ones do.
    op.execute(
        """
        ALTER TABLE task_activity DROP COLUMN cancelled;
        DELETE FROM tasks WHERE state = 'cancelled';
        DROP INDEX tasks_cancelled_id;
        DROP INDEX tasks_finished;
        CREATE INDEX tasks_finished ON tasks (finished_at) WHERE state IN ('succeeded', 'failed');
        ALTER TABLE tasks
            DROP CONSTRAINT finished_iff_done,
            ADD CONSTRAINT finished_iff_done
                CHECK ((state IN ('succeeded', 'failed')) = (finished_at IS NOT NULL)),
            DROP CONSTRAINT tasks_state_check,
            ADD CONSTRAINT tasks_state_check
                CHECK (state IN ('scheduled', 'running', 'succeeded', 'failed'));
        """
    )
