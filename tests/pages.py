"""Every URL an HTML page makes the browser load."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit


class _Urls(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # src and href; spec-url is ReDoc's OpenAPI document.
        self.urls += [v for k, v in attrs if k in ("src", "href", "spec-url") and v is not None]


def page_urls(html: str) -> list[str]:
    """The src, href and spec-url attributes of `html`, and Swagger UI's `url: '...'`."""
    parser = _Urls()
    parser.feed(html)
    return parser.urls + re.findall(r"\burl: '([^']*)'", html)


def is_local(url: str) -> bool:
    """No scheme and no host: the URL points into the site that served the page."""
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc and url.startswith("/")
