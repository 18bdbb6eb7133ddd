"""A worker's stdout, as a user meets it: a reader that falls behind, a worker paused past its
lease, the line a worker logs when it starts. Real `taskrunner` processes; lines counted
against tasks."""

import fcntl
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import TASKRUNNER, Proc, free_port, spawn, wait_for, wait_registered

__all__ = ["spawn"]  # the fixture

pytestmark = pytest.mark.slow

Sql = Callable[..., list[tuple[Any, ...]]]


def lines(text: str, word: str) -> Counter[int]:
    return Counter(int(m.group(1)) for m in re.finditer(rf"^{word} (\d+)$", text, re.M))


def stalled_pipe() -> tuple[int, int]:
    """A pipe that holds one page (4 KiB): a reader that does not read fills it at once."""
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    return read_fd, write_fd


class Reader:
    """Reads a pipe into memory once `start` is called; nobody reads it before."""

    def __init__(self, read_fd: int) -> None:
        self.fd = read_fd
        self.data = bytearray()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        while chunk := os.read(self.fd, 1 << 16):
            self.data += chunk

    def start(self) -> None:
        self._thread.start()

    def join(self) -> str:
        self._thread.join(timeout=30)
        os.close(self.fd)
        return self.data.decode()


def start_stalled(
    args: list[str], env: dict[str, str], tmp_path: Path, name: str
) -> tuple[subprocess.Popen[bytes], Reader, Path]:
    read_fd, write_fd = stalled_pipe()
    stderr_path = tmp_path / f"{name}.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [TASKRUNNER, *args],
            env={**os.environ, **env},
            stdout=write_fd,
            stderr=stderr,
            cwd=tmp_path,
        )
    os.close(write_fd)
    return proc, Reader(read_fd), stderr_path


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_a_slow_stdout_reader_runs_nothing_twice_and_holds_up_no_lease(
    spawn: Callable[..., Proc], database_url: str, sql: Sql, tmp_path: Path
) -> None:
    """`taskrunner worker | (sleep 9; cat)`, lease 3 s, 5,000 baz, a second worker beside
    it: while the pipe is full the first keeps its lease and claims nothing more (300 foo
    created meanwhile are all the second's); then everything it held gets out. Each task
    ran once and each line was printed once (before: the stalled write stopped the event
    loop, the heartbeat with it, and the second worker rescued and ran again what the first
    held)."""
    n, late = 5_000, 300
    sql("INSERT INTO tasks (kind, execute_at) SELECT 'baz', now() FROM generate_series(1, %s)", n)
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_LEASE_SECONDS": "3",
        "TASKRUNNER_FOO_DELAY_S": "0.01",
    }
    slow, reader, slow_stderr = start_stalled(["worker"], env, tmp_path, "slow")
    try:
        wait_for(
            lambda: sql("SELECT count(*) FROM tasks WHERE state = 'running'")[0][0],
            30,
            "a claim",
        )
        other = spawn("worker", env=env, name="other")
        time.sleep(3)  # the pipe is full, and has been for longer than _SLOW_WRITE_S
        sql(
            "INSERT INTO tasks (kind, execute_at) SELECT 'foo', now() FROM generate_series(1, %s)",
            late,
        )
        time.sleep(6)  # three leases in all with the pipe full
        assert slow.poll() is None, slow_stderr.read_text()
        reader.start()
        wait_for(
            lambda: sql("SELECT count(*) FROM tasks WHERE state = 'succeeded'")[0][0] == n + late,
            60,
            "every task to succeed",
        )
        assert stop(slow) == 0, slow_stderr.read_text()
        assert other.terminate() == 0, other.stderr()
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    out_slow, out_other = reader.join(), other.stdout()
    assert sql("SELECT attempts, count(*) FROM tasks GROUP BY 1") == [(1, n + late)]
    assert len(out_slow.splitlines()) + len(out_other.splitlines()) == n + late
    assert lines(out_slow, "Foo") == Counter(), "no claim while its output was backed up"
    assert len(lines(out_other, "Foo")) == late
    assert "lease ran out" not in slow_stderr.read_text()


