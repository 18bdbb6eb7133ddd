"""The Lambda handlers, fed real API Gateway and EventBridge event JSON, warm, many times over."""

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import functions.api
from functions import tick
from functions.errors import DatabaseUnavailable, SchemaOutdated
from functions.model import MAX_PAGE_BYTES, MAX_PAYLOAD_BYTES
from functions.queries import SCHEMA_REVISION
from tests.lambda_harness import FakeContext, api_event, body, header, retarget, scheduled_event
from tests.pages import is_local, page_urls
from tests.pgbouncer import pgbouncer_url

__all__ = ["pgbouncer_url"]  # the fixture

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture(autouse=True)
def cold_start() -> Iterator[None]:
    """Each test starts with a cold container: no app, no loop, no pool, logging as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    loop, database = functions.api._loop, functions.api._database
    functions.api._adapter = None
    functions.api._loop = None
    functions.api._database = None
    if loop is not None and not loop.is_closed():
        if database is not None:
            loop.run_until_complete(database.dispose())
        loop.close()


@pytest.fixture
def lambda_env(monkeypatch: pytest.MonkeyPatch, database_url: str, bar_server: Any) -> None:
    """The environment the SAM template gives both functions."""
    monkeypatch.setenv("TASKRUNNER_DATABASE_URL", database_url)
    monkeypatch.setenv("TASKRUNNER_BAR_URL", bar_server(200))
    monkeypatch.setenv("TASKRUNNER_FOO_DELAY_S", "0.1")
    monkeypatch.setenv("TASKRUNNER_DB_POOL_SIZE", "1")


def cold_probe(probe: str, database_url: str) -> Any:
    """Run `probe` in a fresh Python process (a cold start) on `database_url`; the JSON of
    its last line."""
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "TASKRUNNER_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def connections(sql: Sql) -> int:
    [(count,)] = sql(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'taskrunner'"
    )
    return int(count)


def round_trip(version: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Create, read, list, reject, tick, delete: one user's session through API Gateway."""
    api = functions.api.handler

    assert api(api_event(version, "healthz"), FakeContext())["statusCode"] == 200

    created = api(api_event(version, "create"), FakeContext())
    assert created["statusCode"] == 201, created
    task = body(created)
    assert task["type"] == "foo" and task["state"] == "scheduled"
    assert header(created, "location") == f"/tasks/{task['id']}"

    batch = api(api_event(version, "create_batch"), FakeContext())
    assert batch["statusCode"] == 201
    assert len(body(batch)["ids"]) == 2

    shown = api(api_event(version, "get", task["id"]), FakeContext())
    assert (shown["statusCode"], body(shown)["id"]) == (200, task["id"])

    bad = api(api_event(version, "create_bad"), FakeContext())
    assert bad["statusCode"] == 422
    assert header(bad, "content-type") == "application/json"
    assert {e["loc"][-1] for e in body(bad)["detail"]} == {"type", "execute_at"}

    summary = tick.handler(scheduled_event(), FakeContext(60_000))
    json.dumps(summary)  # the platform serialises it
    assert summary["claimed"] == summary["succeeded"] == 3
    assert {"claimed", "succeeded", "failed", "rescued", "seconds"} <= set(summary)
    printed = capsys.readouterr().out.splitlines()
    assert f"Foo {task['id']}" in printed and "200" in printed

    listed = api(api_event(version, "list"), FakeContext())
    assert listed["statusCode"] == 200
    assert task["id"] in [t["id"] for t in body(listed)["items"]]
    assert all(t["type"] == "foo" and t["state"] == "succeeded" for t in body(listed)["items"])

    deleted = api(api_event(version, "delete", task["id"]), FakeContext())
    assert deleted["statusCode"] == 204
    gone = api(api_event(version, "get", task["id"]), FakeContext())
    assert (gone["statusCode"], body(gone)) == (
        404,
        {"detail": f"task {task['id']} does not exist"},
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_handlers_stay_warm_without_leaking_connections(
    lambda_env: None, version: str, sql: Sql, capsys: pytest.CaptureFixture[str]
) -> None:
    round_trip(version, capsys)
    after_first = connections(sql)
    for _ in range(4):
        round_trip(version, capsys)
    assert connections(sql) == after_first <= 2, "the pool is reused, not rebuilt per call"


def test_round_trip_through_pgbouncer_in_transaction_mode(
    lambda_env: None,
    pgbouncer_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TASKRUNNER_DATABASE_URL", pgbouncer_url)
    monkeypatch.setenv("TASKRUNNER_TRANSACTION_POOLER", "true")
    # Enough rounds for psycopg to prepare statements if it were allowed to (it does after 5).
    for version in ("v2", "v1", "v2", "v1"):
        round_trip(version, capsys)


def test_tick_near_its_deadline_claims_only_what_fits(
    lambda_env: None, task_factory: Callable[..., int], sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKRUNNER_FOO_DELAY_S", "8")
    monkeypatch.setenv("TASKRUNNER_BAR_TIMEOUT_S", "10")
    foo, bar, baz = task_factory("foo"), task_factory("bar"), task_factory("baz")
    # 6 s left, 2 s margin: baz (1 s at most) fits, with room for a slow start; foo (9 s) and
    # bar (11 s) do not.
    summary = tick.handler(scheduled_event(), FakeContext(6_000))
    assert (summary["claimed"], summary["succeeded"]) == (1, 1)
    assert dict(sql("SELECT id, state FROM tasks")) == {
        foo: "scheduled",
        bar: "scheduled",
        baz: "succeeded",
    }
    late = tick.handler(scheduled_event(), FakeContext(1_000))
    assert late["claimed"] == 0
    assert late["left_for_time"] == {"bar": 1, "foo": 1}


def test_poll_mode_starts_tasks_created_during_the_tick(
    lambda_env: None, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKRUNNER_TICK_MODE", "poll")
    monkeypatch.setenv("TASKRUNNER_DEADLINE_MARGIN_S", "1")
    result: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: result.update(tick.handler(scheduled_event(), FakeContext(4_000)))
    )
    runner.start()
    sql(
        "INSERT INTO tasks (kind, execute_at, max_attempts) VALUES"
        " ('baz', now() + interval '1 second', 3)"
    )
    runner.join(timeout=10)
    assert not runner.is_alive(), "the tick returns before its deadline"
    assert result["succeeded"] == 1
    [(lateness_s,)] = sql("SELECT extract(epoch FROM started_at - execute_at) FROM tasks")
    assert 0 <= lateness_s < 1.0


def test_overlapping_ticks_share_the_work_without_repeats(
    lambda_env: None, sql: Sql, capsys: pytest.CaptureFixture[str]
) -> None:
    sql(
        "INSERT INTO tasks (kind, execute_at, max_attempts)"
        " SELECT CASE WHEN n % 5 = 0 THEN 'foo' ELSE 'baz' END, now(), 3"
        " FROM generate_series(1, 500) AS n"
    )
    summaries: list[dict[str, Any]] = []
    ticks = [
        threading.Thread(
            target=lambda: summaries.append(tick.handler(scheduled_event(), FakeContext()))
        )
        for _ in range(2)
    ]
    for t in ticks:
        t.start()
    for t in ticks:
        t.join(timeout=60)
    assert sum(s["claimed"] for s in summaries) == 500
    assert sql("SELECT state, attempts, count(*) FROM tasks GROUP BY 1, 2") == [
        ("succeeded", 1, 500)
    ]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 500
    foo_lines = [line for line in lines if line.startswith("Foo ")]
    assert len(foo_lines) == len(set(foo_lines)) == 100


def test_tick_without_a_database_raises_after_logging_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TASKRUNNER_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none")
    with caplog.at_level(logging.ERROR), pytest.raises(DatabaseUnavailable):
        tick.handler(scheduled_event(), FakeContext())
    assert "database unavailable" in caplog.text


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_api_without_a_database_answers_json_503(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKRUNNER_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none")
    response = functions.api.handler(api_event(version, "create"), FakeContext())
    assert response["statusCode"] == 503
    assert body(response) == {"detail": "database unavailable, try again shortly"}


@pytest.mark.one_server
def test_api_token_when_configured(lambda_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUNNER_API_TOKEN", "s3cret")
    refused = functions.api.handler(api_event("v2", "create"), FakeContext())
    assert refused["statusCode"] == 401
    assert "Authorization" in body(refused)["detail"]
    wrong = functions.api.handler(
        api_event("v2", "create", authorization="Bearer nope"), FakeContext()
    )
    assert wrong["statusCode"] == 401
    ok = functions.api.handler(
        api_event("v2", "create", authorization="Bearer s3cret"), FakeContext()
    )
    assert ok["statusCode"] == 201
    health = functions.api.handler(api_event("v2", "healthz"), FakeContext())
    assert health["statusCode"] == 200, "health checks need no token"


@pytest.mark.one_server
@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        ("bearer s3crét", 201),  # the scheme in any case (RFC 9110)
        ("BEARER s3crét", 201),
        ("Bearer  s3crét ", 201),
        ("Bearer é", 401),  # non-ASCII and wrong: a 401, not a TypeError in compare_digest
        ("Bearer s3cret", 401),
        ("Basic s3crét", 401),
        ("s3crét", 401),
    ],
)
def test_api_token_scheme_and_bytes(
    lambda_env: None, monkeypatch: pytest.MonkeyPatch, authorization: str, status: int
) -> None:
    monkeypatch.setenv("TASKRUNNER_API_TOKEN", "s3crét")
    for version in ("v1", "v2"):
        event = api_event(version, "create", authorization=authorization)
        response = functions.api.handler(event, FakeContext())
        assert response["statusCode"] == status, (version, body(response))


@pytest.mark.one_server
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_event_with_null_headers_is_answered(lambda_env: None, version: str) -> None:
    event = api_event(version, "healthz")
    event["headers"] = None
    if "multiValueHeaders" in event:
        event["multiValueHeaders"] = None
    response = functions.api.handler(event, FakeContext())
    assert (response["statusCode"], body(response)) == (
        200,
        {"status": "ok", "schema": SCHEMA_REVISION},
    )


@pytest.mark.one_server
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_body_without_content_type_is_json_and_another_type_is_415(
    lambda_env: None, version: str
) -> None:
    bare = api_event(version, "create")
    del bare["headers"]["content-type"]
    bare.get("multiValueHeaders", {}).pop("content-type", None)
    created = functions.api.handler(bare, FakeContext())
    assert created["statusCode"] == 201, body(created)

    plain_text = {"content-type": "text/plain"}
    plain = functions.api.handler(api_event(version, "create", None, **plain_text), FakeContext())
    assert plain["statusCode"] == 415
    assert "application/json" in body(plain)["detail"]


@pytest.mark.one_server
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_body_marked_base64_that_is_not_is_a_400(lambda_env: None, version: str) -> None:
    """API Gateway sends none, but a hand-made event or another proxy may: a 400 that says
    why, as a body that is not JSON is, rather than an invocation that raises."""
    event = api_event(version, "create")
    event["body"], event["isBase64Encoded"] = "eyJ0eXBlIjogImJheiJ9x", True  # padding off
    response = functions.api.handler(event, FakeContext())
    assert response["statusCode"] == 400, response
    assert "base64" in body(response)["detail"]

    readable = api_event(version, "create")
    raw = readable["body"].encode()
    readable["body"], readable["isBase64Encoded"] = base64.b64encode(raw).decode(), True
    created = functions.api.handler(readable, FakeContext())
    assert created["statusCode"] == 201, body(created)


@pytest.mark.one_server
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_head_healthz_answers_like_get_without_a_body(lambda_env: None, version: str) -> None:
    event = retarget(api_event(version, "healthz"), "HEAD", "/healthz")
    response = functions.api.handler(event, FakeContext())
    assert response["statusCode"] == 200
    assert not response.get("body")
    assert header(response, "content-type") == "application/json"


# Through a custom domain's base-path mapping the prefix is in the event's path; through a
# REST API's own domain the stage is not (path /tasks), yet the client's URL has /prod.
BASE_PATHS = [
    ("v1", "create_base_path", "/prod"),
    ("v1", "create", "/prod"),
    ("v2", "create_base_path", "/taskrunner"),
]


@pytest.mark.one_server
@pytest.mark.parametrize(("version", "event_name", "base"), BASE_PATHS)
def test_base_path_routes_and_urls_carry_it(
    lambda_env: None, monkeypatch: pytest.MonkeyPatch, version: str, event_name: str, base: str
) -> None:
    monkeypatch.setenv("TASKRUNNER_BASE_PATH", base + "/")  # normalised
    api = functions.api.handler
    event = api_event(version, event_name)

    created = api(event, FakeContext())
    assert created["statusCode"] == 201, body(created)
    task_id = body(created)["id"]
    location = header(created, "location")
    assert location == f"{base}/tasks/{task_id}"

    shown = api(retarget(event, "GET", location), FakeContext())
    assert (shown["statusCode"], body(shown)["id"]) == (200, task_id)
    unprefixed = api(retarget(event, "GET", f"/tasks/{task_id}"), FakeContext())
    assert unprefixed["statusCode"] == 200, "a proxy or stage that strips the prefix works too"

    redirected = api(retarget(event, "GET", f"{base}/tasks/", "limit=5"), FakeContext())
    assert redirected["statusCode"] == 307
    host = event["headers"]["host"]
    assert header(redirected, "location") == f"https://{host}{base}/tasks?limit=5"

    schema = api(retarget(event, "GET", f"{base}/openapi.json"), FakeContext())
    assert body(schema)["servers"] == [{"url": base}], "Try it out in /docs calls the prefix"


@pytest.mark.one_server
def test_api_handler_survives_another_loop_in_between(lambda_env: None) -> None:
    """A warm container whose thread ran (and closed) another event loop between events."""
    assert functions.api.handler(api_event("v2", "healthz"), FakeContext())["statusCode"] == 200
    asyncio.run(asyncio.sleep(0))  # leaves the thread without a current loop
    assert functions.api.handler(api_event("v2", "healthz"), FakeContext())["statusCode"] == 200


@pytest.mark.one_server
@pytest.mark.parametrize("page", ["docs", "redoc"])
def test_docs_behind_a_base_path_load_from_the_app_itself(
    lambda_env: None, monkeypatch: pytest.MonkeyPatch, page: str
) -> None:
    monkeypatch.setenv("TASKRUNNER_BASE_PATH", "/prod")
    event = api_event("v1", "create_base_path")
    shown = functions.api.handler(retarget(event, "GET", f"/prod/{page}"), FakeContext())
    assert shown["statusCode"] == 200
    urls = page_urls(shown["body"])
    assert "/prod/openapi.json" in urls
    for url in urls:
        assert is_local(url) and url.startswith("/prod/"), url
        response = functions.api.handler(retarget(event, "GET", url), FakeContext())
        assert response["statusCode"] == 200, url
        assert response["body"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_an_unmigrated_database_is_a_503_that_says_to_migrate(
    version: str,
    empty_database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TASKRUNNER_DATABASE_URL", empty_database_url)
    for name in ("healthz", "create", "list"):
        response = functions.api.handler(api_event(version, name), FakeContext())
        assert response["statusCode"] == 503, (name, response)
        assert "run `taskrunner migrate`" in body(response)["detail"]
        assert header(response, "retry-after")
    with caplog.at_level(logging.ERROR), pytest.raises(SchemaOutdated, match="taskrunner migrate"):
        tick.handler(scheduled_event(), FakeContext())
    assert "taskrunner migrate" in caplog.text


def test_healthz_reports_a_schema_behind_this_version(
    lambda_env: None, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql("UPDATE alembic_version SET version_num = '0001'")
    response = functions.api.handler(api_event("v2", "healthz"), FakeContext())
    assert response["statusCode"] == 503
    assert body(response)["detail"] == (
        f"the database schema is not up to date (it has 0001, this version needs"
        f" {SCHEMA_REVISION}): run `taskrunner migrate`"
    )


@pytest.mark.one_server
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cold_start_that_creates_and_reads_tasks_imports_no_fastapi(
    database_url: str, version: str
) -> None:
    """The hot path (functions/http/fastpath.py) serves them, and the reads of
    functions/http/reads.py (the health check, /stats, /metrics, the dashboard's page), and
    lists with their filters, order and cursor; FastAPI and pydantic come with the first
    request it does not serve (here a list whose state is refused), and answer it."""
    probe = f"""
import json, sys
from functions.api import handler
from tests.lambda_harness import FakeContext, api_event, body, retarget
health = api_event("{version}", "healthz")
for path, kind in (("/healthz", "application/json"), ("/stats", "application/json"),
                   ("/metrics", "text/plain; version=1.0.0; charset=utf-8"),
                   ("/", "text/html; charset=utf-8")):
    for method in ("GET", "HEAD"):
        read = handler(retarget(health, method, path), FakeContext())
        assert read["statusCode"] == 200, read
        headers = {{k.lower(): v for k, v in (read.get("headers") or {{}}).items()}}
        if not headers:
            headers = {{k.lower(): v[-1] for k, v in read["multiValueHeaders"].items()}}
        assert headers["content-type"] == kind, (path, headers)
        assert bool(read["body"]) == (method == "GET"), (path, method, read["body"][:100])
assert "taskrunner_due_tasks" in handler(retarget(health, "GET", "/metrics"), FakeContext())["body"]
assert '"workers_alive"' in handler(retarget(health, "GET", "/stats"), FakeContext())["body"]
created = handler(api_event("{version}", "create"), FakeContext())
assert created["statusCode"] == 201, created
task_id = body(created)["id"]
shown = handler(api_event("{version}", "get", task_id), FakeContext())
assert shown["statusCode"] == 200, shown
# With a payload (64 KiB exactly, in UTF-8), and one byte over: served without FastAPI too.
for size, status in ((65_536, 201), (65_537, 422)):
    event = api_event("{version}", "create")
    payload = {{"s": "é" * ((size - 9) // 2) + "x" * (1 + (size - 9) % 2)}}
    event["body"] = json.dumps({{"type": "baz", "execute_at": 0, "payload": payload}})
    answer = handler(event, FakeContext())
    assert answer["statusCode"] == status, answer["body"][:300]
    if status == 201:
        got = handler(api_event("{version}", "get", body(answer)["id"]), FakeContext())
        assert body(got)["payload"] == payload
    else:
        assert "65,537 bytes" in body(answer)["detail"][0]["msg"]
later = {{"fastapi", "starlette.routing", "starlette.responses", "starlette.exceptions",
         "pydantic", "pydantic_core", "functions.http.schemas"}}
before = sorted(later & set(sys.modules))
# A filtered list (the event's state, type and limit; a state, an order, a schedule and a
# cursor): served without FastAPI too.
listed = handler(api_event("{version}", "list"), FakeContext())
assert listed["statusCode"] == 200, listed
for query in ("state=failed", "state=scheduled&sort=-execute_at&limit=1&schedule=nightly",
              "sort=execute_at&limit=1", "type=baz&cursor=execute_at.0.1&sort=execute_at"):
    page = handler(retarget(health, "GET", "/tasks", query), FakeContext())
    assert page["statusCode"] == 200, page
served = sorted(later & set(sys.modules))
# One it refuses: the FastAPI app, imported now, says why.
refused = handler(retarget(health, "GET", "/tasks", "state=nope"), FakeContext())
assert refused["statusCode"] == 422, refused
assert body(refused)["detail"][0]["loc"] == ["query", "state", 0], refused
print(json.dumps([before, served, "fastapi" in sys.modules]))
"""
    assert cold_probe(probe, database_url) == [[], [], True]


@pytest.mark.one_server
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cold_start_that_refuses_a_task_imports_no_fastapi(
    database_url: str, version: str
) -> None:
    """The refusal of a task's body is said by the request rules (rules.task_issues) in the
    FastAPI app's words: a 422 without importing FastAPI or pydantic."""
    probe = f"""
import json, sys
from functions.api import handler
from tests.lambda_harness import FakeContext, api_event
answers = []
for body in ('{{"type": "qux", "execute_at": "next tuesday"}}', '{{"type": "baz"', 'null'):
    event = api_event("{version}", "create_bad")
    event["body"] = body
    answers.append(handler(event, FakeContext()))
later = {{"fastapi", "pydantic", "pydantic_core", "functions.http.schemas"}}
print(json.dumps([answers, sorted(later & set(sys.modules))]))
"""
    answers, imported = cold_probe(probe, database_url)
    assert imported == []
    kinds = "bar, baz, foo, http"
    assert [(a["statusCode"], header(a, "content-type"), body(a)) for a in answers] == [
        (422, "application/json", {"detail": [
            {"loc": ["body", "type"], "type": "value_error",
             "msg": f"Value error, unknown type 'qux'; expected one of {kinds}"},
            {"loc": ["body", "execute_at"], "type": "value_error",
             "msg": "Value error, execute_at 'next tuesday' is not an RFC 3339 date-time with"
             " an offset (e.g. 2030-01-01T12:00:00Z) or Unix seconds"},
        ]}),
        (422, "application/json", {"detail": [
            {"loc": ["body", 14], "msg": "JSON decode error: Expecting ',' delimiter",
             "type": "json_invalid"},
        ]}),
        (422, "application/json", {"detail": [
            {"loc": ["body"], "type": "model_attributes_type",
             "msg": "Input should be a valid dictionary or object to extract fields from"},
        ]}),
    ]  # fmt: skip


@pytest.mark.one_server
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_time_no_float_can_hold_is_a_422_in_json(lambda_env: None, version: str) -> None:
    """An integer of 400 digits overflowed a float check: a 500, and on Lambda (where the
    hot path sits outside FastAPI) Mangum's plain-text one."""
    event = api_event(version, "create")
    event["body"] = '{"type": "foo", "execute_at": 1' + "0" * 400 + "}"
    response = functions.api.handler(event, FakeContext())
    assert response["statusCode"] == 422, response
    assert header(response, "content-type") == "application/json"
    assert "not a Unix time" in body(response)["detail"][0]["msg"]


# Lambda's limit on a response, as its runtime sends it (awslambdaric's JSON of the dict).
LAMBDA_RESPONSE_LIMIT = 6 * 1024 * 1024


@pytest.mark.one_server
@pytest.mark.parametrize(
    "payload",
    [
        # 64,002 bytes: 192,000 once each é is a \u00e9 (a 5.0 MB page was 14.9 MB).
        "to_jsonb(repeat('é', 32000))",
        # 64 KB of one-letter strings, 32,000 quotes, each escaped: a 5 MB page was 7.4 MB.
        "(SELECT jsonb_agg(chr(97 + n % 26)) FROM generate_series(1, 16000) n)",
    ],
    ids=["non-ascii", "quotes"],
)
def test_a_page_fits_lambdas_response_once_escaped_and_the_cursor_goes_on(
    lambda_env: None, sql: Sql, payload: str
) -> None:
    ids = [
        task_id
        for (task_id,) in sql(
            f"INSERT INTO tasks (kind, execute_at, payload) SELECT 'foo', now() + interval '1 day',"
            f" {payload} FROM generate_series(1, 100) RETURNING id"
        )
    ]
    event = api_event("v2", "list")

    def answered(path: str, query: str = "") -> tuple[Any, int]:
        response = functions.api.handler(retarget(event, "GET", path, query), FakeContext())
        assert response["statusCode"] == 200
        # What the runtime sends: the whole dict, as JSON, with non-ASCII escaped.
        size = len(json.dumps(response, ensure_ascii=True))
        assert size < LAMBDA_RESPONSE_LIMIT, size
        return body(response), size

    seen: list[int] = []
    sizes: list[int] = []
    # By execute_at, which all share: the cursor after a cut goes on by id among them.
    query = "type=foo&limit=1000&sort=execute_at"
    while True:
        page, size = answered("/tasks", query)
        seen += [t["id"] for t in page["items"]]
        sizes.append(size)
        if page["next_cursor"] is None:
            break
        query = f"type=foo&limit=1000&sort=execute_at&cursor={page['next_cursor']}"
    assert seen == ids
    # Each page but the last is full: the envelope's 5 MB, not far below it.
    assert all(4_500_000 < size for size in sizes[:-1]), sizes
    listed, _ = answered("/taskstate/notstarted")
    assert [t["id"] for t in listed] == ids[: len(listed)] and len(listed) > 1


@pytest.mark.one_server
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_repeated_filter_reaches_the_app_whole_through_api_gateway(
    lambda_env: None, sql: Sql, version: str
) -> None:
    """API Gateway v1 keeps each value of a repeated parameter in
    `multiValueQueryStringParameters` (the last alone in `queryStringParameters`); v2 in
    `rawQueryString`: the listing takes them all."""
    ids = [
        task_id
        for (task_id,) in sql(
            "INSERT INTO tasks (kind, execute_at, state, finished_at) VALUES"
            " ('foo', now(), 'failed', now()), ('foo', now(), 'cancelled', now()),"
            " ('bar', now(), 'cancelled', now()), ('foo', now(), 'scheduled', NULL) RETURNING id"
        )
    ]
    query = "state=failed&state=cancelled&type=foo&type=bar&sort=-finished_at"
    event = retarget(api_event(version, "list"), "GET", "/tasks", query)
    response = functions.api.handler(event, FakeContext())
    assert response["statusCode"] == 200, response
    assert [t["id"] for t in body(response)["items"]] == ids[2::-1]


@pytest.mark.one_server
@pytest.mark.parametrize(
    "character",
    ["é", "😀"],  # 2 bytes in UTF-8, `\u00e9` (6) in the envelope; 4 bytes, 12
    ids=["2-byte", "4-byte"],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_task_with_the_largest_payload_fits_lambdas_response(
    lambda_env: None, monkeypatch: pytest.MonkeyPatch, version: str, character: str
) -> None:
    """TASKRUNNER_MAX_PAYLOAD_BYTES at its ceiling, the payload a string of characters each
    written as `\\uXXXX` in Lambda's response (three times its bytes): its create, its read
    and a page holding it each stay under the page's 5 MB as Lambda carries them, under
    Lambda's 6 MB. One byte more is refused."""
    monkeypatch.setenv("TASKRUNNER_MAX_PAYLOAD_BYTES", str(MAX_PAYLOAD_BYTES))
    width = len(character.encode())
    count, rest = divmod(MAX_PAYLOAD_BYTES - 2, width)  # (2: the string's quotes)
    payload = "a" * rest + character * count
    assert len(json.dumps(payload, ensure_ascii=False).encode()) == MAX_PAYLOAD_BYTES
    event = api_event(version, "create")

    def sent(response: dict[str, Any], status: int) -> Any:
        assert response["statusCode"] == status, str(response)[:300]
        # What the runtime sends: the whole dict, as JSON, with non-ASCII escaped.
        size = len(json.dumps(response, ensure_ascii=True))
        assert size < MAX_PAGE_BYTES < LAMBDA_RESPONSE_LIMIT, size
        return body(response)

    def create(value: str) -> dict[str, Any]:
        event["body"] = json.dumps(
            {"type": "foo", "execute_at": "2999-01-01T00:00:00Z", "payload": value},
            ensure_ascii=False,
        )
        answer: dict[str, Any] = functions.api.handler(event, FakeContext())
        return answer

    created = sent(create(payload), 201)
    assert created["payload"] == payload
    read = functions.api.handler(retarget(event, "GET", f"/tasks/{created['id']}"), FakeContext())
    assert sent(read, 200)["payload"] == payload
    page = functions.api.handler(retarget(event, "GET", "/tasks", "type=foo"), FakeContext())
    assert [t["id"] for t in sent(page, 200)["items"]] == [created["id"]]
    over = create(payload + "a")
    assert over["statusCode"] == 422 and f"{MAX_PAYLOAD_BYTES + 1:,} bytes" in over["body"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_two_idempotency_keys_through_api_gateway_are_a_422(
    lambda_env: None, sql: Sql, version: str
) -> None:
    """API Gateway v2 joins a header sent twice with a comma into one value; v1 keeps both in
    `multiValueHeaders` (the last alone in `headers`). Neither is a key (v2's was taken
    whole, `dupA,dupB`, and a task made)."""
    event = api_event(version, "create")
    if version == "v2":
        event["headers"]["idempotency-key"] = "dupA,dupB"
    else:
        event["headers"]["Idempotency-Key"] = "dupB"
        event["multiValueHeaders"]["Idempotency-Key"] = ["dupA", "dupB"]
    response = functions.api.handler(event, FakeContext())
    assert response["statusCode"] == 422, response
    [issue] = body(response)["detail"]
    assert issue["loc"] == ["header", "Idempotency-Key"]
    assert sql("SELECT count(*) FROM tasks") == [(0,)]
