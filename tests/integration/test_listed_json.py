"""A listed task's JSON is written by the database (queries.LISTED_JSON) but for its timeout
and payload (responses.listed_json): it must be the one JSON of a task, `task_json`'s, byte
for byte, whatever the task holds. Every state, text that JSON escapes, text beyond ASCII,
times at the ends of their range and of a second, every field null or not, payloads nested,
with numbers the two ways of writing them differ on, and masked by their kind's `show`."""

import json
from collections.abc import Callable
from typing import Any

import pytest

from functions import queries
from functions import tasks as domain
from functions.db import Database
from functions.http.responses import list_json, listed_json, page_json, plain_task_json, task_json
from functions.model import (
    DEFAULT_ORDER,
    MAX_PAGE_BYTES,
    Page,
    SortKey,
    Task,
    TaskFilter,
    TaskOrder,
    TaskState,
    WrittenPage,
)
from functions.settings import Settings
from functions.store import Store

Sql = Callable[..., list[tuple[Any, ...]]]

# Text a JSON writer must escape, or must not: quotes, backslashes, each control character
# (JSON's short escapes and \u00XX), DEL, the line separators JavaScript cares about,
# characters of 2, 3 and 4 bytes in UTF-8, a `/`.
TRICKY = 'a"b\\c/\n\r\t\b\f' + "".join(map(chr, range(1, 32))) + "\x7f\u2028\u2029é☃😀</x>"

TIMES = (
    "0001-01-01 00:00:00+00",
    "0001-01-01 00:00:00.000001+00",
    "9999-12-31 23:59:59.999999+00",
    "9999-12-31 23:59:59+00",
    "2026-11-28 09:00:00.1+00",  # .100000: six digits, its zeros kept
    "2026-11-28 09:00:00.000010+00",
    "1970-01-01 00:00:00+00",
    "1969-12-31 23:59:59.999999+00",
)

PAYLOADS: list[Any] = [
    None,
    {"a": [1, 2.5, -0.0, 1e-07, 1.5e300, 12345678901234567890, True, False, None]},
    {"nested": {"deeper": [{"x": [[[]]], "y": {}}]}, TRICKY: TRICKY},
    [TRICKY, "", 0, 1.0, 100.0, 1e16, 123.456],
    "just a string",
    0,
    1e-7,
    True,
    {"url": "https://example.com/", "headers": {"Authorization": "Bearer secret", "X": "y"}},
]

TIMEOUTS: list[float | None] = [None, 1e-07, 0.5, 30.0, 1e16, 1.7976931348623157e308, 123.456]


def _insert_every_kind_of_task(sql: Sql, *, plain: bool = False) -> None:
    """Tasks in every state, each field at an edge, as workers, cancels and schedules leave
    them (written directly: the states and times at the ends of the range are not reached
    through the API in a test's time); `plain`: none with a timeout or a payload."""
    sql("INSERT INTO workers (id, lease_expires_at) VALUES (%s, %s)", "w-é😀", TIMES[2])
    n = 0
    for state in ("scheduled", "running", "succeeded", "failed", "cancelled"):
        for when in TIMES:
            for text in (None, TRICKY, "plain"):
                n += 1
                payload = PAYLOADS[n % len(PAYLOADS)]
                finished = when if state in ("succeeded", "failed", "cancelled") else None
                sql(
                    "INSERT INTO tasks (kind, state, execute_at, created_at, started_at,"
                    " finished_at, attempts, max_attempts, output, error, claimed_by, claimed_at,"
                    " next_attempt_at, idempotency_key, idempotency_execute_at, payload, priority,"
                    " timeout_s, schedule, scheduled_for)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
                    " CAST(%s AS jsonb), %s, %s, %s, %s)",
                    "http" if isinstance(payload, dict) and "headers" in payload else "baz",
                    state,
                    when,
                    TIMES[(n + 1) % len(TIMES)],
                    None if text is None else TIMES[(n + 2) % len(TIMES)],
                    finished,
                    2**31 - 1 if text else 0,
                    2**31 - 1 if text else 1,
                    text,
                    text,
                    "w-é😀" if state == "running" else None,
                    when if state == "running" else None,
                    TIMES[(n + 3) % len(TIMES)] if state == "scheduled" and text else None,
                    None if text is None else f'key-{n}~!{{}}"\\',
                    None if text is None else when,
                    None if n % 7 == 0 or plain else json.dumps(payload),
                    n % 10,
                    None if plain else TIMEOUTS[n % len(TIMEOUTS)],
                    None if text is None else f"{TRICKY}{n}",
                    None if text is None else TIMES[(n + 4) % len(TIMES)],
                )


