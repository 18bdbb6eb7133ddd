"""A task's own options at work: its timeout stops its run, its max_attempts bounds its
runs, its priority orders the claim, and a tick near its deadline takes a task whose own
timeout fits where its kind's does not. (What the API reads and answers of them:
tests/integration/test_hotpath.py, on both paths.)"""

import asyncio
import dataclasses
import io
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from functions import kinds
from functions.kinds import Context, Kind
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Store

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def extra_kinds(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Kind], None]]:
    """Add kinds for one test (the real ones stay); the API of the test takes them too."""

    def add(kind: Kind) -> None:
        monkeypatch.setitem(kinds.KINDS, kind.name, kind)

    yield add


async def create(client: httpx.AsyncClient, *tasks: dict[str, Any]) -> list[int]:
    response = await client.post("/tasks/batch", json={"tasks": list(tasks)})
    assert response.status_code == 201, response.text
    ids: list[int] = response.json()["ids"]
    return ids


async def test_a_tasks_own_timeout_stops_a_run_of_a_coroutine_kind(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
) -> None:
    async def naps(ctx: Context) -> str:
        await asyncio.sleep(3600)
        return "woke"

    async def quick(ctx: Context) -> str:
        return "quick"

    extra_kinds(Kind("naps", naps, lambda s: 30.0, limit_s=lambda s: 30.0))
    extra_kinds(Kind("quick", quick, lambda s: 30.0, limit_s=lambda s: 30.0))
    [stopped, done] = await create(
        client,
        {"type": "naps", "execute_at": 0, "timeout_s": 0.2, "max_attempts": 1},
        {"type": "quick", "execute_at": 0, "timeout_s": 0.2},
    )

    summary = await Runner(store, settings, out=io.StringIO()).run()

    assert (summary.succeeded, summary.failed) == (1, 1)
    rows = {i: r for i, *r in sql("SELECT id, state, attempts, error FROM tasks")}
    assert rows[stopped] == ["failed", 1, "TimeoutError: ran longer than its timeout_s of 0.2 s"]
    assert rows[done][:2] == ["succeeded", 1]
    # Stopped long before the kind's own 30 s (a loose bound: it is 0.2 s).
    [(ran_for,)] = sql("SELECT finished_at - started_at FROM tasks WHERE id = %s", stopped)
    assert ran_for < timedelta(seconds=15)


async def test_a_tasks_own_max_attempts_bounds_its_runs_and_a_retry_adds_the_setting(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
) -> None:
    def fails(ctx: Context) -> str:
        raise RuntimeError(f"attempt {ctx.attempt}")

    extra_kinds(Kind("fails", fails, lambda s: 1.0))
    budgets = [1, 2, 5, None]  # None: TASKRUNNER_MAX_ATTEMPTS (3)
    ids = await create(
        client,
        *(
            {"type": "fails", "execute_at": 0}
            | ({} if budget is None else {"max_attempts": budget})
            for budget in budgets
        ),
    )
    runner = Runner(store, settings, out=io.StringIO())
    for _ in range(100):  # a run drains what is due; retries come due a moment later
        await runner.run()
        if sql("SELECT count(*) FROM tasks WHERE state <> 'failed'") == [(0,)]:
            break
        await asyncio.sleep(0.05)
    rows = sql("SELECT attempts, max_attempts, error FROM tasks ORDER BY id")
    assert [(a, m) for a, m, _ in rows] == [(1, 1), (2, 2), (5, 5), (3, 3)]
    assert [e for *_, e in rows] == [f"RuntimeError: attempt {n}" for n in (1, 2, 5, 3)]

    retried = await client.post(f"/tasks/{ids[0]}/retry")
    assert retried.status_code == 200
    assert (retried.json()["attempts"], retried.json()["max_attempts"]) == (1, 1 + 3)


async def test_among_tasks_due_at_once_the_lower_priority_starts_first(
    store: Store, settings: Settings, sql: Sql, client: httpx.AsyncClient
) -> None:
    """1,000 tasks of priority 9, then 1,000 of priority 0 (later ids), all due at the same
    time; one worker with room for 10 at once. No task of priority 9 may start before a
    task of priority 0 (the claim that takes the last of them may take both: one instant)."""
    at = time.time() - 60
    await create(client, *[{"type": "baz", "execute_at": at, "priority": 9}] * 1000)
    await create(client, *[{"type": "baz", "execute_at": at, "priority": 0}] * 1000)

    runner = Runner(store, dataclasses.replace(settings, concurrency=10), out=io.StringIO())
    summary = await runner.run()

    assert summary.succeeded == 2000
    [(last_of_0, first_of_9, early_9s)] = sql(
        """
        SELECT max(started_at) FILTER (WHERE priority = 0),
               min(started_at) FILTER (WHERE priority = 9),
               count(*) FILTER (WHERE priority = 9 AND started_at < (
                   SELECT max(started_at) FROM tasks WHERE priority = 0))
        FROM tasks
        """
    )
    assert last_of_0 <= first_of_9 and early_9s == 0
    # Claims of 10 at most: the start times tell 200 claims apart, not one.
    assert sql("SELECT count(DISTINCT started_at) FROM tasks") >= [(190,)]


async def test_a_tick_near_its_deadline_takes_a_task_whose_own_timeout_fits(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
) -> None:
    """A kind declared to take up to 10 minutes cannot start 5 s before a tick's deadline;
    a task of that kind whose own timeout_s is 1 s can. A built-in without one is taken as
    before."""

    async def slow(ctx: Context) -> str:
        return f"slow {ctx.task_id}"

    extra_kinds(Kind("slow", slow, lambda s: 600.0, limit_s=lambda s: 600.0))
    [unfit, fits, baz] = await create(
        client,
        {"type": "slow", "execute_at": 0},
        {"type": "slow", "execute_at": 0, "timeout_s": 1},
        {"type": "baz", "execute_at": 0},
    )
    settings = dataclasses.replace(settings, deadline_margin_s=1.0)

    summary = await Runner(store, settings, out=io.StringIO()).run(deadline=time.monotonic() + 5)

    states: dict[int, str] = dict(sql("SELECT id, state FROM tasks"))
    assert states == {unfit: "scheduled", fits: "succeeded", baz: "succeeded"}
    assert summary.left_for_time == {"slow": 1}
