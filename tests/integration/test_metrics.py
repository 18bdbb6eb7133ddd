"""/metrics's running totals (migration 0017): attempts ended by type and outcome, histograms
of run duration and start lateness, build info; and /stats `by_type`."""

import asyncio
import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from functions import kinds
from functions.counters import OUTCOMES, TOTAL_BOUNDS_S
from functions.kinds import Context, Kind
from functions.report import build_version
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Store
from functions.tick import tick
from tests.conftest import serve

Sql = Callable[..., list[tuple[Any, ...]]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

LE = [f"{b}" if not math.isinf(b) else "+Inf" for b in TOTAL_BOUNDS_S]


@pytest.fixture
def extra_kinds(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Kind], None]]:
    """Add kinds for one test (the real ones stay); the API of the test takes them too."""

    def add(kind: Kind) -> None:
        monkeypatch.setitem(kinds.KINDS, kind.name, kind)

    yield add


async def metrics(client: httpx.AsyncClient) -> tuple[Samples, dict[str, str]]:
    """/metrics's samples, parsed by the client library's own parser, and each family's type."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    families = list(text_string_to_metric_families(response.text))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    return samples, {f.name: f.type for f in families}


def finished(samples: Samples) -> dict[tuple[str, str], float]:
    """taskrunner_tasks_finished_total by (type, outcome), the zeros left out."""
    return {
        (dict(labels)["type"], dict(labels)["outcome"]): value
        for (name, labels), value in samples.items()
        if name == "taskrunner_tasks_finished_total" and value
    }


def histogram(samples: Samples, name: str, kind: str) -> tuple[list[float], float, float]:
    """The cumulative buckets (in the order of TOTAL_BOUNDS_S), sum and count of `kind`'s
    series of histogram `name`, checked consistent: every bound once, never decreasing, the
    +Inf bucket the count."""
    buckets = {
        dict(labels)["le"]: value
        for (sample, labels), value in samples.items()
        if sample == f"{name}_bucket" and dict(labels)["type"] == kind
    }
    assert sorted(buckets, key=LE.index) == LE, buckets
    cumulative = [buckets[le] for le in LE]
    assert cumulative == sorted(cumulative), (name, kind, cumulative)
    count = samples[(f"{name}_count", (("type", kind),))]
    assert cumulative[-1] == count, (name, kind)
    return cumulative, samples[(f"{name}_sum", (("type", kind),))], count


async def test_each_outcome_is_counted_by_type_with_its_duration_and_lateness(
    store: Store,
    settings: Settings,
    sql: Sql,
    client: httpx.AsyncClient,
    extra_kinds: Callable[[Kind], None],
) -> None:
    async def naps(ctx: Context) -> str:
        await asyncio.sleep(3600)
        return "woke"

    def flaky(ctx: Context) -> str:
        raise RuntimeError("flaky")

    extra_kinds(Kind("naps", naps, lambda s: 30.0, limit_s=lambda s: 30.0))
    extra_kinds(Kind("flaky", flaky, lambda s: 30.0, limit_s=lambda s: 30.0))
    # Lost: a baz whose worker died while it ran (rescued, run again: succeeded).
    await store.register_worker(worker="A", lease_s=60)
    response = await client.post("/tasks", json={"type": "baz", "execute_at": 0})
    lost = response.json()["id"]
    [claimed], _ = await store.claim_due(worker="A", kinds=["baz"], limit=1, lease_s=60)
    assert claimed.id == lost
    sql("UPDATE workers SET lease_expires_at = now() - interval '1 second' WHERE id = 'A'")
    # Cancelled: a foo not due yet.
    response = await client.post("/tasks", json={"type": "foo", "execute_at": 4102444800})
    assert (await client.post(f"/tasks/{response.json()['id']}/cancel")).status_code == 200
    tasks = [
        *[{"type": "baz", "execute_at": 0}] * 3,
        {"type": "naps", "execute_at": 0, "timeout_s": 0.2, "max_attempts": 1},
        {"type": "flaky", "execute_at": 0, "max_attempts": 2},
    ]
    response = await client.post("/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 201, response.text

    runner = Runner(store, settings, out=io.StringIO())
    for _ in range(50):  # the retry is due 10 ms after the first attempt: run until it ran
        await runner.run()
        if sql("SELECT count(*) FROM tasks WHERE state IN ('scheduled', 'running')") == [(1,)]:
            break
    samples, types = await metrics(client)
    assert finished(samples) == {
        ("baz", "succeeded"): 4,
        ("baz", "lost"): 1,
        ("naps", "timed_out"): 1,
        ("flaky", "retried"): 1,
        ("flaky", "failed"): 1,
        ("foo", "cancelled"): 1,
    }
    # Every outcome of every type that has totals is served, zeros too.
    for kind in ("baz", "naps", "flaky", "foo"):
        for outcome in OUTCOMES:
            labels = (("outcome", outcome), ("type", kind))
            assert ("taskrunner_tasks_finished_total", labels) in samples
    assert types["taskrunner_tasks_finished"] == "counter"
    assert types["taskrunner_task_duration_seconds"] == "histogram"
    assert types["taskrunner_start_lateness_seconds"] == "histogram"
    assert not [labels for _, labels in samples if dict(labels).get("quantile")]

    # Duration: the attempts that ran to an end here (the lost one ran elsewhere).
    _, _, count = histogram(samples, "taskrunner_task_duration_seconds", "baz")
    assert count == 4
    naps_buckets, naps_sum, count = histogram(samples, "taskrunner_task_duration_seconds", "naps")
    assert count == 1 and 0.2 <= naps_sum < 15, naps_sum
    assert naps_buckets[LE.index("0.1")] == 0  # stopped at 0.2 s, not before
    _, _, count = histogram(samples, "taskrunner_task_duration_seconds", "flaky")
    assert count == 2
    _, _, count = histogram(samples, "taskrunner_task_duration_seconds", "foo")
    assert count == 0
    # Start lateness: first attempts this worker claimed (the lost baz was claimed by A).
    for kind, started in (("baz", 3), ("naps", 1), ("flaky", 1), ("foo", 0)):
        _, late_sum, count = histogram(samples, "taskrunner_start_lateness_seconds", kind)
        assert count == started, kind
        assert 0 <= late_sum < 60 * started + 1e-9, kind

    by_type = (await client.get("/stats")).json()["by_type"]
    outcomes = {
        kind: {k: n for k, n in of.items() if k in OUTCOMES and n} for kind, of in by_type.items()
    }
    assert outcomes == {
        "baz": {"succeeded": 4, "lost": 1},
        "naps": {"timed_out": 1},
        "flaky": {"retried": 1, "failed": 1},
        "foo": {"cancelled": 1},
    }
    assert by_type["baz"]["per_s"] == round(5 / 300, 3)  # every outcome but cancelled
    assert by_type["foo"]["per_s"] == 0
    # The overview's minutes count every attempt that failed: raised, timed out, lost.
    series = (await client.get("/stats")).json()["series"]
    assert sum(m["failed"] for m in series) == 3


async def test_totals_survive_retention_and_restarts_of_workers_and_apis(
    settings: Settings, sql: Sql, store: Store, task_factory: Callable[..., int]
) -> None:
    """Counters stay monotonic: pruning the tasks they counted takes nothing from them, and
    a new worker and a new API add to and read the same totals."""
    for _ in range(3):
        task_factory("baz")
    async with serve(settings) as api:
        # Due and not run yet: the type is listed, with nothing done.
        by_type = (await api.get("/stats")).json()["by_type"]
        assert list(by_type) == ["baz"]
        assert (by_type["baz"]["started"], by_type["baz"]["per_s"]) == (0, 0)
        assert (await tick(settings, out=io.StringIO())).succeeded == 3
        samples, _ = await metrics(api)
        assert finished(samples) == {("baz", "succeeded"): 3}

    while await store.prune_finished(older_than_s=0):
        pass
    assert sql("SELECT count(*) FROM tasks") == [(0,)]
    async with serve(settings) as api:  # another API instance
        samples, _ = await metrics(api)
        assert finished(samples) == {("baz", "succeeded"): 3}
        _, _, count = histogram(samples, "taskrunner_task_duration_seconds", "baz")
        assert count == 3
        assert samples[("taskrunner_tasks", (("state", "succeeded"), ("type", "baz")))] == 0

        for _ in range(2):
            task_factory("baz")
        assert (await tick(settings, out=io.StringIO())).succeeded == 2  # another worker
        samples, _ = await metrics(api)
        assert finished(samples) == {("baz", "succeeded"): 5}
        for name in ("taskrunner_task_duration_seconds", "taskrunner_start_lateness_seconds"):
            _, _, count = histogram(samples, name, "baz")
            assert count == 5, name


async def test_build_info_names_the_version(client: httpx.AsyncClient) -> None:
    samples, types = await metrics(client)
    assert samples[("taskrunner_build_info", (("version", build_version()),))] == 1
    assert types["taskrunner_build_info"] == "gauge"
    assert build_version()
