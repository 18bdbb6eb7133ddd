"""Static files the API serves: ours, kept in this directory, and those a package ships.

This directory is package data (pyproject.toml, `[tool.setuptools.package-data]`), so the wheel
and the Lambda bundle carry it: a file added here is served at `/static/<name>` once its
pattern is listed there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

HERE = Path(__file__).parent


def package_dir(package: str, *parts: str) -> Path:
    """The directory of an installed package's files, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package {package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def mount(app: FastAPI, path: str, directory: Path, name: str) -> None:
    """Serve the files of `directory` at `path`: GET and HEAD, with ETag and Last-Modified."""
    # StaticFiles costs no import time of its own: FastAPI's routing imports it already.
    app.mount(path, StaticFiles(directory=directory), name=name)
