"""Settings, read from the environment with the prefix `TASKRUNNER_`.

Read and checked here by plain code rather than by pydantic: the tick's handler needs
nothing else of pydantic, which cost each of its Lambda cold starts 60-90 ms to import and
build a model (measured). A bad value is named by its variable, with what is accepted and
what was given ("TASKRUNNER_LEASE_SECONDS: must be a number of seconds from 3 to 86400, got
'abc'"); a URL or a token is never repeated (it may hold a secret).

What is read: a whole number is ASCII digits with an optional sign; a number is a decimal
(`2.5`, `1e3`), finite (`inf` and `nan` are refused); a yes/no is true/false, 1/0, yes/no,
on/off, t/f or y/n in any case; a choice is one of its words as written. Around any of
these, ASCII white space (space, tab, newlines) is stripped; nothing else is (a no-break
space is part of the value, and refused). The database URL is read by libpq; the bar URL
must be http(s) with a host, as given; the base path is stripped of white space and
slashes; the API token is taken exactly as given.

A `TASKRUNNER_*` variable that no setting reads is most likely a typo: each command, and
each Lambda handler's first read, logs a warning naming it and the closest setting
(`warn_unknown_variables`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from functions.model import MAX_PAYLOAD_BYTES
from functions.values import ASCII_SPACE, Invalid, read_value, shown

DEFAULT_BAR_URL = "https://www.whattimeisitrightnow.com/"
ENV_PREFIX = "TASKRUNNER_"
_HOUR_S = 3600
_DAY_S = 24 * _HOUR_S
_YEAR_S = 365 * _DAY_S
# Variables with the prefix that are no setting: the test suite's and the screenshot tool's.
_NOT_SETTINGS_PREFIXES = ("TASKRUNNER_TEST_",)
_NOT_SETTINGS = frozenset({"TASKRUNNER_SCREENSHOT", "TASKRUNNER_SCREENSHOTS"})
_warned = False
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


def unknown_variables() -> list[tuple[str, str | None]]:
    """The `TASKRUNNER_*` variables that no setting reads, each with the closest setting's
    variable (None if none is close)."""
    names = [name.upper() for name in _TYPES]
    found: list[tuple[str, str | None]] = []
    for key in sorted(os.environ):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper in _NOT_SETTINGS:
            continue
        if upper.startswith(_NOT_SETTINGS_PREFIXES):
            continue
        name = upper[len(ENV_PREFIX) :]
        if name.lower() in _TYPES:
            continue
        import difflib  # only when a variable is unknown

        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        found.append((key, f"{ENV_PREFIX}{close[0]}" if close else None))
    return found


def warn_unknown_variables() -> None:
    """Log a warning for each `TASKRUNNER_*` variable that no setting reads (once a process):
    a typo there was silently ignored, and the setting kept its default."""
    global _warned
    if _warned:
        return
    _warned = True
    if not any(key.upper().startswith(ENV_PREFIX) for key in os.environ):
        return
    for key, close in unknown_variables():
        hint = f"did you mean {close}?" if close else "see the README's Configuration section"
        logging.getLogger(__name__).warning("%s is set but no setting reads it: %s", key, hint)


class SettingsError(ValueError):
    """Settings that cannot be used: each bad one's name and what is wrong with it; a number's
    or a word's value is repeated, a URL's or a token's never (a URL holds a password)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(describe(self))


def _check_database_url(value: str) -> str:
    """Parse the URL now, so a typo is a configuration error and not a crash on first use.

    libpq's own parser (through psycopg) reads it, as it will to connect; the port it leaves
    alone, so it is checked here. Messages never repeat the URL: it may hold a password.
    """
    if not value.strip():
        raise Invalid("is empty: unset it (local commands) or give a postgresql:// URL")
    scheme, sep, rest = value.partition("://")
    # A SQLAlchemy-style driver name (postgresql+psycopg://) is accepted and dropped.
    if not sep or scheme.partition("+")[0] not in ("postgresql", "postgres"):
        raise Invalid("must be a postgresql:// URL (postgresql://user:password@host:port/dbname)")
    # Imported here: only a configured URL needs it, and connecting loads it anyway.
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(f"postgresql://{rest}")
    except (Error, ValueError):  # (psycopg's, and %ff: no UTF-8 once decoded)
        raise Invalid(
            "cannot be parsed; expected postgresql://user:password@host:port/dbname"
        ) from None
    for port in str(params.get("port", "")).split(","):
        if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise Invalid("the port is not a number from 1 to 65535")
    # Options libpq checks only when it connects: a typo there would read as an outage (a
    # worker waiting for the database forever) rather than as a setting to fix.
    for option, raw in params.items():
        text = str(raw).strip()
        choices = _LIBPQ_CHOICES.get(option)
        if choices is not None and text not in choices:
            raise Invalid(f"its option {option} must be one of {', '.join(choices)}")
        if option in _LIBPQ_INTEGERS and not (text.isascii() and text.lstrip("-").isdigit()):
            raise Invalid(f"its option {option} must be a whole number")
    return value


