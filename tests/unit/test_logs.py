"""Log records as JSON lines, and a logging setup that can be repeated."""

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from functions.logs import JsonFormatter, setup_logging
from functions.settings import Settings


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord("functions.runner", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_key_value_words_become_fields() -> None:
    line = JsonFormatter().format(record("action=%s worker=w1 task_id=%d: lease lost", "run", 7))
    out = json.loads(line)
    assert out["action"] == "run" and out["worker"] == "w1" and out["task_id"] == 7
    assert out["message"] == "lease lost"
    assert (out["level"], out["logger"]) == ("WARNING", "functions.runner")
    assert list(out)[:3] == ["time", "level", "logger"]


def test_a_dict_argument_becomes_fields_and_is_not_repeated_in_the_message() -> None:
    """The tick's summary: each item a field, no Python repr (`'last_error': None`) in the
    message, which says what the line is."""
    summary = {"claimed": 3, "level": 9, "last_error": None}
    out = json.loads(JsonFormatter().format(record("action=tick %s", summary)))
    assert out["action"] == "tick" and out["claimed"] == 3 and out["last_error"] is None
    assert out["level"] == "WARNING", "a field never replaces the record's own"
    assert out["message"] == "tick"
    assert "None" not in json.dumps(out) and "{" not in out["message"]
    out = json.loads(JsonFormatter().format(record("action=x: took %s of %s", "2 s", {"a": 1})))
    assert (out["message"], out["a"]) == ("took 2 s of", 1)
    named = record("%(what)s done", {"what": "prune"})
    assert json.loads(JsonFormatter().format(named))["message"] == "prune done"


def test_plain_messages_and_tracebacks_stay_on_one_line() -> None:
    line = JsonFormatter().format(record("the database is down: %s", "refused", exc=True))
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "the database is down: refused"
    assert "RuntimeError: boom" in out["exception"]


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_is_idempotent_and_replaces_the_lambda_runtime_handler(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "taskrunner-Tick")
    runtime = logging.StreamHandler(sys.stdout)
    root_logger.handlers[:] = [runtime]
    for _ in range(3):
        setup_logging(Settings())
    [handler] = root_logger.handlers
    assert handler is not runtime and isinstance(handler.formatter, JsonFormatter)
    assert root_logger.level == logging.INFO

    setup_logging(Settings(log_format="text"))
    assert root_logger.handlers == [handler]
    assert not isinstance(handler.formatter, JsonFormatter)


def test_off_lambda_other_handlers_are_kept_and_text_is_the_default(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    other = logging.NullHandler()
    root_logger.handlers[:] = [other]
    setup_logging(None)
    setup_logging(None)
    assert len(root_logger.handlers) == 2 and other in root_logger.handlers
    [ours] = [h for h in root_logger.handlers if h is not other]
    assert not isinstance(ours.formatter, JsonFormatter)


def test_the_worker_and_the_api_log_under_the_names_the_docs_give() -> None:
    """Each part of the worker logs as `functions.runner`, connections as `functions.db`, both
    paths of the API as `functions.app` (infra/README.md's Logs): filters rely on them."""
    from functions import completer, conninfo, run_state, runner, upkeep
    from functions.http import fastpath, responses

    assert {m.logger.name for m in (runner, completer, upkeep, run_state)} == {"functions.runner"}
    assert conninfo.logger.name == "functions.db"
    assert {fastpath.logger.name, responses.logger.name} == {"functions.app"}
