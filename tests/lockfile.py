"""constraints.txt, the lock every install of the project takes its versions from."""

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

CONSTRAINTS = Path(__file__).parents[1] / "constraints.txt"


def entries() -> list[Requirement]:
    """Every requirement the lock lists, whatever its marker (comments and blank lines left out)."""
    lines = (line.partition("#")[0].strip() for line in CONSTRAINTS.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def pins() -> dict[NormalizedName, str]:
    """The exact version the lock pins for each package whose marker holds on this machine (the
    Lambda bundle's platform, Linux x86_64 CPython, is the one the tests and the bundle run on)."""
    pinned: dict[NormalizedName, str] = {}
    for requirement in entries():
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            (specifier,) = requirement.specifier
            pinned[canonicalize_name(requirement.name)] = specifier.version
    return pinned
