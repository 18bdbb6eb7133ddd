"""Many instances, crashes, restarts, skewed clocks: real `taskrunner` processes, one database."""

import asyncio
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.pgbouncer import pgbouncer_url
from tests.pgservers import Server
from tests.procs import TASKRUNNER, Proc, spawn, wait_for

__all__ = ["pgbouncer_url", "spawn"]  # the fixtures

Sql = Callable[..., list[tuple[Any, ...]]]
pytestmark = pytest.mark.slow


def foo_lines(*procs: Proc) -> Counter[int]:
    """How many times each `Foo {id}` line was printed, across the processes' stdout."""
    return Counter(
        int(m.group(1)) for p in procs for m in re.finditer(r"^Foo (\d+)$", p.stdout(), re.M)
    )


def count_by_state(sql: Sql) -> dict[str, int]:
    return dict(sql("SELECT state, count(*) FROM tasks GROUP BY state"))


async def create_through(apis: list[Proc], n: int, spread_s: float) -> list[int]:
    """Create `n` foo tasks through the APIs in turn, 32 at a time, due over `spread_s`.

    Each create carries an idempotency key and is sent again, once, if its connection fails
    under it (as a client should: once seen in CI, under load, a ReadError with no answer);
    the key makes the retry safe, so every task is still created once. Retries must stay
    rare: a server that dropped connections would fail here."""
    ids: list[int] = []
    retried: list[int] = []
    limit = asyncio.Semaphore(32)
    run = uuid.uuid4().hex[:8]
    # Idle connections are dropped after 2 s, before the server's keep-alive timeout (5 s)
    # closes them: a request sent on a connection the server is closing fails to read.
    limits = httpx.Limits(keepalive_expiry=2)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(i: int) -> None:
            async with limit:
                body = {"type": "foo", "execute_at": time.time() + random.uniform(0, spread_s)}
                url = f"{apis[i % len(apis)].url}/tasks"
                headers = {"Idempotency-Key": f"scale-{run}-{i}"}
                try:
                    response = await client.post(url, json=body, headers=headers)
                except httpx.TransportError:
                    retried.append(i)
                    response = await client.post(url, json=body, headers=headers)
                expected = (200, 201) if i in retried else (201,)
                assert response.status_code in expected, response.text
                ids.append(response.json()["id"])

        await asyncio.gather(*(one(i) for i in range(n)))
    assert len(retried) <= max(1, n // 100), f"{len(retried)} of {n} creates were retried"
    assert len(set(ids)) == n
    return ids


async def test_many_workers_and_apis_run_each_task_exactly_once(
    spawn: Callable[..., Proc], database_url: str, sql: Sql
) -> None:
    env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_FOO_DELAY_S": "0.2"}
    apis = [spawn("api", env=env, http=True) for _ in range(2)]
    workers = [spawn("worker", env=env) for _ in range(3)]
    for api in apis:
        api.wait_healthy()

    ids = await create_through(apis, 1000, spread_s=3.0)

    wait_for(lambda: count_by_state(sql) == {"succeeded": 1000}, 120, "all tasks to succeed")
    for proc in apis + workers:
        assert proc.terminate() == 0, proc.stderr()

    printed = foo_lines(*workers)
    duplicates = sum(n - 1 for n in printed.values() if n > 1)
    lost = len(set(ids) - set(printed))
    [(early,)] = sql("SELECT count(*) FROM tasks WHERE started_at < execute_at")
    [(reruns,)] = sql("SELECT count(*) FROM tasks WHERE attempts <> 1")
    [(p50, p99)] = sql(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY started_at - execute_at),"
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY started_at - execute_at) FROM tasks"
    )
    print(
        f"tasks={len(ids)} workers=3 apis=2 duplicates={duplicates} early={early} lost={lost}"
        f" lateness_p50={p50} lateness_p99={p99}"
    )
    assert len(set(ids)) == 1000
    assert (duplicates, lost, early, reruns) == (0, 0, 0, 0)
    assert set(printed) == set(ids)
    per_worker = [len(foo_lines(w)) for w in workers]
    assert sum(per_worker) == 1000


