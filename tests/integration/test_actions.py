"""Task actions: run now, retry a failed task, reschedule; each race-safe against claims."""

import asyncio
import dataclasses
import io
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from functions.db import Database
from functions.kinds import KINDS, Context, Fail, Kind
from functions.model import TaskState
from functions.queries import CHANNEL
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Store
from functions.tick import tick

Sql = Callable[..., list[tuple[Any, ...]]]
FUTURE = "2030-01-01T12:00:00Z"


def db_now(sql: Sql) -> datetime:
    [(now,)] = sql("SELECT now()")
    assert isinstance(now, datetime)
    return now


async def create(client: httpx.AsyncClient, kind: str = "baz", at: Any = FUTURE) -> int:
    response = await client.post("/tasks", json={"type": kind, "execute_at": at})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def set_state(sql: Sql, task_id: int, state: str) -> None:
    if state == "running":
        sql(
            "UPDATE tasks SET state = 'running', attempts = 1, started_at = now(),"
            " claimed_by = 'w' WHERE id = %s",
            task_id,
        )
    elif state in ("succeeded", "failed"):
        sql(
            "UPDATE tasks SET state = %s, attempts = 3, started_at = now(), finished_at = now(),"
            " error = CASE WHEN %s = 'failed' THEN 'boom' END WHERE id = %s",
            state,
            state,
            task_id,
        )


async def test_run_makes_a_future_task_due_now_and_a_tick_runs_it(
    client: httpx.AsyncClient, settings: Settings, sql: Sql
) -> None:
    task_id = await create(client)
    before = db_now(sql)
    response = await client.post(f"/tasks/{task_id}/run")
    assert response.status_code == 200, response.text
    task = response.json()
    assert task["state"] == "scheduled"
    # The time asked for stays; the next attempt may start now, as after a retry.
    assert task["execute_at"] == FUTURE
    assert before <= datetime.fromisoformat(task["next_attempt_at"]) <= db_now(sql)
    summary = await tick(settings)
    assert summary.succeeded == 1
    assert (await client.get(f"/tasks/{task_id}")).json()["state"] == "succeeded"


async def test_run_keeps_a_past_execute_at_and_drops_a_pending_retry_wait(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    task_id = await create(client, at=0)
    sql(
        "UPDATE tasks SET attempts = 1, error = 'boom', next_attempt_at = now() + interval '1 hour'"
        " WHERE id = %s",
        task_id,
    )
    before = db_now(sql)
    task = (await client.post(f"/tasks/{task_id}/run")).json()
    assert task["execute_at"] == "1970-01-01T00:00:00Z"
    assert before <= datetime.fromisoformat(task["next_attempt_at"]) <= db_now(sql)
    assert (task["attempts"], task["error"]) == (1, "boom")


async def test_run_of_a_task_already_due_leaves_it_as_it_was(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    task_id = await create(client, at=0)
    before = (await client.get(f"/tasks/{task_id}")).json()
    response = await client.post(f"/tasks/{task_id}/run")
    assert response.status_code == 200, response.text
    assert response.json() == before
    assert sql("SELECT made_due_at FROM tasks WHERE id = %s", task_id) == [(None,)]


@pytest.mark.parametrize("state", ["running", "succeeded", "failed"])
async def test_run_of_a_task_that_is_not_scheduled_is_409_naming_its_state(
    client: httpx.AsyncClient, sql: Sql, state: str
) -> None:
    task_id = await create(client)
    set_state(sql, task_id, state)
    before = (await client.get(f"/tasks/{task_id}")).json()
    response = await client.post(f"/tasks/{task_id}/run")
    assert response.status_code == 409, response.text
    assert response.json()["detail"] == (
        f"task {task_id} is in state {state}: only a scheduled task can be run now"
    )
    assert (await client.get(f"/tasks/{task_id}")).json() == before


async def test_retry_schedules_a_failed_task_with_a_fresh_budget_keeping_its_history(
    client: httpx.AsyncClient, settings: Settings, sql: Sql
) -> None:
    task_id = await create(client, at=0)
    set_state(sql, task_id, "failed")
    before = db_now(sql)
    response = await client.post(f"/tasks/{task_id}/retry")
    assert response.status_code == 200, response.text
    task = response.json()
    assert task["state"] == "scheduled"
    assert (task["attempts"], task["max_attempts"]) == (3, 3 + settings.max_attempts)
    assert task["error"] == "boom"
    assert task["finished_at"] is None and task["started_at"] is not None
    assert task["execute_at"] == "1970-01-01T00:00:00Z"
    assert before <= datetime.fromisoformat(task["next_attempt_at"]) <= db_now(sql)
    summary = await tick(settings)
    assert summary.succeeded == 1
    done = (await client.get(f"/tasks/{task_id}")).json()
    assert (done["state"], done["attempts"], done["error"]) == ("succeeded", 4, None)


@pytest.mark.parametrize("state", ["scheduled", "running", "succeeded"])
async def test_retry_of_a_task_that_did_not_fail_is_409(
    client: httpx.AsyncClient, sql: Sql, state: str
) -> None:
    task_id = await create(client)
    set_state(sql, task_id, state)
    response = await client.post(f"/tasks/{task_id}/retry")
    assert response.status_code == 409, response.text
    assert (
        f"in state {state}: only a failed or cancelled task can be retried"
        in response.json()["detail"]
    )
    assert (await client.get(f"/tasks/{task_id}")).json()["state"] == state


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2031-06-01T08:00:00+02:00", "2031-06-01T06:00:00Z"),
        (1893499200.5, "2030-01-01T12:00:00.500000Z"),
    ],
)
async def test_patch_reschedules_a_scheduled_task(
    client: httpx.AsyncClient, sql: Sql, sent: Any, stored: str
) -> None:
    task_id = await create(client)
    sql("UPDATE tasks SET next_attempt_at = now() WHERE id = %s", task_id)
    response = await client.patch(f"/tasks/{task_id}", json={"execute_at": sent})
    assert response.status_code == 200, response.text
    task = response.json()
    assert task["execute_at"] == task["next_attempt_at"] == stored
    assert (await client.get(f"/tasks/{task_id}")).json() == task


