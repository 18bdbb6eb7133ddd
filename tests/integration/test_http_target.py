"""The built-in `http` kind (functions/http_target.py) against servers of the test's own on
127.0.0.1: what each answer earns, redirects, time limits, bodies that never end, the
addresses it refuses (functions/egress.py), and its payload's header values, masked in
every answer and never logged."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from functions import kinds
from functions.http.app import build_app
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Store
from tests.httpservers import Target, target_server

Sql = Callable[..., list[tuple[Any, ...]]]
SECRET = "s3cret-t0ken-value"
# What is tested is the kind's HTTP exchange and the create rules for its payload; the
# claim, finish and retry statements a run goes through are checked on every server in
# test_tick.py, test_runner.py, test_attempts.py and test_claims.py.
pytestmark = pytest.mark.one_server


@pytest.fixture
def target() -> Iterator[Target]:
    with target_server() as served:
        yield served


@pytest.fixture
def allowed(settings: Settings) -> Settings:
    """Settings that allow the test's servers (127.0.0.1, by CIDR)."""
    return dataclasses.replace(settings, http_allowed_hosts="127.0.0.0/8")


async def create(client: httpx.AsyncClient, payload: Any) -> int:
    created = await client.post(
        "/tasks", json={"type": "http", "execute_at": 0, "payload": payload}
    )
    assert created.status_code == 201, created.text
    return int(created.json()["id"])


def task_row(sql: Sql, task_id: int) -> tuple[Any, ...]:
    """(state, attempts, output, error) of a task."""
    return sql("SELECT state, attempts, output, error FROM tasks WHERE id = %s", task_id)[0]


async def drain(store: Store, settings: Settings) -> str:
    """Run what is due until nothing is (retries included); return what was printed."""
    out = io.StringIO()
    await Runner(store, settings, out=out).run()
    return out.getvalue()


async def run_until(
    store: Store, settings: Settings, done: Callable[[], bool], timeout_s: float = 60
) -> str:
    """Run a worker until `done()`; return what it printed."""
    out = io.StringIO()
    stop = asyncio.Event()
    runner = Runner(store, settings, out=out)
    running = asyncio.create_task(runner.run(keep_polling=True, stop=stop))
    try:
        async with asyncio.timeout(timeout_s):
            while not done():
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await running
    return out.getvalue()


async def test_a_2xx_succeeds_with_its_status_as_the_line(
    client: httpx.AsyncClient, store: Store, allowed: Settings, sql: Sql, target: Target
) -> None:
    ok = await create(client, {"url": f"{target.url}/status/204?q=1", "method": "PUT",
        "headers": {"X-Token": SECRET}, "body": {"to": "ünï", "n": [1, 2]}})  # fmt: skip
    text = await create(client, {"url": f"{target.url}/status/200", "body": "plain ✓"})
    printed = await drain(store, allowed)
    assert task_row(sql, ok) == ("succeeded", 1, "204", None)
    assert task_row(sql, text) == ("succeeded", 1, "200", None)
    assert sorted(printed.split()) == ["200", "204"]
    put = next(s for s in target.seen if s.method == "PUT")
    assert put.path == "/status/204"
    assert put.headers["X-Token"] == SECRET  # sent as stored: masked only in answers
    assert put.headers["Content-Type"] == "application/json"
    assert json.loads(put.body) == {"to": "ünï", "n": [1, 2]}  # (jsonb orders its keys)
    post = next(s for s in target.seen if s.method == "POST")
    assert (post.body, post.headers["Content-Type"]) == (
        "plain ✓".encode(),
        "text/plain; charset=utf-8",
    )


