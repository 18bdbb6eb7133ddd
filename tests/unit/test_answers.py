"""The routes answer with `task_fields`, serialized once; TaskOut documents the body. They
must agree field for field, in the JSON a client reads."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from functions.bodies import TaskOut, task_fields
from functions.routing import answer
from functions.tasks import Task, TaskState

AT = datetime(2026, 11, 28, 9, 0, 0, 123456, tzinfo=UTC)


def _task(**changes: object) -> Task:
    fields: dict[str, object] = {
        "id": 2**63 - 1,
        "kind": "baz",
        "state": TaskState.SUCCEEDED,
        "execute_at": datetime(1, 1, 1, tzinfo=UTC),
        "next_attempt_at": None,
        "created_at": AT,
        "started_at": AT + timedelta(microseconds=1),
        "finished_at": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        "attempts": 3,
        "max_attempts": 3,
        "output": 'Baz 343 \u00e9\u2603 "quoted" \\ \n',
        "error": None,
        "idempotency_key": "order-1842~!",
    }
    fields.update(changes)
    return Task(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "task",
    [
        _task(),
        _task(state=TaskState.SCHEDULED, next_attempt_at=AT, started_at=None, finished_at=None),
        _task(state=TaskState.FAILED, error="TimeoutError: x" * 100, output=None),
        _task(kind="foo", state=TaskState.RUNNING, idempotency_key=None, attempts=0),
    ],
)
def test_a_task_answers_as_taskout_says(task: Task) -> None:
    fast = answer(task_fields(task))
    assert fast.media_type == "application/json"
    assert json.loads(bytes(fast.body)) == json.loads(TaskOut.of(task).model_dump_json())
    assert list(json.loads(bytes(fast.body))) == list(TaskOut.model_fields)
