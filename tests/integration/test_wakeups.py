"""What wakes a worker's claim loop: a write of results wakes it only when it waits for
room (no empty claim after each write), when it made a task due again (a retry, at a time the
loop has not seen), and behind a transaction pooler, where no notification reaches it. A task
handed back notifies, as a created one does."""

import asyncio
import dataclasses
import io
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from functions.runner import Runner
from functions.settings import Settings
from functions.store import Store
from functions.tick import tick

Sql = Callable[..., list[tuple[Any, ...]]]


@asynccontextmanager
async def _running(
    run: Callable[[asyncio.Event], Coroutine[Any, Any, Any]],
) -> AsyncIterator[asyncio.Task[Any]]:
    """`run(stop)` (a worker's run, or a tick that keeps polling) as a task, then stopped."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop))
    try:
        yield task
    finally:
        stop.set()
        await task


async def _until(done: Callable[[], bool], run: asyncio.Task[Any], seconds: float) -> None:
    """Until `done()`, `seconds` at most, `run` going on meanwhile."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "not done in time"
        assert not run.done(), run
        await asyncio.sleep(0.02)


async def _drain(runner: Runner, until: Callable[[], bool], seconds: float) -> None:
    """Run `runner` as a worker until `until()`, `seconds` at most."""
    async with _running(lambda stop: runner.run(keep_polling=True, stop=stop)) as run:
        await _until(until, run, seconds)


async def test_a_write_wakes_the_claim_loop_only_when_it_waits_for_room(
    settings: Settings, sql: Sql, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 tasks due 100 ms apart, one worker: about a claim a task. Each write of a result
    woke the claim loop, which claimed again and found nothing: two claims a task."""
    sql(
        "INSERT INTO tasks (kind, execute_at)"
        " SELECT 'baz', now() + interval '1 s' + n * interval '100 ms'"
        " FROM generate_series(1, 20) AS n"
    )
    claims: list[int] = []
    claim_due = Store.claim_due

    async def counted(self: Store, **kwargs: Any) -> Any:
        claimed, due = await claim_due(self, **kwargs)
        claims.append(len(claimed))
        return claimed, due

    monkeypatch.setattr(Store, "claim_due", counted)
    runner = Runner(store, dataclasses.replace(settings, poll_interval_s=5.0), out=io.StringIO())

    def done() -> bool:
        return sql("SELECT count(*) FROM tasks WHERE state = 'succeeded'") == [(20,)]

    await _drain(runner, done, 30)
    # The first claim finds nothing due; then one a task, give or take a claim that woke a
    # moment early.
    assert sum(claims) == 20 and len(claims) <= 25, claims


async def test_a_retry_written_wakes_the_claim_loop_at_its_time(
    settings: Settings, sql: Sql, store: Store
) -> None:
    """A `bar` that fails (its URL refuses connections) is retried 0.5 s later: the worker,
    which polls every 5 s, learns of the retry's time when its failure is written, and
    starts it on time."""
    settings = dataclasses.replace(
        settings, poll_interval_s=5.0, retry_base_s=0.5, bar_url="http://127.0.0.1:9/"
    )
    sql("INSERT INTO tasks (kind, execute_at, max_attempts) VALUES ('bar', now(), 2)")
    runner = Runner(store, settings, out=io.StringIO())

    def done() -> bool:
        return sql("SELECT state FROM tasks") == [("failed",)]

    await _drain(runner, done, 20)
    [(late_s,)] = sql(
        "SELECT extract(epoch FROM a2.started_at - a1.finished_at) FROM attempts a1, attempts a2"
        " WHERE a1.attempt = 1 AND a2.attempt = 2"
    )
    assert 0.5 <= float(late_s) < 2.0, late_s


async def test_behind_a_transaction_pooler_a_write_wakes_the_claim_loop(
    settings: Settings, sql: Sql, store: Store
) -> None:
    """Behind a transaction pooler a worker cannot LISTEN: it hears of no new task, and
    looks at each write of results (as it always did), not at its poll only. A `baz` made
    due while six `foo` run finishes soon after the first of them does (the worker polls
    every 5 s)."""
    settings = dataclasses.replace(
        settings, poll_interval_s=5.0, foo_delay_s=1.0, transaction_pooler=True
    )
    sql(
        "INSERT INTO tasks (kind, execute_at)"
        " SELECT 'foo', now() + n * interval '100 ms' FROM generate_series(0, 5) AS n"
    )
    runner = Runner(store, settings, out=io.StringIO())

    def foo_started() -> bool:
        return sql("SELECT count(*) FROM tasks WHERE started_at IS NOT NULL") == [(6,)]

    def all_done() -> bool:
        return sql("SELECT count(*) FROM tasks WHERE state = 'succeeded'") == [(7,)]

    async with _running(lambda stop: runner.run(keep_polling=True, stop=stop)) as run:
        await _until(foo_started, run, 10)
        # No notification reaches this worker: it looks again at its next write.
        sql("INSERT INTO tasks (kind, execute_at) VALUES ('baz', now())")
        await _until(all_done, run, 10)
    [(late_s,)] = sql(
        "SELECT extract(epoch FROM started_at - created_at) FROM tasks WHERE kind = 'baz'"
    )
    assert float(late_s) < 2.0, late_s


async def test_a_task_handed_back_wakes_a_listening_worker(
    settings: Settings, sql: Sql, store: Store
) -> None:
    """A task a worker hands back (shutting down) is due at once: the hand-back notifies, and
    another worker, asleep with nothing due (it polls every 5 s), starts it at once."""
    settings = dataclasses.replace(settings, poll_interval_s=5.0)
    [(task_id,)] = sql("INSERT INTO tasks (kind, execute_at) VALUES ('baz', now()) RETURNING id")
    await store.register_worker(worker="leaving", lease_s=60)
    claimed, _ = await store.claim_due(worker="leaving", kinds=["baz"], limit=10, lease_s=60)
    assert [c.id for c in claimed] == [task_id]
    async with _running(
        lambda stop: tick(settings, keep_polling=True, stop=stop, out=io.StringIO())
    ) as run:
        await asyncio.sleep(1.0)  # listening, and asleep
        assert await store.release(worker="leaving", ids=[task_id]) == {task_id}
        released = time.monotonic()
        await _until(lambda: sql("SELECT state FROM tasks") == [("succeeded",)], run, 10)
        assert time.monotonic() - released < 2.0
