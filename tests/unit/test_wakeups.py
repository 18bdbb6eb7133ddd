"""A worker hears of every task created while it is awake: none waits for the next poll."""

import asyncio
from typing import Any

from functions.runner import Runner
from functions.settings import Settings


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
