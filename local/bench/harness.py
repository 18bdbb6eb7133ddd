"""What every bench scenario stands on: its sizes, a fresh database, the `taskrunner`
processes under test, and the SQL that watches them."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url
from tqdm import tqdm

from functions import queries
from local.migrate import migrate

BENCH_DB_SUFFIX = "_bench"


@dataclass(frozen=True)
class Sizes:
    drain_tasks: int
    burst_tasks: tuple[int, int]
    fanout_tasks: int
    lateness_tasks: int
    create_requests: int
    bulk_batches: int
    # Seconds of wrk per API figure.
    load_s: float
    # Finished tasks in the table while /stats is read.
    stats_tasks: int
    # Soak: seconds in all, of which warm-up; retention; tasks created per second.
    soak_s: float
    soak_warmup_s: float
    soak_retention_s: float
    soak_rate: int
    # Fresh processes per cold start figure.
    cold_starts: int
    # Warm burst: the burst created after a worker ran a few single tasks on a small table.
    warm_burst_tasks: int
    # Schedules: `* * * * *` schedules whose occurrences fall at one minute (and as many
    # ordinary tasks due at one instant, beside them).
    schedules: int
    # Tasks in the table whose listings `find` times (loaded through POST /tasks/batch).
    find_tasks: int
    # Share: `bar` tasks (a second each) for two workers of 100 slots.
    share_tasks: int
    # Cancel: running foo, spread over the workers, each cancelled by its own request.
    cancel_tasks: int
    # Scale (local/bench/scale.py): the tables measured, by their rows (9 in 10 finished, run
    # by a worker; 1 in 10 scheduled over 30 days); the burst drained at each, and the large
    # burst drained beside it on the largest; the finished tasks pruned at most.
    scale_rows: tuple[int, ...] = ()
    scale_burst: int = 0
    scale_big_burst: int = 0
    scale_prune: int = 0

    @classmethod
    def choose(cls, *, quick: bool, tasks: int | None) -> Sizes:
        if quick:
            # A smoke test (tests/acceptance/test_bench.py: every scenario reports a figure):
            # the least that still runs each scenario's every step. Its fixed costs (processes
            # started, the minute the schedules wait for, the Lambda bundle built) dominate.
            return cls(
                tasks or 2_000,
                (2_000, 500),
                200,
                40,
                300,
                1,
                1,
                2_000,
                8,
                4,
                2,
                200,
                1,
                5_000,
                500,
                5_000,
                400,
                200,
                scale_rows=(2_000, 50_000),
                scale_burst=5_000,
                scale_big_burst=20_000,
                scale_prune=10_000,
            )
        return cls(
            tasks or 200_000, (50_000, 10_000), 10_000, 400, 20_000, 10,
            10, 1_000_000, 330, 120, 30, 1_000, 11, 100_000, 5_000, 1_000_000, 1_000, 1_000,
            scale_rows=(10_000, 1_000_000, 10_000_000), scale_burst=100_000,
            scale_big_burst=2_000_000, scale_prune=1_000_000,
        )  # fmt: skip


@contextmanager
def fresh_database(server_url: str, scenario: str) -> Iterator[str]:
    """A new database beside the configured one, migrated as `taskrunner migrate` does,
    dropped at the end: each scenario starts as a new user's install does (a fresh,
    never-analyzed table), and the configured database is never touched."""
    url = make_url(server_url)
    name = f"{url.database or 'postgres'}{BENCH_DB_SUFFIX}_{scenario}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    bench_url = url.set(drivername="postgresql", database=name).render_as_string(
        hide_password=False
    )
    try:
        migrate(bench_url)
        yield bench_url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Processes:
    """`taskrunner` subprocesses of this bench, stopped by their own PIDs."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, database_url: str, *args: str, log_level: str = "WARNING", **env: str
    ) -> subprocess.Popen[bytes]:
        """`taskrunner *args` on `database_url`, logging from `log_level` up."""
        return self.run(
            [sys.executable, "-m", "local", "--log-level", log_level, *args],
            log=None,
            stdout=None,
            TASKRUNNER_DATABASE_URL=database_url,
            **env,
        )

    def start_to(
        self, stdout: Path | None, database_url: str, *args: str, **env: str
    ) -> subprocess.Popen[bytes]:
        """`taskrunner *args` on `database_url`, its task lines to `stdout` (None: nobody)."""
        return self.run(
            [sys.executable, "-m", "local", "--log-level", "WARNING", *args],
            log=None,
            stdout=stdout,
            TASKRUNNER_DATABASE_URL=database_url,
            **env,
        )

    def logged(
        self, database_url: str, log: Path | None, *args: str, **env: str
    ) -> subprocess.Popen[bytes]:
        """`taskrunner *args` on `database_url`, its log at INFO to the file `log` (None:
        warnings only, to the bench's stderr)."""
        level = "WARNING" if log is None else "INFO"
        return self.run(
            [sys.executable, "-m", "local", "--log-level", level, *args],
            log=log,
            stdout=None,
            TASKRUNNER_DATABASE_URL=database_url,
            **env,
        )

    def run(
        self, command: list[str], log: Path | None = None, stdout: Path | None = None, **env: str
    ) -> subprocess.Popen[bytes]:
        with contextlib.ExitStack() as files:
            stderr = None if log is None else files.enter_context(log.open("wb"))
            # The task lines are printed to nobody, unless a scenario reads them.
            out = files.enter_context(open(stdout or os.devnull, "wb"))
            # A process group of its own: Ctrl-C at the terminal reaches the bench alone, which
            # stops each process once (with the terminal's too, a worker took the bench's
            # SIGTERM as a second signal and stopped mid-shutdown, tracebacks and all).
            proc = subprocess.Popen(
                command,
                env={**os.environ, **env},
                stdout=out,
                stderr=stderr,
                process_group=0,
            )
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in self.started:
            self.stop(proc)


