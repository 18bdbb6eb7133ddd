"""constraints.txt pins every dependency, at the versions installed here, and every install uses it:
`.ci/run`, the README's command and the Lambda bundle's build (tests/acceptance/test_bundle.py)."""

import re
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from tests.lockfile import CONSTRAINTS, entries, pins

ROOT = Path(__file__).parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REFRESH = (
    "uv pip compile pyproject.toml --all-extras --universal --python-version 3.11"
    " --fork-strategy fewest -o constraints.txt"
)


def _named() -> list[Requirement]:
    """What pyproject.toml asks for: the runtime dependencies and each extra's, less the project."""
    named = [*PROJECT["dependencies"]]
    for extra in PROJECT["optional-dependencies"].values():
        named += extra
    return [r for r in map(Requirement, named) if canonicalize_name(r.name) != PROJECT["name"]]


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""})


def _closure() -> set[NormalizedName]:
    """Each package pyproject.toml brings in here, directly or through another (with the extras
    asked of it), read from the installed packages' metadata."""
    done: set[tuple[NormalizedName, frozenset[str]]] = set()
    todo = [r for r in _named() if _applies(r, set())]
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key not in done:
            done.add(key)
            needed = map(Requirement, metadata.requires(key[0]) or [])
            todo += [r for r in needed if _applies(r, set(requirement.extras))]
    return {name for name, _ in done}


def test_every_line_of_the_lock_is_one_exact_pin() -> None:
    names = [canonicalize_name(r.name) for r in entries()]
    # One version of each for every platform and Python: none runs a version the suite never ran.
    assert len(names) == len(set(names)), "a package pinned twice (a split resolution)"
    for requirement in entries():
        assert re.fullmatch(r"==[^*,]+", str(requirement.specifier)), requirement
    # The command its header names is the one the README gives to refresh it.
    assert f"#    {REFRESH}\n" in CONSTRAINTS.read_text()
    assert REFRESH in " ".join((ROOT / "README.md").read_text().replace("\\\n", " ").split())


def test_the_lock_pins_each_dependency_pyproject_names_within_its_bounds() -> None:
    pinned = pins()
    for requirement in _named():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not in {CONSTRAINTS.name}: refresh it"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{CONSTRAINTS.name} pins {name}=={pinned[name]}, outside {requirement}: refresh it"
        )


def test_the_lock_pins_every_package_those_bring_in() -> None:
    missing = sorted(_closure() - set(pins()))
    assert not missing, f"not in {CONSTRAINTS.name}: {missing}: refresh it"


def test_the_installed_versions_are_the_locked_ones() -> None:
    wrong = {}
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != version:
            wrong[name] = f"{installed}, locked {version}"
    assert not wrong, f"reinstall as the README says (pip install -c constraints.txt ...): {wrong}"


def _pip_install(command: str) -> list[str]:
    words = shlex.split(command)
    words = words[words.index("install") + 1 :]
    return [w for w in words[: words.index("&&") if "&&" in words else None] if w != "--quiet"]


def test_ci_and_the_readme_install_the_same_way_from_the_lock() -> None:
    (ci,) = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.startswith("python -m pip install") and "-e" in line]  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^pip install .*\.\[dev\].*$", readme, re.MULTILINE)
    assert len(commands) >= 2, "the README's Run it and Test it"
    assert _pip_install(ci) == ["-c", "constraints.txt", "-e", ".[dev]"]
    for command in commands:
        assert _pip_install(command) == _pip_install(ci), command
