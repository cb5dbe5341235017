"""`bastion tunnel`: a local port whose every connection becomes one WebSocket tunnel through the gateway.

Runs on the user's machine. Each accepted local connection opens
`wss://GATEWAY/v1/tunnel?vm=VM&port=N` with a bearer token, then relays bytes both
ways with backpressure (the reader of one side pauses while the other side's write
buffer is above its high-water mark). When the local side stops sending, the helper sends
`{"type": "eof"}` (WebSockets cannot half-close) and keeps delivering the VM's answer.
A local connection that resets is passed on: the WebSocket closes with 4499, so the
gateway ends the session at once instead of waiting on the VM. Notices the gateway
sends (`{"type": "notice"}`: a warning before a limit or a disconnect) are printed; a
close with code 4001 is a disconnect (by an operator, a limit or a restart): its
reason is printed. A connection lost without a close frame is an error too.

The relay is two asyncio Protocols per tunnel (the local TCP connection, the TLS connection to the
gateway) and a small RFC 6455 client: every local read becomes masked binary frames of at most 64 KiB, a binary
frame's payload goes to the local socket as it arrives (never held until the frame is whole), and only
control and text frames are buffered (bounded by `max_message`). The TLS context (and its verification)
is made once; each tunnel offers the last TLS session the gateway gave, so a new tunnel's handshake is
a resumption (the certificate was verified on the full handshake that made the session; OpenSSL falls
back to a full, verified handshake when the gateway declines it). The token is still sent, and checked
by the gateway, on every tunnel. `check()` asks the gateway, before anything is relayed, whether it grants
the tunnel at all (`bastion rdp` does, before it starts the RDP client).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import os
import shlex
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO, cast
from urllib.parse import urlencode

import aiohttp
from aiohttp._websocket.helpers import websocket_mask  # the C (Cython) XOR of aiohttp's own client
from yarl import URL

CLOSE_OPERATOR = 4001
CLOSE_HALF_CLOSE = 4408
CLOSE_LOCAL_RESET = 4499
CLOSE_VM_FAILED = 4502
CLOSE_LOST = 1006  # never sent: the connection to the gateway ended without a close frame
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 16 * 1024  # the gateway's answer to the upgrade: status line and headers
_MAX_BODY = 64 * 1024  # a refusal's JSON body
_CONNECT_TIMEOUT = 15.0
_PING_INTERVAL = 30.0  # with no frame from the gateway for this long, ping it ...
_PONG_TIMEOUT = 15.0  # ... and end the tunnel if nothing comes back within this
# One frame per 64 KiB of a local read: its masked copy stays below glibc's mmap threshold (128 KiB) and is
# recycled from the heap; a 256 KiB copy per read was a fresh mmap each time (page faults, then munmap).
_FRAME = 64 * 1024
_SESSION_REFRESH = 60.0  # seconds between takes of the gateway's newest TLS session
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class TunnelError(Exception):
    pass


class _Refused(Exception):
    """The gateway answered the upgrade with an HTTP status: its JSON `message`, else its reason phrase."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class _ResumingContext(ssl.SSLContext):
    """A client context that offers the last session it was given on every new connection.

    asyncio and uvloop create each connection's SSLObject through `wrap_bio()` and have no `session=` of their
    own; this is the one place to pass it. A session is only offered to the server it came from (one gateway
    per helper), and only ever made by a verified handshake with this same context.
    """

    session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        offer = session or (None if server_side else self.session)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, offer)


def client_context(ca_file: str | None, *, insecure: bool = False) -> _ResumingContext:
    """TLS 1.2+, the system's or `ca_file`'s CAs, host name checked; `insecure`: encrypted but unverified."""
    ctx = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    else:
        ctx.load_default_certs()
    return ctx


