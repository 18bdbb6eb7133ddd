"""A run's upkeep: its lease, the tasks of dead workers, lost claims, retention, activity.

- The heartbeat renews the worker's lease every third of it; a renewal the database refuses
  means the lease ran out (a stalled process or database): the run stops printing and
  halts, and its caller starts again as a new worker.
- With each renewal it rescues the tasks of workers whose lease ran out, hands back tasks
  the database says this worker holds that it never heard of (a claim whose answer was lost
  with its connection), and prunes finished tasks past the retention when due.
- Every SCHEDULES_EVERY_S it makes the tasks of schedules' occurrences due within a minute
  (functions/schedules.py); a tick does at its start.
- Activity counts (for /stats) are written every couple of seconds.
- At the end of a run it hands back what is still held, signs the worker off, and counts
  what a tick left for lack of time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from functions import schedules, tasks
from functions.counters import merge_activity
from functions.errors import DatabaseError, DatabaseUnavailable
from functions.kinds import KINDS
from functions.output import Printer
from functions.run_state import RunState
from functions.store import Claimed

# The worker's lines keep one logger name, whichever of its parts writes them (filters use it).
logger = logging.getLogger("functions.runner")

# Retention: each process prunes finished tasks at most this often, for at most this long.
PRUNE_EVERY_S = 60.0
_PRUNE_BUDGET_S = 5.0
# Activity counts and the running totals (for /stats and /metrics) are written this often:
# what a worker killed loses at most (counters.py).
_ACTIVITY_EVERY_S = 2.0
# The least time a cancel's notification naming a task this worker does not hold yet is kept
# for the claim whose answer may still be on its way.
_NAMED_KEPT_S = 60.0
# A worker warns of due tasks nothing runs (kinds it does not load) at most this often; when
# it last did (time.monotonic(), one per process).
UNSERVED_WARN_EVERY_S = 60.0
_unserved_warned: list[float | None] = [None]
# How often a worker makes the tasks of schedules' occurrences: well within the minute ahead
# they are made (schedules.CREATE_AHEAD_S), so each is made 45 to 60 s before it is due.
SCHEDULES_EVERY_S = 15.0
# Rescued tasks are logged one line each up to this many per rescue, then summarised.
_LOG_EACH_UP_TO = 20


class PruneClock:
    """When a process last pruned (time.monotonic()). One per process, shared by its runs
    and ticks (`tick(prune_clock=...)`), so that it prunes at most every PRUNE_EVERY_S."""

    def __init__(self) -> None:
        self.last_s: float | None = None

    def due(self, now_s: float) -> bool:
        return self.last_s is None or now_s - self.last_s >= PRUNE_EVERY_S


class Upkeep:
    """The heartbeat and the activity loop of one run, and what they do."""

    def __init__(self, state: RunState, printer: Printer[Any], prune_clock: PruneClock) -> None:
        self.state = state
        self.printer = printer
        self.prune_clock = prune_clock

    # --- heartbeat ---------------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        """Renew the lease every third of it; rescue dead workers' tasks; reconcile; prune."""
        state = self.state
        interval_s = state.settings.lease_seconds / 3
        wait_s = interval_s
        while True:
            await asyncio.sleep(wait_s)
            try:
                sent_at = time.monotonic()
                # Bounded by the interval: a renewal that takes longer is late anyway.
                alive = await state.store.heartbeat(
                    worker=state.worker_id,
                    lease_s=state.settings.lease_seconds,
                    timeout_s=interval_s,
                    kinds=state.served_kinds,
                )
                if not alive:
                    self._lose_lease()
                    return
                self.printer.renewed(sent_at)
                await self.rescue()
                await self.reconcile()
                await self.prune_if_due(None)
                await self.warn_unserved_if_due()
                wait_s = interval_s
            except DatabaseUnavailable as exc:
                logger.warning("action=heartbeat worker=%s: %s", state.worker_id, exc)
                state.summary.note_error(str(exc))
                wait_s = min(interval_s, 1.0)

    def _lose_lease(self) -> None:
        state = self.state
        state.lease_lost = True
        logger.error(
            "action=heartbeat worker=%s: this worker's lease ran out (it could not renew it"
            " for %.0f s: a stalled process or database); its tasks are rescued by others."
            " Handing back what it still holds and starting again as a new worker",
            state.worker_id, state.settings.lease_seconds,
        )  # fmt: skip
        self.printer.stop()  # no line more: those tasks may be running elsewhere
        state.halt.set()

    async def rescue(self) -> None:
        """Put back (or fail, out of attempts) the tasks of workers whose lease ran out."""
        state = self.state
        rescued = await state.store.rescue_expired()
        state.summary.rescued += len(rescued)
        # Each rescued attempt is `lost` (/stats, /metrics), whether it runs again or failed.
        if rescued:
            activity_of = state.activity_by_kind()
            for _, _, kind in rescued:
                activity_of(kind).lost += 1
        for task_id, task_state, _ in rescued[:_LOG_EACH_UP_TO]:
            logger.warning(
                "action=rescue task_id=%s state=%s: its worker's lease ran out", task_id, task_state
            )
        if len(rescued) > _LOG_EACH_UP_TO:
            logger.warning(
                "action=rescue count=%d: and %d more tasks whose worker's lease ran out",
                len(rescued), len(rescued) - _LOG_EACH_UP_TO,
            )  # fmt: skip
        if rescued:
            state.wake.set()

    async def schedules_loop(self) -> None:
        """Make the tasks of schedules' occurrences every SCHEDULES_EVERY_S."""
        while True:
            await asyncio.sleep(SCHEDULES_EVERY_S)
            try:
                await self.create_occurrences()
            except (DatabaseUnavailable, DatabaseError) as exc:
                logger.warning("action=schedule worker=%s: %s", self.state.worker_id, exc)
                self.state.summary.note_error(str(exc))

    async def create_occurrences(self) -> None:
        """Make the tasks of schedules' occurrences due within a minute."""
        state = self.state
        made = await schedules.create_occurrences(state.store, state.settings.max_attempts)
        if made:
            logger.info(
                "action=schedule worker=%s count=%d: tasks made for schedules' occurrences",
                state.worker_id, made,
            )  # fmt: skip
            state.wake.set()

    async def reconcile(self) -> None:
        """Hand back tasks the database says this worker holds that it never heard of."""
        state = self.state
        async with state.claim_lock:
            in_database = await state.store.held_by(worker=state.worker_id)
            unknown = sorted(in_database - state.held.keys())
            # (A task finished while `held_by` read is in `unknown` too: the release is
            # fenced and leaves it alone, and only what was handed back is reported.)
            released = (
                await state.store.release(worker=state.worker_id, ids=unknown) if unknown else set()
            )
            if released:
                state.summary.released += len(released)
                logger.warning(
                    "action=release worker=%s count=%d: tasks claimed by a claim whose answer"
                    " was lost; handed back without using an attempt",
                    state.worker_id, len(released),
                )  # fmt: skip
            state.unsure_of_holdings = False

    async def prune_if_due(self, deadline: float | None) -> None:
        """Delete finished tasks past the retention, if this process has not for a while."""
        state = self.state
        retention_s = state.settings.retention_s
        now = time.monotonic()
        if retention_s == 0 or not self.prune_clock.due(now):
            return
        budget_s = _PRUNE_BUDGET_S
        if deadline is not None:
            budget_s = min(budget_s, deadline - now - state.settings.deadline_margin_s)
            if budget_s <= 0:
                return
        self.prune_clock.last_s = now
        pruned = await tasks.prune(state.store, older_than_s=retention_s, budget_s=budget_s)
        state.summary.pruned += pruned
        if pruned:
            logger.info(
                "action=prune worker=%s count=%d: finished over %.0f s ago",
                state.worker_id, pruned, retention_s,
            )  # fmt: skip

    async def warn_unserved_if_due(self) -> None:
        """Warn of due tasks of kinds nothing ran in the last 5 minutes (looked for at each
        start and heartbeat): at most once every UNSERVED_WARN_EVERY_S per process, whatever
        its runs (each tick is one)."""
        now_s = time.monotonic()
        if _unserved_warned[0] is not None and now_s - _unserved_warned[0] < UNSERVED_WARN_EVERY_S:
            return
        unserved = await self.state.store.count_unserved()
        if unserved:
            _unserved_warned[0] = now_s
            logger.warning(
                "action=unserved kinds=%s: due tasks of kinds no worker or tick has run in the"
                " last 5 minutes: %s; nothing claims them until a worker that runs them starts"
                " (TASKRUNNER_KINDS, or an entry point of the group taskrunner.kinds)",
                ",".join(unserved),
                ", ".join(
                    f"{kind} ({n}{' or more' if more else ''} due)"
                    for kind, (n, more) in unserved.items()
                ),
            )

    async def release_held(self, ids: list[int] | None = None) -> None:
        """Hand back what is held and not recorded: `ids` of it (a tick's tasks that no
        longer fit before its deadline), or all of it at shutdown; fenced: what this worker
        no longer holds is left alone. What could not be handed back stays held."""
        state = self.state
        ids = sorted(state.held) if ids is None else ids
        if not ids:
            return
        try:
            released = await state.store.release(worker=state.worker_id, ids=ids)
            for task_id in ids:
                state.held.pop(task_id, None)
            state.summary.released += len(released)
            logger.info(
                "action=release worker=%s count=%d: back to scheduled",
                state.worker_id, len(released),
            )  # fmt: skip
        except (DatabaseUnavailable, DatabaseError) as exc:
            logger.error(
                "action=release worker=%s: %s; %d tasks stay with this worker until its"
                " lease runs out, then they are rescued and run again",
                state.worker_id, exc, len(ids),
            )  # fmt: skip

    async def sign_off(self) -> None:
        """Write the last activity counts and remove the worker's row (its lease)."""
        worker = self.state.worker_id
        try:
            await self.write_activity()
        except (DatabaseUnavailable, DatabaseError) as exc:
            logger.warning("action=activity worker=%s: %s; counts not written", worker, exc)
        try:
            await self.state.store.deregister_worker(worker=worker)
        except (DatabaseUnavailable, DatabaseError) as exc:
            logger.warning("action=deregister worker=%s: %s", worker, exc)

    async def count_left_for_time(self, unfit: list[str], kinds_at_start: list[str]) -> None:
        """Count due tasks of the kinds that no longer fit before a run's deadline; warn
        about a kind that never fitted this run."""
        state = self.state
        settings, summary = state.settings, state.summary
        if not unfit:
            return
        try:
            summary.left_for_time, whole = await state.store.count_due_by_kind(kinds=unfit)
        except (DatabaseUnavailable, DatabaseError) as exc:
            summary.note_error(str(exc))
            return
        summary.left_for_time_more = not whole
        never = {k: n for k, n in summary.left_for_time.items() if k not in kinds_at_start}
        if never:
            margin_s = settings.deadline_margin_s
            due = "due" if whole else "or more due"
            needs = ", ".join(
                f"{k} ({n} {due}; needs {KINDS[k].max_seconds(settings) + margin_s:.0f} s)"
                for k, n in sorted(never.items())
            )
            logger.warning(
                "action=tick worker=%s: left tasks no run this short can finish: %s;"
                " give the tick a longer timeout",
                state.worker_id, needs,
            )  # fmt: skip

    # --- cancels -----------------------------------------------------------------------------

    async def cancel_loop(
        self,
        stoppable: Callable[[], list[Claimed]],
        stop: Callable[[set[int], set[int]], None],
    ) -> None:
        """Stop the held tasks that were cancelled (`stop`'s first set; its second: those
        no longer this worker's otherwise): those a cancel's notification names
        (LISTEN), at once, with no query; and those the database says this worker no longer
        holds, looked for every poll interval while something it holds can still be stopped
        (`stoppable`: running, waiting for a slot or for its line to be printed), which is
        how it learns behind a transaction pooler, in a tick that does not listen, and after
        notifications missed while reconnecting (then at once)."""
        state = self.state
        poll_s = state.settings.poll_interval_s
        # (A claim's answer comes within its statement's timeout, or the claim has failed.)
        kept_s = max(_NAMED_KEPT_S, 2 * state.settings.db_statement_timeout_s)
        next_poll = time.monotonic() + poll_s
        while True:
            with contextlib.suppress(TimeoutError):
                wait_s = max(0.0, next_poll - time.monotonic())
                await asyncio.wait_for(state.cancel_heard.wait(), wait_s)
            state.cancel_heard.clear()
            ask = state.cancels_unnamed or time.monotonic() >= next_poll
            state.cancels_unnamed = False
            held = stoppable()
            named = {(c.id, c.attempt) for c in held} & state.cancels_named.keys()
            for task in named:
                del state.cancels_named[task]
            if ask:
                now_s = time.monotonic()
                next_poll = now_s + poll_s
                # What it names that is not held may be of a claim whose answer is still on
                # its way (the claim looks for it, and this poll cannot see it): kept until
                # no claim's answer can be that late, then forgotten.
                state.cancels_named = {
                    task: heard_s
                    for task, heard_s in state.cancels_named.items()
                    if now_s - heard_s < kept_s
                }
            if not held:
                continue
            cancelled = {task_id for task_id, _ in named}
            moved: set[int] = set()  # deleted, or rescued or retried since
            if ask:
                try:
                    found = await state.store.no_longer_held(held)
                except DatabaseUnavailable:
                    found = {}  # looked for again at the next poll
                cancelled |= {task_id for task_id, was in found.items() if was}
                moved = {task_id for task_id, was in found.items() if not was} - cancelled
            # Only the attempts asked about: one claimed again meanwhile is another run.
            asked = {c.id: c.attempt for c in held}
            still = {
                task_id
                for task_id in cancelled | moved
                if (now_held := state.held.get(task_id)) is not None
                and asked.get(task_id) == now_held.attempt
            }
            cancelled &= still
            moved &= still
            if cancelled or moved:
                stop(cancelled, moved)

    # --- activity ----------------------------------------------------------------------------

    async def activity_loop(self) -> None:
        """Write this worker's activity counts every couple of seconds."""
        while True:
            await asyncio.sleep(_ACTIVITY_EVERY_S)
            with contextlib.suppress(DatabaseUnavailable):
                await self.write_activity()

    async def write_activity(self) -> None:
        """Add the counts not yet written to the table; kept for the next try on an outage."""
        state = self.state
        if not state.activity:
            return
        activity, state.activity = state.activity, {}
        try:
            await state.store.add_activity(activity)
        except DatabaseUnavailable:
            for key, counts in activity.items():  # kept for the next try
                state.activity[key] = merge_activity(state.activity.get(key), counts)
            raise
