"""`Readiness`'s startup: the server listens once the first look at the database has ended,
ready or not, and waits for it only while it has not ended (a database that answers nothing)."""

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest

from functions.db import Database
from functions.settings import Settings
from functions.store import Store
from local import serve
from tests.procs import free_port


async def _startup(readiness: serve.Readiness) -> None:
    """Run the lifespan up to startup's completion, as uvicorn does before it listens."""
    sent: list[MutableMapping[str, Any]] = []
    started = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "lifespan.startup"}
        await asyncio.Event().wait()  # no shutdown in this test
        raise AssertionError

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        started.set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        await receive()

    readiness.app = app
    lifespan = asyncio.create_task(readiness({"type": "lifespan"}, receive, send))
    try:
        await asyncio.wait_for(started.wait(), timeout=30)
    finally:
        lifespan.cancel()
        if readiness._watch is not None:
            readiness._watch.cancel()
    assert sent == [{"type": "lifespan.startup.complete"}]


async def test_a_database_that_refuses_does_not_hold_the_server_from_listening(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing listens at the URL's port: the first check fails at once, and startup ends
    then, not after _FIRST_CHECK_S (made longer than the test waits: it waited it out)."""
    monkeypatch.setattr(serve, "_FIRST_CHECK_S", 600.0)
    url = f"postgresql://taskrunner@127.0.0.1:{free_port()}/taskrunner"
    store = Store(Database(Settings(database_url=url, db_pool_size=0)))
    readiness = serve.Readiness(None, store)  # type: ignore[arg-type]
    await _startup(readiness)
    assert readiness.checked.is_set() and not readiness.ready.is_set()
