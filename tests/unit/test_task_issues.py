"""Why a task's body (or a batch's items) is refused, said by the request rules
(functions/http/rules.py) as FastAPI's reading of `schemas.TaskIn` (`BatchIn`) says it: the
same errors, in pydantic's words and order, so that the fast path answers the same 422
without FastAPI or pydantic."""

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import PlainValidator, ValidationError

from functions.http import rules
from functions.http.schemas import BatchIn, BatchItemIn, IdempotencyKey, TaskIn


def by_the_schema(sent: Any, schema: Any = TaskIn) -> list[dict[str, Any]] | None:
    """What FastAPI's create route refuses `sent` with (type, loc, msg), or None if taken:
    TaskIn's, read from attributes as FastAPI reads a body (`fastapi._compat`)."""
    try:
        schema.model_validate(sent, from_attributes=True)
    except ValidationError as exc:
        return [
            {"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
    return None


def test_the_fields_are_the_schemas_in_its_order_with_its_validators() -> None:
    declared = []
    for name, field in TaskIn.model_fields.items():
        rule = [m.func for m in field.metadata if isinstance(m, PlainValidator)]
        declared.append((name, rule[0] if rule else None, field.is_required()))
    assert list(rules.TASK_FIELDS) == declared
    assert list(BatchItemIn.model_fields) == [name for name, _, _ in rules.ITEM_FIELDS]
    assert BatchItemIn.model_fields["idempotency_key"].annotation == IdempotencyKey | None
    key = rules.ITEM_FIELDS[-1][1]
    assert key is not None
    assert (key(None), key("k")) == (None, "k")
    with pytest.raises(ValueError, match="idempotency key"):
        key("a b")


REFUSED: list[Any] = [
    None,
    {},
    [],
    [{"type": "baz", "execute_at": 0}],
    "baz",
    0,
    True,
    {"type": "nope", "execute_at": "2099-01-01T00:00:00Z"},
    {"type": "ünïcödé", "execute_at": 0},
    {"type": "\ud800", "execute_at": 0},  # a lone surrogate, as json.loads reads "\\ud800"
    {"type": "x" * 1000, "execute_at": 0},
    {"type": None, "execute_at": None},
    {"type": ["baz"], "execute_at": {"at": 0}},
    {"execute_at": 0},
    {"type": "baz"},
    {"type": "baz", "execute_at": "2030-01-01T12:00:00"},
    {"type": "baz", "execute_at": 253402300800},
    {"type": "baz", "execute_at": -62135596801},
    {"type": "baz", "execute_at": 1e400},
    {"type": "baz", "execute_at": float("nan")},
    {"type": "baz", "execute_at": 10**400},
    {"type": "baz", "execute_at": 0, "max_attempts": 0},
    {"type": "baz", "execute_at": 0, "max_attempts": 1001},
    {"type": "baz", "execute_at": 0, "max_attempts": 2.5},
    {"type": "baz", "execute_at": 0, "max_attempts": True},
    {"type": "baz", "execute_at": 0, "timeout_s": 0},
    {"type": "baz", "execute_at": 0, "timeout_s": "1"},
    {"type": "baz", "execute_at": 0, "timeout_s": 10**400},
    {"type": "baz", "execute_at": 0, "priority": 10},
    {"type": "baz", "execute_at": 0, "priority": -1},
    {"type": "baz", "execute_at": 0, "x": 1},
    {"type": "baz", "execute_at": 0, "idempotency_key": "k"},  # (a batch item's, not here)
    {"k" * 50: 1, "type": "baz", "execute_at": 0, "é": None},
    # Every field refused and extras besides, around them: fields first, then extras.
    {
        "a": 1,
        "priority": "x",
        "type": 3,
        "timeout_s": -1,
        "max_attempts": 0,
        "execute_at": "",
        "payload": {"any": "thing"},
        "b": 2,
    },
    # More issues than a 422 lists.
    {f"extra{n}": n for n in range(30)},
]


@pytest.mark.parametrize("sent", REFUSED, ids=lambda s: json.dumps(s)[:40])
def test_a_refused_body_is_refused_for_the_same_reasons(sent: Any) -> None:
    expected = by_the_schema(sent)
    assert expected
    assert rules.task_issues(sent) == expected


@pytest.mark.parametrize(
    "sent",
    [
        {"type": "baz", "execute_at": 0},
        {
            "type": " FOO\t",
            "execute_at": "2030-01-01T12:00:00+01:00",
            "payload": None,
            "max_attempts": 1000,
            "timeout_s": 0.001,
            "priority": 9,
        },
        {
            "type": "baz",
            "execute_at": 253402300799.99997,
            "max_attempts": None,
            "timeout_s": None,
            "priority": None,
        },
    ],
)
def test_a_body_the_schema_takes_has_no_issues(sent: Any) -> None:
    assert by_the_schema(sent) is None
    assert rules.task_issues(sent) is None


def test_a_rule_that_fails_otherwise_than_by_valueerror_is_left_to_the_app(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pydantic lets a TypeError through (the app answers 500): not a 422 to say here."""

    def broken(value: object) -> int:
        raise TypeError("a bug")

    fields = [(n, broken if n == "priority" else r, q) for n, r, q in rules.TASK_FIELDS]
    monkeypatch.setattr(rules, "TASK_FIELDS", tuple(fields))
    assert rules.task_issues({"type": "nope", "execute_at": 0, "priority": 1}) is None


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["baz", " Foo ", "2030-01-01T00:00:00Z", "2030-01-01T00:00:00", "3", ""]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
keys = st.one_of(st.sampled_from([name for name, _, _ in rules.TASK_FIELDS]), st.text(max_size=45))


@settings(max_examples=300, deadline=None)
@given(st.one_of(values, st.dictionaries(keys, values, max_size=9)))
@example({"type": "baz", "execute_at": 0})
@example({"type": "baz", "execute_at": 0, "priority": 1.0})
def test_any_body_is_refused_as_the_schema_refuses_it(sent: Any) -> None:
    assert rules.task_issues(sent) == by_the_schema(sent)


items = st.one_of(
    st.dictionaries(keys, values, max_size=9),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["baz", "nope"]), "execute_at": st.sampled_from([0, "x"])},
        optional={"idempotency_key": st.sampled_from([None, "k-1", "a b", 3, ""])},
    ),
    values,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(items, min_size=1, max_size=4))
@example([{"type": "baz", "execute_at": 0, "idempotency_key": "k"}, {"type": "nope"}])
@example([{"type": "baz", "execute_at": 0, "idempotency_key": "k"}])
@example([{"type": "baz", "execute_at": 0}, [], None, {"idempotency_key": None, "x": 1}])
@example([{f"extra{n}": n} for n in range(12)])
def test_any_batch_is_refused_as_the_schema_refuses_it(sent: list[Any]) -> None:
    assert rules.batch_issues(sent) == by_the_schema({"tasks": sent}, BatchIn)
