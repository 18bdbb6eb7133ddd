"""The `scale` scenario (`taskrunner bench --only scale`, not in the default run): what each
figure a user sees costs on tables of 10,000, 1,000,000 and 10,000,000 tasks, loaded as users
load them, each beside its figure on the smallest table of the same run.

At each size, on a fresh database: one `taskrunner api` and one `taskrunner worker`; the
rows created through `POST /tasks/batch` (9 in 10 due at once and run by the worker, 1 in 10
scheduled over the next 30 days), nothing analyzed or vacuumed by hand. Then, in order:
create (`POST /tasks` under wrk, batches of 10,000), `GET /tasks/{id}` under wrk, the first
page of each list filter and sort, `/stats` p99, start lateness p99, the drain of a burst due
at one instant (second by second: first, slowest and last whole second), on the largest table
a large burst as well, then `taskrunner prune --older-than` of the oldest finished tasks with
a trickle of tasks due beside it (their lateness), the table's size once autovacuum has been,
and the worker's and API's peak memory.

`BENCH_SCALE_ROWS` (comma-separated) picks other table sizes, e.g. `10000,1000000`
to leave out the 10,000,000 (about 10 minutes of loading alone on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from functions import queries
from functions.errors import TaskrunnerError
from local.bench import load
from local.bench.figures import Figure
from local.bench.harness import peak_rss_mb, percentile, wait_until
from local.bench.scenarios import Bench, list_cases, page_p99s, stats_times

logger = logging.getLogger(__name__)

DAY_S = 86_400.0
BATCH = 10_000

# A drain: tasks/s on average, in its first, slowest and last whole second, and a few whole
# seconds from the first to the last.
Drain = tuple[float, float, float, float, tuple[int, ...]]


@dataclass
class Measures:
    """What one table size measured (`rows`: the tasks loaded)."""

    rows: int
    load_per_s: float = 0.0
    create_single: float = 0.0
    create_single_p99: float = 0.0
    create_batch: float = 0.0
    get_one: float = 0.0
    get_one_p99: float = 0.0
    pages: list[tuple[str, float]] = field(default_factory=list)
    stats_p99: float = 0.0
    stats_p50: float = 0.0
    lateness_p99: float = 0.0
    # Drains: (tasks, what they measured).
    burst: tuple[int, Drain] = (0, (0.0, 0.0, 0.0, 0.0, ()))
    big_burst: tuple[int, Drain] | None = None
    prune: tuple[int, float, float, float, float] = (0, 0.0, 0.0, 0.0, 0.0)
    worker_mb: float = 0.0
    api_mb: float = 0.0


# The fewest rows BENCH_SCALE_ROWS may ask for: a table with something to prune and page.
MIN_ROWS = 1_000


def rows_to_measure(bench: Bench) -> tuple[int, ...]:
    """The table sizes to measure, smallest first (each figure is set beside the first's):
    BENCH_SCALE_ROWS's, or the run's own."""
    chosen = os.environ.get("BENCH_SCALE_ROWS")
    if not chosen:
        return bench.sizes.scale_rows
    try:
        sizes = {int(part.strip().replace("_", "")) for part in chosen.split(",")}
    except ValueError:
        sizes = set()
    if not sizes or min(sizes) < MIN_ROWS:
        raise TaskrunnerError(
            f"BENCH_SCALE_ROWS={chosen!r}: give table sizes of at least {MIN_ROWS:,} rows,"
            " comma-separated, e.g. 10000,1000000"
        )
    return tuple(sorted(sizes))


def run(bench: Bench) -> list[Figure]:
    sizes = rows_to_measure(bench)
    measured = [measure(bench, rows, big=rows == max(sizes)) for rows in sizes]
    return figures(measured)


def _due_left(bench: Bench) -> int:
    """Tasks due now or running: read as /stats reads its due tasks (a range of `tasks_due`
    per priority), never the 30 days of scheduled tasks."""
    [(left,)] = bench.sql(
        f"SELECT (SELECT count(*) FROM tasks WHERE state = 'scheduled'"
        f" AND priority = ANY({queries.PRIORITIES}) AND {queries.DUE_AT} <= now())"
        " + (SELECT count(*) FROM tasks WHERE state = 'running')"
    )
    return int(left)


def _wait_drained(bench: Bench, label: str, timeout_s: float) -> None:
    wait_until(lambda: 1 - min(1, _due_left(bench)), 1, label, timeout_s)


async def _load(api_url: str, rows: int, now: float) -> None:
    """`rows` tasks through POST /tasks/batch of 10,000, two clients: 9 batches in 10 due at
    once (baz), the tenth spread over the next 30 days."""
    batches = -(-rows // BATCH)
    queue = iter(range(batches))

    async def client() -> None:
        conn = await load.HttpConnection.open(api_url)
        for b in queue:
            count = min(BATCH, rows - b * BATCH)
            if b % 10 == 9:
                times = [now + random.uniform(60, 30 * DAY_S) for _ in range(count)]
            else:
                times = [now - 1] * count
            body = json.dumps({"tasks": [{"type": "baz", "execute_at": t} for t in times]})
            status, text = await conn.post("/tasks/batch", body.encode())
            if status != 201:
                raise RuntimeError(f"POST /tasks/batch answered {status}: {text[:200]!r}")
        conn.close()

    await asyncio.gather(client(), client())


def _per_second(bench: Bench, first_id: int, last_id: int) -> Drain:
    """Of the tasks `first_id`..`last_id` (all run): the average rate from the first start to
    the last finish, and the finishes in the first, the slowest and the last whole second of
    it (the seconds counted from the first start; the last, partial one left out)."""
    [(t0, seconds)] = bench.sql(
        "SELECT min(started_at), extract(epoch FROM max(finished_at) - min(started_at))"
        " FROM tasks WHERE id BETWEEN %s AND %s",
        first_id,
        last_id,
    )
    rows = bench.sql(
        "SELECT floor(extract(epoch FROM finished_at - %s)), count(*) FROM tasks"
        " WHERE id BETWEEN %s AND %s GROUP BY 1",
        t0,
        first_id,
        last_id,
    )
    per_s = {int(s): int(n) for s, n in rows}
    seconds = float(seconds or 0.0)
    whole = [per_s.get(s, 0) for s in range(int(seconds))]
    average = (last_id - first_id + 1) / seconds if seconds else 0.0
    if not whole:
        return average, average, average, average, ()
    # The curve, for the note: at most 12 seconds, evenly spread from the first to the last.
    step = max(1, -(-len(whole) // 12))
    curve = (*whole[:-1:step], whole[-1])
    return average, float(whole[0]), float(min(whole)), float(whole[-1]), curve


def _burst(bench: Bench, n: int, api_url: str, create_per_s: float) -> tuple[int, Drain]:
    """`n` baz due at one instant, created through POST /tasks/batch ahead of it (at
    `create_per_s`, as measured just before, with a margin): the drain's rates (_per_second)."""
    [(first,)] = bench.sql("SELECT coalesce(max(id), 0) + 1 FROM tasks")
    # Due once they are all created, so the drain starts on the whole burst (a fixed 40,000/s
    # was too fast a guess on a loaded machine: the drain started before the last was made).
    [(db_now,)] = bench.sql("SELECT extract(epoch FROM now())")
    due = float(db_now) + 2 + n / (0.7 * create_per_s)

    async def post() -> None:
        conn = await load.HttpConnection.open(api_url)
        body = json.dumps({"tasks": [{"type": "baz", "execute_at": due}] * BATCH}).encode()
        for start in range(0, n, BATCH):
            if n - start < BATCH:
                body = json.dumps(
                    {"tasks": [{"type": "baz", "execute_at": due}] * (n - start)}
                ).encode()
            status, text = await conn.post("/tasks/batch", body)
            if status != 201:
                raise RuntimeError(f"POST /tasks/batch answered {status}: {text[:200]!r}")
        conn.close()

    asyncio.run(post())
    [(last,)] = bench.sql("SELECT max(id) FROM tasks")
    [(late,)] = bench.sql("SELECT now() > to_timestamp(%s)", due)
    if late:
        logger.warning("bench: the burst of %s was created after its due time", n)
    time.sleep(max(0.0, due - time.time()))
    _wait_drained(bench, f"burst of {n:,}", 600 + n / 1_000)
    return n, _per_second(bench, int(first), int(last))


def _lateness(bench: Bench, n: int) -> float:
    """p99 (ms) of start lateness of `n` baz due over the next 0.5-5 s, created as the API
    creates them (one batch, one NOTIFY)."""
    [(first,)] = bench.sql("SELECT coalesce(max(id), 0) + 1 FROM tasks")
    [(db_now,)] = bench.sql("SELECT extract(epoch FROM now())")
    tasks = [
        {"kind": "baz", "at_us": int((float(db_now) + random.uniform(0.5, 5.0)) * 1e6)}
        for _ in range(n)
    ]
    bench.conn.execute(queries.INSERT_TASKS, {"tasks": json.dumps(tasks), "max_attempts": 3})
    time.sleep(5)
    _wait_drained(bench, "lateness", 120)
    return _lateness_since(bench, int(first))


def _lateness_since(bench: Bench, first_id: int) -> float:
    """p99 (ms) of start lateness of the tasks from `first_id` on, once all have started."""

    def started() -> int:
        [(waiting,)] = bench.sql(
            "SELECT count(*) FROM tasks WHERE id >= %s AND started_at IS NULL", first_id
        )
        return int(waiting == 0)

    wait_until(started, 1, "the tasks timed to start", 120)
    rows = bench.sql(
        f"SELECT extract(epoch FROM started_at - {queries.BECAME_DUE}) * 1000 FROM tasks"
        " WHERE id >= %s",
        first_id,
    )
    return percentile([float(v) for (v,) in rows], 99)


def _prune(bench: Bench, n: int) -> tuple[int, float, float, float, float]:
    """`taskrunner prune --older-than` set between the oldest `n` finished tasks and the rest,
    with 20 baz due every 50 ms beside it: the tasks pruned, their rate, the trickle's start
    lateness p99 (ms), and the table with its indexes (MB) before and once autovacuum has
    been through it after the prune (at most 10 minutes)."""
    [(cut,)] = bench.sql(
        "SELECT extract(epoch FROM now() - finished_at) FROM tasks"
        " WHERE state IN ('succeeded', 'failed', 'cancelled')"
        " ORDER BY finished_at OFFSET %s LIMIT 1",
        n - 1,
    )
    [(before,)] = bench.sql("SELECT pg_total_relation_size('tasks')")
    [(vacuums,)] = bench.sql(
        "SELECT autovacuum_count FROM pg_stat_user_tables WHERE relname = 'tasks'"
    )
    [(first,)] = bench.sql("SELECT coalesce(max(id), 0) + 1 FROM tasks")
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    started = time.perf_counter()
    prune = bench.procs.run(
        [sys.executable, "-m", "local", "--log-level", "WARNING", "prune", "--older-than",
         f"{float(cut) - 0.0005:.4f}"],
        log=log, TASKRUNNER_DATABASE_URL=bench.url,
    )  # fmt: skip
    trickle = json.dumps([{"kind": "baz", "at_us": 0}] * 20)
    while prune.poll() is None:
        [(db_now,)] = bench.sql("SELECT extract(epoch FROM now())")
        at_us = int((float(db_now) + 0.2) * 1e6)
        bench.conn.execute(
            queries.INSERT_TASKS,
            {"tasks": trickle.replace('"at_us": 0', f'"at_us": {at_us}'), "max_attempts": 3},
        )
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if prune.returncode != 0:
        raise subprocess.CalledProcessError(prune.returncode, "taskrunner prune")
    _wait_drained(bench, "the trickle", 120)
    lateness = _lateness_since(bench, int(first))
    said = re.search(r"pruned (\d+) finished", log.read_text())
    log.unlink()
    if said is None:
        raise RuntimeError("taskrunner prune did not say how many it pruned")
    pruned = int(said.group(1))

    def vacuumed() -> int:
        [(count,)] = bench.sql(
            "SELECT autovacuum_count FROM pg_stat_user_tables WHERE relname = 'tasks'"
        )
        return int(count > vacuums)

    try:
        wait_until(vacuumed, 1, "autovacuum after the prune", 600)
    except TimeoutError:
        logger.warning("bench: no autovacuum within 10 minutes of the prune")
    [(after,)] = bench.sql("SELECT pg_total_relation_size('tasks')")
    return pruned, pruned / seconds, lateness, before / 2**20, after / 2**20


def measure(bench: Bench, rows: int, *, big: bool) -> Measures:
    sizes = bench.sizes
    found = Measures(rows)
    with bench.scenario(f"scale{rows}"):
        api_url, api = bench.api()
        worker = bench.worker()
        bench.wait_for_listener(1)
        now = time.time()
        started = time.perf_counter()
        asyncio.run(_load(api_url, rows, now))
        _wait_drained(bench, f"loading {rows:,}", 600 + rows / 1_000)
        found.load_per_s = rows / (time.perf_counter() - started)

        later = time.time() + 40 * DAY_S
        body = json.dumps({"type": "baz", "execute_at": later})
        single = load.wrk(api_url, method="POST", path="/tasks", body=body, seconds=sizes.load_s)
        found.create_single, found.create_single_p99 = single.per_s, single.p99_ms or 0.0
        t0 = time.perf_counter()
        asyncio.run(load.post_batches(api_url, sizes.bulk_batches))
        found.create_batch = sizes.bulk_batches * BATCH / (time.perf_counter() - t0)

        [(lo, hi)] = bench.sql("SELECT min(id), max(id) FROM tasks")
        got = load.wrk(api_url, path="/tasks/{id}", ids=(lo, hi), seconds=sizes.load_s)
        found.get_one, found.get_one_p99 = got.per_s, got.p99_ms or 0.0

        middle = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 1))
        found.pages = page_p99s(api_url, list_cases(middle, "boom"), sizes.load_s)
        times, _ = stats_times(api_url)
        found.stats_p50, found.stats_p99 = percentile(times, 50), percentile(times, 99)

        found.lateness_p99 = _lateness(bench, sizes.lateness_tasks)
        found.burst = _burst(bench, sizes.scale_burst, api_url, found.create_batch)
        if big and sizes.scale_big_burst:
            found.big_burst = _burst(bench, sizes.scale_big_burst, api_url, found.create_batch)
        found.prune = _prune(bench, min(sizes.scale_prune, rows // 10))
        found.worker_mb = peak_rss_mb(worker.pid)
        found.api_mb = peak_rss_mb(api.pid)
    return found


def figures(measured: list[Measures]) -> list[Figure]:
    """A figure per measure and size, each beside the smallest table's (its raw), the goal
    within 20% of it (a time or memory at most 20% more, a rate at least 20% less)."""
    base = measured[0]
    out: list[Figure] = []

    def add(name: str, unit: str, value: float, ref: float, note: str = "",
            higher_is_better: bool = False) -> None:  # fmt: skip
        met = value >= 0.8 * ref if higher_is_better else value <= 1.2 * ref
        out.append(Figure(name, value, unit, f"within 20% of {base.rows:,} rows", met, ref, note))

    def drain(m: Measures, burst: tuple[int, Drain]) -> None:
        n, (average, first, slowest, last, curve) = burst
        ref = base.burst[1][0]
        seconds = (
            f"first second {first:,.0f}, last {last:,.0f}; seconds:"
            f" {' '.join(f'{c:,}' for c in curve)}"
            if curve
            else "done within its first second: its average stands for every second"
        )
        add(f"scale {m.rows:,}: drain of {n:,} baz due at once, slowest second", "tasks/s",
            slowest, ref, f"average {average:,.0f}/s; {seconds}; raw:"
            f" {base.burst[0]:,} on {base.rows:,} rows, average",
            higher_is_better=True)  # fmt: skip

    for m in measured:
        tag = f"scale {m.rows:,}:"
        add(f"{tag} create, POST /tasks, 32 connections", "req/s", m.create_single,
            base.create_single, f"p99 {m.create_single_p99:.1f} ms; loaded at"
            f" {m.load_per_s:,.0f} rows/s", higher_is_better=True)  # fmt: skip
        add(f"{tag} create, POST /tasks/batch of 10,000", "tasks/s", m.create_batch,
            base.create_batch, higher_is_better=True)  # fmt: skip
        add(f"{tag} GET /tasks/{{id}}, 32 connections", "req/s", m.get_one, base.get_one,
            f"p99 {m.get_one_p99:.1f} ms", higher_is_better=True)  # fmt: skip
        worst = max(m.pages, key=lambda page: page[1])
        ref_pages = dict(base.pages)
        bent = [f"{name} {ms:.1f} ({ref_pages[name]:.1f})" for name, ms in m.pages
                if ms > 1.2 * ref_pages[name] and ms > ref_pages[name] + 2]  # fmt: skip
        add(f"{tag} GET /tasks, first page of {len(m.pages)} filters and orders, worst p99",
            "ms", worst[1], max(ms for _, ms in base.pages),
            f"worst: {worst[0]}; median {statistics.median(ms for _, ms in m.pages):.1f} ms;"
            f" more than 20% and 2 ms over: {', '.join(bent) or 'none'}")  # fmt: skip
        add(f"{tag} GET /stats p99", "ms", m.stats_p99, base.stats_p99, f"p50 {m.stats_p50:.1f} ms")
        add(f"{tag} start lateness, future task, p99", "ms", m.lateness_p99, base.lateness_p99)
        drain(m, m.burst)
        if m.big_burst:
            drain(m, m.big_burst)
        pruned, rate, late, before, after = m.prune
        add(f"{tag} prune of the oldest {pruned:,} finished", "tasks/s", rate, base.prune[1],
            f"lateness p99 beside it {late:.1f} ms (without: {m.lateness_p99:.1f});"
            f" table + indexes {before:,.0f} MB before, {after:,.0f} MB after autovacuum",
            higher_is_better=True)  # fmt: skip
        add(f"{tag} worker peak memory", "MB", m.worker_mb, base.worker_mb)
        add(f"{tag} API peak memory", "MB", m.api_mb, base.api_mb)
    return out
