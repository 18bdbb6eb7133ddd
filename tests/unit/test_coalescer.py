"""db.Coalescer: concurrent calls share a statement once `max_inflight` run, and each call
gets its own answer (or the statement's error)."""

import asyncio

import pytest

from functions.db import Coalescer
from functions.errors import DatabaseUnavailable


class Statements:
    """A fake statement: answers each item doubled, after `gate` opens; records batches."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.waits: list[float | None] = []
        # The loop's time at each call.
        self.called_at: list[float] = []
        self.gate = asyncio.Event()
        self.fail = False

    async def run(self, items: list[int], wait_s: float | None) -> list[int]:
        self.batches.append(items)
        self.waits.append(wait_s)
        self.called_at.append(asyncio.get_running_loop().time())
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("refused")
        return [2 * item for item in items]


async def test_a_call_alone_runs_at_once_and_later_ones_share_the_next_statement() -> None:
    statements = Statements()
    coalesce = Coalescer(statements.run, max_inflight=1, max_size=100, max_wait_s=5)
    calls = [asyncio.create_task(coalesce(i)) for i in range(10)]
    await asyncio.sleep(0.01)
    assert statements.batches == [[0]]  # the others wait for a place
    statements.gate.set()
    assert await asyncio.gather(*calls) == [2 * i for i in range(10)]
    assert statements.batches == [[0], list(range(1, 10))]


async def test_a_statement_takes_at_most_max_size_calls() -> None:
    statements = Statements()
    coalesce = Coalescer(statements.run, max_inflight=2, max_size=3, max_wait_s=5)
    calls = [asyncio.create_task(coalesce(i)) for i in range(10)]
    await asyncio.sleep(0.01)
    statements.gate.set()
    assert await asyncio.gather(*calls) == [2 * i for i in range(10)]
    assert sorted(len(b) for b in statements.batches) == [1, 1, 2, 3, 3]
    assert sorted(i for b in statements.batches for i in b) == list(range(10))


async def test_each_call_of_a_failed_statement_gets_its_error() -> None:
    statements = Statements()
    statements.fail = True
    coalesce = Coalescer(statements.run, max_inflight=1, max_size=100, max_wait_s=5)
    calls = [asyncio.create_task(coalesce(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    statements.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    # The coalescer is not left holding a place: the next call runs.
    statements.fail = False
    assert await coalesce(7) == 14


async def test_a_caller_that_gives_up_leaves_the_others_their_answers() -> None:
    statements = Statements()
    coalesce = Coalescer(statements.run, max_inflight=1, max_size=100, max_wait_s=5)
    first = asyncio.create_task(coalesce(0))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(coalesce(i)) for i in range(1, 4)]
    await asyncio.sleep(0.01)
    waiting[0].cancel()
    statements.gate.set()
    assert await first == 0
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    assert [await w for w in waiting[1:]] == [4, 6]


def test_a_new_event_loop_starts_afresh() -> None:
    """A Lambda container runs each invocation on a loop that may be new: nothing the old
    loop held (here, a place taken by a call that loop never finished) carries over."""
    statements = Statements()
    coalesce = Coalescer(statements.run, max_inflight=1, max_size=100, max_wait_s=5)
    old = asyncio.new_event_loop()
    held = old.create_task(coalesce(1))  # takes the only place, and waits on the gate
    old.run_until_complete(asyncio.sleep(0.01))
    old.close()  # frozen and gone, as a container's loop can be

    async def again() -> int:
        statements.gate = asyncio.Event()
        statements.gate.set()
        return await asyncio.wait_for(coalesce(5), 1)

    assert asyncio.run(again()) == 10
    assert not held.done()


async def test_a_call_waits_no_longer_than_for_a_pooled_connection() -> None:
    """A frozen database holds the statements in flight: the calls behind them give up
    after `max_wait_s` (a 503), as they would waiting for a connection, and are not sent."""
    statements = Statements()
    coalesce = Coalescer(statements.run, max_inflight=1, max_size=100, max_wait_s=0.2)
    first = asyncio.create_task(coalesce(0))
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    with pytest.raises(DatabaseUnavailable, match=r"within 0\.2s"):
        await coalesce(1)
    # Well below a hang; the upper bound has room for a busy machine.
    assert 0.19 < asyncio.get_running_loop().time() - started < 5
    statements.gate.set()
    assert await first == 0
    assert statements.batches == [[0]]


async def test_a_statement_gets_what_is_left_of_its_oldest_calls_wait() -> None:
    statements = Statements()
    coalesce = Coalescer(statements.run, max_inflight=1, max_size=100, max_wait_s=5.0)
    first = asyncio.create_task(coalesce(0))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    before = loop.time()
    waiting = [asyncio.create_task(coalesce(i)) for i in (1, 2)]
    await asyncio.sleep(0)  # both are waiting now
    after = loop.time()
    await asyncio.sleep(0.3)
    opened = loop.time()
    statements.gate.set()
    assert [await t for t in (first, *waiting)] == [0, 2, 4]
    assert statements.waits[0] is None  # alone: the usual bound
    wait_s = statements.waits[1]
    # 5 s from when the oldest call began waiting (between `before` and `after`), less the
    # time to its statement (sent once the gate opened, by `called_at`): measured bounds,
    # not a guess at how long the sleep took on a busy machine.
    assert wait_s is not None
    assert before + 5.0 - statements.called_at[1] <= wait_s <= after + 5.0 - opened
