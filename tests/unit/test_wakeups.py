"""A worker hears of every task created while it is awake: none waits for the next poll;
and a cancel wakes its claim loop only when that can claim something new."""

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from functions.runner import Runner
from functions.settings import Settings
from functions.store import Claimed


def _runner() -> Runner:
    store: Any = object()  # notify() and the wakeup never touch the store
    return Runner(store, Settings(database_url="postgresql://localhost/none"))


async def test_a_task_created_during_a_claim_wakes_the_next_look() -> None:
    runner = _runner()
    # The last sleep was meant to end at 100 (database time); it is later than that now,
    # and a claim is in flight (not asleep) when a task due at 105 is created.
    runner.wakeup.sleep_until = 100.0
    runner.notify(105.0)
    assert runner.wakeup.is_set()


async def test_while_asleep_only_a_task_due_sooner_wakes_it() -> None:
    runner = _runner()
    runner.wakeup.sleep_until = 100.0
    stop = asyncio.Event()
    sleeping = asyncio.create_task(runner.wakeup.sleep(5.0, stop))
    await asyncio.sleep(0.01)
    runner.notify(150.0)  # due after it wakes anyway: no news
    await asyncio.sleep(0.01)
    assert not sleeping.done()
    runner.notify(99.0)
    await asyncio.wait_for(sleeping, 1.0)


def _holding(count: int, concurrency: int) -> Runner:
    store: Any = SimpleNamespace(WRITE_BATCH=1_000)  # what the room to claim reads of it
    runner = Runner(
        store, Settings(database_url="postgresql://localhost/none", concurrency=concurrency)
    )
    for task_id in range(1, count + 1):
        claimed = Claimed(task_id, "foo", 1, 3)
        runner.state.held[task_id] = claimed
        runner.slots.queued["foo"].append(claimed)
    return runner


@pytest.mark.parametrize(
    ("held", "concurrency", "stopped", "wakes"),
    [
        (3, 10, {1}, False),  # it had room, and claimed what was due then: nothing new
        (9, 10, {1, 2}, False),
        (10, 10, {1}, True),  # it was full: room again
        (10, 10, set(range(1, 11)), True),
        (1, 10, {1}, True),  # nothing held any more: a tick waiting for its own returns
    ],
)
async def test_a_cancel_wakes_the_claim_loop_only_when_it_frees_room_it_lacked(
    held: int, concurrency: int, stopped: set[int], wakes: bool
) -> None:
    runner = _holding(held, concurrency)
    runner._stop(stopped)
    assert runner.wakeup.is_set() is wakes
    assert sorted(runner.state.held) == sorted(set(range(1, held + 1)) - stopped)
    assert runner.state.summary.cancelled == len(stopped)


async def test_tasks_no_longer_held_but_not_cancelled_are_lost_not_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A worker woken past its lease finds 2 of its tasks rescued (on another attempt) and 1
    # cancelled: its summary and log say so, not that 3 were cancelled.
    caplog.set_level(logging.INFO, "functions.runner")
    runner = _holding(5, 10)
    runner._stop({1}, {2, 3})
    assert sorted(runner.state.held) == [4, 5]
    summary = runner.state.summary
    assert (summary.cancelled, summary.lost) == (1, 2)
    logged = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("action=cancel") and "count=1:" in m for m in logged), logged
    assert any(m.startswith("action=lost") and "count=2:" in m for m in logged), logged
