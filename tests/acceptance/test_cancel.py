"""Cancelling running tasks with real workers: many at once, racing the claim, in bulk by
filter, after a worker was killed, behind a transaction pooler."""

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from functions.queries import CHANNEL
from tests.pgbouncer import pgbouncer_url
from tests.procs import Proc, spawn, wait_for

__all__ = ["pgbouncer_url", "spawn"]  # the fixtures

Sql = Callable[..., list[tuple[Any, ...]]]
pytestmark = pytest.mark.slow
FUTURE = "2030-01-01T12:00:00Z"


def foo_lines(*procs: Proc) -> Counter[int]:
    """How many times each `Foo {id}` line was printed, across the processes' stdout."""
    return Counter(
        int(m.group(1)) for p in procs for m in re.finditer(r"^Foo (\d+)$", p.stdout(), re.M)
    )


def stopped_by(*workers: Proc) -> int:
    """How many held tasks the workers say they stopped because they were cancelled."""
    return sum(
        int(m.group(1))
        for w in workers
        for m in re.finditer(r"action=cancel worker=\S+ count=(\d+)", w.stderr())
    )


def insert_foo(sql: Sql, n: int, due: str = "now()", kind: str = "foo") -> list[int]:
    """Insert `n` tasks and wake the workers, as every way the product creates tasks does (a
    worker that polls once a minute would otherwise find them only at its next poll)."""
    rows = sql(
        f"INSERT INTO tasks (kind, execute_at) SELECT %s, {due} FROM generate_series(1, %s)"
        " RETURNING id",
        kind,
        n,
    )
    sql("SELECT pg_notify(%s, CAST(extract(epoch FROM now()) AS text))", CHANNEL)
    return sorted(task_id for (task_id,) in rows)


