"""RDP through the RD Gateway protocol (MS-TSGU): one tunnel carries one RDP connection to an inventory VM.

The door (`doors/rdg.py`) speaks the HTTP and WebSocket layer and the tunnel's first packets (handshake, the
token in TUNNEL_CREATE, TUNNEL_AUTH, CHANNEL_CREATE); this module is the session: DATA packets both ways
between the client and the VM's RDP port, keepalives, and the ways a session ends:

- the client goes away (FreeRDP never sends CLOSE_CHANNEL: EOF is the user closing the window);
- the VM closes or resets: CLOSE_CHANNEL, then the tunnel closes;
- the gateway ends it (an operator, a lock, a limit, a reload, a restart): SERVICE_MESSAGE with the text
  (xfreerdp prints `Service message:` and the text), CLOSE_CHANNEL with a status FreeRDP names, and the
  token is revoked, so FreeRDP's auto-reconnect cannot bring the user back.

Packets go through an `RdgChannel`: the WebSocket transport (FreeRDP's default) or the legacy HTTP
transport (an OUT connection for the gateway's packets, an IN connection with a chunked body for the
client's). Both are bounded and apply backpressure (the next VM read waits for the client's drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from functools import partial
from typing import Protocol as TypingProtocol

import gateway.protocols.rdg_codec as rdg
from gateway.clock import Clock
from gateway.errors import BadRequest, GatewayError, PolicyDenied, TargetRefused, UpstreamError
from gateway.kinds import Reason
from gateway.net.upstream import dial, reset
from gateway.policy import Grant, Policy, Principal
from gateway.protocols.lifecycle import end_if_crashed, ended_reason
from gateway.sessions.registry import Session
from gateway.tokens import TokenClaims, TokenService

_READ = 64 * 1024
E_PROXY_TS_CONNECTFAILED = 0x800759DD  # the VM could not be reached (HRESULT form, so FreeRDP names it)
_FLUSH_DEADLINE = 2.0
_CLOSE_ANSWER = 2.0  # how long the client has to answer CLOSE_CHANNEL before the tunnel is dropped
# Reasons the user did not cause and that FreeRDP can name: a limit reads as a session timeout.
_TIMEOUTS = frozenset({Reason.IDLE_TIMEOUT, Reason.MAX_DURATION, Reason.HALF_CLOSE_TIMEOUT})


class RdgChannel(TypingProtocol):
    """The tunnel's packet stream, whichever transport carries it."""

    async def read(self) -> list[rdg.Packet]:
        """The next packets from the client; [] at its end. Raises RdgError (bad framing) or OSError."""
        ...

    def write(self, packet: bytes) -> None: ...

    async def drain(self) -> None: ...

    def abort(self) -> None: ...


class WsChannel:
    """RDG packets in binary WebSocket frames (client frames masked, ours not). Pings get pongs; pongs are ignored
    (FreeRDP 2.11 answers our close with one); a close frame is the client's end."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, packets: rdg.PacketReader) -> None:
        self._reader = reader
        self._writer = writer
        self.packets = packets
        self._frames = rdg.WsReader()
        self._closed = False

    async def read(self) -> list[rdg.Packet]:
        while not self._closed:
            data = await self._reader.read(_READ)
            if not data:
                return []
            out: list[rdg.Packet] = []
            for opcode, payload in self._frames.feed(data):
                if opcode in (rdg.WS_BINARY, rdg.WS_CONTINUATION):
                    out.extend(self.packets.feed(payload))
                elif opcode == rdg.WS_PING:
                    self._writer.write(rdg.ws_frame(rdg.WS_PONG, payload))
                elif opcode == rdg.WS_CLOSE:
                    self._closed = True
                    break
                elif opcode == rdg.WS_TEXT:
                    raise rdg.RdgError("bad_websocket", "a text frame in an RD Gateway tunnel")
            if out:
                return out
        return []

    def write(self, packet: bytes) -> None:
        self._writer.write(rdg.ws_frame(rdg.WS_BINARY, packet))

    async def drain(self) -> None:
        await self._writer.drain()

    def abort(self) -> None:
        if not self._writer.transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(rdg.ws_frame(rdg.WS_CLOSE, b"\x03\xe8"))
        self._writer.transport.abort()


class HttpChannel:
    """The legacy transport: our packets raw on the OUT connection's endless 200 body, the client's in chunks
    of the IN connection's second request."""

    def __init__(
        self, out_writer: asyncio.StreamWriter, in_reader: asyncio.StreamReader, in_writer: asyncio.StreamWriter, packets: rdg.PacketReader
    ) -> None:
        self._out = out_writer
        self._in = in_reader
        self._in_writer = in_writer
        self.packets = packets
        self._chunks = rdg.ChunkedReader()

    async def read(self) -> list[rdg.Packet]:
        while not self._chunks.done:
            data = await self._in.read(_READ)
            if not data:
                return []
            out: list[rdg.Packet] = []
            for chunk in self._chunks.feed(data):
                out.extend(self.packets.feed(chunk))
            if out:
                return out
        return []

    def write(self, packet: bytes) -> None:
        self._out.write(packet)

    async def drain(self) -> None:
        await self._out.drain()

    def abort(self) -> None:
        self._out.transport.abort()
        self._in_writer.transport.abort()


