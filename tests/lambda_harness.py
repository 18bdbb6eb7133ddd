"""Feed the Lambda handlers real event JSON with a fake context, as the platform would."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

EVENTS = Path(__file__).parent / "events"


class FakeContext:
    """The parts of the Lambda context object taskrunner reads; time left runs down for real."""

    function_name = "taskrunner-Tick"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:eu-west-1:123456789012:function:taskrunner-Tick"
    aws_request_id = "6f1a3c2e-0b4d-4e8f-9a7c-1d2e3f4a5b6c"

    def __init__(self, remaining_ms: int = 60_000) -> None:
        self._deadline = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def api_event(version: str, name: str, task_id: int | None = None, **headers: str) -> Any:
    """Load tests/events/{version}/{name}.json, with the task id and extra headers filled in."""
    event = json.loads((EVENTS / version / f"{name}.json").read_text())
    event = copy.deepcopy(event)
    if task_id is not None:
        for key in ("rawPath", "path"):
            if key in event:
                event[key] = event[key].replace("__ID__", str(task_id))
        if version == "v2":
            http = event["requestContext"]["http"]
            http["path"] = http["path"].replace("__ID__", str(task_id))
    event["headers"].update(headers)
    if "multiValueHeaders" in event:
        event["multiValueHeaders"].update({k: [v] for k, v in headers.items()})
    return event


def retarget(event: Any, method: str, path: str, query: str = "") -> Any:
    """A copy of `event` (from api_event) for another method and path, with no body.

    The path goes into every field API Gateway puts it in, prefix included, as a custom
    domain's base-path mapping passes it.
    """
    event = copy.deepcopy(event)
    event["body"] = None
    for name in ("content-type", "content-length"):
        event["headers"].pop(name, None)
        event.get("multiValueHeaders", {}).pop(name, None)
    if event.get("version") == "2.0":
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        event["requestContext"]["http"]["method"] = method
        event["rawQueryString"] = query
    else:
        event["path"] = event["requestContext"]["path"] = path
        event["httpMethod"] = event["requestContext"]["httpMethod"] = method
        event["pathParameters"] = {"proxy": path.lstrip("/")}
        pairs = [pair.split("=", 1) for pair in query.split("&") if pair]
        # (A repeated parameter: its last value here, every one in the multi-value map.)
        event["queryStringParameters"] = dict(pairs) or None
        multi: dict[str, list[str]] = {}
        for name, value in pairs:
            multi.setdefault(name, []).append(value)
        event["multiValueQueryStringParameters"] = multi or None
    return event


def scheduled_event() -> Any:
    return json.loads((EVENTS / "scheduled.json").read_text())


def body(response: dict[str, Any]) -> Any:
    return json.loads(response["body"]) if response.get("body") else None


def header(response: dict[str, Any], name: str) -> str | None:
    headers = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
    multi = {k.lower(): v for k, v in (response.get("multiValueHeaders") or {}).items()}
    if name in headers:
        return str(headers[name])
    if name in multi:
        return str(multi[name][0])
    return None
