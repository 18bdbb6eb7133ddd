"""The OpenAPI document is the truth: schemathesis, with all of its checks and phases
(examples, coverage, fuzzing, stateful), finds nothing the server does that it does not say.

Run in-process against the ASGI app (its own event loop thread, a real database), with the
token set so that the auth checks have something to check. The stateful phase follows the
links the document declares (a created task's id into its routes) and those schemathesis
infers. `/id/{id}` is the same task as `/tasks/{task_id}` under another path: its parameter
is `id`, as the original challenge wrote it, so the inference does not take it for the
`/tasks/...` resource (it then reported a task deleted through `/id/...` as lost from
`/tasks/...`, which a schema cannot say is an alias).
"""

import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status
from schemathesis.engine import events as ev

from functions.http.app import build_app
from functions.settings import Settings

TOKEN = "contract-token"
Sql = Callable[..., list[tuple[Any, ...]]]


def failures_of(event: ev.ScenarioFinished) -> list[str]:
    found = []
    for checks in event.recorder.checks.values():
        for check in checks:
            if check.status is Status.FAILURE and check.failure_info is not None:
                failure = check.failure_info.failure
                steps = []
                for cid, node in event.recorder.cases.items():
                    inter = event.recorder.interactions.get(cid)
                    status = inter.response.status_code if inter and inter.response else None
                    steps.append(f"  {node.value.method} {node.value.formatted_path} -> {status}")
                found.append(
                    f"[{event.phase.name}] {event.label}: {check.name}: {failure.title}\n"
                    f"{failure.message}\n{check.failure_info.code_sample}\n" + "\n".join(steps)
                )
    return found


@pytest.mark.one_server
@pytest.mark.slow
def test_schemathesis_finds_nothing(settings: Settings, sql: Sql) -> None:
    # Ids far from the small ones schemathesis draws for `task_id`, so that a drawn id does
    # not name a task one of its own sequences created (and then deletes or moves).
    sql("ALTER TABLE tasks ALTER COLUMN id RESTART WITH 7000000000000")
    # No pool: schemathesis runs the app on an event loop of its own that outlives the test,
    # where a pool's background tasks would be left pending, and fail a later test when
    # they are collected.
    app = build_app(dataclasses.replace(settings, api_token=TOKEN, db_pool_size=0))
    config = SchemathesisConfig.from_dict(
        {
            "headers": {"Authorization": f"Bearer {TOKEN}"},
            "checks": {"enabled": True},
            # A task's body holds `if`/`then` rules per kind (an `http` task's payload, each
            # kind's ceiling on `timeout_s`): hypothesis draws many bodies those rules then
            # filter out, which its health check reports as an error. Every check still runs
            # on every body it does draw.
            "suppress-health-check": ["filter_too_much"],
            # Examples drawn per operation in the fuzzing and stateful phases (the examples and
            # coverage phases do not depend on it): 30, not 100. Every check, phase and
            # operation still runs; the routes' rules are tested case by case elsewhere
            # (test_edges.py, test_hotpath.py, test_api.py), and this was the suite's
            # second-longest test (82-142 s in CI).
            "generation": {"max-examples": 30, "mode": "all"},
            # A PATCH's payload is checked by the rules of the task's kind (an `http` task's
            # must describe a request), which its body does not name: the schema cannot say
            # which payloads a given task takes, so a 422 there is no contract broken.
            "operations": [
                {
                    "include-path": "/tasks/{task_id}",
                    "include-method": "PATCH",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": [
                                "2xx",
                                "3xx",
                                "401",
                                "403",
                                "404",
                                "409",
                                "422",
                                "429",
                                "5xx",
                            ]
                        }
                    },
                },
                # A listing's `payload` filter is JSON text, which a string's schema cannot say
                # (the server refuses any other text with a 422 that says so), and a cursor goes
                # on in the order it was made in: sent with another `sort`, a 422 names both (a
                # rule between two parameters). The bulk routes take the same filters.
                *(
                    {
                        "include-path-regex": path,
                        "include-method": method,
                        "checks": {
                            "positive_data_acceptance": {
                                "expected-statuses": ["2xx", "401", "403", "404", "422", "5xx"]
                            }
                        },
                    }
                    for path, method in (("^/tasks$", "GET"), ("^/tasks/(cancel|retry)$", "POST"))
                ),
                # What a schedule's cron means (a range run backwards, `5-1`; a day no month has,
                # `0 0 30 2 *`) and which time zones exist are more than a schema says: the server
                # refuses those with a 422 that says what is wrong, which this check would take for
                # a valid request refused. Every other check runs on these operations too.
                {
                    "include-path-regex": "^/schedules",
                    "include-method": ["POST", "PUT", "PATCH"],
                    "checks": {"positive_data_acceptance": {"enabled": False}},
                },
            ],
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": True},
            },
        }
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    found: list[str] = []
    errors: list[str] = []
    phases: dict[str, Status] = {}
    scenarios: dict[str, int] = {}
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, ev.ScenarioFinished):
            found += failures_of(event)
            scenarios[event.phase.name] = scenarios.get(event.phase.name, 0) + 1
        elif isinstance(event, ev.NonFatalError | ev.FatalError):
            errors.append(repr(event))
        elif isinstance(event, ev.PhaseFinished):
            phases[event.phase.name.name] = event.status
    # Anything the run left behind is collected here, not in a later test.
    gc.collect()
    assert not errors, "\n".join(errors)
    assert not found, "\n\n".join(found)
    # Every phase ran (none skipped for want of links or examples) and passed.
    for phase in ("EXAMPLES", "COVERAGE", "FUZZING", "STATEFUL_TESTING"):
        assert phases.get(phase) is Status.SUCCESS, (phase, phases)
    assert scenarios.get("STATEFUL_TESTING", 0) > 0, scenarios
