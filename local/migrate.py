"""Schema migrations (Alembic), run by `taskrunner migrate` and by `taskrunner dev`."""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Engine

from functions.conninfo import libpq_url
from functions.errors import DatabaseUnavailable, TaskrunnerError

MIGRATIONS = Path(__file__).parent / "migrations"


def _upgrades_only(record: logging.LogRecord) -> bool:
    """Alembic's lines worth a user's eyes: the migrations applied ("Running upgrade 0003 ->
    0004"), not what it says on every connection ("Context impl PostgresqlImpl.", "Will assume
    transactional DDL."), which every worker, prune and tick printed."""
    return record.levelno > logging.INFO or record.getMessage().startswith("Running ")


logging.getLogger("alembic.runtime.migration").addFilter(_upgrades_only)


def make_engine(database_url: str) -> Engine:
    """Return an engine whose connections psycopg makes from `database_url`, as libpq reads it.

    SQLAlchemy never parses the URL: its parser takes one host and keeps a host literally, so a
    multi-host URL (`h1:5432,h2:5432`) raised ValueError and a socket directory given as a host
    (`%2Ftmp`) was looked up in DNS, while libpq, and so the rest of taskrunner, takes both.
    """
    conninfo = libpq_url(database_url)
    scheme = conninfo.partition("://")[0]
    if scheme not in ("postgresql", "postgres"):
        raise TaskrunnerError(
            f"TASKRUNNER_DATABASE_URL must be a postgresql:// URL, not {scheme}://"
        )
    return create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(conninfo), poolclass=pool.NullPool
    )


def _config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Read by migrations/env.py; kept out of the INI options, which would re-parse it.
    config.attributes["database_url"] = database_url
    return config


def migrate(database_url: str) -> None:
    """Bring the schema up to date; safe to run from several processes at once."""
    try:
        if (newer := _unknown(_revision(database_url), _scripts(database_url))) is not None:
            raise TaskrunnerError(newer)
        command.upgrade(_config(database_url), "head")
    except sqlalchemy.exc.OperationalError as exc:
        raise DatabaseUnavailable(f"database unavailable: {exc.orig}") from exc


def outdated(database_url: str) -> str | None:
    """Why this version cannot run on the database's schema (None: it is this version's):
    the schema is behind it, or at a migration it does not know (a newer version's)."""
    revision, scripts = _revision(database_url), _scripts(database_url)
    if (newer := _unknown(revision, scripts)) is not None:
        return newer
    if revision != scripts.get_current_head():
        return "the database schema is not up to date: run `taskrunner migrate`"
    return None


def _unknown(revision: str | None, scripts: ScriptDirectory) -> str | None:
    """What to say of a schema at a migration this version does not know (None: it knows
    it, or there is none yet). Alembic's own answer is a traceback ("Can't locate
    revision")."""
    if revision is None or revision in {script.revision for script in scripts.walk_revisions()}:
        return None
    return (
        f"the database schema is at migration {revision}, which this version of taskrunner"
        f" does not know (its newest is {scripts.get_current_head()}): a newer version"
        " migrated it: run that version"
    )


def _scripts(database_url: str) -> ScriptDirectory:
    return ScriptDirectory.from_config(_config(database_url))


def _revision(database_url: str) -> str | None:
    """The migration the database's schema is at (None: none yet)."""
    schema = make_engine(database_url)
    try:
        with schema.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except sqlalchemy.exc.OperationalError as exc:
        raise DatabaseUnavailable(f"database unavailable: {exc.orig}") from exc
    finally:
        schema.dispose()