@contextmanager
def slow_http_server(delay_s: float) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that answers every GET `delay_s` after it came (a thread
    per connection: a few hundred at once); yield its URL."""

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as bar's client uses it

        def do_GET(self) -> None:
            time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # the listen backlog: every worker's connections at once

    server = Server(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def wait_until(check: Callable[[], int], total: int, label: str, timeout_s: float) -> None:
    """Poll `check()` (tasks done so far) under a progress bar until it reaches `total`."""
    deadline = time.monotonic() + timeout_s
    with tqdm(
        total=total,
        desc=label,
        unit="task",
        leave=False,
        file=sys.stderr,
        mininterval=0.5,
        disable=not sys.stderr.isatty(),
    ) as bar:
        while True:
            done = check()
            bar.update(done - bar.n)
            if done >= total:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: {done} of {total} done after {timeout_s}s")
            time.sleep(0.2)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


class Harness:
    """A scenario's surroundings: inside `scenario(name)`, a fresh database of its own on the
    server shared by every process of the run, a connection to it, and the processes started
    on it (stopped when the scenario ends). Nothing is prepared by hand: no VACUUM, ANALYZE or
    CHECKPOINT, only what the product does in normal operation."""

    def __init__(self, server_url: str, sizes: Sizes, workers: int) -> None:
        self.server_url = server_url
        self.sizes = sizes
        self.workers = workers
        self.procs = Processes()
        self.url = ""
        self._conn: psycopg.Connection[Any] | None = None

    @contextmanager
    def scenario(self, name: str) -> Iterator[None]:
        with fresh_database(self.server_url, name) as url:
            self.url = url
            self._conn = psycopg.connect(url, autocommit=True)
            try:
                yield
            finally:
                self.procs.stop_all()
                self._conn.close()
                self._conn = None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        assert self._conn is not None, "inside a scenario"
        return self._conn

    def worker(self, stdout: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
        return self.procs.start_to(stdout, self.url, "worker", **env)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query.encode(), params or None)
        return cur.fetchall() if cur.description else []

    def done(self, n: int) -> int:
        """Of `n` tasks, those no longer scheduled or running: counted on the two small
        partial indexes, not by scanning the table, so watching a run does not slow it."""
        [(left,)] = self.sql(
            "SELECT (SELECT count(*) FROM tasks WHERE state = 'scheduled')"
            " + (SELECT count(*) FROM tasks WHERE state = 'running')"
        )
        return n - int(left)

    def check_all_succeeded(self, n: int) -> None:
        [(succeeded,)] = self.sql("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
        if succeeded != n:
            raise RuntimeError(f"{succeeded} of {n} tasks succeeded")

    def insert_due(
        self, kind: str, n: int, in_s: float = -1.0, payload: object | None = None
    ) -> None:
        """Create `n` tasks due `in_s` from now, with the API's own batch INSERT (and NOTIFY),
        each with `payload` when one is given."""
        [(db_now,)] = self.sql("SELECT extract(epoch FROM now())")
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            at_us = int((float(db_now) + in_s) * 1e6)
            task: dict[str, object] = {"kind": kind, "at_us": at_us}
            if payload is not None:
                task["payload"] = payload
            payload_json = json.dumps([task] * count)
            self.conn.execute(queries.INSERT_TASKS, {"tasks": payload_json, "max_attempts": 3})

    def wait_for_listener(self, count: int) -> None:
        """Until `count` workers are LISTENing, i.e. started and idle."""

        def listening() -> int:
            [(n,)] = self.sql(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
            return int(n)

        wait_until(listening, count, "workers starting", 60)

    def api(self, processes: int = 1, **env: str) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        proc = self.procs.start(
            self.url, "api", "--port", str(port), "--workers", str(processes), **env
        )
        api_url = f"http://127.0.0.1:{port}"
        wait_http(api_url)
        return api_url, proc

    def reference(self) -> str:
        """The minimal FastAPI app (minimal_app.py), served as `taskrunner api` is."""
        port = free_port()
        self.procs.run(
            [sys.executable, "-m", "uvicorn", "local.bench.minimal_app:app", "--port", str(port),
             "--log-level", "warning"]
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(url, "/tasks/1")
        return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(base_url: str, path: str = "/healthz") -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
