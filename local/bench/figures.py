"""A bench figure, and the table and JSON `taskrunner bench` writes of them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Figure:
    """One line of the table. `scenario` names the figure (the JSON keeps that key); `raw` is
    what PostgreSQL alone does in the same run, or a floor, in the same unit."""

    scenario: str
    value: float
    unit: str
    goal: str
    met: bool
    raw: float | None
    raw_note: str


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("tasks/s", "req/s"):
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.1f} MB"
    return f"{value:.0f} {unit}"


def table(figures: list[Figure]) -> str:
    """A Markdown table: scenario, figure, goal, met, raw PostgreSQL, ratio."""
    lines = [
        "| scenario | taskrunner | goal | met | raw PostgreSQL | note |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        lines.append(
            f"| {f.scenario} | {_number(f.value, f.unit)} | {f.goal} | {'yes' if f.met else 'no'}"
            f" | {_number(f.raw, f.unit)} | {f.raw_note} |"
        )
    return "\n".join(lines)


def write_json(figures: list[Figure], path: Path) -> None:
    path.write_text(json.dumps([asdict(f) for f in figures], indent=2) + "\n")
