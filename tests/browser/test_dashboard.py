"""The dashboard, used as a person would: real API and worker processes, a real database,
Debian's chromium. Numbers on the page are checked against the database itself."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from functions.counters import LATENESS_BOUNDS_MS
from tests.browser.conftest import SERVER, BrowserLog

if TYPE_CHECKING:
    from playwright.sync_api import Page

Sql = Callable[..., list[tuple[Any, ...]]]
# Read at import: the suite clears TASKRUNNER_* from the environment before each test.
SCREENSHOT = os.environ.get("TASKRUNNER_SCREENSHOT")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("pg_server", [SERVER], indirect=True),
    # Not kept in that server's xdist group: any free worker takes them.
    pytest.mark.one_server,
]


def expect(*args: Any) -> Any:
    from playwright.sync_api import expect

    return expect(*args)


def counts_in_database(sql: Sql) -> dict[tuple[str, str], int]:
    return {(s, k): n for s, k, n in sql("SELECT state, kind, count(*) FROM tasks GROUP BY 1, 2")}


def seconds_shown(text: str) -> float:
    """The seconds in `1 min 30 s`, `12 s`, `4.2 s`."""
    total = 0.0
    for value, unit in re.findall(r"([\d.]+) (d|h|min|s)\b", text):
        total += float(value) * {"d": 86400, "h": 3600, "min": 60, "s": 1}[unit]
    assert total or text.strip() == "0 s", text
    return total


def insert_finished(sql: Sql, kind: str, state: str, n: int, note: str) -> None:
    column = "output" if state == "succeeded" else "error"
    for _ in range(n):
        sql(
            "INSERT INTO tasks (kind, execute_at, max_attempts, state, attempts, started_at,"
            f" finished_at, {column}) VALUES (%s, now() - interval '10 min', 3, %s, 1,"
            " now() - interval '10 min', now() - interval '9 min', %s)",
            kind,
            state,
            note,
        )


def hold_running(sql: Sql, task_id: int) -> None:
    """Make `task_id` running, held by a live worker (as a claim would)."""
    sql(
        "INSERT INTO workers (id, lease_expires_at) VALUES ('w', now() + interval '10 min')"
        " ON CONFLICT DO NOTHING"
    )
    sql("UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w' WHERE id = %s", task_id)


def add_activity(sql: Sql, minutes_ago: int, started: int, succeeded: int, failed: int,
                 lateness_bucket: int) -> None:  # fmt: skip
    """What workers record: a 10-second bucket `minutes_ago` minutes back, every start's
    lateness in one histogram bucket."""
    histogram = [0] * len(LATENESS_BOUNDS_MS)
    histogram[lateness_bucket] = started
    sql(
        "INSERT INTO task_activity (bucket, started, succeeded, failed, lateness, lateness_max_ms)"
        " VALUES (to_timestamp(floor(extract(epoch FROM now()) / 10) * 10 - %s * 60), %s, %s,"
        " %s, %s, %s)",
        minutes_ago,
        started,
        succeeded,
        failed,
        histogram,
        LATENESS_BOUNDS_MS[lateness_bucket],
    )


def test_overview_shows_what_the_database_holds_and_keeps_it_current(
    taskrunner: Callable[..., str], page: Page, sql: Sql, task_factory: Callable[..., int]
) -> None:
    for due_in_s in (-90.0, -5.0, 3600.0, 7200.0):
        task_factory("baz", due_in_s=due_in_s)
    task_factory("foo", due_in_s=-1.0)
    # Created before they became due, as tasks are (one created past its time waits from then).
    sql("UPDATE tasks SET created_at = execute_at WHERE execute_at < now()")
    insert_finished(sql, "baz", "succeeded", 3, "Baz 7")
    insert_finished(sql, "bar", "failed", 2, "HTTP 500")
    hold_running(sql, task_factory("foo", due_in_s=-1.0))
    add_activity(sql, 5, started=7, succeeded=5, failed=2, lateness_bucket=20)
    add_activity(sql, 20, started=4, succeeded=4, failed=0, lateness_bucket=10)
    api = taskrunner()

    # The page's clock runs only when the test says: its refreshes are the test's to time.
    page.clock.install()
    page.clock.pause_at(datetime.now(UTC) + timedelta(seconds=1))
    page.goto(f"{api}/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    counts = counts_in_database(sql)
    table = page.locator("#counts")
    for state in ("scheduled", "running", "succeeded", "failed"):
        for kind in ("foo", "bar", "baz"):
            cell = table.locator(f'td[data-state="{state}"][data-kind="{kind}"]')
            expect(cell).to_have_text(str(counts.get((state, kind), 0)))
        total = sum(n for (s, _), n in counts.items() if s == state)
        expect(table.locator(f'td[data-state="{state}"][data-kind="all"]')).to_have_text(str(total))

    due, oldest_s = sql(
        "SELECT count(*), extract(epoch FROM now() - min(coalesce(next_attempt_at, execute_at)))"
        " FROM tasks WHERE state = 'scheduled' AND coalesce(next_attempt_at, execute_at) <= now()"
    )[0]
    expect(page.locator("#due")).to_have_text(str(due))
    assert abs(seconds_shown(page.locator("#oldest-due").inner_text()) - float(oldest_s)) < 5
    busy, alive = sql(
        "SELECT (SELECT count(DISTINCT claimed_by) FROM tasks WHERE state = 'running'),"
        " (SELECT count(*) FROM workers WHERE lease_expires_at > now())"
    )[0]
    expect(page.locator("#workers")).to_have_text(str(busy))
    expect(page.locator("#workers-alive")).to_have_text(str(alive))

    # The last hour, as the workers recorded it.
    started, succeeded, failed = sql(
        "SELECT sum(started), sum(succeeded), sum(failed) FROM task_activity"
        " WHERE bucket > now() - interval '1 hour'"
    )[0]
    expect(page.locator("#chart-throughput-title")).to_have_text(
        f"Tasks a minute over the last hour: {started} started, {succeeded} succeeded,"
        f" {failed} failed"
    )
    # A minute a point, each with a tooltip of its figures.
    expect(page.locator("#chart-throughput rect.hover")).to_have_count(60)
    expect(page.locator("#chart-throughput rect.hover title").filter(
        has_text=f"started {7}, succeeded {5}, failed {2}")).to_have_count(1)  # fmt: skip
    # p99 lateness of the worst minute: within the histogram bucket every start fell in.
    worst = page.locator("#chart-lateness-title").text_content() or ""
    shown_ms = float(re.search(r"at most ([\d.]+) ms", worst).group(1))  # type: ignore[union-attr]
    assert LATENESS_BOUNDS_MS[19] * 0.99 <= shown_ms <= LATENESS_BOUNDS_MS[20] * 1.01, worst

    # New tasks show up without a reload.
    page.evaluate("window.stillTheSamePage = true")
    for _ in range(3):
        task_factory("bar", due_in_s=-2.0)
    page.wait_for_timeout(200)
    expect(page.locator("#due")).to_have_text(str(due))
    page.clock.run_for(3_000)
    expect(page.locator("#due")).to_have_text(str(due + 3))
    expect(page.locator('td[data-state="scheduled"][data-kind="bar"]')).to_have_text(
        str(counts_in_database(sql)[("scheduled", "bar")])
    )
    assert page.evaluate("window.stillTheSamePage") is True


def test_a_kind_nothing_runs_is_named_in_a_warning(
    taskrunner: Callable[..., str], page: Page, sql: Sql, task_factory: Callable[..., int]
) -> None:
    task_factory("ghost", due_in_s=-1.0)
    task_factory("baz", due_in_s=-1.0)
    sql("INSERT INTO kinds_served (kind, last_run_at) VALUES ('baz', now())")
    api = taskrunner()
    page.clock.install()
    page.clock.pause_at(datetime.now(UTC) + timedelta(seconds=1))
    page.goto(f"{api}/")
    warning = page.locator("#unserved")
    expect(warning).to_be_visible()
    expect(warning).to_have_text(re.compile(r"^Nothing runs ghost \(1 due\): no worker or tick"))
    # A worker that runs it starts: the warning goes at the next refresh.
    sql("INSERT INTO kinds_served (kind, last_run_at) VALUES ('ghost', now())")
    page.clock.run_for(3_000)
    expect(warning).to_be_hidden()


def test_a_task_created_in_the_form_runs_and_one_moved_and_run_now_runs_too(
    taskrunner: Callable[..., str], page: Page, sql: Sql
) -> None:
    api = taskrunner(worker=True)
    page.goto(f"{api}/#/tasks")

    # Now: empty time.
    page.get_by_role("form", name="New task").get_by_label("Type").select_option("foo")
    page.get_by_role("button", name="Create task").click()
    expect(page).to_have_url(re.compile(r"#/tasks/\d+$"))
    task_id = int(page.url.rsplit("/", 1)[1])
    expect(page.get_by_role("status")).to_have_text(f"Task #{task_id} created.")
    expect(page.locator('dd[data-field="state"]')).to_have_text("succeeded")
    expect(page.locator("#task-output")).to_have_text(f"Foo {task_id}")
    assert sql("SELECT state, output FROM tasks WHERE id = %s", task_id) == [
        ("succeeded", f"Foo {task_id}")
    ]

    # At a time, typed in the viewer's zone (+05:30).
    page.get_by_role("link", name="Tasks").first.click()
    page.get_by_role("form", name="New task").get_by_label("Type").select_option("baz")
    page.get_by_label("Run at").fill("2031-06-01T08:00:00")
    page.get_by_role("button", name="Create task").click()
    expect(page).not_to_have_url(re.compile(rf"#/tasks/{task_id}$"))
    expect(page.locator('dd[data-field="state"]')).to_have_text("scheduled")
    later = int(page.url.rsplit("/", 1)[1])
    [(execute_at,)] = sql("SELECT execute_at FROM tasks WHERE id = %s", later)
    assert execute_at == datetime(2031, 6, 1, 2, 30, tzinfo=UTC)
    # Shown in local time, with UTC in the title.
    shown = page.locator('dd[data-field="execute_at"] time')
    expect(shown).to_have_attribute("title", "2031-06-01 02:30:00 UTC")
    expect(shown).to_contain_text("08:00:00")

    page.get_by_label("New time").fill("2032-01-02T03:04:05")
    page.get_by_role("button", name="Reschedule").click()
    expect(page.get_by_role("status")).to_have_text("Reschedule: done.")
    [(execute_at,)] = sql("SELECT execute_at FROM tasks WHERE id = %s", later)
    assert execute_at == datetime(2032, 1, 1, 21, 34, 5, tzinfo=UTC)

    page.get_by_role("button", name="Run now").click()
    expect(page.locator('dd[data-field="state"]')).to_have_text("succeeded")
    [(state, output, moved_at)] = sql(
        "SELECT state, output, execute_at FROM tasks WHERE id = %s", later
    )
    assert (state, output) == ("succeeded", f"Baz {output.split()[1]}")
    # Run now keeps the time asked for.
    assert moved_at == datetime(2032, 1, 1, 21, 34, 5, tzinfo=UTC)


class _Flaky(BaseHTTPRequestHandler):
    # While true, every request is dropped unanswered: `bar` fails (any answer, a 500 too,
    # is a success for it: its task is to report the status code).
    hang_up = True

    def do_GET(self) -> None:
        if type(self).hang_up:
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, type[_Flaky]]]:
    """A URL for `bar` that fails it until its handler's `hang_up` is set to False."""
    handler = type("Handler", (_Flaky,), {"hang_up": True})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", handler
    server.shutdown()
    server.server_close()


