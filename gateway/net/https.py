"""aiohttp over TLS on sockets a Listener accepted, with a deadline for request headers.

aiohttp has no deadline for request headers, so a client that trickles bytes
would hold a connection for the keep-alive time. Here every connection serves
one request (`Connection: close`) and is aborted if that request's headers have
not arrived within `header_timeout` of the TLS handshake. Long requests (SSE,
WebSockets) are fine: the deadline only covers the headers.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler
from structlog.typing import FilteringBoundLogger


async def _plain_server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp announces "Python/3.x aiohttp/3.y": no versions for a scanner to match against.
    response.headers["Server"] = "bastion"


class HTTPSServer:
    """Owns an aiohttp runner; `handle()` takes ownership of one accepted socket."""

    def __init__(
        self,
        app: web.Application,
        ssl_context: ssl.SSLContext,
        log: FilteringBoundLogger,
        *,
        handshake_timeout: float = 10.0,
        header_timeout: float = 10.0,
    ) -> None:
        self._app = app
        self._ssl = ssl_context
        self._log = log
        self._handshake_timeout = handshake_timeout
        self._header_timeout = header_timeout
        self._runner: web.AppRunner | None = None
        # Transports whose request headers arrived, until their deadline passes. Keyed by
        # id() but checked by identity, so a recycled id cannot vouch for a new connection.
        self._seen: dict[int, asyncio.BaseTransport] = {}
        app.middlewares.insert(0, self._one_request)
        app.on_response_prepare.append(_plain_server_header)

    @web.middleware
    async def _one_request(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.transport is not None:
            self._seen[id(request.transport)] = request.transport
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # A raised 404/405/400 (aiohttp 3 answers with the exception itself) would otherwise leave the
            # connection in keep-alive with aiohttp's hour-long timer, past the header deadline: close it too.
            exc.force_close()
            raise
        if not response.prepared:
            response.force_close()
        return response

    def _expire(self, transport: asyncio.BaseTransport, peer: tuple[str, int]) -> None:
        if self._seen.get(id(transport)) is transport:
            del self._seen[id(transport)]
            return
        if not transport.is_closing():
            self._log.info("http_request_timeout", source_ip=peer[0], source_port=peer[1], limit_s=self._header_timeout)
            cast(asyncio.Transport, transport).abort()

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()

    async def handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Own `sock` from here: TLS handshake, then aiohttp serves it until it closes or we stop."""
        assert self._runner is not None and self._runner.server is not None
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                self._runner.server, sock, ssl=self._ssl, ssl_handshake_timeout=self._handshake_timeout
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._log.info("tls_handshake_failed", source_ip=peer[0], source_port=peer[1], error=str(exc)[:200])
            sock.close()
            return
        loop.call_later(self._header_timeout, self._expire, transport, peer)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
