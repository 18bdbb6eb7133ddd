"""What the API reads and writes: request and response bodies, and their parameters.

Shared by the routes (`app`) and the original challenge's routes (`challenge`). Each type's
JSON Schema says what the server accepts, so the OpenAPI document is the contract.
"""

from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ModelWrapValidatorHandler,
    PlainValidator,
    PrivateAttr,
    StrictBool,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from typing_extensions import TypeAliasType

from functions import model, parsing, schedules
from functions.http.responses import shown
from functions.http.rules import batch_items, read_keyed_batch, read_task
from functions.kinds import KINDS
from functions.model import (
    MAX_BATCH,
    Attempt,
    CatchUp,
    ErrorGroup,
    NewTask,
    Outcome,
    Schedule,
    Task,
    TaskState,
)
from functions.parsing import ITEM_KEYS
from functions.settings import Settings


def kind_schema() -> dict[str, Any]:
    """The JSON Schema of a kind's name: the kinds loaded when the document is made (each
    process loads them before it builds its app)."""
    return {
        "type": "string",
        "pattern": parsing.kind_pattern(),
        "description": f"The task kind: {', '.join(sorted(KINDS))}, in any case;"
        " returned lowercase.",
        "examples": sorted(KINDS),
    }


class _KindJsonSchema:
    """`WithJsonSchema`, read when a document is made rather than when this module is
    imported (before the kind modules are loaded)."""

    def __get_pydantic_json_schema__(
        self, core_schema: Any, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        return kind_schema()


# Each pattern below is the schema's, for clients and schemathesis; the server checks by a
# function whose error says in words what is wrong and what is accepted (a pydantic pattern's
# error would quote the pattern, hundreds of characters of it).
KindName = Annotated[str, PlainValidator(parsing.parse_kind), _KindJsonSchema()]
# A list's, a bulk cancel's or retry's `type`: any kind's name, loaded or not (a kind
# removed from the deployment still has its tasks).
KIND_FILTER_PATTERN = "^[ \\t\\n\\r]*[A-Za-z][A-Za-z0-9_]{0,62}[ \\t\\n\\r]*$"
KindFilter = Annotated[
    str,
    PlainValidator(parsing.parse_kind_filter),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": KIND_FILTER_PATTERN,
            "description": "A kind's name, in any case: a loaded kind or one whose tasks"
            " remain after it was removed.",
            "examples": ["foo"],
        }
    ),
]
Cursor = Annotated[
    str,
    PlainValidator(parsing.parse_cursor),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": parsing.CURSOR_PATTERN,
            "description": "`next_cursor` of the previous page",
        }
    ),
]
ExecuteAt = Annotated[
    datetime,
    PlainValidator(parsing.parse_execute_at),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "string",
                    "format": "date-time",
                    "pattern": parsing.DATE_TIME_PATTERN,
                    "description": "RFC 3339 (ISO 8601) with a UTC offset, from"
                    " 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z; on those two"
                    " days an offset that could leave the range is refused (give UTC).",
                },
                {
                    "type": "number",
                    "minimum": 0,
                    "exclusiveMaximum": model.END_UNIX_S,
                    "description": "Unix seconds, to the microsecond: 1970 to the end of 9999.",
                },
            ],
            "description": "When to run the task: a date-time with a UTC offset, or Unix"
            " seconds. A date-time without an offset is refused rather than guessed at.",
            "examples": ["2030-01-01T12:00:00Z", 1893499200],
        }
    ),
]


# --- a listing's filters and order (GET /tasks, and the bulk cancel and retry) ------------


def _time_bound(name: str) -> PlainValidator:
    return PlainValidator(lambda value: parsing.parse_time_bound(value, name))


