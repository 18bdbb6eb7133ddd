"""The claim, worker leases, fencing and rescue, against a real database.

"Time passing" is the database's clock moved by hand: a worker's lease is expired by setting
its `lease_expires_at` in the past, or the claim and the rescue are given a later `now`
(queries.NOW), never by sleeping.
"""

import asyncio
import dataclasses
import io
import itertools
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from functions import conninfo, run_state
from functions.db import Database
from functions.errors import DatabaseUnavailable
from functions.kinds import KINDS
from functions.model import TaskState
from functions.runner import Runner
from functions.settings import Settings
from functions.store import ClaimFrom, Result, Store
from local.pgbouncer import NotInstalled, pgbouncer

Sql = Callable[..., list[tuple[Any, ...]]]
ALL = list(KINDS)


@pytest.fixture
async def stores(settings: Settings) -> AsyncIterator[list[Store]]:
    """Four stores on pools of their own: four workers' worth of separate connections."""
    databases = [Database(settings) for _ in range(4)]
    yield [Store(database) for database in databases]
    for database in databases:
        await database.dispose()


async def register(store: Store, *workers: str) -> None:
    for worker in workers:
        await store.register_worker(worker=worker, lease_s=60)


def expire(sql: Sql, worker: str) -> None:
    """The worker stopped renewing its lease a while ago (killed, or stalled)."""
    sql("UPDATE workers SET lease_expires_at = now() - interval '1 second' WHERE id = %s", worker)


async def test_racing_claims_never_share_a_row(stores: list[Store], sql: Sql) -> None:
    await register(stores[0], "w0", "w1", "w2", "w3")
    for round_ in range(25):
        sql(
            "INSERT INTO tasks (kind, execute_at, max_attempts)"
            " SELECT 'baz', now() - interval '1 second', 3 FROM generate_series(1, 150)"
        )
        answers = await asyncio.gather(
            *(
                store.claim_due(worker=f"w{i}", kinds=ALL, limit=50, lease_s=60)
                for i, store in enumerate(stores)
            )
        )
        claims = [claimed for claimed, _ in answers]
        ids = [c.id for claim in claims for c in claim]
        assert len(ids) == len(set(ids)), f"round {round_}: a row was claimed twice"
        assert len(ids) == 150, f"round {round_}: every due row is claimed once"
        for i, claim in enumerate(claims):
            owners = sql(
                "SELECT DISTINCT claimed_by FROM tasks WHERE id = ANY(%s)", [c.id for c in claim]
            )
            assert owners in ([], [(f"w{i}",)])
        sql("DELETE FROM tasks")


async def test_claim_takes_only_due_tasks_oldest_first(
    stores: list[Store], task_factory: Callable[..., int]
) -> None:
    store = stores[0]
    await register(store, "w")
    late = task_factory("baz", due_in_s=-1)
    early = task_factory("baz", due_in_s=-10)
    task_factory("baz", due_in_s=30)
    first = (await store.claim_due(worker="w", kinds=ALL, limit=1, lease_s=60))[0]
    rest = (await store.claim_due(worker="w", kinds=ALL, limit=10, lease_s=60))[0]
    assert [c.id for c in first] == [early]
    assert [c.id for c in rest] == [late]
    assert [c.attempt for c in first + rest] == [1, 1]


