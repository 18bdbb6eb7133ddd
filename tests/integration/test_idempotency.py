"""Idempotent creation: a client's retry of a create gets the task its first try made."""

import asyncio
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from functions.settings import Settings
from tests.conftest import serve

Sql = Callable[..., list[tuple[Any, ...]]]
FOO_2030 = {"type": "foo", "execute_at": "2030-01-01T12:00:00Z"}


def count(sql: Sql) -> int:
    return int(sql("SELECT count(*) FROM tasks")[0][0])


async def test_a_repeat_with_the_key_gets_the_same_task_with_200(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    key = {"Idempotency-Key": "order-1842"}
    first = await client.post("/tasks", json=FOO_2030, headers=key)
    assert first.status_code == 201, first.text
    assert first.json()["idempotency_key"] == "order-1842"
    # The same request, however it is spelled: the same kind and the same instant.
    for body in (
        FOO_2030,
        {"type": "FOO", "execute_at": "2030-01-01T14:00:00+02:00"},
        {"type": "foo", "execute_at": 1893499200},
    ):
        again = await client.post("/tasks", json=body, headers=key)
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
    assert count(sql) == 1
    assert (await client.get(f"/tasks/{first.json()['id']}")).json() == first.json()


async def test_a_repeat_gets_the_task_whatever_happened_to_it_since(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    key = {"Idempotency-Key": "k"}
    task = (await client.post("/tasks", json=FOO_2030, headers=key)).json()
    # Run now (execute_at moves), then finished: the repeat is still the same request.
    sql(
        "UPDATE tasks SET execute_at = now(), state = 'succeeded', attempts = 1,"
        " started_at = now(), finished_at = now(), output = 'Foo' WHERE id = %s",
        task["id"],
    )
    again = await client.post("/tasks", json=FOO_2030, headers=key)
    assert again.status_code == 200, again.text
    assert (again.json()["id"], again.json()["state"]) == (task["id"], "succeeded")
    assert count(sql) == 1


@pytest.mark.parametrize(
    "other",
    [{"type": "baz", "execute_at": "2030-01-01T12:00:00Z"}, {"type": "foo", "execute_at": 0}],
    ids=["another type", "another time"],
)
async def test_the_key_with_another_body_is_409_naming_the_key(
    client: httpx.AsyncClient, sql: Sql, other: dict[str, Any]
) -> None:
    key = {"Idempotency-Key": "order-1842"}
    task = (await client.post("/tasks", json=FOO_2030, headers=key)).json()
    response = await client.post("/tasks", json=other, headers=key)
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert "'order-1842'" in detail and f"task {task['id']}" in detail
    assert count(sql) == 1


async def test_concurrent_requests_with_one_key_create_one_task(
    settings: Settings, sql: Sql
) -> None:
    async with serve(settings) as client:
        responses = await asyncio.gather(
            *(
                client.post("/tasks", json=FOO_2030, headers={"Idempotency-Key": "once"})
                for _ in range(30)
            )
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 29 + [201], [r.text for r in responses if r.status_code >= 300]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count(sql) == 1


async def test_without_a_key_every_request_creates_a_task(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    first = await client.post("/tasks", json=FOO_2030)
    second = await client.post("/tasks", json=FOO_2030)
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["idempotency_key"] is None
    assert count(sql) == 2


async def test_a_deleted_task_frees_its_key(client: httpx.AsyncClient) -> None:
    key = {"Idempotency-Key": "k"}
    first = (await client.post("/tasks", json=FOO_2030, headers=key)).json()
    assert (await client.delete(f"/tasks/{first['id']}")).status_code == 204
    again = await client.post("/tasks", json=FOO_2030, headers=key)
    assert again.status_code == 201
    assert again.json()["id"] != first["id"]


@pytest.mark.parametrize(
    "value",
    [b"", b"a b", b"\tkey", "clé".encode(), b"\xff\xfe", b"x" * 256, b"a\x7fb", b"a,b"],
    ids=["empty", "space", "tab", "utf-8", "not utf-8", "256 chars", "DEL", "comma"],
)
async def test_a_key_that_is_not_1_to_255_printable_ascii_is_422(
    client: httpx.AsyncClient, sql: Sql, value: bytes
) -> None:
    response = await client.post("/tasks", json=FOO_2030, headers={b"idempotency-key": value})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert count(sql) == 0


async def test_two_keys_on_one_request_are_a_422_not_the_first_taken(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    headers = [("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    response = await client.post("/tasks", json=FOO_2030, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert "more than once" in response.text
    assert count(sql) == 0


async def test_keys_of_255_printable_characters_are_kept_exactly(
    client: httpx.AsyncClient,
) -> None:
    # Every printable ASCII character but the comma (two keys, joined as API Gateway joins
    # a header sent twice), 279 characters: cut to 255.
    key = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != ",") * 3
    response = await client.post("/tasks", json=FOO_2030, headers={"Idempotency-Key": key[:255]})
    assert response.status_code == 201, response.text
    assert response.json()["idempotency_key"] == key[:255]


def test_the_table_refuses_keys_the_api_refuses(sql: Sql) -> None:
    insert = (
        "INSERT INTO tasks (kind, execute_at, max_attempts, idempotency_key,"
        " idempotency_execute_at) VALUES ('foo', now(), 3, %s, now())"
    )
    sql(insert, "~" * 255)
    sql(insert, "!")
    for bad in ("", "a b", "\tkey", "é", "é" * 100, "x" * 256, "a\x7fb"):
        with pytest.raises(psycopg.errors.CheckViolation):
            sql(insert, bad)
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql(insert, "~" * 255)


def test_the_tables_checks_hold_no_counted_repetition(sql: Sql) -> None:
    # PostgreSQL's regex engine runs `{1,255}` in time that grows with the count times the
    # key's length: `idempotency_key ~ '^[\x21-\x7e]{1,255}$'` took 2.7 s of the one INSERT of
    # a batch of 10,000 255-character keys (statement timeout 5 s; 0.3 s in all with the
    # length checked apart, migration 0006). No timing here: the checks' text says it.
    checks = sql(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'tasks'::regclass AND contype = 'c'"
    )
    assert "idempotency_key_printable" in {name for name, _ in checks}
    for name, definition in checks:
        assert not re.search(r"~[^']*'[^']*\{\d*,?\d*\}", definition), (name, definition)


def item(kind: str, at: Any, key: str | None = None) -> dict[str, Any]:
    return {"type": kind, "execute_at": at, **({"idempotency_key": key} if key else {})}


async def test_batch_items_with_taken_keys_map_to_their_tasks_in_order(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    single = await client.post("/tasks", json=FOO_2030, headers={"Idempotency-Key": "a"})
    batch = [
        item("baz", 0),
        item("foo", "2030-01-01T12:00:00Z", "a"),  # the single create's
        item("bar", 5, "b"),
        item("baz", 1),
        item("bar", 5, "b"),  # the same key again in this batch: the same task
    ]
    first = await client.post("/tasks/batch", json={"tasks": batch})
    assert first.status_code == 201, first.text
    ids = first.json()["ids"]
    assert ids[1] == single.json()["id"]
    assert ids[2] == ids[4]
    assert len(set(ids)) == 4
    assert count(sql) == 4
    kinds = [(await client.get(f"/tasks/{i}")).json()["type"] for i in ids]
    assert kinds == ["baz", "foo", "bar", "baz", "bar"]
    assert (await client.get(f"/tasks/{ids[2]}")).json()["idempotency_key"] == "b"

    # The whole batch again: the keyed items create nothing, the others are new.
    again = (await client.post("/tasks/batch", json={"tasks": batch})).json()["ids"]
    assert [again[i] for i in (1, 2, 4)] == [ids[i] for i in (1, 2, 4)]
    assert count(sql) == 6


@pytest.mark.parametrize(
    "batch",
    [
        [item("baz", 0, "new"), item("foo", 0, "a")],  # "a" is foo at 2030 already
        [item("baz", 0, "x"), item("baz", 0), item("baz", 1, "x")],  # within the batch
    ],
    ids=["an earlier request", "another item"],
)
async def test_a_batch_reusing_a_key_with_another_body_is_409_and_writes_nothing(
    client: httpx.AsyncClient, sql: Sql, batch: list[dict[str, Any]]
) -> None:
    await client.post("/tasks", json=FOO_2030, headers={"Idempotency-Key": "a"})
    response = await client.post("/tasks/batch", json={"tasks": batch})
    assert response.status_code == 409, response.text
    assert "idempotency key" in response.json()["detail"]
    assert count(sql) == 1


async def test_a_batch_key_must_be_printable_ascii(client: httpx.AsyncClient) -> None:
    response = await client.post("/tasks/batch", json={"tasks": [item("baz", 0, "a b")]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "tasks", 0, "idempotency_key"]


def _waiting_on_each_other(settings: Settings) -> Settings:
    """Batches that share keys run one after another, each waiting on the one before to
    commit: on a busy machine the last of eight waited past the 5 s statement bound (a 503,
    as it should be). What these tests look for is a wrong answer or a deadlock, which the
    server ends after a second whatever the bound."""
    return dataclasses.replace(settings, db_statement_timeout_s=60.0)


async def test_concurrent_batches_sharing_keys_create_one_task_per_key(
    settings: Settings, sql: Sql
) -> None:
    batch = {"tasks": [item("baz", i, f"k{i}") for i in range(50)]}
    async with serve(_waiting_on_each_other(settings)) as client:
        responses = await asyncio.gather(
            *(client.post("/tasks/batch", json=batch) for _ in range(8))
        )
    assert {r.status_code for r in responses} == {201}, [r.text for r in responses]
    assert len({tuple(r.json()["ids"]) for r in responses}) == 1
    assert count(sql) == 50


async def test_concurrent_batches_with_keys_in_opposite_orders_do_not_deadlock(
    settings: Settings, sql: Sql
) -> None:
    keys = [f"k{i:03}" for i in range(200)]
    forward = {"tasks": [item("baz", 0, k) for k in keys]}
    backward = {"tasks": [item("baz", 0, k) for k in reversed(keys)]}
    async with serve(_waiting_on_each_other(settings)) as client:
        responses = await asyncio.gather(
            *(client.post("/tasks/batch", json=b) for b in [forward, backward] * 4)
        )
    assert {r.status_code for r in responses} == {201}, [r.text for r in responses]
    ids = [r.json()["ids"] for r in responses]
    assert ids[0] == ids[1][::-1]
    assert count(sql) == 200
