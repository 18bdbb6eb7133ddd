"""Activity by task type, and running totals for Prometheus.

- `task_activity.kind`: the task type of a row's counts; its key is now (bucket, kind).
  Rows from before this migration keep `''` (no type): /stats counts them in its totals and
  not by type. `timed_out` and `lost`: attempts stopped at their time limit, and attempts
  of a worker that died (rescued); `failed` and `retried` no longer count them (each attempt
  is counted once, by its outcome: functions/counters.py OUTCOMES).
- `task_totals`: a row per task type, only ever added to, by the same write that adds the
  activity (Store.add_activity) and by a cancel: attempts ended by outcome since this
  migration, and histograms of run duration and start lateness (counts per bucket of
  counters.TOTAL_BOUNDS_S, and sums in seconds). What `/metrics` serves as counters and
  histograms: retention never deletes from it, and nothing recounts it from task rows.

Constant defaults only: added without rewriting `task_activity` (a day of 10-second rows);
its key is rebuilt, a few thousand rows. Workers and APIs of an earlier version write
`task_activity` by its old key, which this replaces: stop them before migrating (a worker's
write would fail and stop it; an API's cancel would answer 500).

Revision ID: 0017
"""

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE task_activity
            ADD COLUMN kind text NOT NULL DEFAULT '',
            ADD COLUMN timed_out bigint NOT NULL DEFAULT 0,
            ADD COLUMN lost bigint NOT NULL DEFAULT 0,
            DROP CONSTRAINT task_activity_pkey,
            ADD PRIMARY KEY (bucket, kind);
        CREATE TABLE task_totals (
            kind           text PRIMARY KEY,
            succeeded      bigint NOT NULL DEFAULT 0,
            failed         bigint NOT NULL DEFAULT 0,
            retried        bigint NOT NULL DEFAULT 0,
            timed_out      bigint NOT NULL DEFAULT 0,
            cancelled      bigint NOT NULL DEFAULT 0,
            lost           bigint NOT NULL DEFAULT 0,
            -- Counts per bucket (not cumulative) of functions/counters.py TOTAL_BOUNDS_S.
            duration       bigint[] NOT NULL DEFAULT '{}',
            duration_sum_s double precision NOT NULL DEFAULT 0,
            lateness       bigint[] NOT NULL DEFAULT '{}',
            lateness_sum_s double precision NOT NULL DEFAULT 0
        );
        """
    )


def downgrade() -> None:
    # The rows of each bucket are added up into one, as the older key needs.
    op.execute(
        """
        DROP TABLE task_totals;
        CREATE TEMPORARY TABLE merged AS
        SELECT bucket, sum(started) AS started, sum(succeeded) AS succeeded,
               sum(failed + timed_out + lost) AS failed, sum(retried) AS retried,
               sum(cancelled) AS cancelled,
               ARRAY(
                   SELECT sum(x)::bigint FROM task_activity AS b, unnest(b.lateness)
                       WITH ORDINALITY AS u(x, i)
                   WHERE b.bucket = a.bucket GROUP BY i ORDER BY i
               ) AS lateness,
               max(lateness_max_ms) AS lateness_max_ms
        FROM task_activity AS a GROUP BY bucket;
        DELETE FROM task_activity;
        ALTER TABLE task_activity
            DROP CONSTRAINT task_activity_pkey,
            DROP COLUMN kind,
            DROP COLUMN timed_out,
            DROP COLUMN lost,
            ADD PRIMARY KEY (bucket);
        INSERT INTO task_activity
            (bucket, started, succeeded, failed, retried, cancelled, lateness, lateness_max_ms)
        SELECT bucket, started, succeeded, failed, retried, cancelled, lateness, lateness_max_ms
        FROM merged;
        DROP TABLE merged;
        """
    )
