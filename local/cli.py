"""The `taskrunner` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence

from functions.errors import DatabaseUnavailable, TaskrunnerError
from functions.kinds import KindError
from functions.logs import setup_logging
from functions.settings import (
    MAX_AGE_S,
    Settings,
    SettingsError,
    describe,
    warn_unknown_variables,
)

logger = logging.getLogger("taskrunner")


def _resolve() -> tuple[Settings, bool]:
    """Read settings; without a database URL, start the embedded database.

    Returns the settings with their URL, and whether that database is the embedded one.
    """
    settings = Settings()
    if settings.database_url is not None:
        return settings, False
    from local.embedded import start_embedded

    return dataclasses.replace(settings, database_url=start_embedded()), True


def _settings(*, migrate: bool, wait: bool = False) -> Settings:
    """Settings for a command that uses the schema: migrate it, or check that it is current.

    The embedded database is always migrated: it is ours to keep current. With `wait`, a
    database that cannot be reached yet is waited for (long-running commands: a worker
    started before its database comes up, or during a restart, just starts late).
    """
    from local import migrate as migrations

    settings, embedded = _resolve()
    migrate = migrate or embedded
    assert settings.database_url is not None
    retry_s = 0.5
    while True:
        try:
            if migrate:
                migrations.migrate(settings.database_url)
            elif (why := migrations.outdated(settings.database_url)) is not None:
                raise TaskrunnerError(why)
            return settings
        except DatabaseUnavailable as exc:
            if not wait:
                raise
            logger.warning("%s; waiting for the database, next try in %.1fs", exc, retry_s)
            time.sleep(retry_s)
            retry_s = min(retry_s * 2, 5.0)


def _serving() -> tuple[Settings, bool]:
    """Settings for a command that serves the API, and whether the embedded database is used.

    The embedded database is migrated here: it is ours to keep current. A configured one is
    not waited for: the server listens at once and answers 503 until that database answers
    with a current schema (`local.serve.Readiness`), so a probe sees a live process.
    """
    settings, embedded = _resolve()
    if embedded:
        from local import migrate as migrations

        assert settings.database_url is not None
        migrations.migrate(settings.database_url)
    return settings, embedded


def cmd_dev(args: argparse.Namespace) -> None:
    from local.serve import serve

    settings, embedded = _serving()
    logger.info("taskrunner dev: API on http://%s:%d (docs at /docs)", args.host, args.port)
    # `dev` applies migrations: to a configured database, once it answers.
    asyncio.run(serve(settings, host=args.host, port=args.port, worker=True, migrate=not embedded))


def cmd_api(args: argparse.Namespace) -> None:
    from local.serve import run_api, serve, serve_processes

    settings, _ = _serving()
    if args.workers > 1:
        serve_processes(settings, host=args.host, port=args.port, processes=args.workers)
    else:
        run_api(serve(settings, host=args.host, port=args.port, worker=False))


def cmd_worker(args: argparse.Namespace) -> None:
    from local.serve import serve

    asyncio.run(serve(_settings(migrate=False, wait=True), worker=True))


def cmd_tick(args: argparse.Namespace) -> None:
    from functions.tick import tick

    summary = asyncio.run(tick(_settings(migrate=False)))
    # The summary is for people and scripts alike; stdout stays for task output.
    print(json.dumps(summary.as_dict()), file=sys.stderr)


def cmd_migrate(args: argparse.Namespace) -> None:
    _settings(migrate=True)
    logger.info("the database schema is up to date")


def cmd_prune(args: argparse.Namespace) -> None:
    from functions import tasks
    from functions.db import Database
    from functions.store import Store

    settings = _settings(migrate=False)
    older_than_s = settings.retention_s if args.older_than is None else args.older_than
    if args.older_than is None and older_than_s == 0:
        raise TaskrunnerError(
            "retention is off (TASKRUNNER_RETENTION_S=0): say how old with --older-than SECONDS"
        )

    async def prune() -> int:
        database = Database(settings)
        try:
            return await tasks.prune(Store(database), older_than_s=older_than_s)
        finally:
            await database.dispose()

    pruned = asyncio.run(prune())
    # The answer is for people and scripts alike; stdout stays for task output.
    print(f"pruned {pruned} finished tasks older than {older_than_s:g} s", file=sys.stderr)


def cmd_schedules(args: argparse.Namespace) -> None:
    from functions import schedules
    from functions.db import Database
    from functions.store import Store

    settings = _settings(migrate=False)

    async def read() -> list[list[str]]:
        database = Database(settings)
        rows: list[list[str]] = []
        try:
            cursor: str | None = None
            while True:
                page = await schedules.list_schedules(Store(database), limit=1000, cursor=cursor)
                for s in page.items:
                    next_run = "disabled" if s.next_run_at is None else s.next_run_at.isoformat()
                    rows.append(
                        [s.name, s.cron, s.timezone, s.kind, next_run.replace("+00:00", "Z")]
                    )
                cursor = page.next_cursor
                if cursor is None:
                    return rows
        finally:
            await database.dispose()

    rows = asyncio.run(read())
    if args.json:
        keys = ("name", "cron", "timezone", "type", "next_run_at")
        print(json.dumps([dict(zip(keys, row, strict=True)) for row in rows]))
        return
    table = [["NAME", "CRON", "TIMEZONE", "TYPE", "NEXT RUN (UTC)"], *rows]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _bench_stopped(signum: int, frame: object) -> None:
    # A bench told to stop has no figures: never an exit 0 that `--check` would read as
    # every goal met. Its scenarios stop what they started on the way out.
    logger.warning("action=shutdown signal=SIGTERM: bench stopped before its figures")
    raise SystemExit(128 + signal.SIGTERM)


def cmd_bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from local.bench.figures import table, write_json
    from local.bench.suite import check_scenarios, run

    signal.signal(signal.SIGTERM, _bench_stopped)
    # What can be refused is refused before a database is started or a scenario run.
    check_scenarios(args.only)
    json_path = None if args.json is None else Path(args.json)
    if json_path is not None and (
        json_path.is_dir()
        or not json_path.parent.is_dir()
        or not os.access(json_path.parent, os.W_OK)
    ):
        raise TaskrunnerError(f"--json {args.json}: not a file this process can write")
    # The bench works in a database of its own on the same server: the configured one is
    # neither migrated nor touched.
    settings, _ = _resolve()
    assert settings.database_url is not None
    figures = run(
        settings.database_url,
        quick=args.quick,
        tasks=args.tasks,
        workers=args.workers,
        only=args.only,
    )
    print(table(figures))
    if json_path is not None:
        try:
            write_json(figures, json_path)
        except OSError as exc:
            raise TaskrunnerError(f"--json {args.json}: {exc.strerror or exc}") from exc
    missed = [f.scenario for f in figures if not f.met]
    if args.check and missed:
        logger.error("bench: goals missed: %s", "; ".join(missed))
        sys.exit(1)


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def _at_least_one(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _port(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, not {value}")
    return value


def _age_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # (argparse would name the function: "invalid _age_s value")
    if not 0 <= value <= MAX_AGE_S:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0 to {MAX_AGE_S:.0f} (100 years), not {text}"
        )
    return value


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(_LOG_LEVELS)}, not {text}")
    return text.upper()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("taskrunner")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskrunner",
        description="Schedule tasks over HTTP and run each once, at or after its time. "
        "Configured by TASKRUNNER_* environment variables; without TASKRUNNER_DATABASE_URL "
        "an embedded PostgreSQL is kept in ./.taskrunner/.",
    )
    parser.add_argument("--version", action="version", version=f"taskrunner {_version()}")
    parser.add_argument(
        "--log-level", type=_log_level, default="INFO", help="logging level (default: INFO)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def http_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
        sub.add_argument("--port", type=_port, default=8000, help="port to bind (default: 8000)")

    dev = commands.add_parser(
        "dev", help="run the API and the timer loop together", description="Serve the API and "
        "run due tasks in one process: the one command to try taskrunner. Applies migrations."
    )  # fmt: skip
    http_args(dev)
    dev.set_defaults(func=cmd_dev, kinds=True)

    api = commands.add_parser(
        "api", help="run only the HTTP API", description="Serve only the HTTP API."
    )
    http_args(api)
    api.add_argument(
        "--workers", type=_at_least_one, default=1, metavar="N",
        help="serve from N processes on one port, for hosts with more cores (default: 1)",
    )  # fmt: skip
    api.set_defaults(func=cmd_api, kinds=True)

    worker = commands.add_parser(
        "worker", help="run only the timer loop", description="Claim and run due tasks until "
        "SIGTERM or SIGINT, then let running tasks finish (within TASKRUNNER_SHUTDOWN_GRACE_S)."
    )  # fmt: skip
    worker.set_defaults(func=cmd_worker, kinds=True)

    tick = commands.add_parser(
        "tick", help="run one tick, then exit", description="Rescue expired leases, run every "
        "task due now, and exit; prints a JSON summary on stderr."
    )  # fmt: skip
    tick.set_defaults(func=cmd_tick, kinds=True)

    migrate = commands.add_parser(
        "migrate", help="bring the database schema up to date",
        description="Apply pending migrations to TASKRUNNER_DATABASE_URL (or the embedded one).",
    )  # fmt: skip
    migrate.set_defaults(func=cmd_migrate)

    prune = commands.add_parser(
        "prune", help="delete finished tasks past their retention",
        description="Delete succeeded, failed and cancelled tasks that finished longer ago than "
        "TASKRUNNER_RETENTION_S (or --older-than), in batches; say how many. Workers and ticks "
        "do the same about once a minute.",
    )  # fmt: skip
    prune.add_argument(
        "--older-than", type=_age_s, metavar="SECONDS",
        help="instead of TASKRUNNER_RETENTION_S (0: every finished task)",
    )  # fmt: skip
    prune.set_defaults(func=cmd_prune)

    schedules = commands.add_parser(
        "schedules", help="list the schedules and their next run",
        description="List every schedule by name: its cron, time zone, type and next run (UTC; "
        "`disabled` when it is). Create and change them through the API (/schedules).",
    )  # fmt: skip
    schedules.add_argument("--json", action="store_true", help="print them as a JSON array")
    schedules.set_defaults(func=cmd_schedules)

    bench = commands.add_parser(
        "bench", help="measure throughput and lateness",
        description="Run the benchmark scenarios (docs/performance.md describes each) against a "
        "database of their own next to the configured (or embedded) one, and print a table of "
        "each figure, its goal, and what raw PostgreSQL does in the same run.",
    )  # fmt: skip
    bench.add_argument("--quick", action="store_true", help="small sizes: a smoke test for CI")
    bench.add_argument(
        "--tasks", type=_at_least_one, help="tasks in the drain scenario (default 200,000)"
    )
    bench.add_argument(
        "--workers", type=_at_least_one, default=2,
        help="workers in the scenarios that run several: the second drain, the burst, the"
        " cancel (default 2)",
    )  # fmt: skip
    bench.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    bench.add_argument(
        "--check", action="store_true", help="exit 1 when a figure misses its goal (its `met`)"
    )
    bench.add_argument(
        "--only", action="append", metavar="SCENARIO",
        help="run only this scenario (repeatable; an unknown name lists them)",
    )  # fmt: skip
    # Its workers load the kinds: a module that cannot be loaded stops it first, as it does them.
    bench.set_defaults(func=cmd_bench, kinds=True)
    return parser


def _stopped_while_starting(signum: int, frame: object) -> None:
    # Until a long-running command is up (migrations checked, the database reached), SIGTERM
    # stops it at once and cleanly: it holds nothing yet. `serve` takes the signal over.
    logger.info("action=shutdown signal=SIGTERM: stopped while starting")
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    try:
        log_settings: Settings | None = Settings()
    except SettingsError:
        log_settings = None  # the command reads them again and says what is wrong
    setup_logging(log_settings, level=args.log_level.upper())
    warn_unknown_variables()
    try:
        if getattr(args, "kinds", False):
            # Before anything is served or run: a kind module that cannot be loaded stops
            # the command here (exit 2), naming the module and why.
            from functions.kinds import check_base_path, load

            settings = Settings()
            load(settings.kinds)
            check_base_path(settings.base_path)
        args.func(args)
    except KindError as exc:
        logger.error("%s", exc)
        sys.exit(2)
    except TaskrunnerError as exc:
        logger.error("%s", exc)
        sys.exit(1)
    except SettingsError as exc:
        logger.error("bad configuration: %s", describe(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