# The query parameters bounding a listing by a time (`created_after`, ...), each read as
# `execute_at` is (a date-time with an offset, or Unix seconds), its errors in its own name.
_TIME_BOUND = WithJsonSchema(
    {
        "anyOf": ExecuteAt.__metadata__[1].json_schema["anyOf"],  # type: ignore[attr-defined]
        "examples": ["2030-01-01T12:00:00Z"],
    }
)
CreatedAfter = Annotated[datetime, _time_bound("created_after"), _TIME_BOUND]
CreatedBefore = Annotated[datetime, _time_bound("created_before"), _TIME_BOUND]
ExecuteAfter = Annotated[datetime, _time_bound("execute_after"), _TIME_BOUND]
ExecuteBefore = Annotated[datetime, _time_bound("execute_before"), _TIME_BOUND]
FinishedAfter = Annotated[datetime, _time_bound("finished_after"), _TIME_BOUND]
FinishedBefore = Annotated[datetime, _time_bound("finished_before"), _TIME_BOUND]
ErrorsSince = Annotated[datetime, _time_bound("since"), _TIME_BOUND]
ErrorsUntil = Annotated[datetime, _time_bound("until"), _TIME_BOUND]


# (Read as its text, a type FastAPI takes in a query; `parsing.parse_sort` makes the order.)
Sort = Annotated[
    str,
    PlainValidator(lambda value: parsing.parse_sort(value).name),
    WithJsonSchema(
        {
            "type": "string",
            "enum": list(model.SORTS),
            "description": "The order: by id, `execute_at` or `finished_at` (finished tasks"
            " alone), then by id; a leading `-` for descending. Default `-id`: newest first.",
            "examples": ["-id", "execute_at"],
        }
    ),
]
ErrorSearch = Annotated[
    str,
    PlainValidator(parsing.parse_error_search),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": model.MAX_ERROR_SEARCH,
            "pattern": "^[^\\x00]*[^ \\t\\n\\r\\f\\v\\x00][^\\x00]*$",
            "description": "Tasks whose last error holds this text, in any case (those that"
            " failed, or failed an attempt and wait to retry); without U+0000.",
            "examples": ["timeout"],
        }
    ),
]
PayloadFilter = Annotated[
    str,
    PlainValidator(parsing.parse_payload_filter),
    WithJsonSchema(
        {
            "type": "string",
            "description": "Tasks whose payload contains this JSON (PostgreSQL's jsonb"
            ' `@>`: `{"to":"x@y"}` matches any object with that key and value); `null`:'
            f" tasks with no payload. At most {model.MAX_PAYLOAD_FILTER_BYTES:,} bytes.",
            "examples": ['{"to":"x@y"}'],
        }
    ),
]


PAYLOAD_DESCRIPTION = (
    "Any JSON value, given to the task's kind as `ctx.payload`; null when absent. At most"
    " TASKRUNNER_MAX_PAYLOAD_BYTES (65,536 by default) as compact JSON in UTF-8, nested at"
    f" most {model.MAX_PAYLOAD_DEPTH} deep, with no NaN or Infinity and no character U+0000"
    " (PostgreSQL's jsonb cannot store it): 422 otherwise."
)
# Text without U+0000 (jsonb cannot store it), in a string or an object's key.
_NO_NUL = "^[^\\x00]*$"
_Text = Annotated[str, Field(pattern=_NO_NUL)]


class _KeysWithoutNul:
    """An object's keys, in the schema: `propertyNames` holds every key to the pattern, where
    the `patternProperties` pydantic writes would let other keys through."""

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        value = schema.pop("patternProperties")[_NO_NUL]
        schema.update(propertyNames={"pattern": _NO_NUL}, additionalProperties=value)
        return schema


# Any JSON value but U+0000: what the schema says a payload is. The rest of its rules (its
# size, which is a setting; NaN; nesting) are `parsing.payload_json`'s, checked by the domain
# on every path, and in the description.
PayloadValue = TypeAliasType(
    "PayloadValue",
    "bool | int | float | _Text | list[PayloadValue]"
    " | Annotated[dict[_Text, PayloadValue], _KeysWithoutNul] | None",
)
_PAYLOAD_VALUE = TypeAdapter(PayloadValue)


class _DocumentedAsPayloadValue:
    """Read as any value (the domain checks it, on every path, in its own words: pydantic's
    for a union would list six issues for one U+0000), documented as PayloadValue."""

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(_PAYLOAD_VALUE.core_schema)


