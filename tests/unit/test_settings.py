"""Settings come from `TASKRUNNER_*` variables, checked with messages that name them."""

import dataclasses
import logging
import os

import pytest

from functions import settings as settings_module
from functions.settings import Settings, SettingsError, describe, warn_unknown_variables


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("TASKRUNNER_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(settings_module, "_warned", False)


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
    assert "got 'many'" in said and "s3cret" not in said


def test_settings_are_frozen_and_a_changed_copy_is_checked() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().db_pool_size = 2  # type: ignore[misc]
    assert dataclasses.replace(Settings(), db_pool_size=2).db_pool_size == 2
    with pytest.raises(
        SettingsError, match="TASKRUNNER_DB_POOL_SIZE: must be a whole number of at least 0, got -1"
    ):
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
    from functions.completer import retry_delay_s

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


# --- each kind of value ----------------------------------------------------------------------


def _message(name: str, raw: str) -> str:
    os.environ[f"TASKRUNNER_{name.upper()}"] = raw
    try:
        with pytest.raises(SettingsError) as caught:
            Settings()
    finally:
        del os.environ[f"TASKRUNNER_{name.upper()}"]
    return describe(caught.value)


@pytest.mark.parametrize(
    ("name", "raw", "value"),
    [
        ("max_attempts", "1", 1),
        ("max_attempts", "1000000", 1_000_000),
        ("max_attempts", " +7\t", 7),
        ("db_pool_size", "0", 0),
        ("db_pool_size", "-0", 0),
        ("db_pool_size", "9" * 100, int("9" * 100)),  # no upper bound
        ("lease_seconds", "3", 3.0),
        ("lease_seconds", "86400", 86400.0),
        ("lease_seconds", "\n7.5 ", 7.5),
        ("lease_seconds", "1e3", 1000.0),
        ("lease_seconds", ".5e1", 5.0),
        ("db_statement_timeout_s", "0.001", 0.001),
        ("db_statement_timeout_s", "600", 600.0),
        ("foo_delay_s", "0", 0.0),
        ("transaction_pooler", "TRUE", True),
        ("transaction_pooler", " yes ", True),
        ("transaction_pooler", "1", True),
        ("transaction_pooler", "On", True),
        ("transaction_pooler", "false", False),
        ("transaction_pooler", "0", False),
        ("transaction_pooler", "no", False),
        ("tick_mode", "poll", "poll"),
        ("tick_mode", " drain\n", "drain"),
        ("log_format", "json", "json"),
        ("bar_url", "http://127.0.0.1:8080/x?y=1", "http://127.0.0.1:8080/x?y=1"),
        ("bar_url", "https://example.com", "https://example.com"),
    ],
)
def test_good_values_are_read(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, value: object
) -> None:
    monkeypatch.setenv(f"TASKRUNNER_{name.upper()}", raw)
    read = getattr(Settings(), name)
    assert (read, type(read)) == (value, type(value))


@pytest.mark.parametrize(
    ("name", "raw", "said"),
    [
        ("lease_seconds", "abc", "must be a number of seconds from 3 to 86400, got 'abc'"),
        ("lease_seconds", "2.999", "must be a number of seconds from 3 to 86400, got '2.999'"),
        ("lease_seconds", "86400.01", "from 3 to 86400, got '86400.01'"),
        ("lease_seconds", "inf", "from 3 to 86400, got 'inf'"),
        ("lease_seconds", "-Infinity", "got '-Infinity'"),
        ("lease_seconds", "nan", "got 'nan'"),
        ("lease_seconds", "1e309", "got '1e309'"),
        ("lease_seconds", "1_000", "got '1_000'"),
        ("lease_seconds", "7,5", "got '7,5'"),
        ("lease_seconds", "\xa07", "got '\\xa07'"),  # not ASCII white space: kept, refused
        ("lease_seconds", "\u0663", "got"),  # a digit, but not an ASCII one
        ("lease_seconds", "", "got ''"),
        ("db_statement_timeout_s", "0", "must be a number of seconds above 0 and at most 600"),
        ("db_statement_timeout_s", "600.5", "above 0 and at most 600, got '600.5'"),
        ("max_attempts", "0", "must be a whole number from 1 to 1000000, got '0'"),
        ("max_attempts", "1000001", "must be a whole number from 1 to 1000000, got '1000001'"),
        ("max_attempts", "10000000000", "from 1 to 1000000, got '10000000000'"),
        ("max_attempts", "3.0", "must be a whole number from 1 to 1000000, got '3.0'"),
        ("max_attempts", "1e3", "got '1e3'"),
        ("max_attempts", "0x10", "got '0x10'"),
        ("max_attempts", "9" * 5000, "from 1 to 1000000, got '9999"),
        ("db_pool_size", "-1", "must be a whole number of at least 0, got '-1'"),
        ("db_pool_size", "9" * 5000, "must be a whole number of at least 0, got '9999"),
        ("db_connect_timeout_s", "0", "must be a whole number of seconds from 1 to 3600"),
        ("transaction_pooler", "maybe", "must be true or false (also 1/0, yes/no, on/off)"),
        ("transaction_pooler", "2", "got '2'"),
        ("transaction_pooler", "", "got ''"),
        ("tick_mode", "Poll", "must be one of drain, poll, got 'Poll'"),
        ("log_format", "xml", "must be one of json, text, got 'xml'"),
        ("bar_url", "example.com", "must be an http:// or https:// URL with a host"),
        ("bar_url", "ftp://example.com/", "got 'ftp://example.com/'"),
        ("bar_url", "http:///path", "got 'http:///path'"),
        ("bar_url", "http://h:99999/", "got 'http://h:99999/'"),
        ("bar_url", "", "got ''"),
        ("bar_url", " http://h/", "got ' http://h/'"),
    ],
)
def test_bad_values_say_what_is_accepted_and_what_was_given(name: str, raw: str, said: str) -> None:
    message = _message(name, raw)
    assert message.startswith(f"TASKRUNNER_{name.upper()}: must be ")
    assert said in message
    assert len(message) < 200  # a long value is cut short


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_attempts", 5),
        ("lease_seconds", 5),
        ("lease_seconds", 5.5),
        ("transaction_pooler", True),
        ("tick_mode", "poll"),
        ("api_token", "s3cret"),
    ],
)
def test_values_from_code_are_taken_as_they_are(name: str, value: object) -> None:
    assert getattr(Settings(**{name: value}), name) == value