def test_a_failed_task_is_found_by_its_state_and_retried(
    taskrunner: Callable[..., str],
    page: Page,
    sql: Sql,
    task_factory: Callable[..., int],
    flaky_server: tuple[str, type[_Flaky]],
) -> None:
    url, handler = flaky_server
    api = taskrunner(worker=True, env={"TASKRUNNER_BAR_URL": url})
    task_factory("baz", due_in_s=3600.0)
    failing = task_factory("bar", due_in_s=-1.0, max_attempts=1)
    deadline = time.monotonic() + 20
    while sql("SELECT state FROM tasks WHERE id = %s", failing) != [("failed",)]:
        assert time.monotonic() < deadline, sql("SELECT * FROM tasks WHERE id = %s", failing)
        time.sleep(0.1)
    [(error,)] = sql("SELECT error FROM tasks WHERE id = %s", failing)

    page.goto(f"{api}/#/tasks")
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(2)
    page.get_by_role("form", name="Filter tasks").get_by_label("State").select_option("failed")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(error[:40])
    page.get_by_role("link", name=f"#{failing}").click()
    expect(page.locator("#task-last-error")).to_have_text(error)
    expect(page.get_by_role("button", name="Run now")).to_be_disabled()

    handler.hang_up = False
    page.get_by_role("button", name="Retry", exact=True).click()
    expect(page.locator('dd[data-field="state"]')).to_have_text("succeeded")
    expect(page.locator("#task-output")).to_have_text("200")
    assert sql("SELECT state, attempts, output FROM tasks WHERE id = %s", failing) == [
        ("succeeded", 2, "200")
    ]


