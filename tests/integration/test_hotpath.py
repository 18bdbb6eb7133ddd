"""The hot path (functions/http/fastpath.py) answers exactly what the FastAPI routes answer.

Each request goes to two apps on one database: the API as served (hot path first), and the
same API without the hot path (every request through FastAPI). Their answers must be equal,
byte for byte, but for what differs between two tasks (id, created_at, Location).
"""

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from functions import tasks
from functions.db import Database
from functions.http.app import build_app
from functions.http.fastpath import HotPath, Lazy
from functions.http.middleware import layers, wrap
from functions.model import max_values, too_many_values
from functions.settings import Settings
from functions.store import Store

TOKEN = "s3cret"
# Both paths run the same statements, which the other files check on every server; what is
# compared here (status, headers, body) is made in Python, the same whatever the version.
pytestmark = pytest.mark.one_server


def _fastapi_only(settings: Settings, store: Store) -> Any:
    app: Any = build_app(settings, store=store, middleware=False)
    for layer, kwargs in layers(settings, store):
        if layer is not HotPath:
            app = layer(app, **kwargs)
    return app


class Pair:
    """The same request to the API as served and to the API without its hot path."""

    def __init__(self, served: httpx.AsyncClient, fastapi: httpx.AsyncClient) -> None:
        self.served = served
        self.fastapi = fastapi

    async def both(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send the request to both; assert they answer alike; return the served answer."""
        a = await self.served.request(method, path, **kwargs)
        b = await self.fastapi.request(method, path, **kwargs)
        assert (a.status_code, _same(a)) == (b.status_code, _same(b)), (a.text, b.text)
        return a


def _same(response: httpx.Response) -> Any:
    """What must be equal between two answers, the tasks' own ids and times blanked."""
    headers = [
        (name, re.sub(r"/tasks/\d+$", "/tasks/ID", value))
        for name, value in response.headers.multi_items()
        if name != "content-length"
    ]
    body: Any = response.content
    if response.headers.get("content-type") == "application/json" and body:
        body = json.loads(body)
        if isinstance(body, dict) and "created_at" in body:
            body = {**body, "id": "ID", "created_at": "T", "idempotency_key": "K"}
        if isinstance(body, dict) and "ids" in body:
            body = {"ids": len(body["ids"])}
    return headers, body, len(response.content) if not isinstance(body, dict) else None


@pytest.fixture(params=["", "/prod"], ids=["root", "base-path"])
async def pair(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Pair]:
    settings = dataclasses.replace(settings, api_token=TOKEN, base_path=request.param)
    database = Database(settings)
    store = Store(database)
    served = build_app(settings, store=store)
    fastapi = _fastapi_only(settings, store)
    try:
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=served), base_url="http://test"
            ) as a,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=fastapi), base_url="http://test"
            ) as b,
        ):
            yield Pair(a, b)
    finally:
        await database.dispose()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_creating_a_task_answers_alike(pair: Pair) -> None:
    body = {"type": " BAZ ", "execute_at": 1893499200.000001}
    created = await pair.both("POST", "/tasks", json=body, headers=AUTH)
    assert created.status_code == 201
    assert created.json()["execute_at"] == "2030-01-01T12:00:00.000001Z"
    for content_type in ("application/json", "APPLICATION/JSON; charset=utf-8", "", None):
        headers = AUTH if content_type is None else {**AUTH, "content-type": content_type}
        sent = await pair.both("POST", "/tasks", content=json.dumps(body), headers=headers)
        assert sent.status_code == 201
    # JSON in UTF-16 or UTF-32 is read too, told apart by its first bytes (docs/api.md).
    for encoding in ("utf-16", "utf-16-be", "utf-32"):
        sent = await pair.both(
            "POST", "/tasks", content=json.dumps(body).encode(encoding), headers=AUTH
        )
        assert sent.status_code == 201, (encoding, sent.text)


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"type": "baz", "execute_at": 1893499200}', {"authorization": "Bearer nope"}),
        (b'{"type": "baz", "execute_at": 1893499200}', {}),  # no token
        (b'{"type": "baz", "execute_at": 1893499200, "x": 1}', AUTH),
        (b'{"type": "qux", "execute_at": 1893499200}', AUTH),
        (b'{"type": "baz", "execute_at": "2030-01-01T12:00:00"}', AUTH),
        (b'{"type": "baz", "execute_at": 253402300800}', AUTH),
        (b'{"type": "baz"', AUTH),
        (b"", AUTH),
        (b"[]", AUTH),
        (b"\xff", AUTH),
        (b'{"type": "baz", "execute_at": NaN}', AUTH),
        (b'{"type": "baz", "execute_at": 1e400}', AUTH),
        (b"[" * 100_000, AUTH),
        (b'{"type": "baz", "execute_at": 1' + b"0" * 400 + b"}", AUTH),  # no float holds it
        (b'{"type": "baz", "execute_at": 1' + b"0" * 5000 + b"}", AUTH),
        (b'{"type": "baz", "execute_at": 1893499200}', {**AUTH, "content-type": "text/plain"}),
        (b'{"type": "baz", "execute_at": 1893499200}', {**AUTH, "idempotency-key": "a b"}),
        (b'{"type": "baz", "execute_at": 1893499200}', {**AUTH, "idempotency-key": "k" * 256}),
    ],
)
async def test_a_refused_create_answers_alike(
    pair: Pair, body: bytes, headers: dict[str, str]
) -> None:
    response = await pair.both("POST", "/tasks", content=body, headers=headers)
    assert response.status_code in (400, 401, 415, 422)


