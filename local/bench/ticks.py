"""Many ticks at once, as Lambda runs them: the `ticks` scenario of `taskrunner bench`.

pgbouncer (Debian's, started here on its own port, transaction mode, 10 server connections)
in front of the scenario's fresh database; two `taskrunner api` processes reaching it through
the pooler, as a Lambda API is configured, create tasks due over a minute; N ticks start
together every second, each with its own connections through the pooler (a pool of 2, as the
tick function is deployed). Two cores cannot start 128 Python processes a second, so the
ticks run warm, many to a process: a few driver processes (`python -m local.bench.ticks
drive`) each start their share of the N every second on one asyncio loop, each calling
`functions.tick.tick` as the Lambda handler does.

Read from the database's own record and from the pooler: each task once (attempts and the
printed lines), none early, start lateness, the server connections the database saw (sampled
from pg_stat_activity), the ticks that claimed nothing, and what a tick costs in round trips
(pgbouncer's SHOW STATS, the API's share taken out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from functions import queries
from local.bench.figures import Figure
from local.bench.harness import Harness, free_port, percentile, wait_http
from local.pgbouncer import pgbouncer

# The pooler's server connections (default_pool_size): a small RDS Proxy's or pgbouncer's.
POOL_SIZE = 10
# The tick function's timeout (infra/template.yaml's default): each tick's deadline.
TICK_TIMEOUT_S = 90.0
# Processes that run the ticks, each its share of them on one event loop.
DRIVERS = 2
# Seconds between a batch's create and the first of its tasks' due times.
AHEAD_S = 3.0
# The pooler's client connections: ticks outlive their second when they are slow, and each
# holds two (at 4 * N, 228 for N = 32, pgbouncer refused 1,418 of 2,048 ticks).
MAX_CLIENTS = 5_000
# How often the database's connections are counted (s).
SAMPLE_S = 0.05


@dataclass(frozen=True)
class TickSizes:
    tasks: int
    spread_s: float
    batch: int
    fan_outs: tuple[int, ...]

    @classmethod
    def choose(cls, quick: bool) -> TickSizes:
        if quick:
            return cls(2_000, 5.0, 500, (8,))
        return cls(100_000, 60.0, 1_000, (32, 64, 128))


@dataclass
class Outcome:
    """What one run of N ticks a second did."""

    fan_out: int
    tasks: int
    reruns: int = 0
    lines: int = 0
    early: int = 0
    lateness_p50_ms: float = 0.0
    lateness_p99_ms: float = 0.0
    peak_server_conns: int = 0
    peak_active_conns: int = 0
    peak_clients_waiting: int = 0
    # The pooler's client connections, at most (SHOW POOLS: active and waiting).
    peak_clients: int = 0
    # Ticks running at once, on average: their seconds summed over the run's.
    mean_ticks: float = 0.0
    max_pool_wait_ms: float = 0.0
    # Server connections, on average over the run: running a statement, idle in a
    # transaction (waiting for the client), waiting for a lock.
    mean_running: float = 0.0
    mean_in_xact: float = 0.0
    mean_on_lock: float = 0.0
    ticks: int = 0
    idle_ticks: int = 0
    raised: int = 0
    # POST /tasks/batch answered 503 (sent again: a batch may then be in the table twice).
    refused: int = 0
    tick_errors: int = 0
    start_lag_p99_ms: float = 0.0
    xacts_per_tick: float = 0.0
    queries_per_tick: float = 0.0
    empty_tick_xacts: int = 0
    empty_tick_queries: int = 0
    wait_per_tick_ms: float = 0.0
    server_cpu_s: float = 0.0
    drivers_cpu_s: float = 0.0
    pooler_cpu_s: float = 0.0
    seconds: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    notes: list[str] = field(default_factory=list)


# --- pgbouncer --------------------------------------------------------------------------------


def _admin(admin_url: str) -> psycopg.Connection[Any]:
    # The admin console speaks the simple query protocol only: a client-side cursor.
    return psycopg.connect(admin_url, autocommit=True, cursor_factory=psycopg.ClientCursor)


def pooler_totals(admin_url: str, database: str) -> tuple[int, int, int]:
    """pgbouncer's SHOW STATS for `database`: transactions, queries, and the microseconds
    clients waited for a server connection, in all."""
    with _admin(admin_url) as conn:
        cur = conn.execute("SHOW STATS")
        names = [c.name for c in cur.description or ()]
        for row in cur.fetchall():
            stats = dict(zip(names, row, strict=True))
            if stats["database"] == database:
                return (int(stats["total_xact_count"]), int(stats["total_query_count"]),
                        int(stats["total_wait_time"]))  # fmt: skip
    return 0, 0, 0


# --- CPU, from /proc --------------------------------------------------------------------------

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int, children: bool = False) -> float:
    """A process's CPU seconds (with its reaped children's, when `children`); 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime: fields 14-17, i.e. 11-14 after the command.
    used = int(fields[11]) + int(fields[12])
    if children:
        used += int(fields[13]) + int(fields[14])
    return used / _TICKS_PER_S


