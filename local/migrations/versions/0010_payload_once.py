"""A keyed task stores its payload once: `idempotency_payload` is kept only once a PATCH
has changed the payload.

`idempotency_payload` is NULL while the task carries the payload its key was created with
(`payload` is what a repeat is compared with), and `[original]`, a one-element array, once a
PATCH changed it: the array tells "created with no payload" (`[null]`) from "not changed"
(NULL). Tasks of earlier revisions are rewritten to that form: only keyed ones, and of those
only the ones whose two columns differ keep a copy.

Revision ID: 0010
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        UPDATE tasks
        SET idempotency_payload = CASE
            WHEN idempotency_payload IS NOT DISTINCT FROM payload THEN NULL
            ELSE jsonb_build_array(idempotency_payload)
        END
        WHERE idempotency_key IS NOT NULL
        """
    )


def downgrade() -> None:
    op.execute(
        """
        UPDATE tasks
        SET idempotency_payload = CASE
            WHEN idempotency_payload IS NULL THEN payload
            ELSE nullif(idempotency_payload -> 0, 'null')
        END
        WHERE idempotency_key IS NOT NULL
        """
    )
