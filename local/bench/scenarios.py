"""The bench's scenarios: each starts real `taskrunner worker` / `taskrunner api` processes on
a fresh database of its own and reads its figure from the database's own timestamps; beside
each, the raw PostgreSQL reference measured in the same run (`references`)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import psycopg
from pydantic_core import to_json
from tqdm import tqdm

from functions import queries
from functions.enqueue import enqueue
from local.bench import load, references
from local.bench.figures import Figure
from local.bench.harness import (
    Harness,
    free_port,
    peak_rss_mb,
    percentile,
    slow_http_server,
    wait_http,
    wait_until,
)

# The lateness scenarios' kind, whose line is when it started (local/bench/clocked.py).
CLOCKED = "local.bench.clocked"


class Lateness(NamedTuple):
    """Start lateness (ms) p50 and p99: as recorded (`started_at`), and as the tasks' own
    clock says they ran."""

    p50: float
    p99: float
    ran_p50: float
    ran_p99: float


class Bench(Harness):
    """The scenarios, one method each, returning their measures."""

    def drain(self, workers: int, payload_bytes: int = 0) -> float:
        """baz tasks per second, from the first start to the last finish, as recorded; each
        task with a payload of `payload_bytes` (none when 0), which the claim reads and
        hands to the kind."""
        n = self.sizes.drain_tasks
        name = f"drain{workers}" + (f"payload{payload_bytes}" if payload_bytes else "")
        with self.scenario(name):
            payload = load.payload_of(payload_bytes) if payload_bytes else None
            self.insert_due("baz", n, payload=payload)
            for _ in range(workers):
                self.worker()
            wait_until(lambda: self.done(n), n, f"drain, {workers} worker(s)", 600)
            self.check_all_succeeded(n)
            return self.per_second(n)

    def raw_drain(self) -> float:
        """The same claim and finish transactions straight from psycopg, no task work; per
        second as `drain` counts. (At a few thousand tasks neither rate means anything: on
        2,000 the raw one read a quarter of the worker's, by either clock.)"""
        n = self.sizes.drain_tasks
        with self.scenario("rawdrain"):
            self.insert_due("baz", n)
            asyncio.run(references.raw_drain(self.url, n))
            self.check_all_succeeded(n)
            return self.per_second(n)

    def per_second(self, n: int, after_id: int = 0) -> float:
        """`n` tasks (those past `after_id`) a second, from the first start to the last
        finish as recorded."""
        [(seconds,)] = self.sql(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM tasks"
            " WHERE id > %s",
            after_id,
        )
        return n / float(seconds)

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
            port = free_port()
            self.procs.start(self.url, "api", "--port", str(port), **env)
            api_url = f"http://127.0.0.1:{port}"
            wait_http(api_url)
            self.procs.start(self.url, "worker", **env)
            # Registered, so it runs the warm-up tasks one by one (it does not LISTEN with
            # the pooler setting).
            wait_until(lambda: int(self.sql("SELECT count(*) FROM workers")[0][0]), 1,
                       "the worker to start", 60)  # fmt: skip
            asyncio.run(load.post_one_by_one(api_url, 30, gap_s=0.03))
            wait_until(lambda: self.done(30), 30, "warm-up", 60)
            [(first,)] = self.sql("SELECT max(id) FROM tasks")
            asyncio.run(load.post_batches(api_url, math.ceil(n / 10_000), due_now=True, size=n))
            wait_until(lambda: self.done(n + 30), n + 30, "warm burst", 600)
            self.check_all_succeeded(n + 30)
            return self.per_second(n, after_id=first)

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

    def share(self) -> tuple[float, list[int]]:
        """2 workers of 100 `bar` slots each, N `bar` due at once against a server that
        answers after a second: seconds from the due time to the last finish, and how many
        each worker ran (from their printed lines)."""
        n = self.sizes.share_tasks
        with (
            self.scenario("share"),
            slow_http_server(1.0) as url,
            tempfile.TemporaryDirectory() as tmp,
        ):
            outs = [Path(tmp) / f"worker{i}.out" for i in range(2)]
            env = {"TASKRUNNER_BAR_URL": url, "TASKRUNNER_BAR_CONCURRENCY": "100"}
            for out in outs:
                self.worker(stdout=out, **env)
            self.wait_for_listener(2)
            self.insert_due("bar", n, in_s=1.0)
            wait_until(lambda: self.done(n), n, "share", 300)
            self.check_all_succeeded(n)
            [(seconds,)] = self.sql(
                "SELECT extract(epoch FROM max(finished_at) - min(execute_at)) FROM tasks"
            )
            self.procs.stop_all()
            ran = [out.read_text().count("200\n") for out in outs]
        return float(seconds), ran

    def lateness_future(self) -> Lateness:
        """Start lateness for tasks created ahead of their time."""
        n = self.sizes.lateness_tasks
        with self.scenario("latefuture"):
            self.worker(TASKRUNNER_KINDS=CLOCKED)
            self.wait_for_listener(1)
            # Created as the API creates them (one batch, one NOTIFY), due over the next 5 s.
            [(db_now,)] = self.sql("SELECT extract(epoch FROM now())")
            tasks = [
                {"kind": "clocked", "at_us": int((float(db_now) + random.uniform(0.5, 5.0)) * 1e6)}
                for _ in range(n)
            ]
            self.conn.execute(queries.INSERT_TASKS, {"tasks": json.dumps(tasks), "max_attempts": 3})
            wait_until(lambda: self.done(n), n, "lateness, future", 60)
            self.check_all_succeeded(n)
            return self._lateness()

    def lateness_now(self) -> Lateness:
        """Start lateness for tasks created due, through the API."""
        n = self.sizes.lateness_tasks
        with self.scenario("latenow"):
            api_url, _ = self.api(TASKRUNNER_KINDS=CLOCKED)
            self.worker(TASKRUNNER_KINDS=CLOCKED)
            self.wait_for_listener(1)
            asyncio.run(load.post_one_by_one(api_url, n, kind="clocked"))
            wait_until(lambda: self.done(n), n, "lateness, due now", 60)
            self.check_all_succeeded(n)
            return self._lateness()

    def _lateness(self) -> Lateness:
        """Start lateness (ms) as /stats defines it (`started_at` less queries.BECAME_DUE),
        and as the tasks' own clock says (their lines: local/bench/clocked.py)."""
        rows = self.sql(
            f"SELECT extract(epoch FROM started_at - {queries.BECAME_DUE}) * 1000,"
            f" extract(epoch FROM {queries.BECAME_DUE}), output FROM tasks"
        )
        recorded = [float(ms) for ms, _, _ in rows]
        ran = [(float(line) - float(due)) * 1000 for _, due, line in rows]
        return Lateness(
            percentile(recorded, 50), percentile(recorded, 99),
            percentile(ran, 50), percentile(ran, 99),
        )  # fmt: skip

    def wake(self) -> tuple[float, float]:
        """p50 and p99 (ms) from the commit of a transaction that enqueued a task due now
        (`functions.enqueue`, beside a row of the user's own) to the task's start, by a
        worker asleep with nothing due (its poll interval is 1 s: the NOTIFY sent in that
        transaction wakes it at the commit). Measured by the database's clock from the last
        statement before COMMIT: the commit's own time is in it."""
        n = self.sizes.lateness_tasks
        with self.scenario("wake"):
            self.sql("CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY, note text)")
            self.worker()
            self.wait_for_listener(1)
            lateness: list[float] = []
            with psycopg.connect(self.url) as conn:
                for _ in tqdm(range(n), desc="wake-up", leave=False, file=sys.stderr,
                              disable=not sys.stderr.isatty()):  # fmt: skip
                    # The worker ran the last one, looked again, and is asleep.
                    time.sleep(random.uniform(0.05, 0.15))
                    [(order,)] = conn.execute(
                        "INSERT INTO orders (note) VALUES ('bench') RETURNING id"
                    ).fetchall()
                    task_id = enqueue(conn, "baz", datetime.now(UTC), payload={"order": order})
                    [(before_commit,)] = conn.execute("SELECT clock_timestamp()").fetchall()
                    conn.commit()
                    started = self._started_at(task_id)
                    lateness.append((started - before_commit).total_seconds() * 1000)
            wait_until(lambda: self.done(n), n, "wake-up", 60)
            self.check_all_succeeded(n)
        return percentile(lateness, 50), percentile(lateness, 99)

    def _started_at(self, task_id: int) -> datetime:
        """When the task started, once it has (10 s at most)."""
        deadline = time.monotonic() + 10
        while True:
            [(started,)] = self.sql("SELECT started_at FROM tasks WHERE id = %s", task_id)
            if started is not None:
                return started  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                raise TimeoutError(f"wake-up: task {task_id} did not start within 10 s")
            time.sleep(0.002)

    def schedule_lateness(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """p50 and p99 of start lateness (ms) of the occurrences of N `* * * * *` schedules at
        one minute, made by a worker's creator of occurrences, and of N ordinary tasks due at
        one instant, created 5 s ahead, with the same worker."""
        n = self.sizes.schedules
        with self.scenario("schedules"):
            # The first minute at least 25 s away: the worker makes its occurrences ahead.
            [(first,)] = self.sql(
                "SELECT date_trunc('minute', now() + interval '25 seconds') + interval '1 minute'"
            )
            rows = [
                {"name": f"bench-{i}", "kind": "baz", "cron": "* * * * *", "timezone": "UTC",
                 "payload": None, "max_attempts": None, "timeout_s": None, "priority": None,
                 "catch_up": "latest", "enabled": True, "last_occurrence_at": None,
                 "next_run_at": first, "skipped_occurrences": 0}
                for i in range(n)
            ]  # fmt: skip
            with self.conn.cursor() as cur:  # the statement POST /schedules runs
                cur.executemany(queries.INSERT_SCHEDULE, rows)
            self.worker()

            def ran(where: str, *params: object) -> int:
                [(count,)] = self.sql(
                    f"SELECT count(*) FROM tasks WHERE state = 'succeeded' AND {where}", *params
                )
                return int(count)

            wait_until(lambda: ran("scheduled_for = %s", first), n, "schedule occurrences", 180)
            occurrences = self._lateness_of("scheduled_for = %s", first)
            self.insert_due("baz", n, in_s=5.0)
            wait_until(lambda: ran("schedule IS NULL"), n, "ordinary tasks", 60)
            ordinary = self._lateness_of("schedule IS NULL")
        return occurrences, ordinary

    def _lateness_of(self, where: str, *params: object) -> tuple[float, float]:
        """p50 and p99 of start lateness (ms) of the tasks `where` says (queries.BECAME_DUE)."""
        rows = self.sql(
            f"SELECT extract(epoch FROM started_at - {queries.BECAME_DUE}) * 1000 FROM tasks"
            f" WHERE {where}",
            *params,
        )
        values = [float(v) for (v,) in rows]
        return percentile(values, 50), percentile(values, 99)

    def cancel_running(self) -> tuple[float, float]:
        """N foo running on the workers (a minute's sleep each, and the workers poll once a
        minute: only the cancels' notifications tell them), each cancelled by a `POST
        /tasks/{id}/cancel` of its own from 32 clients: seconds from the first request until
        the last answer (each 200, cancelled), and until the workers had stopped every task
        (their `action=cancel` log lines count them)."""
        n = self.sizes.cancel_tasks
        with self.scenario("cancel"), tempfile.TemporaryDirectory() as tmp:
            api_url, _ = self.api()
            logs = [Path(tmp) / f"worker{i}.log" for i in range(self.workers)]
            for log in logs:
                self.procs.logged(
                    self.url, log, "worker", TASKRUNNER_FOO_DELAY_S="60",
                    TASKRUNNER_POLL_INTERVAL_S="60",
                    TASKRUNNER_CONCURRENCY=str(math.ceil(n / self.workers)),
                )  # fmt: skip
            self.wait_for_listener(self.workers)
            self.insert_due("foo", n)

            def running() -> int:
                [(count,)] = self.sql("SELECT count(*) FROM tasks WHERE state = 'running'")
                return int(count)

            wait_until(running, n, "cancel, foo starting", 60)
            ids = [task_id for (task_id,) in self.sql("SELECT id FROM tasks ORDER BY id")]
            return asyncio.run(_cancel_each(api_url, ids, logs))

    def raw_cancel(self) -> float:
        """Seconds for the store's own cancels of N running tasks from 32 sessions."""
        n = self.sizes.cancel_tasks
        with self.scenario("rawcancel"):
            self.insert_due("foo", n)
            return asyncio.run(references.raw_cancel(self.url, n, 32))

    def raw_notify_ms(self) -> float:
        """p99 of a NOTIFY's trip from one session to another LISTENing one (ms)."""
        with self.scenario("rawnotify"):
            return asyncio.run(references.raw_notify_p99(self.url, self.sizes.lateness_tasks))

    def create_single(self, payload_bytes: int = 0) -> float:
        """POST /tasks per second from 32 clients, each task with a payload of
        `payload_bytes` (none when 0)."""
        n = self.sizes.create_requests
        with self.scenario("create" + (f"payload{payload_bytes}" if payload_bytes else "")):
            api_url, _ = self.api()
            started = time.perf_counter()
            asyncio.run(load.post_many(api_url, n, clients=32, payload_bytes=payload_bytes))
            return n / (time.perf_counter() - started)

    def raw_create_single(self) -> float:
        with self.scenario("rawcreate"):
            n = self.sizes.create_requests
            return asyncio.run(references.raw_insert_one_by_one(self.url, n, 4))

    def create_bulk(self) -> float:
        batches = self.sizes.bulk_batches
        with self.scenario("bulk"):
            api_url, _ = self.api()
            started = time.perf_counter()
            asyncio.run(load.post_batches(api_url, batches))
            return batches * 10_000 / (time.perf_counter() - started)

    def create_bulk_keyed(self) -> float:
        """As create_bulk, each item with an idempotency key of 255 characters (the most the
        API takes): what the keyed path adds to a batch."""
        batches = self.sizes.bulk_batches
        with self.scenario("bulkkeyed"):
            api_url, _ = self.api()
            started = time.perf_counter()
            asyncio.run(load.post_batches(api_url, batches, key_chars=255))
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
            ref_post = load.wrk(reference, method="POST", path="/tasks", body=body,
                                   seconds=seconds)  # fmt: skip
            ref_get = load.wrk(reference, path="/tasks/{id}", ids=(1, 1000), seconds=seconds)
            ref_page = load.wrk(reference, path="/tasks?limit=100", seconds=seconds)
            for processes in (1, 2):
                api_url, proc = self.api(processes)
                post = load.wrk(api_url, method="POST", path="/tasks", body=body,
                                   seconds=seconds)  # fmt: skip
                [(lo, hi)] = self.sql("SELECT min(id), max(id) FROM tasks")
                get = load.wrk(api_url, path="/tasks/{id}", ids=(lo, hi), seconds=seconds)
                name = f"{processes} process{'es' if processes > 1 else ''}"
                loads = [("POST /tasks", post, ref_post), ("GET /tasks/{id}", get, ref_get)]
                if processes == 1:
                    page = load.wrk(api_url, path="/tasks?limit=100", seconds=seconds)
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
                "POST /tasks": references.RAW_INSERT,
                "GET /tasks/{id}": references.raw_get(lo, hi),
                "GET /tasks?limit=100": references.RAW_PAGE,
            }
            rates = {route: load.pgbench(self.url, script, seconds=seconds)
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
            times, stats = stats_times(api_url)
            finished = sum(stats["counts"]["succeeded"].values())
            if abs(finished - n) > 0.1 * n:
                raise RuntimeError(f"/stats counted {finished} succeeded of {n}")
        return percentile(times, 50), percentile(times, 99)

    def find(self) -> tuple[list[tuple[str, float]], int]:
        """p99 (ms) of the first page (100) of GET /tasks under each filter and order, on a
        table loaded as users load one: batches of 10,000 through POST /tasks/batch, run by
        a worker (`bar` against a closed port fails, its one attempt), those due later
        partly cancelled through POST /tasks/cancel; nothing analyzed by hand. Also how many
        tasks the table holds."""
        n = self.sizes.find_tasks
        with self.scenario("find"):
            api_url, _ = self.api()
            now = time.time()
            due = later = 0
            for start in range(0, n, 10_000):
                items = []
                for i in range(start, min(n, start + 10_000)):
                    item: dict[str, object] = {"payload": {"to": f"user{i % 1000}@example.com"}}
                    if i % 10 < 7:  # run now, and succeed
                        item |= {"type": "baz", "execute_at": now - i % 3600}
                    elif i % 10 == 7:  # run now, and fail
                        item |= {"type": "bar", "execute_at": now - i % 3600, "max_attempts": 1}
                    else:  # due later
                        item |= {"type": "baz", "execute_at": now + 86_400 + i}
                    due += i % 10 < 8
                    later += i % 10 >= 8
                    items.append(item)
                _post(f"{api_url}/tasks/batch", {"tasks": items})
            closed = f"http://127.0.0.1:{free_port()}/"
            # (Quiet: each failure is an error logged, by design, one line a task.)
            self.procs.start(self.url, "worker", log_level="CRITICAL", TASKRUNNER_BAR_URL=closed)
            wait_until(lambda: n - later - self._due_left(), n - later, "find, running", 900)
            # A quarter of those due later cancelled, by filter, as an operator would.
            half_day = datetime.fromtimestamp(now + 86_400 + n * 0.75, UTC).isoformat()
            while _post(f"{api_url}/tasks/cancel?execute_after={quote(half_day)}&limit=10000",
                        None)["count"]:  # fmt: skip
                pass
            [(error,)] = self.sql("SELECT error FROM tasks WHERE state = 'failed' LIMIT 1")
            middle = datetime.fromtimestamp(now, UTC).isoformat()
            found = page_p99s(api_url, list_cases(middle, str(error)), self.sizes.load_s)
        return found, n

    def _due_left(self) -> int:
        [(left,)] = self.sql(
            "SELECT (SELECT count(*) FROM tasks WHERE state = 'scheduled'"
            " AND execute_at <= now()) + (SELECT count(*) FROM tasks WHERE state = 'running')"
        )
        return int(left)

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

    def cold_starts(self) -> tuple[dict[str, float], str]:
        """Median ms, over fresh processes (11 in a full run), of each cold start coldstart.py
        measures, by its name there: importing the API handler plus its first request, for
        each of `coldstart.REQUESTS`; the tick handler plus a tick with nothing due (`tick`);
        a create then GET /workers (through FastAPI), the second alone (`after-create`); and the
        floor under all of them (importing asyncio and psycopg, one connection, one
        statement: `floor`); and where they ran.

        They run in the Lambda bundle `sam build` makes (infra/Makefile: the runtime
        dependencies only, compiled to .pyc as pip installs them), by `python -I -S`, which
        sees the standard library and the bundle and nothing else; where the bundle cannot
        be built (no make, no PyPI), in the development install, and the note says so. The
        processes take turns, one of each in a round, so a slow minute of the machine weighs on
        each figure alike.
        """
        from local.bench.coldstart import REQUESTS

        names = ["floor", *REQUESTS, "after-create", "tick"]
        totals: dict[str, list[float]] = {name: [] for name in names}
        with self.scenario("coldstart"), tempfile.TemporaryDirectory() as tmp:
            bundle = _lambda_bundle(Path(tmp) / "bundle")
            if bundle is None:
                command = [sys.executable, "-m", "local.bench.coldstart"]
                where = "the development install (the Lambda bundle could not be built)"
            else:
                script = str(Path(__file__).with_name("coldstart.py"))
                command = [sys.executable, "-I", "-S", script, "--bundle", str(bundle)]
                where = "the Lambda bundle, python -I -S"
            for _ in range(self.sizes.cold_starts):
                for which in names:
                    out = subprocess.run(
                        [*command, which],
                        env={**os.environ, "TASKRUNNER_DATABASE_URL": self.url,
                             "AWS_LAMBDA_FUNCTION_NAME": "taskrunner-bench"},
                        capture_output=True, text=True, timeout=60, check=True,
                    )  # fmt: skip
                    result = json.loads(out.stdout.splitlines()[-1])
                    key = "second_ms" if which == "after-create" else "total_ms"
                    totals[which].append(result[key])
        return {name: statistics.median(ms) for name, ms in totals.items()}, where


def stats_times(api_url: str, requests: int = 200) -> tuple[list[float], Any]:
    """Milliseconds of each of `requests` GET /stats, one after another, and the last answer.
    200 by default, so that the p99 is not simply the slowest (the first, which opens the
    API's connection)."""
    times = []
    stats = None
    for _ in range(requests):
        started = time.perf_counter()
        with urllib.request.urlopen(f"{api_url}/stats", timeout=30) as response:
            stats = json.loads(response.read())
        times.append((time.perf_counter() - started) * 1000)
    return times, stats


def list_cases(middle: str, error: str) -> dict[str, str]:
    """The query of each filter and order of GET /tasks that `find` times, by name: the times
    filters split at `middle` (ISO 8601), the error filter looks for `error`'s start."""
    return {
        "newest first": "", "type": "type=bar", "2 types": "type=bar&type=foo",
        "state failed": "state=failed", "state succeeded": "state=succeeded",
        "state scheduled": "state=scheduled", "state cancelled": "state=cancelled",
        "2 states": "state=failed&state=cancelled",
        "state running (none)": "state=running",
        "created_after": f"created_after={quote(middle)}",
        "created_before": f"created_before={quote(middle)}",
        "execute_after": f"execute_after={quote(middle)}",
        "execute_before": f"execute_before={quote(middle)}",
        "finished_after": f"finished_after={quote(middle)}",
        "finished_before": f"finished_before={quote(middle)}",
        "error": f"error={quote(error[:12].lower())}",
        "error (none)": "error=no%20such%20error",
        "schedule (none)": "schedule=nightly",
        "payload": "payload=" + quote('{"to":"user7@example.com"}'),
        **{f"sort={s}": f"sort={s}" for s in
           ("id", "execute_at", "-execute_at", "finished_at", "-finished_at")},
    }  # fmt: skip


def page_p99s(api_url: str, cases: dict[str, str], load_s: float) -> list[tuple[str, float]]:
    """p99 (ms) of the first page (100) of GET /tasks under each of `cases`, by name: 1 +
    20 requests per second of `load_s`, one after another (the first, which connects, not
    counted)."""
    found = []
    for name, query in cases.items():
        url = f"{api_url}/tasks?limit=100&{query}"
        times = []
        for _ in range(1 + int(load_s * 20)):
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=30) as response:
                response.read()
            times.append((time.perf_counter() - started) * 1000)
        found.append((name, percentile(times[1:], 99)))
    return found


def _post(url: str, body: object) -> Any:
    """POST `body` as JSON (none: no body) and answer what the API answered, read."""
    data = None if body is None else to_json(body)
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _stopped(logs: list[Path]) -> int:
    """How many tasks the workers logging to `logs` stopped because they were cancelled."""
    return sum(
        int(found.group(1))
        for log in logs
        for found in re.finditer(r"action=cancel worker=\S+ count=(\d+)", log.read_text())
    )


async def _cancel_each(api_url: str, ids: list[int], logs: list[Path]) -> tuple[float, float]:
    """Cancel each of `ids` by a request of its own, 32 clients: seconds from the first
    request until the last answer, and until the workers logging to `logs` stopped them all."""
    started = time.perf_counter()
    stopped_s: list[float] = []

    async def watch() -> None:
        while _stopped(logs) < len(ids):
            await asyncio.sleep(0.01)
        stopped_s.append(time.perf_counter() - started)

    watcher = asyncio.create_task(watch())
    answers = await load.post_each(api_url, [f"/tasks/{i}/cancel" for i in ids], clients=32)
    answered_s = time.perf_counter() - started
    refused = [(status, body[:200]) for status, body in answers if status != 200]
    if refused or any(json.loads(body)["state"] != "cancelled" for _, body in answers):
        watcher.cancel()
        raise RuntimeError(f"cancel: {len(refused)} refused, the first: {refused[:1]}")
    try:
        await asyncio.wait_for(watcher, 60)
    except TimeoutError:
        raise RuntimeError(
            f"cancel: the workers stopped {_stopped(logs)} of {len(ids)} within 60 s"
        ) from None
    return answered_s, stopped_s[0]


def _lambda_bundle(target: Path) -> Path | None:
    """The bundle `sam build` makes for a function (both hold the same), built into `target`;
    None if it cannot be built here."""
    root = Path(__file__).parents[2]
    try:
        subprocess.run(
            ["make", "-s", "-C", str(root / "infra"), "build-ApiFunction",
             f"ARTIFACTS_DIR={target}", f"PYTHON={sys.executable}"],
            capture_output=True, timeout=900, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return target