def _frame(op: int, payload: bytes | bytearray | memoryview) -> tuple[bytes, bytearray]:
    """One final, masked client frame: (header with the mask key, masked payload)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | op, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | op, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | op, 0x80 | 127, n)
    key = os.urandom(4)  # RFC 6455 5.3: an unpredictable key per frame
    body = bytearray(payload)
    websocket_mask(key, body)
    return head + key, body


def _header(buf: bytes | bytearray, pos: int) -> tuple[int, int, int] | None:
    """(first byte, payload length, header size) of the server frame at `pos`, or None if not all there yet."""
    n = len(buf) - pos
    if n < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    if b1 & 0x80:
        raise _ProtocolError("the gateway sent a masked frame")
    size = b1 & 0x7F
    if size == 126:
        return (b0, int.from_bytes(buf[pos + 2 : pos + 4]), 4) if n >= 4 else None
    if size == 127:
        return (b0, int.from_bytes(buf[pos + 2 : pos + 10]), 10) if n >= 10 else None
    return b0, size, 2


class _ProtocolError(Exception):
    """The gateway broke RFC 6455 (or sent a text message over the size limit): close 1002/1009."""

    def __init__(self, text: str, code: int = 1002) -> None:
        super().__init__(text)
        self.code = code


@dataclass
class TokenSource:
    """A fixed token, or one fetched with `ssh ... USER@HOST token` and reused until it nears expiry."""

    fixed: str | None = field(default=None, repr=False)
    ssh_argv: list[str] = field(default_factory=list)
    lifetime_hint: float = 540.0
    _cached: str | None = field(default=None, repr=False)
    _fetched_at: float = 0.0

    async def get(self, *, fresh: bool = False) -> str:
        if self.fixed:
            return self.fixed
        if not fresh and self._cached and time.monotonic() - self._fetched_at < self.lifetime_hint:
            return self._cached
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(60):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise TunnelError(f"`{shlex.join(self.ssh_argv)}` did not answer within 60 s") from None
        token = out.decode().strip()
        if proc.returncode != 0 or not token:
            why = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            if "Host key verification failed" in why and "-F" in self.ssh_argv:
                why += " (name the config's Host alias for the gateway with --ssh-host)"
            raise TunnelError(f"could not get a token with `{shlex.join(self.ssh_argv)}`: {why}")
        self._cached, self._fetched_at = token, time.monotonic()
        return token


class _Link(asyncio.Protocol):
    """The TLS connection to the gateway for one tunnel: the upgrade, then frames both ways.

    Before the upgrade completes `upgraded` is pending; it ends with None (101 and a valid accept key) or
    `_Refused`/`_ProtocolError`. After it, binary payloads go to `local` as they arrive and `ended` gets
    (close code, reason) once: the gateway's CLOSE (answered in kind), or CLOSE_LOST when the connection
    ended without one or the gateway stopped answering pings.
    """

    def __init__(self, max_message: int, say: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._say = say
        self._max = max_message
        self.transport: asyncio.Transport | None = None
        self.local: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[tuple[int, str]] = loop.create_future()
        self._key = base64.b64encode(os.urandom(16))
        self._head = bytearray()  # the upgrade answer until its headers end (and a refusal's body)
        self._want_body = -1
        self._status = 0
        self._phrase = ""
        self._hbuf = bytearray()  # a frame header split across reads (at most 10 bytes)
        self._left = 0  # payload bytes of the current frame still to come
        self._op = _OP_BINARY  # of the current frame (a continuation keeps its message's opcode)
        self._msg_op = _OP_BINARY
        self._fin = True
        self._buf = bytearray()  # a text or control payload, bounded by max_message
        self._heard = True
        self._pinged = False
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False  # we sent our CLOSE

    # ---------------------------------------------------------------- the upgrade

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def request(self, url: URL, token: str) -> None:
        assert self.transport is not None
        host = url.raw_host or ""
        authority = f"[{host}]" if ":" in host else host
        if url.explicit_port:
            authority += f":{url.port}"
        self.transport.write(
            (
                f"GET {url.raw_path_qs} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {self._key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {token}\r\nUser-Agent: bastion-tunnel\r\n\r\n"
            ).encode()
        )

    def _answer(self, data: bytes) -> None:
        self._head += data
        if self._want_body >= 0:
            self._refusal_body()
            return
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > _MAX_HEAD:
                self._fail_upgrade(_ProtocolError("the gateway's answer to the upgrade is too long"))
            return
        lines = bytes(self._head[:end]).decode("latin-1").split("\r\n")
        rest = bytes(self._head[end + 4 :])
        self._head.clear()
        version, _, status_phrase = lines[0].partition(" ")
        status, _, phrase = status_phrase.partition(" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if not version.startswith("HTTP/1.") or not status.isdigit():
            self._fail_upgrade(_ProtocolError("the gateway did not answer in HTTP/1.1"))
            return
        self._status, self._phrase = int(status), phrase
        if self._status != 101:
            length = headers.get("content-length", "0")
            self._want_body = min(int(length), _MAX_BODY) if length.isdigit() else 0
            self._head += rest
            self._refusal_body()
            return
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()  # noqa: S324 - RFC 6455's own hash
        if (
            headers.get("upgrade", "").lower() != "websocket"
            or "upgrade" not in headers.get("connection", "").lower()
            or headers.get("sec-websocket-accept") != accept
            or headers.get("sec-websocket-extensions")
        ):
            self._fail_upgrade(_ProtocolError("the gateway's WebSocket handshake is not valid"))
            return
        self.upgraded.set_result(None)
        self._timer = self._loop.call_later(_PING_INTERVAL, self._beat)
        if rest:
            self._frames(rest)

    def _refusal_body(self) -> None:
        if len(self._head) < self._want_body:
            return
        message = self._phrase
        with contextlib.suppress(ValueError):
            body = json.loads(bytes(self._head[: self._want_body]))
            if isinstance(body, dict) and isinstance(body.get("message"), str):
                message = body["message"]
        self._fail_upgrade(_Refused(self._status, message))

    def _fail_upgrade(self, exc: Exception) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # ---------------------------------------------------------------- frames from the gateway

    def data_received(self, data: bytes) -> None:
        if not self.upgraded.done():
            self._answer(data)
        elif not self.ended.done():
            try:
                self._frames(data)
            except _ProtocolError as exc:
                self.close(exc.code, str(exc))
                self._end(exc.code, str(exc))

    def _frames(self, data: bytes) -> None:
        self._heard = True
        pos, n = 0, len(data)
        while pos < n and not self.ended.done():
            if self._left:
                take = min(self._left, n - pos)
                if self._op == _OP_BINARY:
                    if self.local is not None and not self.local.is_closing():
                        self.local.write(memoryview(data)[pos : pos + take] if take < n else data)
                else:
                    self._buf += data[pos : pos + take]
                pos += take
                self._left -= take
                if not self._left:
                    self._frame_done()
                continue
            if self._hbuf:
                old = len(self._hbuf)
                self._hbuf += data[pos : pos + 10 - old]
                found = _header(self._hbuf, 0)
                if found is None:
                    return  # all of data went into _hbuf
                pos += found[2] - old
                self._hbuf.clear()
            else:
                found = _header(data, pos)
                if found is None:
                    self._hbuf += data[pos:]
                    return
                pos += found[2]
            self._start(found[0], found[1])

    def _start(self, b0: int, size: int) -> None:
        if b0 & 0x70:
            raise _ProtocolError("the gateway sent a frame with reserved bits set")
        op, fin = b0 & 0x0F, bool(b0 & 0x80)
        if op >= _OP_CLOSE:
            if not fin or size > 125 or op > _OP_PONG:
                raise _ProtocolError("the gateway sent a bad control frame")
            self._op = op
        elif op == _OP_CONT:
            if self._fin:
                raise _ProtocolError("the gateway continued a message it had not begun")
            self._op = self._msg_op
        elif op in (_OP_TEXT, _OP_BINARY):
            if not self._fin:
                raise _ProtocolError("the gateway began a message inside another")
            self._op = self._msg_op = op
        else:
            raise _ProtocolError(f"the gateway sent an unknown opcode {op}")
        if op < _OP_CLOSE:
            self._fin = fin
        if self._op == _OP_TEXT and len(self._buf) + size > self._max:
            raise _ProtocolError("the gateway sent a text message over the size limit", 1009)
        self._left = size
        if not size:
            self._frame_done()

    def _frame_done(self) -> None:
        op = self._op
        if op == _OP_BINARY or (op == _OP_TEXT and not self._fin):
            return
        payload = bytes(self._buf)
        self._buf.clear()
        if op == _OP_TEXT:
            self._notice(payload)
        elif op == _OP_PING:
            self._send(_OP_PONG, payload)
        elif op == _OP_CLOSE:
            code = int.from_bytes(payload[:2]) if len(payload) >= 2 else 1005
            reason = payload[2:].decode(errors="replace")
            self.close(code if len(payload) >= 2 else 1000, "")  # answer in kind, then the connection ends
            self._end(code, reason)

    def _notice(self, data: bytes) -> None:
        try:
            body = json.loads(data)
        except ValueError:
            return
        if isinstance(body, dict) and body.get("type") == "notice" and isinstance(body.get("message"), str):
            self._say(" ".join(body["message"].split())[:400])

    # ---------------------------------------------------------------- frames to the gateway

    def _send(self, op: int, payload: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.transport.is_closing() or self._closing:
            return
        head, body = _frame(op, payload)
        if len(body) < 1024:
            self.transport.write(head + body)
        else:  # two writes, one copy: uvloop's TLS encrypts them back to back
            self.transport.write(head)
            self.transport.write(body)

    def send_binary(self, data: bytes) -> None:
        if len(data) <= _FRAME:
            self._send(_OP_BINARY, data)
            return
        view = memoryview(data)
        for at in range(0, len(data), _FRAME):
            self._send(_OP_BINARY, view[at : at + _FRAME])

    def send_eof(self) -> None:
        self._send(_OP_TEXT, b'{"type":"eof"}')

    def close(self, code: int, reason: str) -> None:
        """Send CLOSE (once) and end the connection after what is queued was sent (TLS close_notify, then FIN)."""
        if self.transport is None or self.transport.is_closing() or self._closing:
            return
        raw = reason.encode()[:123]
        self._send(_OP_CLOSE, code.to_bytes(2) + raw)
        self._closing = True
        self.transport.close()

    # ---------------------------------------------------------------- liveness, backpressure, the end

    def _beat(self) -> None:
        if self.ended.done():
            return
        if self._heard:
            self._heard, self._pinged = False, False
            self._timer = self._loop.call_later(_PING_INTERVAL, self._beat)
        elif self._pinged:
            self._end(CLOSE_LOST, f"the gateway did not answer a ping within {_PONG_TIMEOUT:.0f} s")
            if self.transport is not None:
                self.transport.abort()
        else:
            self._send(_OP_PING, b"")
            self._pinged = True
            self._timer = self._loop.call_later(_PONG_TIMEOUT, self._beat)

    def _end(self, code: int, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.ended.done():
            self.ended.set_result((code, reason))

    def pause_writing(self) -> None:
        if self.local is not None and not self.local.is_closing():
            self.local.pause_reading()

    def resume_writing(self) -> None:
        if self.local is not None and not self.local.is_closing():
            self.local.resume_reading()

    def eof_received(self) -> bool | None:
        return None  # TLS: no half-close; the connection ends

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"the gateway closed the connection: {exc or 'no answer'}"))
        self._end(CLOSE_LOST, f"the connection to the gateway was lost ({exc or 'closed without a close frame'})")


def _same(link: _Link) -> _Link:
    return link


class _Local(asyncio.Protocol):
    """One accepted local connection. Reads are paused until its tunnel is up; then each read goes out as frames.

    uvloop starts reading right after `connection_made()` even when it paused: what that first read brings (at
    most one read) waits in `early`, and reading pauses again, until the tunnel is up.
    """

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.link: _Link | None = None
        self.early: list[bytes] = []
        self.eof = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # set when the connection is gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        self._tunnel.spawn(self)

    def data_received(self, data: bytes) -> None:
        if self.link is not None:
            self.link.send_binary(data)
        else:
            self.early.append(data)
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.link is not None:
            self.link.send_eof()
        else:
            self.eof = True
        return True  # keep sending the VM's answer

    def pause_writing(self) -> None:
        link = self.link.transport if self.link is not None else None
        if link is not None and not link.is_closing():
            link.pause_reading()

    def resume_writing(self) -> None:
        link = self.link.transport if self.link is not None else None
        if link is not None and not link.is_closing():
            link.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Tunnel:
    """Listens on `local`; owns one task per local connection."""

    def __init__(
        self,
        gateway: str,
        vm: str,
        port: int,
        tokens: TokenSource,
        *,
        ca_file: str | None = None,
        insecure: bool = False,
        out: TextIO = sys.stderr,
        max_message: int = 1024 * 1024,
    ) -> None:
        self.url = f"wss://{gateway}/v1/tunnel?{urlencode({'vm': vm, 'port': port})}"
        self._target = URL(self.url)
        self._tokens = tokens
        self._out = out
        self._max_message = max_message
        self._ssl = client_context(ca_file, insecure=insecure)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._http: aiohttp.ClientSession | None = None
        self._session_at = 0.0
        self.resumed = 0  # tunnels whose TLS handshake resumed a session (a test reads it)

    def say(self, text: str) -> None:
        print(f"bastion tunnel: {text}", file=self._out, flush=True)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=15, sock_connect=15))
        return self._http

    async def check(self) -> None:
        """Whether the gateway would open this tunnel, asked without opening one (nothing is dialled).

        Gets a token as the tunnel would (fresh once if the cached one is refused as expired), then sends the
        tunnel request without the upgrade: every check comes before the upgrade, so the gateway answers
        `400 upgrade_required` exactly when it grants the tunnel. Raises TunnelError with the gateway's reason.
        """
        url = "https://" + self.url.removeprefix("wss://")
        for attempt in (1, 2):
            token = await self._tokens.get(fresh=attempt == 2)
            try:
                async with (
                    asyncio.timeout(30),
                    self._session().get(url, headers={"Authorization": f"Bearer {token}"}, ssl=self._ssl) as resp,
                ):
                    body = await resp.json(content_type=None)
                    status = resp.status
            except aiohttp.ClientConnectorCertificateError as exc:
                raise TunnelError(f"cannot verify the gateway's certificate ({exc.certificate_error}); pass --ca-file") from None
            except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
                raise TunnelError(f"cannot ask the gateway at {url.split('/v1/')[0]}: {exc or type(exc).__name__}") from None
            error = body.get("error") if isinstance(body, dict) else None
            if status == 400 and error == "upgrade_required":
                return
            if status == 401 and attempt == 1 and not self._tokens.fixed:
                continue
            message = body.get("message") if isinstance(body, dict) else None
            raise TunnelError(f"the gateway refused the tunnel ({status}): {message or error or 'no reason given'}")

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Local(self), host, port)
        addr = self._server.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    async def stop(self) -> None:
        """Stop listening and end every tunnel (each sends CLOSE 1001 to the gateway and drops its local connection)."""
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def spawn(self, local: _Local) -> None:
        task = asyncio.get_running_loop().create_task(self._accept(local), name="tunnel-connection")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, local: _Local) -> None:
        assert local.transport is not None
        try:
            await self._serve(local)
        except asyncio.CancelledError:
            local.transport.abort()
            raise
        except (TunnelError, OSError, TimeoutError) as exc:
            self.say(str(exc) or type(exc).__name__)
            local.transport.abort()

    async def _connect(self) -> _Link:
        """A WebSocket to the gateway, upgraded. Raises TunnelError with the gateway's reason for a refusal."""
        loop = asyncio.get_running_loop()
        url = self._target
        host = url.raw_host or ""
        for attempt in (1, 2):
            token = await self._tokens.get(fresh=attempt == 2)
            link = _Link(self._max_message, self.say)
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    await loop.create_connection(
                        functools.partial(_same, link),
                        host,
                        url.port or 443,
                        ssl=self._ssl,
                        server_hostname=host,
                        ssl_handshake_timeout=_CONNECT_TIMEOUT,
                    )
                    tls = self._handshaken(link)
                    link.request(url, token)
                    await link.upgraded
            except ssl.SSLCertVerificationError as exc:
                raise TunnelError(f"cannot verify the gateway's certificate ({exc.verify_message}); pass --ca-file") from None
            except _Refused as exc:
                if exc.status == 401 and attempt == 1 and not self._tokens.fixed:
                    continue  # the cached token expired: fetch a fresh one once
                raise TunnelError(f"the gateway refused the tunnel ({exc.status}): {exc.message}") from None
            except _ProtocolError as exc:
                raise TunnelError(str(exc)) from None
            except BaseException:
                if link.transport is not None:
                    link.transport.abort()
                raise
            if tls is not None and (not tls.session_reused or time.monotonic() - self._session_at > _SESSION_REFRESH):
                # In TLS 1.3 the gateway's tickets follow its handshake; they have arrived by its answer. Reading
                # `session` costs about as much as a handshake (CPython copies it through DER), so it is read
                # after a full handshake and then once a minute, well within a ticket's lifetime (OpenSSL: 300 s).
                self._ssl.session = tls.session
                self._session_at = time.monotonic()
            return link
        raise TunnelError("unreachable")

    def _handshaken(self, link: _Link) -> ssl.SSLObject | None:
        """The TLS object of a new link; counts a resumed handshake."""
        tls = link.transport.get_extra_info("ssl_object") if link.transport is not None else None
        if not isinstance(tls, ssl.SSLObject):
            return None
        if tls.session_reused:
            self.resumed += 1
        return tls

    async def _serve(self, local: _Local) -> None:
        assert local.transport is not None
        link = await self._connect()
        try:
            code, reason = await self._relay(local, link)
        finally:
            if link.transport is not None and not link.transport.is_closing():
                link.close(1001, "the helper stopped")
        if code == CLOSE_LOCAL_RESET:
            local.transport.abort()
        elif code == CLOSE_OPERATOR:
            text = reason or "You have been disconnected."
            if not text.startswith("You have been disconnected."):
                text = f"You have been disconnected. {text}"
            self.say(text)
            local.transport.abort()
        elif code == CLOSE_HALF_CLOSE:
            self.say(f"the gateway ended the connection: {reason}")
            local.transport.abort()
        elif code != 1000:
            self.say(f"the tunnel ended with an error ({code}): {reason}")
            local.transport.abort()
        else:
            local.transport.close()  # after what is queued was written
            await local.done

    async def _relay(self, local: _Local, link: _Link) -> tuple[int, str]:
        """Relay until the gateway ends the tunnel (its close code and reason), or the local connection breaks."""
        assert local.transport is not None
        link.local, local.link = local.transport, link
        for data in local.early:
            link.send_binary(data)
        local.early.clear()
        if local.eof:
            link.send_eof()
        local.transport.resume_reading()
        await asyncio.wait((link.ended, local.done), return_when=asyncio.FIRST_COMPLETED)
        if not link.ended.done():
            # The local connection broke (reset) before the gateway ended the tunnel: tell the gateway, which
            # ends the session now instead of waiting on the VM.
            link.close(CLOSE_LOCAL_RESET, "the local connection was reset")
            return CLOSE_LOCAL_RESET, ""
        return link.ended.result()


async def run_tunnel(
    stop: asyncio.Event, tunnel: Tunnel, local: tuple[str, int], on_ready: Callable[[str, int], Awaitable[None]] | None = None
) -> int:
    try:
        host, port = await tunnel.start(*local)
    except OSError as exc:
        tunnel.say(f"cannot listen on {local[0]}:{local[1]}: {exc.strerror}")
        return 1
    tunnel.say(f"listening on {host}:{port} -> {tunnel.url}")
    try:
        if on_ready is not None:
            await on_ready(host, port)
        else:
            await stop.wait()
    finally:
        await tunnel.stop()
    return 0
