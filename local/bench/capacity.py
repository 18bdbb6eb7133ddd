"""The figures behind infra/README.md's capacity model: the `capacity` scenario of `taskrunner
bench`.

Each is CPU time per task, not a rate: on a shared machine a rate measures the neighbours,
while the CPU a process spent on a known amount of work is its own (read from /proc: the
server's postmaster with its children, ended and live; the API's process). Per core, then, is
work / CPU seconds.

- the worker's claim and finish statements alone (`references.raw_drain`): the server's CPU
  per task;
- `taskrunner api` under wrk, POST /tasks and GET /tasks/{id}: the API process's CPU per
  request, and the server's;
- `taskrunner prune --older-than 0` on a table of finished tasks run by a worker: tasks
  deleted per second, and the server's CPU per task deleted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from local.bench import load, references
from local.bench.figures import Figure
from local.bench.harness import Harness, wait_until
from local.bench.ticks import cpu_s, postmaster_of, server_cpu_s


@dataclass(frozen=True)
class CapacitySizes:
    drain_tasks: int
    load_s: float
    prune_tasks: int

    @classmethod
    def choose(cls, quick: bool) -> CapacitySizes:
        if quick:
            return cls(5_000, 2.0, 5_000)
        return cls(200_000, 10.0, 1_000_000)


def _load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def _server(bench: Harness) -> int:
    postmaster = postmaster_of(bench.conn)
    if postmaster is None:
        raise RuntimeError("capacity: the server must run on this machine (its CPU is read)")
    return postmaster


def claim_finish(bench: Harness, sizes: CapacitySizes) -> Figure:
    """The server's CPU per task of the raw claim + finish statements."""
    n = sizes.drain_tasks
    with bench.scenario("capclaim"):
        bench.insert_due("baz", n)
        postmaster = _server(bench)
        before, client_before = server_cpu_s(postmaster), time.process_time()
        rate = asyncio.run(references.raw_drain(bench.url, n))
        server = server_cpu_s(postmaster) - before
        client = time.process_time() - client_before
    per_core = n / server
    return Figure("capacity: claim + finish, tasks per server CPU second", per_core, "tasks/s",
                  "-", True, rate,
                  f"{n:,} baz, raw statements, 2 pipelines; server CPU {server:.1f} s"
                  f" ({server / n * 1e6:.0f} us a task), client {client:.1f} s; raw: the drain's"
                  f" rate on the whole machine; {_load()}")  # fmt: skip


def api(bench: Harness, sizes: CapacitySizes) -> list[Figure]:
    """The API process's CPU, and the server's, per POST /tasks and per GET /tasks/{id}."""
    figures = []
    body = json.dumps({"type": "baz", "execute_at": time.time() + 86_400})
    with bench.scenario("capapi"):
        api_url, proc = bench.api(1)
        postmaster = _server(bench)
        for route in ("POST /tasks", "GET /tasks/{id}"):
            server_before, api_before = server_cpu_s(postmaster), cpu_s(proc.pid)
            started = time.monotonic()
            if route.startswith("POST"):
                result = load.wrk(api_url, method="POST", path="/tasks", body=body,
                                  seconds=sizes.load_s)  # fmt: skip
            else:
                [(lo, hi)] = bench.sql("SELECT min(id), max(id) FROM tasks")
                result = load.wrk(api_url, path="/tasks/{id}", ids=(lo, hi), seconds=sizes.load_s)
            elapsed = time.monotonic() - started
            server = server_cpu_s(postmaster) - server_before
            api_cpu = cpu_s(proc.pid) - api_before
            requests = result.per_s * sizes.load_s
            figures.append(
                Figure(f"capacity: API {route}, requests per API CPU second (1 process)",
                       requests / api_cpu, "req/s", "-", True, result.per_s,
                       f"wrk 32 connections, {sizes.load_s:.0f} s ({elapsed:.0f} s with its"
                       f" start); API CPU {api_cpu / requests * 1e6:.0f} us, server CPU"
                       f" {server / requests * 1e6:.0f} us a request; raw: the measured rate;"
                       f" {_load()}")
            )  # fmt: skip
    return figures


def prune(bench: Harness, sizes: CapacitySizes) -> Figure:
    """`taskrunner prune --older-than 0` on a table of finished tasks, run by a worker."""
    n = sizes.prune_tasks
    with bench.scenario("capprune"):
        bench.insert_due("baz", n)
        bench.worker()
        wait_until(lambda: bench.done(n), n, "capacity, running the tasks to prune", 900)
        bench.check_all_succeeded(n)
        bench.procs.stop_all()
        [(size,)] = bench.sql("SELECT pg_total_relation_size('tasks')")
        postmaster = _server(bench)
        before = server_cpu_s(postmaster)
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "local", "--log-level", "WARNING", "prune", "--older-than", "0"],
            env={**os.environ, "TASKRUNNER_DATABASE_URL": bench.url},
            check=True, capture_output=True, timeout=1800,
        )  # fmt: skip
        seconds = time.monotonic() - started
        server = server_cpu_s(postmaster) - before
        [(left,)] = bench.sql("SELECT count(*) FROM tasks")
        if left:
            raise RuntimeError(f"capacity: prune left {left} of {n} finished tasks")
    return Figure("capacity: taskrunner prune, finished tasks deleted per second", n / seconds,
                  "tasks/s", "-", True, n / server,
                  f"{n:,} finished baz ({size / 2**20:.0f} MB with indexes), run by a worker;"
                  f" {seconds:.1f} s (with the process's start); server CPU {server:.1f} s"
                  f" ({server / n * 1e6:.0f} us a task); raw: tasks per server CPU second;"
                  f" {_load()}")  # fmt: skip


def figures(bench: Harness, quick: bool) -> list[Figure]:
    sizes = CapacitySizes.choose(quick)
    result = [claim_finish(bench, sizes)]
    if load.wrk_path() is not None:
        result += api(bench, sizes)
    result.append(prune(bench, sizes))
    return result
