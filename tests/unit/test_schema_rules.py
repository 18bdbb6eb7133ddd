"""The patterns in the OpenAPI document say exactly what the parsers accept."""

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from functions.errors import InvalidInput
from functions.model import MAX_EXECUTE_AT, MIN_EXECUTE_AT, SORTS, Position, SortKey, microseconds
from functions.parsing import (
    CURSOR_PATTERN,
    DATE_TIME_PATTERN,
    decode_cursor,
    encode_cursor,
    kind_pattern,
    parse_execute_at,
    parse_kind,
    parse_sort,
)

KIND_PATTERN = kind_pattern()


def accepts(parse: object, value: object) -> bool:
    assert callable(parse)
    try:
        parse(value)
    except (ValueError, InvalidInput):
        return False
    return True


two = st.integers(0, 99).map("{:02}".format)
offsets = st.one_of(
    st.sampled_from(["Z", "z", "+00:00", "-00:00"]),
    st.builds(
        "{}{:02}:{:02}".format, st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59)
    ),
)
fractions = st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=9).map(".{}".format))
# RFC 3339 date-times, as JSON Schema's `date-time` format has them, leaning on the ends of
# the range and on odd seconds.
rfc3339 = st.builds(
    "{}{}{}:{}:{}{}{}".format,
    st.one_of(
        st.dates().map(str),
        st.sampled_from(["0001-01-01", "0001-01-02", "9999-12-30", "9999-12-31", "0000-12-31"]),
    ),
    st.sampled_from("Tt "),
    st.integers(0, 23).map("{:02}".format),
    st.integers(0, 59).map("{:02}".format),
    st.integers(0, 60).map("{:02}".format),
    fractions,
    offsets,
)


@settings(max_examples=2000)
@given(rfc3339)
@example("0001-01-01T00:00:00+01:00")
@example("0001-01-01T23:00:00+00:01")
@example("0001-01-01T00:00:00-01:00")
@example("9999-12-31T23:00:00-05:00")
@example("9999-12-31T23:59:59.999999+05:00")
@example("9999-12-31T23:59:60Z")
@example("0000-12-31T23:59:59Z")
def test_the_date_time_pattern_is_what_the_parser_accepts(value: str) -> None:
    assert bool(re.search(DATE_TIME_PATTERN, value)) == accepts(parse_execute_at, value)


@given(
    st.sampled_from(SORTS),
    st.integers(microseconds(MIN_EXECUTE_AT), microseconds(MAX_EXECUTE_AT)),
    st.integers(1, 2**63 - 1),
)
def test_every_cursor_the_api_makes_matches_its_pattern(sort: str, key: int, last_id: int) -> None:
    order = parse_sort(sort)
    at = Position(order, last_id if order.key is SortKey.ID else key, last_id)
    assert re.fullmatch(CURSOR_PATTERN, encode_cursor(at))


@settings(max_examples=1000)
@given(
    st.one_of(
        st.from_regex(CURSOR_PATTERN, fullmatch=True),
        st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=40),
        st.text("YWZ0ZXI6MNODTjzAEIMQUYcgkwxyz012345", max_size=36),
        st.text("-._0123456789idexcutfnsha", max_size=50),
        st.from_regex("^-?(id|execute_at|finished_at)[.][0-9.-]{0,45}$", fullmatch=True),
    )
)
def test_the_cursor_pattern_is_what_the_decoder_accepts(cursor: str) -> None:
    assert bool(re.fullmatch(CURSOR_PATTERN, cursor)) == accepts(decode_cursor, cursor)


@settings(max_examples=1000)
@given(
    st.one_of(
        st.from_regex(KIND_PATTERN, fullmatch=True),
        st.text(max_size=8),
        st.builds(
            "{}{}{}".format,
            st.text(" \t\n\r\x0b\x0c\xa0", max_size=2),
            st.sampled_from(["foo", "BAR", "bAz"]),
            st.text(" \t\n\r\x0b\x0c\xa0", max_size=2),
        ),
    )
)
def test_the_kind_pattern_is_what_the_parser_accepts(name: str) -> None:
    assert bool(re.search(KIND_PATTERN, name)) == accepts(parse_kind, name)
