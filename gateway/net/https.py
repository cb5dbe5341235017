"""aiohttp over TLS on sockets a Listener accepted, with a deadline for request headers.

aiohttp has no deadline for request headers, so a client that trickles bytes
would hold a connection for the keep-alive time. Here every connection serves
one request (`Connection: close`) and is aborted if that request's headers have
not arrived within `header_timeout` of the TLS handshake. Long requests (SSE,
WebSockets) are fine: the deadline only covers the headers.

A TLS handshake costs the server a key exchange and buffers (half-sent ClientHellos once held 3000 fds and 136 MB):
at most `max_handshakes` run at once, each within `handshake_timeout`; a connection beyond the cap is closed at once,
counted and logged rate-limited.

The client's address is the `peer` the listener handed over (behind a load balancer, the one its PROXY header named,
not the socket's): every request on the connection gets it as `request.remote` and `peer_of(request)`.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Handler
from structlog.typing import FilteringBoundLogger

from gateway.kinds import Refusal
from gateway.net.listener import ConnectionObserver
from gateway.net.ratelog import RateLimitedLog

# A probe looks at the first bytes after TLS: True, the raw handler's; False, aiohttp's; None, not enough bytes yet.
Probe = Callable[[bytes], bool | None]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, tuple[str, int]], Awaitable[None]]
_SNIFF = 32  # bytes enough to tell a request line's method
_RAW_LIMIT = 64 * 1024
PEER = web.RequestKey("bastion_peer", tuple)  # (ip, port) of the client, as the listener was told


def peer_of(request: web.Request) -> tuple[str, int]:
    """The client's (ip, port): the listener's peer (true behind a PROXY header), else the socket's."""
    peer = request.get(PEER)
    if peer is not None:
        return (str(peer[0]), int(peer[1]))
    sock = request.transport.get_extra_info("peername") if request.transport else None
    return (request.remote or "", int(sock[1]) if sock else 0)


