"""Debian's pgbouncer in transaction mode in front of a database, started for as long as a
`with` block: what the bench's `ticks` scenario and the tests put in front of PostgreSQL to
see taskrunner behind a transaction pooler, as on Lambda behind RDS Proxy or pgbouncer."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url


class NotInstalled(RuntimeError):
    """No pgbouncer binary on this machine."""


@dataclass(frozen=True)
class Pooler:
    # The database's URL through the pooler, the URL of its admin console, and its pid.
    url: str
    admin_url: str
    pid: int


@contextlib.contextmanager
def pgbouncer(
    database_url: str,
    *,
    pool_size: int = 4,
    max_clients: int = 200,
    ignore: str = "extra_float_digits",
) -> Iterator[Pooler]:
    """pgbouncer with `pool_mode = transaction` and `pool_size` server connections in front
    of `database_url`'s server, `ignore` its `ignore_startup_parameters`."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise NotInstalled("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    url = make_url(database_url)
    host = url.query.get("host") or url.host or "127.0.0.1"
    port = url.query.get("port") or url.port or 5432
    user = url.username or "postgres"
    listen = _free_port()
    with tempfile.TemporaryDirectory(prefix="taskrunner-pgbouncer-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        (workdir / "users.txt").write_text(f'"{user}" "{url.password or ""}"\n')
        password = f" password={url.password}" if url.password else ""
        (workdir / "pgbouncer.ini").write_text(
            f"""[databases]
* = host={host} port={port} user={user}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "users.txt"}
admin_users = {user}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = {max_clients}
ignore_startup_parameters = {ignore}
"""
        )
        for f in workdir.iterdir():
            f.chmod(0o644)
        argv = [binary]
        if os.geteuid() == 0:
            # pgbouncer refuses to run as root; run it as the embedded server's user, who can
            # reach that server's socket, or as nobody for a TCP server.
            argv += ["-u", "pgserver" if _user_exists("pgserver") else "nobody"]
        with (workdir / "stderr").open("wb") as log:
            proc = subprocess.Popen([*argv, str(workdir / "pgbouncer.ini")], stdout=log, stderr=log)
        through = url.set(drivername="postgresql", host="127.0.0.1", port=listen, query={})
        dsn = through.render_as_string(hide_password=False)
        admin = through.set(database="pgbouncer").render_as_string(hide_password=False)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    psycopg.connect(dsn, connect_timeout=2).close()
                    break
                except psycopg.OperationalError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((workdir / "stderr").read_text()) from None
                    time.sleep(0.1)
            yield Pooler(dsn, admin, proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
