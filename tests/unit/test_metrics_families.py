"""The Prometheus exposition of /metrics as the client library writes it, and what the
Grafana dashboard (infra/grafana-dashboard.json) asks of it."""

import json
import math
import re
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from functions.counters import OUTCOMES, TOTAL_BOUNDS_S, Activity
from functions.http.metrics import Families, metric_families
from functions.report import Stats, Totals

DASHBOARD = Path(__file__).parents[2] / "infra" / "grafana-dashboard.json"


def stats_with(totals: list[Totals]) -> Stats:
    return Stats(
        counts={"scheduled": {"baz": 1}},
        estimated=[],
        due=1,
        oldest_due_age_s=0.5,
        workers=0,
        workers_alive=1,
        last_minute=dict.fromkeys(OUTCOMES, 0),
        lateness_ms={"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0},
        series=[],
        unserved={"send_email": 2},
        by_type={},
        totals=totals,
    )


def exposition(stats: Stats) -> str:
    return generate_latest(Families(metric_families(stats, "1.2.3"))).decode()


def test_the_edges_of_each_bucket() -> None:
    """`le` is "at most": a value on a bound is in that bound's bucket, just above it in the
    next; past the last finite bound (an hour), in +Inf."""
    activity = Activity()
    for s in (0.0, 0.005, 0.0050001, 3600.0, 3600.5, 86_400.0 * 400):
        activity.ran(s)
    assert activity.duration_s[0] == 2
    assert activity.duration_s[1] == 1
    assert activity.duration_s[TOTAL_BOUNDS_S.index(3600.0)] == 1
    assert activity.duration_s[-1] == 2
    assert math.isinf(TOTAL_BOUNDS_S[-1])
    activity.start(-3.0)  # a clock step back: counted as on time, not below every bucket
    activity.start(1000.0)
    assert activity.lateness_s[0] == 1
    assert activity.lateness_s[TOTAL_BOUNDS_S.index(1.0)] == 1
    assert activity.lateness_sum_s == 1.0


def test_histograms_are_cumulative_with_count_the_inf_bucket() -> None:
    """A row written before the bounds it lacks (shorter) reads as zeros there."""
    counts = [1] * len(TOTAL_BOUNDS_S)
    totals = [
        Totals("baz", dict.fromkeys(OUTCOMES, 0) | {"succeeded": 7}, counts, 1.5, counts[:3], 2.0)
    ]
    families = {f.name: f for f in text_string_to_metric_families(exposition(stats_with(totals)))}
    duration = families["taskrunner_task_duration_seconds"]
    assert duration.type == "histogram"
    buckets = [s for s in duration.samples if s.name.endswith("_bucket")]
    assert [s.value for s in buckets] == list(range(1, len(TOTAL_BOUNDS_S) + 1))
    assert buckets[-1].labels["le"] == "+Inf"
    assert [float(s.labels["le"]) for s in buckets] == list(TOTAL_BOUNDS_S)
    by_name = {s.name: s.value for s in duration.samples if not s.name.endswith("_bucket")}
    assert by_name == {
        "taskrunner_task_duration_seconds_count": len(TOTAL_BOUNDS_S),
        "taskrunner_task_duration_seconds_sum": 1.5,
    }
    lateness = families["taskrunner_start_lateness_seconds"].samples
    assert [s.value for s in lateness if s.name.endswith("_bucket")][-1] == 3
    finished = families["taskrunner_tasks_finished"]
    assert finished.type == "counter"
    assert {s.labels["outcome"]: s.value for s in finished.samples} == dict.fromkeys(
        OUTCOMES, 0
    ) | {"succeeded": 7}
    assert [(s.labels, s.value) for s in families["taskrunner_build_info"].samples] == [
        ({"version": "1.2.3"}, 1)
    ]


def served_names() -> set[str]:
    """Every sample name /metrics serves, a type with totals included."""
    zeros = [0] * len(TOTAL_BOUNDS_S)
    totals = [Totals("baz", dict.fromkeys(OUTCOMES, 0), zeros, 0.0, zeros, 0.0)]
    return {
        s.name
        for f in text_string_to_metric_families(exposition(stats_with(totals)))
        for s in f.samples
    }


def test_the_grafana_dashboard_asks_only_for_what_metrics_serves() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\btaskrunner_[a-z_]+", e)}
    assert used - served_names() == set()
    # What the issue asks it to show.
    for needed in (
        "taskrunner_tasks_finished_total",
        "taskrunner_task_duration_seconds_bucket",
        "taskrunner_start_lateness_seconds_bucket",
        "taskrunner_due_tasks",
        "taskrunner_oldest_due_age_seconds",
        "taskrunner_unserved_due_tasks",
    ):
        assert needed in used, needed
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    assert {re.search(r"histogram_quantile\((0\.\d+)", e).group(1) for e in quantiles} == {  # type: ignore[union-attr]
        "0.5",
        "0.99",
    }
    assert all("by (type, le)" in e and "rate(" in e for e in quantiles)
    # Every API instance serves the same database figures: summed across the instances
    # scraped, they would read twice as high with two (a histogram's quantile is a ratio).
    summed = [e for e in exprs if "histogram_quantile" not in e and re.search(r"\bsum\b", e)]
    assert all(e.startswith("sum(max by ") for e in summed), summed
    # Panels do not overlap (Grafana would move them).
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, panel["title"]
        cells |= mine
