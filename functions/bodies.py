"""What the API reads and writes: request and response bodies, and their parameters.

Shared by the routes (`app`) and the original challenge's routes (`original`). Each type's
JSON Schema says what the server accepts, so the OpenAPI document is the contract.
"""

from datetime import datetime
from typing import Annotated

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from functions import tasks
from functions.kinds import KINDS
from functions.tasks import NewTask, Task, TaskState

MAX_BATCH = 10_000
_BIGINT_MAX = 2**63 - 1

TaskId = Annotated[int, Path(ge=1, le=_BIGINT_MAX)]

KindName = Annotated[
    str,
    PlainValidator(tasks.parse_kind),
    WithJsonSchema(
        {
            "type": "string",
            "enum": sorted(KINDS),
            "description": "The task kind, case-insensitive; returned lowercase.",
        }
    ),
]
ExecuteAt = Annotated[
    datetime,
    PlainValidator(tasks.parse_execute_at),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
            "description": "ISO-8601 date-time with a UTC offset, or Unix seconds.",
            "examples": ["2030-01-01T12:00:00Z", 1893499200],
        }
    ),
]


class TaskIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: KindName
    execute_at: ExecuteAt

    def to_new(self) -> NewTask:
        return NewTask(kind=self.type, execute_at=self.execute_at)


IdempotencyKey = Annotated[
    str,
    Field(
        pattern=tasks.IDEMPOTENCY_KEY_PATTERN,
        description="1 to 255 printable ASCII characters, no spaces: a repeat of a request"
        " with the same key and the same type and execute_at gets the task the first one"
        " created, and creates nothing.",
        examples=["order-1842-reminder"],
    ),
]


class BatchItemIn(TaskIn):
    idempotency_key: IdempotencyKey | None = None

    def to_new(self) -> NewTask:
        return NewTask(
            kind=self.type, execute_at=self.execute_at, idempotency_key=self.idempotency_key
        )


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[BatchItemIn] = Field(min_length=1, max_length=MAX_BATCH)


class RescheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    execute_at: ExecuteAt


class TaskOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    type: str = Field(validation_alias="kind")
    state: TaskState
    execute_at: datetime
    next_attempt_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    output: str | None
    error: str | None
    idempotency_key: str | None

    @classmethod
    def of(cls, task: Task) -> "TaskOut":
        return cls.model_validate(task)


class PageOut(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


class IdsOut(BaseModel):
    ids: list[int]