async def post_all(url: str, paths: list[str], clients: int = 32) -> list[httpx.Response]:
    """POST each of `paths`, `clients` at a time. A 503 (the database did not answer in
    time: a loaded CI machine) or a lost connection is sent again, as a client should (each
    of these requests may be repeated); that must stay rare."""
    limit = asyncio.Semaphore(clients)
    retried: list[str] = []
    # Idle connections dropped before the server's keep-alive timeout closes them (as
    # test_scale's clients do).
    limits = httpx.Limits(keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(path: str) -> httpx.Response:
            async with limit:
                for _ in range(3):
                    try:
                        response = await client.post(path)
                    except httpx.TransportError:
                        retried.append(path)
                        continue
                    if response.status_code != 503:
                        return response
                    retried.append(path)
                return await client.post(path)

        answers = await asyncio.gather(*(one(p) for p in paths))
    assert len(retried) <= max(1, len(paths) // 100), f"{len(retried)} requests sent again"
    return answers


def running_count(sql: Sql) -> int:
    return int(sql("SELECT count(*) FROM tasks WHERE state = 'running'")[0][0])


async def test_a_thousand_running_foo_on_two_workers_cancelled_by_32_clients(
    spawn: Callable[..., Proc], database_url: str, sql: Sql
) -> None:
    # foo sleeps a minute and workers poll once a minute: only the notification tells them.
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_FOO_DELAY_S": "60",
        "TASKRUNNER_POLL_INTERVAL_S": "60",
        "TASKRUNNER_CONCURRENCY": "500",
    }
    api = spawn("api", env=env, http=True)
    workers = [spawn("worker", env=env, name=f"worker{i}") for i in range(2)]
    api.wait_healthy()
    ids = insert_foo(sql, 1000)
    wait_for(lambda: running_count(sql) == 1000, 60, "both workers to run 500 foo each")
    assert sql("SELECT count(DISTINCT claimed_by) FROM tasks") == [(2,)]

    answers = await post_all(api.url, [f"/tasks/{i}/cancel" for i in ids])
    assert [r.text for r in answers if r.status_code != 200] == [], api.stderr()[-3000:]
    assert {r.json()["state"] for r in answers} == {"cancelled"}
    assert sql("SELECT state, count(*), count(claimed_by) FROM tasks GROUP BY 1") == [
        ("cancelled", 1000, 0)
    ]
    # Each worker stopped its 500 (well before foo's minute or the next poll).
    wait_for(lambda: stopped_by(*workers) == 1000, 30, "the workers to stop every task")
    for proc in [*workers, api]:
        assert proc.terminate() == 0, proc.stderr()
    assert foo_lines(*workers) == Counter()
    assert sql("SELECT count(*) FROM workers") == [(0,)], "no lease left"


async def test_cancels_racing_the_claim_end_cancelled_without_a_line_or_succeeded_with_one(
    spawn: Callable[..., Proc], database_url: str, sql: Sql
) -> None:
    env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_FOO_DELAY_S": "0.05"}
    api = spawn("api", env=env, http=True)
    workers = [spawn("worker", env=env, name=f"worker{i}") for i in range(2)]
    api.wait_healthy()
    ids = insert_foo(sql, 1000, due="'2030-01-01'")
    # Each task made due and cancelled at once: its run now and its cancel sent together.
    paths = [p for i in ids for p in (f"/tasks/{i}/run", f"/tasks/{i}/cancel")]
    answers = dict(zip(paths, await post_all(api.url, paths), strict=True))
    wait_for(lambda: running_count(sql) == 0, 60, "nothing running")
    for proc in [*workers, api]:
        assert proc.terminate() == 0, proc.stderr()

    printed = foo_lines(*workers)
    states: dict[int, str] = dict(sql("SELECT id, state FROM tasks WHERE claimed_by IS NULL"))
    assert set(states) == set(ids), "no lease left"
    outcomes: Counter[str] = Counter()
    for i in ids:
        cancel = answers[f"/tasks/{i}/cancel"]
        if cancel.status_code == 200:
            # Answered cancelled: it stays so, and no line was printed for it (a worker prints
            # a line only while its finish holds the row, and commits once it is out: a
            # cancel waits for that, and then finds the task succeeded).
            assert (states[i], printed[i]) == ("cancelled", 0), i
            outcomes["cancelled"] += 1
        else:
            assert cancel.status_code == 409, cancel.text
            assert (states[i], printed[i]) == ("succeeded", 1), i
            outcomes["succeeded"] += 1
    print(dict(outcomes))
    assert sum(outcomes.values()) == 1000


async def test_bulk_cancel_and_retry_of_ten_thousand_by_filter_while_workers_claim(
    spawn: Callable[..., Proc], database_url: str, sql: Sql
) -> None:
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_FOO_DELAY_S": "60",
        "TASKRUNNER_SHUTDOWN_GRACE_S": "0",
    }
    # Outside the filter: foo that succeeded, bar due later. Inside: 10,001 foo due now.
    done = insert_foo(sql, 300, due="'2030-01-01'")
    sql(
        "UPDATE tasks SET state = 'succeeded', attempts = 1, finished_at = now()"
        " WHERE id = ANY(%s)",
        done,
    )
    later = insert_foo(sql, 300, due="'2030-01-01'", kind="bar")
    before = sql("SELECT tasks::text FROM tasks ORDER BY id")
    ids = insert_foo(sql, 10_001)
    api = spawn("api", env=env, http=True)
    workers = [spawn("worker", env=env, name=f"worker{i}") for i in range(2)]
    api.wait_healthy()
    wait_for(lambda: running_count(sql) > 0, 60, "the workers to claim")

    async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
        response = await client.post("/tasks/cancel", params={"type": "foo", "limit": 10_000})
        assert response.json() == {"count": 10_000}
        assert sql("SELECT max(id) FROM tasks WHERE state = 'cancelled'") == [(ids[-2],)]
        assert sql("SELECT state FROM tasks WHERE id = %s", ids[-1])[0][0] in (
            "scheduled",
            "running",
        )
        response = await client.post("/tasks/cancel", params={"type": "foo"})
        assert response.json() == {"count": 1}
        assert sql("SELECT count(*) FROM tasks WHERE state = 'cancelled'") == [(10_001,)]
        wait_for(lambda: running_count(sql) == 0, 60, "the workers to be told")

        # Retried by filter (state and type) while the workers claim them again.
        response = await client.post(
            "/tasks/retry", params={"type": "foo", "state": "cancelled", "limit": 10_000}
        )
        assert response.json() == {"count": 10_000}
        response = await client.post("/tasks/retry", params={"state": "cancelled"})
        assert response.json() == {"count": 1}
        assert (await client.post("/tasks/retry", params={"state": "cancelled"})).json() == {
            "count": 0
        }
    wait_for(lambda: running_count(sql) > 0, 60, "the workers to claim the retried tasks")
    assert sql("SELECT count(*) FROM tasks WHERE id >= %s AND state = 'cancelled'", ids[0]) == [
        (0,)
    ]
    assert sql("SELECT tasks::text FROM tasks WHERE id < %s ORDER BY id", ids[0]) == before, (
        "nothing outside the filter touched"
    )
    assert len(done) + len(later) == len(before)
    for proc in [*workers, api]:
        assert proc.terminate() == 0, proc.stderr()
    assert foo_lines(*workers) == Counter()


