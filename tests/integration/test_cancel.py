"""Cancelling: one task, by filter, a schedule's unstarted ones; running ones included."""

from collections.abc import Callable
from typing import Any

import psycopg

from functions import queries
from functions.store import Store

Sql = Callable[..., list[tuple[Any, ...]]]


def states(sql: Sql) -> dict[int, tuple[str, str | None, bool]]:
    rows = sql("SELECT id, state, claimed_by, finished_at IS NOT NULL FROM tasks ORDER BY id")
    return {task_id: (state, held, finished) for task_id, state, held, finished in rows}


async def test_a_cancel_by_condition_takes_the_lowest_ids_and_only_what_matches(
    store: Store, sql: Sql, task_factory: Callable[..., int], database_url: str
) -> None:
    foo = [task_factory("foo", due_in_s=60) for _ in range(4)]
    baz = task_factory("baz", due_in_s=60)
    sql("UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w1' WHERE id = %s", foo[1])
    sql("UPDATE tasks SET state = 'succeeded', finished_at = now() WHERE id = %s", foo[2])
    unstarted = queries.cancel_tasks("kind = %(kind)s", states=("scheduled",))
    everything = queries.cancel_tasks("kind = %(kind)s")
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {queries.CANCEL_CHANNEL}")
        assert await store.cancel_tasks(unstarted, limit=1, kind="foo") == [foo[0]]
        assert await store.cancel_tasks(unstarted, limit=10, kind="foo") == [foo[3]]
        assert [n.payload for n in listener.notifies(timeout=0.2)] == []
        assert await store.cancel_tasks(everything, limit=10, kind="foo") == [foo[1]]
        assert [n.payload for n in listener.notifies(timeout=1, stop_after=1)] == ["w1"]
        assert await store.cancel_tasks(everything, limit=10, kind="foo") == []
    found = states(sql)
    assert found[foo[0]] == found[foo[1]] == found[foo[3]] == ("cancelled", None, True)
    assert found[foo[2]] == ("succeeded", None, True)
    assert found[baz] == ("scheduled", None, False)
