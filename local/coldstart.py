"""A Lambda cold start, measured in a fresh process: `python -m local.coldstart api|tick`.

Times the import of a handler's module plus its first invocation (for `api`, an API Gateway
HTTP API event creating a task; for `tick`, a scheduled event with nothing due), from the
first line of this module, and prints {"import_ms": ..., "total_ms": ...} on stdout. The
handlers read TASKRUNNER_DATABASE_URL like on Lambda. `taskrunner bench` runs it.
"""

import time

STARTED = time.perf_counter()

import json  # noqa: E402
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
    which = sys.argv[1]
    if which == "api":
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


if __name__ == "__main__":
    main()
