"""The statements of a listing (queries.listing), rendered whole: what runs is what you read."""

from datetime import UTC, datetime

from functions import queries
from functions.model import SortKey, TaskFilter, TaskOrder, TaskState


def test_a_filter_the_order_does_not_serve_is_read_within_a_bound_of_its_index() -> None:
    listing = queries.listing(
        TaskFilter(kinds=("bar",), payload='{"to":"x@y"}'), TaskOrder(SortKey.EXECUTE_AT, True)
    )
    assert listing.bound(after=True) == (
        "SELECT execute_at, id FROM tasks\n"
        "WHERE (execute_at, id) < (%(after_key)s, %(after_id)s)\n"
        "ORDER BY tasks.execute_at DESC, tasks.id DESC OFFSET 4999 LIMIT 1"
    )
    page = listing.page(after=True, bounded=True)
    # The page's rows are chosen inside, their JSON written outside, in the same order.
    assert page.startswith("SELECT id, kind, execute_at, finished_at, timeout_s, payload,")
    assert f"SELECT {queries.TASK_COLUMNS}, {queries.STORED_BYTES} AS stored_bytes" in page
    assert page.split("FROM tasks\n")[1] == (
        "    WHERE (execute_at, id) < (%(after_key)s, %(after_id)s)"
        " AND (execute_at, id) >= (%(bound_key)s, %(bound_id)s)"
        " AND (kind = %(kind)s) AND (payload @> CAST(%(payload)s AS jsonb))\n"
        "    ORDER BY tasks.execute_at DESC, tasks.id DESC LIMIT %(limit)s\n"
        ") AS page\n"
        "ORDER BY order_key DESC, id DESC"
    )
    assert listing.params == {"kind": "bar", "payload": '{"to":"x@y"}'}


def test_what_an_index_serves_in_the_order_by_id_is_its_range() -> None:
    served = {
        "kind": TaskFilter(kinds=("foo",), states=(TaskState.FAILED,)),
        "schedule": TaskFilter(schedule="nightly", error="x"),
        "state": TaskFilter(states=(TaskState.CANCELLED,), error="x"),
        "error": TaskFilter(error="x", payload="null"),
    }
    found = {name: queries.listing(f, TaskOrder()) for name, f in served.items()}
    assert [(name, listing.served, listing.rest) for name, listing in found.items()] == [
        ("kind", "kind = %(kind)s", "(state IN ('failed'))"),
        ("schedule", "schedule = %(schedule)s",
         "(error IS NOT NULL AND strpos(lower(error), lower(%(error)s)) > 0)"),
        ("state", "state IN ('cancelled')",
         "(error IS NOT NULL AND strpos(lower(error), lower(%(error)s)) > 0)"),
        ("error", "error IS NOT NULL",
         "(error IS NOT NULL AND strpos(lower(error), lower(%(error)s)) > 0)"
         " AND (payload IS NULL)"),
    ]  # fmt: skip
    # By finished_at: finished tasks alone; a state that never finishes selects nothing.
    by_finish = TaskOrder(SortKey.FINISHED_AT, False)
    assert queries.listing(TaskFilter(states=(TaskState.SCHEDULED,)), by_finish).served == "false"
    listing = queries.listing(TaskFilter(states=(TaskState.FAILED,)), by_finish)
    assert (listing.served, listing.rest) == (
        "state IN ('succeeded', 'failed', 'cancelled')",
        "(state IN ('failed'))",
    )
    assert listing.page(after=False, bounded=False).endswith(
        "ORDER BY tasks.finished_at, tasks.id LIMIT %(limit)s\n) AS page\nORDER BY order_key, id"
    )


def test_every_page_statement_is_short_enough_for_psycopg_to_keep_it_parsed() -> None:
    # psycopg converts a statement's %(name)s placeholders once and keeps the result only
    # for statements up to this many bytes: a longer page statement was parsed again on
    # every request (~0.2 ms of the API's CPU a page of 100, docs/performance.md).
    from psycopg._queries import MAX_CACHED_STATEMENT_LENGTH  # (no public name for it)

    at = datetime(2026, 1, 1, tzinfo=UTC)
    widest = TaskFilter(
        states=(TaskState.FAILED, TaskState.CANCELLED),
        kinds=("foo", "bar", "baz"),
        created_after=at,
        created_before=at,
        execute_after=at,
        execute_before=at,
        finished_after=at,
        finished_before=at,
        error="timed out",
        schedule="nightly",
        payload='{"to": "x@y"}',
    )
    for matching in (TaskFilter(), TaskFilter(states=(TaskState.FAILED,)), widest):
        for order in (
            TaskOrder(key, descending) for key in SortKey for descending in (True, False)
        ):
            listing = queries.listing(matching, order)
            for after, bounded in ((False, False), (True, False), (False, True), (True, True)):
                statement = listing.page_text(after=after, bounded=bounded).encode()
                assert len(statement) <= MAX_CACHED_STATEMENT_LENGTH, (matching, order)