async def test_a_listed_task_is_task_json_byte_for_byte(store: Store, sql: Sql) -> None:
    _insert_every_kind_of_task(sql)
    # The largest id too (as the API reads ids: a bigint).
    sql(
        "INSERT INTO tasks (id, kind, execute_at) OVERRIDING SYSTEM VALUE VALUES (%s, 'baz', %s)",
        2**63 - 1,
        TIMES[0],
    )
    oldest_first = TaskOrder(SortKey.ID, descending=False)
    listed, cut, _ = await store.list_tasks(
        TaskFilter(), oldest_first, after=None, limit=1000, max_bytes=MAX_PAGE_BYTES
    )
    assert not cut
    assert len(listed) == 5 * len(TIMES) * 3 + 1
    tasks: list[Task] = []
    for item in listed:
        task = await store.get_task(item.id)
        assert task is not None
        tasks.append(task)
        one = task_json(task)
        assert listed_json(item) == one, task
        assert plain_task_json(task) == one
    assert {t.state for t in tasks} == {"scheduled", "running", "succeeded", "failed", "cancelled"}
    assert any(b'"Authorization":"***"' in task_json(t) for t in tasks)
    # A page and a list of them, from either.
    cursor = "YWZ0ZXI6Mw"
    assert page_json(Page(listed, cursor, oldest_first)) == page_json(
        Page(tasks, cursor, oldest_first)
    )
    assert list_json(listed) == list_json(tasks)


@pytest.mark.parametrize("order", [SortKey.ID, SortKey.EXECUTE_AT, SortKey.FINISHED_AT])
@pytest.mark.parametrize("descending", [False, True])
async def test_a_listing_keeps_its_order(
    store: Store, sql: Sql, order: SortKey, descending: bool
) -> None:
    """The page's JSON is written outside the statement that orders its rows; the rows keep
    that order (ties on the key broken by id)."""
    _insert_every_kind_of_task(sql)
    by = TaskOrder(order, descending=descending)
    listed, _, _ = await store.list_tasks(
        TaskFilter(), by, after=None, limit=1000, max_bytes=MAX_PAGE_BYTES
    )
    column = {SortKey.ID: "id", SortKey.EXECUTE_AT: "execute_at"}.get(order, "finished_at")
    way = " DESC" if descending else ""
    done = " WHERE finished_at IS NOT NULL" if order is SortKey.FINISHED_AT else ""
    expected = [r[0] for r in sql(f"SELECT id FROM tasks{done} ORDER BY {column}{way}, id{way}")]
    assert [item.id for item in listed] == expected


async def _pages(
    store: Store, matching: TaskFilter, by: TaskOrder, limit: int, *, written: bool
) -> list[bytes]:
    """Every page of a listing, from its first to its last, as the API answers them; not
    `written`: each read as rows and written in Python (as a page with a payload is)."""
    if not written:
        store.list_page_text = _never  # type: ignore[method-assign]
    pages: list[bytes] = []
    cursor = None
    while True:
        page = await domain.list_tasks(store, matching, limit=limit, cursor=cursor, order=by)
        assert isinstance(page, WrittenPage) == written
        pages.append(page_json(page))
        cursor = page.next_cursor
        if cursor is None or len(pages) > 200:
            return pages


async def _never(*args: object, **kwargs: object) -> None:
    return None


