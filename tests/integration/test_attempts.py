"""Attempt history (issue 24.4) and GET /errors (24.2): every attempt that ends keeps a row
(but a first that succeeds: the task's own fields are that attempt), written by whoever ends
it (its worker, a cancel, the rescue), once; the history answers them oldest first; the
errors are grouped by kind and normalised error over a window read through its index."""

import asyncio
import io
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from functions import kinds, tasks
from functions.kinds import Context, Fail, Kind
from functions.model import TaskState
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Result, Store

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def extra_kinds(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Kind], None]]:
    """Add kinds for one test (the real ones stay); the API of the test takes them too."""

    def add(kind: Kind) -> None:
        monkeypatch.setitem(kinds.KINDS, kind.name, kind)

    yield add


async def create(client: httpx.AsyncClient, *items: dict[str, Any]) -> list[int]:
    response = await client.post("/tasks/batch", json={"tasks": list(items)})
    assert response.status_code == 201, response.text
    ids: list[int] = response.json()["ids"]
    return ids


async def drain(store: Store, settings: Settings, sql: Sql) -> None:
    """Run until no task is scheduled or running (retries come due a moment later)."""
    runner = Runner(store, settings, out=io.StringIO())
    for _ in range(200):
        await runner.run()
        if sql("SELECT count(*) FROM tasks WHERE state IN ('scheduled', 'running')") == [(0,)]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("tasks left unfinished")


