"""The real `taskrunner` command, as a subprocess."""

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest

from tests.pages import is_local, page_urls
from tests.procs import TASKRUNNER, Proc, free_port, spawn, wait_for

__all__ = ["spawn"]  # the fixture


@pytest.mark.parametrize("command", [[], ["dev"], ["api"], ["worker"], ["tick"], ["migrate"]])
def test_help(command: list[str]) -> None:
    result = subprocess.run(
        [TASKRUNNER, *command, "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: taskrunner" in result.stdout


@pytest.mark.slow
def test_dev_with_the_embedded_database_end_to_end(tmp_path: Path, bar_server: Any) -> None:
    """What a new user does: `taskrunner dev`, then curl. No database URL is set."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "TASKRUNNER_FOO_DELAY_S": "0.2",
        "TASKRUNNER_BAR_URL": bar_server(200),
    }
    stdout, stderr = (tmp_path / "stdout").open("w"), (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [TASKRUNNER, "dev", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=stdout,
        stderr=stderr,
    )
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz").status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                return False

        wait_for(healthy, 120, "/healthz")
        now = time.time()
        created = {}
        for kind in ("foo", "bar", "baz"):
            response = httpx.post(f"{base}/tasks", json={"type": kind, "execute_at": now})
            assert response.status_code == 201, response.text
            created[kind] = response.json()["id"]
        later = httpx.post(f"{base}/tasks", json={"type": "baz", "execute_at": now + 3}).json()
        state = httpx.get(f"{base}/tasks/{later['id']}").json()["state"]
        if time.time() < now + 3:  # (a loaded machine may take longer to get here)
            assert state == "scheduled"

        def all_succeeded() -> list[dict[str, Any]] | None:
            items: list[dict[str, Any]] = httpx.get(f"{base}/tasks").json()["items"]
            return items if all(t["state"] == "succeeded" for t in items) else None

        tasks = wait_for(all_succeeded, 30, "every task to succeed")
        assert len(tasks) == 4
        later = next(t for t in tasks if t["id"] == later["id"])
        assert later["started_at"] >= later["execute_at"]

        deleted = httpx.delete(f"{base}/tasks/{created['baz']}")
        assert deleted.status_code == 204
        assert httpx.delete(f"{base}/tasks/{created['baz']}").status_code == 404
        assert httpx.post(f"{base}/tasks", json={"type": "x", "execute_at": 1}).status_code == 422

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stdout.close()
        stderr.close()

    lines = (tmp_path / "stdout").read_text().splitlines()
    baz_lines = [line for line in lines if line.startswith("Baz ")]
    assert sorted(lines) == sorted([f"Foo {created['foo']}", "200", *baz_lines])
    assert len(baz_lines) == 2
    assert "Traceback" not in (tmp_path / "stderr").read_text()


def test_migrate_and_tick_against_a_configured_database(
    database_url: str, task_factory: Callable[..., int], tmp_path: Path
) -> None:
    env = {**os.environ, "TASKRUNNER_DATABASE_URL": database_url}
    subprocess.run([TASKRUNNER, "migrate"], env=env, check=True, cwd=tmp_path)
    task = task_factory("baz")
    result = subprocess.run(
        [TASKRUNNER, "tick"], env=env, capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert result.stdout.startswith("Baz ") and result.stdout.count("\n") == 1
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["claimed"] == summary["succeeded"] == 1
    assert not (tmp_path / ".taskrunner").exists(), "no embedded database when a URL is set"
    assert task


def libpq_only_url(database_url: str, form: str) -> str:
    """`database_url`'s database, named as libpq takes it and SQLAlchemy's URL parser cannot:
    two hosts (the same server twice), or its Unix socket directory percent-encoded as the host."""
    with psycopg.connect(database_url) as conn:
        directory, port, listen = (
            str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("unix_socket_directories", "port", "listen_addresses")
        )
        user, password, dbname = conn.info.user, conn.info.password, conn.info.dbname
    user = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    socket = quote(directory.split(",")[0].strip(), safe="")
    if form == "socket as host":
        return f"postgresql://{user}@{socket}:{port}/{dbname}"
    host = "127.0.0.1" if listen in ("*", "127.0.0.1", "localhost") else socket
    return f"postgresql://{user}@{host}:{port},{host}:{port}/{dbname}"


@pytest.mark.one_server
@pytest.mark.parametrize("form", ["two hosts", "socket as host"])
def test_migrate_worker_and_dev_take_urls_only_libpq_parses(
    spawn: Callable[..., Proc], empty_database_url: str, form: str, tmp_path: Path
) -> None:
    env = {"TASKRUNNER_DATABASE_URL": libpq_only_url(empty_database_url, form)}
    migrated = subprocess.run(
        [TASKRUNNER, "migrate"], env={**os.environ, **env}, capture_output=True, text=True,
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr
    assert "Running upgrade  -> 0001" in migrated.stderr, migrated.stderr
    # The worker checks the schema before it starts (it used to wait for a host named
    # "%2Ftmp..." forever); `dev` applies migrations, then serves and runs tasks.
    worker = spawn("worker", env=env)  # waits until it has registered
    dev = spawn("dev", env=env, http=True)
    dev.wait_healthy()
    created = httpx.post(f"{dev.url}/tasks", json={"type": "baz", "execute_at": 0}, timeout=10)
    assert created.status_code == 201, created.text
    task = f"{dev.url}/tasks/{created.json()['id']}"
    wait_for(lambda: httpx.get(task, timeout=10).json()["state"] == "succeeded", 30, "the task")
    assert worker.terminate() == 0, worker.stderr()
    assert dev.terminate() == 0, dev.stderr()


@pytest.mark.parametrize(
    ("setting", "value", "code", "message"),
    [
        (
            "TASKRUNNER_DATABASE_URL",
            "postgresql://postgres@127.0.0.1:1/x",
            1,
            "database unavailable",
        ),
        ("TASKRUNNER_LEASE_SECONDS", "soon", 2, "bad configuration: TASKRUNNER_LEASE_SECONDS"),
        (
            "TASKRUNNER_DATABASE_URL",
            "postgresql://u:s3cret@h:abc/db",
            2,
            "bad configuration: TASKRUNNER_DATABASE_URL: the port is not a number",
        ),
        (
            "TASKRUNNER_DATABASE_URL",
            "not a url",
            2,
            "bad configuration: TASKRUNNER_DATABASE_URL: must be a postgresql:// URL",
        ),
        (
            "TASKRUNNER_DATABASE_URL",
            "postgresql://u:s3cret@h/db?nonsense=1",
            2,
            "bad configuration: TASKRUNNER_DATABASE_URL: cannot be parsed",
        ),
        (
            "TASKRUNNER_DATABASE_URL",
            "mysql://u:s3cret@h/db",
            2,
            "bad configuration: TASKRUNNER_DATABASE_URL: must be a postgresql:// URL",
        ),
        (
            "TASKRUNNER_DATABASE_URL",
            "postgresql://u:s3cret@h/db?sslmode=bogus",
            2,
            "bad configuration: TASKRUNNER_DATABASE_URL: its option sslmode must be one of",
        ),
        (
            "TASKRUNNER_DATABASE_URL",
            "postgresql://u:s3cret@h/db?connect_timeout=abc",
            2,
            "bad configuration: TASKRUNNER_DATABASE_URL: its option connect_timeout must be a",
        ),
    ],
    ids=[
        "database down", "bad setting", "bad port", "not a url", "bad query", "not postgresql",
        "bad sslmode", "bad connect_timeout",
    ],
)  # fmt: skip
def test_tick_fails_clearly(
    tmp_path: Path, setting: str, value: str, code: int, message: str
) -> None:
    env = {**os.environ, setting: value}
    result = subprocess.run(
        [TASKRUNNER, "tick"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr, "a URL's password is never repeated"
    assert result.stdout == ""


@pytest.mark.one_server
def test_api_behind_a_reverse_proxy_at_a_prefix(
    spawn: Callable[..., Proc], database_url: str
) -> None:
    """`taskrunner api` with TASKRUNNER_BASE_PATH, as a proxy that keeps the prefix reaches it."""
    env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_BASE_PATH": "/prod"}
    api = spawn("api", env=env, http=True)
    api.wait_healthy()
    created = httpx.post(f"{api.url}/prod/tasks", json={"type": "baz", "execute_at": 1893499200})
    assert created.status_code == 201, created.text
    assert created.headers["location"] == f"/prod/tasks/{created.json()['id']}"
    assert httpx.get(api.url + created.headers["location"]).status_code == 200
    urls = page_urls(httpx.get(f"{api.url}/prod/docs").text)
    assert "/prod/openapi.json" in urls
    for url in urls:
        assert is_local(url) and url.startswith("/prod/"), url
        assert httpx.get(api.url + url).status_code == 200, url
    head = httpx.head(f"{api.url}/prod/healthz")
    assert (head.status_code, head.content) == (200, b"")


def _children(pid: int) -> list[int]:
    """The live child processes of `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.one_server
def test_api_with_two_workers_serves_from_two_processes_and_stops_cleanly(
    spawn: Callable[..., Proc], database_url: str, sql: Callable[..., Any]
) -> None:
    env = {"TASKRUNNER_DATABASE_URL": database_url}
    api = spawn("api", "--workers", "2", env=env, http=True)
    api.wait_healthy()
    # Two server processes (uvicorn's supervisor forks them; the supervisor may also run a
    # resource tracker), each with connections of its own to the database.
    servers = wait_for(
        lambda: [p for p in _children(api.pid) if "spawn_main" in _cmdline(p)] or None,
        30,
        "the server processes",
    )
    assert len(servers) == 2, servers

    async def one(i: int) -> int:
        # A connection each, so that the kernel spreads them over both processes.
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(
                f"{api.url}/tasks", json={"type": "baz", "execute_at": 1893499200 + i}
            )
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    async def create(n: int) -> list[int]:
        return list(await asyncio.gather(*(one(i) for i in range(n))))

    ids = asyncio.run(create(64))
    assert len(set(ids)) == 64
    assert sql("SELECT count(*) FROM tasks") == [(64,)]
    backends = sql(
        "SELECT count(DISTINCT pid) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid()"
    )
    assert backends[0][0] >= 2, backends
    assert api.terminate() == 0, api.stderr()
    assert not [p for p in servers if Path(f"/proc/{p}").exists()], "a server process lived on"
    assert "Traceback" not in api.stderr(), api.stderr()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_api_refuses_a_number_of_workers_that_cannot_work(workers: str) -> None:
    result = subprocess.run(
        [TASKRUNNER, "api", "--workers", workers], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "--workers" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "bogus", "tick"],
        ["api", "--port", "70000"],
        ["dev", "--port", "-1"],
        ["prune", "--older-than", "-1"],
        ["prune", "--older-than", "nan"],
        ["prune", "--older-than", "inf"],
        ["prune", "--older-than", "1e400"],
        ["prune", "--older-than", "99999999999999"],
        ["prune", "--older-than", "abc"],
    ],
)
def test_arguments_out_of_range_are_usage_errors(argv: list[str]) -> None:
    """Exit 2 with what is wrong, before anything starts: not a port that wraps around
    (70000 listened on 4464), a prune of every task (-1), or a database error (inf). An age
    that is not a number is said as the others are (not `invalid _age_s value`)."""
    result = subprocess.run([TASKRUNNER, *argv], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    option = "--log-level" if argv[0] == "--log-level" else argv[-2]
    assert f"argument {option}:" in result.stderr
    assert "Traceback" not in result.stderr
    assert "_age_s" not in result.stderr


def test_version() -> None:
    from importlib.metadata import version

    result = subprocess.run([TASKRUNNER, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"taskrunner {version('taskrunner')}\n"


# What Alembic logs on every connection; nobody asked for it.
ALEMBIC_NOISE = ("Context impl", "Will assume transactional DDL")


def test_migrate_says_what_it_applies_and_nothing_else_of_alembic(
    empty_database_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "TASKRUNNER_DATABASE_URL": empty_database_url}
    first = subprocess.run(
        [TASKRUNNER, "migrate"], env=env, capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert "Running upgrade  -> 0001" in first.stderr, first.stderr
    again = subprocess.run(
        [TASKRUNNER, "migrate"], env=env, capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert "Running upgrade" not in again.stderr
    assert "the database schema is up to date" in again.stderr
    for noise in ALEMBIC_NOISE:
        assert noise not in first.stderr + again.stderr


def test_a_schema_newer_than_this_version_is_named_so_not_behind(
    empty_database_url: str, tmp_path: Path
) -> None:
    """A database a newer version migrated (here: at a migration no version has): each
    command that needs the schema exits 1 and says the schema is newer than it knows. Before,
    `worker`, `tick` and `prune` said to run `taskrunner migrate`, which then failed with
    alembic's traceback. A schema behind this version still says to migrate."""
    env = {**os.environ, "TASKRUNNER_DATABASE_URL": empty_database_url}

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TASKRUNNER, *command], env=env, capture_output=True, text=True, cwd=tmp_path,
            timeout=60,
        )  # fmt: skip

    assert run("migrate").returncode == 0
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        [(head,)] = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    for command in (["worker"], ["tick"], ["prune"], ["migrate"]):
        refused = run(*command)
        assert refused.returncode == 1, (command, refused.stderr)
        assert (
            f"the database schema is at migration 9999, which this version of taskrunner does"
            f" not know (its newest is {head})"
        ) in refused.stderr, (command, refused.stderr)
        assert "Traceback" not in refused.stderr
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0001'")
    behind = run("tick")
    assert behind.returncode == 1
    assert "the database schema is not up to date: run `taskrunner migrate`" in behind.stderr


@pytest.mark.one_server
def test_worker_and_prune_print_no_alembic_noise(
    spawn: Callable[..., Proc], database_url: str, tmp_path: Path
) -> None:
    env = {"TASKRUNNER_DATABASE_URL": database_url}
    pruned = subprocess.run(
        [TASKRUNNER, "prune"], env={**os.environ, **env}, capture_output=True, text=True,
        cwd=tmp_path, check=True,
    )  # fmt: skip
    worker = spawn("worker", env=env)  # waits until it has registered
    assert worker.terminate() == 0
    for noise in ALEMBIC_NOISE:
        assert noise not in pruned.stderr, pruned.stderr
        assert noise not in worker.stderr(), worker.stderr()


@pytest.mark.one_server
def test_schedules_lists_each_with_its_next_run(
    database_url: str, sql: Callable[..., list[tuple[Any, ...]]], tmp_path: Path
) -> None:
    sql(
        "INSERT INTO schedules (name, kind, cron, timezone, next_run_at, enabled) VALUES"
        " ('nightly', 'foo', '30 2 * * *', 'Europe/Paris', '2030-01-02T01:30:00Z', true),"
        " ('off', 'baz', '@hourly', 'UTC', NULL, false)"
    )
    env = {**os.environ, "TASKRUNNER_DATABASE_URL": database_url}
    listed = subprocess.run(
        [TASKRUNNER, "schedules"], env=env, capture_output=True, text=True, check=True,
        cwd=tmp_path,
    )  # fmt: skip
    assert listed.stdout.splitlines() == [
        "NAME     CRON        TIMEZONE      TYPE  NEXT RUN (UTC)",
        "nightly  30 2 * * *  Europe/Paris  foo   2030-01-02T01:30:00Z",
        "off      @hourly     UTC           baz   disabled",
    ]
    as_json = subprocess.run(
        [TASKRUNNER, "schedules", "--json"], env=env, capture_output=True, text=True,
        check=True, cwd=tmp_path,
    )  # fmt: skip
    assert json.loads(as_json.stdout)[0] == {
        "name": "nightly", "cron": "30 2 * * *", "timezone": "Europe/Paris", "type": "foo",
        "next_run_at": "2030-01-02T01:30:00Z",
    }  # fmt: skip
