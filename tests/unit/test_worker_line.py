"""The database as a worker's start-up line names it: never with a password."""

import pytest

from functions.conninfo import database_for_log


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@db:5432/app", "postgresql://u:***@db:5432/app"),
        ("postgresql://u:p@ss@db/app", "postgresql://u:***@db/app"),
        (
            "postgresql://u@/app?host=%2Ftmp&password=s3cret&sslpassword=k",
            "postgresql://u@/app?host=%2Ftmp&password=***&sslpassword=***",
        ),
        ("postgresql://db/app", "postgresql://db/app"),
        (None, "(none)"),
    ],
)
def test_the_password_is_hidden(url: str | None, shown: str) -> None:
    assert database_for_log(url) == shown