def test_tasks_page_by_cursor_filter_by_type_and_delete(
    taskrunner: Callable[..., str],
    page: Page,
    sql: Sql,
    task_factory: Callable[..., int],
) -> None:
    ids = [task_factory("baz" if i % 3 else "foo", due_in_s=3600.0) for i in range(32)]
    api = taskrunner()
    page.goto(f"{api}/#/tasks")
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(25)
    # Newest first.
    expect(rows.first).to_have_attribute("data-id", str(ids[-1]))
    page.get_by_role("button", name="Next").click()
    expect(rows).to_have_count(7)
    expect(rows.last).to_have_attribute("data-id", str(ids[0]))
    expect(page.get_by_role("button", name="Next")).to_be_disabled()
    page.get_by_role("button", name="Previous").click()
    expect(rows).to_have_count(25)

    page.get_by_role("form", name="Filter tasks").get_by_label("Type").select_option("foo")
    foo = [i for i in ids if sql("SELECT kind FROM tasks WHERE id = %s", i) == [("foo",)]]
    expect(rows).to_have_count(len(foo))
    victim = foo[1]
    page.get_by_role("link", name=f"#{victim}", exact=True).click()
    page.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    assert sql("SELECT count(*) FROM tasks WHERE id = %s", victim) == [(1,)]
    page.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(page.get_by_role("status")).to_have_text(f"Task #{victim} deleted.")
    expect(rows).to_have_count(len(foo) - 1)
    assert sql("SELECT count(*) FROM tasks WHERE id = %s", victim) == [(0,)]


