"""The hot statements' plans stay linear whatever the planner's statistics say.

A user's table is fresh (never analyzed), or bulk-loaded a moment after statistics were
taken, when the burst arrives. Here each statement runs (EXPLAIN ANALYZE, rolled back) over
50,000 tasks in three such states, as a custom plan and as the generic plan a prepared
statement gets after a few runs. The checks are on what the executor did, not on costs: the
batch (a JSON record set, or an array unnested) is read once, never re-scanned per row, no
statement that looks rows up by id walks a partial index of a state, and the claim reads
the `tasks_due` index in its order (never a sort of everything due). And a worker whose
statements were prepared while the table was small runs them with plans made for the burst.
"""

import dataclasses
import io
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql as pgsql

from functions import queries
from functions import tasks as domain
from functions.db import Database
from functions.model import (
    DEFAULT_ORDER,
    SCAN_ROWS,
    SortKey,
    TaskFilter,
    TaskOrder,
    TaskState,
)
from functions.runner import AHEAD_S, Runner
from functions.settings import Settings
from functions.store import Result, Store, finish_statement

Sql = Callable[..., list[tuple[Any, ...]]]
N = 50_000
BATCH = Store.WRITE_BATCH


def prepare_statistics(sql: Sql, how: str) -> None:
    """Load N tasks the way `how` says, leaving the planner's statistics fresh or stale."""
    if how == "stale":
        # Statistics taken when the table held a few scheduled tasks (autovacuum analyzes
        # small tables early: this ANALYZE stands for that one), then a bulk load: wrong on
        # purpose. The product never analyzes; the plans must not depend on it.
        sql("INSERT INTO tasks (kind, execute_at) SELECT 'baz', now() FROM generate_series(1, 50)")
        sql("ANALYZE tasks")
        sql("DELETE FROM tasks")
    sql(
        "INSERT INTO tasks (kind, execute_at, max_attempts)"
        " SELECT 'baz', now() - interval '1 minute', 3 FROM generate_series(1, %s)",
        N,
    )
    sql("INSERT INTO workers (id, lease_expires_at) VALUES ('w', now() + interval '1 hour')")
    # Half of them running for worker w, as in a burst being worked through.
    sql(
        "UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w'"
        " WHERE id IN (SELECT id FROM tasks ORDER BY id LIMIT %s)",
        N // 2,
    )


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def explain(
    conn: psycopg.Connection[Any],
    statement: str,
    params: dict[str, Any],
    generic: bool,
    settings: str | None = None,
    *,
    buffers: bool = False,
) -> dict[str, Any]:
    """EXPLAIN ANALYZE `statement` as a prepared statement, then roll back its effects."""
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    prepared = re.sub(r"%\((\w+)\)s", placeholder, statement)
    args = pgsql.SQL(", ").join(pgsql.Literal(params[name]) for name in names)
    mode = "force_generic_plan" if generic else "force_custom_plan"
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        if settings is not None:
            cur.execute(settings.encode())
        # After the settings, which pin custom plans: the generic plan's shape is checked too.
        cur.execute(f"SET LOCAL plan_cache_mode = {mode}")
        cur.execute(pgsql.SQL("PREPARE stmt AS {}").format(pgsql.SQL(prepared)))
        execute = "EXECUTE stmt({})" if names else "EXECUTE stmt"
        options = "ANALYZE, BUFFERS, FORMAT JSON" if buffers else "ANALYZE, FORMAT JSON"
        cur.execute(pgsql.SQL(f"EXPLAIN ({options}) " + execute).format(args))
        [(result,)] = cur.fetchall()
        cur.execute("DEALLOCATE stmt")
    plan: dict[str, Any] = result[0]["Plan"]
    return plan


def check_no_sort_of_due_tasks(plan: dict[str, Any], name: str) -> None:
    """The due tasks are read in the index's order, never sorted; only a claim's own rows
    (at most its limit) may be, to cap each kind (queries.CLAIM_DUE)."""
    for sort in (n for n in nodes(plan) if n["Node Type"] == "Sort"):
        below = {n.get("Index Name") for n in nodes(sort)}
        assert "tasks_due" not in below, f"{name} sorts the due tasks"
        assert sort["Actual Rows"] <= BATCH, f"{name} sorts more than it claims"


def results_json(ids: list[int]) -> str:
    return json.dumps(
        [
            {"id": i, "attempt": 1, "state": "succeeded", "output": "Baz 1", "error": None,
             "retry_in_s": None}
            for i in ids
        ]
    )  # fmt: skip


def finish_params(ids: list[int]) -> dict[str, Any]:
    """FINISH_MANY's parameters for first attempts of `ids` that succeeded, as the store's."""
    _, params = finish_statement("w", [Result(i, 1, TaskState.SUCCEEDED, "Baz 1") for i in ids])
    return params


