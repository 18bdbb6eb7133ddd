"""`functions.enqueue`: a task written in the caller's own transaction, on each connection it
takes (psycopg and SQLAlchemy, sync and async), by the API's rules, and a worker woken when
that transaction commits."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from functions import kinds, queries
from functions.enqueue import EnqueueRefused, IdempotencyKeyReused, enqueue, enqueue_async
from functions.model import END_UNIX_S, MAX_EXECUTE_AT
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Store, listen
from functions.tick import tick
from tests.conftest import serve
from tests.integration.test_hotpath import LIMIT, PAYLOADS, nested, sized
from tests.pgbouncer import pgbouncer_url

__all__ = ["pgbouncer_url"]  # the fixture

Sql = Callable[..., list[tuple[Any, ...]]]
# One call of enqueue: its arguments after the connection, and its keywords.
Call = tuple[tuple[Any, ...], dict[str, Any]]


@pytest.fixture(autouse=True)
def _kinds_as_they_were() -> Iterator[None]:
    """enqueue loads the kinds as every process does (`kinds.load`): put them back after."""
    before, loaded = dict(kinds.KINDS), kinds._loaded
    yield
    kinds.KINDS.clear()
    kinds.KINDS.update(before)
    kinds._loaded = loaded


@pytest.fixture
def notes(sql: Sql) -> Sql:
    """A table of the user's own, written in the same transactions as the tasks."""
    sql("CREATE TABLE notes (text text NOT NULL)")
    return sql


def _sqlalchemy_url(url: str, driver: str) -> str:
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


# Each way of holding a transaction: run `calls` in one, write a note beside them, then
# commit or roll back. Returns what each call returned or raised.
Outcome = int | BaseException
Transaction = Callable[[str, list[Call], bool], Awaitable[list[Outcome]]]
NOTE = "INSERT INTO notes VALUES ('written beside')"


def _each(call: Callable[..., int], calls: list[Call], conn: Any) -> list[Outcome]:
    out: list[Outcome] = []
    for args, kwargs in calls:
        try:
            out.append(call(conn, *args, **kwargs))
        except Exception as exc:
            out.append(exc)
    return out


async def _each_async(
    call: Callable[..., Awaitable[int]], calls: list[Call], conn: Any
) -> list[Outcome]:
    out: list[Outcome] = []
    for args, kwargs in calls:
        try:
            out.append(await call(conn, *args, **kwargs))
        except Exception as exc:
            out.append(exc)
    return out


async def psycopg_sync(url: str, calls: list[Call], commit: bool) -> list[Outcome]:
    with psycopg.connect(url) as conn:
        out = _each(enqueue, calls, conn)
        conn.execute(NOTE)
        conn.commit() if commit else conn.rollback()
    return out


async def psycopg_async(url: str, calls: list[Call], commit: bool) -> list[Outcome]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        out = await _each_async(enqueue_async, calls, conn)
        await conn.execute(NOTE)
        await (conn.commit() if commit else conn.rollback())
    return out


async def sqlalchemy_connection(url: str, calls: list[Call], commit: bool) -> list[Outcome]:
    engine = create_engine(_sqlalchemy_url(url, "psycopg"))
    try:
        with engine.connect() as conn:
            out = _each(enqueue, calls, conn)
            conn.execute(text(NOTE))
            conn.commit() if commit else conn.rollback()
    finally:
        engine.dispose()
    return out


async def sqlalchemy_session(url: str, calls: list[Call], commit: bool) -> list[Outcome]:
    engine = create_engine(_sqlalchemy_url(url, "psycopg"))
    try:
        with Session(engine) as session:
            out = _each(enqueue, calls, session)
            session.execute(text(NOTE))
            session.commit() if commit else session.rollback()
    finally:
        engine.dispose()
    return out


async def sqlalchemy_async_connection(url: str, calls: list[Call], commit: bool) -> list[Outcome]:
    engine = create_async_engine(_sqlalchemy_url(url, "psycopg"))
    try:
        async with engine.connect() as conn:
            out = await _each_async(enqueue_async, calls, conn)
            await conn.execute(text(NOTE))
            await (conn.commit() if commit else conn.rollback())
    finally:
        await engine.dispose()
    return out


