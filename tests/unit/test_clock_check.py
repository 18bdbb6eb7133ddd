"""ClockCheck: a worker claims ahead of time only while its clock keeps time with the
database's, measured over its claims (a claim's span on the worker's clock holds the span
on the database's)."""

import pytest

from functions.run_state import ClockCheck


def _claims(rate: float, every_s: float, count: int, trip_s: float = 0.002) -> ClockCheck:
    """`count` claims `every_s` apart by the database's clock, each taking `trip_s` there
    and a round trip of 2 x `trip_s`, on a worker clock that runs `rate` times as fast."""
    check = ClockCheck()
    for n in range(count):
        now_s = 1_800_000_000.0 + n * every_s
        sent = (n * every_s - trip_s) * rate
        check.claimed(sent, now_s, sent + 3 * trip_s * rate, now_s + trip_s)
    return check


def test_a_clock_that_keeps_time_passes_once_a_span_is_long_enough() -> None:
    assert not _claims(1.0, 0.05, 5).keeps_time  # 0.2 s: not yet
    assert _claims(1.0, 0.1, 12).keeps_time
    assert _claims(1.0, 5.0, 100).keeps_time  # the reference moves on; still fine


@pytest.mark.parametrize("rate", [2.0, 1.05, 1.01])
def test_a_fast_clock_fails(rate: float) -> None:
    """libfaketime's "x2", or a clock some percent fast: tasks claimed ahead would start
    early, so none is (checked over the span it takes to see it)."""
    assert not _claims(rate, 0.5, 130).keeps_time


def test_a_slow_clock_passes() -> None:
    """A slow clock starts tasks late, never early."""
    assert _claims(0.5, 0.5, 10).keeps_time


def test_a_slow_answer_fails_until_the_next_span_shows_time_kept() -> None:
    check = _claims(1.0, 0.5, 5)
    assert check.keeps_time
    check.claimed(2.498, 1_800_000_002.5, 3.0, 1_800_000_002.502)  # answered 0.5 s late
    assert not check.keeps_time
    check.claimed(2.998, 1_800_000_003.0, 3.004, 1_800_000_003.002)
    assert check.keeps_time
