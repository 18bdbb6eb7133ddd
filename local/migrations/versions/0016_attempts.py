"""Every attempt that ends is kept (issue 24.4), but a first attempt that succeeds: its
fields are the task's own (`started_at`, `finished_at`, `output`), so a drain writes nothing
more.

- `attempts`: one row per (task, attempt), the primary key: whoever ends an attempt first
  (its worker, a cancel of a running task, the rescue of a dead worker's) writes its row, and
  a write fenced out afterwards writes none (ON CONFLICT DO NOTHING besides). `kind` is the
  task's, so `GET /errors` groups without a join; `error_group` is `error` with its numbers
  and ids folded (functions/model.py `normalise_error`); `traceback` at most 8 KiB.
- Deleted with its task by the statement that deletes it (functions/queries.py: the prune,
  DELETE /tasks/{id}, DELETE /), not by a foreign key: its cascade, a trigger and an index
  probe for every task deleted, with attempts or not, made a prune of 100,000 tasks three
  times as slow.
- `attempts_failures` (finished_at) of failed, retried, timed-out and lost attempts: `GET
  /errors` reads its window as one range of it, however many rows lie outside.

A new table: nothing is rewritten.

Revision ID: 0016
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE attempts (
            task_id     bigint      NOT NULL,
            attempt     integer     NOT NULL CHECK (attempt >= 1),
            kind        text        NOT NULL,
            started_at  timestamptz,
            finished_at timestamptz NOT NULL,
            worker      text,
            outcome     text        NOT NULL CHECK (outcome IN
                ('succeeded', 'failed', 'retried', 'timed_out', 'cancelled', 'lost')),
            error       text,
            error_group text,
            traceback   text        CHECK (octet_length(traceback) <= 8192),
            PRIMARY KEY (task_id, attempt)
        );
        CREATE INDEX attempts_failures ON attempts (finished_at)
            WHERE outcome IN ('failed', 'retried', 'timed_out', 'lost');
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE attempts")
