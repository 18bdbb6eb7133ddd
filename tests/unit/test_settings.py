"""Settings come from `TASKRUNNER_*` variables, read as pydantic-settings read them."""

import os

import pytest
from pydantic import ValidationError

from functions.settings import Settings, describe


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("TASKRUNNER_"):
            monkeypatch.delenv(key)


def test_defaults_without_any_variable() -> None:
    settings = Settings()
    assert (settings.database_url, settings.db_pool_size, settings.tick_mode) == (None, 10, "drain")


def test_variables_are_read_from_their_string_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUNNER_DB_POOL_SIZE", "3")
    monkeypatch.setenv("TASKRUNNER_TRANSACTION_POOLER", "yes")
    monkeypatch.setenv("TASKRUNNER_LEASE_SECONDS", "7.5")
    monkeypatch.setenv("TASKRUNNER_TICK_MODE", "poll")
    monkeypatch.setenv("TASKRUNNER_BASE_PATH", "prod/")
    settings = Settings()
    assert (settings.db_pool_size, settings.transaction_pooler, settings.lease_seconds) == (
        3,
        True,
        7.5,
    )
    assert (settings.tick_mode, settings.base_path) == ("poll", "/prod")


def test_names_in_any_case_and_unknown_ones_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("taskrunner_max_attempts", "5")
    monkeypatch.setenv("TASKRUNNER_NO_SUCH_SETTING", "1")
    monkeypatch.setenv("TASKRUNNER_", "1")
    assert Settings().max_attempts == 5


def test_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUNNER_DB_POOL_SIZE", "3")
    monkeypatch.setenv("TASKRUNNER_MAX_ATTEMPTS", "4")
    settings = Settings(db_pool_size=1)
    assert (settings.db_pool_size, settings.max_attempts) == (1, 4)


def test_a_bad_value_is_named_by_its_variable_and_not_repeated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKRUNNER_DB_POOL_SIZE", "many")
    monkeypatch.setenv("TASKRUNNER_DATABASE_URL", "mysql://user:s3cret@host/db")
    with pytest.raises(ValidationError) as caught:
        Settings()
    said = describe(caught.value)
    assert "TASKRUNNER_DB_POOL_SIZE" in said and "TASKRUNNER_DATABASE_URL" in said
    assert "many" not in said and "s3cret" not in said


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError):
        Settings().db_pool_size = 2
