"""A Lambda cold start, measured in a fresh process: `python -m local.bench.coldstart
<which>`, or `python -I -S local/bench/coldstart.py --bundle <dir> <which>` to import from a
Lambda bundle (infra/Makefile) and nothing else.

<which> is one of REQUESTS (the API handler's first request, an API Gateway HTTP API v2 event:
`api` creates a task, `healthz` reads GET /healthz, ...), `after-create` (a create, on the
fast path, then GET /workers, which goes through FastAPI: is the second as cheap as it is
as the first request, `workers`?), `tick` (a scheduled event with nothing due), or `floor`
(what any handler on asyncio and psycopg pays: importing them, one connection, one
statement). It times the
import of the handler's module plus its first invocation, from the first line of this module,
and prints {"import_ms": ..., "total_ms": ...} on stdout (for `after-create`, also
"second_ms": the list alone). The handlers read TASKRUNNER_DATABASE_URL like on Lambda.
`taskrunner bench` runs it.
"""

import time

STARTED = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402


def event(method: str, path: str, query: str = "", body: str | None = None) -> dict[str, Any]:
    """An API Gateway HTTP API (payload format 2.0) event, as Lambda hands it over."""
    headers = {"accept": "*/*", "host": "api.example.com", "user-agent": "coldstart",
               "x-forwarded-for": "203.0.113.10", "x-forwarded-proto": "https"}  # fmt: skip
    if body is not None:
        headers["content-type"] = "application/json"
        headers["content-length"] = str(len(body.encode()))
    found: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "api",
            "domainName": "api.example.com",
            "domainPrefix": "api",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.10",
                "userAgent": "coldstart",
            },
            "requestId": "coldstart",
            "routeKey": "$default",
            "stage": "$default",
            "time": "28/Nov/2026:09:00:00 +0000",
            "timeEpoch": 1795856400000,
        },
        "isBase64Encoded": False,
    }
    if query:
        found["queryStringParameters"] = dict(
            part.split("=", 1)
            for part in query.split("&")  # (no repeated names here)
        )
    if body is not None:
        found["body"] = body
    return found


# The first requests measured, each in a process of its own: (event, the status it answers).
REQUESTS: dict[str, tuple[dict[str, Any], int]] = {
    "api": (
        event("POST", "/tasks", body='{"type": "baz", "execute_at": "2099-01-01T00:00:00Z"}'),
        201,
    ),
    "healthz": (event("GET", "/healthz"), 200),
    "failed": (event("GET", "/tasks", "state=failed"), 200),
    "stats": (event("GET", "/stats"), 200),
    "metrics": (event("GET", "/metrics"), 200),
    "dashboard": (event("GET", "/"), 200),
    # A type no kind has: refused by the body's schema.
    "invalid": (
        event("POST", "/tasks", body='{"type": "nope", "execute_at": "2099-01-01T00:00:00Z"}'),
        422,
    ),
    # A route only the FastAPI app serves: `after-create`'s second request.
    "workers": (event("GET", "/workers"), 200),
}


class Context:
    function_name = "taskrunner-coldstart"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:eu-west-1:123456789012:function:coldstart"
    aws_request_id = "coldstart"

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def main() -> None:
    args = sys.argv[1:]
    if args[0] == "--bundle":
        sys.path.insert(0, args[1])
        args = args[2:]
    which = args[0]
    extra: dict[str, float] = {}
    if which == "floor":
        # What any handler on asyncio and psycopg pays: those imports, one connection, one
        # statement. The bench shows it beside the two, measured in the same run.
        import asyncio

        import psycopg  # noqa: F401  (its import is timed here)

        imported = time.perf_counter()
        asyncio.run(_select_one(os.environ["TASKRUNNER_DATABASE_URL"]))
    elif which in REQUESTS or which == "after-create":
        from functions.api import handler

        imported = time.perf_counter()
        first = "api" if which == "after-create" else which
        _serve(handler, *REQUESTS[first])
        if which == "after-create":
            second = time.perf_counter()
            _serve(handler, *REQUESTS["workers"])
            extra["second_ms"] = (time.perf_counter() - second) * 1000
    else:
        from functions.tick import handler

        imported = time.perf_counter()
        handler({"source": "aws.events", "detail-type": "Scheduled Event"}, Context())
    done = time.perf_counter()
    result = {"import_ms": (imported - STARTED) * 1000, "total_ms": (done - STARTED) * 1000}
    result.update(extra)
    print(json.dumps(result))


def _serve(handler: Any, sent: dict[str, Any], status: int) -> None:
    answer = handler(sent, Context())
    if answer["statusCode"] != status:
        raise SystemExit(f"{sent['rawPath']} answered {answer['statusCode']}: {answer}")


async def _select_one(url: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute("SELECT 1")


if __name__ == "__main__":
    main()
