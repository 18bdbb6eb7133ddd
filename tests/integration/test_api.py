"""The HTTP API over ASGI, against a real database."""

from collections.abc import AsyncIterator, Callable
from itertools import chain
from typing import Any

import httpx
import pytest

from functions.app import build_app
from functions.settings import Settings
from tests.conftest import utc_in


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_create_returns_the_task_with_its_id_and_location(client: httpx.AsyncClient) -> None:
    when = utc_in(60).replace(microsecond=0)
    response = await client.post("/tasks", json={"type": "Foo", "execute_at": when.isoformat()})
    assert response.status_code == 201
    task = response.json()
    assert isinstance(task["id"], int)
    assert response.headers["location"] == f"/tasks/{task['id']}"
    assert task["type"] == "foo"
    assert task["state"] == "scheduled"
    assert task["execute_at"] == when.isoformat().replace("+00:00", "Z")
    assert task["attempts"] == 0
    assert task["started_at"] is None and task["finished_at"] is None
    assert (await client.get(task_url(task))).json() == task


def task_url(task: dict[str, Any]) -> str:
    return f"/tasks/{task['id']}"


async def test_execute_at_as_unix_seconds(client: httpx.AsyncClient) -> None:
    response = await client.post("/tasks", json={"type": "baz", "execute_at": 1893499200})
    assert response.status_code == 201
    assert response.json()["execute_at"] == "2030-01-01T12:00:00Z"


async def test_get_missing_task_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/tasks/999999")
    assert response.status_code == 404
    assert response.json() == {"detail": "task 999999 does not exist"}


async def test_list_filters_by_state_and_type_and_pages(
    client: httpx.AsyncClient, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    ids: dict[str, list[int]] = {}
    for kind in ("foo", "bar", "baz", "foo", "baz"):
        created = await client.post("/tasks", json={"type": kind, "execute_at": 1893499200})
        ids.setdefault(kind, []).append(created.json()["id"])
    sql(
        "UPDATE tasks SET state = 'succeeded', finished_at = now(), attempts = 1 WHERE id = %s",
        ids["foo"][0],
    )

    async def listed(query: str) -> list[int]:
        response = await client.get(f"/tasks?{query}")
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["items"]]

    assert await listed("") == sorted(chain.from_iterable(ids.values()))
    assert await listed("type=foo") == ids["foo"]
    assert await listed("type=FOO") == ids["foo"]
    assert await listed("state=succeeded") == [ids["foo"][0]]
    assert await listed("state=scheduled&type=foo") == [ids["foo"][1]]
    assert await listed("state=failed") == []

    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/tasks", params=params)).json()
        assert len(page["items"]) <= 2
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(chain.from_iterable(ids.values()))


async def test_delete_then_404(client: httpx.AsyncClient) -> None:
    task = (await client.post("/tasks", json={"type": "baz", "execute_at": 1893499200})).json()
    assert (await client.delete(task_url(task))).status_code == 204
    assert (await client.get(task_url(task))).status_code == 404
    second = await client.delete(task_url(task))
    assert second.status_code == 404
    assert "does not exist" in second.json()["detail"]


async def test_delete_running_task_is_409(
    client: httpx.AsyncClient, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    task = (await client.post("/tasks", json={"type": "foo", "execute_at": 1893499200})).json()
    sql(
        "UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w' WHERE id = %s",
        task["id"],
    )
    response = await client.delete(task_url(task))
    assert response.status_code == 409
    assert "running" in response.json()["detail"]
    assert (await client.get(task_url(task))).json()["state"] == "running"


BAD_CREATES: list[tuple[str, Any]] = [
    ("unknown type", {"type": "qux", "execute_at": 1893499200}),
    ("type not a string", {"type": 7, "execute_at": 1893499200}),
    ("time not a time", {"type": "foo", "execute_at": "next tuesday"}),
    ("naive time", {"type": "foo", "execute_at": "2030-01-01T12:00:00"}),
    ("time is a bool", {"type": "foo", "execute_at": True}),
    ("negative unix time", {"type": "foo", "execute_at": -5}),
    ("missing type", {"execute_at": 1893499200}),
    ("missing execute_at", {"type": "foo"}),
    ("unknown field", {"type": "foo", "execute_at": 1893499200, "priority": 1}),
    ("not an object", ["foo"]),
]


@pytest.mark.parametrize(("case", "body"), BAD_CREATES, ids=[c for c, _ in BAD_CREATES])
async def test_bad_create_is_4xx_and_writes_nothing(
    client: httpx.AsyncClient,
    sql: Callable[..., list[tuple[Any, ...]]],
    case: str,
    body: Any,
) -> None:
    response = await client.post("/tasks", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["detail"], "the body says what is wrong"
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


async def test_malformed_json_is_4xx(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/tasks", content=b'{"type": "foo",', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    "path",
    [
        "/tasks/abc",
        "/tasks/1.5",
        "/tasks/0",
        f"/tasks/{2**63}",
        "/tasks?state=done",
        "/tasks?type=qux",
        "/tasks?limit=0",
        "/tasks?limit=1001",
        "/tasks?cursor=nonsense",
    ],
)
async def test_bad_reads_are_4xx(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["detail"]


async def test_delete_with_non_integer_id_is_4xx(client: httpx.AsyncClient) -> None:
    assert (await client.delete("/tasks/abc")).status_code == 422


async def test_batch_create_keeps_order(client: httpx.AsyncClient) -> None:
    kinds = ["baz", "foo", "bar"] * 50
    body = {"tasks": [{"type": k, "execute_at": 1893499200 + i} for i, k in enumerate(kinds)]}
    response = await client.post("/tasks/batch", json=body)
    assert response.status_code == 201
    ids = response.json()["ids"]
    assert len(ids) == len(kinds)
    for i in (0, 1, 77, 149):
        task = (await client.get(f"/tasks/{ids[i]}")).json()
        assert task["type"] == kinds[i]
        assert task["execute_at"].startswith("2030-01-01T12:0")


async def test_batch_with_one_bad_item_writes_nothing_and_names_it(
    client: httpx.AsyncClient, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    items: list[dict[str, Any]] = [{"type": "baz", "execute_at": 1893499200}] * 5
    items[3] = {"type": "nope", "execute_at": 1893499200}
    response = await client.post("/tasks/batch", json={"tasks": items})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "tasks", 3, "type"]
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


async def test_batch_limits(client: httpx.AsyncClient) -> None:
    assert (await client.post("/tasks/batch", json={"tasks": []})).status_code == 422
    too_many = {"tasks": [{"type": "baz", "execute_at": 1893499200}] * 10_001}
    assert (await client.post("/tasks/batch", json=too_many)).status_code == 422


async def test_openapi_docs_are_served(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    assert {"/tasks", "/tasks/{task_id}", "/tasks/batch", "/healthz"} <= set(schema["paths"])


async def test_database_down_is_503_not_a_hang() -> None:
    # Nothing listens on port 1 of 127.0.0.1: the connection is refused at once.
    app = build_app(Settings(database_url="postgresql://postgres@127.0.0.1:1/none"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        health = await c.get("/healthz")
        create = await c.post("/tasks", json={"type": "foo", "execute_at": 1893499200})
    assert health.status_code == 503
    assert create.status_code == 503
    assert create.json() == {"detail": "database unavailable, try again shortly"}