async def test_a_claim_from_where_the_last_left_takes_the_next_tasks_in_order(
    stores: list[Store], sql: Sql
) -> None:
    """In a backlog the worker claims from where NEXT_DUE found each priority's first task
    still scheduled (run_state.ClaimPoint): each claim takes the next tasks in order, as one
    from the start would, and one from the point takes none claimed before it."""
    store = stores[0]
    await register(store, "w")
    sql(
        "INSERT INTO tasks (kind, execute_at, priority)"
        " SELECT 'baz', now() - interval '1 minute', i % 2 FROM generate_series(1, 500) AS i"
    )
    expected = [i for (i,) in sql("SELECT id FROM tasks ORDER BY priority, execute_at, id")]
    taken: list[int] = []
    claim_from: ClaimFrom | None = None
    while len(taken) < 500:
        claimed, due = await store.claim_due(
            worker="w", kinds=ALL, limit=60, lease_s=60, claim_from=claim_from
        )
        taken += [c.id for c in claimed]
        claim_from = due.claim_from
        assert claim_from is not None
    assert taken == expected
    # Nothing scheduled is left: no point, at any priority.
    assert claim_from is not None
    assert claim_from.id == [None] * 10 and claim_from.due == [None] * 10


async def test_a_task_due_behind_the_point_is_claimed_only_from_the_start(
    stores: list[Store], sql: Sql, task_factory: Callable[..., int]
) -> None:
    """What a claim from a point cannot see: a task made due before it in its priority (the
    worker then reads from the start: ClaimPoint). A priority that had no task scheduled
    when the point was taken is read from its start."""
    store = stores[0]
    await register(store, "w")
    for _ in range(3):
        task_factory("baz", due_in_s=-5)
    first, due = await store.claim_due(worker="w", kinds=ALL, limit=1, lease_s=60)
    point = due.claim_from
    assert point is not None and point.id[0] == first[0].id + 1 and point.id[1:] == [None] * 9
    behind = task_factory("baz", due_in_s=-60)  # priority 0, due before the point
    urgent = sql(
        "INSERT INTO tasks (kind, execute_at, priority)"
        " VALUES ('baz', now() - interval '1 hour', 1) RETURNING id"
    )[0][0]  # priority 1: its range had nothing scheduled
    claimed, _ = await store.claim_due(
        worker="w", kinds=ALL, limit=10, lease_s=60, claim_from=point
    )
    assert [c.id for c in claimed] == [first[0].id + 1, first[0].id + 2, urgent]
    claimed, _ = await store.claim_due(worker="w", kinds=ALL, limit=10, lease_s=60)
    assert [c.id for c in claimed] == [behind]


async def test_claim_respects_the_kinds_asked_for(
    stores: list[Store], task_factory: Callable[..., int]
) -> None:
    store = stores[0]
    await register(store, "w")
    task_factory("foo")
    baz = task_factory("baz")
    claimed = (await store.claim_due(worker="w", kinds=["baz"], limit=10, lease_s=60))[0]
    assert [c.id for c in claimed] == [baz]


async def test_a_claim_takes_no_more_of_a_kind_than_its_cap(
    stores: list[Store], task_factory: Callable[..., int]
) -> None:
    """Of 4 bar due first and 3 baz, a claim capped at 2 bar takes the first 2 bar (in due
    order) and every baz; the bar it left are another worker's to take at once; a cap of
    exactly what is due takes them all."""
    await register(stores[0], "A", "B")
    bar = [task_factory("bar", due_in_s=-10 + i) for i in range(4)]
    baz = [task_factory("baz") for _ in range(3)]
    claimed, _ = await stores[0].claim_due(
        worker="A", kinds=ALL, limit=100, lease_s=60, caps={"bar": 2}
    )
    assert sorted(c.id for c in claimed) == bar[:2] + baz
    claimed, _ = await stores[1].claim_due(
        worker="B", kinds=ALL, limit=100, lease_s=60, caps={"bar": 2}
    )
    assert sorted(c.id for c in claimed) == bar[2:]


async def test_a_claim_capped_at_what_is_due_or_one_less(
    stores: list[Store], task_factory: Callable[..., int]
) -> None:
    await register(stores[0], "A")
    bar = [task_factory("bar") for _ in range(3)]
    claimed, due = await stores[0].claim_due(
        worker="A", kinds=["bar"], limit=100, lease_s=60, caps={"bar": 2}
    )
    assert sorted(c.id for c in claimed) == bar[:2]
    assert due.wait_s is not None and due.wait_s <= 0, "the one left is due"
    claimed, due = await stores[0].claim_due(
        worker="A", kinds=["bar"], limit=100, lease_s=60, caps={"bar": 1}
    )
    assert [c.id for c in claimed] == bar[2:]
    assert due.wait_s is None


