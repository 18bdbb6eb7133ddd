"""Bursts on a fresh table: tens of thousands of tasks due at once, real worker processes.

Nothing is prepared by hand: the table is new and never analyzed (as a user's is when the
tasks arrive), the tasks are loaded in one statement, and the workers find them on their own.
"""

import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.procs import Proc, spawn, wait_for

__all__ = ["spawn"]  # the fixture

Sql = Callable[..., list[tuple[Any, ...]]]
pytestmark = pytest.mark.slow

BAZ, FOO = 50_000, 10_000


def states(sql: Sql) -> dict[str, int]:
    return dict(sql("SELECT state, count(*) FROM tasks GROUP BY state"))


def load_burst(sql: Sql, due_in_s: float) -> None:
    """50,000 baz and 10,000 foo, all due at the same moment, in one INSERT."""
    sql(
        "INSERT INTO tasks (kind, execute_at, max_attempts)"
        " SELECT CASE WHEN n <= %s THEN 'baz' ELSE 'foo' END,"
        "        now() + make_interval(secs => %s), 3"
        " FROM generate_series(1, %s) AS n",
        BAZ,
        due_in_s,
        BAZ + FOO,
    )


def check_each_ran_once(sql: Sql, workers: list[Proc]) -> None:
    out = "".join(w.stdout() for w in workers)
    baz_lines = re.findall(r"^Baz (\d+)$", out, re.M)
    foo_lines = Counter(int(i) for i in re.findall(r"^Foo (\d+)$", out, re.M))
    foo_ids = {i for (i,) in sql("SELECT id FROM tasks WHERE kind = 'foo'")}
    assert len(baz_lines) == BAZ, "each baz printed exactly once"
    assert all(0 <= int(n) <= 343 for n in baz_lines)
    assert set(foo_lines) == foo_ids and max(foo_lines.values()) == 1, "each foo printed once"
    assert sql("SELECT state, attempts, count(*) FROM tasks GROUP BY 1, 2") == [
        ("succeeded", 1, BAZ + FOO)
    ]
    [(early,)] = sql("SELECT count(*) FROM tasks WHERE started_at < execute_at")
    assert early == 0
    logs = "".join(w.stderr() for w in workers)
    assert "action=rescue" not in logs, "no live worker's tasks were rescued"
    assert "no longer held" not in logs
    assert "Traceback" not in logs


@pytest.mark.parametrize("lease_s", ["60", "5"])
def test_a_burst_runs_every_task_exactly_once(
    spawn: Callable[..., Proc], database_url: str, sql: Sql, lease_s: str
) -> None:
    env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_LEASE_SECONDS": lease_s}
    workers = [spawn("worker", env=env) for _ in range(2)]
    wait_for(lambda: sql("SELECT count(*) FROM workers")[0][0] == 2, 60, "workers to start")
    load_burst(sql, due_in_s=2.0)

    started = time.monotonic()
    wait_for(lambda: states(sql) == {"succeeded": BAZ + FOO}, 180, "every task to succeed")
    elapsed_s = time.monotonic() - started
    for worker in workers:
        assert worker.terminate() == 0, worker.stderr()
    check_each_ran_once(sql, workers)
    print(f"burst of {BAZ + FOO:,} with lease {lease_s} s: done {elapsed_s:.1f} s after loading")


def test_slow_writes_run_nothing_twice_and_stop_the_claiming(
    spawn: Callable[..., Proc], database_url: str, sql: Sql
) -> None:
    """Another session locks the rows of running tasks for longer than a lease: their
    results cannot be written until it lets go. Nothing is rescued, nothing runs twice, and
    the worker claims nothing new while its results wait."""
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_LEASE_SECONDS": "3",
        "TASKRUNNER_FOO_DELAY_S": "1",
        "TASKRUNNER_DB_STATEMENT_TIMEOUT_S": "2",
    }
    first = [
        i
        for (i,) in sql(
            "INSERT INTO tasks (kind, execute_at, max_attempts)"
            " SELECT 'foo', now(), 3 FROM generate_series(1, 200) RETURNING id"
        )
    ]
    worker = spawn("worker", env=env)
    wait_for(lambda: states(sql) == {"running": 200}, 30, "the worker to claim them")
    with psycopg.connect(database_url, autocommit=True) as locker:
        locker.execute("BEGIN")
        locker.execute("SELECT id FROM tasks WHERE id = ANY(%s) FOR UPDATE", [first])
        # The foo tasks finish (each within a second of its claim, before the lock) and their
        # results wait on the lock; the worker stops claiming once they have waited a second
        # (completer.SLOW_WRITE_S). Then as long again and more, for a loaded host: tasks due
        # before that are claimed, as they should be (CI once inserted them too early).
        time.sleep(4.0)
        later = [
            i
            for (i,) in sql(
                "INSERT INTO tasks (kind, execute_at, max_attempts)"
                " SELECT 'baz', now(), 3 FROM generate_series(1, 100) RETURNING id"
            )
        ]
        time.sleep(8)  # well past the 3 s lease and several statement timeouts
        assert sql(
            "SELECT count(*) FROM tasks WHERE id = ANY(%s) AND state = 'scheduled'", later
        ) == [(100,)], "nothing new was claimed while results waited"
        assert sql("SELECT count(*) FROM workers") == [(1,)], "the worker is alive"
        locker.execute("COMMIT")
    wait_for(lambda: states(sql) == {"succeeded": 300}, 30, "everything to finish")
    assert worker.terminate() == 0, worker.stderr()
    printed = Counter(int(i) for i in re.findall(r"^Foo (\d+)$", worker.stdout(), re.M))
    assert set(printed) == set(first) and max(printed.values()) == 1
    assert sql("SELECT DISTINCT attempts FROM tasks") == [(1,)]
    assert "action=rescue" not in worker.stderr()
    assert "no longer held" not in worker.stderr()
