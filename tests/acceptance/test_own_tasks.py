"""docs/own-tasks.md's examples, as written: its module of kinds run by a `taskrunner worker`,
and its `enqueue` examples (psycopg, SQLAlchemy, async) run as scripts of their own against a
test database, each task they enqueue run once by that worker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Proc, spawn, wait_for

__all__ = ["spawn"]  # the fixture

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "own-tasks.md"


def blocks(language: str) -> list[str]:
    """The page's fenced blocks in `language`, in order, as written."""
    text = PAGE.read_text(encoding="utf-8")
    return [part.split("```", 1)[0] for part in text.split(f"```{language}\n")[1:]]


def module() -> str:
    """The page's module of kinds: its first `python` block."""
    return blocks("python")[0]


def enqueue_examples() -> list[str]:
    return [block for block in blocks("python") if "from functions.enqueue import" in block]


@pytest.mark.slow
def test_the_enqueue_examples_run_as_written_and_their_tasks_run_once(
    spawn: Callable[..., Proc],
    database_url: str,
    tmp_path: Path,
    sql: Callable[..., list[tuple[Any, ...]]],
) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "reminders.py").write_text(module(), encoding="utf-8")
    env = {
        "TASKRUNNER_DATABASE_URL": database_url,
        "TASKRUNNER_KINDS": "reminders",
        "PYTHONPATH": os.pathsep.join([str(user), str(ROOT)]),
    }
    [table] = blocks("sql")
    sql(table)
    worker = spawn("worker", env=env)
    examples = enqueue_examples()
    assert len(examples) == 3, "the psycopg, SQLAlchemy and async examples"
    printed = []
    for n, example in enumerate(examples):
        script = user / f"example{n}.py"
        script.write_text(example, encoding="utf-8")
        run = subprocess.run(
            [sys.executable, str(script)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        printed.append(run.stdout)
    # Each example's order and its task, committed together.
    orders = sql("SELECT id, customer FROM orders ORDER BY id")
    assert [customer for _, customer in orders] == [
        "ada@example.com",
        "grace@example.com",
        "alan@example.com",
    ]
    tasks = sql("SELECT id, kind, payload, execute_at > now() FROM tasks ORDER BY id")
    assert [(kind, payload["to"], payload["order"]) for _, kind, payload, _ in tasks] == [
        ("remind", customer, order_id) for order_id, customer in orders
    ]
    (ada, *_), (grace, *_), (alan, *_) = tasks
    assert printed[:2] == [f"order {orders[0][0]}: task {ada}\n",
                           f"order {orders[1][0]}: task {grace}\n"]  # fmt: skip
    # Due now (psycopg, async): run once by the worker; in an hour (SQLAlchemy): not yet.
    lines = wait_for(
        lambda: sorted(worker.stdout().splitlines()) if worker.stdout().count("\n") >= 2 else None,
        60,
        "the worker to run the tasks due now",
    )
    assert lines == sorted(
        [f"reminded ada@example.com ({ada})", f"reminded alan@example.com ({alan})"]
    )
    assert [(task_id, future) for task_id, _, _, future in tasks] == [
        (ada, False),
        (grace, True),
        (alan, False),
    ]
    # A line is printed while its finish holds the task's row, before that commits: wait for it.
    finished = [(ada, "succeeded", 1), (alan, "succeeded", 1)]
    wait_for(
        lambda: (
            sql("SELECT id, state, attempts FROM tasks WHERE state <> 'scheduled' ORDER BY id")
            == finished
        ),
        30,
        "the two results to be committed",
    )
    assert worker.terminate() == 0, worker.stderr()
