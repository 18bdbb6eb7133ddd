"""What is running where (issue 24): a running task's worker, attempt start and lease, and
`GET /workers`: live workers and ticks, and those that left or died in the last hour.

Time passing is the database's clock moved by hand, as in test_claims.py: a worker's lease is
expired by setting `lease_expires_at` in the past, an ended one aged by its `ended_at`."""

import asyncio
import dataclasses
import io
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from functions.kinds import KINDS
from functions.model import TaskState
from functions.runner import Runner, version
from functions.settings import Settings
from functions.store import Result, Store
from tests.conftest import serve

Sql = Callable[..., list[tuple[Any, ...]]]


def when(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


async def workers(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    answer = await client.get("/workers")
    assert answer.status_code == 200, answer.text
    return {w["id"]: w for w in answer.json()["workers"]}


async def test_a_running_task_shows_its_worker_its_attempt_start_and_lease(
    settings: Settings, store: Store, task_factory: Callable[..., int], sql: Sql
) -> None:
    task_id = task_factory("baz")
    await store.register_worker(worker="A", lease_s=60)
    [claimed], _ = await store.claim_due(worker="A", kinds=list(KINDS), limit=10, lease_s=60)
    [(claimed_at, lease)] = sql(
        "SELECT t.claimed_at, w.lease_expires_at FROM tasks t, workers w WHERE w.id = 'A'"
    )
    async with serve(settings) as client:
        # The fast path (one task) and the FastAPI routes (a page) answer the same fields.
        one = (await client.get(f"/tasks/{task_id}")).json()
        [listed] = (await client.get("/tasks", params={"state": "running"})).json()["items"]
        for task in (one, listed):
            assert task["worker"] == "A"
            assert when(task["running_since"]) == claimed_at
            assert when(task["lease_expires_at"]) == lease
        # Its second attempt: running since its claim, started_at still the first's.
        result = Result(task_id, claimed.attempt, TaskState.SCHEDULED, error="x", retry_in_s=0)
        await store.finish_many(worker="A", results=[result])
        await store.claim_due(worker="A", kinds=list(KINDS), limit=10, lease_s=60)
        again = (await client.get(f"/tasks/{task_id}")).json()
        assert when(again["running_since"]) > when(again["started_at"])  # type: ignore[operator]
        # Once finished, none of the three.
        done = Result(task_id, 2, TaskState.SUCCEEDED, output="Baz 1")
        assert await store.finish_many(worker="A", results=[done]) == {task_id}
        finished = (await client.get(f"/tasks/{task_id}")).json()
        assert (finished["worker"], finished["running_since"], finished["lease_expires_at"]) == (
            None, None, None,
        )  # fmt: skip


async def test_workers_lists_a_live_worker_then_the_worker_that_left(
    settings: Settings, store: Store, task_factory: Callable[..., int]
) -> None:
    settings = dataclasses.replace(settings, foo_delay_s=30.0)
    task_id = task_factory("foo")
    runner = Runner(store, settings, out=io.StringIO())
    stop = asyncio.Event()
    run = asyncio.create_task(runner.run(keep_polling=True, stop=stop))
    async with serve(settings) as client:
        for _ in range(200):
            listed = await workers(client)
            if listed.get(runner.worker_id, {}).get("running") == 1:
                break
            await asyncio.sleep(0.05)
        live = listed[runner.worker_id]
        assert live["state"] == "live" and live["tick"] is False
        assert (live["host"], live["pid"]) == (socket.gethostname(), os.getpid())
        assert live["version"] == version() and live["version"]
        assert live["kinds"] == sorted(KINDS)
        assert live["rescued"] == 0
        assert when(live["lease_expires_at"]) > when(live["last_heartbeat_at"])  # type: ignore[operator]
        task = (await client.get(f"/tasks/{task_id}")).json()
        assert task["worker"] == runner.worker_id
        stop.set()
        await asyncio.wait_for(run, timeout=30)  # it hands the foo back and leaves
        left = (await workers(client))[runner.worker_id]
        assert (left["state"], left["running"]) == ("left", 0)
        assert {k: left[k] for k in ("host", "pid", "kinds", "version", "started_at")} == {
            k: live[k] for k in ("host", "pid", "kinds", "version", "started_at")
        }


async def test_a_dead_worker_is_listed_with_what_was_rescued_for_an_hour(
    settings: Settings, store: Store, task_factory: Callable[..., int], sql: Sql
) -> None:
    for _ in range(3):
        task_factory("baz")
    await store.register_worker(worker="D", lease_s=60, host="h", pid=7, kinds=["baz"])
    await store.register_worker(worker="T", lease_s=60, tick=True)
    await store.claim_due(worker="D", kinds=["baz"], limit=10, lease_s=60)
    async with serve(settings) as client:
        assert {w["id"]: w["state"] for w in (await workers(client)).values()} == {
            "D": "live", "T": "live",
        }  # fmt: skip
        sql("UPDATE workers SET lease_expires_at = now() - interval '1 second'")  # both died
        dying = await workers(client)
        assert (dying["D"]["state"], dying["D"]["running"]) == ("dead", 3)
        assert len(await store.rescue_expired()) == 3
        dead = await workers(client)
        assert {w: (dead[w]["state"], dead[w]["rescued"], dead[w]["tick"]) for w in dead} == {
            "D": ("dead", 3, False), "T": ("dead", 0, True),
        }  # fmt: skip
        assert (dead["D"]["host"], dead["D"]["pid"], dead["D"]["kinds"]) == ("h", 7, ["baz"])
        # Kept an hour: a minute short of it, listed; past it, forgotten.
        sql("UPDATE workers_ended SET ended_at = now() - interval '59 minutes' WHERE id = 'D'")
        sql("UPDATE workers_ended SET ended_at = now() - interval '61 minutes' WHERE id = 'T'")
        assert set(await workers(client)) == {"D"}
        await store.rescue_expired()  # which deletes what is past the hour
        assert sql("SELECT id FROM workers_ended") == [("D",)]


async def test_a_tick_is_listed_while_it_runs_and_not_once_it_ended(
    settings: Settings, store: Store
) -> None:
    await store.register_worker(worker="T", lease_s=60, tick=True)
    await store.register_worker(worker="W", lease_s=60)
    async with serve(settings) as client:
        listed = await workers(client)
        assert (listed["T"]["tick"], listed["W"]["tick"]) == (True, False)
        await store.deregister_worker(worker="T")
        await store.deregister_worker(worker="W")
        assert {w: v["state"] for w, v in (await workers(client)).items()} == {"W": "left"}


async def test_a_real_tick_registers_as_one(
    settings: Settings, store: Store, task_factory: Callable[..., int], sql: Sql
) -> None:
    task_factory("baz")
    runner = Runner(store, settings, out=io.StringIO())
    summary = await runner.run(deadline=time.monotonic() + 30)
    assert summary.succeeded == 1
    # Ended normally: not recorded.
    assert sql("SELECT count(*) FROM workers_ended") == [(0,)]
    assert sql("SELECT count(*) FROM workers") == [(0,)]


async def test_a_tick_run_once_registers_as_a_tick_and_is_not_kept(
    settings: Settings, store: Store, task_factory: Callable[..., int], sql: Sql
) -> None:
    """`taskrunner tick` (no deadline, no polling) is a tick as Lambda's is: listed as one,
    and not kept once it ended (a cron of it every minute would fill the list)."""
    task_factory("baz")
    runner = Runner(store, settings, out=io.StringIO())
    ticking = asyncio.create_task(runner.run())
    seen: list[tuple[Any, ...]] = []
    while not ticking.done():
        seen += sql("SELECT tick FROM workers")
        await asyncio.sleep(0.001)
    assert (await ticking).succeeded == 1
    assert set(seen) <= {(True,)}
    assert sql("SELECT count(*) FROM workers_ended") == [(0,)]
    assert sql("SELECT count(*) FROM workers") == [(0,)]
