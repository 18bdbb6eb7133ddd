"""GET /stats and /metrics against a real database, and retention."""

import dataclasses
import io
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from functions import counters, queries, report
from functions.settings import Settings
from functions.store import Store
from functions.tick import tick
from functions.upkeep import PRUNE_EVERY_S, PruneClock
from tests.conftest import serve
from tests.pgservers import Server
from tests.procs import TASKRUNNER

Sql = Callable[..., list[tuple[Any, ...]]]


def wait_for_live_rows(sql: Callable[[str], list[tuple[Any, ...]]], n: int) -> None:
    """Wait until the server's statistics count `n` live rows in `tasks` (each commit's
    inserts and deletes reach them within a second or so)."""
    deadline = time.monotonic() + 10
    while sql("SELECT pg_stat_get_live_tuples('tasks'::regclass)") != [(n,)]:
        assert time.monotonic() < deadline, "the statistics never caught up"
        time.sleep(0.1)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as c:
        yield c


def counts_in_database(sql: Sql) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {
        s: {"bar": 0, "baz": 0, "foo": 0, "http": 0}
        for s in ("scheduled", "running", "succeeded", "failed", "cancelled")
    }
    for state, kind, n in sql("SELECT state, kind, count(*) FROM tasks GROUP BY 1, 2"):
        found[state][kind] = n
    return found


async def test_stats_match_the_database(
    client: httpx.AsyncClient, settings: Settings, sql: Sql, task_factory: Callable[..., int]
) -> None:
    # Run 30 baz and 5 foo that were due a second ago (created a minute before their time),
    # and fail 2 bar for good.
    for _ in range(30):
        task_factory("baz", due_in_s=-1.0)
    for _ in range(5):
        task_factory("foo", due_in_s=-1.0)
    bad = dataclasses.replace(settings, bar_url="http://127.0.0.1:1/")
    for _ in range(2):
        task_factory("bar", due_in_s=-1.0, max_attempts=1)
    sql("UPDATE tasks SET created_at = execute_at - interval '1 minute'")
    summary = await tick(bad, out=io.StringIO())
    assert (summary.succeeded, summary.failed) == (35, 2)
    # Then: 3 due now (one of them waiting 120 s), 2 later, 1 held by a live worker.
    for due_in_s in (-120.0, -5.0, -1.0, 3600.0, 7200.0):
        task_id = task_factory("baz", due_in_s=due_in_s)
        # Created when it was due (one created already past its time waits from its creation).
        sql(
            "UPDATE tasks SET created_at = execute_at WHERE id = %s AND execute_at < now()", task_id
        )
    held = task_factory("foo", due_in_s=-1.0)
    sql("INSERT INTO workers (id, lease_expires_at) VALUES ('w', now() + interval '1 minute')")
    sql("UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w' WHERE id = %s", held)
    # And 2 cancelled: one before it ran, one while it ran (the worker above).
    cancelled = [task_factory("bar", due_in_s=3600.0), task_factory("foo", due_in_s=-1.0)]
    sql(
        "UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w' WHERE id = %s",
        cancelled[1],
    )
    for task_id in cancelled:
        assert (await client.post(f"/tasks/{task_id}/cancel")).status_code == 200

    response = await client.get("/stats")
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["counts"] == counts_in_database(sql)
    assert got["estimated"] == []
    assert got["due"] == 3
    assert 119 < got["oldest_due_age_s"] < 130
    assert (got["workers"], got["workers_alive"]) == (1, 1)
    assert got["counts"]["cancelled"] == {"bar": 1, "baz": 0, "foo": 1, "http": 0}
    assert got["last_minute"] == {
        "succeeded": 35, "failed": 2, "retried": 0, "timed_out": 0, "cancelled": 2, "lost": 0
    }  # fmt: skip
    # By type: what each did in the last 5 minutes, and the types with tasks due (baz).
    by_type = got["by_type"]
    assert sorted(by_type) == ["bar", "baz", "foo"]
    assert {k: by_type["bar"][k] for k in ("started", "failed", "cancelled")} == {
        "started": 2, "failed": 2, "cancelled": 1
    }  # fmt: skip
    assert (by_type["baz"]["started"], by_type["baz"]["succeeded"]) == (30, 30)
    assert (by_type["foo"]["succeeded"], by_type["foo"]["cancelled"]) == (5, 1)
    assert by_type["baz"]["per_s"] == 0.1  # 30 in 5 minutes
    assert by_type["foo"]["per_s"] == round(5 / 300, 3)  # the cancel is not throughput
    for of_type in by_type.values():
        assert set(of_type) == {
            "started", "succeeded", "failed", "retried", "cancelled", "timed_out", "lost",
            "per_s", "lateness_ms",
        }  # fmt: skip
        late = of_type["lateness_ms"]
        assert 800 < late["p50"] <= late["p99"] <= late["max"] < 5000
    lateness = got["lateness_ms"]
    # Started about a second after their time (task_factory's -1 s), within a bucket (12%).
    assert 800 < lateness["p50"] <= lateness["p95"] <= lateness["p99"] <= lateness["max"] < 5000
    series = got["series"]
    assert len(series) == 60
    assert sum(m["started"] for m in series) == 37
    assert (sum(m["succeeded"] for m in series), sum(m["failed"] for m in series)) == (35, 2)
    assert sum(m["cancelled"] for m in series) == 2
    assert series[-1]["minute"] > series[0]["minute"]


