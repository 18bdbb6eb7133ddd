"""A worker's cancel loop: a cancel it hears of before it holds the task (the claim's answer
still on its way) stops the task once the claim's answer comes, whatever else the loop did
meanwhile."""

import asyncio

from functions.run_state import RunState, TickSummary, Wakeup
from functions.settings import Settings
from functions.store import Claimed
from functions.upkeep import PruneClock, Upkeep


class NoStore:
    """The store of a worker that holds nothing the database could say more of."""

    def __init__(self) -> None:
        self.asked: list[list[Claimed]] = []

    async def no_longer_held(self, held: list[Claimed]) -> dict[int, bool]:
        self.asked.append(held)
        return {}


async def test_a_cancel_heard_before_the_claims_answer_outlives_a_poll_meanwhile() -> None:
    store = NoStore()
    settings = Settings(poll_interval_s=60.0)
    state = RunState(store, settings, "w1", Wakeup(), TickSummary("w1"))  # type: ignore[arg-type]
    upkeep = Upkeep(state, printer=None, prune_clock=PruneClock())  # type: ignore[arg-type]
    held: list[Claimed] = []
    stopped: list[set[int]] = []
    loop = asyncio.create_task(
        upkeep.cancel_loop(lambda: list(held), lambda ids, moved: stopped.append(ids | moved))
    )
    try:
        # The claim of task 7 committed; before its answer is read, the cancel's
        # notification names it, and the listener (re)connected asks for a poll.
        state.heard_cancel([(7, 1)])
        state.heard_cancel(None)
        await asyncio.sleep(0.05)
        assert stopped == []
        # The claim's answer comes: the worker holds task 7, and wakes the loop (as
        # Runner._claim does when a cancel heard names what it claimed).
        task = Claimed(id=7, kind="foo", attempt=1, max_attempts=3)
        state.held[7] = task
        held.append(task)
        state.cancel_heard.set()
        for _ in range(100):
            if stopped:
                break
            await asyncio.sleep(0.01)
        assert stopped == [{7}]
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
