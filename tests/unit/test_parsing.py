import json
import random
import re
import struct
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from functions import parsing
from functions.completer import retry_delay_s
from functions.errors import InvalidInput
from functions.model import (
    MAX_EXECUTE_AT,
    MAX_VALUES_READ,
    MIN_EXECUTE_AT,
    SORTS,
    Position,
    SortKey,
    TaskOrder,
    max_values,
    microseconds,
)
from functions.parsing import (
    _quick_us,
    _unix_us,
    count_values,
    decode_cursor,
    encode_cursor,
    parse_execute_at,
    parse_kind,
    parse_sort,
)
from functions.settings import Settings


@pytest.mark.parametrize("raw", ["foo", "Foo", " BAZ ", "bar"])
def test_kind_is_case_insensitive_and_lowercased(raw: str) -> None:
    assert parse_kind(raw) == raw.strip().lower()


@pytest.mark.parametrize("raw", ["qux", "", None, 3, "foo bar"])
def test_unknown_kind_is_rejected_with_the_choices(raw: object) -> None:
    with pytest.raises(ValueError, match="type"):
        parse_kind(raw)


def test_iso_time_with_offset_is_read_as_that_instant() -> None:
    parsed = parse_execute_at("2030-01-01T12:00:00+02:00")
    assert parsed == datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
    assert parsed.tzinfo is UTC


def test_z_suffix_and_fractional_seconds() -> None:
    assert parse_execute_at("2030-01-01T12:00:00.250Z") == datetime(
        2030, 1, 1, 12, 0, 0, 250_000, tzinfo=UTC
    )


@pytest.mark.parametrize("raw", [1_893_499_200, 1_893_499_200.5])
def test_unix_seconds(raw: float) -> None:
    assert parse_execute_at(raw) == datetime.fromtimestamp(raw, UTC)


def test_naive_time_is_rejected_not_guessed() -> None:
    with pytest.raises(ValueError, match="no UTC offset"):
        parse_execute_at("2030-01-01T12:00:00")


@pytest.mark.parametrize(
    "raw",
    [
        "2030-01-01T12:00:00+00:99",
        "2030-01-01T12:00:00-00:75",
        "2030-01-01T12:00:00+24:00",
        "2030-01-01T12:00:00+0099",
        "2030-01-01T12:00:00+01:30:99",
        "2030-01-01T12:00:00.Z",
        "2030-01-01T12:00:00,5Z",
        "20300101T120000Z",
        "2030-W01-1T12:00Z",
        "2030-01-01T12Z",
        "2030-01-01T12:00Z",
        "2030-01-01T12:00:00\u00a0Z",
        "\u0662030-01-01T12:00:00Z",
    ],
)
def test_what_rfc_3339_does_not_allow_is_refused(raw: str) -> None:
    """Python's parser reads these (ISO 8601's other forms, offsets past 23:59); the API
    says RFC 3339, and +00:99 is no offset (it was read as 1 h 39 min)."""
    with pytest.raises(ValueError, match="is not an RFC 3339 date-time"):
        parse_execute_at(raw)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("2030-06-30T23:59:60Z", "is a leap second (second 60), which is not taken"),
        ("2030-06-30t23:59:60.5+02:00", "is a leap second (second 60), which is not taken"),
        ("0000-01-01T00:00:00Z", "is in year 0; the earliest is 0001-01-01T00:00:00Z"),
        ("2030-02-30T00:00:00Z", "is not an RFC 3339 date-time"),
    ],
)
def test_what_rfc_3339_allows_and_this_api_does_not_says_why(raw: str, why: str) -> None:
    """RFC 3339 allows a leap second and year 0 (the API's schema leaves both out): the
    refusal names them, rather than saying the text is not RFC 3339."""
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_execute_at(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2030-01-01t12:00:00z", datetime(2030, 1, 1, 12, tzinfo=UTC)),
        ("2030-01-01 12:00:00+23:59", datetime(2029, 12, 31, 12, 1, tzinfo=UTC)),
        (" 2030-01-01T12:00:00.1234567-00:30 ", datetime(2030, 1, 1, 12, 30, 0, 123456, UTC)),
    ],
)
def test_rfc_3339_in_all_its_forms(raw: str, expected: datetime) -> None:
    assert parse_execute_at(raw) == expected


