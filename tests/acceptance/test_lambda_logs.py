"""What the Lambda handlers log, in a fresh interpreter as on Lambda: nothing set up beforehand."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
# The lines are the handlers' logging; the ticks' statements are checked on every server in
# tests/integration/test_lambda.py and test_tick.py.
pytestmark = pytest.mark.one_server

# Three warm invocations of the tick, then one of the API, in one process. With `runtime`, a
# handler is put on the root logger first and the level left at WARNING, as the Lambda Python
# runtime does before it loads the function.
SCRIPT = """
import logging, sys
if sys.argv[1] == "runtime":
    runtime = logging.StreamHandler(sys.stderr)
    runtime.setFormatter(logging.Formatter("[%(levelname)s] RUNTIME %(message)s"))
    logging.getLogger().addHandler(runtime)
    logging.getLogger().setLevel(logging.WARNING)

from functions import api, tick
from tests.lambda_harness import FakeContext, api_event, scheduled_event

for _ in range(3):
    tick.handler(scheduled_event(), FakeContext())
assert api.handler(api_event("v2", "healthz"), FakeContext())["statusCode"] == 200
"""


def run_handlers(
    database_url: str, root_logger: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, root_logger],
        cwd=ROOT,
        env={
            "PATH": os.environ["PATH"],
            "AWS_LAMBDA_FUNCTION_NAME": "taskrunner-Tick",
            "TASKRUNNER_DATABASE_URL": database_url,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("root_logger", ["untouched", "runtime"])
def test_each_tick_logs_its_summary_as_one_json_object_per_line(
    database_url: str, task_factory: Callable[..., int], root_logger: str
) -> None:
    ids = [task_factory("baz"), task_factory("baz")]
    result = run_handlers(database_url, root_logger)
    assert result.returncode == 0, result.stderr

    records: list[dict[str, Any]] = [json.loads(line) for line in result.stderr.splitlines()]
    summaries = [r for r in records if r.get("action") == "tick" and "claimed" in r]
    assert len(summaries) == 3, "one summary per invocation, none twice"
    assert [s["succeeded"] for s in summaries] == [2, 0, 0]
    first = summaries[0]
    assert (first["level"], first["logger"]) == ("INFO", "functions.tick")
    assert first["time"].endswith("Z") and first["message"]
    assert "RUNTIME" not in result.stderr

    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("Baz ") for line in lines), "stdout: tasks only"
    assert ids


def test_text_format_when_asked(database_url: str) -> None:
    result = run_handlers(database_url, "untouched", TASKRUNNER_LOG_FORMAT="text")
    assert result.returncode == 0, result.stderr
    summaries = [line for line in result.stderr.splitlines() if "action=tick {" in line]
    assert len(summaries) == 3
    assert " INFO functions.tick: action=tick {" in summaries[0]
    assert "'claimed': 0" in summaries[0]


def test_bad_configuration_is_logged_before_the_invocation_fails(database_url: str) -> None:
    result = run_handlers(database_url, "runtime", TASKRUNNER_LEASE_SECONDS="soon")
    assert result.returncode != 0
    [record] = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert record["level"] == "ERROR" and record["action"] == "tick"
    assert record["message"].startswith("bad configuration: TASKRUNNER_LEASE_SECONDS: ")
