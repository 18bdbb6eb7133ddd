"""The reference beside `taskrunner bench`'s API figures: a minimal FastAPI app with routes of
the same shape (same server, same bodies in and out) and no database, served the way
`taskrunner api` is. What the stack alone costs per request on this machine."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()

# A task as the bench's are answered (a `baz` created ahead of its time): every field of
# the API's answer (responses.task_fields), in its order, so the page of 100 is as many
# bytes as `taskrunner api`'s (45 KB).
TASK: dict[str, Any] = {
    "id": 1,
    "type": "baz",
    "state": "scheduled",
    "execute_at": "2026-11-28T10:00:00.654321Z",
    "next_attempt_at": "2026-11-28T10:00:00.654321Z",
    "created_at": "2026-11-28T09:00:00.123456Z",
    "started_at": None,
    "finished_at": None,
    "attempts": 0,
    "max_attempts": 3,
    "output": None,
    "error": None,
    "idempotency_key": None,
    "schedule": None,
    "scheduled_for": None,
    "priority": 0,
    "worker": None,
    "running_since": None,
    "lease_expires_at": None,
    "timeout_s": None,
    "payload": None,
}


class TaskIn(BaseModel):
    type: str
    execute_at: float


@app.post("/tasks", status_code=201)
async def create(body: TaskIn) -> dict[str, Any]:
    return {**TASK, "type": body.type}


@app.get("/tasks/{task_id}")
async def get(task_id: int) -> dict[str, Any]:
    return {**TASK, "id": task_id}


@app.get("/tasks")
async def page(limit: int = 100) -> dict[str, Any]:
    return {"items": [{**TASK, "id": i} for i in range(1, limit + 1)], "next_cursor": None}