# Refused creates the hot path answers itself (rules.body_issue, json_issues, task_issues),
# each by a path and a body: the ends of each field's range, every kind of issue, unicode,
# strings and keys past what a 422 quotes, more issues than it lists.
REFUSED_HERE: list[tuple[str, bytes]] = [
    ("/tasks", b'{"type": "nope", "execute_at": "2099-01-01T00:00:00Z"}'),
    ("/tasks", b'{"type": "\\u00fcn\\u00efc\\u00f6d\\u00e9", "execute_at": 0}'),
    ("/tasks", '{"type": "ünïcödé ✓", "execute_at": 0}'.encode()),
    ("/tasks", b'{"type": "\\ud800", "execute_at": 0}'),  # a lone surrogate
    ("/tasks", b'{"type": "' + b"x" * 1000 + b'", "execute_at": 0}'),
    ("/tasks", b'{"type": null, "execute_at": [0]}'),
    ("/tasks", b'{"execute_at": 0}'),
    ("/tasks", b'{"type": "baz"}'),
    ("/tasks", b"{}"),
    ("/tasks", b'{"type": "baz", "execute_at": "2030-01-01T12:00:00"}'),
    ("/tasks", b'{"type": "baz", "execute_at": 253402300800}'),
    ("/tasks", b'{"type": "baz", "execute_at": -1}'),
    ("/tasks", b'{"type": "baz", "execute_at": 1e400}'),
    ("/tasks", b'{"type": "baz", "execute_at": NaN}'),
    ("/tasks", b'{"type": "baz", "execute_at": 1' + b"0" * 400 + b"}"),
    ("/tasks", b'{"type": "baz", "execute_at": 0, "max_attempts": 0}'),
    ("/tasks", b'{"type": "baz", "execute_at": 0, "max_attempts": 1001}'),
    ("/tasks", b'{"type": "baz", "execute_at": 0, "max_attempts": 2.5}'),
    ("/tasks", b'{"type": "baz", "execute_at": 0, "timeout_s": 0}'),
    ("/tasks", b'{"type": "baz", "execute_at": 0, "priority": 10}'),
    ("/tasks", b'{"type": "baz", "execute_at": 0, "priority": -1}'),
    ("/tasks", b'{"type": "baz", "execute_at": 0, "x": 1, "idempotency_key": "k"}'),
    ("/tasks", b'{"' + b"k" * 50 + b'": 1, "type": 3, "priority": true, "\xc3\xa9": 2}'),
    ("/tasks", json.dumps({f"extra{n}": n for n in range(30)}).encode()),
    ("/tasks", b"null"),
    ("/tasks", b"[]"),
    ("/tasks", b'"baz"'),
    ("/tasks", b"1"),
    ("/tasks", b""),
    ("/tasks", b" "),
    ("/tasks", b'{"type": "baz"'),
    ("/tasks", b'{"type": "baz", "execute_at": 0,}'),
    ("/tasks", b"{'type': 'baz'}"),
    ("/tasks", b'{"type": "baz", "execute_at": 1e-400}'),
    ("/tasks/batch", b'{"tasks": [{"type": "baz", "execute_at": 1e-400}]}'),
    ("/tasks/batch", b'{"tasks": [{"type": "nope", "execute_at": 0}]}'),
    ("/tasks/batch", b'{"tasks": [{"type": "baz", "execute_at": 0}, {"type": "baz"}, [], null]}'),
    ("/tasks/batch", b'{"tasks": [{"type": "baz", "execute_at": 0, "idempotency_key": "a b"}]}'),
    (
        "/tasks/batch",
        b'{"tasks": [{"type": "baz", "execute_at": 0, "idempotency_key": "k", "x": 1},'
        b' {"type": "qux", "execute_at": "2030-01-01T00:00:00", "idempotency_key": null}]}',
    ),
    ("/tasks/batch", json.dumps({"tasks": [{"type": "nope", "execute_at": 0}] * 25}).encode()),
    # Refused at its last item, read past its first slices.
    (
        "/tasks/batch",
        json.dumps({"tasks": [{"type": "baz", "execute_at": 0}] * 9_999 + [{}]}).encode(),
    ),
]


@pytest.mark.parametrize("base_path", ["", "/prod"], ids=["root", "base-path"])
async def test_a_refused_create_is_answered_by_the_hot_path_to_the_byte(
    settings: Settings, base_path: str, sql: Any
) -> None:
    """Each as the FastAPI app answers it (status, headers in their order, body), without
    building the app, and nothing written; a refusal the rules cannot word as it does (bytes
    that are not UTF-8: a 400) is still the app's."""
    settings = dataclasses.replace(settings, api_token=TOKEN, base_path=base_path)
    built: list[bool] = []

    def build() -> Any:
        built.append(True)
        return build_app(settings, store=store, middleware=False)

    store = Store(Database(settings))
    hot = wrap(Lazy(build), settings, store)
    fastapi = _fastapi_only(settings, store)
    limit = settings.max_body_bytes
    refused = [*REFUSED_HERE, ("/tasks/batch", b'{"tasks": [' + b"[" * max_values(limit))]
    try:
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=hot), base_url="http://t") as a,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=fastapi), base_url="http://t") as b,
        ):
            for path, body in refused:
                url = f"{base_path}{path}"
                for headers in (AUTH, {**AUTH, "Idempotency-Key": "k-1"}):
                    got = await a.post(url, content=body, headers=headers)
                    want = await b.post(url, content=body, headers=headers)
                    assert got.status_code == 422, (body[:80], got.text)
                    assert (got.headers.raw, got.content) == (want.headers.raw, want.content)
            assert built == []
            assert sql("SELECT count(*) FROM tasks") == [(0,)]
            got = await a.post(f"{base_path}/tasks", content=b"\xff", headers=AUTH)
            assert got.status_code == 400
            assert built == [True]
    finally:
        await store.database.dispose()


@pytest.mark.parametrize(
    ("path", "served", "passed"),
    [("/tasks", [1, 100], [101, 965, 5_000]), ("/tasks/batch", [1, 190], [965, 5_000])],
)
async def test_a_deeply_nested_body_is_the_fastapi_apps_to_read(
    settings: Settings, path: str, served: list[int], passed: list[int]
) -> None:
    """json.loads' nesting limit is counted on the caller's stack (deeper in FastAPI's
    route than in the hot path): a body nested near it, whose deep value a later duplicate
    key drops, was created by the hot path where FastAPI refused it (400). The hot path
    reads one task only with at most 100 brackets in all, and a batch (by pydantic-core)
    to at most 200 levels, whatever the stack; other bodies go on to the FastAPI app."""
    passed_on: list[int] = []

    async def fastapi(scope: Any, receive: Any, send: Any) -> None:
        passed_on.append(len((await receive())["body"]))
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def body(depth: int) -> bytes:
        # `depth` brackets in all, the task's own and those of its first "type" (which
        # the second one replaces).
        dropped = b"[" * (depth - 1) + b"]" * (depth - 1) or b"null"
        task = b'{"type": ' + dropped + b', "type": "foo", "execute_at": 0}'
        return task if path == "/tasks" else b'{"tasks": [' + task + b"]}"

    store = Store(Database(settings))
    bodies = {depth: body(depth) for depth in served + passed}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=HotPath(fastapi, settings, store)),
            base_url="http://test",
        ) as client:
            answers = {
                d: (await client.post(path, content=b)).status_code for d, b in bodies.items()
            }
    finally:
        await store.database.dispose()
    assert answers == dict.fromkeys(served, 201) | dict.fromkeys(passed, 418)
    assert passed_on == [len(bodies[d]) for d in passed]