async def test_killed_worker_loses_nothing_and_prints_nothing_twice(
    spawn: Callable[..., Proc], database_url: str, sql: Sql, task_factory: Callable[..., int]
) -> None:
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_LEASE_SECONDS": "3",
    }
    ids = [task_factory("foo") for _ in range(40)]
    victim = spawn("worker", env={**env, "TASKRUNNER_FOO_DELAY_S": "30"}, name="victim")

    def victim_holds_all() -> bool:
        [(held,)] = sql(
            "SELECT count(*) FROM tasks WHERE state = 'running' AND claimed_by LIKE %s",
            f"%:{victim.pid}:%",
        )
        return bool(held == len(ids))

    wait_for(victim_holds_all, 30, "the victim to claim every task")
    victim.kill()  # SIGKILL while its foo tasks sleep

    survivors = [
        spawn("worker", env={**env, "TASKRUNNER_FOO_DELAY_S": "0.5"}, name=f"survivor{i}")
        for i in range(2)
    ]
    wait_for(lambda: count_by_state(sql) == {"succeeded": 40}, 60, "survivors to finish")
    for proc in survivors:
        assert proc.terminate() == 0

    printed = foo_lines(victim, *survivors)
    assert set(printed) == set(ids), "none lost"
    assert max(printed.values()) == 1, "none printed twice"
    assert sql("SELECT DISTINCT attempts FROM tasks") == [(2,)], "the crash used an attempt"


async def test_sigterm_lets_running_tasks_finish(
    spawn: Callable[..., Proc], database_url: str, sql: Sql, task_factory: Callable[..., int]
) -> None:
    env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_FOO_DELAY_S": "1.5"}
    ids = [task_factory("foo") for _ in range(5)]
    worker = spawn("worker", env=env)
    wait_for(lambda: count_by_state(sql) == {"running": 5}, 30, "the tasks to start")
    stopped = time.monotonic()
    assert worker.terminate() == 0
    assert time.monotonic() - stopped < 5
    assert count_by_state(sql) == {"succeeded": 5}
    assert set(foo_lines(worker)) == set(ids)


def five_foo_running(
    spawn: Callable[..., Proc],
    database_url: str,
    sql: Sql,
    task_factory: Callable[..., int],
    grace_s: float,
) -> Proc:
    """A worker running 5 foo of a minute each, with a shutdown grace of `grace_s`."""
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_FOO_DELAY_S": "60",
        "TASKRUNNER_SHUTDOWN_GRACE_S": str(grace_s),
    }
    for _ in range(5):
        task_factory("foo")
    worker = spawn("worker", env=env)
    wait_for(lambda: count_by_state(sql) == {"running": 5}, 30, "the tasks to start")
    return worker


async def test_sigterm_hands_back_what_cannot_finish_in_the_grace_period(
    spawn: Callable[..., Proc], database_url: str, sql: Sql, task_factory: Callable[..., int]
) -> None:
    worker = five_foo_running(spawn, database_url, sql, task_factory, grace_s=0.5)
    stopped = time.monotonic()
    assert worker.terminate() == 0
    assert time.monotonic() - stopped < 5
    assert sql("SELECT DISTINCT state, attempts, claimed_by FROM tasks") == [("scheduled", 0, None)]
    assert worker.stdout() == ""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_second_signal_stops_running_tasks_and_hands_them_back(
    spawn: Callable[..., Proc],
    database_url: str,
    sql: Sql,
    task_factory: Callable[..., int],
    signum: signal.Signals,
) -> None:
    # Ctrl-C twice: the grace period (30 s here) is cut short, and what ran is handed back
    # due again without using an attempt, as at the end of a grace period; before, the
    # process exited 1 with a traceback and left its tasks running until its lease ran out.
    worker = five_foo_running(spawn, database_url, sql, task_factory, grace_s=30)
    stopped = time.monotonic()
    worker.popen.send_signal(signum)
    wait_for(lambda: "finishing running tasks" in worker.stderr(), 10, "the first signal heard")
    worker.popen.send_signal(signum)
    assert worker.popen.wait(timeout=15) == 0, worker.stderr()
    assert time.monotonic() - stopped < 10
    assert sql("SELECT DISTINCT state, attempts, claimed_by FROM tasks") == [("scheduled", 0, None)]
    assert sql("SELECT count(*) FROM workers") == [(0,)]
    assert "Traceback" not in worker.stderr()
    assert worker.stdout() == ""


