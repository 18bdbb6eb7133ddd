"""A worker with nothing due claims a task a little ahead of its time and starts it then, by
its own clock counted from the claim's answer (runner.AHEAD_S). The task never starts before
its time, a task handed back or rescued before it started stays due at its time, and one
cancelled meanwhile never starts. The window is widened here to seconds, so that each case
has time to happen."""

import asyncio
import dataclasses
import datetime
import io
import time
from collections.abc import Callable
from typing import Any

import pytest

from functions import runner as runner_module
from functions.kinds import KINDS, Context, Kind
from functions.run_state import ClockCheck
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Claimed, Store
from functions.tick import tick
from tests.integration.test_wakeups import _running, _until

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[float]]:
    """The kind `clocked`: each task's runs' starts, by this machine's clock (the
    database's)."""
    starts: dict[int, list[float]] = {}

    def clocked(ctx: Context) -> str:
        starts.setdefault(ctx.task_id, []).append(time.time())
        return "clocked"

    monkeypatch.setitem(KINDS, "clocked", Kind("clocked", clocked, lambda s: 1.0))
    return starts


def _widen(monkeypatch: pytest.MonkeyPatch, ahead_s: float, lead_s: float) -> None:
    monkeypatch.setattr(runner_module, "AHEAD_S", ahead_s)
    monkeypatch.setattr(runner_module, "LEAD_S", lead_s)
    # The worker's clock is checked against the database's over 50 ms, not a second.
    monkeypatch.setattr(ClockCheck, "SPAN_S", 0.05)


async def _starting_again(runner: Runner, stop: asyncio.Event) -> None:
    """Run `runner` as `taskrunner worker` does: a run whose lease ran out starts again."""
    while not stop.is_set():
        await runner.run(keep_polling=True, stop=stop)
        if not runner.lease_lost:
            return


async def test_a_claim_takes_a_first_attempt_due_within_its_window(sql: Sql, store: Store) -> None:
    """Due within `ahead_s`: claimed, its `started_at` and `claimed_at` its due time, and
    `ahead_s` says how far ahead. A retry waiting in the window is not taken early (its time
    would be lost with `next_attempt_at`), nor is a task due past the window."""
    [(soon,)] = sql(
        "INSERT INTO tasks (kind, execute_at) VALUES ('baz', now() + interval '2 s') RETURNING id"
    )
    sql("INSERT INTO tasks (kind, execute_at) VALUES ('baz', now() + interval '9 s')")
    sql(
        "INSERT INTO tasks (kind, execute_at, attempts, next_attempt_at)"
        " VALUES ('baz', now() - interval '1 h', 1, now() + interval '2 s')"
    )
    await store.register_worker(worker="w", lease_s=60)
    claimed, due = await store.claim_due(
        worker="w", kinds=["baz"], limit=10, lease_s=60, ahead_s=5.0
    )
    assert [task.id for task in claimed] == [soon]
    assert 1.0 < claimed[0].ahead_s <= 2.0
    assert due.answered_s >= due.now_s
    [(started_early, claimed_early)] = sql(
        "SELECT started_at < execute_at, claimed_at < execute_at FROM tasks WHERE id = %s", soon
    )
    assert (started_early, claimed_early) == (False, False)
    # Without a window, nothing of these is due.
    await store.register_worker(worker="v", lease_s=60)
    assert (await store.claim_due(worker="v", kinds=["baz"], limit=10, lease_s=60))[0] == []


