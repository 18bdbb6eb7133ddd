"""The result writer: a run's results recorded in bounded batches, each write fenced.

The runner hands each result over (`add`) as its run ends; the write loop (`run`) writes
them a batch at a time (queries.FINISH_MANY: zero rows for a task means this worker no
longer held it, and its result is dropped). A batch with lines to print prints them between
its write and its commit (`Store.finish_many_after`): only the lines of the rows written,
that is still running and this worker's, and it commits once they are out. Meanwhile those
rows stay locked, so a cancel either came first (nothing printed) or waits and finds the
task finished: never a cancelled task with its line printed. The wait for the lines is
bounded (PRINT_WAIT_S, a stdout that is not read): what is not out by then is withdrawn,
never printed, the batch is rolled back, and written again later (what did get out is not
printed again). A batch whose write fails with its connection is kept and tried again, and
may have committed: what is not written the second time is looked up before it is counted
lost.

Backpressure, as River's completer has it: while a full batch waits, or results have
waited on a write that is slow, the runner claims nothing more (`should_wait`). It claims
again as soon as neither holds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import traceback

from functions.errors import DatabaseError, DatabaseUnavailable
from functions.kinds import Fail, Retry
from functions.model import MAX_TRACEBACK_BYTES, TaskState, normalise_error
from functions.output import Printer
from functions.run_state import RunState
from functions.settings import Settings
from functions.store import Claimed, Result

# The worker's lines keep one logger name, whichever of its parts writes them (filters use it).
logger = logging.getLogger("functions.runner")

# After a database error the writer waits this long, doubling up to the cap, then tries again.
DB_RETRY_FIRST_S = 0.1
DB_RETRY_MAX_S = 5.0
# Results waiting, and no write has completed for this long: writes are slow, stop claiming.
# A write of a full batch takes ~20 ms here.
SLOW_WRITE_S = 1.0
# A task's output and error are stored up to this many characters.
_MAX_TEXT = 16_384
# How long a batch's rows stay locked, uncommitted, waiting for its lines to be out: well
# within the statement bound, which is also the server's idle-in-transaction timeout. A
# normal stdout takes a millisecond for a batch; one not read makes the batch roll back.
PRINT_WAIT_S = 1.0
# Batches written at once: while one waits for its lines to be out before its commit, the
# next is written (one at a time, a worker drained 20% fewer baz a second).
_IN_FLIGHT = 2


def clean_text(text: str) -> str:
    """`text` as PostgreSQL can store it (no NUL, no lone surrogate), cut to _MAX_TEXT."""
    text = clean_text_unbounded(text)
    if len(text) > _MAX_TEXT:
        text = f"{text[: _MAX_TEXT - 40]}... ({len(text):,} characters in all)"
    return text


def message_of(exc: BaseException) -> str:
    """`str(exc)`, or what stands for it when a kind's exception cannot say it (its
    `__str__` raises): the attempt still fails as any other, and the worker goes on."""
    try:
        return str(exc)
    except Exception as failed:  # (as Python's own traceback printing does)
        return f"<str() raised {type(failed).__name__}>"


def traceback_of(exc: BaseException) -> str | None:
    """`exc` formatted as Python prints it, its chain included, as PostgreSQL can store it;
    its last MAX_TRACEBACK_BYTES (UTF-8) when longer: the end holds the error. None for an
    error never raised (a time limit's)."""
    if exc.__traceback__ is None:
        return None
    text = clean_text_unbounded("".join(traceback.format_exception(exc)))
    data = text.encode()
    if len(data) <= MAX_TRACEBACK_BYTES:
        return text
    head = f"... ({len(data):,} bytes in all; the last of them:)\n"
    tail = data[len(data) - (MAX_TRACEBACK_BYTES - len(head.encode())) :]
    return head + tail.decode(errors="ignore")


def clean_text_unbounded(text: str) -> str:
    """`text` as PostgreSQL can store it: no NUL, no lone surrogate."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode()
    return text


def retry_delay_s(settings: Settings, attempt: int) -> float:
    """Exponential backoff: base, 2x base, 4x base... capped at retry_max_s."""
    # A float power, capped: 2 ** 1024 as an int does not convert to a float at all.
    return float(min(settings.retry_max_s, settings.retry_base_s * 2.0 ** min(attempt - 1, 100)))


def _number(value: object) -> bool:
    """A finite int or float (not a bool): what `Retry(after_s)` must be to be honoured."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def result_of(
    claimed: Claimed,
    line: object,
    exc: BaseException | None,
    settings: Settings,
    duration_s: float | None = None,
    *,
    timed_out: bool = False,
) -> Result:
    """A run's result: succeeded with its line (or none), or the retry or failure its error
    earns: `Fail` fails the task at once, whatever attempts it has left; `Retry` sets when
    the next attempt is due (at most retry_max_s), in place of the backoff. A failure
    carries its traceback and its normalised error, for the attempt's row; `duration_s` and
    `timed_out` (stopped at its time limit) are passed on for the totals of /metrics
    (functions/counters.py) and the attempt's outcome."""
    result = _result_of(claimed, line, exc, settings, duration_s, timed_out)
    if claimed.ahead_s > 0 and claimed.lateness_ms is not None:
        return result._replace(late_s=claimed.lateness_ms / 1000)
    return result