async def test_a_503_is_retried_and_a_404_fails_at_once(
    client: httpx.AsyncClient, store: Store, allowed: Settings, sql: Sql, target: Target
) -> None:
    target.script["flaky"] = [(503, {}), (200, {})]
    flaky = await create(client, {"url": f"{target.url}/script/flaky"})
    missing = await create(client, {"url": f"{target.url}/status/404"})
    finished = ("succeeded", "failed")
    await run_until(
        store, allowed, lambda: {task_row(sql, flaky)[0], task_row(sql, missing)[0]} <= {*finished}
    )
    assert task_row(sql, flaky) == ("succeeded", 2, "200", None)
    state, attempts, _, error = task_row(sql, missing)
    assert (state, attempts) == ("failed", 1)  # of 3: none of the others used
    assert error == f"Fail: POST {target.url}/status/404 answered 404 Not Found"
    assert [s.path for s in target.seen].count("/status/404") == 1


async def test_a_429_waits_as_long_as_its_retry_after_says(
    client: httpx.AsyncClient, store: Store, allowed: Settings, sql: Sql, target: Target
) -> None:
    """Retry-After: 2 against a backoff of 60 s: the next attempt comes after 2 s."""
    settings = dataclasses.replace(allowed, retry_base_s=60.0)
    target.script["busy"] = [(429, {"Retry-After": "2"}), (200, {})]
    task_id = await create(client, {"url": f"{target.url}/script/busy"})
    await run_until(store, settings, lambda: len(target.seen) >= 2)
    first, second = target.seen
    assert 2.0 <= second.at - first.at < 30  # not before it asked, nor after the backoff
    await run_until(store, settings, lambda: task_row(sql, task_id)[0] == "succeeded")
    assert task_row(sql, task_id)[:3] == ("succeeded", 2, "200")


