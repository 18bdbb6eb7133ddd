"""Workers share a kind with slots: none claims more of it than it can start (issue 24)."""

import json
from collections.abc import Callable
from typing import Any

import psycopg

from functions import queries
from tests.httpservers import http_server
from tests.procs import Proc, spawn, wait_for

__all__ = ["spawn"]  # the fixture

N = 1_000


def test_two_workers_share_a_thousand_slow_bar(
    spawn: Callable[..., Proc], database_url: str, sql: Callable[..., Any]
) -> None:
    """2 workers of 100 `bar` slots each, 1,000 `bar` against a server that answers after a
    second: each task runs once, and each worker runs 40 to 60% of them. (A worker that
    claimed every due task held them, 'running', while it ran its 100 at a time, and the
    other sat idle.) The time this takes is the bench's `share` scenario, not a bound here."""
    with http_server(delay_s=1.0) as served:
        env = {
            "TASKRUNNER_DATABASE_URL": database_url,
            "TASKRUNNER_BAR_URL": served.url,
            "TASKRUNNER_BAR_CONCURRENCY": "100",
        }
        workers = [spawn("worker", env=env) for _ in range(2)]
        # As POST /tasks/batch creates them: in one statement, which wakes the workers.
        tasks = json.dumps([{"kind": "bar", "at_us": 0}] * N)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(queries.INSERT_TASKS, {"tasks": tasks, "max_attempts": 1})
        wait_for(
            lambda: sql("SELECT count(*) FROM tasks WHERE state <> 'succeeded'") == [(0,)],
            240,
            "every bar to succeed",
        )
        assert served.requests == N, "one request per task"
        for worker in workers:
            assert worker.terminate() == 0, worker.stderr()
    assert sql("SELECT DISTINCT attempts, output FROM tasks") == [(1, "200")]
    ran = [worker.stdout().count("200\n") for worker in workers]
    assert sum(ran) == N, f"each printed once: {ran}"
    assert all(0.4 * N <= n <= 0.6 * N for n in ran), f"the workers ran {ran} of {N}"
