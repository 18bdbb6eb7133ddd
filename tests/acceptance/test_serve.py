"""`taskrunner api` and `dev` as a load balancer or a probe meets them: listening at once,
answering 503 until the database is ready."""

import os
import resource
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.pgservers import Server
from tests.procs import TASKRUNNER, Proc, spawn, wait_for

__all__ = ["spawn"]  # the fixture


def not_ready(proc: Proc, path: str = "/healthz") -> httpx.Response | None:
    """The 503 `proc` answers at `path`; None while it does not listen yet."""
    assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.stderr()}"
    try:
        response = httpx.get(f"{proc.url}{path}", timeout=5)
    except httpx.TransportError:
        return None
    assert response.status_code == 503, response.text
    return response


@pytest.mark.parametrize(
    "command", [["api"], ["dev"], ["api", "--workers", "2"]], ids=["api", "dev", "api-2"]
)
def test_listens_while_the_database_is_down_and_serves_once_it_answers(
    spawn: Callable[..., Proc], own_server: Server, command: list[str]
) -> None:
    own_server.stop()
    env = {"TASKRUNNER_DATABASE_URL": own_server.url, "TASKRUNNER_DB_CONNECT_TIMEOUT_S": "1"}
    api = spawn(*command, env=env, http=True)
    # Listening, and not ready: every route says so, with a time to come back.
    health = wait_for(lambda: not_ready(api), 60, "a 503 from /healthz")
    assert health.headers["retry-after"] == "1"
    assert health.json() == {"detail": "database unavailable, try again shortly"}
    created = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": 1})
    assert (created.status_code, created.headers["retry-after"]) == (503, "1")
    assert httpx.head(f"{api.url}/healthz").status_code == 503

    own_server.start()
    # Each process of --workers N finds the database ready on its own.
    processes = 2 if "--workers" in command else 1
    wait_for(lambda: api.stderr().count("action=ready schema=") == processes, 60, "ready")
    api.wait_healthy()
    created = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": 1})
    assert created.status_code == 201, created.text
    if command == ["dev"]:
        # The timer loop started once the database answered: the task runs.
        wait_for(lambda: api.stdout().startswith("Baz "), 30, "the task to run")
    assert api.terminate() == 0
    assert "Traceback" not in api.stderr(), api.stderr()


def test_api_against_a_schema_behind_answers_503_until_it_is_migrated(
    spawn: Callable[..., Proc], empty_database_url: str, tmp_path: Path
) -> None:
    """A rolling deploy that starts the new API first, then migrates."""
    env = {"TASKRUNNER_DATABASE_URL": empty_database_url}
    api = spawn("api", env=env, http=True)
    health = wait_for(
        lambda: (r := not_ready(api)) is not None and "migrate" in r.text and r, 60, "the schema"
    )
    assert "run `taskrunner migrate`" in health.json()["detail"]
    assert "retry-after" in health.headers
    task = not_ready(api, "/tasks/1")
    assert task is not None and task.json() == health.json()
    # The API looks again every second; it says so in its log once a minute.
    wait_for(lambda: "run `taskrunner migrate`" in api.stderr(), 30, "the log line")
    first_said = api.stderr()
    time.sleep(3)
    assert api.stderr().count("run `taskrunner migrate`") == 1, api.stderr()
    assert first_said.count("run `taskrunner migrate`") == 1

    subprocess.run(
        [TASKRUNNER, "migrate"], env={**os.environ, **env}, check=True, cwd=tmp_path,
        capture_output=True,
    )  # fmt: skip
    api.wait_healthy(timeout_s=30)
    created = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": 1})
    assert created.status_code == 201, created.text


def test_dev_migrates_a_configured_database_once_it_answers(
    spawn: Callable[..., Proc], empty_database_url: str
) -> None:
    api = spawn("dev", env={"TASKRUNNER_DATABASE_URL": empty_database_url}, http=True)
    api.wait_healthy()
    created = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": 1})
    assert created.status_code == 201, created.text
    wait_for(lambda: api.stdout().startswith("Baz "), 30, "the task to run")