async def sqlalchemy_async_session(url: str, calls: list[Call], commit: bool) -> list[Outcome]:
    engine = create_async_engine(_sqlalchemy_url(url, "psycopg"))
    try:
        async with AsyncSession(engine) as session:
            out = await _each_async(enqueue_async, calls, session)
            await session.execute(text(NOTE))
            await (session.commit() if commit else session.rollback())
    finally:
        await engine.dispose()
    return out


TRANSACTIONS: list[Transaction] = [
    psycopg_sync,
    psycopg_async,
    sqlalchemy_connection,
    sqlalchemy_session,
    sqlalchemy_async_connection,
    sqlalchemy_async_session,
]


def task_rows(sql: Sql) -> list[tuple[Any, ...]]:
    return sql(
        "SELECT id, kind, state, attempts, max_attempts, payload, idempotency_key, output"
        " FROM tasks ORDER BY id"
    )


@pytest.mark.parametrize("transaction", TRANSACTIONS, ids=lambda t: t.__name__)
async def test_a_committed_task_runs_once_and_a_rolled_back_one_never_exists(
    transaction: Transaction, notes: Sql, settings: Settings, database_url: str
) -> None:
    payload = {"to": "ada@example.com", "n": [1, 2.5, None, True], "é": "日🎉"}
    calls: list[Call] = [
        (("foo", 0), {"payload": payload}),
        (("baz", datetime.now(UTC)), {"max_attempts": 1}),
    ]

    rolled_back = await transaction(database_url, calls, False)

    assert all(isinstance(task_id, int) for task_id in rolled_back), rolled_back
    assert task_rows(notes) == []
    assert notes("SELECT count(*) FROM notes") == [(0,)]

    committed = await transaction(database_url, calls, True)

    assert all(isinstance(task_id, int) for task_id in committed), committed
    assert notes("SELECT count(*) FROM notes") == [(1,)]
    foo_id, baz_id = committed
    out = io.StringIO()
    summary = await tick(settings, out=out)
    rows = task_rows(notes)
    assert [row[:5] for row in rows] == [
        (foo_id, "foo", "succeeded", 1, settings.max_attempts),
        (baz_id, "baz", "succeeded", 1, 1),
    ]
    assert rows[0][5] == payload and rows[1][5] is None
    assert f"Foo {foo_id}\n" in out.getvalue()
    assert out.getvalue().count("\n") == 2 and summary.as_dict()["succeeded"] == 2


# --- refusals ------------------------------------------------------------------------------