@pytest.fixture(params=["never analyzed", "stale"])
def loaded(request: pytest.FixtureRequest, sql: Sql) -> str:
    prepare_statistics(sql, request.param)
    return str(request.param)


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
def test_batch_writes_read_their_batch_once_and_find_rows_by_key(
    postgresql: psycopg.Connection[Any], sql: Sql, loaded: str, generic: bool
) -> None:
    running = [i for (i,) in sql("SELECT id FROM tasks WHERE claimed_by = 'w' ORDER BY id")]
    # The last batch of the running rows: a plan scanning from the start would show it.
    batch = running[-BATCH:]
    cases: dict[str, tuple[str, dict[str, Any]]] = {
        "FINISH_MANY": (queries.FINISH_MANY, finish_params(batch)),
        "RECORDED": (queries.RECORDED, {"results": results_json(batch)}),
        "RELEASE": (queries.RELEASE, {"worker": "w", "ids": batch}),
    }
    postgresql.autocommit = False
    for name, (statement, params) in cases.items():
        # As Store runs them: in a transaction with the pinned plan settings.
        plan = explain(postgresql, statement, params, generic, queries.PINNED_PLAN)
        for node in nodes(plan):
            if node["Node Type"] == "Function Scan":
                assert node["Actual Loops"] == 1, f"{name}: the batch is re-scanned per row"
            assert node.get("Index Name") not in ("tasks_running", "tasks_due"), (
                f"{name} ({loaded}) walks {node.get('Index Name')}"
            )
            assert node["Node Type"] != "Seq Scan", f"{name} ({loaded}) scans the whole table"
        if name in ("FINISH_MANY", "RELEASE"):
            [update] = [n for n in nodes(plan) if n["Node Type"] == "ModifyTable"]
            assert update["Actual Rows"] == len(batch), f"{name}: every row of the batch written"


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
def test_the_claim_walks_the_due_index_in_order(
    postgresql: psycopg.Connection[Any], sql: Sql, loaded: str, generic: bool
) -> None:
    postgresql.autocommit = False
    params = {
        "worker": "w", "kinds": ["foo", "bar", "baz"], "limit": BATCH, "lease_s": 60.0, "now": None,
        "short_kinds": [], "fit_s": None, "caps": '{"bar": 110}', "from_due": None, "from_id": None,
        "ahead_s": AHEAD_S,
    }  # fmt: skip
    for name, statement in (("CLAIM_DUE", queries.CLAIM_DUE), ("NEXT_DUE", queries.NEXT_DUE)):
        # As Store.claim_due runs them: in one transaction with the claim's settings.
        plan = explain(postgresql, statement, params, generic, queries.PINNED_PLAN)
        used = {n.get("Index Name") for n in nodes(plan)}
        assert "tasks_due" in used, f"{name} ({loaded}) does not use tasks_due: {used}"
        check_no_sort_of_due_tasks(plan, name)
        if name == "CLAIM_DUE":
            updated = [n for n in nodes(plan) if n["Node Type"] == "ModifyTable"]
            assert {n["Relation Name"] for n in updated} == {"tasks", "workers"}


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
def test_the_schedules_picker_reads_only_the_due_ones_through_their_index(
    postgresql: psycopg.Connection[Any], sql: Sql, generic: bool
) -> None:
    """50,000 schedules, 10 of them due within the minute: the creator of occurrences reads
    those through `schedules_next_run`, in its order, and no other row; its work does not
    grow with the schedules not due."""
    sql(
        "INSERT INTO schedules (name, kind, cron, timezone, next_run_at)"
        " SELECT 's' || i, 'baz', '* * * * *', 'UTC',"
        "   now() + CASE WHEN i <= 10 THEN interval '30 seconds' ELSE interval '1 day' END"
        " FROM generate_series(1, %s) AS i",
        N,
    )
    postgresql.autocommit = False
    params = {"now": None, "ahead_s": 60.0, "limit": 1000}
    # As Store.create_occurrences runs it: in a transaction with the pinned plan settings.
    plan = explain(postgresql, queries.PICK_DUE_SCHEDULES, params, generic, queries.PINNED_PLAN)
    scans = [n for n in nodes(plan) if n.get("Relation Name") == "schedules"]
    assert [n.get("Index Name") for n in scans] == ["schedules_next_run"], scans
    assert scans[0]["Actual Rows"] == 10, "only the due schedules are read"
    shape = [(n["Node Type"], n.get("Index Name"), n.get("Sort Key")) for n in nodes(plan)]
    assert not any(n["Node Type"] == "Sort" for n in nodes(plan)), shape


def test_no_pinned_statement_is_compiled_with_jit(
    postgresql: psycopg.Connection[Any], sql: Sql, loaded: str
) -> None:
    """Before PostgreSQL 18 a plan forced through a disabled node costs 10^10, enough for
    JIT with inlining and optimization: 200-480 ms of compiling for a 0.5 ms statement on
    Debian's 15. The pinned settings turn it off (where the server has JIT at all)."""
    sql("UPDATE workers SET lease_expires_at = now() - interval '1 minute'")
    running = [i for (i,) in sql("SELECT id FROM tasks WHERE claimed_by = 'w' ORDER BY id")]
    batch = running[-BATCH:]
    cases: dict[str, tuple[str, dict[str, Any]]] = {
        "CLAIM_DUE": (queries.CLAIM_DUE, {"worker": "w", "kinds": ["foo", "bar", "baz"],
                                          "limit": BATCH, "lease_s": 60.0, "now": None,
                                          "short_kinds": [], "fit_s": None, "caps": "{}",
                                          "from_due": None, "from_id": None,
                                          "ahead_s": AHEAD_S}),
        "NEXT_DUE": (queries.NEXT_DUE, {"kinds": ["foo", "bar", "baz"], "now": None,
                                        "short_kinds": [], "fit_s": None,
                                        "from_due": None, "from_id": None}),
        "FINISH_MANY": (queries.FINISH_MANY, finish_params(batch)),
        "RECORDED": (queries.RECORDED, {"results": results_json(batch)}),
        "RELEASE": (queries.RELEASE, {"worker": "w", "ids": batch}),
        "RESCUE_EXPIRED": (queries.RESCUE_EXPIRED, {"limit": BATCH, "now": None}),
        "PRUNE_FINISHED": (queries.PRUNE_FINISHED, {"older_than_s": 0.0, "limit": BATCH}),
    }  # fmt: skip
    postgresql.autocommit = False
    for name, (statement, params) in cases.items():
        with postgresql.transaction(force_rollback=True), postgresql.cursor() as cur:
            # As the session a worker opens through a transaction pooler has it: JIT as the
            # server is configured (on by default), and only the pinned settings.
            cur.execute("SET LOCAL jit = on")
            cur.execute(queries.PINNED_PLAN.encode())
            cur.execute(b"EXPLAIN (FORMAT JSON) " + statement.encode(), params)
            [(result,)] = cur.fetchall()
        assert "JIT" not in result[0], f"{name} ({loaded}) is compiled: {result[0]['JIT']}"


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
def test_stats_count_through_the_indexes_after_a_drain(
    postgresql: psycopg.Connection[Any], sql: Sql, generic: bool
) -> None:
    """Statistics taken mid-burst say many tasks are scheduled; by the time /stats is read
    they have all run. The counts must still read the partial indexes (a handful of pages),
    not the whole table, and start no parallel workers (as Store.stats_rows runs them)."""
    sql(
        "INSERT INTO tasks (kind, execute_at, max_attempts)"
        " SELECT 'baz', now() - interval '1 minute', 3 FROM generate_series(1, %s)",
        N,
    )
    # What autovacuum's own analyze does in the middle of a burst (the product's settings
    # make it run after 1% of the rows change): statistics of a moment that has passed.
    sql("ANALYZE tasks")
    sql(
        "UPDATE tasks SET state = 'succeeded', attempts = 1, started_at = now(),"
        " finished_at = now(), output = 'Baz 1'"
    )
    postgresql.autocommit = False
    for name in (
        "STATS_ACTIVE_COUNTS",
        "STATS_FINISHED_FEW",
        "STATS_DUE_AND_WORKERS",
        "STATS_ACTIVITY",
    ):
        plan = explain(
            postgresql, getattr(queries, name), {"exact": 10_000}, generic, queries.PINNED_PLAN
        )
        for node in nodes(plan):
            assert not (node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "tasks"), (
                f"{name} reads the whole table"
            )
            assert node["Node Type"] not in ("Gather", "Gather Merge"), f"{name} goes parallel"


