"""Settings, read from the environment with the prefix `TASKRUNNER_`.

Read and checked here, by a few lines rather than by pydantic: the tick's handler needs
nothing else of pydantic, which cost each of its Lambda cold starts 60-90 ms to import and
build a model (measured). Values are read as pydantic read them (its lax rules, its messages:
tests/unit/test_settings.py holds the two alike).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_BAR_URL = "https://www.whattimeisitrightnow.com/"
ENV_PREFIX = "TASKRUNNER_"
_HOUR_S = 3600
_DAY_S = 24 * _HOUR_S
_YEAR_S = 365 * _DAY_S
# libpq's connection options whose values it checks only when connecting.
_LIBPQ_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
}  # fmt: skip
_LIBPQ_INTEGERS = (
    "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
)  # fmt: skip
# The oldest a finished task is kept, or asked about (`taskrunner prune --older-than`).
MAX_AGE_S = 100 * _YEAR_S


def from_environment(fields: Any) -> dict[str, str]:
    """The `TASKRUNNER_*` variables that name a setting, by field name (any case, as
    pydantic-settings read them)."""
    found: dict[str, str] = {}
    for key, value in os.environ.items():
        if len(key) > len(ENV_PREFIX) and key[: len(ENV_PREFIX)].upper() == ENV_PREFIX:
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields:
                found[name] = value
    return found


class SettingsError(ValueError):
    """Settings that cannot be used: each bad one's name and what is wrong with it, never its
    value (a URL holds a password)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(describe(self))


class _Invalid(Exception):
    """One value that cannot be read; its message says why."""


def _check_database_url(value: str) -> str:
    """Parse the URL now, so a typo is a configuration error and not a crash on first use.

    libpq's own parser (through psycopg) reads it, as it will to connect; the port it leaves
    alone, so it is checked here. Messages never repeat the URL: it may hold a password.
    """
    if not value.strip():
        raise _Invalid("is empty: unset it (local commands) or give a postgresql:// URL")
    scheme, sep, rest = value.partition("://")
    # A SQLAlchemy-style driver name (postgresql+psycopg://) is accepted and dropped.
    if not sep or scheme.partition("+")[0] not in ("postgresql", "postgres"):
        raise _Invalid("must be a postgresql:// URL (postgresql://user:password@host:port/dbname)")
    # Imported here: only a configured URL needs it, and connecting loads it anyway.
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(f"postgresql://{rest}")
    except (Error, ValueError):  # (psycopg's, and %ff: no UTF-8 once decoded)
        raise _Invalid(
            "cannot be parsed; expected postgresql://user:password@host:port/dbname"
        ) from None
    for port in str(params.get("port", "")).split(","):
        if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise _Invalid("the port is not a number from 1 to 65535")
    # Options libpq checks only when it connects: a typo there would read as an outage (a
    # worker waiting for the database forever) rather than as a setting to fix.
    for option, raw in params.items():
        text = str(raw).strip()
        choices = _LIBPQ_CHOICES.get(option)
        if choices is not None and text not in choices:
            raise _Invalid(f"its option {option} must be one of {', '.join(choices)}")
        if option in _LIBPQ_INTEGERS and not (text.isascii() and text.lstrip("-").isdigit()):
            raise _Invalid(f"its option {option} must be a whole number")
    return value


def _check_base_path(value: str) -> str:
    """Normalise to "" or "/a/b": one leading slash, no trailing one."""
    path = value.strip().strip("/")
    # Printable ASCII: what a URL's path holds as it is, and a Location header can carry.
    plain = all("!" <= c <= "~" for c in path)
    if not plain or any(c in path for c in "?#%") or "//" in path:
        raise _Invalid(
            "must be a plain path such as /prod (printable ASCII; no ?, #, %, spaces or //)"
        )
    return f"/{path}" if path else ""


