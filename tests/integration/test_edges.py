"""No input can hurt the API: hostile and odd requests each get a clear 4xx, never a 500,
and no error body echoes more than a short excerpt of what was sent.

In-process (ASGI), against a real database. `tests/acceptance/test_hostile_bodies.py`
sends the bodies that need a real server (a huge Content-Length, a chunked flood, a
trickle) to `taskrunner api`.
"""

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from functions.http.app import build_app
from functions.http.middleware import BodyLimit
from functions.model import max_values, too_many_values
from functions.settings import Settings
from tests.conftest import serve

Sql = Callable[..., list[tuple[Any, ...]]]
# The most an error body may be: a short excerpt of the input, never the input.
MAX_ERROR_BYTES = 8_000
MiB = 1024 * 1024


def refused(response: httpx.Response, status: int | tuple[int, ...]) -> None:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text[:500]
    assert len(response.content) <= MAX_ERROR_BYTES, response.text[:500]
    assert response.json()["detail"], "the body says what is wrong"


def task(**fields: Any) -> dict[str, Any]:
    return {"type": "foo", "execute_at": 0, **fields}


# (what, method, path, raw body, expected status)
HOSTILE: list[tuple[str, str, str, bytes, int | tuple[int, ...]]] = [
    ("nested 100,000 deep", "POST", "/tasks", b"[" * 100_000, 400),
    ("nested objects", "POST", "/tasks/batch", b'{"tasks": ' + b'{"a": ' * 50_000, 400),
    (
        "nested in a field",
        "POST",
        "/tasks",
        json.dumps(task(type=[[[[[[[[[[[0]]]]]]]]]]])).encode(),
        422,
    ),
    (
        "nested 900 in a field",
        "POST",
        "/tasks",
        b'{"type": ' + b"[" * 900 + b"]" * 900 + b', "execute_at": 0}',
        422,
    ),
    ("1 MB type", "POST", "/tasks", json.dumps(task(type="x" * MiB)).encode(), 422),
    ("1 MB execute_at", "POST", "/tasks", json.dumps(task(execute_at="2" * MiB)).encode(), 422),
    ("1 MB field name", "POST", "/tasks", json.dumps({**task(), "x" * MiB: 1}).encode(), 422),
    (
        "1 MB key in a batch",
        "POST",
        "/tasks/batch",
        json.dumps({"tasks": [task(idempotency_key="k" * MiB)]}).encode(),
        422,
    ),
    ("1 MB in a patch", "PATCH", "/tasks/1", json.dumps({"execute_at": "x" * MiB}).encode(), 422),
    (
        "number with 5,000 digits",
        "POST",
        "/tasks/batch",
        b'{"tasks": [{"type": "foo", "execute_at": ' + b"1" * 5_000 + b"}]}",
        400,
    ),
    (
        "number with 100,000 digits",
        "POST",
        "/tasks",
        b'{"type": "foo", "execute_at": ' + b"9" * 100_000 + b"}",
        400,
    ),
    ("1e400", "POST", "/tasks", b'{"type": "foo", "execute_at": 1e400}', 422),
    ("-1e400", "POST", "/tasks", b'{"type": "foo", "execute_at": -1e400}', 422),
    ("NaN", "POST", "/tasks", b'{"type": "foo", "execute_at": NaN}', 422),
    (
        "Infinity",
        "POST",
        "/tasks/batch",
        b'{"tasks": [{"type": "foo", "execute_at": Infinity}]}',
        422,
    ),
    ("invalid UTF-8", "POST", "/tasks", b'{"type": "\xff\xfe", "execute_at": 0}', 400),
    ("overlong UTF-8", "POST", "/tasks", b'{"type": "\xc0\xaf", "execute_at": 0}', 400),
    ("truncated UTF-8", "POST", "/tasks/batch", b'{"tasks": [{"type": "\xe2\x82', 400),
    ("lone surrogate", "POST", "/tasks", b'{"type": "\\ud800", "execute_at": 0}', 422),
    (
        "lone surrogate field",
        "POST",
        "/tasks",
        b'{"\\udfff": 1, "type": "foo", "execute_at": 0}',
        422,
    ),
    ("NUL in type", "POST", "/tasks", b'{"type": "foo\\u0000", "execute_at": 0}', 422),
    ("not JSON", "POST", "/tasks", b"type=foo&execute_at=0", 422),
    ("empty body", "POST", "/tasks", b"", 422),
    ("JSON null", "POST", "/tasks/batch", b"null", 422),
    ("a string", "PATCH", "/tasks/1", b'"2030-01-01T00:00:00Z"', 422),
    (
        "10,001 items",
        "POST",
        "/tasks/batch",
        json.dumps({"tasks": [task()] * 10_001}).encode(),
        422,
    ),
    (
        "8 MiB of empty objects",
        "POST",
        "/tasks/batch",
        b"[" + b"{}," * (8 * MiB // 3 - 2) + b"{}]",
        422,
    ),
    (
        "10,000 bad items",
        "POST",
        "/tasks/batch",
        json.dumps({"tasks": [{"type": "qux" * 100}] * 10_000}).encode(),
        422,
    ),
]


@pytest.mark.one_server
@pytest.mark.parametrize(
    ("what", "method", "path", "body", "status"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
async def test_hostile_bodies_get_a_short_4xx(
    client: httpx.AsyncClient,
    sql: Sql,
    what: str,
    method: str,
    path: str,
    body: bytes,
    status: int,
) -> None:
    response = await client.request(
        method, path, content=body, headers={"content-type": "application/json"}
    )
    refused(response, status)
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.one_server
async def test_a_422_lists_at_most_20_issues_and_says_how_many_more(
    client: httpx.AsyncClient,
) -> None:
    body = {"tasks": [{"type": "qux", "execute_at": "soon"}] * 5_000}
    detail = (await client.post("/tasks/batch", json=body)).json()["detail"]
    assert len(detail) == 21
    assert detail[0]["loc"] == ["body", "tasks", 0, "type"]
    assert detail[-1] == {
        "loc": ["body"],
        "msg": "and 9980 more issues",
        "type": "too_many_issues",
    }
    assert all(set(issue) == {"loc", "msg", "type"} for issue in detail), "no input, no ctx"


@pytest.mark.one_server
async def test_an_unknown_field_is_named_in_short(client: httpx.AsyncClient) -> None:
    response = await client.post("/tasks", json={**task(), "priority" * 1000: 1})
    refused(response, 422)
    [issue] = response.json()["detail"]
    assert issue["loc"][0] == "body" and issue["loc"][1].startswith("priority")
    assert len(issue["loc"][1]) <= 40


# execute_at at and past both ends of the range, with every kind of offset.
AT_THE_ENDS = [
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+00:00",
    "0001-01-01T00:00:00-00:00",
    "0001-01-01T00:00:00-01:00",
    "0001-01-01T00:00:00.000001-23:59",
    "0001-01-01t00:00:00z",
    "0001-01-02T00:00:00+23:59",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59.999999+00:00",
    "9999-12-31T23:59:59+01:00",
    "9999-12-31T00:00:00+23:59",
    "9999-12-30T23:59:59-23:59",
    0,
    253402300799,
    253402300799.99997,
]
PAST_THE_ENDS: list[Any] = [
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:59:59.999999+01:00",
    "0001-01-01T23:00:00+00:01",  # within range, but an offset that could leave it: refused
    "0001-01-01T00:00:00+00:00:01",
    "0000-12-31T23:59:59Z",
    "9999-12-31T23:00:00-05:00",
    "9999-12-31T00:00:00-00:01",
    "10000-01-01T00:00:00Z",
    "+10000-01-01T00:00:00Z",
    "-0001-01-01T00:00:00Z",
    "9999-12-31T23:59:60Z",
    "2030-01-01T00:00:00+24:00",
    "2030-01-01T00:00:00",
    -1,
    -0.000001,
    253402300800,
    253402300799.999999,
    1e300,
]


@pytest.mark.parametrize("at", AT_THE_ENDS, ids=map(str, AT_THE_ENDS))
async def test_times_at_the_ends_of_the_range_are_accepted_by_every_route(
    client: httpx.AsyncClient, at: Any
) -> None:
    single = await client.post("/tasks", json=task(execute_at=at))
    assert single.status_code == 201, single.text
    batch = await client.post("/tasks/batch", json={"tasks": [task(execute_at=at)]})
    assert batch.status_code == 201, batch.text
    moved = await client.patch(single.headers["location"], json={"execute_at": at})
    assert moved.status_code == 200, moved.text
    assert moved.json()["execute_at"] == single.json()["execute_at"]


@pytest.mark.one_server
@pytest.mark.parametrize("at", PAST_THE_ENDS, ids=map(str, PAST_THE_ENDS))
async def test_times_past_the_ends_of_the_range_are_422_on_every_route(
    client: httpx.AsyncClient, sql: Sql, at: Any
) -> None:
    refused(await client.post("/tasks", json=task(execute_at=at)), 422)
    refused(await client.post("/tasks/batch", json={"tasks": [task(execute_at=at)]}), 422)
    [(task_id,)] = sql("INSERT INTO tasks (kind, execute_at) VALUES ('foo', now()) RETURNING id")
    refused(await client.patch(f"/tasks/{task_id}", json={"execute_at": at}), 422)
    assert sql("SELECT count(*) FROM tasks") == [(1,)]


@pytest.mark.one_server
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({b"authorization": b"Bearer \xc3\xa9"}, 401),
        ({b"authorization": b"Bearer \xff\xfe\x00"}, 401),
        ({b"authorization": b"\xff" * 4000}, 401),
        ({b"authorization": b"Basic dTpw"}, 401),
        ({b"authorization": b"Bearer"}, 401),
        ({b"content-type": b"\xff/\xfe"}, 415),
        ({b"content-type": b"text/" + b"x" * 10_000}, 415),
        ({b"content-type": b"application/xml"}, 415),
        ({b"content-type": b"text/plain"}, 415),
        ({b"content-type": b"application/x-www-form-urlencoded"}, 415),
        ({b"content-type": b"multipart/form-data; boundary=x"}, 415),
        ({b"content-type": b";"}, 415),
        ({b"content-type": b"; charset=utf-8"}, 415),
        ({b"idempotency-key": b"\xff"}, 422),
        ({b"idempotency-key": b"k" * 10_000}, 422),
        ({b"idempotency-key": b"\x00"}, 422),
    ],
)
async def test_odd_header_bytes_get_a_short_4xx(
    settings: Settings, headers: dict[bytes, bytes], status: int
) -> None:
    token = {b"authorization": b"Bearer t"}
    async with serve(dataclasses.replace(settings, api_token="t")) as client:
        response = await client.post("/tasks", json=task(), headers={**token, **headers})
    refused(response, status)


def raw_request(
    method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An ASGI scope and the messages a server would hand the app for it."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "server": ("test", 80),
        "client": ("test", 1),
    }
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    return scope, messages


async def call(app: Any, scope: dict[str, Any], receive: Any) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body


@pytest.mark.one_server
@pytest.mark.parametrize("value", [b"abc", b"-5", b"1e3", b"\xff", b"12 34", "١٢".encode()])
async def test_a_content_length_that_is_not_a_number_is_400(
    settings: Settings, value: bytes
) -> None:
    app = build_app(settings)
    scope, _ = raw_request("POST", "/tasks", [(b"content-length", value)], [b"{}"])

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body is not read")

    status, body = await call(app, scope, receive)
    assert status == 400
    assert json.loads(body) == {"detail": "the Content-Length header is not a number"}


@pytest.mark.one_server
async def test_a_declared_length_over_the_limit_is_413_before_any_byte_is_read(
    settings: Settings,
) -> None:
    app = build_app(dataclasses.replace(settings, max_body_bytes=1024))
    scope, _ = raw_request("POST", "/tasks/batch", [(b"content-length", b"88000000")], [])

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body is not read")

    status, body = await call(app, scope, receive)
    assert status == 413
    assert json.loads(body) == {"detail": "the request body is over the limit of 1024 bytes"}


@pytest.mark.one_server
async def test_a_body_without_a_length_is_cut_off_at_the_limit(
    settings: Settings, sql: Sql
) -> None:
    received = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal received
        yield b'{"tasks": ['
        while True:
            chunk = b'{"type": "foo", "execute_at": 0},' * 1000
            received += len(chunk)
            yield chunk

    limit = 256 * 1024
    async with serve(dataclasses.replace(settings, max_body_bytes=limit)) as client:
        for path in ("/tasks", "/tasks/batch", "/tasks/1"):
            received = 0
            method = "PATCH" if path == "/tasks/1" else "POST"
            response = await client.request(method, path, content=endless())
            assert "content-length" not in response.request.headers
            refused(response, 413)
            # Read up to the limit and not much further: a chunk past it, at most.
            assert received <= limit + 64 * 1024
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.one_server
async def test_a_trickled_body_is_cut_off_with_408(settings: Settings, sql: Sql) -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"type": "foo", '
        while True:  # forever, unless the server stops reading
            await asyncio.sleep(0.05)
            yield b" "

    # The app's middleware with a short grace, so the test is quick; the real server gets
    # the default (tests/acceptance/test_hostile_bodies.py).
    app = BodyLimit(build_app(settings), max_bytes=1024 * 1024, grace_s=0.5, min_rate=1024)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/tasks", content=trickle())
    refused(response, 408)
    assert response.headers["connection"] == "close"
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.one_server
async def test_a_body_that_arrives_in_time_in_small_chunks_is_read(settings: Settings) -> None:
    body = json.dumps(task()).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 3):
            yield body[i : i + 3]

    async with serve(settings) as client:
        response = await client.post("/tasks", content=chunks())
    assert response.status_code == 201, response.text


