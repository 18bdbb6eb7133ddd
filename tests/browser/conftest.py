"""The dashboard in a real browser: Debian's chromium driven by Playwright, against real
`taskrunner api` (and `worker`) processes on a test database.

Playwright's own browser download is never used: the browser is launched by path. Every test
fails on an error or warning in the browser's console, an uncaught exception, a request that
failed, or an HTTP error it did not declare with `browser_log.allow(...)`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
import uvicorn

from functions.http.app import build_app
from functions.settings import Settings
from tests.pgservers import available_versions
from tests.procs import Proc, spawn, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response

__all__ = ["spawn"]  # the fixture

CHROMIUM = Path("/usr/bin/chromium")
# A zone with a half-hour offset and no daylight saving: a time read or shown in UTC by
# mistake is off by 5:30 whatever the date.
TIMEZONE = "Asia/Kolkata"


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "needs playwright (pip install -e '.[dev]')"
    if not CHROMIUM.is_file():
        return f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"
    return None


# One PostgreSQL version is enough here: the page reads the same API on either.
SERVER = "url" if os.environ.get("TASKRUNNER_TEST_DATABASE_URL") else available_versions()[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = missing()
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here) and reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


# Per module, not per session: sync Playwright's event loop is closed before the next module's
# asyncio tests run in this process.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


_CONSOLE_STATUS = re.compile(
    r"Failed to load resource: the server responded with a status of (\d+)"
)


@dataclass
class BrowserLog:
    """What went wrong in the page, and which HTTP errors the test expects."""

    problems: list[str] = field(default_factory=list)
    http_errors: list[tuple[int, str, str]] = field(default_factory=list)
    console_statuses: list[int] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    allowed: list[tuple[int, str, re.Pattern[str]]] = field(default_factory=list)

    def allow(self, status: int, method: str, path: str) -> None:
        """Expect `method` on a path matching the regex `path` to be answered `status`."""
        self.allowed.append((status, method, re.compile(path)))

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type not in ("error", "warning"):
            return
        status = _CONSOLE_STATUS.match(message.text)
        if status:
            # Chromium logs every 4xx a script fetches; the response itself is checked below.
            self.console_statuses.append(int(status.group(1)))
        else:
            self.problems.append(f"console {message.type}: {message.text} ({message.location})")

    def on_response(self, response: Response) -> None:
        if response.status >= 400:
            path = urlsplit(response.url).path
            self.http_errors.append((response.status, response.request.method, path))

    def unexpected(self) -> list[str]:
        found = list(self.problems)
        for status, method, path in self.http_errors:
            if not any(
                status == s and method == m and p.fullmatch(path) for s, m, p in self.allowed
            ):
                found.append(f"unexpected HTTP {status}: {method} {path}")
        statuses = sorted(s for s, _, _ in self.http_errors)
        if sorted(self.console_statuses) != statuses:
            found.append(f"console logged statuses {self.console_statuses}, responses {statuses}")
        return found


@pytest.fixture
def browser_log() -> BrowserLog:
    return BrowserLog()


@pytest.fixture
def page(browser: Browser, browser_log: BrowserLog) -> Iterator[Page]:
    """A fresh page in a context of its own (no storage shared between tests)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)
    context = browser.new_context(
        timezone_id=TIMEZONE, locale="en-GB", viewport={"width": 1280, "height": 900}
    )
    page = context.new_page()
    page.on("console", browser_log.on_console)
    page.on("pageerror", lambda error: browser_log.problems.append(f"page error: {error}"))
    page.on(
        "requestfailed",
        lambda r: browser_log.problems.append(f"request failed: {r.method} {r.url} {r.failure}"),
    )
    page.on("response", browser_log.on_response)
    page.on("request", lambda r: browser_log.requests.append(r))
    yield page
    # Let what the page was doing settle, so its console messages are in.
    page.wait_for_timeout(100)
    context.close()
    problems = browser_log.unexpected()
    assert not problems, "\n".join(problems)


@contextmanager
def serve_http(settings: Settings) -> Iterator[str]:
    """The app built for `settings`, served over HTTP by uvicorn as `taskrunner api` serves it,
    in a thread of this process (it starts in milliseconds; a new process takes seconds on a
    busy machine). Yields its URL."""
    config = uvicorn.Config(
        build_app(settings), host="127.0.0.1", port=0, log_config=None, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard-api", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 30, "the API to start")
        assert server.started, "the API did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def taskrunner(spawn: Callable[..., Proc], database_url: str) -> Iterator[Callable[..., str]]:
    """Serve the API on this test's database, with a `taskrunner worker` process beside it when
    `worker=True`; returns the API's URL."""
    with ExitStack() as stack:

        def start(
            *, worker: bool = False, env: dict[str, str] | None = None, **settings: Any
        ) -> str:
            if worker:
                # Not waited for: it starts (seconds, on a busy machine) while the page loads.
                spawn(
                    "worker",
                    ready=False,
                    env={
                        "TASKRUNNER_DATABASE_URL": database_url,
                        "TASKRUNNER_FOO_DELAY_S": "0.2",
                        "TASKRUNNER_POLL_INTERVAL_S": "0.2",
                        **(env or {}),
                    },
                )
            return stack.enter_context(serve_http(Settings(database_url=database_url, **settings)))

        yield start
