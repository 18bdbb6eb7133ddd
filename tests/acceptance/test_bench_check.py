"""`taskrunner bench --check` exits 1 when a figure misses its goal, so a script can rely on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `taskrunner bench --only fanout`, with the fan-out measured as 99 s: far past its goal.
MISSED = """
import sys
from local import cli
from local.bench.scenarios import Bench
Bench.fanout = lambda self: (99.0, 10.0)
cli.main(sys.argv[1:])
"""


def bench(database_url: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MISSED, "bench", "--quick", "--only", "fanout", *args],
        env={**os.environ, "TASKRUNNER_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.mark.one_server
def test_check_exits_1_when_a_goal_is_missed(database_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    checked = bench(database_url, tmp_path, "--check", "--json", str(out))
    assert checked.returncode == 1, checked.stderr
    assert "goals missed: fan-out, 200 x 3 s foo" in checked.stderr
    met = {f["scenario"]: f["met"] for f in json.loads(out.read_text())}
    assert met == {"fan-out, 200 x 3 s foo": False, "fan-out, peak worker memory": True}

    unchecked = bench(database_url, tmp_path)
    assert unchecked.returncode == 0, unchecked.stderr
    assert "| no |" in unchecked.stdout

    unknown = bench(database_url, tmp_path, "--only", "nap")
    assert unknown.returncode == 1
    from local.bench.suite import SCENARIOS

    assert f"no bench scenario ['nap']; the scenarios: {', '.join(SCENARIOS)}" in unknown.stderr
