"""`taskrunner bench --quick` as a smoke test: every scenario runs and reports a figure.

Speed is not asserted here (timing goals belong to the benchmark, not to tests).
"""

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TASKRUNNER = str(Path(sys.executable).parent / "taskrunner")


@pytest.mark.one_server
@pytest.mark.slow
def test_bench_quick_reports_every_scenario(
    database_url: str, tmp_path: Path, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    # The configured database is left alone: the bench works in one of its own beside it.
    sql("DROP TABLE tasks")
    sql("DROP TABLE alembic_version")
    out = tmp_path / "bench.json"
    env = {**os.environ, "TASKRUNNER_DATABASE_URL": database_url}
    result = subprocess.run(
        [TASKRUNNER, "--log-level", "WARNING", "bench", "--quick", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    scenarios = [f["scenario"] for f in figures]
    api: tuple[str, ...] = ("API POST /tasks, 1 process", "API GET /tasks/{id}, 1 process",
           "API GET /tasks?limit=100, 1 process", "API POST /tasks, 2 processes",
           "API GET /tasks/{id}, 2 processes")  # fmt: skip
    if shutil.which("wrk") is None:  # the API figures need it (.ci/run installs it)
        assert "wrk is not installed" in result.stderr
        api = ()
    others = ("drain, 1 worker", "drain, 2 workers", "burst on a fresh table", "fan-out",
              "peak worker memory", "lateness, future", "lateness, due on creation",
              "POST /tasks,", "POST /tasks/batch", "GET /stats", "soak", "cold start, API",
              "cold start, tick", "drain, 1 worker, a 1 KiB payload each",
              "POST /tasks with a 1 KiB payload", "wake-up, enqueue + commit",
              "schedules' occurrences at one minute", "GET /tasks, first page of each",
              "cancel 200 running foo", "share, 400 x 1 s bar")  # fmt: skip
    for expected in (*api, *others):
        assert any(expected in s for s in scenarios), f"no {expected!r} in {scenarios}"
    for figure in figures:
        assert math.isfinite(figure["value"]) and figure["value"] > 0, figure
    assert "| scenario | taskrunner | goal | met | raw PostgreSQL |" in result.stdout
    assert len(result.stdout.strip().splitlines()) == len(figures) + 2
    assert sql("SELECT to_regclass('tasks'), to_regclass('alembic_version')") == [(None, None)]
