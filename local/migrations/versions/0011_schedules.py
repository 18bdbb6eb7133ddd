"""`schedules`: tasks that recur on a cron, and each task's occurrence.

A schedule keeps `next_run_at`, the first occurrence it has not created yet (NULL while
disabled), and `last_occurrence_at`, the last one it created: the creator of occurrences
(functions/schedules.py, run by workers and ticks) locks the schedules due within a minute
through `schedules_next_run` (never a scan of every schedule), creates their tasks and moves
both times in one transaction. Each occurrence's task names its schedule and its time
(`schedule`, `scheduled_for`); a unique index on the two is the second guard against one
occurrence made twice. The index is partial (`schedule IS NOT NULL`): a task of no schedule
adds no entry to it. Nullable new columns: nothing of `tasks` is rewritten.

Revision ID: 0011
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE schedules (
            name                text PRIMARY KEY
                CONSTRAINT schedule_name_pattern CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,127}$'),
            kind                text NOT NULL,
            cron                text NOT NULL,
            timezone            text NOT NULL,
            payload             jsonb,
            max_attempts        integer,
            timeout_s           double precision,
            priority            integer,
            catch_up            text NOT NULL DEFAULT 'latest'
                CONSTRAINT schedule_catch_up CHECK (catch_up IN ('latest', 'all', 'none')),
            enabled             boolean NOT NULL DEFAULT true,
            last_occurrence_at  timestamptz,
            next_run_at         timestamptz,
            skipped_occurrences bigint NOT NULL DEFAULT 0,
            created_at          timestamptz NOT NULL DEFAULT now(),
            updated_at          timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT schedule_next_run_iff_enabled CHECK (enabled = (next_run_at IS NOT NULL))
        );
        CREATE INDEX schedules_next_run ON schedules (next_run_at) WHERE enabled;
        ALTER TABLE tasks ADD COLUMN schedule text, ADD COLUMN scheduled_for timestamptz;
        -- A cancelled occurrence (its schedule disabled or deleted before it started) holds
        -- no place: the schedule enabled again, or made again under its name, makes it anew.
        CREATE UNIQUE INDEX tasks_occurrence ON tasks (schedule, scheduled_for)
            WHERE schedule IS NOT NULL AND state <> 'cancelled';
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX tasks_occurrence;
        ALTER TABLE tasks DROP COLUMN schedule, DROP COLUMN scheduled_for;
        DROP TABLE schedules;
        """
    )
