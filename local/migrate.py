"""Schema migrations (Alembic), run by `taskrunner migrate` and by `taskrunner dev`."""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

from functions.db import libpq_url
from functions.errors import DatabaseUnavailable, TaskrunnerError

MIGRATIONS = Path(__file__).parent / "migrations"


def _upgrades_only(record: logging.LogRecord) -> bool:
    """Alembic's lines worth a user's eyes: the migrations applied ("Running upgrade 0003 ->
    0004"), not what it says on every connection ("Context impl PostgresqlImpl.", "Will assume
    transactional DDL."), which every worker, prune and tick printed."""
    return record.levelno > logging.INFO or record.getMessage().startswith("Running ")


logging.getLogger("alembic.runtime.migration").addFilter(_upgrades_only)


def sqlalchemy_url(database_url: str) -> str:
    """Return `database_url` with SQLAlchemy's psycopg 3 driver named in it."""
    url = make_url(libpq_url(database_url))
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise TaskrunnerError(
            f"TASKRUNNER_DATABASE_URL must be a postgresql:// URL, not {url.drivername}://"
        )
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def _config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Alembic's config is an INI file: a literal % must be doubled.
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    return config


def migrate(database_url: str) -> None:
    """Bring the schema up to date; safe to run from several processes at once."""
    try:
        command.upgrade(_config(database_url), "head")
    except sqlalchemy.exc.OperationalError as exc:
        raise DatabaseUnavailable(f"database unavailable: {exc.orig}") from exc


def pending(database_url: str) -> bool:
    """Whether the database is behind the newest migration."""
    head = ScriptDirectory.from_config(_config(database_url)).get_current_head()
    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision() != head
    except sqlalchemy.exc.OperationalError as exc:
        raise DatabaseUnavailable(f"database unavailable: {exc.orig}") from exc
    finally:
        engine.dispose()
