"""The RD Gateway door on the public port: `RDG_OUT_DATA` / `RDG_IN_DATA` on `/remoteDesktopGateway/`.

The HTTPS server hands these requests over (aiohttp's parser rejects the methods and FreeRDP's WebSocket key)
right after TLS. This door answers the HTTP layer (a 101 for the WebSocket transport; for the legacy HTTP
transport a 200 with 10 seed bytes on OUT, and IN joined to it by `RDG-Connection-Id`), then the tunnel's
first packets: HANDSHAKE (PAA, the token scheme, only: NTLM is refused), TUNNEL_CREATE with the token
(checked here: signature, expiry, purpose, user, locks, one tunnel at a time), TUNNEL_AUTH (the client's
machine name), CHANNEL_CREATE (an inventory VM name and port). Then `run_session` does the rest with
`protocols/rdg.RdgHandler`, like every protocol: policy (an `rdp` rule), the dial, the registry, limits.

Everything before CHANNEL_CREATE happens before we know who this is, so it is bounded: one deadline from
the request head to CHANNEL_CREATE (`PREAUTH_DEADLINE`), an 8 KiB request head, small packets, at most a
few of them, a bounded number of HTTP-transport OUT connections waiting for their IN. A refusal is the
HRESULT FreeRDP prints by name; bad framing closes the connection with one (rate-limited) log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, Protocol

from structlog.typing import FilteringBoundLogger

import gateway.protocols.rdg_codec as rdg
from gateway.errors import AuthError
from gateway.kinds import PenaltyEvent
from gateway.locks import LockStore
from gateway.net.penalties import Penalties
from gateway.net.ratelog import RateLimitedLog
from gateway.policy import Principal
from gateway.protocols.lifecycle import Client, Deps, ProtocolHandler, run_session
from gateway.protocols.rdg import HttpChannel, RdgChannel, RdgRequest, RdgSide, WsChannel
from gateway.sessions.connections import ConnectionRegistry
from gateway.text import one_line
from gateway.tokens import TokenClaims, TokenService

PATH = "/remotedesktopgateway/"
PREAUTH_DEADLINE = 10.0  # seconds from the TLS handshake's end to CHANNEL_CREATE (app.py: public.header_timeout)
MAX_HEAD = 8192
MAX_PREAUTH_PACKETS = 8  # HANDSHAKE, TUNNEL_CREATE, TUNNEL_AUTH, CHANNEL_CREATE and a few keepalives
PREAUTH_MAX_PACKET = 24 * 1024  # TUNNEL_CREATE carries the token (ours are a few hundred bytes)
DATA_MAX_PACKET = rdg.MAX_DATA + 64
MAX_PENDING = 128  # HTTP-transport OUT connections waiting for their IN connection
SEED = 10  # FreeRDP skips exactly 10 bytes after the OUT channel's 200 (MS-TSGU says 100)
PAA = rdg.HTTP_EXTENDED_AUTH_PAA
E_PROXY_NOTSUPPORTED = 0x800759E8  # HRESULT form: FreeRDP fails the handshake only on the severity bit
_NTLM_REFUSED = "only token sign-in is supported: get an .rdp file with `ssh -p 443 USER@GATEWAY rdp VM`"


class DoorObserver(Protocol):
    def auth_failed(self, method: str, reason: str) -> None: ...

    def refused(self, reason: str) -> None: ...


class RdgDoor:
    """Shared by every RD Gateway connection: the token check, the OUT/IN pairing and the per-token count."""

    def __init__(
        self,
        *,
        deps: Deps,
        handler: ProtocolHandler[RdgRequest, Any, RdgSide],
        tokens: TokenService,
        log: FilteringBoundLogger,
        locks: LockStore | None = None,
        connections: ConnectionRegistry | None = None,
        observer: DoorObserver | None = None,
        preauth_deadline: float = PREAUTH_DEADLINE,
        penalties: Penalties | None = None,
    ) -> None:
        self.preauth_deadline = preauth_deadline
        self._penalties = penalties  # like SSH: a bad token or a client cut at the deadline earns its source a penalty
        self._deps = deps
        self._tokens = tokens
        self._log = log
        self._locks = locks
        self._connections = connections
        self._observer = observer
        self._pending: dict[str, asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Event]]] = {}
        self.handler: ProtocolHandler[RdgRequest, Any, RdgSide] = handler
        self._live: set[str] = set()  # token ids with a tunnel open now: one at a time per token
        self._noise = RateLimitedLog()

    @staticmethod
    def probe(first: bytes) -> bool | None:
        return rdg.is_rdg_request_line(first)

    def _penalize(self, peer: tuple[str, int], event: PenaltyEvent) -> None:
        if self._penalties is not None:
            self._penalties.record(peer[0], event)

    def _refused(self, log: FilteringBoundLogger, reason: str, **fields: object) -> None:
        """What a stranger can cause all day: counted, logged one line a second per reason."""
        if self._observer is not None:
            self._observer.refused(f"rdg_{reason}" if not reason.startswith("rdg_") else reason)
        self._noise.info(log, "rdg_refused", reason, **fields)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple[str, int]) -> None:
        """Own the TLS stream of one `RDG_*` request until its tunnel ends. Never raises for what a client sent."""
        log = self._log.bind(source_ip=peer[0], source_port=peer[1])
        deadline = asyncio.get_running_loop().time() + self.preauth_deadline
        try:
            async with asyncio.timeout_at(deadline):
                head = await _read_head(reader)
        except TimeoutError:
            self._refused(log, "preauth_timeout", limit_s=self.preauth_deadline)
            self._penalize(peer, PenaltyEvent.GRACE_EXCEEDED)
            return
        except (rdg.RdgError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            self._refused(log, getattr(exc, "reason", "bad_http"), error=str(exc)[:200])
            self._penalize(peer, PenaltyEvent.NO_AUTH)
            return
        if head.target.split("?", 1)[0].lower() != PATH:
            await _answer(writer, 404, "Not Found")
            return
        if head.method == "RDG_IN_DATA":
            await self._in_data(head, reader, writer, log, deadline)
            return
        if head.headers.get("upgrade", "").lower() == "websocket":
            key = head.headers.get("sec-websocket-key", "")
            try:
                accept = rdg.websocket_accept(key)
            except rdg.RdgError:
                await _answer(writer, 400, "Bad Request")
                return
            writer.write(
                rdg.response_head(
                    101, "Switching Protocols", [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)]
                )
            )
            packets = rdg.PacketReader(max_packet=PREAUTH_MAX_PACKET)
            await self._tunnel(WsChannel(reader, writer, packets), packets, peer, log, deadline)
            return
        await self._out_data(head, reader, writer, peer, log, deadline)

    async def _out_data(  # noqa: PLR0917 - the one request's parts, passed on from handle()
        self,
        head: rdg.RequestHead,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: tuple[str, int],
        log: FilteringBoundLogger,
        deadline: float,
    ) -> None:
        """The legacy transport's OUT connection: 200 and the seed, then wait (bounded) for the IN connection."""
        conn_id = head.headers.get("rdg-connection-id", "")
        if not 1 <= len(conn_id) <= 64 or conn_id in self._pending:
            await _answer(writer, 400, "Bad Request")
            return
        if len(self._pending) >= MAX_PENDING:
            self._refused(log, "pending_limit", limit=MAX_PENDING)
            await _answer(writer, 503, "Service Unavailable")
            return
        writer.write(rdg.response_head(200, "OK") + os.urandom(SEED))  # no Content-Length: the body is the tunnel
        joined = asyncio.get_running_loop().create_future()
        self._pending[conn_id] = joined
        try:
            async with asyncio.timeout_at(deadline):
                in_reader, in_writer, done = await joined
        except TimeoutError:
            self._refused(log, "preauth_timeout", limit_s=self.preauth_deadline, stage="waiting for RDG_IN_DATA")
            return
        finally:
            self._pending.pop(conn_id, None)
        packets = rdg.PacketReader(max_packet=PREAUTH_MAX_PACKET)
        try:
            await self._tunnel(HttpChannel(writer, in_reader, in_writer, packets), packets, peer, log, deadline)
        finally:
            done.set()

    async def _in_data(
        self, head: rdg.RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: FilteringBoundLogger, deadline: float
    ) -> None:
        """The legacy transport's IN connection: joins its OUT, whose tunnel then reads this connection's chunks."""
        joined = self._pending.get(head.headers.get("rdg-connection-id", ""))
        if joined is None or joined.done():
            await _answer(writer, 404, "Not Found")
            return
        writer.write(rdg.response_head(200, "OK", [("Content-Length", "0")]))
        try:
            async with asyncio.timeout_at(deadline):
                body_head = await _read_head(reader)
        except TimeoutError:
            self._refused(log, "preauth_timeout", limit_s=self.preauth_deadline, stage="RDG_IN_DATA body")
            return
        except (rdg.RdgError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            self._refused(log, getattr(exc, "reason", "bad_http"), error=str(exc)[:200])
            return
        if body_head.method != "RDG_IN_DATA" or "chunked" not in body_head.headers.get("transfer-encoding", "").lower():
            self._refused(log, "bad_http", error="the IN channel's body must be chunked")
            return
        done = asyncio.Event()
        if joined.done():
            return
        joined.set_result((reader, writer, done))
        await done.wait()  # the OUT side's tunnel reads this connection now; it stays held as long

    async def _tunnel(
        self, channel: RdgChannel, packets: rdg.PacketReader, peer: tuple[str, int], log: FilteringBoundLogger, deadline: float
    ) -> None:
        claims: TokenClaims | None = None
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    started = await self._preauth(channel, peer, log)
            except TimeoutError:
                self._refused(log, "preauth_timeout", limit_s=self.preauth_deadline)
                self._penalize(peer, PenaltyEvent.GRACE_EXCEEDED)
                return
            except rdg.RdgError as exc:
                self._refused(log, exc.reason, error=str(exc)[:200])
                self._penalize(peer, PenaltyEvent.NO_AUTH)
                return
            except (ConnectionError, OSError):
                return
            if started is None:
                return
            request, client_name = started
            claims = request.token
            packets.set_max_packet(DATA_MAX_PACKET)
            await self._session(channel, request, client_name, peer)
        finally:
            if claims is not None:
                self._live.discard(claims.token_id)
            channel.abort()

    async def _session(self, channel: RdgChannel, request: RdgRequest, client_name: str, peer: tuple[str, int]) -> None:
        record = (
            self._connections.add(request.principal.name, peer, "rdg", "token", lambda text: None)
            if self._connections is not None
            else None
        )
        try:
            if record is not None:
                record.channel_opened()
            client = Client(request.principal, peer[0], peer[1], record.id if record is not None else None, client_name or None)
            side = RdgSide(channel, self._tokens, request.token)
            await run_session(self._deps, self.handler, request, client, side, target=request.vm)
        finally:
            if record is not None and self._connections is not None:
                self._connections.remove(record)

    async def _preauth(self, channel: RdgChannel, peer: tuple[str, int], log: FilteringBoundLogger) -> tuple[RdgRequest, str] | None:
        """HANDSHAKE, TUNNEL_CREATE (the token), TUNNEL_AUTH, CHANNEL_CREATE. None: refused (and told) or gone."""
        stage = "handshake"
        seen = 0
        principal: Principal | None = None
        claims: TokenClaims | None = None
        client_name = ""
        while True:
            batch = await channel.read()
            if not batch:
                return None
            for pkt in batch:
                seen += 1
                if seen > MAX_PREAUTH_PACKETS:
                    raise rdg.RdgError("bad_packet", f"more than {MAX_PREAUTH_PACKETS} packets before CHANNEL_CREATE")
                if isinstance(pkt, rdg.Keepalive):
                    continue
                if stage == "handshake" and isinstance(pkt, rdg.HandshakeRequest):
                    if not pkt.ext_auth & PAA:
                        log.info("rdg_refused", reason="auth_scheme", error=_NTLM_REFUSED, ext_auth=pkt.ext_auth)
                        self._count_auth("auth_scheme")
                        await _send_and_close(channel, rdg.handshake_response(E_PROXY_NOTSUPPORTED, ext_auth=0))
                        return None
                    channel.write(rdg.handshake_response(0, ext_auth=PAA))
                    stage = "tunnel"
                elif stage == "tunnel" and isinstance(pkt, rdg.TunnelCreate):
                    found = self._authenticate(pkt.paa_cookie, peer, log)
                    if found is None:
                        self._penalize(peer, PenaltyEvent.AUTH_FAILURE)
                        await _send_and_close(channel, rdg.tunnel_response(rdg.E_PROXY_COOKIE_AUTHENTICATION_ACCESS_DENIED))
                        return None
                    principal, claims = found
                    channel.write(rdg.tunnel_response(0))
                    stage = "auth"
                elif stage == "auth" and isinstance(pkt, rdg.TunnelAuth):
                    client_name = one_line(pkt.client_name)[:64]
                    channel.write(rdg.tunnel_auth_response(0))
                    stage = "channel"
                elif stage == "channel" and isinstance(pkt, rdg.ChannelCreate):
                    assert principal is not None and claims is not None
                    resource = one_line(pkt.resources[0] if pkt.resources else "")[:64]
                    return RdgRequest(principal, resource, pkt.port, claims), client_name
                else:
                    raise rdg.RdgError("bad_packet", f"{type(pkt).__name__} during the {stage} stage")
            await channel.drain()

    def _authenticate(self, cookie: str | None, peer: tuple[str, int], log: FilteringBoundLogger) -> tuple[Principal, TokenClaims] | None:
        """The token of TUNNEL_CREATE: valid, an RD Gateway token, a configured user, not locked, not in use."""
        if not cookie:
            return self._token_refused(log, "token_missing")
        try:
            claims = self._tokens.verify(cookie)
        except AuthError as exc:
            return self._token_refused(log, exc.reason, error=exc.message)
        if claims.purpose != "rdg":
            return self._token_refused(log, "token_wrong_purpose", token_id=claims.token_id)
        user = self._deps.policy.user(claims.user)
        if user is None:
            return self._token_refused(log, "unknown_user", token_id=claims.token_id)
        if self._locks is not None:
            lock = self._locks.match(user=user.name, source=peer[0])
            if lock is not None:
                return self._token_refused(log, "locked", user=user.name, lock_id=lock.id)
            if self._locks.token_revoked(user.name, claims.issued_at):
                return self._token_refused(log, "token_revoked", user=user.name, token_id=claims.token_id)
        if claims.token_id in self._live:
            return self._token_refused(log, "token_in_use", user=user.name, token_id=claims.token_id)
        self._live.add(claims.token_id)
        log.info("rdg_tunnel_created", user=user.name, token_id=claims.token_id, vm=claims.vm, port=claims.port)
        return Principal(user.name, user.groups, "token"), claims

    def _token_refused(self, log: FilteringBoundLogger, reason: str, **fields: object) -> tuple[Principal, TokenClaims] | None:
        """Log and count a refused token; the caller answers E_PROXY_COOKIE_AUTHENTICATION_ACCESS_DENIED."""
        log.info("rdg_refused", reason=reason, **fields)
        self._count_auth(reason)
        return None

    def _count_auth(self, reason: str) -> None:
        if self._observer is not None:
            self._observer.auth_failed("rdg_token", reason)


async def _read_head(reader: asyncio.StreamReader) -> rdg.RequestHead:
    raw = await reader.readuntil(b"\r\n\r\n")
    return rdg.parse_head(raw, max_bytes=MAX_HEAD)


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    """An HTTP answer with no body (FreeRDP would read a body with a Content-Type into its packet stream)."""
    with contextlib.suppress(ConnectionError, OSError, RuntimeError, TimeoutError):
        writer.write(rdg.response_head(status, reason, [("Content-Length", "0"), ("Connection", "close")]))
        async with asyncio.timeout(2.0):
            await writer.drain()


async def _send_and_close(channel: RdgChannel, packet: bytes) -> None:
    with contextlib.suppress(ConnectionError, OSError, RuntimeError, TimeoutError):
        channel.write(packet)
        async with asyncio.timeout(2.0):
            await channel.drain()
    channel.abort()