@pytest.mark.one_server
@pytest.mark.parametrize(
    "path",
    [
        "/tasks?limit=" + "9" * 5000,
        "/tasks?cursor=" + "A" * 10_000,
        "/tasks?type=" + "x" * 10_000,
        "/tasks?state=%FF",
        "/tasks/" + "9" * 5000,
        "/tasks/%FF%FE",
        "/id/" + "1" * 100,
        "/taskstate/" + "N" * 10_000,
    ],
)
async def test_odd_paths_and_queries_get_a_short_4xx(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    refused(response, (404, 422))


@pytest.mark.one_server
@pytest.mark.parametrize("path", ["/FOO/" + "9" * 5000, "/foo/253402300800"])
async def test_the_original_create_with_a_huge_time_is_422(
    client: httpx.AsyncClient, path: str
) -> None:
    refused(await client.post(path), 422)


@pytest.mark.one_server
async def test_a_number_too_long_to_read_is_named_as_such(settings: Settings) -> None:
    body = b'{"type": "foo", "execute_at": ' + b"7" * 5_000 + b"}"
    async with serve(settings) as client:
        response = await client.post("/tasks", content=body)
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "the body is not JSON this API reads: a whole number has over 4,300 digits"
    )


@pytest.mark.one_server
async def test_a_body_with_too_many_values_is_refused_before_it_is_parsed(
    client: httpx.AsyncClient, sql: Sql, settings: Settings
) -> None:
    [(task_id,)] = sql("INSERT INTO tasks (kind, execute_at) VALUES ('foo', now()) RETURNING id")
    limit = settings.max_body_bytes
    body = b"[" * (max_values(limit) + 1)
    patched = await client.patch(f"/tasks/{task_id}", content=body)
    refused(patched, 422)
    assert patched.json()["detail"][0]["msg"] == too_many_values(limit)
    # The content-type is checked first: a body that is not JSON is not counted.
    refused(await client.post("/tasks", content=body, headers={"content-type": "text/csv"}), 415)