async def test_idempotent_creates_answer_alike(pair: Pair) -> None:
    body = {"type": "foo", "execute_at": "2030-01-01T12:00:00+02:00"}
    # The same key to both apps: whichever is first creates, the other gets it back (200);
    # so each app creates with its own key, then repeats it, then repeats it wrongly.
    for client, key in ((pair.served, "served-1"), (pair.fastapi, "fastapi-1")):
        headers = {**AUTH, "Idempotency-Key": key}
        assert (await client.post("/tasks", json=body, headers=headers)).status_code == 201
    for _ in range(2):
        served = await pair.served.post(
            "/tasks", json=body, headers={**AUTH, "Idempotency-Key": "served-1"}
        )
        fastapi = await pair.fastapi.post(
            "/tasks", json=body, headers={**AUTH, "Idempotency-Key": "fastapi-1"}
        )
        assert served.status_code == fastapi.status_code == 200
        assert _same(served) == _same(fastapi)
    other = {**body, "type": "bar"}
    for key in ("served-1", "fastapi-1"):
        headers = {**AUTH, "Idempotency-Key": key}
        conflict = await pair.both("POST", "/tasks", json=other, headers=headers)
        assert conflict.status_code == 409


async def test_reading_a_task_answers_alike(pair: Pair) -> None:
    created = await pair.served.post("/tasks", json={"type": "baz", "execute_at": 0}, headers=AUTH)
    task_id = created.json()["id"]
    for method in ("GET", "HEAD"):
        for path in (f"/tasks/{task_id}", f"/tasks/{task_id:020d}", "/tasks/999999999999"):
            await pair.both(method, path, headers=AUTH)
        for path in ("/tasks/0", f"/tasks/{2**63}", "/tasks/1" + "0" * 30, "/tasks/\uff11"):
            refused = await pair.both(method, path, headers=AUTH)
            assert refused.status_code in (404, 422)
        assert (await pair.both(method, f"/tasks/{task_id}")).status_code == 401
    shown = await pair.both("GET", f"/tasks/{task_id}", headers=AUTH)
    assert shown.json()["id"] == task_id


async def test_listing_tasks_answers_alike(pair: Pair, sql: Any) -> None:
    """The first page, which the hot path serves when its query holds a plain `limit` at
    most, and every other query, which the FastAPI route reads."""
    items = [{"type": "baz", "execute_at": 0}, {"type": "foo", "execute_at": 1893499200.5}]
    await pair.served.post("/tasks/batch", json={"tasks": items * 3}, headers=AUTH)
    sql("UPDATE tasks SET state = 'failed', attempts = 1, finished_at = now(), error = 'é\n'"
        " WHERE kind = 'foo'")  # fmt: skip
    for query in ("", "?limit=1", "?limit=5", "?limit=6", "?limit=7", "?limit=100",
                  "?limit=1000"):  # fmt: skip
        page = await pair.both("GET", f"/tasks{query}", headers=AUTH)
        assert page.status_code == 200
    assert [t["id"] for t in page.json()["items"]] == sorted(
        (t["id"] for t in page.json()["items"]), reverse=True
    )
    assert len(page.json()["items"]) == 6
    cursor = (await pair.served.get("/tasks?limit=5", headers=AUTH)).json()["next_cursor"]
    assert cursor is not None
    for query in ("?limit=0", "?limit=1001", "?limit=01", "?limit=+5", "?limit=5.0",
                  "?limit=", "?limit=1&limit=2", "?limit=\uff15", "?limit=99999",
                  "?limit=5&state=failed", "?state=failed", "?type=foo&limit=2", "?sort=id",
                  f"?limit=1&cursor={cursor}", f"?cursor={cursor}", "?cursor=x", "?x=1",
                  "?limit=5&"):  # fmt: skip
        await pair.both("GET", f"/tasks{query}", headers=AUTH)
    assert (await pair.both("GET", "/tasks?limit=5")).status_code == 401


# Queries of GET /tasks the hot path reads (rules.list_query): each filter, order, limit and
# cursor, alone and together, at the ends of their ranges. (`{cursor}`: a page's.)
SERVED_QUERIES = (
    "?state=failed", "?state=failed&state=cancelled", "?state=cancelled&state=failed",
    "?state=failed&state=failed", "?type=foo", "?type=FOO", "?type=%20foo%09", "?type=foo&type=baz",
    "?type=gone", "?sort=id", "?sort=-id", "?sort=execute_at", "?sort=-execute_at",
    "?sort=finished_at", "?sort=-finished_at", "?created_after=0",
    "?created_before=2030-01-01T00:00:00Z", "?execute_after=1893499200.5",
    "?execute_after=1893499200.4999999", "?execute_before=253402300799.9999999",
    "?execute_before=9999-12-31T23:59:59.999999Z", "?finished_after=1970-01-01T00:00:00%2B01:00",
    "?finished_before=2099-01-01T00:00:00.0000001Z", "?error=%C3%A9", "?error=%25", "?error=E%0A",
    "?schedule=nightly", "?payload=null", "?payload=%7B%22a%22%3A1%7D", "?payload=%5B%5D",
    "?state=failed&limit=1&sort=execute_at", "?type=foo&limit=1000&sort=-finished_at",
    "?state=scheduled&type=baz&limit=2", "?limit=1&state=failed&error=%C3%A9",
)  # fmt: skip
# Refused (a 422, answered by the FastAPI app in its words), or written otherwise than
# plainly: the FastAPI app reads them.
OTHER_QUERIES = (
    "?state=nope", "?state=", "?state=FAILED", "?type=", "?type=1x", "?type=a%00",
    "?sort=", "?sort=+id", "?sort=id&sort=id", "?created_after=x", "?created_after=",
    "?execute_before=1e400", "?finished_after=2030-01-01T00:00:00", "?error=", "?error=%20",
    "?error=a&error=b", "?error=" + "x" * 1001, "?payload=%7B", "?payload=", "?schedule=BAD!",
    "?schedule=", "?cursor=x", "?cursor=", "?limit=0", "?limit=1001", "?limit=01",
    "?limit=+5", "?limit=", "?limit=1&limit=1", "?limit=%EF%BC%95", "?dry_run=1&dry_run=2",
    "?state=failed&state=nope", "?%ff=1", "?state=%ff", "?limit=1&x=",
    "?limit=1&unknown=1&state=failed&unknown=2", "?dry_run=true", "?types=foo", "?=1",
)  # fmt: skip