def test_tasks_page_sorts_searches_errors_and_opens_a_task_by_its_id(
    taskrunner: Callable[..., str],
    page: Page,
    sql: Sql,
    task_factory: Callable[..., int],
) -> None:
    ids = [task_factory("baz", due_in_s=3600.0 * (3 - i)) for i in range(3)]
    sql(
        "UPDATE tasks SET state = 'failed', finished_at = now(), attempts = 1,"
        " error = 'TimeoutError: <b>GET</b> took 30 s' WHERE id = %s",
        ids[1],
    )
    api = taskrunner()
    page.goto(f"{api}/#/tasks")
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.first).to_have_attribute("data-id", str(ids[-1]))
    expect(page.locator("#page-label")).to_have_text("1\u20133, newest first")
    form = page.get_by_role("form", name="Filter tasks")
    form.get_by_label("Order").select_option(label="earliest execute at first")
    expect(page.locator("#page-label")).to_have_text("1\u20133, earliest execute at first")
    expect(rows.first).to_have_attribute("data-id", str(ids[-1]))  # due soonest
    expect(rows.last).to_have_attribute("data-id", str(ids[0]))
    # Text searches the errors, in any case; the error is shown as text, never markup.
    form.get_by_label("Search").fill("<B>get")
    form.get_by_label("Search").press("Enter")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-id", str(ids[1]))
    expect(rows.first.locator(".error-text")).to_have_text("TimeoutError: <b>GET</b> took 30 s")
    assert "error=%3CB%3Eget" in page.url and "sort=execute_at" in page.url
    # A task's id opens it.
    form.get_by_label("Search").fill(f"#{ids[0]}")
    form.get_by_label("Search").press("Enter")
    expect(page).to_have_url(f"{api}/#/tasks/{ids[0]}")
    expect(page.locator('dd[data-field="state"]')).to_have_text("scheduled")


