"""Declaring and loading kinds (functions/kinds.py), and what a kind's return or raise earns."""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from functions import kinds
from functions.completer import result_of
from functions.kinds import KINDS, Fail, KindError
from functions.model import TaskState
from functions.runner import time_limit_s
from functions.settings import Settings, SettingsError, kinds_from_environment
from functions.store import Claimed

_names = itertools.count()
# The API's paths, as the issue lists them: none may be a kind's name.
API_PATHS = (
    "tasks id taskstate schedules stats metrics healthz docs redoc static workers errors".split()
)


@pytest.fixture(autouse=True)
def _builtins_only() -> Iterator[None]:
    yield
    kinds.load(None)
    assert sorted(KINDS) == ["bar", "baz", "foo", "http"]


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Write a module of kinds under a name no other test uses; return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(*names: str, body: str = "    return None") -> str:
        name = f"user_kinds_{next(_names)}"
        lines = ["from functions.kinds import kind"]
        for i, kind_name in enumerate(names):
            lines += [f"@kind({kind_name!r})", f"def k{i}(ctx):", body]
        (tmp_path / f"{name}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return name

    return write


def test_loading_adds_a_modules_kinds_to_the_builtins(module: Callable[..., str]) -> None:
    name = module("mail", "sms")
    loaded = kinds.load(name)
    assert loaded is KINDS
    assert sorted(KINDS) == ["bar", "baz", "foo", "http", "mail", "sms"]
    assert KINDS["mail"].module == name and KINDS["mail"].instant


def test_the_decorator_returns_the_function_as_it_was() -> None:
    def run(ctx: kinds.Context) -> str:
        return "x"

    assert kinds.kind("unloaded_example")(run) is run


def test_a_module_named_twice_or_inside_a_package_named_too_is_loaded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    package = tmp_path / "user_pkg_once"
    package.mkdir()
    (package / "__init__.py").write_text("from user_pkg_once import tasks\n")
    (package / "tasks.py").write_text(
        "from functions.kinds import kind\n@kind('in_package')\ndef run(ctx):\n    return None\n"
    )
    kinds.load("user_pkg_once, user_pkg_once.tasks,,user_pkg_once")
    assert KINDS["in_package"].module == "user_pkg_once.tasks"


@pytest.mark.parametrize(
    "name", ["a", "a" * 63, "z9_", "send_email", "a_1_b", "tasks_", "statsd", "foo2"]
)
def test_names_from_one_to_63_characters_are_taken(module: Callable[..., str], name: str) -> None:
    kinds.load(module(name))
    assert name in KINDS


@pytest.mark.parametrize(
    "name", ["", "a" * 64, "A", "Mail", "1a", "_a", "a-b", "a b", "maïl", "\uff4dail", "a\n", "a.b"]
)
def test_other_names_are_refused(module: Callable[..., str], name: str) -> None:
    source = module(name)
    with pytest.raises(KindError) as refused:
        kinds.load(source)
    assert str(refused.value).startswith(f"kind module {source}: the kind name {name!r} is not")
    assert "^[a-z][a-z0-9_]{0,62}$" in str(refused.value)
    assert sorted(KINDS) == ["bar", "baz", "foo", "http"]  # as it was


@pytest.mark.parametrize("name", API_PATHS)
def test_a_path_of_the_api_is_refused(module: Callable[..., str], name: str) -> None:
    source = module(name)
    with pytest.raises(KindError, match=f"kind module {source}: the kind name '{name}' is a path"):
        kinds.load(source)


@pytest.mark.parametrize("name", ["foo", "bar", "baz", "http"])
def test_a_builtins_name_is_refused(module: Callable[..., str], name: str) -> None:
    with pytest.raises(KindError, match=f"the kind name '{name}' is a built-in kind's"):
        kinds.load(module(name))


def test_a_refused_load_leaves_the_kinds_loaded_before(module: Callable[..., str]) -> None:
    good, bad = module("mail"), module("mail")
    kinds.load(good)
    with pytest.raises(KindError, match=rf"declared twice \({good} and {bad}\)"):
        kinds.load(f"{good},{bad}")
    assert sorted(KINDS) == ["bar", "baz", "foo", "http", "mail"]


def test_a_module_that_cannot_be_imported_is_named_with_its_error(
    module: Callable[..., str],
) -> None:
    source = module("mail", body="    return None\nraise ValueError('no config')")
    with pytest.raises(KindError) as refused:
        kinds.load(source)
    assert str(refused.value) == (
        f"kind module {source} (TASKRUNNER_KINDS) cannot be imported: ValueError: no config"
    )


def test_a_declared_kind_is_stopped_at_its_timeout_exactly() -> None:
    settings = Settings()

    async def run(ctx: kinds.Context) -> str:
        return ""

    kinds.kind("limited", timeout_s=30, concurrency=20)(run)
    kinds.kind("per_settings", timeout_s=lambda s: s.foo_delay_s * 2)(run)
    limited, per_settings = kinds._DECLARED[-2:]
    assert time_limit_s(limited, settings) == 30
    assert limited.concurrency(settings) == 20 and not limited.instant
    assert time_limit_s(per_settings, settings) == 6.0
    assert per_settings.concurrency(settings) is None
    # Without one: a minute for a coroutine kind, a second for a plain one (it runs inline).
    kinds.kind("waits")(run)
    kinds.kind("inline")(lambda ctx: None)
    waits, inline = kinds._DECLARED[-2:]
    assert (waits.max_seconds(settings), time_limit_s(waits, settings)) == (60.0, 60.0)
    assert inline.max_seconds(settings) == 1.0 and inline.instant
    # The built-ins keep their generous limit: twice what they take, and 10 s.
    assert time_limit_s(KINDS["foo"], settings) == 2 * (3.0 + 1.0) + 10


@pytest.mark.parametrize("timeout_s", [0, -1, "30", True, float("inf"), float("nan")])
def test_a_timeout_must_be_seconds_above_zero(timeout_s: object) -> None:
    with pytest.raises(ValueError, match="timeout_s must be a number of seconds above 0"):
        kinds.kind("x", timeout_s=timeout_s)  # type: ignore[arg-type]


@pytest.mark.parametrize("concurrency", [0, -1, 2.5, True, "3"])
def test_a_concurrency_must_be_a_whole_number_from_one(concurrency: object) -> None:
    with pytest.raises(ValueError, match="concurrency must be a whole number from 1"):
        kinds.kind("x", concurrency=concurrency)  # type: ignore[arg-type]


def claimed(attempt: int, max_attempts: int = 3) -> Claimed:
    return Claimed(id=7, kind="mail", attempt=attempt, max_attempts=max_attempts)


def test_fail_fails_at_once_whatever_attempts_are_left() -> None:
    result = result_of(claimed(1), None, Fail("no such address"), Settings())
    assert (result.state, result.error, result.retry_in_s) == (
        TaskState.FAILED,
        "Fail: no such address",
        None,
    )


def test_another_error_is_retried_while_attempts_remain() -> None:
    retried = result_of(claimed(2), None, RuntimeError("down"), Settings())
    assert (retried.state, retried.error) == (TaskState.SCHEDULED, "RuntimeError: down")
    last = result_of(claimed(3), None, RuntimeError("down"), Settings())
    assert last.state is TaskState.FAILED


def test_none_succeeds_with_no_output_and_another_value_fails() -> None:
    quiet = result_of(claimed(1), None, None, Settings())
    assert (quiet.state, quiet.output, quiet.error) == (TaskState.SUCCEEDED, None, None)
    wrong = result_of(claimed(1), 42, None, Settings())
    assert wrong.state is TaskState.SCHEDULED
    assert wrong.error == "TypeError: kind mail returned int, not a str or None"


def test_the_setting_reads_module_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUNNER_KINDS", " a.b , c,, _d9 ")
    assert Settings().kinds == kinds_from_environment() == "a.b,c,_d9"
    assert kinds.module_names(Settings().kinds) == ["a.b", "c", "_d9"]
    for bad in ("a b", "a..b", "1a", "a-b", "a/b"):
        monkeypatch.setenv("TASKRUNNER_KINDS", bad)
        with pytest.raises(SettingsError, match="TASKRUNNER_KINDS: must be module names"):
            Settings()
        with pytest.raises(SettingsError, match="TASKRUNNER_KINDS: must be module names"):
            kinds_from_environment()


def test_a_payload_is_read_from_its_json_on_first_use_only() -> None:
    # The claim hands the payload over as stored (jsonb's text); a kind that never reads
    # ctx.payload never parses it.
    def context(payload_json: str | None) -> kinds.Context:
        return kinds.Context(1, 1, Settings(), lambda: None, payload_json)  # type: ignore[arg-type]

    ctx = context('{"to": "ada@example.com", "n": [1, 2.5, null, "é"]}')
    assert "payload" not in vars(ctx)
    assert ctx.payload == {"to": "ada@example.com", "n": [1, 2.5, None, "é"]}
    assert ctx.payload is ctx.payload  # read once
    assert context(None).payload is None
    assert context("null").payload is None
    assert context('"text"').payload == "text"


def test_kinds_made_by_a_helper_module_are_loaded_with_the_module_that_made_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A factory's kinds, a decorator's without functools.wraps, a partial and a callable
    object: each declared while the named module is imported belongs to it (they were
    dropped silently, the function's __module__ being the helper's or none)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_helpers_made.py").write_text(
        "from functions.kinds import kind\n"
        "def notifier(name):\n"
        "    @kind(name)\n"
        "    async def run(ctx):\n"
        "        return name\n"
        "    return run\n"
        "def timed(fn):\n"
        "    async def wrapper(ctx):\n"
        "        return await fn(ctx)\n"
        "    return wrapper\n"
    )
    (tmp_path / "user_kinds_made.py").write_text(
        "import functools\n"
        "from functions.kinds import kind\n"
        "from user_helpers_made import notifier, timed\n"
        "notifier('notify_slack')\n"
        "notifier('notify_teams')\n"
        "async def _send(ctx, channel):\n"
        "    return channel\n"
        "kind('via_partial')(functools.partial(_send, channel='sms'))\n"
        "@kind('timed_job')\n"
        "@timed\n"
        "async def timed_job(ctx):\n"
        "    return None\n"
        "class Caller:\n"
        "    async def __call__(self, ctx):\n"
        "        return None\n"
        "kind('via_callable', timeout_s=5)(Caller())\n"
    )
    kinds.load("user_kinds_made")
    made = ["notify_slack", "notify_teams", "timed_job", "via_callable", "via_partial"]
    assert sorted(KINDS) == sorted(["bar", "baz", "foo", "http", *made])
    for name in made:
        assert KINDS[name].module == "user_kinds_made"
        assert not KINDS[name].instant  # each is run as a coroutine, with its time limit
    assert time_limit_s(KINDS["via_partial"], Settings()) == kinds.DEFAULT_TIMEOUT_S


