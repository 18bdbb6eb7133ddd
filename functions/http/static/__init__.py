"""Static files the API serves: ours, kept in this directory, and those a package ships.

This directory is package data (pyproject.toml, `[tool.setuptools.package-data]`), so the wheel
and the Lambda bundle carry it: a file added here is served at `/static/<name>` once its
pattern is listed there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

HERE = Path(__file__).parent
# The kinds of file served: those listed as package data (pyproject.toml) and those the docs'
# package ships. Nothing else in these directories is (this module's source, its bytecode).
SERVED_SUFFIXES = frozenset({".svg", ".png", ".ico", ".css", ".js", ".html"})


class Files(StaticFiles):
    """StaticFiles that serves only SERVED_SUFFIXES, and whose 405 says what is allowed
    (Starlette's names no method: an empty `Allow`, which HTTP does not permit)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if scope["method"] not in ("GET", "HEAD"):
            raise HTTPException(status_code=405, headers={"Allow": "GET, HEAD"})
        if Path(path).suffix not in SERVED_SUFFIXES:
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)


def package_dir(package: str, *parts: str) -> Path:
    """The directory of an installed package's files, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package {package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def mount(app: FastAPI, path: str, directory: Path, name: str) -> None:
    """Serve the files of `directory` at `path`: GET and HEAD, with ETag and Last-Modified."""
    # StaticFiles costs no import time of its own: FastAPI's routing imports it already.
    app.mount(path, Files(directory=directory), name=name)
