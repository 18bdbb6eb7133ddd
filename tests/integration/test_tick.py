"""The tick, called directly: claim -> run -> record against a real database."""

import asyncio
import dataclasses
import io
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from functions import kinds
from functions.kinds import Context
from functions.settings import Settings
from functions.tick import tick
from tests.pgservers import Server

Sql = Callable[..., list[tuple[Any, ...]]]


def states(sql: Sql) -> dict[int, tuple[Any, ...]]:
    rows = sql("SELECT id, state, attempts, output, error FROM tasks ORDER BY id")
    return {row[0]: row[1:] for row in rows}


async def test_due_tasks_run_once_and_print_their_lines(
    settings: Settings, task_factory: Callable[..., int], sql: Sql, bar_server: Any
) -> None:
    settings = dataclasses.replace(settings, bar_url=bar_server(200))
    foo, bar, baz = task_factory("foo"), task_factory("bar"), task_factory("baz")
    out = io.StringIO()

    summary = await tick(settings, out=out)

    assert (summary.claimed, summary.succeeded, summary.failed) == (3, 3, 0)
    lines = out.getvalue().splitlines()
    baz_line = next(line for line in lines if line.startswith("Baz "))
    assert sorted(lines) == sorted([f"Foo {foo}", "200", baz_line])
    assert 0 <= int(baz_line.split()[1]) <= 343
    got = states(sql)
    assert got[foo] == ("succeeded", 1, f"Foo {foo}", None)
    assert got[bar] == ("succeeded", 1, "200", None)
    assert got[baz] == ("succeeded", 1, baz_line, None)

    again = await tick(settings, out=out)
    assert again.claimed == 0
    assert len(out.getvalue().splitlines()) == 3


