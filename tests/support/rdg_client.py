"""A small RD Gateway client for tests, behaving like FreeRDP 2.11 (shared/recipes/rd-gateway.md §3, §8).

Quirks kept on purpose, because the gateway must cope with them: a 15-character WebSocket key of
characters 0x40-0x5F (not base64), one RDG packet per masked WebSocket frame, a Pong in reply to a server
Close, KEEPALIVE echoed, CLOSE_CHANNEL answered with CLOSE_CHANNEL_RESPONSE (the client never sends
CLOSE_CHANNEL itself), a refusal only when `FAILED(status)` (the HRESULT severity bit), and `close()` just
drops the TLS connection(s). When a WebSocket request is answered 200 instead of 101, the client falls back
to the HTTP transport on the same connection, as FreeRDP does.

All encoding and decoding goes through `gateway.protocols.rdg_codec`; the codec's unit tests check it
against hand-written bytes, so a mistake shared by the gateway and this client is still caught there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import ssl
import uuid
from collections import deque
from typing import Literal

from gateway.protocols import rdg_codec as c

SEND_CHUNK = 0xFFFF  # the most a DATA packet's u16 cbDataLen carries
HIGH_WATER = 4 * 1024 * 1024  # received bytes buffered before the client stops reading the socket
SEED_BYTES = 10


class RdgRefused(Exception):
    """The gateway refused at `stage` ("http", "handshake", "tunnel", "auth", "channel") with `status`
    (the HTTP status for "http", else the HRESULT from the response packet)."""

    def __init__(self, stage: str, status: int) -> None:
        super().__init__(f"RD Gateway refused at {stage}: {status:#010x}" if stage != "http" else f"RD Gateway answered HTTP {status}")
        self.stage = stage
        self.status = status


def freerdp_ws_key() -> str:
    """A Sec-WebSocket-Key as FreeRDP 2.11 makes it: 15 characters from 0x40-0x5F (e.g. `PARH_N\\XLEDGPBZ`)."""
    return "".join(chr(0x40 + secrets.randbelow(32)) for _ in range(15))


def _request(method: str, path: str, host: str, conn_id: str, extra: list[tuple[str, str]]) -> bytes:
    headers = [
        ("Cache-Control", "no-cache"),
        ("Pragma", "no-cache"),
        ("Accept", "*/*"),
        ("User-Agent", "MS-RDGateway/1.0"),
        ("Host", host),
        *extra,
        ("RDG-Connection-Id", conn_id),
        ("RDG-Auth-Scheme", "PAA"),
    ]
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("ascii")


async def _read_head(reader: asyncio.StreamReader) -> c.ResponseHead:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("gateway closed the connection before answering") from None
    return c.parse_response_head(raw)


class RdgTunnel:
    """One open RD Gateway channel. Owns its connection(s) and the task reading from the gateway.

    `send()` queues DATA packets (call `drain()` for backpressure), `recv()` returns the next bytes from the
    target or b"" once the tunnel ended, `wait_closed()` waits for the end (a CLOSE_CHANNEL, the gateway
    closing, or `close()`). `service_messages` and `close_status` record what the gateway said.
    """

    def __init__(
        self,
        transport: Literal["websocket", "http"],
        out_reader: asyncio.StreamReader,
        out_writer: asyncio.StreamWriter,
        in_writer: asyncio.StreamWriter | None,
    ) -> None:
        self.transport = transport
        self._out_reader = out_reader
        self._out_writer = out_writer
        self._in_writer = in_writer
        self._ws = c.WsClientReader() if transport == "websocket" else None
        self._packets = c.ServerPacketReader(max_packet=c.DATA_MAX_PACKET)
        self._pending: deque[c.ServerPacket] = deque()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._readable = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._done = False
        self._ended = False  # the OUT side hit EOF or a WebSocket close; `_pending` may still hold packets
        self._task: asyncio.Task[None] | None = None
        self.service_messages: list[str] = []
        self.close_status: int | None = None
        self.ws_close: tuple[int | None, str] | None = None
        self.error: BaseException | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.keepalives = 0

    # -- sending ---------------------------------------------------------------------------------------

    @property
    def _writer(self) -> asyncio.StreamWriter:
        return self._in_writer if self._in_writer is not None else self._out_writer

    def _send_packet(self, packet: bytes) -> None:
        if self.transport == "websocket":
            self._out_writer.write(c.ws_client_frame(c.WS_BINARY, packet, os.urandom(4)))
        else:
            assert self._in_writer is not None
            self._in_writer.write(f"{len(packet):x}\r\n".encode("ascii") + packet + b"\r\n")

    def send(self, data: bytes) -> None:
        """Queue `data` as DATA packets of at most 65535 bytes. Raises ConnectionResetError once ended."""
        if self._done:
            raise ConnectionResetError("the RD Gateway tunnel has ended")
        mv = memoryview(data)
        for i in range(0, len(data), SEND_CHUNK):
            self._send_packet(c.data_packet(bytes(mv[i : i + SEND_CHUNK])))
        self.bytes_sent += len(data)

    async def drain(self) -> None:
        await self._writer.drain()

    async def sendall(self, data: bytes) -> None:
        self.send(data)
        await self.drain()

    # -- receiving -------------------------------------------------------------------------------------

    async def recv(self) -> bytes:
        """The next bytes the target sent, or b"" once the tunnel has ended and everything was read."""
        while not self._chunks:
            if self._done:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= HIGH_WATER // 2:
            self._space.set()
        return chunk

    async def _read_more(self) -> bool:
        """Read once from the OUT side and decode into `_pending`. False at EOF or after a WS close."""
        chunk = await self._out_reader.read(65536)
        if not chunk:
            return False
        if self._ws is None:
            self._pending.extend(self._packets.feed(chunk))
            return True
        for op, payload in self._ws.feed(chunk):
            if op == c.WS_BINARY:
                self._pending.extend(self._packets.feed(payload))
            elif op == c.WS_PING:
                self._out_writer.write(c.ws_client_frame(c.WS_PONG, payload, os.urandom(4)))
            elif op == c.WS_CLOSE:
                # FreeRDP 2.11's rdg_websocket_reply_close answers with a Pong carrying a 2-byte zero code.
                self.ws_close = c.parse_close_payload(payload)
                self._out_writer.write(c.ws_client_frame(c.WS_PONG, b"\x00\x00", os.urandom(4)))
                return False
            elif op != c.WS_PONG:
                raise c.RdgError("bad_websocket", f"unexpected opcode {op:#x}")
        return True

    async def _expect(self, stage: str) -> c.ServerPacket:
        while True:
            while not self._pending:
                if self._ended:
                    raise ConnectionResetError(f"gateway closed the connection during {stage}")
                self._ended = not await self._read_more()
            packet = self._pending.popleft()
            if not isinstance(packet, c.Keepalive):
                return packet
            self.keepalives += 1  # FreeRDP echoes a keepalive in any state
            self._send_packet(c.keepalive())

    def _start(self) -> None:
        self._task = asyncio.create_task(self._pump(), name="rdg-client-pump")

    async def _pump(self) -> None:
        try:
            while True:
                # Packets decoded before an EOF or a WebSocket close are still handled, in order.
                while self._pending:
                    if not await self._handle(self._pending.popleft()):
                        return
                if self._ended:
                    return
                self._ended = not await self._read_more()
        except (OSError, ssl.SSLError, c.RdgError, asyncio.IncompleteReadError) as exc:
            self.error = exc
        finally:
            self._done = True
            self._readable.set()
            self._drop()

    async def _handle(self, packet: c.ServerPacket) -> bool:
        if isinstance(packet, c.Data):
            self._chunks.append(packet.payload)
            self._buffered += len(packet.payload)
            self.bytes_received += len(packet.payload)
            self._readable.set()
            if self._buffered > HIGH_WATER:
                self._space.clear()
                await self._space.wait()
        elif isinstance(packet, c.Keepalive):
            self.keepalives += 1
            self._send_packet(c.keepalive())
        elif isinstance(packet, c.ServiceMessage):
            self.service_messages.append(packet.text)
        elif isinstance(packet, c.CloseChannel):
            self.close_status = packet.status
            self._send_packet(c.close_channel_response(c.ERROR_SUCCESS))
            with contextlib.suppress(OSError, ssl.SSLError):
                await self._writer.drain()
            return False  # FreeRDP exits here ("Network disconnect!", rc 131)
        elif not isinstance(packet, c.ReauthMessage):  # FreeRDP 2.11 logs "Unknown Control Packet" and goes on
            raise c.RdgError("bad_packet", f"unexpected {type(packet).__name__} in the data phase")
        return True

    # -- ending ----------------------------------------------------------------------------------------

    def _drop(self) -> None:
        self._done = True
        self._space.set()
        for w in (self._out_writer, self._in_writer):
            if w is not None:
                w.close()

    async def close(self) -> None:
        """Drop the TLS connection(s), as FreeRDP does when the user closes the window."""
        self._drop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        for w in (self._out_writer, self._in_writer):
            if w is not None:
                with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                    async with asyncio.timeout(5):
                        await w.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the tunnel has ended (CLOSE_CHANNEL handled, the gateway closed, or `close()`)."""
        if self._task is not None:
            await asyncio.wait({self._task})


