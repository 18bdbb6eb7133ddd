"""Test databases: one server per PostgreSQL version per session, one fresh database per test.

Every test that uses a database runs once per server: the embedded PostgreSQL 18 (what
`taskrunner dev` starts) and Debian's PostgreSQL 15 (started as the OS user `postgres`);
TASKRUNNER_TEST_SERVERS=18 narrows that, and TASKRUNNER_TEST_DATABASE_URL replaces both with a
server of yours. pytest-postgresql's janitor builds a template database migrated once per
server, and every test gets a copy of it (`_TestDatabases`). Tables are never analyzed or
vacuumed by hand: each test starts from a fresh, never-analyzed table, as a user's new
database does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql as pgsql
from pytest_postgresql.janitor import DatabaseJanitor
from sqlalchemy.engine import URL, make_url

from functions import conninfo, kinds
from functions.db import Database
from functions.http.app import build_app
from functions.settings import Settings
from functions.store import Store
from local.migrate import migrate
from tests.pgservers import (
    Server,
    available_versions,
    debian_missing_reason,
    start_server,
)

_test_dbs = count()
# As every process does at start: the built-in kind modules (the `http` kind) are loaded, so
# that no test sees a different set of kinds depending on which ran before it.
kinds.load(None)


def _server_params() -> list[Any]:
    if os.environ.get("TASKRUNNER_TEST_DATABASE_URL"):
        return ["url"]
    params = []
    for version in available_versions():
        reason = debian_missing_reason() if version == "15" else None
        params.append(
            pytest.param(
                version,
                id=f"pg{version}",
                marks=[pytest.mark.skipif(reason is not None, reason=reason or "")],
            )
        )
    return params


# Tests that take far longer than the rest, by name: the seconds each took in CI (pytest's
# --durations). They go first (below).
LONG_TESTS = {
    "test_bench_quick_reports_every_scenario": 175,
    "test_schemathesis_finds_nothing": 69,
    "test_cancels_racing_the_claim_end_cancelled_without_a_line_or_succeeded_with_one": 24,
    "test_the_first_page_of_every_filter_and_order_reads_an_index_a_bounded_run": 23,
    "test_reads_of_due_tasks_read_no_future_ones_whatever_their_priorities": 20,
    "test_lambda_bundle_holds_only_runtime_dependencies_and_its_handlers_work": 20,
    "test_connections_that_never_finish_their_headers_are_bounded_and_closed": 20,
    "test_many_workers_and_apis_run_each_task_exactly_once": 19,
    "test_a_database_outage_mid_burst_strands_nothing": 19,
}
# Then the rest of each directory's tests, in this order: processes started, then in-process.
_DIRECTORY_ORDER = ("acceptance", "browser", "integration")


def _expected_rank(item: pytest.Item) -> tuple[float, int]:
    directory = item.path.parent.name
    return (
        -LONG_TESTS.get(getattr(item, "originalname", item.name), 0),
        _DIRECTORY_ORDER.index(directory) if directory in _DIRECTORY_ORDER else 99,
    )


def _server_of(item: pytest.Item) -> object:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("pg_server") if callspec is not None else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the second server's half of `one_server` tests, and put the longest tests first.

    A test marked `one_server` runs on the first server only: it exercises what lies above
    the SQL (the HTTP contract, the bundle's build, the bench's command line, bar's HTTP
    client), which other tests already cover on every server, and takes a minute or more.

    The order: `-n 2 --dist loadgroup` (the default) deals the tests one at a time to
    whichever worker is free, in this order (no test here is in an xdist group; each worker
    starts both servers). A long test dealt last would keep one worker busy while the other
    sits idle, so the known-long ones come first (longest first), then tests that start
    processes, then the rest. pytest put each server's tests together (a session fixture
    set up again for each change of server): the order changes only within such a run.
    """
    first = _server_params()[0]
    first_id = first if isinstance(first, str) else first.values[0]
    kept, dropped = [], []
    for item in items:
        server = _server_of(item)
        if server is not None and server != first_id and item.get_closest_marker("one_server"):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    ordered: list[pytest.Item] = []
    run: list[pytest.Item] = []
    for item in kept:
        if run and _server_of(item) != _server_of(run[0]):
            ordered += sorted(run, key=_expected_rank)
            run = []
        run.append(item)
    ordered += sorted(run, key=_expected_rank)
    items[:] = ordered


