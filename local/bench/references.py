"""The raw PostgreSQL column of `taskrunner bench`: what the database itself does with the
same SQL, in the same run, beside each figure (so the ratio holds on a noisy machine).

The worker's claim and finish transactions without the runner, a NOTIFY's trip, the API's
INSERTs straight from psycopg, and the API's statements as pgbench scripts.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from typing import Any

import psycopg

from functions import queries
from functions.db import Database
from functions.model import DEFAULT_ORDER, TaskFilter, TaskState
from functions.settings import Settings
from functions.store import Claimed, Result, Store
from local.bench.harness import percentile


async def raw_drain(url: str, n: int, pipelines: int = 2) -> float:
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


async def raw_cancel(url: str, n: int, connections: int) -> float:
    """Seconds for the store's own cancels (`Store.cancel_task`: the cancel, then its
    notification) of `n` running tasks, one call each from `connections` sessions at once:
    the cancel scenario without the API or any worker. The tasks are claimed by the
    store's own claim first, so they are running."""
    settings = Settings(database_url=url, db_pool_size=connections)
    database = Database(settings)
    store = Store(database)
    try:
        await store.register_worker(worker="raw", lease_s=60.0)
        ids: list[int] = []
        while len(ids) < n:
            claimed, _ = await store.claim_due(
                worker="raw", kinds=["foo"], limit=n - len(ids), lease_s=60.0
            )
            ids += [c.id for c in claimed]
        todo = iter(ids)

        async def client() -> None:
            for task_id in todo:
                await store.cancel_task(task_id)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(connections)))
        return time.perf_counter() - started
    finally:
        await database.dispose()


async def raw_notify_p99(url: str, n: int) -> float:
    """p99 (ms) of `n` NOTIFYs' trips from one session to another LISTENing one."""
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


async def raw_insert_one_by_one(url: str, n: int, connections: int) -> float:
    """Tasks per second of the API's single-row INSERT from `connections` sessions."""
    conns = [
        await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(connections)
    ]
    when = datetime.fromtimestamp(time.time() + 3600, UTC)

    async def insert(conn: psycopg.AsyncConnection[Any], count: int) -> None:
        for _ in range(count):
            await conn.execute(
                queries.INSERT_TASK,
                {
                    "kind": "baz",
                    "execute_at": when,
                    "max_attempts": 3,
                    "payload": None,
                    "priority": 0,
                    "timeout_s": None,
                },
            )

    started = time.perf_counter()
    await asyncio.gather(*(insert(c, n // connections) for c in conns))
    elapsed = time.perf_counter() - started
    for conn in conns:
        await conn.close()
    return (n // connections * connections) / elapsed


def as_pgbench(sql: str, values: dict[str, str]) -> str:
    """One of our statements (queries.*) as a pgbench script: each `%(name)s` replaced by
    the SQL in `values` (a literal, or a pgbench `:variable`), `%%` as `%`, on one line."""
    script = re.sub(r"%\((\w+)\)s", lambda m: values[m.group(1)], sql)
    # (`%%`: a `%` escaped for psycopg, as psycopg sends it.)
    return " ".join(script.replace("%%", "%").split()) + ";\n"


# The API's statements as pgbench runs them (values as the API would send them).
RAW_INSERT = as_pgbench(
    queries.INSERT_TASK,
    {
        "kind": "'baz'",
        "execute_at": "now() + interval '1 hour'",
        "max_attempts": "3",
        "payload": "NULL",
        "priority": "0",
        "timeout_s": "NULL",
    },
)


def raw_get(lo: int, hi: int) -> str:
    return f"\\set id random({lo}, {hi})\n" + as_pgbench(queries.GET_TASK, {"id": ":id"})


# The first page of `GET /tasks` (newest first, no filter), as the API reads it when none
# of its tasks has a timeout or a payload (the bench's have neither): written whole.
RAW_PAGE = as_pgbench(
    queries.listing(TaskFilter(), DEFAULT_ORDER).page_text(after=False, bounded=False),
    {"limit": "101", "shown": "100"},
)
