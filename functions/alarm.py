"""An alarm on the event loop that rings at its time to the tens of microseconds: what starts
the tasks a worker claimed ahead of their time (functions/runner.py).

asyncio's own timers wake the loop through `epoll_wait`, whose timeout is in whole
milliseconds, rounded up, and a loop that wakes a moment early waits another whole one: a
timer set 2-20 ms ahead rang 0.73 ms late at the median and 2.15 ms at p99 on the bench's
machine, where `time.sleep` is 0.15 and 0.23 ms late. So on Linux the alarm is a timerfd,
which the loop watches as it watches a socket: the kernel makes it readable at its time,
which wakes `epoll_wait` then, whatever its timeout. Python 3.11 has no binding for it
(`os.timerfd_create` came in 3.13): the two calls go through ctypes. Elsewhere, or where the
calls fail, the alarm is asyncio's `call_at`.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import sys
import time
from collections.abc import Callable

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = 0o2000000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p,
        ]  # fmt: skip
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class Alarm:
    """Calls `ring` once `time.monotonic()` has reached the time last `set` (never before),
    on `loop`. `set` again moves it; `close` ends it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ring: Callable[[], None]) -> None:
        self._loop = loop
        self._ring = ring
        self._handle: asyncio.Handle | None = None
        self._fd = -1
        if _LIBC is not None:
            fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                loop.add_reader(fd, self._readable)

    def set(self, at: float) -> None:
        """Ring at `at` (a `time.monotonic()` value), in place of any time set before."""
        # Set as a duration from now, which the kernel counts from the call on: never early,
        # and the same whatever `time.monotonic()` reads (libfaketime moves it). Rounded up to
        # the nanosecond.
        in_ns = math.ceil((at - time.monotonic()) * 1e9)
        if in_ns < 1000:
            # Due (or nearly): at once. (A timerfd set to 0 is disarmed, and libfaketime
            # scales what is set, down to 0 at its rate "x2".)
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_soon(self._rang)
            return
        if self._fd >= 0 and _LIBC is not None:
            spec = _Itimerspec()
            spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(in_ns, 1_000_000_000)
            if _LIBC.timerfd_settime(self._fd, 0, ctypes.byref(spec), None) == 0:
                return
            self._give_up_fd()
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(at, self._rang)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._give_up_fd()

    def _readable(self) -> None:
        try:
            os.read(self._fd, 8)  # how many times it expired: once, here
        except BlockingIOError:
            return  # moved since it was readable
        self._ring()

    def _rang(self) -> None:
        self._handle = None
        self._ring()

    def _give_up_fd(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