def db_url(*, host: str, port: int | str, user: str, dbname: str, password: str | None) -> str:
    """A postgresql:// URL that works for TCP hosts and Unix socket directories alike."""
    query = {"host": str(host), "port": str(port)}
    return URL.create(
        "postgresql", username=user, password=password or None, database=dbname, query=query
    ).render_as_string(hide_password=False)


@dataclass(frozen=True)
class ServerInfo:
    """Where a session's server is, and the migrated template its test databases copy."""

    version: str
    host: str
    port: str
    user: str
    password: str | None
    template: str

    def url(self, dbname: str) -> str:
        return db_url(
            host=self.host, port=self.port, user=self.user, dbname=dbname, password=self.password
        )

    def janitor(self, dbname: str, template: str | None = None) -> DatabaseJanitor:
        """Creates `dbname` (a copy of `template`, if given) on entry, drops it on exit."""
        return DatabaseJanitor(
            user=self.user,
            host=self.host,
            port=self.port,
            password=self.password,
            dbname=dbname,
            template_dbname=template,
        )


@pytest.fixture(scope="session", params=_server_params())
def pg_server(request: pytest.FixtureRequest) -> Iterator[ServerInfo]:
    """A PostgreSQL server for the session, with a migrated template database."""
    server: Server | None = None
    root: str | None = None
    if request.param == "url":
        url = os.environ["TASKRUNNER_TEST_DATABASE_URL"]
    else:
        root = tempfile.mkdtemp(prefix=f"taskrunner-tests-pg{request.param}-")
        server = start_server(request.param, Path(root) / "server")
        url = server.url
    parsed = make_url(url)
    info = ServerInfo(
        version=str(request.param),
        host=str(parsed.query.get("host") or parsed.host or "localhost"),
        port=str(parsed.query.get("port") or parsed.port or 5432),
        user=parsed.username or "postgres",
        password=parsed.password or None,
        template=f"taskrunner_tmpl_{os.getpid()}",
    )
    janitor = DatabaseJanitor(
        user=info.user,
        host=info.host,
        port=info.port,
        password=info.password,
        dbname=info.template,
        as_template=True,
    )
    janitor.drop()
    try:
        with janitor:
            migrate(info.url(info.template))
            yield info
    finally:
        if server is not None:
            server.destroy()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


