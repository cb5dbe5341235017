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
from gateway.locks import LockStore
from gateway.net.https import HTTPSServer, Probe, RawHandler, peer_of
from gateway.net.listener import ConnectionObserver
from gateway.policy import Principal
from gateway.protocols.lifecycle import Client, Deps, ProtocolHandler, run_session
from gateway.protocols.tunnel import TunnelRequest, TunnelSide
from gateway.sessions.connections import ConnectionRegistry
from gateway.tokens import TokenService

_PORT = re.compile(r"[0-9]{1,5}")


def parse_port(text: str) -> int | None:
    """A TCP port typed by a client (`?port=`), or None. ASCII digits only: `str.isdigit()` accepts "²" and
    5000-digit numbers, which `int()` then chokes on."""
    return int(text) if _PORT.fullmatch(text) and 1 <= int(text) <= 65535 else None


class Routes(Protocol):
    """Another door's routes on this app (the web door's pages and terminal)."""

    def add_routes(self, app: web.Application) -> None: ...


class AuthObserver(Protocol):
    def auth_failed(self, method: str, reason: str) -> None: ...

    def refused(self, reason: str) -> None: ...


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
        connections: ConnectionRegistry | None = None,
        locks: LockStore | None = None,
        max_per_token: int = 20,
        web: Routes | None = None,
    ) -> None:
        self._web = web
        self._connections = connections
        self._locks = locks
        self._max_per_token = max_per_token
        self._per_token: dict[str, int] = {}  # live tunnels by token id (bounded: each entry is a live tunnel)
        self._node = node
        self._deps = deps
        self._tokens = tokens
        self._tunnel = tunnel
        self._max_message = max_message
        self._ping_interval = ping_interval
        self._log = log
        self._auth_observer = auth_observer

    def reconfigure(
        self, *, tunnel: ProtocolHandler[TunnelRequest, Any, TunnelSide], max_message: int, ping_interval: float, max_per_token: int
    ) -> None:
        """A reload: new tunnels use these; live ones keep theirs."""
        self._tunnel = tunnel
        self._max_message = max_message
        self._ping_interval = ping_interval
        self._max_per_token = max_per_token

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/healthz", self.healthz)
        if self._tunnel is not None:
            app.router.add_get("/v1/tunnel", self.tunnel)
        if self._web is not None:
            self._web.add_routes(app)
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
        if claims.purpose != "tunnel":
            log.info("tunnel_refused", reason="token_wrong_purpose", token_id=claims.token_id)
            self._count_auth("token_wrong_purpose")
            text = "this token is for the RD Gateway (an .rdp file): get a tunnel token with `ssh USER@GATEWAY token`"
            return _refuse(401, "unauthorized", text)
        user = self._deps.policy.user(claims.user)
        if user is None:
            log.info("tunnel_refused", reason="unknown_user", token_id=claims.token_id)
            self._count_auth("unknown_user")
            return _refuse(401, "unauthorized", "the token's user is not configured")
        if self._locks is not None:
            lock = self._locks.match(user=user.name, source=request.remote or "")
            if lock is not None:
                log.info("tunnel_refused", reason="locked", user=user.name, lock_id=lock.id)
                self._count_refusal("locked")
                return _refuse(403, "locked", lock.refusal())
            if not claims.static and self._locks.token_revoked(user.name, claims.issued_at):
                log.info("tunnel_refused", reason="token_revoked", user=user.name, token_id=claims.token_id)
                self._count_auth("token_revoked")
                text = "this token was revoked by an operator's lock: get a new one with `ssh USER@GATEWAY token`"
                return _refuse(401, "unauthorized", text)
        token_key = f"{user.name}:{claims.token_id}"
        if self._per_token.get(token_key, 0) >= self._max_per_token:
            log.info("tunnel_refused", reason="token_tunnel_limit", user=user.name, limit=self._max_per_token)
            self._count_refusal("token_tunnel_limit")
            return _refuse(429, "too_many", f"at most {self._max_per_token} tunnels at once on one token")
        vm_name = request.query.get("vm", "")
        port = parse_port(request.query.get("port", ""))
        if not vm_name or len(vm_name) > 64 or port is None:
            return _refuse(400, "bad_request", "give ?vm=NAME&port=1-65535")
        principal = Principal(user.name, user.groups, "token")
        source = peer_of(request)
        # A WebSocket client carries one tunnel: ending the connection is ending its session (which AccessControl does).
        record = self._connections.add(user.name, source, "websocket", "token", lambda text: None) if self._connections else None
        client = Client(principal, source[0], source[1], record.id if record is not None else None)
        side = TunnelSide(request, max_message=self._max_message, ping_interval=self._ping_interval)
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        tunnel = TunnelRequest(principal, vm_name, port, upgrade=upgrade)
        self._per_token[token_key] = self._per_token.get(token_key, 0) + 1
        if record is not None:
            record.channel_opened()
        try:
            await run_session(self._deps, self._tunnel, tunnel, client, side, target=vm_name)
        finally:
            n = self._per_token.pop(token_key, 1) - 1
            if n > 0:
                self._per_token[token_key] = n
            if record is not None and self._connections is not None:
                self._connections.remove(record)
        return side.response

    def _count_auth(self, reason: str) -> None:
        if self._auth_observer is not None:
            self._auth_observer.auth_failed("token", reason)

    def _count_refusal(self, reason: str) -> None:
        if self._auth_observer is not None:
            self._auth_observer.refused(reason)


def public_https(
    app: PublicApp,
    ssl_context: ssl.SSLContext,
    log: FilteringBoundLogger,
    header_timeout: float,
    *,
    handshake_timeout: float = 5.0,
    max_handshakes: int = 256,
    observer: ConnectionObserver | None = None,
    raw: tuple[Probe, RawHandler] | None = None,
) -> HTTPSServer:
    """The public HTTPS server: aiohttp for health and tunnels; what `raw`'s probe claims (RD Gateway) to its handler."""
    return HTTPSServer(
        app.build(),
        ssl_context,
        log,
        header_timeout=header_timeout,
        handshake_timeout=handshake_timeout,
        max_handshakes=max_handshakes,
        observer=observer,
        raw=raw,
    )
