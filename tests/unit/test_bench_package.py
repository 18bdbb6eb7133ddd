"""`python -m local.bench.coldstart` times the imports of the process it runs in from its own
first line: whatever `local.bench` itself imported before that line would go untimed."""

import subprocess
import sys


def test_the_bench_package_imports_nothing_of_its_own() -> None:
    probe = (
        "import sys; before = set(sys.modules); import local.bench; "
        "print(sorted(set(sys.modules) - before))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "['local', 'local.bench']", result.stdout
