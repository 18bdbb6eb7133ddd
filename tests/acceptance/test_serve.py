"""`taskrunner api` and `dev` as a load balancer or a probe meets them: listening at once,
answering 503 until the database is ready."""

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.pgservers import Server
from tests.procs import TASKRUNNER, Proc, spawn, wait_for

__all__ = ["spawn"]  # the fixture


def not_ready(proc: Proc, path: str = "/healthz") -> httpx.Response | None:
    """The 503 `proc` answers at `path`; None while it does not listen yet."""
    assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.stderr()}"
    try:
        response = httpx.get(f"{proc.url}{path}", timeout=5)
    except httpx.TransportError:
        return None
    assert response.status_code == 503, response.text
    return response


@pytest.mark.parametrize(
    "command", [["api"], ["dev"], ["api", "--workers", "2"]], ids=["api", "dev", "api-2"]
)
def test_listens_while_the_database_is_down_and_serves_once_it_answers(
    spawn: Callable[..., Proc], own_server: Server, command: list[str]
) -> None:
    own_server.stop()
    env = {"TASKRUNNER_DATABASE_URL": own_server.url, "TASKRUNNER_DB_CONNECT_TIMEOUT_S": "1"}
    api = spawn(*command, env=env, http=True)
    # Listening, and not ready: every route says so, with a time to come back.
    health = wait_for(lambda: not_ready(api), 60, "a 503 from /healthz")
    assert health.headers["retry-after"] == "1"
    assert health.json() == {"detail": "database unavailable, try again shortly"}
    created = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": 1})
    assert (created.status_code, created.headers["retry-after"]) == (503, "1")
    assert httpx.head(f"{api.url}/healthz").status_code == 503

    own_server.start()
    api.wait_healthy()
    created = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": 1})
    assert created.status_code == 201, created.text
    if command == ["dev"]:
        # The timer loop started once the database answered: the task runs.
        wait_for(lambda: api.stdout().startswith("Baz "), 30, "the task to run")
    assert api.terminate() == 0
    assert "Traceback" not in api.stderr(), api.stderr()


def test_api_against_a_schema_behind_answers_503_until_it_is_migrated(
    spawn: Callable[..., Proc], empty_database_url: str, tmp_path: Path
) -> None:
    """A rolling deploy that starts the new API first, then migrates."""
    env = {"TASKRUNNER_DATABASE_URL": empty_database_url}
    api = spawn("api", env=env, http=True)
    health = wait_for(
        lambda: (r := not_ready(api)) is not None and "migrate" in r.text and r, 60, "the schema"
    )
    assert "run `taskrunner migrate`" in health.json()["detail"]
    assert "retry-after" in health.headers
    task = not_ready(api, "/tasks/1")
    assert task is not None and task.json() == health.json()
    # The API looks again every second; it says so in its log once a minute.
    wait_for(lambda: "run `taskrunner migrate`" in api.stderr(), 30, "the log line")
    first_said = api.stderr()
    time.sleep(3)
    assert api.stderr().count("run `taskrunner migrate`") == 1, api.stderr()
    assert first_said.count("run `taskrunner migrate`") == 1

    subprocess.run(
        [TASKRUNNER, "migrate"], env={**os.environ, **env}, check=True, cwd=tmp_path,
        capture_output=True,
    )  # fmt: skip
    api.wait_healthy(timeout_s=30)
    created = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": 1})
    assert created.status_code == 201, created.text


def test_dev_migrates_a_configured_database_once_it_answers(
    spawn: Callable[..., Proc], empty_database_url: str
) -> None:
    api = spawn("dev", env={"TASKRUNNER_DATABASE_URL": empty_database_url}, http=True)
    api.wait_healthy()
    created = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": 1})
    assert created.status_code == 201, created.text
    wait_for(lambda: api.stdout().startswith("Baz "), 30, "the task to run")