def test_schedules_page_lists_next_runs_last_tasks_and_toggles_them(
    taskrunner: Callable[..., str], page: Page, sql: Sql
) -> None:
    """Each schedule with its next run and its last task's state; Disable and Enable change
    it in the database; a name or cron shown is text, never markup."""
    sql(
        "INSERT INTO schedules (name, kind, cron, timezone, next_run_at) VALUES"
        " ('nightly', 'foo', '30 2 * * *', 'Europe/Paris', '2030-01-02T01:30:00Z'),"
        " ('x.y', 'baz', '@hourly', 'UTC', '2030-01-01T13:00:00Z')"
    )
    [(task,)] = sql(
        "INSERT INTO tasks (kind, execute_at, schedule, scheduled_for, state, attempts,"
        " started_at, finished_at, output) VALUES ('foo', '2029-12-31T01:30:00Z', 'nightly',"
        " '2029-12-31T01:30:00Z', 'succeeded', 1, now(), now(), '<b>Foo</b>') RETURNING id"
    )
    api = taskrunner()
    page.goto(f"{api}/#/schedules")
    rows = page.locator("#schedules tbody tr")
    expect(rows).to_have_count(2)
    nightly = rows.nth(0)
    expect(nightly).to_have_attribute("data-name", "nightly")
    expect(nightly.locator("td").nth(2)).to_have_text("30 2 * * * (Europe/Paris)")
    expect(nightly.locator(".next-run time")).to_have_attribute("datetime", "2030-01-02T01:30:00Z")
    expect(nightly.locator(".last-task")).to_have_text(f"#{task} succeeded")
    expect(rows.nth(1).locator(".last-task")).to_have_text("\u2013")  # none yet

    nightly.get_by_role("button", name="Disable").click()
    expect(page.get_by_role("status")).to_have_text("nightly disabled.")
    expect(nightly.locator(".next-run")).to_have_text("disabled")
    assert sql("SELECT enabled, next_run_at FROM schedules WHERE name = 'nightly'") == [
        (False, None)
    ]
    nightly.get_by_role("button", name="Enable").click()
    expect(nightly.get_by_role("button", name="Disable")).to_be_visible()
    assert sql("SELECT enabled FROM schedules WHERE name = 'nightly'") == [(True,)]
    page.get_by_role("link", name=f"#{task}", exact=True).click()
    expect(page.locator("#task-output")).to_have_text("<b>Foo</b>")


def test_workers_page_lists_a_live_worker_and_one_that_died(
    taskrunner: Callable[..., str], page: Page, sql: Sql
) -> None:
    """The live worker with its host, pid and types; one that died 10 minutes ago with what
    was rescued from it; a host shown is text, never markup."""
    sql(
        "INSERT INTO workers_ended (id, host, pid, started_at, kinds, version, tick,"
        " heartbeat_at, rescued, ended_at, state) VALUES ('<b>x</b>:1:a', '<b>x</b>', 1,"
        " now() - interval '1 day', '{foo}', '0.1.0', false, now() - interval '11 minutes', 3,"
        " now() - interval '10 minutes', 'dead')"
    )
    api = taskrunner(worker=True)
    page.goto(f"{api}/#/workers")
    rows = page.locator("#workers-table tbody tr")
    expect(rows).to_have_count(2)  # the live one, once it has registered
    live, dead = rows.nth(0), rows.nth(1)
    expect(live.locator(".state")).to_have_text("live")
    [(worker, pid)] = sql("SELECT id, pid FROM workers")
    expect(live).to_have_attribute("data-id", worker)
    expect(live.locator("td").nth(0)).to_contain_text(f"pid {pid}")
    expect(live.locator("td").nth(3)).to_contain_text("foo")
    expect(dead.locator(".state")).to_have_text("dead")
    expect(dead.locator(".rescued")).to_have_text("3")
    expect(dead.locator("td").nth(0)).to_have_text("<b>x</b> · pid 1")
    expect(page.locator('nav a[data-view="workers"]')).to_have_attribute("aria-current", "page")


