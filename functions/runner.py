"""claim -> start -> record -> shut down: what a tick does, in the cloud and on a laptop alike.

One `Runner.run` is one worker: it registers itself (a row in `workers`, with a lease), claims
due tasks in batches that fit its free room, starts each (inline for kinds that return at
once, an asyncio task otherwise, within its kind's slots and time limit) and records each
run's end. Its parts hold one `RunState` (functions/run_state.py): the completer
(functions/completer.py) writes results in bounded, fenced batches, and prints each batch's
lines between its write and its commit, through the printer (functions/output.py, a thread
of its own); the upkeep (functions/upkeep.py) renews the lease, rescues, reconciles,
prunes and writes activity counts.

Everything a worker holds (running, queued for a slot, waiting to be recorded) is in
`RunState.held`, covered by the worker's lease until it is recorded or handed back. The room
to claim is bounded by `concurrency` over all of it, and claiming stops while results wait
on a write that is slow, or lines on a stdout that is: a worker never claims faster than it
records, or than its output is read.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TextIO

from functions import conninfo
from functions.alarm import Alarm
from functions.completer import DB_RETRY_FIRST_S, DB_RETRY_MAX_S, SLOW_WRITE_S, Completer, result_of
from functions.errors import DatabaseError, DatabaseUnavailable, WorkerFailed
from functions.kinds import BUILT_IN, BUILT_IN_MODULES, KINDS, Context, HttpClients, Kind
from functions.output import Printer, lease_margin_s
from functions.run_state import ClaimPoint, ClockCheck, RunState, Slots, TickSummary, Wakeup
from functions.settings import Settings
from functions.store import Claimed, ClaimFrom, NextDue, Result, Store
from functions.upkeep import PruneClock, Upkeep

if TYPE_CHECKING:
    import httpx

__all__ = ["Runner", "TickSummary", "new_worker_id"]

logger = logging.getLogger(__name__)

# What a run with a deadline keeps, when it stops, for recording results and handing back.
_FINAL_WRITES_S = 1.0
# What a run stopping with no grace left still gives lines already with the writer; within
# _FINAL_WRITES_S.
_LINES_AT_SHUTDOWN_S = 0.25

# A worker with nothing due claims each task a little before its time, and starts it at its
# time by its own clock: a claim's round trip and a claim already in flight are behind it by
# then. It wakes LEAD_S before the next task is due and takes those due within AHEAD_S.
AHEAD_S = 0.02
LEAD_S = 0.01


def new_worker_id() -> str:
    """Name a worker in `claimed_by`: host, pid and a random part, unique per run."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