@dataclass(frozen=True)
class RdgRequest:
    """A channel the door authenticated: who (from the token), which VM name and port the client asked for."""

    principal: Principal
    vm: str
    port: int
    token: TokenClaims


class RdgSide:
    """The user's end: an RD Gateway tunnel whose channel is not open yet (CHANNEL_RESPONSE is the serve's)."""

    def __init__(self, channel: RdgChannel, tokens: TokenService, token: TokenClaims) -> None:
        self.channel = channel
        self._tokens = tokens
        self._token = token
        self.open = False  # CHANNEL_RESPONSE(0) was sent: service messages are shown from here on
        self.ending = False
        self.answered = asyncio.Event()  # the client's CLOSE_CHANNEL_RESPONSE
        self.session: Session | None = None

    def notice(self, text: str) -> bool:
        if not self.open or self.ending:
            return False
        try:
            self.channel.write(rdg.service_message(text))
        except (OSError, RuntimeError):
            return False
        return True

    async def refuse(self, error: GatewayError) -> None:
        status = rdg.E_PROXY_INTERNALERROR
        if isinstance(error, UpstreamError):
            status = E_PROXY_TS_CONNECTFAILED
        elif isinstance(error, PolicyDenied | TargetRefused | BadRequest) or error.reason in ("locked", "user_session_limit"):
            status = rdg.E_PROXY_RAP_ACCESSDENIED
        with contextlib.suppress(OSError, RuntimeError):
            if self.open:  # the VM failed after the channel was open
                self.channel.write(rdg.close_channel(status))
            else:
                self.channel.write(rdg.channel_response(status))
            async with asyncio.timeout(_FLUSH_DEADLINE):
                await self.channel.drain()
        self.channel.abort()

    async def end(self, text: str) -> None:
        """The gateway ends the session: the text as a service message, CLOSE_CHANNEL, and the token is void."""
        self._tokens.revoke(self._token)
        timeout = self.session is not None and self.session.reason in _TIMEOUTS
        await self.close(text, rdg.E_PROXY_SESSIONTIMEOUT if timeout else 0)

    async def close(self, text: str | None, status: int) -> None:
        if self.ending:
            return
        self.ending = True
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            if text and self.open:
                self.channel.write(rdg.service_message(text))
            self.channel.write(rdg.close_channel(status))
            async with asyncio.timeout(_CLOSE_ANSWER):
                await self.channel.drain()
                await self.answered.wait()
        self.channel.abort()


class _RdgRelay:
    def __init__(self, side: RdgSide, writer: asyncio.StreamWriter, session: Session, tasks: list[asyncio.Task[None]]) -> None:
        self._side = side
        self._writer = writer
        self._session = session
        self._tasks = tasks

    async def close(self) -> None:
        reason = self._session.reason
        # The up pump must keep reading while we wait for the client's CLOSE_CHANNEL_RESPONSE.
        if reason in (Reason.VM_CLOSED, Reason.VM_RESET, Reason.VM_SILENT):
            await self._side.close(None, 0)
        elif reason in _TIMEOUTS:
            await self._side.close(None, rdg.E_PROXY_SESSIONTIMEOUT)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._side.channel.abort()
        if reason in (Reason.CLIENT_CLOSED, Reason.VM_CLOSED):
            self._writer.close()
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(_FLUSH_DEADLINE):
                    await self._writer.wait_closed()
        reset(self._writer.transport)