def rows_read(
    conn: psycopg.Connection[Any], statement: str, exact: int, generic: bool, but: str = ""
) -> list[int]:
    """The rows each node of `statement`'s plan read of `tasks` (but through index `but`),
    run as /stats runs it, with `exact` as its cap."""
    plan = explain(conn, statement, {"exact": exact}, generic, queries.PINNED_PLAN)
    return [
        n["Actual Rows"] * n.get("Actual Loops", 1)
        for n in nodes(plan)
        if n.get("Relation Name") == "tasks" and n.get("Index Name") != but
    ]


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
def test_stats_read_no_more_scheduled_tasks_than_they_count_exactly(
    postgresql: psycopg.Connection[Any], sql: Sql, loaded: str, generic: bool
) -> None:
    """/stats counts scheduled tasks exactly only while there are few (`exact`): it reads at
    most `exact` + 1 of them to find out, however many are scheduled (a count of all of them
    grew with them: 123 ms at 500,000)."""
    exact = 1_000
    sql("UPDATE tasks SET execute_at = now() + interval '1 day' WHERE state = 'scheduled'")
    postgresql.autocommit = False
    read = rows_read(postgresql, queries.STATS_ACTIVE_COUNTS, exact, generic, "tasks_running")
    assert read and sum(read) <= exact + 1, read


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
def test_stats_read_no_more_finished_tasks_than_they_count_exactly(
    postgresql: psycopg.Connection[Any], sql: Sql, generic: bool
) -> None:
    """Likewise for finished tasks, on a table too large to count (`exact` + 1 of them read
    at most, from the newest end of their index), however many have finished."""
    exact = 1_000
    sql(
        "INSERT INTO tasks (kind, state, attempts, started_at, finished_at, execute_at)"
        " SELECT 'baz', 'succeeded', 1, now(), now(), now() FROM generate_series(1, %s)",
        N,
    )
    postgresql.autocommit = False
    read = rows_read(postgresql, queries.STATS_FINISHED_FEW, exact, generic)
    assert read and sum(read) <= exact + 1, read


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
def test_reads_of_many_tasks_at_once_find_them_by_key(
    postgresql: psycopg.Connection[Any], sql: Sql, loaded: str, generic: bool
) -> None:
    """GET_TASK_MANY, which concurrent reads share (Store.get_task), run as the store runs
    it: no pinned settings."""
    ids = [i for (i,) in sql("SELECT id FROM tasks ORDER BY id DESC LIMIT %s", Store.COALESCE_MAX)]
    postgresql.autocommit = False
    plan = explain(postgresql, queries.GET_TASK_MANY, {"ids": ids}, generic)
    for node in nodes(plan):
        assert node["Node Type"] != "Seq Scan", f"GET_TASK_MANY ({loaded}) scans the table"
    assert plan["Actual Rows"] == len(ids)


def server_text(statement: str) -> str:
    """`statement` as psycopg prepares it: each named placeholder as $n, in order."""
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)s", placeholder, statement)