AWARE = datetime(2030, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
REFUSED: list[tuple[str, Call]] = [
    ("type", (("nope", 0), {})),
    ("type", (("", 0), {})),
    ("type", ((7, 0), {})),
    ("type", ((None, 0), {})),
    ("type", (("foo\u00a0", 0), {})),
    ("execute_at", (("foo", datetime(2030, 1, 1)), {})),  # naive
    ("execute_at", (("foo", -1), {})),
    ("execute_at", (("foo", END_UNIX_S), {})),
    ("execute_at", (("foo", float("nan")), {})),
    ("execute_at", (("foo", True), {})),
    ("execute_at", (("foo", None), {})),
    ("execute_at", (("foo", "2030-01-01T12:00:00"), {})),
    ("execute_at", (("foo", "tomorrow"), {})),
    ("execute_at", (("foo", date(2030, 1, 1)), {})),
    ("execute_at", (("foo", datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))), {})),
    (
        "execute_at",
        (("foo", MAX_EXECUTE_AT.replace(tzinfo=timezone(timedelta(hours=-1)))), {}),
    ),
    ("payload", (("foo", 0), {"payload": sized(LIMIT + 1)})),
    ("payload", (("foo", 0), {"payload": nested(101)})),
    ("payload", (("foo", 0), {"payload": float("inf")})),
    ("payload", (("foo", 0), {"payload": {"a": [float("nan")]}})),
    ("payload", (("foo", 0), {"payload": "nul \x00"})),
    ("payload", (("foo", 0), {"payload": "lone \ud800"})),
    ("payload", (("foo", 0), {"payload": (1, 2)})),
    ("payload", (("foo", 0), {"payload": {"a": {1, 2}}})),
    ("payload", (("foo", 0), {"payload": {1: "one"}})),
    ("payload", (("foo", 0), {"payload": {"when": datetime.now(UTC)}})),
    ("max_attempts", (("foo", 0), {"max_attempts": 0})),
    ("max_attempts", (("foo", 0), {"max_attempts": 1001})),
    ("max_attempts", (("foo", 0), {"max_attempts": True})),
    ("max_attempts", (("foo", 0), {"max_attempts": 2.5})),
    ("max_attempts", (("foo", 0), {"max_attempts": "3"})),
    ("timeout_s", (("foo", 0), {"timeout_s": 0})),
    ("timeout_s", (("foo", 0), {"timeout_s": -1.5})),
    ("timeout_s", (("foo", 0), {"timeout_s": float("nan")})),
    ("timeout_s", (("foo", 0), {"timeout_s": True})),
    ("timeout_s", (("foo", 0), {"timeout_s": "5"})),
    ("timeout_s", (("baz", 0), {"timeout_s": 1.000001})),  # over baz's own 1 s
    ("timeout_s", (("foo", 0), {"timeout_s": 4.5})),  # over foo's 3 s + 1
    ("priority", (("foo", 0), {"priority": -1})),
    ("priority", (("foo", 0), {"priority": 10})),
    ("priority", (("foo", 0), {"priority": 1.5})),
    ("priority", (("foo", 0), {"priority": False})),
    ("idempotency_key", (("foo", 0), {"idempotency_key": ""})),
    ("idempotency_key", (("foo", 0), {"idempotency_key": "a b"})),
    ("idempotency_key", (("foo", 0), {"idempotency_key": "k" * 256})),
    ("idempotency_key", (("foo", 0), {"idempotency_key": "a,b"})),
    ("idempotency_key", (("foo", 0), {"idempotency_key": "clé"})),
    ("idempotency_key", (("foo", 0), {"idempotency_key": 12})),
]


def _circle() -> list[Any]:
    circle: list[Any] = []
    circle.append(circle)
    return circle


@pytest.mark.parametrize("transaction", TRANSACTIONS, ids=lambda t: t.__name__)
async def test_each_refusal_raises_writes_nothing_and_the_transaction_commits_the_rest(
    transaction: Transaction, notes: Sql, database_url: str
) -> None:
    cases = [*REFUSED, ("payload", (("foo", 0), {"payload": _circle()}))]
    calls = [call for _, call in cases]
    # Between each refusal, a task that is written: the transaction is not spoiled.
    interleaved = [c for call in calls for c in (call, (("baz", 0), {}))]

    out = await transaction(database_url, interleaved, True)

    for (argument, call), got in zip(cases, out[::2], strict=True):
        assert isinstance(got, EnqueueRefused), (call, got)
        assert got.argument == argument, (call, got)
    assert all(isinstance(task_id, int) for task_id in out[1::2])
    assert [(kind, state) for _, kind, state, *_ in task_rows(notes)] == [
        ("baz", "scheduled")
    ] * len(cases)
    assert notes("SELECT count(*) FROM notes") == [(1,)]


async def test_refusals_say_what_the_api_says(
    psycopg_conn: psycopg.Connection[Any], database_url: str
) -> None:
    """Each refusal the API can be sent in JSON is refused with its 422's message, by an
    API of the same settings (enqueue reads them from the environment)."""
    async with serve(Settings(database_url=database_url)) as client:
        await _compare_refusals(psycopg_conn, client)
    assert psycopg_conn.execute("SELECT count(*) FROM tasks").fetchone() == (0,)