def _result_of(
    claimed: Claimed,
    line: object,
    exc: BaseException | None,
    settings: Settings,
    duration_s: float | None,
    timed_out: bool,
) -> Result:
    if exc is None:
        if line is None or isinstance(line, str):
            output = None if line is None else clean_text(line)
            return Result(
                claimed.id, claimed.attempt, TaskState.SUCCEEDED, output, None, None, duration_s
            )
        exc = TypeError(f"kind {claimed.kind} returned {type(line).__name__}, not a str or None")
    error = clean_text(f"{type(exc).__name__}: {message_of(exc)}".rstrip(": "))
    trace, group = traceback_of(exc), normalise_error(error)
    if claimed.attempt < claimed.max_attempts and not isinstance(exc, Fail):
        if isinstance(exc, Retry) and _number(exc.after_s):
            delay_s = min(max(0.0, float(exc.after_s)), settings.retry_max_s)
        else:
            delay_s = retry_delay_s(settings, claimed.attempt)
        return Result(
            claimed.id, claimed.attempt, TaskState.SCHEDULED, None, error, delay_s, duration_s,
            timed_out=timed_out, traceback=trace, error_group=group,
        )  # fmt: skip
    return Result(
        claimed.id, claimed.attempt, TaskState.FAILED, error=error, duration_s=duration_s,
        timed_out=timed_out, traceback=trace, error_group=group,
    )  # fmt: skip


def _of(claimed: Claimed | None) -> object:
    """The attempts a task has, for a log line: its claim's, when this worker still knows."""
    return "?" if claimed is None else claimed.max_attempts