async def test_a_worker_that_is_not_registered_or_whose_lease_ran_out_claims_nothing(
    stores: list[Store], task_factory: Callable[..., int], sql: Sql
) -> None:
    store = stores[0]
    task_factory("baz")
    assert (await store.claim_due(worker="stranger", kinds=ALL, limit=10, lease_s=60))[0] == []
    await register(store, "w")
    expire(sql, "w")
    assert (await store.claim_due(worker="w", kinds=ALL, limit=10, lease_s=60))[0] == []
    assert not await store.heartbeat(worker="w", lease_s=60, timeout_s=5), "dead to itself too"
    assert sql("SELECT state, attempts FROM tasks") == [("scheduled", 0)]


async def test_finish_is_fenced_against_a_worker_that_lost_its_lease(
    stores: list[Store], task_factory: Callable[..., int], sql: Sql
) -> None:
    a, b = stores[0], stores[1]
    await register(a, "A", "B")
    task = task_factory("baz")
    [first] = (await a.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60))[0]

    expire(sql, "A")  # A stalled past its lease
    assert await b.rescue_expired() == [(task, TaskState.SCHEDULED, "baz")]
    assert sql("SELECT id FROM workers") == [("B",)], "a dead worker holding nothing is forgotten"
    [second] = (await b.claim_due(worker="B", kinds=ALL, limit=1, lease_s=60))[0]
    assert second.attempt == 2

    late = Result(task, first.attempt, TaskState.SUCCEEDED, output="from A")
    assert await a.finish_many(worker="A", results=[late]) == set(), "A's result is dropped"
    assert sql("SELECT state, claimed_by FROM tasks") == [("running", "B")]

    done = Result(task, second.attempt, TaskState.SUCCEEDED, output="from B")
    assert await b.finish_many(worker="B", results=[done]) == {task}
    assert sql("SELECT state, output, attempts FROM tasks") == [("succeeded", "from B", 2)]


async def test_the_claim_the_lease_and_the_rescue_read_the_clock_they_are_given(
    stores: list[Store], task_factory: Callable[..., int], sql: Sql
) -> None:
    """An hour passes without anyone waiting for it: the claim, the heartbeat and the rescue
    take `now` (the store's default, None, is the database's clock)."""
    store = stores[0]
    await store.register_worker(worker="A", lease_s=7200)  # alive an hour from now
    task = task_factory("baz", due_in_s=3600.0)
    [(db_now,)] = sql("SELECT now()")
    assert (await store.claim_due(worker="A", kinds=ALL, limit=1, lease_s=7200))[0] == []
    later = db_now + timedelta(hours=1, seconds=1)
    [claimed] = (await store.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60, now=later))[0]
    assert claimed.id == task and claimed.lateness_ms is not None
    # The claim renewed its lease to `later` + 60 s: alive 30 s on, dead 61 s on.
    assert await store.rescue_expired(now=later + timedelta(seconds=30)) == []
    dead = later + timedelta(seconds=61)
    assert not await store.heartbeat(worker="A", lease_s=60, timeout_s=5, now=dead)
    assert await store.rescue_expired(now=dead) == [(task, TaskState.SCHEDULED, "baz")]
    [(next_attempt_at,)] = sql("SELECT next_attempt_at FROM tasks")
    assert next_attempt_at == dead, "due again at the rescue's now"


