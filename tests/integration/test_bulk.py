"""POST /tasks/delete, and the `dry_run` of the three bulk routes that the dashboard's
confirmation counts with (issue 24, item 3)."""

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from functions.model import MAX_BULK, TaskFilter, TaskState
from functions.store import Store
from tests.integration.test_find import FILTERED, make_five

Sql = Callable[..., list[tuple[Any, ...]]]


def hold_running(sql: Sql, task_id: int) -> None:
    """Make `task_id` running, held by a live worker (as a claim would)."""
    sql(
        "INSERT INTO workers (id, lease_expires_at) VALUES ('w', now() + interval '10 min')"
        " ON CONFLICT DO NOTHING"
    )
    sql(
        "UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w', finished_at = NULL"
        " WHERE id = %s",
        task_id,
    )


async def test_the_delete_takes_every_filter_and_its_dry_run_counts_the_same_tasks(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    """For each filter of GET /tasks, on five tasks made anew: the dry run counts the tasks
    it selects and deletes none; the delete deletes those and no other."""
    for filters, expected in FILTERED:
        query: list[tuple[str, Any]] = list(filters)
        ids = await make_five(client, sql)
        chosen = {ids[n - 1] for n in expected}
        dry = await client.post("/tasks/delete", params=[*query, ("dry_run", "true")])
        assert dry.json() == {"count": len(chosen), "more": False}, query
        assert {i for (i,) in sql("SELECT id FROM tasks")} == set(ids), query
        done = await client.post("/tasks/delete", params=query)
        assert done.status_code == 200, done.text
        assert done.json() == {"count": len(chosen)}, query
        assert {i for (i,) in sql("SELECT id FROM tasks")} == set(ids) - chosen, query
        sql("DELETE FROM tasks")


async def test_a_running_task_is_never_deleted_and_the_limit_takes_the_lowest_ids(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    ids = await make_five(client, sql)
    hold_running(sql, ids[0])  # succeeded once; running again (a retry claimed)
    for params, count in [({}, 4), ({"state": "running"}, 0), ({"type": "foo"}, 1)]:
        dry = await client.post("/tasks/delete", params={**params, "dry_run": "true"})
        assert dry.json() == {"count": count, "more": False}, params
    assert (await client.post("/tasks/delete", params={"state": "running"})).json() == {"count": 0}
    # The limit: exactly it, lowest ids first; a dry run says more are left.
    dry = await client.post("/tasks/delete", params={"limit": 2, "dry_run": "true"})
    assert dry.json() == {"count": 2, "more": True}
    assert (await client.post("/tasks/delete", params={"limit": 2})).json() == {"count": 2}
    assert [i for (i,) in sql("SELECT id FROM tasks ORDER BY id")] == [ids[0], *ids[3:]]
    # As many as are left: no more.
    dry = await client.post("/tasks/delete", params={"limit": 2, "dry_run": "true"})
    assert dry.json() == {"count": 2, "more": False}
    response = await client.post("/tasks/delete", params={"limit": MAX_BULK})
    assert response.json() == {"count": 2}
    assert sql("SELECT id, state FROM tasks") == [(ids[0], "running")]


async def test_a_dry_run_of_the_cancel_and_the_retry_counts_their_tasks_and_changes_none(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    ids = await make_five(client, sql)  # scheduled 3, 5; failed 2; cancelled 4
    hold_running(sql, ids[0])
    before = sql("SELECT * FROM tasks ORDER BY id")
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("/tasks/cancel", {}, {"count": 3, "more": False}),
        ("/tasks/cancel", {"limit": 2}, {"count": 2, "more": True}),
        ("/tasks/cancel", {"limit": 3}, {"count": 3, "more": False}),
        ("/tasks/cancel", {"state": "running"}, {"count": 1, "more": False}),
        ("/tasks/cancel", {"state": "failed"}, {"count": 0, "more": False}),
        ("/tasks/retry", {}, {"count": 2, "more": False}),
        ("/tasks/retry", {"error": "TIMEOUT"}, {"count": 1, "more": False}),
        ("/tasks/retry", {"limit": 1}, {"count": 1, "more": True}),
        ("/tasks/delete", {"type": "baz", "limit": 1}, {"count": 1, "more": True}),
    ]
    for path, params, expected in cases:
        response = await client.post(path, params={**params, "dry_run": "true"})
        assert response.json() == expected, (path, params)
    assert sql("SELECT * FROM tasks ORDER BY id") == before
    # dry_run=false is the action itself.
    response = await client.post("/tasks/retry", params={"dry_run": "false"})
    assert response.json() == {"count": 2}


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"limit": 0}, "greater than or equal to 1"),
        ({"limit": MAX_BULK + 1}, "less than or equal to 10000"),
        ({"dry_run": "maybe"}, "valid boolean"),
        ({"state": "lost"}, "scheduled"),
        ({"type": "no such kind!"}, "type"),
        ([("payload", "{}"), ("payload", "null")], "payload is given more than once"),
        ([("limit", "1"), ("limit", "2")], "limit is given more than once"),
        ([("dry_run", "true"), ("dry_run", "false")], "dry_run is given more than once"),
    ],
)
async def test_a_delete_that_cannot_be_read_is_a_422_and_deletes_nothing(
    client: httpx.AsyncClient, sql: Sql, params: Any, said: str
) -> None:
    await make_five(client, sql)
    response = await client.post("/tasks/delete", params=params)
    assert response.status_code == 422, response.text
    [issue] = response.json()["detail"]
    name = next(iter(params)) if isinstance(params, dict) else params[0][0]
    assert issue["loc"][:2] == ["query", name]
    assert said in issue["msg"], issue
    assert sql("SELECT count(*) FROM tasks") == [(5,)]