def test_an_action_the_api_refuses_shows_its_reason(
    taskrunner: Callable[..., str],
    page: Page,
    sql: Sql,
    task_factory: Callable[..., int],
    browser_log: BrowserLog,
) -> None:
    task_id = task_factory("foo", due_in_s=3600.0)
    api = taskrunner()
    # The page's clock stands still: it shows what it first read until the clock resumes.
    page.clock.install()
    page.clock.pause_at(datetime.now(UTC) + timedelta(seconds=1))
    page.goto(f"{api}/#/tasks/{task_id}")
    expect(page.locator('dd[data-field="state"]')).to_have_text("scheduled")
    # A worker takes it while the page still shows it scheduled.
    hold_running(sql, task_id)
    browser_log.allow(409, "DELETE", rf"/tasks/{task_id}")
    browser_log.allow(409, "POST", rf"/tasks/{task_id}/run")

    with page.expect_response(lambda r: r.request.method == "DELETE") as refused:
        page.get_by_role("button", name="Delete", exact=True).click()
        page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    assert refused.value.status == 409
    detail = refused.value.json()["detail"]
    assert "running" in detail
    expect(page.get_by_role("alert")).to_have_text(f"Delete refused: {detail}")

    with page.expect_response(lambda r: r.url.endswith("/run")) as refused:
        page.get_by_role("button", name="Run now").click()
    assert refused.value.status == 409
    expect(page.get_by_role("alert")).to_have_text(
        f"Run now refused: {refused.value.json()['detail']}"
    )
    assert sql("SELECT state FROM tasks WHERE id = %s", task_id) == [("running",)]

    # The next refresh shows why: it is running, and the actions are off.
    page.clock.run_for(3_000)
    expect(page.locator('dd[data-field="state"]')).to_have_text("running")
    expect(page.get_by_role("button", name="Delete", exact=True)).to_be_disabled()


def test_with_a_token_the_page_asks_once_and_sends_it_only_as_a_header(
    taskrunner: Callable[..., str],
    page: Page,
    task_factory: Callable[..., int],
    browser_log: BrowserLog,
) -> None:
    token = "s3cret-token"
    api = taskrunner(api_token=token, base_path="/prod")
    task_factory("baz", due_in_s=3600.0)
    browser_log.allow(401, "GET", "/prod/stats")
    browser_log.allow(401, "GET", "/prod/tasks")

    response = page.goto(f"{api}/prod/")
    assert response is not None and response.status == 200
    expect(page.get_by_role("heading", name="This API needs a token")).to_be_visible()
    page.get_by_label("API token").fill("wrong")
    page.get_by_role("button", name="Use this token").click()
    expect(page.get_by_role("alert")).to_have_text("That token was refused.")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Use this token").click()
    expect(page.locator('td[data-state="scheduled"][data-kind="baz"]')).to_have_text("1")

    # Asked once: a reload (same tab) goes straight to the data.
    asked = [r for r in browser_log.requests if r.url.endswith("/stats")]
    page.reload()
    expect(page.locator('td[data-state="scheduled"][data-kind="baz"]')).to_have_text("1")
    expect(page.get_by_role("heading", name="This API needs a token")).to_be_hidden()
    page.get_by_role("link", name="Tasks").first.click()
    expect(page.locator("#tasks tbody tr")).to_have_count(1)

    statuses = [s for s, _, _ in browser_log.http_errors]
    assert statuses == [401, 401], browser_log.http_errors
    api_requests = [r for r in browser_log.requests if r.resource_type == "fetch"]
    authorized = api_requests[len(asked) :]
    assert authorized and all(
        r.headers.get("authorization") == f"Bearer {token}" for r in authorized
    )
    assert [r.headers.get("authorization") for r in api_requests[:2]] == [None, "Bearer wrong"]
    for request in browser_log.requests:
        assert token not in request.url
        assert request.url.startswith(f"{api}/prod/"), request.url
    assert page.context.cookies() == []
    assert page.evaluate("sessionStorage.getItem('taskrunner.token')") == token

    page.get_by_role("button", name="Forget token").click()
    expect(page.get_by_role("heading", name="This API needs a token")).to_be_visible()


@pytest.mark.skipif(not SCREENSHOT, reason="writes docs/dashboard.png: set "
                    "TASKRUNNER_SCREENSHOT=docs/dashboard.png")  # fmt: skip
