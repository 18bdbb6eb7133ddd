"""A cancel's notifications name the tasks each worker should stop, within PostgreSQL's
limit on a payload (under 8,000 bytes), and a worker reads back exactly what was sent."""

import json

import pytest

from functions.model import BIGINT_MAX
from functions.store import cancel_notes, heard_cancel

# A worker's id is host:pid:random; a host name may be 253 characters long.
LONG_WORKER = f"{'h' * 253}:4194304:abcdef"


def read_back(notes: list[str]) -> dict[str, list[tuple[int, int]]]:
    heard: dict[str, list[tuple[int, int]]] = {}
    for note in notes:
        assert len(note.encode()) < 8_000, len(note.encode())
        worker, tasks = heard_cancel(note)
        assert tasks is not None
        heard.setdefault(worker, []).extend(tasks)
    return heard


@pytest.mark.parametrize("count", [0, 1, 2, 10_000])
def test_the_tasks_of_each_worker_come_back_whole_in_payloads_under_the_limit(count: int) -> None:
    # The largest ids and attempts there are: the fewest tasks a payload can carry.
    held = {
        LONG_WORKER: [(BIGINT_MAX - i, 2**31 - 1) for i in range(count)],
        "w1": [(1, 1)],
    }
    notes = cancel_notes(held)
    assert read_back(notes) == (held if count else {**held, LONG_WORKER: []})
    # Each note as full as the limit lets it: one task more (",id,attempt") would not fit.
    for note in notes[:-2]:
        assert len(note) + len(f",{BIGINT_MAX},{2**31 - 1}") >= 8_000
    assert len(notes) == (41 + 1 if count == 10_000 else 2)  # 249 tasks a note, and w1


def test_unicode_in_a_worker_id_comes_back_as_it_was() -> None:
    held = {"höst-ü:1:0a0b0c": [(5, 2)], 'a "quoted" \\ id': [(6, 1)]}
    assert read_back(cancel_notes(held)) == held


@pytest.mark.parametrize(
    "payload",
    [
        "host:123:abcdef",  # an older API's: the worker's id alone
        '["w1", [1]]',  # an id without its attempt
        '["w1", [1, true]]',
        '["w1", [1, 1.5]]',
        "[7, [1, 1]]",
        '["w1", [1, 1], 3]',
        "null",
        "",
    ],
)
def test_a_payload_that_names_no_tasks_asks_the_database(payload: str) -> None:
    assert heard_cancel(payload) == (payload, None)


def test_a_payload_is_compact_json() -> None:
    [note] = cancel_notes({"w1": [(10, 1), (12, 3)]})
    assert note == '["w1",[10,1,12,3]]'
    assert json.loads(note) == ["w1", [10, 1, 12, 3]]
