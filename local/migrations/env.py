"""Alembic environment: migrations run in one transaction under an advisory lock.

The lock lets several processes (`dev`, `api`, `worker` started together) migrate at
once safely: the first applies the migrations, the others then find nothing to do.
"""

from alembic import context
from sqlalchemy import text

from local.migrate import make_engine

# Any constant works; it names the lock only among this database's advisory locks.
MIGRATION_LOCK = 7_283_911

engine = make_engine(context.config.attributes["database_url"])
with engine.connect() as connection, connection.begin():
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    context.configure(connection=connection)
    context.run_migrations()
engine.dispose()