def server_cpu_s(postmaster: int) -> float:
    """The PostgreSQL server's CPU seconds: the postmaster's, its ended backends' (reaped by
    it) and its live children's. A backend's CPU is missing from both for a moment after it
    ends (gone from /proc, not yet in the postmaster's children's time: 3 of 3.3 s once, read
    right after a drain closed its connections): read until two readings 0.3 s apart agree
    (5 s at most)."""
    deadline = time.monotonic() + 5
    last = _server_cpu_now(postmaster)
    while True:
        time.sleep(0.3)
        now = _server_cpu_now(postmaster)
        if abs(now - last) < 0.02 or time.monotonic() > deadline:
            return now
        last = now


def _server_cpu_now(postmaster: int) -> float:
    total = cpu_s(postmaster, children=True)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except OSError:
            continue
        if ppid == postmaster:
            total += cpu_s(int(stat.parent.name))
    return total


def postmaster_of(conn: psycopg.Connection[Any]) -> int | None:
    """The server's postmaster pid, when it runs on this machine (else None)."""
    [(backend,)] = conn.execute("SELECT pg_backend_pid()").fetchall()
    try:
        return int(Path(f"/proc/{backend}/stat").read_text().rpartition(")")[2].split()[1])
    except OSError:
        return None


# --- watching ---------------------------------------------------------------------------------


class Sampler:
    """Counts, every SAMPLE_S, the database's client connections (those pgbouncer holds; not
    the bench's own) and the pooler's waiting clients, on a thread."""

    def __init__(self, url: str, admin_url: str, exclude: list[int]) -> None:
        self.url, self.admin_url, self.exclude = url, admin_url, exclude
        self.peak = self.peak_active = self.peak_waiting = self.peak_clients = 0
        self.max_wait_ms = 0.0
        # Summed over the samples: server connections running a statement, in a transaction
        # waiting for their client's next statement, and waiting for a lock.
        self.samples = self.running = self.in_xact = self.on_lock = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            with (
                psycopg.connect(self.url, autocommit=True) as conn,
                _admin(self.admin_url) as admin,
            ):
                [(own,)] = conn.execute("SELECT pg_backend_pid()").fetchall()
                exclude = [*self.exclude, own]
                while not self._stop.wait(SAMPLE_S):
                    [(total, busy, running, in_xact, on_lock)] = conn.execute(
                        "SELECT count(*), count(*) FILTER (WHERE state <> 'idle'),"
                        " count(*) FILTER (WHERE state = 'active'),"
                        " count(*) FILTER (WHERE state LIKE 'idle in transaction%%'),"
                        " count(*) FILTER (WHERE wait_event_type = 'Lock')"
                        " FROM pg_stat_activity WHERE datname = current_database()"
                        " AND backend_type = 'client backend' AND pid <> ALL(%s)",
                        (exclude,),
                    ).fetchall()
                    self.peak = max(self.peak, int(total))
                    self.peak_active = max(self.peak_active, int(busy))
                    self.samples += 1
                    self.running += int(running)
                    self.in_xact += int(in_xact)
                    self.on_lock += int(on_lock)
                    cur = admin.execute("SHOW POOLS")
                    names = [c.name for c in cur.description or ()]
                    for row in cur.fetchall():
                        pool = dict(zip(names, row, strict=True))
                        if pool["database"] == conn.info.dbname:
                            self.peak_waiting = max(self.peak_waiting, int(pool["cl_waiting"]))
                            clients = int(pool["cl_active"]) + int(pool["cl_waiting"])
                            self.peak_clients = max(self.peak_clients, clients)
                            wait_ms = int(pool["maxwait"]) * 1000 + int(pool["maxwait_us"]) / 1000
                            self.max_wait_ms = max(self.max_wait_ms, wait_ms)
        except BaseException as exc:
            self.error = exc


