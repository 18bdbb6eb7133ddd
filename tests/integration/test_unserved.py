"""Due tasks of a kind nothing runs: shown in /stats, /metrics and a worker's log, never claimed,
run once something that runs their kind starts (migration 0008, `kinds_served`)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from functions import kinds, queries, upkeep
from functions.db import Database
from functions.settings import Settings
from functions.store import Store
from functions.tick import tick
from tests.conftest import serve

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture(autouse=True)
def _fresh_process() -> Iterator[None]:
    """Built-in kinds only, and no warning given yet, before and after each test."""
    upkeep._unserved_warned[0] = None
    yield
    upkeep._unserved_warned[0] = None
    kinds.load(None)


def unserved_metric(text: str) -> dict[str, float]:
    families = text_string_to_metric_families(text)
    [family] = [f for f in families if f.name == "taskrunner_unserved_due_tasks"]
    return {sample.labels["type"]: sample.value for sample in family.samples}


async def unserved(settings: Settings) -> tuple[dict[str, int], dict[str, float]]:
    async with serve(settings) as client:
        stats = (await client.get("/stats")).json()
        metrics = (await client.get("/metrics")).text
    return stats["unserved"], unserved_metric(metrics)


def load_ghost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Load a module with the kind `ghost`, as a worker that runs it does."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "ghost_kinds.py").write_text(
        "from functions.kinds import kind\n"
        "@kind('ghost')\n"
        "def ghost(ctx):\n"
        "    return f'boo {ctx.task_id}'\n"
    )
    kinds.load("ghost_kinds")


async def test_a_kind_nothing_runs_is_shown_and_runs_once_a_worker_runs_it(
    settings: Settings,
    task_factory: Callable[..., int],
    sql: Sql,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing ran yet: every due task is unserved, whatever its kind; a future one is not due.
    ghosts = [task_factory("ghost") for _ in range(2)]
    task_factory("ghost", due_in_s=3600)
    baz = task_factory("baz")
    assert await unserved(settings) == ({"baz": 1, "ghost": 2}, {"baz": 1.0, "ghost": 2.0})

    # A tick that runs the built-ins: baz runs, ghost waits, unclaimed, and is named.
    with caplog.at_level(logging.WARNING, logger="functions.upkeep"):
        summary = await tick(settings, out=io.StringIO())
    assert summary.claimed == 1
    assert sql("SELECT id FROM tasks WHERE state = 'succeeded'") == [(baz,)]
    assert await unserved(settings) == ({"ghost": 2}, {"ghost": 2.0})
    [warning] = [r.getMessage() for r in caplog.records if "action=unserved" in r.getMessage()]
    assert "kinds=ghost:" in warning and "ghost (2 due)" in warning
    served = sql("SELECT kind FROM kinds_served ORDER BY kind")
    assert served == [("bar",), ("baz",), ("foo",), ("http",)]

    # The tick is gone, its record is not: a new baz task, due, is not unserved.
    task_factory("baz")
    assert (await unserved(settings))[0] == {"ghost": 2}

    # Once one runs `ghost`, they run: each once.
    load_ghost(tmp_path, monkeypatch)
    out = io.StringIO()
    assert (await tick(settings, out=out)).claimed == 3
    assert sorted(out.getvalue().splitlines())[-2:] == [f"boo {ghosts[0]}", f"boo {ghosts[1]}"]
    assert await unserved(settings) == ({}, {})


async def test_a_kind_last_run_over_5_minutes_ago_is_unserved(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    await tick(settings, out=io.StringIO())
    # Either side of the 5 minutes, far enough from them that a slow host's seconds between
    # these lines and the read do not carry baz over (299 s did, once, on CI).
    sql("UPDATE kinds_served SET last_run_at = now() - interval '330 seconds' WHERE kind = 'foo'")
    sql("UPDATE kinds_served SET last_run_at = now() - interval '270 seconds' WHERE kind = 'baz'")
    task_factory("foo")
    task_factory("baz")
    assert await unserved(settings) == ({"foo": 1}, {"foo": 1.0})


async def test_a_kind_is_recorded_at_most_once_a_minute(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    await tick(settings, out=io.StringIO())
    [(first,)] = sql("SELECT last_run_at FROM kinds_served WHERE kind = 'baz'")
    await tick(settings, out=io.StringIO())
    assert sql("SELECT last_run_at FROM kinds_served WHERE kind = 'baz'") == [(first,)]
    sql("UPDATE kinds_served SET last_run_at = last_run_at - interval '61 seconds'")
    await tick(settings, out=io.StringIO())
    [(later,)] = sql("SELECT last_run_at FROM kinds_served WHERE kind = 'baz'")
    assert later > first


async def test_the_warning_is_logged_at_most_once_a_minute(
    settings: Settings, task_factory: Callable[..., int], caplog: pytest.LogCaptureFixture
) -> None:
    task_factory("ghost")

    def warnings() -> int:
        return sum("action=unserved" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="functions.upkeep"):
        await tick(settings, out=io.StringIO())
        await tick(settings, out=io.StringIO())
        assert warnings() == 1
        assert upkeep._unserved_warned[0] is not None
        upkeep._unserved_warned[0] -= upkeep.UNSERVED_WARN_EVERY_S
        await tick(settings, out=io.StringIO())
        assert warnings() == 2


async def test_the_dashboard_warns_of_an_unserved_kind(settings: Settings) -> None:
    """The page's script shows `unserved` from /stats, naming each kind (the browser tests
    run the script)."""
    async with serve(settings) as client:
        page = (await client.get("/")).text
        script = (await client.get("/static/dashboard/dashboard.js")).text
    assert 'id="unserved"' in page
    assert "stats.unserved" in script and "Nothing runs" in script


async def test_the_tasks_of_a_removed_kind_are_listed_cancelled_and_retried(
    settings: Settings, task_factory: Callable[..., int]
) -> None:
    """/stats names a kind no process loads; its tasks are found by the same filter as any
    kind's (the dashboard links to `#/tasks?type=...`), and cancelled or retried by it."""
    ghosts = [task_factory("ghost") for _ in range(2)]
    task_factory("baz")
    async with serve(settings) as client:
        assert (await client.get("/stats")).json()["unserved"]["ghost"] == 2
        for query in ("type=ghost", "type=GHOST", "type=%20ghost", "state=scheduled&type=ghost"):
            page = (await client.get(f"/tasks?{query}")).json()
            assert [t["id"] for t in page["items"]] == ghosts[::-1], query  # newest first
        # A name no kind can have (NAME_PATTERN) is refused, saying what a name is.
        for bad in ("9ghost", "gh-ost", "g" * 64, "", "ghost%00"):
            refused = await client.get(f"/tasks?type={bad}")
            assert refused.status_code == 422, bad
            assert "is not a kind's name" in refused.json()["detail"][0]["msg"]
        assert (await client.get(f"/tasks?type={'g' * 63}")).json()["items"] == []
        assert (await client.post("/tasks/cancel?type=ghost")).json() == {"count": 2}
        assert (await client.post("/tasks/retry?type=ghost")).json() == {"count": 2}
        page = (await client.get("/tasks?type=ghost&state=scheduled")).json()
        assert [t["id"] for t in page["items"]] == ghosts[::-1]
        # Creating one is still refused: nothing would run it.
        created = await client.post("/tasks", json={"type": "ghost", "execute_at": 0})
        assert created.status_code == 422


