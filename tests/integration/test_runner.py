"""The runner against a real database: what one task can do to a worker (nothing), what a
worker does when it cannot go on, and the tick's account of what it left."""

import asyncio
import dataclasses
import io
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from functions import kinds
from functions.errors import DatabaseUnavailable, WorkerFailed
from functions.kinds import Context, Kind
from functions.model import TaskState
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Result, Store

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def extra_kinds(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Kind], None]]:
    """Add kinds for one test (the real ones stay)."""

    def add(kind: Kind) -> None:
        monkeypatch.setitem(kinds.KINDS, kind.name, kind)

    yield add


def states(sql: Sql) -> dict[str, tuple[Any, ...]]:
    rows = sql("SELECT kind, state, attempts, output, error FROM tasks ORDER BY id")
    return {row[0]: row[1:] for row in rows}


async def test_one_bad_task_fails_alone_and_the_worker_goes_on(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    extra_kinds: Callable[[Kind], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kind that returns no string, one whose output PostgreSQL would refuse as is (a NUL
    byte, a lone surrogate), one that hangs past its limit, and one whose result the
    database refuses: each ends with a clear error or a stored output, and the baz beside
    them all succeed."""

    def not_a_string(ctx: Context) -> str:
        return 42  # type: ignore[return-value]

    def unprintable(ctx: Context) -> str:
        return "nul \x00 and \ud800 end"

    async def hangs(ctx: Context) -> str:
        await asyncio.sleep(3600)
        return "never"

    def refused(ctx: Context) -> str:
        return "refuse me"

    extra_kinds(Kind("notstr", not_a_string, lambda s: 1.0))
    extra_kinds(Kind("unprintable", unprintable, lambda s: 1.0))
    extra_kinds(Kind("hangs", hangs, lambda s: 0.3))
    monkeypatch.setattr("functions.runner.time_limit_s", lambda kind, settings, own=None: 0.5)
    extra_kinds(Kind("refused", refused, lambda s: 1.0))
    # A rule of the user's own that the database enforces on outputs.
    sql("ALTER TABLE tasks ADD CONSTRAINT no_refuse CHECK (output IS DISTINCT FROM 'refuse me')")
    for name in ("notstr", "unprintable", "hangs", "refused"):
        task_factory(name, max_attempts=1)
    bazes = [task_factory("baz") for _ in range(50)]
    out = io.StringIO()

    summary = await Runner(store, settings, out=out).run()

    got = states(sql)
    assert got["notstr"][:2] == ("failed", 1)
    assert "returned int, not a str" in got["notstr"][3]
    assert got["unprintable"][:3] == ("succeeded", 1, "nul \\x00 and \\ud800 end")
    assert got["hangs"][0] == "failed" and "longer than its kind's limit" in got["hangs"][3]
    assert got["refused"][0] == "failed" and "could not be recorded" in got["refused"][3]
    [(done,)] = sql("SELECT count(*) FROM tasks WHERE kind = 'baz' AND state = 'succeeded'")
    assert done == len(bazes)
    assert summary.lost == 0 and summary.failed == 3


async def test_a_kind_raising_cancelled_error_itself_fails_its_attempts(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    extra_kinds: Callable[[Kind], None],
) -> None:
    """A CancelledError the kind raised (it awaited a future other code cancelled) is no
    cancel of this worker's: the attempt fails and is retried while attempts remain; it
    never stays running."""

    async def awaits_a_cancelled_future(ctx: Context) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        future.cancel()
        return await future

    extra_kinds(Kind("selfcancel", awaits_a_cancelled_future, lambda s: 5.0))
    task_factory("selfcancel", max_attempts=2)
    task_factory("baz")

    async with asyncio.timeout(30):  # (it never ended: the task stayed held, running)
        summary = await Runner(store, settings, out=io.StringIO()).run()

    got = states(sql)
    # Retried (the run may end before the retry is due, or run it too) and never running.
    assert got["selfcancel"][:2] in {("scheduled", 1), ("failed", 2)}
    assert "raised CancelledError" in got["selfcancel"][3]
    assert got["baz"][0] == "succeeded"
    assert summary.retried == 1


async def test_a_kind_that_swallows_its_time_limits_cancel_still_fails_the_attempt(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    extra_kinds: Callable[[Kind], None],
) -> None:
    """Stopped at its time limit, a run that catches the cancel and returns later did not
    run on time: it fails its attempt whatever it returns."""

    async def swallows(ctx: Context) -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)
        return "survived"

    extra_kinds(Kind("swallows", swallows, lambda s: 5.0, limit_s=lambda s: 0.1))
    task_factory("swallows", max_attempts=1)

    await Runner(store, settings, out=io.StringIO()).run()

    state, attempts, output, error = states(sql)["swallows"]
    assert (state, attempts, output) == ("failed", 1, None)
    assert "ran longer than its kind's limit of 0.1 s" in error


async def test_a_kind_raising_system_exit_or_keyboard_interrupt_fails_only_its_attempt(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    extra_kinds: Callable[[Kind], None],
) -> None:
    """A `sys.exit()` (or a KeyboardInterrupt) deep in a library a kind calls costs that
    attempt, named in its error, never the worker: a plain function's included (it was
    handed back unrecorded, and killed every worker that took it)."""

    def exits(ctx: Context) -> str:
        raise SystemExit(3)

    async def exits_later(ctx: Context) -> str:
        await asyncio.sleep(0)
        raise SystemExit(4)

    async def interrupted(ctx: Context) -> str:
        raise KeyboardInterrupt

    extra_kinds(Kind("exits", exits, lambda s: 1.0))
    extra_kinds(Kind("exits_later", exits_later, lambda s: 1.0))
    extra_kinds(Kind("interrupted", interrupted, lambda s: 1.0))
    for name in ("exits", "exits_later", "interrupted"):
        task_factory(name, max_attempts=1)
    task_factory("baz")

    summary = await Runner(store, settings, out=io.StringIO()).run()

    got = states(sql)
    assert got["exits"][::3] == ("failed", "SystemExit: 3")
    assert got["exits_later"][::3] == ("failed", "SystemExit: 4")
    assert got["interrupted"][::3] == ("failed", "KeyboardInterrupt")
    assert got["baz"][0] == "succeeded"
    assert summary.failed == 3


async def test_a_kinds_http_client_is_bounded_by_its_runs_time_limit(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    extra_kinds: Callable[[Kind], None],
) -> None:
    """`ctx.http()` lends a client whose time limit is the run's (the kind's timeout_s, or
    the task's own), not TASKRUNNER_BAR_TIMEOUT_S (2 s here): a 30 s kind waiting 12 s for
    an answer failed with a ReadTimeout after bar's 10 s."""

    async def looks(ctx: Context) -> str:
        async with ctx.http() as client:
            return f"{client.timeout.read:g} {client.timeout.connect:g}"

    extra_kinds(Kind("looks", looks, lambda s: 30.0, limit_s=lambda s: 30.0))
    task_factory("looks")

    await Runner(store, settings, out=io.StringIO()).run()

    assert states(sql)["looks"][:3] == ("succeeded", 1, "30 30")


async def test_a_broken_write_loop_stops_the_run_loudly(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A background loop that breaks does not die silently and leave tasks to expire: the
    run stops claiming, hands back what it holds, and raises."""
    for _ in range(20):
        task_factory("baz")

    async def broken(**kwargs: Any) -> set[int]:
        raise RuntimeError("a bug in the write path")

    monkeypatch.setattr(store, "finish_many", broken)
    monkeypatch.setattr(store, "finish_many_after", broken)
    with caplog.at_level(logging.ERROR), pytest.raises(WorkerFailed, match="write loop failed"):
        await Runner(store, settings, out=io.StringIO()).run()
    assert "a bug in the write path" in caplog.text
    assert sql("SELECT DISTINCT state, attempts FROM tasks") == [("scheduled", 0)]
    assert sql("SELECT count(*) FROM workers") == [(0,)]


async def test_a_tick_counts_and_names_what_it_had_no_time_for(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 10 s tick cannot fit bar (10 s timeout + 1 s + the 2 s margin): it says so, every
    time, and its summary counts the bar it left; nor does it record bar as served, so its
    tasks show as unserved."""
    settings = dataclasses.replace(
        settings, bar_timeout_s=10.0, foo_delay_s=0.1, deadline_margin_s=2.0
    )
    task_factory("bar")
    task_factory("foo")
    for _ in range(2):
        deadline = time.monotonic() + 10.0
        with caplog.at_level(logging.WARNING):
            summary = await Runner(store, settings, out=io.StringIO()).run(deadline=deadline)
        assert summary.left_for_time == {"bar": 1}
        assert not summary.left_for_time_more
        assert "bar (1 due; needs 13 s)" in caplog.text
        caplog.clear()
    assert sql("SELECT kind, state FROM tasks ORDER BY id") == [
        ("bar", "scheduled"),
        ("foo", "succeeded"),
    ]
    served = {kind for (kind,) in sql("SELECT kind FROM kinds_served")}
    assert "foo" in served and "bar" not in served
    assert await store.count_unserved() == {"bar": (1, False)}


async def test_a_tick_counts_what_it_had_no_time_for_up_to_a_bound(
    store: Store,
    settings: Settings,
    task_factory: Callable[..., int],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past Store.LEFT_READ due tasks of the kinds it could not fit, a tick counts no
    further (each tick's count read every one of them) and says "or more"."""
    settings = dataclasses.replace(settings, bar_timeout_s=10.0, deadline_margin_s=2.0)
    monkeypatch.setattr(Store, "LEFT_READ", 3)
    for _ in range(3):
        task_factory("bar")
    with caplog.at_level(logging.WARNING):
        summary = await Runner(store, settings, out=io.StringIO()).run(
            deadline=time.monotonic() + 10.0
        )
    assert (summary.left_for_time, summary.left_for_time_more) == ({"bar": 3}, True)
    assert "bar (3 or more due; needs 13 s)" in caplog.text
    caplog.clear()
    monkeypatch.setattr(Store, "LEFT_READ", 4)
    with caplog.at_level(logging.WARNING):
        summary = await Runner(store, settings, out=io.StringIO()).run(
            deadline=time.monotonic() + 10.0
        )
    assert (summary.left_for_time, summary.left_for_time_more) == ({"bar": 3}, False)
    assert "bar (3 due; needs 13 s)" in caplog.text


async def test_a_worker_whose_lease_ran_out_stops_and_rescues_what_it_held(
    store: Store, settings: Settings, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """A worker that stalled past its lease finds out at its next heartbeat: it stops, puts
    back what nobody rescued yet as a rescue does (the attempt under way `lost`, counted),
    and the caller starts it again as a new worker. Before, it handed them back as never
    started: a kind that blocked past the lease ran again and again, using up no attempt."""
    settings = dataclasses.replace(settings, lease_seconds=3.0, foo_delay_s=30.0)
    task = task_factory("foo")
    runner = Runner(store, settings, out=io.StringIO())
    run = asyncio.create_task(runner.run(keep_polling=True))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if sql("SELECT state FROM tasks") == [("running",)]:
            break
    sql("UPDATE workers SET lease_expires_at = now() - interval '1 second'")  # it stalled
    summary = await asyncio.wait_for(run, timeout=10)
    assert runner.lease_lost
    assert (summary.rescued, summary.released) == (1, 0)
    assert sql("SELECT state, attempts, claimed_by FROM tasks") == [("scheduled", 1, None)]
    assert sql("SELECT task_id, attempt, outcome FROM attempts") == [(task, 1, "lost")]
    assert sql("SELECT count(*) FROM workers") == [(0,)]


async def test_reconcile_reports_only_what_it_handed_back(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task whose result was written while the worker read its holdings looks held and
    unknown; the fenced release leaves it alone, and nothing is said of it. A task the
    database says this worker holds, and that it never heard of, is handed back and said."""
    runner = Runner(store, settings, out=io.StringIO())
    await store.register_worker(worker=runner.worker_id, lease_s=60)
    done, lost = task_factory("baz"), task_factory("baz")
    sql(
        "UPDATE tasks SET state = 'succeeded', attempts = 1, started_at = now(),"
        " finished_at = now(), output = 'Baz 1' WHERE id = %s",
        done,
    )
    read = store.held_by

    async def raced(*, worker: str) -> set[int]:
        return await read(worker=worker) | {done}  # read before `done`'s write committed

    monkeypatch.setattr(store, "held_by", raced)
    summary = runner.state.summary
    with caplog.at_level(logging.WARNING):
        await runner.upkeep.reconcile()
    assert summary.released == 0
    assert "action=release" not in caplog.text
    sql(
        "UPDATE tasks SET state = 'running', attempts = 1, started_at = now(), claimed_by = %s"
        " WHERE id = %s",
        runner.worker_id,
        lost,
    )
    with caplog.at_level(logging.WARNING):
        await runner.upkeep.reconcile()
    assert summary.released == 1
    assert "action=release" in caplog.text and "count=1" in caplog.text
    assert sql("SELECT id, state FROM tasks ORDER BY id") == [
        (done, "succeeded"),
        (lost, "scheduled"),
    ]


class ClosesAfter(io.RawIOBase):
    """A pipe whose reader goes away after `lines` lines (`taskrunner worker | head`)."""

    def __init__(self, lines: int) -> None:
        self.left = lines
        self.got = b""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.left <= 0:
            raise BrokenPipeError(32, "Broken pipe")
        taken = b"".join(bytes(data).splitlines(keepends=True)[: self.left])
        self.left -= taken.count(b"\n")
        self.got += taken
        return len(taken)


@pytest.mark.parametrize("buffered", [False, True])
async def test_lines_that_got_out_are_recorded_when_stdout_closes(
    store: Store, settings: Settings, sql: Sql, buffered: bool
) -> None:
    """A stream without a file descriptor gets each line written and flushed on its own:
    buffered or not, the task of each line that got out is recorded as run, and only the
    rest is handed back (all 500 were, and ran again)."""
    sql("INSERT INTO tasks (kind, execute_at) SELECT 'baz', now() FROM generate_series(1, 500)")
    pipe = ClosesAfter(lines=7)
    raw: Any = io.BufferedWriter(pipe, buffer_size=1 << 20) if buffered else pipe
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=not buffered)
    with pytest.raises(WorkerFailed, match="cannot print"):
        await Runner(store, settings, out=out).run()
    got = pipe.got.decode().splitlines()
    assert len(got) == 7
    counts: dict[str, int] = dict(
        sql("SELECT state || '/' || attempts, count(*) FROM tasks GROUP BY 1")
    )
    assert counts == {"succeeded/1": 7, "scheduled/0": 493}
    recorded = sql("SELECT output FROM tasks WHERE state = 'succeeded' ORDER BY output")
    assert sorted(got) == [output for (output,) in recorded]


async def test_a_worker_that_lost_its_lease_records_the_runs_it_has_not_written_yet(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its lines are out and their batch committed, but the commit's answer was lost, and
    its writes fail while the database cannot take them; then it finds its lease ran out.
    Nobody rescued those tasks yet: it records what ran (fenced, found written), not hands
    them back to run again with their attempt refunded (before: every line printed twice,
    attempts 1)."""
    settings = dataclasses.replace(settings, lease_seconds=3.0)
    ids = [task_factory("baz") for _ in range(5)]
    out = io.StringIO()
    runner = Runner(store, settings, out=out)
    finish_many, finish_many_after = store.finish_many, store.finish_many_after

    async def refused_until_the_lease_is_lost(**kwargs: Any) -> set[int]:
        if not runner.lease_lost:
            raise DatabaseUnavailable("database unavailable: (test) writes refused")
        return await finish_many(**kwargs)

    async def answer_lost(**kwargs: Any) -> set[int] | None:
        await finish_many_after(**kwargs)
        raise DatabaseUnavailable("database unavailable: (test) the commit's answer lost")

    monkeypatch.setattr(store, "finish_many", refused_until_the_lease_is_lost)
    monkeypatch.setattr(store, "finish_many_after", answer_lost)
    run = asyncio.create_task(runner.run(keep_polling=True))
    # Long enough for the write loop's retries to back off to seconds between tries.
    await asyncio.sleep(3.5)
    assert len(out.getvalue().splitlines()) == 5
    sql("UPDATE workers SET lease_expires_at = now() - interval '1 second'")
    summary = await asyncio.wait_for(run, timeout=10)
    assert runner.lease_lost
    assert (summary.succeeded, summary.released) == (5, 0)
    assert sql("SELECT id, state, attempts FROM tasks ORDER BY id") == [
        (task_id, "succeeded", 1) for task_id in ids
    ]


@pytest.fixture
def silent_bar_url() -> Iterator[str]:
    """A server that takes connections and never answers: each bar runs to its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(100)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()


async def test_a_tick_claims_no_more_bar_than_it_has_slots_for(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    silent_bar_url: str,
) -> None:
    """One bar slot, 1 s per bar, 3 s to the deadline: one bar fits, and only one is claimed.
    Before, all three were: the two waiting for the slot made the tick overrun its deadline
    (on Lambda, a timeout) and were handed back, one after it had sent its request."""
    settings = dataclasses.replace(
        settings,
        bar_url=silent_bar_url,
        bar_timeout_s=1.0,
        bar_concurrency=1,
        deadline_margin_s=0.5,
        max_attempts=3,
    )
    for _ in range(3):
        task_factory("bar")
    deadline = time.monotonic() + 3.0
    summary = await Runner(store, settings, out=io.StringIO()).run(deadline=deadline)
    assert time.monotonic() < deadline, "the tick returns before its deadline"
    assert (summary.claimed, summary.released) == (1, 0)
    assert sql("SELECT attempts, count(*) FROM tasks GROUP BY 1 ORDER BY 1") == [(0, 2), (1, 1)]


async def test_a_run_whose_task_was_taken_from_this_worker_logs_no_retry(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two foo stopped at their 0.3 s timeout: the one still this worker's is retried, and
    says so; the other was rescued and claimed again elsewhere meanwhile (a worker that
    froze past its lease), and its retry is never recorded: the log says it was dropped,
    not that it will be retried (it said both before)."""
    settings = dataclasses.replace(
        settings, foo_delay_s=30.0, poll_interval_s=60.0, retry_base_s=60.0, retry_max_s=60.0
    )
    kept, taken = task_factory("foo"), task_factory("foo")
    sql("UPDATE tasks SET timeout_s = 0.3")
    caplog.set_level(logging.INFO, "functions.runner")
    run = asyncio.create_task(Runner(store, settings, out=io.StringIO()).run())
    for _ in range(200):
        if sql("SELECT count(*) FROM tasks WHERE state = 'running'") == [(2,)]:
            break
        await asyncio.sleep(0.01)
    sql("UPDATE tasks SET attempts = 2, claimed_by = 'elsewhere' WHERE id = %s", taken)
    summary = await asyncio.wait_for(run, 20.0)
    assert (summary.retried, summary.lost) == (1, 1)
    assert f"action=retry task_id={kept} attempt=1/3" in caplog.text
    assert f"task_id={taken} attempt=1" in caplog.text  # its line: dropped
    assert f"action=retry task_id={taken}" not in caplog.text


async def test_a_task_claimed_again_while_its_last_result_is_written_is_counted_once(
    store: Store, settings: Settings, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """A run's retry, due at once, is being written when the same worker's next claim takes
    the task again: the earlier attempt is counted by what its write comes to (retried),
    not also as lost to the claim that superseded it (both, before)."""
    task_id = task_factory("baz")
    runner = Runner(store, settings, out=io.StringIO())
    await store.register_worker(worker=runner.worker_id, lease_s=60)
    [first], _ = await store.claim_due(worker=runner.worker_id, kinds=["baz"], limit=1, lease_s=60)
    runner.state.held[task_id] = first
    runner.completer.add(
        Result(task_id, 1, TaskState.SCHEDULED, error="Exception: again", retry_in_s=0.0)
    )
    await runner._stop_superseded([first._replace(attempt=2)])
    await runner.completer.write_rest()
    summary = runner.state.summary
    assert (summary.retried, summary.lost, summary.cancelled) == (1, 0, 0)
    assert sql("SELECT state, attempts FROM tasks") == [("scheduled", 1)]


async def _one_running_one_waiting(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    extra_kinds: Callable[[Kind], None],
    tasks: int,
    stop: asyncio.Event | None = None,
) -> tuple[Runner, asyncio.Task[Any]]:
    """A worker of one slot (a kind that waits 30 s), `tasks` due: once it holds two, one
    running and one waiting for the slot (its slot, and one claimed ahead for it), the
    worker and its run."""

    async def single(ctx: Context) -> str:
        await asyncio.sleep(30)
        return f"single {ctx.task_id}"

    extra_kinds(Kind("single", single, lambda s: 40.0, concurrency=lambda s: 1))
    for _ in range(tasks):
        task_factory("single")
    runner = Runner(store, settings, out=io.StringIO())
    run = asyncio.create_task(runner.run(keep_polling=True, stop=stop))
    for _ in range(200):
        if sql("SELECT count(*) FROM tasks WHERE state = 'running'") == [(2,)]:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # the first has started; the second waits for its slot
    return runner, run


async def test_a_task_handed_back_from_its_slots_queue_was_never_counted_as_started(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    extra_kinds: Callable[[Kind], None],
) -> None:
    """One slot: of the two tasks a worker claims (its slot, and one ahead for it), one runs
    and one waits for the slot. Stopped, the worker hands both back; only the one that ran
    is counted as started (the start lateness /stats and /metrics show). Before, the one
    that waited was counted too, and again when it ran later."""
    stop = asyncio.Event()
    settings = dataclasses.replace(settings, poll_interval_s=60.0, shutdown_grace_s=0.2)
    _, run = await _one_running_one_waiting(
        store, settings, sql, task_factory, extra_kinds, 3, stop
    )
    stop.set()
    summary = await asyncio.wait_for(run, 10)
    assert (summary.claimed, summary.released) == (2, 2)
    assert sql("SELECT state, attempts, count(*) FROM tasks GROUP BY 1, 2") == [("scheduled", 0, 3)]
    assert sql("SELECT sum(started) FROM task_activity WHERE kind = 'single'") == [(1,)]


async def test_a_kind_that_blocks_past_the_lease_fails_once_its_attempts_are_spent(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    extra_kinds: Callable[[Kind], None],
) -> None:
    """A plain function that blocks 4 s under a 3 s lease costs its worker the lease each
    time it runs: each run is an attempt `lost`, and with two attempts the task fails after
    the second, as own-tasks.md says. Before, each run was handed back as never started,
    and the task ran again every few seconds for good, printing nothing."""

    def blocks(ctx: Context) -> str:
        time.sleep(4)
        return f"blocked {ctx.task_id}"

    extra_kinds(Kind("blocks", blocks, lambda s: 1.0))
    task = task_factory("blocks", max_attempts=2)
    settings = dataclasses.replace(settings, lease_seconds=3.0)
    out = io.StringIO()
    for _ in range(2):  # the caller starts it again as a new worker after each
        runner = Runner(store, settings, out=out)
        await asyncio.wait_for(runner.run(keep_polling=True), 30)
        assert runner.lease_lost
    assert sql("SELECT state, attempts FROM tasks") == [("failed", 2)]
    assert sql("SELECT attempt, outcome FROM attempts WHERE task_id = %s ORDER BY 1", task) == [
        (1, "lost"),
        (2, "lost"),
    ]
    assert out.getvalue() == ""


async def test_a_task_waiting_for_a_slot_when_the_lease_ran_out_is_counted_as_it_is_rescued(
    store: Store,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    extra_kinds: Callable[[Kind], None],
) -> None:
    """One slot: a worker holds one task running and one waiting for the slot when it finds
    its lease ran out. Both are rescued as lost, their attempts counted, and both counted as
    started (their start lateness), as a rescue's attempt is one that started. Before, the
    one that waited had its attempt counted but not its start."""
    settings = dataclasses.replace(settings, lease_seconds=3.0, poll_interval_s=60.0)
    runner, run = await _one_running_one_waiting(store, settings, sql, task_factory, extra_kinds, 2)
    sql("UPDATE workers SET lease_expires_at = now() - interval '1 second'")  # it stalled
    summary = await asyncio.wait_for(run, timeout=10)
    assert runner.lease_lost
    assert (summary.rescued, summary.released) == (2, 0)
    assert sql("SELECT state, attempts, count(*) FROM tasks GROUP BY 1, 2") == [("scheduled", 1, 2)]
    assert sql("SELECT sum(started), sum(lost) FROM task_activity WHERE kind = 'single'") == [
        (2, 2)
    ]