async def _open(host: str, port: int, ssl_ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port, ssl=ssl_ctx, limit=256 * 1024)


async def connect(
    host: str,
    port: int,
    ssl_ctx: ssl.SSLContext,
    *,
    token: str,
    resource: str,
    rdp_port: int = 3389,
    transport: Literal["websocket", "http"] = "websocket",
    client_name: str = "testpc",
    path: str = "/remoteDesktopGateway/",
    timeout: float = 10.0,
) -> RdgTunnel:
    """Open a tunnel to `resource`:`rdp_port` through the gateway with PAA token `token`.

    Raises RdgRefused when the HTTP answer or a HANDSHAKE/TUNNEL/TUNNEL_AUTH/CHANNEL response refuses,
    ConnectionResetError when the gateway closes during setup, TimeoutError after `timeout` seconds.
    On any failure every connection opened here is closed.
    """
    conn_id = "{" + str(uuid.uuid4()).upper() + "}"
    writers: list[asyncio.StreamWriter] = []
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(host, port, ssl_ctx)
            writers.append(writer)
            actual: Literal["websocket", "http"] = transport
            if transport == "websocket":
                key = freerdp_ws_key()
                upgrade = [
                    ("Connection", "Upgrade"),
                    ("Upgrade", "websocket"),
                    ("Sec-Websocket-Version", "13"),
                    ("Sec-Websocket-Key", key),
                    ("Content-Length", "0"),
                ]
                writer.write(_request("RDG_OUT_DATA", path, host, conn_id, upgrade))
                head = await _read_head(reader)
                if head.status == 101:
                    if head.headers.get("sec-websocket-accept") != c.websocket_accept(key):
                        raise c.RdgError("bad_websocket", "wrong Sec-WebSocket-Accept")
                elif head.status == 200:
                    actual = "http"  # FreeRDP falls back to the HTTP transport on this connection
                else:
                    raise RdgRefused("http", head.status)
            else:
                keep = [("Connection", "Keep-Alive"), ("Content-Length", "0")]
                writer.write(_request("RDG_OUT_DATA", path, host, conn_id, keep))
                head = await _read_head(reader)
                if head.status != 200:
                    raise RdgRefused("http", head.status)
            in_writer = None
            if actual == "http":
                await reader.readexactly(SEED_BYTES)
                in_reader, in_writer = await _open(host, port, ssl_ctx)
                writers.append(in_writer)
                in_writer.write(_request("RDG_IN_DATA", path, host, conn_id, [("Connection", "Keep-Alive"), ("Content-Length", "0")]))
                in_head = await _read_head(in_reader)
                if in_head.status != 200:
                    raise RdgRefused("http", in_head.status)
                chunked = [("Connection", "Keep-Alive"), ("Transfer-Encoding", "chunked")]
                in_writer.write(_request("RDG_IN_DATA", path, host, conn_id, chunked))
            tunnel = RdgTunnel(actual, reader, writer, in_writer)
            await _setup(tunnel, token=token, resource=resource, rdp_port=rdp_port, client_name=client_name)
    except BaseException:
        for w in writers:
            w.close()
        raise
    tunnel._start()
    return tunnel