@pytest.mark.parametrize("state", ["running", "succeeded", "failed"])
async def test_patch_of_a_running_or_finished_task_is_409(
    client: httpx.AsyncClient, sql: Sql, state: str
) -> None:
    task_id = await create(client)
    set_state(sql, task_id, state)
    response = await client.patch(f"/tasks/{task_id}", json={"execute_at": 0})
    assert response.status_code == 409, response.text
    assert (
        f"in state {state}: only a scheduled task can be rescheduled" in (response.json()["detail"])
    )
    assert (await client.get(f"/tasks/{task_id}")).json()["execute_at"] == "2030-01-01T12:00:00Z"


@pytest.mark.parametrize(
    "body",
    [{}, {"execute_at": "soon"}, {"execute_at": 0, "type": "foo"}, {"execute_at": None}],
    ids=["empty", "not a time", "another field", "null"],
)
async def test_patch_with_a_bad_body_is_422(client: httpx.AsyncClient, body: Any) -> None:
    task_id = await create(client)
    response = await client.patch(f"/tasks/{task_id}", json=body)
    assert response.status_code == 422, response.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/tasks/999999/run", None),
        ("POST", "/tasks/999999/retry", None),
        ("PATCH", "/tasks/999999", {"execute_at": 0}),
    ],
)
async def test_actions_on_a_missing_task_are_404(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    response = await client.request(method, path, json=body)
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "task 999999 does not exist"}


@pytest.mark.parametrize(
    ("method", "suffix", "body", "state"),
    [
        ("POST", "/run", None, "scheduled"),
        ("POST", "/retry", None, "failed"),
        ("PATCH", "", {"execute_at": "2030-01-01T00:00:01Z"}, "scheduled"),
    ],
    ids=["run", "retry", "patch"],
)
async def test_actions_wake_listening_workers(
    client: httpx.AsyncClient,
    sql: Sql,
    database_url: str,
    method: str,
    suffix: str,
    body: Any,
    state: str,
) -> None:
    task_id = await create(client, at=FUTURE)
    set_state(sql, task_id, state)
    if method == "PATCH":
        # Due within the horizon: in 2 s by the database's clock.
        body = {"execute_at": (db_now(sql).timestamp() + 2)}
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        response = await client.request(method, f"/tasks/{task_id}{suffix}", json=body)
        assert response.status_code == 200, response.text
        notes = list(listener.notifies(timeout=5, stop_after=1))
    assert len(notes) == 1
    due = response.json()["next_attempt_at"]
    assert float(notes[0].payload) == pytest.approx(datetime.fromisoformat(due).timestamp())


async def test_a_reschedule_far_ahead_wakes_no_worker(
    client: httpx.AsyncClient, database_url: str
) -> None:
    task_id = await create(client, at=0)
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        response = await client.patch(f"/tasks/{task_id}", json={"execute_at": FUTURE})
        assert response.status_code == 200
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []


