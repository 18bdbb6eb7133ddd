"""Every `curl` example of the README and of `docs/`, run in order, as written, by bash against
a fresh `taskrunner dev`: each answer has the status and the shape the page shows."""

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.examples import BASE_URL, NO_BODY, Example, examples, mismatch, pages
from tests.procs import TASKRUNNER, free_port, wait_for

MARK = "@@example"
# Every request's status, written to stderr (curl's `%{stderr}`) so that what a command
# prints, or a variable captures, is what the user sees.
PRELUDE = f"""
curl() {{ command curl -sS -w '%{{stderr}}{MARK} status %{{http_code}}\\n' "$@"; }}
"""


def _script(runnable: list[Example], base: str) -> str:
    parts = [PRELUDE]
    for n, example in enumerate(runnable):
        parts.append(f"printf '\\n{MARK} {n}\\n'; printf '{MARK} {n}\\n' >&2")
        parts.append(example.command.replace(BASE_URL, base))
    return "\n".join(parts) + "\n"


def _split(output: str, count: int) -> list[str]:
    pieces = []
    for n in range(count):
        start = output.index(f"{MARK} {n}\n") + len(f"{MARK} {n}\n")
        end = output.find(f"{MARK} {n + 1}\n", start)
        pieces.append(output[start : len(output) if end == -1 else end])
    return pieces


def _check(example: Example, stdout: str, stderr: str) -> str | None:
    """What differs between `example`'s answer and what the page shows (None: nothing)."""
    shown = example.answer
    if shown is None:
        return "the page shows no answer" if example.is_request else None
    statuses = [line.split()[-1] for line in stderr.splitlines() if line.startswith(MARK)]
    if statuses != [str(shown.status)]:
        return f"status {statuses}, the page shows {shown.status}; stderr: {stderr.strip()}"
    body = stdout.strip()
    if body.startswith("HTTP/"):
        head, _, body = body.replace("\r\n", "\n").partition("\n\n")
        names = {line.split(":", 1)[0].lower() for line in head.splitlines()[1:]}
        if missing := [h for h in shown.headers if h not in names]:
            return f"headers {missing} are missing"
    if shown.body is NO_BODY:
        return None
    try:
        got: Any = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:200]!r}"
    return mismatch(shown.body, got)


@pytest.mark.slow
def test_every_curl_example_runs_in_order_and_answers_as_shown(
    tmp_path: Path, bar_server: Any
) -> None:
    runnable = [example for page in pages() for example in examples(page)]
    assert sum(e.is_request for e in runnable) >= 20, "the README's examples were not found"
    port = free_port()
    base = f"127.0.0.1:{port}"
    env = {**os.environ, "TASKRUNNER_BAR_URL": bar_server(200)}
    with (tmp_path / "dev.out").open("w") as out, (tmp_path / "dev.err").open("w") as err:
        # A fresh embedded database of its own, in the directory it starts in.
        dev = subprocess.Popen(
            [TASKRUNNER, "dev", "--port", str(port)], cwd=tmp_path, env=env, stdout=out, stderr=err
        )
    try:

        def healthy() -> bool:
            assert dev.poll() is None, (tmp_path / "dev.err").read_text()
            try:
                return httpx.get(f"http://{base}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 120, "taskrunner dev")
        script = tmp_path / "examples.sh"
        script.write_text(_script(runnable, base))
        result = subprocess.run(
            ["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        stdouts = _split(result.stdout, len(runnable))
        stderrs = _split(result.stderr, len(runnable))
        problems = [
            f"{example.where}: {problem}\n  {example.command}"
            for example, stdout, stderr in zip(runnable, stdouts, stderrs, strict=True)
            if (problem := _check(example, stdout, stderr)) is not None
        ]
        assert problems == [], "\n".join(problems)
    finally:
        dev.terminate()
        dev.wait(30)