async def test_every_listing_the_hot_path_reads_answers_alike_byte_for_byte(
    pair: Pair, sql: Any
) -> None:
    """Status, headers and body, byte for byte, for every query the hot path reads, pages
    that go on by their cursors, a cursor past the last id, and the 422 of a cursor sent with
    a sort it was not made in (a domain error: `status_of` answers it on either path); alike
    for every query it leaves to the FastAPI app."""
    items = [{"type": "baz", "execute_at": 0}, {"type": "foo", "execute_at": 1893499200.5},
             {"type": "foo", "execute_at": 253402300799}]  # fmt: skip
    await pair.served.post("/tasks/batch", json={"tasks": items * 4}, headers=AUTH)
    sql("UPDATE tasks SET state = 'failed', attempts = 1, finished_at = now(), error = 'é\n'"
        " WHERE kind = 'foo' AND id % 2 = 0")  # fmt: skip
    sql("UPDATE tasks SET state = 'cancelled', finished_at = now(), payload = '{\"a\": 1}'"
        " WHERE kind = 'baz' AND id % 3 = 0")  # fmt: skip
    first = await pair.served.get("/tasks?limit=2&sort=execute_at", headers=AUTH)
    cursor = first.json()["next_cursor"]
    assert cursor is not None
    served = (*SERVED_QUERIES, f"?cursor={cursor}", f"?limit=1&sort=execute_at&cursor={cursor}",
              f"?sort=id&cursor={cursor}", f"?cursor={cursor[:-1]}9999999999")  # fmt: skip
    statuses = set()
    for query in served + OTHER_QUERIES:
        for headers in (AUTH, {}):
            a = await pair.served.get(f"/tasks{query}", headers=headers)
            b = await pair.fastapi.get(f"/tasks{query}", headers=headers)
            assert (a.status_code, a.headers.multi_items(), a.content) == (
                b.status_code,
                b.headers.multi_items(),
                b.content,
            ), query
            statuses.add((query in OTHER_QUERIES, headers == {}, a.status_code))
    assert statuses == {(False, False, 200), (False, False, 422),
                        (True, False, 200), (True, False, 422), (False, True, 401),
                        (True, True, 401)}  # fmt: skip
    # Every page of a filtered listing, by its cursors.
    query = "?state=failed&state=scheduled&limit=1&sort=-execute_at"
    seen: list[int] = []
    while query:
        a = await pair.served.get(f"/tasks{query}", headers=AUTH)
        b = await pair.fastapi.get(f"/tasks{query}", headers=AUTH)
        assert (a.status_code, a.content) == (b.status_code, b.content)
        seen += [task["id"] for task in a.json()["items"]]
        cursor = a.json()["next_cursor"]
        query = cursor and f"?state=failed&state=scheduled&limit=1&cursor={cursor}"
    wanted = sql("SELECT id FROM tasks WHERE state IN ('failed', 'scheduled')"
                 " ORDER BY execute_at DESC, id DESC")  # fmt: skip
    assert seen == [task_id for (task_id,) in wanted]


async def test_cancelling_a_task_answers_alike(pair: Pair, sql: Any) -> None:
    ids = []
    for _ in range(3):
        body = {"type": "foo", "execute_at": 1893499200}
        ids.append((await pair.served.post("/tasks", json=body, headers=AUTH)).json()["id"])
    sql("UPDATE tasks SET state = 'succeeded', attempts = 1, finished_at = now() WHERE id = %s",
        ids[2])  # fmt: skip
    # The first of each pair cancels; the second finds it cancelled: the same task.
    cancelled = await pair.both("POST", f"/tasks/{ids[0]}/cancel", headers=AUTH)
    assert (cancelled.status_code, cancelled.json()["state"]) == (200, "cancelled")
    # Any body, and any content type, alike: the route reads none.
    sent = {"content": b"\xff{", "headers": {**AUTH, "content-type": "text/plain"}}
    assert (await pair.both("POST", f"/tasks/{ids[1]}/cancel", **sent)).status_code == 200
    assert (await pair.both("POST", f"/tasks/{ids[2]}/cancel", headers=AUTH)).status_code == 409
    for path in ("/tasks/999999999999/cancel", f"/tasks/{ids[0]:020d}/cancel"):
        assert (await pair.both("POST", path, headers=AUTH)).status_code in (200, 404)
    for path in ("/tasks/0/cancel", f"/tasks/{2**63}/cancel", "/tasks/\uff11/cancel",
                 "/tasks//cancel", "/tasks/1" + "0" * 30 + "/cancel", "/tasks/x/cancel",
                 "/tasks/cancel/cancel"):  # fmt: skip
        assert (await pair.both("POST", path, headers=AUTH)).status_code in (404, 405, 422)
    assert (await pair.both("POST", f"/tasks/{ids[0]}/cancel")).status_code == 401
    assert (await pair.both("GET", f"/tasks/{ids[0]}/cancel", headers=AUTH)).status_code == 405


async def test_a_database_that_is_down_answers_alike(settings: Settings) -> None:
    down = dataclasses.replace(
        settings, database_url="postgresql://nobody@127.0.0.1:1/none", db_pool_size=0
    )
    store = Store(Database(down))
    for app in (build_app(down, store=store), _fastapi_only(down, store)):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            created = await client.post("/tasks", json={"type": "baz", "execute_at": 0})
            shown = await client.get("/tasks/1")
        for response in (created, shown):
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json() == {"detail": "database unavailable, try again shortly"}


async def test_the_hot_path_does_not_build_the_fastapi_app(settings: Settings) -> None:
    built: list[bool] = []

    def build() -> Any:
        built.append(True)
        return build_app(settings, store=store, middleware=False)

    store = Store(Database(settings))
    app = wrap(Lazy(build), settings, store)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            created = await client.post("/tasks", json={"type": "baz", "execute_at": 0})
            assert created.status_code == 201
            shown = await client.get(created.headers["location"])
            assert shown.json() == created.json()
            items = [
                {"type": t, "execute_at": at}
                for t, at in (("baz", 0), (" Foo", "1970-01-01T00:00:00Z"))
            ]
            batch = await client.post("/tasks/batch", json={"tasks": items})
            assert batch.status_code == 201
            cancelled = await client.post(f"{created.headers['location']}/cancel")
            assert cancelled.json() == {**shown.json(), **cancelled.json(), "state": "cancelled"}
            for query in ("", "?limit=1", "?limit=1000", *SERVED_QUERIES):
                assert (await client.get(f"/tasks{query}")).status_code == 200, query
            for path in ("/healthz", "/stats", "/metrics", "/"):
                for method in ("GET", "HEAD"):
                    assert (await client.request(method, path)).status_code == 200, path
            assert built == []
            assert (await client.get("/tasks?state=nope")).status_code == 422
            assert built == [True]
    finally:
        await store.database.dispose()


# Unix seconds whose microseconds need care: halves (to even), 17 significant digits, the
# smallest float, exponents, the last microsecond a float can name before the end of 9999.
TIMES = [
    0, 1, 0.0000005, 0.0000015, 0.0000025, 1.0000025, 5e-324, 1e-07, 1.5e-06, 0.1,
    123456789.1234565, 1893499200.000001, 1893499200.0000005, 2**37, 253402300799,
    253402300799.99997, 253402300799.99998, 1700000000.9999995, 1700000000.9999994,
]  # fmt: skip


