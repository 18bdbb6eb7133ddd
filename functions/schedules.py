"""Schedules: tasks that recur on a cron. Reading one, the occurrences it is due, and the
operations the API and the CLI offer on them; and the creator of occurrences, which every
worker's upkeep and every tick run (functions/upkeep.py).

Each occurrence becomes one ordinary task, created at most CREATE_AHEAD_S before it is due
by whoever runs the creator, exactly once however many do: the store locks the schedules due
soon (`FOR UPDATE SKIP LOCKED`, through the `schedules_next_run` index), this module works
out their occurrences (the cron library is Python), and the store creates the tasks and moves
each schedule past them in the same transaction; a unique index on (schedule, occurrence) is
the second guard. No lock is held in a process. Nothing here knows about HTTP or SQL.

Daylight saving time, as Debian's cron rules it (cronsim): a cron whose minute and hour
fields do not start with `*` has an occurrence at a local time that does not exist (the
clocks went forward over it) due at the first instant after the gap, and one at a local time
that happens twice due once, at the first; any other follows the local clock as it reads,
with no occurrence in a skipped hour and both of a repeated one (`*/15 2 * * *` skips the
night the clocks go forward; `0-59/15 2 * * *` runs at 03:00 then). docs/api.md gives the
examples tests/unit/test_schedule_input.py holds.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

# cronsim, not croniter: Production/Stable, no dependencies, kept by healthchecks.io (whose
# checks are read with it), and it follows Debian's cron on DST (see the module docstring),
# which croniter does not promise (pyproject.toml).
from cronsim import CronSim, CronSimError

from functions import tasks
from functions.errors import ScheduleExists, ScheduleNotFound
from functions.model import (
    MAX_CATCH_UP,
    SCHEDULE_NAME_PATTERN,
    CatchUp,
    Schedule,
    SchedulePage,
)
from functions.parsing import excerpt
from functions.settings import Settings
from functions.store import Occurrence, ScheduleAdvance, Store

# Occurrences are created at most this long before they are due (and workers, which sleep
# at most their poll interval, hear of those due sooner through the tasks' NOTIFY). Every
# run of the creator sees a minute ahead, so a worker's heartbeat (every 20 s by default) or
# a tick a minute makes each occurrence's task before it is due.
CREATE_AHEAD_S = 60.0
# An occurrence due at most this long ago is late, not missed: `catch_up: none` still
# creates it (a creator that ran a few seconds late loses nothing).
LATE_NOT_MISSED_S = 60.0
# How many missed occurrences of one schedule are counted exactly (~10 us each with cronsim);
# past this (a `* * * * *` schedule stopped for over two months) the count goes on from a
# week before now, and `skipped_occurrences` is a floor.
_COUNT_EXACTLY = 100_000

# The aliases crontab(5) names, as the five fields they stand for.
ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
}
_NAME = re.compile(SCHEDULE_NAME_PATTERN)
_FIELDS = ("minute", "hour", "day of month", "month", "day of week")
_RANGES = (
    "0-59",
    "0-23",
    "1-31; L for the month's last day, LW for its last weekday",
    "1-12 or JAN-DEC",
    "0-7 or SUN-SAT, where 0 and 7 are Sunday; 5L for the month's last Friday, 5#2 for its second",
)
# A day-of-week range that ends on Sunday written as 0 (SUN is 0): `mon-sun` runs backwards.
_ENDS_ON_SUNDAY_0 = re.compile(r"-(?:sun|0+)(?![0-9a-z])", re.IGNORECASE)


# --- reading a schedule ------------------------------------------------------------------------


def parse_name(value: object) -> str:
    """Return `value` if it is a schedule's name (SCHEDULE_NAME_PATTERN)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"schedule name {excerpt(value)} is not 1 to 128 characters of a-z, 0-9, `_`, `.`"
            " and `-`, starting with a letter or digit"
        )
    return value


