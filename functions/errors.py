"""The project's exceptions. HTTP status codes are mapped from these in
`responses.status_of`, nowhere else."""


class TaskrunnerError(Exception):
    """Base class of every error taskrunner raises on purpose."""


class TaskNotFound(TaskrunnerError):
    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} does not exist")
        self.task_id = task_id


class TaskRunning(TaskrunnerError):
    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} is running and cannot be deleted until it finishes")
        self.task_id = task_id


class WrongState(TaskrunnerError):
    """An action on a task in a state that does not allow it (run a finished task, say)."""

    def __init__(self, task_id: int, state: str, action: str, allowed: str) -> None:
        super().__init__(
            f"task {task_id} is in state {state}: only a {allowed} task can be {action}"
        )
        self.task_id = task_id
        self.state = state


class OccurrenceHeld(TaskrunnerError):
    """A retry of a schedule's occurrence that another task holds now: its schedule, enabled
    again after this one was cancelled, made the occurrence anew."""

    def __init__(self, task_id: int, held_by: int) -> None:
        super().__init__(
            f"task {task_id} cannot be retried: its schedule's occurrence is task {held_by}'s"
            " now (the schedule made it again after this one was cancelled)"
        )
        self.task_id = task_id
        self.held_by = held_by


class ScheduleNotFound(TaskrunnerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"schedule {name!r} does not exist")
        self.name = name


class ScheduleExists(TaskrunnerError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"schedule {name!r} exists already: PUT /schedules/{name} replaces it, PATCH"
            " changes some of its fields"
        )
        self.name = name


class IdempotencyKeyReused(TaskrunnerError):
    """An idempotency key sent again with a different type or execute_at."""


class Forbidden(TaskrunnerError):
    """A call this deployment's settings do not allow."""


class InvalidInput(TaskrunnerError):
    """Input that passed the schema but not the domain (a bad cursor, say)."""


class InvalidValue(TaskrunnerError):
    """A value the schema lets through and a rule that takes a setting refuses: a 422 whose
    issue names where it was sent (`loc`), as the schema's own 422s do."""

    issue_type = "value_invalid"

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(msg)
        self.issues = [{"loc": list(loc), "msg": msg, "type": self.issue_type}]


class InvalidPayload(InvalidValue):
    """A payload the API does not take (too large, or not storable as jsonb)."""

    issue_type = "payload_invalid"


class InvalidTimeout(InvalidValue):
    """A task's `timeout_s` over its kind's own limit."""

    issue_type = "timeout_too_long"


class EnqueueRefused(TaskrunnerError, ValueError):
    """A task `functions.enqueue` does not write, for what the API answers 422 for (an
    unknown type, a bad time, a payload or an option it does not take): nothing was sent to
    the database, so the caller's transaction goes on. `argument` names the argument."""

    def __init__(self, argument: str, msg: str) -> None:
        super().__init__(msg)
        self.argument = argument


class NotJson(TaskrunnerError):
    """A request body sent with a content-type other than JSON."""


class Unauthorized(TaskrunnerError):
    """The API token is set and the request did not carry it."""


class DatabaseUnavailable(TaskrunnerError):
    """PostgreSQL could not be reached or dropped the connection."""


class DatabaseError(TaskrunnerError):
    """PostgreSQL refused a statement for a reason of its own (not an outage): a value it
    cannot store, a constraint. For a worker's writes, a reason to write result by result."""


class SchemaOutdated(TaskrunnerError):
    """The database has no taskrunner schema, or an older one."""

    def __init__(self, found: str | None = None, needed: str | None = None) -> None:
        has = "" if needed is None else f" (it has {found or 'none'}, this version needs {needed})"
        super().__init__(f"the database schema is not up to date{has}: run `taskrunner migrate`")


class WorkerFailed(TaskrunnerError):
    """A worker stopped because it cannot go on (its stdout is closed, a loop of its broke)."""
