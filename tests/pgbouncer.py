"""A real pgbouncer in transaction mode in front of the test database (Debian's package;
started by local/pgbouncer.py, as the bench's `ticks` scenario starts it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from local.pgbouncer import NotInstalled, pgbouncer


@pytest.fixture
def pgbouncer_url(database_url: str) -> Iterator[str]:
    """The test database's URL, through pgbouncer with pool_mode = transaction."""
    yield from _pgbouncer(database_url, ignore="extra_float_digits")


@pytest.fixture
def pgbouncer_ignoring_options_url(database_url: str) -> Iterator[str]:
    """The same, with pgbouncer told to take the startup parameter `options` and drop it
    (a common setting: it then neither refuses nor applies them)."""
    yield from _pgbouncer(database_url, ignore="extra_float_digits, options")


def _pgbouncer(database_url: str, ignore: str) -> Iterator[str]:
    try:
        with pgbouncer(database_url, ignore=ignore) as pooler:
            yield pooler.url
    except NotInstalled:
        pytest.skip("needs pgbouncer (Debian package pgbouncer; .ci/run installs it)")
