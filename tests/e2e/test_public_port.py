"""One port, two doors: SSH and TLS (HTTPS) share the public listener."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import Gateway, GatewayFactory


async def test_healthz_over_tls_on_the_ssh_port(gw: Gateway) -> None:
    """A TLS client on the same port reaches the HTTPS door; the certificate verifies for 127.0.0.1."""
    ctx = ssl.create_default_context(cafile=str(gw.tmp / "state" / "tls.crt"))
    async with aiohttp.ClientSession() as http, http.get(f"https://127.0.0.1:{gw.port}/healthz", ssl=ctx) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "node": "test-node"}
        assert resp.headers["Server"] == "bastion"  # no library or Python version for scanners


async def test_tls_offers_no_cbc_and_no_static_rsa(gw: Gateway) -> None:
    """A TLS 1.2 client that offers only CBC suites is refused; an AEAD one is served."""
    cbc = ssl.create_default_context(cafile=str(gw.tmp / "state" / "tls.crt"))
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _, w = await asyncio.open_connection("127.0.0.1", gw.port, ssl=cbc)
        w.close()
    gcm = ssl.create_default_context(cafile=str(gw.tmp / "state" / "tls.crt"))
    gcm.maximum_version = ssl.TLSVersion.TLSv1_2
    gcm.set_ciphers("ECDHE+AESGCM")
    _, w = await asyncio.open_connection("127.0.0.1", gw.port, ssl=gcm)
    w.close()


async def test_silent_client_gets_the_ssh_banner(gw: Gateway) -> None:
    """A client that sends nothing is taken for SSH, since SSH servers speak first."""
    r, w = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        async with asyncio.timeout(10):
            assert (await r.readline()).startswith(b"SSH-2.0-Bastion")
    finally:
        w.close()


async def test_plain_http_on_the_public_port_reads_which_protocols_it_speaks(gw: Gateway) -> None:
    """`curl http://` to the public port gets a 400 whose one line says to use https:// or ssh, then the close;
    the refusal is logged and the gateway keeps serving."""
    r = await gw.run("curl", "-sS", "-i", "--max-time", "10", f"http://127.0.0.1:{gw.port}/healthz", stdin=None)
    assert r.rc == 0, r.errtext
    assert r.text.startswith("HTTP/1.1 400 ") and r.text.endswith("\r\n\r\nThis port speaks SSH and HTTPS (TLS); use https:// or ssh.\n"), (
        r.text
    )
    assert [e for e in gw.logs.events("connection_refused") if e["reason"] == "plain_http"]
    assert 'bastion_connections_refused_total{listener="public",reason="plain_http"} 1.0' in gw.app.metrics.render().decode()
    ok = await gw.ssh("alice+web01", "echo still-serving")
    assert ok.text == "still-serving\n"


async def test_plain_http_on_the_control_port_gets_the_same_line(gw: Gateway) -> None:
    """An operator who types http:// for the control port reads the same one-line hint instead of a reset."""
    url = gw.control_url.replace("https://", "http://") + "/v1/sessions"
    r = await gw.run("curl", "-sS", "--max-time", "10", url, stdin=None)
    assert (r.rc, r.text) == (0, "This port speaks SSH and HTTPS (TLS); use https:// or ssh.\n"), r.errtext


async def test_bytes_that_are_no_protocol_get_the_connection_closed(gw: Gateway) -> None:
    """Bytes that are neither SSH, TLS nor an HTTP request line get the connection closed without an answer."""
    r, w = await asyncio.open_connection("127.0.0.1", gw.port)
    w.write(b"\x00\x01garbage\r\n")
    try:
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionResetError):
                assert await r.read(100) == b""
    finally:
        w.close()
    assert [e for e in gw.logs.events("connection_refused") if e["reason"] == "unknown_protocol"]
    assert 'bastion_connections_refused_total{listener="public",reason="unknown_protocol"} 1.0' in gw.app.metrics.render().decode()


async def test_https_client_that_never_sends_headers_is_dropped(make_gateway: GatewayFactory) -> None:
    """A TLS client that completes the handshake and then trickles nothing is closed after header_timeout."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["public"]["header_timeout"] = "1s"

    async with make_gateway(edit) as gw:
        ctx = ssl.create_default_context(cafile=str(gw.tmp / "state" / "tls.crt"))
        r, w = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        try:
            async with asyncio.timeout(15):
                with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                    assert await r.read() == b""
        finally:
            w.close()
        assert gw.logs.events("http_request_timeout")


@pytest.mark.parametrize(
    "request_line",
    [b"GET /nosuch HTTP/1.1", b"DELETE /healthz HTTP/1.1", b"GET /v1/tunnel?vm=x&port=1 HTTP/1.1"],
    ids=["404", "405", "401"],
)
async def test_every_answer_closes_the_connection(gw: Gateway, request_line: bytes) -> None:
    """A 404, 405 or refusal (raised or returned) ends its connection: keep-alive would let one connection outlive
    the header deadline for aiohttp's hour-long keep-alive timer."""
    ctx = ssl.create_default_context(cafile=str(gw.tmp / "state" / "tls.crt"))
    r, w = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx)
    try:
        w.write(request_line + b"\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await r.read()  # returns only once the gateway closed the connection
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 4") and b"connection: close" in head, head
    finally:
        w.close()


class CountingSocket(socket.socket):
    """A real socket that counts its peeks (the OS boundary the detector works at)."""

    peeks = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            self.peeks += 1
        return super().recv(bufsize, flags)


async def test_a_client_hello_that_came_while_the_loop_was_held_up_is_tls() -> None:
    """The detect deadline is the client's silence, not the gateway's: a ClientHello that arrived while this loop was
    blocked past the deadline (a loaded box, a long collection) is TLS, not a silent SSH client to send a banner."""
    from gateway.net.detect import Door
    from gateway.net.listener import peek_door

    hello = bytes.fromhex("160301") + (200).to_bytes(2, "big") + b"\x01" + b"\x00" * 199
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        sock, _ = server.accept()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()

        def held_up() -> None:
            client.sendall(hello)
            time.sleep(0.4)  # the loop itself is stuck past the deadline (what is being tested, not a wait)

        try:
            loop.call_soon(held_up)
            assert await peek_door(sock, 0.2) is Door.TLS
            assert sock.recv(3, socket.MSG_PEEK) == hello[:3]  # nothing was consumed
        finally:
            client.close()
            sock.close()


async def test_one_byte_does_not_make_the_detector_spin() -> None:
    """A client that sends `S` and stops: the detector waits for more bytes without re-peeking on a timer
    (once a wake-up every 10 ms until the deadline), then classifies when the rest arrives."""
    from gateway.net.detect import Door
    from gateway.net.listener import peek_door

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        raw, _ = server.accept()
        sock = CountingSocket(fileno=raw.detach())
        sock.setblocking(False)
        try:
            client.sendall(b"S")
            assert await peek_door(sock, 0.5) is Door.SSH  # the deadline: silence after a prefix is SSH
            assert sock.peeks == 2, sock.peeks  # one when `S` came, one more at the deadline
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1  # handed on as it came
            client.sendall(b"SH-2.0-x\r\n")
            assert await peek_door(sock, 5) is Door.SSH
            assert sock.recv(1, socket.MSG_PEEK) == b"S"  # nothing was consumed
        finally:
            client.close()
            sock.close()
