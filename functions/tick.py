"""The tick: rescue expired leases, then claim and run due tasks.

The cloud calls `handler` on a schedule; `taskrunner tick`, the local timer loop and the
tests call `tick` directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

from functions.conninfo import behind_pooler
from functions.db import Database
from functions.errors import TaskrunnerError
from functions.logs import handler_kinds, handler_settings
from functions.runner import Runner, TickSummary
from functions.settings import Settings
from functions.store import Store, listen
from functions.upkeep import PruneClock

logger = logging.getLogger(__name__)

# This Lambda container's: its ticks prune at most once a minute between them.
_PRUNE_CLOCK = PruneClock()
# Every process loads the same kinds at start: here, the container's init.
handler_kinds("tick")


async def tick(
    settings: Settings,
    *,
    deadline: float | None = None,
    keep_polling: bool = False,
    stop: asyncio.Event | None = None,
    hurry: asyncio.Event | None = None,
    out: TextIO | None = None,
    prune_clock: PruneClock | None = None,
    clock: Callable[[], datetime | None] | None = None,
) -> TickSummary:
    """Run due tasks until none is left (or, with `keep_polling`, until `stop` or `deadline`;
    `hurry`, set once stopping, cuts the running tasks' grace short).

    `deadline` is a `time.monotonic()` value; no task is claimed that could end after it.
    A caller that ticks again and again passes the same `prune_clock` to each tick, so the
    process prunes at most once a minute (without one, this tick prunes if retention is on).
    `clock`: a test's time for the claim and the schedules (`Store.clock`).
    Raises DatabaseUnavailable when the database cannot be reached at the start.
    """
    # Every wait on the database ends a second before the deadline (then each gets
    # db._PAST_DEADLINE_S), so the tick returns in time even when the server freezes while
    # it writes its results.
    database = Database(settings, deadline=None if deadline is None else deadline - 1.0)
    try:
        runner = Runner(Store(database, clock=clock), settings, out=out, prune_clock=prune_clock)
        listener = None
        if keep_polling and not behind_pooler(settings):
            # Wake on new tasks instead of waiting for the next poll, and hear of cancels of
            # running tasks at once (`listen` returns if its connection finds a transaction
            # pooler, where LISTEN cannot work).
            listener = asyncio.create_task(listen(settings, runner.notify, runner.heard_cancel))
        try:
            return await runner.run(
                deadline=deadline, keep_polling=keep_polling, stop=stop, hurry=hurry
            )
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
    finally:
        await database.dispose()


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point for the schedule: one tick, bounded by the invocation's time left."""
    settings = handler_settings("tick")  # and logging: the summary below is at INFO
    deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000
    try:
        summary = asyncio.run(
            tick(
                settings,
                deadline=deadline,
                keep_polling=settings.tick_mode == "poll",
                prune_clock=_PRUNE_CLOCK,
            )
        )
    except TaskrunnerError as exc:
        # Raise, so the platform records a failed invocation (and alarms can see it): the
        # database is down, its schema is not migrated, the tick could not go on.
        logger.error("action=tick: %s", exc)
        raise
    logger.info("action=tick %s", summary.as_dict())
    return summary.as_dict()
