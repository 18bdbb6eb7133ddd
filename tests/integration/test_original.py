"""The original challenge's routes, as a script written for it calls them."""

import dataclasses
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from functions.settings import Settings
from tests.conftest import serve

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.mark.one_server
@pytest.mark.parametrize(
    ("path", "kind", "execute_at"),
    [
        ("/FOO/0", "foo", "1970-01-01T00:00:00Z"),
        ("/BAZ/64072713903", "baz", "4000-05-20T08:05:03Z"),
        ("/bar/253402300799", "bar", "9999-12-31T23:59:59Z"),
        ("/Foo/1893499200", "foo", "2030-01-01T12:00:00Z"),
    ],
)
async def test_create_answers_the_id_as_a_json_number(
    client: httpx.AsyncClient, path: str, kind: str, execute_at: str
) -> None:
    response = await client.post(path)
    assert response.status_code == 200, response.text
    task_id = response.json()
    assert isinstance(task_id, int) and response.text == str(task_id)
    task = (await client.get(f"/id/{task_id}")).json()
    assert (task["id"], task["type"], task["execute_at"]) == (task_id, kind, execute_at)
    assert task == (await client.get(f"/tasks/{task_id}")).json()


@pytest.mark.one_server
async def test_create_past_year_9999_is_422(client: httpx.AsyncClient, sql: Sql) -> None:
    response = await client.post("/FOO/253402300800")
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["path", "unix_seconds"]
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.one_server
@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/tasks/12", 405),  # /tasks/{task_id} has no POST: not a task of type "tasks"
        ("POST", "/qux/12", 404),
        ("POST", "/foo/-1", 404),
        ("POST", "/foo/1.5", 404),
        ("POST", "/foo/١٢", 404),  # digits, but not ASCII ones
        ("POST", "/healthz/1", 404),
        ("POST", "/docs/1", 404),
        ("GET", "/foo/12", 405),
    ],
)
async def test_create_takes_no_path_of_another_route(
    client: httpx.AsyncClient, sql: Sql, method: str, path: str, status: int
) -> None:
    response = await client.request(method, path)
    assert response.status_code == status, response.text
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.one_server
async def test_taskrunners_own_routes_still_answer(client: httpx.AsyncClient) -> None:
    batch = await client.post("/tasks/batch", json={"tasks": [{"type": "baz", "execute_at": 0}]})
    assert batch.status_code == 201, batch.text
    [task_id] = batch.json()["ids"]
    assert (await client.post(f"/tasks/{task_id}/run")).status_code == 200
    assert (await client.get("/healthz")).status_code == 200


async def test_get_and_delete_by_id(client: httpx.AsyncClient, sql: Sql) -> None:
    task_id = (await client.post("/baz/0")).json()
    assert (await client.get("/id/999999")).status_code == 404
    running = (await client.post("/foo/0")).json()
    sql("UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w' WHERE id = %s", running)
    refused = await client.delete(f"/id/{running}")
    assert refused.status_code == 409 and "running" in refused.json()["detail"]
    assert (await client.delete(f"/id/{task_id}")).status_code == 204
    assert (await client.get(f"/id/{task_id}")).status_code == 404
    assert (await client.delete(f"/id/{task_id}")).status_code == 404


async def test_taskstate_lists_the_tasks_in_a_state_oldest_first(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    ids = [(await client.post(f"/{kind}/0")).json() for kind in ("foo", "bar", "baz", "foo")]
    sql("UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w' WHERE id = %s", ids[1])
    sql(
        "UPDATE tasks SET state = 'succeeded', attempts = 1, finished_at = now() WHERE id = %s",
        ids[3],
    )
    sql(
        "UPDATE tasks SET state = 'failed', attempts = 3, finished_at = now() WHERE id = %s", ids[0]
    )

    async def listed(state: str) -> list[int]:
        response = await client.get(f"/taskstate/{state}")
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()]

    assert await listed("NOTSTARTED") == [ids[2]]
    assert await listed("started") == [ids[1]]
    assert await listed("Complete") == [ids[0], ids[3]]
    bad = await client.get("/taskstate/DONE")
    assert bad.status_code == 422, bad.text


async def test_taskstate_answers_at_most_1000(client: httpx.AsyncClient, sql: Sql) -> None:
    sql("INSERT INTO tasks (kind, execute_at) SELECT 'baz', now() FROM generate_series(1, 1001)")
    [(first,)] = sql("SELECT min(id) FROM tasks")
    listed = (await client.get("/taskstate/NOTSTARTED")).json()
    assert len(listed) == 1000
    assert [t["id"] for t in listed] == list(range(first, first + 1000))


async def test_delete_everything_is_refused_unless_allowed(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await client.post("/foo/0")
    response = await client.delete("/")
    assert response.status_code == 403, response.text
    assert "TASKRUNNER_ALLOW_DELETE_ALL=true" in response.json()["detail"]
    assert sql("SELECT count(*) FROM tasks") == [(1,)]


async def test_delete_everything_when_allowed_leaves_running_tasks(
    settings: Settings, sql: Sql
) -> None:
    sql("INSERT INTO tasks (kind, execute_at) SELECT 'baz', now() FROM generate_series(1, 25000)")
    sql("UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w' WHERE id % 1000 = 0")
    async with serve(dataclasses.replace(settings, allow_delete_all=True)) as client:
        response = await client.delete("/")
    assert response.status_code == 200, response.text
    assert response.json() == {"deleted": 24975}
    assert sql("SELECT state, count(*) FROM tasks GROUP BY state") == [("running", 25)]


@pytest.mark.one_server
async def test_every_original_route_needs_the_token(settings: Settings) -> None:
    calls = [
        ("POST", "/foo/0"),
        ("GET", "/id/1"),
        ("DELETE", "/id/1"),
        ("GET", "/taskstate/NOTSTARTED"),
        ("DELETE", "/"),
    ]
    async with serve(dataclasses.replace(settings, api_token="t")) as client:
        for method, path in calls:
            response = await client.request(method, path)
            assert response.status_code == 401, (method, path, response.text)
        response = await client.post("/foo/0", headers={"Authorization": "Bearer t"})
        assert response.status_code == 200


@pytest.mark.one_server
async def test_the_original_routes_are_tagged_in_the_openapi_document(
    client: httpx.AsyncClient,
) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    tagged = {
        (method.upper(), path)
        for path, operations in paths.items()
        for method, operation in operations.items()
        if operation.get("tags") == ["original"]
    }
    assert tagged == {
        ("POST", "/{type}/{unix_seconds}"),
        ("GET", "/id/{id}"),
        ("DELETE", "/id/{id}"),
        ("GET", "/taskstate/{state}"),
        ("DELETE", "/"),
    }
