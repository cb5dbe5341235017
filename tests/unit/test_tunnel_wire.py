"""The helper's WebSocket client (`gateway.client.tunnel._Link`) against bytes written by hand: no sockets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct

import pytest
from yarl import URL

from gateway.client.tunnel import CLOSE_LOST, _Link, _Refused


class FakeTransport(asyncio.Transport):
    """Collects what is written; records pauses and how it was ended."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def server_frame(op: int, payload: bytes, *, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | op])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def client_frames(raw: bytes) -> list[tuple[int, bytes]]:
    """Decode the masked frames the helper wrote (after its request head)."""
    out, pos = [], 0
    while pos < len(raw):
        b0, b1 = raw[pos], raw[pos + 1]
        assert b1 & 0x80, "client frames are masked"
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            n, pos = int.from_bytes(raw[pos : pos + 2]), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(raw[pos : pos + 8]), pos + 8
        key, pos = raw[pos : pos + 4], pos + 4
        out.append((b0 & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(raw[pos : pos + n]))))
        pos += n
    return out


def upgraded(said: list[str]) -> tuple[_Link, FakeTransport, FakeTransport]:
    link = _Link(1024, said.append)
    gw, local = FakeTransport(), FakeTransport()
    link.connection_made(gw)
    link.request(URL("wss://gw.example:8443/v1/tunnel?vm=web01&port=22"), "tok")
    head, _, _ = bytes(gw.out).partition(b"\r\n\r\n")
    key = next(line.split(b": ")[1] for line in head.split(b"\r\n") if line.startswith(b"Sec-WebSocket-Key"))
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert b"Authorization: Bearer tok" in head and b"Host: gw.example:8443" in head
    gw.out.clear()
    link.local = local
    answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Accept: " + accept
    link.data_received(answer + b"\r\n\r\n")
    assert link.upgraded.done() and link.upgraded.exception() is None
    return link, gw, local


async def test_frames_split_anywhere_reach_the_local_side_in_order() -> None:
    """Binary payloads (small, 16-bit and 64-bit lengths) fed one byte at a time arrive whole and in order;
    a notice between them is printed; a ping is answered with a masked pong carrying its payload."""
    said: list[str] = []
    link, gw, local = upgraded(said)
    big = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length
    stream = (
        server_frame(0x2, b"abc")
        + server_frame(0x1, json.dumps({"type": "notice", "message": "maintenance  at\n5"}).encode())
        + server_frame(0x2, b"x" * 300)
        + server_frame(0x9, b"hi")
        + server_frame(0x2, big)
    )
    for i in range(len(stream)):
        link.data_received(stream[i : i + 1])
    assert bytes(local.out) == b"abc" + b"x" * 300 + big
    assert said == ["maintenance at 5"]
    assert client_frames(bytes(gw.out)) == [(0xA, b"hi")]


async def test_a_close_frame_ends_the_link_with_its_code_and_reason_and_is_answered() -> None:
    """CLOSE 4001 with a reason: `ended` has both, the helper answers with CLOSE 4001 and closes; later bytes are ignored."""
    link, gw, local = upgraded([])
    link.data_received(server_frame(0x8, (4001).to_bytes(2) + "patching ✓".encode()) + server_frame(0x2, b"late"))
    assert link.ended.result() == (4001, "patching ✓")
    assert client_frames(bytes(gw.out)) == [(0x8, (4001).to_bytes(2))]
    assert gw.closed and bytes(local.out) == b""


async def test_the_helper_masks_what_it_sends() -> None:
    """Binary data and the eof message go out as masked frames (RFC 6455: a client always masks); a read over
    64 KiB goes as frames of at most 64 KiB (each masked copy stays below glibc's mmap threshold)."""
    link, gw, _ = upgraded([])
    link.send_binary(b"y" * 70_000)
    link.send_eof()
    assert client_frames(bytes(gw.out)) == [(0x2, b"y" * 65536), (0x2, b"y" * 4464), (0x1, b'{"type":"eof"}')]
    assert b"y" * 16 not in gw.out


@pytest.mark.parametrize(
    "frame",
    [
        bytes([0x82, 0x83]) + b"mask" + b"abc",  # a masked server frame
        bytes([0xC2, 0x01]) + b"a",  # RSV1 set (no extension was agreed)
        server_frame(0x9, b"p" * 126),  # a control frame over 125 bytes
        server_frame(0x0, b"a"),  # a continuation of nothing
        server_frame(0x1, b"t" * 2000),  # a text message over max_message (1024 here)
    ],
)
async def test_a_broken_frame_closes_with_a_protocol_error(frame: bytes) -> None:
    """What RFC 6455 forbids ends the tunnel with 1002 (1009 for an oversized text message), sent and reported."""
    link, gw, local = upgraded([])
    link.data_received(frame)
    code, _ = link.ended.result()
    assert code in (1002, 1009)
    assert client_frames(bytes(gw.out))[0][0] == 0x8 and gw.closed and bytes(local.out) == b""


async def test_a_refusal_carries_the_json_message() -> None:
    """A 403 before the upgrade ends `upgraded` with the status and the JSON body's message, read from the same answer."""
    link = _Link(1024, print)
    gw = FakeTransport()
    link.connection_made(gw)
    link.request(URL("wss://127.0.0.1/v1/tunnel?vm=a&port=1"), "tok")
    body = json.dumps({"error": "forbidden", "message": "VM 'a' does not exist or you may not reach it"}).encode()
    answer = b"HTTP/1.1 403 VM 'a' does not exist\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    link.data_received(answer + body[:10])
    assert not link.upgraded.done()
    link.data_received(body[10:])
    exc = link.upgraded.exception()
    assert isinstance(exc, _Refused) and (exc.status, exc.message) == (403, "VM 'a' does not exist or you may not reach it")


async def test_a_bad_accept_key_is_refused() -> None:
    """A 101 whose Sec-WebSocket-Accept does not match the key sent is not a WebSocket: the link is aborted."""
    link = _Link(1024, print)
    gw = FakeTransport()
    link.connection_made(gw)
    link.request(URL("wss://127.0.0.1/v1/tunnel?vm=a&port=1"), "tok")
    link.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n"
    )
    assert link.upgraded.exception() is not None and gw.aborted


async def test_losing_the_connection_without_a_close_frame_is_an_error() -> None:
    """The TLS connection ends with no CLOSE: `ended` says 1006 (never a clean 1000)."""
    link, _, _ = upgraded([])
    link.connection_lost(ConnectionResetError("reset"))
    assert link.ended.result()[0] == CLOSE_LOST == 1006
