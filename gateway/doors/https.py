"""The HTTPS door on the public port: `GET /healthz` and the WebSocket tunnel `GET /v1/tunnel`.

A tunnel request is checked completely before the upgrade: the bearer token (a
short-lived token from `ssh USER@GATEWAY token`, or a configured static one), then
the rules for the VM and port, then the dial to the inventory address. Any refusal
is an HTTP error whose JSON body and reason phrase say why (the helper prints it);
nothing is dialled for a refused request.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

from aiohttp import web
from structlog.typing import FilteringBoundLogger

from gateway.errors import AuthError, GatewayError
from gateway.net.https import HTTPSServer
from gateway.net.upstream import dial
from gateway.policy import Policy, Principal
from gateway.protocols.base import Client, NullUpstreamObserver, UpstreamObserver
from gateway.protocols.tunnel import TunnelHandler
from gateway.tokens import TokenService


def _refuse(status: int, error: str, message: str) -> web.Response:
    # The reason phrase carries the message too: a WebSocket client sees only status and phrase.
    phrase = message.encode("ascii", "replace").decode()[:200]
    return web.json_response({"error": error, "message": message}, status=status, reason=phrase)


class PublicApp:
    def __init__(
        self,
        node: str,
        *,
        policy: Policy | None = None,
        tokens: TokenService | None = None,
        tunnel: TunnelHandler | None = None,
        connect_timeout: float = 10.0,
        max_message: int = 1024 * 1024,
        log: FilteringBoundLogger | None = None,
        observer: UpstreamObserver | None = None,
        door_observer: Any = None,
    ) -> None:
        self._node = node
        self._policy = policy
        self._tokens = tokens
        self._tunnel = tunnel
        self._timeout = connect_timeout
        self._max_message = max_message
        self._log = log
        self._observer = observer or NullUpstreamObserver()
        self._door_observer = door_observer

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/healthz", self.healthz)
        if self._tunnel is not None:
            app.router.add_get("/v1/tunnel", self.tunnel)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": self._node})

    async def tunnel(self, request: web.Request) -> web.StreamResponse:
        assert self._policy is not None and self._tokens is not None and self._tunnel is not None and self._log is not None
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
        user = self._policy.user(claims.user)
        if user is None:
            log.info("tunnel_refused", reason="unknown_user", token_id=claims.token_id)
            self._count_auth("unknown_user")
            return _refuse(401, "unauthorized", "the token's user is not configured")
        vm_name = request.query.get("vm", "")
        port_text = request.query.get("port", "")
        if not vm_name or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            return _refuse(400, "bad_request", "give ?vm=NAME&port=1-65535")
        principal = Principal(user.name, user.groups, "token")
        try:
            grant = self._policy.check_tunnel(principal, vm_name, int(port_text))
        except GatewayError as exc:
            log.info("tunnel_refused", user=user.name, target=vm_name[:64], port=int(port_text), reason=exc.reason)
            if self._door_observer is not None:
                self._door_observer.refused(exc.reason)
            return _refuse(403, "forbidden", exc.message)
        started = time.monotonic()
        try:
            sock = await dial(grant.vm.address, grant.port, self._timeout)
        except GatewayError as exc:
            self._observer.dial_failed(grant.vm.name, exc.reason)
            log.warning("upstream_dial_failed", user=user.name, vm=grant.vm.name, port=grant.port, reason=exc.reason, error=exc.message)
            return _refuse(502, exc.reason, f"cannot reach VM {grant.vm.name!r} port {grant.port}: {exc.message}")
        self._observer.dial_succeeded(grant.vm.name, time.monotonic() - started)
        ws = web.WebSocketResponse(max_msg_size=self._max_message, heartbeat=30.0, compress=False)
        try:
            await ws.prepare(request)
        except BaseException:
            sock.close()
            raise
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = Client(principal, request.remote or "", int(peer[1]) if peer else 0)
        await self._tunnel.serve(ws, sock, grant, client)
        return ws

    def _count_auth(self, reason: str) -> None:
        if self._door_observer is not None:
            self._door_observer.auth_failed("token", reason)


def public_https(app: PublicApp, ssl_context: ssl.SSLContext, log: FilteringBoundLogger, header_timeout: float) -> HTTPSServer:
    return HTTPSServer(app.build(), ssl_context, log, header_timeout=header_timeout)
