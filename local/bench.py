"""`taskrunner bench`: how many tasks taskrunner moves, how close to their time they start.

Each scenario runs real `taskrunner worker` / `taskrunner api` processes against a database of
its own (`<db>_bench`, created on the configured or embedded server and dropped afterwards),
and beside each figure the same run measures what PostgreSQL itself does with the same SQL,
so the ratio holds on a noisy machine. Figures come from the database's own timestamps.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from pydantic_core import to_json
from sqlalchemy.engine import make_url
from tqdm import tqdm

from functions import queries
from functions.db import Database
from functions.errors import TaskrunnerError
from functions.model import TaskState
from functions.settings import Settings
from functions.store import Claimed, Result, Store
from local import loadgen
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

    @classmethod
    def choose(cls, *, quick: bool, tasks: int | None) -> Sizes:
        if quick:
            return cls(
                tasks or 2_000, (2_000, 500), 200, 40, 300, 1, 1, 5_000, 8, 4, 2, 200, 2, 20_000
            )
        return cls(
            tasks or 200_000, (50_000, 10_000), 10_000, 400, 20_000, 10,
            10, 1_000_000, 330, 120, 30, 1_000, 11, 100_000,
        )  # fmt: skip


# --- the bench database and the processes under test ------------------------------------


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

    def start(self, database_url: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """`taskrunner *args` on `database_url`."""
        return self.run(
            [sys.executable, "-m", "local", "--log-level", "WARNING", *args],
            TASKRUNNER_DATABASE_URL=database_url,
            **env,
        )

    def run(self, command: list[str], **env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            command,
            env={**os.environ, **env},
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
    """The scenarios. Each runs in a fresh database of its own (`scenario`), on a server
    shared by every process of the run, with nothing prepared by hand: no VACUUM, ANALYZE
    or CHECKPOINT, only what the product does in normal operation."""

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

    def worker(self, **env: str) -> subprocess.Popen[bytes]:
        return self.procs.start(self.url, "worker", **env)

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

    def insert_due(self, kind: str, n: int, in_s: float = -1.0) -> None:
        """Create `n` tasks due `in_s` from now, with the API's own batch INSERT (and NOTIFY)."""
        [(db_now,)] = self.sql("SELECT extract(epoch FROM now())")
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            at_us = int((float(db_now) + in_s) * 1e6)
            payload = json.dumps([{"kind": kind, "at_us": at_us}] * count)
            self.conn.execute(queries.INSERT_TASKS, {"tasks": payload, "max_attempts": 3})

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

    def api(self, processes: int = 1) -> tuple[str, subprocess.Popen[bytes]]:
        port = _free_port()
        proc = self.procs.start(self.url, "api", "--port", str(port), "--workers", str(processes))
        api_url = f"http://127.0.0.1:{port}"
        _wait_http(api_url)
        return api_url, proc

    def reference(self) -> str:
        """The minimal FastAPI app (local/reference.py), served as `taskrunner api` is."""
        port = _free_port()
        self.procs.run(
            [sys.executable, "-m", "uvicorn", "local.reference:app", "--port", str(port),
             "--log-level", "warning"]
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        _wait_http(url, "/tasks/1")
        return url

    def drain(self, workers: int) -> float:
        """baz tasks per second, from the first start to the last finish, as recorded."""
        n = self.sizes.drain_tasks
        with self.scenario(f"drain{workers}"):
            self.insert_due("baz", n)
            for _ in range(workers):
                self.worker()
            wait_until(lambda: self.done(n), n, f"drain, {workers} worker(s)", 600)
            self.check_all_succeeded(n)
            [(seconds,)] = self.sql(
                "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM tasks"
            )
        return n / float(seconds)

    def raw_drain(self) -> float:
        """The same claim and finish transactions straight from psycopg, no task work."""
        n = self.sizes.drain_tasks
        with self.scenario("rawdrain"):
            self.insert_due("baz", n)
            return asyncio.run(_raw_drain(self.url, n))

    def burst(self) -> tuple[float, int]:
        """50,000 baz and 10,000 foo due at one moment on a fresh table, the workers
        waiting: seconds from their due time to the last finish, and the tasks that ran
        more than once (rescued from a live worker, or written twice)."""
        baz, foo = self.sizes.burst_tasks
        with self.scenario("burst"):
            for _ in range(self.workers):
                self.worker()
            self.wait_for_listener(self.workers)
            # One INSERT, as a user loading work does, due 2 s later.
            self.sql(
                "INSERT INTO tasks (kind, execute_at, max_attempts)"
                " SELECT CASE WHEN n <= %s THEN 'baz' ELSE 'foo' END,"
                " now() + interval '2 seconds', 3 FROM generate_series(1, %s) AS n",
                baz,
                baz + foo,
            )
            wait_until(lambda: self.done(baz + foo), baz + foo, "burst", 600)
            self.check_all_succeeded(baz + foo)
            [(seconds, reruns)] = self.sql(
                "SELECT extract(epoch FROM max(finished_at) - min(execute_at)),"
                " count(*) FILTER (WHERE attempts > 1) FROM tasks"
            )
        return float(seconds), int(reruns)

    def warm_burst(self, pooler: bool = False) -> float:
        """baz finished per second in a burst sent through POST /tasks/batch (due now) to a
        worker that first ran 30 single tasks, created 30 ms apart, on a fresh table: its
        statements were prepared while the table was small (see queries.PINNED_PLAN)."""
        n = self.sizes.warm_burst_tasks
        env = {"TASKRUNNER_TRANSACTION_POOLER": "true"} if pooler else {}
        with self.scenario("warmburst"):
            port = _free_port()
            self.procs.start(self.url, "api", "--port", str(port), **env)
            api_url = f"http://127.0.0.1:{port}"
            _wait_http(api_url)
            self.procs.start(self.url, "worker", **env)
            # Registered, so it runs the warm-up tasks one by one (it does not LISTEN with
            # the pooler setting).
            wait_until(lambda: int(self.sql("SELECT count(*) FROM workers")[0][0]), 1,
                       "the worker to start", 60)  # fmt: skip
            asyncio.run(_post_one_by_one(api_url, 30, gap_s=0.03))
            wait_until(lambda: self.done(30), 30, "warm-up", 60)
            [(first,)] = self.sql("SELECT max(id) FROM tasks")
            asyncio.run(_post_batches(api_url, math.ceil(n / 10_000), due_now=True, size=n))
            wait_until(lambda: self.done(n + 30), n + 30, "warm burst", 600)
            self.check_all_succeeded(n + 30)
            [(seconds,)] = self.sql(
                "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM tasks"
                " WHERE id > %s",
                first,
            )
        return n / float(seconds)

    def fanout(self) -> tuple[float, float]:
        """Seconds from the due time until the last of N 3-second foo tasks finished; peak MB."""
        n = self.sizes.fanout_tasks
        with self.scenario("fanout"):
            worker = self.worker()
            self.wait_for_listener(1)
            self.insert_due("foo", n, in_s=1.0)
            wait_until(lambda: self.done(n), n, "fan-out", 120)
            self.check_all_succeeded(n)
            peak = peak_rss_mb(worker.pid)
            [(seconds,)] = self.sql(
                "SELECT extract(epoch FROM max(finished_at) - min(execute_at)) FROM tasks"
            )
        return float(seconds), peak

    def lateness_future(self) -> tuple[float, float]:
        """p50 and p99 of start lateness (ms) for tasks created ahead of their time."""
        n = self.sizes.lateness_tasks
        with self.scenario("latefuture"):
            self.worker()
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
            return self._lateness_ms()

    def lateness_now(self) -> tuple[float, float]:
        """p50 and p99 of start lateness (ms) for tasks created due, through the API."""
        n = self.sizes.lateness_tasks
        with self.scenario("latenow"):
            api_url, _ = self.api()
            self.worker()
            self.wait_for_listener(1)
            asyncio.run(_post_one_by_one(api_url, n))
            wait_until(lambda: self.done(n), n, "lateness, due now", 60)
            self.check_all_succeeded(n)
            return self._lateness_ms()

    def _lateness_ms(self) -> tuple[float, float]:
        """p50 and p99 of start lateness (ms), as /stats defines it (queries.BECAME_DUE)."""
        rows = self.sql(
            f"SELECT extract(epoch FROM started_at - {queries.BECAME_DUE}) * 1000 FROM tasks"
        )
        values = [float(v) for (v,) in rows]
        return percentile(values, 50), percentile(values, 99)

    def raw_notify_ms(self) -> float:
        """p99 of a NOTIFY's trip from one session to another LISTENing one (ms)."""
        with self.scenario("rawnotify"):
            return asyncio.run(_raw_notify_p99(self.url, self.sizes.lateness_tasks))

    def create_single(self) -> float:
        n = self.sizes.create_requests
        with self.scenario("create"):
            api_url, _ = self.api()
            started = time.perf_counter()
            asyncio.run(_post_many(api_url, n, clients=32))
            return n / (time.perf_counter() - started)

    def raw_create_single(self) -> float:
        with self.scenario("rawcreate"):
            return asyncio.run(_raw_insert_one_by_one(self.url, self.sizes.create_requests, 4))

    def create_bulk(self) -> float:
        batches = self.sizes.bulk_batches
        with self.scenario("bulk"):
            api_url, _ = self.api()
            started = time.perf_counter()
            asyncio.run(_post_batches(api_url, batches))
            return batches * 10_000 / (time.perf_counter() - started)

    def create_bulk_keyed(self) -> float:
        """As create_bulk, each item with an idempotency key of 255 characters (the most the
        API takes): what the keyed path adds to a batch."""
        batches = self.sizes.bulk_batches
        with self.scenario("bulkkeyed"):
            api_url, _ = self.api()
            started = time.perf_counter()
            asyncio.run(_post_batches(api_url, batches, key_chars=255))
            return batches * 10_000 / (time.perf_counter() - started)

    def raw_create_bulk(self) -> float:
        batches = self.sizes.bulk_batches
        with self.scenario("rawbulk"):
            started = time.perf_counter()
            for _ in range(batches):
                at_us = int((time.time() + 3600) * 1e6)
                # Serialized as the store does (pydantic-core), so only the API differs.
                rows = [{"kind": "baz", "at_us": at_us + i * 360_000} for i in range(10_000)]
                payload = to_json(rows).decode()
                self.conn.execute(queries.INSERT_TASKS, {"tasks": payload, "max_attempts": 3})
            return batches * 10_000 / (time.perf_counter() - started)

    def api_routes(self) -> list[Figure]:
        """POST /tasks, GET /tasks/{id} and GET /tasks?limit=100 under wrk (32 keep-alive
        connections), each beside the minimal route of the same shape and beside pgbench
        running the same statement; POST and GET also from `taskrunner api --workers 2`."""
        seconds = self.sizes.load_s
        body = json.dumps({"type": "baz", "execute_at": time.time() + 86_400})
        figures = []
        with self.scenario("api"):
            reference = self.reference()
            ref_post = loadgen.wrk(reference, method="POST", path="/tasks", body=body,
                                   seconds=seconds)  # fmt: skip
            ref_get = loadgen.wrk(reference, path="/tasks/{id}", ids=(1, 1000), seconds=seconds)
            ref_page = loadgen.wrk(reference, path="/tasks?limit=100", seconds=seconds)
            for processes in (1, 2):
                api_url, proc = self.api(processes)
                post = loadgen.wrk(api_url, method="POST", path="/tasks", body=body,
                                   seconds=seconds)  # fmt: skip
                [(lo, hi)] = self.sql("SELECT min(id), max(id) FROM tasks")
                get = loadgen.wrk(api_url, path="/tasks/{id}", ids=(lo, hi), seconds=seconds)
                name = f"{processes} process{'es' if processes > 1 else ''}"
                loads = [("POST /tasks", post, ref_post), ("GET /tasks/{id}", get, ref_get)]
                if processes == 1:
                    page = loadgen.wrk(api_url, path="/tasks?limit=100", seconds=seconds)
                    loads.append(("GET /tasks?limit=100", page, ref_page))
                self.procs.stop(proc)
                for route, ours, ref in loads:
                    ratio = ours.per_s / ref.per_s
                    figures.append(
                        Figure(f"API {route}, {name}, 32 connections", ours.per_s, "req/s",
                               ">= 50% of minimal, p99 <= 50 ms",
                               ratio >= 0.5 and (ours.p99_ms or 0) <= 50, None,
                               f"p99 {ours.p99_ms:.1f} ms; minimal route {ref.per_s:,.0f}/s,"
                               f" p99 {ref.p99_ms:.1f} ms ({ratio:.0%})")
                    )  # fmt: skip
            raws = {
                "POST /tasks": loadgen.RAW_INSERT,
                "GET /tasks/{id}": loadgen.raw_get(lo, hi),
                "GET /tasks?limit=100": loadgen.RAW_PAGE,
            }
            rates = {route: loadgen.pgbench(self.url, script, seconds=seconds)
                     for route, script in raws.items()}  # fmt: skip
        for i, figure in enumerate(figures):
            route = figure.scenario.removeprefix("API ").split(",")[0]
            figures[i] = replace(figure, raw=rates[route])
        return figures

    def stats_large(self) -> tuple[float, float]:
        """p50 and p99 (ms) of GET /stats with N finished tasks in the table, run by the
        workers just before, as a user's would be (nothing analyzed by hand)."""
        n = self.sizes.stats_tasks
        with self.scenario("stats"):
            self.insert_due("baz", n)
            for _ in range(self.workers):
                self.worker()
            wait_until(lambda: self.done(n), n, "stats, running the tasks", 900)
            self.check_all_succeeded(n)
            api_url, _ = self.api()
            times = []
            # 200, so that the p99 is not simply the slowest (the first, which opens the
            # API's connection).
            for _ in range(200):
                started = time.perf_counter()
                with urllib.request.urlopen(f"{api_url}/stats", timeout=10) as response:
                    stats = json.loads(response.read())
                times.append((time.perf_counter() - started) * 1000)
            finished = sum(stats["counts"]["succeeded"].values())
            if abs(finished - n) > 0.1 * n:
                raise RuntimeError(f"/stats counted {finished} succeeded of {n}")
        return percentile(times, 50), percentile(times, 99)

    def soak(self) -> tuple[float, float, float]:
        """Tasks created and run at a steady rate with a short retention: the peak size of
        the tasks table with its indexes (MB) in the minute and a half after warm-up and in
        the last one, and their ratio. Flat means pruning and autovacuum keep up."""
        sizes = self.sizes
        window = min(90.0, (sizes.soak_s - sizes.soak_warmup_s) / 2)
        samples: list[tuple[float, int]] = []
        with self.scenario("soak"):
            self.worker(TASKRUNNER_RETENTION_S=str(sizes.soak_retention_s))
            self.wait_for_listener(1)
            started = time.monotonic()
            step = 0.5
            per_step = max(1, int(sizes.soak_rate * step))
            with tqdm(total=int(sizes.soak_s), desc="soak", unit="s", leave=False,
                      file=sys.stderr, disable=not sys.stderr.isatty()) as bar:  # fmt: skip
                while (elapsed := time.monotonic() - started) < sizes.soak_s:
                    self.insert_due("baz", per_step, in_s=0)
                    [(size,)] = self.sql("SELECT pg_total_relation_size('tasks')")
                    samples.append((elapsed, int(size)))
                    bar.update(int(elapsed) - bar.n)
                    time.sleep(max(0.0, started + len(samples) * step - time.monotonic()))
            [(stuck,)] = self.sql(
                "SELECT count(*) FROM tasks WHERE state <> 'succeeded'"
                " AND created_at < now() - interval '10 seconds'"
            )
            if stuck:
                raise RuntimeError(f"soak: {stuck} tasks not run within 10 s")
        warm = max(b for t, b in samples if sizes.soak_warmup_s <= t < sizes.soak_warmup_s + window)
        end = max(b for t, b in samples if t >= sizes.soak_s - window)
        return warm / 2**20, end / 2**20, end / warm

    def cold_starts(self) -> tuple[float, float, float, str]:
        """Median ms, over fresh processes (11 in a full run), of importing the API handler
        plus its first request, of importing the tick handler plus a tick with nothing due,
        and of the floor under both (importing asyncio and psycopg, one connection, one
        statement: local/coldstart.py); and where they ran.

        They run in the Lambda bundle `sam build` makes (infra/Makefile: the runtime
        dependencies only, compiled to .pyc as pip installs them), by `python -I -S`, which
        sees the standard library and the bundle and nothing else; where the bundle cannot
        be built (no make, no PyPI), in the development install, and the note says so.
        """
        medians = []
        with self.scenario("coldstart"), tempfile.TemporaryDirectory() as tmp:
            bundle = _lambda_bundle(Path(tmp) / "bundle")
            if bundle is None:
                command = [sys.executable, "-m", "local.coldstart"]
                where = "the development install (the Lambda bundle could not be built)"
            else:
                script = str(Path(__file__).with_name("coldstart.py"))
                command = [sys.executable, "-I", "-S", script, "--bundle", str(bundle)]
                where = "the Lambda bundle, python -I -S"
            for which in ("api", "tick", "floor"):
                totals = []
                for _ in range(self.sizes.cold_starts):
                    out = subprocess.run(
                        [*command, which],
                        env={**os.environ, "TASKRUNNER_DATABASE_URL": self.url,
                             "AWS_LAMBDA_FUNCTION_NAME": "taskrunner-bench"},
                        capture_output=True, text=True, timeout=60, check=True,
                    )  # fmt: skip
                    totals.append(json.loads(out.stdout.splitlines()[-1])["total_ms"])
                medians.append(statistics.median(totals))
        return medians[0], medians[1], medians[2], where


def _lambda_bundle(target: Path) -> Path | None:
    """The bundle `sam build` makes for a function (both hold the same), built into `target`;
    None if it cannot be built here."""
    root = Path(__file__).parents[1]
    try:
        subprocess.run(
            ["make", "-s", "-C", str(root / "infra"), "build-ApiFunction",
             f"ARTIFACTS_DIR={target}", f"PYTHON={sys.executable}"],
            capture_output=True, timeout=900, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return target


def _utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


# --- raw PostgreSQL and HTTP load, asyncio ---------------------------------------------------


async def _raw_drain(url: str, n: int, pipelines: int = 2) -> float:
    """Claim and finish with the worker's transactions and nothing else, `pipelines` at once:
    the store's own calls, without the runner (no task runs, nothing printed).

    Each pipeline claims while it finishes the previous batch.
    """
    settings = Settings(database_url=url, db_pool_size=2 * pipelines)
    database = Database(settings)
    store = Store(database)
    started = time.perf_counter()

    async def pipeline(worker: str) -> None:
        await store.register_worker(worker=worker, lease_s=60.0)
        batches: asyncio.Queue[list[Claimed] | None] = asyncio.Queue(maxsize=2)

        async def claim() -> None:
            while True:
                claimed, _ = await store.claim_due(
                    worker=worker, kinds=["baz"], limit=Store.WRITE_BATCH, lease_s=60.0
                )
                await batches.put(claimed or None)
                if not claimed:
                    return

        async def finish() -> None:
            while (claimed := await batches.get()) is not None:
                results = [
                    Result(c.id, c.attempt, TaskState.SUCCEEDED, output="Baz 1") for c in claimed
                ]
                await store.finish_many(worker=worker, results=results)

        await asyncio.gather(claim(), finish())

    try:
        await asyncio.gather(*(pipeline(f"raw{i}") for i in range(pipelines)))
        return n / (time.perf_counter() - started)
    finally:
        await database.dispose()


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


async def _post_one_by_one(api_url: str, n: int, gap_s: float | None = None) -> None:
    """Create tasks due at once, one at a time, a few milliseconds apart (or `gap_s`)."""
    conn = await _HttpConnection.open(api_url)
    for _ in range(n):
        body = json.dumps({"type": "baz", "execute_at": time.time() - 1}).encode()
        status, text = await conn.post("/tasks", body)
        if status != 201:
            raise RuntimeError(f"POST /tasks answered {status}: {text[:200]!r}")
        await asyncio.sleep(random.uniform(0.005, 0.02) if gap_s is None else gap_s)
    conn.close()


async def _post_batches(
    api_url: str,
    batches: int,
    *,
    due_now: bool = False,
    size: int | None = None,
    key_chars: int = 0,
) -> None:
    """`batches` POST /tasks/batch of 10,000 baz (`size` in all, when given), each item with
    an idempotency key of `key_chars` characters, all distinct, when that is not 0."""
    if due_now:
        times = [time.time() - 1] * 10_000
    else:
        # 10,000 times over an hour, each to the microsecond: as a client's own times would be.
        when = time.time() + 3600
        times = [when + i * 0.36 for i in range(10_000)]
    conn = await _HttpConnection.open(api_url)
    left = batches * 10_000 if size is None else size
    for _ in range(batches):
        count, left = min(10_000, left), left - 10_000
        items: list[dict[str, Any]] = [{"type": "baz", "execute_at": t} for t in times[:count]]
        if key_chars:
            for item in items:
                item["idempotency_key"] = secrets.token_hex(key_chars)[:key_chars]
        body = json.dumps({"tasks": items}).encode()
        status, text = await conn.post("/tasks/batch", body)
        if status != 201:
            raise RuntimeError(f"POST /tasks/batch answered {status}: {text[:200]!r}")
    conn.close()


# --- the run and its table ---------------------------------------------------------------


# The scenarios `taskrunner bench --only` can pick, in the order they run.
SCENARIOS = ("drain", "burst", "warm-burst", "fanout", "lateness", "create", "api", "stats",
             "soak", "cold-start")  # fmt: skip


def run(
    server_url: str,
    *,
    quick: bool,
    tasks: int | None,
    workers: int,
    only: Collection[str] | None = None,
) -> list[Figure]:
    """Run every scenario, or those in `only` (names from SCENARIOS); return the figures."""
    unknown = sorted(set(only or ()) - set(SCENARIOS))
    if unknown:
        raise TaskrunnerError(f"no bench scenario {unknown}; the scenarios: {', '.join(SCENARIOS)}")
    sizes = Sizes.choose(quick=quick, tasks=tasks)
    bench = Bench(server_url, sizes, workers)
    figures: list[Figure] = []
    raw_note = "claim + finish transactions only, 2 pipelines"
    drain_one: float | None = None  # the warm burst's yardstick

    def want(name: str) -> bool:
        return only is None or name in only

    try:
        if want("drain"):
            raw = bench.raw_drain()
            one = drain_one = bench.drain(1)
            figures.append(
                Figure(
                    "drain, 1 worker", one, "tasks/s", ">= 50,000/s", one >= 50_000, raw, raw_note
                )
            )
            if workers > 1:
                many = bench.drain(workers)
                figures.append(
                    Figure(f"drain, {workers} workers", many, "tasks/s", "> 1 worker", many > one,
                           raw, raw_note)
                )  # fmt: skip

        if want("burst"):
            seconds, reruns = bench.burst()
            baz, foo = sizes.burst_tasks
            figures.append(
                Figure(f"burst on a fresh table, {baz:,} baz + {foo:,} foo, {workers} workers",
                       seconds, "s", "each once; <= 10 s", reruns == 0 and seconds <= 10, 3.0,
                       f"ran twice: {reruns}; the floor: foo sleeps 3 s")
            )  # fmt: skip

        if want("warm-burst"):
            warm = bench.warm_burst()
            one = drain_one or bench.drain(1)
            n = sizes.warm_burst_tasks
            figures.append(
                Figure(f"burst of {n:,} baz to a worker warmed on a small table", warm,
                       "tasks/s", ">= 70% of drain, 1 worker", warm >= 0.7 * one, None,
                       f"drain, 1 worker: {one:,.0f}/s")
            )  # fmt: skip

        if want("fanout"):
            seconds, peak = bench.fanout()
            n = sizes.fanout_tasks
            figures.append(
                Figure(f"fan-out, {n:,} x 3 s foo", seconds, "s", "<= 3.5 s", seconds <= 3.5,
                       3.0, "the floor: each sleeps 3 s")
            )  # fmt: skip
            figures.append(
                Figure("fan-out, peak worker memory", peak, "MB", "< 150 MB", peak < 150, None, "")
            )

        if want("lateness"):
            p50, p99 = bench.lateness_future()
            figures.append(
                Figure("lateness, future task, p99", p99, "ms", "<= 5 ms", p99 <= 5, None,
                       f"p50 {p50:.1f} ms")
            )  # fmt: skip
            notify = bench.raw_notify_ms()
            p50, p99 = bench.lateness_now()
            figures.append(
                Figure("lateness, due on creation, p99", p99, "ms", "<= 5 ms", p99 <= 5, notify,
                       f"p50 {p50:.1f} ms; raw: NOTIFY trip p99")
            )  # fmt: skip

        if want("create"):
            single = bench.create_single()
            raw_single = bench.raw_create_single()
            figures.append(
                Figure("create, POST /tasks, 32 clients", single, "tasks/s", ">= 3,000/s",
                       single >= 3_000, raw_single, "single-row INSERT, 4 connections")
            )  # fmt: skip
            bulk = bench.create_bulk()
            raw_bulk = bench.raw_create_bulk()
            figures.append(
                Figure("create, POST /tasks/batch of 10,000", bulk, "tasks/s", ">= 85% of raw",
                       bulk >= 0.85 * raw_bulk, raw_bulk,
                       f"the same INSERT, 10,000 rows ({bulk / raw_bulk:.0%})")
            )  # fmt: skip
            keyed = bench.create_bulk_keyed()
            figures.append(
                Figure("create, POST /tasks/batch of 10,000 with 255-character keys", keyed,
                       "tasks/s", ">= 1/3 of no keys", keyed * 3 >= bulk, bulk,
                       f"raw: the batch without keys ({keyed / bulk:.0%})")
            )  # fmt: skip

        if want("api"):
            if loadgen.wrk_path() is None:
                print("bench: wrk is not installed; no API figures", file=sys.stderr)
            else:
                figures += bench.api_routes()
        if want("stats"):
            p50, p99 = bench.stats_large()
            figures.append(
                Figure(f"GET /stats, {sizes.stats_tasks:,} finished tasks, p99", p99, "ms",
                       "<= 50 ms", p99 <= 50, None, f"p50 {p50:.1f} ms")
            )  # fmt: skip

        if want("soak"):
            warm, end, ratio = bench.soak()
            figures.append(
                Figure(f"soak, {sizes.soak_rate:,} tasks/s for {sizes.soak_s:.0f} s, retention"
                       f" {sizes.soak_retention_s:.0f} s: table + indexes at the end", end, "MB",
                       "within 20% of after warm-up", ratio <= 1.2, None,
                       f"after warm-up {warm:.1f} MB ({ratio - 1:+.0%})")
            )  # fmt: skip

        if want("cold-start"):
            api_ms, tick_ms, floor_ms, where = bench.cold_starts()
            note = (
                f"median of {sizes.cold_starts} fresh processes, in {where}; raw: import asyncio"
                " and psycopg, connect, SELECT 1"
            )
            figures.append(
                Figure("cold start, API: import + first request", api_ms, "ms", "<= 350 ms",
                       api_ms <= 350, floor_ms, note)
            )  # fmt: skip
            figures.append(
                Figure("cold start, tick: import + a tick, nothing due", tick_ms, "ms", "<= 250 ms",
                       tick_ms <= 250, floor_ms, note)
            )  # fmt: skip
    finally:
        bench.procs.stop_all()
    return figures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(base_url: str, path: str = "/healthz") -> None:
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


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("tasks/s", "req/s"):
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.1f} MB"
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
