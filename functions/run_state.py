"""What one run of a worker holds, shared by its three parts.

The runner (functions/runner.py: claim -> start -> record -> shut down), the completer
(functions/completer.py: the batched fenced writes) and the upkeep (functions/upkeep.py:
lease, rescue, reconcile, prune, activity) each hold the same `RunState`, made anew for each
run: what is held, what the run has done, and the events that wake or stop it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from functions.counters import Activity, bucket_of
from functions.kinds import KINDS
from functions.settings import Settings
from functions.store import Claimed, ClaimFrom, NextDue, Result, Store

# The worker's lines keep one logger name, whichever of its parts writes them (filters use it).
logger = logging.getLogger("functions.runner")


@dataclass
class TickSummary:
    """What one run did; JSON-serialisable with `as_dict`."""

    worker: str
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    rescued: int = 0
    released: int = 0
    # Finished tasks deleted, past TASKRUNNER_RETENTION_S.
    pruned: int = 0
    # Results not written because the worker no longer held the task (its lease ran out).
    lost: int = 0
    # Tasks this worker held that were cancelled: stopped, nothing recorded.
    cancelled: int = 0
    # Due tasks left because their kind could not finish before the deadline, by kind: of
    # the first 10,000 due of those kinds (Store.LEFT_READ); `left_for_time_more`: there
    # are more than those.
    left_for_time: dict[str, int] = field(default_factory=dict)
    left_for_time_more: bool = False
    seconds: float = 0.0
    # Database errors waited out (each retried), and the last one.
    errors: int = 0
    last_error: str | None = None

    def note_error(self, error: str) -> None:
        self.errors += 1
        self.last_error = error

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# A worker claims a tenth more of a kind with slots than it has free (Slots.caps).
PREFETCH_SHARE = 10


class Slots:
    """Per-kind slots (`bar`: TASKRUNNER_BAR_CONCURRENCY): how many of each kind run, and
    the tasks that wait for a slot of their kind."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.active: Counter[str] = Counter()
        self.queued: dict[str, deque[Claimed]] = {name: deque() for name in KINDS}

    def full(self, name: str) -> bool:
        limit = KINDS[name].concurrency(self.settings)
        return limit is not None and self.active[name] >= limit

    def caps(self, kinds: list[str], *, prefetch: bool) -> dict[str, int]:
        """How many of each kind with slots the next claim may take: its free slots, and
        with `prefetch` a tenth of its slots more (at least one), so that a freed slot
        starts its next task at once rather than after a claim. No more: a worker that
        claimed every due task of a kind would hold them, waiting for its own slots, while
        other workers sat idle (two workers, 1,000 `bar`: one ran them all, 100 at a time).
        Before a deadline, no prefetch: a task that waited for a slot could start too late
        to finish in time. A kind with nothing to take has a cap of 0."""
        caps = {}
        for name in kinds:
            limit = KINDS[name].concurrency(self.settings)
            if limit is not None:
                extra = max(1, limit // PREFETCH_SHARE) if prefetch else 0
                caps[name] = max(0, limit + extra - self.active[name] - len(self.queued[name]))
        return caps


# A claim in a backlog starts where the last one left each priority (queries._LEVELS_FROM);
# one reads every range from its start at least this often, so a task made due behind that
# point with no notification (a retry, a rescue, a client's clock behind the database's)
# waits at most this long past its turn.
FROM_START_EVERY_S = 1.0


class ClaimPoint:
    """Where the worker's next claim starts reading due tasks.

    From the start of each priority's range, unless the last claim took all it asked for (a
    backlog: more are due at once) of the same kinds, no task was created meanwhile (a
    notification; its due time may be behind the point), and a claim read from the start
    within FROM_START_EVERY_S. Tasks claimed stay in the due index until vacuum: reading from
    the start, each claim of a burst stepped over all of them (queries._LEVELS_FROM)."""

    def __init__(self) -> None:
        self._from: ClaimFrom | None = None
        self._kinds: tuple[list[str], list[str]] | None = None
        self._created = 0  # notifications of created tasks heard
        self._from_start_at = -FROM_START_EVERY_S

    def created(self) -> None:
        """Tasks were created: the next claim reads from the start."""
        self._created += 1
        self._from = None

    def begin(self, kinds: list[str], short_kinds: list[str]) -> tuple[ClaimFrom | None, int]:
        """Where the claim about to be sent for `kinds` starts, and a token for `end`."""
        start = self._from if self._kinds == (kinds, short_kinds) else None
        if start is None:
            self._from_start_at = time.monotonic()
        return start, self._created

    def end(
        self, token: int, kinds: list[str], short_kinds: list[str], full: bool, due: NextDue
    ) -> None:
        """The claim begun with `token` came back (`full`: with all it asked for)."""
        keep = (
            full
            and token == self._created
            and time.monotonic() - self._from_start_at < FROM_START_EVERY_S
        )
        self._from = due.claim_from if keep else None
        self._kinds = (kinds, short_kinds)

    def reset(self) -> None:
        """The claim failed: the next reads from the start."""
        self._from = None


class ClockCheck:
    """Whether this process's monotonic clock keeps time with the database's, which a task
    claimed ahead of its time is started by (runner.AHEAD_S): measured over the claims
    themselves. A claim's span on this clock, from its sending to its answer, holds its span on
    the database's, from its transaction's start to its reading after COMMIT; so from one
    claim (the reference) to a later one, this clock counts at least what the database's did,
    more only by the two claims' trips. A clock that counts more than that beyond `SLACK_S`
    and `RATE` runs fast (libfaketime's `x2`, a broken clock): no task is claimed ahead
    while it does, since it would start early. Checked over at least `SPAN_S`; the reference
    moves on every `RENEW_S`."""

    SPAN_S = 0.25
    RENEW_S = 60.0
    SLACK_S = 0.02
    RATE = 0.002

    def __init__(self) -> None:
        self.keeps_time = False
        self._reference: tuple[float, float] | None = None  # (sent, database's start)

    def claimed(self, sent: float, now_s: float, received: float, answered_s: float) -> None:
        """A claim sent at `sent` and answered at `received` (time.monotonic()), which the
        database began at `now_s` and read its clock at `answered_s` after (Unix seconds)."""
        if self._reference is None:
            self._reference = (sent, now_s)
            return
        ref_sent, ref_now_s = self._reference
        database_s = answered_s - ref_now_s
        if database_s < self.SPAN_S:
            return
        counted_s = received - ref_sent
        self.keeps_time = counted_s <= database_s * (1 + self.RATE) + self.SLACK_S
        if database_s >= self.RENEW_S:
            self._reference = (sent, now_s)


class Wakeup:
    """What wakes the claim loop from its sleep: a task created due sooner than it means to
    sleep (`notify`), a write that is news to it (`wrote`), a rescue or a retry (`set`)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        # The database time up to which the loop means to sleep (Unix seconds).
        self.sleep_until = 0.0
        self.sleeping = False
        # Whether a write of results is news to the loop (`wrote`): set by the loop as it
        # goes to sleep.
        self.wake_on_write = True

    def set(self) -> None:
        self._event.set()

    def wrote(self) -> None:
        """Results were written: wake the loop if that is news to it. Each write woke it,
        and it claimed again and found nothing, a transaction each (a claim renews the
        worker's lease): 1,000 tasks due over 4.5 s took 1,450 claims, 620 of them empty;
        1,000-1,050, 190-215 empty, since."""
        if self.wake_on_write:
            self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def notify(self, due_s: float | None = None) -> None:
        """A task due at `due_s` (None: unknown) was created.

        While asleep, only a task due before it would wake anyway is news. While awake (a
        claim in flight, whose snapshot may predate this task), every one is: the claim
        loop looks again before it sleeps, or the task waits for the next poll.
        """
        if due_s is None or not self.sleeping or due_s < self.sleep_until:
            self._event.set()

    async def sleep(self, wait_s: float, *until: asyncio.Event) -> None:
        """Sleep `wait_s`, or until woken or one of `until` is set."""
        if wait_s <= 0:
            return
        waiters = [asyncio.create_task(e.wait()) for e in (self._event, *until)]
        self.sleeping = True
        try:
            await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.sleeping = False
            for waiter in waiters:
                waiter.cancel()


@dataclass
class RunState:
    """One run's shared state. Everything claimed and not yet recorded or handed back is in
    `held`, covered by the worker's lease until it is."""

    store: Store
    settings: Settings
    worker_id: str
    # Makes the claim loop look again: a notification, freed room, a rescue.
    wake: Wakeup
    summary: TickSummary
    held: dict[int, Claimed] = field(default_factory=dict)
    # Claims and reconciles take turns: a reconcile must not read holdings mid-claim.
    claim_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set when the last claim failed with its connection: it may have committed.
    unsure_of_holdings: bool = False
    # Set when a cancel of some of this worker's tasks was heard: stop them at once. The
    # tasks it named (id, attempt), each with when it was heard (time.monotonic(): one not
    # held yet may be of a claim whose answer is still on its way, which looks for it), and
    # whether one named none (then the database is asked).
    cancel_heard: asyncio.Event = field(default_factory=asyncio.Event)
    cancels_named: dict[tuple[int, int], float] = field(default_factory=dict)
    cancels_unnamed: bool = False
    # Why this run stops early: a failure (the process must exit non-zero), or a lost
    # lease (the caller starts again as a new worker).
    halt: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str | None = None
    lease_lost: bool = False
    # Counts for /stats and /metrics by 10-second bucket of the database's time and task
    # type, not yet written; the database's clock less this process's (from each claim's
    # answer).
    activity: dict[tuple[int, str], Activity] = field(default_factory=dict)
    db_offset_s: float = 0.0
    # The kinds this run records as served (`kinds_served`): those whose every run fits its
    # deadline when it starts. A tick that can never fit a kind leaves it unserved, and its
    # due tasks show as such, rather than waiting unseen.
    served_kinds: list[str] = field(default_factory=lambda: list(KINDS))

    def held_attempt(self, run: Claimed | Result) -> Claimed | None:
        """What this worker holds of `run`'s task, if that is still the same attempt (a
        task cancelled, retried and claimed again by the same worker is held anew, under
        the same id: what the earlier attempt's run does is not the new one's)."""
        held = self.held.get(run.id)
        return held if held is not None and held.attempt == run.attempt else None

    def heard_cancel(self, tasks: list[tuple[int, int]] | None) -> None:
        """Some of this worker's tasks were cancelled: `tasks` (id, attempt), or None when
        the notification did not say which."""
        if tasks is None:
            self.cancels_unnamed = True
        else:
            heard_s = time.monotonic()
            self.cancels_named.update((task, heard_s) for task in tasks)
        self.cancel_heard.set()

    def fail(self, reason: str) -> None:
        """Stop the run for a failure: the process exits non-zero once it has shut down."""
        if self.failure is None:
            self.failure = reason
            logger.error(
                "action=stop worker=%s: %s; stopped claiming, handing back what it holds",
                self.worker_id, reason,
            )  # fmt: skip
        self.halt.set()

    async def guard(self, loop: Any, name: str) -> None:
        """Run a background loop; if it breaks, say so and stop the run (never die silently)."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("action=%s worker=%s: unexpected error", name, self.worker_id)
            self.fail(f"the {name} loop failed: {type(exc).__name__}: {exc}")

    def count_started(self, claimed: list[Claimed]) -> None:
        """Count first attempts' lateness (a claim with nothing writes no activity)."""
        if claimed:
            by_kind = self.activity_by_kind()
            for task in claimed:
                if task.lateness_ms is not None:
                    by_kind(task.kind).start(task.lateness_ms)

    def activity_now(self, kind: str) -> Activity:
        """The activity counts of `kind` in the current bucket (of the database's time)."""
        return self.activity_by_kind()(kind)

    def activity_by_kind(self) -> Callable[[str], Activity]:
        """The activity counts of the current bucket, by kind: for counting a batch (the
        bucket is read once)."""
        bucket = bucket_of(time.time() + self.db_offset_s)
        activity = self.activity

        def of(kind: str) -> Activity:
            counts = activity.get((bucket, kind))
            if counts is None:
                counts = activity[bucket, kind] = Activity()
            return counts

        return of
