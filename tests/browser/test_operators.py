"""The dashboard for operators at scale (issue 24): acting on every task a filter matches,
the cards' thresholds, the figures by type, the Failures page and a task's attempts, in
Debian's chromium against the real API on a test database."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from functions.model import normalise_error
from tests.browser.conftest import SERVER, BrowserLog
from tests.browser.test_dashboard import add_activity

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

Sql = Callable[..., list[tuple[Any, ...]]]
# Read at import: the suite clears TASKRUNNER_* from the environment before each test.
SCREENSHOTS = os.environ.get("TASKRUNNER_SCREENSHOTS")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("pg_server", [SERVER], indirect=True),
    # Not kept in that server's xdist group: any free worker takes them.
    pytest.mark.one_server,
]


def expect(*args: Any) -> Any:
    from playwright.sync_api import expect

    return expect(*args)


def insert_failed(sql: Sql, kind: str, n: int, error: str) -> None:
    """`n` failed tasks of `kind`, as a worker leaves them after their last attempt."""
    sql(
        "INSERT INTO tasks (kind, execute_at, max_attempts, state, attempts, started_at,"
        " finished_at, error) SELECT %s, now() - interval '10 min', 1, 'failed', 1,"
        " now() - interval '10 min', now() - interval '9 min', %s FROM generate_series(1, %s)",
        kind,
        error,
        n,
    )


def test_a_bulk_retry_of_a_thousand_failed_tasks_by_filter_is_counted_and_confirmed_first(
    taskrunner: Callable[..., str], page: Page, sql: Sql, browser_log: BrowserLog
) -> None:
    """Retry all, on the Tasks page filtered to 1,000 of 1,008 failed tasks: the dialog names
    the count and the filters; "Not now" changes nothing; the confirm retries those 1,000,
    no more, and no other task."""
    insert_failed(sql, "bar", 1000, "HTTP 503 from https://example.com/")
    insert_failed(sql, "bar", 3, "ConnectionRefused")
    insert_failed(sql, "baz", 5, "HTTP 503 from https://example.com/")
    api = taskrunner()
    page.goto(f"{api}/#/tasks")
    form = page.get_by_role("form", name="Filter tasks")
    form.get_by_label("State").select_option("failed")
    form.get_by_label("Type").select_option("bar")
    form.get_by_label("Search").fill("http 503")
    form.get_by_label("Search").press("Enter")
    expect(page.locator("#tasks tbody tr")).to_have_count(25)

    dialog = page.get_by_role("dialog")
    page.get_by_role("button", name="Retry all").click()
    expect(dialog.get_by_role("heading")).to_have_text("Retry 1,000 tasks?")
    expect(dialog).to_contain_text("Filters: state failed · type bar · error contains “http 503”.")
    dialog.get_by_role("button", name="Not now").click()
    expect(dialog).to_be_hidden()
    assert sql("SELECT count(*) FROM tasks WHERE state = 'failed'") == [(1008,)]

    page.get_by_role("button", name="Retry all").click()
    with page.expect_response(lambda r: "/tasks/retry" in r.url and "dry_run" not in r.url) as ran:
        dialog.get_by_role("button", name="Retry 1,000 tasks").click()
    assert ran.value.json() == {"count": 1000}
    assert "limit=1000" in ran.value.url
    expect(page.get_by_role("status")).to_have_text("Retried 1,000 tasks.")
    assert sorted(sql("SELECT kind, state, count(*) FROM tasks GROUP BY 1, 2")) == [
        ("bar", "failed", 3),
        ("bar", "scheduled", 1000),
        ("baz", "failed", 5),
    ]
    # The list, filtered to failed tasks, has none of them left.
    expect(page.get_by_text("No tasks match.")).to_be_visible()
    # Nothing else acted: each POST was a dry run or the one confirmed.
    posts = [r.url for r in browser_log.requests if r.method == "POST"]
    assert len(posts) == 3 and sum("dry_run=true" in u for u in posts) == 2, posts


def test_a_bulk_delete_with_nothing_to_act_on_says_so_and_offers_no_action(
    taskrunner: Callable[..., str], page: Page, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """A filter carried by a link (schedule) is shown and goes with the bulk action; a
    running task is never counted for a delete."""
    task_id = task_factory("foo", due_in_s=-1.0)
    sql("INSERT INTO workers (id, lease_expires_at) VALUES ('w', now() + interval '10 min')")
    sql(
        "UPDATE tasks SET state = 'running', attempts = 1, claimed_by = 'w',"
        " schedule = 'nightly', scheduled_for = now() WHERE id = %s",
        task_id,
    )
    api = taskrunner()
    page.goto(f"{api}/#/tasks?schedule=nightly")
    expect(page.locator('.chip[data-filter="schedule"]')).to_have_text("schedule nightly \u00d7")
    expect(page.locator("#tasks tbody tr")).to_have_count(1)
    page.get_by_role("button", name="Delete all").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("heading")).to_have_text("No task to delete")
    expect(dialog).to_contain_text("Filters: schedule nightly.")
    expect(dialog.locator("#bulk-confirm-yes")).to_be_hidden()
    dialog.get_by_role("button", name="Not now").click()
    # Dropping the filter lists every task again.
    page.get_by_role("button", name="Drop schedule").click()
    expect(page).to_have_url(f"{api}/#/tasks")
    expect(page.locator(".chip")).to_have_count(0)
    assert sql("SELECT state FROM tasks") == [("running",)]


def test_cards_turn_amber_then_red_and_say_why_in_words(
    taskrunner: Callable[..., str], page: Page, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """The thresholds of docs/operations.md: oldest due 60 s / 5 min; failures rising (5 or
    more, over twice the 5 minutes before) / half of what finished (10 or more); a due type
    no live worker runs."""
    sql("INSERT INTO workers (id, lease_expires_at) VALUES ('w', now() + interval '1 hour')")
    sql("INSERT INTO kinds_served (kind, last_run_at) VALUES ('baz', now())")
    oldest = task_factory("baz", due_in_s=-1.0)
    add_activity(sql, 7, started=50, succeeded=50, failed=2, lateness_bucket=10)
    api = taskrunner()
    page.clock.install()
    page.clock.pause_at(datetime.now(UTC) + timedelta(seconds=1))
    page.goto(f"{api}/")
    cards = {name: page.locator(f"#card-{name}") for name in ("oldest", "due", "failures")}
    expect(page.locator("#due")).to_have_text("1")
    for card in cards.values():
        expect(card).not_to_have_class(re.compile(r"\b(amber|red)\b"))
        expect(card.locator(".level")).to_be_hidden()

    sql(
        "UPDATE tasks SET execute_at = now() - interval '90 s',"
        " created_at = now() - interval '90 s' WHERE id = %s",
        oldest,
    )
    add_activity(sql, 1, started=100, succeeded=94, failed=6, lateness_bucket=10)
    page.clock.run_for(3_000)
    expect(cards["oldest"]).to_have_class(re.compile(r"\bamber\b"))
    expect(cards["oldest"].locator(".level")).to_have_text(
        "Warning: a due task has waited over 1 min 0 s"
    )
    expect(cards["failures"]).to_have_class(re.compile(r"\bamber\b"))
    expect(cards["failures"].locator(".level")).to_have_text(
        "Warning: failures rising: 6 in the last 5 min, 2 in the 5 min before"
    )
    expect(cards["due"]).not_to_have_class(re.compile(r"\b(amber|red)\b"))

    sql(
        "UPDATE tasks SET execute_at = now() - interval '301 s',"
        " created_at = now() - interval '301 s' WHERE id = %s",
        oldest,
    )
    add_activity(sql, 2, started=100, succeeded=0, failed=100, lateness_bucket=10)
    task_factory("ghost", due_in_s=-1.0)
    page.clock.run_for(3_000)
    expect(cards["oldest"]).to_have_class(re.compile(r"\bred\b"))
    expect(cards["oldest"].locator(".level")).to_have_text(
        "Alert: a due task has waited over 5 min 0 s"
    )
    expect(cards["failures"]).to_have_class(re.compile(r"\bred\b"))
    expect(cards["failures"].locator(".level")).to_have_text(
        "Alert: 106 of 200 finished in the last 5 min failed"
    )
    expect(cards["due"]).to_have_class(re.compile(r"\bred\b"))
    expect(cards["due"].locator(".level")).to_have_text("Alert: no live worker runs ghost")


def with_by_type(by_type: dict[str, Any]) -> Callable[[Route], None]:
    """A handler for GET /stats that answers the API's own answer with `by_type` set."""

    def handle(route: Route) -> None:
        response = route.fetch()
        body = response.json()
        body["by_type"] = by_type
        route.fulfill(response=response, body=json.dumps(body))

    return handle