async def _compare_refusals(
    psycopg_conn: psycopg.Connection[Any], client: httpx.AsyncClient
) -> None:
    for argument, ((kind, at), options) in REFUSED:
        if not _json_able(kind, at, options):
            continue
        body: dict[str, Any] = {"type": kind, "execute_at": at}
        headers = {}
        for name, value in options.items():
            if name == "idempotency_key":
                headers["Idempotency-Key"] = value
            else:
                body[name] = value
        with pytest.raises(EnqueueRefused) as refused:
            enqueue(psycopg_conn, kind, at, **options)
        # (json.dumps escapes what is not ASCII: a lone surrogate is sent as JSON can say it.)
        answer = await client.post(
            "/tasks",
            content=json.dumps(body),
            headers={**headers, "content-type": "application/json"},
        )
        assert answer.status_code == 422, (argument, answer.text)
        messages = [issue["msg"] for issue in answer.json()["detail"]]
        assert any(str(refused.value) in msg for msg in messages), (str(refused.value), messages)


def _json_able(kind: Any, at: Any, options: dict[str, Any]) -> bool:
    try:
        sent = [kind, at, options]
        if json.loads(json.dumps(sent, allow_nan=False)) != sent:  # (a tuple: a list in JSON)
            return False
    except (TypeError, ValueError):
        return False
    key = options.get("idempotency_key")
    return key is None or (isinstance(key, str) and key.isascii() and key.strip() == key)


@pytest.fixture
def psycopg_conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url) as conn:
        yield conn


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ACCEPTED: list[tuple[Call, tuple[str, datetime, Any]]] = [
    (((" FOO\t", 0), {}), ("foo", EPOCH, None)),
    ((("baz", AWARE), {}), ("baz", datetime(2030, 1, 1, 10, tzinfo=UTC), None)),
    ((("baz", END_UNIX_S - 1), {}), ("baz", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), None)),
    ((("baz", 1.000001), {}), ("baz", EPOCH + timedelta(seconds=1, microseconds=1), None)),
    ((("baz", MAX_EXECUTE_AT), {}), ("baz", MAX_EXECUTE_AT, None)),
    ((("baz", "2030-01-01T12:00:00+02:00"), {}), ("baz", AWARE, None)),
    *[((("baz", 0), {"payload": p}), ("baz", EPOCH, p)) for p in PAYLOADS],
]


async def test_what_is_taken_is_stored_as_given(
    psycopg_conn: psycopg.Connection[Any], sql: Sql
) -> None:
    """Each end of each range: type in any case, times to the microsecond at both ends of
    the range, payloads of every JSON kind up to 64 KiB exactly and nesting 100 deep, and
    the options' ends."""
    ids = []
    for (args, kwargs), _ in ACCEPTED:
        ids.append(enqueue(psycopg_conn, *args, **kwargs))
    options: list[dict[str, Any]] = [
        {"max_attempts": 1, "idempotency_key": "k" * 255, "timeout_s": 1e-6, "priority": 9},
        {"max_attempts": 1000, "idempotency_key": "!~", "timeout_s": 1, "priority": 0},
        {"timeout_s": 4},  # foo's own: 3 s and 1
        {"max_attempts": 2.0, "priority": 9.0},  # whole numbers, as the API reads `2.0`
    ]
    for kwargs in options:
        ids.append(enqueue(psycopg_conn, "foo", 0, **kwargs))
    psycopg_conn.commit()
    rows = sql(
        "SELECT kind, execute_at, payload, max_attempts, idempotency_key, timeout_s, priority"
        " FROM tasks WHERE id = ANY(%s) ORDER BY id",
        ids,
    )
    assert [row[:3] for row in rows[: len(ACCEPTED)]] == [want for _, want in ACCEPTED]
    assert {row[3:] for row in rows[: len(ACCEPTED)]} == {(3, None, None, 0)}
    assert [row[3:] for row in rows[len(ACCEPTED) :]] == [
        (1, "k" * 255, 1e-6, 9),
        (1000, "!~", 1.0, 0),
        (3, None, 4.0, 0),
        (2, None, None, 9),
    ]


