"""The HTTPS door on the public port: `GET /healthz` and the WebSocket tunnel `GET /v1/tunnel`.

The door authenticates a tunnel request (the bearer token: a short-lived token
from `ssh USER@GATEWAY token`, or a configured static one) and turns it into a
`TunnelRequest`; policy, the dial, the upgrade and the session's life are
`run_session`'s. Every refusal is an HTTP error whose JSON body and reason phrase
say why (the helper prints it); nothing is dialled for a refused request.
"""

from __future__ import annotations

import re
import ssl
from typing import Any, Protocol

from aiohttp import web
from structlog.typing import FilteringBoundLogger

from gateway.errors import AuthError
from gateway.net.https import HTTPSServer
from gateway.policy import Principal
from gateway.protocols.lifecycle import Client, Deps, ProtocolHandler, run_session
from gateway.protocols.tunnel import TunnelRequest, TunnelSide
from gateway.tokens import TokenService

_PORT = re.compile(r"[0-9]{1,5}")


class AuthObserver(Protocol):
    def auth_failed(self, method: str, reason: str) -> None: ...


def _refuse(status: int, error: str, message: str) -> web.Response:
    # The reason phrase carries the message too: a WebSocket client sees only status and phrase.
    phrase = message.encode("ascii", "replace").decode()[:200]
    return web.json_response({"error": error, "message": message}, status=status, reason=phrase)


class PublicApp:
    def __init__(
        self,
        node: str,
        *,
        deps: Deps | None = None,
        tokens: TokenService | None = None,
        tunnel: ProtocolHandler[TunnelRequest, Any, TunnelSide] | None = None,
        max_message: int = 1024 * 1024,
        ping_interval: float = 30.0,
        log: FilteringBoundLogger | None = None,
        auth_observer: AuthObserver | None = None,
    ) -> None:
        self._node = node
        self._deps = deps
        self._tokens = tokens
        self._tunnel = tunnel
        self._max_message = max_message
        self._ping_interval = ping_interval
        self._log = log
        self._auth_observer = auth_observer

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/healthz", self.healthz)
        if self._tunnel is not None:
            app.router.add_get("/v1/tunnel", self.tunnel)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": self._node})

    async def tunnel(self, request: web.Request) -> web.StreamResponse:
        assert self._deps is not None and self._tokens is not None and self._tunnel is not None and self._log is not None
        log = self._log.bind(source_ip=request.remote)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            log.info("tunnel_refused", reason="token_missing")
            self._count_auth("token_missing")
            return _refuse(401, "unauthorized", "a bearer token is required: get one with `ssh USER@GATEWAY token`")
        try:
            claims = self._tokens.verify(token)
        except AuthError as exc:
            log.info("tunnel_refused", reason=exc.reason)
            self._count_auth(exc.reason)
            return _refuse(401, "unauthorized", f"{exc.message}: get a new one with `ssh USER@GATEWAY token`")
        user = self._deps.policy.user(claims.user)
        if user is None:
            log.info("tunnel_refused", reason="unknown_user", token_id=claims.token_id)
            self._count_auth("unknown_user")
            return _refuse(401, "unauthorized", "the token's user is not configured")
        vm_name = request.query.get("vm", "")
        port_text = request.query.get("port", "")
        # ASCII digits only: str.isdigit() accepts "²" and 5000-digit numbers, which int() then chokes on.
        if not vm_name or len(vm_name) > 64 or not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            return _refuse(400, "bad_request", "give ?vm=NAME&port=1-65535")
        principal = Principal(user.name, user.groups, "token")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = Client(principal, request.remote or "", int(peer[1]) if peer else 0)
        side = TunnelSide(request, max_message=self._max_message, ping_interval=self._ping_interval)
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        tunnel = TunnelRequest(principal, vm_name, int(port_text), upgrade=upgrade)
        await run_session(self._deps, self._tunnel, tunnel, client, side, target=vm_name)
        return side.response

    def _count_auth(self, reason: str) -> None:
        if self._auth_observer is not None:
            self._auth_observer.auth_failed("token", reason)


def public_https(app: PublicApp, ssl_context: ssl.SSLContext, log: FilteringBoundLogger, header_timeout: float) -> HTTPSServer:
    return HTTPSServer(app.build(), ssl_context, log, header_timeout=header_timeout)
