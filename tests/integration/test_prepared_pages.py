"""A first page with no value but its limit (every task, or tasks in some states, in any
order) is run from a plan prepared on its connection (Store._prepared_rows): prepared once,
prepared again when the server forgot it, never behind a transaction pooler, at most
Store.MAX_PREPARED on a connection. Whichever way a page is read, it is the same page.
(test_plans.py checks the prepared plans' shape on a million tasks.)"""

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from functions import tasks as domain
from functions.db import Database
from functions.http.responses import page_json
from functions.model import DEFAULT_ORDER, SortKey, TaskFilter, TaskOrder, TaskState
from functions.settings import Settings
from functions.store import Store

Sql = Callable[..., list[tuple[Any, ...]]]

PREPARED = "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements" \
    " WHERE name LIKE 'taskrunner_page_%' ORDER BY name"  # fmt: skip


@pytest.fixture
async def one_connection(settings: Settings) -> AsyncIterator[Store]:
    """A store on a pool of one connection: each page on the same session."""
    database = Database(dataclasses.replace(settings, db_pool_size=1))
    yield Store(database)
    await database.dispose()


async def _on_connection(store: Store, statement: str) -> list[tuple[Any, ...]]:
    async with store.database.connection() as conn:
        cursor = await conn.execute(statement)
        return await cursor.fetchall() if cursor.description else []


async def _page(store: Store, matching: TaskFilter | None = None, **kwargs: Any) -> bytes:
    matching = matching or TaskFilter()
    return page_json(await domain.list_tasks(store, matching, limit=100, cursor=None, **kwargs))


def _tasks(sql: Sql) -> None:
    sql(
        "INSERT INTO tasks (kind, execute_at, state, finished_at)"
        " SELECT 'baz', now() + n * interval '1 s',"
        "   (ARRAY['scheduled', 'failed', 'succeeded'])[n % 3 + 1],"
        "   CASE WHEN n % 3 > 0 THEN now() END"
        " FROM generate_series(1, 250) AS n"
    )


async def test_a_first_page_is_prepared_once_and_is_the_page_sent_as_text(
    one_connection: Store, store: Store, sql: Sql, settings: Settings
) -> None:
    """Three reads of the first page: one statement prepared, run from its generic plan
    each time, never planned for its values; and the page is the one a transaction pooler's
    client reads (sent as text), byte for byte."""
    _tasks(sql)
    pages = [await _page(one_connection) for _ in range(3)]
    [(_, generic, custom)] = await _on_connection(one_connection, PREPARED)
    assert (generic, custom) == (3, 0)
    pooled = Store(Database(dataclasses.replace(settings, transaction_pooler=True)))
    try:
        assert pages == [await _page(pooled)] * 3
    finally:
        await pooled.database.dispose()
    assert b'"state":"failed"' in pages[0] and pages[0].count(b'"id":') == 100


async def test_behind_a_transaction_pooler_nothing_is_prepared(
    settings: Settings, sql: Sql
) -> None:
    """A pooler runs each message on any of its server connections, where a statement
    prepared on another does not exist: pages are sent as text."""
    _tasks(sql)
    database = Database(dataclasses.replace(settings, db_pool_size=1, transaction_pooler=True))
    pooled = Store(database)
    try:
        for _ in range(3):
            assert (await _page(pooled)).count(b'"id":') == 100
        assert await _on_connection(pooled, PREPARED) == []
    finally:
        await database.dispose()


@pytest.mark.parametrize("forget", ["DEALLOCATE ALL", "DISCARD ALL"])
async def test_a_statement_the_server_forgot_is_prepared_again(
    one_connection: Store, sql: Sql, forget: str
) -> None:
    """`DEALLOCATE ALL` (psycopg sends it after a rollback on a connection where it has
    prepared statements of its own) or `DISCARD ALL` (a pooler's reset): the next page is
    prepared again, and is the same page."""
    _tasks(sql)
    first = await _page(one_connection)
    await _on_connection(one_connection, forget)
    assert await _on_connection(one_connection, PREPARED) == []
    assert await _page(one_connection) == first
    assert len(await _on_connection(one_connection, PREPARED)) == 1


async def test_a_statement_prepared_on_the_connection_already_is_run(
    one_connection: Store, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that holds the statement though the store does not know it (as when a
    session is handed over): the statement is prepared anew, in the message that runs it."""
    _tasks(sql)
    first = await _page(one_connection)
    from functions import store as store_module

    monkeypatch.setattr(store_module, "_PREPARED_PAGES", type(store_module._PREPARED_PAGES)())
    assert await _page(one_connection) == first
    [(_, generic, _)] = await _on_connection(one_connection, PREPARED)
    assert generic == 1
    assert await _page(one_connection) == first
    [(_, generic, _)] = await _on_connection(one_connection, PREPARED)
    assert generic == 2


async def test_a_connection_prepares_at_most_max_prepared_pages(
    one_connection: Store, store: Store, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past Store.MAX_PREPARED statements on a connection, a page is sent as text: every
    page still the one a fresh store reads."""
    _tasks(sql)
    monkeypatch.setattr(Store, "MAX_PREPARED", 2)
    cases: list[tuple[TaskFilter, TaskOrder]] = [
        (TaskFilter(), DEFAULT_ORDER),
        (TaskFilter(states=(TaskState.FAILED,)), DEFAULT_ORDER),
        (TaskFilter(states=(TaskState.SUCCEEDED,)), DEFAULT_ORDER),
        (TaskFilter(), TaskOrder(SortKey.EXECUTE_AT, descending=False)),
    ]
    for matching, order in cases * 2:
        page = await _page(one_connection, matching, order=order)
        assert page == await _page(store, matching, order=order)
        # (250 tasks: 84 failed, 83 succeeded)
        assert (
            page.count(b'"id":')
            == {(): 100, ("failed",): 84, ("succeeded",): 83}[
                tuple(s.value for s in matching.states)
            ]
        )
    assert len(await _on_connection(one_connection, PREPARED)) == 2


async def test_a_page_with_a_value_is_not_prepared(one_connection: Store, sql: Sql) -> None:
    """A filter with a value (a type), or a page after the first (its cursor): its plan
    is made for the value, each time, as before."""
    _tasks(sql)
    page = await domain.list_tasks(one_connection, TaskFilter(kinds=("baz",)), limit=10,
                                   cursor=None)  # fmt: skip
    assert page.next_cursor is not None
    await domain.list_tasks(one_connection, TaskFilter(), limit=10, cursor=page.next_cursor)
    assert await _on_connection(one_connection, PREPARED) == []
