"""claim -> run -> record: what a tick does, in the cloud and on a laptop alike.

One `Runner.run` is one worker: it registers itself (a row in `workers`, with a lease), claims
due tasks in batches that fit its free room, runs each (inline for kinds that return at once,
an asyncio task otherwise), hands each kind's line to a writer thread for stdout
(functions/output.py: output never stops the loop, and is written only while the lease
covers it), and records results in bounded batches once their lines are out. Three loops
share the work:

- the claim loop claims while there is room, then sleeps until the next due time, a
  notification, or freed room;
- the write loop records results, one bounded batch at a time, after their lines are out;
- the heartbeat renews the worker's lease, rescues the tasks of dead workers, and hands back
  tasks the database says this worker holds that it never heard of (a claim whose answer
  was lost with its connection).

Everything a worker holds (running, queued for a slot, waiting to be recorded) is in
`_held`, and is covered by the worker's lease until it is recorded or handed back. The room
to claim is bounded by `concurrency` over all of it, and claiming stops while results wait
on a write that is slow, or lines on a stdout that is: a worker never claims faster than it
records, or than its output is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sys
import time
from collections import Counter, deque
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from functions import conninfo, tasks
from functions.counters import Activity, bucket_of, merge_activity
from functions.errors import DatabaseError, DatabaseUnavailable, WorkerFailed
from functions.kinds import KINDS, Context, HttpClients, Kind
from functions.model import TaskState
from functions.output import LineWriter
from functions.settings import Settings
from functions.store import Claimed, NextDue, Result, Store

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

# After a database error the runner waits this long, doubling up to the cap, then tries again.
_DB_RETRY_FIRST_S = 0.1
_DB_RETRY_MAX_S = 5.0
# What a run with a deadline keeps, when it stops, for recording results and handing back.
_FINAL_WRITES_S = 1.0
# What a run stopping with no grace left still gives lines already with the writer; within
# _FINAL_WRITES_S.
_LINES_AT_SHUTDOWN_S = 0.25
# Results waiting, and no write has completed for this long: writes are slow, stop claiming.
# A write of a full batch takes ~20 ms here.
_SLOW_WRITE_S = 1.0
# A task's output and error are stored up to this many characters.
_MAX_TEXT = 16_384
# Retention: each process prunes finished tasks at most this often, for at most this long.
_PRUNE_EVERY_S = 60.0
_PRUNE_BUDGET_S = 5.0
# When this process last pruned (time.monotonic()), shared by its runs and ticks.
_last_prune: float | None = None
# Activity counts (for /stats) are written this often.
_ACTIVITY_EVERY_S = 2.0
# Rescued tasks are logged one line each up to this many per rescue, then summarised.
_LOG_EACH_UP_TO = 20


def new_worker_id() -> str:
    """Name a worker in `claimed_by`: host, pid and a random part, unique per run."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def time_limit_s(kind: Kind, settings: Settings) -> float:
    """How long a run may take before it is stopped: twice what its kind declares, and 10 s
    more. Generous on purpose: a busy worker's event loop (10,000 foo starting at once, a
    starved CPU) delays a run's end, and that must not fail a run that was on time."""
    return 2 * kind.max_seconds(settings) + 10.0


def retry_delay_s(settings: Settings, attempt: int) -> float:
    """Exponential backoff: base, 2x base, 4x base... capped at retry_max_s."""
    # A float power, capped: 2 ** 1024 as an int does not convert to a float at all.
    return float(min(settings.retry_max_s, settings.retry_base_s * 2.0 ** min(attempt - 1, 100)))


