"""The claim, leases, fencing and rescue, against a real database.

"Time passing" is the database's clock moved by hand: a lease is expired by setting
`lease_expires_at` in the past, never by sleeping.
"""

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from functions.db import make_engine
from functions.kinds import KINDS
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Result, Store
from functions.tasks import TaskState

Sql = Callable[..., list[tuple[Any, ...]]]
ALL = list(KINDS)


@pytest.fixture
async def engines(settings: Settings) -> AsyncIterator[list[AsyncEngine]]:
    """Four engines: four workers' worth of separate connections."""
    made = [make_engine(settings) for _ in range(4)]
    yield made
    for engine in made:
        await engine.dispose()


def expire_leases(sql: Sql) -> None:
    sql("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE state = 'running'")


async def test_racing_claims_never_share_a_row(engines: list[AsyncEngine], sql: Sql) -> None:
    stores = [Store(engine) for engine in engines]
    for round_ in range(25):
        sql(
            "INSERT INTO tasks (kind, execute_at, max_attempts)"
            " SELECT 'baz', now() - interval '1 second', 3 FROM generate_series(1, 150)"
        )
        claims = await asyncio.gather(
            *(
                store.claim_due(worker=f"w{i}", kinds=ALL, limit=50, lease_s=60)
                for i, store in enumerate(stores)
            )
        )
        ids = [c.id for claim in claims for c in claim]
        assert len(ids) == len(set(ids)), f"round {round_}: a row was claimed twice"
        assert len(ids) == 150, f"round {round_}: every due row is claimed once"
        for i, claim in enumerate(claims):
            owners = sql(
                "SELECT DISTINCT claimed_by FROM tasks WHERE id = ANY(%s)", [c.id for c in claim]
            )
            assert owners in ([], [(f"w{i}",)])
        sql("DELETE FROM tasks")


async def test_claim_takes_only_due_tasks_oldest_first(
    engines: list[AsyncEngine], task_factory: Callable[..., int]
) -> None:
    store = Store(engines[0])
    late = task_factory("baz", due_in_s=-1)
    early = task_factory("baz", due_in_s=-10)
    task_factory("baz", due_in_s=30)
    first = await store.claim_due(worker="w", kinds=ALL, limit=1, lease_s=60)
    rest = await store.claim_due(worker="w", kinds=ALL, limit=10, lease_s=60)
    assert [c.id for c in first] == [early]
    assert [c.id for c in rest] == [late]
    assert [c.attempt for c in first + rest] == [1, 1]


async def test_claim_respects_the_kinds_asked_for(
    engines: list[AsyncEngine], task_factory: Callable[..., int]
) -> None:
    store = Store(engines[0])
    task_factory("foo")
    baz = task_factory("baz")
    claimed = await store.claim_due(worker="w", kinds=["baz"], limit=10, lease_s=60)
    assert [c.id for c in claimed] == [baz]


async def test_finish_is_fenced_against_a_worker_that_lost_its_lease(
    engines: list[AsyncEngine], task_factory: Callable[..., int], sql: Sql
) -> None:
    a, b = Store(engines[0]), Store(engines[1])
    task = task_factory("baz")
    [first] = await a.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60)

    expire_leases(sql)  # A stalled past its lease
    assert await b.rescue_expired() == [(task, TaskState.SCHEDULED)]
    [second] = await b.claim_due(worker="B", kinds=ALL, limit=1, lease_s=60)
    assert second.attempt == 2

    assert await a.extend_leases(worker="A", ids=[task], lease_s=60) == set()
    late = Result(task, first.attempt, TaskState.SUCCEEDED, output="from A")
    assert await a.finish_many(worker="A", results=[late]) == set(), "A's result is dropped"
    assert sql("SELECT state, claimed_by FROM tasks") == [("running", "B")]

    done = Result(task, second.attempt, TaskState.SUCCEEDED, output="from B")
    assert await b.finish_many(worker="B", results=[done]) == {task}
    assert sql("SELECT state, output, attempts FROM tasks") == [("succeeded", "from B", 2)]


async def test_finish_is_fenced_by_attempt_too(
    engines: list[AsyncEngine], task_factory: Callable[..., int], sql: Sql
) -> None:
    """The same worker re-claiming a rescued task cannot record the old attempt's result."""
    store = Store(engines[0])
    task = task_factory("baz")
    await store.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60)
    expire_leases(sql)
    await store.rescue_expired()
    await store.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60)
    stale = Result(task, 1, TaskState.SUCCEEDED, output="attempt 1")
    assert await store.finish_many(worker="A", results=[stale]) == set()
    assert sql("SELECT state, attempts FROM tasks") == [("running", 2)]