async def test_a_second_signal_ends_the_wait_for_lines_nobody_reads(
    database_url: str, sql: Sql, tmp_path: Path
) -> None:
    # Its stdout a pipe nobody reads: lines back up, and the results wait for them. After the
    # grace wait for running tasks, a second signal was not heard: the worker waited out the
    # grace period (60 s here).
    sql(
        "INSERT INTO tasks (kind, execute_at, max_attempts)"
        " SELECT 'baz', now(), 3 FROM generate_series(1, 20000)"
    )
    env = {
        **os.environ,
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_SHUTDOWN_GRACE_S": "60",
    }
    with (tmp_path / "worker.stderr").open("wb") as err:
        worker = subprocess.Popen(
            [TASKRUNNER, "worker"], env=env, stdout=subprocess.PIPE, stderr=err
        )
        assert worker.stdout is not None
        try:
            wait_for(lambda: count_by_state(sql).get("running"), 30, "lines to back up")
            time.sleep(1)
            worker.send_signal(signal.SIGTERM)
            time.sleep(1)
            stopped = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            wait_for(lambda: worker.poll() is not None, 15, "the worker to exit")
            assert time.monotonic() - stopped < 10
            lines = worker.stdout.read().decode().splitlines()
        finally:
            worker.kill()
            worker.wait()
            worker.stdout.close()
    assert worker.returncode == 0
    stderr = (tmp_path / "worker.stderr").read_text()
    assert "second signal" in stderr and "Traceback" not in stderr
    # What got out is recorded, the rest is handed back unused; nothing is running.
    states = count_by_state(sql)
    assert states == {"succeeded": len(lines), "scheduled": 20000 - len(lines)}, states
    assert sql("SELECT DISTINCT attempts FROM tasks WHERE state = 'scheduled'") == [(0,)]


async def test_a_second_ctrl_c_stops_the_api_without_a_traceback(
    spawn: Callable[..., Proc], database_url: str
) -> None:
    # Forced, uvicorn skipped the app's shutdown, whose task was cancelled at exit: a
    # traceback on the way out of a clean stop.
    api = spawn("api", env={"TASKRUNNER_DATABASE_URL": database_url}, http=True)
    api.wait_healthy()
    api.popen.send_signal(signal.SIGINT)
    time.sleep(0.1)
    api.popen.send_signal(signal.SIGINT)
    assert api.popen.wait(timeout=15) == 0, api.stderr()
    assert "Traceback" not in api.stderr()


@pytest.mark.parametrize("skew", ["+1h", "-1h"])
async def test_a_skewed_clock_never_runs_a_task_early_or_late(
    spawn: Callable[..., Proc],
    database_url: str,
    sql: Sql,
    task_factory: Callable[..., int],
    skew: str,
) -> None:
    libfaketime = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), None)
    if libfaketime is None:
        pytest.skip("needs libfaketime (Debian package faketime; .ci/run installs it)")
    worker = spawn(
        "worker",
        env={
            "TASKRUNNER_DATABASE_URL": database_url,
            "LD_PRELOAD": str(libfaketime),
            "FAKETIME": skew,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        },
    )
    now = task_factory("baz")
    later = task_factory("baz", due_in_s=4.0)
    wait_for(lambda: sql("SELECT state FROM tasks WHERE id = %s", now) == [("succeeded",)], 30, "")
    assert sql("SELECT state FROM tasks WHERE id = %s", later) == [("scheduled",)]
    wait_for(lambda: count_by_state(sql) == {"succeeded": 2}, 30, "the later task")
    assert worker.terminate() == 0
    [(lateness_s,)] = sql(
        "SELECT extract(epoch FROM started_at - execute_at) FROM tasks WHERE id = %s", later
    )
    assert 0 <= lateness_s < 1.5, "by the database's clock: never early, not a skew late"


async def test_postgres_restart_under_running_api_and_workers(
    spawn: Callable[..., Proc], own_server: Server
) -> None:
    env = {
        "TASKRUNNER_DATABASE_URL": own_server.url,
        "TASKRUNNER_FOO_DELAY_S": "0.5",
        "TASKRUNNER_DB_CONNECT_TIMEOUT_S": "2",
        # A claim committed just as the server stopped, whose answer was lost, is only
        # rescued when its lease runs out: keep that short here.
        "TASKRUNNER_LEASE_SECONDS": "15",
    }
    api = spawn("api", env=env, http=True)
    workers = [spawn("worker", env=env) for _ in range(2)]
    api.wait_healthy()
    before = await create_through([api], 30, spread_s=2.0)

    own_server.stop()
    asked = time.monotonic()
    down = httpx.get(f"{api.url}/healthz", timeout=10)
    assert down.status_code == 503
    assert time.monotonic() - asked < 5, "503 at once, not a hang"
    refused = httpx.post(f"{api.url}/tasks", json={"type": "foo", "execute_at": 0}, timeout=10)
    assert refused.status_code == 503
    time.sleep(2)
    own_server.start()

    api.wait_healthy(timeout_s=30)
    after = await create_through([api], 30, spread_s=1.0)
    ids = before + after

    def all_done() -> bool:
        done = httpx.get(f"{api.url}/tasks", params={"state": "succeeded", "limit": 1000})
        return done.status_code == 200 and len(done.json()["items"]) == len(ids)

    wait_for(all_done, 90, "every task, before and after the restart, to succeed")
    for proc in [api, *workers]:
        assert proc.terminate() == 0, proc.stderr()
    printed = foo_lines(*workers)
    assert set(printed) == set(ids)
    assert max(printed.values()) == 1
    assert "Traceback" not in "".join(p.stderr() for p in [api, *workers])