# --- variables that no setting reads -----------------------------------------------------------


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "functions.settings"]


def test_a_typo_is_warned_about_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TASKRUNNER_MAX_ATTEMPT", "5")
    monkeypatch.setenv("taskrunner_lease_secs", "5")
    monkeypatch.setenv("TASKRUNNER_MAX_ATTEMPTS", "4")
    with caplog.at_level(logging.WARNING):
        warn_unknown_variables()
    assert _warnings(caplog) == [
        "TASKRUNNER_MAX_ATTEMPT is set but no setting reads it: did you mean"
        " TASKRUNNER_MAX_ATTEMPTS?",
        "taskrunner_lease_secs is set but no setting reads it: did you mean"
        " TASKRUNNER_LEASE_SECONDS?",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_a_name_close_to_none_is_warned_about_without_a_guess(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TASKRUNNER_NO_SUCH_SETTING", "1")
    monkeypatch.setenv("TASKRUNNER_", "1")
    with caplog.at_level(logging.WARNING):
        warn_unknown_variables()
    assert _warnings(caplog) == [
        "TASKRUNNER_ is set but no setting reads it: see the README's Configuration section",
        "TASKRUNNER_NO_SUCH_SETTING is set but no setting reads it: see the README's"
        " Configuration section",
    ]


def test_the_suites_own_variables_and_the_settings_are_not_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("TEST_SERVERS", "TEST_DATABASE_URL", "TEST_ANYTHING", "SCREENSHOT"):
        monkeypatch.setenv(f"TASKRUNNER_{name}", "1")
    monkeypatch.setenv("_TASKRUNNER_API_LOG_LEVEL", "info")  # the API's, with no prefix
    for field in dataclasses.fields(Settings):
        monkeypatch.setenv(f"TASKRUNNER_{field.name.upper()}", "x")
    with caplog.at_level(logging.WARNING):
        warn_unknown_variables()
    assert _warnings(caplog) == []


def test_the_warning_is_given_once_a_process_not_on_each_read(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TASKRUNNER_MAX_ATTEMPT", "5")
    with caplog.at_level(logging.WARNING):
        Settings()
        assert _warnings(caplog) == []
        warn_unknown_variables()
        warn_unknown_variables()
        Settings()
    assert len(_warnings(caplog)) == 1


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


def test_a_lambda_handler_warns_on_its_first_read_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from functions.logs import handler_settings

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setenv("TASKRUNNER_MAX_ATTEMPT", "5")
    handler_settings("tick")
    handler_settings("tick")  # a warm invocation
    assert _warnings(caplog) == [
        "TASKRUNNER_MAX_ATTEMPT is set but no setting reads it: did you mean"
        " TASKRUNNER_MAX_ATTEMPTS?"
    ]


def test_the_payload_limit_has_bounds_and_must_fit_in_a_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().max_payload_bytes == 65_536
    assert Settings(max_payload_bytes=16).max_payload_bytes == 16
    # At most what one answer holds as Lambda carries it (model.MAX_PAYLOAD_BYTES).
    assert Settings(max_payload_bytes=1_572_864).max_payload_bytes == 1_572_864
    for bad in ("15", "1572865", "4194304", "1e3"):
        monkeypatch.setenv("TASKRUNNER_MAX_PAYLOAD_BYTES", bad)
        with pytest.raises(SettingsError) as caught:
            Settings()
        assert "TASKRUNNER_MAX_PAYLOAD_BYTES" in describe(caught.value)
    monkeypatch.setenv("TASKRUNNER_MAX_PAYLOAD_BYTES", "100000")
    monkeypatch.setenv("TASKRUNNER_MAX_BODY_BYTES", "100000")
    with pytest.raises(SettingsError) as caught:
        Settings()
    said = describe(caught.value)
    assert "TASKRUNNER_MAX_PAYLOAD_BYTES" in said and "TASKRUNNER_MAX_BODY_BYTES (100,000)" in said
    monkeypatch.setenv("TASKRUNNER_MAX_BODY_BYTES", "100001")
    assert Settings().max_payload_bytes == 100_000
    # Left at its default, a small body limit is the body's alone (413 comes first).
    monkeypatch.delenv("TASKRUNNER_MAX_PAYLOAD_BYTES")
    monkeypatch.setenv("TASKRUNNER_MAX_BODY_BYTES", "1024")
    assert Settings().max_body_bytes == 1024
    assert dataclasses.replace(Settings(), max_body_bytes=2048).max_body_bytes == 2048
