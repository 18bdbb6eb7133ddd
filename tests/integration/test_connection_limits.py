"""The bounds on each connection of `taskrunner api` and `dev` (local.serve.limited_protocol),
with both of uvicorn's HTTP protocols, around an app that needs no database."""

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import h11
import pytest
import uvicorn

from functions.settings import Settings
from local.serve import LimitedH11, LimitedHttpTools, limited_protocol, max_connections
from tests.procs import free_port, wait_for

Connect = Callable[..., socket.socket]
HALF_OPEN = b"GET /tasks/1 HTTP/1.1\r\nHost: x\r\n"


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=[LimitedHttpTools, LimitedH11], ids=["httptools", "h11"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """Connect to a server of 3 connections at most, with a header timeout of 0.5 s, and
    send the start of a request (or what is given)."""
    settings = Settings(max_connections=3, header_timeout_s=0.5)
    config = uvicorn.Config(
        ok,
        host="127.0.0.1",
        port=free_port(),
        lifespan="off",
        log_config=None,
        http=limited_protocol(settings, request.param),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run)
    thread.start()
    opened: list[socket.socket] = []

    def connect(sent: bytes = HALF_OPEN) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", config.port), timeout=10)
        opened.append(s)
        s.sendall(sent)
        return s

    try:
        wait_for(lambda: server.started, 30, "the server")
        yield connect
    finally:
        for s in opened:
            s.close()
        server.should_exit = True
        thread.join(30)


def wait_closed(s: socket.socket) -> bytes:
    """What the server sent on `s` before it closed it, once it has."""
    s.setblocking(False)
    got = [b""]

    def closed() -> bool:
        try:
            while chunk := s.recv(65536):
                got[0] += chunk
        except BlockingIOError:
            return False
        except ConnectionResetError:
            pass
        return True

    wait_for(closed, 10, "the server to close")
    return got[0]


def test_headers_not_sent_in_time_close_the_connection(connect: Connect) -> None:
    silent = connect(b"")
    half = connect()
    for s in (silent, half):
        assert wait_closed(s) == b""


def test_a_kept_alive_connection_that_stalls_mid_headers_is_closed(connect: Connect) -> None:
    s = connect(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    # uvicorn's keep-alive timeout stops at the next request's first byte.
    s.sendall(HALF_OPEN)
    assert wait_closed(s) == b""


def test_a_connection_past_the_bound_is_answered_503_and_closed(connect: Connect) -> None:
    held = [connect() for _ in range(3)]
    refused = connect()
    # A whole HTTP answer, as a client reads it.
    client = h11.Connection(h11.CLIENT)
    client.receive_data(wait_closed(refused))
    client.receive_data(b"")
    head, body, end = client.next_event(), client.next_event(), client.next_event()
    assert isinstance(head, h11.Response) and head.status_code == 503
    assert (b"retry-after", b"1") in head.headers
    assert isinstance(body, h11.Data) and isinstance(end, h11.EndOfMessage)
    assert json.loads(body.data) == {"detail": "too many connections, try again soon"}
    # Once the held ones are timed out, there is room again.
    for s in held:
        assert wait_closed(s) == b""
    s = connect(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert wait_closed(s).startswith(b"HTTP/1.1 200 ")


def test_the_bound_leaves_room_for_the_process_other_descriptors() -> None:
    """With RLIMIT_NOFILE at 500, 1,000 connections could not all be opened: the process
    holds fewer, and keeps descriptors for its database connections and an accept burst."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (500, hard))
    try:
        held = max_connections(Settings(max_connections=1000), burst=128)
        roomy = max_connections(Settings(max_connections=300))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert 1 <= held <= 500 - 128 - 32
    assert roomy == 300
