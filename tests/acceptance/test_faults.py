"""Faults, as a user meets them: a database that restarts, stops or freezes mid-burst, a
`bar` fan-out, a huge response body, a closed stdout, settings that cannot work. Real
`taskrunner` processes against a server of the test's own."""

import asyncio
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.httpservers import http_server
from tests.pgservers import Server
from tests.procs import TASKRUNNER, Proc, spawn, wait_for

__all__ = ["spawn"]  # the fixture

pytestmark = pytest.mark.slow


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def states(url: str) -> dict[str, int]:
    try:
        with connect(url) as conn:
            return dict(conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
    except psycopg.OperationalError:
        return {}


def foo_lines(*procs: Proc) -> Counter[int]:
    return Counter(
        int(m.group(1)) for p in procs for m in re.finditer(r"^Foo (\d+)$", p.stdout(), re.M)
    )


@pytest.mark.parametrize(
    ("fault", "workers"), [("restart", 1), ("stop for 10 s", 2)], ids=["restart", "stop-10s"]
)
def test_a_database_outage_mid_burst_strands_nothing(
    spawn: Callable[..., Proc], own_server: Server, fault: str, workers: int
) -> None:
    """Two batches of 5,000 foo due at T, the database restarted (or stopped 10 s) right
    after T: every task still runs exactly once, and a task created afterwards runs too."""
    env = {
        "TASKRUNNER_DATABASE_URL": own_server.url,
        "TASKRUNNER_FOO_DELAY_S": "1",
        "TASKRUNNER_DB_CONNECT_TIMEOUT_S": "2",
    }
    procs = [spawn("worker", env=env) for _ in range(workers)]
    with connect(own_server.url) as conn:
        wait_for(
            lambda: conn.execute("SELECT count(*) FROM workers").fetchone() == (workers,),
            60,
            "workers to start",
        )
        for _ in range(2):
            conn.execute(
                "INSERT INTO tasks (kind, execute_at, max_attempts)"
                " SELECT 'foo', now() + interval '1 second', 3 FROM generate_series(1, 5000)"
            )
    time.sleep(1.07)  # just after T: claims in flight
    if fault == "restart":
        own_server.restart()
    else:
        own_server.stop()
        time.sleep(10)
        own_server.start()
    with connect(own_server.url) as conn:
        conn.execute("INSERT INTO tasks (kind, execute_at, max_attempts) VALUES ('baz', now(), 3)")
    wait_for(lambda: states(own_server.url) == {"succeeded": 10_001}, 120, "every task to run")
    for proc in procs:
        assert proc.terminate() == 0, proc.stderr()
    printed = foo_lines(*procs)
    assert len(printed) == 10_000 and max(printed.values()) == 1, "each foo printed once"
    with connect(own_server.url) as conn:
        assert conn.execute("SELECT DISTINCT attempts FROM tasks").fetchall() == [(1,)]
    logs = "".join(p.stderr() for p in procs)
    assert "Traceback" not in logs
    assert "no longer held" not in logs


def test_one_task_at_the_end_of_time_stops_no_one(
    spawn: Callable[..., Proc], database_url: str, sql: Callable[..., Any]
) -> None:
    """The last time the API accepts, stored exactly, read back exactly; workers and ticks
    beside it go on; and a session in another time zone changes nothing."""
    env = {"TASKRUNNER_DATABASE_URL": database_url, "PGTZ": "Asia/Tokyo"}
    api = spawn("api", env=env, http=True)
    worker = spawn("worker", env=env)
    api.wait_healthy()
    end = "9999-12-31T23:59:59.999999Z"
    batch = httpx.post(
        f"{api.url}/tasks/batch", json={"tasks": [{"type": "baz", "execute_at": end}]}
    )
    assert batch.status_code == 201, batch.text
    one = httpx.post(f"{api.url}/tasks", json={"type": "foo", "execute_at": end})
    assert one.status_code == 201, one.text
    assert one.json()["execute_at"] == end
    [far] = batch.json()["ids"]
    shown = httpx.get(f"{api.url}/tasks/{far}")
    assert (shown.status_code, shown.json()["execute_at"]) == (200, end)
    assert httpx.get(f"{api.url}/tasks", params={"state": "scheduled"}).status_code == 200
    stored = sql("SELECT DISTINCT execute_at = '9999-12-31 23:59:59.999999+00' FROM tasks")
    assert stored == [(True,)], "stored exactly, not a float's neighbour"

    now = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": time.time()})
    wait_for(
        lambda: httpx.get(f"{api.url}/tasks/{now.json()['id']}").json()["state"] == "succeeded",
        30,
        "a task due now to run beside it",
    )
    tick = subprocess.run(
        [TASKRUNNER, "tick"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tick.returncode == 0, tick.stderr
    assert worker.popen.poll() is None, worker.stderr()
    assert api.terminate() == 0 and worker.terminate() == 0


@pytest.mark.one_server
def test_a_fan_out_of_bar_all_succeeds_against_a_healthy_server(
    spawn: Callable[..., Proc], database_url: str, sql: Callable[..., Any]
) -> None:
    n = 10_000
    with http_server() as served:
        env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_BAR_URL": served.url}
        worker = spawn("worker", env=env)
        wait_for(lambda: sql("SELECT count(*) FROM workers") == [(1,)], 60, "the worker")
        sql(
            "INSERT INTO tasks (kind, execute_at, max_attempts)"
            " SELECT 'bar', now(), 3 FROM generate_series(1, %s)",
            n,
        )
        started = time.monotonic()
        wait_for(
            lambda: dict(sql("SELECT state, count(*) FROM tasks GROUP BY 1")) == {"succeeded": n},
            180,
            "every bar to succeed",
        )
        elapsed_s = time.monotonic() - started
        assert worker.terminate() == 0, worker.stderr()
        assert served.requests == n, "one request per task, no retries"
    assert sql("SELECT DISTINCT attempts, output FROM tasks") == [(1, "200")]
    assert worker.stdout().count("200\n") == n
    assert "action=rescue" not in worker.stderr() and "Timeout" not in worker.stderr()
    print(
        f"{n} bar in {elapsed_s:.1f} s over {served.connections} connections"
        f" ({served.requests / elapsed_s:,.0f} requests/s)"
    )


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_bar_reads_no_more_of_a_huge_body_than_it_needs(
    spawn: Callable[..., Proc], database_url: str, sql: Callable[..., Any]
) -> None:
    with http_server(body_bytes=800 * 1024 * 1024) as served:
        env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_BAR_URL": served.url}
        worker = spawn("worker", env=env)
        wait_for(lambda: sql("SELECT count(*) FROM workers") == [(1,)], 60, "the worker")
        baseline_mb = peak_rss_mb(worker.pid)
        sql("INSERT INTO tasks (kind, execute_at) SELECT 'bar', now() FROM generate_series(1, 4)")
        wait_for(
            lambda: sql("SELECT count(*) FROM tasks WHERE state = 'succeeded'") == [(4,)],
            60,
            "the bar tasks",
        )
        peak_mb = peak_rss_mb(worker.pid)
        assert worker.terminate() == 0, worker.stderr()
    assert peak_mb - baseline_mb < 40, f"memory went from {baseline_mb:.0f} to {peak_mb:.0f} MB"


@pytest.mark.parametrize("kind", ["foo", "baz"])
def test_a_closed_stdout_stops_the_worker_and_hands_back_what_was_not_printed(
    database_url: str, sql: Callable[..., Any], tmp_path: Path, kind: str
) -> None:
    """`taskrunner worker | head -n 3`: the worker says why and exits non-zero, nothing it
    could not print is recorded as run, nothing is left running, and another worker runs
    the rest, each once."""
    n = 3_000
    sql(
        "INSERT INTO tasks (kind, execute_at) SELECT %s, now() FROM generate_series(1, %s)",
        kind,
        n,
    )
    env = {
        **os.environ,
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_FOO_DELAY_S": "0.5",
    }
    stderr = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen([TASKRUNNER, "worker"], env=env, stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    head = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()  # what `head -n 3` does once it has its lines
    code = proc.wait(timeout=60)
    stderr.close()
    errors = (tmp_path / "stderr").read_text()
    assert code != 0, errors
    assert "cannot print task output" in errors
    assert all(line.strip() for line in head)
    left = dict(sql("SELECT state, count(*) FROM tasks GROUP BY 1"))
    assert "running" not in left, "nothing is left running"
    assert "failed" not in left

    second = subprocess.run(
        [TASKRUNNER, "tick"], env=env, capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    assert sql("SELECT state, attempts, count(*) FROM tasks GROUP BY 1, 2") == [
        ("succeeded", 1, n)
    ], "handed back without using an attempt"
    if kind == "foo":
        printed = Counter(re.findall(r"^Foo (\d+)$", second.stdout, re.M))
        assert not printed or max(printed.values()) == 1


def test_a_frozen_database_gets_503s_not_hangs_and_workers_come_back(
    spawn: Callable[..., Proc], own_server: Server
) -> None:
    env = {
        "TASKRUNNER_DATABASE_URL": own_server.url,
        "TASKRUNNER_DB_CONNECT_TIMEOUT_S": "2",
        "TASKRUNNER_DB_STATEMENT_TIMEOUT_S": "2",
        "TASKRUNNER_FOO_DELAY_S": "0.5",
    }
    api = spawn("api", env=env, http=True)
    worker = spawn("worker", env=env)
    api.wait_healthy()
    with connect(own_server.url) as conn:
        conn.execute(
            "INSERT INTO tasks (kind, execute_at) SELECT 'foo', now() FROM generate_series(1, 200)"
        )

    own_server.freeze()
    try:

        async def twenty() -> list[tuple[int, float, str | None]]:
            async with httpx.AsyncClient(timeout=60) as client:

                async def one(path: str) -> tuple[int, float, str | None]:
                    asked = time.monotonic()
                    response = await client.get(f"{api.url}{path}")
                    return (
                        response.status_code,
                        time.monotonic() - asked,
                        response.headers.get("retry-after"),
                    )

                # (/tasks/1: the hot path, where reads made at once share a statement.)
                paths = ["/healthz"] * 20 + ["/tasks?limit=1000"] * 20 + ["/tasks/1"] * 20
                return await asyncio.gather(*(one(p) for p in paths))

        answers = asyncio.run(twenty())
    finally:
        own_server.thaw()
    assert {status for status, _, _ in answers} == {503}, answers
    assert max(seconds for _, seconds, _ in answers) < 12, "bounded: pool wait + statement"
    assert all(retry for _, _, retry in answers), "every 503 says when to retry"

    api.wait_healthy(timeout_s=30)
    with connect(own_server.url) as conn:
        conn.execute("INSERT INTO tasks (kind, execute_at) VALUES ('baz', now())")
    wait_for(lambda: states(own_server.url) == {"succeeded": 201}, 60, "the worker to go on")
    assert api.terminate() == 0 and worker.terminate() == 0
    assert "Traceback" not in api.stderr() + worker.stderr()


def test_a_batch_answered_with_an_error_was_not_written(
    spawn: Callable[..., Proc], own_server: Server
) -> None:
    """Sessions ended at random (a failover, an idle timeout, pg_terminate_backend) while
    batches are written: a batch answered 201 is all there, one answered otherwise is not
    there at all, so a client may send it again. (A batch is written in slices, several
    statements in one transaction: its COMMIT once went down the pipeline behind them, and
    a session ended right after the commit turned a written batch into a 503.)"""
    api = spawn("api", env={"TASKRUNNER_DATABASE_URL": own_server.url}, http=True)
    api.wait_healthy()
    size, seconds = 1_200, 8.0  # three slices each (tasks.FIRST_SLICE: 500, then 1,000)
    stop = time.monotonic() + seconds

    def end_sessions() -> int:
        ended = 0
        with connect(own_server.url) as conn:
            while time.monotonic() < stop:
                time.sleep(random.uniform(0.01, 0.2))
                [(n,)] = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE pid <> pg_backend_pid() AND datname = current_database()"
                    " AND (query LIKE '%%INSERT INTO tasks%%' OR query = 'COMMIT')"
                ).fetchall()
                ended += n
        return ended

    async def post_batches() -> dict[int, int]:
        answers: dict[int, int] = {}
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:

            async def client_loop(first: int) -> None:
                batch = first
                while time.monotonic() < stop:
                    # Batch b's tasks are due in second 2_000_000_000 + b: counted per second.
                    at = 2_000_000_000 + batch
                    items = [{"type": "baz", "execute_at": at + i / 1e6} for i in range(size)]
                    response = await client.post("/tasks/batch", json={"tasks": items})
                    answers[batch] = response.status_code
                    batch += 3

            await asyncio.gather(*(client_loop(first) for first in range(3)))
        return answers

    with ThreadPoolExecutor(1) as pool:
        ended = pool.submit(end_sessions)
        answers = asyncio.run(post_batches())
        assert ended.result() > 0, "no session was ended: the test tested nothing"
    with connect(own_server.url) as conn:
        written = dict(
            conn.execute(
                "SELECT CAST(extract(epoch FROM execute_at) AS bigint) - 2000000000, count(*)"
                " FROM tasks GROUP BY 1"
            ).fetchall()
        )
    failed = [batch for batch, status in answers.items() if status != 201]
    assert failed, "no batch failed: the test tested nothing"
    assert set(answers.values()) <= {201, 503}, answers
    assert {batch: written.get(batch, 0) for batch in failed} == dict.fromkeys(failed, 0)
    created = [batch for batch, status in answers.items() if status == 201]
    assert {batch: written.get(batch) for batch in created} == dict.fromkeys(created, size)


@pytest.mark.parametrize(
    ("name", "value"),
    [("LEASE_SECONDS", "0.5"), ("LEASE_SECONDS", "2"), ("DB_STATEMENT_TIMEOUT_S", "0")],
)
def test_settings_that_cannot_work_are_refused(name: str, value: str) -> None:
    env = {
        **os.environ,
        f"TASKRUNNER_{name}": value,
        "TASKRUNNER_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
    }
    result = subprocess.run(
        [TASKRUNNER, "worker"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert f"TASKRUNNER_{name}" in result.stderr


def test_sigterm_mid_fan_out_then_sigkill_lose_nothing(
    spawn: Callable[..., Proc], database_url: str, sql: Callable[..., Any]
) -> None:
    """5,000 foo; one worker stopped with SIGTERM mid-run, another killed with SIGKILL: the
    survivors run every task, each printed once."""
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_FOO_DELAY_S": "2",
        "TASKRUNNER_LEASE_SECONDS": "3",
        "TASKRUNNER_SHUTDOWN_GRACE_S": "0.5",
        # Neither worker can take all 5,000: both hold some when the signals come.
        "TASKRUNNER_CONCURRENCY": "3000",
    }
    first, second = spawn("worker", env=env), spawn("worker", env=env)
    sql("INSERT INTO tasks (kind, execute_at) SELECT 'foo', now() FROM generate_series(1, 5000)")
    wait_for(
        lambda: (
            sql("SELECT count(DISTINCT claimed_by) FROM tasks WHERE state = 'running'") == [(2,)]
        ),
        30,
        "both workers to hold tasks",
    )
    first.popen.send_signal(signal.SIGTERM)
    second.kill()
    assert first.popen.wait(timeout=15) == 0, first.stderr()
    survivors = [spawn("worker", env=env) for _ in range(2)]
    wait_for(
        lambda: dict(sql("SELECT state, count(*) FROM tasks GROUP BY 1")) == {"succeeded": 5000},
        120,
        "the survivors to run everything",
    )
    for proc in survivors:
        assert proc.terminate() == 0
    printed = foo_lines(first, second, *survivors)
    assert len(printed) == 5000
    # A SIGKILL between printing and recording is the one documented repeat window; the
    # killed worker printed into a file that kept its lines.
    repeats = sum(n - 1 for n in printed.values())
    [(rerun,)] = sql("SELECT count(*) FROM tasks WHERE attempts > 1")
    assert repeats <= rerun


def test_all_connections_taken_at_startup_then_freed(
    spawn: Callable[..., Proc], own_server: Server
) -> None:
    """The server is full when the API and a worker start: they wait (503 meanwhile), and
    work as soon as connections are free."""
    with connect(own_server.url) as conn:
        conn.execute("ALTER SYSTEM SET max_connections = 20")
    own_server.restart()
    hogs: list[psycopg.Connection[Any]] = []
    try:
        while True:
            try:
                hogs.append(connect(own_server.url))
            except psycopg.OperationalError:
                break
        assert len(hogs) >= 15
        env = {"TASKRUNNER_DATABASE_URL": own_server.url, "TASKRUNNER_DB_CONNECT_TIMEOUT_S": "2"}
        api = spawn("api", env=env, http=True)
        worker = spawn("worker", env=env, ready=False)
        time.sleep(3)
        assert api.popen.poll() is None and worker.popen.poll() is None, api.stderr()
        for hog in hogs[:12]:
            hog.close()
        api.wait_healthy(timeout_s=60)
        created = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": time.time()})
        assert created.status_code == 201, created.text
        wait_for(
            lambda: (
                httpx.get(f"{api.url}/tasks/{created.json()['id']}").json()["state"] == "succeeded"
            ),
            60,
            "the worker to run it",
        )
    finally:
        for hog in hogs:
            hog.close()
    assert api.terminate() == 0 and worker.terminate() == 0
