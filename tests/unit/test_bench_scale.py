"""The `scale` bench scenario: run only when named, and each figure held to the smallest
table's in the direction that is worse (a rate lower, a time or memory higher)."""

from dataclasses import replace

import pytest

from functions.errors import TaskrunnerError
from local.bench.scale import Measures, figures, rows_to_measure
from local.bench.suite import SCENARIOS, wanted


def test_scale_runs_only_when_named() -> None:
    assert "scale" in SCENARIOS
    assert not wanted("scale", None)
    assert wanted("scale", ["scale"])
    assert wanted("drain", None)
    assert not wanted("drain", ["scale"])


def small() -> Measures:
    return Measures(
        10_000, load_per_s=1.0, create_single=1_000.0, create_batch=10_000.0, get_one=2_000.0,
        pages=[("newest first", 10.0), ("type", 10.0)], stats_p99=10.0, lateness_p99=5.0,
        burst=(100_000, (10_000.0, 10_000.0, 9_000.0, 10_000.0, (10_000, 9_000))),
        prune=(1_000, 1_000.0, 5.0, 10.0, 10.0), worker_mb=80.0, api_mb=70.0,
    )  # fmt: skip


def met(measured: list[Measures]) -> dict[str, bool]:
    return {
        f.scenario.split(": ", 1)[1]: f.met for f in figures(measured) if "1,000,000" in f.scenario
    }


def test_each_figure_is_held_within_20_percent_of_the_smallest_table_the_worse_way() -> None:
    base = small()
    same = met([base, replace(base, rows=1_000_000)])
    assert all(same.values()), same
    # 21% worse each way: a rate lower, a time or memory higher.
    worse = replace(
        base, rows=1_000_000, create_single=790.0, get_one=1_580.0, stats_p99=12.1,
        lateness_p99=6.05, pages=[("newest first", 12.1), ("type", 10.0)], worker_mb=96.8,
        burst=(100_000, (10_000.0, 10_000.0, 7_900.0, 10_000.0, ())),
    )  # fmt: skip
    bent = met([base, worse])
    assert not bent["create, POST /tasks, 32 connections"]
    assert not bent["GET /tasks/{id}, 32 connections"]
    assert not bent["GET /stats p99"]
    assert not bent["start lateness, future task, p99"]
    assert not bent["worker peak memory"]
    assert not bent["drain of 100,000 baz due at once, slowest second"]
    assert not bent["GET /tasks, first page of 2 filters and orders, worst p99"]
    assert bent["create, POST /tasks/batch of 10,000"]
    assert bent["API peak memory"]
    # And better is never a miss: faster, smaller.
    better = replace(base, rows=1_000_000, create_single=5_000.0, stats_p99=1.0, api_mb=10.0)
    assert all(met([base, better]).values())


def test_a_drain_within_its_first_second_says_so() -> None:
    # No whole second to show: the note read "first second 20,907, last 20,907; seconds: ;".
    base = replace(small(), burst=(5_000, (20_907.0, 20_907.0, 20_907.0, 20_907.0, ())))
    [note] = [f.raw_note for f in figures([base]) if "drain of 5,000" in f.scenario]
    assert "done within its first second" in note
    assert "seconds: ;" not in note


class _Sizes:
    scale_rows = (2_000, 50_000)


class _Bench:
    sizes = _Sizes()


@pytest.mark.parametrize("chosen", ["abc", "0", "10", "10000,", " , "])
def test_bench_scale_rows_refused_in_words(chosen: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # "abc" was a ValueError's traceback, "0" an OFFSET error from the database mid-run.
    monkeypatch.setenv("BENCH_SCALE_ROWS", chosen)
    with pytest.raises(TaskrunnerError, match=r"BENCH_SCALE_ROWS=.*at least 1,000 rows"):
        rows_to_measure(_Bench())  # type: ignore[arg-type]


def test_bench_scale_rows_smallest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every figure is set beside the first size's: the smallest, however they are listed.
    monkeypatch.setenv("BENCH_SCALE_ROWS", "1_000_000, 10000,1000000")
    assert rows_to_measure(_Bench()) == (10_000, 1_000_000)  # type: ignore[arg-type]
    monkeypatch.delenv("BENCH_SCALE_ROWS")
    assert rows_to_measure(_Bench()) == (2_000, 50_000)  # type: ignore[arg-type]