@pytest.mark.parametrize(
    "raw", ["tomorrow", "", "2030-13-01T00:00:00Z", True, None, [], -1, float("nan"), 1e20]
)
def test_not_a_time_is_rejected(raw: object) -> None:
    with pytest.raises(ValueError, match="execute_at"):
        parse_execute_at(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (253402300799, datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
        (253402300799.99997, datetime(9999, 12, 31, 23, 59, 59, 999970, tzinfo=UTC)),
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        (-0.0, datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_unix_seconds_at_the_ends_of_the_range(raw: float, expected: datetime) -> None:
    assert parse_execute_at(raw) == expected


@pytest.mark.parametrize("raw", [253402300800, 253402300799.999999, 253402300800.5, 10**30])
def test_unix_seconds_from_the_year_10000_on_are_refused(raw: float) -> None:
    # 253402300799.999999 is the float 253402300800.0: it cannot mean 9999 any more.
    with pytest.raises(ValueError, match="up to"):
        parse_execute_at(raw)


def test_aware_non_utc_is_normalised_to_utc() -> None:
    tz = timezone(timedelta(hours=-5))
    assert parse_execute_at(datetime(2030, 1, 1, 7, tzinfo=tz).isoformat()).hour == 12


@pytest.mark.parametrize("last_id", [1, 17, 2**63 - 1])
@pytest.mark.parametrize("sort", SORTS)
def test_cursor_round_trip(last_id: int, sort: str) -> None:
    order = parse_sort(sort)
    for key in (
        [last_id]
        if order.key is SortKey.ID
        else [microseconds(MIN_EXECUTE_AT), -1, 0, microseconds(MAX_EXECUTE_AT)]
    ):
        at = Position(order, key, last_id)
        assert decode_cursor(encode_cursor(at)) == at


# What the version before `sort` issued: "after:<id>" in base64url, by ascending id.
BEFORE = "YWZ0ZXI6NQ"  # after:5


def test_a_cursor_from_before_goes_on_by_ascending_id() -> None:
    assert decode_cursor(BEFORE) == Position(TaskOrder(SortKey.ID, descending=False), 5, 5)
    assert decode_cursor("YWZ0ZXI6OTk5OTk5OTk5OTk5OTk5OTk5OQ").id == 2**63 - 1  # 19 nines


@pytest.mark.parametrize(
    "cursor",
    ["zz", "!!", "YWJj", BEFORE[:-2] + "xx", "id", "id.", "-id.1.2", "execute_at.5",
     "execute_at.1234567890123456789.1", "+id.5", "id.-5", "created_at.1.1", "id.5 "],
)  # fmt: skip
def test_foreign_cursor_is_invalid_input(cursor: str) -> None:
    with pytest.raises(InvalidInput):
        decode_cursor(cursor)


def test_retry_delay_doubles_up_to_the_cap() -> None:
    settings = Settings(retry_base_s=1.0, retry_max_s=5.0)
    assert [retry_delay_s(settings, n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


# Unix seconds in 2004-2106 as clients send them: float arithmetic on time.time() (all 17
# digits), decimals to the microsecond and past it, and floats a few steps from a half
# microsecond, where the decimal form and the float round apart.
def _near_half_us(k: int, steps: int) -> float:
    bits = struct.unpack("<q", struct.pack("<d", (k + 0.5) / 1e6))[0] + steps
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


SECONDS = st.one_of(
    st.floats(2**30, 2**32, exclude_max=True),
    st.builds(
        lambda s, us, digits: float(f"{s}.{us:09d}"[: len(str(s)) + 1 + digits]),
        st.integers(2**30, 2**32 - 1), st.integers(0, 10**9 - 1), st.integers(1, 9),
    ),
    st.floats(0, 2**30),
)  # fmt: skip


@settings(max_examples=5000, deadline=None)
@given(SECONDS)
def test_float_arithmetic_reads_microseconds_as_the_decimal_form_does(value: float) -> None:
    """`_quick_us` answers only where float arithmetic decides the microsecond; where it
    answers, it is the microsecond of the float's shortest decimal form (`_unix_us`)."""
    quick = _quick_us(value)
    assert quick is None or quick == _unix_us(value)


@pytest.mark.parametrize("seconds", [(2**30, 2**31), (2**31, 2**32)])
def test_floats_next_to_a_half_microsecond_are_read_as_their_decimal_form(
    seconds: tuple[int, int],
) -> None:
    """Where the float nearest a half microsecond is barely on one side, its decimal form
    is the half itself (rounded to even): what float arithmetic decides must not be that
    close. 20,000 half microseconds in each range of float spacing, and their neighbours."""
    rng = random.Random(20261128)
    for _ in range(20_000):
        k = rng.randrange(seconds[0] * 10**6, seconds[1] * 10**6)
        for steps in (-2, -1, 0, 1, 2):
            value = _near_half_us(k, steps)
            quick = _quick_us(value)
            assert quick is None or quick == _unix_us(value), repr(value)


def test_float_arithmetic_decides_most_times_clients_send() -> None:
    now = 1_795_860_000.0
    sent = [now + i * 0.36 for i in range(10_000)] + [
        round(now + i * 0.37, 6) for i in range(10_000)
    ]
    decided = [_quick_us(value) for value in sent]
    assert sum(us is not None for us in decided) > 0.7 * len(sent)
    assert [us if us is not None else _unix_us(v) for us, v in zip(decided, sent, strict=True)] == [
        _unix_us(v) for v in sent
    ]


def structure(value: Any) -> int:
    """What `count_values` counts in `value` written as JSON: its strings (keys too), its
    objects and arrays, and the commas between their items."""
    if isinstance(value, str):
        return 1
    if isinstance(value, list):
        return 1 + max(len(value) - 1, 0) + sum(structure(v) for v in value)
    if isinstance(value, dict):
        return 1 + max(len(value) - 1, 0) + sum(1 + structure(v) for v in value.values())
    return 0


# Strings full of what could be taken for JSON's structure: quotes, backslashes, brackets.
tricky = st.text(alphabet='",{[\\]}:ab \n\u00e9', max_size=12)
documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(tricky, inner, max_size=5),
    max_leaves=40,
)


@given(documents, st.booleans(), st.booleans())
@settings(max_examples=500)
def test_a_body_is_over_the_bound_exactly_when_it_holds_more(
    value: Any, ascii_only: bool, indented: bool
) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only, indent=1 if indented else None).encode()
    held = structure(value)
    assert count_values(body, held) >= held
    # Over the bound exactly when the body holds more than it, whatever its strings hold.
    for bound in (held - 1, held, held + 1):
        assert (count_values(body, bound) > bound) == (held > bound), bound
    # No JSON is over the bound of its own length: a body within the body limit never is.
    assert count_values(body, max_values(len(body))) <= max_values(len(body))


@pytest.mark.parametrize("unit", [b"[],", b"{},", b'"",', b"0,", b'{"":[]},'])
def test_the_densest_json_is_at_the_bound_of_its_length(unit: bytes) -> None:
    """Payloads of 64 KiB of the densest JSON, as many as fit in 1 MiB (a body limit where
    two values in three bytes stay under MAX_VALUES_READ): every task is acceptable alone, so
    the batch is too. Past it, a body is held to MAX_VALUES_READ whatever its length."""
    payload = b"[" + unit * ((65_536 - 2) // len(unit)) + unit.rstrip(b",") + b"]"
    item = b'{"type":"baz","execute_at":0,"idempotency_key":"k","payload":' + payload + b"}"
    count = (1024 * 1024 - 12) // (len(item) + 1)
    body = b'{"tasks":[' + b",".join([item] * count) + b"]}"
    json.loads(body)
    assert len(body) <= 1024 * 1024
    assert count_values(body, max_values(len(body))) <= max_values(len(body))
    big = b'{"tasks":[' + b",".join([item] * (count * 8)) + b"]}"
    assert max_values(len(big)) == MAX_VALUES_READ < count_values(big, MAX_VALUES_READ)


@pytest.mark.parametrize(
    "body",
    [
        b'{"tasks": [' + b"{" * 3_000_000,
        b"[" * 3_000_000,
        b"[" + b"," * 3_000_000 + b"]",
        # A string of escaped quotes, then arrays opened.
        b'["' + b'\\"' * 1_000_000 + b'", ' + b"[" * 6_000_000,
    ],
    ids=["objects", "arrays", "commas", "escapes"],
)
def test_a_body_denser_than_json_is_over_the_bound(body: bytes) -> None:
    bound = max_values(len(body))
    assert count_values(body, bound) > bound


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


@pytest.mark.parametrize(
    "value",
    [None, 0, "", [], {}, "é日🎉", {"b": [1, {"c": None}], "a": True}, 10**40, -1.5e-7],
)
def test_a_payload_is_measured_as_compact_utf8_json(value: Any) -> None:
    size = _size(value)
    assert parsing.payload_json(value, size) == json.dumps(
        value, separators=(",", ":"), ensure_ascii=False
    )
    with pytest.raises(ValueError, match=f"payload is {size:,} bytes .* limit of {size - 1:,}"):
        parsing.payload_json(value, size - 1)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (float("nan"), "NaN"),
        ([float("-inf")], "Infinity"),
        ("a\x00b", "U+0000"),
        ({"k\x00": 1}, "U+0000"),
        ("\\\x00", "U+0000"),  # an escaped backslash, then the character
        ("\ud800", "surrogate"),
        ({"a": "\udfff"}, "surrogate"),
    ],
)
def test_a_payload_jsonb_cannot_store_is_refused(value: Any, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parsing.payload_json(value, 1_000_000)


def test_the_text_backslash_u0000_is_not_the_character() -> None:
    # `\u0000` written out as six characters: JSON writes its backslash escaped.
    for text in ("\\u0000", "\\\\u0000", "a\\u0000b"):
        assert "\x00" not in parsing.payload_json(text, 100)


def test_a_payload_nests_at_most_100_deep() -> None:
    def nested(depth: int) -> Any:
        value: Any = 1
        for i in range(depth):
            value = [value] if i % 2 else {"k": value}
        return value

    parsing.payload_json(nested(100), 10_000)
    # 100 brackets, none deeper than 2: walked, and taken.
    parsing.payload_json([[1]] * 100, 10_000)
    with pytest.raises(ValueError, match="deeper than 100"):
        parsing.payload_json(nested(101), 10_000)
    # Deeper than the json module can write: refused the same, not a RecursionError.
    with pytest.raises(ValueError, match="deeper than 100"):
        parsing.payload_json(nested(100_000), 10**9)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ({"a": 1, "b": [1, 2]}, {"b": [1, 2.0], "a": 1.0}, True),
        (True, 1, False),
        ([1], [True], False),
        ({"a": False}, {"a": 0}, False),
        (None, None, True),
        (None, {}, False),
        ("1", 1, False),
        ([1, 2], [2, 1], False),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        (10**30, 10**30, True),
    ],
)
def test_payloads_are_the_same_as_jsonb_compares_them(a: Any, b: Any, same: bool) -> None:
    assert parsing.same_payload(a, b) is same
    assert parsing.same_payload(b, a) is same


@pytest.mark.parametrize(
    ("value", "name", "expected"),
    [
        # Finer than a microsecond: taken to the microsecond on the bound's own side, as
        # the bound excludes its own time (a task at .123456 is before .1234561).
        ("2030-01-01T12:00:00.1234561Z", "execute_before", "2030-01-01T12:00:00.123457"),
        ("2030-01-01T12:00:00.1234569Z", "execute_after", "2030-01-01T12:00:00.123456"),
        ("2030-01-01T12:00:00.1234560Z", "execute_before", "2030-01-01T12:00:00.123456"),
        ("1893499200.1234569", "created_after", "2030-01-01T12:00:00.123456"),
        ("1893499200.1234561", "created_before", "2030-01-01T12:00:00.123457"),
        ("0001-01-01T00:00:00.0000001Z", "execute_before", "0001-01-01T00:00:00.000001"),
        ("0001-01-01T00:00:00.0000001Z", "execute_after", "0001-01-01T00:00:00"),
        ("253402300799.9999999", "finished_after", "9999-12-31T23:59:59.999999"),
        # Past the last microsecond of 9999: every time is before it.
        ("9999-12-31T23:59:59.9999999Z", "execute_before", None),
        ("253402300799.9999999", "finished_before", None),
    ],
)
def test_a_time_bound_finer_than_a_microsecond_keeps_every_time_on_its_side(
    value: str, name: str, expected: str | None
) -> None:
    bound = parsing.parse_time_bound(value, name)
    assert bound == (None if expected is None else datetime.fromisoformat(expected + "+00:00"))


@pytest.mark.parametrize("blank", [" ", "\t\n", "\r\f\v "])
def test_an_error_search_of_blanks_as_the_schema_says_them_is_refused(blank: str) -> None:
    with pytest.raises(ValueError, match="not only blanks"):
        parsing.parse_error_search(blank)


@pytest.mark.parametrize("text", ["\u00a0", "\u3000", "\x1c", "\x85"])
def test_any_other_character_is_searched_for(text: str) -> None:
    """The schema's pattern takes these; the server did not."""
    assert parsing.parse_error_search(text) == text