def clean_text(text: str) -> str:
    """`text` as PostgreSQL can store it (no NUL, no lone surrogate), cut to _MAX_TEXT."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode()
    if len(text) > _MAX_TEXT:
        text = f"{text[: _MAX_TEXT - 40]}... ({len(text):,} characters in all)"
    return text


@dataclass
class TickSummary:
    """What one run did; JSON-serialisable with `as_dict`."""

    worker: str
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    rescued: int = 0
    released: int = 0
    # Finished tasks deleted, past TASKRUNNER_RETENTION_S.
    pruned: int = 0
    # Results not written because the worker no longer held the task (its lease ran out).
    lost: int = 0
    # Due tasks left because their kind could not finish before the deadline, by kind.
    left_for_time: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # Database errors waited out (each retried), and the last one.
    errors: int = 0
    last_error: str | None = None

    def note_error(self, error: str) -> None:
        self.errors += 1
        self.last_error = error

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runner:
    """Claims and runs due tasks for one process; `run` may be called again after it returns."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        worker_id: str | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.worker_id = worker_id or new_worker_id()
        self._out = out
        self._wake = asyncio.Event()
        # The database time up to which this runner means to sleep (Unix seconds);
        # a notification of a task due earlier than that wakes it.
        self._sleep_until = 0.0
        self._sleeping = False
        self._runs = 0
        self._reset()

    def _reset(self) -> None:
        # Everything claimed and not yet recorded or handed back, by task id.
        self._held: dict[int, Claimed] = {}
        # Tasks of kinds that wait, while they run; and those waiting for a slot of their kind.
        self._running: dict[int, asyncio.Future[Any]] = {}
        self._queued: dict[str, deque[Claimed]] = {name: deque() for name in KINDS}
        self._active: Counter[str] = Counter()
        self._timed_out: set[int] = set()
        # Results whose lines are out (or that print none), to be written; the batch in flight.
        self._pending: list[Result] = []
        self._writing: list[Result] = []
        self._results_ready = asyncio.Event()
        self._backlog_since = 0.0
        self._last_write_done = 0.0
        # Tasks whose last write failed with its connection: it may have committed.
        self._maybe_written: set[int] = set()
        # Set when the last claim failed with its connection: it may have committed.
        self._unsure_of_holdings = False
        self._claim_lock = asyncio.Lock()
        self._http: HttpClients | None = None
        # Why this run stops early: a failure (the process must exit non-zero), or a lost
        # lease (the caller starts again as a new worker).
        self._halt = asyncio.Event()
        self._failure: str | None = None
        self.lease_lost = False
        self._print_error: str | None = None
        # Results whose line is with the writer, not out yet (recorded once it is), and
        # since when lines have waited for it (time.monotonic()).
        self._printing: dict[int, Result] = {}
        self._printing_since = 0.0
        self._last_line_out = 0.0
        self._writer: LineWriter | None = None
        # Counts for /stats by 10-second bucket of the database's time, not yet written;
        # the database's clock less this process's (from each claim's answer).
        self._activity: dict[int, Activity] = {}
        self._db_offset_s = 0.0

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def notify(self, due_s: float | None = None) -> None:
        """Wake the runner: a task due at `due_s` (None: unknown) was created.

        While asleep, only a task due before it would wake anyway is news. While awake (a
        claim in flight, whose snapshot may predate this task), every one is: the claim
        loop looks again before it sleeps, or the task waits for the next poll.
        """
        if due_s is None or not self._sleeping or due_s < self._sleep_until:
            self._wake.set()

    # --- the run -----------------------------------------------------------------------------

    async def run(
        self,
        *,
        deadline: float | None = None,
        keep_polling: bool = False,
        stop: asyncio.Event | None = None,
    ) -> TickSummary:
        """Run due tasks until none is due (or, with `keep_polling`, until `stop` or `deadline`).

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
        summary = TickSummary(worker=self.worker_id)
        kinds_at_start = self._kinds_that_fit(deadline)
        sent_at = time.monotonic()
        await self.store.register_worker(worker=self.worker_id, lease_s=self.settings.lease_seconds)
        # From here on this worker holds a lease: every way out goes through _shut_down.
        self._writer = LineWriter(self.out, self._lines_out)
        self._writer.renewed(sent_at, self.settings.lease_seconds)
        if keep_polling and deadline is None:  # a worker (`worker`, `dev`), not a tick
            logger.info(
                "action=start worker=%s kinds=%s concurrency=%d lease_s=%g database=%s:"
                " claiming due tasks",
                self.worker_id, ",".join(KINDS), self.settings.concurrency,
                self.settings.lease_seconds, conninfo.database_for_log(self.settings.database_url),
            )  # fmt: skip
        loops = [
            asyncio.create_task(self._guard(self._write_loop(summary), "write")),
            asyncio.create_task(self._guard(self._heartbeat_loop(summary), "heartbeat")),
            asyncio.create_task(self._guard(self._activity_loop(), "activity")),
        ]
        try:
            try:
                await self._rescue(summary)
                await self._prune_if_due(summary, deadline)
            except DatabaseUnavailable as exc:
                summary.note_error(str(exc))
            await self._claim_loop(summary, deadline, keep_polling, stop)
        finally:
            await self._shut_down(summary, deadline, loops)
        if deadline is not None:
            await self._count_left_for_time(summary, deadline, kinds_at_start)
        summary.seconds = round(time.monotonic() - started, 3)
        if self._failure is not None:
            raise WorkerFailed(self._failure)
        return summary

    async def _guard(self, loop: Any, name: str) -> None:
        """Run a background loop; if it breaks, say so and stop the run (never die silently)."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("action=%s worker=%s: unexpected error", name, self.worker_id)
            self._fail(f"the {name} loop failed: {type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
            logger.error(
                "action=stop worker=%s: %s; stopped claiming, handing back what it holds",
                self.worker_id, reason,
            )  # fmt: skip
        self._halt.set()

    def _kinds_that_fit(self, deadline: float | None) -> list[str]:
        if deadline is None:
            return list(KINDS)
        left_s = deadline - time.monotonic() - self.settings.deadline_margin_s
        return [name for name, kind in KINDS.items() if kind.max_seconds(self.settings) <= left_s]

    async def _count_left_for_time(
        self, summary: TickSummary, deadline: float, kinds_at_start: list[str]
    ) -> None:
        """Count due tasks whose kind did not fit; warn when a kind never could this run."""
        unfit = [name for name in KINDS if name not in self._kinds_that_fit(deadline)]
        if not unfit:
            return
        try:
            summary.left_for_time = await self.store.count_due_by_kind(kinds=unfit)
        except (DatabaseUnavailable, DatabaseError) as exc:
            summary.note_error(str(exc))
            return
        never = {k: n for k, n in summary.left_for_time.items() if k not in kinds_at_start}
        if never:
            margin_s = self.settings.deadline_margin_s
            needs = ", ".join(
                f"{k} ({n} due; needs {KINDS[k].max_seconds(self.settings) + margin_s:.0f} s)"
                for k, n in sorted(never.items())
            )
            logger.warning(
                "action=tick worker=%s: left tasks no run this short can finish: %s;"
                " give the tick a longer timeout",
                self.worker_id, needs,
            )  # fmt: skip

    # --- claim -------------------------------------------------------------------------------

    def _room(self) -> int:
        """How many tasks the next claim may take (0: none now)."""
        if len(self._pending) >= self.store.WRITE_BATCH:
            return 0  # a full batch already waits for the writer
        if self._pending or self._writing:
            waited_s = time.monotonic() - max(self._backlog_since, self._last_write_done)
            if waited_s > _SLOW_WRITE_S:
                return 0  # writes are slow: claim nothing more until they catch up
        if self._printing:
            waited_s = time.monotonic() - max(self._printing_since, self._last_line_out)
            if waited_s > _SLOW_WRITE_S:
                return 0  # stdout is slow (a reader that does not keep up): the same
        free = self.settings.concurrency - len(self._held)
        return max(0, min(free, self.settings.claim_batch, self.store.WRITE_BATCH))

    async def _claim_loop(
        self,
        summary: TickSummary,
        deadline: float | None,
        keep_polling: bool,
        stop: asyncio.Event,
    ) -> None:
        db_retry_s = _DB_RETRY_FIRST_S
        while not stop.is_set() and not self._halt.is_set():
            kinds = self._kinds_that_fit(deadline)
            if not kinds:
                return  # too close to the deadline to start anything
            self._wake.clear()
            wait_s: float | None = None  # None: until woken
            try:
                if self._unsure_of_holdings:
                    await self._reconcile(summary)
                room = self._room()
                if deadline is not None:
                    kinds, room = self._within_slots(kinds, room)
                if room > 0:
                    claimed, due = await self._claim(kinds, room)
                    summary.claimed += len(claimed)
                    if len(claimed) == room:
                        await asyncio.sleep(0)  # let the started tasks begin
                        continue  # more may be due
                    wait_s = self._time_to(due)
                db_retry_s = _DB_RETRY_FIRST_S
            except DatabaseUnavailable as exc:
                logger.warning("action=claim worker=%s: %s; retrying", self.worker_id, exc)
                summary.note_error(str(exc))
                wait_s, db_retry_s = db_retry_s, min(db_retry_s * 2, _DB_RETRY_MAX_S)
            if not keep_polling and not self._held and (wait_s is None or wait_s > 0):
                return  # drained: nothing held, nothing due
            if deadline is not None:
                left_s = deadline - time.monotonic() - self.settings.deadline_margin_s
                wait_s = left_s if wait_s is None else min(wait_s, left_s)
            if not keep_polling and wait_s is not None and wait_s > 0 and self._held:
                wait_s = None  # a tick only waits for its own tasks, then looks again
            if wait_s is None:
                # Room frees up when a write completes; look again within a poll interval
                # in any case (a stalled write's backlog has a time limit).
                wait_s = self.settings.poll_interval_s
            await self._sleep(wait_s, stop)

    def _within_slots(self, kinds: list[str], room: int) -> tuple[list[str], int]:
        """Before a deadline, claim no more of a kind than it has free slots for (`bar`:
        TASKRUNNER_BAR_CONCURRENCY): one that waited for a slot could start too late to
        finish in time. A kind with none free is left out of the claim."""
        fitting = []
        for name in kinds:
            limit = KINDS[name].concurrency(self.settings)
            if limit is not None:
                free = limit - self._active[name] - len(self._queued[name])
                if free <= 0:
                    continue
                room = min(room, free)
            fitting.append(name)
        return fitting, room if fitting else 0

    async def _claim(self, kinds: list[str], limit: int) -> tuple[list[Claimed], NextDue]:
        async with self._claim_lock:
            sent_at = time.monotonic()
            try:
                claimed, due = await self.store.claim_due(
                    worker=self.worker_id,
                    kinds=kinds,
                    limit=limit,
                    lease_s=self.settings.lease_seconds,
                )
            except DatabaseUnavailable:
                # The claim may have committed before its answer was lost: hand back what
                # the database says this worker holds, once it answers again.
                self._unsure_of_holdings = True
                raise
            for task in claimed:
                self._held[task.id] = task
        if claimed:  # (none: nothing was due, or the lease had run out)
            self._renewed(sent_at)
        self._db_offset_s = due.now_s - time.time()
        if claimed:  # (a tick with nothing to do writes no activity: a statement less)
            activity = self._activity_now()
            for task in claimed:
                if task.lateness_ms is not None:
                    activity.start(task.lateness_ms)
        for task in claimed:
            self._start(task)
        return claimed, due

    async def _reconcile(self, summary: TickSummary) -> None:
        """Hand back tasks the database says this worker holds that it never heard of."""
        async with self._claim_lock:
            in_database = await self.store.held_by(worker=self.worker_id)
            unknown = sorted(in_database - self._held.keys())
            # (A task finished while `held_by` read is in `unknown` too: the release is
            # fenced and leaves it alone, and only what was handed back is reported.)
            released = (
                await self.store.release(worker=self.worker_id, ids=unknown) if unknown else set()
            )
            if released:
                summary.released += len(released)
                logger.warning(
                    "action=release worker=%s count=%d: tasks claimed by a claim whose answer"
                    " was lost; handed back without using an attempt",
                    self.worker_id, len(released),
                )  # fmt: skip
            self._unsure_of_holdings = False

    def _time_to(self, due: NextDue) -> float:
        """Seconds until the next task is due by the database's clock, capped by polling."""
        wait_s = self.settings.poll_interval_s
        if due.wait_s is not None:
            wait_s = min(max(0.0, due.wait_s), wait_s)
        self._sleep_until = due.now_s + wait_s
        return wait_s

    async def _sleep(self, wait_s: float, stop: asyncio.Event) -> None:
        """Sleep `wait_s`, or until a notification, freed room, `stop` or a halt."""
        if wait_s <= 0:
            return
        waiters = [
            asyncio.create_task(self._wake.wait()),
            asyncio.create_task(stop.wait()),
            asyncio.create_task(self._halt.wait()),
        ]
        self._sleeping = True
        try:
            await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._sleeping = False
            for waiter in waiters:
                waiter.cancel()

    # --- run ---------------------------------------------------------------------------------

    def _lend_http(self) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        if self._http is None:
            self._http = HttpClients(self.settings)
        return self._http.lend()

    def _start(self, claimed: Claimed) -> None:
        kind = KINDS[claimed.kind]
        if kind.instant:
            # No asyncio task for a kind that returns at once: creating and scheduling one
            # per run held a worker draining baz to 12,900/s; inline, 14,400/s.
            ctx = Context(claimed.id, claimed.attempt, self.settings, self._lend_http)
            try:
                line = kind.run(ctx)
            except Exception as exc:
                self._record(claimed, None, exc)
            else:
                self._record(claimed, line, None)
            return
        limit = kind.concurrency(self.settings)
        if limit is not None and self._active[kind.name] >= limit:
            self._queued[kind.name].append(claimed)
            return
        self._launch(kind, claimed)

    def _launch(self, kind: Kind, claimed: Claimed) -> None:
        ctx = Context(claimed.id, claimed.attempt, self.settings, self._lend_http)
        self._active[kind.name] += 1
        # The kind's own coroutine is the task, recorded by a done-callback: no wrapping
        # coroutine per task, whose frames cost time when 10,000 foo tasks start at once.
        task = asyncio.ensure_future(kind.run(ctx))  # type: ignore[arg-type]
        # A run far longer than its kind declares is stopped and fails its attempt: nothing a
        # worker holds waits forever (its lease would keep it from everyone else).
        timer = asyncio.get_running_loop().call_later(
            time_limit_s(kind, self.settings), self._time_out, claimed.id
        )
        task.add_done_callback(functools.partial(self._on_done, claimed, timer))
        self._running[claimed.id] = task

    def _time_out(self, task_id: int) -> None:
        task = self._running.get(task_id)
        if task is not None and not task.done():
            self._timed_out.add(task_id)
            task.cancel()

    def _on_done(
        self, claimed: Claimed, timer: asyncio.TimerHandle, task: asyncio.Future[Any]
    ) -> None:
        timer.cancel()
        self._running.pop(claimed.id, None)
        self._active[claimed.kind] -= 1
        self._start_queued(claimed.kind)
        if task.cancelled():
            if claimed.id in self._timed_out:
                self._timed_out.discard(claimed.id)
                limit_s = time_limit_s(KINDS[claimed.kind], self.settings)
                self._record(
                    claimed,
                    None,
                    TimeoutError(f"ran longer than its kind's limit of {limit_s:g} s"),
                )
            return  # shutting down or lease lost: handed back, never recorded
        exc = task.exception()
        if exc is None:
            self._record(claimed, task.result(), None)
        else:
            self._record(claimed, None, exc)

    def _start_queued(self, kind_name: str) -> None:
        queue = self._queued[kind_name]
        kind = KINDS[kind_name]
        limit = kind.concurrency(self.settings)
        while (
            queue and not self._halt.is_set() and (limit is None or self._active[kind_name] < limit)
        ):
            self._launch(kind, queue.popleft())

    def _record(self, claimed: Claimed, line: object, exc: BaseException | None) -> None:
        """Print a run's line and queue its result for the next batched write."""
        if claimed.id not in self._held:
            return  # no longer this worker's (handed back while it ran)
        if exc is None and not isinstance(line, str):
            exc = TypeError(f"kind {claimed.kind} returned {type(line).__name__}, not a str")
        if exc is None:
            assert isinstance(line, str)
            line = clean_text(line)  # what is stored is what is printed
            if self._print_error is not None or self._writer is None:
                return  # not printed: handed back at shutdown, for a worker that can print
            # Recorded once its line is out (_lines_out).
            if not self._printing:
                self._printing_since = time.monotonic()
            self._printing[claimed.id] = Result(
                claimed.id, claimed.attempt, TaskState.SUCCEEDED, line
            )
            self._writer.put(claimed.id, line)
            return
        else:
            error = clean_text(f"{type(exc).__name__}: {exc}".rstrip(": "))
            if claimed.attempt < claimed.max_attempts:
                delay_s = retry_delay_s(self.settings, claimed.attempt)
                result = Result(
                    claimed.id, claimed.attempt, TaskState.SCHEDULED, None, error, delay_s
                )
                logger.warning(
                    "action=retry task_id=%s attempt=%s/%s in=%.1fs: %s",
                    claimed.id, claimed.attempt, claimed.max_attempts, delay_s, error,
                )  # fmt: skip
            else:
                result = Result(claimed.id, claimed.attempt, TaskState.FAILED, error=error)
                logger.error(
                    "action=fail task_id=%s attempt=%s/%s: %s",
                    claimed.id, claimed.attempt, claimed.max_attempts, error,
                )  # fmt: skip
        if not self._pending and not self._writing:
            self._backlog_since = time.monotonic()
        self._pending.append(result)
        self._results_ready.set()

    def _lines_out(self) -> None:
        """Queue the results of the runs whose lines the writer got out (on the loop)."""
        if self._writer is None:
            return
        out = self._writer.take_out()
        if out:
            self._last_line_out = time.monotonic()
        for task_id in out:
            result = self._printing.pop(task_id, None)
            if result is not None and task_id in self._held:
                if not self._pending and not self._writing:
                    self._backlog_since = time.monotonic()
                self._pending.append(result)
        if out:
            self._results_ready.set()
            if not self._printing:
                self._wake.set()  # room is free again
        if self._writer.error is not None and self._print_error is None:
            self._printing_failed(self._writer.error)

    def _renewed(self, sent_at: float) -> None:
        """The lease was renewed by a statement sent at `sent_at`: lines may be written
        up to then plus the lease, less a margin (functions/output.py)."""
        if self._writer is not None:
            self._writer.renewed(sent_at, self.settings.lease_seconds)

    def _printing_failed(self, error: str) -> None:
        self._print_error = error
        self._fail(
            f"cannot print task output ({self._print_error}); the tasks whose lines were not"
            " printed are handed back"
        )

    # --- record ------------------------------------------------------------------------------

    async def _write_loop(self, summary: TickSummary) -> None:
        retry_s = _DB_RETRY_FIRST_S
        while True:
            if not self._pending:
                self._results_ready.clear()
                await self._results_ready.wait()
                continue
            batch = self._pending[: self.store.WRITE_BATCH]
            del self._pending[: len(batch)]
            self._writing = batch
            try:
                await self._write(batch, summary)
            except (DatabaseUnavailable, asyncio.CancelledError) as exc:
                # Kept, and maybe written already: tried again here, or (stopped mid-write at
                # shutdown) written there or handed back.
                self._pending[:0] = batch
                self._maybe_written.update(r.id for r in batch)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                logger.warning(
                    "action=finish worker=%s: %s; %d results kept, retrying in %.1fs",
                    self.worker_id, exc, len(self._pending), retry_s,
                )  # fmt: skip
                summary.note_error(str(exc))
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, _DB_RETRY_MAX_S)
                continue
            finally:
                self._writing = []
            retry_s = _DB_RETRY_FIRST_S
            self._last_write_done = time.monotonic()
            self._wake.set()  # room is free again

    async def _write(self, batch: list[Result], summary: TickSummary) -> None:
        """Record one batch of results, each fenced (see queries.FINISH_MANY)."""
        # A run's line is out before its result is queued here (_lines_out): a crash in
        # between can print a line again on the retry, but a run whose line was not printed
        # is never recorded.
        try:
            written = await self.store.finish_many(worker=self.worker_id, results=batch)
        except DatabaseError:
            written, batch = await self._write_one_by_one(batch)
        unsure = [r for r in batch if r.id not in written and r.id in self._maybe_written]
        if unsure:
            written |= await self.store.recorded(unsure)
        activity = self._activity_now()
        for result in batch:
            self._maybe_written.discard(result.id)
            self._held.pop(result.id, None)
            if result.id not in written:
                summary.lost += 1
                logger.warning(
                    "action=finish task_id=%s attempt=%s worker=%s: no longer held by this"
                    " worker (its lease ran out and the task was rescued): result dropped",
                    result.id, result.attempt, self.worker_id,
                )  # fmt: skip
            elif result.state is TaskState.SUCCEEDED:
                summary.succeeded += 1
                activity.succeeded += 1
            elif result.state is TaskState.FAILED:
                summary.failed += 1
                activity.failed += 1
            else:
                summary.retried += 1
                activity.retried += 1

    async def _write_one_by_one(self, batch: list[Result]) -> tuple[set[int], list[Result]]:
        """The database refused a batch: write each result alone, and record the run of any
        it still refuses as failed with the database's reason. Returns the ids written and
        the results as written."""
        written: set[int] = set()
        results: list[Result] = []
        for result in batch:
            try:
                written |= await self.store.finish_many(worker=self.worker_id, results=[result])
            except DatabaseError as exc:
                logger.error(
                    "action=finish task_id=%s worker=%s: the database refused its result: %s",
                    result.id, self.worker_id, exc,
                )  # fmt: skip
                result = Result(
                    result.id,
                    result.attempt,
                    TaskState.FAILED,
                    error=clean_text(f"its result could not be recorded: {exc}"),
                )
                written |= await self.store.finish_many(worker=self.worker_id, results=[result])
            results.append(result)
        return written, results

    # --- heartbeat ---------------------------------------------------------------------------

    async def _heartbeat_loop(self, summary: TickSummary) -> None:
        """Renew the lease every third of it; rescue dead workers' tasks; reconcile."""
        interval_s = self.settings.lease_seconds / 3
        wait_s = interval_s
        while True:
            await asyncio.sleep(wait_s)
            try:
                sent_at = time.monotonic()
                # Bounded by the interval: a renewal that takes longer is late anyway.
                alive = await self.store.heartbeat(
                    worker=self.worker_id,
                    lease_s=self.settings.lease_seconds,
                    timeout_s=interval_s,
                )
                if not alive:
                    self._lose_lease()
                    return
                self._renewed(sent_at)
                await self._rescue(summary)
                await self._reconcile(summary)
                await self._prune_if_due(summary, None)
                wait_s = interval_s
            except DatabaseUnavailable as exc:
                logger.warning("action=heartbeat worker=%s: %s", self.worker_id, exc)
                summary.note_error(str(exc))
                wait_s = min(interval_s, 1.0)

    def _lose_lease(self) -> None:
        self.lease_lost = True
        logger.error(
            "action=heartbeat worker=%s: this worker's lease ran out (it could not renew it"
            " for %.0f s: a stalled process or database); its tasks are rescued by others."
            " Handing back what it still holds and starting again as a new worker",
            self.worker_id, self.settings.lease_seconds,
        )  # fmt: skip
        if self._writer is not None:
            self._writer.close()  # no line more: those tasks may be running elsewhere
        self._halt.set()

    async def _rescue(self, summary: TickSummary) -> None:
        rescued = await self.store.rescue_expired()
        summary.rescued += len(rescued)
        failed = sum(state is TaskState.FAILED for _, state in rescued)
        if failed:
            self._activity_now().failed += failed
        for task_id, state in rescued[:_LOG_EACH_UP_TO]:
            logger.warning(
                "action=rescue task_id=%s state=%s: its worker's lease ran out", task_id, state
            )
        if len(rescued) > _LOG_EACH_UP_TO:
            logger.warning(
                "action=rescue count=%d: and %d more tasks whose worker's lease ran out",
                len(rescued), len(rescued) - _LOG_EACH_UP_TO,
            )  # fmt: skip
        if rescued:
            self._wake.set()

    async def _prune_if_due(self, summary: TickSummary, deadline: float | None) -> None:
        """Delete finished tasks past the retention, if this process has not for a while."""
        global _last_prune
        retention_s = self.settings.retention_s
        now = time.monotonic()
        if retention_s == 0 or (_last_prune is not None and now - _last_prune < _PRUNE_EVERY_S):
            return
        budget_s = _PRUNE_BUDGET_S
        if deadline is not None:
            budget_s = min(budget_s, deadline - now - self.settings.deadline_margin_s)
            if budget_s <= 0:
                return
        _last_prune = now
        pruned = await tasks.prune(self.store, older_than_s=retention_s, budget_s=budget_s)
        summary.pruned += pruned
        if pruned:
            logger.info(
                "action=prune worker=%s count=%d: finished over %.0f s ago",
                self.worker_id, pruned, retention_s,
            )  # fmt: skip

    # --- activity ----------------------------------------------------------------------------

    def _activity_now(self) -> Activity:
        bucket = bucket_of(time.time() + self._db_offset_s)
        activity = self._activity.get(bucket)
        if activity is None:
            activity = self._activity[bucket] = Activity()
        return activity

    async def _activity_loop(self) -> None:
        """Write this worker's activity counts every couple of seconds."""
        while True:
            await asyncio.sleep(_ACTIVITY_EVERY_S)
            with contextlib.suppress(DatabaseUnavailable):
                await self._write_activity()

    async def _write_activity(self) -> None:
        if not self._activity:
            return
        activity, self._activity = self._activity, {}
        try:
            await self.store.add_activity(activity)
        except DatabaseUnavailable:
            for bucket, counts in activity.items():  # kept for the next try
                self._activity[bucket] = merge_activity(self._activity.get(bucket), counts)
            raise

    # --- shut down ---------------------------------------------------------------------------

    async def _shut_down(
        self, summary: TickSummary, deadline: float | None, loops: list[asyncio.Task[None]]
    ) -> None:
        """Let running tasks finish within the grace period, record them, hand back the rest."""
        grace_s = self.settings.shutdown_grace_s
        if deadline is not None:
            # What is left of the run, less a second for the writes and the hand-back below.
            grace_s = min(grace_s, max(0.0, deadline - time.monotonic() - _FINAL_WRITES_S))
        if self._halt.is_set():
            grace_s = 0.0  # a failure or a lost lease: nothing more will be recorded as run
        self._halt.set()  # no queued task starts from here on
        unfinished = [task for task in self._running.values() if not task.done()]
        if unfinished and grace_s > 0:
            await asyncio.wait(unfinished, timeout=grace_s)
        if self._unsure_of_holdings:
            # The last claim's answer was lost: what it took is handed back now, not left
            # until this worker's lease runs out (which would cost those tasks an attempt).
            try:
                await self._reconcile(summary)
            except (DatabaseUnavailable, DatabaseError) as exc:
                summary.note_error(str(exc))
        cancelled = [task for task in self._running.values() if not task.done()]
        for task in cancelled:
            task.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)

        # The write loop records what is left, within the grace period (a second at least,
        # but for a run with a deadline: what it does not write is written below).
        write_loop = loops[0]
        until = time.monotonic() + (grace_s if deadline is not None else max(grace_s, 1.0))
        writer = self._writer
        # Lines already with the writer get a moment even with no grace left (a run near its
        # deadline): normally they are out within a millisecond, and a run whose line is out
        # is recorded rather than run again.
        lines_until = max(until, time.monotonic() + _LINES_AT_SHUTDOWN_S)
        while ((self._pending or self._writing) and time.monotonic() < until) or (
            self._printing
            and writer is not None
            and not writer.closed
            and time.monotonic() < lines_until
        ):
            if write_loop.done():
                break  # it broke: nothing more will be written
            await asyncio.sleep(0.01)
        # Lines not out by now never will be: their tasks are handed back below.
        if writer is not None:
            writer.close()
            await writer.wait_closed()
            self._lines_out()
        self._printing.clear()
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        # Results the write loop did not get to (it was backing off from an outage, or had
        # no time) are written now, not handed back: a run that happened is recorded rather
        # than run again. Fenced as ever: a task rescued meanwhile is left to its new holder.
        while self._pending:
            batch = self._pending[: self.store.WRITE_BATCH]
            del self._pending[: len(batch)]
            try:
                await self._write(batch, summary)
            except (DatabaseUnavailable, DatabaseError) as exc:
                summary.note_error(str(exc))
                break  # the database is not answering: the release below will not either
        if self._http is not None:
            await self._http.aclose()
            self._http = None

        # Whatever is still held was not recorded: hand it back (fenced: what this worker
        # no longer holds is left alone).
        if self._held:
            ids = sorted(self._held)
            try:
                released = await self.store.release(worker=self.worker_id, ids=ids)
                summary.released += len(released)
                logger.info(
                    "action=release worker=%s count=%d: back to scheduled",
                    self.worker_id, len(released),
                )  # fmt: skip
            except (DatabaseUnavailable, DatabaseError) as exc:
                logger.error(
                    "action=release worker=%s: %s; %d tasks stay with this worker until its"
                    " lease runs out, then they are rescued and run again",
                    self.worker_id, exc, len(ids),
                )  # fmt: skip
        try:
            await self._write_activity()
        except (DatabaseUnavailable, DatabaseError) as exc:
            logger.warning("action=activity worker=%s: %s; counts not written", self.worker_id, exc)
        try:
            await self.store.deregister_worker(worker=self.worker_id)
        except (DatabaseUnavailable, DatabaseError) as exc:
            logger.warning("action=deregister worker=%s: %s", self.worker_id, exc)
        self._held.clear()
        self._pending.clear()