async def test_a_delete_takes_the_attempts_of_its_tasks_and_no_others(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    ids = await make_five(client, sql)  # 1 foo succeeded, 2 bar failed, 3 baz retrying
    for task_id, kind in zip(ids[:3], ("foo", "bar", "baz"), strict=True):
        sql(
            "INSERT INTO attempts (task_id, attempt, kind, started_at, finished_at, worker,"
            " outcome, error) VALUES (%s, 1, %s, now(), now(), 'w', 'retried', 'x')",
            task_id,
            kind,
        )
    response = await client.post("/tasks/delete", params={"type": ["bar", "baz"]})
    assert response.json() == {"count": 3}  # 2, 3 and 5
    assert sql("SELECT task_id FROM attempts") == [(ids[0],)]


@pytest.mark.parametrize("action", ["cancel", "retry", "delete"])
async def test_a_bulk_route_refuses_a_parameter_it_does_not_read(
    client: httpx.AsyncClient, sql: Sql, action: str
) -> None:
    """`types=foo` for `type=foo` would act on every task as if unfiltered."""
    ids = await make_five(client, sql)
    queries: list[dict[str, str | int]] = [
        {"types": "foo"}, {"sort": "id"}, {"cursor": "x"}, {"type": "foo", "lmit": 1}
    ]  # fmt: skip
    for query in queries:
        response = await client.post(f"/tasks/{action}", params=query)
        assert response.status_code == 422, (query, response.text)
        [issue] = response.json()["detail"]
        bad = next(name for name in query if name not in ("type",))
        assert issue["loc"] == ["query", bad]
        assert "is not a parameter of this route" in issue["msg"]
    assert {i for (i,) in sql("SELECT id FROM tasks")} == set(ids)
    assert sql("SELECT count(*) FROM tasks WHERE state = 'cancelled'") == [(1,)]  # make_five's


async def test_bulk_cancels_made_at_once_leave_no_match_behind(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    """Eight cancels of 1,000 at once over 3,500 tasks: each waits for the rows another holds,
    finds them cancelled, and goes on to the next, so together they cancel all 3,500."""
    sql(
        "INSERT INTO tasks (kind, execute_at, payload)"
        " SELECT 'foo', '2031-01-01', '{\"grp\": \"g\"}' FROM generate_series(1, 3500)"
    )
    answers = await asyncio.gather(
        *[
            client.post("/tasks/cancel", params={"payload": '{"grp":"g"}', "limit": 1000})
            for _ in range(8)
        ]
    )
    counts = [a.json()["count"] for a in answers]
    assert sql("SELECT count(*) FROM tasks WHERE state = 'scheduled'") == [(0,)], counts
    assert sum(counts) == 3500, counts


async def test_one_bulk_retry_acts_on_each_task_once_though_it_failed_again_meanwhile(
    store: Store, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk call works a batch at a time; a task the first batch retried that a worker ran
    and failed again before the next batch matched again, and was retried twice by one call
    (with two attempt budgets) while a task it had counted was left out."""
    sql(
        "INSERT INTO tasks (kind, execute_at, state, attempts, max_attempts, finished_at, error)"
        " SELECT 'bar', now(), 'failed', 1, 1, now(), 'down' FROM generate_series(1, 4)"
    )
    monkeypatch.setattr(store, "WRITE_BATCH", 2)
    pinned = store._pinned

    async def then_they_fail_again(*steps: Any, **options: Any) -> Any:
        answer = await pinned(*steps, **options)
        sql(
            "UPDATE tasks SET state = 'failed', finished_at = now(), next_attempt_at = NULL"
            " WHERE state = 'scheduled'"
        )
        return answer

    monkeypatch.setattr(store, "_pinned", then_they_fail_again)
    count = await store.retry_matching(
        TaskFilter(states=(TaskState.FAILED,)), limit=4, max_attempts=3
    )
    assert count == 4
    assert sql("SELECT max_attempts, count(*) FROM tasks GROUP BY 1") == [(4, 4)]