async def test_a_worker_warmed_on_a_small_table_keeps_the_burst_plans(
    postgresql: psycopg.Connection[Any], settings: Settings, sql: Sql
) -> None:
    """A worker runs 30 single tasks on a fresh table, then a burst arrives (issue 20).

    psycopg prepares a statement on its 6th run, and PostgreSQL then keeps the generic plan
    it made while the table held a few rows: for FINISH_MANY, the table walked in full with
    the batch re-read for every row (a 1,000-row write took 600-780 ms on PostgreSQL 15, and
    a worker drained the burst at 4-5k tasks/s). On the worker's own connection, after the
    burst, each claim and write statement must run with a plan made for its values."""
    settings = dataclasses.replace(settings, db_pool_size=1)
    database = Database(settings)
    store = Store(database)
    runner = Runner(store, settings, worker_id="w", out=io.StringIO())
    try:
        for _ in range(30):
            sql("INSERT INTO tasks (kind, execute_at) VALUES ('baz', now())")
            assert (await runner.run()).succeeded == 1
        # The burst, as POST /tasks/batch writes it (the API's own statement).
        payload = json.dumps([{"kind": "baz", "at_us": 0}] * 20_000)
        postgresql.execute(queries.INSERT_TASKS, {"tasks": payload, "max_attempts": 3})
        assert (await runner.run()).succeeded == 20_000
        sql("INSERT INTO tasks (kind, execute_at) SELECT 'baz', now() FROM generate_series(1, %s)",
            2 * BATCH)  # fmt: skip
        await store.register_worker(worker="w", lease_s=60)
        params = {"lease_s": 60.0, "worker": "w", "kinds": ["baz"], "limit": BATCH, "now": None,
                  "short_kinds": [], "fit_s": None, "caps": "{}", "from_due": None,
                  "from_id": None, "ahead_s": AHEAD_S}  # fmt: skip
        [ids] = await store._pinned((queries.CLAIM_DUE, params))
        assert len(ids) == BATCH

        async with database.connection() as conn:  # the one the worker used
            prepared = {
                statement: (name, generic)
                for name, statement, generic in await (
                    await conn.execute(
                        "SELECT name, statement, generic_plans FROM pg_prepared_statements"
                    )
                ).fetchall()
            }
            claim, finish = server_text(queries.CLAIM_DUE), server_text(queries.FINISH_MANY)
            assert claim in prepared and finish in prepared, "prepared, as a warm worker's are"

            async def explain(name: str, *args: Any) -> dict[str, Any]:
                """EXPLAIN ANALYZE the prepared statement `name` (in a transaction under
                PINNED_PLAN, as Store runs it)."""
                values = pgsql.SQL(", ").join(pgsql.Literal(a) for a in args)
                query = pgsql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {}({})").format(
                    pgsql.Identifier(name), values
                )
                [(result,)] = await (await conn.execute(query)).fetchall()
                plan: dict[str, Any] = result[0]["Plan"]
                return plan

            # One transaction, rolled back: psycopg deallocates every statement after a
            # rollback.
            async with conn.transaction(force_rollback=True):
                await conn.execute(queries.PINNED_PLAN)
                # $1..$n in the order the statement names them.
                names = dict.fromkeys(re.findall(r"%\((\w+)\)s", queries.CLAIM_DUE))
                plan = await explain(prepared[claim][0], *(params[n] for n in names))
                assert "tasks_due" in {n.get("Index Name") for n in nodes(plan)}
                check_no_sort_of_due_tasks(plan, "the claim")

                finished = finish_params([i for i, *_ in ids])
                names = dict.fromkeys(re.findall(r"%\((\w+)\)s", queries.FINISH_MANY))
                plan = await explain(prepared[finish][0], *(finished[n] for n in names))
            batch_reads = [n for n in nodes(plan) if n["Node Type"] == "Function Scan"]
            assert [n["Actual Loops"] for n in batch_reads] == [1], "the batch is read once"
            found = [n for n in nodes(plan) if n.get("Relation Name") == "tasks" and
                     n["Node Type"] != "ModifyTable"]  # fmt: skip
            assert all(n.get("Index Name") == "tasks_pkey" for n in found), found
            assert all(n["Actual Loops"] == BATCH for n in found), "one lookup per result"
            # And none of the worker's statements on tasks ran a generic plan in the burst.
            for statement, (_, generic) in prepared.items():
                if "tasks" in statement and "$1" in statement:
                    assert generic == 0, f"ran a generic plan: {statement}"
    finally:
        await database.dispose()


FUTURE = 1_000_000
# Due tasks in each priority's range: fewer in all than a claim takes, so the claim goes
# through every range to its end.
DUE_PER_PRIORITY = 50
PRIORITY_LEVELS = 10


