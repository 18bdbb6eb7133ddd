"""The built-in `http` kind: a task that makes one HTTP request, as Cloud Tasks' HTTP targets, so
a deployment runs the user's endpoints without shipping their code.

Its payload: `{"url": "https://...", "method": "POST", "headers": {"name": "value"}, "body":
...}`; `method` defaults to POST, `headers` to none, `body` to none (a string is sent as it is,
as UTF-8 text; any other JSON value as JSON). `check_payload` refuses anything else when the
task is created (422), on every path. A run:

- succeeds on a 2xx: its line is the status code (`200`), as `bar`'s;
- is retried on a 429, a 5xx, a timeout or a connection error: after the `Retry-After` the
  answer gives (seconds or an HTTP date; `kinds.Retry`), else after the usual backoff;
- fails for good (`kinds.Fail`) on any other status, without using its other attempts;
- follows up to MAX_REDIRECTS redirects, each new address checked as the first was (a
  redirect to a URL with a user name or password fails it: they are never sent);
- reads at most MAX_BODY_READ bytes of any answer's body (the rest is never read);
- connects only where functions/egress.py allows (no loopback, private, link-local...
  unless TASKRUNNER_HTTP_ALLOWED_HOSTS says so): a refusal fails the task for good, saying why.

The headers' values are never written to a log or an error, and the API shows them masked
(`masked`); the stored payload keeps them for the run.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from functions import egress
from functions.kinds import Context, Fail, Retry, kind

if TYPE_CHECKING:
    import httpx

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MAX_REDIRECTS = 5
# The most of an answer's body that is read; a longer one is left unread and its connection
# closed. Reading a short one to its end lets its connection serve the next task.
MAX_BODY_READ = 64 * 1024
# A run still waiting after this long is stopped and tried again (the runner's time limit).
TIMEOUT_S = 30.0
MAX_URL_CHARS = 4096
# Requests one worker has in flight at once (each holds a connection, a file descriptor).
CONCURRENCY = 100
# What the API shows in place of a header's value.
MASK = "***"
# Headers taskrunner sets (or HTTP/1.1's connection itself does): left out of what is sent
# when a payload has them.
MANAGED_HEADERS = frozenset(
    "host content-length transfer-encoding connection keep-alive upgrade te trailer"
    " proxy-connection".split()
)

# The rules of a payload, each a pattern written once for `check_payload` and for the API's
# schema (PAYLOAD_SCHEMA), in what Python's and JSON Schema's regexes read alike: the two
# agree by construction. A URL: http(s), a host name or IPv4 address (no user name or
# password: they would be shown in answers), a port from 1 to 65535 (0, which nothing listens
# on, and leading zeros, which parsers read differently, refused), then printable ASCII
# without spaces and the characters a URL escapes (percent-encode the rest). No IPv6
# literal: `[...]` takes a grammar of its own, and a name serves (as for IDNs: punycode).
URL_PATTERN = (
    "^[Hh][Tt][Tt][Pp][Ss]?://"
    "[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?"
    "(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?"
    "(?:[/?#][!#-;=?-\\[\\]_a-z~]*)?$"
)
# A host the resolver may read as a number (each of its one to four labels decimal, octal
# with a leading 0, or hex with 0x) is an IPv4 address written as four decimal numbers
# 0-255 without leading zeros: parsers read `0177.0.0.1` (octal to some), `127.1`,
# `2130706433` and `0x7f.1` differently (httpx refuses the first; the resolver takes the
# others as 127.0.0.1). Any other host is a name: one of its labels is no such number
# (`_NAME_LABEL`). A second pattern on the URL, without lookahead, so every regex engine
# reads it alike.
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_NAME_LABEL = (
    "(?:[A-Za-z_-]|[1-9][0-9]*[A-Za-z_-]|0[0-9]+[A-Za-z_-]|0[A-WYZa-wyz_-]"
    "|0[Xx][0-9A-Fa-f]*[G-Zg-z_-])[A-Za-z0-9_-]*"
)
HOST_PATTERN = (
    f"^[Hh][Tt][Tt][Pp][Ss]?://(?:(?:{_OCTET}\\.){{3}}{_OCTET}(?:[:/?#]|$)"
    f"|(?:[A-Za-z0-9_-]*\\.)*{_NAME_LABEL})"
)
# RFC 9110: a header's name is a token; its value visible ASCII, with spaces and tabs inside.
HEADER_NAME_PATTERN = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
HEADER_VALUE_PATTERN = "^(?:[!-~](?:[ -~\\t]*[!-~])?)?$"
_URL = re.compile(URL_PATTERN)
_HOST = re.compile(HOST_PATTERN)
_NAME = re.compile(HEADER_NAME_PATTERN)
_VALUE = re.compile(HEADER_VALUE_PATTERN)
_FIELDS = ("url", "method", "headers", "body")
_NO_BODY = ("GET", "HEAD")
_REDIRECTS = (301, 302, 303, 307, 308)

# The payload's JSON Schema: the OpenAPI document states it for `"type": "http"`.
PAYLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["url"],
    "additionalProperties": False,
    "properties": {
        "url": {
            "type": "string",
            "maxLength": MAX_URL_CHARS,
            "allOf": [{"pattern": URL_PATTERN}, {"pattern": HOST_PATTERN}],
        },
        "method": {"enum": list(METHODS), "default": "POST"},
        "headers": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "propertyNames": {"pattern": HEADER_NAME_PATTERN},
                    "additionalProperties": {
                        "type": "string",
                        "pattern": HEADER_VALUE_PATTERN,
                        "not": {"const": MASK},
                    },
                },
            ]
        },
        "body": {"description": "a string is sent as UTF-8 text; any other value as JSON"},
    },
    # A GET or HEAD carries no body.
    "if": {"required": ["method"], "properties": {"method": {"enum": list(_NO_BODY)}}},
    "then": {"properties": {"body": {"type": "null"}}},
    "description": "An `http` task's request: `url` (http or https), `method` (POST by"
    " default), `headers` (their values are shown as *** in answers) and `body`.",
    "examples": [{"url": "https://hooks.example.com/paid", "body": {"order": 42}}],
}


class HttpError(Exception):
    """A 429 or 5xx answer without a Retry-After, or a connection that failed: retried."""


class AddressRefused(Fail):
    """A connection the rules of functions/egress.py refuse: failed for good, saying why."""


def _refuse(what: str) -> None:
    raise ValueError(f"an http task's payload {what}")


def check_payload(payload: Any) -> None:
    """Raise ValueError, saying what is wrong, unless `payload` is one the http kind runs
    (PAYLOAD_SCHEMA, exactly). Never quotes a header's value."""
    if not isinstance(payload, dict):
        _refuse(
            "must be an object with a `url`, and perhaps `method`, `headers` and `body`"
            f" (got {'null' if payload is None else type(payload).__name__})"
        )
    unknown = [name for name in payload if name not in _FIELDS]
    if unknown:
        _refuse(f"has no field {unknown[0]!r:.60}: it takes url, method, headers and body")
    url = payload.get("url")
    if not isinstance(url, str):
        _refuse("must have a `url`: a string, http:// or https://")
    if len(url) > MAX_URL_CHARS:
        _refuse(f"`url` is {len(url):,} characters, over the limit of {MAX_URL_CHARS:,}")
    if not _URL.fullmatch(url):
        if url.partition("://")[2].startswith("["):
            _refuse(
                f"`url` {url!r:.80} has an IPv6 address for its host, which it cannot: use a"
                " name that resolves to it (the address connected to is checked, IPv4 or IPv6)"
            )
        _refuse(
            f"`url` {url!r:.80} is not an http:// or https:// URL with a host (a name or an"
            " IPv4 address), perhaps a port, and printable ASCII after it (no spaces, no user"
            " name or password: send credentials in `headers`, whose values are masked)"
        )
    if not _HOST.search(url):
        host = re.split("[:/?#]", url.partition("://")[2], maxsplit=1)[0]
        _refuse(
            f"`url` host {host!r:.40} is not an IPv4 address as written: four numbers 0 to"
            " 255 without leading zeros (0177 is octal to some readers, 0x7f hex), or use a"
            " name"
        )
    method = payload.get("method", "POST")
    if method not in METHODS:
        shown = repr(method)[:40] if isinstance(method, str) else type(method).__name__
        _refuse(f"`method` {shown} is not one of {', '.join(METHODS)}")
    headers = payload.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            _refuse("`headers` must be an object of header names to string values")
        seen: dict[str, str] = {}
        for name, value in headers.items():
            if not _NAME.fullmatch(name):
                _refuse(f"`headers` has a name that is not an HTTP header name: {name!r:.60}")
            # Header names are one name in any case: which of two would be sent is not said.
            if (other := seen.setdefault(name.lower(), name)) != name:
                _refuse(f"`headers` names {other} and {name}, the same header: send it once")
            # (The value is never quoted: it may be a secret.)
            if not isinstance(value, str):
                _refuse(f"`headers` value of {name} must be a string")
            if not _VALUE.fullmatch(value):
                _refuse(
                    f"`headers` value of {name} must be printable ASCII (spaces and tabs"
                    " inside it only)"
                )
            if value == MASK:
                # An answer sent back as it came would store the mask in place of the secret.
                _refuse(
                    f"`headers` value of {name} is {MASK}, what answers show in place of a"
                    " value: send the value itself"
                )
    if payload.get("body") is not None and method in _NO_BODY:
        _refuse(f"has a `body`, which a {method} request cannot carry")