Payload = Annotated[
    Any,
    _DocumentedAsPayloadValue,
    Field(description=PAYLOAD_DESCRIPTION, examples=[{"to": "ada@example.com"}]),
]


MaxAttempts = Annotated[
    int,
    PlainValidator(parsing.parse_max_attempts),
    WithJsonSchema(
        {
            "type": "integer",
            "minimum": 1,
            "maximum": model.MAX_ATTEMPTS_AT_CREATE,
            "description": "How many runs the task may start (a failed run is retried while"
            " runs are left); default TASKRUNNER_MAX_ATTEMPTS. A retry"
            " (`POST /tasks/{task_id}/retry`) gives it TASKRUNNER_MAX_ATTEMPTS more runs from"
            " where it is: `attempts` plus that.",
        }
    ),
]
# A task's options at create: null is the default, as absent, for each of the three.
MaxAttemptsOrDefault = Annotated[
    int | None,
    PlainValidator(parsing.parse_max_attempts_or_default),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": model.MAX_ATTEMPTS_AT_CREATE},
                {"type": "null"},
            ],
            "description": "How many runs the task may start (a failed run is retried while"
            " runs are left); null or absent: TASKRUNNER_MAX_ATTEMPTS. Written without a"
            " fraction: `3.0` is refused. A retry (`POST /tasks/{task_id}/retry`) gives it"
            " TASKRUNNER_MAX_ATTEMPTS more runs from where it is: `attempts` plus that.",
        }
    ),
]
PriorityOrDefault = Annotated[
    int,
    PlainValidator(parsing.parse_priority_or_default),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": model.MIN_PRIORITY, "maximum": model.MAX_PRIORITY},
                {"type": "null"},
            ],
            "description": "Among tasks that are due, a lower number runs first (0 first; then"
            " by due time); null or absent: 0.",
        }
    ),
]
TimeoutS = Annotated[
    float | None,
    PlainValidator(parsing.parse_timeout_s),
    WithJsonSchema(
        {
            "anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}],
            "description": "Seconds a run may take before it is stopped and fails its attempt;"
            " at most the kind's own timeout (422 above it), which is what null or absent"
            " means. A plain-function kind runs inline and cannot be stopped: its timeout"
            " only tells a tick near its deadline whether the task fits.",
        }
    ),
]
Priority = Annotated[
    int,
    PlainValidator(parsing.parse_priority),
    WithJsonSchema(
        {
            "type": "integer",
            "minimum": model.MIN_PRIORITY,
            "maximum": model.MAX_PRIORITY,
            "description": "Among tasks that are due, a lower number runs first (0, the"
            " default, first; then by due time).",
        }
    ),
]


def _payload_rules(schema: dict[str, Any], partial: bool) -> None:
    """Add to a task's schema the payload rules of each kind that declares them (`http`):
    `if` its type is that kind (in any case, as `parsing.parse_kind` reads it), `then` a
    payload of that schema is required. `partial` (a PATCH, which may leave the payload as
    it is): a payload sent beside such a type is of that schema. Read when a document is
    made (kinds are loaded before)."""
    sent = ["type", "payload"] if partial else ["type"]
    rules = [
        {
            "if": {
                "required": sent,
                "properties": {"type": {"pattern": parsing.any_case([name], "[ \\t\\n\\r]*")}},
            },
            "then": {
                **({} if partial else {"required": ["payload"]}),
                "properties": {"payload": declared.payload_schema},
            },
        }
        for name, declared in sorted(KINDS.items())
        if declared.payload_schema is not None
    ]
    if rules:
        schema["allOf"] = [*schema.get("allOf", ()), *rules]


def _kind_payloads(schema: dict[str, Any]) -> None:
    _payload_rules(schema, partial=False)


