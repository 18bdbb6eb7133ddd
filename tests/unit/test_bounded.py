"""`db.bounded`, the bound on a statement's wait, and the cancels it shares a task with."""

import asyncio
import time
from contextlib import suppress
from typing import Any

import psycopg

from functions.db import StatementTimeout, bounded


class Closed:
    """libpq's side of a connection closed at the bound: no socket to watch."""

    @property
    def socket(self) -> int:
        raise psycopg.OperationalError("the connection is closed")

    def finish(self) -> None:
        pass


class Frozen:
    """A connection whose server never answers."""

    pgconn = Closed()


async def test_a_cancel_from_outside_as_the_bound_runs_out_is_not_swallowed() -> None:
    """A shutdown cancels a loop that waits on a frozen server just as the wait's bound
    runs out (one step of the event loop runs both): the loop ends. Before, the bound took
    the shutdown's cancel for its own, the loop went on, and the worker never stopped."""
    loop = asyncio.get_running_loop()

    async def frozen() -> None:
        await asyncio.sleep(10)

    async def goes_on() -> None:  # the shape of upkeep's loops
        while True:
            with suppress(StatementTimeout):
                await bounded(Frozen(), frozen(), 0.2)  # type: ignore[arg-type]
            await asyncio.sleep(0.05)

    task = asyncio.create_task(goes_on())
    await asyncio.sleep(0)  # it waits, its bound set
    loop.call_later(0.2, task.cancel)  # the shutdown's cancel, due with the bound
    loop.call_later(0.1, time.sleep, 0.3)  # the loop busy meanwhile: both due at once
    done, _ = await asyncio.wait([task], timeout=2)
    if not done:
        task.cancel()
    assert done and task.cancelled()


async def test_the_bound_alone_is_a_statement_timeout_and_the_caller_goes_on() -> None:
    caught: list[Any] = []
    try:
        await bounded(Frozen(), asyncio.sleep(10), 0.05)  # type: ignore[arg-type]
    except StatementTimeout as exc:
        caught.append(exc)
    await asyncio.sleep(0)  # not cancelled: the task goes on
    assert len(caught) == 1
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
