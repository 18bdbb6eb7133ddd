"""Bodies that need a real server to send: a huge Content-Length, a chunked flood without
one, a body trickled a byte at a time. `taskrunner api` (uvicorn) answers each with a 4xx
without reading more than its limit, and its memory stays bounded. (Tried on the code
before the limit: an 84 MB batch was read and parsed whole, 15 s, 1.3 GB.)"""

import json
import select
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Proc, spawn

__all__ = ["spawn"]  # the fixture

# The HTTP server refuses these before any statement: no PostgreSQL version reaches them.
pytestmark = [pytest.mark.slow, pytest.mark.one_server]

MiB = 1024 * 1024
ITEM = b'{"type": "baz", "execute_at": 1893499200, "idempotency_key": "' + b"k" * 200 + b'"},'


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def head(port: int, headers: dict[str, str], path: str = "/tasks/batch") -> socket.socket:
    """A connection that has sent a request line and headers for POST `path`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def response_of(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < length_of(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body)


def length_of(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
def api(spawn: Callable[..., Proc], database_url: str) -> Proc:
    proc = spawn("api", env={"TASKRUNNER_DATABASE_URL": database_url}, http=True)
    proc.wait_healthy()
    return proc


def test_an_84_mb_body_is_refused_by_its_length_before_it_is_read(api: Proc) -> None:
    assert api.port is not None
    with head(api.port, {"Content-Length": str(84 * MiB)}) as sock:
        # Not a byte of the body sent: the answer comes from the length alone.
        status, body = response_of(sock)
    assert status == 413
    assert body == {"detail": f"the request body is over the limit of {8 * MiB} bytes"}


def test_a_chunked_flood_is_cut_off_near_the_limit(
    api: Proc, sql: Callable[..., list[tuple[Any, ...]]]
) -> None:
    assert api.port is not None
    baseline_mb = peak_rss_mb(api.pid)
    sent = 0
    chunk = ITEM * (MiB // len(ITEM))
    with head(api.port, {"Transfer-Encoding": "chunked"}) as sock:
        sock.sendall(b'b\r\n{"tasks": [\r\n')
        # Up to 100 MiB; the server answers long before, or the test fails.
        for _ in range(100):
            if answered(sock):
                break
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status, body = response_of(sock)
    assert status == 413, body
    # The limit, and what socket buffers held when the answer came.
    assert sent < 8 * MiB + 8 * MiB, f"{sent / MiB:.0f} MiB sent before the answer"
    peak_mb = peak_rss_mb(api.pid)
    assert peak_mb - baseline_mb < 150, f"memory went from {baseline_mb:.0f} to {peak_mb:.0f} MB"
    assert sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.one_server
def test_a_trickled_body_gets_408(api: Proc) -> None:
    assert api.port is not None
    with head(api.port, {"Content-Length": "1000"}) as sock:
        sock.sendall(b'{"tasks": [')
        # A byte every half second, for up to two minutes (the body would take eight): the
        # server gives up first, or the test fails.
        for _ in range(240):
            if answered(sock):
                break
            sock.sendall(b" ")
            select.select([sock], [], [], 0.5)
        status, body = response_of(sock)
    assert status == 408, body
    assert "did not arrive in time" in body["detail"]


# Bodies just under the limit that hold the most values JSON can: each was millions of
# objects when read (8 MiB of `{},` as a batch: 82 -> 305 MB).
WORST = {
    "a batch of empty objects": b'{"tasks": [' + b"{}," * (8 * MiB // 3 - 6) + b"{}]}",
    "empty objects": b"[" + b"{}," * (8 * MiB // 3 - 2) + b"{}]",
    "empty arrays": b"[" + b"[]," * (8 * MiB // 3 - 2) + b"[]]",
    "short strings": b"[" + b'"",' * (8 * MiB // 3 - 2) + b'""]',
    "zeros": b"[" + b"0," * (8 * MiB // 2 - 2) + b"0]",
}


@pytest.mark.parametrize("path", ["/tasks/batch", "/tasks"])
def test_the_most_values_under_the_limit_are_a_422_in_bounded_memory(api: Proc, path: str) -> None:
    """No body under the limit costs more than 100 MB above idle, whatever it holds."""
    assert api.port is not None
    baseline_mb = peak_rss_mb(api.pid)
    for what, body in WORST.items():
        assert len(body) <= 8 * MiB
        with head(api.port, {"Content-Length": str(len(body))}, path) as sock:
            sock.sendall(body)
            status, detail = response_of(sock)
        assert status == 422, (what, detail)
        assert "more than any request takes" in detail["detail"][0]["msg"], (what, detail)
    peak_mb = peak_rss_mb(api.pid)
    assert peak_mb - baseline_mb < 100, f"memory went from {baseline_mb:.0f} to {peak_mb:.0f} MB"


def test_without_the_token_an_8_mib_body_is_401_before_it_is_read(
    spawn: Callable[..., Proc], database_url: str
) -> None:
    env = {"TASKRUNNER_DATABASE_URL": database_url, "TASKRUNNER_API_TOKEN": "s3cret"}
    proc = spawn("api", env=env, http=True)
    proc.wait_healthy()
    assert proc.port is not None
    baseline_mb = peak_rss_mb(proc.pid)
    body = WORST["a batch of empty objects"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with head(proc.port, {"Content-Length": str(len(body)), **headers}) as sock:
            sock.sendall(body)
            status, detail = response_of(sock)
        assert status == 401, detail
    # Over the limit too: 401, not 413.
    with head(proc.port, {"Content-Length": str(84 * MiB)}) as sock:
        assert response_of(sock)[0] == 401
    peak_mb = peak_rss_mb(proc.pid)
    assert peak_mb - baseline_mb < 20, f"memory went from {baseline_mb:.0f} to {peak_mb:.0f} MB"
