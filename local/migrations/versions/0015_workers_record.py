"""Workers say who they are, and are listed an hour after they leave or die; a running task
says when its attempt started.

- `workers.host`, `pid`, `kinds` (the types it runs), `version` (taskrunner's), `tick` (a
  Lambda or `taskrunner tick` run, not a long-lived worker): written when it registers; NULL
  for a worker registered before this migration. `workers.rescued`: how many of its tasks
  were rescued once its lease ran out.
- `workers_ended`: a worker that signed off (`left`) or whose lease ran out and whose tasks
  were all rescued (`dead`), kept an hour for `GET /workers`; a tick that ended normally is
  not kept. `workers` stays what it was: a row per lease.
- `tasks.claimed_at`: when the current attempt was claimed (`running_since` in a running
  task's answer; `started_at` stays the first attempt's).

Nullable columns and constant defaults only: added without rewriting either table.

Revision ID: 0015
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE workers
            ADD COLUMN host text,
            ADD COLUMN pid integer,
            ADD COLUMN kinds text[],
            ADD COLUMN version text,
            ADD COLUMN tick boolean NOT NULL DEFAULT false,
            ADD COLUMN rescued bigint NOT NULL DEFAULT 0;
        CREATE TABLE workers_ended (
            id           text        PRIMARY KEY,
            host         text,
            pid          integer,
            started_at   timestamptz NOT NULL,
            kinds        text[],
            version      text,
            tick         boolean     NOT NULL,
            heartbeat_at timestamptz NOT NULL,
            rescued      bigint      NOT NULL,
            ended_at     timestamptz NOT NULL,
            state        text        NOT NULL CHECK (state IN ('left', 'dead'))
        );
        ALTER TABLE tasks ADD COLUMN claimed_at timestamptz;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE tasks DROP COLUMN claimed_at;
        DROP TABLE workers_ended;
        ALTER TABLE workers
            DROP COLUMN rescued,
            DROP COLUMN tick,
            DROP COLUMN version,
            DROP COLUMN kinds,
            DROP COLUMN pid,
            DROP COLUMN host;
        """
    )
