"""Kinds defined outside the package: a module of the user's, loaded by `TASKRUNNER_KINDS` or by
an entry point, in the real commands and the Lambda handlers (functions/kinds.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import TASKRUNNER, Proc, free_port, spawn, wait_for

__all__ = ["spawn"]  # the fixture

ROOT = Path(__file__).resolve().parents[2]

# A user's module: a coroutine kind with a unicode line, one that prints nothing, one that
# gives up at once, and one that fails its first attempt.
KIND_MODULE = """
from functions.kinds import Context, Fail, kind


@kind("send_email", timeout_s=30, concurrency=20)
async def send_email(ctx: Context) -> str | None:
    return f"sent ✉ {ctx.task_id}"


@kind("quiet")
def quiet(ctx: Context) -> None:
    return None


@kind("give_up")
def give_up(ctx: Context) -> str:
    raise Fail("no such address")


@kind("flaky", timeout_s=5)
async def flaky(ctx: Context) -> str:
    if ctx.attempt < 2:
        raise RuntimeError("not yet")
    return f"flaky {ctx.task_id} on attempt {ctx.attempt}"
"""


def write_module(directory: Path, module: str, text: str = KIND_MODULE) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(text, encoding="utf-8")


def write_entry_point(directory: Path, dist: str, module: str) -> None:
    """A distribution as an installer leaves it: its .dist-info with an entry_points.txt."""
    info = directory / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[taskrunner.kinds]\nmine = {module}\n")


def python_path(*directories: Path) -> str:
    return os.pathsep.join([*map(str, directories), str(ROOT)])


def kind_env(tmp_path: Path, source: str) -> dict[str, str]:
    """The environment that loads KIND_MODULE by `source`: "setting" or "entry_point"."""
    directory = tmp_path / "user"
    if source == "setting":
        write_module(directory, "user_kinds")
        return {"PYTHONPATH": python_path(directory), "TASKRUNNER_KINDS": "user_kinds"}
    write_module(directory, "shipped_kinds")
    write_entry_point(directory, "shipped_kinds", "shipped_kinds")
    return {"PYTHONPATH": python_path(directory)}


def stdout_lines(*procs: Proc) -> list[str]:
    return [line for proc in procs for line in proc.stdout().splitlines()]


@pytest.mark.one_server
@pytest.mark.slow
@pytest.mark.parametrize("source", ["setting", "entry_point"])
@pytest.mark.parametrize("processes", ["dev", "worker+api"])
def test_a_users_kinds_run_once_each(
    spawn: Callable[..., Proc], database_url: str, tmp_path: Path, source: str, processes: str
) -> None:
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_RETRY_BASE_S": "0.05",
        "TASKRUNNER_POLL_INTERVAL_S": "0.1",
        **kind_env(tmp_path, source),
    }
    if processes == "dev":
        api = spawn("dev", env=env, http=True)
        running = [api]
    else:
        api = spawn("api", env=env, http=True)
        running = [api, spawn("worker", env=env)]
    api.wait_healthy()

    # The API knows the kinds: its document lists them, and its 422 names them.
    document = httpx.get(f"{api.url}/openapi.json").json()
    assert "send_email" in json.dumps(document["components"]["schemas"]["TaskIn"])
    unknown = httpx.post(f"{api.url}/tasks", json={"type": "nope", "execute_at": 0})
    assert unknown.status_code == 422
    assert "bar, baz, flaky, foo, give_up, http, quiet, send_email" in unknown.text
    page = httpx.get(f"{api.url}/").text
    assert 'data-kinds="bar baz flaky foo give_up http quiet send_email"' in page

    now = time.time()
    ids = {}
    for name in ("send_email", "quiet", "give_up", "flaky", "baz"):
        response = httpx.post(f"{api.url}/tasks", json={"type": name, "execute_at": now})
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    # The original challenge's route takes every kind, in any case.
    original = httpx.post(f"{api.url}/SEND_Email/{int(now)}")
    assert original.status_code in (200, 201), original.text
    ids["original"] = original.json()

    def finished() -> dict[str, dict[str, Any]] | None:
        tasks = {name: httpx.get(f"{api.url}/tasks/{i}").json() for name, i in ids.items()}
        done = all(t["state"] in ("succeeded", "failed") for t in tasks.values())
        return tasks if done else None

    tasks = wait_for(finished, 60, "every task to finish")
    # Each line is printed once (lines reach stdout before their result is written).
    lines = stdout_lines(*running)
    for name in ("send_email", "original"):
        task = tasks[name]
        assert (task["type"], task["state"], task["attempts"]) == ("send_email", "succeeded", 1)
        assert task["output"] == f"sent ✉ {task['id']}"
        assert lines.count(task["output"]) == 1
    assert (tasks["quiet"]["state"], tasks["quiet"]["output"]) == ("succeeded", None)
    give_up = tasks["give_up"]
    assert (give_up["state"], give_up["attempts"], give_up["max_attempts"]) == ("failed", 1, 3)
    assert give_up["error"] == "Fail: no such address"
    flaky = tasks["flaky"]
    assert (flaky["state"], flaky["attempts"]) == ("succeeded", 2)
    assert flaky["output"] == f"flaky {flaky['id']} on attempt 2"
    assert tasks["baz"]["output"].startswith("Baz ")
    # Nothing else was printed: `quiet`'s None is no line.
    expected = {tasks[n]["output"] for n in ("send_email", "original", "flaky", "baz")}
    assert sorted(lines) == sorted(expected)
    stats = httpx.get(f"{api.url}/stats").json()
    assert stats["counts"]["succeeded"]["send_email"] == 2
    assert stats["counts"]["scheduled"]["quiet"] == 0
    for proc in running:
        assert proc.terminate() == 0, proc.stderr()


# Each refusal: the module written to the user's directory, what is set, and what the message
# must say (the module and the reason).
def _kinds(*names: str) -> str:
    lines = ["from functions.kinds import kind"]
    for i, name in enumerate(names):
        lines += [f"@kind({name!r})", f"def k{i}(ctx):", "    return None"]
    return "\n".join(lines) + "\n"


REFUSALS: dict[str, tuple[dict[str, str], str, str]] = {
    "unknown module": ({}, "no_such_module", "no_such_module (TASKRUNNER_KINDS) cannot be"
                       " imported: ModuleNotFoundError: No module named 'no_such_module'"),
    "module that raises": ({"bad_import": "raise RuntimeError('boom')\n"}, "bad_import",
                           "bad_import (TASKRUNNER_KINDS) cannot be imported: RuntimeError: boom"),
    "two kinds alike": ({"one": _kinds("mail"), "two": _kinds("mail")}, "one,two",
                        "kind module two: the kind 'mail' is declared twice (one and two)"),
    "alike in one module": ({"one": _kinds("mail", "mail")}, "one",
                            "kind module one: the kind 'mail' is declared twice in one"),
    "a built-in's name": ({"one": _kinds("baz")}, "one",
                          "kind module one: the kind name 'baz' is a built-in kind's"),
    "upper case": ({"one": _kinds("Mail")}, "one", "kind module one: the kind name 'Mail' is not"),
    "64 characters": ({"one": _kinds("m" * 64)}, "one", f"the kind name '{'m' * 64}' is not"),
    "leading digit": ({"one": _kinds("1mail")}, "one", "the kind name '1mail' is not"),
    "unicode": ({"one": _kinds("maïl")}, "one", "the kind name 'maïl' is not"),
    "a path of the API": ({"one": _kinds("stats")}, "one",
                          "kind module one: the kind name 'stats' is a path of the API"),
    "bad setting": ({}, "a b", "TASKRUNNER_KINDS: must be module names separated by commas"),
}  # fmt: skip


def run_refused(tmp_path: Path, files: dict[str, str], setting: str, *args: str) -> Any:
    directory = tmp_path / "user"
    for module, text in files.items():
        write_module(directory, module, text)
    env = {
        **os.environ,
        "PYTHONPATH": python_path(directory),
        "TASKRUNNER_KINDS": setting,
        # Never reached: the command stops before it connects.
        "TASKRUNNER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
    }
    return subprocess.run(
        [TASKRUNNER, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("case", REFUSALS)
def test_a_kind_module_that_cannot_be_loaded_stops_dev(tmp_path: Path, case: str) -> None:
    files, setting, message = REFUSALS[case]
    port = free_port()
    result = run_refused(tmp_path, files, setting, "dev", "--port", str(port))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "API on http" not in result.stderr  # it never began to serve
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["api", "worker", "tick", "bench"])
@pytest.mark.parametrize("case", ["unknown module", "two kinds alike"])
def test_every_command_refuses_before_it_starts(tmp_path: Path, command: str, case: str) -> None:
    files, setting, message = REFUSALS[case]
    result = run_refused(tmp_path, files, setting, command)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    # Nothing was tried on the database (it would have said it cannot reach it).
    assert "127.0.0.1:1" not in result.stderr and "database" not in result.stderr.lower()


def test_an_entry_point_that_cannot_be_imported_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "user"
    write_entry_point(directory, "broken_dist", "missing_module")
    env = {**os.environ, "PYTHONPATH": python_path(directory)}
    env.pop("TASKRUNNER_KINDS", None)
    result = subprocess.run(
        [TASKRUNNER, "tick"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert (
        "kind module missing_module (entry point 'mine' of broken_dist) cannot be imported"
        in result.stderr
    )


# --- the Lambda handlers ---------------------------------------------------------------------

LAMBDA_SCRIPT = """
import json, sys
from tests.lambda_harness import FakeContext, api_event, body, scheduled_event
import functions.api, functions.tick