# --- the creator ------------------------------------------------------------------------------


async def _post_batch(api_url: str, times: list[float], refused: list[int] | None = None) -> None:
    """POST the tasks due at `times` as one batch; a 503 (the database's connections busy
    past the API's bound) is sent again a second later, as a client does, and counted in
    `refused` (none given: it fails)."""
    from local.bench.load import HttpConnection

    body = json.dumps({"tasks": [{"type": "baz", "execute_at": t} for t in times]}).encode()
    while True:
        conn = await HttpConnection.open(api_url)
        try:
            status, text = await conn.post("/tasks/batch", body)
        finally:
            conn.close()
        if status == 201:
            return
        if status != 503 or refused is None:
            raise RuntimeError(f"POST /tasks/batch answered {status}: {text[:200]!r}")
        refused.append(1)
        await asyncio.sleep(1.0)


async def create_over(
    apis: list[str], sizes: TickSizes, first_due: float, skip: int, refused: list[int]
) -> None:
    """The tasks, batch by batch through the APIs in turn, each created AHEAD_S before its
    first task is due; their due times spread evenly over `sizes.spread_s` from `first_due`.
    The first `skip` batches were created already."""
    step = sizes.spread_s / sizes.tasks
    batches = range(0, sizes.tasks, sizes.batch)

    async def api(which: int) -> None:
        for i, start in enumerate(batches):
            if i < skip or i % len(apis) != which:
                continue
            due = first_due + start * step
            await asyncio.sleep(max(0.0, due - AHEAD_S - time.time()))
            count = min(sizes.batch, sizes.tasks - start)
            await _post_batch(apis[which], [due + j * step for j in range(count)], refused)

    await asyncio.gather(*(api(i) for i in range(len(apis))))


def _batch_times(sizes: TickSizes, first_due: float, index: int) -> list[float]:
    step = sizes.spread_s / sizes.tasks
    start = index * sizes.batch
    return [first_due + (start + j) * step for j in range(min(sizes.batch, sizes.tasks - start))]


# --- the scenario -----------------------------------------------------------------------------


