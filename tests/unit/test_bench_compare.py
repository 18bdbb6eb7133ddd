"""`python -m local.bench.compare` judges medians, not single runs, and knows which way is
worse for each unit: down for a rate, up for a time or a size."""

import pytest

from local.bench.compare import Measure, Run, judge, main, read_run, report


def runs(**figures: list[float]) -> list[Run]:
    """One Run per position in the lists: name -> values, the unit read from the name."""
    units = {"drain": "tasks/s", "cold": "ms", "fanout": "s", "memory": "MB"}
    count = len(next(iter(figures.values())))
    return [
        {name: Measure(values[i], units[name], None) for name, values in figures.items()}
        for i in range(count)
    ]


def worse(base: list[Run], head: list[Run]) -> dict[str, bool]:
    return {v.figure: v.worse for v in judge(base, head, tolerance=0.10)}


def test_a_rate_that_falls_more_than_the_tolerance_is_worse_and_one_that_rises_is_not() -> None:
    base = runs(drain=[100.0, 100.0, 100.0])
    assert worse(base, runs(drain=[89.0, 89.0, 89.0])) == {"drain": True}
    assert worse(base, runs(drain=[91.0, 91.0, 91.0])) == {"drain": False}
    assert worse(base, runs(drain=[150.0, 150.0, 150.0])) == {"drain": False}


def test_a_time_or_a_size_that_rises_more_than_the_tolerance_is_worse() -> None:
    base = runs(cold=[300.0] * 3, fanout=[3.2] * 3, memory=[80.0] * 3)
    head = runs(cold=[340.0] * 3, fanout=[3.3] * 3, memory=[60.0] * 3)
    assert worse(base, head) == {"cold": True, "fanout": False, "memory": False}


def test_the_median_decides_so_one_slow_run_does_not() -> None:
    base = runs(drain=[100.0, 102.0, 98.0])
    head = runs(drain=[30.0, 99.0, 101.0])  # one run in a bad minute
    [verdict] = judge(base, head)
    assert (verdict.base, verdict.head, verdict.worse) == (100.0, 99.0, False)
    assert verdict.ratio == 0.99
    head = runs(drain=[30.0, 80.0, 101.0])  # most runs slower
    [verdict] = judge(base, head)
    assert verdict.worse
    assert "| drain | tasks/s | 100.0 | 80.0 | 0.800 | - | 237% | worse by more than 10% |" in (
        report([verdict], "base a", "head b", 0.10)
    ), "the spread of one commit's runs is shown beside the verdict"


def test_a_figure_head_lost_is_worse_and_a_new_one_is_shown_not_judged() -> None:
    base = runs(drain=[100.0] * 3, cold=[300.0] * 3)
    head = runs(drain=[100.0] * 3, fanout=[3.2] * 3)
    verdicts = judge(base, head)
    assert {v.figure: v.worse for v in verdicts} == {"drain": False, "cold": True, "fanout": False}
    table = report(verdicts, "base a", "head b", 0.10)
    assert "| cold | ms | 300.0 | - | - | - | 0% | worse by more than 10% |" in table
    assert "| fanout | s | - | 3.2 | - | - | 0% | not judged (new) |" in table


def test_a_run_is_read_from_the_json_the_bench_writes_with_its_raw_column() -> None:
    run = read_run(
        [{"scenario": "drain, 1 worker", "value": 24816.2, "unit": "tasks/s", "goal": "",
          "met": False, "raw": 25704.0, "raw_note": ""}]
    )  # fmt: skip
    assert run == {"drain, 1 worker": Measure(24816.2, "tasks/s", 25704.0)}
    [verdict] = judge([run], [run])
    assert (verdict.base_raw, verdict.head_raw, verdict.worse) == (25704.0, 25704.0, False)


def test_the_command_needs_a_scenario() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["HEAD", "HEAD"])
    assert exited.value.code == 2