def _check_api_token(value: str) -> str:
    """A token a client can send as it is: not empty (unset turns the check off), nothing a
    header drops around it (white space), no control character (none can be sent)."""
    if not value:
        raise _Invalid("must not be empty (unset it to serve without a token)")
    if value != value.strip() or any(c < " " or c == "\x7f" for c in value):
        raise _Invalid(
            "must not start or end with white space nor hold control characters: no client"
            " could send it as it is, and every request would be refused"
        )
    return value


def _setting(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    check: Callable[[str], str] | None = None,
) -> Any:
    """A field with its bounds, or with a check of its own (given the value read as a str)."""
    return dataclasses.field(
        default=default, metadata={"ge": ge, "gt": gt, "le": le, "check": check}
    )


@dataclass(frozen=True, init=False)
class Settings:
    """Every tunable of taskrunner; each name carries its unit.

    `Settings()` reads the environment; values given as arguments take precedence. Raises
    SettingsError naming every bad value. `dataclasses.replace(settings, name=value)` makes
    a changed copy, checked the same way.
    """

    # A `postgresql://` URL. Unset: the local commands start an embedded PostgreSQL.
    database_url: str | None = _setting(None, check=_check_database_url)
    # Set when connecting through pgbouncer (transaction mode) or RDS Proxy: disables
    # psycopg's automatic prepared statements and LISTEN/NOTIFY (workers poll instead).
    transaction_pooler: bool = False
    # Connections kept per process; 0 means no pool (a connection per use).
    db_pool_size: int = _setting(10, ge=0)
    # How long to wait for a connection (to open one, or for a free one in the pool).
    db_connect_timeout_s: int = _setting(5, ge=1, le=_HOUR_S)
    # The longest any statement may run; the server cancels it then (a frozen server is
    # given up on a second later). Every statement taskrunner runs is bounded and short.
    db_statement_timeout_s: float = _setting(5.0, gt=0, le=600)

    # When set, every /tasks request needs `Authorization: Bearer <token>`; /healthz does not.
    api_token: str | None = _setting(None, check=_check_api_token)
    # The largest request body the API reads; a larger one gets 413 before it is read whole.
    # A full batch (10,000 tasks, each with a 255-character idempotency key) is 3.4 MiB as
    # compact JSON, and 6.0 MiB written as badly as JSON allows without \u escapes (every
    # key character escaped, indented): 8 MiB takes either. API Gateway and Lambda refuse
    # bodies over 10 MB and 6 MB before they get here.
    max_body_bytes: int = _setting(8 * 1024 * 1024, ge=1024)
    # Open connections one `taskrunner api` or `dev` process holds; one more is answered 503
    # and closed at once, so that clients that never finish cannot use up its descriptors.
    max_connections: int = _setting(1_000, ge=1)
    # A connection that has not sent a request's headers this long after it opened (or after
    # the request's first byte, on a kept-alive connection) is closed (`taskrunner api`, `dev`).
    header_timeout_s: float = _setting(10.0, gt=0, le=_HOUR_S)
    # DELETE / (the original challenge's "delete everything", for testing) deletes every task
    # that is not running; refused (403) unless set.
    allow_delete_all: bool = False

    bar_url: str = DEFAULT_BAR_URL
    bar_timeout_s: float = _setting(10.0, gt=0, le=_DAY_S)
    # `bar` requests one worker has in flight at once; the rest wait their turn (claimed, not
    # yet started: their timeout starts with their request).
    bar_concurrency: int = _setting(100, ge=1, le=10_000)
    # How long `foo` sleeps; the product says 3 seconds, tests shorten it.
    foo_delay_s: float = _setting(3.0, ge=0, le=_DAY_S)

    # A worker's lease: it renews it every third of this; when it lapses (the worker died or
    # stalled), the worker's tasks are rescued. It covers the worker, not a task, so it may be
    # far shorter than the tasks it runs. Below 3 s a renewal would have less than a second
    # to reach a busy database before the next one is due: refused rather than let a live
    # worker's tasks be rescued and run twice.
    lease_seconds: float = _setting(60.0, ge=3.0, le=_DAY_S)
    # Runs of one task, crashes included, before it is failed for good.
    max_attempts: int = _setting(3, ge=1, le=1_000_000)
    # Retry n waits retry_base_s * 2**(n-1), capped at retry_max_s.
    retry_base_s: float = _setting(1.0, ge=0, le=_YEAR_S)
    retry_max_s: float = _setting(300.0, ge=0, le=_YEAR_S)

    # Tasks one worker process runs at once, and the most one claim statement takes.
    concurrency: int = _setting(10_000, ge=1)
    claim_batch: int = _setting(1_000, ge=1)
    # Longest sleep between looks at the table when no notification can wake the worker.
    # At most queries.NOTIFY_HORIZON_S: tasks due later than that wake no worker.
    poll_interval_s: float = _setting(1.0, gt=0, le=60)
    # Finished tasks (succeeded, failed) are deleted this long after they finished, by the
    # workers and ticks (at most about once a minute each) or `taskrunner prune`; 0 keeps
    # them forever. Deleting a task frees its idempotency key.
    retention_s: float = _setting(7.0 * _DAY_S, ge=0, le=MAX_AGE_S)
    # On SIGTERM, how long running tasks may take to finish before they are released.
    shutdown_grace_s: float = _setting(10.0, ge=0, le=_DAY_S)
    # Margin a tick keeps before its platform deadline: it claims nothing that would end after it.
    deadline_margin_s: float = _setting(2.0, ge=0, le=_HOUR_S)
    # "drain": a scheduled tick runs what is due and returns. "poll": it keeps claiming
    # until near its deadline, so a once-a-minute schedule still starts tasks on time.
    tick_mode: Literal["drain", "poll"] = "drain"

    # "json": one JSON object per log line (what CloudWatch Logs Insights reads); "text": a
    # line for people. Unset: json on Lambda (AWS_LAMBDA_FUNCTION_NAME is set), text elsewhere.
    log_format: Literal["json", "text"] | None = None

    # The path the API is served under, e.g. "/prod": a REST API stage, a custom domain's
    # base-path mapping, a reverse proxy's prefix. Requests may carry it or not; the URLs the
    # API makes (Location, /docs) always do. Empty: served at the root.
    base_path: str = _setting("", check=_check_base_path)

    def __init__(self, **values: Any) -> None:
        unknown = values.keys() - _TYPES.keys()
        if unknown:
            raise TypeError(f"no such setting: {', '.join(sorted(unknown))}")
        given = {**from_environment(_TYPES), **values}
        problems = []
        for field in dataclasses.fields(self):
            value = field.default
            if field.name in given:
                try:
                    value = _read(given[field.name], _TYPES[field.name], field.metadata)
                except _Invalid as exc:
                    problems.append((field.name, str(exc)))
            object.__setattr__(self, field.name, value)
        if problems:
            raise SettingsError(problems)


