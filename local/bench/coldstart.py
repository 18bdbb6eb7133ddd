"""A Lambda cold start, measured in a fresh process: `python -m local.bench.coldstart
api|tick|floor`, or `python -I -S local/bench/coldstart.py --bundle <dir> api|tick|floor` to
import from a Lambda bundle (infra/Makefile) and nothing else.

Times the import of a handler's module plus its first invocation (for `api`, an API Gateway
HTTP API event creating a task; for `tick`, a scheduled event with nothing due), or for
`floor` what any handler on asyncio and psycopg pays (importing them, one connection, one
statement), from the first line of this module, and prints {"import_ms": ...,
"total_ms": ...} on stdout. The handlers read TASKRUNNER_DATABASE_URL like on Lambda.
`taskrunner bench` runs it.
"""

import time

STARTED = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

EVENT: dict[str, Any] = {
    "version": "2.0",
    "routeKey": "$default",
    "rawPath": "/tasks",
    "rawQueryString": "",
    "headers": {"content-type": "application/json", "host": "api.example.com"},
    "requestContext": {
        "accountId": "123456789012",
        "apiId": "api",
        "domainName": "api.example.com",
        "http": {
            "method": "POST",
            "path": "/tasks",
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
    "body": '{"type": "baz", "execute_at": "2099-01-01T00:00:00Z"}',
    "isBase64Encoded": False,
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
    if which == "floor":
        # What any handler on asyncio and psycopg pays: those imports, one connection, one
        # statement. The bench shows it beside the two, measured in the same run.
        import asyncio

        import psycopg  # noqa: F401  (its import is timed here)

        imported = time.perf_counter()
        asyncio.run(_select_one(os.environ["TASKRUNNER_DATABASE_URL"]))
    elif which == "api":
        from functions.api import handler

        imported = time.perf_counter()
        answer = handler(EVENT, Context())
        if answer["statusCode"] != 201:
            raise SystemExit(f"the first request answered {answer['statusCode']}: {answer}")
    else:
        from functions.tick import handler

        imported = time.perf_counter()
        handler({"source": "aws.events", "detail-type": "Scheduled Event"}, Context())
    done = time.perf_counter()
    result = {"import_ms": (imported - STARTED) * 1000, "total_ms": (done - STARTED) * 1000}
    print(json.dumps(result))


async def _select_one(url: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute("SELECT 1")


if __name__ == "__main__":
    main()