def test_screenshot(
    taskrunner: Callable[..., str], page: Page, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """The picture in docs/operations.md: an hour of steady work with a burst and a few failures."""
    import math
    import random

    noise = random.Random(12)
    for minute in range(60):
        burst = 20 <= minute <= 24
        rate = int(900 + 250 * math.sin(minute / 6) + (600 if burst else 0) + noise.randint(0, 60))
        failed = 12 if 40 <= minute <= 42 else int(noise.random() < 0.2)
        add_activity(sql, minute, started=rate, succeeded=rate - failed, failed=failed,
                     lateness_bucket=(19 if burst else 13) + noise.randint(0, 2))  # fmt: skip
    for kind, n in (("foo", 14), ("bar", 6), ("baz", 40)):
        for i in range(n):
            task_factory(kind, due_in_s=-0.5 if i < 2 else 600.0 + i)
        insert_finished(sql, kind, "succeeded", n * 5, f"{kind.title()} 1")
    insert_finished(sql, "bar", "failed", 3, "HTTP 503 from https://example.com/")
    sql("INSERT INTO kinds_served (kind, last_run_at) SELECT k, now() FROM"
        " unnest(ARRAY['foo', 'bar', 'baz']) AS k")  # fmt: skip
    for worker in ("a", "b"):
        sql("INSERT INTO workers (id, lease_expires_at) VALUES (%s, now() + interval '1 min')",
            worker)  # fmt: skip
        for _ in range(3):
            task_id = task_factory("foo", due_in_s=-0.1)
            sql("UPDATE tasks SET state = 'running', attempts = 1, claimed_by = %s WHERE id = %s",
                worker, task_id)  # fmt: skip
    api = taskrunner()
    # By type as /stats gives it once workers have run them (its contract's shape).
    from tests.browser.test_operators import with_by_type

    def of(started: int, failed: int, retried: int, p50: float, p99: float) -> dict[str, Any]:
        return {"started": started, "succeeded": started - failed, "failed": failed,
                "retried": retried, "cancelled": 0, "per_s": started / 300,
                "lateness_ms": {"p50": p50, "p99": p99, "max": p99 * 1.4}}  # fmt: skip

    by_type = {"foo": of(1200, 0, 0, 4.1, 11.0), "bar": of(450, 3, 12, 9.5, 48.0),
               "baz": of(3300, 0, 0, 2.2, 7.5)}  # fmt: skip
    page.route(re.compile(r".*/stats$"), with_by_type(by_type))
    page.set_viewport_size({"width": 1280, "height": 780})
    page.goto(f"{api}/")
    expect(page.locator('td[data-state="failed"][data-kind="bar"]')).to_have_text("3")
    assert SCREENSHOT is not None
    path = Path(SCREENSHOT)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


def test_a_running_task_is_cancelled_from_its_page_then_found_by_state_and_retried(
    taskrunner: Callable[..., str], page: Page, sql: Sql, task_factory: Callable[..., int]
) -> None:
    api = taskrunner(worker=True, env={"TASKRUNNER_FOO_DELAY_S": "60"})
    waiting = task_factory("baz", due_in_s=3600.0)
    task_id = task_factory("foo", due_in_s=-1.0)
    deadline = time.monotonic() + 30
    while sql("SELECT state FROM tasks WHERE id = %s", task_id) != [("running",)]:
        assert time.monotonic() < deadline, "the worker never took it"
        time.sleep(0.1)

    page.goto(f"{api}/#/tasks/{task_id}")
    expect(page.locator('dd[data-field="state"]')).to_have_text("running")
    # Who runs it, since when, and until when its lease lasts.
    [(worker,)] = sql("SELECT claimed_by FROM tasks WHERE id = %s", task_id)
    expect(page.locator('dd[data-field="worker"]')).to_have_text(worker)
    expect(page.locator('dd[data-field="running_since"] time')).to_have_count(1)
    expect(page.locator('dd[data-field="lease_expires_at"] time')).to_have_count(1)
    expect(page.get_by_role("button", name="Retry", exact=True)).to_be_disabled()
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.locator('dd[data-field="state"]')).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_disabled()
    expect(page.get_by_role("button", name="Run now")).to_be_disabled()
    assert sql("SELECT state, claimed_by FROM tasks WHERE id = %s", task_id) == [
        ("cancelled", None)
    ]

    page.goto(f"{api}/#/tasks")
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(2)
    page.get_by_role("form", name="Filter tasks").get_by_label("State").select_option("cancelled")
    expect(rows).to_have_count(1)
    page.get_by_role("link", name=f"#{task_id}").click()
    # The task's page, not the list's hidden "Retry all…" that a bare name also finds.
    expect(page.locator('dd[data-field="state"]')).to_have_text("cancelled")
    page.get_by_role("button", name="Retry", exact=True).click()
    expect(page.locator('dd[data-field="state"]')).to_have_text("running")
    # A scheduled task can be cancelled too.
    page.goto(f"{api}/#/tasks/{waiting}")
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.locator('dd[data-field="state"]')).to_have_text("cancelled")
