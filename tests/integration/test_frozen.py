"""A process frozen inside a transaction (SIGSTOP, a paused VM): what the server does with it.

A blocking `time.sleep` in the event loop is, to the server, the same as a stopped process:
nothing more arrives on the connection. The server's idle-in-transaction timeout is the
store's statement bound (1 s here)."""

from __future__ import annotations

import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from functions.db import Database
from functions.errors import DatabaseUnavailable
from functions.kinds import KINDS
from functions.model import TaskState
from functions.settings import Settings
from functions.store import Result, Store, _pipelined
from tests.pgbouncer import pgbouncer_url

__all__ = ["pgbouncer_url"]  # the fixture

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
async def one_connection(database_url: str) -> AsyncIterator[Store]:
    """A store on a pool of one connection, whose statements the server bounds at 1 s."""
    database = Database(
        Settings(database_url=database_url, db_statement_timeout_s=1.0, db_pool_size=1)
    )
    yield Store(database)
    await database.dispose()


def lock_free_after(
    database_url: str, wait_s: float, worker: str
) -> tuple[dict[str, bool], threading.Thread]:
    """Start a thread that, `wait_s` from now, tries the worker's row without waiting."""
    seen: dict[str, bool] = {}

    def check() -> None:
        time.sleep(wait_s)
        with psycopg.connect(database_url, autocommit=True) as conn:
            try:
                conn.execute("SELECT FROM workers WHERE id = %s FOR UPDATE NOWAIT", [worker])
                seen["free"] = True
            except psycopg.errors.LockNotAvailable:
                seen["free"] = False

    thread = threading.Thread(target=check)
    thread.start()
    return seen, thread


async def frozen_holding_its_workers_row(store: Store, database_url: str) -> dict[str, bool]:
    """Freeze 4 s in a store's transaction (`_pipelined`, as the store bounds it) once it
    has locked its worker's row and its answers are in, before COMMIT: the session must be
    ended (the connection broken). Return whether the row was free 2.5 s in."""
    await store.register_worker(worker="w", lease_s=60)
    async with store.database.connection() as conn:
        seen, thread = lock_free_after(database_url, 2.5, "w")
        with pytest.raises(psycopg.OperationalError):
            async with _pipelined(conn, store._bounds()) as pipeline:
                await conn.execute(
                    "UPDATE workers SET lease_expires_at = now() WHERE id = %s", ["w"]
                )
                await pipeline.sync()
                time.sleep(4.0)  # frozen, the worker's row locked
        thread.join()
        assert conn.broken or conn.closed
    return seen


async def test_a_transaction_frozen_after_its_answers_is_ended_by_the_server(
    one_connection: Store, database_url: str
) -> None:
    """Frozen once its statements have answered and before COMMIT, holding its worker's
    row: within the server's idle-in-transaction timeout the session is ended, the row is
    free (a rescue can take the worker's tasks), and nothing is committed."""
    assert await frozen_holding_its_workers_row(one_connection, database_url) == {"free": True}


async def test_a_transaction_frozen_behind_a_pooler_is_ended_by_the_server_too(
    pgbouncer_url: str, database_url: str
) -> None:
    """The same through pgbouncer in transaction mode, which refuses the startup options
    that set the timeout on a direct session: the store sets it for each transaction
    (queries.BOUND_TRANSACTION). Without it the row stayed locked as long as the process
    was frozen."""
    settings = Settings(
        database_url=pgbouncer_url,
        transaction_pooler=True,
        db_statement_timeout_s=1.0,
        db_pool_size=1,
    )
    database = Database(settings)
    try:
        seen = await frozen_holding_its_workers_row(Store(database), database_url)
        assert seen == {"free": True}
    finally:
        await database.dispose()