async def test_future_task_waits_for_its_time(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    later = task_factory("baz", due_in_s=1.0)
    assert (await tick(settings, out=io.StringIO())).claimed == 0
    assert states(sql)[later][0] == "scheduled"
    time.sleep(1.1)
    assert (await tick(settings, out=io.StringIO())).succeeded == 1
    started, execute_at = sql("SELECT started_at, execute_at FROM tasks WHERE id = %s", later)[0]
    assert started >= execute_at


async def test_a_tick_with_nothing_due_writes_no_activity(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    task_factory("baz", due_in_s=3600.0)
    assert (await tick(settings, out=io.StringIO())).claimed == 0
    assert sql("SELECT count(*) FROM task_activity") == [(0,)]
    task_factory("baz")
    assert (await tick(settings, out=io.StringIO())).succeeded == 1
    assert sql("SELECT sum(started), sum(succeeded) FROM task_activity") == [(1, 1)]


async def test_bar_5xx_is_a_success_reporting_the_code(
    settings: Settings, task_factory: Callable[..., int], sql: Sql, bar_server: Any
) -> None:
    settings = dataclasses.replace(settings, bar_url=bar_server(503))
    task = task_factory("bar")
    out = io.StringIO()
    await tick(settings, out=out)
    assert out.getvalue() == "503\n"
    assert states(sql)[task] == ("succeeded", 1, "503", None)


async def test_bar_network_error_retries_with_backoff_then_fails(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    # Port 1 on 127.0.0.1: connection refused, at once.
    settings = dataclasses.replace(
        settings, bar_url="http://127.0.0.1:1/", max_attempts=2, retry_base_s=30.0
    )
    task = task_factory("bar", max_attempts=2)
    out = io.StringIO()

    first = await tick(settings, out=out)
    assert (first.retried, first.failed) == (1, 0)
    state, attempts, output, error = states(sql)[task]
    assert (state, attempts, output) == ("scheduled", 1, None)
    assert "ConnectError" in error
    [(backoff_s,)] = sql(
        "SELECT extract(epoch FROM next_attempt_at - now()) FROM tasks WHERE id = %s", task
    )
    assert 25 < backoff_s <= 30, "the retry waits retry_base_s"
    assert sql("SELECT execute_at = created_at FROM tasks WHERE id = %s", task) == [(False,)]
    assert (await tick(settings, out=out)).claimed == 0, "not before its backoff"

    sql("UPDATE tasks SET next_attempt_at = now() WHERE id = %s", task)  # the backoff passed
    second = await tick(settings, out=out)
    assert (second.retried, second.failed) == (0, 1)
    state, attempts, output, error = states(sql)[task]
    assert (state, attempts, output) == ("failed", 2, None)
    assert "ConnectError" in error
    assert out.getvalue() == "", "a failed bar prints nothing"


async def test_many_foo_tasks_run_concurrently(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    settings = dataclasses.replace(settings, foo_delay_s=1.0, claim_batch=100)
    ids = [task_factory("foo") for _ in range(300)]
    started = time.monotonic()
    summary = await tick(settings, out=io.StringIO())
    elapsed = time.monotonic() - started
    assert summary.succeeded == 300
    # Serially this is 300 s; concurrently about 1 s. The bound is loose on purpose.
    assert elapsed < 30
    assert sql("SELECT count(*) FROM tasks WHERE state = 'succeeded'") == [(len(ids),)]


@pytest.mark.slow
async def test_foo_really_sleeps_three_seconds(
    database_url: str, task_factory: Callable[..., int], sql: Sql
) -> None:
    task = task_factory("foo")
    out = io.StringIO()
    await tick(Settings(database_url=database_url), out=out)
    assert out.getvalue() == f"Foo {task}\n"
    started, finished = sql("SELECT started_at, finished_at FROM tasks WHERE id = %s", task)[0]
    assert (finished - started).total_seconds() >= 3.0


async def test_tick_ignores_kinds_it_does_not_know(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    unknown = task_factory("retired_kind")
    assert (await tick(settings, out=io.StringIO())).claimed == 0
    assert states(sql)[unknown][0] == "scheduled"


async def test_a_runner_runs_bar_again_after_its_first_run_closed_its_client(
    settings: Settings, task_factory: Callable[..., int], sql: Sql, bar_server: Any
) -> None:
    """The HTTP client is made on first use and closed when a run ends; the next run makes
    a new one rather than reusing the closed one."""
    from functions.db import Database
    from functions.runner import Runner
    from functions.store import Store

    settings = dataclasses.replace(settings, bar_url=bar_server(200))
    database = Database(settings)
    out = io.StringIO()
    runner = Runner(Store(database), settings, out=out)
    try:
        for _ in range(2):
            task_factory("bar")
            assert (await runner.run()).succeeded == 1
    finally:
        await database.dispose()
    assert out.getvalue() == "200\n200\n"
    assert sql("SELECT DISTINCT state, error FROM tasks") == [("succeeded", None)]


async def test_a_tick_returns_by_its_deadline_when_the_database_freezes(
    own_server: Server,
) -> None:
    """The server freezes while the tick's foo sleep: every wait on it (the results, the
    hand-back, the summary's counts) ends by the deadline, so the platform never kills the
    tick. Before: a 6 s tick returned after 20 s and more."""
    settings = Settings(
        database_url=own_server.url,
        foo_delay_s=1.0,
        deadline_margin_s=2.0,
        db_connect_timeout_s=5,
        db_statement_timeout_s=5.0,
    )
    with psycopg.connect(own_server.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasks (kind, execute_at) SELECT 'foo', now() FROM generate_series(1, 20)"
        )
    deadline = time.monotonic() + 6.0
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, own_server.freeze)
    try:
        summary = await tick(settings, deadline=deadline, out=io.StringIO())
        returned = time.monotonic()
    finally:
        own_server.thaw()
    assert returned <= deadline, f"returned {returned - deadline:.1f} s after the deadline"
    assert summary.errors > 0


async def test_a_tick_starts_nothing_that_no_longer_fits_after_a_run_overran_its_time(
    settings: Settings, task_factory: Callable[..., int], sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain function runs inline, and cannot be stopped: one that takes 2 s where it
    declares 1 leaves a tick with 22 s at first (and a margin of 0.5) too little time for the
    next task of its claim, of a kind that may take 20 s. That one is handed back at once,
    unstarted, due as it was; the tick then returns (it was started past the deadline's
    margin; then, held unstarted, handed back only as the deadline came)."""

    def overruns(ctx: Context) -> str:
        time.sleep(2)
        return f"overran {ctx.task_id}"

    async def waits(ctx: Context) -> str:
        return f"waited {ctx.task_id}"

    def one_s(_: Settings) -> float:
        return 1.0

    def twenty_s(_: Settings) -> float:
        return 20.0

    monkeypatch.setitem(
        kinds.KINDS, "overruns", kinds.Kind("overruns", overruns, max_seconds=one_s, limit_s=one_s)
    )
    monkeypatch.setitem(
        kinds.KINDS, "waits", kinds.Kind("waits", waits, max_seconds=twenty_s, limit_s=twenty_s)
    )
    first, second = task_factory("overruns"), task_factory("waits")
    settings = dataclasses.replace(settings, deadline_margin_s=0.5)
    out = io.StringIO()
    summary = await tick(settings, out=out, deadline=time.monotonic() + 22)
    assert (summary.claimed, summary.succeeded, summary.released) == (2, 1, 1)
    assert summary.seconds < 12  # (2 s and a little; 21.5 s when it waited for the deadline)
    assert out.getvalue().splitlines() == [f"overran {first}"]
    rows = sql("SELECT id, state, attempts, claimed_by FROM tasks ORDER BY id")
    assert rows == [(first, "succeeded", 1, None), (second, "scheduled", 0, None)]
    # Only the task that started is counted as started (its lateness, /stats's figures).
    started = sql("SELECT kind, sum(started) FROM task_activity GROUP BY kind ORDER BY kind")
    assert [(kind, int(n)) for kind, n in started if n] == [("overruns", 1)]
