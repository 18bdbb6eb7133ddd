"""The API token: which requests need it, how it is checked, and the 401 before anything else.

`Authorize` is outside every layer but BasePath (`middleware.layers`): a request that needs the
token and lacks it is answered 401 before its body is counted, read or parsed, on every path
(the hot path, the FastAPI app, the Lambda handler). The FastAPI app's dependency (`app.check_token`)
checks by the same function, `authorized`, and declares the scheme in the OpenAPI document.

No FastAPI or Starlette here: the Lambda handler imports this on a cold start.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from functions.errors import Unauthorized
from functions.http.responses import send_detail, status_of

# HTTP's optional whitespace (RFC 9110, 5.6.3): all that is ignored around the credentials.
# (str.strip() would also drop \x85 and \xa0, which a client may have meant as the token's.)
_OWS = b" \t"
# What GET and HEAD may read without the token: the dashboard's page (its script asks for the
# token), the health check, the documentation and static files. "" is the base path without
# its slash (redirected to it).
PUBLIC_PATHS = frozenset({"", "/", "/healthz", "/docs", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/static/", "/docs/assets/")
MISSING = "missing or wrong `Authorization: Bearer <token>` header"


def authorized(headers: Iterable[tuple[bytes, bytes]], token: bytes) -> bool:
    """Whether the first Authorization header of `headers` is `Bearer <token>`: the scheme in
    any case (RFC 9110), spaces and tabs around the credentials ignored, nothing else."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.strip(_OWS).partition(b" ")
            credentials = credentials.strip(_OWS)
            # compare_digest on bytes: the header's bytes as sent, whatever their encoding.
            return (
                scheme.lower() == b"bearer"
                and bool(credentials)
                and hmac.compare_digest(credentials, token)
            )
    return False


def is_public(method: str, path: str) -> bool:
    """Whether `method` on `path` (without the base path) is served without the token."""
    return method in ("GET", "HEAD") and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES))


class Authorize:
    """Answer 401 to a request that needs the token and does not carry it, reading nothing of
    its body; pass every other request to `app`.

    Every route but the public ones (`is_public`) needs the token, so a request without it
    learns nothing, not even whether its path or method names a route (401, not 404 or 405).
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not authorized(scope["headers"], self.token):
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            if not is_public(scope["method"], path):
                await send_detail(send, *status_of(Unauthorized(MISSING), scope["path"]))
                return
        await self.app(scope, receive, send)
