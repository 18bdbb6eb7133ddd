"""The docs document every setting and command the code has, name only files that exist, link
only to pages and headings that exist, and show the answer of every example."""

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from functions.queries import PRUNE_FINISHED
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


def test_retention_names_every_state_prune_deletes() -> None:
    """The states are read from the statement that deletes them (queries.PRUNE_FINISHED)."""
    [states] = re.findall(r"state IN \(([^)]*)\)", PRUNE_FINISHED)
    deleted = re.findall(r"'([a-z]+)'", states)
    start = OPERATIONS.index("## Retention")
    section = OPERATIONS[start : OPERATIONS.index("\n## ", start)]
    named = re.search(r"Finished tasks \(([^)]*)\) are deleted", section)
    assert named is not None
    assert re.findall(r"`([a-z]+)`", named.group(1)) == deleted


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


def _named_paths(text: str) -> set[str]:
    """Every `functions/...` or `local/...` path a page names (a module, a package, a folder)."""
    return {
        match.rstrip(".,:;")
        for match in re.findall(r"(?<![\w/.])(?:functions|local)/[\w./-]*", text)
        if match.rstrip(".,:;/") not in ("functions", "local")
    }


def _layout_paths(readme: str) -> set[str]:
    """The paths of the README's Layout block: a top folder, then its entries indented, two
    spaces a level (a folder's own entries one level deeper)."""
    block = readme[readme.index("## Layout") :]
    block = block[block.index("```\n") + 4 : block.index("\n```", block.index("```\n") + 4)]
    paths: set[str] = set()
    folders: list[str] = []  # the folder at each level above the line
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        if not line.strip() or depth > len(folders):
            continue  # a blank line, or a description carried over
        name = line.split()[0]
        del folders[depth:]
        path = "".join(folders) + name
        paths.add(path)
        if name.endswith("/"):
            folders.append(name)
    return paths


def test_the_layout_is_read_as_paths() -> None:
    paths = _layout_paths((ROOT / "README.md").read_text())
    assert {"functions/tick.py", "functions/http/rules.py", "local/cli.py", "tests/"} <= paths


def test_every_module_the_docs_name_exists() -> None:
    """Each `functions/...` and `local/...` path in the README (its Layout too), ARCHITECTURE.md
    and docs/ names a file or folder of the tree: a module that moves takes its docs with it."""
    named: dict[str, list[str]] = {}
    for page in DOCS:
        text = page.read_text()
        found = _named_paths(text)
        if page.name == "README.md" and page.parent == ROOT:
            found |= {p for p in _layout_paths(text) if p.startswith(("functions/", "local/"))}
        for path in found:
            named.setdefault(path, []).append(str(page.relative_to(ROOT)))
    missing = [f"{path} (in {', '.join(where)})" for path, where in sorted(named.items())
               if not (ROOT / path).exists()]  # fmt: skip
    assert not missing, "no such file: " + "; ".join(missing)


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces
    as hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_leads_to_a_file_and_a_heading() -> None:
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = page.parent / path if path else page
            if not linked.exists() or (
                anchor and linked.suffix == ".md" and anchor not in _anchors(linked)
            ):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_readme_stays_short() -> None:
    """The README says what the project is, how to run and test it, a tour; the rest is in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_command_and_option_of_the_cli_is_in_the_commands_table() -> None:
    """docs/operations.md's table has a row for each `taskrunner` command naming each of its
    options (`--help` aside), and no row for a command that does not exist."""
    from local.cli import _parser

    start = OPERATIONS.index("## Commands")
    table = OPERATIONS[start : OPERATIONS.index("\n## ", start)]
    rows = {
        match[1]: match[0]
        for match in re.finditer(r"^\| `taskrunner ([a-z]+)\b.*$", table, re.MULTILINE)
    }
    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(rows) == sorted(commands.choices)
    missing = [
        f"{name} {option}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and option not in rows[name]
    ]
    missing += [
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and option not in table
    ]
    assert missing == []


def test_every_bench_scenario_is_described_on_the_performance_page() -> None:
    from local.bench.suite import SCENARIOS

    page = (ROOT / "docs" / "performance.md").read_text()
    described = re.findall(r"^- `([\w-]+)`", page[page.index("## The scenarios") :], re.MULTILINE)
    assert described == list(SCENARIOS)