async def test_the_wrong_connection_is_a_type_error(
    psycopg_conn: psycopg.Connection[Any], database_url: str
) -> None:
    with pytest.raises(TypeError, match="enqueue_async takes a psycopg AsyncConnection"):
        await enqueue_async(psycopg_conn, "foo", 0)  # type: ignore[arg-type]
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        with pytest.raises(TypeError, match="for an async one: enqueue_async"):
            enqueue(conn, "foo", 0)  # type: ignore[arg-type]
    engine = create_engine(_sqlalchemy_url(database_url, "psycopg"))
    with pytest.raises(TypeError, match=re.escape("sqlalchemy.engine.base.Engine")):
        enqueue(engine, "foo", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("builtins.str")):
        enqueue(database_url, "foo", 0)  # type: ignore[arg-type]
    engine.dispose()


# --- idempotency keys ------------------------------------------------------------------------


async def test_a_repeat_gets_the_same_task_and_another_request_raises(
    psycopg_conn: psycopg.Connection[Any], client: httpx.AsyncClient, sql: Sql
) -> None:
    first = enqueue(psycopg_conn, "foo", AWARE, payload={"a": 1, "b": [2]}, idempotency_key="k1")
    # Within the same transaction, and in the same time said otherwise, keys in another order.
    again = enqueue(
        psycopg_conn, "FOO", AWARE.timestamp(), payload={"b": [2], "a": 1}, idempotency_key="k1"
    )
    assert again == first
    others: list[dict[str, Any]] = [
        {"type": "baz"},
        {"execute_at": AWARE + timedelta(microseconds=1)},
        {"payload": {"a": 1, "b": [2.5]}},
        {"payload": None},
        {"max_attempts": 2},
        {"timeout_s": 2.5},
        {"priority": 1},
    ]
    for changed in others:
        call: dict[str, Any] = {
            "type": "foo",
            "execute_at": AWARE,
            "payload": {"a": 1, "b": [2]},
            **changed,
        }
        with pytest.raises(IdempotencyKeyReused, match=f"used for task {first} with another"):
            enqueue(psycopg_conn, call.pop("type"), call.pop("execute_at"), **call,
                    idempotency_key="k1")  # fmt: skip
    # The transaction goes on: the task and another are committed.
    other = enqueue(psycopg_conn, "baz", 0, idempotency_key="k2")
    psycopg_conn.commit()
    assert sql("SELECT id, idempotency_key FROM tasks ORDER BY id") == [
        (first, "k1"),
        (other, "k2"),
    ]
    # The API's repeat of it is the same task; its other request the same 409.
    body = {"type": "foo", "execute_at": AWARE.isoformat(), "payload": {"a": 1, "b": [2]}}
    repeat = await client.post("/tasks", json=body, headers={"Idempotency-Key": "k1"})
    assert (repeat.status_code, repeat.json()["id"]) == (200, first)
    # And an API-made task's key, repeated through enqueue.
    made = await client.post(
        "/tasks",
        json={"type": "baz", "execute_at": 5, "payload": [1]},
        headers={"Idempotency-Key": "k3"},
    )
    assert enqueue(psycopg_conn, "baz", 5, payload=[1], idempotency_key="k3") == made.json()["id"]
    with pytest.raises(IdempotencyKeyReused):
        enqueue(psycopg_conn, "baz", 5, payload=[1.5], idempotency_key="k3")


@pytest.mark.parametrize("first_commits", [True, False])
async def test_a_key_held_by_an_open_transaction_waits_for_its_end(
    database_url: str, sql: Sql, first_commits: bool
) -> None:
    """Two transactions enqueue with one key: the second waits for the first, then gets its
    task if it committed, or makes its own if it rolled back. One task either way."""
    async with (
        await psycopg.AsyncConnection.connect(database_url) as one,
        await psycopg.AsyncConnection.connect(database_url) as two,
    ):
        first = await enqueue_async(one, "foo", 0, idempotency_key="shared")
        second = asyncio.create_task(enqueue_async(two, "foo", 0, idempotency_key="shared"))
        await _until_waiting_on_a_lock(sql)
        assert not second.done()
        await (one.commit() if first_commits else one.rollback())
        got = await second
        await two.commit()
    [(task_id,)] = sql("SELECT id FROM tasks")
    assert got == task_id and (got == first) is first_commits


