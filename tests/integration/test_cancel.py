"""Cancelling: one task, by filter, a schedule's unstarted ones; running ones included."""

import asyncio
import dataclasses
import io
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from functions import queries, tasks
from functions.errors import TaskNotFound, WrongState
from functions.kinds import KINDS, Context, Kind
from functions.model import Task, TaskState
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Result, Store
from functions.tick import tick

Sql = Callable[..., list[tuple[Any, ...]]]
FUTURE = "2030-01-01T12:00:00Z"


def states(sql: Sql) -> dict[int, tuple[str, str | None, bool]]:
    rows = sql("SELECT id, state, claimed_by, finished_at IS NOT NULL FROM tasks ORDER BY id")
    return {task_id: (state, held, finished) for task_id, state, held, finished in rows}


async def test_a_cancel_by_condition_takes_the_lowest_ids_and_only_what_matches(
    store: Store, sql: Sql, task_factory: Callable[..., int], database_url: str
) -> None:
    foo = [task_factory("foo", due_in_s=60) for _ in range(4)]
    baz = task_factory("baz", due_in_s=60)
    sql("UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w1' WHERE id = %s", foo[1])
    sql("UPDATE tasks SET state = 'succeeded', finished_at = now() WHERE id = %s", foo[2])
    unstarted = queries.cancel_tasks("kind = %(kind)s", states=("scheduled",))
    everything = queries.cancel_tasks("kind = %(kind)s")
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {queries.CANCEL_CHANNEL}")
        assert await store.cancel_tasks(unstarted, limit=1, kind="foo") == (
            [foo[0]],
            {},
            {"foo": 1},
        )
        assert await store.cancel_tasks(unstarted, limit=10, kind="foo") == (
            [foo[3]],
            {},
            {"foo": 1},
        )
        assert [n.payload for n in listener.notifies(timeout=0.2)] == []
        held = {"w1": [(foo[1], 1)]}
        assert await store.cancel_tasks(everything, limit=10, kind="foo") == (
            [foo[1]],
            held,
            {"foo": 1},
        )
        assert [n.payload for n in listener.notifies(timeout=1, stop_after=1)] == [
            f'["w1",[{foo[1]},1]]'
        ]
        assert await store.cancel_tasks(everything, limit=10, kind="foo") == ([], {}, {})
    found = states(sql)
    assert found[foo[0]] == found[foo[1]] == found[foo[3]] == ("cancelled", None, True)
    assert found[foo[2]] == ("succeeded", None, True)
    assert found[baz] == ("scheduled", None, False)


async def test_cancels_made_at_once_share_statements_and_each_gets_its_own_answer(
    store: Store, sql: Sql, task_factory: Callable[..., int], database_url: str
) -> None:
    ids = [task_factory("foo", due_in_s=60) for _ in range(60)]
    sql(
        "UPDATE tasks SET state = 'running', attempts = 2, claimed_by = 'w1' WHERE id = ANY(%s)",
        ids[10:12],
    )
    sql("UPDATE tasks SET state = 'succeeded', finished_at = now() WHERE id = %s", ids[20])
    statements = 0
    pinned = store._pinned

    async def counted(*args: Any, **kwargs: Any) -> list[list[Any]]:
        nonlocal statements
        statements += 1
        return await pinned(*args, **kwargs)

    store._pinned = counted  # type: ignore[method-assign]
    asked = [*ids, ids[0], ids[-1] + 1000]  # one asked twice at once, one that is missing
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {queries.CANCEL_CHANNEL}")
        answers = await asyncio.gather(
            *(tasks.cancel_task(store, task_id) for task_id in asked), return_exceptions=True
        )
        notes = [n.payload for n in listener.notifies(timeout=1, stop_after=1)]
    assert statements < 30, "they shared statements"
    for task_id, answer in zip(asked, answers, strict=True):
        if task_id == ids[20]:
            assert isinstance(answer, WrongState), answer
        elif task_id == ids[-1] + 1000:
            assert isinstance(answer, TaskNotFound), answer
        else:
            assert isinstance(answer, Task), answer
            assert (answer.id, answer.state.value) == (task_id, "cancelled")
    # The worker that ran two of them is told which, with their attempts.
    assert notes == [f'["w1",[{ids[10]},2,{ids[11]},2]]']
    assert sql("SELECT count(*) FROM tasks WHERE state = 'cancelled'") == [(59,)]


