"""ASGI middleware between the server (Mangum or uvicorn) and the app: base path, HEAD."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BasePath:
    """Serve the app under `base_path` (`/prod`), whether or not the request's path carries it.

    API Gateway passes `/prod/tasks` behind a custom domain's base-path mapping, and `/tasks`
    for a REST API stage on its own domain; a reverse proxy may strip the prefix or not. In every
    case the app sees `root_path` = `/prod` and a path that starts with it, as ASGI specifies, so
    routes match and the URLs it makes (`Location`, redirects, `/docs`) carry the prefix.
    Mangum's `api_gateway_base_path` only strips the prefix: the app would not know it.
    """

    def __init__(self, app: ASGIApp, base_path: str) -> None:
        self.app = app
        self.base_path = base_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            if not (path == self.base_path or path.startswith(self.base_path + "/")):
                path = self.base_path + path
            scope = {**scope, "root_path": self.base_path, "path": path}
        await self.app(scope, receive, send)


class HeadWithoutBody:
    """Answer HEAD with the headers GET would have and no body.

    uvicorn drops the body of a HEAD response itself; Mangum would hand it to API Gateway.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, send_headers_only)
