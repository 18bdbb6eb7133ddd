"""The Lambda handlers import only what their first invocation needs (a cold start pays for
every module): httpx only once a `bar` runs, prometheus_client only for /metrics."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["functions.api", "functions.tick"])
def test_a_handler_does_not_import_what_only_some_paths_need(module: str) -> None:
    probe = (
        f"import sys, {module}; "
        "print(sorted({'httpx', 'prometheus_client', 'sqlalchemy'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