def with_timeout_limits(document: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """`document` (the OpenAPI document) with each kind's ceiling on `timeout_s` stated in
    the schemas of a task's body: JSON Schema's `if`/`then`, a `type` naming the kind bounds
    `timeout_s` by the kind's own (`Kind.max_seconds`, a setting's), the rule
    `tasks.check_timeout` applies."""
    limits = [
        {
            "if": {
                "properties": {"type": {"pattern": parsing.any_case([name], "[ \\t\\n\\r]*")}},
                "required": ["type"],
            },
            "then": {
                "properties": {
                    "timeout_s": {
                        "anyOf": [
                            {
                                "type": "number",
                                "exclusiveMinimum": 0,
                                "maximum": kind.max_seconds(settings),
                            },
                            {"type": "null"},
                        ]
                    }
                }
            },
        }
        for name, kind in sorted(KINDS.items())
    ]
    for name in ("TaskIn", "BatchItemIn", "ScheduleIn", "SchedulePutIn", "SchedulePatchIn"):
        schema = document.get("components", {}).get("schemas", {}).get(name)
        if schema is not None:
            schema["allOf"] = [*schema.get("allOf", ()), *limits]
    return document


class TaskIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_kind_payloads)

    type: KindName
    execute_at: ExecuteAt
    payload: Payload = None
    # Null or absent: the default, for each option alike.
    max_attempts: MaxAttemptsOrDefault = None
    timeout_s: TimeoutS = None
    priority: PriorityOrDefault = 0

    @model_validator(mode="wrap")
    @classmethod
    def _by_the_rules(cls, sent: Any, by_the_schema: ModelWrapValidatorHandler[Self]) -> Self:
        """A task the fast path would read is read here as it reads it (`rules.read_task`):
        the two paths agree on every task either accepts. The fields' validators read the
        rest: keyed batch items, and every refused body, to say why."""
        # An object with a key `read_task` refuses (a keyed batch item) is not tried: 10,000
        # tries added 7-15 ms to the validation of a keyed batch.
        if sent.__class__ is dict and len(sent) != 2 and not ITEM_KEYS.issuperset(sent):
            return by_the_schema(sent)
        new = read_task(sent)
        if new is None:
            return by_the_schema(sent)
        return cls.model_construct(
            type=new.kind,
            execute_at=new.execute_at,
            payload=new.payload,
            max_attempts=new.max_attempts,
            timeout_s=new.timeout_s,
            priority=new.priority,
        )

    def to_new(self, idempotency_key: str | None = None) -> NewTask:
        return NewTask(
            kind=self.type,
            execute_at=self.execute_at,
            idempotency_key=idempotency_key,
            payload=self.payload,
            max_attempts=self.max_attempts,
            timeout_s=self.timeout_s,
            priority=self.priority,
        )


IdempotencyKey = Annotated[
    str,
    PlainValidator(parsing.parse_idempotency_key),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": model.IDEMPOTENCY_KEY_PATTERN,
            "description": "1 to 255 printable ASCII characters, no spaces or commas: a repeat of a"
            " request with the same key and the same type, execute_at, payload and options"
            " (max_attempts, timeout_s, priority) gets the task the first one created, and"
            " creates nothing.",
            "examples": ["order-1842-reminder"],
        }
    ),
]


class BatchItemIn(TaskIn):
    idempotency_key: IdempotencyKey | None = None

    def to_new(self, idempotency_key: str | None = None) -> NewTask:
        return super().to_new(idempotency_key or self.idempotency_key)


# What `rules.batch_items` reads on the fast path. (No docstring: it would be the schema's
# description.)
class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[BatchItemIn] = Field(min_length=1, max_length=MAX_BATCH)
    # The tasks, when the batch was read whole by the rules (`rules.read_keyed_batch`).
    _read: list[NewTask] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _by_the_rules(cls, sent: Any, by_the_schema: ModelWrapValidatorHandler[Self]) -> Self:
        """A batch is read whole by the rules a task is read by, once, rather than each item
        by TaskIn's validator: 10,000 keyed items in 307 ms rather than 444 (on a loaded
        machine). The schema reads only a batch the rules refuse, to say why."""
        items = batch_items(sent)
        read = None if items is None else read_keyed_batch(items)
        if read is None:
            return by_the_schema(sent)
        batch = cls.model_construct(tasks=[])
        batch._read = read
        return batch

    def to_new(self) -> list[NewTask]:
        return self._read if self._read is not None else [item.to_new() for item in self.tasks]


