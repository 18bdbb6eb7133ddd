"""What an attempt's row keeps of its error: the error normalised for GET /errors (and the
text that finds its tasks), its traceback bounded to its last 8 KiB; and what `bar` says
when its request fails."""

import asyncio
import json
import socket
from datetime import UTC, datetime

import pytest

from functions import kinds, queries
from functions.completer import traceback_of
from functions.model import (
    MAX_ERROR_GROUP,
    MAX_ERROR_SEARCH,
    MAX_TRACEBACK_BYTES,
    ErrorGroup,
    TaskState,
    normalise_error,
)
from functions.settings import Settings
from functions.store import Result, finish_statement


@pytest.mark.parametrize(
    ("error", "normalised"),
    [
        ("ValueError: order 1234 not found", "ValueError: order <n> not found"),
        ("waited 5.5 s, then -3 and 1,000 and 1e-07", "waited <n> s, then -<n> and <n> and <n>"),
        ("GET http://127.0.0.1:8080/a", "GET http://<n>:<n>/a"),
        ("at 0x7f3a12 and 0XFF", "at <hex> and <hex>"),
        ("commit deadbeef12 of a1b2c3", "commit <hex> of <hex>"),
        ("KeyError: 3f2a9c1b-0000-4d6e-8a1b-1234567890AB", "KeyError: <uuid>"),
        # Words ending in digits stay; a word of hex letters alone, or under 6, stays.
        ("http2 sha256 utf8 facade abc12", "http2 sha256 utf8 facade abc12"),
        ("ünïcode 42 ✓", "ünïcode <n> ✓"),
        ("", ""),
        # As before timestamps and IPv6 folded: both cases of UUIDs, numbers, ip:port.
        (
            "3f2a9c1b-0000-4d6e-8a1b-1234567890ab 3F2A9C1B-0000-4D6E-8A1B-1234567890AB",
            "<uuid> <uuid>",
        ),
        ("1,000,000.5 and 3.14e-2 at 10.0.0.1:5432", "<n> and <n> at <n>:<n>"),
        # Timestamps, one placeholder whatever their hour, fraction or offset.
        ("deadline 2026-12-06T18:00:00Z passed", "deadline <time> passed"),
        ("at 2026-12-06T07:59:59.123456+05:30.", "at <time>."),
        (
            "at 2026-12-06 18:00:00, 2026-12-06t18:00z and 2026-12-06T18:00:00,5-0800",
            ("at <time>, <time> and <time>"),
        ),
        # A date or a time alone is numbers.
        ("on 2026-12-06 at 18:00:00", "on <n>-<n>-<n> at <n>:<n>:<n>"),
        # IPv6 addresses, one placeholder as IPv4's.
        ("connect fe80::dead:beef refused", "connect <n> refused"),
        ("GET http://[2001:db8::1]:8080/ and ::1", "GET http://[<n>]:<n>/ and <n>"),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334 ::ffff:192.0.2.1", "<n> <n>"),
        # Not addresses: paths of names, and hex words around `::` with no digit.
        ("std::vector dead::beef", "std::vector dead::beef"),
    ],
)
def test_numbers_hex_ids_and_uuids_are_folded(error: str, normalised: str) -> None:
    assert normalise_error(error) == normalised


def test_a_normalised_error_is_cut_to_its_bound() -> None:
    assert normalise_error("x" * MAX_ERROR_GROUP) == "x" * MAX_ERROR_GROUP
    assert normalise_error("x" * (MAX_ERROR_GROUP + 1)) == "x" * MAX_ERROR_GROUP
    # Never within a placeholder: one the bound would cut is left out whole.
    uuid = "3f2a9c1b-0000-4d6e-8a1b-1234567890ab"
    for before in range(MAX_ERROR_GROUP - 7, MAX_ERROR_GROUP + 1):
        text = "x" * (before - 1) + " "
        whole = before + len("<uuid>") <= MAX_ERROR_GROUP
        assert (
            normalise_error(text + uuid) == (text + "<uuid>" if whole else text)[:MAX_ERROR_GROUP]
        )


def test_a_groups_search_is_its_longest_part_that_no_placeholder_cut() -> None:
    now = datetime.now(UTC)

    def search(error: str) -> str:
        return ErrorGroup("bar", error, 1, now, now, 1).search

    assert search("TimeoutError: GET http://<n>:<n>/x: no answer within <n> s") == (
        "TimeoutError: GET http://"
    )
    assert search("RuntimeError: disk full") == "RuntimeError: disk full"
    assert search("<n>") == ""
    # No placeholder, whichever: a lost attempt's worker, a timestamp.
    assert search("lease expired: worker <worker> stopped during attempt <n> of <n>") == (
        "stopped during attempt"
    )
    assert search("deadline <time> passed for the last payment") == "passed for the last payment"
    # An error normalised before placeholders were kept whole: the cut one is not text.
    assert search("x" * 10 + "<uu") == "x" * 10