class _Sniffer(asyncio.Protocol):
    """The first protocol of a TLS connection when a raw handler is registered: buffers until `probe` decides.

    Bytes arriving after the decision (before the switch) are kept too; whoever takes over gets all of them.
    """

    def __init__(self, probe: Probe, decided: asyncio.Future[bool]) -> None:
        self._probe = probe
        self.decided = decided
        self.buf = bytearray()
        self.lost = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.decided.done():
            return
        verdict = self._probe(bytes(self.buf[:_SNIFF]))
        if verdict is None and len(self.buf) < _SNIFF:
            return
        if self._transport is not None:
            self._transport.pause_reading()
        self.decided.set_result(bool(verdict))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.decided.done():
            self.decided.set_result(False)


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
        handshake_timeout: float = 5.0,
        header_timeout: float = 10.0,
        max_handshakes: int = 256,
        observer: ConnectionObserver | None = None,
        name: str = "public",
        raw: tuple[Probe, RawHandler] | None = None,
    ) -> None:
        self._raw = raw  # (probe of the first bytes, handler of the requests it claims), e.g. RD Gateway
        self._max_handshakes = max_handshakes
        self.handshakes = 0  # in progress now
        self._observer = observer
        self._name = name  # the listener's name, a metric label
        self._refusal_log = RateLimitedLog()
        self._app = app
        self._ssl = ssl_context
        self._log = log
        self._handshake_timeout = handshake_timeout
        self._header_timeout = header_timeout
        self._runner: web.AppRunner | None = None
        self._open: dict[object, asyncio.Future[None]] = {}  # transport -> set when its connection is lost
        self._peers: dict[object, tuple[str, int]] = {}  # aiohttp's protocol (`request.protocol`) -> the listener's peer
        self._lost: Callable[[Any, BaseException | None], None] | None = None
        # Transports whose request headers arrived, until their deadline passes. Keyed by
        # id() but checked by identity, so a recycled id cannot vouch for a new connection.
        self._seen: dict[int, asyncio.BaseTransport] = {}
        app.middlewares.insert(0, self._one_request)
        app.on_response_prepare.append(_plain_server_header)

    @web.middleware
    async def _one_request(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.transport is not None:
            self._seen[id(request.transport)] = request.transport
        peer = self._peers.get(request.protocol)
        if peer is not None:
            if request.remote != peer[0]:
                request = request.clone(remote=peer[0])
            request[PEER] = peer
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

    def set_tls(
        self, ssl_context: ssl.SSLContext, header_timeout: float, handshake_timeout: float | None = None, max_handshakes: int | None = None
    ) -> None:
        """A reload: new handshakes use the new certificate and limits; live connections keep theirs."""
        self._ssl = ssl_context
        self._header_timeout = header_timeout
        if handshake_timeout is not None:
            self._handshake_timeout = handshake_timeout
        if max_handshakes is not None:
            self._max_handshakes = max_handshakes

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        # aiohttp's Server is told when each connection ends; that is the one hook for "this connection is gone".
        self._lost = server.connection_lost
        server.connection_lost = self._connection_lost  # type: ignore[method-assign]

    async def handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Own `sock` from here: TLS handshake, then aiohttp serves it until it closes or we stop."""
        assert self._runner is not None and self._runner.server is not None
        loop = asyncio.get_running_loop()
        if self.handshakes >= self._max_handshakes:
            sock.close()
            if self._observer is not None:
                self._observer.connection_refused(self._name, Refusal.MAX_TLS_HANDSHAKES)
            self._refusal_log.warning(
                self._log,
                "connection_refused",
                Refusal.MAX_TLS_HANDSHAKES,
                listener=self._name,
                source_ip=peer[0],
                source_port=peer[1],
                limit=self._max_handshakes,
            )
            return
        self.handshakes += 1
        sniffer: _Sniffer | None = None
        mine: list[object] = []  # aiohttp's protocol for this connection, mapped to `peer` until its connection is lost
        factory: Callable[[], asyncio.BaseProtocol] = functools.partial(self._protocol_for, peer, mine)
        if self._raw is not None:
            probe = self._raw[0]
            sniffer = _Sniffer(probe, loop.create_future())
            factory = lambda: sniffer  # noqa: E731 - one protocol object for this one connection
        connected = False
        try:
            transport, _ = await loop.connect_accepted_socket(factory, sock, ssl=self._ssl, ssl_handshake_timeout=self._handshake_timeout)
            connected = True
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # A scanner fails handshakes all day: one line a second, with how many were not written.
            self._refusal_log.info(self._log, "tls_handshake_failed", "handshake_failed", source_ip=peer[0], error=str(exc)[:200])
            sock.close()
            return
        finally:
            self.handshakes -= 1
            if not connected:  # a failed or cancelled handshake: aiohttp's protocol never saw the connection
                for proto in mine:
                    self._peers.pop(proto, None)
        started = loop.time()
        if sniffer is not None and not await self._route(sniffer, transport, peer, mine):
            return
        # One deadline for the request head, counted from the handshake's end (the sniffing included).
        loop.call_later(max(0.0, self._header_timeout - (loop.time() - started)), self._expire, transport, peer)
        # Return only when the connection is gone, so the listener's caps count it for its whole life,
        # not just its handshake (a source could otherwise hold rate x header_timeout connections).
        # Keyed by the transport: uvloop returns its SSLProtocol here, while aiohttp reports its own handler, whose
        # `transport` is this one.
        closed = loop.create_future()
        self._open[transport] = closed
        try:
            if not transport.is_closing():
                await closed
        finally:
            self._open.pop(transport, None)

    def _protocol_for(self, peer: tuple[str, int], mine: list[object]) -> asyncio.Protocol:
        """aiohttp's protocol for one connection, which `_one_request` finds the client's `peer` by."""
        assert self._runner is not None and self._runner.server is not None
        proto = self._runner.server()
        self._peers[proto] = peer
        mine.append(proto)
        return proto

    async def _route(self, sniffer: _Sniffer, transport: asyncio.Transport, peer: tuple[str, int], mine: list[object]) -> bool:
        """Read the first bytes after TLS: hand a raw-protocol request (RD Gateway's `RDG_*` methods, which aiohttp's
        parser rejects) to the raw handler and return False once it is done; True: aiohttp serves the connection."""
        assert self._raw is not None and self._runner is not None and self._runner.server is not None
        try:
            async with asyncio.timeout(self._header_timeout):
                raw = await sniffer.decided
        except TimeoutError:
            self._log.info("http_request_timeout", source_ip=peer[0], source_port=peer[1], limit_s=self._header_timeout)
            transport.abort()
            return False
        if sniffer.lost:
            return False
        loop = asyncio.get_running_loop()
        if not raw:
            proto = self._protocol_for(peer, mine)
            transport.set_protocol(proto)
            proto.connection_made(transport)
            if sniffer.buf:
                proto.data_received(bytes(sniffer.buf))
            transport.resume_reading()
            return True
        reader = asyncio.StreamReader(limit=_RAW_LIMIT, loop=loop)
        stream = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(stream)
        stream.connection_made(transport)
        reader.feed_data(bytes(sniffer.buf))
        transport.resume_reading()
        writer = asyncio.StreamWriter(transport, stream, reader, loop)
        try:
            await self._raw[1](reader, writer, peer)
        finally:
            transport.abort()
        return False

    def _connection_lost(self, handler: object, exc: BaseException | None = None) -> None:
        assert self._lost is not None
        transport = getattr(handler, "transport", None)  # read before aiohttp's handler forgets it
        self._peers.pop(handler, None)
        self._lost(handler, exc)
        fut = self._open.get(transport) if transport is not None else None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
