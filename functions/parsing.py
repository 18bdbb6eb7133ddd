"""Reading a task from what a client sent: its kind, its time, its idempotency key, its
options (max_attempts, timeout_s, priority), a page's cursor, and a whole batch at once;
and the patterns the API's schema states the same rules in.

Each `parse_*` raises ValueError saying what is wrong, quoting at most an `excerpt` of the
input (`decode_cursor` raises InvalidInput, a 400); `read_batch` answers None and
leaves saying why to the full schema.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Any

from functions.errors import InvalidInput
from functions.kinds import KINDS, NAME_PATTERN
from functions.model import (
    BIGINT_MAX,
    END_UNIX_S,
    IDEMPOTENCY_KEY_PATTERN,
    MAX_ATTEMPTS_AT_CREATE,
    MAX_ERROR_SEARCH,
    MAX_EXECUTE_AT,
    MAX_PAYLOAD_DEPTH,
    MAX_PAYLOAD_FILTER_BYTES,
    MAX_PRIORITY,
    MIN_EXECUTE_AT,
    MIN_PRIORITY,
    SORTS,
    NewTask,
    Position,
    SortKey,
    TaskOrder,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_FORMS = "an RFC 3339 date-time with an offset (e.g. 2030-01-01T12:00:00Z) or Unix seconds"
_RFC_3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?"  # (none: refused below, saying so)
)
# What a kind's name may have around it: ASCII spaces, tabs and line ends, nothing else, so
# that the API's schema can say exactly what it takes.
_BLANKS = " \t\n\r"
# The fraction of a second of an RFC 3339 date-time.
_FRACTION = re.compile(r":[0-9]{2}\.([0-9]+)")


def any_case(words: Sequence[str], around: str = "") -> str:
    """A pattern matching exactly one of `words` in any case (with `around` repeated on
    either side), in a form every regex dialect reads alike (JSON Schema's, Python's,
    pydantic's), which inline flags are not."""
    spelled = ("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in w) for w in words)
    return f"^{around}(?:{'|'.join(spelled)}){around}$"


def kind_pattern() -> str:
    """The pattern of the kinds loaded (`kinds.load`), as `parse_kind` takes them."""
    return any_case(sorted(KINDS), around="[ \\t\\n\\r]*")


# The cursors `encode_cursor` makes, and only those. A cursor names the order it was made in
# and the position of the last task read there: `-id.42` (the default order, newest first),
# `execute_at.1893499200000000.42` (the key, in microseconds since the epoch, then the id).
# Readable on purpose: nothing in it is secret, and a client only sends it back.
_ID_DIGITS = "[0-9]{1,19}"
_CURSOR_NOW = f"-?id[.]{_ID_DIGITS}|-?(?:execute_at|finished_at)[.]-?[0-9]{{1,18}}[.]{_ID_DIGITS}"
# Those made before orders other than ascending ids, still read (as `id` order): base64url
# (no padding) of "after:" and 1 to 19 ASCII digits. "after:" is "YWZ0ZXI6". Three digits
# (0011abcd 0011efgh 0011ijkl) make four characters: 0011ab (M, N, O: a digit is at most
# 1001), cd0011 (D, T, j, z; only D, T after O), efgh00 and 11ijkl; one or two digits left
# over make two or three.
_PAIR = "(?:[MN][DTjz]|O[DT])"
_THREE = f"{_PAIR}[AEIMQUYcgk][w-z0-5]"
_ONE = "(?:[MN][AQgw]|O[AQ])"
_TWO = f"{_PAIR}[AEIMQUYcgk]"
# 1 to 18 digits: up to five threes and a last group; 19: six threes and one.
_CURSOR_BEFORE = (
    f"YWZ0ZXI6(?:(?:{_THREE}){{0,5}}(?:{_THREE}|{_ONE}|{_TWO})|(?:{_THREE}){{6}}{_ONE})"
)
CURSOR_PATTERN = f"^(?:{_CURSOR_NOW}|{_CURSOR_BEFORE})$"
_CURSOR = re.compile(CURSOR_PATTERN)


def parse_kind(value: object) -> str:
    """Return the kind named by `value`, matched case-insensitively."""
    if not isinstance(value, str):
        raise ValueError("type must be a string")
    name = value.strip(_BLANKS).lower()
    if name not in KINDS:
        raise ValueError(
            f"unknown type {excerpt(value)}; expected one of {', '.join(sorted(KINDS))}"
        )
    return name


_KIND_NAME = re.compile(NAME_PATTERN)


def parse_kind_filter(value: object) -> str:
    """Return the kind a filter names, matched case-insensitively: any well-formed kind name
    (NAME_PATTERN), loaded or not, so the tasks of a kind removed from the deployment (which
    /stats shows as unserved) can still be listed, cancelled and retried."""
    if not isinstance(value, str):
        raise ValueError("type must be a string")
    name = value.strip(_BLANKS).lower()
    if not _KIND_NAME.fullmatch(name):
        raise ValueError(
            f"type {excerpt(value)} is not a kind's name: 1 to 63 letters, digits and"
            " underscores, starting with a letter"
        )
    return name


def parse_idempotency_key(value: object) -> str:
    """Return `value` if it is an idempotency key this API takes (IDEMPOTENCY_KEY_PATTERN)."""
    if isinstance(value, str) and "," in value:
        raise ValueError(
            f"idempotency key {excerpt(value)} holds a comma: a request takes one key (two"
            " Idempotency-Key headers arrive joined by a comma through API Gateway)"
        )
    if not isinstance(value, str) or not _IDEMPOTENCY_KEY.fullmatch(value):
        raise ValueError(
            f"idempotency key {excerpt(value)} is not 1 to 255 printable ASCII characters"
            " (`!` to `~`, no spaces or commas)"
        )
    return value


_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


def parse_max_attempts(value: object) -> int:
    """Return `value` if it is a task's max_attempts at create: a whole number (`3.0` is 3,
    as JSON Schema's `integer` says; `2.5` and `true` are refused) from 1 to
    MAX_ATTEMPTS_AT_CREATE."""
    whole = _whole(value)
    if whole is None or not 1 <= whole <= MAX_ATTEMPTS_AT_CREATE:
        raise ValueError(
            f"max_attempts {excerpt(value)} is not a whole number from 1 to"
            f" {MAX_ATTEMPTS_AT_CREATE:,}"
        )
    return whole


def parse_priority(value: object) -> int:
    """Return `value` if it is a priority: a whole number (as `parse_max_attempts` reads
    one) from MIN_PRIORITY (runs first) to MAX_PRIORITY."""
    whole = _whole(value)
    if whole is None or not MIN_PRIORITY <= whole <= MAX_PRIORITY:
        raise ValueError(
            f"priority {excerpt(value)} is not a whole number from {MIN_PRIORITY} (runs first)"
            f" to {MAX_PRIORITY}"
        )
    return whole


def parse_max_attempts_or_default(value: object) -> int | None:
    """parse_max_attempts, with null as absent: TASKRUNNER_MAX_ATTEMPTS (None here). Null
    means the default for each of a task's options alike (timeout_s: the kind's own)."""
    return None if value is None else parse_max_attempts(value)


def parse_priority_or_default(value: object) -> int:
    """parse_priority, with null as absent: 0."""
    return 0 if value is None else parse_priority(value)


def _whole(value: object) -> int | None:
    """`value` as an int if it is a whole number as JSON Schema's `integer` has it (`3`, or
    `3.0`: the same number), not a bool; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def parse_timeout_s(value: object) -> float | None:
    """Return `value` as a float if it is a task's timeout: a number of seconds above 0
    (None: the kind's own). That it is within its kind's own limit, which takes a setting,
    is the domain's to check (`tasks.check_options`)."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an integer of over 308 digits
            seconds = math.inf
        # (NaN fails the comparison.)
        if 0 < seconds < math.inf:
            return seconds
    raise ValueError(f"timeout_s {excerpt(value)} is not a number of seconds above 0")


def parse_cursor(value: object) -> str:
    """Return `value` if it is a cursor this API issued (CURSOR_PATTERN), as it came."""
    if not isinstance(value, str) or not _CURSOR.fullmatch(value):
        raise ValueError(_NOT_A_CURSOR.format(excerpt(value)))
    return value


_NOT_A_CURSOR = (
    "cursor {} is not a cursor this API issued: send the `next_cursor` of the page before,"
    " as it came"
)


def excerpt(value: object, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters: errors never echo more of the input."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit] + value[-2:]
    try:
        text = repr(value)
    except ValueError:  # an integer of thousands of digits
        return "a number too long to show"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def parse_execute_at(value: object) -> datetime:
    """Return an aware UTC datetime from an RFC 3339 date-time with an offset, or from Unix seconds.

    A date-time without an offset is rejected rather than guessed at. Unix seconds are read
    to the microsecond from their decimal form (integers exactly).
    """
    if isinstance(value, bool):
        raise ValueError(f"execute_at must be {_FORMS}")
    if isinstance(value, int | float):
        return _from_unix_s(value)
    if isinstance(value, str):
        text = value.strip()
        # RFC 3339's form only: Python's parser also takes ISO 8601's others (20300101T1200Z,
        # week dates, hours alone) and offsets past 23:59 (+00:99, read as 1 h 39 min).
        if not _RFC_3339.fullmatch(text):
            raise ValueError(f"execute_at {excerpt(value)} is not {_FORMS}")
        try:
            # upper(): RFC 3339 allows a lowercase t and z, Python's parser does not.
            parsed = datetime.fromisoformat(text.upper())
        except ValueError:
            raise ValueError(_not_taken(value, text)) from None
        offset = parsed.utcoffset()
        if offset is None:
            raise ValueError(
                f"execute_at {excerpt(value)} has no UTC offset; add one, e.g. 'Z' or '+02:00'"
            )
        # On the range's first and last days, an offset that could leave it is refused even
        # where this time would not (0001-01-01T05:00+01:00): a rule the API's schema can
        # state exactly (DATE_TIME_PATTERN), unlike "the time is later than the offset".
        if (parsed.date() == MIN_EXECUTE_AT.date() and offset > timedelta(0)) or (
            parsed.date() == MAX_EXECUTE_AT.date() and offset < timedelta(0)
        ):
            raise ValueError(
                f"execute_at {excerpt(value)} is on the first or last day of the range with an"
                " offset that can take it out of 0001-01-01T00:00:00Z to"
                " 9999-12-31T23:59:59.999999Z: give it in UTC"
            )
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            # e.g. 9999-12-31T23:00:00-05:00, which is in year 10000 in UTC.
            raise ValueError(
                f"execute_at {excerpt(value)} is outside 0001-01-01T00:00:00Z to "
                "9999-12-31T23:59:59.999999Z once converted to UTC"
            ) from None
    raise ValueError(f"execute_at must be {_FORMS}")


def _not_taken(value: object, text: str) -> str:
    """Why an RFC 3339 date-time in form (`text`, stripped) is refused: RFC 3339 allows
    year 0 and a leap second, this API neither (DATE_TIME_PATTERN); else, it is no date."""
    if text[17:19] == "60":
        return (
            f"execute_at {excerpt(value)} is a leap second (second 60), which is not taken:"
            " give the second after it"
        )
    if text.startswith("0000"):
        return f"execute_at {excerpt(value)} is in year 0; the earliest is 0001-01-01T00:00:00Z"
    return f"execute_at {excerpt(value)} is not {_FORMS}"


# The date-time strings parse_execute_at refuses, among those of JSON Schema's `date-time`
# format (RFC 3339): year 0, a leap second (Python's datetime has none), and the offsets it
# refuses on the range's first and last days.
DATE_TIME_PATTERN = (
    "^(?!0000-"
    "|[^Tt ]*[Tt ][0-9]{2}:[0-9]{2}:60"
    "|0001-01-01[Tt ][^+]*[+](?!00:?00$)"
    "|9999-12-31[Tt ][^-]*-(?!00:?00$))"
)


def _from_unix_s(value: float) -> datetime:
    # (NaN and infinities fail the comparison; math.isfinite would raise on an integer of
    # over 308 digits.)
    if not 0 <= value < END_UNIX_S:
        raise ValueError(
            f"execute_at {excerpt(value)} is not a Unix time from 0 up to (not including)"
            f" {END_UNIX_S} (1970 to the end of 9999)"
        )
    us = _quick_us(value) if value.__class__ is float else None
    return _EPOCH + timedelta(microseconds=_unix_us(value) if us is None else us)


def _unix_us(value: float) -> int:
    """Unix seconds as whole microseconds, read from the number's shortest decimal form,
    not by float arithmetic: 1.000001 is one second and one microsecond, not a hair less;
    halves go to even. Below END_UNIX_S this stays in 9999: the largest float below it is
    30 us short of it."""
    text = repr(value)
    if "e" in text:  # below 1e-4 (never above END_UNIX_S)
        return int((Decimal(text) * 1_000_000).to_integral_value(ROUND_HALF_EVEN))
    whole, _, fraction = text.partition(".")
    us = int(whole) * 1_000_000 + int(fraction[:6].ljust(6, "0"))
    # The digits past the microsecond (a shortest form ends in no zero): over half, half.
    rest = fraction[6:]
    if rest > "5" or (rest == "5" and us % 2):
        us += 1
    return us


# The form most date-times come in: RFC 3339 in UTC, to the microsecond at most. Half the
# time of parse_execute_at (2.0 us against 4.2 here), with the same result.
_UTC_DATE_TIME = re.compile(
    "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:[.][0-9]{1,6})?Z"
)

# Below 2**31 s (2038), a float's shortest decimal form is within 2**-23 s of it (half its
# spacing there), and `value * 1e6` within 0.125 of its exact product (half the spacing of
# floats below 2**51): 0.2443 us in all. So when that product is within 0.25 of a whole
# number, the decimal form's microseconds round to that number, halves or not, and
# `_unix_us` need not be asked. (It costs ~1.7-5 us a value here; this, ~0.1 us.) Used
# below 2**30 s, where the exact reading that follows does not apply.
# From 2**30 s (2004) to 2**32 s (2106) a float is a whole number of 2**-22 s, so
# `value * 2**22 * 15625` is its product with 10**6 * 2**16, exactly, as an integer. There
# (ten digits before the point) its shortest decimal form is whole microseconds (16 digits
# or fewer), or the 17-digit decimal nearest it: within 0.05 us, 3276.8 in those units. When
# no half microsecond lies that close to the exact product, the decimal form rounds to the
# microsecond the product rounds to; a tenth of the values are that close, and go to
# `_unix_us`. (Measured: no mismatch past 3276 in 1.2 million floats next to halves.)
_EXACT_FROM_S = 2**30
_EXACT_BELOW_S = 2**32


def _quick_us(value: float) -> int | None:
    """`_unix_us(value)` where float arithmetic decides it (see above), else None."""
    if _EXACT_FROM_S <= value < _EXACT_BELOW_S:
        exact = int(value * 4194304.0) * 15625
        past_half = (exact & 0xFFFF) - 0x8000
        if -3276 <= past_half <= 3276:
            return None
        return (exact >> 16) + (past_half > 0)
    if value < _EXACT_FROM_S:
        us = round(product := value * 1e6)
        if abs(product - us) < 0.25:
            return us
    return None


def encode_cursor(at: Position) -> str:
    """The cursor of a page that goes on after `at`, in `at.order`."""
    if at.order.key is SortKey.ID:
        return f"{at.order.name}.{at.id}"
    return f"{at.order.name}.{at.key}.{at.id}"


# The order of the cursors made before there was any other: ascending ids.
_ORDER_BEFORE = TaskOrder(SortKey.ID, descending=False)


def decode_cursor(cursor: str) -> Position:
    """The position a cursor of `encode_cursor`'s (or an earlier version's) names; an id past
    the largest is the largest, a time past the range its end (nothing is after either)."""
    try:
        parse_cursor(cursor)
        if cursor.startswith("YWZ0ZXI6"):
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            last_id = min(int(raw.removeprefix("after:")), BIGINT_MAX)
            return Position(_ORDER_BEFORE, last_id, last_id)
        sort, _, rest = cursor.partition(".")
        order = parse_sort(sort)
        *key, last_id = (int(part) for part in rest.split("."))
        last_id = min(last_id, BIGINT_MAX)
        return Position(order, key[0] if key else last_id, last_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput(_NOT_A_CURSOR.format(excerpt(cursor))) from None


def parse_sort(value: object) -> TaskOrder:
    """The order a `sort` parameter names: `id`, `execute_at` or `finished_at`, ascending,
    or descending with a leading `-`."""
    if isinstance(value, str) and value in SORTS:
        return TaskOrder(SortKey(value.removeprefix("-")), descending=value.startswith("-"))
    raise ValueError(
        f"sort {excerpt(value)} is not one of {', '.join(SORTS)} (a leading `-`: descending)"
    )


# A JSON number, as a query string carries one.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:[.][0-9]+)?(?:[eE][+-]?[0-9]+)?")


def parse_time_bound(value: object, name: str) -> datetime | None:
    """A time a listing is bounded by (`created_after`, ...), read from a query string as
    `execute_at` is read from a body: RFC 3339 with an offset, or Unix seconds (a number).

    Times are kept to the microsecond and a bound excludes its own time, so a bound finer
    than that is taken to the microsecond on its own side: an `_after` bound down, a
    `_before` one up (a task at .123456 is before .1234561). None: a `_before` bound past
    the last microsecond of 9999, which every time is before."""
    finer = False  # whether the bound lies between two microseconds
    try:
        if isinstance(value, str) and _NUMBER.fullmatch(value) and "e" not in value.lower():
            number = Decimal(value)
            if number == number.to_integral_value():
                parsed = parse_execute_at(int(number))
            elif not 0 <= number < END_UNIX_S:
                parsed = parse_execute_at(float(value))  # (refused, saying why)
            else:
                us = number * 1_000_000
                finer = us != us.to_integral_value()
                # (The microsecond below it, where a float's would round to the nearest.)
                parsed = _EPOCH + timedelta(microseconds=int(us.to_integral_value(ROUND_FLOOR)))
        else:
            # (An exponent past a double's range is infinite: refused.)
            number_e = isinstance(value, str) and _NUMBER.fullmatch(value)
            parsed = parse_execute_at(float(value) if number_e else value)  # type: ignore[arg-type]
            fraction = _FRACTION.search(value) if isinstance(value, str) else None
            # (A date-time's fraction is cut to the microsecond: the one below it.)
            finer = fraction is not None and bool(fraction[1][6:].strip("0"))
    except ValueError as exc:
        raise ValueError(str(exc).replace("execute_at", name, 1)) from None
    if not finer or not name.endswith("_before"):
        return parsed
    try:
        return parsed + _MICROSECOND
    except OverflowError:
        return None


def parse_error_search(value: object) -> str:
    """The text an `error` filter looks for: 1 to MAX_ERROR_SEARCH characters, not all
    blank (a search for nothing would select every task that failed), without U+0000."""
    # (Blanks as the API's schema says them, ASCII's: any other character is searched for.)
    blank = not isinstance(value, str) or not value.strip(" \t\n\r\f\v")
    if blank or not isinstance(value, str) or len(value) > MAX_ERROR_SEARCH:
        raise ValueError(
            f"error {excerpt(value)} is not 1 to {MAX_ERROR_SEARCH} characters to search"
            " for (not only blanks)"
        )
    if "\x00" in value:
        # PostgreSQL's text cannot hold U+0000, so no error holds it either.
        raise ValueError(f"error {excerpt(value)} holds the character U+0000, which no error can")
    return value


def parse_payload_filter(value: object) -> str:
    """The JSON a `payload` filter holds, as compact JSON text (`null`: no payload): any
    JSON value of at most MAX_PAYLOAD_FILTER_BYTES, nested at most MAX_PAYLOAD_DEPTH."""
    if not isinstance(value, str):
        raise ValueError('payload must be JSON text, e.g. {"to":"x@y"}')
    size = len(value.encode(errors="surrogatepass"))
    if size > MAX_PAYLOAD_FILTER_BYTES:
        raise ValueError(
            f"payload is {size:,} bytes, over the limit of {MAX_PAYLOAD_FILTER_BYTES:,} for a"
            " filter"
        )
    try:
        sent = json.loads(value)
    except (ValueError, RecursionError):
        raise ValueError(f'payload {excerpt(value)} is not JSON, e.g. {{"to":"x@y"}}') from None
    # (Its size is the text's, checked above: as compact JSON a number may grow, 1e5 to
    # 100000.0, and is not held to it again.)
    return payload_json(sent, 4 * MAX_PAYLOAD_FILTER_BYTES)


def count_values(body: bytes, bound: int) -> int:
    """How many values a JSON body holds, without reading it: its strings, and its commas,
    `{` and `[` outside strings; a number no lower (a bracket or comma inside a string may
    count), and over `bound` (`model.max_values`) only when the body holds more than it.

    A few passes over the body in C (~0.1 s at most for 8 MiB): strings are told apart only
    when the bound counted with them is over `bound`.
    """

    def count(text: bytes) -> int:
        return text.count(b",") + text.count(b"{") + text.count(b"[")

    quotes = body.count(b'"')
    found = count(body) + quotes // 2
    if found <= bound or not quotes:
        return found
    # Without its escaped backslashes and quotes, every quote left in a body opens or closes
    # a string. (A backslash is JSON only inside a string: where there is one outside, the
    # body fails to parse there, and what follows is never read.)
    plain = body
    if b"\\" in body:
        plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = (plain.count(b'"') + 1) // 2
    if strings > bound:
        return strings
    return count(b"".join(plain.split(b'"')[::2])) + strings


# What a number too small for a double needs: an exponent of -100 or below, or a fraction
# starting with 100 zeros. Only a body with one is read again to find it (strings and
# numbers that read exactly never get past this).
_MAYBE_TINY = re.compile(rb"[eE]-[0-9]{3}|\.0{100}")
_NONZERO = re.compile(r"[1-9]")


class _Underflow(ValueError):
    pass


def _exact_float(text: str) -> float:
    value = float(text)
    if value == 0 and _NONZERO.search(text.partition("e")[0].partition("E")[0]):
        raise _Underflow(text)
    return value


def tiny_number(body: bytes) -> str | None:
    """The first number in the JSON `body` too small for a double, which json.loads and
    pydantic-core read as 0 (`1e-400`); None if there is none, or the body is not JSON (its
    reader says why). A body with one is refused as one with `1e400` is, not stored as 0."""
    if not _MAYBE_TINY.search(body):
        return None
    try:
        json.loads(body, parse_float=_exact_float)
    except _Underflow as exc:
        return str(exc)
    except (ValueError, RecursionError):
        return None
    return None


# The one way a payload is written: compact, characters as they are (UTF-8). Its size is
# the length of this in UTF-8; NaN and Infinity are refused (JSON has no such numbers).
_dump_payload = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
# `\u0000` written for the character U+0000: a backslash that no other backslash escapes.
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def payload_json(value: Any, max_bytes: int) -> str:
    """`value` as the compact JSON it is stored and measured as; ValueError saying why, if
    it is more than `max_bytes` in UTF-8 or cannot be stored (NaN or Infinity, the
    character U+0000, which jsonb refuses, a lone surrogate, nesting past MAX_PAYLOAD_DEPTH).
    """
    try:
        text = _dump_payload(value)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    except ValueError:  # (the only one json.dumps raises on values json.loads makes)
        raise ValueError(
            "payload holds NaN, Infinity or a number too large for a double, which JSON"
            " cannot write"
        ) from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise ValueError(
            "payload holds a lone surrogate (a \\ud800-\\udfff escape without its pair),"
            " which is not Unicode text"
        ) from None
    if size > max_bytes:
        raise ValueError(
            f"payload is {size:,} bytes as compact JSON in UTF-8, over the limit of"
            f" {max_bytes:,} (TASKRUNNER_MAX_PAYLOAD_BYTES)"
        )
    if "\\u0000" in text and _NUL.search(text):
        raise ValueError(
            "payload holds the character U+0000 (\\u0000), which PostgreSQL's jsonb cannot store"
        )
    # Fewer brackets than the limit in all cannot nest past it; only more are walked.
    if text.count("[") + text.count("{") > MAX_PAYLOAD_DEPTH and _depth(value) > MAX_PAYLOAD_DEPTH:
        raise ValueError(_TOO_DEEP)
    return text


_TOO_DEEP = f"payload nests deeper than {MAX_PAYLOAD_DEPTH} arrays and objects"


def _depth(value: Any) -> int:
    """How deep `value` nests (a scalar 0, `[]` 1), walked without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if item.__class__ is dict:
            children: Any = item.values()
        elif item.__class__ is list:
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_PAYLOAD_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def same_payload(a: Any, b: Any) -> bool:
    """Whether two payloads are equal as jsonb compares them: objects whatever their keys'
    order, numbers by value, `true` never equal to `1`. (Both checked by `payload_json`:
    they nest at most MAX_PAYLOAD_DEPTH.)"""
    if a.__class__ is bool or b.__class__ is bool:
        return a is b
    if a.__class__ is dict:
        return (
            b.__class__ is dict
            and a.keys() == b.keys()
            and all(same_payload(v, b[k]) for k, v in a.items())
        )
    if a.__class__ is list:
        return b.__class__ is list and len(a) == len(b) and all(map(same_payload, a, b))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return a.__class__ is b.__class__ and a == b


def read_batch(items: list[Any]) -> list[dict[str, Any]] | None:
    """The batch's items as `store.insert_tasks_streamed` takes them (kind, time in whole
    microseconds, and the payload and options as sent, when there are), if each is a task
    with a type, an execute_at and perhaps a payload and options (ITEM_KEYS), and nothing
    else; None if any item has more (an idempotency key) or is refused (then
    `create_tasks`, through the full schema, says why). The rules of the payload and of a
    timeout's ceiling are the caller's (`tasks.create_tasks_streamed`): they take a setting.

    A 10,000-task batch is read here in a few milliseconds, by the rules a single task is
    read by: a type already in lowercase is taken as it is, any other goes through
    parse_kind; Unix seconds become microseconds as `_unix_us` makes them; a string goes
    through parse_execute_at.
    """
    out: list[dict[str, Any]] = []
    append = out.append
    # Seconds `_unix_us` read already: a batch often holds one time many times.
    read: dict[float, int] = {}
    for item in items:
        if item.__class__ is not dict:
            return None
        size = len(item)
        if size != 2 and not ITEM_KEYS.issuperset(item):
            return None
        kind = item.get("type")
        at = item.get("execute_at")
        if kind.__class__ is not str or kind not in KINDS:
            try:
                kind = parse_kind(kind)
            except ValueError:
                return None
        if at.__class__ is float:
            # (NaN fails the comparison; a bool is not a float or an int by class.)
            if not 0 <= at < END_UNIX_S:
                return None
            us = _quick_us(at)
            if us is None:
                us = read.get(at)
                if us is None:
                    us = read[at] = _unix_us(at)
        elif at.__class__ is int:
            if not 0 <= at < END_UNIX_S:
                return None
            us = at * 1_000_000
        else:
            try:
                if at.__class__ is str and _UTC_DATE_TIME.fullmatch(at):
                    # In UTC: parse_execute_at's checks of offsets have nothing to check.
                    us = (datetime.fromisoformat(at) - _EPOCH) // _MICROSECOND
                else:
                    us = (parse_execute_at(at) - _EPOCH) // _MICROSECOND
            except ValueError:  # (year 0, a leap second: parse_execute_at says why)
                return None
        if size == 2:
            append({"kind": kind, "at_us": us})
            continue
        row = {"kind": kind, "at_us": us}
        try:
            for name, value in item.items():
                read_option = _READ_OPTION.get(name)
                if read_option is not None and (value := read_option(value)) is not None:
                    row[name] = value
        except ValueError:
            return None
        append(row)
    return out


# What a task's body (and a batch's item, but for its idempotency key) may hold.
ITEM_KEYS = frozenset({"type", "execute_at", "payload", "max_attempts", "timeout_s", "priority"})
# How each of the rest is read; None: as if absent (null is the default of each: no payload,
# TASKRUNNER_MAX_ATTEMPTS, the kind's own timeout, priority 0).
_READ_OPTION: dict[str, Any] = {
    "payload": lambda value: value,
    "max_attempts": parse_max_attempts_or_default,
    "timeout_s": parse_timeout_s,
    "priority": lambda value: None if value is None else parse_priority(value),
}


def new_task(row: dict[str, Any], idempotency_key: str | None = None) -> NewTask:
    """A task read by `read_batch` (one of its rows), to create on its own."""
    return NewTask(
        row["kind"],
        _EPOCH + timedelta(microseconds=row["at_us"]),
        idempotency_key,
        row.get("payload"),
        max_attempts=row.get("max_attempts"),
        timeout_s=row.get("timeout_s"),
        priority=row.get("priority", 0),
    )
