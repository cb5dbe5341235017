"""The WebSocket TCP tunnel: one WebSocket carries one TCP connection to an inventory address.

Binary messages carry bytes unchanged and in order. WebSockets cannot half-close, so the
helper sends a text message `{"type": "eof"}` when its local side has finished sending;
the gateway then half-closes the VM connection and keeps relaying the VM's answer until
the VM closes (within the rule's `half_close_timeout`), and then closes the WebSocket
(1000). The gateway keeps reading the WebSocket after the helper's EOF, so a helper that
goes away (or stops answering pings) ends the session at once. Backpressure both ways:
the WebSocket's reading pauses while the VM socket's write buffer is above its high-water
mark, and the VM's reading pauses while the WebSocket's is.

aiohttp answers the request and authenticates it; the 101 is a plain aiohttp response, and
from then on the frames are this module's: a parser in aiohttp's payload-parser slot (so
aiohttp still sees the connection end), and asyncio Protocols on the VM side. A binary
frame's payload is unmasked and written to the VM as it arrives (a frame over the size
limit is refused at its header, before any of it is relayed); each VM read is one frame.
The gateway pings a helper it has not heard from for `ping_interval` and ends the
session (`client_silent`) if nothing comes within half of it.

The gateway may send text messages `{"type": "notice", "message": ...}` (a warning or an
operator's notice) that the helper prints.

Close codes the helper understands:
  1000 the VM closed normally;  4001 disconnected (by an operator, a limit, a restart;
  the reason is the notice);  4408 the VM did not finish after the helper's EOF;
  4502 the VM reset or failed mid-stream;  1009 a message over the size limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp._websocket.helpers import websocket_mask  # the C (Cython) XOR aiohttp's own reader uses

from gateway.errors import BadRequest, GatewayError, UpstreamError
from gateway.kinds import Reason
from gateway.net.upstream import dial, reset
from gateway.policy import Grant, Policy, Principal
from gateway.protocols.lifecycle import ended_reason
from gateway.sessions.registry import Session

CLOSE_OPERATOR = 4001
CLOSE_HALF_CLOSE = 4408
CLOSE_VM_FAILED = 4502
_EOF = "eof"
_FLUSH_DEADLINE = 2.0
# Payloads are unmasked in pieces of at most this: a copy below glibc's mmap threshold (128 KiB) is recycled
# from the heap; 256 KiB copies were each a fresh mmap, page faults and munmap (a third of the gateway's CPU).
_PIECE = 64 * 1024
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def close_reason(text: str) -> bytes:
    """A WebSocket close reason is at most 123 bytes of UTF-8."""
    raw = text.encode()
    while len(raw) > 123:
        text = text[:-1]
        raw = (text.rstrip() + "…").encode()
    return raw


def _refusal(status: int, error: str, message: str) -> web.Response:
    # The reason phrase carries the message too: a WebSocket client sees only status and phrase.
    phrase = message.encode("ascii", "replace").decode()[:200]
    return web.json_response({"error": error, "message": message}, status=status, reason=phrase)


@dataclass(frozen=True)
class TunnelRequest:
    """A tunnel the HTTPS door authenticated: who, to which VM name and port (as typed)."""

    principal: Principal
    vm: str
    port: int
    upgrade: bool = True  # False: a plain GET (the helper reading why it was refused) must dial nothing


def _server_frame(op: int, n: int) -> bytes:
    """The header of one final, unmasked server frame with an `n`-byte payload."""
    if n < 126:
        return struct.pack("!BB", 0x80 | op, n)
    if n < 65536:
        return struct.pack("!BBH", 0x80 | op, 126, n)
    return struct.pack("!BBQ", 0x80 | op, 127, n)


class _FrameError(Exception):
    def __init__(self, text: str, code: int = 1002) -> None:
        super().__init__(text)
        self.code = code


class TunnelSide:
    """The user's end of a tunnel: an HTTP request that becomes a WebSocket once the VM is reached.

    `response` is what the door returns to aiohttp: a refusal, or the 101 that began the WebSocket.
    After `upgrade()`, `transport` is the TLS connection and frames are written to it directly.
    """

    def __init__(self, request: web.Request, *, max_message: int, ping_interval: float) -> None:
        self.request = request
        self.max_message = max_message
        self.ping_interval = ping_interval
        self.response: web.StreamResponse = _refusal(500, "internal_error", "the tunnel could not start")
        self.transport: asyncio.Transport | None = None
        self.writer: Any = None  # aiohttp's payload writer of the 101: its drain() waits for the TLS buffer
        self.closed = False  # our CLOSE was sent (or the connection is gone)

    async def upgrade(self, parser: object) -> None:
        """Answer 101; every byte after it goes to `parser` (aiohttp's payload-parser slot: `feed_data`,
        `feed_eof`). Raises BadRequest for a request that is no valid WebSocket handshake (nothing was sent)."""
        headers = self.request.headers
        key = headers.get("Sec-WebSocket-Key", "")
        try:
            valid = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid = False
        if not valid or headers.get("Sec-WebSocket-Version") != "13" or "upgrade" not in headers.get("Connection", "").lower():
            raise BadRequest("not a valid WebSocket handshake (use `bastion tunnel`)", reason="bad_request")
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324 - RFC 6455's own hash
        response = web.StreamResponse(status=101, headers={"Upgrade": "websocket", "Connection": "upgrade", "Sec-WebSocket-Accept": accept})
        self.writer = await response.prepare(self.request)  # the head is buffered, not sent yet
        # The parser is in place before the 101 leaves, so no frame can reach aiohttp's own parsing.
        self.request.protocol.set_parser(cast(Any, parser))
        self.request.protocol.keep_alive(False)
        self.transport = self.request.transport
        self.writer.send_headers()
        self.response = response

    def write(self, op: int, payload: bytes | bytearray = b"") -> None:
        if self.transport is None or self.closed or self.transport.is_closing():
            return
        head = _server_frame(op, len(payload))
        if len(payload) < 1024:
            self.transport.write(head + payload)
        else:  # no copy of a large payload: uvloop's TLS encrypts both writes back to back
            self.transport.write(head)
            self.transport.write(payload)

    def notice(self, text: str) -> bool:
        if self.transport is None or self.closed or self.transport.is_closing():
            return False
        self.write(_OP_TEXT, json.dumps({"type": "notice", "message": text}).encode())
        return True

    async def refuse(self, error: GatewayError) -> None:
        if self.transport is not None:  # the VM refused after the upgrade
            await self.close(CLOSE_VM_FAILED, error.message)
            return
        if isinstance(error, UpstreamError):
            self.response = _refusal(502, error.reason, error.message)
        elif isinstance(error, BadRequest):
            self.response = _refusal(400, error.reason, error.message)
        else:
            self.response = _refusal(403, "forbidden", error.message)

    async def end(self, text: str) -> None:
        await self.close(CLOSE_OPERATOR, text)

    async def close(self, code: int, text: str) -> None:
        self.close_now(code, text)

    def close_now(self, code: int, text: str) -> None:
        """Send CLOSE once and end the connection after what is queued (TLS cannot half-close)."""
        if self.transport is None or self.closed:
            return
        self.write(_OP_CLOSE, code.to_bytes(2) + close_reason(text))
        self.closed = True
        self.transport.close()


_MAX_CONTROL = 256  # a control message is `{"type":"eof"}`; anything longer is not one


def _control_kind(data: str) -> str | None:
    """The `type` of a control text message, or None. Bounded before parsing, so deep nesting cannot recurse."""
    if len(data) > _MAX_CONTROL:
        return None
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return None
    kind = body.get("type") if isinstance(body, dict) else None
    return kind if isinstance(kind, str) else None


class _Pump(asyncio.Protocol):
    """Both directions of one tunnel: the VM socket's Protocol, and the parser of the helper's frames.

    aiohttp's RequestHandler stays the TLS transport's protocol and hands every byte after the upgrade to
    `feed_data` (and calls `feed_eof` when the connection is lost), so aiohttp's own bookkeeping of the
    connection is unchanged. Ends the session with the reason; `_TunnelRelay.close` closes both sides.
    """

    def __init__(self, side: TunnelSide, user: asyncio.Transport, session: Session) -> None:
        self._side = side
        self._user = user
        self._session = session
        self._max = side.max_message
        self._loop = asyncio.get_running_loop()
        self.vm: asyncio.Transport | None = None
        self.vm_gone: asyncio.Future[None] = self._loop.create_future()
        self._hbuf = bytearray()  # a frame header split across reads (at most 14 bytes)
        self._left = 0
        self._offset = 0  # of the next payload byte in its frame (for the mask)
        self._mask = b""
        self._op = _OP_BINARY
        self._msg_op = _OP_BINARY
        self._fin = True
        self._msg_size = 0
        self._buf = bytearray()  # a text or control payload
        self._eof = False
        self.close_code: int | None = None
        self._heard = True
        self._pinged = False
        self._timer: asyncio.TimerHandle | None = None
        self._drain: asyncio.Task[None] | None = None
        self._early: list[bytes] | None = []  # what the VM sent before the upgrade (None once live)

    # ---------------------------------------------------------------- the VM side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.vm = cast(asyncio.Transport, transport)
        self.vm.pause_reading()

    def live(self) -> None:
        """The WebSocket is up: send what the VM said meanwhile, read the VM, start pinging."""
        early, self._early = self._early or [], None
        for data in early:
            self.data_received(data)
        if self.vm is not None and not self.vm.is_closing() and self._drain is None:
            self.vm.resume_reading()
        self._timer = self._loop.call_later(self._side.ping_interval, self._beat)

    def data_received(self, data: bytes) -> None:
        if self._early is not None:  # uvloop delivers a first read even after pause_reading() in connection_made
            self._early.append(data)
            if self.vm is not None:
                self.vm.pause_reading()
            return
        self._side.write(_OP_BINARY, data)
        self._session.add_down(len(data))
        writer = self._side.writer
        if self._drain is None and writer is not None and self._side.request.protocol.writing_paused and self.vm is not None:
            self.vm.pause_reading()
            self._drain = self._loop.create_task(self._resume_vm(writer), name=f"tunnel-drain:{self._session.id}")

    async def _resume_vm(self, writer: Any) -> None:
        try:
            await writer.drain()
        except ConnectionError:
            return  # the helper is gone; its end is reported by feed_eof
        finally:
            self._drain = None
        if self.vm is not None and not self.vm.is_closing():
            self.vm.resume_reading()

    def eof_received(self) -> bool:
        # The VM finished. If the helper had sent its EOF first, the user ended the stream and the VM followed.
        self._session.end(Reason.CLIENT_CLOSED if self._session.half_closed_side == "user" else Reason.VM_CLOSED)
        return True  # `_TunnelRelay.close` closes it

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._session.end(Reason.CLIENT_CLOSED if self._session.half_closed_side == "user" else Reason.VM_CLOSED)
        else:  # a reset, or the kernel's keepalive giving up on a vanished VM (vm_silent)
            self._session.end(Reason.CLIENT_CLOSED if self._side.closed else ended_reason(exc, user=False))
        if not self.vm_gone.done():
            self.vm_gone.set_result(None)

    def pause_writing(self) -> None:
        if not self._user.is_closing():
            self._user.pause_reading()

    def resume_writing(self) -> None:
        if not self._user.is_closing():
            self._user.resume_reading()

    # ---------------------------------------------------------------- the helper's frames (aiohttp's parser slot)

    def feed_eof(self) -> None:
        # 4499: the helper's local connection was reset. Any other non-normal code: the helper went away badly.
        self._session.end(Reason.CLIENT_CLOSED if self.close_code in (1000, 1001) else Reason.CLIENT_LOST)
        self.stop()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        try:
            self._frames(data)
        except _FrameError as exc:
            self._session.end(Reason.CLIENT_ERROR)
            self._side.close_now(exc.code, str(exc))
        return False, b""

    def _frames(self, data: bytes) -> None:
        self._heard = True
        pos, n = 0, len(data)
        while pos < n and self.close_code is None and not self._side.closed:
            if self._left:
                take = min(self._left, n - pos, _PIECE)
                piece = bytearray(memoryview(data)[pos : pos + take])  # the one copy: unmasked in place
                shift = self._offset % 4
                websocket_mask(self._mask[shift:] + self._mask[:shift], piece)
                self._payload(piece)
                pos += take
                self._left -= take
                self._offset += take
                if not self._left:
                    self._frame_done()
                continue
            if self._hbuf:
                old = len(self._hbuf)
                self._hbuf += data[pos : pos + 14 - old]
                found = self._header(self._hbuf, 0)
                if found is None:
                    return
                pos += found - old
                self._hbuf.clear()
            else:
                found = self._header(data, pos)
                if found is None:
                    self._hbuf += data[pos:]
                    return
                pos += found

    def _header(self, buf: bytes | bytearray, pos: int) -> int | None:
        """Parse the frame header at `pos`; its size, or None if not all there yet."""
        n = len(buf) - pos
        if n < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        if not b1 & 0x80:
            raise _FrameError("a client frame must be masked")
        size, h = b1 & 0x7F, 2
        if size == 126:
            if n < 4:
                return None
            size, h = int.from_bytes(buf[pos + 2 : pos + 4]), 4
        elif size == 127:
            if n < 10:
                return None
            size, h = int.from_bytes(buf[pos + 2 : pos + 10]), 10
        if n < h + 4:
            return None
        self._mask = bytes(buf[pos + h : pos + h + 4])
        self._start(b0, size)
        return h + 4

    def _start(self, b0: int, size: int) -> None:
        if b0 & 0x70:
            raise _FrameError("reserved bits set (no extension was agreed)")
        op, fin = b0 & 0x0F, bool(b0 & 0x80)
        if op >= _OP_CLOSE:
            if not fin or size > 125 or op > _OP_PONG:
                raise _FrameError("a bad control frame")
            self._op = op
        elif op == _OP_CONT:
            if self._fin:
                raise _FrameError("a continuation of no message")
            self._op = self._msg_op
            self._msg_size += size
        elif op in (_OP_TEXT, _OP_BINARY):
            if not self._fin:
                raise _FrameError("a message inside another")
            self._op = self._msg_op = op
            self._msg_size = size
        else:
            raise _FrameError(f"unknown opcode {op}")
        if op < _OP_CLOSE:
            self._fin = fin
            if self._msg_size > self._max:
                raise _FrameError(f"message over the {self._max} byte limit", 1009)
            if self._msg_op == _OP_BINARY and self._eof:
                raise _FrameError("data after the end of the stream")
        self._left, self._offset = size, 0
        if not size:
            self._frame_done()

    def _payload(self, piece: bytearray) -> None:
        if self._op != _OP_BINARY:
            self._buf += piece
            return
        if self.vm is not None and not self.vm.is_closing():
            self.vm.write(piece)
            self._session.add_up(len(piece))

    def _frame_done(self) -> None:
        op = self._op
        if op == _OP_BINARY or (op == _OP_TEXT and not self._fin):
            return
        payload = bytes(self._buf)
        self._buf.clear()
        if op == _OP_TEXT:
            kind = _control_kind(payload.decode(errors="replace"))
            if kind == _EOF and not self._eof:
                self._eof = True
                self._session.activity()
                if self.vm is not None and self.vm.can_write_eof() and not self.vm.is_closing():
                    self.vm.write_eof()
                self._session.half_closed("user")
        elif op == _OP_PING:
            self._side.write(_OP_PONG, payload)
        elif op == _OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2]) if len(payload) >= 2 else 1005
            self._session.end(Reason.CLIENT_CLOSED if self.close_code in (1000, 1001) else Reason.CLIENT_LOST)

    # ---------------------------------------------------------------- liveness

    def _beat(self) -> None:
        if self._heard:
            self._heard, self._pinged = False, False
            self._timer = self._loop.call_later(self._side.ping_interval, self._beat)
        elif self._pinged:
            self._timer = None
            self._session.end(Reason.CLIENT_SILENT)
        else:
            self._side.write(_OP_PING)
            self._pinged = True
            self._timer = self._loop.call_later(self._side.ping_interval / 2, self._beat)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drain is not None:
            self._drain.cancel()


class _TunnelRelay:
    def __init__(self, side: TunnelSide, pump: _Pump, session: Session) -> None:
        self._side = side
        self._pump = pump
        self._session = session

    async def close(self) -> None:
        self._pump.stop()
        reason = self._session.reason
        if reason is Reason.VM_CLOSED:
            await self._side.close(1000, "the VM closed the connection")
        elif reason is Reason.VM_RESET:
            await self._side.close(CLOSE_VM_FAILED, "the VM reset the connection")
        elif reason is Reason.HALF_CLOSE_TIMEOUT:
            await self._side.close(CLOSE_HALF_CLOSE, "the VM did not finish after your end of the stream")
        else:
            await self._side.close(self._pump.close_code if self._pump.close_code in (1000, 1001) else 1000, "")
        vm = self._pump.vm
        if vm is None:
            return
        # Flush to the VM after an orderly end; otherwise (or if the VM takes nothing more) reset, so a VM
        # that stopped reading never keeps the gateway's socket open with data queued for it.
        if reason in (Reason.CLIENT_CLOSED, Reason.VM_CLOSED):
            vm.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FLUSH_DEADLINE):
                    await asyncio.shield(self._pump.vm_gone)
        reset(vm)


class TunnelHandler:
    """Relays one WebSocket to one dialled VM socket."""

    kind = "tunnel"

    def __init__(self, connect_timeout: float) -> None:
        self._timeout = connect_timeout

    def authorize(self, policy: Policy, request: TunnelRequest) -> Grant:
        grant = policy.check_tunnel(request.principal, request.vm, request.port)
        if not request.upgrade:
            raise BadRequest("this endpoint needs a WebSocket upgrade (use `bastion tunnel`)", reason="upgrade_required")
        return grant

    async def connect(self, request: TunnelRequest, grant: Grant) -> socket.socket:
        return await dial(grant.vm.address, grant.port, self._timeout)

    def discard(self, upstream: socket.socket) -> None:
        upstream.close()

    async def serve(
        self, request: TunnelRequest, grant: Grant, upstream: socket.socket, client: TunnelSide, session: Session
    ) -> _TunnelRelay:
        user = client.request.transport
        if user is None:
            upstream.close()
            raise UpstreamError("the client went away before the tunnel opened", reason="client_lost")
        pump = _Pump(client, user, session)
        try:
            await asyncio.get_running_loop().create_connection(lambda: pump, sock=upstream)
        except OSError as exc:
            upstream.close()
            raise UpstreamError(f"cannot use the connection to VM {grant.vm.name!r}: {exc}") from None
        try:
            await client.upgrade(pump)
        except BaseException:
            if pump.vm is not None:
                pump.vm.abort()
            raise
        pump.live()
        return _TunnelRelay(client, pump, session)
