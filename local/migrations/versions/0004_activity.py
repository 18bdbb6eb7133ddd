"""Activity figures for /stats, and a table tuned for a queue that churns.

- `task_activity`: what workers and ticks did, in 10-second buckets of the database's time
  (functions/counters.py): tasks started, succeeded, failed, retried, and a histogram of start
  lateness. Reading an hour is reading 360 small rows, whatever the volume.
- `tasks_finished`: finished tasks by the time they finished, for retention (the prune
  deletes the oldest first, a bounded batch at a time).
- Autovacuum per table. Every task's row is rewritten twice (claimed, then finished) and
  eventually deleted: at PostgreSQL's defaults (a vacuum once a fifth of the table is dead,
  an analyze once a tenth changed) a million-row table waits for 200,000 dead rows before a
  vacuum, and its statistics lag a burst by minutes. Here a vacuum starts after 1% or 1,000
  dead rows, an analyze after 2% or 1,000 changes, and vacuum does not pause (cost delay 0)
  so it keeps up with a worker that rewrites thousands of rows a second.

Revision ID: 0004
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SCHEMA = """
CREATE TABLE task_activity (
    bucket          timestamptz PRIMARY KEY,
    started         bigint NOT NULL DEFAULT 0,
    succeeded       bigint NOT NULL DEFAULT 0,
    failed          bigint NOT NULL DEFAULT 0,
    retried         bigint NOT NULL DEFAULT 0,
    -- Counts per lateness bucket (functions/counters.py LATENESS_BOUNDS_MS).
    lateness        bigint[] NOT NULL,
    lateness_max_ms double precision NOT NULL DEFAULT 0
);

CREATE INDEX tasks_finished ON tasks (finished_at) WHERE state IN ('succeeded', 'failed');

ALTER TABLE tasks SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_analyze_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
"""


def upgrade() -> None:
    op.execute(SCHEMA)


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE tasks RESET (
            autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold,
            autovacuum_vacuum_insert_scale_factor, autovacuum_vacuum_insert_threshold,
            autovacuum_analyze_scale_factor, autovacuum_analyze_threshold,
            autovacuum_vacuum_cost_delay
        );
        DROP INDEX tasks_finished;
        DROP TABLE task_activity;
        """
    )