async def test_finish_is_fenced_by_attempt_too(
    stores: list[Store], task_factory: Callable[..., int], sql: Sql
) -> None:
    """A result for another attempt than the one held is not written."""
    store = stores[0]
    await register(store, "A")
    task = task_factory("baz")
    [claimed] = (await store.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60))[0]
    stale = Result(task, claimed.attempt + 1, TaskState.SUCCEEDED, output="not this attempt")
    assert await store.finish_many(worker="A", results=[stale]) == set()
    assert sql("SELECT state, attempts FROM tasks") == [("running", 1)]


async def test_a_batch_of_first_successes_writes_each_line_as_given_and_is_fenced(
    stores: list[Store], task_factory: Callable[..., int], sql: Sql
) -> None:
    """FINISH_MANY (ids and lines as two arrays): each line lands on its own task, exactly
    (unicode, outside the BMP, quotes, a newline, empty, none); a first attempt's success
    for a task this worker now holds at its second attempt is not written."""
    store = stores[0]
    await register(store, "A")
    lines = ["Baz 343", "é ✓ 😀", '"quoted" \\ back\nslash', "", None, "null"]
    again = task_factory("baz", due_in_s=-2.0)  # the first claimed
    tasks = [task_factory("baz") for _ in lines]
    # `again` ran its first attempt, which asked for a retry: A holds its second attempt.
    [first] = (await store.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60))[0]
    retry = Result(again, first.attempt, TaskState.SCHEDULED, None, "E", 0.0)
    assert first.id == again and await store.finish_many(worker="A", results=[retry]) == {again}
    claimed = (await store.claim_due(worker="A", kinds=ALL, limit=10, lease_s=60))[0]
    assert sorted((c.id, c.attempt) for c in claimed) == sorted(
        [*((t, 1) for t in tasks), (again, 2)]
    )
    results = [
        Result(t, 1, TaskState.SUCCEEDED, line) for t, line in zip(tasks, lines, strict=True)
    ]
    stale = Result(again, 1, TaskState.SUCCEEDED, "attempt 1")
    # In reverse: the store writes them in id order, each line with its own task.
    written = await store.finish_many(worker="A", results=[stale, *reversed(results)])
    assert written == set(tasks)
    rows = sql("SELECT id, state, output, finished_at IS NOT NULL, claimed_by FROM tasks")
    assert sorted(rows) == sorted(
        [(t, "succeeded", line, True, None) for t, line in zip(tasks, lines, strict=True)]
        + [(again, "running", None, False, "A")]
    )


async def test_rescue_only_touches_workers_whose_lease_ran_out(
    stores: list[Store], task_factory: Callable[..., int], sql: Sql
) -> None:
    store = stores[0]
    await register(store, "A", "B")
    task_factory("baz")
    task_factory("baz")
    await store.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60)
    await store.claim_due(worker="B", kinds=ALL, limit=1, lease_s=60)
    assert await store.rescue_expired() == []
    expire(sql, "B")
    assert [state for _, state, _ in await store.rescue_expired()] == [TaskState.SCHEDULED]
    assert sql("SELECT claimed_by FROM tasks WHERE state = 'running'") == [("A",)]


async def test_a_worker_frozen_inside_a_transaction_does_not_hold_up_its_rescue(
    settings: Settings, stores: list[Store], task_factory: Callable[..., int], sql: Sql
) -> None:
    """A worker stopped between BEGIN and COMMIT holds its worker row's lock: the server ends
    such a session after TASKRUNNER_DB_STATEMENT_TIMEOUT_S idle, and the rescue goes on."""
    store = stores[0]
    await register(store, "frozen")
    task = task_factory("baz")
    await store.claim_due(worker="frozen", kinds=ALL, limit=1, lease_s=60)
    frozen = await conninfo.connect(dataclasses.replace(settings, db_statement_timeout_s=1.0))
    await frozen.execute("BEGIN")
    await frozen.execute("UPDATE workers SET heartbeat_at = now() WHERE id = 'frozen'")
    # ... and then nothing: the process is stopped. Its lease runs out a minute later.
    [(db_now,)] = sql("SELECT now()")
    later = db_now + timedelta(seconds=61)
    rescued: list[Any] = []
    deadline = asyncio.get_running_loop().time() + 15
    while not rescued and asyncio.get_running_loop().time() < deadline:
        rescued = await store.rescue_expired(now=later)
        await asyncio.sleep(0.2)
    assert rescued == [(task, TaskState.SCHEDULED, "baz")]
    await frozen.close()