@pytest.mark.parametrize("late_s", [3_600.0, 86_400.0, 200 * 86_400.0])
async def test_lateness_of_hours_and_days_is_reported_within_a_bucket(
    client: httpx.AsyncClient,
    settings: Settings,
    sql: Sql,
    task_factory: Callable[..., int],
    late_s: float,
) -> None:
    """Tasks due long ago (a worker was down for a day): before, every percentile stopped at
    the histogram's last bound, 50.6 minutes."""
    for _ in range(20):
        task_factory("baz", due_in_s=-late_s)
    sql("UPDATE tasks SET created_at = execute_at - interval '1 minute'")
    await tick(settings, out=io.StringIO())
    lateness = (await client.get("/stats")).json()["lateness_ms"]
    for key in ("p50", "p95", "p99"):
        assert late_s * 1000 / 1.25 <= lateness[key] <= lateness["max"] * 1.25, (key, lateness)
    assert late_s * 1000 <= lateness["max"] < (late_s + 60) * 1000


async def test_one_tasks_percentiles_are_its_lateness_each_minute_too(
    client: httpx.AsyncClient, settings: Settings, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """One task about 6 s late: its p50, p99 and its minute's p99 (the dashboard's chart) are
    its lateness. Before, interpolated within the bucket (5,864-7,330 ms), the minute's p99
    read about 7,330 ms, above the maximum, and p50 below it."""
    task_factory("baz", due_in_s=-5.9)
    sql("UPDATE tasks SET created_at = execute_at - interval '1 minute'")  # due 5.9 s ago
    summary = await tick(settings, out=io.StringIO())
    assert summary.succeeded == 1
    got = (await client.get("/stats")).json()
    lateness = got["lateness_ms"]
    assert 5_900 <= lateness["max"] < 60_000, lateness
    assert lateness["p50"] == lateness["p95"] == lateness["p99"] == lateness["max"], lateness
    # The task's minute: the last, or the one before if a minute began since the tick.
    (minute,) = [m for m in got["series"] if m["started"]]
    assert minute["lateness_p99_ms"] == lateness["max"], minute


async def lateness_after_a_tick(client: httpx.AsyncClient, settings: Settings) -> dict[str, Any]:
    summary = await tick(settings, out=io.StringIO())
    assert summary.succeeded >= 1
    stats_ms = (await client.get("/stats")).json()["lateness_ms"]
    metrics = {
        s.name: s.value * 1000
        for family in text_string_to_metric_families((await client.get("/metrics")).text)
        for s in family.samples
        if s.name.startswith("taskrunner_start_lateness_seconds") and s.labels["type"] == "baz"
    }
    # The histogram's sum of the same starts: at most all of them at the maximum.
    count = metrics["taskrunner_start_lateness_seconds_count"] / 1000
    assert count == summary.succeeded
    late_sum_ms = metrics["taskrunner_start_lateness_seconds_sum"]
    assert stats_ms["max"] - 0.01 <= late_sum_ms <= stats_ms["max"] * count + 0.01
    return dict(stats_ms)


async def test_a_task_created_with_a_time_long_past_is_late_from_its_creation(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """`execute_at: 0`, as docs/api.md's examples send: due when created, not 56 years late
    (what /stats, /metrics and the dashboard said before)."""
    for at in (0, "2001-01-01T00:00:00Z"):
        response = await client.post("/tasks", json={"type": "baz", "execute_at": at})
        assert response.status_code == 201, response.text
    lateness = await lateness_after_a_tick(client, settings)
    assert 0 <= lateness["max"] < 60_000, lateness


async def test_a_task_run_now_or_rescheduled_to_the_past_is_late_from_that_request(
    client: httpx.AsyncClient, settings: Settings, sql: Sql
) -> None:
    """Created an hour ago for 2030, then run now (or moved to a time already past): due
    from that request, neither an hour late (from its creation) nor years early."""
    ids = []
    for _ in range(2):
        response = await client.post("/tasks", json={"type": "baz", "execute_at": 1893499200})
        ids.append(response.json()["id"])
    sql("UPDATE tasks SET created_at = created_at - interval '1 hour'")
    assert (await client.post(f"/tasks/{ids[0]}/run")).status_code == 200
    assert (await client.patch(f"/tasks/{ids[1]}", json={"execute_at": 0})).status_code == 200
    lateness = await lateness_after_a_tick(client, settings)
    assert 0 < lateness["p50"] <= lateness["max"] < 60_000, lateness
    [(execute_at,)] = sql("SELECT extract(epoch FROM execute_at) FROM tasks WHERE id = %s", ids[0])
    assert execute_at == 1893499200


async def test_a_shorter_histogram_of_an_older_version_adds_up(
    settings: Settings, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """Rows written by an older version hold 72 buckets; new counts of 113 add to them."""
    sql(
        "INSERT INTO task_activity (bucket, kind, started, succeeded, failed, retried, lateness,"
        " lateness_max_ms) SELECT to_timestamp(b), 'baz', 72, 0, 0, 0,"
        " array_fill(1::bigint, ARRAY[72]),"
        " 1 FROM generate_series(floor(extract(epoch FROM now()) / 10)::bigint * 10,"
        " floor(extract(epoch FROM now()) / 10)::bigint * 10 + 60, 10) AS b"
    )
    for _ in range(5):
        task_factory("baz")
    await tick(settings, out=io.StringIO())
    [(nulls, length, total)] = sql(
        "SELECT count(*) FILTER (WHERE x IS NULL), max(cardinality(lateness)), sum(x)"
        " FROM task_activity, unnest(lateness) AS x WHERE started > 72"
    )
    assert (nulls, length, total) == (0, len(counters.LATENESS_BOUNDS_MS), 72 + 5)


async def test_metrics_say_the_same_in_prometheus_text(
    client: httpx.AsyncClient, settings: Settings, task_factory: Callable[..., int], sql: Sql
) -> None:
    for _ in range(4):
        task_factory("baz")
    await tick(settings, out=io.StringIO())
    late = task_factory("foo", due_in_s=-2.0)
    sql("UPDATE tasks SET created_at = execute_at WHERE id = %s", late)
    cancelled = task_factory("bar", due_in_s=60.0)
    assert (await client.post(f"/tasks/{cancelled}/cancel")).status_code == 200

    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("taskrunner_tasks", (("state", "succeeded"), ("type", "baz")))] == 4
    assert samples[("taskrunner_tasks", (("state", "scheduled"), ("type", "foo")))] == 1
    assert samples[("taskrunner_due_tasks", ())] == 1
    assert samples[("taskrunner_oldest_due_age_seconds", ())] >= 2
    assert samples[("taskrunner_workers", ())] == 0
    assert samples[("taskrunner_finished_last_minute", (("state", "succeeded"),))] == 4
    assert samples[("taskrunner_tasks", (("state", "cancelled"), ("type", "bar")))] == 1
    assert samples[("taskrunner_finished_last_minute", (("state", "cancelled"),))] == 1
    # The start lateness is a histogram by type (tests/integration/test_metrics.py).
    baz = (("type", "baz"),)
    assert samples[("taskrunner_start_lateness_seconds_count", baz)] == 4


async def test_monitoring_needs_the_token_when_one_is_set(settings: Settings) -> None:
    async with serve(dataclasses.replace(settings, api_token="s3cret")) as c:
        for path in ("/stats", "/metrics"):
            assert (await c.get(path)).status_code == 401
            ok = await c.get(path, headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200


async def test_large_tables_are_counted_from_a_sample(
    client: httpx.AsyncClient, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql(
        "INSERT INTO tasks (kind, state, execute_at, started_at, finished_at, attempts)"
        " SELECT CASE WHEN n % 4 = 0 THEN 'foo' ELSE 'baz' END, 'succeeded', now(), now(),"
        " now(), 1 FROM generate_series(1, 40000) AS n"
    )
    monkeypatch.setattr(report, "EXACT_UP_TO", 1_000)
    monkeypatch.setattr(report, "SAMPLE_ROWS", 20_000)
    got = (await client.get("/stats")).json()
    assert got["estimated"] == ["cancelled", "failed", "succeeded"]
    assert 20_000 < got["counts"]["succeeded"]["baz"] < 40_000  # 30,000, from about half
    assert 5_000 < got["counts"]["succeeded"]["foo"] < 15_000  # 10,000


async def test_a_drained_table_is_estimated_from_its_live_rows(
    client: httpx.AsyncClient, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Laid out as a drain leaves it (never analyzed): inserted, then claimed and finished,
    # each an update that writes the row again elsewhere, so most pages hold no live row
    # and the rest are full. A sample of pages scaled up by pages alone is far off here.
    n, left = 60_000, 5_000
    sql(
        "INSERT INTO tasks (kind, execute_at) SELECT CASE WHEN n %% 4 = 0 THEN 'foo'"
        " ELSE 'baz' END, now() FROM generate_series(1, %s) AS n",
        n + left,
    )
    sql(
        "UPDATE tasks SET state = 'running', attempts = 1, started_at = now(),"
        " claimed_by = 'w' WHERE id <= (SELECT min(id) + %s FROM tasks)",
        n - 1,
    )
    sql(
        "UPDATE tasks SET state = 'succeeded', finished_at = now(), claimed_by = NULL"
        " WHERE state = 'running'"
    )
    # The server's count of live rows follows each commit within a second or so.
    wait_for_live_rows(sql, n + left)
    monkeypatch.setattr(report, "EXACT_UP_TO", 1_000)
    monkeypatch.setattr(report, "SAMPLE_ROWS", 2_000)  # ~20 of the table's pages
    for _ in range(20):
        got = (await client.get("/stats")).json()
        assert got["estimated"] == ["cancelled", "failed", "succeeded"]
        assert got["counts"]["scheduled"] == {
            "bar": 0,
            "baz": left * 3 // 4,
            "foo": left // 4,
            "http": 0,
        }
        succeeded = got["counts"]["succeeded"]
        assert abs(sum(succeeded.values()) - n) <= 2, succeeded  # (rounded per kind)
        assert abs(succeeded["foo"] - n / 4) < 0.1 * n / 4, succeeded


async def test_a_table_is_not_read_as_small_after_its_statistics_were_lost(
    own_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A crash, a failover or pg_stat_reset loses the server's counts of live rows: they
    # start again from the rows written since, and the last vacuum and analyze are
    # forgotten with them. Autovacuum had counted the table, and pg_class still says so:
    # /stats reads the table as that large, not as the 600 rows written after. (Here a
    # session's process is killed, as the OOM killer does, and the server recovers.)
    n, after, scheduled = 20_000, 600, 100
    with psycopg.connect(own_server.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasks (kind, state, attempts, started_at, finished_at, execute_at)"
            " SELECT 'baz', 'succeeded', 1, now(), now(), now() FROM generate_series(1, %s)",
            [n],
        )
        # Autovacuum's vacuum and its analyze both done, and no worker of its still at the
        # table (one that reports after the crash below counts the table again): within a
        # pass of its launcher, a minute apart at the server's default autovacuum_naptime.
        deadline = time.monotonic() + 150
        while conn.execute(
            "SELECT reltuples, pg_stat_get_last_autovacuum_time(oid) IS NOT NULL,"
            " pg_stat_get_last_autoanalyze_time(oid) IS NOT NULL,"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker')"
            " FROM pg_class WHERE oid = 'tasks'::regclass"
        ).fetchone() != (n, True, True, 0):
            assert time.monotonic() < deadline, "autovacuum never counted the table"
            time.sleep(0.2)
    own_server.crash()
    with psycopg.connect(own_server.url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT pg_stat_get_live_tuples(oid), pg_stat_get_last_autovacuum_time(oid),"
            " pg_stat_get_last_autoanalyze_time(oid) FROM pg_class WHERE oid = 'tasks'::regclass"
        ).fetchone() == (0, None, None)
        conn.execute(
            "INSERT INTO tasks (kind, execute_at) SELECT 'foo', now() + interval '1 day'"
            " FROM generate_series(1, %s)",
            [scheduled],
        )
        conn.execute(
            "INSERT INTO tasks (kind, state, attempts, started_at, finished_at, execute_at)"
            " SELECT 'baz', 'succeeded', 1, now(), now(), now() FROM generate_series(1, %s)",
            [after - scheduled],
        )
        wait_for_live_rows(lambda query: conn.execute(query).fetchall(), after)
    monkeypatch.setattr(report, "EXACT_UP_TO", 1_000)
    async with serve(Settings(database_url=own_server.url)) as client:
        got = (await client.get("/stats")).json()
    assert got["estimated"] == ["cancelled", "failed", "succeeded"]
    assert got["counts"]["scheduled"]["foo"] == scheduled
    # (The larger of the two counts: the table's as autovacuum counted it, less the 100
    # counted exactly; the 600 rows written since are not added to it.)
    assert abs(got["counts"]["succeeded"]["baz"] - n) <= after, got["counts"]


async def test_many_scheduled_tasks_are_estimated_and_the_due_ones_counted(
    client: httpx.AsyncClient, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 30,000 succeeded and 20,000 scheduled tomorrow, mixed on every page (3 baz to 1 foo),
    # then 500 foo due: past SCHEDULED_EXACT_UP_TO, the scheduled ones are a sample's, the
    # due ones still counted.
    n = 50_000
    sql(
        "INSERT INTO tasks (kind, state, execute_at, attempts, started_at, finished_at)"
        " SELECT CASE WHEN n %% 4 = 0 THEN 'foo' ELSE 'baz' END, s.state,"
        " now() + CASE WHEN s.state = 'scheduled' THEN interval '1 day' ELSE '0' END,"
        " CASE WHEN s.state = 'scheduled' THEN 0 ELSE 1 END,"
        " CASE WHEN s.state = 'scheduled' THEN NULL ELSE now() END,"
        " CASE WHEN s.state = 'scheduled' THEN NULL ELSE now() END"
        " FROM generate_series(1, %s) AS n, LATERAL (SELECT CAST(CASE WHEN n %% 5 < 2"
        " THEN 'scheduled' ELSE 'succeeded' END AS text) AS state) AS s",
        n,
    )
    sql(
        "INSERT INTO tasks (kind, execute_at) SELECT 'foo', now() - interval '1 minute'"
        " FROM generate_series(1, 500)"
    )
    wait_for_live_rows(sql, n + 500)
    monkeypatch.setattr(report, "EXACT_UP_TO", 1_000)
    monkeypatch.setattr(report, "SAMPLE_ROWS", 10_000)
    # (raising=False: the same test, of a version without the setting, fails on its counts.)
    monkeypatch.setattr(report, "SCHEDULED_EXACT_UP_TO", 20_500, raising=False)  # 1 more
    got = (await client.get("/stats")).json()
    assert got["estimated"] == ["cancelled", "failed", "succeeded"]
    assert got["counts"]["scheduled"] == {"bar": 0, "baz": 15_000, "foo": 5_500, "http": 0}
    monkeypatch.setattr(report, "SCHEDULED_EXACT_UP_TO", 20_499, raising=False)
    got = (await client.get("/stats")).json()
    assert got["estimated"] == ["cancelled", "failed", "scheduled", "succeeded"]
    scheduled, succeeded = got["counts"]["scheduled"], got["counts"]["succeeded"]
    assert abs(scheduled["baz"] - 15_000) < 300, scheduled
    # The 500 due sit on the table's last few pages, which a sample takes whole or misses
    # (500 +- 450 when they were sampled too): they are counted, the rest sampled.
    assert abs(scheduled["foo"] - 5_500) < 150, scheduled
    assert abs(sum(scheduled.values()) + sum(succeeded.values()) - n - 500) <= 4, got["counts"]
    assert got["due"] == 500


async def test_few_finished_tasks_beside_many_scheduled_are_counted_not_sampled(
    client: httpx.AsyncClient, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3,000 finished after a prune, on the last few of the table's pages, beside 30,000
    # scheduled for tomorrow: a sample took those pages whole or missed them (0 on half the
    # calls, ~6,000 on the rest). Few enough to count: counted, on every call.
    scheduled, finished = 30_000, 3_000
    sql(
        "INSERT INTO tasks (kind, execute_at) SELECT 'foo', now() + interval '1 day'"
        " FROM generate_series(1, %s)",
        scheduled,
    )
    sql(
        "INSERT INTO tasks (kind, state, attempts, started_at, finished_at, execute_at)"
        " SELECT 'baz', 'succeeded', 1, now(), now(), now() FROM generate_series(1, %s)",
        finished,
    )
    wait_for_live_rows(sql, scheduled + finished)
    monkeypatch.setattr(report, "EXACT_UP_TO", 1_000)
    monkeypatch.setattr(report, "SAMPLE_ROWS", 2_000)
    for _ in range(10):
        got = (await client.get("/stats")).json()
        assert got["estimated"] == ["scheduled"]
        assert got["counts"]["succeeded"] == {"bar": 0, "baz": finished, "foo": 0, "http": 0}
        # (All the rest is scheduled: the server's count of live rows less those counted.)
        assert got["counts"]["scheduled"]["foo"] == scheduled, got["counts"]
    # One more than FINISHED_EXACT_UP_TO: sampled again, as they were.
    monkeypatch.setattr(report, "FINISHED_EXACT_UP_TO", finished - 1)
    got = (await client.get("/stats")).json()
    assert got["estimated"] == ["cancelled", "failed", "scheduled", "succeeded"]


@pytest.mark.parametrize(("widest_rows", "wider"), [(200_000, True), (10, False)])
async def test_a_sample_that_misses_every_finished_row_is_taken_again_wider(
    client: httpx.AsyncClient,
    sql: Sql,
    monkeypatch: pytest.MonkeyPatch,
    widest_rows: int,
    wider: bool,
) -> None:
    # A sample of ~0.01% of the pages finds no finished row here, though the server counts
    # 20,000: it is taken again, wider, while it reads at most WIDEST_SAMPLE_ROWS rows (at
    # 10, none is taken: the old answer, estimated 0). The first sample picks one of the
    # table's pages in ~2% of runs: then it found them and none is taken again either.
    n = 20_000
    sql(
        "INSERT INTO tasks (kind, state, attempts, started_at, finished_at, execute_at)"
        " SELECT 'baz', 'succeeded', 1, now(), now(), now() FROM generate_series(1, %s)",
        n,
    )
    wait_for_live_rows(sql, n)
    monkeypatch.setattr(report, "EXACT_UP_TO", 1_000)
    monkeypatch.setattr(report, "SAMPLE_ROWS", 1)
    monkeypatch.setattr(report, "WIDEST_SAMPLE_ROWS", widest_rows)
    # The samples taken again go through Store._all (the first is in /stats' pipeline).
    again: list[float] = []
    store_all = Store._all

    async def spy(self: Store, query: str, row_factory: Any, **params: Any) -> Any:
        rows = await store_all(self, query, row_factory, **params)
        if query == queries.STATS_FINISHED_SAMPLE:
            again.append(params["percent"])
        return rows

    monkeypatch.setattr(Store, "_all", spy)
    got = (await client.get("/stats")).json()
    succeeded = sum(got["counts"]["succeeded"].values())
    if wider or not again:
        assert got["estimated"] == ["cancelled", "failed", "succeeded"]
    if wider:
        assert abs(succeeded - n) <= 2, (got["counts"], again)
    else:
        assert again == []
        assert succeeded in (0, n), got["counts"]  # (n: the first sample found them)


async def test_finished_tasks_past_the_retention_are_pruned_and_their_keys_freed(
    client: httpx.AsyncClient, settings: Settings, sql: Sql, task_factory: Callable[..., int]
) -> None:
    keyed = await client.post(
        "/tasks", json={"type": "baz", "execute_at": 0}, headers={"Idempotency-Key": "k-1"}
    )
    assert keyed.status_code == 201
    old = [task_factory("baz") for _ in range(3)]
    await tick(settings, out=io.StringIO())
    recent = task_factory("baz")
    await tick(settings, out=io.StringIO())
    far_future = task_factory("baz", due_in_s=86400.0)
    sql(
        "UPDATE tasks SET finished_at = now() - interval '8 days', created_at = now() - "
        "interval '9 days' WHERE id = ANY(%s)",
        [*old, keyed.json()["id"]],
    )
    sql("UPDATE tasks SET created_at = now() - interval '9 days' WHERE id = %s", far_future)

    summary = await tick(settings, out=io.StringIO())  # its own prune clock: due
    assert summary.pruned == 4
    left = {task_id for (task_id,) in sql("SELECT id FROM tasks")}
    assert left == {recent, far_future}, "only finished tasks past the retention go"

    again = await client.post(
        "/tasks", json={"type": "foo", "execute_at": 0}, headers={"Idempotency-Key": "k-1"}
    )
    assert again.status_code == 201, "the key of a pruned task is free again"


async def test_ticks_that_share_a_prune_clock_prune_at_most_once_a_minute(
    settings: Settings, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """A process's ticks (a Lambda container's, the timer loop's) share one clock."""
    clock = PruneClock()
    old = task_factory("baz")
    assert (await tick(settings, out=io.StringIO(), prune_clock=clock)).pruned == 0
    sql(
        "UPDATE tasks SET finished_at = now() - interval '8 days', created_at = now() - "
        "interval '9 days' WHERE id = %s",
        old,
    )
    again = await tick(settings, out=io.StringIO(), prune_clock=clock)
    assert again.pruned == 0, "pruned less than a minute ago"
    assert clock.last_s is not None
    clock.last_s -= PRUNE_EVERY_S  # a minute on
    assert (await tick(settings, out=io.StringIO(), prune_clock=clock)).pruned == 1


def test_prune_on_demand_says_how_many(database_url: str, sql: Sql) -> None:
    sql(
        "INSERT INTO tasks (kind, state, execute_at, started_at, finished_at, attempts)"
        " SELECT 'baz', 'succeeded', now(), now(), now() - interval '2 hours', 1"
        " FROM generate_series(1, 2500)"
    )
    sql(
        "INSERT INTO tasks (kind, state, execute_at, started_at, finished_at, attempts)"
        " SELECT 'baz', 'failed', now(), now(), now() - interval '10 minutes', 1"
        " FROM generate_series(1, 10)"
    )
    env = {**os.environ, "TASKRUNNER_DATABASE_URL": database_url}
    result = subprocess.run(
        [TASKRUNNER, "prune", "--older-than", "3600"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "pruned 2500 finished tasks older than 3600 s" in result.stderr
    assert result.stdout == ""
    assert sql("SELECT state, count(*) FROM tasks GROUP BY 1") == [("failed", 10)]
    off = subprocess.run(
        [TASKRUNNER, "prune"],
        env={**env, "TASKRUNNER_RETENTION_S": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert off.returncode == 1 and "--older-than" in off.stderr
    every = subprocess.run(
        [TASKRUNNER, "prune", "--older-than", "0"],
        env={**env, "TASKRUNNER_RETENTION_S": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert every.returncode == 0, every.stderr
    assert "pruned 10 finished tasks older than 0 s" in every.stderr
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


async def test_a_task_created_past_its_time_has_waited_since_its_creation(
    client: httpx.AsyncClient,
) -> None:
    """`execute_at: 0`, as the README's examples create tasks: due since its creation, not
    for 56 years (the oldest-due card went red, and the alert on it fired, at once)."""
    assert (await client.post("/tasks", json={"type": "baz", "execute_at": 0})).status_code == 201
    age = (await client.get("/stats")).json()["oldest_due_age_s"]
    assert 0 <= age < 60, age
