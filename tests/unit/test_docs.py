"""The docs document every setting the code reads, link only to pages that exist, and show the
answer of every example."""

import dataclasses
import re
from pathlib import Path

import pytest

from functions.settings import Settings
from tests.examples import BASE_URL, examples, mismatch, pages, parse_body

ROOT = Path(__file__).parents[2]
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
# What a reader is sent to: the README, ARCHITECTURE.md and every page of docs/.
DOCS = [*pages(), ROOT / "ARCHITECTURE.md"]


def test_every_setting_is_in_the_configuration_table() -> None:
    start = OPERATIONS.index("## Configuration")
    table = OPERATIONS[start : OPERATIONS.index("\n## ", start)]
    missing = [
        f"TASKRUNNER_{name.upper()}"
        for name in (field.name for field in dataclasses.fields(Settings))
        if f"`TASKRUNNER_{name.upper()}`" not in table
    ]
    assert missing == []


def test_every_curl_example_shows_its_answer_and_asks_only_the_local_server() -> None:
    """The examples that tests/acceptance/test_readme.py runs: each shows at least its status,
    and each is sent to the server the README starts (a test never reaches the internet)."""
    requests = [e for page in pages() for e in examples(page) if e.is_request]
    assert len(requests) >= 20
    assert [e.where for e in requests if e.answer is None or e.answer.status is None] == []
    assert [e.where for e in requests if BASE_URL not in e.command] == []


@pytest.mark.parametrize(
    ("shown", "got", "problem"),
    [
        ('{"ids": [7, 8]}', {"ids": [1, 2]}, None),
        ('{"ids": [7, 8]}', {"ids": [1]}, ".ids: 1 items, 2 shown"),
        ('{"id": 3, ...}', {"id": 1, "type": "foo"}, None),
        ('{"id": 3}', {"id": 1, "type": "foo"}, "the body: keys missing [], not shown ['type']"),
        ("[{...}, ...]", [{"a": 1}, {"b": None}], None),
        (
            '{"next_cursor": null}',
            {"next_cursor": "YWZ0ZXI6Mw"},
            '.next_cursor: "YWZ0ZXI6Mw" is not a null',
        ),
        ('{"p50": 2.1}', {"p50": 0}, None),
    ],
)
def test_shapes_are_compared_by_keys_and_types(
    shown: str, got: object, problem: str | None
) -> None:
    assert mismatch(parse_body(shown), got) == problem


def test_every_relative_link_leads_to_a_file() -> None:
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_readme_stays_short() -> None:
    """The README says what the project is, how to run and test it, a tour; the rest is in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
