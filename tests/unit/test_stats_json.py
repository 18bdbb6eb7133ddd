"""/stats' JSON, made without pydantic (functions/http/reads.py, served by the fast path and the
FastAPI route alike), is what its declared schema (`monitoring.StatsOut`) reads and writes back
byte for byte: the same fields in the same order, floats as floats, times as pydantic's."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from functions.counters import OUTCOMES
from functions.http.monitoring import StatsOut
from functions.http.reads import stats_json
from functions.report import Minute, Stats, TypeActivity


def stats(value: float, when: datetime) -> Stats:
    lateness = {"p50": value, "p99": value * 3, "max": value * 7}
    return Stats(
        counts={"scheduled": {"baz": 3, "émoji ☃": 1}, "failed": {}},
        estimated=["succeeded"],
        due=2,
        oldest_due_age_s=value,
        workers=1,
        workers_alive=2,
        last_minute={name: i for i, name in enumerate(OUTCOMES)},
        lateness_ms={"p50": value, "p95": value * 2, "p99": value * 3, "max": value * 7},
        series=[
            Minute(when + timedelta(minutes=i), i, i + 1, i + 2, i + 3, value * i) for i in range(3)
        ],
        unserved={"send_email": 12},
        by_type={
            kind: TypeActivity(
                started=5,
                # (In another order than the schema's: the JSON keeps the schema's.)
                outcomes={name: i for i, name in enumerate(reversed(OUTCOMES))},
                per_s=value / 3,
                lateness_ms=lateness,
            )
            for kind in ("baz", "foo")
        },
        totals=[],
    )


@pytest.mark.parametrize("value", [0, 0.0, 1, 2.5, 0.0004, 0.0005, 1234.56789, 1e15 + 0.25])
@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 12, 6, 20, 0, tzinfo=UTC),
        datetime(2026, 12, 6, 20, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 12, 6, 20, 0, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
    ],
)
def test_the_json_is_the_schemas_byte_for_byte(value: float, when: datetime) -> None:
    made = stats_json(stats(value, when))
    assert StatsOut.model_validate_json(made).model_dump_json().encode() == made


def test_an_empty_activity_is_the_schemas_too() -> None:
    empty = Stats(
        counts={}, estimated=[], due=0, oldest_due_age_s=0.0, workers=0, workers_alive=0,
        last_minute={}, lateness_ms={}, series=[], unserved={}, by_type={}, totals=[],
    )  # fmt: skip
    made = stats_json(empty)
    assert StatsOut.model_validate_json(made).model_dump_json().encode() == made