class RescheduleIn(BaseModel):
    """A new `execute_at`, a new `payload`, or both: what is absent stays as it was, and a
    `payload` of null clears it."""

    # At least one of the two, as the schema says (minProperties) and `_something` checks.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    # Not `| None`: a null time is refused, as the schema says; absent, the time stays.
    execute_at: ExecuteAt = Field(default=None)  # type: ignore[assignment]
    payload: Payload = None

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not self.model_fields_set:
            raise ValueError(
                "nothing to change: send `execute_at` (a new time), `payload` (a new payload,"
                " or null to clear it), or both"
            )
        return self


class TaskOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    type: str = Field(validation_alias="kind")
    state: TaskState
    execute_at: datetime
    next_attempt_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    output: str | None
    error: str | None
    idempotency_key: str | None
    schedule: str | None = Field(description="The schedule that made this task; null for others.")
    scheduled_for: datetime | None = Field(
        description="The occurrence of its schedule this task is (UTC); null for others."
    )
    priority: int = Field(description="0 to 9: among due tasks, a lower number runs first")
    worker: str | None = Field(
        description="While it runs: the worker that holds it (as GET /workers names it)."
    )
    running_since: datetime | None = Field(
        description="While it runs: when this attempt was claimed (UTC); `started_at` is the "
        "first attempt's."
    )
    lease_expires_at: datetime | None = Field(
        description="While it runs: until when its worker's lease covers it (UTC), renewed "
        "every third of TASKRUNNER_LEASE_SECONDS; past it, the task is rescued."
    )
    timeout_s: float | None = Field(
        description="Seconds a run may take before it is stopped; null: the kind's own"
    )
    payload: Payload

    @classmethod
    def of(cls, task: Task) -> "TaskOut":
        return cls.model_validate(task)


class PageOut(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


class IdsOut(BaseModel):
    ids: list[int]


# --- schedules -------------------------------------------------------------------------------

ScheduleName = Annotated[
    str,
    PlainValidator(schedules.parse_name),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": model.SCHEDULE_NAME_PATTERN,
            "description": "The schedule's key: 1 to 128 characters of a-z, 0-9, `_`, `.` and"
            " `-`, starting with a letter or digit.",
            "examples": ["nightly-report"],
        }
    ),
]
Cron = Annotated[
    str,
    PlainValidator(schedules.parse_cron),
    WithJsonSchema(
        {
            "type": "string",
            "description": "Standard five-field cron (minute, hour, day of month, month, day of"
            " week; `*`, `,`, `-`, `/`, names of months and days; `L` and `LW`, the month's last"
            " day and weekday; `5L` and `5#2`, its last and second Friday), or @hourly, @daily,"
            " @weekly, @monthly, @yearly; read in `timezone`.",
            "examples": ["30 2 * * *", "*/5 * * * *", "@daily"],
        }
    ),
]
TimeZone = Annotated[
    str,
    PlainValidator(schedules.parse_timezone),
    WithJsonSchema(
        {
            "type": "string",
            "description": "An IANA time zone the cron is read in, in any case (kept as IANA"
            " spells it); not `localtime` or `posixrules`, which depend on the host. Daylight"
            " saving time as Debian's cron rules it: with neither the minute nor the hour field"
            " starting with `*`, a local time the clocks skip runs at the first instant after the"
            " gap and one they pass twice runs once, at the first; otherwise the cron follows the"
            " local clock as it reads (no run in a skipped hour, runs in both of a repeated one).",
            "examples": ["UTC", "Europe/Paris"],
        }
    ),
]
ScheduleCursor = Annotated[
    str,
    PlainValidator(schedules.parse_name_cursor),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": model.SCHEDULE_NAME_PATTERN,
            "description": "`next_cursor` of the previous page",
        }
    ),
]
_CATCH_UP = (
    "After everything was stopped across occurrences: `latest` makes one task, for the most"
    " recent missed; `all` one per missed occurrence (the most recent 1,000); `none` only"
    " those still to come."
)


