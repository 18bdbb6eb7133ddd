"""What wakes a worker's claim loop: a write of results wakes it only when it waits for
room (no empty claim after each write), and always when it made a task due again (a retry,
at a time the loop has not seen)."""

import asyncio
import dataclasses
import io
import time
from collections.abc import Callable
from typing import Any

import pytest

from functions.runner import Runner
from functions.settings import Settings
from functions.store import Store

Sql = Callable[..., list[tuple[Any, ...]]]


async def _drain(runner: Runner, until: Callable[[], bool], seconds: float) -> None:
    """Run `runner` as a worker until `until()`, `seconds` at most."""
    stop = asyncio.Event()
    run = asyncio.create_task(runner.run(keep_polling=True, stop=stop))
    try:
        deadline = time.monotonic() + seconds
        while not until():
            assert time.monotonic() < deadline, "not done in time"
            assert not run.done(), run
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await run


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