async def test_a_worker_stops_the_tasks_a_notification_names_without_asking_the_database(
    client: httpx.AsyncClient,
    settings: Settings,
    sql: Sql,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = dataclasses.replace(
        settings, foo_delay_s=30.0, poll_interval_s=60.0, shutdown_grace_s=0.0
    )
    ids = [await created(client) for _ in range(2)]
    asked: list[int] = []
    no_longer_held = Store.no_longer_held

    async def counted(self: Store, held: Any) -> dict[int, bool]:
        asked.append(len(held))
        return await no_longer_held(self, held)

    monkeypatch.setattr(Store, "no_longer_held", counted)
    caplog.set_level(logging.INFO, "functions.runner")
    out = io.StringIO()
    run, stop = await worker_running(settings, out)
    try:
        await until(lambda: sql("SELECT count(*) FROM tasks WHERE state = 'running'")[0][0] == 2)
        [(worker,)] = sql("SELECT DISTINCT claimed_by FROM tasks")
        before = len(asked)  # (one at most: a listener that connected after the claim asks)
        # A notification that names the other task on another attempt stops nothing.
        sql("SELECT pg_notify(%s, %s)", queries.CANCEL_CHANNEL, f'["{worker}",[{ids[1]},2]]')
        assert (await client.post(f"/tasks/{ids[0]}/cancel")).status_code == 200
        await until(lambda: run.done() or "action=cancel worker" in caplog.text, 20.0)
        assert len(asked) == before, "stopped without a query"
    finally:
        stop.set()
        summary = await run
    assert summary.cancelled == 1
    assert out.getvalue() == ""
    assert sql("SELECT id, state FROM tasks ORDER BY id") == [
        (ids[0], "cancelled"),
        (ids[1], "scheduled"),  # handed back at shutdown: it was never stopped
    ]


async def created(client: httpx.AsyncClient, kind: str = "foo", at: Any = 0) -> int:
    response = await client.post("/tasks", json={"type": kind, "execute_at": at})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


async def until(condition: Callable[[], Any], timeout_s: float = 30.0) -> None:
    """Wait until `condition()` holds; generous bounds (a starved CI machine), no tight
    timing: the time taken is not what is tested."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_cancel_answers_the_task_cancelled_then_the_same_and_refuses_a_finished_one(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    task_id = await created(client, at=FUTURE)
    response = await client.post(f"/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "cancelled"
    assert body["finished_at"] is not None
    assert body["next_attempt_at"] is None
    again = await client.post(f"/tasks/{task_id}/cancel")
    assert again.status_code == 200
    assert again.json() == body
    for state in ("succeeded", "failed"):
        other = await created(client, at=FUTURE)
        sql(
            "UPDATE tasks SET state = %s, attempts = 1, finished_at = now() WHERE id = %s",
            state,
            other,
        )
        refused = await client.post(f"/tasks/{other}/cancel")
        assert refused.status_code == 409
        assert refused.json()["detail"] == (
            f"task {other} is in state {state}: only a scheduled or running task can be cancelled"
        )
    assert (await client.post("/tasks/999999/cancel")).status_code == 404
    assert (await client.post("/tasks/0/cancel")).status_code == 422
    assert (await client.get("/tasks/cancel")).status_code == 405


async def test_a_cancelled_task_is_retried_and_runs(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    task_id = await created(client, "baz", at=FUTURE)
    await client.post(f"/tasks/{task_id}/cancel")
    response = await client.post(f"/tasks/{task_id}/retry")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "scheduled"
    assert response.json()["finished_at"] is None
    out = io.StringIO()
    assert (await tick(settings, out=out)).succeeded == 1
    assert out.getvalue().count("\n") == 1
    refused = await client.post(f"/tasks/{task_id}/retry")
    assert refused.status_code == 409
    assert "only a failed or cancelled task can be retried" in refused.json()["detail"]


async def worker_running(settings: Settings, out: io.StringIO) -> tuple[Any, asyncio.Event]:
    stop = asyncio.Event()
    run = asyncio.create_task(tick(settings, keep_polling=True, stop=stop, out=out))
    return run, stop


async def test_a_task_cancelled_and_retried_before_its_worker_heard_runs_once_more_not_twice(
    client: httpx.AsyncClient,
    settings: Settings,
    store: Store,
    sql: Sql,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that learns of cancels by polling (behind a transaction pooler; here every
    60 s) is running a task that is cancelled, then retried, and claims it again before it
    polls: the cancelled attempt stops there (a cancel in its summary), and the new one
    runs, prints and is recorded once. Before, the new attempt was held over the old one
    under the same id: the old run's dropped result took the new one's hold with it, the
    new run was never recorded, and the task stayed running after the worker stopped."""

    async def dozes(ctx: Context) -> str:
        await asyncio.sleep(1.0)
        return f"Dozed {ctx.task_id} a{ctx.attempt}"

    monkeypatch.setitem(KINDS, "dozes", Kind("dozes", dozes, lambda s: 5.0))
    settings = dataclasses.replace(settings, transaction_pooler=True, poll_interval_s=60.0)
    task_id = await created(client, "dozes")
    out = io.StringIO()
    runner = Runner(store, settings, out=out)
    stop = asyncio.Event()
    run = asyncio.create_task(runner.run(keep_polling=True, stop=stop))
    try:
        await until(lambda: sql("SELECT state FROM tasks") == [("running",)])
        assert (await client.post(f"/tasks/{task_id}/cancel")).status_code == 200
        assert (await client.post(f"/tasks/{task_id}/retry")).status_code == 200
        runner.wakeup.set()  # (as its next poll for due tasks would, before the cancels')
        await until(lambda: sql("SELECT state FROM tasks") == [("succeeded",)])
        await asyncio.sleep(1.5)  # the cancelled attempt's run would have ended by now
    finally:
        stop.set()
        summary = await asyncio.wait_for(run, 20.0)
    assert out.getvalue() == f"Dozed {task_id} a2\n"
    assert (summary.claimed, summary.cancelled, summary.succeeded, summary.lost) == (2, 1, 1, 0)
    assert sql("SELECT state, attempts, claimed_by FROM tasks") == [("succeeded", 2, None)]


async def test_a_running_task_is_cancelled_its_worker_hears_it_and_prints_nothing(
    client: httpx.AsyncClient, settings: Settings, sql: Sql, caplog: pytest.LogCaptureFixture
) -> None:
    # Polling every 60 s: only the notification can tell the worker in time.
    settings = dataclasses.replace(
        settings, foo_delay_s=30.0, poll_interval_s=60.0, shutdown_grace_s=0.0
    )
    ids = [await created(client) for _ in range(3)]
    # (Before the cancel: the worker may hear of it and stop the task before the cancel's
    # answer reaches this test.)
    caplog.set_level(logging.INFO, "functions.runner")
    out = io.StringIO()
    run, stop = await worker_running(settings, out)
    try:
        await until(lambda: sql("SELECT count(*) FROM tasks WHERE state = 'running'")[0][0] == 3)
        response = await client.post(f"/tasks/{ids[0]}/cancel")
        assert response.json()["state"] == "cancelled"
        assert response.json()["attempts"] == 1
        # The worker stops it long before foo would end (30 s) or it would poll (60 s).
        await until(lambda: run.done() or "action=cancel worker" in caplog.text, 20.0)
    finally:
        stop.set()
        summary = await run
    assert summary.cancelled == 1
    assert "Foo" not in out.getvalue()
    assert sql("SELECT state, claimed_by FROM tasks WHERE id = %s", ids[0]) == [("cancelled", None)]
    # The two others were handed back at shutdown, as ever.
    assert sql("SELECT count(*) FROM tasks WHERE state = 'scheduled'") == [(2,)]


async def test_bulk_cancel_and_retry_act_on_the_filter_lowest_ids_first(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    foo = [await created(client, "foo", at=FUTURE) for _ in range(5)]
    bar = await created(client, "bar", at=FUTURE)
    response = await client.post("/tasks/cancel", params={"type": "foo", "limit": 3})
    assert response.json() == {"count": 3}
    assert [s for (s,) in sql("SELECT state FROM tasks ORDER BY id")] == [
        *["cancelled"] * 3,
        *["scheduled"] * 3,
    ]
    response = await client.post("/tasks/retry", params={"type": "foo", "limit": 2})
    assert response.json() == {"count": 2}
    response = await client.post("/tasks/retry", params={"state": "failed"})
    assert response.json() == {"count": 0}
    response = await client.post("/tasks/cancel", params={"state": "succeeded"})
    assert response.json() == {"count": 0}
    assert [s for (s,) in sql("SELECT state FROM tasks ORDER BY id")] == [
        "scheduled",
        "scheduled",
        "cancelled",
        *["scheduled"] * 3,
    ]
    assert len(foo) == 5 and bar == foo[-1] + 1


async def test_a_tick_stops_its_task_cancelled_while_it_runs(
    client: httpx.AsyncClient, settings: Settings, sql: Sql
) -> None:
    """A tick does not listen: it looks at its poll interval (0.05 s here), and returns
    without waiting for foo's 30 s."""
    settings = dataclasses.replace(settings, foo_delay_s=30.0)
    task_id = await created(client)
    out = io.StringIO()
    run = asyncio.create_task(tick(settings, out=out))
    await until(lambda: sql("SELECT state FROM tasks") == [("running",)])
    assert (await client.post(f"/tasks/{task_id}/cancel")).status_code == 200
    summary = await asyncio.wait_for(run, 20.0)
    assert (summary.claimed, summary.cancelled, summary.succeeded) == (1, 1, 0)
    assert out.getvalue() == ""
    assert sql("SELECT state, attempts, claimed_by FROM tasks") == [("cancelled", 1, None)]


async def test_a_cancel_its_worker_learns_from_the_finish_is_counted_cancelled_not_lost(
    client: httpx.AsyncClient, settings: Settings, sql: Sql, caplog: pytest.LogCaptureFixture
) -> None:
    """A tick does not listen and polls every 60 s here: the run's end is what tells it of
    the cancel, when its finish is refused. That is a cancel in its summary and its log,
    not a task lost to a rescue (it was counted lost before)."""
    settings = dataclasses.replace(settings, foo_delay_s=1.0, poll_interval_s=60.0)
    task_id = await created(client)
    out = io.StringIO()
    caplog.set_level(logging.INFO, "functions.runner")
    run = asyncio.create_task(tick(settings, out=out))
    await until(lambda: sql("SELECT state FROM tasks") == [("running",)])
    assert (await client.post(f"/tasks/{task_id}/cancel")).status_code == 200
    summary = await asyncio.wait_for(run, 20.0)
    assert (summary.claimed, summary.cancelled, summary.lost) == (1, 1, 0)
    assert out.getvalue() == ""
    assert f"action=cancel task_id={task_id} attempt=1" in caplog.text
    assert "no longer held" not in caplog.text


async def test_cancels_racing_a_ticks_runs_end_cancelled_without_a_line_or_succeeded_with_one(
    store: Store, settings: Settings, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """A tick prints a line only while its finish holds the task's row, as a worker does: a
    cancel that lands first stops the line, one that comes while it prints waits and finds
    the task succeeded (409)."""
    settings = dataclasses.replace(settings, foo_delay_s=0.02)
    ids = [task_factory("foo") for _ in range(300)]
    out = io.StringIO()
    run = asyncio.create_task(tick(settings, out=out))
    await until(lambda: sql("SELECT count(*) FROM tasks WHERE state <> 'scheduled'")[0][0] > 0)
    answers = await asyncio.gather(
        *(tasks.cancel_task(store, task_id) for task_id in ids), return_exceptions=True
    )
    await asyncio.wait_for(run, 60.0)
    printed = Counter(int(line.split()[1]) for line in out.getvalue().splitlines())
    found: dict[int, str] = dict(sql("SELECT id, state FROM tasks"))
    outcomes: Counter[str] = Counter()
    for task_id, answer in zip(ids, answers, strict=True):
        if isinstance(answer, Task):
            assert (found[task_id], printed[task_id]) == ("cancelled", 0), task_id
        else:
            assert isinstance(answer, WrongState), answer
            assert (found[task_id], printed[task_id]) == ("succeeded", 1), task_id
        outcomes[found[task_id]] += 1
    assert sum(outcomes.values()) == 300


async def test_cancelled_is_a_state_the_filters_the_original_listing_and_retention_know(
    client: httpx.AsyncClient, settings: Settings, sql: Sql
) -> None:
    cancelled = await created(client, at=FUTURE)
    await client.post(f"/tasks/{cancelled}/cancel")
    other = await created(client, at=FUTURE)
    listed = (await client.get("/tasks", params={"state": "cancelled"})).json()["items"]
    assert [t["id"] for t in listed] == [cancelled]
    complete = (await client.get("/taskstate/COMPLETE")).json()
    assert [t["id"] for t in complete] == [cancelled]
    # Pruned as finished tasks are, once past the retention.
    sql("UPDATE tasks SET finished_at = now() - interval '8 days' WHERE id = %s", cancelled)
    assert (await tick(settings, out=io.StringIO())).pruned == 1
    assert sql("SELECT id FROM tasks") == [(other,)]


async def test_what_a_worker_no_longer_holds_says_whether_it_was_cancelled(
    store: Store, task_factory: Callable[..., int], sql: Sql
) -> None:
    # Of the tasks a worker claimed: one cancelled; one cancelled then retried (scheduled
    # again, on the same attempt count); one cancelled, retried and claimed again by the
    # same worker (its next attempt); one whose attempt moved on (rescued, claimed again);
    # one deleted; one it retried itself (scheduled on the same attempt count, as the
    # cancelled and retried one is); one still its own. And one another worker held, which
    # was rescued when that worker's lease ran out (scheduled, the same attempt count). The
    # first three were cancels; the retried one and the one still running are this
    # worker's still. (The cancelled and retried ones were lost, or not even found, before:
    # the worker ran on, and could hold the new attempt over the old one.)
    for _ in range(8):
        task_factory("foo")
    await store.register_worker(worker="w", lease_s=60)
    await store.register_worker(worker="dies", lease_s=60)
    [dead], _ = await store.claim_due(worker="dies", kinds=["foo"], limit=1, lease_s=60)
    claimed, _ = await store.claim_due(worker="w", kinds=["foo"], limit=7, lease_s=60)
    cancelled, retried, again, moved_on, deleted, itself, kept = sorted(c.id for c in claimed)
    for task_id in (cancelled, retried, again):
        await tasks.cancel_task(store, task_id)
    assert (await store.retry_task(again, 3))[1] is not None
    [taken], _ = await store.claim_due(worker="w", kinds=["foo"], limit=7, lease_s=60)
    assert (taken.id, taken.attempt) == (again, 2)
    assert (await store.retry_task(retried, 3))[1] is not None
    sql("UPDATE tasks SET attempts = attempts + 1 WHERE id = %s", moved_on)
    sql("DELETE FROM tasks WHERE id = %s", deleted)
    retry = Result(itself, 1, TaskState.SCHEDULED, error="Exception: again", retry_in_s=60.0)
    assert await store.finish_many(worker="w", results=[retry]) == {itself}
    sql("UPDATE workers SET lease_expires_at = now() - interval '1 second' WHERE id = 'dies'")
    assert [task_id for task_id, *_ in await store.rescue_expired()] == [dead.id]
    gone = await store.no_longer_held([*claimed, dead])
    assert gone == {
        cancelled: True,
        retried: True,
        again: True,
        moved_on: False,
        deleted: False,
        dead.id: False,
    }
    assert itself not in gone and kept not in gone
