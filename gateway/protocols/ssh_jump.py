"""Jump mode: a direct-tcpip channel relayed to a TCP connection to an inventory address.

The client's inner SSH (for `ssh -J`) or any TCP stream (for `ssh -L`) passes
through unchanged. Backpressure both ways: the SSH channel stops reading while
the socket's send buffer is above its high-water mark, and the socket stops
reading while the channel's send buffer is full. EOF passes through
(half-close); once both directions have seen EOF the transport is closed at
once (uvloop crashed on half-closed transports left open under churn).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import asyncssh
from structlog.typing import FilteringBoundLogger

from gateway.errors import GatewayError
from gateway.net.upstream import dial
from gateway.policy import Grant
from gateway.protocols.base import Client, NullUpstreamObserver, Spawner, UpstreamObserver, session_spec
from gateway.protocols.ssh_disconnect import disconnect_with_notice, notice_text
from gateway.sessions.registry import Session, SessionRegistry


class _Pair:
    """Shared state of one relayed channel: both ends, the session, and the done signal."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.early: list[bytes] = []  # VM bytes that arrived before the channel was open
        self.up_eof = False  # user -> VM direction finished
        self.down_eof = False  # VM -> user direction finished
        self.done: asyncio.Future[str] = loop.create_future()

    def finish(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(reason)

    def maybe_close(self) -> None:
        if self.up_eof and self.down_eof:
            if self.transport is not None:
                self.transport.close()
            if self.chan is not None:
                self.chan.close()


class ChannelSide(asyncssh.SSHTCPSession[bytes]):
    def __init__(self, pair: _Pair) -> None:
        self._p = pair

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._p.chan = chan
        for chunk in self._p.early:
            chan.write(chunk)
            if self._p.session is not None:
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
            if self._p.session is not None:
                self._p.session.add_up(len(data))

    def eof_received(self) -> bool:
        self._p.up_eof = True
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
        t = self._p.transport
        if t is not None:
            if exc is not None:
                t.abort()
            else:
                t.close()
        self._p.finish("client_closed")


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
            if self._p.session is not None:
                self._p.session.add_down(len(data))
            return
        # The channel is not open yet (uvloop may deliver data before a pause
        # requested in connection_made takes effect): hold it, and stop reading.
        self._p.early.append(data)
        if self._p.transport is not None:
            self._p.transport.pause_reading()

    def eof_received(self) -> bool:
        self._p.down_eof = True
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
        c = self._p.chan
        if c is not None:
            if exc is not None:
                c.abort()
            else:
                c.close()
        self._p.finish("vm_reset" if exc is not None else "vm_closed")


class SSHJumpHandler:
    """Turns an allowed direct-tcpip request into a tracked relay."""

    kind = "ssh-jump"

    def __init__(
        self, registry: SessionRegistry, connect_timeout: float, log: FilteringBoundLogger, observer: UpstreamObserver | None = None
    ) -> None:
        self._observer = observer or NullUpstreamObserver()
        self._registry = registry
        self._timeout = connect_timeout
        self._log = log

    async def open(self, grant: Grant, client: Client, owner: Spawner) -> ChannelSide:
        """Dial the granted inventory address, start relaying, return the channel's session object.

        The session is in the registry before this returns, so no byte goes uncounted.
        Raises asyncssh.ChannelOpenError (which the client prints) if the VM cannot be reached.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            dial_sock = await dial(grant.vm.address, grant.port, self._timeout)
        except GatewayError as exc:
            self._observer.dial_failed(grant.vm.name, exc.reason)
            self._log.warning(
                "upstream_dial_failed", user=client.principal.name, vm=grant.vm.name, port=grant.port, reason=exc.reason, error=exc.message
            )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, f"cannot reach VM {grant.vm.name!r} port {grant.port}: {exc.message}"
            ) from None
        self._observer.dial_succeeded(grant.vm.name, loop.time() - started)
        pair = _Pair()
        try:
            await loop.create_connection(lambda: SocketSide(pair), sock=dial_sock)
        except OSError as exc:
            dial_sock.close()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, f"cannot reach VM {grant.vm.name!r}: {exc}") from None
        vm = grant.vm
        spec = session_spec(client, vm, grant.port, grant.protocol)
        ready = loop.create_future()

        ended: asyncio.Future[tuple[str, float]] = loop.create_future()

        async def terminate(reason: str, grace: float) -> None:
            # Jump users see no channel text (the stream is their own SSH): after the
            # grace period the reason travels in the SSH DISCONNECT message.
            if not ended.done():
                ended.set_result((reason, grace))

        async def run() -> None:
            try:
                async with self._registry.open(spec, terminate=terminate) as session:
                    pair.session = session
                    ready.set_result(None)
                    watched: set[asyncio.Future[Any]] = {pair.done, ended}
                    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                    if ended.done() and not pair.done.done():
                        text, grace = ended.result()
                        if grace > 0:
                            await asyncio.wait({pair.done}, timeout=grace)
                        if not pair.done.done():
                            await disconnect_with_notice(pair.chan, notice_text(text), pty=False)
                            pair.finish("terminated_by_operator")
                    reason = await pair.done
                    if session.close_reason is None:
                        session.close_reason = reason
            finally:
                if pair.transport is not None:
                    pair.transport.close()
                if pair.chan is not None:
                    pair.chan.close()
                if not ready.done():
                    ready.cancel()

        task = owner.spawn(run(), name=f"jump:{client.principal.name}:{vm.name}:{grant.port}")
        try:
            await ready
        except asyncio.CancelledError:
            if task.done():
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "gateway is shutting down") from None
            raise
        return ChannelSide(pair)


def refuse(exc: GatewayError) -> asyncssh.ChannelOpenError:
    """The channel-open failure a client prints for a refused forward."""
    code = asyncssh.OPEN_CONNECT_FAILED if exc.reason.startswith("upstream") else asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
    return asyncssh.ChannelOpenError(code, exc.message)