def test_a_groups_search_is_at_most_200_characters_never_half_of_one() -> None:
    now = datetime.now(UTC)

    def search(error: str) -> str:
        return ErrorGroup("bar", error, 1, now, now, 1).search

    assert MAX_ERROR_SEARCH == 200
    assert search("y" * 200) == "y" * 200
    assert search("y" * 201) == "y" * 200
    # Code points: an emoji (two UTF-16 units) is whole or not there.
    emoji = "x" + "\N{SLIGHTLY SMILING FACE}" * (MAX_ERROR_GROUP - 1)
    assert search(normalise_error(emoji)) == emoji[:200]
    # Cut before a blank: stripped, still text of the error.
    assert search("z" * 199 + " tail") == "z" * 199


def raised(message: str) -> BaseException:
    try:
        raise RuntimeError(message)
    except RuntimeError as exc:
        return exc


def test_a_traceback_is_kept_whole_up_to_8_kib_and_its_end_beyond() -> None:
    assert traceback_of(RuntimeError("never raised")) is None
    short = traceback_of(raised("short"))
    assert short is not None and short.startswith("Traceback (most recent call last):")
    assert short.endswith("RuntimeError: short\n")
    # The message that makes the traceback exactly the bound, then one byte more.
    room = MAX_TRACEBACK_BYTES - (len(short.encode()) - len("short"))
    fill = "é" * (room // 2) + "x" * (room % 2)
    exact = traceback_of(raised(fill))
    assert exact is not None and len(exact.encode()) == MAX_TRACEBACK_BYTES
    assert exact.startswith("Traceback")
    over = traceback_of(raised(fill + "y"))
    assert over is not None
    assert MAX_TRACEBACK_BYTES - 2 <= len(over.encode()) <= MAX_TRACEBACK_BYTES
    assert over.startswith(f"... ({MAX_TRACEBACK_BYTES + 1:,} bytes in all")
    assert over.endswith("y\n")
    # A NUL or a lone surrogate cannot be stored: written as escapes.
    odd = traceback_of(raised("a\x00b\udc80"))
    assert odd is not None and odd.endswith("a\\x00b\\udc80\n")


async def run_bar(url: str, timeout_s: float) -> BaseException:
    settings = Settings(bar_url=url, bar_timeout_s=timeout_s)
    clients = kinds.HttpClients(settings)
    try:
        await kinds.bar(kinds.Context(1, 1, settings, clients.lend))
    except Exception as exc:
        return exc
    finally:
        await clients.aclose()
    raise AssertionError("bar succeeded")


async def test_bar_says_which_url_it_got_no_answer_from_and_how_long_it_waited() -> None:
    with socket.socket() as listening:
        # Accepts connections (the backlog) and never answers.
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)
        url = f"http://127.0.0.1:{listening.getsockname()[1]}/slow"
        exc = await run_bar(url, 0.2)
    assert isinstance(exc, TimeoutError)
    assert str(exc) == f"GET {url}: no answer within 0.2 s (TASKRUNNER_BAR_TIMEOUT_S)"


async def test_bar_says_which_url_refused_it_why_and_after_how_long() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/"
    exc = await asyncio.wait_for(run_bar(url, 5.0), 30)
    assert isinstance(exc, kinds.RequestFailed)
    message = str(exc)
    assert message.startswith(f"GET {url}: ConnectError: ")
    assert message.endswith(" s)") and " (after " in message


def test_a_batch_of_first_attempts_that_succeeded_sends_ids_and_lines_only() -> None:
    """A drain's batches run FINISH_MANY, which sends each task's id and line and nothing
    more (two arrays, in id order: no object of six fields per result to build and encode);
    a batch with any other result runs the statement that keeps attempts."""
    firsts = [Result(i, 1, TaskState.SUCCEEDED, f"Baz {i}") for i in (3, 1, 2)]
    firsts.append(Result(4, 1, TaskState.SUCCEEDED, None))  # a kind that returned no line
    sql, params = finish_statement("w", firsts)
    assert sql is queries.FINISH_MANY
    assert params == {
        "worker": "w", "ids": "[1, 2, 3, 4]", "outputs": '["Baz 1", "Baz 2", "Baz 3", null]'
    }  # fmt: skip
    for other in (
        Result(5, 2, TaskState.SUCCEEDED, "Baz 5"),  # a later attempt's success
        Result(5, 1, TaskState.SCHEDULED, None, "E", 0.1),
        Result(5, 1, TaskState.FAILED, None, "E", timed_out=True),
    ):
        sql, params = finish_statement("w", [*firsts, other])
        assert sql is queries.FINISH_MANY_RECORDING
        assert [r["id"] for r in json.loads(params["results"])] == [1, 2, 3, 4, 5]


def test_every_statement_that_deletes_tasks_deletes_their_attempts() -> None:
    """No foreign key deletes them (migration 0016): each statement does, or (DELETE_TASK)
    the store runs DELETE_ATTEMPTS_OF_GONE after it in its transaction (tested in
    tests/integration/test_attempts.py)."""
    statements = {name: value for name, value in vars(queries).items() if isinstance(value, str)}
    deleting = {name for name, sql in statements.items() if "DELETE FROM tasks" in sql}
    assert {"DELETE_TASK", "DELETE_NOT_RUNNING", "PRUNE_FINISHED"} <= deleting
    for name in deleting - {"DELETE_TASK"}:
        assert "DELETE FROM attempts" in statements[name], name