async def test_a_worker_started_before_its_database_waits_for_it(
    spawn: Callable[..., Proc], own_server: Server
) -> None:
    own_server.stop()
    worker = spawn("worker", env={"TASKRUNNER_DATABASE_URL": own_server.url}, ready=False)
    wait_for(lambda: "waiting for the database" in worker.stderr(), 30, "the worker to wait")
    time.sleep(1)
    assert worker.popen.poll() is None, worker.stderr()
    own_server.start()
    with psycopg.connect(own_server.url, autocommit=True) as conn:
        conn.execute("INSERT INTO tasks (kind, execute_at, max_attempts) VALUES ('baz', now(), 3)")

        def ran() -> bool:
            [(state,)] = conn.execute("SELECT state FROM tasks").fetchall()
            return bool(state == "succeeded")

        wait_for(ran, 30, "the worker to run the task")
    assert worker.terminate() == 0
    assert worker.stdout().startswith("Baz ")


async def test_many_workers_and_apis_through_pgbouncer_in_transaction_mode(
    spawn: Callable[..., Proc], pgbouncer_url: str, sql: Sql
) -> None:
    env = {
        "TASKRUNNER_DATABASE_URL": pgbouncer_url,
        "TASKRUNNER_TRANSACTION_POOLER": "true",
        "TASKRUNNER_FOO_DELAY_S": "0.2",
    }
    apis = [spawn("api", env=env, http=True) for _ in range(2)]
    workers = [spawn("worker", env=env) for _ in range(2)]
    for api in apis:
        api.wait_healthy()
    ids = await create_through(apis, 600, spread_s=2.0)
    wait_for(lambda: count_by_state(sql) == {"succeeded": 600}, 120, "all tasks to succeed")
    for proc in apis + workers:
        assert proc.terminate() == 0, proc.stderr()
    printed = foo_lines(*workers)
    assert set(printed) == set(ids) and max(printed.values()) == 1
    assert sql("SELECT DISTINCT attempts FROM tasks") == [(1,)]


def test_thirty_parallel_ticks_beside_two_workers(
    spawn: Callable[..., Proc],
    database_url: str,
    sql: Sql,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from functions import tick
    from tests.lambda_harness import FakeContext, scheduled_event

    env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_FOO_DELAY_S": "0.2"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    workers = [spawn("worker", env=env) for _ in range(2)]
    sql(
        "INSERT INTO tasks (kind, execute_at)"
        " SELECT CASE WHEN n % 3 = 0 THEN 'foo' ELSE 'baz' END, now() + interval '2 seconds'"
        " FROM generate_series(1, 6000) AS n"
    )
    summaries: list[dict[str, Any]] = []

    def one_tick() -> None:
        time.sleep(2)
        summaries.append(tick.handler(scheduled_event(), FakeContext(60_000)))

    ticks = [threading.Thread(target=one_tick) for _ in range(30)]
    for t in ticks:
        t.start()
    for t in ticks:
        t.join(timeout=120)
    wait_for(lambda: count_by_state(sql) == {"succeeded": 6000}, 120, "every task to run")
    for proc in workers:
        assert proc.terminate() == 0, proc.stderr()
    ticked = capsys.readouterr().out
    printed = foo_lines(*workers) + Counter(
        int(m.group(1)) for m in re.finditer(r"^Foo (\d+)$", ticked, re.M)
    )
    assert len(printed) == 2000 and max(printed.values()) == 1
    assert sql("SELECT DISTINCT attempts FROM tasks") == [(1,)]
    assert len(summaries) == 30
    baz_lines = re.findall(r"^Baz \d+$", ticked + "".join(w.stdout() for w in workers), re.M)
    assert len(baz_lines) == 4000, "each baz printed once, by a worker or a tick"
