"""A real pgbouncer in transaction mode in front of the test database (Debian's package)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.procs import free_port


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
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        pytest.skip("needs pgbouncer (Debian package pgbouncer; .ci/run installs it)")
    url = make_url(database_url)
    host = url.query.get("host") or url.host
    port = url.query.get("port") or url.port or 5432
    listen = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="taskrunner-pgbouncer-"))
    workdir.chmod(0o755)
    (workdir / "users.txt").write_text(f'"{url.username}" "{url.password or ""}"\n')
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "users.txt"}
pool_mode = transaction
default_pool_size = 4
max_client_conn = 200
ignore_startup_parameters = {ignore}
"""
    )
    for f in workdir.iterdir():
        f.chmod(0o644)
    argv = [binary]
    if os.geteuid() == 0:
        # pgbouncer refuses to run as root; run it as the embedded server's user, who can
        # reach that server's socket, or as nobody for a TCP server.
        user = "pgserver" if _user_exists("pgserver") else "nobody"
        argv += ["-u", user]
    log = (workdir / "stderr").open("wb")
    proc = subprocess.Popen([*argv, str(workdir / "pgbouncer.ini")], stdout=log, stderr=log)
    through = url.set(host="127.0.0.1", port=listen, query={})
    dsn = through.render_as_string(hide_password=False)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg.connect(dsn, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                assert proc.poll() is None, (workdir / "stderr").read_text()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield dsn
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