async def _setup(tunnel: RdgTunnel, *, token: str, resource: str, rdp_port: int, client_name: str) -> None:
    tunnel._send_packet(c.handshake_request(c.HTTP_EXTENDED_AUTH_PAA))
    hs = await tunnel._expect("handshake")
    if not isinstance(hs, c.HandshakeResponse):
        raise c.RdgError("bad_packet", f"expected HANDSHAKE_RESPONSE, got {type(hs).__name__}")
    if c.failed(hs.error):
        raise RdgRefused("handshake", hs.error)
    tunnel._send_packet(c.tunnel_create(token))
    tr = await tunnel._expect("tunnel")
    if not isinstance(tr, c.TunnelResponse):
        raise c.RdgError("bad_packet", f"expected TUNNEL_RESPONSE, got {type(tr).__name__}")
    if c.failed(tr.status):
        raise RdgRefused("tunnel", tr.status)
    tunnel._send_packet(c.tunnel_auth(client_name))
    ar = await tunnel._expect("auth")
    if not isinstance(ar, c.TunnelAuthResponse):
        raise c.RdgError("bad_packet", f"expected TUNNEL_AUTH_RESPONSE, got {type(ar).__name__}")
    if c.failed(ar.status):
        raise RdgRefused("auth", ar.status)
    tunnel._send_packet(c.channel_create(resource, rdp_port))
    cr = await tunnel._expect("channel")
    if not isinstance(cr, c.ChannelResponse):
        raise c.RdgError("bad_packet", f"expected CHANNEL_RESPONSE, got {type(cr).__name__}")
    if c.failed(cr.status):
        raise RdgRefused("channel", cr.status)