def _check_bar_url(value: str) -> str:
    """An http:// or https:// URL with a host: anything else failed every `bar` task, at run
    time, rather than the command at start."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a port that is no number up to 65535)
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or value != value.strip()  # (urlsplit drops it; a client may not)
    ):
        raise Invalid(f"must be an http:// or https:// URL with a host, got {shown(value)}")
    return value


def _check_base_path(value: str) -> str:
    """Normalise to "" or "/a/b": one leading slash, no trailing one."""
    path = value.strip().strip("/")
    # Printable ASCII: what a URL's path holds as it is, and a Location header can carry.
    plain = all("!" <= c <= "~" for c in path)
    if not plain or any(c in path for c in "?#%") or "//" in path:
        raise Invalid(
            "must be a plain path such as /prod (printable ASCII; no ?, #, %, spaces or //)"
        )
    return f"/{path}" if path else ""


def _check_api_token(value: str) -> str:
    """A token a client can send as it is: not empty (unset turns the check off), nothing a
    header drops around it (white space), no control character (none can be sent)."""
    if not value:
        raise Invalid("must not be empty (unset it to serve without a token)")
    if value != value.strip() or any(c < " " or c == "\x7f" for c in value):
        raise Invalid(
            "must not start or end with white space nor hold control characters: no client"
            " could send it as it is, and every request would be refused"
        )
    return value


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _check_kinds(value: str) -> str:
    """Comma-separated module names as `import` takes them; "" (or only commas) names none."""
    names = [name.strip(ASCII_SPACE) for name in value.split(",")]
    bad = [name for name in names if name and not _MODULE_NAME.fullmatch(name)]
    if bad:
        raise Invalid(
            f"must be module names separated by commas (as `import` takes them),"
            f" got {shown(bad[0])}"
        )
    return ",".join(name for name in names if name)


def _check_allowed_hosts(value: str) -> str:
    """Comma-separated host names (as a URL's host, any case) and IP addresses or CIDRs
    (`10.0.0.0/8`, `fd00::/8`); "" allows none. Normalised: lowercase, no spaces, CIDRs in
    their network form."""
    import ipaddress

    out: list[str] = []
    for raw in value.split(","):
        item = raw.strip(ASCII_SPACE).lower().rstrip(".")
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item.strip("[]"), strict=False)))
            continue
        except ValueError:
            pass
        if "/" in item or not _HOST_NAME.fullmatch(item):
            raise Invalid(
                "must be host names (as in a URL, e.g. hooks.internal.example) or IP"
                f" addresses and CIDRs (e.g. 10.0.0.0/8), separated by commas, got {shown(raw)}"
            )
        out.append(item)
    return ",".join(dict.fromkeys(out))


# A DNS name's labels: letters, digits, hyphens and underscores, 1 to 63 each.
_HOST_NAME = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)


def kinds_from_environment() -> str | None:
    """TASKRUNNER_KINDS alone, checked: what a Lambda handler loads when its module is
    imported (its init), before it reads the rest of the settings on its first event."""
    raw = from_environment({"kinds"}).get("kinds")
    if raw is None:
        return None
    try:
        return str(read_value("kinds", raw, str, {"check": _check_kinds}))
    except Invalid as exc:
        raise SettingsError([("kinds", str(exc))]) from None


_PAYLOAD_DEFAULT = 64 * 1024


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
    # The largest payload a task may carry, as compact JSON in UTF-8; a larger one gets 422.
    # At most 1.5 MiB (model.MAX_PAYLOAD_BYTES), so that one task's answer stays under the 5 MB
    # of a page as Lambda carries it. Set to other than its default, it must be below
    # max_body_bytes: such a body would get 413 first.
    max_payload_bytes: int = _setting(_PAYLOAD_DEFAULT, ge=16, le=MAX_PAYLOAD_BYTES)
    # Open connections one `taskrunner api` or `dev` process holds; one more is answered 503
    # and closed at once, so that clients that never finish cannot use up its descriptors.
    max_connections: int = _setting(1_000, ge=1)
    # A connection that has not sent a request's headers this long after it opened (or after
    # the request's first byte, on a kept-alive connection) is closed (`taskrunner api`, `dev`).
    header_timeout_s: float = _setting(10.0, gt=0, le=_HOUR_S)
    # DELETE / (the original challenge's "delete everything", for testing) deletes every task
    # that is not running; refused (403) unless set.
    allow_delete_all: bool = False

    bar_url: str = _setting(DEFAULT_BAR_URL, check=_check_bar_url)
    bar_timeout_s: float = _setting(10.0, gt=0, le=_DAY_S)
    # What the `http` kind may connect to besides public addresses: host names (matched
    # against a URL's host) and IP addresses or CIDRs (matched against the address connected
    # to), comma-separated (functions/egress.py). Unset: public addresses only.
    http_allowed_hosts: str | None = _setting(None, check=_check_allowed_hosts)
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

    # The user's kind modules, comma-separated (`myapp.kinds,other.kinds`): every process
    # imports them at start, with those of the entry point group `taskrunner.kinds`
    # (functions/kinds.py; docs/own-tasks.md).
    kinds: str | None = _setting(None, check=_check_kinds)

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
                    value = read_value(
                        field.name, given[field.name], _TYPES[field.name], field.metadata
                    )
                except Invalid as exc:
                    problems.append((field.name, str(exc)))
            object.__setattr__(self, field.name, value)
        # Set to other than its default, the payload limit must fit in a body; the default
        # beside a smaller body limit is the body's to refuse (413), as the docs say.
        if (
            not problems
            and self.max_payload_bytes != _PAYLOAD_DEFAULT
            and self.max_payload_bytes >= self.max_body_bytes
        ):
            problems.append(
                (
                    "max_payload_bytes",
                    f"must be below TASKRUNNER_MAX_BODY_BYTES ({self.max_body_bytes:,}), got"
                    f" {self.max_payload_bytes:,}: a body holding a payload that large would"
                    " be refused (413) before it is read",
                )
            )
        if problems:
            raise SettingsError(problems)


_TYPES: dict[str, Any] = typing.get_type_hints(Settings)


def describe(error: SettingsError) -> str:
    """Name each bad setting as its environment variable, with what is wrong with it."""
    return "; ".join(f"{ENV_PREFIX}{name.upper()}: {problem}" for name, problem in error.problems)
