"""The indexes that serve finding tasks (`GET /tasks`'s filters and orders, queries.listing).

- `tasks_kind_id` (kind, id): a kind's tasks by id, either way (`?type=foo`).
- `tasks_execute_at` (execute_at, id): every task by the time asked for (`sort=execute_at`,
  and `execute_after`/`execute_before` in that order).
- `tasks_finished` becomes (finished_at, id), its predicate as before: finished tasks by the
  time they finished, then id (`sort=finished_at`, keyset paging through tasks finished by
  one batch at the same instant); the prune reads it as before.
- `tasks_schedule_id` (schedule, id) of a schedule's tasks only (`?schedule=...`): a task of
  no schedule adds nothing to it.
- `tasks_error_id` (id) of tasks holding an error: failed ones, and those waiting to retry
  after a failed attempt (`?error=...` reads only these). A task that succeeds at its first
  attempt never holds an error, so the drain adds nothing to it.

Plain CREATE INDEX in the migration's transaction, as every earlier migration made its
indexes (CONCURRENTLY cannot run in a transaction, and the migrations run in one, under an
advisory lock: local/migrations/env.py): nothing of the table is rewritten, but writes to
`tasks` wait while each index is built (reads go on): ~0.5-1 s a million rows each.

Revision ID: 0014
"""

from alembic import op

revision = "0014"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX tasks_kind_id ON tasks (kind, id);
        CREATE INDEX tasks_execute_at ON tasks (execute_at, id);
        DROP INDEX tasks_finished;
        CREATE INDEX tasks_finished ON tasks (finished_at, id)
            WHERE state IN ('succeeded', 'failed', 'cancelled');
        CREATE INDEX tasks_schedule_id ON tasks (schedule, id) WHERE schedule IS NOT NULL;
        CREATE INDEX tasks_error_id ON tasks (id) WHERE error IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX tasks_error_id;
        DROP INDEX tasks_schedule_id;
        DROP INDEX tasks_finished;
        CREATE INDEX tasks_finished ON tasks (finished_at)
            WHERE state IN ('succeeded', 'failed', 'cancelled');
        DROP INDEX tasks_execute_at;
        DROP INDEX tasks_kind_id;
        """
    )