def test_the_overview_shows_throughput_and_lateness_by_type(
    taskrunner: Callable[..., str], page: Page
) -> None:
    """`/stats`'s `by_type` (its contract: the API's answer, with by_type as metrics gives it)
    as a table, one row a type, sorted; a type's name is text, never markup."""
    api = taskrunner()
    by_type = {
        "foo": {"started": 1500, "succeeded": 1490, "failed": 10, "retried": 4, "timed_out": 7,
                "lost": 2, "cancelled": 0, "per_s": 5.0,
                "lateness_ms": {"p50": 3.2, "p99": 48.0, "max": 1500.0}},
        "<b>x</b>": {"started": 1, "succeeded": 0, "failed": 0, "retried": 0, "cancelled": 1,
                     "per_s": 0.0033, "lateness_ms": {"p50": 0.5, "p99": 0.5, "max": 0.5}},
    }  # fmt: skip
    page.route(re.compile(r".*/stats$"), with_by_type(by_type))
    page.goto(f"{api}/")
    rows = page.locator("#by-type tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("th")).to_have_text("<b>x</b>")
    foo = page.locator('#by-type tr[data-kind="foo"]')
    expect(foo.locator("td")).to_have_text(
        ["5", "1,500", "1,490", "10", "4", "7", "2", "0", "3.2 ms", "48 ms", "1.5 s"]
    )
    expect(rows.nth(0).locator('td[data-field="per_s"]')).to_have_text("0")
    expect(rows.nth(0).locator('td[data-field="cancelled"]')).to_have_text("1")


def test_the_overview_without_by_type_hides_the_table(
    taskrunner: Callable[..., str], page: Page
) -> None:
    api = taskrunner()
    page.route(re.compile(r".*/stats$"), with_by_type({}))
    page.goto(f"{api}/")
    expect(page.locator("#by-type-empty")).to_be_visible()
    expect(page.locator("#by-type tbody tr")).to_have_count(0)


def record_attempts(
    sql: Sql,
    task_id: int,
    kind: str,
    *attempts: tuple[str, str | None],
    source: str = "<img src=x>",
) -> None:
    """A task's attempts (`(outcome, error)` each, a minute apart, the last ending 5 minutes
    ago), as its workers record them."""
    n = len(attempts)
    for i, (outcome, error) in enumerate(attempts, start=1):
        sql(
            "INSERT INTO attempts (task_id, attempt, kind, started_at, finished_at, worker,"
            " outcome, error, error_group, traceback) VALUES (%s, %s, %s,"
            " now() - make_interval(mins => 5 + %s) - interval '2.5 s',"
            " now() - make_interval(mins => 5 + %s), %s, %s, %s, %s, %s)",
            task_id,
            i,
            kind,
            n - i,
            n - i,
            f"host-{i}:1:abc",
            outcome,
            error,
            None if error is None else normalise_error(error),
            None if error is None else f'Traceback:\n  File "{source}", line {i}\n{error}',
        )


def test_the_failures_page_groups_errors_and_links_each_group_to_its_tasks(
    taskrunner: Callable[..., str], page: Page, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """GET /errors as a table, most frequent first; a group's link lists its tasks on the
    Tasks page (by type and error); an error is text, never markup."""
    timeouts = []
    for n in range(3):
        task_id = task_factory("bar", due_in_s=-600.0)
        error = f"TimeoutError: GET http://h:{8000 + n}/ gave no answer in {30 + n} s"
        sql(
            "UPDATE tasks SET state = 'failed', attempts = 1, finished_at = now(), error = %s"
            " WHERE id = %s",
            error,
            task_id,
        )
        record_attempts(sql, task_id, "bar", ("failed", error))
        timeouts.append(task_id)
    markup = task_factory("baz", due_in_s=-600.0)
    sql(
        "UPDATE tasks SET state = 'failed', attempts = 1, finished_at = now(),"
        " error = '<b>bad</b> input' WHERE id = %s",
        markup,
    )
    record_attempts(sql, markup, "baz", ("failed", "<b>bad</b> input"))
    api = taskrunner()
    page.goto(f"{api}/")
    page.get_by_role("link", name="Failures").click()
    rows = page.locator("#failures tbody tr")
    expect(rows).to_have_count(2)
    first, second = rows.nth(0), rows.nth(1)
    expect(first.locator("td").nth(0)).to_have_text("bar")
    expect(first.locator("td").nth(1)).to_have_text(
        "TimeoutError: GET http://h:<n>/ gave no answer in <n> s"
    )
    expect(first.locator("td").nth(2)).to_have_text("3")
    expect(second.locator("td").nth(1)).to_have_text("<b>bad</b> input")
    # Of one type.
    page.get_by_role("form", name="Filter failures").get_by_label("Type").select_option("baz")
    expect(rows).to_have_count(1)
    page.get_by_role("form", name="Filter failures").get_by_label("Type").select_option("")
    expect(rows).to_have_count(2)
    # The group's tasks, on the Tasks page.
    first.get_by_role("link", name="its tasks").click()
    expect(page).to_have_url(re.compile(r"#/tasks\?type=bar&error="))
    tasks = page.locator("#tasks tbody tr")
    expect(tasks).to_have_count(3)
    assert sorted(int(tasks.nth(i).get_attribute("data-id") or 0) for i in range(3)) == timeouts


def test_a_groups_link_searches_for_its_200_characters_whole(
    taskrunner: Callable[..., str], page: Page, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """A search of 200 characters, of emoji (two UTF-16 units each) after one of one unit, is
    passed on whole: no surrogate pair split in half, so the link finds the group's task."""
    error = "x" + "\N{SLIGHTLY SMILING FACE}" * 300
    task_id = task_factory("bar", due_in_s=-600.0)
    sql(
        "UPDATE tasks SET state = 'failed', attempts = 1, finished_at = now(), error = %s"
        " WHERE id = %s",
        error,
        task_id,
    )
    record_attempts(sql, task_id, "bar", ("failed", error))
    api = taskrunner()
    page.goto(f"{api}/#/failures")
    page.locator("#failures tbody tr").get_by_role("link", name="its tasks").click()
    tasks = page.locator("#tasks tbody tr")
    expect(tasks).to_have_count(1)
    assert tasks.get_attribute("data-id") == str(task_id)
    expect(page.get_by_label("Search")).to_have_value(error[:200])


def test_a_tasks_page_shows_its_attempts_oldest_first_with_their_tracebacks_as_text(
    taskrunner: Callable[..., str], page: Page, sql: Sql, task_factory: Callable[..., int]
) -> None:
    task_id = task_factory("bar", due_in_s=-600.0)
    sql(
        "UPDATE tasks SET state = 'failed', attempts = 3, finished_at = now(), started_at ="
        " now() - interval '1 hour', error = 'HTTP 503 <i>again</i>' WHERE id = %s",
        task_id,
    )
    record_attempts(
        sql,
        task_id,
        "bar",
        ("retried", "ConnectionRefusedError: 127.0.0.1:9"),
        ("timed_out", "TimeoutError: GET http://h/ gave no answer in 30 s"),
        ("failed", "HTTP 503 <i>again</i>"),
    )
    api = taskrunner()
    page.clock.install()
    page.clock.pause_at(datetime.now(UTC) + timedelta(seconds=1))
    page.goto(f"{api}/#/tasks/{task_id}")
    rows = page.locator("#attempts tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.locator(".outcome")).to_have_text(["retried", "timed out", "failed"])
    expect(rows.nth(0).locator("td").nth(4)).to_have_text("host-1:1:abc")
    expect(rows.nth(1).locator(".took")).to_have_text("2.5 s")
    last = rows.nth(2)
    expect(last.locator(".error-text")).to_have_text("HTTP 503 <i>again</i>")
    last.locator("summary").click()
    expect(last.locator("pre")).to_be_visible()
    expect(last.locator("pre")).to_contain_text('File "<img src=x>", line 3')
    # Still open after the next refresh (every 3 s for a finished task).
    with page.expect_response(lambda r: "/attempts" in r.url):
        page.clock.run_for(3_000)
    expect(last.locator("pre")).to_be_visible()
    expect(page.locator("#attempts img")).to_have_count(0)
    # A task that has not started has none.
    page.goto(f"{api}/#/tasks/{task_factory('foo', due_in_s=3600.0)}")
    expect(page.get_by_text("It has not started yet.")).to_be_visible()


@pytest.mark.skipif(not SCREENSHOTS, reason="writes docs/dashboard-*.png: set "
                    "TASKRUNNER_SCREENSHOTS=docs")  # fmt: skip
def test_screenshots_of_each_page(
    taskrunner: Callable[..., str], page: Page, sql: Sql, task_factory: Callable[..., int]
) -> None:
    """The pictures in docs/operations.md: the Tasks page (with a bulk confirmation), the
    Failures page, a task's page with its attempts, the Workers and Schedules pages (the
    overview's: test_dashboard.py's test_screenshot)."""
    insert_failed(sql, "bar", 1000, "HTTP 503 from https://example.com/")
    for kind in ("foo", "baz"):
        for i in range(8):
            task_factory(kind, due_in_s=600.0 + i)
    sql(
        "INSERT INTO schedules (name, kind, cron, timezone, next_run_at) VALUES"
        " ('nightly', 'foo', '30 2 * * *', 'Europe/Paris', now() + interval '5 hours'),"
        " ('reports', 'baz', '@hourly', 'UTC', now() + interval '20 min')"
    )
    api = taskrunner(worker=True)
    assert SCREENSHOTS is not None
    out = Path(SCREENSHOTS)
    out.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": 720})

    def shoot(name: str) -> None:
        page.wait_for_timeout(300)
        page.screenshot(path=str(out / f"dashboard-{name}.png"))

    page.goto(f"{api}/#/tasks?state=failed&type=bar")
    expect(page.locator("#tasks tbody tr")).to_have_count(25)
    page.get_by_role("button", name="Retry all").click()
    expect(page.get_by_role("dialog").get_by_role("heading")).to_have_text("Retry 1,000 tasks?")
    shoot("tasks")
    page.get_by_role("dialog").get_by_role("button", name="Not now").click()
    sample = int(sql("SELECT min(id) FROM tasks WHERE state = 'failed'")[0][0])
    sql("UPDATE tasks SET attempts = 3 WHERE id = %s", sample)
    record_attempts(
        sql,
        sample,
        "bar",
        ("retried", "ConnectionRefusedError: [Errno 111] connecting to example.com:443"),
        ("timed_out", "TimeoutError: GET https://example.com/ gave no answer in 30 s"),
        ("failed", "HTTP 503 from https://example.com/"),
        source="app/hooks.py",
    )
    for (task_id,) in sql(
        "SELECT id FROM tasks WHERE state = 'failed' AND id > %s LIMIT 40", sample
    ):
        record_attempts(sql, task_id, "bar", ("failed", "HTTP 503 from https://example.com/"))
    for n in range(6):
        task_id = task_factory("baz", due_in_s=-900.0)
        record_attempts(sql, task_id, "baz", ("retried", f"KeyError: 'order-{n}'"))
    page.goto(f"{api}/#/failures")
    expect(page.locator("#failures tbody tr")).to_have_count(4)
    shoot("failures")
    page.goto(f"{api}/#/tasks/{sample}")
    expect(page.locator("#attempts tbody tr")).to_have_count(3)
    page.locator("#attempts tbody tr").nth(1).locator("summary").click()
    page.locator("#attempts").scroll_into_view_if_needed()
    shoot("task")
    page.goto(f"{api}/#/workers")
    expect(page.locator("#workers-table tbody tr")).to_have_count(1)
    shoot("workers")
    page.goto(f"{api}/#/schedules")
    expect(page.locator("#schedules tbody tr")).to_have_count(2)
    shoot("schedules")