class _TestDatabases:
    """The tests' databases on one server, each a copy of the migrated template: made a few
    tests ahead (`AHEAD`), while the tests before them run, and dropped after their test
    while the next ones run. A CREATE DATABASE takes longer than most tests do (70-130 ms on
    a quiet machine, over a second on a busy one): a test that starts processes and waits
    for them leaves time to make several, which the short tests after it then take. The copy
    is the same whenever it is made, and nothing touches it before its test (an untouched
    table is not analyzed by autovacuum either).

    One thread makes and drops them in turn, on one connection of its own (pytest-postgresql's
    janitor opens a new one for each); a drop that failed fails the next test that takes a
    database, or the session's end."""

    AHEAD = 4

    def __init__(self, server: ServerInfo) -> None:
        self.server = server
        self._work = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-databases")
        self._made: deque[Future[str]] = deque()
        self._drops: list[Future[None]] = []
        self._admin: psycopg.Connection[Any] | None = None

    def _execute(self, statement: pgsql.Composed) -> None:
        """Run `statement` on the maintenance database (in the thread's turn)."""
        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(self.server.url("postgres"), autocommit=True)
        self._admin.execute(statement)

    def _create(self) -> str:
        dbname = f"taskrunner_test_{os.getpid()}_{next(_test_dbs)}"
        self._execute(
            pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                pgsql.Identifier(dbname), pgsql.Identifier(self.server.template)
            )
        )
        return dbname

    def _drop(self, dbname: str) -> None:
        # (FORCE: whatever a test left connected is disconnected first, as the janitor did.)
        self._execute(pgsql.SQL("DROP DATABASE {} WITH (FORCE)").format(pgsql.Identifier(dbname)))

    def _check_drops(self) -> None:
        done = [drop for drop in self._drops if drop.done()]
        self._drops = [drop for drop in self._drops if not drop.done()]
        for drop in done:
            drop.result()

    def take(self) -> str:
        """A fresh database's name, the test's own until it is given back with `drop`."""
        self._check_drops()
        while len(self._made) < self.AHEAD + 1:
            self._made.append(self._work.submit(self._create))
        # (A copy that failed is not kept: the next test tries again.)
        return self._made.popleft().result()

    def drop(self, dbname: str) -> None:
        self._drops.append(self._work.submit(self._drop, dbname))

    def close(self) -> None:
        try:
            for made in self._made:
                with contextlib.suppress(Exception):
                    self.drop(made.result())
        finally:
            self._work.shutdown(wait=True)
            if self._admin is not None:
                self._admin.close()
        self._check_drops()


@pytest.fixture(scope="session")
def _test_databases(pg_server: ServerInfo) -> Iterator[_TestDatabases]:
    databases = _TestDatabases(pg_server)
    try:
        yield databases
    finally:
        databases.close()


@pytest.fixture
def postgresql(_test_databases: _TestDatabases) -> Iterator[psycopg.Connection[Any]]:
    """A connection to this test's own database, cloned from the migrated template."""
    dbname = _test_databases.take()
    try:
        with psycopg.connect(_test_databases.server.url(dbname)) as conn:
            yield conn
    finally:
        _test_databases.drop(dbname)


@pytest.fixture
def empty_database_url(pg_server: ServerInfo) -> Iterator[str]:
    """A database with no schema at all: what a user points taskrunner at before migrating."""
    dbname = f"taskrunner_empty_{os.getpid()}_{next(_test_dbs)}"
    with pg_server.janitor(dbname):
        yield pg_server.url(dbname)


@pytest.fixture
def own_server(pg_server: ServerInfo) -> Iterator[Server]:
    """A migrated server of the session's PostgreSQL version, the test's own to stop,
    restart or freeze."""
    if pg_server.version == "url":
        pytest.skip("needs a server of its own (TASKRUNNER_TEST_DATABASE_URL is set)")
    # Outside pytest's temporary directory, as the session's servers are: the embedded server
    # runs as a user of its own, and another pytest session starting on the machine sets
    # pytest's directory back to owner-only, which that user then cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="taskrunner-own-"))
    server = start_server(pg_server.version, root)
    try:
        migrate(server.url)
        yield server
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the developer's TASKRUNNER_* settings, nor what an earlier test's
    connections found (a transaction pooler: a worker would then poll instead of listening),
    as a new process would not."""
    for name in list(os.environ):
        if name.startswith("TASKRUNNER_"):
            monkeypatch.delenv(name)
    conninfo.forget_found()
    yield
    conninfo.forget_found()


@pytest.fixture
def database_url(postgresql: psycopg.Connection[Any], pg_server: ServerInfo) -> str:
    """The URL of this test's own database, cloned from the migrated template."""
    return pg_server.url(postgresql.info.dbname)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    """A store on a pool of its own, disposed of after the test."""
    database = Database(settings)
    yield Store(database)
    await database.dispose()


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


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app built for `settings`, run through its lifespan.

    The lifespan closes the app's connection pool, so no connection outlives the test's event
    loop (to be closed, with a warning, whenever it is collected).
    """
    app = build_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as c:
        yield c