@pytest.mark.parametrize("order", [SortKey.ID, SortKey.EXECUTE_AT, SortKey.FINISHED_AT])
@pytest.mark.parametrize("descending", [False, True])
async def test_a_page_written_whole_is_the_page_of_rows_byte_for_byte(
    settings: Settings, sql: Sql, order: SortKey, descending: bool
) -> None:
    """A page none of whose tasks has a timeout or a payload is written whole by the
    database (queries.Listing.page_text): the same bytes as the page read as rows, cursors
    included, page after page, over every kind of field, at limits of 1, 7, a page's
    default (100), and a half and one under a half of the tasks (the last page holding
    exactly its limit, and fewer)."""
    _insert_every_kind_of_task(sql, plain=True)
    (count,) = sql("SELECT count(*) FROM tasks")[0]
    by = TaskOrder(order, descending=descending)
    assert count == 120
    (finished,) = sql("SELECT count(*) FROM tasks WHERE finished_at IS NOT NULL")[0]
    for limit in (1, 7, count // 2 - 1, count // 2, Store.PAGE_CHUNK - 1):
        pages = []
        for written in (True, False):
            database = Database(settings)
            try:
                pages.append(
                    await _pages(Store(database), TaskFilter(), by, limit, written=written)
                )
            finally:
                await database.dispose()
        assert pages[0] == pages[1], limit
        listed = count if order is not SortKey.FINISHED_AT else finished
        assert len(pages[0]) == -(-listed // limit)


async def test_a_filtered_page_written_whole_goes_on_where_its_scan_stopped(
    settings: Settings, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter its order's index does not serve: each page reads SCAN_ROWS rows at most,
    and a page written whole goes on where that scan stopped, as a page of rows does
    (even one that found nothing)."""
    monkeypatch.setattr(queries, "SCAN_ROWS", 20)
    _insert_every_kind_of_task(sql, plain=True)
    matching = TaskFilter(states=(TaskState.RUNNING, TaskState.FAILED))
    # Oldest first: the first 24 tasks are scheduled, so the first page finds none.
    by = TaskOrder(SortKey.ID, descending=False)
    pages = []
    for written in (True, False):
        database = Database(settings)
        try:
            pages.append(await _pages(Store(database), matching, by, 3, written=written))
        finally:
            await database.dispose()
    assert pages[0] == pages[1]
    assert b'{"items":[],"next_cursor":"' in b"".join(pages[0])


async def test_a_page_with_a_timeout_or_a_payload_is_read_as_rows(store: Store, sql: Sql) -> None:
    """Their JSON is Python's to write (a payload through its kind's `show`, a float as the
    json module writes it): one such task on a page, and the page is read as rows."""
    _insert_every_kind_of_task(sql, plain=True)
    for column, value in (("timeout_s", "1e-07"), ("payload", '{"a": 1e-7}')):
        (task_id,) = sql(
            f"INSERT INTO tasks (kind, execute_at, {column}) VALUES ('baz', now(), %s)"
            " RETURNING id",
            value,
        )[0]
        page = await domain.list_tasks(store, TaskFilter(), limit=100, cursor=None)
        assert isinstance(page, Page)
        assert (
            await store.list_page_text(TaskFilter(), DEFAULT_ORDER, after=None, limit=101) is None
        )
        sql("DELETE FROM tasks WHERE id = %s", task_id)
    page = await domain.list_tasks(store, TaskFilter(), limit=100, cursor=None)
    assert isinstance(page, WrittenPage)


async def test_a_page_written_whole_past_an_answers_size_is_cut_as_rows_are(
    store: Store, sql: Sql
) -> None:
    """Tasks whose outputs hold more than an answer's limit together: the page is cut
    after the last that fits, with a cursor from it, as the page of rows is."""
    big = "é" * 30_000  # 60,000 bytes; 180,000 in Lambda's envelope
    sql(
        "INSERT INTO tasks (kind, execute_at, state, finished_at, output)"
        " SELECT 'baz', now(), 'succeeded', now(), %s FROM generate_series(1, 40)",
        big,
    )
    answer = page_json(await domain.list_tasks(store, TaskFilter(), limit=100, cursor=None))
    assert len(answer) < MAX_PAGE_BYTES
    store.list_page_text = _never  # type: ignore[method-assign]
    rows = page_json(await domain.list_tasks(store, TaskFilter(), limit=100, cursor=None))
    assert answer == rows
    assert 1 < answer.count(big.encode()) < 40
