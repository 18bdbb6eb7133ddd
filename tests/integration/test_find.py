"""Finding tasks: GET /tasks's filters, its orders and their cursors, and the same filters on
the bulk cancel and retry (issue 24, item 1)."""

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from functions import queries

Sql = Callable[..., list[tuple[Any, ...]]]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def create(client: httpx.AsyncClient, *items: dict[str, Any]) -> list[int]:
    response = await client.post("/tasks/batch", json={"tasks": list(items)})
    assert response.status_code == 201, response.text
    return list(response.json()["ids"])


def finish(sql: Sql, task_id: int, state: str, when: str, error: str | None = None) -> None:
    """Record a task's end as a worker (or a cancel) would."""
    sql(
        "UPDATE tasks SET state = %s, finished_at = %s, error = %s, attempts = 1,"
        " started_at = %s WHERE id = %s",
        state,
        at(when),
        error,
        at(when),
        task_id,
    )


async def listed(client: httpx.AsyncClient, params: Any) -> list[int]:
    """The ids of every page of the listing `params` asks for, cursor after cursor."""
    seen: list[int] = []
    params = list(params.items()) if isinstance(params, dict) else list(params)
    cursor = None
    for _ in range(1000):
        response = await client.get(
            "/tasks", params=[*params, *([("cursor", cursor)] if cursor else [])]
        )
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError("the cursors never ended")


@pytest.fixture
async def five(client: httpx.AsyncClient, sql: Sql) -> list[int]:
    """Five tasks, one of each kind of life, with distinct times."""
    return await make_five(client, sql)


async def make_five(client: httpx.AsyncClient, sql: Sql) -> list[int]:
    """Five tasks, one of each kind of life, with distinct times (see FILTERED)."""
    ids = await create(
        client,
        {"type": "foo", "execute_at": "2030-01-01T00:00:00Z", "payload": {"to": "a@x", "n": 1}},
        {"type": "bar", "execute_at": "2030-06-01T00:00:00Z",
         "payload": {"to": "b@x", "tags": ["x", "y"]}},
        {"type": "baz", "execute_at": "2029-01-01T00:00:00Z"},
        {"type": "foo", "execute_at": "2031-01-01T00:00:00Z", "payload": {"to": "a@x", "n": 2}},
        {"type": "baz", "execute_at": "2029-06-01T00:00:00Z", "payload": None},
    )  # fmt: skip
    t1, t2, t3, t4, t5 = ids
    finish(sql, t1, "succeeded", "2031-01-01T00:00:00")
    finish(sql, t2, "failed", "2031-06-01T00:00:00", "TimeoutError: GET http://h/ 50% _done")
    # Waiting for its retry after a failed attempt.
    sql("UPDATE tasks SET error = 'ConnectionRefused at Ünïcode', attempts = 1 WHERE id = %s", t3)
    finish(sql, t4, "cancelled", "2032-01-01T00:00:00")
    sql("UPDATE tasks SET schedule = 'nightly', scheduled_for = execute_at WHERE id = %s", t5)
    for n, task_id in enumerate(ids):
        sql("UPDATE tasks SET created_at = %s WHERE id = %s", at(f"202{n}-01-01T00:00:00"), task_id)
    return ids


