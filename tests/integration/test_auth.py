"""The token: without it the answer is 401 before anything else, and no byte of the body is
read, on every path (the hot path, the FastAPI app, the Lambda handler's stack); and only
spaces and tabs around it are ignored."""

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from functions import api
from functions.db import Database
from functions.http.app import build_app
from functions.settings import Settings
from functions.store import Store
from tests.conftest import serve
from tests.integration.test_edges import raw_request

TOKEN = "s3cret"
# The 401 comes before any statement: no PostgreSQL version reaches it.
pytestmark = pytest.mark.one_server
MiB = 1024 * 1024
App = Callable[..., Any]


@pytest.fixture(params=["served", "lambda"])
async def app(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[App]:
    """The app as `taskrunner api` serves it, or as the Lambda handler wraps it."""
    settings = dataclasses.replace(settings, api_token=TOKEN, max_body_bytes=8 * MiB)
    database = Database(settings)
    store = Store(database)
    try:
        if request.param == "served":
            yield build_app(settings, store=store)
        else:
            yield api._build(settings, store)
    finally:
        await database.dispose()


async def call(app: App, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Any:
    """Send a request whose body never comes; return the status, the headers and how many
    times the app asked for the body."""
    asked = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        # The body a client is still sending: for a body read, the request would fail.
        return {"type": "http.request", "body": b"{" * 1024, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope, _ = raw_request(method, path, headers, [])
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), asked


JSON = (b"content-type", b"application/json")
# (what the request would get with the token, method, path, headers)
REFUSED_LATER = [
    ("413 by its length", "POST", "/tasks/batch", [JSON, (b"content-length", b"9437184")]),
    ("413 by its length, chunked", "POST", "/tasks", [JSON, (b"transfer-encoding", b"chunked")]),
    ("400 for its length", "POST", "/tasks", [JSON, (b"content-length", b"x")]),
    ("415", "PATCH", "/tasks/1", [(b"content-type", b"text/plain")]),
    ("422 or 408 on the hot path", "POST", "/tasks", [JSON]),
    ("422 or 408 in the FastAPI app", "POST", "/tasks", [(b"content-type", b"a/b+json")]),
    ("a batch", "POST", "/tasks/batch", [JSON]),
    ("the original's create", "POST", "/foo/1", []),
    ("a reschedule", "PATCH", "/tasks/1", [JSON]),
]


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [r[1:] for r in REFUSED_LATER],
    ids=[r[0] for r in REFUSED_LATER],
)
async def test_without_the_token_401_comes_first_and_no_body_is_read(
    app: App, method: str, path: str, headers: list[tuple[bytes, bytes]]
) -> None:
    for auth in ([], [(b"authorization", b"Bearer wrong")], [(b"authorization", b"Basic x")]):
        status, sent_headers, asked = await call(app, method, path, [*headers, *auth])
        assert (status, asked) == (401, 0), auth
        assert sent_headers[b"www-authenticate"] == b"Bearer"


async def test_with_the_token_the_same_requests_read_their_body(app: App) -> None:
    """(The test above would pass for a stack that never reads a body.)"""
    token = (b"authorization", f"Bearer {TOKEN}".encode())
    status, _, asked = await call(app, "POST", "/tasks", [JSON, token])
    assert status in (400, 413) and asked > 0


@pytest.mark.parametrize("path", ["/", "/healthz", "/docs", "/openapi.json", "/static/favicon.svg"])
async def test_public_pages_need_no_token(settings: Settings, path: str) -> None:
    async with serve(dataclasses.replace(settings, api_token=TOKEN)) as client:
        assert (await client.get(path)).status_code == 200


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (f"Bearer {TOKEN}", 200),
        (f"bearer \t{TOKEN}\t ", 200),
        (f" Bearer {TOKEN}", 200),
        (f"Bearer {TOKEN}\xa0", 401),
        (f"Bearer {TOKEN}\x85", 401),
        (f"Bearer \xa0{TOKEN}", 401),
        (f"Bearer {TOKEN}\x0b", 401),
        (f"Bearer {TOKEN}\x0c", 401),
        (f"Bearer\t{TOKEN}", 401),
    ],
)
async def test_only_spaces_and_tabs_around_the_token_are_ignored(
    settings: Settings, sent: str, status: int
) -> None:
    headers = {b"authorization": sent.encode("latin-1")}
    async with serve(dataclasses.replace(settings, api_token=TOKEN)) as client:
        # The FastAPI app's route, and the hot path's.
        listed = await client.get("/tasks", headers=headers)
        assert listed.status_code == status, listed.text
        created = await client.post(
            "/tasks", json={"type": "foo", "execute_at": 0}, headers=headers
        )
        assert created.status_code == (201 if status == 200 else 401), created.text
        got = await client.get(f"/tasks/{created.json().get('id', 1)}", headers=headers)
        assert got.status_code == status, got.text
