"""Both Lambda handlers through pgbouncer (transaction mode) with TASKRUNNER_TRANSACTION_POOLER
unset: the pooler's refusal of startup options is recognised, once, and every request and
tick goes on as in pooler mode (tests/acceptance/test_pooler_unset.py does the commands)."""

import logging
from collections.abc import Iterator

import pytest

from functions import db
from tests.integration.test_lambda import cold_start, lambda_env, round_trip
from tests.pgbouncer import pgbouncer_url

__all__ = ["cold_start", "lambda_env", "pgbouncer_url"]  # the fixtures


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As in a new container: no pooler found yet."""
    monkeypatch.setattr(db, "_pooler_found", False)
    yield


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