# Each filter, and which of the five tasks (1 to 5) it selects, newest first.
FILTERED = [
    # Newest first, whatever the filter.
    ([], [5, 4, 3, 2, 1]),
    ([("type", "foo")], [4, 1]),
    ([("type", "FOO"), ("type", "bar")], [4, 2, 1]),
    ([("state", "failed"), ("state", "cancelled")], [4, 2]),
    ([("state", "scheduled")], [5, 3]),
    ([("state", "succeeded"), ("type", "foo")], [1]),
    # Each bound is exclusive; Unix seconds or RFC 3339 with any offset.
    ([("created_after", "2021-01-01T00:00:00Z")], [5, 4, 3]),
    ([("created_before", "1609459200")], [1]),  # 2021-01-01
    (
        [
            ("created_after", "2020-06-01T02:00:00+02:00"),
            ("created_before", "2023-01-01T00:00:00Z"),
        ],
        [3, 2],
    ),
    ([("execute_after", "2030-01-01T00:00:00Z")], [4, 2]),
    ([("execute_before", "1893456000.5")], [5, 3, 1]),  # 2030-01-01 and a half second
    ([("finished_after", "2031-01-01T00:00:00Z")], [4, 2]),
    ([("finished_before", "2031-06-01T00:00:00.000001Z")], [2, 1]),
    # A substring of the last error, in any case, taken as it is (no wildcards).
    ([("error", "timeout")], [2]),
    ([("error", "üNÏCODE")], [3]),
    ([("error", "50% _d")], [2]),
    ([("error", "%")], [2]),
    ([("error", "h_")], []),
    ([("error", "GET http://h/ 50% _done")], [2]),
    ([("schedule", "nightly")], [5]),
    ([("schedule", "weekly")], []),
    # JSON containment; null: no payload.
    ([("payload", '{"to":"a@x"}')], [4, 1]),
    ([("payload", '{"to": "a@x", "n": 2}')], [4]),
    ([("payload", '{"tags":["y"]}')], [2]),
    ([("payload", '{"tags":"y"}')], []),
    ([("payload", "null")], [5, 3]),
    ([("payload", "{}")], [4, 2, 1]),
    ([("payload", '{"to":"a@x"}'), ("state", "cancelled"), ("execute_after", "0")], [4]),
]


@pytest.mark.parametrize(("query", "expected"), FILTERED)
async def test_each_filter_selects_its_tasks_and_no_other(
    client: httpx.AsyncClient, five: list[int], query: list[tuple[str, str]], expected: list[int]
) -> None:
    assert await listed(client, [*query, ("limit", "2")]) == [five[n - 1] for n in expected]


async def test_every_order_pages_each_task_once_in_its_order_while_tasks_arrive(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    """Ties on the key (one execute_at for many; a batch finished at one instant) are
    ordered by id; tasks created between pages take their place without moving the others
    from one page to the next."""
    times = ["2030-01-02T00:00:00Z", "2030-01-02T00:00:00Z", "2030-01-01T00:00:00Z",
             "2030-01-03T00:00:00Z", "2030-01-02T00:00:00Z", "2030-01-01T00:00:00Z",
             "2030-01-03T00:00:00Z"]  # fmt: skip
    ids = await create(client, *({"type": "baz", "execute_at": t} for t in times))
    for task_id, when in zip(
        ids[:4], ["2031-01-01", "2031-01-01", "2030-12-31", "2031-01-01"], strict=True
    ):
        finish(sql, task_id, "succeeded", f"{when}T00:00:00")
    rows = sql("SELECT id, execute_at, finished_at FROM tasks")
    for sort in ("id", "-id", "execute_at", "-execute_at", "finished_at", "-finished_at"):
        column = {"id": 0, "execute_at": 1, "finished_at": 2}[sort.lstrip("-")]
        keyed = [(r[column], r[0]) for r in rows if r[column] is not None]
        expected = [task_id for _, task_id in sorted(keyed, reverse=sort.startswith("-"))]
        seen: list[int] = []
        cursor = None
        while True:
            params = {"sort": sort, "limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/tasks", params=params)).json()
            assert len(page["items"]) <= 2
            seen += [t["id"] for t in page["items"]]
            # Arrivals: one due in the middle of the order, one finished now.
            new = await create(client, {"type": "baz", "execute_at": "2030-01-02T00:00:00Z"})
            finish(sql, new[0], "succeeded", "2031-01-01T00:00:00")
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)), sort
        assert [task_id for task_id in seen if task_id in ids] == expected, sort
        sql("DELETE FROM tasks WHERE id <> ALL(%s)", ids)


