"""A listed task's JSON is written by the database (queries.LISTED_JSON) but for its timeout
and payload (responses.listed_json): it must be the one JSON of a task, `task_json`'s, byte
for byte, whatever the task holds. Every state, text that JSON escapes, text beyond ASCII,
times at the ends of their range and of a second, every field null or not, payloads nested,
with numbers the two ways of writing them differ on, and masked by their kind's `show`."""

import json
from collections.abc import Callable
from typing import Any

import pytest

from functions.http.responses import list_json, listed_json, page_json, plain_task_json, task_json
from functions.model import MAX_PAGE_BYTES, Page, SortKey, Task, TaskFilter, TaskOrder
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


def _insert_every_kind_of_task(sql: Sql) -> None:
    """Tasks in every state, each field at an edge, as workers, cancels and schedules leave
    them (written directly: the states and times at the ends of the range are not reached
    through the API in a test's time)."""
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
                    None if n % 7 == 0 else json.dumps(payload),
                    n % 10,
                    TIMEOUTS[n % len(TIMEOUTS)],
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
