"""The routes answer with `task_fields`, serialized once; TaskOut documents the body. They
must agree field for field, in the JSON a client reads; and the hot path's JSON (the json
module's) must be the FastAPI routes' (pydantic-core's) byte for byte."""

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic_core import to_json

from functions.http.responses import (
    list_json,
    page_json,
    plain_task_json,
    task_fields,
    task_json,
)
from functions.http.routes import answer
from functions.http.schemas import TaskOut
from functions.model import (
    MAX_PAGE_BYTES,
    PAGE_ROOM,
    Page,
    Task,
    TaskState,
    enveloped_size,
    fits_one_answer,
)
from functions.parsing import decode_cursor

AT = datetime(2026, 11, 28, 9, 0, 0, 123456, tzinfo=UTC)


def _task(**changes: object) -> Task:
    fields: dict[str, object] = {
        "id": 2**63 - 1,
        "kind": "baz",
        "state": TaskState.SUCCEEDED,
        "execute_at": datetime(1, 1, 1, tzinfo=UTC),
        "next_attempt_at": None,
        "created_at": AT,
        "started_at": AT + timedelta(microseconds=1),
        "finished_at": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        "attempts": 3,
        "max_attempts": 3,
        "output": 'Baz 343 \u00e9\u2603 "quoted" \\ \n',
        "error": None,
        "idempotency_key": "order-1842~!",
    }
    fields.update(changes)
    return Task(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "task",
    [
        _task(),
        _task(state=TaskState.SCHEDULED, next_attempt_at=AT, started_at=None, finished_at=None),
        _task(state=TaskState.FAILED, error="TimeoutError: x" * 100, output=None),
        _task(kind="foo", state=TaskState.RUNNING, idempotency_key=None, attempts=0),
    ],
)
def test_a_task_answers_as_taskout_says(task: Task) -> None:
    fast = answer(task_fields(task))
    assert fast.media_type == "application/json"
    assert json.loads(bytes(fast.body)) == json.loads(TaskOut.of(task).model_dump_json())
    assert list(json.loads(bytes(fast.body))) == list(TaskOut.model_fields)


OFFSETS = st.one_of(
    st.just(UTC),
    st.integers(-86_399, 86_399).map(lambda s: timezone(timedelta(seconds=s))),
    st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m))),
)
TIMES = st.one_of(
    st.none(), st.datetimes(datetime(2, 1, 1), datetime(9998, 12, 31), timezones=OFFSETS)
)


@settings(max_examples=500, deadline=None)
@given(
    times=st.tuples(TIMES, TIMES, TIMES, TIMES, TIMES),
    output=st.one_of(st.none(), st.text()),
    error=st.one_of(st.none(), st.text(st.characters(codec="utf-8"))),
    key=st.one_of(st.none(), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E))),
    state=st.sampled_from(TaskState),
    numbers=st.tuples(st.integers(1, 2**63 - 1), st.integers(0, 10**6), st.integers(1, 10**6)),
)
def test_the_hot_paths_json_is_pydantic_cores(
    times: tuple[datetime | None, ...],
    output: str | None,
    error: str | None,
    key: str | None,
    state: TaskState,
    numbers: tuple[int, int, int],
) -> None:
    execute_at = times[0] or AT
    created_at = times[2] or AT
    task = _task(
        id=numbers[0], state=state, execute_at=execute_at, next_attempt_at=times[1],
        created_at=created_at, started_at=times[3], finished_at=times[4],
        attempts=numbers[1], max_attempts=numbers[2], output=output, error=error,
        idempotency_key=key,
    )  # fmt: skip
    assert plain_task_json(task) == task_json(task) == to_json(task_fields(task))


# Any JSON value as json.loads makes them (floats finite: NaN and Infinity are refused).
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(payload=JSON_VALUES, output=st.one_of(st.none(), st.text()))
def test_a_payload_is_written_alike_whichever_writes_the_task(payload: object, output: str) -> None:
    """With pydantic-core loaded (a server) or not (a Lambda cold start), the same bytes: the
    payload is always the json module's, compact, characters as they are (pydantic-core
    writes some floats otherwise: 1e-07 as 1e-7)."""
    task = _task(payload=payload, output=output)
    written = task_json(task)
    assert written == plain_task_json(task)
    assert written.endswith(
        b',"payload":'
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"}"
    )
    assert json.loads(written) == json.loads(to_json(task_fields(task)))
    assert list(json.loads(written)) == list(TaskOut.model_fields)


def test_a_page_of_large_payloads_is_cut_under_5_mb_and_says_where_to_go_on() -> None:
    big = "é" * 32_000  # 64,000 bytes, 64,002 as JSON, 192,002 as Lambda's envelope has it
    items = [_task(id=i, payload=big) for i in range(1, 101)]
    page = page_json(Page(items=items, next_cursor=None))
    # Counted as the body string of Lambda's response, with ensure_ascii: \u00e9 for é.
    assert len(json.dumps(page.decode())) - 2 == enveloped_size(page) <= MAX_PAGE_BYTES
    read = json.loads(page)
    kept = [item["id"] for item in read["items"]]
    assert kept == list(range(1, len(kept) + 1)) and len(kept) == 25
    assert decode_cursor(read["next_cursor"]).id == kept[-1]
    # Everything fits: the page's own cursor, None on the last page.
    small = page_json(Page(items=items[:3], next_cursor=None))
    assert json.loads(small)["next_cursor"] is None and len(json.loads(small)["items"]) == 3
    assert (
        json.loads(page_json(Page(items=items[:3], next_cursor="YWZ0ZXI6Mw")))["next_cursor"]
        == "YWZ0ZXI6Mw"
    )
    # One task alone over the budget is still sent, alone, with the cursor after it.
    huge = [_task(id=1, payload="x" * MAX_PAGE_BYTES), _task(id=2)]
    alone = json.loads(page_json(Page(items=huge, next_cursor=None)))
    assert [i["id"] for i in alone["items"]] == [1] and decode_cursor(alone["next_cursor"]).id == 1
    listed = list_json(items)
    assert len(listed) <= MAX_PAGE_BYTES
    assert [t["id"] for t in json.loads(listed)] == kept
    assert json.loads(list_json(items[:2])) == [json.loads(task_json(t)) for t in items[:2]]


@pytest.mark.parametrize("character", ['"', "\\", "a", "\n", "é", "☃", "😀"])
def test_a_page_fits_one_answer_exactly_as_its_envelope_is_measured(character: str) -> None:
    """Items of one character repeated, around the most that fit and around the third of an
    answer that is not measured: whether they fit is what their envelope's size says (no
    byte takes more than 3 in the envelope)."""
    one = json.dumps(character, ensure_ascii=False)[1:-1].encode()  # as JSON text holds it
    most = (MAX_PAGE_BYTES - PAGE_ROOM - 1) // enveloped_size(one)
    third = (MAX_PAGE_BYTES - PAGE_ROOM - 1) // (3 * len(one))
    for n in (*range(most - 1, most + 2), *range(third - 1, third + 2)):
        items = one * n
        assert enveloped_size(items) <= 3 * len(items)
        measured = PAGE_ROOM + enveloped_size(items) + 1 <= MAX_PAGE_BYTES
        assert fits_one_answer(items) == measured == (n <= most), (character, n)
