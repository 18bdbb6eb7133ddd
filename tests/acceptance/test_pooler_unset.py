"""Behind a transaction pooler with TASKRUNNER_TRANSACTION_POOLER unset, every command works.

pgbouncer (transaction mode) and RDS Proxy refuse the startup parameter `options`, which
taskrunner sends when it thinks it talks to PostgreSQL itself. That refusal is recognised,
once, and the process goes on as in pooler mode, with a warning that names the setting: a
misconfiguration must never look like an outage.
"""

import os
import subprocess
from collections.abc import Callable
from typing import Any

import httpx

from tests.pgbouncer import pgbouncer_url
from tests.procs import TASKRUNNER, Proc, spawn, wait_for

__all__ = ["pgbouncer_url", "spawn"]  # the fixtures

Sql = Callable[..., list[tuple[Any, ...]]]
WARNING = "TASKRUNNER_TRANSACTION_POOLER"


def run(pgbouncer_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TASKRUNNER, *args],
        env={**os.environ, "TASKRUNNER_DATABASE_URL": pgbouncer_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


def states(sql: Sql) -> dict[int, str]:
    return dict(sql("SELECT id, state FROM tasks"))


def create(proc: Proc, kind: str = "baz") -> int:
    response = httpx.post(f"{proc.url}/tasks", json={"type": kind, "execute_at": 0}, timeout=10)
    assert response.status_code == 201, (response.text, proc.stderr())
    return int(response.json()["id"])


def warned_once(stderr: str) -> bool:
    return stderr.count(WARNING) == 1


def test_every_command_works_through_pgbouncer_without_the_setting(
    spawn: Callable[..., Proc], pgbouncer_url: str, sql: Sql
) -> None:
    env = {"TASKRUNNER_DATABASE_URL": pgbouncer_url}

    migrated = run(pgbouncer_url, "migrate")
    assert migrated.returncode == 0, migrated.stderr

    # The API alone: tasks are created (never a 503), and wait for a tick.
    api = spawn("api", env=env, http=True)
    api.wait_healthy()
    first = create(api)
    for _ in range(6):  # more than psycopg's prepare threshold: no prepared statements
        assert httpx.get(f"{api.url}/tasks/{first}", timeout=10).status_code == 200
    ticked = run(pgbouncer_url, "tick")
    assert ticked.returncode == 0, ticked.stderr
    assert warned_once(ticked.stderr), ticked.stderr
    assert states(sql) == {first: "succeeded"}

    # A worker runs what the API creates.
    worker = spawn("worker", env=env, ready=False)
    second = create(api)
    wait_for(lambda: states(sql).get(second) == "succeeded", 30, "the worker to run it")

    pruned = run(pgbouncer_url, "prune", "--older-than", "0")
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 2 finished tasks" in pruned.stderr
    assert warned_once(pruned.stderr), pruned.stderr

    # `dev`: migrations, the API and a worker in one process.
    dev = spawn("dev", env=env, http=True)
    dev.wait_healthy()
    third = create(dev)
    wait_for(lambda: states(sql).get(third) == "succeeded", 30, "dev to run it")

    for proc in (api, worker, dev):
        assert proc.terminate() == 0, proc.stderr()
        assert warned_once(proc.stderr()), proc.stderr()
        assert "database unavailable" not in proc.stderr(), proc.stderr()
