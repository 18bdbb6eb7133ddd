"""Logging for the Lambda handlers and the CLI: one handler on the root logger, to stderr.

On Lambda each record is one JSON object on one line, so CloudWatch keeps a record (a traceback
too) as one event and Logs Insights can filter on its fields; elsewhere it is a line of text.
Our messages start with `key=value` fields (`action=tick worker=w1 task_id=7: lease lost`):
in JSON those become fields of their own, and so do the items of a dict logged as an argument
(the tick's summary), so `filter action = "tick" and failed > 0` works. A dict is not repeated
in the JSON message: its items are the fields.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

from functions.settings import Settings, SettingsError, describe, warn_unknown_variables

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# `key=value` words at the start of a message; the last one may end with the colon that
# introduces the text.
_FIELD = re.compile(r"([a-z_]+)=(\S*?)(:?)(?: |$)")
_RESERVED = frozenset({"time", "level", "logger", "message", "exception"})


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: time, level, logger, its fields, message, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        message = _message(record)
        while found := _FIELD.match(message):
            key, value, colon = found.groups()
            if key not in _RESERVED:
                out[key] = int(value) if value.isdigit() else value
            message = message[found.end() :]
            if colon:
                break
        # (A message that was only fields and a dict, the tick's summary, says what it is.)
        out["message"] = message or str(out.get("action", ""))
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        for arg in args:
            if isinstance(arg, dict):
                out.update({str(k): v for k, v in arg.items() if str(k) not in _RESERVED})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def _message(record: logging.LogRecord) -> str:
    """The record's message with each dict argument left out (its items are fields)."""
    args = record.args
    if isinstance(args, dict):
        if "%(" in str(record.msg):
            return record.getMessage()  # the dict fills named placeholders: it is the text
        args = (args,)
    if not args or not any(isinstance(arg, dict) for arg in args):
        return record.getMessage()
    try:
        text = str(record.msg) % tuple("" if isinstance(arg, dict) else arg for arg in args)
    except (TypeError, ValueError):
        return record.getMessage()
    return text.strip()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, told apart from other handlers; writes to whatever sys.stderr is at the time."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler.__init__ sets it; we always look sys.stderr up


def log_format(settings: Settings | None) -> str:
    """`TASKRUNNER_LOG_FORMAT`, or by default json on Lambda and text elsewhere."""
    if settings is not None and settings.log_format is not None:
        return settings.log_format
    return "json" if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") else "text"


def setup_logging(settings: Settings | None, *, level: int | str = logging.INFO) -> None:
    """Send every log record to stderr, formatted for where we run; repeated calls add nothing.

    The Lambda runtime puts a handler of its own on the root logger and leaves the level at
    WARNING, so INFO lines (the tick's summary) were dropped; on Lambda ours replaces it, or
    each line would be written twice. `settings` None (they could not be read) means the
    default format.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
            for other in list(root.handlers):
                root.removeHandler(other)
        handler = _Handler()
        root.addHandler(handler)
    json_format = log_format(settings) == "json"
    if isinstance(handler.formatter, JsonFormatter) != json_format or handler.formatter is None:
        handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
    root.setLevel(level)
    # Alembic's plugin loader logs each plugin it sets up at INFO: noise on every command.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def handler_settings(action: str) -> Settings:
    """Read the settings and set up logging, for a Lambda handler; bad settings are logged."""
    try:
        settings = Settings()
    except SettingsError as exc:
        setup_logging(None)
        warn_unknown_variables()
        logging.getLogger(__name__).error("action=%s: bad configuration: %s", action, describe(exc))
        raise
    setup_logging(settings)
    warn_unknown_variables()  # once: on the first read of a warm Lambda's process
    return settings


def handler_kinds(action: str) -> None:
    """Load the kind modules, at a Lambda handler's init (the import of its module).

    A module that cannot be loaded is logged, then raised: the init fails, and with it every
    event, rather than the API taking types no tick runs (or the reverse).
    """
    from functions.kinds import KindError, check_base_path, load
    from functions.settings import Settings, kinds_from_environment

    try:
        load(kinds_from_environment())
        try:
            base_path = Settings().base_path
        except SettingsError:
            base_path = ""  # (the handler says what is wrong when it reads its settings)
        check_base_path(base_path)
    except (KindError, SettingsError) as exc:
        setup_logging(None)
        logging.getLogger(__name__).error("action=%s: kinds not loaded: %s", action, exc)
        raise