def run_fan_out(bench: Harness, sizes: TickSizes, fan_out: int) -> Outcome:
    """One run: `fan_out` ticks a second through the pooler beside the two APIs' creates."""
    outcome = Outcome(fan_out, sizes.tasks)
    n = sizes.tasks
    with bench.scenario(f"ticks{fan_out}"), tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        database = make_url(bench.url).database or ""
        with pgbouncer(bench.url, pool_size=POOL_SIZE, max_clients=MAX_CLIENTS) as pooler:
            pooled, admin, pooler_pid = pooler.url, pooler.admin_url, pooler.pid
            env = {"TASKRUNNER_TRANSACTION_POOLER": "true", "TASKRUNNER_DB_POOL_SIZE": "1"}
            apis = []
            for _ in range(2):
                port = free_port()
                bench.procs.start(pooled, "api", "--port", str(port), **env)
                apis.append(f"http://127.0.0.1:{port}")
            for api_url in apis:
                wait_http(api_url)
            # A tick with nothing due, alone: its round trips through the pooler.
            before = pooler_totals(admin, database)
            _drive_once(bench, pooled, work)
            after = pooler_totals(admin, database)
            outcome.empty_tick_xacts = after[0] - before[0]
            outcome.empty_tick_queries = after[1] - before[1]
            # The first batch alone: what one create costs the pooler, taken out below.
            first_due = time.time() + 2 * AHEAD_S + 3.0
            before = pooler_totals(admin, database)
            asyncio.run(_post_batch(apis[0], _batch_times(sizes, first_due, 0)))
            after = pooler_totals(admin, database)
            batch_xacts, batch_queries = after[0] - before[0], after[1] - before[1]
            batches = -(-n // sizes.batch)
            # The ticks start a second before the first task is due, and go on a few
            # seconds past the last (every task is due by then: the last ticks drain).
            start_at = first_due - 1.0
            seconds = int(sizes.spread_s) + 4
            drivers = [
                _driver(bench, pooled, work, f"driver{i}", per_s, start_at, seconds)
                for i, per_s in enumerate(_shares(fan_out, DRIVERS))
            ]
            postmaster = postmaster_of(bench.conn)
            [(harness_pid,)] = bench.sql("SELECT pg_backend_pid()")
            server_before = server_cpu_s(postmaster) if postmaster else 0.0
            pooler_before = cpu_s(pooler_pid)
            totals_before = pooler_totals(admin, database)
            started = time.monotonic()
            with Sampler(bench.url, admin, [int(harness_pid)]) as sampler:
                refused: list[int] = []
                asyncio.run(create_over(apis, sizes, first_due, skip=1, refused=refused))
                outcome.refused = len(refused)
                # Until the last tick has ended; what it left is counted below, not waited
                # for (a task claimed by a claim whose answer was lost, and not handed back,
                # waits for the next tick after its lease, which never comes here).
                # The last ticks start `seconds` after the first, and each has its deadline.
                until = started + seconds + TICK_TIMEOUT_S + 60
                for proc in drivers:
                    try:
                        proc.wait(timeout=max(1.0, until - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        outcome.notes.append("ticks still running past their deadline")
                        bench.procs.stop(proc)
            outcome.seconds = time.monotonic() - started
            totals_after = pooler_totals(admin, database)
            outcome.server_cpu_s = (server_cpu_s(postmaster) - server_before) if postmaster else 0
            outcome.pooler_cpu_s = cpu_s(pooler_pid) - pooler_before
            outcome.load = os.getloadavg()
            if sampler.error is not None:
                raise RuntimeError(f"ticks: sampling failed: {sampler.error}")
            outcome.peak_server_conns = sampler.peak
            outcome.peak_active_conns = sampler.peak_active
            outcome.peak_clients_waiting = sampler.peak_waiting
            outcome.peak_clients = sampler.peak_clients
            outcome.max_pool_wait_ms = sampler.max_wait_ms
            samples = max(1, sampler.samples)
            outcome.mean_running = sampler.running / samples
            outcome.mean_in_xact = sampler.in_xact / samples
            outcome.mean_on_lock = sampler.on_lock / samples
        for i, proc in enumerate(drivers):
            if proc.returncode != 0:
                log = (work / f"driver{i}.log").read_text()[-2000:]
                raise RuntimeError(f"ticks: driver {i} exited {proc.returncode}: {log}")
        ticks: list[dict[str, Any]] = []
        for i in range(len(drivers)):
            result = json.loads((work / f"driver{i}.json").read_text())
            ticks += result["ticks"]
            outcome.drivers_cpu_s += result["cpu_s"]
            outcome.lines += (work / f"driver{i}.out").read_text().count("Baz ")
        outcome.ticks = len(ticks)
        outcome.idle_ticks = sum(1 for t in ticks if t.get("claimed") == 0)
        outcome.raised = sum(1 for t in ticks if "raised" in t)
        outcome.tick_errors = sum(t.get("errors", 0) for t in ticks)
        outcome.start_lag_p99_ms = percentile([t["lag_s"] * 1000 for t in ticks] or [0.0], 99)
        outcome.mean_ticks = sum(t.get("seconds", 0.0) for t in ticks) / outcome.seconds
        xacts = totals_after[0] - totals_before[0] - (batches - 1) * batch_xacts
        queries_ = totals_after[1] - totals_before[1] - (batches - 1) * batch_queries
        outcome.xacts_per_tick = xacts / max(1, outcome.ticks)
        outcome.queries_per_tick = queries_ / max(1, outcome.ticks)
        waited_ms = (totals_after[2] - totals_before[2]) / 1000
        outcome.wait_per_tick_ms = waited_ms / max(1, outcome.ticks)
        [(created, reruns, early, succeeded, running)] = bench.sql(
            "SELECT count(*), count(*) FILTER (WHERE attempts > 1),"
            " count(*) FILTER (WHERE started_at < execute_at),"
            " count(*) FILTER (WHERE state = 'succeeded'),"
            " count(*) FILTER (WHERE state = 'running') FROM tasks"
        )
        outcome.reruns, outcome.early = int(reruns), int(early)
        if created != n:
            outcome.notes.append(f"{created:,} tasks created (503s sent again)")
            outcome.tasks = n = int(created)
        if int(succeeded) != n:
            outcome.notes.append(
                f"{succeeded:,} of {n:,} succeeded, {running:,} left running by the last ticks"
            )
        rows = bench.sql(
            f"SELECT extract(epoch FROM started_at - {queries.BECAME_DUE}) * 1000 FROM tasks"
        )
        late = [float(v) for (v,) in rows if v is not None]
        if late:  # (none: no task started)
            outcome.lateness_p50_ms = percentile(late, 50)
            outcome.lateness_p99_ms = percentile(late, 99)
        print(f"bench: ticks, {fan_out} a second: {asdict(outcome)}", file=sys.stderr)
    return outcome


def _shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal whole shares (none empty)."""
    parts = min(parts, total)
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _driver(
    bench: Harness, pooled: str, work: Path, name: str, per_s: int, start_at: float, seconds: int
) -> subprocess.Popen[bytes]:
    """A driver process: `per_s` ticks a second for `seconds` from `start_at`, configured as
    the tick function is (infra/template.yaml) behind a pooler; its files in `work` under
    `name` (.json its results, .log its stderr, .out the tasks' lines)."""
    return bench.procs.run(
        [sys.executable, "-m", "local.bench.ticks", "drive", "--per-s", str(per_s),
         "--start-at", repr(start_at), "--seconds", str(seconds),
         "--results", str(work / f"{name}.json")],
        log=work / f"{name}.log", stdout=work / f"{name}.out",
        TASKRUNNER_DATABASE_URL=pooled, TASKRUNNER_TRANSACTION_POOLER="true",
        TASKRUNNER_DB_POOL_SIZE="2", TASKRUNNER_TICK_MODE="drain",
    )  # fmt: skip


def _drive_once(bench: Harness, pooled: str, work: Path) -> None:
    """One tick alone, in a driver of its own, with nothing due."""
    proc = _driver(bench, pooled, work, "once", 1, time.time(), 1)
    if proc.wait(timeout=60) != 0:
        raise RuntimeError(f"ticks: a lone tick failed: {(work / 'once.log').read_text()[-2000:]}")
    [only] = json.loads((work / "once.json").read_text())["ticks"]
    if "raised" in only or only.get("claimed"):
        raise RuntimeError(f"ticks: a lone tick with nothing due: {only}")


def figures(bench: Harness, quick: bool) -> list[Figure]:
    """The scenario's figures: for each fan-out, start lateness p99 (with each task once and
    none early as its goal) and round trips per tick."""
    sizes = TickSizes.choose(quick)
    result = []
    for fan_out in sizes.fan_outs:
        o = run_fan_out(bench, sizes, fan_out)
        how = (f"warm: {DRIVERS} processes each starting {fan_out // DRIVERS} ticks a second on"
               " asyncio, each tick its own pool of 2 connections")  # fmt: skip
        once = o.reruns == 0 and o.lines == o.tasks and not o.notes
        result.append(
            Figure(f"ticks, {fan_out} a second through pgbouncer ({POOL_SIZE} server connections),"
                   f" 2 APIs creating {o.tasks:,} due over {sizes.spread_s:.0f} s: lateness p99",
                   o.lateness_p99_ms, "ms",
                   f"each once, none early, <= {POOL_SIZE} server connections, no tick fails",
                   once and o.early == 0 and o.peak_server_conns <= POOL_SIZE and o.raised == 0,
                   None,
                   f"p50 {o.lateness_p50_ms:.0f} ms; attempts > 1: {o.reruns}, lines {o.lines:,},"
                   f" early {o.early}; peak server connections {o.peak_server_conns} (active"
                   f" {o.peak_active_conns}); clients waiting for one at most"
                   f" {o.peak_clients_waiting}, longest wait {o.max_pool_wait_ms:.0f} ms, client"
                   f" connections at most {o.peak_clients}; {o.mean_ticks:.0f} ticks running at"
                   f" once on average; server"
                   f" connections on average: {o.mean_running:.1f} running a statement,"
                   f" {o.mean_in_xact:.1f} idle in a transaction, {o.mean_on_lock:.2f} on a lock;"
                   f" {o.ticks:,} ticks, {o.idle_ticks:,} claimed nothing, {o.raised} raised,"
                   f" {o.tick_errors} database errors retried; POST /tasks/batch answered 503"
                   f" {o.refused} times; tick start lag p99"
                   f" {o.start_lag_p99_ms:.0f} ms; CPU s: server {o.server_cpu_s:.1f}, ticks"
                   f" {o.drivers_cpu_s:.1f}, pgbouncer {o.pooler_cpu_s:.1f} in {o.seconds:.0f} s;"
                   f" load {o.load[0]:.1f}; {how}" + "".join(f"; {n}" for n in o.notes))
        )  # fmt: skip
        result.append(
            Figure(f"ticks, {fan_out} a second: round trips per tick (pgbouncer transactions)",
                   o.xacts_per_tick, "xacts", "-", True, float(o.empty_tick_xacts),
                   f"{o.queries_per_tick:.1f} queries and {o.wait_per_tick_ms:.1f} ms waiting for"
                   f" a server connection per tick; raw: a tick with nothing due, alone"
                   f" ({o.empty_tick_queries} queries)")
        )  # fmt: skip
    return result


# --- the driver: ticks, warm, many to a process ----------------------------------------------


async def drive(per_s: int, start_at: float, seconds: int, results: Path) -> None:
    """`per_s` ticks started together each second from `start_at` (epoch) for `seconds`,
    each as the Lambda handler runs one (functions.tick.handler): its settings, its
    deadline, its prune clock. Write each tick's summary, or what it raised, to `results`."""
    from functions.settings import Settings
    from functions.tick import _PRUNE_CLOCK, tick

    settings = Settings()
    ticks: list[dict[str, Any]] = []

    async def one(scheduled: float) -> None:
        lag_s = time.time() - scheduled
        try:
            summary = await tick(
                settings,
                deadline=time.monotonic() + TICK_TIMEOUT_S,
                keep_polling=settings.tick_mode == "poll",
                prune_clock=_PRUNE_CLOCK,
                out=sys.stdout,
            )
        except Exception as exc:
            ticks.append({"lag_s": lag_s, "raised": f"{type(exc).__name__}: {exc}"})
        else:
            ticks.append({"lag_s": lag_s, **summary.as_dict()})

    async def start_all() -> None:
        for second in range(seconds):
            scheduled = start_at + second
            await asyncio.sleep(max(0.0, scheduled - time.time()))
            running.extend(asyncio.create_task(one(scheduled)) for _ in range(per_s))
        await asyncio.gather(*running)

    # Stopped (SIGTERM: the bench gave up waiting), the ticks still running are cancelled
    # and counted as such; the results are written either way.
    running: list[asyncio.Task[None]] = []
    everything = asyncio.ensure_future(start_all())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, everything.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await everything
    unfinished = [task for task in running if not task.done()]
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)
    ticks += [{"lag_s": 0.0, "raised": "unfinished when the bench stopped waiting"}] * len(
        unfinished
    )
    results.write_text(json.dumps({"ticks": ticks, "cpu_s": time.process_time()}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m local.bench.ticks")
    commands = parser.add_subparsers(dest="command", required=True)
    driver = commands.add_parser("drive", help="run ticks, many to this process")
    driver.add_argument("--per-s", type=int, required=True)
    driver.add_argument("--start-at", type=float, required=True)
    driver.add_argument("--seconds", type=int, required=True)
    driver.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(drive(args.per_s, args.start_at, args.seconds, args.results))


if __name__ == "__main__":
    main()