async def test_a_cursor_goes_on_in_its_own_order_and_one_from_before_still_works(
    client: httpx.AsyncClient,
) -> None:
    ids = await create(
        client, *({"type": "baz", "execute_at": f"203{n}-01-01T00:00:00Z"} for n in (3, 1, 2))
    )
    first = (await client.get("/tasks", params={"sort": "execute_at", "limit": 1})).json()
    assert [t["id"] for t in first["items"]] == [ids[1]]
    # Without `sort`, the cursor's order goes on; with another, a 422 that says which.
    rest = (await client.get("/tasks", params={"cursor": first["next_cursor"]})).json()
    assert [t["id"] for t in rest["items"]] == [ids[2], ids[0]]
    again = await client.get(
        "/tasks", params={"cursor": first["next_cursor"], "sort": "execute_at"}
    )
    assert [t["id"] for t in again.json()["items"]] == [ids[2], ids[0]]
    refused = await client.get("/tasks", params={"cursor": first["next_cursor"], "sort": "-id"})
    assert refused.status_code == 422
    [issue] = refused.json()["detail"]
    assert issue["loc"] == ["query", "sort"]
    assert "sort=execute_at" in issue["msg"] and "not sort=-id" in issue["msg"]
    # A cursor of the version that listed by ascending id alone goes on by ascending id.
    before = base64.urlsafe_b64encode(f"after:{ids[0]}".encode()).decode().rstrip("=")
    page = (await client.get("/tasks", params={"cursor": before})).json()
    assert [t["id"] for t in page["items"]] == ids[1:]
    assert (await client.get("/tasks", params={"cursor": before, "sort": "id"})).status_code == 200
    refused = await client.get("/tasks", params={"cursor": before, "sort": "-id"})
    assert refused.status_code == 422 and "sort=id" in refused.text


