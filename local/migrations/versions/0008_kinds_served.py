"""`kinds_served`: each kind some worker or tick runs, and when one last did.

Workers and ticks write it when they register and with their heartbeats (at most once a
minute a kind, whoever writes); a tick's row outlives the tick, so a deployment whose ticks
come and go is not taken for one that runs nothing. Due tasks of a kind no row names as run in
the last 5 minutes are "unserved": /stats, /metrics, the dashboard and the workers' logs say
so (functions/report.py). A new table: nothing of `tasks` is rewritten.

Revision ID: 0008
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE kinds_served (
            kind        text PRIMARY KEY,
            last_run_at timestamptz NOT NULL
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE kinds_served")