def test_the_api_answers_while_stdout_is_stalled(
    database_url: str, sql: Sql, tmp_path: Path
) -> None:
    """`taskrunner dev | (sleep 25; cat)`: with a pipe full of task lines, /healthz still
    answers at once (before: 2 of 3 got nothing in 10 s)."""
    sql("INSERT INTO tasks (kind, execute_at) SELECT 'baz', now() FROM generate_series(1, 2000)")
    port = free_port()
    env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_LEASE_SECONDS": "3"}
    dev, reader, stderr = start_stalled(["dev", "--port", str(port)], env, tmp_path, "dev")
    try:

        def healthy() -> bool:
            assert dev.poll() is None, stderr.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 60, "dev /healthz")
        wait_for(
            lambda: sql("SELECT count(*) FROM tasks WHERE state = 'running'")[0][0], 30, "a claim"
        )
        answered = 0
        for _ in range(3):
            time.sleep(1)
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
                answered += response.status_code == 200
            except httpx.TransportError:
                pass
        assert sql("SELECT count(*) FROM tasks WHERE state = 'succeeded'")[0][0] < 2000, (
            "the pipe was full all along"
        )
        assert answered == 3
        reader.start()
        wait_for(
            lambda: sql("SELECT count(*) FROM tasks WHERE state = 'succeeded'")[0][0] == 2000,
            60,
            "every task to succeed",
        )
        assert stop(dev) == 0, stderr.read_text()
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    assert len(reader.join().splitlines()) == 2000


def test_a_worker_paused_past_its_lease_prints_nothing_of_what_was_rescued(
    spawn: Callable[..., Proc], database_url: str, sql: Sql
) -> None:
    """Lease 3 s, 200 foo of 6 s: the first worker claims them and is stopped (SIGSTOP)
    while the second rescues and runs them; continued, the first prints none of their
    lines (before: all 200 again, then "lease ran out") and hands back."""
    n = 200
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_LEASE_SECONDS": "3",
        "TASKRUNNER_FOO_DELAY_S": "6",
    }
    paused = spawn("worker", env=env, name="paused")
    sql("INSERT INTO tasks (kind, execute_at) SELECT 'foo', now() FROM generate_series(1, %s)", n)
    wait_for(
        lambda: sql("SELECT count(*) FROM tasks WHERE state = 'running'")[0][0] == n,
        30,
        "the first worker to claim them all",
    )
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        other = spawn("worker", env=env, name="other")
        wait_for(lambda: len(lines(other.stdout(), "Foo")) == n, 60, "the second to run them")
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    wait_for(lambda: "lease ran out" in paused.stderr(), 30, "the first to find its lease gone")
    assert paused.terminate() == 0, paused.stderr()
    assert other.terminate() == 0, other.stderr()
    assert lines(paused.stdout(), "Foo") == Counter(), "nothing printed after the pause"
    assert sql("SELECT state, attempts, count(*) FROM tasks GROUP BY 1, 2") == [("succeeded", 2, n)]


def test_a_worker_says_what_it_is_when_it_starts(
    spawn: Callable[..., Proc], database_url: str
) -> None:
    """One line on stderr: its id, kinds, concurrency, lease and database, password hidden."""
    url = database_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    worker = spawn("worker", env={"TASKRUNNER_DATABASE_URL": url, "TASKRUNNER_CONCURRENCY": "7"})
    wait_registered(worker, database_url)
    wait_for(lambda: "action=start" in worker.stderr(), 30, "the start-up line")
    assert worker.terminate() == 0
    [line] = [line for line in worker.stderr().splitlines() if "action=start" in line]
    assert f"worker={worker.pid}" not in line and f":{worker.pid}:" in line
    assert "kinds=foo,bar,baz,http concurrency=7 lease_s=" in line
    assert "database=postgresql://postgres:***@" in line and "s3cret" not in line