async def test_a_filter_its_order_does_not_serve_reads_a_bounded_run_a_page(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rare match far down the order: short (even empty) pages whose cursor goes on from
    the last task read, never a scan of everything for one page."""
    monkeypatch.setattr(queries, "SCAN_ROWS", 3)
    [rare] = await create(client, {"type": "baz", "execute_at": 0, "payload": {"k": 1}})
    await create(client, *({"type": "baz", "execute_at": 0, "payload": {"k": 2}} for _ in range(9)))
    pages = []
    cursor = None
    while True:
        params: dict[str, Any] = {"payload": '{"k": 1}', "limit": 5}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/tasks", params=params)).json()
        pages.append([t["id"] for t in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    # Ten tasks newest first, three read a page: the match is the tenth.
    assert pages == [[], [], [], [rare]]
    # A filter the order's index serves reads on until the page is full.
    assert (
        len((await client.get("/tasks", params={"type": "baz", "limit": 5})).json()["items"]) == 5
    )


async def test_the_bulk_cancel_and_retry_take_every_filter(
    client: httpx.AsyncClient, five: list[int], sql: Sql
) -> None:
    t1, t2, t3, t4, t5 = five
    extra = await create(client, {"type": "bar", "execute_at": 0, "payload": {"to": "b@x"}})
    retried = await client.post("/tasks/retry", params={"error": "TIMEOUT"})
    assert retried.json() == {"count": 1}
    cancelled = await client.post(
        "/tasks/cancel",
        params=[("payload", '{"to": "b@x"}'), ("created_after", "2022-01-01T00:00:00Z")],
    )
    # t2 (retried: scheduled again) was created in 2021; the new one now.
    assert cancelled.json() == {"count": 1}
    states: dict[int, str] = dict(sql("SELECT id, state FROM tasks"))
    assert states == {t1: "succeeded", t2: "scheduled", t3: "scheduled", t4: "cancelled",
                      t5: "scheduled", extra[0]: "cancelled"}  # fmt: skip
    assert (await client.post("/tasks/cancel", params={"schedule": "nightly"})).json() == {
        "count": 1
    }
    assert sql("SELECT state FROM tasks WHERE id = %s", t5) == [("cancelled",)]
    assert (await client.post("/tasks/retry", params={"schedule": "nightly"})).json() == {
        "count": 1
    }


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("sort", "created_at", "is not one of id, -id, execute_at"),
        ("sort", "--id", "is not one of"),
        (
            "created_after",
            "2030-01-01T00:00:00",
            "created_after '2030-01-01T00:00:00' has no UTC offset",
        ),
        ("execute_before", "yesterday", "execute_before 'yesterday' is not an RFC 3339"),
        ("finished_after", "253402300800", "finished_after 253402300800 is not a Unix time"),
        ("finished_before", "1e999", "finished_before inf is not a Unix time"),
        ("error", "  ", "is not 1 to 200 characters"),
        ("error", "e" * 201, "is not 1 to 200 characters"),
        ("error", "time\x00out", "holds the character U+0000"),
        ("payload", "{to: 1}", "is not JSON"),
        ("payload", '"\\u0000"', "U+0000"),
        ("payload", "[" * 101 + "]" * 101, "nests deeper than 100"),
        ("payload", json.dumps("x" * 4095), "over the limit of 4,096"),
        ("schedule", "Nightly!", "schedule"),
    ],
)
async def test_a_filter_or_order_that_cannot_be_read_is_a_422_that_says_why(
    client: httpx.AsyncClient, name: str, value: str, said: str
) -> None:
    for response in [
        await client.get("/tasks", params={name: value}),
        *[
            await client.post(path, params={name: value})
            for path in ["/tasks/cancel", "/tasks/retry", "/tasks/delete"]
            if name != "sort"
        ],
    ]:
        assert response.status_code == 422, response.text
        [issue] = response.json()["detail"]
        assert issue["loc"] == ["query", name]
        assert said in issue["msg"]


async def test_a_list_refuses_a_parameter_it_does_not_read(client: httpx.AsyncClient) -> None:
    """`types=foo` for `type=foo` listed every task, as if unfiltered; `dry_run` (a bulk
    route's) was taken and did nothing."""
    [foo, _] = await create(
        client, {"type": "foo", "execute_at": 0}, {"type": "baz", "execute_at": 0}
    )
    asked: list[dict[str, str | int]] = [
        {"types": "foo"}, {"type": "foo", "lmit": 1}, {"dry_run": "true"}, {"": "1"}
    ]  # fmt: skip
    for query in asked:
        response = await client.get("/tasks", params=query)
        assert response.status_code == 422, (query, response.text)
        [issue] = response.json()["detail"]
        bad = next(name for name in query if name != "type")
        assert issue["loc"] == ["query", bad]
        assert "is not a parameter of this route; it takes created_after," in issue["msg"]
    listed = await client.get("/tasks", params={"type": "foo", "limit": 5, "sort": "id"})
    assert [task["id"] for task in listed.json()["items"]] == [foo]


async def test_the_ends_of_each_range_are_taken(client: httpx.AsyncClient) -> None:
    for name, value in [
        ("error", "é" * 200),
        ("payload", json.dumps("x" * 4094)),  # 4,096 bytes with its quotes
        ("payload", "[" * 100 + "]" * 100),
        ("created_after", "0"),
        ("created_before", "253402300799.9999"),
        ("execute_after", "0001-01-01T00:00:00Z"),
        ("execute_before", "9999-12-31T23:59:59.999999Z"),
        ("sort", "-finished_at"),
    ]:
        response = await client.get("/tasks", params={name: value})
        assert response.status_code == 200, (name, response.text)


async def test_a_bound_finer_than_a_microsecond_keeps_the_tasks_on_its_side(
    client: httpx.AsyncClient,
) -> None:
    ids = await create(
        client,
        {"type": "foo", "execute_at": "2030-01-01T12:00:00.123456Z"},
        {"type": "foo", "execute_at": "2030-01-01T12:00:00.123457Z"},
        {"type": "foo", "execute_at": "9999-12-31T23:59:59.999999Z"},
    )
    for params, expected in [
        ({"execute_before": "2030-01-01T12:00:00.1234561Z"}, ids[:1]),
        ({"execute_after": "1893499200.1234569"}, ids[1:]),
        ({"execute_before": "9999-12-31T23:59:59.9999999Z"}, ids),
    ]:
        page = (await client.get("/tasks", params={**params, "sort": "id"})).json()
        assert [t["id"] for t in page["items"]] == expected, params
