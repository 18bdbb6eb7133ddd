"""A task's payload: from the request to the kind (`ctx.payload`) intact, changed or
cleared by PATCH while scheduled, and listed in pages that stay under 5 MB.

The two paths' answers are compared in test_hotpath.py; here each path creates tasks that a
worker then runs.
"""

import dataclasses
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from functions import kinds
from functions import store as store_module
from functions.http.app import build_app
from functions.kinds import Context, Kind
from functions.model import MAX_PAGE_BYTES, enveloped_size
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Store
from tests.conftest import serve
from tests.integration.test_hotpath import LIMIT, PAYLOADS, nested, sized

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, Any]]:
    """The payload each task's kind received, by task id: `baz` replaced by a recorder."""
    got: dict[int, Any] = {}

    def record(ctx: Context) -> str:
        assert ctx.task_id not in got
        got[ctx.task_id] = ctx.payload
        return f"got {ctx.task_id}"

    monkeypatch.setitem(kinds.KINDS, "baz", Kind("baz", record, lambda s: 1.0))
    yield got


@pytest.fixture
async def fastapi_only(store: Store, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The FastAPI app alone, without the hot path (nor any middleware)."""
    app = build_app(settings, store=store, middleware=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield client


async def test_payloads_arrive_intact_at_the_kind_whichever_path_created_them(
    client: httpx.AsyncClient,
    fastapi_only: httpx.AsyncClient,
    store: Store,
    settings: Settings,
    received: dict[int, Any],
) -> None:
    sent: dict[int, Any] = {}
    for api in (client, fastapi_only):
        for payload in [*PAYLOADS, None]:
            body = {"type": "baz", "execute_at": 0, "payload": payload}
            created = await api.post("/tasks", json=body)
            assert created.status_code == 201, created.text
            sent[created.json()["id"]] = payload
        batch = await api.post("/tasks/batch", json={"tasks": [{"type": "baz", "execute_at": 0,
            "payload": p} for p in PAYLOADS]})  # fmt: skip
        assert batch.status_code == 201, batch.text
        sent.update(zip(batch.json()["ids"], PAYLOADS, strict=True))
        absent = await api.post("/tasks", json={"type": "baz", "execute_at": 0})
        sent[absent.json()["id"]] = None
    # 64 KiB exactly, by its bytes: multi-byte characters counted as UTF-8.
    assert (
        len(json.dumps(sized(LIMIT), ensure_ascii=False, separators=(",", ":")).encode()) == LIMIT
    )
    summary = await Runner(store, settings, out=io.StringIO()).run()
    assert summary.failed == 0
    assert received == sent  # each once, each intact


async def test_the_original_create_makes_a_task_without_a_payload(
    client: httpx.AsyncClient, store: Store, settings: Settings, received: dict[int, Any]
) -> None:
    created = await client.post("/baz/0")
    assert created.status_code == 200
    shown = await client.get(f"/id/{created.json()}")
    assert shown.json()["payload"] is None
    await Runner(store, settings, out=io.StringIO()).run()
    assert received == {created.json(): None}


async def test_patch_keeps_clears_or_sets_the_payload_of_a_scheduled_task_only(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    body = {"type": "baz", "execute_at": "2030-01-01T00:00:00Z", "payload": {"v": 1}}
    task_id = (await client.post("/tasks", json=body)).json()["id"]

    async def patch(change: Any) -> httpx.Response:
        return await client.patch(f"/tasks/{task_id}", json=change)

    # A new time alone: the payload stays.
    moved = await patch({"execute_at": "2031-01-01T00:00:00Z"})
    assert moved.status_code == 200, moved.text
    assert (moved.json()["payload"], moved.json()["execute_at"]) == (
        {"v": 1},
        "2031-01-01T00:00:00Z",
    )
    # A payload alone: the time (and when it is due) stays.
    [before] = sql(
        "SELECT execute_at, next_attempt_at, made_due_at FROM tasks WHERE id = %s", task_id
    )
    changed = await patch({"payload": ["é", {"deep": nested(50)}]})
    assert changed.status_code == 200
    assert changed.json()["payload"] == ["é", {"deep": nested(50)}]
    assert changed.json()["execute_at"] == "2031-01-01T00:00:00Z"
    assert sql(
        "SELECT execute_at, next_attempt_at, made_due_at FROM tasks WHERE id = %s", task_id
    ) == [before]
    # null clears it; both at once.
    assert (await patch({"payload": None})).json()["payload"] is None
    both = await patch({"execute_at": 0, "payload": 7})
    assert (both.json()["payload"], both.json()["execute_at"]) == (7, "1970-01-01T00:00:00Z")
    # Refused, nothing changed: nothing asked for, a null time, a payload over the limit.
    for change, says in (
        ({}, "send `execute_at`"),
        ({"execute_at": None}, "execute_at"),
        ({"payload": sized(LIMIT + 1)}, f"{LIMIT + 1:,} bytes"),
        ({"payload": "\u0000"}, "U+0000"),
        ({"other": 1}, "Extra inputs"),
    ):
        refused = await patch(change)
        assert refused.status_code == 422, (change, refused.text)
        assert says in json.dumps(refused.json()["detail"]), refused.text
    assert (await client.get(f"/tasks/{task_id}")).json()["payload"] == 7
    # No such task: 404, whatever the payload.
    for change in ({"payload": "\u0000"}, {"payload": sized(LIMIT + 1)}, {"payload": 1}):
        missing = await client.patch(f"/tasks/{task_id + 10**12}", json=change)
        assert missing.status_code == 404, (change, missing.text)
    # A task that is not scheduled: 409, whatever is asked.
    sql("UPDATE tasks SET state = 'failed', finished_at = now() WHERE id = %s", task_id)
    for change in ({"payload": 8}, {"payload": None}, {"execute_at": 0, "payload": 8}):
        conflict = await patch(change)
        assert conflict.status_code == 409, conflict.text
        assert "only a scheduled task can be" in conflict.json()["detail"]
    assert sql("SELECT payload FROM tasks WHERE id = %s", task_id) == [(7,)]


async def test_a_list_of_large_payloads_stays_under_5_mb_and_its_cursor_goes_on(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = sized(LIMIT)
    # The rows each page read: not all 1,001 its limit allows, but a chunk that held 5 MB.
    read_rows: list[int] = []
    as_listed = store_module._listed

    def counted(row: Any) -> Any:
        read_rows[-1] += 1
        return as_listed(row)

    monkeypatch.setattr(store_module, "_listed", counted)
    ids: list[int] = []
    for _ in range(4):
        items = [{"type": "baz", "execute_at": 0, "payload": big}] * 50
        created = await client.post("/tasks/batch", json={"tasks": items})
        assert created.status_code == 201, created.text
        ids += created.json()["ids"]
    small = await client.post(
        "/tasks/batch", json={"tasks": [{"type": "baz", "execute_at": 0}] * 5}
    )
    ids += small.json()["ids"]
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 1000, "sort": "id"}
        if cursor:
            params["cursor"] = cursor
        read_rows.append(0)
        page = await client.get("/tasks", params=params)
        assert page.status_code == 200
        assert enveloped_size(page.content) <= MAX_PAGE_BYTES
        pages += 1
        read = page.json()
        assert read["items"]
        seen += [item["id"] for item in read["items"]]
        assert all(item["payload"] == big for item in read["items"] if item["id"] not in ids[-5:])
        cursor = read["next_cursor"]
        if cursor is None:
            break
    assert seen == ids  # each once, in order
    # 205 tasks of 64 KiB, 160 KB each once escaped as Lambda's envelope holds them (é, 日 as
    # six bytes, 🎉 as twelve): 31 a page.
    assert pages == 7
    # Each reads a chunk or what is left: the store cuts by stored bytes, the page by escaped.
    assert read_rows == [Store.PAGE_CHUNK] * 4 + [85, 55, 25]
    # The original's list has no cursor: it answers the first tasks that fit.
    listed = await client.get("/taskstate/NOTSTARTED")
    assert listed.status_code == 200 and enveloped_size(listed.content) <= MAX_PAGE_BYTES
    assert [t["id"] for t in listed.json()] == ids[: len(listed.json())]
    assert len(listed.json()) == 30


async def test_a_keyed_task_stores_its_payload_once_until_a_patch_changes_it(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    def kept(task_id: int) -> Any:
        [(copy,)] = sql("SELECT idempotency_payload FROM tasks WHERE id = %s", task_id)
        return copy

    async def create(key: str, payload: Any = None) -> httpx.Response:
        body = {"type": "baz", "execute_at": "2030-01-01T00:00:00Z", "payload": payload}
        return await client.post("/tasks", json=body, headers={"Idempotency-Key": key})

    async def patch(task_id: int, payload: Any) -> None:
        changed = await client.patch(f"/tasks/{task_id}", json={"payload": payload})
        assert changed.status_code == 200, changed.text

    first = (await create("once", {"v": "é"})).json()["id"]
    batch = await client.post("/tasks/batch", json={"tasks": [{"type": "baz", "execute_at": 0,
        "idempotency_key": "in-batch", "payload": [1]}]})  # fmt: skip
    assert kept(first) is None and kept(batch.json()["ids"][0]) is None
    await patch(first, {"v": "é"})  # the same payload: nothing to keep
    assert kept(first) is None
    await patch(first, {"v": 2})
    await patch(first, None)
    assert kept(first) == [{"v": "é"}]  # the first, kept through later changes
    assert (await create("once", {"v": "é"})).status_code == 200
    assert (await create("once", {"v": 2})).status_code == 409
    assert (await create("once")).status_code == 409
    # Created without one: `[null]` is kept, and a repeat without one is the same request.
    bare = (await create("bare")).json()["id"]
    await patch(bare, {"v": 3})
    assert kept(bare) == [None]
    assert (await create("bare")).status_code == 200
    assert (await create("bare", {"v": 3})).status_code == 409
    # Without a key, nothing is kept.
    plain = (await client.post("/tasks", json={"type": "baz", "execute_at": 0})).json()["id"]
    await patch(plain, {"v": 4})
    assert kept(plain) is None


async def test_a_batch_of_tasks_each_acceptable_is_accepted_up_to_the_body_limit(
    settings: Settings, sql: Sql
) -> None:
    """The values a body may hold follow TASKRUNNER_MAX_BODY_BYTES (`model.max_values`): a
    batch whose tasks are each accepted alone, within the body limit, is accepted; past the
    limit, the answer says so (413), not that the batch holds too many tasks."""
    # 10 tasks of a 57 KB payload each, 96,000 values in all (a fixed cap of 200,000 values
    # refused 10 of these: 10,000 values of each item's own fields).
    recipients = [
        {"name": f"user{i}", "email": f"u{i}@ex.io", "tags": ["a", "b"]} for i in range(1000)
    ]
    people = {"s": 0, "recipients": recipients}
    async with serve(settings) as client:
        one = await client.post("/tasks", json={"type": "baz", "execute_at": 0, "payload": people})
        assert one.status_code == 201, one.text
        batch = [{"type": "baz", "execute_at": 0, "payload": people}] * 10
        created = await client.post("/tasks/batch", json={"tasks": batch})
        assert created.status_code == 201, created.text
    # The densest payloads of exactly TASKRUNNER_MAX_PAYLOAD_BYTES, as many as fit in the
    # body limit: 15 of them in 1 MiB, 655,000 values.
    limit = 1024 * 1024
    densest: list[list[int]] = [[]] * ((LIMIT - 1) // 3)
    assert len(json.dumps(densest, separators=(",", ":"))) == LIMIT
    item = {"type": "baz", "execute_at": 0, "payload": densest}

    def body(count: int) -> bytes:
        return json.dumps({"tasks": [item] * count}, separators=(",", ":")).encode()

    assert len(body(15)) <= limit < len(body(16))
    async with serve(dataclasses.replace(settings, max_body_bytes=limit)) as client:
        created = await client.post("/tasks/batch", content=body(15))
        assert created.status_code == 201, created.text[:300]
        [(stored,)] = sql(
            "SELECT count(*) FROM tasks WHERE payload = %s::jsonb", json.dumps(densest)
        )
        assert stored == 15
        over = await client.post("/tasks/batch", content=body(16))
        assert over.status_code == 413, over.text[:300]


@pytest.mark.parametrize(
    "number", [b"1e-400", b"-1E-400", b"2e-324", b"0." + b"0" * 400 + b"1", b"0.2e-323"]
)
async def test_a_number_too_small_for_a_double_is_refused_as_one_too_large_is(
    client: httpx.AsyncClient, sql: Sql, number: bytes
) -> None:
    """json.loads and pydantic-core read it as 0: stored, it would be 0.0, silently."""
    said = f"the number '{number.decode()[:20]}"

    def refused(response: httpx.Response) -> None:
        assert response.status_code == 422, response.text
        [issue] = response.json()["detail"]
        assert issue["loc"] == ["body"] and issue["msg"].startswith(said), issue
        assert "too small for a double" in issue["msg"], issue

    one = b'{"type": "baz", "execute_at": 0, "payload": {"x": [' + number + b"]}}"
    refused(await client.post("/tasks", content=one))
    batch = b'{"tasks": [{"type": "baz", "execute_at": 0}, ' + one + b"]}"
    refused(await client.post("/tasks/batch", content=batch))
    assert sql("SELECT count(*) FROM tasks") == [(0,)]
    task_id = (await client.post("/tasks", json={"type": "baz", "execute_at": 0})).json()["id"]
    refused(await client.patch(f"/tasks/{task_id}", content=b'{"payload": ' + number + b"}"))
    assert sql("SELECT payload FROM tasks") == [(None,)]


async def test_numbers_a_double_holds_and_strings_that_look_tiny_are_kept(
    client: httpx.AsyncClient,
) -> None:
    # The smallest double, 0 written with an exponent, and text that only looks like a number.
    body = b'{"type": "baz", "execute_at": 0, "payload": [5e-324, 0e-999, 0.0e-400, "1e-400"]}'
    created = await client.post("/tasks", content=body)
    assert created.status_code == 201, created.text
    assert created.json()["payload"] == [5e-324, 0.0, 0.0, "1e-400"]
