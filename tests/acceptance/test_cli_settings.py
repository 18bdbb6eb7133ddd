"""The `taskrunner` command's settings: a typo is warned about, a bad value exits 2."""

import os
import subprocess

from tests.procs import TASKRUNNER


def _run(command: str, **variables: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("TASKRUNNER_")}
    env = {
        **clean,
        "TASKRUNNER_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
        "TASKRUNNER_TEST_SERVERS": "18",
        **variables,
    }
    return subprocess.run(
        [TASKRUNNER, command], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_typo_is_warned_about_and_a_bad_value_exits_2_naming_it() -> None:
    result = _run("migrate", TASKRUNNER_MAX_ATTEMPT="5", TASKRUNNER_LEASE_SECONDS="abc")
    assert result.returncode == 2, result.stderr
    assert (
        "TASKRUNNER_MAX_ATTEMPT is set but no setting reads it: did you mean"
        " TASKRUNNER_MAX_ATTEMPTS?"
    ) in result.stderr
    assert (
        "bad configuration: TASKRUNNER_LEASE_SECONDS: must be a number of seconds from 3 to"
        " 86400, got 'abc'"
    ) in result.stderr
    assert "TASKRUNNER_TEST_SERVERS" not in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("no setting reads it") == 1


def test_a_typo_is_warned_about_once_when_the_settings_are_good() -> None:
    """The command reads its settings more than once; the warning comes at its start."""
    result = _run("tick", TASKRUNNER_DB_CONNECT_TIMEOUT_S="1", TASKRUNNER_RETENTON_S="60")
    assert result.stderr.count("no setting reads it") == 1, result.stderr
    assert "TASKRUNNER_RETENTON_S is set but no setting reads it: did you mean" in result.stderr
    assert "TASKRUNNER_RETENTION_S?" in result.stderr
