"""Jump mode: a direct-tcpip channel relayed to a TCP connection to an inventory address.

The client's inner SSH (for `ssh -J`) or any TCP stream (for `ssh -L`) passes
through unchanged. Backpressure both ways: the SSH channel stops reading while
the socket's send buffer is above its high-water mark, and the socket stops
reading while the channel's send buffer is full. EOF passes through
(half-close) and starts the rule's half-close timer; once both directions have
seen EOF the transport is closed at once (uvloop crashed on half-closed
transports left open under churn).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import cast

import asyncssh

from gateway.errors import GatewayError
from gateway.kinds import Reason
from gateway.net.upstream import dial, reset
from gateway.policy import Grant, Policy, Principal
from gateway.protocols.lifecycle import ended_reason
from gateway.protocols.ssh_disconnect import disconnect_with_notice
from gateway.sessions.registry import Session


@dataclass(frozen=True)
class JumpRequest:
    """A direct-tcpip channel the SSH door authenticated: the host and port as the client typed them."""

    principal: Principal
    host: str
    port: int


class JumpSide:
    """The user's end: a direct-tcpip channel that opens only once the VM was reached.

    `channel` resolves to the channel's session object (asyncssh then opens the
    channel) or fails with the ChannelOpenError the client prints.
    """

    def __init__(self) -> None:
        self.channel: asyncio.Future[ChannelSide] = asyncio.get_running_loop().create_future()
        self.pair: _Pair | None = None

    def notice(self, text: str) -> bool:
        return False  # the stream is the user's own SSH or TCP: no room for text

    async def refuse(self, error: GatewayError) -> None:
        if not self.channel.done():
            self.channel.set_exception(refuse(error))

    def give_up(self) -> None:
        if not self.channel.done():
            self.channel.set_exception(asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "the gateway is shutting down"))

    async def end(self, text: str) -> None:
        # Jump users see no channel text: the reason travels in the SSH DISCONNECT message.
        # asyncssh opens the channel just after `serve` handed it over: wait for that (bounded).
        if self.pair is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self.pair.opened
        await disconnect_with_notice(self.pair.chan, text, pty=False)


class _Pair:
    """Shared state of one relayed channel: both ends and the session."""

    def __init__(self, session: Session) -> None:
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.session = session
        self.early: list[bytes] = []  # VM bytes that arrived before the channel was open
        self.up_eof = False  # user -> VM direction finished
        self.down_eof = False  # VM -> user direction finished
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport_lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # the VM socket is gone

    def maybe_close(self) -> None:
        """Both directions finished: the side that sent EOF first ended the session (the other only followed)."""
        if self.up_eof and self.down_eof:
            self.session.end(Reason.CLIENT_CLOSED if self.session.half_closed_side == "user" else Reason.VM_CLOSED)
            self.close()

    def close(self, *, abort: bool = False) -> None:
        if self.transport is not None:
            reset(self.transport) if abort else self.transport.close()
        if self.chan is not None:
            self.chan.abort() if abort else self.chan.close()


class ChannelSide(asyncssh.SSHTCPSession[bytes]):
    def __init__(self, pair: _Pair) -> None:
        self._p = pair

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._p.chan = chan
        if not self._p.opened.done():
            self._p.opened.set_result(None)
        for chunk in self._p.early:
            chan.write(chunk)
            self._p.session.add_down(len(chunk))
        self._p.early.clear()
        if self._p.down_eof:
            chan.write_eof()
        if self._p.transport is not None and not self._p.transport.is_closing():
            self._p.transport.resume_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        t = self._p.transport
        if t is not None and not t.is_closing():
            t.write(data)
            self._p.session.add_up(len(data))

    def eof_received(self) -> bool:
        self._p.up_eof = True
        self._p.session.half_closed("user")
        t = self._p.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()
        self._p.maybe_close()
        return True

    def pause_writing(self) -> None:
        if self._p.transport is not None and not self._p.transport.is_closing():
            self._p.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._p.transport is not None and not self._p.transport.is_closing():
            self._p.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._p.session.end(ended_reason(exc, user=True))
        t = self._p.transport
        if t is not None:
            reset(t) if exc is not None else t.close()


class SocketSide(asyncio.Protocol):
    def __init__(self, pair: _Pair) -> None:
        self._p = pair

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._p.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        c = self._p.chan
        if c is not None:
            c.write(data)
            self._p.session.add_down(len(data))
            return
        # The channel is not open yet (uvloop may deliver data before a pause
        # requested in connection_made takes effect): hold it, and stop reading.
        self._p.early.append(data)
        if self._p.transport is not None:
            self._p.transport.pause_reading()

    def eof_received(self) -> bool:
        self._p.down_eof = True
        self._p.session.half_closed("vm")
        if self._p.chan is not None:
            self._p.chan.write_eof()
        self._p.maybe_close()
        return True

    def pause_writing(self) -> None:
        if self._p.chan is not None:
            self._p.chan.pause_reading()

    def resume_writing(self) -> None:
        if self._p.chan is not None:
            self._p.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._p.session.end(ended_reason(exc, user=False))
        if not self._p.transport_lost.done():
            self._p.transport_lost.set_result(None)
        c = self._p.chan
        if c is not None:
            c.abort() if exc is not None else c.close()


# After an orderly end both sides get this long to take what is still buffered for them; then the sockets are aborted.
_FLUSH_DEADLINE = 2.0


class _JumpRelay:
    def __init__(self, pair: _Pair) -> None:
        self._pair = pair

    async def close(self) -> None:
        """Flush and close after an orderly end (both sides finished); abort otherwise.

        A peer that stopped reading (the idle, half-close or operator end of a stuck stream) must not keep
        the gateway's socket open with data queued for it: that socket is aborted, at once or after the flush
        deadline.
        """
        pair = self._pair
        orderly = pair.session.reason in (Reason.CLIENT_CLOSED, Reason.VM_CLOSED)
        pair.close(abort=not orderly)
        if orderly and pair.transport is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FLUSH_DEADLINE):
                    await pair.transport_lost
            if not pair.transport_lost.done():
                pair.close(abort=True)


class SSHJumpHandler:
    """Turns an allowed direct-tcpip request into a relay to the inventory address."""

    kind = "ssh-jump"

    def __init__(self, connect_timeout: float) -> None:
        self._timeout = connect_timeout

    def authorize(self, policy: Policy, request: JumpRequest) -> Grant:
        return policy.check_forward(request.principal, request.host, request.port)

    async def connect(self, request: JumpRequest, grant: Grant) -> socket.socket:
        return await dial(grant.vm.address, grant.port, self._timeout)

    def discard(self, upstream: socket.socket) -> None:
        upstream.close()

    async def serve(self, request: JumpRequest, grant: Grant, upstream: socket.socket, client: JumpSide, session: Session) -> _JumpRelay:
        loop = asyncio.get_running_loop()
        pair = _Pair(session)
        try:
            await loop.create_connection(lambda: SocketSide(pair), sock=upstream)
        except OSError as exc:
            upstream.close()
            raise GatewayError(f"cannot reach VM {grant.vm.name!r}: {exc}", reason="upstream_failed") from None
        client.pair = pair
        if not client.channel.done():
            client.channel.set_result(ChannelSide(pair))
        return _JumpRelay(pair)


def refuse(exc: GatewayError) -> asyncssh.ChannelOpenError:
    """The channel-open failure a client prints for a refused forward."""
    code = asyncssh.OPEN_CONNECT_FAILED if exc.reason.startswith("upstream") else asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
    return asyncssh.ChannelOpenError(code, exc.message)
