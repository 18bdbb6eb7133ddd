"""Schedules: the API, and each occurrence made into exactly one task by whoever runs.

Time moves by a test clock given to the stores (queries.NOW, `Store(clock=...)`): minutes
pass without anyone waiting for them (`faketime` would not move PostgreSQL's `now()`).
"""

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from functions import schedules, upkeep
from functions.db import Database
from functions.errors import InvalidValue
from functions.http.app import build_app
from functions.model import CatchUp, Schedule
from functions.runner import Runner
from functions.settings import Settings
from functions.store import Store
from functions.tick import tick

Sql = Callable[..., list[tuple[Any, ...]]]
MINUTE = timedelta(minutes=1)


class Clock:
    """A test's time, moved by hand; shared by every store of a test."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def move(self, by: timedelta) -> None:
        self.at += by


def next_minute(sql: Sql) -> datetime:
    """The database's next whole minute, and 10 s: occurrences of `* * * * *` fall 50 s
    after each such time."""
    [(now,)] = sql("SELECT date_trunc('minute', now()) + interval '1 minute 10 seconds'")
    assert isinstance(now, datetime)
    return now.astimezone(UTC)


@asynccontextmanager
async def api(settings: Settings, clock: Clock | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app whose store reads `clock`, run through its lifespan."""
    app = build_app(settings, store=Store(Database(settings), clock=clock))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


def schedule_body(name: str = "every-minute", **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "baz", "cron": "* * * * *", **fields}


async def made(store: Store, clock: Clock) -> int:
    return await schedules.create_occurrences(store, 3)


def occurrences(sql: Sql, name: str = "every-minute") -> list[datetime]:
    rows = sql("SELECT scheduled_for FROM tasks WHERE schedule = %s ORDER BY scheduled_for", name)
    return [at.astimezone(UTC) for (at,) in rows]


# --- the API -------------------------------------------------------------------------------


@pytest.mark.one_server
async def test_create_show_list_replace_patch_delete(settings: Settings, sql: Sql) -> None:
    clock = Clock(next_minute(sql))
    async with api(settings, clock) as client:
        response = await client.post("/schedules", json=schedule_body(timezone="Europe/Paris"))
        assert response.status_code == 201, response.text
        body = response.json()
        assert response.headers["location"] == "/schedules/every-minute"
        start = clock.at.replace(second=0) + MINUTE
        assert body["next_run_at"] == start.isoformat().replace("+00:00", "Z")
        assert body["skipped_occurrences"] == 0 and body["catch_up"] == "latest"
        assert body["timezone"] == "Europe/Paris" and body["enabled"] is True

        again = await client.post("/schedules", json=schedule_body())
        assert again.status_code == 409 and "exists" in again.json()["detail"]

        shown = await client.get("/schedules/every-minute")
        assert shown.json() == body
        assert (await client.get("/schedules/nothing")).status_code == 404

        # PUT: 201 when new, 200 when replaced; the same schedule again changes nothing.
        put = await client.put("/schedules/hourly", json={"type": "foo", "cron": "@hourly"})
        assert put.status_code == 201, put.text
        repeat = await client.put("/schedules/hourly", json={"type": "foo", "cron": "@hourly"})
        assert repeat.status_code == 200 and repeat.json() == put.json()
        wrong = await client.put("/schedules/hourly", json=schedule_body("other"))
        assert wrong.status_code == 422

        # Paged by name, as /tasks is by id.
        for name in ("b", "a", "c"):
            assert (await client.post("/schedules", json=schedule_body(name))).status_code == 201
        names: list[str] = []
        cursor: str | None = None
        while True:
            params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = (await client.get("/schedules", params=params)).json()
            names += [item["name"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert names == ["a", "b", "c", "every-minute", "hourly"]
        bad = await client.get("/schedules", params={"cursor": "YWZ0ZXI6MQ"})
        assert bad.status_code == 422 and "cursor" in bad.text

        patched = await client.patch("/schedules/every-minute", json={"enabled": False})
        assert patched.status_code == 200, patched.text
        assert patched.json()["enabled"] is False and patched.json()["next_run_at"] is None
        assert (await client.patch("/schedules/every-minute", json={})).status_code == 422
        assert (await client.patch("/schedules/nothing", json={"enabled": True})).status_code == 404

        assert (await client.delete("/schedules/every-minute")).status_code == 204
        assert (await client.delete("/schedules/every-minute")).status_code == 404


@pytest.mark.one_server
@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"timezone": "Mars/Olympus"}, "unknown timezone 'Mars/Olympus'"),
        ({"cron": "61 * * * *"}, "minute field '61'"),
        ({"cron": "* 24 * * *"}, "hour field '24'"),
        ({"cron": "0 0 31 2 *"}, "never runs: no month in its month field '2' has a day '31'"),
        ({"timezone": "localtime"}, "timezone 'localtime' is whatever the machine"),
        ({"cron": "* * * *"}, "has 4 fields"),
        ({"cron": "0 * * * * *"}, "has 6 fields"),
        ({"cron": "@minutely"}, "has 1 fields"),
        ({"type": "nope"}, "unknown type 'nope'"),
        ({"name": "Upper"}, "schedule name 'Upper'"),
        ({"name": "-dash"}, "schedule name '-dash'"),
        ({"name": "a" * 129}, "schedule name"),
        ({"catch_up": "some"}, "catch_up"),
        ({"max_attempts": 0}, "max_attempts 0"),
        ({"priority": 10}, "priority 10"),
        ({"timeout_s": 1e9}, "timeout_s 1000000000.0 is over what kind 'baz' allows"),
        ({"payload": "\u0000"}, "payload"),
    ],
)
async def test_every_refusal_is_a_422_that_says_what_is_wrong(
    client: httpx.AsyncClient, fields: dict[str, Any], said: str
) -> None:
    response = await client.post("/schedules", json=schedule_body() | fields)
    assert response.status_code == 422, response.text
    assert said in response.text


