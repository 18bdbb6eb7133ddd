"""A worker sleeps until the next task is due as the database's clock counts it: from the
moment its claim began, not from when the claim's answer came back (issue 25, item 2)."""

import asyncio
import dataclasses
import io
from collections.abc import Callable
from typing import Any

import pytest

from functions.runner import Runner
from functions.settings import Settings
from functions.store import Store

Sql = Callable[..., list[tuple[Any, ...]]]

# How long the first claim's answer is held back; the task is due a little after that.
SLOW_ANSWER_S = 2.0
DUE_IN_S = 2.5


@pytest.mark.one_server
async def test_a_slow_claim_answer_does_not_make_the_next_start_late(
    store: Store, settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    # Polling slower than the task is due: only the wait the claim computed wakes the worker.
    settings = dataclasses.replace(settings, poll_interval_s=30.0)
    task_factory("baz", due_in_s=DUE_IN_S)
    claim_due = store.claim_due
    claims = 0

    async def slow_first_answer(**kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        found = await claim_due(**kwargs)
        if claims == 1:
            assert found[0] == [], "nothing is due yet"
            await asyncio.sleep(SLOW_ANSWER_S)
        return found

    store.claim_due = slow_first_answer  # type: ignore[method-assign]
    stop = asyncio.Event()
    run = asyncio.create_task(
        Runner(store, settings, out=io.StringIO()).run(keep_polling=True, stop=stop)
    )
    try:
        for _ in range(600):
            await asyncio.sleep(0.05)
            if sql("SELECT state FROM tasks") == [("succeeded",)]:
                break
    finally:
        stop.set()
        await asyncio.wait_for(run, timeout=30)
    [(late_s,)] = sql("SELECT extract(epoch FROM started_at - execute_at) FROM tasks")
    # Counted from the answer, the worker would sleep the whole wait after it: at least
    # SLOW_ANSWER_S late. (The bound leaves a loaded host seconds to spare.)
    assert 0 <= late_s < SLOW_ANSWER_S - 0.5, late_s