async def test_a_batch_stores_each_time_as_one_create_does(pair: Pair) -> None:
    items = [{"type": "baz", "execute_at": t} for t in TIMES]
    items += [
        {"type": "FOO ", "execute_at": at}
        for at in (
            "2030-01-01T12:00:00.1234567+01:00",
            "2030-01-01T12:00:00.1Z",
            "2030-01-01T12:00:00.123456Z",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "2030-01-01t12:00:00z",
        )
    ]
    created = await pair.served.post("/tasks/batch", json={"tasks": items}, headers=AUTH)
    assert created.status_code == 201, created.text
    for item, task_id in zip(items, created.json()["ids"], strict=True):
        one = await pair.fastapi.post("/tasks", json=item, headers=AUTH)
        shown = await pair.served.get(f"/tasks/{task_id}", headers=AUTH)
        assert shown.json()["execute_at"] == one.json()["execute_at"], item
        assert shown.json()["type"] == one.json()["type"]


@pytest.mark.parametrize(
    "tasks",
    [
        [{"type": "baz", "execute_at": 1893499200}] * 3,
        [{"type": " Bar", "execute_at": "2030-01-01T12:00:00Z"}, {"type": "foo", "execute_at": 0}],
        [{"type": "baz", "execute_at": 1893499200, "idempotency_key": "k1"}],
        [{"type": "baz", "execute_at": 1893499200, "idempotency_key": None}],
        [],
        [{"type": "baz", "execute_at": 253402300800}],
        [{"type": "baz", "execute_at": -1}],
        [{"type": "baz", "execute_at": 10**400}],
        [{"type": "baz", "execute_at": True}],
        [{"type": "baz", "execute_at": None}],
        [{"type": "baz", "execute_at": "2030-01-01T12:00:00"}],
        [{"type": "baz", "execute_at": "2030-06-30T23:59:60Z"}],
        [{"type": "baz", "execute_at": "0000-01-01T00:00:00Z"}],
        [{"type": "baz", "execute_at": "2030-02-30T00:00:00Z"}],
        [{"type": "qux", "execute_at": 0}],
        [{"type": ["baz"], "execute_at": 0}],
        [{"type": "baz"}],
        [{"type": "baz", "execute_at": 0, "x": 1}],
        [["baz", 0]],
        [{"type": "baz", "execute_at": 0}] * 10_001,
    ],
    ids=lambda tasks: json.dumps(tasks)[:60],
)
async def test_a_batch_answers_alike(pair: Pair, tasks: list[Any]) -> None:
    response = await pair.both("POST", "/tasks/batch", json={"tasks": tasks}, headers=AUTH)
    if response.status_code == 201:
        # Ids differ between the two apps' tasks; their number and order must not.
        assert len(response.json()["ids"]) == len(tasks)


async def test_a_batch_written_in_slices_keeps_its_order(pair: Pair, sql: Any) -> None:
    # Past the first slices (tasks.FIRST_SLICE, then twice as many each): ids in the order
    # given, each with its own time, however the batch was cut.
    n = tasks.FIRST_SLICE * 7 + 3
    items = [{"type": "baz", "execute_at": 1893499200 + i + 0.5} for i in range(n)]
    created = await pair.served.post("/tasks/batch", json={"tasks": items}, headers=AUTH)
    assert created.status_code == 201, created.text
    ids = created.json()["ids"]
    assert ids == sorted(ids) and len(set(ids)) == n
    rows = sql(
        "SELECT id, extract(epoch FROM execute_at) FROM tasks WHERE id = ANY(%s) ORDER BY id",
        ids,
    )
    assert [(task_id, float(at)) for task_id, at in rows] == [
        (task_id, item["execute_at"]) for task_id, item in zip(ids, items, strict=True)
    ]


@pytest.mark.parametrize(
    "last",
    [
        {"type": "baz", "execute_at": -1},  # refused: 422
        {"type": "qux", "execute_at": 0},  # refused: 422
        {"type": "baz", "execute_at": 0, "idempotency_key": "last"},  # created, by FastAPI
    ],
    ids=["time", "type", "key"],
)
async def test_a_batch_read_past_its_first_slices_is_written_once_or_not_at_all(
    pair: Pair, sql: Any, last: dict[str, Any]
) -> None:
    # The hot path sends the first slices before it reads the last item; an item it does
    # not take (refused, or with a key) rolls them back, and the FastAPI app answers alone.
    items = [{"type": "baz", "execute_at": 1893499200 + i} for i in range(9_999)] + [last]
    [(before,)] = sql("SELECT count(*) FROM tasks")
    response = await pair.both("POST", "/tasks/batch", json={"tasks": items}, headers=AUTH)
    [(after,)] = sql("SELECT count(*) FROM tasks")
    if "idempotency_key" in last:
        assert response.status_code == 201
        # One batch through each app, each written once; the keyed task once in all.
        assert after - before == 2 * 9_999 + 1
    else:
        assert response.status_code == 422
        assert after == before


@pytest.mark.parametrize(
    "body",
    [b'{"tasks": [{"type": "baz", "execute_at": NaN}]}', b'{"tasks": [], "x": 1}', b"[]", b"{"],
)
async def test_a_refused_batch_answers_alike(pair: Pair, body: bytes) -> None:
    response = await pair.both("POST", "/tasks/batch", content=body, headers=AUTH)
    assert response.status_code in (400, 422)


async def test_concurrent_creates_and_reads_share_statements_and_get_their_own_answers(
    settings: Settings,
) -> None:
    store = Store(Database(settings))
    statements: list[str] = []
    run = store._all

    async def counted(sql: str, *args: Any, **kwargs: Any) -> list[Any]:
        statements.append(sql)
        return await run(sql, *args, **kwargs)

    store._all = counted  # type: ignore[method-assign]
    kinds = ("foo", "bar", "baz")
    sent = [{"type": kinds[i % 3], "execute_at": 1893499200 + i / 1e6} for i in range(60)]
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=build_app(settings, store=store)),
            base_url="http://test",
        ) as client:
            created = await asyncio.gather(*(client.post("/tasks", json=body) for body in sent))
            creates = len(statements)
            ids = [response.json()["id"] for response in created]
            missing = [max(ids) + 1000 + i for i in range(5)]
            shown = await asyncio.gather(*(client.get(f"/tasks/{i}") for i in ids + missing))
    finally:
        await store.database.dispose()
    assert [r.status_code for r in created] == [201] * 60
    assert len(set(ids)) == 60
    for i, (body, response) in enumerate(zip(sent, created, strict=True)):
        task = response.json()
        assert task["type"] == body["type"]
        at = datetime.fromisoformat(task["execute_at"].replace("Z", "+00:00"))
        assert at == datetime(2030, 1, 1, 12, tzinfo=UTC) + timedelta(microseconds=i)
        assert response.headers["location"] == f"/tasks/{task['id']}"
    assert creates < 60  # they shared statements
    assert len(statements) - creates < 65
    assert [r.json() for r in shown[:60]] == [r.json() for r in created]
    assert [r.status_code for r in shown[60:]] == [404] * 5