@pytest.mark.one_server
async def test_the_openapi_document_states_each_kinds_rules_for_a_schedule_as_for_a_task(
    client: httpx.AsyncClient,
) -> None:
    """A schedule's tasks are made by a task's rules, and its body says so as a task's does:
    an `http` schedule needs a payload of the http kind's schema, and a `timeout_s` is at
    most its kind's, in a PATCH too (before: a schedule's schema took any payload, which a
    client generated from the document then sent, and got a 422)."""
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]

    def rules(name: str) -> list[tuple[str, Any]]:
        return [
            (rule["if"]["properties"]["type"]["pattern"], rule["then"])
            for rule in schemas[name].get("allOf", [])
        ]

    task_rules = rules("TaskIn")
    assert any("[Hh][Tt][Tt][Pp]" in pattern and "payload" in then.get("required", ())
               for pattern, then in task_rules)  # fmt: skip
    for name in ("ScheduleIn", "SchedulePutIn"):
        assert rules(name) == task_rules, name
    # A PATCH may leave the payload as it is: a payload sent beside the type is checked.
    [(pattern, then)] = [
        (rule["if"]["properties"]["type"]["pattern"], rule["then"])
        for rule in schemas["SchedulePatchIn"]["allOf"]
        if rule["if"].get("required") == ["type", "payload"]
    ]
    assert "[Hh][Tt][Tt][Pp]" in pattern and "required" not in then
    assert len(schemas["SchedulePatchIn"]["allOf"]) == len(task_rules)  # timeouts' ceilings too
    refused = await client.post(
        "/schedules", json=schedule_body(type="http", payload={"to": "ada@example.com"})
    )
    assert refused.status_code == 422, refused.text
    assert "payload" in refused.text