def masked(payload: Any) -> Any:
    """The payload as the API shows it: each header's value replaced by MASK."""
    if isinstance(payload, dict) and isinstance(payload.get("headers"), dict):
        return {**payload, "headers": dict.fromkeys(payload["headers"], MASK)}
    return payload


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """A `Retry-After` header's wait in seconds (delay-seconds or an HTTP date, RFC 9110);
    None if there is none or it cannot be read."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value), 10**9))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _shown(url: httpx.URL) -> str:
    """A URL for an error: without its query and fragment (they may hold a token)."""
    text = str(url.copy_with(query=None, fragment=None))
    return text if len(text) <= 200 else f"{text[:197]}..."


def _content(body: Any) -> tuple[bytes | None, str | None]:
    """What is sent for `body`, and its default content type."""
    if body is None:
        return None, None
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return text.encode(), "application/json"


async def _read_some(response: httpx.Response) -> None:
    """Read a body to its end if it is short (the connection can then serve again); stop
    once MAX_BODY_READ bytes are read (or at once when its length says it is longer)."""
    length = response.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > MAX_BODY_READ:
        return
    read = 0
    # Raw: a compressed body is never inflated (a small one can inflate to gigabytes).
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read >= MAX_BODY_READ:
            return


# How httpx starts the RemoteProtocolError of a redirect whose Location is no URL.
_NO_URL_LOCATION = "Invalid URL in location header"
# A Location's host and port as written (absolute, or protocol-relative `//host`).
_AUTHORITY = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*:)?//([^/?#]*)")


def _unfollowed_origin(location: str, scheme: str) -> str | None:
    """Why a redirect to `location` is not followed for its host or port as written, by the
    rules a payload's `url` is checked by (URL_PATTERN, HOST_PATTERN): a port out of
    1-65535 or written otherwise than in plain digits without a leading zero (httpx reads
    `:0080`, `:+80` and other digits alike), an IPv4 address written otherwise than as four
    decimal numbers, a host of other characters. None: followed (a relative Location keeps
    the origin; an IPv6 literal, which a Location may hold, and the address connected to are
    checked in any case, but for a zone (`%25eth0`), an interface of this host's own link; a
    user name or password is refused apart)."""
    written = _AUTHORITY.match(location.strip())
    if written is None:
        return None
    authority = written.group(1)
    if "@" in authority:
        return None
    if authority.startswith("["):
        if "%" not in authority.partition("]")[0]:
            return None
        return f"{authority!r:.80}, an IPv6 address with a zone (a link of this host's own)"
    origin = f"{scheme}://{authority}"
    if _URL.fullmatch(origin) and _HOST.search(origin):
        return None
    return (
        f"{authority!r:.80}, a host and port a task's `url` cannot have (a port from 1 to"
        " 65535 in plain digits; an IPv4 address as four numbers 0 to 255 without leading"
        " zeros, or a name)"
    )


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    """Whether the payload's headers may go on to `b`: the same host, not from https to
    http (a credential meant for one host is never sent to another)."""
    return a.host == b.host and not (a.scheme == "https" and b.scheme != "https")


@kind(
    "http",
    timeout_s=TIMEOUT_S,
    concurrency=CONCURRENCY,
    check=check_payload,
    show=masked,
    payload_schema=PAYLOAD_SCHEMA,
)
async def http(ctx: Context) -> str:
    """Make the request the payload describes (see the module's docstring)."""
    import httpx

    payload = ctx.payload
    try:
        check_payload(payload)  # (a payload written past the API, by SQL)
        url = httpx.URL(payload["url"])
    except (ValueError, httpx.InvalidURL) as exc:
        raise Fail(str(exc)) from None
    method: str = payload.get("method", "POST")
    given: dict[str, str] = payload.get("headers") or {}
    content, content_type = _content(payload.get("body"))
    headers = _headers(given, content_type)
    async with ctx.http(guarded=True) as client:
        for hop in range(MAX_REDIRECTS + 1):
            where = f"{method} {_shown(url)}"
            try:
                request = client.build_request(method, url, headers=headers, content=content)
                response = await client.send(request, stream=True)
            except egress.AddressRefused as exc:
                raise AddressRefused(f"{where}: {exc}") from None
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise Fail(f"{where}: {exc}") from None
            except httpx.RemoteProtocolError as exc:
                # httpx reads a redirect's Location even when it follows none, and raises
                # this where it is no URL (`0177.0.0.1`): an answer that will not change.
                if str(exc).startswith(_NO_URL_LOCATION):
                    raise Fail(
                        f"{where} answered a redirect to a Location that is no URL: {exc}"
                    ) from None
                raise HttpError(f"{where}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
            except httpx.TransportError as exc:
                raise HttpError(f"{where}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
            try:
                await _read_some(response)
            except httpx.TransportError:
                pass  # the status is what counts; the connection is closed below
            finally:
                await response.aclose()
            status = response.status_code
            answered = f"{where} answered {status} {response.reason_phrase}".rstrip()
            if 200 <= status < 300:
                return str(status)
            if status in _REDIRECTS and "location" in response.headers:
                if hop == MAX_REDIRECTS:
                    raise Fail(f"{answered}: more than {MAX_REDIRECTS} redirects")
                try:
                    target = url.join(response.headers["location"])
                except httpx.InvalidURL as exc:
                    raise Fail(f"{answered} to a Location that is no URL: {exc}") from None
                if target.scheme not in ("http", "https"):
                    raise Fail(f"{answered} to a {target.scheme or 'relative'} URL, not http(s)")
                if why := _unfollowed_origin(response.headers["location"], target.scheme):
                    raise Fail(f"{answered} to {why}")
                if target.userinfo:
                    # httpx would send them as Basic auth: credentials go in `headers` only
                    # (as a payload's URL takes none), and the error never quotes them.
                    raise Fail(
                        f"{answered} to a URL with a user name or password, which is not"
                        " followed (credentials go in the payload's `headers`)"
                    )
                # As browsers and httpx do: 303 asks for a GET; 301 and 302 turn a POST into one.
                if (status == 303 and method != "HEAD") or (
                    status in (301, 302) and method == "POST"
                ):
                    method, content, content_type = "GET", None, None
                    given = {k: v for k, v in given.items() if k.lower() != "content-type"}
                if not _same_origin(url, target):
                    given = {}
                headers = _headers(given, content_type)
                url = target
                continue
            if status == 429 or status >= 500:
                after_s = retry_after_s(response.headers.get("retry-after"))
                if after_s is not None:
                    # The message says the wait the task gets, as the completer caps it.
                    wait_s = min(after_s, ctx.settings.retry_max_s)
                    said = f"{answered}; Retry-After {_seconds(after_s)} s"
                    if wait_s < after_s:
                        said += f", capped at {_seconds(wait_s)} s (TASKRUNNER_RETRY_MAX_S)"
                    raise Retry(wait_s, said)
                raise HttpError(answered)
            raise Fail(answered)
    raise AssertionError("unreachable")  # (the loop returns or raises)


def _seconds(value: float) -> str:
    """Seconds as people write them: `20`, `2.5`, `1,000,000,000` (never `1e+09`)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}".removesuffix(".0")


def _headers(given: dict[str, str], content_type: str | None) -> dict[str, str]:
    """The payload's headers but MANAGED_HEADERS, with a User-Agent and the body's content
    type unless given."""
    given = {k: v for k, v in given.items() if k.lower() not in MANAGED_HEADERS}
    names = {name.lower() for name in given}
    headers = {"User-Agent": "taskrunner"} if "user-agent" not in names else {}
    if content_type is not None and "content-type" not in names:
        headers["Content-Type"] = content_type
    return {**headers, **given}
