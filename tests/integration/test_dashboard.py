"""GET / serves the dashboard's page beside the API, without the token, under the base path,
and takes no route of the API's or the original challenge's (the page itself is tested in a
browser: tests/browser/)."""

import dataclasses
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from functions.settings import Settings
from tests.conftest import serve
from tests.pages import is_local, page_urls

Sql = Callable[..., list[tuple[Any, ...]]]
# Static files and the routing around them: no PostgreSQL version reaches them.
pytestmark = pytest.mark.one_server


async def test_the_page_and_its_files_are_served_without_the_token(settings: Settings) -> None:
    async with serve(dataclasses.replace(settings, api_token="s3cret")) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        # The data is not: the page's script asks for the token.
        assert (await client.get("/stats")).status_code == 401
        # In-page links (`#/tasks`) aside, every URL is one of the site's.
        urls = [u for u in page_urls(page.text) if not u.startswith("#")]
        assert {u.split("?")[0] for u in urls} >= {
            "/static/dashboard/dashboard.js",
            "/static/dashboard/dashboard.css",
            "/static/favicon.svg",
        }
        for url in urls:
            assert is_local(url), url
            asset = await client.get(url)
            assert asset.status_code == 200, url
        head = await client.head("/")
        assert (head.status_code, head.content) == (200, b"")


async def test_every_url_of_the_page_carries_the_base_path(settings: Settings) -> None:
    async with serve(dataclasses.replace(settings, base_path="/prod")) as client:
        # /prod is sent on to /prod/, where relative links would also resolve.
        bare = await client.get("/prod")
        assert (bare.status_code, bare.headers["location"]) == (307, "http://test/prod/")
        for path in ("/prod/", "/"):
            page = await client.get(path)
            assert page.status_code == 200, path
            assert 'data-base="/prod"' in page.text
            for url in [u for u in page_urls(page.text) if not u.startswith("#")]:
                assert url.startswith("/prod/"), url
                assert (await client.get(url)).status_code == 200, url


async def test_the_page_is_outside_the_schema_and_the_original_routes_still_answer(
    settings: Settings, sql: Sql
) -> None:
    async with serve(dataclasses.replace(settings, allow_delete_all=True)) as client:
        schema = (await client.get("/openapi.json")).json()
        assert "/" in schema["paths"]
        assert set(schema["paths"]["/"]) == {"get", "delete"}
        created = await client.post("/FOO/1893499200")
        assert created.status_code == 200, created.text
        assert sql("SELECT kind FROM tasks WHERE id = %s", created.json()) == [("foo",)]
        deleted = await client.delete("/")
        assert deleted.json() == {"deleted": 1}
        assert sql("SELECT count(*) FROM tasks") == [(0,)]
        for method in ("PUT", "POST", "PATCH", "OPTIONS", "TRACE"):
            refused = await client.request(method, "/")
            assert refused.status_code == 405, method
            assert refused.headers["allow"] == "GET, HEAD, DELETE"


async def test_the_page_offers_the_task_types_this_version_runs(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert 'data-kinds="bar baz foo http"' in page.text