async def attempts(client: httpx.AsyncClient, task_id: int, **params: Any) -> dict[str, Any]:
    answer = await client.get(f"/tasks/{task_id}/attempts", params=params)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def when(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


async def test_a_task_retried_then_succeeded_shows_each_attempt_with_its_error_and_traceback(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
) -> None:
    def flaky(ctx: Context) -> str:
        if ctx.attempt < 3:
            raise ValueError(f"order {ctx.task_id * 1000 + ctx.attempt} not found")
        return "done"

    extra_kinds(Kind("flaky", flaky, lambda s: 5.0))
    [task_id] = await create(client, {"type": "flaky", "execute_at": 0, "max_attempts": 3})
    await drain(store, settings, sql)

    body = await attempts(client, task_id)
    items = body["items"]
    assert [(a["attempt"], a["outcome"]) for a in items] == [
        (1, "retried"), (2, "retried"), (3, "succeeded")
    ]  # fmt: skip
    assert body["next_cursor"] is None
    for n, item in enumerate(items[:2], start=1):
        assert item["error"] == f"ValueError: order {task_id * 1000 + n} not found"
        assert item["traceback"].startswith("Traceback (most recent call last):")
        assert item["traceback"].endswith(f"ValueError: order {task_id * 1000 + n} not found\n")
        assert "in flaky" in item["traceback"]
    assert (items[2]["error"], items[2]["traceback"]) == (None, None)
    for item in items:
        assert item["worker"] is not None
        assert item["started_at"].endswith("Z") and item["finished_at"].endswith("Z")
        assert when(item["started_at"]) <= when(item["finished_at"])  # type: ignore[operator]
    assert when(items[0]["finished_at"]) <= when(items[1]["started_at"])  # type: ignore[operator]
    # The rows as the table keeps them: the kind, the normalised error.
    rows = sql("SELECT attempt, kind, error_group FROM attempts ORDER BY attempt")
    assert rows == [
        (1, "flaky", "ValueError: order <n> not found"),
        (2, "flaky", "ValueError: order <n> not found"),
        (3, "flaky", None),
    ]

    # Paged: one at a time, oldest first, the cursor going on from the last.
    first = await attempts(client, task_id, limit=1)
    assert [a["attempt"] for a in first["items"]] == [1]
    rest = await attempts(client, task_id, limit=2, cursor=first["next_cursor"])
    assert [a["attempt"] for a in rest["items"]] == [2, 3]
    assert rest["next_cursor"] is None


async def test_a_first_attempt_that_succeeds_writes_no_row_and_shows_the_tasks_fields(
    store: Store, settings: Settings, sql: Sql, client: httpx.AsyncClient
) -> None:
    ids = await create(client, *({"type": "baz", "execute_at": 0} for _ in range(20)))
    await drain(store, settings, sql)

    assert sql("SELECT count(*) FROM attempts") == [(0,)]
    # Nor in a batch beside others that do keep a row.
    more = await create(client, *({"type": "baz", "execute_at": 0} for _ in range(2)))
    await store.register_worker(worker="A", lease_s=60)
    claimed, _ = await store.claim_due(worker="A", kinds=["baz"], limit=10, lease_s=60)
    assert sorted(c.id for c in claimed) == more
    results = [
        Result(more[0], 1, TaskState.SUCCEEDED, "Baz 1"),
        Result(more[1], 1, TaskState.SCHEDULED, None, "E", 60.0, error_group="E"),
    ]
    assert await store.finish_many(worker="A", results=results) == set(more)
    assert sql("SELECT task_id, attempt, outcome FROM attempts") == [(more[1], 1, "retried")]
    task = (await client.get(f"/tasks/{ids[0]}")).json()
    [item] = (await attempts(client, ids[0]))["items"]
    assert item == {
        "attempt": 1,
        "started_at": task["started_at"],
        "finished_at": task["finished_at"],
        "worker": None,
        "outcome": "succeeded",
        "error": None,
        "traceback": None,
    }


async def test_a_timeout_and_a_fail_end_their_attempts_so(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
) -> None:
    async def naps(ctx: Context) -> str:
        await asyncio.sleep(3600)
        return "woke"

    def refuses(ctx: Context) -> str:
        raise Fail("bad input")

    extra_kinds(Kind("naps", naps, lambda s: 30.0, limit_s=lambda s: 30.0))
    extra_kinds(Kind("refuses", refuses, lambda s: 5.0))
    slow, bad = await create(
        client,
        {"type": "naps", "execute_at": 0, "timeout_s": 0.2, "max_attempts": 2},
        {"type": "refuses", "execute_at": 0, "max_attempts": 3},
    )
    await drain(store, settings, sql)

    timed = (await attempts(client, slow))["items"]
    assert [(a["attempt"], a["outcome"]) for a in timed] == [(1, "timed_out"), (2, "timed_out")]
    assert timed[1]["error"] == "TimeoutError: ran longer than its timeout_s of 0.2 s"
    assert timed[1]["traceback"] is None  # stopped, never raised: nothing to trace
    [failed] = (await attempts(client, bad))["items"]
    assert (failed["outcome"], failed["error"]) == ("failed", "Fail: bad input")
    assert "raise Fail" in failed["traceback"]


async def test_a_running_attempt_shows_its_worker_then_a_cancel_ends_it_and_fences_the_worker(
    store: Store, settings: Settings, sql: Sql, client: httpx.AsyncClient
) -> None:
    [task_id] = await create(client, {"type": "baz", "execute_at": 0})
    assert (await attempts(client, task_id))["items"] == []  # not started
    await store.register_worker(worker="A", lease_s=60)
    [claimed], _ = await store.claim_due(worker="A", kinds=["baz"], limit=10, lease_s=60)
    [running] = (await attempts(client, task_id))["items"]
    assert (running["attempt"], running["worker"], running["outcome"]) == (1, "A", None)
    assert running["finished_at"] is None
    [(claimed_at,)] = sql("SELECT claimed_at FROM tasks")
    assert when(running["started_at"]) == claimed_at

    assert (await client.post(f"/tasks/{task_id}/cancel")).status_code == 200
    # The worker's result comes after: fenced out, it writes nothing over the cancel's row.
    late = Result(task_id, claimed.attempt, TaskState.FAILED, error="late")
    assert await store.finish_many(worker="A", results=[late]) == set()

    [cancelled] = (await attempts(client, task_id))["items"]
    assert (cancelled["outcome"], cancelled["worker"], cancelled["error"]) == (
        "cancelled", "A", None
    )  # fmt: skip
    assert when(cancelled["started_at"]) == claimed_at
    assert cancelled["finished_at"] is not None


async def test_a_task_rescued_from_a_dead_worker_ends_its_attempt_lost(
    store: Store, settings: Settings, sql: Sql, client: httpx.AsyncClient
) -> None:
    [task_id] = await create(client, {"type": "baz", "execute_at": 0, "max_attempts": 1})
    await store.register_worker(worker="dead:1:abc", lease_s=60)
    [claimed], _ = await store.claim_due(worker="dead:1:abc", kinds=["baz"], limit=1, lease_s=60)
    sql("UPDATE workers SET lease_expires_at = now() - interval '1 second'")
    assert await store.rescue_expired() == [(task_id, TaskState.FAILED, "baz")]
    # The dead worker's write, should it come after all: fenced out.
    late = Result(task_id, claimed.attempt, TaskState.SUCCEEDED, output="Baz 1")
    assert await store.finish_many(worker="dead:1:abc", results=[late]) == set()

    [lost] = (await attempts(client, task_id))["items"]
    assert (lost["outcome"], lost["worker"]) == ("lost", "dead:1:abc")
    assert lost["error"] == "lease expired: worker dead:1:abc stopped during attempt 1 of 1"
    errors = (await client.get("/errors")).json()["items"]
    assert [(g["type"], g["error"], g["count"], g["search"]) for g in errors] == [
        (
            "baz",
            "lease expired: worker <worker> stopped during attempt <n> of <n>",
            1,
            "stopped during attempt",
        )
    ]
    # Its search finds the task (whose last error it is).
    found = await client.get("/tasks", params={"type": "baz", "error": errors[0]["search"]})
    assert [t["id"] for t in found.json()["items"]] == [task_id]


async def test_a_worker_killed_mid_task_leaves_it_to_the_rescue_which_ends_it_lost(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that stops holding a task (its process gone: here its run is abandoned, the
    lease lapses) leaves the attempt to the rescue, then the next attempt runs elsewhere."""
    started = asyncio.Event()

    async def hangs(ctx: Context) -> str:
        if ctx.attempt == 1:
            started.set()
            await asyncio.sleep(3600)
        return "second time"

    extra_kinds(Kind("hangs", hangs, lambda s: 30.0, limit_s=lambda s: 3600.0))
    [task_id] = await create(client, {"type": "hangs", "execute_at": 0, "max_attempts": 2})
    victim = Runner(store, settings, worker_id="victim:1:abc", out=io.StringIO())
    run = asyncio.create_task(victim.run(keep_polling=True))
    await asyncio.wait_for(started.wait(), 60)
    # Killed: nothing of its shutdown runs (no hand-back, no sign-off).
    monkeypatch.setattr(victim, "_shut_down", _killed)
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    sql("UPDATE workers SET lease_expires_at = now() - interval '1 second'")
    await drain(store, settings, sql)

    items = (await attempts(client, task_id))["items"]
    assert [(a["attempt"], a["outcome"], a["worker"]) for a in items] == [
        (1, "lost", "victim:1:abc"),
        (2, "succeeded", items[1]["worker"]),
    ]
    assert items[1]["worker"] not in (None, "victim:1:abc")


async def _killed(deadline: float | None, loops: list[asyncio.Task[None]]) -> None:
    """The end of a killed process: its loops stop, nothing is handed back or signed off."""
    for loop in loops:
        loop.cancel()
    await asyncio.gather(*loops, return_exceptions=True)


async def test_the_traceback_is_bounded_to_its_last_8_kib(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
) -> None:
    def long(ctx: Context) -> str:
        raise RuntimeError("é" * 10_000 + " the end")

    extra_kinds(Kind("long", long, lambda s: 5.0))
    [task_id] = await create(client, {"type": "long", "execute_at": 0, "max_attempts": 1})
    await drain(store, settings, sql)

    [item] = (await attempts(client, task_id))["items"]
    trace = item["traceback"]
    assert len(trace.encode()) <= 8192
    assert len(trace.encode()) > 8000
    assert trace.startswith("... (")
    assert trace.endswith("é the end\n")
    [(stored,)] = sql("SELECT octet_length(traceback) FROM attempts")
    assert stored == len(trace.encode())


async def test_deleting_or_pruning_a_task_deletes_its_attempts(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
) -> None:
    def broken(ctx: Context) -> str:
        raise RuntimeError("broken")

    extra_kinds(Kind("broken", broken, lambda s: 5.0))
    ids = await create(client, *({"type": "broken", "execute_at": 0, "max_attempts": 2},) * 3)
    await drain(store, settings, sql)
    assert sql("SELECT count(*) FROM attempts") == [(6,)]

    assert (await client.delete(f"/tasks/{ids[0]}")).status_code == 204
    assert sql("SELECT DISTINCT task_id FROM attempts ORDER BY 1") == [(ids[1],), (ids[2],)]
    # Past the retention (a day): its time moved back, as two days passing would.
    sql("UPDATE tasks SET finished_at = finished_at - interval '2 days' WHERE id = %s", ids[1])
    assert await tasks.prune(store, older_than_s=86_400) == 1
    assert sql("SELECT DISTINCT task_id FROM attempts") == [(ids[2],)]
    assert await store.delete_all() == 1  # DELETE /, the original challenge's
    assert sql("SELECT count(*) FROM attempts") == [(0,)]


async def test_tasks_from_before_attempts_were_kept_show_their_one_known_attempt(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    """Tasks as a drain before migration 0016 left them, with no rows of attempts."""
    [(failed,)] = sql(
        "INSERT INTO tasks (kind, execute_at, max_attempts, state, attempts, started_at,"
        " claimed_at, finished_at, error) VALUES ('bar', now(), 3, 'failed', 3,"
        " now() - interval '1 minute', now() - interval '2 seconds', now(), 'TimeoutError')"
        " RETURNING id"
    )
    [(waiting,)] = sql(
        "INSERT INTO tasks (kind, execute_at, max_attempts, attempts, started_at, error)"
        " VALUES ('bar', now(), 3, 1, now() - interval '1 minute', 'TimeoutError') RETURNING id"
    )
    [(fresh,)] = sql("INSERT INTO tasks (kind, execute_at) VALUES ('bar', now()) RETURNING id")
    [(claimed, finished)] = sql("SELECT claimed_at, finished_at FROM tasks WHERE id = %s", failed)

    [item] = (await attempts(client, failed))["items"]
    assert (item["attempt"], item["outcome"], item["error"]) == (3, "failed", "TimeoutError")
    assert (when(item["started_at"]), when(item["finished_at"])) == (claimed, finished)
    [item] = (await attempts(client, waiting))["items"]
    assert (item["attempt"], item["outcome"], item["finished_at"]) == (1, "retried", None)
    assert when(item["started_at"]) is not None  # (no claimed_at: the first's start)
    assert (await attempts(client, fresh))["items"] == []
    missing = await client.get("/tasks/999999/attempts")
    assert missing.status_code == 404
    bad_cursor = await client.get(f"/tasks/{failed}/attempts", params={"cursor": "x"})
    assert bad_cursor.status_code == 422
    too_many = await client.get(f"/tasks/{failed}/attempts", params={"limit": 51})
    assert too_many.status_code == 422


async def test_errors_are_grouped_by_type_and_normalised_error_within_the_window(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
) -> None:
    def lookup(ctx: Context) -> str:
        raise KeyError(f"order {ctx.task_id} at 0x{ctx.task_id:x}f00d")

    def other(ctx: Context) -> str:
        raise RuntimeError("disk full")

    extra_kinds(Kind("lookup", lookup, lambda s: 5.0))
    extra_kinds(Kind("other", other, lambda s: 5.0))
    made = await create(
        client,
        *({"type": "lookup", "execute_at": 0, "max_attempts": 2},) * 3,
        {"type": "other", "execute_at": 0, "max_attempts": 1},
        {"type": "baz", "execute_at": 0},
    )
    await drain(store, settings, sql)

    answer = await client.get("/errors")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    since = when(body["since"])
    assert since is not None and body["since"].endswith("Z")
    assert abs(datetime.now(UTC) - timedelta(hours=24) - since) < timedelta(minutes=1)
    groups = body["items"]
    assert [(g["type"], g["error"], g["count"]) for g in groups] == [
        ("lookup", "KeyError: 'order <n> at <hex>'", 6),  # 3 tasks, 2 attempts each
        ("other", "RuntimeError: disk full", 1),
    ]
    lookup_group = groups[0]
    assert lookup_group["sample_task"] == made[2]
    assert lookup_group["search"] == "KeyError: 'order"
    assert when(lookup_group["first_seen"]) <= when(lookup_group["last_seen"])  # type: ignore[operator]
    assert groups[1]["search"] == "RuntimeError: disk full"
    # The group's search finds its tasks (whose last error it is).
    found = await client.get("/tasks", params={"type": "lookup", "error": lookup_group["search"]})
    assert sorted(t["id"] for t in found.json()["items"]) == made[:3]

    # One type; a window that ends before them, or starts after.
    only = (await client.get("/errors", params={"type": "other"})).json()["items"]
    assert [g["type"] for g in only] == ["other"]
    [(last,)] = sql("SELECT max(finished_at) FROM attempts")
    after = (last + timedelta(seconds=1)).timestamp()
    assert (await client.get("/errors", params={"since": after})).json()["items"] == []
    assert (await client.get("/errors", params={"until": "2000-01-01T00:00:00Z"})).json()[
        "items"
    ] == []
    # Two days ago: out of the default window, in one that reaches back that far.
    sql("UPDATE attempts SET finished_at = finished_at - interval '2 days' WHERE kind = 'other'")
    assert [g["type"] for g in (await client.get("/errors")).json()["items"]] == ["lookup"]
    back = (await client.get("/errors", params={"since": "2000-01-01T00:00:00Z"})).json()
    assert [g["type"] for g in back["items"]] == ["lookup", "other"]
    assert back["since"] == "2000-01-01T00:00:00Z"
    bad = await client.get("/errors", params={"since": "yesterday"})
    assert bad.status_code == 422


async def test_a_running_second_attempt_shows_no_error_of_its_own(
    store: Store, sql: Sql, client: httpx.AsyncClient
) -> None:
    """The task's `error` is its first attempt's while the second runs: not the second's."""
    [task_id] = await create(client, {"type": "baz", "execute_at": 0, "max_attempts": 2})
    await store.register_worker(worker="A", lease_s=60)
    [claimed], _ = await store.claim_due(worker="A", kinds=["baz"], limit=1, lease_s=60)
    failed = Result(task_id, claimed.attempt, TaskState.SCHEDULED, error="E: first", retry_in_s=0)
    assert await store.finish_many(worker="A", results=[failed]) == {task_id}
    [again], _ = await store.claim_due(worker="A", kinds=["baz"], limit=1, lease_s=60)
    assert again.attempt == 2
    first, second = (await attempts(client, task_id))["items"]
    assert (first["outcome"], first["error"]) == ("retried", "E: first")
    assert (second["attempt"], second["outcome"], second["error"]) == (2, None, None)


async def test_a_long_errors_search_is_200_characters_that_find_its_tasks(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
) -> None:
    """An error longer than a search may be (emoji: two UTF-16 units, one character)."""

    def long(ctx: Context) -> str:
        raise Fail("x" + "\N{SLIGHTLY SMILING FACE}" * 2000)

    extra_kinds(Kind("long", long, lambda s: 5.0))
    made = await create(client, *({"type": "long", "execute_at": 0},) * 2)
    await drain(store, settings, sql)

    [group] = (await client.get("/errors")).json()["items"]
    assert group["count"] == 2
    assert group["search"] == ("Fail: x" + "\N{SLIGHTLY SMILING FACE}" * 2000)[:200]
    found = await client.get("/tasks", params={"type": "long", "error": group["search"]})
    assert found.status_code == 200, found.text
    assert sorted(t["id"] for t in found.json()["items"]) == made
