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


def test_the_tick_imports_no_pydantic() -> None:
    """Settings are read without it (functions/settings.py) and the store imports
    pydantic-core's JSON writer only for the API's batches: 60-90 ms of each tick's cold
    start, measured."""
    probe = (
        "import sys, functions.tick, functions.settings; functions.settings.Settings(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
