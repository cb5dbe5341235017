"""The HTTPS door on the public port: for now `GET /healthz`."""

from __future__ import annotations

import ssl

from aiohttp import web
from structlog.typing import FilteringBoundLogger

from gateway.net.https import HTTPSServer


def build_public_app(node: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": node})

    app.router.add_get("/healthz", healthz)
    return app


def public_https(node: str, ssl_context: ssl.SSLContext, log: FilteringBoundLogger, header_timeout: float) -> HTTPSServer:
    return HTTPSServer(build_public_app(node), ssl_context, log, header_timeout=header_timeout)