@pytest.mark.parametrize("code", ["0", "3", "'bye'"])
def test_a_module_calling_sys_exit_at_import_is_named_with_it(
    module: Callable[..., str], code: str
) -> None:
    source = module("mail", body=f"    return None\nimport sys\nsys.exit({code})")
    with pytest.raises(KindError) as refused:
        kinds.load(source)
    assert str(refused.value).startswith(
        f"kind module {source} (TASKRUNNER_KINDS) cannot be imported: SystemExit"
    )


def _first_segments(routes: list[Any]) -> set[str]:
    found = set()
    for route in routes:
        path = getattr(route, "path", "")
        found.add(path.strip("/").split("/")[0])
        inner = getattr(route, "original_router", None) or getattr(route, "router", None)
        found |= _first_segments(list(getattr(inner, "routes", [])))
    return found


def test_every_first_path_segment_the_api_serves_is_reserved() -> None:
    """`POST /static/0` met the static files' mount (a 405): every path the app answers
    whose first segment could be a kind's name is refused as one."""
    from functions.http.app import build_app

    app = build_app(Settings(database_url="postgresql://taskrunner@127.0.0.1:9/none"))
    segments = _first_segments(app.routes) | {
        p.strip("/").split("/")[0] for p in app.openapi()["paths"]
    }
    assert {"static", "docs", "tasks", "stats", "schedules", "id"} <= segments
    names = {s for s in segments if re.fullmatch(kinds.NAME_PATTERN, s)}
    assert names <= kinds.RESERVED_NAMES