_TYPES: dict[str, Any] = typing.get_type_hints(Settings)


def describe(error: SettingsError) -> str:
    """Name each bad setting as its environment variable, with what is wrong with it."""
    return "; ".join(f"{ENV_PREFIX}{name.upper()}: {problem}" for name, problem in error.problems)


# --- reading one value, as pydantic's lax mode read it -------------------------------------

# What Rust's str::trim (pydantic-core) takes for white space: Unicode's White_Space, which
# unlike str.isspace() leaves out the separators \x1c-\x1f.
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + ("\u2028\u2029\u202f\u205f\u3000")
)
# Digits in groups joined by single underscores.
_INTEGER = re.compile(r"([+-]?)([0-9]+(?:_[0-9]+)*)", re.ASCII)
_DECIMAL_ZEROS = re.compile(r"\.0+$")
# Rust's f64::from_str: no white space, no underscores, ASCII digits.
_FLOAT = re.compile(
    r"[+-]?(?:inf|infinity|nan|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)", re.ASCII | re.I
)
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _read(raw: Any, kind: Any, rules: Any) -> Any:
    """`raw` (a string from the environment, or a value given to Settings()) as `kind`,
    within the field's bounds."""
    options = typing.get_args(kind)
    if isinstance(raw, str) and not raw.isascii():
        try:
            raw.encode()
        except UnicodeEncodeError:  # bytes the environment held that are no UTF-8
            raise _Invalid(
                "Input should be a valid string, unable to parse raw data as a unicode string"
            ) from None
    if type(None) in options:
        if raw is None:
            return None
        kind = next(option for option in options if option is not type(None))
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if raw not in choices:
            names = [f"'{choice}'" for choice in choices]
            raise _Invalid(f"Input should be {', '.join(names[:-1])} or {names[-1]}")
        return raw
    if kind is str:
        if not isinstance(raw, str):
            raise _Invalid("Input should be a valid string")
        check = rules.get("check")
        return raw if check is None else check(raw)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        word = raw.lower() if isinstance(raw, str) else str(raw) if isinstance(raw, int) else None
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise _Invalid("Input should be a valid boolean, unable to interpret input")
    number = _integer(raw) if kind is int else _float(raw)
    for rule, holds, words in _BOUNDS:
        bound = rules.get(rule)
        if bound is not None and not holds(number, bound):
            shown = int(bound) if bound == int(bound) else bound
            raise _Invalid(f"Input should be {words} {shown}")
    return number


