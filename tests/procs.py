"""Run `taskrunner` processes for tests; each is stopped by its own PID at teardown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

TASKRUNNER = str(Path(sys.executable).parent / "taskrunner")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    port: int | None = None
    _files: list[Any] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def terminate(self, timeout_s: float = 15) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def wait_healthy(self, timeout_s: float = 60) -> None:
        def healthy() -> bool:
            assert self.popen.poll() is None, f"{self.name} exited:\n{self.stderr()}"
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout_s, f"{self.name} /healthz")


def wait_registered(proc: Proc, database_url: str, timeout_s: float = 60) -> None:
    """Until the worker `proc` has its row in `workers` (its id holds its pid)."""

    def registered() -> bool:
        assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.stderr()}"
        try:
            with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute(
                    "SELECT 1 FROM workers WHERE id LIKE %s", [f"%:{proc.pid}:%"]
                ).fetchone()
        except psycopg.Error:
            return False
        return row is not None

    wait_for(registered, timeout_s, f"{proc.name} to register")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start `taskrunner ARGS...` with extra environment; all are killed at teardown."""
    started: list[Proc] = []

    def start(
        *args: str,
        env: dict[str, str],
        name: str | None = None,
        http: bool = False,
        ready: bool = True,
    ) -> Proc:
        """Start `taskrunner ARGS...`; a worker is waited for until it has registered (so a
        signal later finds it running, however slowly a loaded machine starts it), unless
        `ready` is False."""
        name = name or f"{args[0]}-{len(started)}"
        argv = [TASKRUNNER, *args]
        port = None
        if http:
            port = free_port()
            argv += ["--port", str(port)]
        out, err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
        files = [out.open("wb"), err.open("wb")]
        popen = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=files[0], stderr=files[1], cwd=tmp_path
        )
        proc = Proc(name, popen, out, err, port, files)
        started.append(proc)
        if ready and args[0] == "worker" and "TASKRUNNER_DATABASE_URL" in env:
            wait_registered(proc, env["TASKRUNNER_DATABASE_URL"])
        return proc

    yield start
    for proc in started:
        proc.kill()
        for f in proc._files:
            f.close()