class _ScheduleFields(BaseModel):
    # The payload rules of a kind that declares them, as for a task (its tasks are made so).
    model_config = ConfigDict(extra="forbid", json_schema_extra=_kind_payloads)

    type: KindName
    cron: Cron
    timezone: TimeZone = "UTC"
    payload: Payload = None
    # Each task's options, read as a task's are (null: the defaults).
    max_attempts: MaxAttempts | None = None
    timeout_s: TimeoutS = None
    priority: Priority | None = None
    catch_up: CatchUp = Field(CatchUp.LATEST, description=_CATCH_UP)
    # Strict: `0` or `"yes"` is refused, not read as false or true.
    enabled: StrictBool = True

    def to_domain(self) -> schedules.ScheduleIn:
        return schedules.ScheduleIn(
            kind=self.type,
            cron=self.cron,
            timezone=self.timezone,
            payload=self.payload,
            max_attempts=self.max_attempts,
            timeout_s=self.timeout_s,
            priority=self.priority,
            catch_up=self.catch_up,
            enabled=self.enabled,
        )


class ScheduleIn(_ScheduleFields):
    """A new schedule: each occurrence of `cron` in `timezone` becomes one task of `type`."""

    name: ScheduleName


class SchedulePutIn(_ScheduleFields):
    """A schedule as it should be: created, or replaced whole (what is absent takes its
    default). `name`, if sent, is the path's."""

    name: ScheduleName | None = None


def _patch_schema(schema: dict[str, Any]) -> None:
    """Something to change; a payload sent beside a type is of that kind's schema."""
    schema["minProperties"] = 1
    _payload_rules(schema, partial=True)


class SchedulePatchIn(BaseModel):
    """Some fields of a schedule; what is absent stays. A new cron or zone takes effect from
    the next occurrence not yet made; `enabled: false` makes nothing more, and cancels the
    occurrences made that have not started."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_patch_schema)

    type: KindName = Field(default=None)  # type: ignore[assignment]
    cron: Cron = Field(default=None)  # type: ignore[assignment]
    timezone: TimeZone = Field(default=None)  # type: ignore[assignment]
    payload: Payload = None
    max_attempts: MaxAttempts | None = None
    timeout_s: TimeoutS | None = None
    priority: Priority | None = None
    catch_up: CatchUp = Field(default=None)  # type: ignore[assignment]
    enabled: StrictBool = Field(default=None)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("nothing to change: send at least one of the schedule's fields")
        for name in ("type", "cron", "timezone", "catch_up", "enabled"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields sent, by their names in `schedules.ScheduleIn`."""
        return {
            ("kind" if name == "type" else name): getattr(self, name)
            for name in self.model_fields_set
        }


class LastTaskOut(BaseModel):
    id: int
    state: TaskState


class ScheduleOut(BaseModel):
    name: str
    type: str
    cron: str
    timezone: str
    payload: Payload
    max_attempts: int | None
    timeout_s: float | None
    priority: int | None
    catch_up: CatchUp
    enabled: bool
    next_run_at: datetime | None = Field(
        description="Its next occurrence not yet made into a task, in UTC; null while disabled."
    )
    last_occurrence_at: datetime | None = Field(
        description="The last occurrence made into a task, in UTC."
    )
    skipped_occurrences: int = Field(
        description="Occurrences missed while everything was stopped that `catch_up` left out."
    )
    created_at: datetime
    updated_at: datetime
    last_task: LastTaskOut | None = Field(
        description="The task of the last occurrence made, and its state; null when none is"
        " (or it was deleted)."
    )


def schedule_fields(schedule: Schedule) -> dict[str, Any]:
    """A schedule as ScheduleOut shows it."""
    return {
        "name": schedule.name,
        "type": schedule.kind,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "payload": shown(schedule.kind, schedule.payload),
        "max_attempts": schedule.max_attempts,
        "timeout_s": schedule.timeout_s,
        "priority": schedule.priority,
        "catch_up": schedule.catch_up.value,
        "enabled": schedule.enabled,
        "next_run_at": schedule.next_run_at,
        "last_occurrence_at": schedule.last_occurrence_at,
        "skipped_occurrences": schedule.skipped_occurrences,
        "created_at": schedule.created_at,
        "updated_at": schedule.updated_at,
        "last_task": None
        if schedule.last_task_id is None or schedule.last_task_state is None
        else {"id": schedule.last_task_id, "state": schedule.last_task_state.value},
    }