async def test_the_warning_reads_the_first_due_tasks_only_whatever_the_backlog(
    settings: Settings, sql: Sql, caplog: pytest.LogCaptureFixture
) -> None:
    """Each heartbeat looks for due tasks of kinds nothing runs among the first
    queries.UNSERVED_READ due (claim order); reading every due task grew with a backlog (with
    4,000,000 due it ran into the statement timeout at every heartbeat). Past that many, the
    warning says "or more"."""
    sql(
        "INSERT INTO tasks (kind, execute_at) SELECT 'ghost', now() - interval '1 minute'"
        " FROM generate_series(1, %s)",
        queries.UNSERVED_READ + 5,
    )
    sql("INSERT INTO tasks (kind, execute_at) VALUES ('lost', now() - interval '1 second')")
    store = Store(Database(settings))
    try:
        # The 'lost' task is due last: past the first UNSERVED_READ, so not seen yet.
        assert await store.count_unserved() == {"ghost": (queries.UNSERVED_READ, True)}
        with caplog.at_level(logging.WARNING, logger="functions.upkeep"):
            await tick(settings, out=io.StringIO())
        assert f"ghost ({queries.UNSERVED_READ} or more due)" in caplog.text
        sql("DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE kind = 'ghost' LIMIT 10)")
        assert await store.count_unserved() == {"ghost": (9_995, False), "lost": (1, False)}
    finally:
        await store.database.dispose()