async def test_crashes_use_up_attempts_then_the_task_fails(
    stores: list[Store], task_factory: Callable[..., int], sql: Sql
) -> None:
    store = stores[0]
    task = task_factory("baz", max_attempts=2)
    for attempt in (1, 2):
        worker = f"dead{attempt}"
        await register(store, worker)
        [claimed] = (await store.claim_due(worker=worker, kinds=ALL, limit=1, lease_s=60))[0]
        assert claimed.attempt == attempt
        expire(sql, worker)
        [(rescued, state, _)] = await store.rescue_expired()
    assert (rescued, state) == (task, TaskState.FAILED)
    [(state, attempts, error, finished)] = sql(
        "SELECT state, attempts, error, finished_at IS NOT NULL FROM tasks"
    )
    assert (state, attempts, finished) == ("failed", 2, True)
    assert "lease expired" in error and "attempt 2 of 2" in error
    await register(store, "w")
    assert (await store.claim_due(worker="w", kinds=ALL, limit=1, lease_s=60))[0] == []


async def test_release_hands_tasks_back_without_using_an_attempt(
    stores: list[Store], task_factory: Callable[..., int], sql: Sql
) -> None:
    store = stores[0]
    await register(store, "A")
    task = task_factory("foo")
    await store.claim_due(worker="A", kinds=ALL, limit=1, lease_s=60)
    assert await store.release(worker="B", ids=[task]) == set(), "only the holder releases"
    assert await store.release(worker="A", ids=[task]) == {task}
    assert sql("SELECT state, attempts, claimed_by, started_at FROM tasks") == [
        ("scheduled", 0, None, None)
    ], "a first attempt handed back never started"