class Completer:
    """Writes one run's results; `run` is its loop, `write_rest` what shutdown writes."""

    def __init__(self, state: RunState, printer: Printer[Result]) -> None:
        self.state = state
        self.printer = printer
        # Results whose lines are out, not yet recorded (their batch rolled back, or its
        # commit's answer was lost): recorded without printing again.
        self._printed: set[int] = set()
        # Results to be written; the batch in flight.
        self._pending: list[Result] = []
        self._writing: list[Result] = []
        self._ready = asyncio.Event()
        self._backlog_since = 0.0
        self._last_write_done = 0.0
        # Tasks whose last write failed with its connection: it may have committed.
        self._maybe_written: set[int] = set()
        # Results of attempts this worker no longer holds because it claimed their task
        # again (Runner._stop_superseded), by task and attempt: counted as written, or not.
        self._superseded: dict[tuple[int, int], Claimed] = {}
        # After a database error the writes wait this long, doubling up to DB_RETRY_MAX_S.
        self._retry_s = DB_RETRY_FIRST_S

    def add(self, result: Result) -> None:
        """Queue a result for the next batched write."""
        if not self.busy:
            self._backlog_since = time.monotonic()
        self._pending.append(result)
        self._ready.set()

    def unprinted(self) -> list[int]:
        """The results waiting to be written whose lines are not out: a cancel can still
        stop them."""
        return [
            r.id
            for r in (*self._pending, *self._writing)
            if r.output is not None and r.id not in self._printed
        ]

    @property
    def busy(self) -> bool:
        """Results wait to be written, or a write is under way."""
        return bool(self._pending or self._writing)

    # --- backpressure ------------------------------------------------------------------------

    def backlog_wait_threshold(self) -> int:
        """How many results may wait before claiming stops: a full batch."""
        return self.state.store.WRITE_BATCH

    def writes_stalled(self) -> bool:
        """Results have waited, with no write completed, longer than SLOW_WRITE_S."""
        if not self.busy:
            return False
        waited_s = time.monotonic() - max(self._backlog_since, self._last_write_done)
        return waited_s > SLOW_WRITE_S

    def should_wait(self) -> bool:
        """Claim nothing more now: the writes are behind."""
        return len(self._pending) >= self.backlog_wait_threshold() or self.writes_stalled()

    # --- writes ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Write results as they come, bounded batches, two at a time (one prints its lines
        while the other is written: each holds its rows until its lines are out); wait out
        outages."""
        slots = asyncio.Semaphore(_IN_FLIGHT)
        writes: set[asyncio.Task[None]] = set()
        failed: list[BaseException] = []

        def done(write: asyncio.Task[None]) -> None:
            writes.discard(write)
            slots.release()
            if not write.cancelled() and write.exception() is not None:
                failed.append(write.exception())  # type: ignore[arg-type]
                self._ready.set()

        try:
            while True:
                if failed:
                    raise failed[0]
                if not self._pending:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                await slots.acquire()
                if not self._pending or failed:
                    slots.release()
                    continue
                batch = self._pending[: self.state.store.WRITE_BATCH]
                del self._pending[: len(batch)]
                self._writing += batch
                write = asyncio.create_task(self._write_batch(batch))
                writes.add(write)
                write.add_done_callback(done)
        finally:
            for write in list(writes):
                write.cancel()
            await asyncio.gather(*writes, return_exceptions=True)

    async def _write_batch(self, batch: list[Result]) -> None:
        state = self.state
        try:
            if not await self._write(batch):
                # Its lines did not get out in time: rolled back, written again (the lines
                # that did get out are not printed again).
                self._pending[:0] = batch
                self._ready.set()
                return
        except (DatabaseUnavailable, asyncio.CancelledError) as exc:
            # Kept, and maybe written already: tried again here, or (stopped mid-write at
            # shutdown) written there or handed back.
            self._pending[:0] = batch
            self._maybe_written.update(r.id for r in batch)
            if isinstance(exc, asyncio.CancelledError):
                raise
            logger.warning(
                "action=finish worker=%s: %s; %d results kept, retrying in %.1fs",
                state.worker_id, exc, len(self._pending), self._retry_s,
            )  # fmt: skip
            state.summary.note_error(str(exc))
            await asyncio.sleep(self._retry_s)
            self._retry_s = min(self._retry_s * 2, DB_RETRY_MAX_S)
            self._ready.set()
            return
        finally:
            ids = {r.id for r in batch}
            self._writing = [r for r in self._writing if r.id not in ids]
        self._retry_s = DB_RETRY_FIRST_S
        self._last_write_done = time.monotonic()
        if any(r.state is TaskState.SCHEDULED for r in batch):
            state.wake.set()  # a retry: due again at a time the claim loop has not seen
        else:
            state.wake.wrote()

    async def write_rest(self) -> None:
        """Write what the loop did not get to (it was backing off, or had no time): a run
        that happened is recorded rather than run again, but one whose line is not out (the
        printer is closed by now) is left to be handed back. Stops at the first error."""
        self._pending = [r for r in self._pending if r.output is None or r.id in self._printed]
        while self._pending:
            batch = self._pending[: self.state.store.WRITE_BATCH]
            del self._pending[: len(batch)]
            try:
                await self._write(batch)
            except (DatabaseUnavailable, DatabaseError) as exc:
                self.state.summary.note_error(str(exc))
                break  # the database is not answering: the release after this will not either

    def clear(self) -> None:
        self._pending.clear()
        self._printed.clear()
        self._superseded.clear()

    def supersede(self, claimed: Claimed) -> bool:
        """Take over the count of `claimed`'s attempt when its result waits here or is being
        written (the run is over: what the write finds is its outcome); False when none."""
        if not any(
            r.id == claimed.id and r.attempt == claimed.attempt
            for r in (*self._pending, *self._writing)
        ):
            return False
        self._superseded[claimed.id, claimed.attempt] = claimed
        return True

    def _holder(self, result: Result) -> Claimed | None:
        """The claim `result` is of, if this worker still counts it."""
        held = self.state.held_attempt(result)
        return held or self._superseded.get((result.id, result.attempt))

    def drop(self, ids: set[int]) -> None:
        """Write none of the results of `ids` not yet being written (their tasks were
        cancelled; a write under way is fenced, and misses them)."""
        self._pending = [r for r in self._pending if r.id not in ids]
        self._printed -= ids

    async def _finish(self, batch: list[Result]) -> set[int] | None:
        """Write `batch`, each fenced, printing the lines of the rows written before the
        commit; the ids written, or None: rolled back, its lines not all out in time."""
        state = self.state
        if all(r.output is None or r.id in self._printed for r in batch):
            return await state.store.finish_many(worker=state.worker_id, results=batch)

        async def print_lines(written: set[int]) -> bool:
            lines = [
                (r.id, r.output, r)
                for r in batch
                if r.output is not None and r.id in written and r.id not in self._printed
            ]
            out = await self.printer.print_now(lines, PRINT_WAIT_S)
            self._printed |= out
            return len(out) == len(lines)

        return await state.store.finish_many_after(
            worker=state.worker_id, results=batch, before_commit=print_lines
        )

    async def _write(self, batch: list[Result]) -> bool:
        """Record one batch of results, each fenced (see queries.FINISH_MANY); False when
        it was rolled back, its lines not all out in time (nothing of it is counted)."""
        # A run's line is out before its result commits: a crash in between can print a
        # line again on the retry, but a run whose line was not printed is never recorded.
        state = self.state
        summary = state.summary
        if not self.printer.may_print:
            # Printing has stopped for good (stdout failed, the lease ran out): a run whose
            # line is not out is never recorded; it stays held and is handed back.
            batch = [r for r in batch if r.output is None or r.id in self._printed]
        try:
            finished = await self._finish(batch)
        except DatabaseError:
            finished, batch = await self._write_one_by_one(batch)
        if finished is None:
            return False
        written = finished
        unsure = [r for r in batch if r.id not in written and r.id in self._maybe_written]
        if unsure:
            written |= await state.store.recorded(unsure)
        cancelled = await self._cancelled_of(
            [c for r in batch if r.id not in written and (c := self._holder(r)) is not None]
        )
        activity_of = state.activity_by_kind()
        for result in batch:
            self._maybe_written.discard(result.id)
            self._printed.discard(result.id)
            claimed = state.held_attempt(result)
            if claimed is not None:
                del state.held[result.id]
            else:
                claimed = self._superseded.pop((result.id, result.attempt), None)
            if result.id not in written:
                if claimed is None:
                    continue  # stopped while it was being written (or claimed again): counted there
                if result.id in cancelled:
                    summary.cancelled += 1
                    logger.info(
                        "action=cancel task_id=%s attempt=%s worker=%s: cancelled while this"
                        " worker held it; result dropped",
                        result.id, result.attempt, state.worker_id,
                    )  # fmt: skip
                    continue
                summary.lost += 1
                logger.warning(
                    "action=finish task_id=%s attempt=%s worker=%s: no longer held by this"
                    " worker (deleted, or its lease ran out and the task was rescued):"
                    " result dropped",
                    result.id, result.attempt, state.worker_id,
                )  # fmt: skip
                continue
            # Counted by kind and outcome for /stats and /metrics (functions/counters.py).
            activity = activity_of(claimed.kind) if claimed is not None else None
            if result.state is TaskState.SUCCEEDED:
                summary.succeeded += 1
                if activity is not None:
                    activity.succeeded += 1
            elif result.state is TaskState.FAILED:
                summary.failed += 1
                logger.error(
                    "action=fail task_id=%s attempt=%s/%s: %s",
                    result.id, result.attempt, _of(claimed), result.error,
                )  # fmt: skip
                if activity is not None:
                    if result.timed_out:
                        activity.timed_out += 1
                    else:
                        activity.failed += 1
            else:
                summary.retried += 1
                logger.warning(
                    "action=retry task_id=%s attempt=%s/%s in=%.1fs: %s",
                    result.id, result.attempt, _of(claimed), result.retry_in_s, result.error,
                )  # fmt: skip
                if activity is not None:
                    if result.timed_out:
                        activity.timed_out += 1
                    else:
                        activity.retried += 1
            if activity is not None and result.duration_s is not None:
                activity.ran(result.duration_s)
        return True

    async def _cancelled_of(self, dropped: list[Claimed]) -> set[int]:
        """Of the results the database would not take, those whose attempt was cancelled
        (the others were deleted, or rescued after the lease ran out: lost). Unknown when
        the database does not answer: counted lost."""
        if not dropped:
            return set()
        try:
            gone = await self.state.store.no_longer_held(dropped)
        except (DatabaseUnavailable, DatabaseError):
            return set()
        return {task_id for task_id, cancelled in gone.items() if cancelled}

    async def _write_one_by_one(self, batch: list[Result]) -> tuple[set[int], list[Result]]:
        """The database refused a batch: write each result alone, and record the run of any
        it still refuses as failed with the database's reason. Returns the ids written and
        the results as written."""
        store, worker = self.state.store, self.state.worker_id
        written: set[int] = set()
        results: list[Result] = []
        for result in batch:
            try:
                written |= await self._finish([result]) or set()
            except DatabaseError as exc:
                logger.error(
                    "action=finish task_id=%s worker=%s: the database refused its result: %s",
                    result.id, worker, exc,
                )  # fmt: skip
                error = clean_text(f"its result could not be recorded: {exc}")
                result = Result(
                    result.id,
                    result.attempt,
                    TaskState.FAILED,
                    error=error,
                    error_group=normalise_error(error),
                    duration_s=result.duration_s,
                )
                written |= await store.finish_many(worker=worker, results=[result])
            results.append(result)
        return written, results