async def test_a_task_handed_back_before_its_time_stays_due_then(sql: Sql, store: Store) -> None:
    """Handed back (a worker stopping) before it started: scheduled again with its attempt
    not used, due at its own time, not at once; so is one rescued (its worker's lease ran
    out) while its time is still ahead."""
    ids = [
        row[0]
        for row in sql(
            "INSERT INTO tasks (kind, execute_at)"
            " SELECT 'baz', now() + interval '30 s' FROM generate_series(1, 2) RETURNING id"
        )
    ]
    await store.register_worker(worker="w", lease_s=60)
    claimed, _ = await store.claim_due(
        worker="w", kinds=["baz"], limit=10, lease_s=60, ahead_s=60.0
    )
    assert sorted(task.id for task in claimed) == ids
    assert await store.release(worker="w", ids=[ids[0]]) == {ids[0]}
    sql("UPDATE workers SET lease_expires_at = now() - interval '1 s' WHERE id = 'w'")
    await store.rescue_expired()
    rows = sql(
        "SELECT state, attempts, started_at IS NULL, coalesce(next_attempt_at, execute_at)"
        " = execute_at, execute_at > now() + interval '20 s' FROM tasks ORDER BY id"
    )
    # The hand-back does not count the attempt; the rescue counts it lost, as any rescue.
    assert rows == [
        ("scheduled", 0, True, True, True),
        ("scheduled", 1, False, True, True),
    ]


async def test_a_worker_starts_a_task_claimed_ahead_at_its_time_never_before(
    settings: Settings, sql: Sql, store: Store, monkeypatch: pytest.MonkeyPatch,
    started: dict[int, list[float]],
) -> None:  # fmt: skip
    """Twenty tasks due over 3 s, claimed up to 1.5 s ahead: each starts at its time or
    after it by the database's clock, within half a second, and once."""
    _widen(monkeypatch, ahead_s=1.5, lead_s=1.0)
    sql(
        "INSERT INTO tasks (kind, execute_at)"
        " SELECT 'clocked', now() + interval '1 s' + n * interval '150 ms'"
        " FROM generate_series(1, 20) AS n"
    )
    out = io.StringIO()
    runner = Runner(store, dataclasses.replace(settings, poll_interval_s=5.0), out=out)

    def done() -> bool:
        return sql("SELECT count(*) FROM tasks WHERE state = 'succeeded'") == [(20,)]

    async with _running(lambda stop: runner.run(keep_polling=True, stop=stop)) as run:
        await _until(done, run, 30)
    rows = sql(
        "SELECT id, extract(epoch FROM execute_at), started_at >= execute_at,"
        " claimed_at = execute_at, attempts FROM tasks"
    )
    assert len(started) == 20 and out.getvalue().count("clocked\n") == 20
    for task_id, due_s, recorded_on_time, _, attempts in rows:
        [start] = started[task_id]
        assert start >= float(due_s), (task_id, start - float(due_s))
        assert start < float(due_s) + 0.5
        assert recorded_on_time and attempts == 1
    # Claimed ahead: most of them (the worker's first claim may find some due already).
    assert sum(row[3] for row in rows) >= 15


async def test_a_worker_stopping_hands_back_what_waits_for_its_time(
    settings: Settings, sql: Sql, store: Store, monkeypatch: pytest.MonkeyPatch,
    started: dict[int, list[float]],
) -> None:  # fmt: skip
    """A task claimed 3 s ahead, the worker stopped before its time: never started, handed
    back due at its time, and another worker starts it then."""
    _widen(monkeypatch, ahead_s=3.0, lead_s=2.0)
    [(task_id,)] = sql(
        "INSERT INTO tasks (kind, execute_at) VALUES ('clocked', now() + interval '2.5 s')"
        " RETURNING id"
    )
    runner = Runner(store, dataclasses.replace(settings, poll_interval_s=5.0), out=io.StringIO())
    async with _running(lambda stop: runner.run(keep_polling=True, stop=stop)) as run:
        await _until(lambda: sql("SELECT state FROM tasks") == [("running",)], run, 10)
    assert started == {}
    [(state, attempts, due_then, still_ahead)] = sql(
        "SELECT state, attempts, next_attempt_at = execute_at, execute_at > now() FROM tasks"
    )
    assert (state, attempts, due_then, still_ahead) == ("scheduled", 0, True, True)

    _widen(monkeypatch, ahead_s=0.02, lead_s=0.01)
    second = Runner(store, dataclasses.replace(settings, poll_interval_s=5.0), out=io.StringIO())
    async with _running(lambda stop: second.run(keep_polling=True, stop=stop)) as run:
        await _until(lambda: sql("SELECT state FROM tasks") == [("succeeded",)], run, 10)
    [(due_s,)] = sql("SELECT extract(epoch FROM execute_at) FROM tasks")
    [start] = started[task_id]
    assert start >= float(due_s)