async def test_runner_keeps_its_lease_through_tasks_longer_than_it(
    settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    """A lease covers the worker, not the task: a live worker's long task is never rescued."""
    settings = dataclasses.replace(settings, lease_seconds=3.0, foo_delay_s=4.0)
    task = task_factory("foo")
    database, other = Database(settings), Database(settings)
    try:
        runner = Runner(Store(database), settings, out=io.StringIO())
        run = asyncio.create_task(runner.run())
        rescued = []
        while not run.done():  # a rival rescuing throughout the run
            await asyncio.sleep(0.1)
            rescued += await Store(other).rescue_expired()
        summary = await run
    finally:
        await database.dispose()
        await other.dispose()
    assert rescued == []
    assert (summary.succeeded, summary.lost) == (1, 0)
    assert sql("SELECT state, attempts FROM tasks") == [("succeeded", 1)]
    assert sql("SELECT count(*) FROM workers") == [(0,)], "the worker went away when done"
    assert task


async def test_runner_rescues_before_claiming(
    stores: list[Store], settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    task = task_factory("baz")
    await register(stores[0], "dead")
    await stores[0].claim_due(worker="dead", kinds=ALL, limit=1, lease_s=60)
    expire(sql, "dead")
    summary = await Runner(stores[1], settings, out=io.StringIO()).run()
    assert (summary.rescued, summary.succeeded) == (1, 1)
    assert sql("SELECT state, attempts FROM tasks") == [("succeeded", 2)]
    assert task


async def test_runner_hands_back_tasks_from_a_claim_whose_answer_it_never_got(
    stores: list[Store], settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    """A claim that committed as its connection broke: the runner never heard of its
    tasks, though they are leased to it. They go back at once, not when it stops."""
    settings = dataclasses.replace(settings, lease_seconds=3.0)
    orphan = task_factory("baz", due_in_s=-5)
    runner = Runner(stores[0], settings, out=io.StringIO())
    stop = asyncio.Event()
    original = stores[0].claim_due
    calls = 0

    async def claim_then_lose_the_answer(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        claimed = await original(**kwargs)
        if calls == 1:
            from functions.errors import DatabaseUnavailable

            raise DatabaseUnavailable("database unavailable: connection lost (test)")
        return claimed

    stores[0].claim_due = claim_then_lose_the_answer  # type: ignore[method-assign]
    run = asyncio.create_task(runner.run(keep_polling=True, stop=stop))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if sql("SELECT state FROM tasks WHERE id = %s", orphan) == [("succeeded",)]:
            break
    stop.set()
    summary = await run
    assert sql("SELECT state, attempts FROM tasks") == [("succeeded", 1)], (
        "handed back without using an attempt, then claimed and run"
    )
    assert (summary.released, summary.succeeded) == (1, 1)


async def test_stop_hands_back_unfinished_tasks_at_once(
    stores: list[Store], settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    settings = dataclasses.replace(settings, foo_delay_s=30.0, shutdown_grace_s=0.2)
    task_factory("foo")
    task_factory("baz")
    out = io.StringIO()
    stop = asyncio.Event()
    run = asyncio.create_task(
        Runner(stores[0], settings, out=out).run(keep_polling=True, stop=stop)
    )
    for _ in range(200):
        await asyncio.sleep(0.05)
        if sql("SELECT state FROM tasks ORDER BY id") == [("running",), ("succeeded",)]:
            break
    stop.set()
    summary = await asyncio.wait_for(run, timeout=5)
    assert (summary.succeeded, summary.released) == (1, 1)
    assert sql("SELECT kind, state, attempts, claimed_by FROM tasks ORDER BY id") == [
        ("foo", "scheduled", 0, None),
        ("baz", "succeeded", 1, None),
    ]
    assert out.getvalue().startswith("Baz ")
    assert sql("SELECT count(*) FROM workers") == [(0,)]


async def test_deletes_racing_claims_never_delete_under_a_worker(
    stores: list[Store], sql: Sql
) -> None:
    """Each task is either deleted before any worker takes it, or reported running."""
    await register(stores[0], "w0", "w1", "w2")
    ids = [
        i
        for (i,) in sql(
            "INSERT INTO tasks (kind, execute_at) SELECT 'baz', now() FROM generate_series(1, 1500)"
            " RETURNING id"
        )
    ]
    claimed: list[int] = []
    deleted: list[int] = []
    refused: list[int] = []

    async def claimer(store: Store, worker: str) -> None:
        while True:
            batch, _ = await store.claim_due(worker=worker, kinds=ALL, limit=20, lease_s=60)
            if not batch:
                return
            claimed.extend(c.id for c in batch)
            await asyncio.sleep(0)

    async def deleter(store: Store, mine: list[int]) -> None:
        for task_id in mine:
            state = await store.delete_task(task_id)
            if state is TaskState.RUNNING:
                refused.append(task_id)
            elif state is TaskState.SCHEDULED:
                deleted.append(task_id)

    await asyncio.gather(
        claimer(stores[0], "w0"),
        claimer(stores[1], "w1"),
        claimer(stores[2], "w2"),
        deleter(stores[3], ids[::2]),
    )
    assert not set(deleted) & set(claimed), "a claimed task was deleted"
    assert set(refused) <= set(claimed)
    assert len(claimed) == len(set(claimed))
    assert set(deleted) | set(claimed) == set(ids)
    [(left,)] = sql("SELECT count(*) FROM tasks")
    assert left == len(claimed)


async def test_a_worker_claims_a_backlog_from_where_it_left_then_looks_from_the_start(
    settings: Settings, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's side of run_state.ClaimPoint: the first claim reads from the start, each
    one after a full claim from the point its answer gave, and one that comes back short from
    a point is followed at once by one from the start (a task may be due behind the point)."""
    monkeypatch.setattr(run_state, "FROM_START_EVERY_S", 600.0)  # no second runs out here
    settings = dataclasses.replace(settings, claim_batch=100, concurrency=1000)
    database = Database(settings)
    store = Store(database)
    claims: list[tuple[bool, int, int]] = []  # (from a point, limit, claimed)
    claim_due = store.claim_due

    async def spy(**kwargs: Any) -> Any:
        answer = await claim_due(**kwargs)
        claims.append((kwargs["claim_from"] is not None, kwargs["limit"], len(answer[0])))
        return answer

    monkeypatch.setattr(store, "claim_due", spy)
    sql(
        "INSERT INTO tasks (kind, execute_at)"
        " SELECT 'baz', now() - interval '1 second' FROM generate_series(1, 250)"
    )
    try:
        runner = Runner(store, settings, worker_id="w", out=io.StringIO())
        assert (await runner.run()).succeeded == 250
    finally:
        await database.dispose()
    assert not claims[0][0], claims
    for (_, limit, claimed), (next_from_point, _, _) in itertools.pairwise(claims):
        assert next_from_point == (claimed == limit), claims
    short_from_point = [i for i, (point, limit, n) in enumerate(claims) if point and n < limit]
    assert short_from_point and not claims[short_from_point[0] + 1][0], claims


async def test_a_claim_given_up_behind_a_pooler_commits_nothing(
    database_url: str, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """A claim that waits for a server connection in pgbouncer's queue, then on a lock, is
    given up by the client (its statement bound) while the server still runs it, within the
    server's own statement_timeout. It must take nothing: the store sends COMMIT only once
    the claim's answer is in (psycopg's pipeline syncs before a transaction's end), so the
    server, finding the client gone, rolls back. Had COMMIT gone in the same batch, the
    tasks would wait for this worker's lease to run out before anyone ran them."""
    try:
        pooled = pgbouncer(database_url, pool_size=2)
        pooler = pooled.__enter__()
    except NotInstalled:
        pytest.skip("needs pgbouncer (Debian package pgbouncer; .ci/run installs it)")
    try:
        for _ in range(10):
            task_factory("baz")
        settings = Settings(
            database_url=pooler.url, transaction_pooler=True, db_statement_timeout_s=1.0
        )
        database = Database(settings)
        store = Store(database)
        await store.register_worker(worker="w", lease_s=60)
        locked = asyncio.Event()

        async def hold(statement: str, hold_s: float, lock: bool = False) -> None:
            """A transaction through the pooler that holds a server connection `hold_s`."""
            conn = await psycopg.AsyncConnection.connect(pooler.url, prepare_threshold=None)
            async with conn, conn.transaction():
                await conn.execute(statement)
                if lock:
                    locked.set()
                await conn.execute("SELECT pg_sleep(%s)", [hold_s])

        # Both server connections busy: the claim queues for 1.5 s, then waits 0.9 s (within
        # the server's 1 s statement_timeout) on its worker's row; the client gives up at 2 s.
        holders = asyncio.gather(
            hold("SELECT 1", 1.5),
            hold("SELECT FROM workers WHERE id = 'w' FOR UPDATE", 2.4, lock=True),
        )
        await locked.wait()
        with pytest.raises(DatabaseUnavailable):
            await store.claim_due(worker="w", kinds=ALL, limit=10, lease_s=60)
        await holders
        await database.dispose()
        # Once the server is done with the claim's connection, nothing was taken.
        for _ in range(100):
            busy = sql(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE %s AND pid <> pg_backend_pid()",
                "%picked AS MATERIALIZED%",
            )
            if busy == [(0,)]:
                break
            await asyncio.sleep(0.1)
        assert sql("SELECT state, count(*) FROM tasks GROUP BY state") == [("scheduled", 10)]
    finally:
        pooled.__exit__(None, None, None)