@pytest.mark.one_server
async def test_names_and_crons_at_the_ends_of_their_ranges(client: httpx.AsyncClient) -> None:
    for name, cron in [
        ("a" * 128, "59 23 31 12 7"),
        ("0", "0 0 1 1 0"),
        ("a.b_c-d", "*/15 1-5,7 * JAN-MAR mon-fri"),
        ("yearly", "@YEARLY"),
        ("last-day", "0 0 L * *"),
    ]:
        response = await client.post("/schedules", json=schedule_body(name, cron=cron))
        assert response.status_code == 201, response.text
    assert (await client.get("/schedules/yearly")).json()["cron"] == "@yearly"
    # A zone in any case, kept as IANA spells it.
    response = await client.post("/schedules", json=schedule_body("utc", timezone="utc"))
    assert response.status_code == 201 and response.json()["timezone"] == "UTC", response.text


# --- occurrences ---------------------------------------------------------------------------


async def test_each_occurrence_once_across_workers_ticks_and_an_api_restart(
    settings: Settings, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`* * * * *` over five minutes of the test clock, with three workers making
    occurrences every 50 ms, two ticks at each step and the API restarted (and the schedule
    PUT again, as a deploy does) in the middle: one task per occurrence, never two, none
    made more than a minute early, none started before its time."""
    monkeypatch.setattr(upkeep, "SCHEDULES_EVERY_S", 0.05)
    settings = dataclasses.replace(settings, lease_seconds=3600.0)
    clock = Clock(next_minute(sql))
    start = clock.at
    body = schedule_body(cron="* * * * *")
    async with api(settings, clock) as client:
        assert (await client.put("/schedules/every-minute", json=body)).status_code == 201
    databases = [Database(settings) for _ in range(3)]
    runners = [Runner(Store(db, clock=clock), settings) for db in databases]
    stop = asyncio.Event()
    running = [asyncio.create_task(r.run(keep_polling=True, stop=stop)) for r in runners]
    try:
        for step in range(10):  # 30 s each: five minutes
            clock.move(timedelta(seconds=30))
            for _ in range(2):
                await tick(settings, clock=clock)
            if step == 5:
                async with api(settings, clock) as client:
                    put = await client.put("/schedules/every-minute", json=body)
                    assert put.status_code == 200, put.text
            await asyncio.sleep(0.2)  # the workers' loops run meanwhile
    finally:
        stop.set()
        await asyncio.gather(*running)
        for db in databases:
            await db.dispose()
    expected = [start.replace(second=0) + MINUTE * i for i in range(1, 7)]
    assert occurrences(sql) == expected
    rows = sql("SELECT execute_at, state, started_at FROM tasks ORDER BY execute_at")
    assert [at for at, _, _ in rows] == expected
    # Every occurrence due by the clock's last time ran, and none before its time.
    for at, state, started_at in rows:
        if at <= clock.at:
            assert state == "succeeded" and started_at >= at


@pytest.mark.parametrize(
    ("catch_up", "made_at", "skipped"),
    [
        # Stopped from just after 0:00 (its task made) to 5:30: 1:00 .. 5:00 missed.
        (CatchUp.LATEST, [0, 5, 6], 4),
        (CatchUp.ALL, [0, 1, 2, 3, 4, 5, 6], 0),
        # 5:00 is half a minute late, not missed: made.
        (CatchUp.NONE, [0, 5, 6], 4),
    ],
)
async def test_catch_up_after_a_stop_across_five_occurrences(
    store: Store, sql: Sql, catch_up: CatchUp, made_at: list[int], skipped: int
) -> None:
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        body = schedule_body(catch_up=catch_up.value)
        assert (await client.post("/schedules", json=body)).status_code == 201
    assert await made(own, clock) == 1  # 0:00, a minute ahead
    clock.at = t0 + 5 * MINUTE + timedelta(seconds=30)  # everything was stopped meanwhile
    await made(own, clock)
    assert occurrences(sql) == [t0 + MINUTE * i for i in made_at]
    after = await own.get_schedule("every-minute")
    assert after is not None
    assert after.skipped_occurrences == skipped
    assert after.next_run_at == t0 + 7 * MINUTE


@pytest.mark.one_server
async def test_catch_up_none_drops_missed_occurrences_older_than_a_minute(
    store: Store, sql: Sql
) -> None:
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        body = schedule_body(catch_up="none")
        assert (await client.post("/schedules", json=body)).status_code == 201
    # At 6:01: 0:00 .. 5:00 are over a minute late (missed), 6:00 a second late (made), 7:00
    # within the minute ahead.
    clock.at = t0 + 6 * MINUTE + timedelta(seconds=1)
    await made(own, clock)
    assert occurrences(sql) == [t0 + 6 * MINUTE, t0 + 7 * MINUTE]
    after = await own.get_schedule("every-minute")
    assert after is not None and after.skipped_occurrences == 6


@pytest.mark.one_server
async def test_catch_up_all_makes_at_most_a_thousand_and_counts_the_rest(
    store: Store, sql: Sql
) -> None:
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        body = schedule_body(catch_up="all")
        assert (await client.post("/schedules", json=body)).status_code == 201
        # 1,001 and 1,002 missed: the most recent 1,000 made, then 1,000 of 1,002.
        clock.at = t0 + 1000 * MINUTE + timedelta(seconds=30)
        await made(own, clock)
        got = occurrences(sql)
        assert len(got) == 1001 and got[0] == t0 + MINUTE  # 1,000 missed, and 1,000:30's next
        shown = (await client.get("/schedules/every-minute")).json()
        assert shown["skipped_occurrences"] == 1
    [(count,)] = sql("SELECT count(*) FROM tasks WHERE scheduled_for <= %s", clock.at)
    assert count == 1000


@pytest.mark.parametrize(
    ("day", "expected_utc"),
    [
        # 29 March 2026, clocks go 02:00 -> 03:00 in Paris: 02:30 does not exist; it runs at
        # 03:00 local, 01:00 UTC, the first instant after the gap.
        (datetime(2026, 3, 29), ["2026-03-28 01:30", "2026-03-29 01:00", "2026-03-30 00:30"]),
        # 25 October 2026, clocks go 03:00 -> 02:00: 02:30 happens twice; it runs once, at
        # the first (CEST, 00:30 UTC).
        (datetime(2026, 10, 25), ["2026-10-24 00:30", "2026-10-25 00:30", "2026-10-26 01:30"]),
    ],
)
async def test_daylight_saving_in_paris(
    store: Store, sql: Sql, day: datetime, expected_utc: list[str]
) -> None:
    """`30 2 * * *` in Europe/Paris, around each change of the clocks: the creator, run every
    ten minutes of the test clock for three days, makes one task a day, at those times."""
    clock = Clock(day.replace(tzinfo=UTC) - timedelta(days=1, hours=12))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        body = schedule_body("paris", cron="30 2 * * *", timezone="Europe/Paris")
        assert (await client.post("/schedules", json=body)).status_code == 201
    end = clock.at + timedelta(days=3)
    while clock.at < end:
        await made(own, clock)
        clock.move(timedelta(minutes=10))
    got = [at.strftime("%Y-%m-%d %H:%M") for at in occurrences(sql, "paris")]
    assert got == expected_utc


@pytest.mark.one_server
async def test_each_occurrence_is_a_task_with_the_schedules_options(store: Store, sql: Sql) -> None:
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        body = schedule_body(
            type="foo", payload={"n": [1, "é"]}, max_attempts=7, timeout_s=0.5, priority=3
        )
        assert (await client.post("/schedules", json=body)).status_code == 201
        assert await made(own, clock) == 1
        [task] = (await client.get("/tasks")).json()["items"]
        assert task["schedule"] == "every-minute"
        assert task["scheduled_for"] == task["execute_at"] == t0.isoformat().replace("+00:00", "Z")
        assert (task["type"], task["payload"], task["max_attempts"]) == ("foo", {"n": [1, "é"]}, 7)
        assert (task["timeout_s"], task["priority"]) == (0.5, 3)
        refused = await client.patch("/schedules/every-minute", json={"timeout_s": 1e9})
        assert refused.status_code == 422 and "timeout_s" in refused.text
        shown = (await client.get("/schedules/every-minute")).json()
        assert shown["last_task"] == {"id": task["id"], "state": "scheduled"}


@pytest.mark.one_server
async def test_the_domain_holds_every_write_of_a_schedule_to_its_tasks_rules(
    store: Store, settings: Settings, sql: Sql
) -> None:
    """Create, replace and change refuse a payload or timeout a task would be refused, in
    functions/schedules.py itself: whoever calls it (not only the API's routes), before
    anything is written."""
    ftp = {"url": "ftp://example.com/"}
    good = schedules.ScheduleIn(kind="baz", cron="* * * * *")
    writes: list[Callable[[], Awaitable[object]]] = [
        lambda: schedules.create_schedule(
            store, "a", dataclasses.replace(good, kind="http", payload=ftp), settings
        ),
        lambda: schedules.put_schedule(
            store, "a", dataclasses.replace(good, timeout_s=1e9), settings
        ),
        lambda: schedules.patch_schedule(store, "kept", {"kind": "http"}, settings),
        lambda: schedules.patch_schedule(store, "kept", {"timeout_s": 1e9}, settings),
        lambda: schedules.patch_schedule(store, "kept", {"payload": "\u0000"}, settings),
    ]
    kept = await schedules.create_schedule(store, "kept", good, settings)
    refused = []
    for write in writes:
        with pytest.raises(InvalidValue) as caught:
            await write()
        refused.append((type(caught.value).__name__, caught.value.issues[0]["loc"]))
    assert refused == [
        ("InvalidPayload", ["body", "payload"]),
        ("InvalidTimeout", ["body", "timeout_s"]),
        ("InvalidPayload", ["body", "payload"]),
        ("InvalidTimeout", ["body", "timeout_s"]),
        ("InvalidPayload", ["body", "payload"]),
    ]
    assert await schedules.get_schedule(store, "kept") == kept
    assert sql("SELECT name FROM schedules") == [("kept",)]


@pytest.mark.one_server
async def test_patch_takes_effect_from_the_next_occurrence_not_made(store: Store, sql: Sql) -> None:
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        assert (await client.post("/schedules", json=schedule_body())).status_code == 201
        assert await made(own, clock) == 1  # t0, made ahead
        patched = await client.patch(
            "/schedules/every-minute", json={"cron": "*/5 * * * *", "payload": {"v": 2}}
        )
        assert patched.status_code == 200, patched.text
        # The next five-minute mark after the last occurrence made.
        first_after = t0 + MINUTE * (5 - t0.minute % 5)
        assert patched.json()["next_run_at"] == first_after.isoformat().replace("+00:00", "Z")
        clock.at = first_after - timedelta(seconds=10)
        await made(own, clock)
        rows = sql("SELECT scheduled_for, payload FROM tasks ORDER BY scheduled_for")
        assert [(at.astimezone(UTC), p) for at, p in rows] == [(t0, None), (first_after, {"v": 2})]


@pytest.mark.one_server
async def test_disabling_or_deleting_cancels_the_occurrences_not_started(
    store: Store, sql: Sql
) -> None:
    """Made a minute ahead and not started: they are cancelled; a started one stays."""
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        for name in ("off", "gone", "kept"):
            assert (await client.post("/schedules", json=schedule_body(name))).status_code == 201
        assert await made(own, clock) == 3
        sql("UPDATE tasks SET started_at = now(), attempts = 1 WHERE schedule = 'kept'")
        assert (await client.patch("/schedules/off", json={"enabled": False})).status_code == 200
        assert (await client.delete("/schedules/gone")).status_code == 204
        assert (await client.patch("/schedules/kept", json={"enabled": False})).status_code == 200
        states = sql("SELECT schedule, state FROM tasks ORDER BY schedule")
        assert states == [("gone", "cancelled"), ("kept", "scheduled"), ("off", "cancelled")]
        # Disabled makes nothing, however far the clock goes; enabled again starts after now.
        clock.move(10 * MINUTE)
        assert await made(own, clock) == 0
        enabled = await client.patch("/schedules/off", json={"enabled": True})
        next_run = clock.at.replace(second=0) + MINUTE
        assert enabled.json()["next_run_at"] == next_run.isoformat().replace("+00:00", "Z")


async def test_five_thousand_schedules_over_three_minutes(store: Store, sql: Sql) -> None:
    """5,000 `* * * * *` schedules, the creator run by four at once every 20 s of the test
    clock for three minutes: 15,000 tasks, each occurrence once."""
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=59))
    sql(
        "INSERT INTO schedules (name, kind, cron, timezone, next_run_at)"
        " SELECT 's' || i, 'baz', '* * * * *', 'UTC', %s FROM generate_series(1, 5000) AS i",
        t0,
    )
    stores = [Store(Database(store.database.settings), clock=clock) for _ in range(4)]
    try:
        for _ in range(9):  # 0:01 .. 2:41 after t0 - 59 s: occurrences t0, t0+1, t0+2
            await asyncio.gather(*(made(s, clock) for s in stores))
            clock.move(timedelta(seconds=20))
    finally:
        for s in stores:
            await s.database.dispose()
    [(count, distinct, schedules_with_three)] = sql(
        "SELECT count(*), count(DISTINCT (schedule, scheduled_for)),"
        " (SELECT count(*) FROM (SELECT schedule FROM tasks GROUP BY schedule"
        "  HAVING count(*) = 3) AS x) FROM tasks"
    )
    assert (count, distinct, schedules_with_three) == (15_000, 15_000, 5_000)


def test_plan_is_a_pure_function_of_the_schedule_and_now() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    schedule = Schedule(name="s", kind="baz", cron="@hourly", timezone="UTC", next_run_at=t0)
    made = schedules.plan(schedule, t0 - timedelta(seconds=61))
    assert made.occurrences == [] and made.next_run_at == t0
    made = schedules.plan(schedule, t0 - timedelta(seconds=60))
    assert made.occurrences == [t0] and made.next_run_at == t0 + timedelta(hours=1)


@pytest.mark.one_server
async def test_an_occurrence_made_already_is_not_made_again_whatever_the_schedule_says(
    store: Store, sql: Sql
) -> None:
    """The second guard: a schedule moved back over occurrences it made (a restored backup, a
    hand edit) makes none of them twice (the unique index on schedule and occurrence)."""
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        assert (await client.post("/schedules", json=schedule_body())).status_code == 201
    assert await made(own, clock) == 1
    sql("UPDATE schedules SET next_run_at = %s", t0)
    assert await made(own, clock) == 0
    assert occurrences(sql) == [t0]
    schedule = await own.get_schedule("every-minute")
    assert schedule is not None and schedule.next_run_at == t0 + MINUTE


@pytest.mark.one_server
async def test_a_creator_skips_schedules_another_holds_and_never_waits(
    store: Store, sql: Sql, postgresql: Any
) -> None:
    """SKIP LOCKED: while one transaction holds a due schedule (another creator, a PATCH),
    a creator makes the others' occurrences and returns at once; no lock in a process."""
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        for name in ("held", "free"):
            assert (await client.post("/schedules", json=schedule_body(name))).status_code == 201
    postgresql.autocommit = False
    with postgresql.transaction():
        postgresql.execute("SELECT 1 FROM schedules WHERE name = 'held' FOR UPDATE")
        assert await asyncio.wait_for(made(own, clock), 5) == 1
        assert sql_rows(postgresql) == [("free",)]
    assert await made(own, clock) == 1
    assert [s for (s,) in sql("SELECT schedule FROM tasks ORDER BY schedule")] == ["free", "held"]


def sql_rows(conn: Any) -> list[tuple[Any, ...]]:
    return list(conn.execute("SELECT schedule FROM tasks").fetchall())


@pytest.mark.one_server
async def test_an_occurrence_cancelled_by_a_disable_or_delete_is_made_anew_after(
    store: Store, sql: Sql
) -> None:
    """Disabled and enabled again, or deleted and made again under its name, within the
    minute before an occurrence that was made and cancelled: the occurrence still runs."""
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        for name in ("toggled", "remade"):
            assert (await client.post("/schedules", json=schedule_body(name))).status_code == 201
        assert await made(own, clock) == 2
        assert (
            await client.patch("/schedules/toggled", json={"enabled": False})
        ).status_code == 200
        assert (await client.delete("/schedules/remade")).status_code == 204
        enabled = await client.patch("/schedules/toggled", json={"enabled": True})
        assert enabled.json()["next_run_at"] == t0.isoformat().replace("+00:00", "Z")
        assert (
            await client.put("/schedules/remade", json=schedule_body("remade"))
        ).status_code == 201
        assert await made(own, clock) == 2
        rows = sql("SELECT schedule, scheduled_for, state FROM tasks ORDER BY schedule, id")
        assert [(s, at.astimezone(UTC), state) for s, at, state in rows] == [
            ("remade", t0, "cancelled"),
            ("remade", t0, "scheduled"),
            ("toggled", t0, "cancelled"),
            ("toggled", t0, "scheduled"),
        ]


async def test_a_cancelled_occurrence_made_anew_is_not_retried_beside_its_new_task(
    store: Store, sql: Sql
) -> None:
    """A schedule disabled (its occurrence's task cancelled), enabled (the occurrence made
    anew), disabled and enabled again: three tasks for one occurrence, two cancelled. A
    retry of a cancelled one is a 409 that names the task holding the occurrence (it was a
    500: the `tasks_occurrence` index refused it), and a bulk retry leaves them and retries
    the others, as its dry run counts."""
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    async with api(store.database.settings, clock) as client:
        assert (await client.post("/schedules", json=schedule_body("pd"))).status_code == 201
        assert await made(own, clock) == 1
        for enabled in (False, True):
            await client.patch("/schedules/pd", json={"enabled": enabled})
            assert await made(own, clock) == (1 if enabled else 0)
        await client.patch("/schedules/pd", json={"enabled": False})
        # Two cancelled tasks of the occurrence now, and an unrelated one.
        [(other,)] = sql("INSERT INTO tasks (kind, execute_at, state, finished_at)"
                         " VALUES ('baz', now(), 'cancelled', now()) RETURNING id")  # fmt: skip
        # A retry would take the other and the first of the occurrence's two (one task an
        # occurrence), as its dry run counts (it counted 3).
        dry = await client.post("/tasks/retry", params={"state": "cancelled", "dry_run": "true"})
        assert dry.json() == {"count": 2, "more": False}
        dry = await client.post(
            "/tasks/retry", params={"state": "cancelled", "dry_run": "true", "limit": 1}
        )
        assert dry.json() == {"count": 1, "more": True}
        await client.patch("/schedules/pd", json={"enabled": True})
        assert await made(own, clock) == 1
        [first, second, third] = [i for (i,) in sql("SELECT id FROM tasks WHERE schedule = 'pd'"
                                                     " ORDER BY id")]  # fmt: skip
        for cancelled in (first, second):
            refused = await client.post(f"/tasks/{cancelled}/retry")
            assert refused.status_code == 409, refused.text
            assert f"occurrence is task {third}'s now" in refused.json()["detail"]
        dry = await client.post("/tasks/retry", params={"state": "cancelled", "dry_run": "true"})
        assert dry.json() == {"count": 1, "more": False}
        retried = await client.post("/tasks/retry", params={"state": "cancelled"})
        assert retried.status_code == 200, retried.text
        assert retried.json() == {"count": 1}
        states = sql("SELECT id, state FROM tasks ORDER BY id")
        assert states == sorted([(first, "cancelled"), (second, "cancelled"),
                                 (third, "scheduled"), (other, "scheduled")])  # fmt: skip
        # Disabled once more: a bulk retry of two cancelled tasks of one occurrence, none
        # holding it, retries the first and leaves the second (one task an occurrence).
        await client.patch("/schedules/pd", json={"enabled": False})
        retried = await client.post("/tasks/retry", params={"state": "cancelled"})
        assert retried.json() == {"count": 1}
        assert sql("SELECT id FROM tasks WHERE schedule = 'pd' AND state <> 'cancelled'") == [
            (first,)
        ]


@pytest.mark.parametrize("limit", [None, 1000, 1], ids=["one", "bulk", "bulk-limit-1"])
async def test_a_retry_that_races_the_making_of_its_occurrence_is_refused_not_a_500(
    store: Store, sql: Sql, database_url: str, limit: int | None
) -> None:
    """Occurrences are made anew (here by hand, as the creator inserts them) in transactions
    the retry cannot see: the retry's write waits for each, is refused by the
    `tasks_occurrence` index once it commits, and runs again: a 409, or a bulk retry that
    leaves the tasks, however many of its runs clash in a row (the third was a 500; with
    `limit=1`, the second)."""
    bulk = limit is not None
    t0 = next_minute(sql).replace(second=0) + MINUTE
    clock = Clock(t0 - timedelta(seconds=50))
    own = Store(store.database, clock=clock)
    occurrences = [t0 + n * MINUTE for n in range(3 if bulk else 1)]
    async with api(store.database.settings, clock) as client:
        assert (await client.post("/schedules", json=schedule_body("pd"))).status_code == 201
        assert await made(own, clock) == 1
        await client.patch("/schedules/pd", json={"enabled": False})
        for at in occurrences[1:]:  # (as a disable leaves them: cancelled, not started)
            sql(
                "INSERT INTO tasks (kind, execute_at, schedule, scheduled_for, state,"
                " finished_at) VALUES ('baz', %s, 'pd', %s, 'cancelled', now())",
                at,
                at,
            )
        cancelled = [i for (i,) in sql("SELECT id FROM tasks WHERE schedule = 'pd' ORDER BY id")]
        makers = [await psycopg.AsyncConnection.connect(database_url) for _ in occurrences]
        try:
            for maker, at in zip(makers, occurrences, strict=True):
                await maker.execute(
                    "INSERT INTO tasks (kind, execute_at, schedule, scheduled_for)"
                    " VALUES ('baz', %s, 'pd', %s)",
                    (at, at),
                )
            if bulk:
                retry = client.post("/tasks/retry", params={"state": "cancelled", "limit": limit})
            else:
                retry = client.post(f"/tasks/{cancelled[0]}/retry")
            answer = asyncio.ensure_future(retry)
            for maker in makers:
                await asyncio.sleep(0.5)
                assert not answer.done()  # waiting for this maker's transaction
                await maker.commit()
        finally:
            for maker in makers:
                await maker.close()
        response = await answer
    if bulk:
        assert (response.status_code, response.json()) == (200, {"count": 0})
    else:
        assert response.status_code == 409, response.text
    states = sql("SELECT state FROM tasks WHERE id = ANY(%s)", cancelled)
    assert states == [("cancelled",)] * len(cancelled)


async def test_a_bulk_retry_takes_the_first_cancelled_task_of_an_occurrence_its_filters_match(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    """Two cancelled tasks of one occurrence, none holding it: a bulk retry whose filters
    leave out the first takes the second (it took none: the first, unmatched, came first)."""
    rows = sql(
        "INSERT INTO tasks (kind, execute_at, schedule, scheduled_for, state, finished_at,"
        " created_at, error) VALUES"
        " ('baz', now(), 'pd', now(), 'cancelled', now(), now() - interval '1 hour', NULL),"
        " ('baz', now(), 'pd', now(), 'cancelled', now(), now(), 'boom') RETURNING id"
    )
    [first, second] = sorted(task_id for (task_id,) in rows)
    sql("UPDATE tasks SET scheduled_for = (SELECT min(scheduled_for) FROM tasks)")
    for query in ({"error": "boom"}, {"created_after": "now"}):
        params = {"state": "cancelled", **query}
        if "created_after" in params:
            [(half_hour_ago,)] = sql("SELECT extract(epoch FROM now() - interval '30 minutes')")
            params["created_after"] = str(half_hour_ago)
        dry = await client.post("/tasks/retry", params={**params, "dry_run": "true"})
        assert dry.json() == {"count": 1, "more": False}, query
    retried = await client.post("/tasks/retry", params={"state": "cancelled", "error": "boom"})
    assert retried.json() == {"count": 1}
    assert sql("SELECT id, state FROM tasks ORDER BY id") == [
        (first, "cancelled"),
        (second, "scheduled"),
    ]