async def test_a_task_cancelled_while_it_waits_for_its_time_never_starts(
    settings: Settings, sql: Sql, store: Store, monkeypatch: pytest.MonkeyPatch,
    started: dict[int, list[float]],
) -> None:  # fmt: skip
    """Claimed 3 s ahead by a listening worker, and cancelled meanwhile: the worker drops it
    as the cancel's notification comes, and its time passes with nothing run."""
    _widen(monkeypatch, ahead_s=3.0, lead_s=2.0)
    [(task_id,)] = sql(
        "INSERT INTO tasks (kind, execute_at) VALUES ('clocked', now() + interval '2 s')"
        " RETURNING id"
    )
    settings = dataclasses.replace(settings, poll_interval_s=5.0)
    async with _running(
        lambda stop: tick(settings, keep_polling=True, stop=stop, out=io.StringIO())
    ) as run:
        await _until(lambda: sql("SELECT state FROM tasks") == [("running",)], run, 10)
        cancelled = await store.cancel_task(task_id)
        assert cancelled is not None and cancelled.state == "cancelled"
        await asyncio.sleep(2.5)  # past its time
        assert not run.done()
    assert started == {}
    assert run.result().cancelled == 1


async def test_a_worker_frozen_past_its_lease_hands_back_what_waited(
    settings: Settings, sql: Sql, store: Store, monkeypatch: pytest.MonkeyPatch,
    started: dict[int, list[float]],
) -> None:  # fmt: skip
    """A worker frozen after claiming a task ahead (SIGSTOP, a paused VM), past what the
    claim's renewal of its lease covers: meanwhile the task was rescued (as another worker
    would), so on waking the worker does not start it where it waited, and it runs once,
    from its next claim."""
    _widen(monkeypatch, ahead_s=1.0, lead_s=0.5)
    settings = dataclasses.replace(settings, poll_interval_s=5.0, lease_seconds=3.0)
    [(task_id,)] = sql(
        "INSERT INTO tasks (kind, execute_at) VALUES ('clocked', now() + interval '1 s')"
        " RETURNING id"
    )
    on_time = Runner._on_time
    froze: list[int] = []

    def freezing(self: Runner, task: Claimed, *args: Any) -> Claimed | None:
        waits = on_time(self, task, *args)
        if waits is None and not froze:
            froze.append(task.id)
            time.sleep(3.5)  # the whole process stops: its loop, its heartbeat
            # Its lease ran out meanwhile, and the task was rescued (RESCUE_EXPIRED).
            sql(
                "UPDATE tasks SET state = 'scheduled', claimed_by = NULL,"
                " next_attempt_at = now() WHERE id = %s",
                task.id,
            )
        return waits

    monkeypatch.setattr(Runner, "_on_time", freezing)
    runner = Runner(store, settings, out=io.StringIO())
    async with _running(lambda stop: _starting_again(runner, stop)) as run:
        await _until(lambda: sql("SELECT state FROM tasks") == [("succeeded",)], run, 15)
    assert froze == [task_id] and len(started[task_id]) == 1  # once
    [(attempts, due_s)] = sql("SELECT attempts, extract(epoch FROM execute_at) FROM tasks")
    assert attempts == 2 and started[task_id][0] >= float(due_s)