_BOUNDS: list[tuple[str, Callable[[float, float], bool], str]] = [
    ("gt", lambda value, bound: value > bound, "greater than"),
    ("ge", lambda value, bound: value >= bound, "greater than or equal to"),
    ("le", lambda value, bound: value <= bound, "less than or equal to"),
]


def _integer(raw: Any) -> int:
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise _Invalid("Input should be a finite number")
        if not raw.is_integer():
            raise _Invalid("Input should be a valid integer, got a number with a fractional part")
        return int(raw)
    if not isinstance(raw, str):
        raise _Invalid("Input should be a valid integer")
    # As pydantic-core: trimmed, zeros after a decimal point dropped ("3.00"), digits in
    # groups joined by single underscores. (pydantic-core also read runs of zeros,
    # underscores and signs oddly: "0-9" as -9, "+0-0" and "00___0" as 0. Refused here.)
    found = _INTEGER.fullmatch(_DECIMAL_ZEROS.sub("", raw.strip(_WHITE_SPACE)))
    if found is None:
        raise _Invalid("Input should be a valid integer, unable to parse string as an integer")
    sign, digits = found.group(1), found.group(2).replace("_", "").lstrip("0") or "0"
    # Python's own bound on a number read from text (sys.get_int_max_str_digits()).
    if len(digits) > 4300:
        raise _Invalid("Unable to parse input string as an integer, exceeded maximum size")
    return int(sign + digits)


def _float(raw: Any) -> float:
    if isinstance(raw, int | float):
        try:
            number: float | None = float(raw)
        except OverflowError:  # an int past any float
            raise _Invalid("Input should be a finite number") from None
    elif isinstance(raw, str):
        # As pydantic-core: the text trimmed, or else with its underscores dropped (single
        # ones, none leading or trailing), read by Rust's grammar of a float.
        number = _rust_float(raw.strip(_WHITE_SPACE))
        if number is None and not (raw[:1] == "_" or raw[-1:] == "_" or "__" in raw):
            number = _rust_float(raw.replace("_", ""))
    else:
        number = None
    if number is None:
        raise _Invalid("Input should be a valid number, unable to parse string as a number")
    # "inf" or "nan" is no number of seconds (each has an upper bound too, so that every
    # time computed from it fits PostgreSQL's and Python's ranges).
    if not math.isfinite(number):
        raise _Invalid("Input should be a finite number")
    return number


def _rust_float(text: str) -> float | None:
    return float(text) if _FLOAT.fullmatch(text) else None