async def _until_waiting_on_a_lock(sql: Sql) -> None:
    for _ in range(500):
        waiting = sql(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting == [(1,)]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the second enqueue never waited")


# --- waking workers --------------------------------------------------------------------------


async def test_listeners_hear_of_the_task_at_the_commit_and_not_before(
    database_url: str, sql: Sql
) -> None:
    """The NOTIFY is in the caller's transaction: a LISTENing session hears nothing until
    the commit (a marker NOTIFYed after the enqueue, by another session, arrives first)."""
    with (
        psycopg.connect(database_url, autocommit=True) as listener,
        psycopg.connect(database_url) as conn,
    ):
        listener.execute(f"LISTEN {queries.CHANNEL}")
        enqueue(conn, "foo", 0)
        sql(f"NOTIFY {queries.CHANNEL}, 'marker'")
        heard = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
        assert heard == ["marker"]
        conn.commit()
        heard = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
        assert [float(due) for due in heard] == [0.0]  # the task's due time, in Unix seconds


async def test_through_a_transaction_pooler_the_task_and_its_notify_come_at_the_commit(
    pgbouncer_url: str, database_url: str, sql: Sql
) -> None:
    """Your own connection may go through pgbouncer in transaction mode: the transaction
    holds one server connection from BEGIN to COMMIT, and a worker LISTENing on the
    database itself hears of the task at the commit."""
    with (
        psycopg.connect(database_url, autocommit=True) as listener,
        psycopg.connect(pgbouncer_url, prepare_threshold=None) as conn,
    ):
        listener.execute(f"LISTEN {queries.CHANNEL}")
        enqueue(conn, "foo", 0)
        conn.rollback()
        first = enqueue(conn, "foo", 0, idempotency_key="pooled")
        assert enqueue(conn, "foo", 0, idempotency_key="pooled") == first
        sql(f"NOTIFY {queries.CHANNEL}, 'marker'")
        assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["marker"]
        conn.commit()
        heard = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
        assert [float(due) for due in heard] == [0.0]
    assert sql("SELECT id, idempotency_key FROM tasks") == [(first, "pooled")]


async def test_a_sleeping_worker_wakes_at_the_commit(
    database_url: str, settings: Settings, store: Store, sql: Sql
) -> None:
    """A worker with nothing due sleeps a full poll interval (a minute here) unless woken:
    it runs a task enqueued due now within seconds of the commit, and not before it. (A
    worker as `taskrunner worker` runs one: functions.tick.)"""
    settings = dataclasses.replace(settings, poll_interval_s=60.0)
    out = io.StringIO()
    runner = Runner(store, settings, out=out)
    heard: list[float | None] = []

    def on_created(due_s: float | None) -> None:
        heard.append(due_s)
        runner.notify(due_s)

    stop = asyncio.Event()
    listener = asyncio.create_task(listen(settings, on_created))
    worker = asyncio.create_task(runner.run(keep_polling=True, stop=stop))
    try:
        # Listening (it wakes the worker once when it starts), and asleep since.
        await _until(lambda: heard == [None] and runner.wakeup.sleeping, worker)
        await asyncio.sleep(0)
        assert runner.wakeup.sleeping and not runner.wakeup.is_set()
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            task_id = await enqueue_async(conn, "baz", datetime.now(UTC))
            assert heard == [None]  # not yet: it is not committed
            await conn.commit()
        await _until(lambda: sql("SELECT state FROM tasks") == [("succeeded",)], worker)
    finally:
        stop.set()
        await worker
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    assert len(heard) == 2 and out.getvalue().startswith("Baz ")
    assert sql("SELECT id FROM tasks") == [(task_id,)]


async def _until(check: Callable[[], bool], worker: asyncio.Task[Any]) -> None:
    """Wait for `check()`, 10 s at most (the worker's poll interval is 60 s)."""
    for _ in range(1_000):
        if check():
            return
        assert not worker.done(), worker
        await asyncio.sleep(0.01)
    raise AssertionError("not within 10 s")
