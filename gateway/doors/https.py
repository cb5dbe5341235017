"""The HTTPS door: TLS and aiohttp on sockets the listener accepted on the public port."""

from __future__ import annotations

import asyncio
import socket
import ssl

from aiohttp import web
from structlog.typing import FilteringBoundLogger


def build_public_app(node: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": node})

    app.router.add_get("/healthz", healthz)
    return app


class HTTPSDoor:
    """Owns the aiohttp runner; each accepted socket becomes one aiohttp connection over TLS."""

    def __init__(
        self, app: web.Application, ssl_context: ssl.SSLContext, log: FilteringBoundLogger, handshake_timeout: float = 10.0
    ) -> None:
        self._app = app
        self._ssl = ssl_context
        self._log = log
        self._handshake_timeout = handshake_timeout
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()

    async def handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Own `sock` from here. aiohttp's server tracks the connection until it closes or we stop."""
        assert self._runner is not None and self._runner.server is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(self._runner.server, sock, ssl=self._ssl, ssl_handshake_timeout=self._handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._log.info("tls_handshake_failed", source_ip=peer[0], source_port=peer[1], error=str(exc)[:200])
            sock.close()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
