"""Task lines to stdout from a thread of their own: output never stops the event loop.

A reader that is slow (`taskrunner worker | (sleep 25; cat)`) fills the pipe, and a write
to a full pipe blocks. On the event loop that blocked the heartbeat, the claims and the API
with it: a worker's lease ran out under the tasks it held, and they ran again elsewhere
(20,000 baz, lease 8 s: 1,000 ran twice). Here the loop hands each line to `LineWriter.put`
and carries on; the thread writes and reports which lines are out, and only then are their
results recorded.

A line is written only while the worker's lease covers it, by this process's monotonic
clock: `renewed` says when a renewal was sent, and past that plus the lease, less a margin,
nothing is written (the lines wait for the next renewal; if the lease turns out lost, they
are never written and their tasks are handed back). A process paused past its lease (a
stopped host, SIGSTOP) therefore does not print, when it wakes, the lines of tasks another
worker has rescued and run. The check is made right before each write, in the thread.

To a file descriptor (stdout, normally), lines go out in writes of at most PIPE_BUF bytes,
each made once `poll` says it will not block, so each is all out or not at all on a pipe,
and the thread never sits in a write it cannot leave. Other streams (tests' StringIO) are
written line by line and flushed.

`Printer` is a run's accounting around its `LineWriter`: what waits for its line to be out
(handed on once it is), since when, and whether stdout has become too slow to claim more.
`Printer.print_now` prints a batch's lines and waits for them, a bounded time (the completer
holds the batch's rows meanwhile); those not out by then are withdrawn
(`LineWriter.withdraw`): a line whose write has not begun is never written after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TextIO, TypeVar

T = TypeVar("T")

# A write of at most this many bytes to a pipe is all out or not at all (POSIX).
CHUNK_BYTES = select.PIPE_BUF
# How often a waiting thread looks again at a stop, a renewal, a pipe that drains.
_POLL_S = 0.1


def lease_margin_s(lease_s: float) -> float:
    """How long before its lease runs out a worker stops printing: a second, or a tenth of
    the lease if that is more (what a renewal's round trip and clocks' drift may take)."""
    return max(1.0, lease_s / 10)


class LineWriter:
    """Writes lines to `out` from a daemon thread; `on_out` (called on the event loop, from
    the thread) hears that some are out: `take_out` then returns their keys."""

    def __init__(self, out: TextIO, on_out: Callable[[], None]) -> None:
        self._out = out
        self._on_out = on_out
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = None
        with contextlib.suppress(AttributeError, OSError, ValueError):
            self._fd = out.fileno()
            out.flush()  # what is in its buffer goes first; from here on it is bypassed
        self._encoding = getattr(out, "encoding", None) or "utf-8"
        self._lock = threading.Condition()
        self._queue: deque[tuple[int, str]] = deque()
        self._done: list[int] = []
        # The batch the thread has taken, those of it withdrawn before their write began,
        # and whether its write has begun (from then on it is out, or stdout failed).
        self._current: list[tuple[int, str]] = []
        self._withdrawn: set[int] = set()
        self._in_write = False
        self._signalled = False
        self._closing = False
        # time.monotonic() past which no line is written (the lease less its margin).
        self._writable_until = 0.0
        # Why writing stopped for good (stdout closed), once it has.
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="taskrunner-stdout", daemon=True)
        self._thread.start()

    def renewed(self, sent_at: float, lease_s: float) -> None:
        """The lease was renewed by a statement sent at `sent_at` (time.monotonic())."""
        until = sent_at + lease_s - lease_margin_s(lease_s)
        with self._lock:
            if until > self._writable_until:
                self._writable_until = until
                self._lock.notify()

    def put(self, key: int, line: str) -> None:
        """Queue a line (without its newline); `key` comes back from `take_out` once it is out."""
        self.put_many([(key, line)])

    def put_many(self, entries: list[tuple[int, str]]) -> None:
        """Queue lines (key, line), in order, as `put` does each: under one lock, with one
        wake-up of the thread (a lock and a notify a line were 4-6% of a draining worker's
        event loop, py-spy), which takes them all for its next write."""
        with self._lock:
            self._queue.extend(entries)
            self._lock.notify()

    def drop(self, keys: set[int]) -> None:
        """Write none of the queued lines of `keys` (one being written is finished: it is
        out, or will be, and reported so)."""
        with self._lock:
            self._queue = deque(entry for entry in self._queue if entry[0] not in keys)

    def withdraw(self, keys: set[int]) -> set[int]:
        """Write none of the lines of `keys` whose write has not begun; return the keys of
        those whose write has begun: they are reported out once it ends (or stdout failed)."""
        with self._lock:
            self._queue = deque(entry for entry in self._queue if entry[0] not in keys)
            taken = {key for key, _ in self._current} & keys
            if self._in_write:
                return taken
            self._withdrawn |= taken
            return set()

    def take_out(self) -> list[int]:
        """The keys of the lines out since the last call."""
        with self._lock:
            done, self._done = self._done, []
            self._signalled = False
        return done

    @property
    def closed(self) -> bool:
        """Nothing more will be written (closed, or stdout failed)."""
        return self._closing

    def close(self) -> None:
        """Write nothing more: what is queued is dropped, a write under way is finished."""
        with self._lock:
            self._closing = True
            self._queue.clear()
            self._lock.notify()

    async def wait_closed(self, timeout_s: float = 1.0) -> None:
        """Wait for the thread to end after `close` (it looks again every _POLL_S), or for
        `timeout_s` (a write to a terminal that blocks: the thread is left to it)."""
        until = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < until:
            await asyncio.sleep(0.01)

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                batch = self._current = self._next_batch()
            try:
                written = self._write(batch)
            except Exception as exc:  # (any: a thread that died silently would stall the worker)
                self.error = f"{type(exc).__name__}: {exc}"
                written = False
            if not written:  # closed meanwhile, or failed: nothing more is written
                with self._lock:
                    self._closing = True
                    self._queue.clear()
                    self._current, self._in_write = [], False
                self._signal()
                return
            with self._lock:
                if self._fd is not None:
                    self._done.extend(key for key, _ in self._current)
                self._current, self._withdrawn, self._in_write = [], set(), False
            self._signal()

    def _next_batch(self) -> list[tuple[int, str]]:
        """Lines from the queue that fit one atomic write (one line at least)."""
        batch = [self._queue.popleft()]
        size = len(batch[0][1]) + 1
        # (Characters, not bytes: a line of other than ASCII makes a write that may exceed
        # PIPE_BUF, and so may be split; it is still written whole or reported not out.)
        while self._queue and size + len(self._queue[0][1]) + 1 <= CHUNK_BYTES:
            batch.append(self._queue.popleft())
            size += len(batch[-1][1]) + 1
        return batch

    def _signal(self) -> None:
        with self._lock:
            if self._signalled:
                return
            self._signalled = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(self._on_out)

    def _may_write(self) -> bool:
        """Wait until a write is covered by the lease; False when closing."""
        with self._lock:
            while not self._closing and time.monotonic() >= self._writable_until:
                self._lock.wait(_POLL_S)
            return not self._closing

    def _begin(self) -> list[tuple[int, str]]:
        """The lines of the batch taken that were not withdrawn; from here on they are being
        written (withdraw leaves them, and they are reported out)."""
        with self._lock:
            if self._withdrawn:
                self._current = [e for e in self._current if e[0] not in self._withdrawn]
                self._withdrawn = set()
            self._in_write = bool(self._current)
            return self._current

    def _write(self, batch: list[tuple[int, str]]) -> bool:
        """Write a batch (but the lines withdrawn before their write began); True once all
        of it is out, False if closing stopped it first."""
        if self._fd is None:
            return self._write_stream(batch)
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        data = b""
        view = memoryview(data)
        while len(view) == len(data):  # nothing of it out yet
            if not self._may_write():
                return False
            if not poller.poll(_POLL_S * 1000):
                continue  # the reader is slow: look again (at a stop, at the lease)
            # Right before the bytes go: a pause of the process up to here is caught.
            if time.monotonic() >= self._writable_until:
                continue
            batch = self._begin()
            if not batch:
                return True  # all withdrawn: nothing to write
            data = "".join(f"{line}\n" for _, line in batch).encode(
                self._encoding, "backslashreplace"
            )
            view = memoryview(data)
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:  # (a non-blocking descriptor): nothing went
                with self._lock:
                    self._in_write = False
        while view:  # the rest of a write that went out in part (not a pipe)
            if self._closing:
                return False
            poller.poll(_POLL_S * 1000)
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(self._fd, view) :]
        return True

    def _write_stream(self, batch: list[tuple[int, str]]) -> bool:
        """Each line written and flushed on its own, and reported out at once: what a
        failure leaves out of the stream is known to the line."""
        for entry in batch:
            line = entry[1]
            if not self._may_write():
                return False
            with self._lock:
                if entry[0] in self._withdrawn:
                    continue
                self._in_write = True
            try:
                self._out.write(line + "\n")
            except UnicodeEncodeError:
                # This line, not the stream: text its encoding cannot show, written escaped.
                escaped = line.encode(self._encoding, "backslashreplace").decode(self._encoding)
                self._out.write(escaped + "\n")
            self._out.flush()
            with self._lock:
                self._done.append(entry[0])
                self._in_write = False
            self._signal()
        return True


class Printer(Generic[T]):
    """One run's lines: each is printed with a payload (its result) that goes to `on_out`
    once the line is out. `on_error` hears, once, that stdout failed for good."""

    def __init__(
        self,
        out: TextIO,
        lease_s: float,
        slow_s: float,
        on_out: Callable[[list[T]], None],
        on_error: Callable[[str], None],
    ) -> None:
        self._out = out
        self._lease_s = lease_s
        self._slow_s = slow_s
        self._on_out = on_out
        self._on_error = on_error
        self._writer: LineWriter | None = None
        # Payloads whose line is with the writer, not out yet, and since when lines have
        # waited for it (time.monotonic()).
        self._waiting: dict[int, T] = {}
        # Keys of lines out that `print_now` has not handed back yet; set as lines come out.
        self._seen: set[int] = set()
        self._progress = asyncio.Event()
        self._waiting_since = 0.0
        self._last_out = 0.0
        # Why printing stopped for good (stdout closed), once it has.
        self.error: str | None = None

    def start(self, sent_at: float) -> None:
        """Start the writer thread, under a lease renewed by a statement sent at `sent_at`."""
        self._writer = LineWriter(self._out, self._lines_out)
        self._writer.renewed(sent_at, self._lease_s)

    def renewed(self, sent_at: float) -> None:
        """The lease was renewed by a statement sent at `sent_at`: lines may be written up to
        then plus the lease, less a margin."""
        if self._writer is not None:
            self._writer.renewed(sent_at, self._lease_s)

    def print(self, key: int, line: str, payload: T) -> None:
        """Queue `line`; `payload` goes to `on_out` once it is out. Dropped (never out) once
        printing has failed, or before `start`."""
        self._print_all([(key, line, payload)])

    def _print_all(self, lines: list[tuple[int, str, T]]) -> None:
        """`print` each of `lines` (key, line, payload), in order, handed to the writer at once."""
        if self.error is not None or self._writer is None or not lines:
            return
        if not self._waiting:
            self._waiting_since = time.monotonic()
        waiting = self._waiting
        for key, _, payload in lines:
            waiting[key] = payload
        self._writer.put_many([(key, line) for key, line, _ in lines])

    async def print_now(self, lines: list[tuple[int, str, T]], wait_s: float) -> set[int]:
        """Print `lines` (key, line, payload) and wait for them, `wait_s` at most; return the
        keys of those out. The others are withdrawn, never printed (one whose write had
        begun is waited for, a second at most). A key already reported out is not printed
        again. Nothing is printed once printing has stopped (`may_print`)."""
        loop = asyncio.get_running_loop()
        keys = {key for key, _, _ in lines}
        seen = self._seen
        self._print_all([entry for entry in lines if entry[0] not in seen])
        if self._writer is None or not self.may_print:
            self.drop(keys - self._seen)
        else:
            await self._wait_out(keys, loop.time() + wait_s)
            begun = self._writer.withdraw(keys - self._seen)
            await self._wait_out(begun, loop.time() + 1.0)
            for key in keys - self._seen:
                self._waiting.pop(key, None)
        out = keys & self._seen
        self._seen -= out
        return out

    async def _wait_out(self, keys: set[int], until: float) -> None:
        loop = asyncio.get_running_loop()
        while not keys <= self._seen and self.may_print and loop.time() < until:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), until - loop.time())

    def drop(self, keys: set[int]) -> None:
        """Print none of the lines of `keys` not yet out (their tasks were cancelled): their
        payloads never go to `on_out`, even for a line the writer gets out meanwhile."""
        if self._writer is not None:
            self._writer.drop(keys)
        for key in keys:
            self._waiting.pop(key, None)

    @property
    def waiting(self) -> bool:
        """Some lines are with the writer, not out yet."""
        return bool(self._waiting)

    @property
    def waiting_keys(self) -> list[int]:
        """The keys of the lines with the writer, not out yet."""
        return list(self._waiting)

    @property
    def may_print(self) -> bool:
        """The writer may still get lines out (started, not closed)."""
        return self._writer is not None and not self._writer.closed

    def stalled(self) -> bool:
        """Lines have waited, with none out, longer than `slow_s` (a reader that does not
        keep up)."""
        if not self._waiting:
            return False
        return time.monotonic() - max(self._waiting_since, self._last_out) > self._slow_s

    def stop(self) -> None:
        """Print nothing more (the lease is lost: those tasks may be running elsewhere)."""
        if self._writer is not None:
            self._writer.close()
        self._progress.set()

    async def close(self) -> None:
        """Stop the writer, hand on what got out, forget the rest (never out now)."""
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()
            self._lines_out()
        self._waiting.clear()

    def _lines_out(self) -> None:
        """Hand on the payloads of the lines the writer got out (on the loop)."""
        if self._writer is None:
            return
        out = self._writer.take_out()
        if out:
            self._seen.update(out)
            self._progress.set()
            self._last_out = time.monotonic()
            payloads = [self._waiting.pop(key) for key in out if key in self._waiting]
            self._on_out(payloads)
        if self._writer.error is not None and self.error is None:
            self.error = self._writer.error
            self._progress.set()
            self._on_error(self.error)
