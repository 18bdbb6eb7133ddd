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
def http_server(status: int = 200, body_bytes: int = 2) -> Iterator[Served]:
    """An HTTP/1.1 keep-alive server answering every GET with `status` and a body of
    `body_bytes` zeros, streamed (an 800 MB body costs it no memory)."""
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