HALF_OPEN = b"GET /tasks/1 HTTP/1.1\r\nHost: x\r\n"


def half_open(port: int, n: int) -> list[socket.socket]:
    """`n` connections that each send the start of a request and never its end."""
    opened = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(HALF_OPEN)
        opened.append(s)
    return opened


class Answers:
    """What the server sent on each of `sockets`, gathered as it comes, and which it closed."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.got = dict.fromkeys(sockets, b"")
        self.closed: set[socket.socket] = set()
        for s in sockets:
            s.setblocking(False)

    def read(self) -> None:
        for s in self.got.keys() - self.closed:
            try:
                while chunk := s.recv(65536):
                    self.got[s] += chunk
            except BlockingIOError:
                continue
            except ConnectionResetError:
                pass
            self.closed.add(s)

    def closed_now(self) -> set[socket.socket]:
        self.read()
        return self.closed

    def refused(self) -> list[bytes]:
        """The answers of the connections closed after something was sent."""
        self.read()
        return [self.got[s] for s in self.closed if self.got[s]]


@pytest.fixture
def descriptors() -> Iterator[None]:
    """Room for this test's own ~1,200 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.one_server  # the bound is the HTTP server's; no PostgreSQL version reaches it
@pytest.mark.parametrize(
    ("command", "max_connections", "nofile"),
    [(["api"], 1000, 1100), (["dev"], 1000, 1300), (["api", "--workers", "2"], 400, 500)],
    ids=["api", "dev", "api-2"],
)
def test_connections_that_never_finish_their_headers_are_bounded_and_closed(
    spawn: Callable[..., Proc],
    database_url: str,
    descriptors: None,
    command: list[str],
    max_connections: int,
    nofile: int,
) -> None:
    """1,200 connections that send half a request's headers, against a process (each of
    `--workers 2`) that may open `nofile` descriptors: the ones past the bound are answered
    503 at once, the others closed after the header timeout, and the API serves throughout."""
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        # Long enough that every connection is opened and every one past the bound refused
        # before the first ones are timed out (which would make room for the rest).
        "TASKRUNNER_HEADER_TIMEOUT_S": "15",
        "TASKRUNNER_MAX_CONNECTIONS": str(max_connections),
    }
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))  # inherited by the API
    try:
        api = spawn(*command, env=env, http=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    api.wait_healthy()
    assert api.port is not None
    opened = half_open(api.port, 1200)
    try:
        answers = Answers(opened)
        processes = 2 if "--workers" in command else 1
        past_the_bound = 1200 - processes * max_connections
        wait_for(lambda: len(answers.refused()) >= past_the_bound, 60, "the 503s")
        # The others are closed once the header timeout has passed.
        wait_for(lambda: len(answers.closed_now()) == 1200, 90, "the closes")
        refused = answers.refused()
        # Each past the bound was told why (not reset): 503 with a detail.
        assert len(refused) >= past_the_bound
        for a in refused:
            assert a.startswith(b"HTTP/1.1 503 ") and b"too many connections" in a, a
    finally:
        for s in opened:
            s.close()
    api.wait_healthy(timeout_s=10)
    created = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": 1893499200})
    assert created.status_code == 201, created.text
    assert api.terminate() == 0
    assert "Traceback" not in api.stderr(), api.stderr()


def test_dev_with_a_role_that_may_not_migrate_says_so_and_keeps_listening(
    spawn: Callable[..., Proc], empty_database_url: str
) -> None:
    """The migrations fail for a reason of the database's own (not an outage): 503, the
    reason in the log, and another try later."""
    role = f"no_create_{os.getpid()}"
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    try:
        url = make_url(empty_database_url).set(username=role).render_as_string(False)
        api = spawn("dev", env={"TASKRUNNER_DATABASE_URL": url}, http=True)
        health = wait_for(
            lambda: (r := not_ready(api)) is not None and "log" in r.text and r, 60, "the 503"
        )
        assert "the database refused" in health.json()["detail"]
        wait_for(lambda: "permission denied" in api.stderr(), 30, "the reason in the log")
        assert api.terminate() == 0
    finally:
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
