"""`taskrunner bench`: how many tasks taskrunner moves, how close to their time they start.

Each scenario runs real `taskrunner worker` / `taskrunner api` processes against a database of
its own (`<db>_bench`, created on the configured or embedded server and dropped afterwards),
and beside each figure the same run measures what PostgreSQL itself does with the same SQL,
so the ratio holds on a noisy machine. Figures come from the database's own timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url
from tqdm import tqdm

from functions import queries
from local.migrate import migrate

BENCH_DB_SUFFIX = "_bench"


@dataclass(frozen=True)
class Figure:
    scenario: str
    value: float
    unit: str
    goal: str
    met: bool
    raw: float | None
    raw_note: str


@dataclass(frozen=True)
class Sizes:
    drain_tasks: int
    fanout_tasks: int
    lateness_tasks: int
    create_requests: int
    bulk_batches: int

    @classmethod
    def choose(cls, *, quick: bool, tasks: int | None) -> Sizes:
        if quick:
            return cls(tasks or 5_000, 500, 40, 1_000, 2)
        return cls(tasks or 200_000, 10_000, 400, 20_000, 10)


# --- the bench database and the processes under test ------------------------------------


@contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    """Create `<db>_bench` next to the configured database, migrate it, drop it at the end."""
    url = make_url(server_url)
    name = f"{url.database or 'postgres'}{BENCH_DB_SUFFIX}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    bench_url = url.set(drivername="postgresql", database=name).render_as_string(
        hide_password=False
    )
    migrate(bench_url)
    try:
        yield bench_url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Processes:
    """`taskrunner` subprocesses of this bench, stopped by their own PIDs."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        environment = {**os.environ, "TASKRUNNER_DATABASE_URL": self.database_url, **env}
        proc = subprocess.Popen(
            [sys.executable, "-m", "local", "--log-level", "WARNING", *args],
            env=environment,
            stdout=subprocess.DEVNULL,  # the task lines are printed, to nobody
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


class Bench:
    def __init__(self, database_url: str, sizes: Sizes, workers: int) -> None:
        self.url = database_url
        self.sizes = sizes
        self.workers = workers
        self.procs = Processes(database_url)
        self.conn = psycopg.connect(database_url, autocommit=True)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query.encode(), params or None)
        return cur.fetchall() if cur.description else []

    def reset(self) -> None:
        self.sql("TRUNCATE tasks")
        # Write out the last scenario's pages now, so that a checkpoint does not land in the
        # middle of the next one (it stalled commits for 400 ms in one run). Needs superuser
        # or pg_checkpoint; without it the figures are just noisier.
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            self.sql("CHECKPOINT")

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

    def insert_due(self, kind: str, n: int, in_s: float = -1.0) -> None:
        """Create `n` tasks due `in_s` from now, with the API's own batch INSERT (and NOTIFY)."""
        [(db_now,)] = self.sql("SELECT extract(epoch FROM now())")
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            at_us = int((float(db_now) + in_s) * 1e6)
            payload = json.dumps([{"kind": kind, "at_us": at_us}] * count)
            self.conn.execute(queries.INSERT_TASKS, {"tasks": payload, "max_attempts": 3})
        self.sql("VACUUM ANALYZE tasks")

    def wait_for_listener(self, count: int) -> None:
        """Until `count` workers are LISTENing, i.e. started and idle."""

        def listening() -> int:
            [(n,)] = self.sql(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
            return int(n)

        wait_until(listening, count, "workers starting", 60)

    # --- scenarios -------------------------------------------------------------------------

    def drain(self, workers: int) -> float:
        """baz tasks per second, from the first start to the last finish, as recorded."""
        n = self.sizes.drain_tasks
        self.reset()
        self.insert_due("baz", n)
        procs = [self.procs.start("worker") for _ in range(workers)]
        wait_until(lambda: self.done(n), n, f"drain, {workers} worker(s)", 600)
        self.check_all_succeeded(n)
        for proc in procs:
            self.procs.stop(proc)
        [(seconds,)] = self.sql(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM tasks"
        )
        return n / float(seconds)

    def raw_drain(self) -> float:
        """The same claim and finish statements straight from psycopg, no task work."""
        n = self.sizes.drain_tasks
        self.reset()
        self.insert_due("baz", n)
        return asyncio.run(_raw_drain(self.url, n))

    def fanout(self) -> tuple[float, float]:
        """Seconds from the due time until the last of N 3-second foo tasks finished; peak MB."""
        n = self.sizes.fanout_tasks
        self.reset()
        worker = self.procs.start("worker")
        self.wait_for_listener(1)
        self.insert_due("foo", n, in_s=1.0)
        wait_until(lambda: self.done(n), n, "fan-out", 120)
        self.check_all_succeeded(n)
        peak = peak_rss_mb(worker.pid)
        self.procs.stop(worker)
        [(seconds,)] = self.sql(
            "SELECT extract(epoch FROM max(finished_at) - min(execute_at)) FROM tasks"
        )
        return float(seconds), peak

    def lateness_future(self) -> tuple[float, float]:
        """p50 and p99 of started_at - execute_at (ms) for tasks created ahead of their time."""
        n = self.sizes.lateness_tasks
        self.reset()
        worker = self.procs.start("worker")
        self.wait_for_listener(1)
        # Created as the API creates them (one batch, one NOTIFY), due over the next 5 s.
        [(db_now,)] = self.sql("SELECT extract(epoch FROM now())")
        tasks = [
            {"kind": "baz", "at_us": int((float(db_now) + random.uniform(0.5, 5.0)) * 1e6)}
            for _ in range(n)
        ]
        self.conn.execute(queries.INSERT_TASKS, {"tasks": json.dumps(tasks), "max_attempts": 3})
        wait_until(lambda: self.done(n), n, "lateness, future", 60)
        self.check_all_succeeded(n)
        self.procs.stop(worker)
        return self._lateness_ms("execute_at")

    def lateness_now(self, api_url: str) -> tuple[float, float]:
        """p50 and p99 of started_at - created_at (ms) for tasks created due, through the API."""
        n = self.sizes.lateness_tasks
        self.reset()
        worker = self.procs.start("worker")
        self.wait_for_listener(1)
        asyncio.run(_post_one_by_one(api_url, n))
        wait_until(lambda: self.done(n), n, "lateness, due now", 60)
        self.check_all_succeeded(n)
        self.procs.stop(worker)
        return self._lateness_ms("created_at")

    def _lateness_ms(self, since: str) -> tuple[float, float]:
        rows = self.sql(f"SELECT extract(epoch FROM started_at - {since}) * 1000 FROM tasks")
        values = [float(v) for (v,) in rows]
        return percentile(values, 50), percentile(values, 99)

    def raw_notify_ms(self) -> float:
        """p99 of a NOTIFY's trip from one session to another LISTENing one (ms)."""
        return asyncio.run(_raw_notify_p99(self.url, self.sizes.lateness_tasks))

    def create_single(self, api_url: str) -> float:
        self.reset()
        n = self.sizes.create_requests
        started = time.perf_counter()
        asyncio.run(_post_many(api_url, n, clients=32))
        return n / (time.perf_counter() - started)

    def raw_create_single(self) -> float:
        self.reset()
        return asyncio.run(_raw_insert_one_by_one(self.url, self.sizes.create_requests, 4))

    def create_bulk(self, api_url: str) -> float:
        self.reset()
        batches = self.sizes.bulk_batches
        started = time.perf_counter()
        asyncio.run(_post_batches(api_url, batches))
        return batches * 10_000 / (time.perf_counter() - started)

    def raw_create_bulk(self) -> float:
        self.reset()
        batches = self.sizes.bulk_batches
        started = time.perf_counter()
        for _ in range(batches):
            when = time.time() + 3600
            payload = json.dumps([{"kind": "baz", "at_us": int(when * 1e6)}] * 10_000)
            self.conn.execute(queries.INSERT_TASKS, {"tasks": payload, "max_attempts": 3})
        return batches * 10_000 / (time.perf_counter() - started)


def _utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


# --- raw PostgreSQL and HTTP load, asyncio ---------------------------------------------------


async def _raw_drain(url: str, n: int, pipelines: int = 2) -> float:
    """Claim and finish with the worker's statements and nothing else, `pipelines` at once.

    Each pipeline claims on one connection while it finishes the previous batch on another.
    """
    started = time.perf_counter()

    async def pipeline() -> None:
        claimer = await psycopg.AsyncConnection.connect(url, autocommit=True)
        finisher = await psycopg.AsyncConnection.connect(url, autocommit=True)
        batches: asyncio.Queue[list[tuple[Any, ...]] | None] = asyncio.Queue(maxsize=2)

        async def claim() -> None:
            while True:
                cur = await claimer.execute(
                    queries.CLAIM_DUE,
                    {"worker": "raw", "kinds": ["baz"], "limit": 1000, "lease_s": 60.0},
                )
                rows = await cur.fetchall()
                await batches.put(rows or None)
                if not rows:
                    return

        async def finish() -> None:
            while (rows := await batches.get()) is not None:
                payload = json.dumps(
                    [
                        {"id": r[0], "attempt": r[2], "state": "succeeded", "output": "Baz 1"}
                        for r in rows
                    ]
                )
                await finisher.execute(queries.FINISH_MANY, {"worker": "raw", "results": payload})

        await asyncio.gather(claim(), finish())
        await claimer.close()
        await finisher.close()

    await asyncio.gather(*(pipeline() for _ in range(pipelines)))
    return n / (time.perf_counter() - started)


async def _raw_notify_p99(url: str, n: int) -> float:
    listener = await psycopg.AsyncConnection.connect(url, autocommit=True)
    sender = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await listener.execute("LISTEN taskrunner_bench")
    trips: list[float] = []
    notes = listener.notifies()
    for _ in range(n):
        sent = time.perf_counter()
        await sender.execute("NOTIFY taskrunner_bench")
        await anext(notes)
        trips.append((time.perf_counter() - sent) * 1000)
        await asyncio.sleep(0.002)
    await listener.close()
    await sender.close()
    return percentile(trips, 99)


async def _raw_insert_one_by_one(url: str, n: int, connections: int) -> float:
    conns = [
        await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(connections)
    ]
    when = _utc(time.time() + 3600)

    async def insert(conn: psycopg.AsyncConnection[Any], count: int) -> None:
        for _ in range(count):
            await conn.execute(
                queries.INSERT_TASK, {"kind": "baz", "execute_at": when, "max_attempts": 3}
            )

    started = time.perf_counter()
    await asyncio.gather(*(insert(c, n // connections) for c in conns))
    elapsed = time.perf_counter() - started
    for conn in conns:
        await conn.close()
    return (n // connections * connections) / elapsed


class _HttpConnection:
    """A keep-alive HTTP/1.1 client connection on asyncio streams.

    Hand-written on purpose: on a 2-core machine a full client (httpx) spends more CPU per
    request than the server under test, and the figure would measure the client.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base_url: str) -> _HttpConnection:
        host, port = base_url.removeprefix("http://").rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _post_many(api_url: str, n: int, clients: int) -> None:
    body = json.dumps({"type": "baz", "execute_at": time.time() + 3600}).encode()

    async def client(count: int) -> None:
        conn = await _HttpConnection.open(api_url)
        for _ in range(count):
            status, text = await conn.post("/tasks", body)
            if status != 201:
                raise RuntimeError(f"POST /tasks answered {status}: {text[:200]!r}")
        conn.close()

    await asyncio.gather(*(client(n // clients) for _ in range(clients)))


async def _post_one_by_one(api_url: str, n: int) -> None:
    """Create tasks due at once, one at a time, a few milliseconds apart."""
    conn = await _HttpConnection.open(api_url)
    for _ in range(n):
        body = json.dumps({"type": "baz", "execute_at": time.time() - 1}).encode()
        status, text = await conn.post("/tasks", body)
        if status != 201:
            raise RuntimeError(f"POST /tasks answered {status}: {text[:200]!r}")
        await asyncio.sleep(random.uniform(0.005, 0.02))
    conn.close()


async def _post_batches(api_url: str, batches: int) -> None:
    when = time.time() + 3600
    body = json.dumps({"tasks": [{"type": "baz", "execute_at": when}] * 10_000}).encode()
    conn = await _HttpConnection.open(api_url)
    for _ in range(batches):
        status, text = await conn.post("/tasks/batch", body)
        if status != 201:
            raise RuntimeError(f"POST /tasks/batch answered {status}: {text[:200]!r}")
    conn.close()


# --- the run and its table ---------------------------------------------------------------


def run(server_url: str, *, quick: bool, tasks: int | None, workers: int) -> list[Figure]:
    sizes = Sizes.choose(quick=quick, tasks=tasks)
    figures: list[Figure] = []
    with bench_database(server_url) as url:
        bench = Bench(url, sizes, workers)
        try:
            raw = bench.raw_drain()
            one = bench.drain(1)
            figures.append(
                Figure("drain, 1 worker", one, "tasks/s", ">= 50,000/s", one >= 50_000, raw,
                       "claim + finish SQL only, 2 pipelines")
            )  # fmt: skip
            if workers > 1:
                many = bench.drain(workers)
                figures.append(
                    Figure(f"drain, {workers} workers", many, "tasks/s", "> 1 worker",
                           many > one, raw, "claim + finish SQL only, 2 pipelines")
                )  # fmt: skip

            seconds, peak = bench.fanout()
            n = sizes.fanout_tasks
            figures.append(
                Figure(f"fan-out, {n:,} x 3 s foo", seconds, "s", "<= 3.5 s", seconds <= 3.5,
                       3.0, "the floor: each sleeps 3 s")
            )  # fmt: skip
            figures.append(
                Figure("fan-out, peak worker memory", peak, "MB", "< 150 MB", peak < 150, None, "")
            )
            p50, p99 = bench.lateness_future()
            notify = bench.raw_notify_ms()
            figures.append(
                Figure("lateness, future task, p99", p99, "ms", "<= 5 ms", p99 <= 5, None,
                       f"p50 {p50:.1f} ms")
            )  # fmt: skip

            port = _free_port()
            bench.procs.start("api", "--port", str(port))
            api_url = f"http://127.0.0.1:{port}"
            _wait_http(api_url)
            p50, p99 = bench.lateness_now(api_url)
            figures.append(
                Figure("lateness, due on creation, p99", p99, "ms", "<= 5 ms", p99 <= 5, notify,
                       f"p50 {p50:.1f} ms; raw: NOTIFY trip p99")
            )  # fmt: skip
            single = bench.create_single(api_url)
            raw_single = bench.raw_create_single()
            figures.append(
                Figure("create, POST /tasks, 32 clients", single, "tasks/s", ">= 3,000/s",
                       single >= 3_000, raw_single, "single-row INSERT, 4 connections")
            )  # fmt: skip
            bulk = bench.create_bulk(api_url)
            raw_bulk = bench.raw_create_bulk()
            figures.append(
                Figure("create, POST /tasks/batch", bulk, "tasks/s", ">= 100,000/s",
                       bulk >= 100_000, raw_bulk, "the same INSERT, 10,000 rows")
            )  # fmt: skip
        finally:
            bench.procs.stop_all()
            bench.conn.close()
    return figures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(base_url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "tasks/s":
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    return f"{value:.0f} {unit}"


def table(figures: list[Figure]) -> str:
    """A Markdown table: scenario, figure, goal, met, raw PostgreSQL, ratio."""
    lines = [
        "| scenario | taskrunner | goal | met | raw PostgreSQL | note |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        lines.append(
            f"| {f.scenario} | {_number(f.value, f.unit)} | {f.goal} | {'yes' if f.met else 'no'}"
            f" | {_number(f.raw, f.unit)} | {f.raw_note} |"
        )
    return "\n".join(lines)


def write_json(figures: list[Figure], path: Path) -> None:
    path.write_text(json.dumps([asdict(f) for f in figures], indent=2) + "\n")