def parse_cron(value: object) -> str:
    """Return `value` if it is a standard five-field cron expression or an alias of one
    (@hourly, @daily, @weekly, @monthly, @yearly), with its blanks made single spaces.
    cronsim's extensions are taken too (L and LW in the day of month, 5L and 5#2 in the day
    of week); a date no month has (`0 0 30 2 *`) is refused: it would never run."""
    if not isinstance(value, str):
        raise ValueError("cron must be a string")
    text = value.strip()
    if text.lower() in ALIASES:
        return text.lower()
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(
            f"cron {excerpt(value)} has {len(fields)} fields: it takes five (minute, hour,"
            " day of month, month, day of week), or one of " + ", ".join(ALIASES)
        )
    try:
        CronSim(" ".join(fields), datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ValueError(_cron_error(value, fields, exc)) from None
    return " ".join(fields)


def _cron_error(value: object, fields: list[str], exc: CronSimError) -> str:
    """What is wrong with a cron expression, in words: the field cronsim refused and what it
    takes, or that the date it names never occurs."""
    said = str(exc)  # "Bad minute", "Bad day-of-month", ...
    for i, name in enumerate(_FIELDS):
        if not said.lower().replace("-", " ").endswith(name):
            continue
        if name == "day of month" and _parses([*fields[:3], "*", fields[4]]):
            # cronsim takes the field on its own, and refuses a day no month named has.
            return (
                f"cron {excerpt(value)} never runs: no month in its month field"
                f" {excerpt(fields[3])} has a day {excerpt(fields[2])}"
            )
        if name == "day of week" and _ENDS_ON_SUNDAY_0.search(fields[4]):
            return (
                f"cron {excerpt(value)}: its day of week field {excerpt(fields[4])} has a range"
                " that runs backwards, as SUN is 0: end it with 7, which is Sunday too (MON-7"
                " is every day), or write *"
            )
        return (
            f"cron {excerpt(value)}: its {name} field {excerpt(fields[i])} is not one it"
            f" takes ({_RANGES[i]}; with `*`, `,`, `-` and `/`)"
        )
    return f"cron {excerpt(value)}: {said.lower()}"


def _parses(fields: list[str]) -> bool:
    try:
        CronSim(" ".join(fields), datetime(2000, 1, 1))
    except CronSimError:
        return False
    return True


def parse_timezone(value: object) -> str:
    """Return the IANA time zone `value` names ("Europe/Paris", "UTC"), spelled as IANA does:
    a name is matched whatever its case ("utc" is "UTC"), as a case-insensitive file
    system would match it on one host and not on another."""
    if not isinstance(value, str):
        raise ValueError("timezone must be a string")
    found = _zone_names().get(value.lower())
    if found is not None:
        return found
    if value.lower() in _OF_THE_HOST:
        raise ValueError(
            f"timezone {excerpt(value)} is whatever the machine reading it is set to (a"
            " laptop's, not Lambda's): give an IANA name, such as UTC or Europe/Paris"
        )
    raise ValueError(
        f"unknown timezone {excerpt(value)}: give an IANA name, such as UTC or Europe/Paris"
    )


# Zone files a host may have that are no IANA zone of a place: `localtime` is the host's own
# setting, `posixrules` the rules of a POSIX TZ string, `Factory` a placeholder, and `right/`
# and `posix/` copies of every zone (right/ counting leap seconds, which nothing else does).
_OF_THE_HOST = frozenset({"localtime", "posixrules"})
_NOT_PLACES = _OF_THE_HOST | {"factory"}


@cache
def _zone_names() -> dict[str, str]:
    """The zones a schedule takes, by their names in lowercase: zoneinfo's list (the tzdata
    package's, a dependency, and the host's) less _NOT_PLACES. Listed once per process
    (12-36 ms measured: zoneinfo opens each file of the host's)."""
    return {
        name.lower(): name
        for name in available_timezones()
        if name.lower() not in _NOT_PLACES and not name.startswith(("right/", "posix/"))
    }


def _zone(name: str) -> ZoneInfo | Any:
    # UTC as datetime's own: cronsim does no DST handling for it, as none is needed.
    return UTC if name == "UTC" else ZoneInfo(name)


def occurrences_after(cron: str, timezone: str, after: datetime) -> CronSim:
    """The occurrences of `cron` in `timezone` strictly after `after` (to the second), as
    aware datetimes in that zone."""
    return CronSim(ALIASES.get(cron, cron), after.astimezone(_zone(timezone)))


def next_occurrence(cron: str, timezone: str, after: datetime) -> datetime:
    """The first occurrence of `cron` in `timezone` strictly after `after`, in UTC."""
    return next(occurrences_after(cron, timezone, after)).astimezone(UTC)


# --- the creator of occurrences ----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one run of the creator does for one schedule."""

    occurrences: list[datetime]
    next_run_at: datetime
    skipped: int


def plan(schedule: Schedule, now: datetime) -> Plan:
    """The occurrences `schedule` creates at `now`: those from its `next_run_at` up to
    CREATE_AHEAD_S ahead, less the missed ones its `catch_up` leaves out; and its next
    occurrence after them.

    Missed: due before `now` (everything was stopped across them). `latest` creates the most
    recent of them, `all` the most recent MAX_CATCH_UP, `none` those due less than
    LATE_NOT_MISSED_S ago; the others count in `skipped`."""
    assert schedule.next_run_at is not None, "a disabled schedule is never due"
    horizon = now + timedelta(seconds=CREATE_AHEAD_S)
    kept: deque[datetime] = deque(maxlen=MAX_CATCH_UP)
    missed = 0
    coming: list[datetime] = []
    at = schedule.next_run_at
    times = occurrences_after(schedule.cron, schedule.timezone, at)
    while at <= horizon:
        if at <= now:
            missed += 1
            kept.append(at)
            if missed == _COUNT_EXACTLY:
                times = occurrences_after(
                    schedule.cron, schedule.timezone, max(at, now - timedelta(weeks=1))
                )
        else:
            coming.append(at)
        at = next(times).astimezone(UTC)
    if schedule.catch_up is CatchUp.LATEST:
        caught = list(kept)[-1:]
    elif schedule.catch_up is CatchUp.ALL:
        caught = list(kept)
    else:
        late_from = now - timedelta(seconds=LATE_NOT_MISSED_S)
        caught = [t for t in kept if t >= late_from]
    return Plan(occurrences=caught + coming, next_run_at=at, skipped=missed - len(caught))


def occurrences_of(
    due: list[tuple[Schedule, datetime]], default_max_attempts: int
) -> tuple[list[Occurrence], list[ScheduleAdvance]]:
    """The tasks to create for schedules found due (each with the database's now), and
    how each schedule moves on: what the store writes in the transaction that found them."""
    created: list[Occurrence] = []
    advanced: list[ScheduleAdvance] = []
    for schedule, now in due:
        made = plan(schedule, now)
        for at in made.occurrences:
            created.append(
                Occurrence(
                    schedule=schedule.name,
                    kind=schedule.kind,
                    at=at,
                    max_attempts=schedule.max_attempts or default_max_attempts,
                    payload=schedule.payload,
                    timeout_s=schedule.timeout_s,
                    priority=schedule.priority or 0,
                )
            )
        advanced.append(
            ScheduleAdvance(
                name=schedule.name,
                next_run_at=made.next_run_at,
                last_occurrence_at=made.occurrences[-1] if made.occurrences else None,
                skipped=made.skipped,
            )
        )
    return created, advanced


async def create_occurrences(store: Store, default_max_attempts: int) -> int:
    """Create the tasks of every occurrence due within CREATE_AHEAD_S not created yet; return
    how many were created. Safe to run anywhere, any number of times at once."""
    return await store.create_occurrences(
        lambda due: occurrences_of(due, default_max_attempts), ahead_s=CREATE_AHEAD_S
    )


# --- operations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleIn:
    """A schedule as a request gives it (read by the API's schema: every field checked)."""

    kind: str
    cron: str
    timezone: str = "UTC"
    payload: Any = None
    max_attempts: int | None = None
    timeout_s: float | None = None
    priority: int | None = None
    catch_up: CatchUp = CatchUp.LATEST
    enabled: bool = True


def check_schedule(given: ScheduleIn, settings: Settings) -> ScheduleIn:
    """Return `given` if each of its tasks could be created: its payload and timeout held to
    the rules a task's are (`tasks.check_payload`, `tasks.check_timeout`: a 422 at `loc`
    ("body", field)). Every create, replace and change of a schedule passes here, whoever
    asks (the API, the Lambda handler), before anything is written."""
    tasks.check_payload(given.kind, given.payload, settings.max_payload_bytes, ("body", "payload"))
    tasks.check_timeout(given.kind, given.timeout_s, settings, ("body", "timeout_s"))
    return given


def _made(name: str, given: ScheduleIn, now: datetime, last: datetime | None) -> Schedule:
    """The schedule `given` describes at `now`: its next occurrence is the first after both
    now and the last one made (`last`, kept across a replace: none is made twice)."""
    after = now if last is None else max(now, last)
    return Schedule(
        name=name,
        kind=given.kind,
        cron=given.cron,
        timezone=given.timezone,
        payload=given.payload,
        max_attempts=given.max_attempts,
        timeout_s=given.timeout_s,
        priority=given.priority,
        catch_up=given.catch_up,
        enabled=given.enabled,
        last_occurrence_at=last,
        next_run_at=next_occurrence(given.cron, given.timezone, after) if given.enabled else None,
    )


async def create_schedule(
    store: Store, name: str, given: ScheduleIn, settings: Settings
) -> Schedule:
    """Create a schedule; ScheduleExists if one has that name (`check_schedule` first)."""
    check_schedule(given, settings)

    def change(current: Schedule | None, now: datetime) -> Schedule | None:
        if current is not None:
            raise ScheduleExists(name)
        return _made(name, given, now, None)

    [schedule, _] = await _change(store, name, change)
    assert schedule is not None
    return schedule


async def put_schedule(
    store: Store, name: str, given: ScheduleIn, settings: Settings
) -> tuple[Schedule, bool]:
    """Create or replace a schedule; return it and whether it is new. A replaced one keeps
    the occurrences it made: the new cron takes effect from the next one not yet made
    (`check_schedule` first)."""
    check_schedule(given, settings)

    def change(current: Schedule | None, now: datetime) -> Schedule | None:
        if current is None:
            return _made(name, given, now, None)
        if _same(current, given):
            return current  # a deploy script's repeat: nothing moves
        return replace(
            _made(name, given, now, current.last_occurrence_at),
            skipped_occurrences=current.skipped_occurrences,
            created_at=current.created_at,
        )

    schedule, before = await _change(store, name, change)
    assert schedule is not None
    return schedule, before is None


def _same(current: Schedule, given: ScheduleIn) -> bool:
    return all(getattr(current, field) == getattr(given, field) for field in _FIELDS_OF_IN)


async def patch_schedule(
    store: Store, name: str, changes: dict[str, Any], settings: Settings
) -> Schedule:
    """Change some fields of a schedule (`changes`: ScheduleIn's field names). A new cron or
    zone takes effect from the next occurrence not yet made; enabling one starts from its
    next occurrence after now (a disabled schedule made nothing, and catches nothing up).
    The schedule as changed passes `check_schedule` (a new type holds the payload it keeps
    to that type's rules)."""

    def change(current: Schedule | None, now: datetime) -> Schedule | None:
        if current is None:
            raise ScheduleNotFound(name)
        given = ScheduleIn(
            kind=current.kind,
            cron=current.cron,
            timezone=current.timezone,
            payload=current.payload,
            max_attempts=current.max_attempts,
            timeout_s=current.timeout_s,
            priority=current.priority,
            catch_up=current.catch_up,
            enabled=current.enabled,
        )
        given = check_schedule(replace(given, **changes), settings)
        moved = (given.cron, given.timezone, given.enabled) != (
            current.cron, current.timezone, current.enabled,
        )  # fmt: skip
        new = replace(
            current,
            **{field: getattr(given, field) for field in _FIELDS_OF_IN},
        )
        if not given.enabled:
            return replace(new, next_run_at=None)
        if moved:
            # Enabled again: from the next occurrence after now. Those made before it was
            # disabled and not started were cancelled then, and are made anew.
            last = current.last_occurrence_at if current.enabled else None
            made = _made(name, given, now, last)
            return replace(new, next_run_at=made.next_run_at)
        return new

    schedule, _ = await _change(store, name, change)
    assert schedule is not None
    return schedule


_FIELDS_OF_IN = (
    "kind", "cron", "timezone", "payload", "max_attempts", "timeout_s", "priority", "catch_up",
    "enabled",
)  # fmt: skip


async def delete_schedule(store: Store, name: str) -> None:
    """Delete a schedule, and cancel its occurrences that have not started; ScheduleNotFound
    if there is none. Its other tasks stay as they are."""

    def change(current: Schedule | None, now: datetime) -> Schedule | None:
        if current is None:
            raise ScheduleNotFound(name)
        return None

    await _change(store, name, change)


async def _change(
    store: Store, name: str, change: Callable[[Schedule | None, datetime], Schedule | None]
) -> tuple[Schedule | None, Schedule | None]:
    return await store.change_schedule(name, change)


async def get_schedule(store: Store, name: str) -> Schedule:
    schedule = await store.get_schedule(name)
    if schedule is None:
        raise ScheduleNotFound(name)
    return schedule


async def list_schedules(store: Store, *, limit: int, cursor: str | None) -> SchedulePage:
    """Schedules by name; `next_cursor` is None on the last page."""
    after = parse_name_cursor(cursor) if cursor else ""
    rows = await store.list_schedules(after=after, limit=limit + 1)
    items = rows[:limit]
    return SchedulePage(items=items, next_cursor=items[-1].name if len(rows) > limit else None)


# A page's cursor is the last name it showed: exactly what the schema can say (the name's
# pattern), which an opaque form could not (a cursor of the right shape that decodes to no
# name would be a schema-valid request refused).
def parse_name_cursor(value: object) -> str:
    """Return `value` if it is a cursor `list_schedules` made: a schedule's name."""
    try:
        return parse_name(value)
    except ValueError:
        raise ValueError(
            f"cursor {excerpt(value)} is not a cursor this API issued: send the"
            " `next_cursor` of the page before, as it came"
        ) from None
