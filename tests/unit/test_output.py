"""The stdout writer on its own: lines go out only while the lease covers them, a line out is
reported, and a full pipe holds up nothing but the writer's thread."""

import asyncio
import fcntl
import io
import os
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from functions import output
from functions.output import LineWriter, Printer, lease_margin_s


def test_the_margin_is_a_second_or_a_tenth_of_the_lease() -> None:
    assert (lease_margin_s(3), lease_margin_s(10), lease_margin_s(60)) == (1.0, 1.0, 6.0)


async def wait_until(predicate: object, timeout_s: float = 10) -> None:
    until = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < until, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)


def read(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


async def test_nothing_is_written_past_the_lease_until_it_is_renewed(
    pipe: tuple[int, int],
) -> None:
    """A renewal sent a lease ago (a process paused since): the line waits, unwritten; the
    next renewal lets it out, and it is reported."""
    read_fd, write_fd = pipe
    out = os.fdopen(write_fd, "w", closefd=False)
    reported: list[int] = []
    writer = LineWriter(out, lambda: reported.extend(writer.take_out()))
    lease_s = 3.0
    writer.renewed(time.monotonic() - lease_s, lease_s)  # a pause of a lease since
    writer.put(7, "Foo 7")
    await asyncio.sleep(0.5)
    assert read(read_fd) == b"" and reported == []
    writer.renewed(time.monotonic(), lease_s)
    await wait_until(lambda: reported == [7])
    assert read(read_fd) == b"Foo 7\n"
    writer.close()
    await writer.wait_closed()


async def test_lines_handed_over_together_go_out_in_order_in_one_write(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's lines (`put_many`, as `Printer.print_now` hands them over) are queued at
    once: the thread takes them all for its first write, in order, each reported out."""
    read_fd, write_fd = pipe
    writes: list[int] = []

    def write(fd: int, data: memoryview) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    real_write = os.write
    monkeypatch.setattr(output, "os", SimpleNamespace(write=write))
    out = os.fdopen(write_fd, "w", closefd=False)
    reported: list[int] = []
    writer = LineWriter(out, lambda: reported.extend(writer.take_out()))
    writer.renewed(time.monotonic(), 60.0)
    lines = [(i, f"Baz {i:03}") for i in range(300)]  # 2,400 bytes: within the pipe's 4,096
    writer.put_many(lines)
    await wait_until(lambda: len(reported) == 300)
    assert reported == list(range(300))
    assert read(read_fd).decode().splitlines() == [line for _, line in lines]
    assert writes == [2_400], "one write"
    writer.close()
    await writer.wait_closed()


async def test_a_full_pipe_stops_only_the_writer_and_close_drops_what_waits(
    pipe: tuple[int, int],
) -> None:
    """Lines beyond what the pipe holds wait in the thread; those never written (dropped
    by `close`) are never reported out, and every line reported is in the pipe."""
    read_fd, write_fd = pipe
    out = os.fdopen(write_fd, "w", closefd=False)
    reported: list[int] = []
    writer = LineWriter(out, lambda: reported.extend(writer.take_out()))
    writer.renewed(time.monotonic(), 60.0)
    for i in range(2_000):  # 20 KB, five times the pipe
        writer.put(i, f"Baz {i:05}")
    await wait_until(lambda: len(reported) > 0)
    await asyncio.sleep(0.2)
    assert 0 < len(reported) < 2_000, "the pipe holds a fifth of it"
    got = read(read_fd)
    writer.close()
    await writer.wait_closed()
    got += read(read_fd)
    reported.extend(writer.take_out())
    assert got.decode().splitlines() == [f"Baz {i:05}" for i in sorted(reported)]


async def test_a_dropped_line_is_never_printed_nor_handed_on() -> None:
    """A cancelled task's line still waiting (here: no lease yet) is dropped; the others go."""
    out = io.StringIO()
    handed: list[str] = []
    printer: Printer[str] = Printer(out, 30.0, 1.0, handed.extend, lambda _: None)
    printer.start(time.monotonic() - 3600.0)  # a lease that ran out: lines wait
    for key in (1, 2, 3):
        printer.print(key, f"Foo {key}", f"result {key}")
    printer.drop({2})
    assert printer.waiting_keys == [1, 3]
    printer.renewed(time.monotonic())
    deadline = time.monotonic() + 10
    while printer.waiting and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await printer.close()
    assert out.getvalue() == "Foo 1\nFoo 3\n"
    assert handed == ["result 1", "result 3"]


async def test_lines_not_out_in_time_are_withdrawn_and_never_written_later(
    pipe: tuple[int, int],
) -> None:
    """`print_now` on a full pipe: nothing out within its wait, so nothing may get out after
    it (the batch's rows are rolled back meanwhile), not even the lines the writer's thread
    had taken and was waiting to write. Printed again once the pipe drains, each line goes
    out once."""
    read_fd, write_fd = pipe
    out = os.fdopen(write_fd, "w", closefd=False)
    os.set_blocking(write_fd, False)
    with pytest.raises(BlockingIOError):
        while True:
            os.write(write_fd, b"x" * 512)  # a reader that does not keep up: the pipe is full
    os.set_blocking(write_fd, True)
    printer: Printer[None] = Printer(out, 60.0, 1.0, lambda _: None, lambda _: None)
    printer.start(time.monotonic())
    lines = [(key, f"Foo {key}", None) for key in range(1, 4)]
    assert await printer.print_now(lines, 0.3) == set()
    assert not printer.waiting
    filler = read(read_fd)  # the reader catches up
    assert set(filler) == {ord("x")}
    await asyncio.sleep(0.3)  # three of the writer's looks at the pipe
    assert read(read_fd) == b"", "a withdrawn line was written"
    assert await printer.print_now(lines, 10.0) == {1, 2, 3}
    # (The pipe of 4 KiB takes the next write once it is read: PIPE_BUF must be free.)
    assert read(read_fd) == b"Foo 1\nFoo 2\nFoo 3\n"
    # A key handed back is the caller's: asked again, it is printed again.
    assert await printer.print_now([lines[0], (4, "Foo 4", None)], 10.0) == {1, 4}
    await printer.close()
    assert read(read_fd) == b"Foo 1\nFoo 4\n"