@functools.cache
def version() -> str | None:
    """taskrunner's version, as installed (None where it is not: a Lambda bundle)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("taskrunner")
    except PackageNotFoundError:
        return None


def time_limit_s(kind: Kind, settings: Settings, timeout_s: float | None = None) -> float:
    """How long a run may take before it is stopped: the task's own `timeout_s` if it has
    one; else a declared kind's `timeout_s`; for a built-in, twice what it declares and 10 s
    more. Generous on purpose: a busy worker's event loop (10,000 foo starting at once, a
    starved CPU) delays a run's end, and that must not fail a run that was on time (a task's
    own timeout is what its creator asked for, exactly)."""
    if timeout_s is not None:
        return timeout_s
    if kind.limit_s is not None:
        return kind.limit_s(settings)
    return 2 * kind.max_seconds(settings) + 10.0


def _capped(caps: dict[str, int], claimed: list[Claimed]) -> bool:
    """Whether a claim took as many of some kind as its slots allowed (`caps`): more of it
    may be due, for when a slot frees."""
    if not caps:
        return False
    taken = Counter(task.kind for task in claimed)
    return any(taken[name] >= cap for name, cap in caps.items())


class _Escaped(Exception):
    """A BaseException a kind raised (SystemExit, KeyboardInterrupt...), carried as an
    Exception: asyncio re-raises those out of the event loop, killing the worker."""

    def __init__(self, escaped: BaseException) -> None:
        super().__init__(str(escaped))
        self.escaped = escaped


async def _finished_or(
    tasks: list[asyncio.Future[Any]], event: asyncio.Event, timeout_s: float
) -> None:
    """Wait until `tasks` are done or `event` is set, `timeout_s` at most (the tasks go on)."""
    waits = [asyncio.ensure_future(asyncio.wait(tasks)), asyncio.ensure_future(event.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _contained(run: Awaitable[Any]) -> Any:
    """A user's kind's run, whose SystemExit or KeyboardInterrupt (a `sys.exit()` deep in a
    library) fails its attempt rather than stopping the worker. (Signals reach the worker
    through the event loop's handlers, never as an exception in a run.)"""
    try:
        return await run
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        raise _Escaped(exc) from exc


class Runner:
    """Claims and runs due tasks for one process; `run` may be called again after it returns."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        worker_id: str | None = None,
        out: TextIO | None = None,
        prune_clock: PruneClock | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.worker_id = worker_id or new_worker_id()
        self._out = out
        # Shared by this runner's runs; a process's ticks share the tick's (functions/tick.py).
        self.prune_clock = prune_clock or PruneClock()
        # Persists across runs: `tick` hands `notify` to its listener before the run starts.
        self.wakeup = Wakeup()
        self.clock_check = ClockCheck()
        self._runs = 0
        self._reset()

    def _reset(self) -> None:
        """A new run's state and parts."""
        self.state = RunState(
            self.store, self.settings, self.worker_id, self.wakeup, TickSummary(self.worker_id)
        )
        lease_s = self.settings.lease_seconds
        self.printer: Printer[Result] = Printer(
            self.out, lease_s, SLOW_WRITE_S, self._lines_out, self._printing_failed
        )
        self.completer = Completer(self.state, self.printer)
        self.upkeep = Upkeep(self.state, self.printer, self.prune_clock)
        # Tasks of kinds that wait, while they run; and each kind's slots.
        self._running: dict[int, asyncio.Future[Any]] = {}
        # Set once stopping with no more time for running tasks (run's `hurry`).
        self._hurry = asyncio.Event()
        self.slots = Slots(self.settings)
        # Runs stopped at their time limit, and runs this worker cancelled itself (a cancel
        # of their task, a shutdown: handed back or dropped, never recorded; a run cancelled
        # otherwise raised CancelledError itself), by task and attempt.
        self._timed_out: set[tuple[int, int]] = set()
        self._stopping: set[tuple[int, int]] = set()
        self._http: HttpClients | None = None
        # When the last claim was sent (time.monotonic()): its NEXT_DUE counts from then.
        self._claim_sent_at = 0.0
        self.claim_point = ClaimPoint()
        # Tasks claimed ahead of their time, until they start: their timers.
        # (Each: when it starts, by time.monotonic(); the task; when its claim was sent.)
        self._waiting: dict[int, tuple[float, Claimed, float]] = {}
        self._may_claim_ahead = False
        self._times: list[tuple[float, int]] = []  # a heap of (when, id) of those
        self._alarm: Alarm | None = None
        self._background: set[asyncio.Future[None]] = set()

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def lease_lost(self) -> bool:
        """The last run stopped because its lease ran out (start again as a new worker)."""
        return self.state.lease_lost

    def notify(self, due_s: float | None = None) -> None:
        """Wake the runner: a task due at `due_s` (None: unknown) was created."""
        self.claim_point.created()
        self.wakeup.notify(due_s)

    def heard_cancel(self, worker: str | None, tasks: list[tuple[int, int]] | None) -> None:
        """`tasks` (id, attempt) `worker` was running were cancelled (None: some, unnamed;
        a None worker: maybe, notifications were missed): if this worker's, stop them at
        once (the tasks unnamed: ask the database which)."""
        if worker is None or worker == self.worker_id:
            self.state.heard_cancel(tasks)

    # --- the run -----------------------------------------------------------------------------

    async def run(
        self,
        *,
        deadline: float | None = None,
        keep_polling: bool = False,
        stop: asyncio.Event | None = None,
        hurry: asyncio.Event | None = None,
    ) -> TickSummary:
        """Run due tasks until none is due (or, with `keep_polling`, until `stop` or `deadline`).
        `hurry`, set once stopping (a second SIGTERM or Ctrl-C), ends the running tasks' grace
        period at once: they are stopped and handed back.

        `deadline` is a `time.monotonic()` value: no task is claimed that could end after
        it (less `deadline_margin_s`). Raises DatabaseUnavailable if the database cannot be
        reached at the start (later outages are waited out), and WorkerFailed if the run had
        to stop because it cannot go on (its stdout closed, one of its loops broke).
        """
        started = time.monotonic()
        stop = stop or asyncio.Event()
        if self._runs:
            self.worker_id = new_worker_id()
        self._runs += 1
        self._reset()
        if hurry is not None:
            self._hurry = hurry
        state, summary = self.state, self.state.summary
        kinds_at_start, _ = self._kinds_that_fit(deadline)
        state.served_kinds = kinds_at_start
        # Only a worker claims ahead: a tick's time is counted, and its tasks are its own;
        # and only one that hears of cancels at once (LISTEN: not behind a transaction
        # pooler, where it would learn of one on its next poll, after the task had started).
        self._may_claim_ahead = (
            keep_polling and deadline is None and not conninfo.behind_pooler(self.settings)
        )
        sent_at = time.monotonic()
        await self.store.register_worker(
            worker=self.worker_id,
            lease_s=self.settings.lease_seconds,
            kinds=kinds_at_start,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=version(),
            # A tick: Lambda's (a deadline) or `taskrunner tick` (runs once): not a worker.
            tick=deadline is not None or not keep_polling,
        )
        # From here on this worker holds a lease: every way out goes through _shut_down.
        self.printer.start(sent_at)
        if keep_polling and deadline is None:  # a worker (`worker`, `dev`), not a tick
            logger.info(
                "action=start worker=%s kinds=%s concurrency=%d lease_s=%g database=%s:"
                " claiming due tasks",
                self.worker_id, ",".join(KINDS), self.settings.concurrency,
                self.settings.lease_seconds, conninfo.database_for_log(self.settings.database_url),
            )  # fmt: skip
        loops = [
            asyncio.create_task(state.guard(self.completer.run(), "write")),
            asyncio.create_task(state.guard(self.upkeep.heartbeat_loop(), "heartbeat")),
            asyncio.create_task(state.guard(self.upkeep.activity_loop(), "activity")),
            asyncio.create_task(state.guard(self.upkeep.schedules_loop(), "schedules")),
            asyncio.create_task(
                state.guard(self.upkeep.cancel_loop(self._stoppable, self._stop), "cancel")
            ),
        ]
        try:
            try:
                await self.upkeep.rescue()
                await self.upkeep.create_occurrences()
                await self.upkeep.prune_if_due(deadline)
                await self.upkeep.warn_unserved_if_due()
            except DatabaseUnavailable as exc:
                summary.note_error(str(exc))
            await self._claim_loop(deadline, keep_polling, stop)
        finally:
            await self._shut_down(deadline, loops)
        if deadline is not None:
            _, unfit = self._kinds_that_fit(deadline)
            await self.upkeep.count_left_for_time(unfit, kinds_at_start)
        summary.seconds = round(time.monotonic() - started, 3)
        if state.failure is not None:
            raise WorkerFailed(state.failure)
        return summary

    def _left_s(self, deadline: float | None) -> float | None:
        """Seconds a run started now may take and end before the deadline (None: none)."""
        if deadline is None:
            return None
        return deadline - time.monotonic() - self.settings.deadline_margin_s

    def _kinds_that_fit(self, deadline: float | None) -> tuple[list[str], list[str]]:
        """The kinds whose every run ends before the deadline, and the others (of which a
        task whose own timeout_s fits may still be taken)."""
        left_s = self._left_s(deadline)
        if left_s is None:
            return list(KINDS), []
        fit: list[str] = []
        unfit: list[str] = []
        for name, kind in KINDS.items():
            (fit if kind.max_seconds(self.settings) <= left_s else unfit).append(name)
        return fit, unfit

    # --- claim -------------------------------------------------------------------------------

    def _fits(self, task: Claimed, left_s: float | None) -> bool:
        """Whether `task` run now ends before the deadline, `left_s` away (None: none), as
        the claim took it: its kind fits, or its own timeout_s does."""
        if left_s is None:
            return True
        if KINDS[task.kind].max_seconds(self.settings) <= left_s:
            return True
        return task.timeout_s is not None and task.timeout_s <= left_s

    def _room(self) -> int:
        """How many tasks the next claim may take (0: none now)."""
        if self.completer.should_wait():
            return 0  # a full batch waits for the writer, or writes are slow: let them catch up
        if self.printer.stalled():
            return 0  # stdout is slow (a reader that does not keep up): the same
        free = self.settings.concurrency - len(self.state.held)
        return max(0, min(free, self.settings.claim_batch, self.store.WRITE_BATCH))

    async def _claim_loop(
        self, deadline: float | None, keep_polling: bool, stop: asyncio.Event
    ) -> None:
        state = self.state
        db_retry_s = DB_RETRY_FIRST_S
        while not stop.is_set() and not state.halt.is_set():
            kinds, short_kinds = self._kinds_that_fit(deadline)
            fit_s = self._left_s(deadline)
            if fit_s is not None and fit_s <= 0:
                return  # too close to the deadline to start anything
            self.wakeup.clear()
            self.wakeup.wake_on_write = True
            wait_s: float | None = None  # None: until woken
            try:
                if state.unsure_of_holdings:
                    await self.upkeep.reconcile()
                room = self._room()
                caps = self.slots.caps(kinds + short_kinds, prefetch=deadline is None)
                # A kind with no room left is left out of the claim (and of NEXT_DUE: its due
                # tasks wake no one); a freed slot wakes the loop.
                kinds = [name for name in kinds if caps.get(name) != 0]
                short_kinds = [name for name in short_kinds if caps.get(name) != 0]
                if all(name in caps for name in kinds + short_kinds):
                    room = min(room, sum(caps.values()))  # locks no more rows than it takes
                if room > 0:
                    start, token = self.claim_point.begin(kinds, short_kinds)
                    claimed, due = await self._claim(kinds, room, short_kinds, fit_s, caps, start)
                    answered = time.monotonic()
                    state.summary.claimed += len(claimed)
                    lease_s = self.settings.lease_seconds
                    if claimed and answered > (
                        self._claim_sent_at + lease_s - lease_margin_s(lease_s)
                    ):
                        # Frozen while it claimed (SIGSTOP, a paused VM), past what the claim's
                        # renewal of the lease covers: another worker may have rescued these
                        # and run them. Handed back unrun, those still this worker's.
                        self.claim_point.reset()
                        await self.upkeep.release_held([task.id for task in claimed])
                        continue
                    unfit: list[int] = []
                    started: list[Claimed] = []
                    for each in claimed:
                        task = self._on_time(each, due, answered) if each.ahead_s > 0 else each
                        if task is None:
                            continue  # claimed ahead of its time: it starts then
                        if deadline is None or self._fits(task, self._left_s(deadline)):
                            if self._start(task):
                                started.append(task)
                        else:  # a plain function run inline before it overran its time
                            unfit.append(task.id)
                    if unfit:
                        await self.upkeep.release_held(unfit)  # for another tick, at once
                    # (Those waiting for a slot are counted as they start; those handed back
                    # unstarted, when claimed again.)
                    state.count_started(started)
                    full = len(claimed) == room
                    self.claim_point.end(token, kinds, short_kinds, full, due)
                    if full:
                        await asyncio.sleep(0)  # let the started tasks begin
                        continue  # more may be due
                    if start is not None:
                        continue  # look once from the start before sleeping (ClaimPoint)
                    wait_s = self._time_to(due)
                    # A write is news when it frees what this look lacked (a kind's slots; a
                    # tick's own tasks), and behind a transaction pooler, where no
                    # notification comes (no LISTEN): each write is the loop's chance to see
                    # new tasks before its poll (one created meanwhile waited 6-8 s for a 10 s
                    # poll, not 0.3-0.5 s, when only the first counted).
                    self.wakeup.wake_on_write = (
                        _capped(caps, claimed)
                        or (not keep_polling and bool(state.held))
                        or conninfo.behind_pooler(self.settings)
                    )
                db_retry_s = DB_RETRY_FIRST_S
            except DatabaseUnavailable as exc:
                self.claim_point.reset()
                logger.warning("action=claim worker=%s: %s; retrying", self.worker_id, exc)
                state.summary.note_error(str(exc))
                wait_s, db_retry_s = db_retry_s, min(db_retry_s * 2, DB_RETRY_MAX_S)
            if not keep_polling and not state.held and (wait_s is None or wait_s > 0):
                return  # drained: nothing held, nothing due
            if deadline is not None:
                left_s = deadline - time.monotonic() - self.settings.deadline_margin_s
                wait_s = left_s if wait_s is None else min(wait_s, left_s)
            if not keep_polling and wait_s is not None and wait_s > 0 and state.held:
                wait_s = None  # a tick only waits for its own tasks, then looks again
            if wait_s is None:
                # Room frees up when a write completes; look again within a poll interval
                # in any case (a stalled write's backlog has a time limit).
                wait_s = self.settings.poll_interval_s
            await self.wakeup.sleep(wait_s, stop, state.halt)

    async def _claim(
        self,
        kinds: list[str],
        limit: int,
        short_kinds: list[str] | None = None,
        fit_s: float | None = None,
        caps: dict[str, int] | None = None,
        claim_from: ClaimFrom | None = None,
    ) -> tuple[list[Claimed], NextDue]:
        """Claim up to `limit` due tasks of `kinds`, and of `short_kinds` those whose own
        timeout_s is at most `fit_s`, no more of a kind than `caps` says, reading from
        `claim_from` (ClaimPoint); each is held from here on."""
        state = self.state
        async with state.claim_lock:
            sent_at = self._claim_sent_at = time.monotonic()
            try:
                claimed, due = await self.store.claim_due(
                    worker=self.worker_id,
                    kinds=kinds,
                    limit=limit,
                    lease_s=self.settings.lease_seconds,
                    short_kinds=short_kinds or (),
                    fit_s=fit_s,
                    caps=caps,
                    claim_from=claim_from,
                    ahead_s=self._ahead_s(),
                )
            except DatabaseUnavailable:
                # The claim may have committed before its answer was lost: hand back what
                # the database says this worker holds, once it answers again.
                state.unsure_of_holdings = True
                raise
            if not state.held.keys().isdisjoint(task.id for task in claimed):
                await self._stop_superseded(claimed)
            for task in claimed:
                state.held[task.id] = task
            # (A set of the claim's tasks only when some cancel was heard: 0.8% of a
            # draining worker's CPU for an empty intersection, py-spy.)
            if state.cancels_named and state.cancels_named.keys() & {
                (task.id, task.attempt) for task in claimed
            }:
                # Cancelled, and heard of, before this claim's answer came: stopped at once.
                state.cancel_heard.set()
        self.clock_check.claimed(sent_at, due.now_s, time.monotonic(), due.answered_s)
        if claimed:  # (none: nothing was due, or the lease had run out)
            self.printer.renewed(sent_at)
        state.db_offset_s = due.now_s - time.time()
        return claimed, due

    async def _stop_superseded(self, claimed: list[Claimed]) -> None:
        """Tasks this claim took that this worker still holds on an earlier attempt: that
        attempt was cancelled (or rescued) and the task made due again before this worker
        heard, and its run goes no further, as if the cancel loop had found it (asked now,
        whether it was cancelled; unknown: lost). Before, the new attempt was held over the
        old one under the same id, and the two runs' results and hand-backs mixed."""
        state = self.state
        old = [state.held[task.id] for task in claimed if task.id in state.held]
        # An attempt whose result is being written (or waits to be): its run is over, and
        # the write says what it came to; the completer counts it.
        for attempt in [c for c in old if self.completer.supersede(c)]:
            del state.held[attempt.id]
            old.remove(attempt)
        if not old:
            return
        try:
            gone = await self.store.no_longer_held(old)
        except (DatabaseUnavailable, DatabaseError):
            gone = {}
        cancelled = {task_id for task_id, was in gone.items() if was}
        self._stop(cancelled, {c.id for c in old} - cancelled)

    def _ahead_s(self) -> float:
        """How far ahead of their time the next claim may take tasks (AHEAD_S): 0 but in a
        worker that hears of cancels at once and whose clock keeps time (ClockCheck)."""
        return AHEAD_S if self._may_claim_ahead and self.clock_check.keeps_time else 0.0

    def _time_to(self, due: NextDue) -> float:
        """Seconds until the next task is due by the database's clock, capped by polling,
        from now: the claim's `now` was the database's when the claim began, about when it
        was sent, so the time its answer took to come back is already gone. (Counted from
        the answer, every wake-up was late by the claim's whole round trip.)"""
        wait_s = self.settings.poll_interval_s
        if due.wait_s is not None:
            # (Early even while the clock is being checked: the claim then is one more
            # measure of it, and the next may take what is due within AHEAD_S.)
            lead_s = LEAD_S if self._may_claim_ahead else 0.0
            wait_s = min(max(0.0, due.wait_s - lead_s), wait_s)
        self.wakeup.sleep_until = due.now_s + wait_s
        return max(0.0, wait_s - (time.monotonic() - self._claim_sent_at))

    # --- start -------------------------------------------------------------------------------

    def _on_time(self, task: Claimed, due: NextDue, answered: float) -> Claimed | None:
        """Start `task`, claimed ahead of its time, once it is due (None), by this process's
        clock counted from the claim's answer (`answered`, time.monotonic()): the database's
        clock had passed the claim's `answered_s` by then, so the task starts no earlier
        than its time by the database's. Due already: the task to start now, its start
        lateness from `answered_s`."""
        due_s = due.now_s + task.ahead_s
        delay_s = due_s - due.answered_s
        if delay_s > 0:
            at = answered + delay_s
            self._waiting[task.id] = (at, task, self._claim_sent_at)
            heapq.heappush(self._times, (at, task.id))
            if self._times[0][1] == task.id:
                if self._alarm is None:
                    self._alarm = Alarm(asyncio.get_running_loop(), self._start_on_time)
                self._alarm.set(at)
            return None
        if task.attempt == 1:
            task = self.state.held[task.id] = task._replace(lateness_ms=-delay_s * 1000)
        return task

    def _start_on_time(self) -> None:
        """The alarm rang: start the tasks claimed ahead whose time has come. Each one's
        start lateness is how late it starts (its `started_at`: queries.CLAIM_DUE)."""
        state, times, waiting = self.state, self._times, self._waiting
        lease_s = self.settings.lease_seconds
        started: list[Claimed] = []
        while times and (times[0][0] <= time.monotonic() or times[0][1] not in waiting):
            at, task_id = heapq.heappop(times)
            if waiting.get(task_id, (None,))[0] != at:
                continue  # dropped (stopped, cancelled) since
            _, task, claim_sent_at = waiting.pop(task_id)
            if state.halt.is_set() or state.held_attempt(task) is None:
                continue  # stopping (handed back, due at its time), or no longer this worker's
            if time.monotonic() > claim_sent_at + lease_s - lease_margin_s(lease_s):
                # Frozen past the lease its claim renewed (SIGSTOP, a paused VM): another
                # worker may have rescued it. Handed back unrun, if it is still this worker's.
                handing_back = asyncio.ensure_future(self.upkeep.release_held([task.id]))
                self._background.add(handing_back)
                handing_back.add_done_callback(self._background.discard)
                continue
            if task.attempt == 1:
                late_ms = (time.monotonic() - at) * 1000
                task = state.held[task.id] = task._replace(lateness_ms=late_ms)
            if self._start(task):
                started.append(task)
        state.count_started(started)
        if times and self._alarm is not None:
            self._alarm.set(times[0][0])

    def _lend_http(
        self, *, guarded: bool = False, timeout_s: float | None = None
    ) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        if self._http is None:
            self._http = HttpClients(self.settings)
        return self._http.lend(guarded=guarded, timeout_s=timeout_s)

    def _start(self, claimed: Claimed) -> bool:
        """Run `claimed`, inline or as an asyncio task (True), or queue it for a slot of
        its kind (False)."""
        kind = KINDS[claimed.kind]
        if kind.instant:
            # No asyncio task for a kind that returns at once: creating and scheduling one
            # per run held a worker draining baz to 12,900/s; inline, 14,400/s.
            ctx = Context(
                claimed.id, claimed.attempt, self.settings, self._lend_http, claimed.payload_json
            )
            began = time.monotonic()
            try:
                line = kind.run(ctx)
            except BaseException as exc:  # SystemExit included: it fails this attempt only
                self._record(claimed, None, exc, time.monotonic() - began)
            else:
                self._record(claimed, line, None, time.monotonic() - began)
            return True
        if self.slots.full(kind.name):
            self.slots.queued[kind.name].append(claimed)
            return False
        self._launch(kind, claimed)
        return True

    def _launch(self, kind: Kind, claimed: Claimed) -> None:
        limit_s = time_limit_s(kind, self.settings, claimed.timeout_s)
        built_in = kind.name in BUILT_IN or kind.module in BUILT_IN_MODULES
        # A user's kind's requests are bounded by its run's time limit, not by bar's.
        lend = (
            self._lend_http if built_in else functools.partial(self._lend_http, timeout_s=limit_s)
        )
        ctx = Context(claimed.id, claimed.attempt, self.settings, lend, claimed.payload_json)
        self.slots.active[kind.name] += 1
        # The kind's own coroutine is the task, recorded by a done-callback: no wrapping
        # coroutine per task, whose frames cost time when 10,000 foo tasks start at once.
        run: Awaitable[Any] = kind.run(ctx)  # type: ignore[assignment]
        if not built_in:
            run = _contained(run)  # (not around the built-ins: a frame per foo costs)
        task = asyncio.ensure_future(run)
        # A run far longer than its kind declares is stopped and fails its attempt: nothing a
        # worker holds waits forever (its lease would keep it from everyone else).
        timer = asyncio.get_running_loop().call_later(limit_s, self._time_out, claimed)
        task.add_done_callback(functools.partial(self._on_done, claimed, timer, time.monotonic()))
        self._running[claimed.id] = task

    def _time_out(self, claimed: Claimed) -> None:
        task = self._running.get(claimed.id)
        if task is not None and not task.done() and self.state.held_attempt(claimed):
            self._timed_out.add((claimed.id, claimed.attempt))
            task.cancel()

    def _on_done(
        self,
        claimed: Claimed,
        timer: asyncio.TimerHandle,
        began: float,
        task: asyncio.Future[Any],
    ) -> None:
        timer.cancel()
        took_s = time.monotonic() - began
        if self._running.get(claimed.id) is task:  # (not a new attempt's run, claimed since)
            del self._running[claimed.id]
        self.slots.active[claimed.kind] -= 1
        self._start_queued(claimed.kind)
        run = (claimed.id, claimed.attempt)
        if run in self._timed_out:
            # Stopped at its time limit: it fails its attempt, whatever it did once told to
            # stop (a kind that swallows the cancel and returns later did not run on time).
            self._timed_out.discard(run)
            self._stopping.discard(run)
            limit_s = time_limit_s(KINDS[claimed.kind], self.settings, claimed.timeout_s)
            whose = "its kind's limit" if claimed.timeout_s is None else "its timeout_s"
            error = TimeoutError(f"ran longer than {whose} of {limit_s:g} s")
            self._record(claimed, None, error, took_s, timed_out=True)
            return
        if run in self._stopping:
            self._stopping.discard(run)
            if task.cancelled():
                return  # cancelled, or shutting down, or lease lost: never recorded here
        elif task.cancelled():
            # Not a cancel of this worker's: the kind raised CancelledError itself (awaited
            # something that other code cancelled). Left alone, its task would stay running
            # for as long as the worker lives: it fails the attempt, as any error does.
            raised = RuntimeError("the run raised CancelledError (not a cancel of the task)")
            self._record(claimed, None, raised, took_s)
            return
        exc = task.exception()
        if isinstance(exc, _Escaped):
            exc = exc.escaped
        if exc is None:
            self._record(claimed, task.result(), None, took_s)
        else:
            self._record(claimed, None, exc, took_s)

    def _start_queued(self, kind_name: str) -> None:
        queue = self.slots.queued[kind_name]
        started = []
        while queue and not self.state.halt.is_set() and not self.slots.full(kind_name):
            started.append(queue.popleft())
            self._launch(KINDS[kind_name], started[-1])
        self.state.count_started(started)

    # --- cancel ------------------------------------------------------------------------------

    def _stoppable(self) -> list[Claimed]:
        """What this worker holds that a cancel can still stop: running, waiting for a slot,
        or with its result waiting to be written and its line not out (a cancel that comes
        while its batch prints it waits for that batch to commit, and finds it finished)."""
        held = self.state.held
        ids = {*self._running, *self._waiting, *self.completer.unprinted()}
        for queue in self.slots.queued.values():
            ids.update(claimed.id for claimed in queue)
        return [held[task_id] for task_id in sorted(ids) if task_id in held]

    def _stop(self, ids: set[int], moved: set[int] | None = None) -> None:
        """Stop held tasks that were cancelled (`ids`), or are no longer this worker's
        otherwise (`moved`: deleted, or rescued after its lease ran out): cancel their
        coroutines, drop them from their slots' queues, and print and record nothing of
        them (a line already out stays). The moved ones are `lost` in its summary."""
        state = self.state
        full = self._room() == 0
        moved = moved or set()
        cancelled = sum(task_id in state.held for task_id in ids - moved)
        lost = sum(task_id in state.held for task_id in moved)
        stopped = [
            state.held.pop(task_id) for task_id in sorted(ids | moved) if task_id in state.held
        ]
        if not stopped:
            return
        for claimed in stopped:
            task = self._running.get(claimed.id)
            if task is not None:
                self._stopping.add((claimed.id, claimed.attempt))
                task.cancel()  # (_on_done records nothing of it: it is no longer held)
                continue
            if self._waiting.pop(claimed.id, None) is not None:
                continue  # claimed ahead, not started (its alarm skips it)
            queue = self.slots.queued[claimed.kind]
            if claimed in queue:
                queue.remove(claimed)
        self.printer.drop(ids | moved)
        self.completer.drop(ids | moved)
        state.summary.cancelled += cancelled
        state.summary.lost += lost
        if cancelled:
            logger.info(
                "action=cancel worker=%s count=%d: cancelled while this worker held them;"
                " stopped, nothing printed or recorded for them",
                self.worker_id, cancelled,
            )  # fmt: skip
        if lost:
            logger.warning(
                "action=lost worker=%s count=%d: no longer this worker's (deleted, or rescued"
                " after its lease ran out); stopped, nothing printed or recorded for them",
                self.worker_id, lost,
            )  # fmt: skip
        if full or not state.held:
            # Room is free again (a worker that had room already claimed what was due), or
            # a tick that waited for its own tasks has none left.
            state.wake.set()

    # --- record ------------------------------------------------------------------------------

    def _record(
        self,
        claimed: Claimed,
        line: object,
        exc: BaseException | None,
        duration_s: float,
        *,
        timed_out: bool = False,
    ) -> None:
        """Hand a run's result to the completer, which prints its line, if it has one, as it
        records it. What is stored is what is printed; not printed (stdout failed): handed
        back at shutdown, for a worker that can print."""
        if self.state.held_attempt(claimed) is None:
            return  # no longer this worker's (handed back while it ran, or claimed again)
        self.completer.add(
            result_of(claimed, line, exc, self.settings, duration_s, timed_out=timed_out)
        )

    def _lines_out(self, results: list[Result]) -> None:
        """Lines are out (on the loop): the completer, which waits for them, is told by the
        printer itself."""

    def _printing_failed(self, error: str) -> None:
        self.state.fail(
            f"cannot print task output ({error}); the tasks whose lines were not"
            " printed are handed back"
        )

    # --- shut down ---------------------------------------------------------------------------

    async def _shut_down(self, deadline: float | None, loops: list[asyncio.Task[None]]) -> None:
        """Let running tasks finish within the grace period, record them, hand back the rest."""
        state, summary = self.state, self.state.summary
        grace_s = self.settings.shutdown_grace_s
        if deadline is not None:
            # What is left of the run, less a second for the writes and the hand-back below.
            grace_s = min(grace_s, max(0.0, deadline - time.monotonic() - _FINAL_WRITES_S))
        if state.halt.is_set():
            grace_s = 0.0  # a failure or a lost lease: nothing more will be recorded as run
        state.halt.set()  # no queued task starts from here on
        # Nor one claimed ahead of its time: handed back below, due then.
        self._waiting.clear()
        self._times.clear()
        if self._alarm is not None:
            self._alarm.close()
            self._alarm = None
        await asyncio.gather(*self._background, return_exceptions=True)
        unfinished = [task for task in self._running.values() if not task.done()]
        if unfinished and grace_s > 0 and not self._hurry.is_set():
            await _finished_or(unfinished, self._hurry, grace_s)
        if self._hurry.is_set():
            grace_s = 0.0
        if state.unsure_of_holdings:
            # The last claim's answer was lost: what it took is handed back now, not left
            # until this worker's lease runs out (which would cost those tasks an attempt).
            try:
                await self.upkeep.reconcile()
            except (DatabaseUnavailable, DatabaseError) as exc:
                summary.note_error(str(exc))
        cancelled = [task for task in self._running.values() if not task.done()]
        held = self.state.held
        self._stopping.update(
            (task_id, held[task_id].attempt)
            for task_id, task in self._running.items()
            if not task.done() and task_id in held
        )
        for task in cancelled:
            task.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)

        # The write loop records what is left, within the grace period (a second at least,
        # but for a run with a deadline: what it does not write is written below).
        write_loop = loops[0]
        until = time.monotonic() + (grace_s if deadline is not None else max(grace_s, 1.0))
        # Lines already with the writer get a moment even with no grace left (a run near its
        # deadline): normally they are out within a millisecond, and a run whose line is out
        # is recorded rather than run again.
        lines_until = max(until, time.monotonic() + _LINES_AT_SHUTDOWN_S)
        hurried = False
        while self.completer.busy and time.monotonic() < (
            lines_until if self.printer.may_print else until
        ):
            if write_loop.done():
                break  # it broke: nothing more will be written
            if self._hurry.is_set() and not hurried:
                # A second signal meanwhile: the writes get what a run with no grace gets.
                hurried = True
                until = lines_until = min(until, time.monotonic() + _FINAL_WRITES_S)
            await asyncio.sleep(0.01)
        # Lines not out by now never will be: their tasks are handed back below.
        await self.printer.close()
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        # Fenced as ever: a task rescued meanwhile is left to its new holder.
        await self.completer.write_rest()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

        if state.lease_lost:
            # Its lease ran out: what it still holds is rescued as another worker's rescue
            # would (each attempt `lost`, counted, `failed` once they are spent), not handed
            # back as never started: a kind that blocked past the lease ran again and again,
            # never using up its attempts, and an HTTP request sent was sent again uncounted.
            # Those still waiting for a slot have their attempt counted so: started, then.
            state.count_started([task for queue in self.slots.queued.values() for task in queue])
            try:
                await self.upkeep.rescue()
            except (DatabaseUnavailable, DatabaseError) as exc:
                summary.note_error(str(exc))  # (the next rescue, anyone's, takes them)
            state.held.clear()
        # Whatever is still held was not recorded: hand it back.
        await self.upkeep.release_held()
        await self.upkeep.sign_off()
        state.held.clear()
        self.completer.clear()