def test_a_kind_named_as_the_base_paths_first_segment_is_refused_at_start(
    module: Callable[..., str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = module("prod")
    kinds.load(source)
    kinds.check_base_path("")
    kinds.check_base_path("/prod2")
    kinds.check_base_path("/stage/prod")
    with pytest.raises(KindError, match="'prod' is the first segment of TASKRUNNER_BASE_PATH"):
        kinds.check_base_path("/prod/v1")
    from local import cli

    monkeypatch.setenv("TASKRUNNER_KINDS", source)
    monkeypatch.setenv("TASKRUNNER_BASE_PATH", "/prod")
    monkeypatch.setenv("TASKRUNNER_DATABASE_URL", "postgresql://taskrunner@127.0.0.1:9/none")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stopped:
        cli.main(["worker"])
    assert stopped.value.code == 2
    assert "'prod' is the first segment of TASKRUNNER_BASE_PATH (/prod)" in caplog.text


class Unsayable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words")

    __repr__ = __str__


def test_an_error_that_cannot_say_itself_fails_its_attempt_as_any_other() -> None:
    """A kind's exception whose __str__ raises: the worker crashed on it (a plain kind's,
    each worker that claimed the task in turn) or left the task running (a coroutine's)."""
    try:
        raise Unsayable()
    except Unsayable as raised:
        exc = raised
    retried = result_of(claimed(1), None, exc, Settings())
    assert (retried.state, retried.error) == (
        TaskState.SCHEDULED,
        "Unsayable: <str() raised RuntimeError>",
    )
    assert retried.traceback is not None and "Unsayable" in retried.traceback
    assert result_of(claimed(3), None, exc, Settings()).state is TaskState.FAILED


def test_baz_prints_baz_and_a_number_from_0_to_343_each_as_likely(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The challenge's line, `Baz {0..343}`: both ends reached, from one draw each run."""
    run = KINDS["baz"].run
    ctx: Any = None  # (baz reads nothing of it)
    for draw, line in ((0.0, "Baz 0"), (0.5, "Baz 172"), (1.0 - 2**-53, "Baz 343")):
        monkeypatch.setattr(kinds, "_random", lambda draw=draw: draw)
        assert run(ctx) == line
    monkeypatch.undo()
    lines = {run(ctx) for _ in range(20_000)}
    assert lines == {f"Baz {n}" for n in range(344)}, "each number comes up"