async def test_an_answer_that_cannot_be_sent_is_a_500_in_json(settings: Settings) -> None:
    """Its messages are made before the first is sent: a header that cannot be encoded
    leaves room to answer 500 as the FastAPI app does."""
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def work() -> tuple[int, bytes, dict[str, str]]:
        return 201, b"{}", {"Location": "/\u751f/tasks/1"}

    async def unused(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not passed on")

    hot = HotPath(unused, settings, Store(Database(settings)))
    await hot._send_answer({"path": "/tasks"}, send, work())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {"detail": "internal error"}


@pytest.mark.parametrize("path", ["/tasks", "/tasks/batch"])
async def test_a_body_with_too_many_values_answers_alike(
    pair: Pair, path: str, settings: Settings
) -> None:
    """Refused before either reads it (parsing.count_values): more arrays opened than JSON
    of the body limit can hold."""
    limit = settings.max_body_bytes
    body = b'{"tasks": [' + b"[" * max_values(limit)
    response = await pair.both("POST", path, content=body, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"loc": ["body"], "msg": too_many_values(limit), "type": "too_long"}
    ]


# --- payloads ------------------------------------------------------------------------------
LIMIT = 65_536  # TASKRUNNER_MAX_PAYLOAD_BYTES's default


def sized(size: int) -> dict[str, str]:
    """A payload of exactly `size` bytes as compact JSON in UTF-8, in 1, 2, 3 and 4-byte
    characters: `{"s":"..."}` is 8 bytes around its text."""
    text = "aé日🎉" * ((size - 8) // 10)
    return {"s": text + "x" * (size - 8 - len(text.encode()))}


def nested(depth: int) -> Any:
    value: Any = "deep"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


PAYLOADS = [
    {"to": "ada@example.com", "cc": ["b@é.example"], "n": 3, "x": [1, 2.5, None, True, False]},
    'just a string \u2603 \U0001f389 "quoted" \\ back \n line',
    0,
    -1.5e-07,
    1e22,
    10**30,
    [],
    {},
    {"z": 1, "a": {"nested": [{"deeper": [[]]}]}},
    nested(100),
    sized(LIMIT),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: json.dumps(p)[:30])
async def test_a_payload_answers_alike_and_comes_back_intact(pair: Pair, payload: Any) -> None:
    body = {"type": "baz", "execute_at": 1893499200, "payload": payload}
    created = await pair.both("POST", "/tasks", json=body, headers=AUTH)
    assert created.status_code == 201, created.text
    # Numbers come back as numbers of the same value (1e22 may come back as an integer).
    assert created.json()["payload"] == payload
    shown = await pair.both("GET", f"/tasks/{created.json()['id']}", headers=AUTH)
    assert shown.json()["payload"] == payload
    batch = await pair.both(
        "POST", "/tasks/batch", json={"tasks": [body, {**body, "payload": None}]}, headers=AUTH
    )
    assert batch.status_code == 201, batch.text
    first, second = batch.json()["ids"]
    assert (await pair.served.get(f"/tasks/{first}", headers=AUTH)).json()["payload"] == payload
    assert (await pair.served.get(f"/tasks/{second}", headers=AUTH)).json()["payload"] is None


async def test_a_task_without_a_payload_answers_null(pair: Pair) -> None:
    created = await pair.both("POST", "/tasks", json={"type": "baz", "execute_at": 0}, headers=AUTH)
    assert created.json()["payload"] is None


_REFUSED_PAYLOADS = {
    "over the limit": (json.dumps(sized(LIMIT + 1)), f"{LIMIT + 1:,} bytes", f"{LIMIT:,}"),
    "NaN": ("NaN", "NaN", None),
    "Infinity": ('{"a": [-Infinity]}', "Infinity", None),
    "too large a number": ("1e400", "Infinity", None),
    "U+0000": ('"a\\u0000b"', "U+0000", None),
    "U+0000 in a key": ('{"\\u0000": 1}', "U+0000", None),
    "a lone surrogate": ('"\\ud800"', "surrogate", None),
    "nested past the limit": (json.dumps(nested(101)), "deeper than 100", None),
}


@pytest.mark.parametrize("name", _REFUSED_PAYLOADS)
async def test_a_refused_payload_answers_alike_writes_nothing_and_says_why(
    pair: Pair, sql: Any, name: str
) -> None:
    payload, says, also = _REFUSED_PAYLOADS[name]
    [(before,)] = sql("SELECT count(*) FROM tasks")
    one = f'{{"type": "baz", "execute_at": 0, "payload": {payload}}}'
    response = await pair.both("POST", "/tasks", content=one, headers=AUTH)
    assert response.status_code == 422, response.text
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["body", "payload"]
    assert says in issue["msg"] and (also is None or also in issue["msg"])
    # A batch of 10,000 whose last item is refused: the slices before it were sent, and are
    # rolled back; the issue names the item.
    good = ",".join(['{"type": "baz", "execute_at": 0, "payload": {"n": 1}}'] * 9_999)
    batch = f'{{"tasks": [{good}, {one}]}}'
    response = await pair.both("POST", "/tasks/batch", content=batch, headers=AUTH)
    assert response.status_code == 422, response.text
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["body", "tasks", 9_999, "payload"]
    assert says in issue["msg"]
    assert sql("SELECT count(*) FROM tasks") == [(before,)]


async def test_a_payload_nested_past_what_json_reads_is_refused_not_a_500(pair: Pair) -> None:
    deep = '{"type": "baz", "execute_at": 0, "payload": ' + "[" * 5000 + "]" * 5000 + "}"
    for path, body in (("/tasks", deep), ("/tasks/batch", f'{{"tasks": [{deep}]}}')):
        response = await pair.both("POST", path, content=body, headers=AUTH)
        assert response.status_code in (400, 422), response.text


async def test_an_idempotent_repeat_is_compared_with_the_payload_it_was_created_with(
    pair: Pair,
) -> None:
    payload = {"a": 1, "b": [1, 2, {"c": "é"}]}
    for client, key in ((pair.served, "p-served"), (pair.fastapi, "p-fastapi")):
        headers = {**AUTH, "Idempotency-Key": key}
        body = {"type": "foo", "execute_at": 1893499200, "payload": payload}
        first = await client.post("/tasks", json=body, headers=headers)
        assert first.status_code == 201
        # The same payload, its keys in another order and spaced otherwise: a repeat.
        again = (
            '{"type":"foo","execute_at":1893499200,"payload":{ "b" : [1,2,{"c":"é"}], "a":1.0 }}'
        )
        repeat = await client.post("/tasks", content=again.encode(), headers=headers)
        assert repeat.status_code == 200, repeat.text
        assert repeat.json()["id"] == first.json()["id"]
        for other in ({"a": 1}, {"a": True, "b": [1, 2, {"c": "é"}]}, None, "x"):
            conflict = await client.post("/tasks", json={**body, "payload": other}, headers=headers)
            assert conflict.status_code == 409, (other, conflict.text)
            assert "payload" in conflict.json()["detail"]
        # Changed by PATCH since: a repeat is still compared with what created it.
        patched = await client.patch(
            f"/tasks/{first.json()['id']}", json={"payload": {"new": 1}}, headers=AUTH
        )
        assert patched.status_code == 200 and patched.json()["payload"] == {"new": 1}
        repeat = await client.post("/tasks", json=body, headers=headers)
        assert repeat.status_code == 200 and repeat.json()["payload"] == {"new": 1}
        moved = await client.post("/tasks", json={**body, "payload": {"new": 1}}, headers=headers)
        assert moved.status_code == 409
    # Absent and null are the same request.
    for client, key in ((pair.served, "n-served"), (pair.fastapi, "n-fastapi")):
        headers = {**AUTH, "Idempotency-Key": key}
        body = {"type": "foo", "execute_at": 1893499200}
        assert (await client.post("/tasks", json=body, headers=headers)).status_code == 201
        repeat = await client.post("/tasks", json={**body, "payload": None}, headers=headers)
        assert repeat.status_code == 200


async def test_a_batch_repeat_is_compared_with_each_items_payload(pair: Pair) -> None:
    item = {"type": "baz", "execute_at": 0, "idempotency_key": "b-1", "payload": {"x": [1]}}
    first = await pair.served.post("/tasks/batch", json={"tasks": [item]}, headers=AUTH)
    assert first.status_code == 201
    same = {**item, "payload": {"x": [1.0]}}
    repeat = await pair.both("POST", "/tasks/batch", json={"tasks": [same]}, headers=AUTH)
    assert repeat.status_code == 201 and repeat.json()["ids"] == first.json()["ids"]
    other = {**item, "payload": {"x": [2]}}
    conflict = await pair.both("POST", "/tasks/batch", json={"tasks": [other]}, headers=AUTH)
    assert conflict.status_code == 409 and "payload" in conflict.json()["detail"]
    # Two items of one batch with one key and two payloads.
    twins = [{**item, "idempotency_key": "b-2"}, {**other, "idempotency_key": "b-2"}]
    conflict = await pair.both("POST", "/tasks/batch", json={"tasks": twins}, headers=AUTH)
    assert conflict.status_code == 409 and "payload" in conflict.json()["detail"]
    twins = [{**item, "idempotency_key": "b-3"}, {**same, "idempotency_key": "b-3"}]
    shared = await pair.served.post("/tasks/batch", json={"tasks": twins}, headers=AUTH)
    assert shared.status_code == 201 and len(set(shared.json()["ids"])) == 1


# A task's options at the ends of their ranges (foo's own timeout is 1.05 s in these tests:
# foo_delay_s + 1), and what each answer shows for them.
OPTIONS = [
    ({}, (3, 0, None)),
    ({"max_attempts": 1, "priority": 0, "timeout_s": None}, (1, 0, None)),
    # Null is the default of each option, as absent.
    ({"max_attempts": None, "priority": None, "timeout_s": None}, (3, 0, None)),
    ({"max_attempts": None, "priority": 9}, (3, 9, None)),
    ({"max_attempts": 1000, "priority": 9, "timeout_s": 1.05}, (1000, 9, 1.05)),
    ({"timeout_s": 1}, (3, 0, 1.0)),
    ({"timeout_s": 1e-07, "priority": 5}, (3, 5, 1e-07)),
    ({"max_attempts": 1000.0, "priority": 9.0}, (1000, 9, None)),  # (JSON Schema's integers)
]


@pytest.mark.parametrize(("options", "shown"), OPTIONS, ids=[str(o) for o, _ in OPTIONS])
async def test_options_answer_alike_and_come_back(
    pair: Pair, sql: Any, options: dict[str, Any], shown: tuple[Any, ...]
) -> None:
    body = {"type": "foo", "execute_at": 1893499200, **options}
    created = await pair.both("POST", "/tasks", json=body, headers=AUTH)
    assert created.status_code == 201
    task = created.json()
    assert (task["max_attempts"], task["priority"], task["timeout_s"]) == shown
    assert (await pair.both("GET", f"/tasks/{task['id']}", headers=AUTH)).json() == task
    plain = {"type": "baz", "execute_at": 0}
    batch = await pair.both("POST", "/tasks/batch", json={"tasks": [body, plain]}, headers=AUTH)
    assert batch.status_code == 201
    made, default = [
        (await pair.both("GET", f"/tasks/{i}", headers=AUTH)).json() for i in batch.json()["ids"]
    ]
    assert (made["max_attempts"], made["priority"], made["timeout_s"]) == shown
    assert (default["max_attempts"], default["priority"], default["timeout_s"]) == (3, 0, None)
    keyed = {**body, "idempotency_key": f"k-{len(options)}-{task['id']}"}
    ids = (await pair.served.post("/tasks/batch", json={"tasks": [keyed]}, headers=AUTH)).json()
    [row] = sql("SELECT max_attempts, priority, timeout_s FROM tasks WHERE id = %s", ids["ids"][0])
    assert row == shown


# Each refusal, and the words its 422 says it in.
REFUSED_OPTIONS = [
    ("max_attempts", 0, "1 to 1,000"),
    ("max_attempts", 1001, "1 to 1,000"),
    ("max_attempts", -1, "1 to 1,000"),
    ("max_attempts", True, "1 to 1,000"),
    ("max_attempts", 2.5, "1 to 1,000"),
    ("max_attempts", 1000.5, "1 to 1,000"),
    ("max_attempts", "3", "1 to 1,000"),
    ("max_attempts", 10**400, "1 to 1,000"),
    ("priority", 10, "0 (runs first) to 9"),
    ("priority", -1, "0 (runs first) to 9"),
    ("priority", False, "0 (runs first) to 9"),
    ("priority", 0.5, "0 (runs first) to 9"),
    ("timeout_s", 0, "above 0"),
    ("timeout_s", -0.5, "above 0"),
    ("timeout_s", True, "above 0"),
    ("timeout_s", "5", "above 0"),
    ("timeout_s", float("nan"), "above 0"),
    ("timeout_s", 10**400, "above 0"),
    ("timeout_s", 1.0500000000000003, "at most 1.05 s"),  # foo's own, and the next float
    ("timeout_s", 2, "at most 1.05 s"),
]


@pytest.mark.parametrize(
    ("name", "value", "says"),
    REFUSED_OPTIONS,
    ids=[f"{n}={v!r:.20}" for n, v, _ in REFUSED_OPTIONS],
)
async def test_a_refused_option_answers_alike_names_the_field_and_writes_nothing(
    pair: Pair, sql: Any, name: str, value: Any, says: str
) -> None:
    body = {"type": "foo", "execute_at": 1893499200, name: value}
    # (json.dumps writes NaN, as some clients do; httpx's `json=` refuses to.)
    refused = await pair.both("POST", "/tasks", content=json.dumps(body), headers=AUTH)
    assert refused.status_code == 422
    [issue] = refused.json()["detail"]
    assert issue["loc"] == ["body", name] and name in issue["msg"] and says in issue["msg"], issue
    items = [{"type": "baz", "execute_at": 0}] * 3 + [body]
    batch = json.dumps({"tasks": items})
    refused = await pair.both("POST", "/tasks/batch", content=batch, headers=AUTH)
    assert refused.status_code == 422
    [issue] = refused.json()["detail"]
    assert issue["loc"] == ["body", "tasks", 3, name] and says in issue["msg"], issue
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


async def test_an_idempotent_repeat_is_compared_with_the_options_it_was_created_with(
    pair: Pair,
) -> None:
    body = {"type": "foo", "execute_at": 1893499200, "priority": 2, "timeout_s": 0.5}
    for client, key in ((pair.served, "o-served"), (pair.fastapi, "o-fastapi")):
        headers = {**AUTH, "Idempotency-Key": key}
        first = await client.post("/tasks", json=body, headers=headers)
        assert first.status_code == 201
        # The default sent or left out, a timeout written otherwise: the same request.
        for same in ({**body, "max_attempts": 3}, {**body, "timeout_s": 5e-1}):
            repeat = await client.post("/tasks", json=same, headers=headers)
            assert repeat.status_code == 200 and repeat.json()["id"] == first.json()["id"]
        for other in (
            {"priority": 0},
            {"timeout_s": 0.25},
            {"timeout_s": None},
            {"max_attempts": 4},
        ):
            conflict = await client.post("/tasks", json={**body, **other}, headers=headers)
            assert conflict.status_code == 409, (other, conflict.text)
            assert "priority" in conflict.json()["detail"]
    # A retry raises max_attempts: a repeat is compared with what was asked.
    item = {"type": "baz", "execute_at": 0, "max_attempts": 2, "idempotency_key": "o-batch"}
    [task_id] = (
        await pair.served.post("/tasks/batch", json={"tasks": [item]}, headers=AUTH)
    ).json()["ids"]
    await pair.served.patch(f"/tasks/{task_id}", json={"payload": 1}, headers=AUTH)
    repeat = await pair.both("POST", "/tasks/batch", json={"tasks": [item]}, headers=AUTH)
    assert repeat.status_code == 201 and repeat.json()["ids"] == [task_id]
    for other in ({"max_attempts": 3}, {"priority": 1}, {"timeout_s": 1}):
        conflict = await pair.both(
            "POST", "/tasks/batch", json={"tasks": [{**item, **other}]}, headers=AUTH
        )
        assert conflict.status_code == 409, other
    twins = [
        {**item, "idempotency_key": "o-twins"},
        {**item, "idempotency_key": "o-twins", "priority": 3},
    ]
    conflict = await pair.both("POST", "/tasks/batch", json={"tasks": twins}, headers=AUTH)
    assert conflict.status_code == 409 and "priority" in conflict.json()["detail"]


async def _alike_within_a_minute(pair: Pair, method: str, path: str, **kwargs: Any) -> Any:
    """`pair.both`, but for a read whose figures move with the clock (the last minute, the
    last hour by minute): a minute may turn between the two requests once, not three times."""
    for attempt in range(3):
        try:
            return await pair.both(method, path, **kwargs)
        except AssertionError:
            if attempt == 2:
                raise
    return None


@pytest.mark.parametrize("path", ["/healthz", "/stats", "/metrics", "/"])
async def test_the_reads_answer_alike(pair: Pair, sql: Any, path: str) -> None:
    """GET and HEAD of the reads the hot path serves (functions/http/reads.py): the same
    status, headers and bytes, with the token and without (401 but for the public ones), with
    a query string (ignored), and the rest of the path's methods left to FastAPI."""
    ids = []
    for kind in ("foo", "bar", "baz", "baz"):
        body = {"type": kind, "execute_at": 1893499200}
        ids.append((await pair.served.post("/tasks", json=body, headers=AUTH)).json()["id"])
    await pair.served.post(f"/tasks/{ids[0]}/cancel", headers=AUTH)
    sql("UPDATE tasks SET state = 'succeeded', attempts = 1, started_at = now(),"
        " finished_at = now() WHERE id = %s", ids[1])  # fmt: skip
    public = path in ("/healthz", "/")
    for method in ("GET", "HEAD"):
        for query in ("", "?x=1&state=failed", "?%ff"):
            answer = await _alike_within_a_minute(pair, method, path + query, headers=AUTH)
            assert answer.status_code == 200
            assert bool(answer.content) == (method == "GET")
        unauthorized = await _alike_within_a_minute(pair, method, path)
        assert unauthorized.status_code == (200 if public else 401)
    for method in ("POST", "PUT", "DELETE"):
        assert (await pair.both(method, path, headers=AUTH)).status_code in (403, 405)
    shown = await _alike_within_a_minute(pair, "GET", path, headers=AUTH)
    if path == "/stats":
        assert shown.json()["counts"]["cancelled"]["foo"] == 1
        assert shown.json()["by_type"]["foo"]["cancelled"] == 1


async def test_a_schema_behind_answers_alike_on_the_health_check(pair: Pair, sql: Any) -> None:
    sql("UPDATE alembic_version SET version_num = '0001'")
    for method in ("GET", "HEAD"):
        answer = await pair.both(method, "/healthz")
        assert answer.status_code == 503


async def test_a_database_that_is_down_answers_alike_on_the_reads(settings: Settings) -> None:
    down = dataclasses.replace(
        settings, database_url="postgresql://nobody@127.0.0.1:1/none", db_pool_size=0
    )
    store = Store(Database(down))
    pair = Pair(
        httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(down, store=store)),
                          base_url="http://test"),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=_fastapi_only(down, store)),
                          base_url="http://test"),
    )  # fmt: skip
    async with pair.served, pair.fastapi:
        for path in ("/healthz", "/stats", "/metrics"):
            assert (await pair.both("GET", path)).status_code == 503
        assert (await pair.both("GET", "/")).status_code == 200  # (reads no database)
