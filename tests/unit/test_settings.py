"""Settings come from `TASKRUNNER_*` variables, read as pydantic-settings read them."""

import dataclasses
import os
import re
import typing
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import Field as PydanticField
from pydantic import ValidationError, create_model

from functions.settings import _WHITE_SPACE, Settings, SettingsError, describe


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
    with pytest.raises(SettingsError) as caught:
        Settings()
    said = describe(caught.value)
    assert "TASKRUNNER_DB_POOL_SIZE" in said and "TASKRUNNER_DATABASE_URL" in said
    assert "many" not in said and "s3cret" not in said


def test_settings_are_frozen_and_a_changed_copy_is_checked() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().db_pool_size = 2  # type: ignore[misc]
    assert dataclasses.replace(Settings(), db_pool_size=2).db_pool_size == 2
    with pytest.raises(SettingsError, match="TASKRUNNER_DB_POOL_SIZE: Input should be greater"):
        dataclasses.replace(Settings(), db_pool_size=-1)


def test_an_unknown_argument_is_a_mistake_in_the_code() -> None:
    with pytest.raises(TypeError, match="no such setting: db_pool"):
        Settings(db_pool=3)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LEASE_SECONDS", "inf"),
        ("LEASE_SECONDS", "nan"),
        ("LEASE_SECONDS", "99999999999999999999"),
        ("RETRY_BASE_S", "inf"),
        ("RETRY_MAX_S", "1e40"),
        ("RETENTION_S", "-1"),
        ("RETENTION_S", "1e12"),
        ("FOO_DELAY_S", "Infinity"),
        ("MAX_ATTEMPTS", "10000000000"),
    ],
)
def test_numbers_that_no_time_can_hold_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Accepted before, they failed at run time ("interval out of range", a retry due at
    "inf s" recorded as a failed run)."""
    monkeypatch.setenv(f"TASKRUNNER_{name}", value)
    with pytest.raises(SettingsError) as caught:
        Settings()
    assert describe(caught.value).startswith(f"TASKRUNNER_{name}: ")


def test_a_late_retry_of_a_long_budget_waits_the_cap() -> None:
    """2 ** 1024 as an int does not convert to a float: attempt 1,025 raised OverflowError."""
    from functions.runner import retry_delay_s

    settings = Settings(retry_base_s=1.0, retry_max_s=300.0, max_attempts=1_000_000)
    assert [retry_delay_s(settings, n) for n in (1, 2, 9, 1_025, 999_999)] == [
        1.0,
        2.0,
        256.0,
        300.0,
        300.0,
    ]


@pytest.mark.parametrize("path", ["/生产", "/pr\u00e9d", "/a\tb", "/a b", "/a?b", "/a%20b", "a//b"])
def test_a_base_path_must_be_plain_printable_ascii(path: str) -> None:
    """What a URL's path holds as it is: the API writes it into Location headers, which
    carry no other characters (a non-ASCII one failed every create with a 500)."""
    with pytest.raises(SettingsError, match="printable ASCII"):
        Settings(base_path=path)


@pytest.mark.parametrize("token", ["", " s3cret", "s3cret\n", "s3cret ", "\ts3cret", "s3\x00cret"])
def test_an_api_token_no_client_could_send_is_refused(token: str) -> None:
    """Empty, or with what a header drops around its value, or a control character: every
    request would get 401 and the API would be locked for good (it started silently)."""
    with pytest.raises(SettingsError) as raised:
        Settings(api_token=token)
    assert "TASKRUNNER_API_TOKEN" in describe(raised.value)


@pytest.mark.parametrize("token", ["s3cret", "s3cr\u00e9t", "a b", "x" * 500])
def test_an_api_token_a_client_can_send_is_kept(token: str) -> None:
    assert Settings(api_token=token).api_token == token


# --- read as pydantic read them --------------------------------------------------------------
# Settings were a pydantic model (lax mode, allow_inf_nan=False); they are read by a few lines
# of ours now, to spare the tick's cold start pydantic's import. The model they were, built
# from the same fields and bounds, reads each value alike: the same number, or the same message.


def _pydantic_reference() -> Any:
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        bounds = {
            k: v for k, v in field.metadata.items() if k in ("ge", "gt", "le") and v is not None
        }
        kind = typing.get_type_hints(Settings)[field.name]
        fields[field.name] = (kind, PydanticField(default=field.default, **bounds))
    return create_model("Reference", __config__={"allow_inf_nan": False}, **fields)


REFERENCE = _pydantic_reference()
CHECKED_BY_US = {
    "database_url",
    "base_path",
    "api_token",
}  # custom checks, tested on their own above
NAMES = [f.name for f in dataclasses.fields(Settings) if f.name not in CHECKED_BY_US]
INTEGERS = {name for name, kind in typing.get_type_hints(Settings).items() if kind is int}
# Leading zeros, then a sign or a run of underscores.
ZEROS_THEN_JUNK = re.compile(r"[+-]?0[0_]*(?:[+-]|__)")
NOT_AN_INTEGER = "Input should be a valid integer, unable to parse string as an integer"
TOKENS = [*"0123456789+-._eExXaAfFnNiItTyYoO ,", "\n", "\t", "\xa0", "\x1c", "\u2003", "\u0663"]
TEXT = st.lists(
    st.sampled_from([*TOKENS, "inf", "nan", "true", "off", "poll", "json", "_0", ".0"]), max_size=10
).map("".join)


def _outcome(make: Any) -> Any:
    try:
        return ("ok", make())
    except (ValidationError, SettingsError) as exc:
        if isinstance(exc, ValidationError):
            return ("error", [e["msg"] for e in exc.errors()])
        return ("error", [problem for _, problem in exc.problems])


@settings(max_examples=3000, deadline=None)
@given(name=st.sampled_from(NAMES), raw=TEXT)
@example(name="db_pool_size", raw="1" * 5000)
@example(name="db_pool_size", raw="3." + "0" * 5000)
@example(name="lease_seconds", raw="1e309")
@example(name="lease_seconds", raw="1e-400")
@example(name="retention_s", raw="1e12")
@example(name="max_attempts", raw="10000000000")
def test_each_value_is_read_as_pydantic_read_it(name: str, raw: str) -> None:
    ours = _outcome(lambda: getattr(Settings(**{name: raw}), name))
    theirs = _outcome(lambda: getattr(REFERENCE(**{name: raw}), name))
    if name in INTEGERS and ZEROS_THEN_JUNK.match(raw.strip(_WHITE_SPACE)):
        # pydantic-core read these oddly ("0-9" as -9, "+0-0" and "00___0" as 0): refused.
        assert ours == (
            "error",
            ["Input should be a valid integer, unable to parse string as an integer"],
        )
        return
    assert ours == theirs
    if ours[0] == "ok":
        assert type(ours[1]) is type(theirs[1])


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://h/%ff",  # no UTF-8 once decoded
        "postgresql://u@h/d\udcff",  # a byte of the environment that is no UTF-8
        "postgresql://h:\u00b2/d",  # digits that are not ASCII: int() refuses them
        "postgresql://h/d?port=\u00b9",
        "postgresql://h:\u0661\u0662/d",
        "postgresql://h/d?keepalives=\u00b2",
    ],
)
def test_a_url_that_libpq_cannot_use_is_a_bad_setting_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """These raised UnicodeError or ValueError out of Settings(): a traceback and exit 1 in
    the CLI, where a bad setting is named and exits 2."""
    monkeypatch.setenv("TASKRUNNER_DATABASE_URL", url)
    with pytest.raises(SettingsError, match=r"^TASKRUNNER_DATABASE_URL: "):
        Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [("retention_s", 10**400), ("max_attempts", float("inf")), ("transaction_pooler", [5]),
     ("transaction_pooler", 1 + 0j), ("max_attempts", "\udcff")],
)  # fmt: skip
def test_odd_values_from_code_are_bad_settings(name: str, value: object) -> None:
    with pytest.raises(SettingsError, match=rf"^TASKRUNNER_{name.upper()}: "):
        Settings(**{name: value})
