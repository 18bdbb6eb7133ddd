"""Small HTTP servers on 127.0.0.1 for `bar`, each in a thread of its own with its own loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Served:
    url: str
    requests: int = 0
    connections: int = 0


@contextmanager
def http_server(status: int = 200, body_bytes: int = 2, delay_s: float = 0.0) -> Iterator[Served]:
    """An HTTP/1.1 keep-alive server answering every GET, `delay_s` after it came, with
    `status` and a body of `body_bytes` zeros, streamed (an 800 MB body costs it no memory)."""
    served = Served(url="")
    loop = asyncio.new_event_loop()
    chunk = b"0" * 65536

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                served.requests += 1
                if delay_s:
                    await asyncio.sleep(delay_s)
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {body_bytes}\r\n\r\n".encode()
                )
                left = body_bytes
                while left > 0:
                    writer.write(chunk[: min(left, len(chunk))])
                    left -= min(left, len(chunk))
                    await writer.drain()
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096))
    served.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.close()
        loop.run_until_complete(server.wait_closed())
        # Connections still open (a client that never hung up) end with the loop.
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


@dataclass
class Seen:
    """One request a target server answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()


@dataclass
class Target:
    """A server for the `http` kind: what it was asked (`seen`), and its address."""

    url: str
    port: int
    seen: list[Seen]
    # Per path, the statuses still to answer in turn (then 200), with headers.
    script: dict[str, list[tuple[int, dict[str, str]]]]
    release: threading.Event


@contextmanager
def target_server() -> Iterator[Target]:
    """A threaded HTTP/1.1 server on 127.0.0.1 whose paths do what they say:

    - `/status/<code>`: answers `code`; `/script/<name>`: the next of `script[<name>]`;
    - `/hang`: never answers (until the server stops);
    - `/endless`: 200 and a body that never ends (no length: until the client hangs up);
    - `/redirect/<n>`: 302 to `/redirect/<n-1>`, and `/redirect/0` answers 200;
    - `/to?<url>`: 307 to `url`.
    """
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import unquote

    seen: list[Seen] = []
    script: dict[str, list[tuple[int, dict[str, str]]]] = {}
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _answer(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            path, _, query = self.path.partition("?")
            seen.append(Seen(self.command, path, dict(self.headers), body, time.monotonic()))
            parts = path.strip("/").split("/")
            if parts[0] == "status":
                self._answer(int(parts[1]))
            elif parts[0] == "script":
                steps = script.get(parts[1]) or [(200, {})]
                status, headers = steps.pop(0) if len(steps) > 1 else steps[0]
                self._answer(status, headers)
            elif parts[0] == "hang":
                release.wait(120)
                self.close_connection = True
            elif parts[0] == "endless":
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                chunk = b"x" * 65536
                try:
                    for _ in range(16 * 1024):  # 1 GiB
                        self.wfile.write(chunk)
                except OSError:
                    pass  # the client hung up
            elif parts[0] == "redirect":
                left = int(parts[1])
                if left == 0:
                    self._answer(200)
                else:
                    self._answer(302, {"Location": f"/redirect/{left - 1}"})
            elif parts[0] == "to":
                self._answer(307, {"Location": unquote(query)})
            else:
                self._answer(404)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Target(f"http://127.0.0.1:{port}", port, seen, script, release)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
