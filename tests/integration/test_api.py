"""The HTTP API over ASGI, against a real database."""

import dataclasses
import json
from collections.abc import Callable
from itertools import chain
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from functions.http.app import build_app
from functions.queries import SCHEMA_REVISION
from functions.settings import Settings
from tests.conftest import serve, utc_in
from tests.pages import is_local, page_urls


@pytest.mark.one_server
async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "schema": SCHEMA_REVISION}


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


@pytest.mark.one_server
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

    # Newest first.
    assert await listed("") == sorted(chain.from_iterable(ids.values()), reverse=True)
    assert await listed("type=foo") == ids["foo"][::-1]
    assert await listed("type=FOO") == ids["foo"][::-1]
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
    assert seen == sorted(chain.from_iterable(ids.values()), reverse=True)


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
    ("unknown field", {"type": "foo", "execute_at": 1893499200, "queue": "default"}),
    ("not an object", ["foo"]),
]


@pytest.mark.one_server
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


@pytest.mark.one_server
async def test_malformed_json_is_4xx(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/tasks", content=b'{"type": "foo",', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.one_server
@pytest.mark.parametrize(
    "path",
    [
        "/tasks/abc",
        "/tasks/1.5",
        "/tasks/0",
        f"/tasks/{2**63}",
        "/tasks?state=done",
        "/tasks?type=9qux",
        "/tasks?limit=0",
        "/tasks?limit=1001",
        "/tasks?cursor=nonsense",
    ],
)
async def test_bad_reads_are_4xx(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["detail"]


@pytest.mark.one_server
async def test_delete_with_non_integer_id_is_4xx(client: httpx.AsyncClient) -> None:
    # A task id is digits: /tasks/abc names no route (404); digits out of range are a 422.
    assert (await client.delete("/tasks/abc")).status_code == 404
    assert (await client.delete("/tasks/0")).status_code == 422


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


@pytest.mark.one_server
async def test_batch_with_one_bad_item_writes_nothing_and_names_it(
    client: httpx.AsyncClient, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    items: list[dict[str, Any]] = [{"type": "baz", "execute_at": 1893499200}] * 5
    items[3] = {"type": "nope", "execute_at": 1893499200}
    response = await client.post("/tasks/batch", json={"tasks": items})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "tasks", 3, "type"]
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.one_server
async def test_batch_limits(client: httpx.AsyncClient) -> None:
    assert (await client.post("/tasks/batch", json={"tasks": []})).status_code == 422
    too_many = {"tasks": [{"type": "baz", "execute_at": 1893499200}] * 10_001}
    assert (await client.post("/tasks/batch", json=too_many)).status_code == 422


@pytest.mark.one_server
async def test_openapi_docs_are_served(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    assert {"/tasks", "/tasks/{task_id}", "/tasks/batch", "/healthz"} <= set(schema["paths"])


@pytest.mark.one_server
async def test_database_down_is_503_not_a_hang() -> None:
    # Nothing listens on port 1 of 127.0.0.1: the connection is refused at once.
    async with serve(Settings(database_url="postgresql://postgres@127.0.0.1:1/none")) as c:
        health = await c.get("/healthz")
        create = await c.post("/tasks", json={"type": "foo", "execute_at": 1893499200})
    assert health.status_code == 503
    assert create.status_code == 503
    assert create.json() == {"detail": "database unavailable, try again shortly"}


@pytest.mark.one_server
async def test_head_healthz_when_the_database_is_down_is_503_without_a_body() -> None:
    async with serve(Settings(database_url="postgresql://postgres@127.0.0.1:1/none")) as c:
        head = await c.head("/healthz")
    assert (head.status_code, head.content) == (503, b"")


@pytest.mark.one_server
async def test_head_healthz_up(client: httpx.AsyncClient) -> None:
    head, get = await client.head("/healthz"), await client.get("/healthz")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
    assert head.headers["content-length"] == get.headers["content-length"]


@pytest.mark.one_server
async def test_every_get_route_answers_head(client: httpx.AsyncClient) -> None:
    """HTTP asks HEAD of whatever answers GET (it was 405 everywhere but / and /healthz)."""
    created = await client.post("/tasks", json={"type": "baz", "execute_at": 4_102_444_800})
    task_id = created.json()["id"]
    for path in ("/tasks", f"/tasks/{task_id}", "/tasks?type=baz", "/stats", "/openapi.json"):
        head, get = await client.head(path), await client.get(path)
        assert (head.status_code, head.content, get.status_code) == (200, b"", 200), path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert (await client.head("/tasks/999999")).status_code == 404
    assert "HEAD" in (await client.put("/tasks")).headers["allow"]


def body_routes(app: FastAPI) -> list[APIRoute]:
    return [r for r in app.routes if isinstance(r, APIRoute) and r.body_field is not None]


@pytest.mark.one_server
async def test_every_route_with_a_body_reads_json_without_a_content_type(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    routes = body_routes(build_app(settings))
    assert {r.path for r in routes} == {
        "/tasks", "/tasks/batch", "/tasks/{task_id}", "/schedules", "/schedules/{name}"
    }  # fmt: skip
    one = {"type": "baz", "execute_at": 1893499200}
    schedule = {"type": "baz", "cron": "@daily"}
    bodies = {
        ("/tasks", "POST"): one,
        ("/tasks/batch", "POST"): {"tasks": [one]},
        ("/tasks/{task_id}", "PATCH"): {"execute_at": 1893499200},
        ("/schedules", "POST"): {"name": "first", **schedule},
        ("/schedules/{name}", "PUT"): schedule,
        ("/schedules/{name}", "PATCH"): {"enabled": False},
    }
    task_id = (await client.post("/tasks", json=one)).json()["id"]
    for route in routes:
        for method in route.methods or ():
            response = await client.request(
                method,
                route.path.format(task_id=task_id, name="nightly"),
                content=json.dumps(bodies[route.path, method]).encode(),
            )
            assert "content-type" not in response.request.headers
            assert response.status_code in (200, 201), response.text


@pytest.mark.one_server
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_every_route_with_a_body_refuses_other_types_with_415(
    client: httpx.AsyncClient, settings: Settings, content_type: str
) -> None:
    for route in body_routes(build_app(settings)):
        for method in route.methods or ():
            response = await client.request(
                method,
                route.path.format(task_id=1, name="nightly"),
                content=b"{}",
                headers={"content-type": content_type},
            )
            assert response.status_code == 415, (route.path, response.text)
            detail = response.json()["detail"]
            assert "application/json" in detail and content_type in detail


@pytest.mark.one_server
async def test_json_with_charset_or_a_json_suffix_is_json(client: httpx.AsyncClient) -> None:
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = await client.post(
            "/tasks",
            content=b'{"type": "baz", "execute_at": 0}',
            headers={"content-type": content_type},
        )
        assert response.status_code == 201, (content_type, response.text)


@pytest.mark.one_server
async def test_token_is_compared_as_bytes_with_the_scheme_in_any_case(settings: Settings) -> None:
    async with serve(dataclasses.replace(settings, api_token="s3crét")) as c:
        for value, status in (
            ("bearer s3crét", 200),
            ("Bearer é", 401),
            ("Bearer \xff\xfe", 401),  # not even UTF-8
            ("Bearer", 401),
            ("", 401),
        ):
            response = await c.get("/tasks", headers={b"authorization": value.encode()})
            assert response.status_code == status, (value, response.text)


@pytest.mark.one_server
@pytest.mark.parametrize("sent_path", ["/prod/tasks", "/tasks"], ids=["kept", "stripped"])
async def test_behind_a_proxy_with_a_path_prefix(settings: Settings, sent_path: str) -> None:
    """A reverse proxy serving the API at /prod/, passing the prefix on or stripping it."""
    async with serve(dataclasses.replace(settings, base_path="/prod")) as c:
        created = await c.post(sent_path, json={"type": "baz", "execute_at": 1893499200})
        assert created.status_code == 201, created.text
        location = created.headers["location"]
        assert location == f"/prod/tasks/{created.json()['id']}"
        assert (await c.get(location)).json() == created.json()
        redirect = await c.get(sent_path + "/")
        assert (redirect.status_code, redirect.headers["location"]) == (
            307,
            "http://test/prod/tasks",
        )
        assert (await c.get("/prod/openapi.json")).json()["servers"] == [{"url": "/prod"}]


@pytest.mark.one_server
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_everything_from_the_app_itself(
    client: httpx.AsyncClient, page: str
) -> None:
    html = (await client.get(page)).text
    assert "http://" not in html and "https://" not in html, "no other host, not even a font"
    urls = page_urls(html)
    assert "/openapi.json" in urls and "/static/favicon.svg" in urls
    assert any(url.endswith(".js") for url in urls)
    for url in urls:
        assert is_local(url), url
        response = await client.get(url)
        assert response.status_code == 200, url
        assert response.content


@pytest.mark.one_server
async def test_docs_assets_answer_head_and_refuse_what_is_not_there(
    client: httpx.AsyncClient,
) -> None:
    head = await client.head("/docs/assets/swagger-ui.css")
    assert (head.status_code, head.content) == (200, b"")
    assert int(head.headers["content-length"]) > 10_000
    # Only the package's static/ directory is served: not its code next to it.
    assert (await client.get("/docs/assets/%2e%2e/core.py")).status_code == 404
    assert (await client.get("/static/nothing.js")).status_code == 404