event = api_event("v2", "create")
created = []
for kind in ("send_email", "quiet"):
    event["body"] = json.dumps({"type": kind, "execute_at": 0})
    response = functions.api.handler(event, FakeContext())
    created.append((response["statusCode"], body(response)["id"]))
summary = functions.tick.handler(scheduled_event(), FakeContext())
print(json.dumps({"created": created, "summary": summary}), file=sys.stderr)
"""


@pytest.mark.one_server
@pytest.mark.slow
def test_the_lambda_handlers_load_the_kinds_at_init(
    database_url: str, tmp_path: Path, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    """Both handlers, in a process of their own (a container), fed real event JSON."""
    directory = tmp_path / "user"
    write_module(directory, "user_kinds")
    env = {
        **os.environ,
        "PYTHONPATH": python_path(directory),
        "TASKRUNNER_KINDS": "user_kinds",
        "TASKRUNNER_DATABASE_URL": database_url,
        "AWS_LAMBDA_FUNCTION_NAME": "taskrunner-Api",
    }
    result = subprocess.run(
        [sys.executable, "-c", LAMBDA_SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert [status for status, _ in report["created"]] == [201, 201]
    [email, quiet] = [task_id for _, task_id in report["created"]]
    assert result.stdout == f"sent ✉ {email}\n"
    rows = sql("SELECT id, kind, state, output FROM tasks ORDER BY id")
    assert rows == [
        (email, "send_email", "succeeded", f"sent ✉ {email}"),
        (quiet, "quiet", "succeeded", None),
    ]


@pytest.mark.parametrize("module", ["functions.api", "functions.tick"])
def test_a_lambda_handler_fails_its_init_on_a_kind_module_it_cannot_load(
    tmp_path: Path, module: str
) -> None:
    directory = tmp_path / "user"
    write_module(directory, "one", _kinds("tasks"))
    env = {
        **os.environ,
        "PYTHONPATH": python_path(directory),
        "TASKRUNNER_KINDS": "one",
        "AWS_LAMBDA_FUNCTION_NAME": "taskrunner",
    }
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "KindError: kind module one: the kind name 'tasks' is a path of the API" in result.stderr
    # Logged too, as the platform's log lines are: JSON, with the handler's action.
    [logged] = [line for line in result.stderr.splitlines() if line.startswith("{")]
    assert json.loads(logged)["action"] == module.removeprefix("functions.")


# --- docs/own-tasks.md ------------------------------------------------------------------------


def docs_module() -> str:
    """The first `python` block of docs/own-tasks.md, as written."""
    text = (ROOT / "docs" / "own-tasks.md").read_text(encoding="utf-8")
    return text.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.one_server
@pytest.mark.slow
def test_the_docs_module_runs_as_written(
    spawn: Callable[..., Proc], database_url: str, tmp_path: Path
) -> None:
    write_module(tmp_path, "reminders", docs_module())
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "PYTHONPATH": python_path(tmp_path),
        "TASKRUNNER_KINDS": "reminders",
    }
    dev = spawn("dev", env=env, http=True)
    dev.wait_healthy()
    ids = []
    for kind in ("remind", "check_quota", "check_quota"):
        created = httpx.post(f"{dev.url}/tasks", json={"type": kind, "execute_at": 0})
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    original = httpx.post(f"{dev.url}/REMIND/1")
    assert original.status_code == 200, original.text
    ids.append(original.json())

    def finished() -> list[dict[str, Any]] | None:
        tasks = [httpx.get(f"{dev.url}/tasks/{i}").json() for i in ids]
        return tasks if all(t["state"] in ("succeeded", "failed") for t in tasks) else None

    reminded, *checks, reminded_too = wait_for(finished, 60, "the docs' tasks to finish")
    for task in (reminded, reminded_too):
        assert (task["state"], task["output"]) == ("succeeded", f"reminded everyone ({task['id']})")
    for task in checks:
        if task["id"] % 2:
            assert (task["state"], task["attempts"]) == ("failed", 1)
            assert task["error"] == "Fail: odd ids have no quota"
        else:
            assert (task["state"], task["output"]) == ("succeeded", None)
    assert sorted(dev.stdout().splitlines()) == sorted(
        [f"reminded everyone ({reminded['id']})", f"reminded everyone ({reminded_too['id']})"]
    )
    assert dev.terminate() == 0, dev.stderr()


@pytest.mark.slow
def test_a_kind_no_worker_loads_waits_in_sight_until_one_does(
    spawn: Callable[..., Proc], database_url: str, tmp_path: Path
) -> None:
    """The API deployed with a new kind before the workers: its tasks are shown, not lost."""
    base = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_POLL_INTERVAL_S": "0.1"}
    with_kinds = {**base, **kind_env(tmp_path, "setting")}
    api = spawn("api", env=with_kinds, http=True)
    api.wait_healthy()
    email = httpx.post(f"{api.url}/tasks", json={"type": "send_email", "execute_at": 0}).json()
    baz = httpx.post(f"{api.url}/tasks", json={"type": "baz", "execute_at": 0}).json()
    old = spawn("worker", env={**base, "PYTHONPATH": python_path()}, name="old-worker")

    def get(task: dict[str, Any]) -> dict[str, Any]:
        return dict(httpx.get(f"{api.url}/tasks/{task['id']}").json())

    wait_for(lambda: get(baz)["state"] == "succeeded", 60, "the old worker to run baz")
    wait_for(lambda: "action=unserved" in old.stderr(), 60, "the old worker's warning")
    assert "kinds=send_email: " in old.stderr() and "send_email (1 due)" in old.stderr()
    assert httpx.get(f"{api.url}/stats").json()["unserved"] == {"send_email": 1}
    metrics = httpx.get(f"{api.url}/metrics").text
    assert 'taskrunner_unserved_due_tasks{type="send_email"} 1.0' in metrics
    assert (get(email)["state"], get(email)["attempts"]) == ("scheduled", 0)

    new = spawn("worker", env=with_kinds, name="new-worker")
    wait_for(lambda: get(email)["state"] == "succeeded", 60, "the new worker to run it")
    assert new.stdout() == f"sent ✉ {email['id']}\n"
    assert "sent" not in old.stdout()
    assert httpx.get(f"{api.url}/stats").json()["unserved"] == {}
    for proc in (api, old, new):
        assert proc.terminate() == 0, proc.stderr()


@pytest.mark.one_server
@pytest.mark.slow
def test_each_process_of_api_workers_loads_the_kinds(
    spawn: Callable[..., Proc], database_url: str, tmp_path: Path
) -> None:
    """`taskrunner api --workers 2`: uvicorn's children build their own apps."""
    env = {"TASKRUNNER_DATABASE_URL": database_url, **kind_env(tmp_path, "setting")}
    api = spawn("api", "--workers", "2", env=env, http=True)
    api.wait_healthy()
    for _ in range(10):  # over new connections: each may reach either child
        with httpx.Client() as client:
            created = client.post(f"{api.url}/tasks", json={"type": "quiet", "execute_at": 0})
            assert created.status_code == 201, created.text
            document = client.get(f"{api.url}/openapi.json").text
            assert "send_email" in document
    assert api.terminate() == 0, api.stderr()
