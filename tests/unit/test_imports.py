"""The Lambda handlers import only what their first invocation needs (a cold start pays for
every module): httpx only once a `bar` runs, prometheus_client only for /metrics."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["functions.api", "functions.tick"])
def test_a_handler_does_not_import_what_only_some_paths_need(module: str) -> None:
    probe = (
        f"import sys, {module}; "
        "print(sorted({'httpx', 'prometheus_client', 'sqlalchemy'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_the_tick_imports_no_pydantic() -> None:
    """Settings are read without it (functions/settings.py) and the store imports
    pydantic-core's JSON writer only for the API's batches: 60-90 ms of each tick's cold
    start, measured."""
    probe = (
        "import sys, functions.tick, functions.settings; functions.settings.Settings(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_enqueue_imports_neither_the_api_nor_the_worker() -> None:
    """`functions.enqueue` is imported by the user's own application, inside its web
    requests: it brings neither FastAPI (nor Starlette, Mangum, uvicorn) nor the worker, nor
    SQLAlchemy unless it is given one of its connections."""
    worker = ("runner", "tick", "completer", "upkeep", "output", "run_state", "http")
    probe = (
        "import sys, functions.enqueue; print(sorted(m for m in sys.modules if"
        " m.split('.')[0] in ('fastapi', 'starlette', 'mangum', 'uvicorn', 'sqlalchemy')"
        f" or m.split('.')[:2] in [['functions', w] for w in {worker!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout


# The package's own modules, and what each imports of them: every import statement, at the
# top, under `if TYPE_CHECKING:` and inside functions alike (a type-only circle is still a
# circle to a reader, and an import inside a function one waiting to be hoisted).
PACKAGE = Path(__file__).resolve().parents[2] / "functions"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of `functions` -> the modules of `functions` it imports."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from functions import tasks` imports the module functions.tasks.
                found.update(
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                )
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports in `graph` (its modules in order, the first again at the end)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            if circle := visit(imported):
                return circle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if circle := visit(module):
            return circle
    return None


def test_find_circle_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_circle(graph) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_has_no_import_circle() -> None:
    """Imports point one way: entry points -> operations -> store -> model, type-only ones
    included."""
    graph = import_graph()
    assert {"functions.tasks", "functions.store"} <= graph.keys()  # the walk finds them
    assert find_circle(graph) is None, " -> ".join(find_circle(graph) or [])


def test_the_model_imports_nothing_of_ours() -> None:
    """Task, NewTask, TaskState and the limits are at the bottom: anything may import them."""
    assert import_graph()["functions.model"] == set()