def wait_for_a_lock_wait(sql: Sql) -> None:
    """Until some backend of this database waits on a row lock."""
    deadline = time.monotonic() + 10
    while not sql(
        "SELECT 1 FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ):
        assert time.monotonic() < deadline, "no request waited on the claim's lock"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [("POST", "/run", None), ("PATCH", "", {"execute_at": 0}), ("DELETE", "", None)],
    ids=["run", "patch", "delete"],
)
async def test_an_action_waits_for_a_claim_in_progress_and_then_refuses(
    client: httpx.AsyncClient,
    sql: Sql,
    database_url: str,
    method: str,
    suffix: str,
    body: Any,
) -> None:
    task_id = await create(client, at=FUTURE)
    with psycopg.connect(database_url) as worker:
        # A claim that has locked the row and not committed yet.
        worker.execute(
            "UPDATE tasks SET state = 'running', attempts = 1, started_at = now(),"
            " claimed_by = 'w' WHERE id = %s",
            [task_id],
        )
        request = asyncio.create_task(
            client.request(method, f"/tasks/{task_id}{suffix}", json=body)
        )
        await asyncio.to_thread(wait_for_a_lock_wait, sql)
        assert not request.done()
        worker.commit()
    response = await request
    assert response.status_code == 409, response.text
    assert "running" in response.json()["detail"]
    assert sql("SELECT state, execute_at FROM tasks WHERE id = %s", task_id) == [
        ("running", datetime(2030, 1, 1, 12, tzinfo=UTC))
    ]


async def test_retries_racing_a_worker_that_fails_the_task_each_get_a_true_answer(
    client: httpx.AsyncClient,
    settings: Settings,
    store: Store,
    sql: Sql,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight tasks that fail at once, each retried again and again while a worker claims
    and fails them: every answer is 200, or 409 naming a state a retry does not apply to.
    (Before: 500s, where a retry that waited out a claim and then the finish wrote
    `scheduled` over the claimed version of the row; 382 in 6 s in a user's run.)"""

    def refuses(ctx: Context) -> None:
        raise Fail("no")

    monkeypatch.setitem(KINDS, "refuses", Kind("refuses", refuses, lambda s: 1.0))
    ids = [await create(client, "refuses", at=0) for _ in range(8)]
    settings = dataclasses.replace(settings, poll_interval_s=0.05)
    stop = asyncio.Event()
    run = asyncio.create_task(Runner(store, settings, out=io.StringIO()).run(
        keep_polling=True, stop=stop))  # fmt: skip
    answers: Counter[tuple[int, str]] = Counter()

    async def retrying(task_id: int) -> None:
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            response = await client.post(f"/tasks/{task_id}/retry")
            detail = "" if response.status_code == 200 else response.json()["detail"]
            answers[response.status_code, detail.replace(str(task_id), "N")] += 1

    try:
        await asyncio.gather(*(retrying(task_id) for task_id in ids))
    finally:
        stop.set()
        await run
    assert {status for status, _ in answers} <= {200, 409}, answers
    assert {detail.split(":")[0] for status, detail in answers if status == 409} <= {
        "task N is in state scheduled",
        "task N is in state running",
    }, answers
    assert answers[200, ""] > 8, answers


@pytest.fixture
async def stores(settings: Settings) -> AsyncIterator[list[Store]]:
    databases = [Database(settings) for _ in range(4)]
    yield [Store(database) for database in databases]
    for database in databases:
        await database.dispose()


async def test_reschedules_racing_claims_never_move_a_task_under_a_worker(
    stores: list[Store], sql: Sql
) -> None:
    """Each task is either moved (here: far ahead, out of reach) before any worker takes it,
    or reported running and left alone."""
    for worker in ("w0", "w1", "w2"):
        await stores[0].register_worker(worker=worker, lease_s=60)
    ids = [
        i
        for (i,) in sql(
            "INSERT INTO tasks (kind, execute_at, max_attempts)"
            " SELECT 'baz', now(), 3 FROM generate_series(1, 1500) RETURNING id"
        )
    ]
    claimed: list[int] = []
    moved: list[int] = []
    refused: list[int] = []
    far = datetime(2100, 1, 1, tzinfo=UTC)

    async def claimer(store: Store, worker: str) -> None:
        while True:
            batch, _ = await store.claim_due(worker=worker, kinds=list(KINDS), limit=20, lease_s=60)
            if not batch:
                return
            claimed.extend(c.id for c in batch)
            await asyncio.sleep(0)

    async def mover(store: Store, mine: list[int]) -> None:
        for task_id in mine:
            found, task, _ = await store.reschedule_task(task_id, far)
            if task is not None:
                moved.append(task_id)
            elif found is TaskState.RUNNING:
                refused.append(task_id)

    await asyncio.gather(
        claimer(stores[0], "w0"),
        claimer(stores[1], "w1"),
        claimer(stores[2], "w2"),
        mover(stores[3], ids[::2]),
    )
    assert not set(moved) & set(claimed), "a claimed task was moved"
    assert set(refused) <= set(claimed)
    assert set(moved) | set(claimed) == set(ids)
    assert sql("SELECT count(*) FROM tasks WHERE state = 'scheduled' AND execute_at = %s", far) == [
        (len(moved),)
    ]
