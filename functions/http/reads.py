"""The reads that take nothing from the request but its path, each answer made once here for
both paths that serve the API: `GET /healthz`, `GET /stats`, `GET /metrics` and `GET /` (the
dashboard's page). The FastAPI routes (`routes`, `monitoring`, `dashboard`) send what these
make, and declare the shape in the OpenAPI document (`monitoring.StatsOut`); the fast path
(`fastpath`) sends the same, without FastAPI: on Lambda, a cold start that reads one of these
does without importing FastAPI and pydantic and building the app (~0.5 s on a quiet machine).

Each takes the store and the base path the API is served under (`root_path`) and answers
(body, content type, headers); a domain error is raised, and answered by `status_of` on
either path. No FastAPI, Starlette or pydantic here.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from functions import tasks
from functions.report import Stats, TypeActivity, build_version, read_stats
from functions.store import Store

# The body, its content type (as sent: a text type with its charset), the other headers.
Read = tuple[bytes, str, dict[str, str]]
JSON = "application/json"
# As Starlette's JSONResponse and pydantic-core write JSON: compact, characters as they are.
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


async def healthz(store: Store, root_path: str) -> Read:
    """200 when the database answers with a schema this version can use; SchemaOutdated or
    DatabaseUnavailable (503) otherwise."""
    revision = await tasks.check_schema(store)
    return _dumps({"status": "ok", "schema": revision}).encode(), JSON, {}


async def stats(store: Store, root_path: str) -> Read:
    return stats_json(await read_stats(store)), JSON, {}


async def metrics(store: Store, root_path: str) -> Read:
    # Imported here: only /metrics needs the client library.
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    from functions.http.metrics import Families, metric_families

    families = metric_families(await read_stats(store, totals=True), build_version())
    return generate_latest(Families(families)), CONTENT_TYPE_LATEST, {}


async def dashboard(store: Store, root_path: str) -> Read:
    from functions.http.dashboard import page

    return page(root_path)


# What the fast path serves for GET and HEAD, by the path the routes name (without the base
# path).
PATHS: dict[str, Callable[[Store, str], Awaitable[Read]]] = {
    "/healthz": healthz,
    "/stats": stats,
    "/metrics": metrics,
    "/": dashboard,
}


def stats_json(stats: Stats) -> bytes:
    """/stats' JSON: `monitoring.StatsOut`'s fields in its order, figures in milliseconds and
    seconds rounded to the microsecond (3 decimals), times as pydantic writes them."""
    from functions.http.responses import datetime_text

    return _dumps(
        {
            "counts": stats.counts,
            "estimated": stats.estimated,
            "due": stats.due,
            "oldest_due_age_s": _ms(stats.oldest_due_age_s),
            "workers": stats.workers,
            "workers_alive": stats.workers_alive,
            "last_minute": stats.last_minute,
            "lateness_ms": {k: _ms(v) for k, v in stats.lateness_ms.items()},
            "series": [
                {
                    "minute": datetime_text(m.start),
                    "started": m.started,
                    "succeeded": m.succeeded,
                    "failed": m.failed,
                    "cancelled": m.cancelled,
                    "lateness_p99_ms": _ms(m.lateness_p99_ms),
                }
                for m in stats.series
            ],
            "unserved": stats.unserved,
            "by_type": {kind: _activity(of) for kind, of in stats.by_type.items()},
        }
    ).encode()


def _activity(of: TypeActivity) -> dict[str, Any]:
    """A type's last 5 minutes, in `monitoring.TypeOut`'s order."""
    outcomes = of.outcomes
    return {
        "started": of.started,
        **{name: outcomes[name] for name in _TYPE_OUTCOMES},
        "per_s": _ms(of.per_s),
        "lateness_ms": {name: _ms(of.lateness_ms[name]) for name in ("p50", "p99", "max")},
    }


_TYPE_OUTCOMES = ("succeeded", "failed", "retried", "cancelled", "timed_out", "lost")


def _ms(value: float) -> float:
    """A figure the schema declares a float: rounded to 3 decimals, a float even when whole
    (pydantic writes `1.0`, not `1`)."""
    return float(round(value, 3))
