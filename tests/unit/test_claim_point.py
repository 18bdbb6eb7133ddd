"""Where a worker's next claim starts reading due tasks (run_state.ClaimPoint): from where
the last one left only in a backlog, for the same kinds, with no task created meanwhile, and
from the start at least every FROM_START_EVERY_S."""

from datetime import datetime
from types import SimpleNamespace

import pytest

from functions import run_state
from functions.run_state import ClaimPoint
from functions.store import ClaimFrom, NextDue

KINDS = (["baz", "foo"], ["bar"])
POINT = ClaimFrom([datetime(2026, 1, 1)] + [None] * 9, [42] + [None] * 9)
ANSWER = NextDue(now_s=0.0, wait_s=None, claim_from=POINT)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    # run_state reads time.monotonic() through its own `time`: only its clock is moved.
    monkeypatch.setattr("functions.run_state.time", SimpleNamespace(monotonic=clock))
    return clock


def claim(
    point: ClaimPoint, full: bool, kinds: tuple[list[str], list[str]] = KINDS
) -> ClaimFrom | None:
    """One claim: where it started; it comes back `full` or not, with ANSWER."""
    start, token = point.begin(*kinds)
    point.end(token, *kinds, full, ANSWER)
    return start


def test_a_backlog_is_claimed_from_where_the_last_claim_left(clock: Clock) -> None:
    point = ClaimPoint()
    assert claim(point, full=True) is None  # the first reads from the start
    assert claim(point, full=True) is POINT
    assert claim(point, full=False) is POINT
    assert claim(point, full=False) is None  # not a backlog: from the start


def test_from_the_start_again_after_a_second(clock: Clock) -> None:
    point = ClaimPoint()
    assert claim(point, full=True) is None
    clock.now += run_state.FROM_START_EVERY_S - 0.01
    assert claim(point, full=True) is POINT
    clock.now += 0.02  # a second since the claim from the start: this answer's point is not kept
    assert claim(point, full=True) is POINT
    assert claim(point, full=True) is None
    clock.now += 0.5
    assert claim(point, full=True) is POINT


def test_a_task_created_meanwhile_sends_the_next_claim_to_the_start(clock: Clock) -> None:
    point = ClaimPoint()
    claim(point, full=True)
    point.created()  # between two claims
    assert claim(point, full=True) is None
    start, token = point.begin(*KINDS)
    assert start is POINT
    point.created()  # while the claim was in flight: its NEXT_DUE may not have seen it
    point.end(token, *KINDS, True, ANSWER)
    assert claim(point, full=True) is None


def test_other_kinds_or_a_failed_claim_start_from_the_start(clock: Clock) -> None:
    point = ClaimPoint()
    claim(point, full=True)
    assert claim(point, full=True, kinds=(["baz"], ["bar"])) is None
    assert claim(point, full=True, kinds=(["baz"], [])) is None
    assert claim(point, full=True, kinds=(["baz"], [])) is POINT
    point.reset()
    assert claim(point, full=True, kinds=(["baz"], [])) is None