def load_future_tasks(conn: psycopg.Connection[Any]) -> int:
    """A million tasks due tomorrow and later, over the ten priorities, and a few due now in
    each, written as `POST /tasks/batch` writes them (the API's own statement, 10,000 a
    statement); nothing analyzed by hand. Returns how many are due."""
    conn.autocommit = True
    tomorrow_us = (int(time.time()) + 86_400) * 1_000_000
    for start in range(0, FUTURE, 10_000):
        rows = [
            {"kind": "baz", "at_us": tomorrow_us + i * 1_000, "priority": i % PRIORITY_LEVELS}
            for i in range(start, start + 10_000)
        ]
        conn.execute(queries.INSERT_TASKS, {"tasks": json.dumps(rows), "max_attempts": 3})
    due = [
        {"kind": kind, "at_us": 0, "priority": level}
        for level in range(PRIORITY_LEVELS)
        for kind in ("baz", "foo") * (DUE_PER_PRIORITY // 2)
    ]
    conn.execute(queries.INSERT_TASKS, {"tasks": json.dumps(due), "max_attempts": 3})
    conn.execute(
        "INSERT INTO workers (id, lease_expires_at) VALUES ('w', now() + interval '1 hour')"
    )
    return len(due)


def test_reads_of_due_tasks_read_no_future_ones_whatever_their_priorities(
    postgresql: psycopg.Connection[Any],
) -> None:
    """Each statement that finds due tasks, or the next one due, on a million tasks that are
    not due yet, spread over the ten priorities (PostgreSQL 15 has no skip scan: each names
    the ten priorities, queries.PRIORITIES). Each reads the due tasks and at most an index
    page more per priority: its rows read are the due ones, its buffers a few per due task,
    where one read of the future tasks' index entries alone is thousands. Whether or not
    autovacuum analyzed the table meanwhile (with statistics, a count once read every
    scheduled task through `tasks_scheduled_id`: 1,000,000 rows to count 500)."""
    due = load_future_tasks(postgresql)
    [(index_pages,)] = postgresql.execute(
        "SELECT pg_relation_size('tasks_due') / current_setting('block_size')::int"
    ).fetchall()
    claim = {"worker": "w", "kinds": ["foo", "baz"], "limit": BATCH, "lease_s": 60.0,
             "now": None, "short_kinds": [], "fit_s": None, "caps": "{}", "from_due": None,
             "from_id": None, "ahead_s": AHEAD_S}  # fmt: skip
    cases: dict[str, tuple[str, dict[str, Any], int]] = {
        # (statement, parameters, the rows of tasks it reads)
        "CLAIM_DUE": (queries.CLAIM_DUE, claim, due),
        "NEXT_DUE": (queries.NEXT_DUE, claim, PRIORITY_LEVELS),
        "STATS_DUE_AND_WORKERS": (queries.STATS_DUE_AND_WORKERS, {}, PRIORITY_LEVELS),
        "STATS_UNSERVED": (queries.STATS_UNSERVED, {}, min(due, queries.UNSERVED_READ)),
        "STATS_DUE_BY_KIND": (queries.STATS_DUE_BY_KIND, {}, due),
        "COUNT_DUE_BY_KIND": (
            queries.COUNT_DUE_BY_KIND,
            {"kinds": ["foo"], "read": Store.LEFT_READ},
            min(due, Store.LEFT_READ),
        ),
    }
    postgresql.autocommit = False
    for (name, (statement, params, rows_read)), generic in itertools.product(
        cases.items(), (False, True)
    ):
        # As the store runs them: under the pinned settings; as a custom plan, and as the
        # generic plan a prepared statement may get.
        plan = explain(postgresql, statement, params, generic, queries.PINNED_PLAN, buffers=True)
        which = f"{name} ({'generic' if generic else 'custom'} plan)"
        # What reads rows of tasks (the claim's UPDATE finds what it claimed by primary key).
        scans = [
            n
            for n in nodes(plan)
            if n.get("Relation Name") == "tasks"
            and n["Node Type"] != "ModifyTable"
            and n.get("Index Name") not in ("tasks_pkey", "tasks_running")
        ]
        assert {n.get("Index Name") for n in scans} == {"tasks_due"}, f"{which}: {scans}"
        if name in ("CLAIM_DUE", "NEXT_DUE"):
            # In the index's order: a sort would lock every due task to keep a few.
            check_no_sort_of_due_tasks(plan, which)
        read = sum(
            (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
            for n in scans
        )
        assert read == rows_read, f"{which} read {read} rows of tasks"
        blocks = sum(n["Shared Hit Blocks"] + n["Shared Read Blocks"] for n in scans)
        assert blocks * 10 < index_pages, f"{which} read {blocks} blocks of {index_pages}"
    [(tasks, due_now)] = postgresql.execute(
        "SELECT count(*), count(*) FILTER (WHERE execute_at <= now()) FROM tasks"
    ).fetchall()
    assert (tasks, due_now) == (FUTURE + due, due)


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
def test_a_cancel_or_retry_by_filter_reads_the_indexes_of_its_states(
    postgresql: psycopg.Connection[Any], sql: Sql, loaded: str, generic: bool
) -> None:
    """Of 25,000 running and 25,000 scheduled (and, for the retry, as many failed), a
    statement of a bulk cancel, retry or delete, or the count of its dry run, reads its
    states' partial indexes (a delete of succeeded tasks too, which have none: the primary
    key, in order): the running tasks, and at most `limit` of the others; never the whole
    table."""
    sql("UPDATE tasks SET state = 'failed', finished_at = now() WHERE state = 'scheduled'")
    sql(
        "INSERT INTO tasks (kind, execute_at) SELECT 'baz', now() FROM generate_series(1, %s)",
        N // 2,
    )
    cases = {
        "cancel": queries.cancel_tasks("kind = %(kind)s"),
        "retry": queries.retry_tasks("kind = %(kind)s"),
        "cancel one": queries.CANCEL_TASK,
        "delete": queries.delete_tasks("kind = %(kind)s"),
        "delete scheduled": queries.delete_tasks("kind = %(kind)s", ("scheduled",)),
        "count to cancel": queries.count_tasks("kind = %(kind)s", queries.CANCELLABLE),
        "count to delete": queries.count_tasks("kind = %(kind)s", queries.DELETABLE),
    }
    postgresql.autocommit = False
    for name, statement in cases.items():
        params = {"kind": "baz", "limit": BATCH, "max_attempts": 3, "ids": [N]}
        # As Store runs them: with the pinned plan settings.
        plan = explain(postgresql, statement, params, generic, queries.PINNED_PLAN)
        read = 0
        for node in nodes(plan):
            assert node["Node Type"] != "Seq Scan", f"{name} ({loaded}) scans the whole table"
            # (A CTE Scan reads the statement's own rows again, in memory: the cancel's
            # history reads its cancelled rows so, to record the running ones' attempts.)
            if "Scan" in node["Node Type"] and node["Node Type"] not in (
                "Bitmap Index Scan", "CTE Scan"
            ):  # fmt: skip
                read += node["Actual Rows"] * node["Actual Loops"]
                read += node.get("Rows Removed by Filter", 0)
        assert read <= N // 2 + 5 * BATCH, f"{name} ({loaded}) read {read} rows"


MILLION = 1_000_000


def load_a_million(sql: Sql) -> None:
    """A million tasks as a drain leaves them (never analyzed): 75% succeeded, 5% failed,
    5% cancelled, 15% scheduled (a fifth of those waiting to retry with an error), of three
    kinds, every 50th made by a schedule, each with a payload; ids in the order created,
    `execute_at` in no order of id."""
    sql(
        """
        INSERT INTO tasks (kind, state, execute_at, created_at, started_at, finished_at,
            attempts, max_attempts, error, payload, schedule, scheduled_for)
        SELECT (ARRAY['foo', 'bar', 'baz'])[n % 3 + 1], state, due,
            now() - (%(n)s - n) * interval '1 ms',
            CASE WHEN done THEN due END, CASE WHEN done THEN due + interval '1 s' END,
            CASE WHEN done OR n % 20 = 2 THEN 1 ELSE 0 END, 3,
            CASE WHEN state = 'failed' OR n % 20 = 2
                THEN 'TimeoutError: GET http://example.com/' || n % 100 END,
            jsonb_build_object('to', 'user' || n % 1000 || '@example.com'),
            CASE WHEN n % 50 = 7 THEN 'nightly' END, CASE WHEN n % 50 = 7 THEN due END
        FROM generate_series(1, %(n)s) AS n,
            LATERAL (SELECT CASE WHEN n % 20 = 0 THEN 'failed' WHEN n % 20 = 1 THEN 'cancelled'
                WHEN n % 20 IN (2, 3, 4) THEN 'scheduled' ELSE 'succeeded' END AS state,
                timestamptz '2030-01-01' + (n::bigint * 7919 % %(n)s) * interval '1 s' AS due) AS s,
            LATERAL (SELECT state IN ('succeeded', 'failed', 'cancelled') AS done) AS d
        """.replace("%(n)s", str(MILLION))
    )


def _first_page(
    postgresql: psycopg.Connection[Any], matching: TaskFilter, order: TaskOrder
) -> list[tuple[str, dict[str, Any]]]:
    """The plans of the statements Store.list_tasks runs for a first page of 100."""
    listing = queries.listing(matching, order)
    params = dict(listing.params)
    plans = []
    bounded = False
    if listing.rest != "true":
        statement = listing.bound(after=False)
        plans.append(("bound", explain(postgresql, statement, params, False, queries.PINNED_PLAN)))
        with postgresql.transaction(force_rollback=True), postgresql.cursor() as cur:
            cur.execute(queries.PINNED_PLAN)
            cur.execute(re.sub(r"%\((\w+)\)s", r"%(\1)s", statement), params)
            found = cur.fetchall()
        if found:
            bounded = True
            params.update(bound_key=found[0][0], bound_id=found[0][1])
    statement = listing.page(after=False, bounded=bounded)
    params["limit"] = Store.PAGE_CHUNK
    plans.append(("page", explain(postgresql, statement, params, False, queries.PINNED_PLAN)))
    return plans


_T = datetime(2030, 1, 6, tzinfo=UTC)
FIRST_PAGES: dict[str, tuple[TaskFilter, TaskOrder, str | None]] = {
    # name: (filter, order, the index that must serve it)
    "no filter": (TaskFilter(), DEFAULT_ORDER, "tasks_pkey"),
    "type": (TaskFilter(kinds=("bar",)), DEFAULT_ORDER, "tasks_kind_id"),
    "types": (TaskFilter(kinds=("bar", "baz")), DEFAULT_ORDER, "tasks_pkey"),
    "state failed": (TaskFilter(states=(TaskState.FAILED,)), DEFAULT_ORDER, "tasks_failed_id"),
    "state scheduled": (
        TaskFilter(states=(TaskState.SCHEDULED,)),
        DEFAULT_ORDER,
        "tasks_scheduled_id",
    ),
    "state cancelled": (
        TaskFilter(states=(TaskState.CANCELLED,)),
        DEFAULT_ORDER,
        "tasks_cancelled_id",
    ),
    "state succeeded": (TaskFilter(states=(TaskState.SUCCEEDED,)), DEFAULT_ORDER, "tasks_pkey"),
    "state running (none)": (TaskFilter(states=(TaskState.RUNNING,)), DEFAULT_ORDER, None),
    "states": (
        TaskFilter(states=(TaskState.FAILED, TaskState.CANCELLED)),
        DEFAULT_ORDER,
        "tasks_pkey",
    ),
    "created_after": (TaskFilter(created_after=_T - timedelta(days=3650)), DEFAULT_ORDER, None),
    "created_before": (TaskFilter(created_before=_T - timedelta(days=3650)), DEFAULT_ORDER, None),
    "execute_after": (TaskFilter(execute_after=_T), DEFAULT_ORDER, None),
    "execute_before": (TaskFilter(execute_before=_T), DEFAULT_ORDER, None),
    "finished_after": (TaskFilter(finished_after=_T), DEFAULT_ORDER, None),
    "finished_before": (TaskFilter(finished_before=_T), DEFAULT_ORDER, None),
    "error": (TaskFilter(error="example.com/42"), DEFAULT_ORDER, "tasks_error_id"),
    "error (none)": (TaskFilter(error="no such error"), DEFAULT_ORDER, "tasks_error_id"),
    "schedule": (TaskFilter(schedule="nightly"), DEFAULT_ORDER, "tasks_schedule_id"),
    "payload": (TaskFilter(payload='{"to": "user7@example.com"}'), DEFAULT_ORDER, None),
    **{
        f"sort={order.name}": (TaskFilter(), order, index)
        for order, index in [
            (TaskOrder(SortKey.ID, descending=False), "tasks_pkey"),
            (TaskOrder(SortKey.EXECUTE_AT, descending=False), "tasks_execute_at"),
            (TaskOrder(SortKey.EXECUTE_AT, descending=True), "tasks_execute_at"),
            (TaskOrder(SortKey.FINISHED_AT, descending=False), "tasks_finished"),
            (TaskOrder(SortKey.FINISHED_AT, descending=True), "tasks_finished"),
        ]
    },
    "sort=execute_at, execute range": (
        TaskFilter(execute_after=_T, execute_before=_T + timedelta(days=1)),
        TaskOrder(SortKey.EXECUTE_AT, descending=False),
        "tasks_execute_at",
    ),
    "sort=-finished_at, failed of bar": (
        TaskFilter(states=(TaskState.FAILED,), kinds=("bar",)),
        TaskOrder(SortKey.FINISHED_AT, descending=True),
        "tasks_finished",
    ),
}


def test_the_first_page_of_every_filter_and_order_reads_an_index_a_bounded_run(
    postgresql: psycopg.Connection[Any], sql: Sql
) -> None:
    """Of a million tasks never analyzed, the first page of each filter and each order reads
    an index in the order asked for: no scan of the table, no sort, and at most a bounded
    run of rows (a page, or SCAN_ROWS for a filter the order's index does not serve)."""
    load_a_million(sql)
    postgresql.autocommit = False
    for name, (matching, order, index) in FIRST_PAGES.items():
        read = 0
        used: set[str] = set()
        for part, plan in _first_page(postgresql, matching, order):
            for node in nodes(plan):
                kind = node["Node Type"]
                assert kind not in ("Seq Scan", "Sort", "Bitmap Heap Scan"), (name, part, kind)
                if "Index" in kind:
                    used.add(node["Index Name"])
                if "Scan" in kind:
                    read += node["Actual Rows"] * node["Actual Loops"]
                    read += node.get("Rows Removed by Filter", 0)
        assert used, f"{name}: no index"
        if index is not None:
            assert index in used, f"{name}: {used}"
        # The bound's run, then the page's within it (or a page and one more row).
        assert read <= 2 * SCAN_ROWS + Store.PAGE_CHUNK, f"{name} read {read} rows"


# The first pages whose statement has no value but its limit, which Store.list_page_text
# runs from a generic plan prepared on its connection: those whose filter the order's index
# serves whole. (A filter it does not serve is a bounded scan, whose bound is a value; it
# is prepared only where there is no bound, fewer than SCAN_ROWS rows in the index.)
PREPARED_FIRST_PAGES = {
    name: case
    for name, case in FIRST_PAGES.items()
    if not queries.listing(case[0], case[1]).params
    and queries.listing(case[0], case[1]).rest == "true"
}


@pytest.mark.parametrize("statistics", ["never taken", "of 50 tasks"])
async def test_first_pages_prepared_on_a_small_table_read_an_index_on_a_million(
    settings: Settings, sql: Sql, statistics: str
) -> None:
    """Each first page run from a prepared plan (no filter but states, in each order) is
    first listed on a table of 50 tasks, as a fresh API's first page is: its generic plan
    made then, on a table never analyzed, or analyzed at 50 tasks (as autovacuum analyzes a
    small table early; stale once the burst comes). A million tasks later (never analyzed),
    each plan on that connection reads an index in the order asked for and at most a page: no
    scan of the table, no sort. (Without the pinned settings, the page of cancelled tasks was
    planned as a sort of every cancelled task on the analyzed table.)"""
    assert len(PREPARED_FIRST_PAGES) == 9, PREPARED_FIRST_PAGES.keys()
    database = Database(dataclasses.replace(settings, db_pool_size=1))
    store = Store(database)
    try:
        sql("INSERT INTO tasks (kind, execute_at) SELECT 'baz', now() FROM generate_series(1, 50)")
        if statistics == "of 50 tasks":
            # Standing for autovacuum's early analyze (prepare_statistics says why).
            sql("ANALYZE tasks")
        for matching, order, _ in PREPARED_FIRST_PAGES.values():
            await domain.list_tasks(store, matching, limit=100, cursor=None, order=order)
        sql("DELETE FROM tasks")
        load_a_million(sql)
        for matching, order, _ in PREPARED_FIRST_PAGES.values():
            await domain.list_tasks(store, matching, limit=100, cursor=None, order=order)
        async with database.connection() as conn:
            prepared = await (
                await conn.execute(
                    "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements"
                    " WHERE name LIKE 'taskrunner_page_%' ORDER BY name"
                )
            ).fetchall()
            assert len(prepared) == len(PREPARED_FIRST_PAGES)
            assert [p for p in prepared if tuple(p[1:]) != (2, 0)] == []
            used: set[str] = set()
            async with conn.transaction(force_rollback=True):
                await conn.execute(queries.PINNED_GENERIC_PLAN)
                for name, *_ in prepared:
                    [(result,)] = await (
                        await conn.execute(
                            pgsql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {}(101, 100)").format(
                                pgsql.Identifier(name)
                            )
                        )
                    ).fetchall()
                    read = 0
                    for node in nodes(result[0]["Plan"]):
                        kind = node["Node Type"]
                        assert kind not in ("Seq Scan", "Sort", "Bitmap Heap Scan"), (name, kind)
                        if "Index" in kind:
                            used.add(node["Index Name"])
                        if node.get("Relation Name") == "tasks":
                            read += node["Actual Rows"] * node["Actual Loops"]
                            read += node.get("Rows Removed by Filter", 0)
                    assert read <= 2 * Store.PAGE_CHUNK, f"{name} read {read} rows"
        wanted = {index for _, _, index in PREPARED_FIRST_PAGES.values() if index is not None}
        assert wanted <= used, used
    finally:
        await database.dispose()


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
def test_errors_read_only_their_window_through_the_index_of_failures(
    postgresql: psycopg.Connection[Any], sql: Sql, generic: bool
) -> None:
    """GET /errors over 100,000 failed attempts of two days ago (never analyzed, as a day
    of failures leaves them) and 10 of the last hour: it reads the 10 through
    `attempts_failures`, and nothing of the rest, whatever the window's default."""
    sql("INSERT INTO tasks (kind, execute_at) SELECT 'bar', now() FROM generate_series(1, 1000)")
    sql(
        "INSERT INTO attempts (task_id, attempt, kind, finished_at, outcome, error, error_group)"
        " SELECT 1 + mod(n, 1000), 1 + n / 1000, 'bar',"
        "   now() - interval '2 days' - make_interval(secs => n), 'failed', 'E', 'E'"
        " FROM generate_series(0, 99999) AS n"
    )
    sql(
        "INSERT INTO attempts (task_id, attempt, kind, finished_at, outcome, error, error_group)"
        " SELECT n, 1000, 'bar', now() - make_interval(secs => n), 'retried', 'E', 'E'"
        " FROM generate_series(1, 10) AS n"
    )
    postgresql.autocommit = False
    for params in (
        {"since": None, "until": None, "kind": None},
        {"since": datetime.now(UTC) - timedelta(hours=1), "until": None, "kind": "bar"},
    ):
        # As Store.list_errors runs it: in a transaction with the pinned plan settings.
        plan = explain(postgresql, queries.LIST_ERRORS, params, generic, queries.PINNED_PLAN)
        scans = [n for n in nodes(plan) if n.get("Relation Name") == "attempts"]
        assert [n.get("Index Name") for n in scans] == ["attempts_failures"], scans
        assert "finished_at" in scans[0].get("Index Cond", ""), scans
        assert scans[0]["Actual Rows"] == 10, "only the window's attempts are read"
        assert scans[0].get("Rows Removed by Filter", 0) == 0, "only the window's attempts are read"


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
def test_a_batch_that_keeps_its_attempts_reads_it_once_and_finds_rows_by_key(
    postgresql: psycopg.Connection[Any], sql: Sql, loaded: str, generic: bool
) -> None:
    """FINISH_MANY_RECORDING (a batch of retries): as FINISH_MANY, and each attempt kept."""
    running = [i for (i,) in sql("SELECT id FROM tasks WHERE claimed_by = 'w' ORDER BY id")]
    batch = running[-BATCH:]
    results = json.dumps(
        [{"id": i, "attempt": 1, "state": "scheduled", "output": None, "error": "E 1",
          "retry_in_s": 1.0, "timed_out": False, "traceback": "T", "error_group": "E <n>"}
         for i in batch]
    )  # fmt: skip
    postgresql.autocommit = False
    params = {"worker": "w", "results": results}
    plan = explain(postgresql, queries.FINISH_MANY_RECORDING, params, generic, queries.PINNED_PLAN)
    for node in nodes(plan):
        if node["Node Type"] == "Function Scan":
            assert node["Actual Loops"] == 1, "the batch is re-scanned per row"
        assert node.get("Index Name") not in ("tasks_running", "tasks_due"), node
        assert node["Node Type"] != "Seq Scan", f"({loaded}) scans the whole table"
    written = {n["Relation Name"]: n["Actual Rows"] for n in nodes(plan)
               if n["Node Type"] == "ModifyTable"}  # fmt: skip
    assert written == {"tasks": len(batch), "attempts": 0}  # (an INSERT returns no rows)


def test_a_claim_in_a_backlog_steps_over_none_of_the_tasks_claimed_before(
    postgresql: psycopg.Connection[Any],
) -> None:
    """A task claimed stays in `tasks_due` until vacuum removes it: a claim that read each
    priority's range from its start stepped over every one claimed since (during a burst of
    2,000,000, 2,843 index pages a claim of 1,000 between autovacuum passes). From the point
    its last claim's NEXT_DUE found (queries._LEVELS_FROM), a worker's claim reads its own
    batch's entries and nothing before them, as custom and as generic plan."""
    postgresql.autocommit = True
    burst = [{"kind": "baz", "at_us": 0}] * 10_000
    for _ in range(3):  # as POST /tasks/batch writes them (the API's own statement)
        postgresql.execute(queries.INSERT_TASKS, {"tasks": json.dumps(burst), "max_attempts": 3})
    postgresql.execute(
        "INSERT INTO workers (id, lease_expires_at) VALUES ('w', now() + interval '1 hour')"
    )
    params: dict[str, Any] = {
        "worker": "w", "kinds": ["baz"], "limit": BATCH, "lease_s": 60.0, "now": None,
        "short_kinds": [], "fit_s": None, "caps": "{}", "from_due": None, "from_id": None,
        "ahead_s": AHEAD_S,
    }  # fmt: skip
    postgresql.autocommit = False
    claimed = 0
    while claimed < 20_000:  # claims of a burst, each from where the last left, committed
        with postgresql.transaction(), postgresql.cursor() as cur:
            cur.execute(queries.PINNED_PLAN.encode())
            claimed += len(cur.execute(queries.CLAIM_DUE.encode(), params).fetchall())
            [(_, _, levels, dues, ids)] = cur.execute(queries.NEXT_DUE.encode(), params).fetchall()
        assert levels == list(range(10))
        params.update(from_due=dues, from_id=ids)
    assert ids[0] == 20_001 and ids[1:] == [None] * 9
    for generic in (False, True):
        for name, statement in (("CLAIM_DUE", queries.CLAIM_DUE), ("NEXT_DUE", queries.NEXT_DUE)):
            plan = explain(
                postgresql, statement, params, generic, queries.PINNED_PLAN, buffers=True
            )
            which = f"{name} ({'generic' if generic else 'custom'} plan)"
            [scan] = [n for n in nodes(plan) if n.get("Index Name") == "tasks_due"]
            if name == "CLAIM_DUE":  # (NEXT_DUE's ten loops show a row per loop, rounded)
                rows = scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)
                assert (rows, scan["Actual Loops"]) == (BATCH, 1), f"{which} read {rows} rows"
            # 20,000 entries claimed before the point are 60 pages or more; a batch's, a few.
            blocks = scan["Shared Hit Blocks"] + scan["Shared Read Blocks"]
            assert blocks <= 30, f"{which} read {blocks} blocks of tasks_due"