class RdgHandler:
    """Relays one RD Gateway channel to one dialled VM RDP port."""

    kind = "rdg"

    def __init__(self, connect_timeout: float, keepalive_interval: float, clock: Clock) -> None:
        self._timeout = connect_timeout
        self._keepalive = keepalive_interval
        self._clock = clock

    def authorize(self, policy: Policy, request: RdgRequest) -> Grant:
        # The token names the one VM and port it was issued for; the client's CHANNEL_CREATE must match it.
        if request.token.vm != request.vm or request.token.port != request.port:
            raise PolicyDenied(f"this token is for another VM or port than {request.vm!r}:{request.port}", reason="token_target_mismatch")
        return policy.check_rdg(request.principal, request.vm, request.port)

    async def connect(self, request: RdgRequest, grant: Grant) -> socket.socket:
        return await dial(grant.vm.address, grant.port, self._timeout)

    def discard(self, upstream: socket.socket) -> None:
        upstream.close()

    async def serve(self, request: RdgRequest, grant: Grant, upstream: socket.socket, client: RdgSide, session: Session) -> _RdgRelay:
        try:
            reader, writer = await asyncio.open_connection(sock=upstream, limit=_READ)
        except OSError as exc:
            upstream.close()
            raise UpstreamError(f"cannot use the connection to VM {grant.vm.name!r}: {exc}") from None
        client.channel.write(rdg.channel_response(0, channel_id=1))
        client.open = True
        client.session = session
        loop = asyncio.get_running_loop()
        last_heard = [self._clock.monotonic()]
        tasks = [
            loop.create_task(self._user_to_vm(client, writer, session, last_heard), name=f"rdg-up:{session.id}"),
            loop.create_task(self._vm_to_user(client, reader, session), name=f"rdg-down:{session.id}"),
            loop.create_task(self._keepalives(client, session, last_heard), name=f"rdg-keepalive:{session.id}"),
        ]
        for task in tasks:
            task.add_done_callback(partial(end_if_crashed, session))
        return _RdgRelay(client, writer, session, tasks)

    async def _user_to_vm(self, side: RdgSide, writer: asyncio.StreamWriter, session: Session, last_heard: list[float]) -> None:
        try:
            while packets := await side.channel.read():
                last_heard[0] = self._clock.monotonic()
                for pkt in packets:
                    if isinstance(pkt, rdg.Data):
                        if side.ending:
                            continue
                        writer.write(pkt.payload)
                        session.add_up(len(pkt.payload))
                    elif isinstance(pkt, rdg.CloseChannelResponse):
                        side.answered.set()
                    elif isinstance(pkt, rdg.CloseChannel):  # mstsc may close its channel itself
                        side.channel.write(rdg.close_channel_response(0))
                        side.answered.set()
                        session.end(Reason.CLIENT_CLOSED)
                    elif not isinstance(pkt, rdg.Keepalive):  # a handshake or tunnel packet again: a broken client
                        session.end(Reason.CLIENT_ERROR)
                        return
                await writer.drain()
        except rdg.RdgError:
            session.end(Reason.CLIENT_ERROR)
            return
        except (ConnectionError, OSError) as exc:
            session.end(ended_reason(exc, user=True))
            return
        side.answered.set()
        session.end(Reason.CLIENT_CLOSED)  # FreeRDP never sends CLOSE_CHANNEL: its end is the user's end

    async def _vm_to_user(self, side: RdgSide, reader: asyncio.StreamReader, session: Session) -> None:
        try:
            while data := await reader.read(rdg.MAX_DATA):
                if side.ending:
                    return
                for pkt in rdg.data(data):
                    side.channel.write(pkt)
                session.add_down(len(data))
                await side.channel.drain()
        except OSError as exc:
            session.end(ended_reason(exc, user=False))
            return
        session.end(Reason.VM_CLOSED)

    async def _keepalives(self, side: RdgSide, session: Session, last_heard: list[float]) -> None:
        """A keepalive every interval (FreeRDP echoes it); a client heard from for none of 3 intervals is gone."""
        while True:
            await self._clock.sleep(self._keepalive)
            if self._clock.monotonic() - last_heard[0] > 3 * self._keepalive:
                session.end(Reason.CLIENT_SILENT)
                return
            with contextlib.suppress(OSError, RuntimeError):
                side.channel.write(rdg.keepalive())
