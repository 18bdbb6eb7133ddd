"""The OpenAPI document lists every method a path answers, and a 405's `Allow` lists exactly
those (HEAD besides, wherever GET is): what schemathesis's `allow_header_conformance` checks,
path by path, here without a database."""

import dataclasses
import re

import httpx

from functions.http.app import build_app
from functions.settings import Settings

# Answered before the database is asked: nothing listens here.
NOWHERE = Settings(database_url="postgresql://taskrunner@127.0.0.1:9/none")
EXAMPLES = {
    "name": "nightly",
    "task_id": "1",
    "id": "1",
    "type": "foo",
    "unix_seconds": "1",
    "state": "STARTED",
}


async def test_every_405_allows_exactly_what_the_document_lists() -> None:
    app = build_app(NOWHERE)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert paths
        for template, operations in paths.items():
            path = re.sub(r"\{(\w+)\}", lambda m: EXAMPLES[m[1]], template)
            listed = {method.upper() for method in operations}
            if "GET" in listed:
                listed.add("HEAD")
            for method in ("OPTIONS", "PUT", "TRACE"):
                if method in listed:
                    continue
                response = await client.request(method, path)
                assert response.status_code == 405, (method, path)
                allowed = set(response.headers["allow"].split(", "))
                assert allowed == listed, (template, method)


async def test_the_dashboard_is_in_the_document_as_html() -> None:
    document = build_app(dataclasses.replace(NOWHERE, api_token="t")).openapi()
    page = document["paths"]["/"]["get"]
    assert set(page["responses"]["200"]["content"]) == {"text/html"}
    # Served without the token, as the document says: no security on the operation.
    assert "security" not in page


async def test_static_files_allow_get_and_head_and_serve_only_their_kinds() -> None:
    """Outside the document, as /docs is; their 405 still names what they allow (Starlette's
    named nothing: an empty `Allow`), and the package's own source is not a static file."""
    app = build_app(NOWHERE)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        for path in ("/static/favicon.svg", "/static/dashboard/dashboard.js"):
            assert (await client.get(path)).status_code == 200
            for method in ("POST", "DELETE", "OPTIONS", "PUT"):
                response = await client.request(method, path)
                assert response.status_code == 405, (method, path)
                assert response.headers["allow"] == "GET, HEAD", (method, path)
        assert (await client.get("/static/__init__.py")).status_code == 404


def test_routes_that_answer_503_while_the_database_is_away_say_so() -> None:
    """/healthz answers 503 whenever the database does not answer (it is the probe), and the
    page does while `taskrunner api` has not reached the database yet (local/serve.py)."""
    paths = build_app(NOWHERE).openapi()["paths"]
    for path in ("/healthz", "/"):
        assert "503" in paths[path]["get"]["responses"], path
