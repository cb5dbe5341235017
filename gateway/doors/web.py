"""The web door on the public port: sign-in (a one-time link or the organisation's OIDC provider), the page, the
VM list, and the browser terminal's WebSocket.

A browser session is an HttpOnly, Secure, SameSite=Strict cookie naming a `websessions.WebSession`. Requests
that change state (sign-out) and the terminal's WebSocket upgrade must come from this origin (the `Origin`
header equals `https://` + the request's Host), so another site can neither use the cookie nor open a
terminal with it. A terminal is a session like any other: `run_session` with `protocols/ssh_web.SSHWebHandler`,
which checks the same rules as `ssh USER+VM` (a browser user reaches only what the same user could over SSH).
Pages carry a strict CSP; every text the page shows is set as text, never as HTML.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Protocol

from aiohttp import web
from structlog.typing import FilteringBoundLogger

from gateway.clock import Clock
from gateway.errors import AuthError, GatewayError
from gateway.locks import LockStore
from gateway.net.https import peer_of
from gateway.net.startups import source_key
from gateway.policy import Principal
from gateway.protocols.lifecycle import Client, Deps, ProtocolHandler, run_session
from gateway.protocols.ssh_web import WebTerminalRequest, WebTerminalSide, terminal_size
from gateway.sessions.connections import ConnectionRegistry
from gateway.tokens import TokenService
from gateway.userca import CliLogins, Identities, UserCA, parse_public_key
from gateway.websessions import WebSession, WebSessions

COOKIE = "bastion_session"
LINK_LIFETIME = 60.0  # seconds a one-time sign-in link is good for
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
        "font-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_TYPES = {".html": "text/html", ".js": "application/javascript", ".mjs": "application/javascript", ".css": "text/css"}


class Identity(Protocol):
    @property
    def user(self) -> str: ...

    @property
    def groups(self) -> tuple[str, ...]: ...


class OIDCLogin(Protocol):
    """What the web door needs from `gateway/oidc.py` (the authorization code flow with PKCE and a nonce)."""

    def begin(self, redirect_uri: str) -> tuple[str, Any]: ...

    async def finish(self, pending: Any, code: str) -> Identity: ...


class PendingStore(Protocol):
    def add(self, pending: Any) -> None: ...

    def take(self, state: str) -> Any | None: ...


class _PerSource:
    """What one source (an IPv4 address or IPv6 /64) may start before signing in: `burst` per `window` seconds.

    `/login/oidc` and `/api/cli/start` each create a pending entry before anyone is known; the stores are bounded,
    and this keeps one source from churning them (evicting other people's sign-ins). Bounded too: the oldest
    sources are forgotten first.
    """

    def __init__(self, clock: Clock, burst: int = 20, window: float = 60.0, max_sources: int = 10_000) -> None:
        self._clock = clock
        self._burst = burst
        self._window = window
        self._max = max_sources
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()  # source -> (window start, count)

    def allow(self, address: str) -> bool:
        key = source_key(address)
        now = self._clock.monotonic()
        start, count = self._seen.pop(key, (now, 0))
        if now - start >= self._window:
            start, count = now, 0
        self._seen[key] = (start, count + 1)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return count < self._burst


def _json_error(status: int, error: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "message": message, **extra}, status=status, headers={"Cache-Control": "no-store"})


class WebDoor:
    def __init__(
        self,
        *,
        deps: Deps,
        handler: ProtocolHandler[WebTerminalRequest, Any, WebTerminalSide],
        sessions: WebSessions,
        tokens: TokenService,
        log: FilteringBoundLogger,
        connections: ConnectionRegistry | None = None,
        locks: LockStore | None = None,
        ping_interval: float = 30.0,
        max_message: int = 1024 * 1024,
        oidc: OIDCLogin | None = None,
        pending: PendingStore | None = None,
        end_connection: Callable[[str, str], object] | None = None,
        redirect_base: str | None = None,
        cli: CliLogins | None = None,
        user_ca: UserCA | None = None,
        identities: Identities | None = None,
        claim_once: Callable[[str, float], Awaitable[bool | None]] | None = None,
    ) -> None:
        self._claim_once = claim_once  # with [cluster]: a link spent on one node is spent on every node, at once
        self.cli = cli
        self._ca = user_ca
        self._identities = identities
        self._starts = _PerSource(deps.registry.clock)
        self._redirect_base = redirect_base  # the gateway's public https://HOST[:PORT], when the Host header is not it
        self._deps = deps
        self.handler = handler
        self.sessions = sessions
        self._tokens = tokens
        self._log = log
        self._connections = connections
        self._locks = locks
        self._ping = ping_interval
        self._max_message = max_message
        self.oidc = oidc
        self.pending = pending
        self._end_connection = end_connection

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/static/web/{path:.+}", self.static)
        app.router.add_get("/api/me", self.me)
        app.router.add_get("/api/vms", self.vms)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/login/link", self.link)
        app.router.add_get("/login/oidc", self.oidc_begin)
        app.router.add_get("/login/oidc/callback", self.oidc_callback)
        app.router.add_get("/ws/terminal", self.terminal)
        if self.cli is not None:
            app.router.add_post("/api/cli/start", self.cli_start)
            app.router.add_get("/api/cli/poll", self.cli_poll)
            app.router.add_post("/api/cli/approve", self.cli_approve)
            app.router.add_get("/cli", self.cli_page)

    # -- helpers --
    def _session(self, request: web.Request) -> WebSession | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        return origin is not None and origin == f"https://{request.host}"

    def _sign_in(self, request: web.Request, principal: Principal) -> web.Response:
        cookie, _ = self.sessions.create(principal)
        self._log.info(
            "web_signed_in", user=principal.name, method=principal.auth_method, source_ip=request.remote, lifetime_s=self.sessions.lifetime
        )
        resp = web.Response(status=303, headers={**_PAGE_HEADERS, "Location": "/"})
        resp.set_cookie(COOKIE, cookie, max_age=int(self.sessions.lifetime), path="/", secure=True, httponly=True, samesite="Strict")
        return resp

    def _refusal_page(self, status: int, message: str) -> web.Response:
        # A plain-text answer: nothing the client sent is echoed into HTML.
        return web.Response(status=status, text=f"{message}\n", content_type="text/plain", headers=_PAGE_HEADERS)

    # -- pages --
    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=_static("index.html"), content_type="text/html", headers=_PAGE_HEADERS)

    async def static(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        parts = path.split("/")
        if any(p in ("", ".", "..") or not all(c.isalnum() or c in "._-" for c in p) for p in parts) or len(path) > 200:
            raise web.HTTPNotFound()
        try:
            body = _static(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise web.HTTPNotFound() from None
        kind = next((t for ext, t in _TYPES.items() if path.endswith(ext)), "application/octet-stream")
        return web.Response(body=body, content_type=kind, headers=_PAGE_HEADERS)

    # -- API --
    async def me(self, request: web.Request) -> web.Response:
        s = self._session(request)
        if s is None:
            return _json_error(401, "signed_out", "sign in first", oidc=self.oidc is not None)
        expires = datetime.fromtimestamp(s.expires, UTC).isoformat().replace("+00:00", "Z")
        return web.json_response(
            {"user": s.principal.name, "groups": list(s.principal.groups), "auth_method": s.principal.auth_method, "expires_at": expires,
             "oidc": self.oidc is not None},
            headers={"Cache-Control": "no-store"},
        )  # fmt: skip

    async def vms(self, request: web.Request) -> web.Response:
        s = self._session(request)
        if s is None:
            return _json_error(401, "signed_out", "sign in first", oidc=self.oidc is not None)
        policy = self._deps.policy
        rows = []
        for vm, protos in policy.reachable(s.principal):
            if "ssh" not in protos:
                continue
            logins = policy.ssh_logins(s.principal, vm)
            if logins:
                default = vm.default_login if vm.default_login in logins else None
                rows.append({"name": vm.name, "logins": list(logins), "default_login": default})
        return web.json_response({"vms": rows}, headers={"Cache-Control": "no-store"})

    async def logout(self, request: web.Request) -> web.Response:
        if not self._same_origin(request):
            return _json_error(403, "cross_origin", "sign-out must come from this site")
        s = self._session(request)
        if s is not None:
            self.sessions.end(s)
            for cid in list(s.connections):
                if self._end_connection is not None:
                    self._end_connection(cid, "You signed out.")
            self._log.info("web_signed_out", user=s.principal.name, source_ip=request.remote, terminals=len(s.connections))
        resp = web.Response(status=204, headers={"Cache-Control": "no-store"})
        resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return resp

    # -- sign-in --
    async def link(self, request: web.Request) -> web.Response:
        token = request.query.get("t", "")
        try:
            claims = self._tokens.verify(token)
        except AuthError as exc:
            self._log.info("web_sign_in_refused", reason=exc.reason, method="link", source_ip=request.remote)
            text = "This sign-in link is not valid (it works once, for a minute): run `ssh USER@GATEWAY web` again."
            return self._refusal_page(401, text)
        user = self._deps.policy.user(claims.user)
        if claims.purpose != "web" or user is None:
            self._log.info("web_sign_in_refused", reason="token_wrong_purpose" if user else "unknown_user", method="link")
            return self._refusal_page(401, "This sign-in link is not valid: run `ssh USER@GATEWAY web` again.")
        self._tokens.revoke(claims)  # one use
        if self._claim_once is not None and await self._claim_once(claims.token_id, claims.expires_at) is False:
            # Behind a balancer the same link may reach two nodes; only the first use counts (Redis unreachable:
            # None, and this node's own memory still stops a second use here).
            self._log.info("web_sign_in_refused", reason="token_revoked", method="link", user=user.name, source_ip=request.remote)
            return self._refusal_page(401, "This sign-in link was already used (it works once): run `ssh USER@GATEWAY web` again.")
        if self._locks is not None and (lock := self._locks.match(user=user.name, source=request.remote or "")) is not None:
            self._log.info("web_sign_in_refused", reason="locked", method="link", user=user.name, lock_id=lock.id)
            return self._refusal_page(403, lock.refusal())
        return self._sign_in(request, Principal(user.name, user.groups, "link"))

    async def oidc_begin(self, request: web.Request) -> web.Response:
        if self.oidc is None or self.pending is None:
            return self._refusal_page(404, "Sign-in with an identity provider is not configured here.")
        if not self._starts.allow(request.remote or ""):
            self._log.info("web_sign_in_refused", reason="too_many_starts", method="oidc", source_ip=request.remote)
            return self._refusal_page(429, "Too many sign-ins started from your address; wait a minute.")
        base = self._redirect_base or f"https://{request.host}"
        try:
            url, pending = self.oidc.begin(f"{base}/login/oidc/callback")
        except GatewayError as exc:
            self._log.warning("web_sign_in_refused", reason=exc.reason, method="oidc", error=exc.message)
            return self._refusal_page(503, f"Sign-in with the identity provider is not available right now: {exc.message}")
        self.pending.add(pending)
        raise web.HTTPFound(url, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    async def oidc_callback(self, request: web.Request) -> web.Response:
        if self.oidc is None or self.pending is None:
            return self._refusal_page(404, "Sign-in with an identity provider is not configured here.")
        pending = self.pending.take(request.query.get("state", ""))
        code = request.query.get("code", "")
        if pending is None or not code:
            self._log.info("web_sign_in_refused", reason="oidc_state", method="oidc", source_ip=request.remote)
            return self._refusal_page(400, "This sign-in is not valid any more: start again from the gateway's page.")
        try:
            identity = await self.oidc.finish(pending, code)
        except GatewayError as exc:
            self._log.info("web_sign_in_refused", reason=exc.reason, method="oidc", source_ip=request.remote)
            return self._refusal_page(401, f"Sign-in failed: {exc.message}")
        if self._locks is not None and (lock := self._locks.match(user=identity.user, source=request.remote or "")) is not None:
            self._log.info("web_sign_in_refused", reason="locked", method="oidc", user=identity.user, lock_id=lock.id)
            return self._refusal_page(403, lock.refusal())
        configured = self._deps.policy.user(identity.user)
        groups = tuple(dict.fromkeys((*identity.groups, *(configured.groups if configured else ()))))
        return self._sign_in(request, Principal(identity.user, groups, "oidc"))

    # -- `bastion login`: a certificate for native tools, approved in the browser --
    async def cli_start(self, request: web.Request) -> web.Response:
        """No cookie needed: the command sends its public key and gets an id, a code and the URL to approve it at."""
        assert self.cli is not None
        if not self._starts.allow(request.remote or ""):
            return _json_error(429, "too_many", "too many sign-ins started from your address; wait a minute")
        try:
            body = await request.json()
            key = parse_public_key(body.get("public_key") if isinstance(body, dict) else None)
        except (ValueError, UnicodeDecodeError) as exc:
            return _json_error(400, "bad_request", str(exc) if not isinstance(exc, UnicodeDecodeError) else "body must be JSON")
        login = self.cli.start(key)
        if login is None:
            return _json_error(503, "busy", "too many sign-ins are waiting; try again in a few minutes")
        url = f"{self._redirect_base or f'https://{request.host}'}/cli?id={login.id}"
        self._log.info("cli_login_started", login_id=login.id[:8], source_ip=request.remote)
        return web.json_response({"id": login.id, "code": login.code, "url": url, "expires_in": 600})

    async def cli_poll(self, request: web.Request) -> web.Response:
        assert self.cli is not None
        login_id = request.query.get("id", "")
        login = self.cli.get(login_id)
        if login is None:
            return _json_error(404, "expired", "this sign-in expired or was already used: run `bastion login` again")
        if login.certificate is None:
            return web.json_response({"status": "pending"}, status=202)
        taken = self.cli.take(login_id)
        assert taken is not None and taken.valid_before is not None
        valid = datetime.fromtimestamp(taken.valid_before, UTC).isoformat().replace("+00:00", "Z")
        return web.json_response({"status": "approved", "certificate": taken.certificate, "user": taken.user, "valid_before": valid})

    async def cli_approve(self, request: web.Request) -> web.Response:
        """The signed-in browser approves a pending `bastion login` with the code the command printed."""
        assert self.cli is not None and self._ca is not None
        if not self._same_origin(request):
            return _json_error(403, "cross_origin", "approvals must come from this site")
        s = self._session(request)
        if s is None:
            return _json_error(401, "signed_out", "sign in first", oidc=self.oidc is not None)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _json_error(400, "bad_request", "body must be JSON")
        login = self.cli.get(str(body.get("id", ""))[:64]) if isinstance(body, dict) else None
        code = str(body.get("code", "")).strip().upper() if isinstance(body, dict) else ""
        if login is None or login.certificate is not None:
            return _json_error(404, "expired", "this sign-in expired or was already approved: run `bastion login` again")
        if not secrets.compare_digest(code.replace("-", ""), login.code.replace("-", "")):
            self._log.info("cli_login_refused", user=s.principal.name, reason="wrong_code")
            return _json_error(403, "wrong_code", "the code does not match the one `bastion login` printed")
        cert, until = self._ca.sign(login.public_key, s.principal.name)
        login.certificate, login.user, login.valid_before = cert, s.principal.name, until
        if self._identities is not None and self._deps.policy.user(s.principal.name) is None:
            self._identities.remember(s.principal.name, s.principal.groups, until)
        self._log.info("certificate_issued", user=s.principal.name, method=s.principal.auth_method, lifetime_s=self._ca.lifetime)
        return web.Response(status=204)

    async def cli_page(self, request: web.Request) -> web.Response:
        return web.Response(body=_static("cli.html"), content_type="text/html", headers=_PAGE_HEADERS)

    # -- the terminal --
    async def terminal(self, request: web.Request) -> web.StreamResponse:
        s = self._session(request)
        if s is None:
            return _json_error(401, "signed_out", "sign in first")
        if not self._same_origin(request):
            origin = request.headers.get("Origin", "")[:100]
            self._log.info("web_terminal_refused", reason="cross_origin", user=s.principal.name, origin=origin)
            return _json_error(403, "cross_origin", "a terminal can only be opened from this site")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return _json_error(400, "upgrade_required", "this endpoint needs a WebSocket")
        vm = request.query.get("vm", "")
        login = request.query.get("login") or None
        size = terminal_size(request.query.get("cols", "80"), request.query.get("rows", "24"))
        if not vm or len(vm) > 64 or (login is not None and len(login) > 32) or size is None:
            return _json_error(400, "bad_request", "give ?vm=NAME[&login=LOGIN]&cols=1-1000&rows=1-500")
        source = peer_of(request)
        record = (
            self._connections.add(s.principal.name, source, "web", s.principal.auth_method, lambda text: None)
            if self._connections is not None
            else None
        )
        side = WebTerminalSide(request, ping_interval=self._ping, max_message=self._max_message)
        try:
            if record is not None:
                record.channel_opened()
                s.connections.add(record.id)
            client = Client(s.principal, source[0], source[1], record.id if record is not None else None)
            await run_session(self._deps, self.handler, WebTerminalRequest(s.principal, vm, login, *size), client, side, target=vm)
        finally:
            if record is not None and self._connections is not None:
                s.connections.discard(record.id)
                self._connections.remove(record)
        return side.response


def _static(path: str) -> bytes:
    return resources.files("gateway.doors").joinpath("static", "web", *path.split("/")).read_bytes()
