"""A 422 says in words what is wrong and what is accepted, never the pattern the schema
checks by (hundreds of characters of regular expression)."""

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from functions.http.app import build_app
from functions.settings import Settings

# Refused before the database is asked: nothing listens here.
NOWHERE = Settings(database_url="postgresql://taskrunner@127.0.0.1:9/none")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(NOWHERE, middleware=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        yield c


def issue(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    [found] = response.json()["detail"]
    assert "pattern" not in found["msg"] and "^" not in found["msg"], found
    assert len(found["msg"]) < 160, found
    return found  # type: ignore[no-any-return]


async def test_a_type_in_the_query_that_no_kind_can_have_is_called_that(
    client: httpx.AsyncClient,
) -> None:
    # (Any well-formed name is a filter: a removed kind's tasks remain.)
    found = issue(await client.get("/tasks", params={"type": "qux-1"}))
    assert found["loc"] == ["query", "type", 0]  # (the first `type`: it may be repeated)
    assert "type 'qux-1' is not a kind's name" in found["msg"]


@pytest.mark.parametrize("cursor", ["abc", "YWZ0ZXI6", "YWZ0ZXI6MTA=", "x" * 1000])
async def test_a_cursor_the_api_did_not_issue_is_called_that(
    client: httpx.AsyncClient, cursor: str
) -> None:
    found = issue(await client.get("/tasks", params={"cursor": cursor}))
    assert found["loc"] == ["query", "cursor"]
    assert "is not a cursor this API issued" in found["msg"]
    assert "next_cursor" in found["msg"]


async def test_an_unknown_original_state_is_named_with_the_known_ones(
    client: httpx.AsyncClient,
) -> None:
    found = issue(await client.get("/taskstate/foo"))
    assert found["loc"] == ["path", "state"]
    assert "NOTSTARTED, STARTED, COMPLETE" in found["msg"]


@pytest.mark.parametrize("key", ["a b", "", "é", "k" * 256])
async def test_a_bad_idempotency_key_says_what_a_key_is(
    client: httpx.AsyncClient, key: str
) -> None:
    task = {"type": "foo", "execute_at": 0}
    header = issue(
        await client.post("/tasks", json=task, headers={b"idempotency-key": key.encode()})
    )
    item = issue(
        await client.post("/tasks/batch", json={"tasks": [{**task, "idempotency_key": key}]})
    )
    for found in (header, item):
        assert "1 to 255 printable ASCII characters" in found["msg"], found