async def test_cancel_of_a_killed_workers_running_tasks_holds_through_the_rescue(
    spawn: Callable[..., Proc], database_url: str, sql: Sql
) -> None:
    env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_LEASE_SECONDS": "3"}
    ids = insert_foo(sql, 100)
    victim = spawn("worker", env={**env, "TASKRUNNER_FOO_DELAY_S": "60"}, name="victim")
    wait_for(lambda: running_count(sql) == 100, 30, "the victim to run every task")
    victim.kill()  # SIGKILL: its lease runs on for up to 3 s
    api = spawn("api", env=env, http=True)
    api.wait_healthy()
    answers = await post_all(api.url, [f"/tasks/{i}/cancel" for i in ids])
    assert {(r.status_code, r.json()["state"], r.json()["attempts"]) for r in answers} == {
        (200, "cancelled", 1)
    }
    survivor = spawn("worker", env={**env, "TASKRUNNER_FOO_DELAY_S": "0"}, name="survivor")
    # The survivor rescues what the dead worker held (nothing: all cancelled) and forgets it.
    wait_for(lambda: sql("SELECT count(*) FROM workers") == [(1,)], 60, "the rescue")
    for proc in (survivor, api):
        assert proc.terminate() == 0, proc.stderr()
    assert foo_lines(victim, survivor) == Counter()
    assert sql("SELECT DISTINCT state, attempts, claimed_by FROM tasks") == [("cancelled", 1, None)]


async def test_behind_a_transaction_pooler_a_worker_learns_of_a_cancel_by_polling(
    spawn: Callable[..., Proc], pgbouncer_url: str, database_url: str, sql: Sql
) -> None:
    env = {
        "TASKRUNNER_DATABASE_URL": pgbouncer_url,
        "TASKRUNNER_TRANSACTION_POOLER": "true",
        "TASKRUNNER_FOO_DELAY_S": "60",
        "TASKRUNNER_POLL_INTERVAL_S": "0.5",
    }
    ids = insert_foo(sql, 20)
    worker = spawn("worker", env=env, ready=False)
    api = spawn("api", env=env, http=True)
    api.wait_healthy()
    wait_for(lambda: running_count(sql) == 20, 60, "the worker to run every task")
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
        response = await client.post("/tasks/cancel", params={"type": "foo"})
        assert response.json() == {"count": 20}
    # Within its poll interval (0.5 s), not foo's minute; bounded generously.
    wait_for(lambda: stopped_by(worker) == 20, 30, "the worker to stop its tasks")
    for proc in (worker, api):
        assert proc.terminate() == 0, proc.stderr()
    assert foo_lines(worker) == Counter()
    assert set(dict(sql("SELECT id, state FROM tasks")).values()) == {"cancelled"}
    assert len(ids) == 20