async def test_behind_a_transaction_pooler_a_worker_claims_nothing_ahead(
    settings: Settings, sql: Sql, store: Store, monkeypatch: pytest.MonkeyPatch,
    started: dict[int, list[float]],
) -> None:  # fmt: skip
    """Behind a transaction pooler a worker hears of a cancel only at its next poll, after a
    task claimed ahead would have started: it claims each task at its time."""
    _widen(monkeypatch, ahead_s=1.5, lead_s=1.0)
    sql(
        "INSERT INTO tasks (kind, execute_at)"
        " SELECT 'clocked', now() + interval '0.5 s' + n * interval '100 ms'"
        " FROM generate_series(1, 5) AS n"
    )
    settings = dataclasses.replace(settings, poll_interval_s=1.0, transaction_pooler=True)
    runner = Runner(store, settings, out=io.StringIO())

    def done() -> bool:
        return sql("SELECT count(*) FROM tasks WHERE state = 'succeeded'") == [(5,)]

    async with _running(lambda stop: runner.run(keep_polling=True, stop=stop)) as run:
        await _until(done, run, 15)
    assert sql("SELECT count(*) FROM tasks WHERE claimed_at > execute_at") == [(5,)]


async def test_a_claim_answered_past_its_lease_starts_nothing(
    settings: Settings, sql: Sql, store: Store, monkeypatch: pytest.MonkeyPatch,
    started: dict[int, list[float]],
) -> None:  # fmt: skip
    """A worker frozen while it claims a task due now (SIGSTOP inside the claim), its answer
    read past what the claim's renewal of the lease covers: the task may have been rescued
    and run meanwhile, so the worker hands back what it claimed rather than start it. It
    runs once."""
    settings = dataclasses.replace(settings, poll_interval_s=5.0, lease_seconds=3.0)
    [(task_id,)] = sql(
        "INSERT INTO tasks (kind, execute_at) VALUES ('clocked', now()) RETURNING id"
    )
    claim_due = Store.claim_due
    froze: list[int] = []

    async def freezing(self: Store, **kwargs: Any) -> Any:
        claimed, due = await claim_due(self, **kwargs)
        if claimed and not froze:
            froze.append(claimed[0].id)
            time.sleep(3.5)  # the whole process stops, its answer unread
            # Its lease ran out meanwhile, and the task was rescued (RESCUE_EXPIRED).
            sql(
                "UPDATE tasks SET state = 'scheduled', claimed_by = NULL,"
                " next_attempt_at = now() WHERE id = %s",
                claimed[0].id,
            )
        return claimed, due

    monkeypatch.setattr(Store, "claim_due", freezing)
    runner = Runner(store, settings, out=io.StringIO())
    async with _running(lambda stop: _starting_again(runner, stop)) as run:
        await _until(lambda: sql("SELECT state FROM tasks") == [("succeeded",)], run, 15)
    assert froze == [task_id] and len(started[task_id]) == 1  # once


async def test_a_claim_begun_before_a_task_was_created_records_no_start_before_it(
    sql: Sql, store: Store
) -> None:
    """A claim's `now()` is its transaction's start, which can come before a task it then
    takes was created (its statement's snapshot is later): `started_at` and `claimed_at` are
    the creation then, never before the task became due. (A test's clock stands for the
    early transaction.)"""
    [(task_id, created_at)] = sql(
        "INSERT INTO tasks (kind, execute_at) VALUES ('baz', now() - interval '2 s')"
        " RETURNING id, created_at"
    )
    await store.register_worker(worker="w", lease_s=60)
    claimed, _ = await store.claim_due(
        worker="w", kinds=["baz"], limit=10, lease_s=60,
        now=created_at - datetime.timedelta(seconds=1),
    )  # fmt: skip
    assert [(task.id, task.lateness_ms) for task in claimed] == [(task_id, 0.0)]
    assert sql("SELECT started_at, claimed_at FROM tasks") == [(created_at, created_at)]