async def test_rescue_only_touches_expired_leases(
    engines: list[AsyncEngine], task_factory: Callable[..., int], sql: Sql
) -> None:
    store = Store(engines[0])
    task_factory("baz")
    await store.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60)
    assert await store.rescue_expired() == []
    assert sql("SELECT state FROM tasks") == [("running",)]


async def test_crashes_use_up_attempts_then_the_task_fails(
    engines: list[AsyncEngine], task_factory: Callable[..., int], sql: Sql
) -> None:
    store = Store(engines[0])
    task = task_factory("baz", max_attempts=2)
    for attempt in (1, 2):
        [claimed] = await store.claim_due(worker=f"dead{attempt}", kinds=ALL, limit=1, lease_s=60)
        assert claimed.attempt == attempt
        expire_leases(sql)
        [(rescued, state)] = await store.rescue_expired()
    assert (rescued, state) == (task, TaskState.FAILED)
    [(state, attempts, error, finished)] = sql(
        "SELECT state, attempts, error, finished_at IS NOT NULL FROM tasks"
    )
    assert (state, attempts, finished) == ("failed", 2, True)
    assert "lease expired" in error and "attempt 2 of 2" in error
    assert await store.claim_due(worker="w", kinds=ALL, limit=1, lease_s=60) == []


async def test_release_hands_tasks_back_without_using_an_attempt(
    engines: list[AsyncEngine], task_factory: Callable[..., int], sql: Sql
) -> None:
    store = Store(engines[0])
    task = task_factory("foo")
    await store.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60)
    assert await store.release(worker="B", ids=[task]) == set(), "only the holder releases"
    assert await store.release(worker="A", ids=[task]) == {task}
    assert sql("SELECT state, attempts, claimed_by FROM tasks") == [("scheduled", 0, None)]


async def test_runner_extends_leases_of_long_tasks(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    """A task longer than the lease is not rescued from under a live worker."""
    settings = settings.model_copy(update={"lease_seconds": 0.6, "foo_delay_s": 2.0})
    task = task_factory("foo")
    engine = make_engine(settings)
    other = make_engine(settings)
    try:
        runner = Runner(Store(engine), settings, out=io.StringIO())
        run = asyncio.create_task(runner.run())
        rescued = []
        for _ in range(15):  # a rival rescuing throughout the run
            await asyncio.sleep(0.1)
            rescued += await Store(other).rescue_expired()
        summary = await run
    finally:
        await engine.dispose()
        await other.dispose()
    assert rescued == []
    assert (summary.succeeded, summary.lost) == (1, 0)
    assert sql("SELECT state, attempts FROM tasks") == [("succeeded", 1)]
    assert task


async def test_runner_rescues_before_claiming(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    task = task_factory("baz")
    sql(
        "UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'dead',"
        " lease_expires_at = now() - interval '1 second' WHERE id = %s",
        task,
    )
    engine = make_engine(settings)
    try:
        summary = await Runner(Store(engine), settings, out=io.StringIO()).run()
    finally:
        await engine.dispose()
    assert (summary.rescued, summary.succeeded) == (1, 1)
    assert sql("SELECT state, attempts FROM tasks") == [("succeeded", 2)]


async def test_stop_hands_back_unfinished_tasks_at_once(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    settings = settings.model_copy(update={"foo_delay_s": 30.0, "shutdown_grace_s": 0.2})
    task_factory("foo")
    task_factory("baz")
    engine = make_engine(settings)
    out = io.StringIO()
    try:
        stop = asyncio.Event()
        run = asyncio.create_task(
            Runner(Store(engine), settings, out=out).run(keep_polling=True, stop=stop)
        )
        await asyncio.sleep(0.5)
        stop.set()
        summary = await asyncio.wait_for(run, timeout=5)
    finally:
        await engine.dispose()
    assert (summary.succeeded, summary.released) == (1, 1)
    assert sql("SELECT kind, state, attempts, claimed_by FROM tasks ORDER BY id") == [
        ("foo", "scheduled", 0, None),
        ("baz", "succeeded", 1, None),
    ]
    assert out.getvalue().startswith("Baz ")
