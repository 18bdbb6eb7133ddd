"""Both Lambda handlers through pgbouncer (transaction mode) with TASKRUNNER_TRANSACTION_POOLER
unset: the pooler's refusal of startup options is recognised, once, and every request and
tick goes on as in pooler mode (tests/acceptance/test_pooler_unset.py does the commands)."""

import asyncio
import logging
import struct
from collections.abc import Iterator

import psycopg
import pytest

from functions import conninfo
from functions import store as store_module
from functions import tasks as domain
from functions.db import Database
from functions.model import TaskFilter
from functions.settings import Settings
from functions.store import Store
from tests.integration.test_lambda import cold_start, lambda_env, round_trip
from tests.pgbouncer import pgbouncer_ignoring_options_url, pgbouncer_url

__all__ = [  # the fixtures
    "cold_start",
    "lambda_env",
    "pgbouncer_ignoring_options_url",
    "pgbouncer_url",
]


@pytest.fixture
def fresh_process() -> Iterator[None]:
    """As in a new container: no pooler found yet."""
    conninfo.forget_found()
    yield
    conninfo.forget_found()


def test_handlers_through_pgbouncer_without_the_setting(
    lambda_env: None,
    fresh_process: None,
    pgbouncer_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TASKRUNNER_DATABASE_URL", pgbouncer_url)
    caplog.set_level(logging.WARNING, logger="functions.db")
    # Enough rounds for psycopg to prepare statements if it were allowed to (it does after 5).
    for version in ("v2", "v1", "v2", "v1"):
        round_trip(version, capsys)
    warnings = [r.getMessage() for r in caplog.records if r.name == "functions.db"]
    assert len(warnings) == 1, warnings
    assert "TASKRUNNER_TRANSACTION_POOLER=true" in warnings[0]


def test_handlers_through_pgbouncer_that_ignores_options(
    lambda_env: None,
    fresh_process: None,
    pgbouncer_ignoring_options_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pgbouncer with `ignore_startup_parameters = options` takes them and drops them: no
    refusal to recognise, and prepared statements that another server connection does not
    have (`GET /tasks/{id}` a 500 from its 6th run on). Reading the options back finds it."""
    monkeypatch.setenv("TASKRUNNER_DATABASE_URL", pgbouncer_ignoring_options_url)
    caplog.set_level(logging.WARNING, logger="functions.db")
    for version in ("v2", "v1", "v2", "v1", "v2", "v1", "v2", "v1"):
        round_trip(version, capsys)
    warnings = [r.getMessage() for r in caplog.records if r.name == "functions.db"]
    assert len(warnings) == 1, warnings
    assert "ignored startup options" in warnings[0]
    assert "TASKRUNNER_TRANSACTION_POOLER=true" in warnings[0]


async def test_a_server_that_applies_options_is_not_taken_for_a_pooler(
    fresh_process: None, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Read back once: the first connection checks, later ones do not; nothing is said."""
    settings = Settings(database_url=database_url)
    caplog.set_level(logging.WARNING, logger="functions.db")
    for _ in range(2):
        conn = await conninfo.connect(settings)
        await conn.close()
    assert not conninfo.behind_pooler(settings)
    assert conninfo.found.options_applied
    assert [r for r in caplog.records if r.name == "functions.db"] == []


# RDS Proxy's words (its apostrophe is typographic), which no test can get from RDS Proxy itself.
RDS_PROXY = "Feature not supported: RDS Proxy currently doesn\u2019t support command-line options."


async def test_rds_proxy_refusal_is_recognised_too(
    fresh_process: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A server on 127.0.0.1 that answers a startup packet with `options` as RDS Proxy does,
    and any other with an error of its own: the second attempt comes without options."""
    packets: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: not here
                writer.write(b"N")
                continue
            packets.append(await reader.readexactly(length - 8))
            message = RDS_PROXY if b"options\0" in packets[-1] else "the test server ends here"
            fields = b"SFATAL\0VFATAL\0C0A000\0M" + message.encode() + b"\0\0"
            writer.write(b"E" + struct.pack("!i", len(fields) + 4) + fields)
            await writer.drain()
            writer.close()
            return

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = Settings(database_url=f"postgresql://taskrunner@127.0.0.1:{port}/taskrunner")
    caplog.set_level(logging.WARNING, logger="functions.db")
    try:
        with pytest.raises(psycopg.OperationalError, match="the test server ends here"):
            await conninfo.connect(settings)
    finally:
        server.close()
    assert [b"options\0" in p for p in packets] == [True, False]
    assert conninfo.behind_pooler(settings)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "functions.db"]
    assert "TASKRUNNER_TRANSACTION_POOLER=true" in warning


async def test_a_first_page_through_pgbouncer_is_never_prepared(
    fresh_process: None, pgbouncer_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process's first request is what finds the pooler, on connecting: its first page is
    sent as text as every later one is, never PREPAREd on a server connection that the next
    transaction may not get (Store._prepared_rows)."""
    prepared = type(store_module._PREPARED_PAGES)()
    monkeypatch.setattr(store_module, "_PREPARED_PAGES", prepared)
    database = Database(Settings(database_url=pgbouncer_url))
    try:
        for _ in range(3):
            page = await domain.list_tasks(Store(database), TaskFilter(), limit=10, cursor=None)
            assert page.next_cursor is None
        assert conninfo.found.pooler
        assert not any(prepared.values()), "a page prepared behind the pooler"
    finally:
        await database.dispose()
