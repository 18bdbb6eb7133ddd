"""The `scale` bench scenario: run only when named, and each figure held to the smallest
table's in the direction that is worse (a rate lower, a time or memory higher)."""

from dataclasses import replace

from local.bench.scale import Measures, figures
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