async def test_a_statement_behind_a_pooler_is_ended_by_the_server_at_its_bound(
    pgbouncer_url: str, database_url: str, task_factory: Callable[..., int]
) -> None:
    """One statement of the store's, through pgbouncer, waiting on a row another session
    holds: the server ends it at the bound (1 s here) and it writes nothing, as on a direct
    session. Without, the store gave up on it a second later (a 503 to the API's client),
    and the server carried it out once the row was free."""
    task_id = task_factory("baz", due_in_s=3600.0)
    settings = Settings(
        database_url=pgbouncer_url, transaction_pooler=True, db_statement_timeout_s=1.0
    )
    database = Database(settings)
    try:
        with psycopg.connect(database_url) as holder:
            holder.execute("SELECT FROM tasks WHERE id = %s FOR UPDATE", [task_id])
            with pytest.raises(DatabaseUnavailable):
                await Store(database)._all(
                    "UPDATE tasks SET priority = 9 WHERE id = %(id)s", id=task_id
                )
            time.sleep(1.0)  # what the server would still carry out
        with psycopg.connect(database_url) as conn:
            assert conn.execute(
                "SELECT priority FROM tasks WHERE id = %s", [task_id]
            ).fetchone() == (0,)
            # (the session goes on: the next statement through the same pool works)
        assert await Store(database)._all("SELECT 1 AS one") == [(1,)]
    finally:
        await database.dispose()


async def test_a_claim_leaves_no_message_after_its_sync_before_commit(
    one_connection: Store, task_factory: Callable[..., int]
) -> None:
    """The server arms its idle-in-transaction timeout at a Sync and disarms it at the next
    message: a Flush there (psycopg's `transaction()` in a pipeline sends one before
    COMMIT) left a frozen claim's locks held for as long as it was frozen. The claim's
    transaction, as libpq traces it: its last message before COMMIT is a Sync."""
    store = one_connection
    await store.register_worker(worker="w", lease_s=60)
    for _ in range(3):
        task_factory("baz")
    with tempfile.TemporaryFile("w+") as trace:
        async with store.database.connection() as conn:
            conn.pgconn.trace(trace.fileno())
            conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        claimed, _ = await store.claim_due(worker="w", kinds=list(KINDS), limit=10, lease_s=60)
        async with store.database.connection() as conn:
            conn.pgconn.untrace()
        trace.seek(0)
        sent = [line.split("\t") for line in trace.read().splitlines()]
    assert len(claimed) == 3
    frontend = [fields[2].strip() + " " + fields[3] if len(fields) > 3 else fields[2].strip()
                for fields in sent if fields[0] == "F"]  # fmt: skip
    begin = next(i for i, m in enumerate(frontend) if re.match(r'Parse\s+"" "BEGIN"', m))
    commit = next(i for i, m in enumerate(frontend) if re.match(r'Parse\s+"" "COMMIT"', m))
    assert begin < commit
    inside = [m.split()[0] for m in frontend[begin:commit]]
    assert inside[-1] == "Sync", inside
    assert "Flush" not in inside, inside


async def test_a_finish_whose_lines_are_out_keeps_its_rows_while_frozen(
    one_connection: Store, database_url: str, task_factory: Callable[..., int], sql: Sql
) -> None:
    """Frozen after its lines are out and before COMMIT (past the server's timeout), a
    finish is not ended: rolled back, its tasks would be rescued and run again, their lines
    printed twice. Once it goes on, it commits."""
    store = one_connection
    await store.register_worker(worker="w", lease_s=60)
    task_factory("baz")
    [claimed], _ = await store.claim_due(worker="w", kinds=list(KINDS), limit=10, lease_s=60)

    async def print_lines(written: set[int]) -> bool:
        time.sleep(2.5)  # frozen, the lines out
        return True

    result = Result(claimed.id, claimed.attempt, TaskState.SUCCEEDED, output="Baz 7")
    written = await store.finish_many_after(worker="w", results=[result], before_commit=print_lines)
    assert written == {claimed.id}
    assert sql("SELECT state, output FROM tasks") == [("succeeded", "Baz 7")]
    assert await store.held_by(worker="w") == set()