async def test_a_retry_after_date_and_a_cap_at_retry_max_s(
    client: httpx.AsyncClient, store: Store, allowed: Settings, sql: Sql, target: Target
) -> None:
    settings = dataclasses.replace(allowed, retry_max_s=7.0, retry_base_s=0.01)
    target.script["later"] = [(503, {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"})]
    task_id = await create(client, {"url": f"{target.url}/script/later"})
    await drain(store, settings)
    wait = sql(
        "SELECT extract(epoch FROM next_attempt_at - now()), error FROM tasks WHERE id = %s",
        task_id,
    )[0]
    assert 0 < float(wait[0]) <= 7.0  # capped at TASKRUNNER_RETRY_MAX_S
    assert wait[1].startswith(f"Retry: POST {target.url}/script/later answered 503")
    # The wait it asked (in plain digits), and the wait it got.
    assert re.search(
        r"; Retry-After [1-9][0-9,]+ s, capped at 7 s \(TASKRUNNER_RETRY_MAX_S\)$", wait[1]
    )


async def test_a_request_that_hangs_is_stopped_at_the_time_limit_and_retried(
    client: httpx.AsyncClient,
    store: Store,
    allowed: Settings,
    sql: Sql,
    target: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    http = kinds.KINDS["http"]
    monkeypatch.setitem(kinds.KINDS, "http", dataclasses.replace(http, limit_s=lambda s: 0.5))
    task_id = await create(client, {"url": f"{target.url}/hang"})
    await run_until(store, allowed, lambda: task_row(sql, task_id)[0] == "failed")
    state, attempts, _, error = task_row(sql, task_id)
    assert (state, attempts) == ("failed", 3)  # each attempt timed out, and was retried
    assert error == "TimeoutError: ran longer than its kind's limit of 0.5 s"


async def test_a_body_that_never_ends_is_not_read(
    client: httpx.AsyncClient, store: Store, allowed: Settings, sql: Sql, target: Target
) -> None:
    """The server streams 1 GiB; the worker reads 64 KiB of it and hangs up."""
    task_id = await create(client, {"url": f"{target.url}/endless", "method": "GET"})
    before = rss()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        await drain(store, allowed)
    finally:
        done.set()
        sampler.join()
    assert task_row(sql, task_id)[:3] == ("succeeded", 1, "200")
    assert peak - before < 50 * 1024 * 1024, f"{(peak - before) / 1e6:.0f} MB more"


def rss() -> int:
    """This process's resident memory now, in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_five_redirects_are_followed_and_a_sixth_is_refused(
    client: httpx.AsyncClient, store: Store, allowed: Settings, sql: Sql, target: Target
) -> None:
    five = await create(client, {"url": f"{target.url}/redirect/5"})
    six = await create(client, {"url": f"{target.url}/redirect/6"})
    await drain(store, allowed)
    assert task_row(sql, five)[:3] == ("succeeded", 1, "200")
    state, attempts, _, error = task_row(sql, six)
    assert (state, attempts) == ("failed", 1)
    assert error.endswith("answered 302 Found: more than 5 redirects")
    # A 302 turns the POST into a GET, as browsers and httpx do.
    assert {s.method for s in target.seen if s.path == "/redirect/0"} == {"GET"}


async def test_a_redirect_is_checked_as_the_first_address_was(
    client: httpx.AsyncClient, store: Store, settings: Settings, sql: Sql, target: Target
) -> None:
    """Allowed by name (`localhost`), redirected to 127.0.0.1 by number: refused."""
    by_name = dataclasses.replace(settings, http_allowed_hosts="localhost")
    to = f"http://127.0.0.1:{target.port}/status/200"
    task_id = await create(
        client, {"url": f"http://localhost:{target.port}/to?{to}", "headers": {"A": SECRET}}
    )
    await drain(store, by_name)
    state, attempts, _, error = task_row(sql, task_id)
    assert (state, attempts) == ("failed", 1)
    assert error.startswith(f"AddressRefused: POST {to}: refused to connect to 127.0.0.1:")
    assert "a loopback address" in error
    assert [s.path for s in target.seen] == ["/to"]  # the first hop only


async def _failed_at_the_redirect(
    client: httpx.AsyncClient, store: Store, settings: Settings, sql: Sql, target: Target,
    location: str,
) -> str:  # fmt: skip
    """The error of a task whose target (`/to`) redirects to `location` (sent as the query,
    which the target answers unquoted): failed for good at that hop, the new address never
    asked."""
    task_id = await create(client, {"url": f"{target.url}/to?{location}"})
    await drain(store, settings)
    state, attempts, _, error = task_row(sql, task_id)
    assert (state, attempts) == ("failed", 1)
    assert [s.path for s in target.seen] == ["/to"]
    return str(error)


async def test_a_redirect_to_a_url_with_a_user_name_and_password_is_not_followed(
    client: httpx.AsyncClient, store: Store, allowed: Settings, sql: Sql, target: Target
) -> None:
    """Followed, httpx would send them as `Authorization: Basic ...`: the task fails for good
    at that hop, and the error does not quote them."""
    location = f"http://user:{SECRET}@127.0.0.1:{target.port}/creds"
    error = await _failed_at_the_redirect(client, store, allowed, sql, target, location)
    assert error == (
        f"Fail: POST {target.url}/to answered 307 Temporary Redirect to a URL with a user name"
        " or password, which is not followed (credentials go in the payload's `headers`)"
    )


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        ("http://127.0.0.1:99999/x", "127.0.0.1:99999"),
        ("http://127.0.0.1:0/x", "127.0.0.1:0"),
        ("http://%zz/x", "%zz"),
        ("http://127.0.0.1:0{port}/x", "127.0.0.1:0{port}"),  # httpx reads it as {port}
        ("//127.0.0.1:+{port}/x", "127.0.0.1:+{port}"),
        ("http://ex%5Cample.com/x", "ex\\ample.com"),  # a backslash: `/` to browsers
    ],
)
async def test_a_redirect_to_a_host_or_port_a_url_cannot_have_fails_at_once(
    client: httpx.AsyncClient,
    store: Store,
    allowed: Settings,
    sql: Sql,
    target: Target,
    location: str,
    shown: str,
) -> None:
    """Each new address is checked as the first was, as written: a port out of range or not
    in plain digits, a host of other characters fail the task for good at that hop, saying
    why. Before, each was tried (an OverflowError in a TaskGroup, a lookup of `%zz`) and
    retried as if the target had failed, or followed (`:0` and `:+` before the port)."""
    location, shown = (text.format(port=target.port) for text in (location, shown))
    error = await _failed_at_the_redirect(client, store, allowed, sql, target, location)
    assert error == (
        f"Fail: POST {target.url}/to answered 307 Temporary Redirect to {shown!r}, a host and"
        " port a task's `url` cannot have (a port from 1 to 65535 in plain digits; an IPv4"
        " address as four numbers 0 to 255 without leading zeros, or a name)"
    )


@pytest.mark.parametrize("zone", ["%25lo", "%25eth0", "%lo"])
async def test_a_redirect_to_an_ipv6_address_with_a_zone_fails_at_once(
    client: httpx.AsyncClient,
    store: Store,
    allowed: Settings,
    sql: Sql,
    target: Target,
    zone: str,
) -> None:
    """A zone names an interface of the worker's own host (`fe80::1%25lo`, link-local): the
    task fails for good at that hop, saying why. Before, the address was looked up, not
    found, and the task retried as if the target had failed."""
    location = f"http://[fe80::1{zone}]:{target.port}/x".replace("%", "%25")  # (unquoted)
    error = await _failed_at_the_redirect(client, store, allowed, sql, target, location)
    shown = f"[fe80::1{zone}]:{target.port}"
    assert error == (
        f"Fail: POST {target.url}/to answered 307 Temporary Redirect to {shown!r}, an IPv6"
        " address with a zone (a link of this host's own)"
    )


async def test_a_redirect_to_a_location_httpx_cannot_read_fails_at_once(
    client: httpx.AsyncClient, store: Store, allowed: Settings, sql: Sql, target: Target
) -> None:
    """`0177.0.0.1` (octal to some readers) is no URL to httpx: the task fails for good.
    Before, httpx's RemoteProtocolError was taken for a failing target and retried."""
    error = await _failed_at_the_redirect(
        client, store, allowed, sql, target, "http://0177.0.0.1/x"
    )
    assert error.startswith(
        f"Fail: POST {target.url}/to answered a redirect to a Location that is no URL:"
    )


@pytest.mark.parametrize(
    ("allow", "host", "refused"),
    [
        (None, "127.0.0.1", True),
        (None, "localhost", True),  # a name that resolves to 127.0.0.1
        ("127.0.0.1/32", "127.0.0.1", False),
        ("127.0.0.1", "localhost", False),  # a CIDR matches the address connected to
        ("localhost", "localhost", False),
        ("localhost", "127.0.0.1", True),  # a name matches the URL's host only
        ("10.0.0.0/8,example.com", "127.0.0.1", True),
    ],
)
async def test_loopback_is_refused_unless_allowed(
    client: httpx.AsyncClient,
    store: Store,
    settings: Settings,
    sql: Sql,
    target: Target,
    allow: str | None,
    host: str,
    refused: bool,
) -> None:
    task_id = await create(client, {"url": f"http://{host}:{target.port}/status/200"})
    await drain(store, dataclasses.replace(settings, http_allowed_hosts=allow))
    state, attempts, output, error = task_row(sql, task_id)
    if refused:
        assert (state, attempts, output) == ("failed", 1, None)
        assert "a loopback address; TASKRUNNER_HTTP_ALLOWED_HOSTS can allow" in error
        assert target.seen == []
    else:
        assert (state, output, error) == ("succeeded", "200", None)


async def test_a_connection_refused_is_retried(
    client: httpx.AsyncClient, store: Store, allowed: Settings, sql: Sql
) -> None:
    with target_server() as gone:
        port = gone.port
    task_id = await create(client, {"url": f"http://127.0.0.1:{port}/"})
    await run_until(store, allowed, lambda: task_row(sql, task_id)[0] == "failed")
    state, attempts, _, error = task_row(sql, task_id)
    assert (state, attempts) == ("failed", 3)
    assert error.startswith(f"HttpError: POST http://127.0.0.1:{port}/: ConnectError")


async def test_header_values_are_masked_in_every_answer_and_never_logged(
    client: httpx.AsyncClient,
    store: Store,
    settings: Settings,
    sql: Sql,
    target: Target,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    payload = {"url": f"{target.url}/status/500", "headers": {"Authorization": SECRET}}
    task_id = await create(client, payload)
    keyed = await client.post("/tasks", json={"type": "http", "execute_at": 0,
        "payload": payload}, headers={"Idempotency-Key": "k1"})  # fmt: skip
    batch = await client.post(
        "/tasks/batch", json={"tasks": [{"type": "http", "execute_at": 0, "payload": payload}]}
    )
    patched = await client.patch(f"/tasks/{keyed.json()['id']}", json={"payload": payload})
    schedule = {"type": "http", "cron": "0 0 1 1 *", "payload": payload}
    answers = [
        keyed,
        batch,
        patched,
        await client.post("/schedules", json={"name": "hook", **schedule}),
        await client.put("/schedules/hook2", json=schedule),
        await client.patch("/schedules/hook", json={"payload": payload}),
        await client.get("/schedules/hook"),
        await client.get("/schedules"),
        await client.get(f"/tasks/{task_id}"),  # (answers[8])
        await client.get("/tasks"),
        await client.get("/tasks?type=http"),
        await client.get("/taskstate/notstarted"),
        await client.get(f"/id/{task_id}"),
    ]
    for answer in answers:
        assert answer.status_code < 300, answer.text
        assert SECRET not in answer.text
    shown = answers[8].json()["payload"]
    assert shown == {**payload, "headers": {"Authorization": "***"}}
    await drain(store, dataclasses.replace(settings, http_allowed_hosts="127.0.0.1"))
    assert sql("SELECT payload->'headers'->>'Authorization' FROM tasks WHERE id = %s", task_id) == [
        (SECRET,)
    ]  # kept for the run
    assert all(s.headers["Authorization"] == SECRET for s in target.seen)
    assert caplog.records and SECRET not in caplog.text
    assert SECRET not in " ".join(str(r[0]) for r in sql("SELECT error FROM tasks"))
    # Nor in the attempts' history: their errors and tracebacks (the http kind raises its
    # errors without the exception they came from).
    traced = sql("SELECT error, traceback FROM attempts WHERE traceback IS NOT NULL")
    assert traced and SECRET not in str(traced)
    for path in (f"/tasks/{task_id}/attempts", "/errors"):
        shown_history = await client.get(path)
        assert shown_history.status_code == 200 and SECRET not in shown_history.text


@pytest.fixture
async def fastapi_only(store: Store, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The FastAPI app alone, without the fast path (nor any middleware)."""
    app = build_app(settings, store=store, middleware=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as api:
        yield api


# Payloads refused at create, each with what its 422 says.
NOT_A_URL = "is not an http:// or https:// URL with a host"
REFUSED: dict[str, tuple[Any, str]] = {
    "none": (None, "must be an object with a `url`"),
    "a list": ([], "must be an object with a `url`"),
    "no url": ({"method": "GET"}, "must have a `url`"),
    "not a url": ({"url": "not a url"}, f"`url` 'not a url' {NOT_A_URL}"),
    "ftp": ({"url": "ftp://example.com/"}, NOT_A_URL),
    "no host": ({"url": "http:///path"}, NOT_A_URL),
    "port 65536": ({"url": "http://example.com:65536/"}, NOT_A_URL),
    "password": ({"url": "https://u:p@example.com/"}, "no user name or password"),
    "space": ({"url": "https://example.com/a b"}, NOT_A_URL),
    "unicode": ({"url": "https://example.com/é"}, NOT_A_URL),
    "too long": ({"url": "https://a.b/" + "x" * 4085}, "`url` is 4,097 characters"),
    "method": ({"url": "https://example.com/", "method": "FETCH"}, "`method` 'FETCH' is not"),
    "lowercase method": ({"url": "https://example.com/", "method": "post"}, "'post' is not"),
    "header number": (
        {"url": "https://example.com/", "headers": {"X-N": 1}},
        "`headers` value of X-N must be a string",
    ),
    "header list": ({"url": "https://example.com/", "headers": ["X"]}, "`headers` must be an"),
    "header name": (
        {"url": "https://example.com/", "headers": {"a b": "x"}},
        "not an HTTP header name: 'a b'",
    ),
    "header line": (
        {"url": "https://example.com/", "headers": {"X-A": f"{SECRET}\r\nB: c"}},
        "`headers` value of X-A must be printable ASCII",
    ),
    "GET body": (
        {"url": "https://example.com/", "method": "GET", "body": "x"},
        "has a `body`, which a GET request cannot carry",
    ),
    "extra": ({"url": "https://example.com/", "timeout": 3}, "has no field 'timeout'"),
}


@pytest.mark.parametrize("path", ["fast", "fastapi"])
async def test_a_payload_the_http_kind_cannot_run_is_a_422_on_every_create_path(
    client: httpx.AsyncClient, fastapi_only: httpx.AsyncClient, sql: Sql, path: str
) -> None:
    api = client if path == "fast" else fastapi_only
    good = {"type": "http", "execute_at": 0, "payload": {"url": "https://example.com/"}}
    for name, (payload, message) in REFUSED.items():
        sent = {"type": "HTTP", "execute_at": 0, "payload": payload}
        one = await api.post("/tasks", json=sent)
        batch = await api.post("/tasks/batch", json={"tasks": [good, good, sent]})
        for answer, loc in ((one, ["body", "payload"]), (batch, ["body", "tasks", 2, "payload"])):
            assert answer.status_code == 422, (name, answer.text)
            (issue,) = answer.json()["detail"]
            assert issue["loc"] == loc, name
            assert message in issue["msg"], (name, issue["msg"])
            assert SECRET not in answer.text
    # Without a payload at all: the original route, and a body without one.
    assert (await api.post("/http/0")).status_code == 422
    assert (await api.post("/tasks", json={"type": "http", "execute_at": 0})).status_code == 422
    assert sql("SELECT count(*) FROM tasks") == [(0,)]  # nothing written, no batch in part
    taken: list[dict[str, Any]] = [
        {"url": "HTTPS://EXAMPLE.com:8443/a?b=c#d", "method": "DELETE", "headers": {}},
        {"url": "http://127.0.0.1/", "headers": None, "body": None, "method": "GET"},
        {"url": "https://xn--bcher-kva.example/", "headers": {"X-Empty": "", "A": "b \tc"}},
        {"url": "http://a:65535", "headers": {"Host": "ignored"}, "method": "HEAD", "body": None},
        {"url": "https://a.b/" + "x" * 4084},
    ]
    for payload in taken:
        created = await api.post("/tasks", json={**good, "payload": payload})
        assert created.status_code == 201, created.text


async def test_a_patch_of_an_http_tasks_payload_is_checked(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    task_id = await create(client, {"url": "https://example.com/", "headers": {"A": SECRET}})
    for payload, message in ((None, "must be an object"), ({"url": "x:y"}, "is not an http://")):
        refused = await client.patch(f"/tasks/{task_id}", json={"payload": payload})
        assert refused.status_code == 422, refused.text
        assert message in refused.json()["detail"][0]["msg"]
    # The task as an answer shows it, sent back: its masked header value is refused, not
    # stored in place of the secret.
    shown = (await client.get(f"/tasks/{task_id}")).json()["payload"]
    refused = await client.patch(f"/tasks/{task_id}", json={"payload": shown})
    assert refused.status_code == 422, refused.text
    assert "value of A is ***, what answers show" in refused.json()["detail"][0]["msg"]
    assert sql("SELECT payload FROM tasks") == [
        ({"url": "https://example.com/", "headers": {"A": SECRET}},)
    ]
    moved = await client.patch(f"/tasks/{task_id}", json={"payload": {"url": "https://a.b/"}})
    assert moved.status_code == 200 and moved.json()["payload"] == {"url": "https://a.b/"}
    missing = await client.patch("/tasks/999", json={"payload": None})
    assert missing.status_code == 404