class SchedulePageOut(BaseModel):
    items: list[ScheduleOut]
    next_cursor: str | None


class AttemptOut(BaseModel):
    attempt: int = Field(description="1 for the first, and so on.")
    started_at: datetime | None = Field(description="When its worker claimed it.")
    finished_at: datetime | None = Field(
        description="When it ended; null while it runs (and for the last attempt of a task"
        " from before attempts were kept that waits for a retry)."
    )
    worker: str | None = Field(
        description="The worker that ran it (as GET /workers names it); null for a first"
        " attempt that succeeded (the task keeps no worker once finished)."
    )
    outcome: Outcome | None = Field(description="How it ended; null while it runs.")
    error: str | None
    traceback: str | None = Field(
        description="The kind's exception as Python prints it, at most its last 8 KiB."
    )


class AttemptPageOut(BaseModel):
    items: list[AttemptOut]
    next_cursor: str | None


def attempt_fields(attempt: Attempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
        "worker": attempt.worker,
        "outcome": attempt.outcome,
        "error": attempt.error,
        "traceback": attempt.traceback,
    }


class ErrorGroupOut(BaseModel):
    type: str
    error: str = Field(description="The error, its numbers and ids folded (docs/api.md).")
    search: str = Field(
        description="Text of the error that GET /tasks?error= finds its tasks with (those"
        " whose last error it is)."
    )
    count: int
    first_seen: datetime
    last_seen: datetime
    sample_task: int = Field(description="The id of one of its tasks (the highest).")


class ErrorsOut(BaseModel):
    since: datetime
    items: list[ErrorGroupOut]


def error_group_fields(group: ErrorGroup) -> dict[str, Any]:
    return {
        "type": group.kind,
        "error": group.error,
        "search": group.search,
        "count": group.count,
        "first_seen": group.first_seen,
        "last_seen": group.last_seen,
        "sample_task": group.sample_task,
    }


class CountOut(BaseModel):
    count: int = Field(
        description="How many tasks were acted on; with `dry_run`, how many would be now."
    )
    more: bool | None = Field(
        None,
        description="With `dry_run` only: whether more than `limit` tasks match now (a"
        " run acts on the first `limit`, lowest ids first; a repeat on the rest).",
    )


class ErrorOut(BaseModel):
    """Every error but 422: what is wrong, in words."""

    detail: str


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, path or header, then names")
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    """422: the request did not match the schema; at most 20 issues, none echoing more
    than a short excerpt of what was sent."""

    detail: list[ValidationIssue]


# What each error status means, for the OpenAPI document.
_WHY = {
    400: "The body cannot be read as JSON (not UTF-8, nested too deep, a number too long),"
    " or a header is malformed.",
    401: "Missing or wrong `Authorization: Bearer <token>`.",
    403: "Not allowed by this deployment's settings.",
    404: "No such task (or schedule).",
    408: "The body did not arrive in time.",
    409: "The task's state does not allow this, the idempotency key was used for another"
    " request, or a schedule of that name exists.",
    413: "The body is over TASKRUNNER_MAX_BODY_BYTES.",
    415: "The body is not sent as JSON.",
    422: "The request does not match the schema.",
    503: "The database is unavailable; try again (see Retry-After).",
}


def errors(*codes: int) -> dict[int | str, dict[str, object]]:
    """The `responses` a route declares for these error statuses."""
    return {
        code: {
            "model": ValidationErrorOut if code == 422 else ErrorOut,
            "description": _WHY[code],
        }
        for code in codes
    }


def links(pointer: str) -> dict[str, Any]:
    """OpenAPI links from a response holding a task's id at `pointer` (`id`, `ids/0`) to
    the operations on that task: for generated clients, and schemathesis's stateful tests."""
    task_id = {"task_id": f"$response.body#/{pointer}"}
    operations = ("get_task", "run_task", "retry_task", "reschedule_task", "delete_task")
    return {
        operation: {"operationId": operation, "parameters": task_id} for operation in operations
    }
