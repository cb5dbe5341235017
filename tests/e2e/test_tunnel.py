"""The WebSocket tunnel on port 443 and the `bastion tunnel` helper, with tokens from `ssh USER@gw token`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import ssl
import struct
import sys
from asyncio.subprocess import PIPE
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from gateway.clock import SystemClock
from gateway.tokens import TokenService
from tests.e2e.conftest import Echo, Gateway, GatewayFactory, wait_for
from tests.e2e.test_ssh_jump import roundtrip
from tests.support.peers import free_port

BASTION = [sys.executable, "-m", "gateway"]


def with_tcp_vm(port: int, *, grant_ports: list[int] | None = None) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["vms"].append({"name": "echo01", "address": "127.0.0.1", "ssh_port": 22, "trust_on_first_use": True})
        cfg["rules"].append({"groups": ["ops"], "vms": ["echo01"], "protocols": ["tcp"], "ports": grant_ports or [port]})

    return edit


class Helper:
    """`bastion tunnel` as a user runs it, fetching its token over SSH."""

    def __init__(self, gw: Gateway, vm: str, port: int, *extra: str) -> None:
        self.local = free_port()
        self.argv = [
            *BASTION, "tunnel", "--gateway", f"127.0.0.1:{gw.port}", "--vm", vm, "--port", str(port),
            "--local", f"127.0.0.1:{self.local}", "--ca-file", str(gw.ca_file), "--user", "alice",
            "--ssh-config", str(gw.ssh_config), *extra,
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None
        self.err = bytearray()
        self.changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Helper:
        self.proc = await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=PIPE, stderr=PIPE)
        self._reader = asyncio.create_task(self._collect())
        await wait_for(lambda: b"listening on" in self.err, self.changed, timeout=20)
        return self

    async def _collect(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.err.extend(line)
            self.changed.set()

    @property
    def text(self) -> str:
        return self.err.decode(errors="replace")

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader


async def test_token_and_ls_from_the_gateway(make_gateway: GatewayFactory, echo: Echo) -> None:
    """`ssh alice@gw token` prints a token bound to alice; `ssh alice@gw ls` lists what she may reach."""
    async with make_gateway(with_tcp_vm(echo.port)) as gw:
        r = await gw.ssh("alice", "token")
        assert r.rc == 0, r.errtext
        claims = gw.app.tokens.verify(r.text.strip())
        assert claims.user == "alice" and claims.expires_at > 0
        issued = gw.logs.events("token_issued")
        assert issued and r.text.strip() not in str(gw.logs.events())  # the token itself is never logged
        r = await gw.ssh("alice", "ls")
        assert r.rc == 0
        [line] = [x for x in r.text.splitlines() if "echo01" in x]
        assert "tcp" in line and f"ports {echo.port}" in line
        assert "web01" in r.text


async def test_tunnel_carries_64mb_each_way_with_half_close(make_gateway: GatewayFactory, echo: Echo) -> None:
    """64 MB of random bytes go through the helper and the gateway to an echo VM and come back intact;
    the local half-close reaches the VM and its close comes back after all data; the session is tracked as tcp."""
    async with make_gateway(with_tcp_vm(echo.port)) as gw, Helper(gw, "echo01", echo.port) as helper:
        payload = os.urandom(64 * 1024 * 1024)
        got = await roundtrip(helper.local, payload)
        assert len(got) == len(payload) and got == payload
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed)
        [line] = gw.logs.events("session_closed")
        assert (line["protocol"], line["vm"], line["user"], line["target_port"]) == ("tcp", "echo01", "alice", echo.port)
        assert line["bytes_up"] == len(payload) and line["bytes_down"] == len(payload)
        assert line["reason"] == "client_closed"  # the helper sent EOF first; the VM only followed


async def test_vm_reset_mid_stream_closes_the_local_connection_with_an_error(make_gateway: GatewayFactory) -> None:
    """A VM that resets the connection mid-stream: the local connection is torn down and the helper says why."""

    async def resetter(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(1000)
        w.write(b"partial")
        await w.drain()
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    server = await asyncio.start_server(resetter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with make_gateway(with_tcp_vm(port)) as gw, Helper(gw, "echo01", port) as helper:
            r, w = await asyncio.open_connection("127.0.0.1", helper.local)
            w.write(b"x" * 100_000)
            got = bytearray()
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(20):
                    while data := await r.read(65536):
                        got.extend(data)
                    raise ConnectionResetError("closed without an error")  # a clean EOF would hide the reset
            w.close()
            await wait_for(lambda: "the VM reset the connection" in helper.text, helper.changed)
            await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed)
            [line] = gw.logs.events("session_closed")
            assert line["reason"] == "vm_reset"
    finally:
        server.close()
        await server.wait_closed()


async def ws_status(gw: Gateway, query: str, token: str | None) -> tuple[int, str]:
    """Try the upgrade; on a refusal read the JSON reason the way the helper does (a plain GET)."""
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    url = f"127.0.0.1:{gw.port}/v1/tunnel?{query}"
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect("wss://" + url, headers=headers, ssl=ctx) as ws:
                await ws.close()
                return 101, ""
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status
        async with http.get("https://" + url, headers=headers, ssl=ctx) as resp:
            assert resp.status == status
            return status, (await resp.json())["message"]


async def test_refusals_happen_before_any_connection(make_gateway: GatewayFactory, watcher: socket.socket) -> None:
    """No, expired, tampered or foreign tokens get 401; an ungranted VM, port or unknown VM get 403 with the
    same wording for unknown and ungranted; the VM port is never dialled."""
    port = watcher.getsockname()[1]
    async with make_gateway(with_tcp_vm(port, grant_ports=[port + 1 if port < 65535 else port - 1])) as gw:
        good = (await gw.ssh("alice", "token")).text.strip()
        key = (gw.tmp / "state" / "token.key").read_bytes()
        expired, _ = TokenService(key, SystemClock(), lifetime=-60).issue("alice")
        foreign, _ = TokenService(os.urandom(32), SystemClock(), lifetime=600).issue("alice")
        tampered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
        for token, words in (
            (None, "bearer token is required"),
            (expired, "expired"),
            (tampered, "signature"),
            (foreign, "signature"),
            ("junk", "malformed"),
        ):
            status, message = await ws_status(gw, f"vm=echo01&port={port}", token)
            assert status == 401 and words in message, (token, status, message)
        status, message = await ws_status(gw, f"vm=echo01&port={port}", good)
        assert status == 403 and f"port {port} on VM 'echo01' is not granted to you" in message
        s1, m1 = await ws_status(gw, "vm=web02&port=22", good)
        s2, m2 = await ws_status(gw, "vm=nosuch&port=22", good)
        assert (s1, s2) == (403, 403)
        assert m1 == "VM 'web02' does not exist or you may not reach it" and m2 == "VM 'nosuch' does not exist or you may not reach it"
        for bad in ("http", "%C2%B2", "9" * 5000, "0", "65536"):  # "²" and huge numbers once gave a 500
            status, _ = await ws_status(gw, f"vm=echo01&port={bad}", good)
            assert status == 400, bad
        with pytest.raises(BlockingIOError):
            watcher.accept()
        assert all(e["reason"] for e in gw.logs.events("tunnel_refused"))
        assert good not in str(gw.logs.events())


async def test_helper_prints_a_refusal(make_gateway: GatewayFactory, echo: Echo) -> None:
    """With a bad token the helper tells the user the gateway refused, and closes that local connection."""
    async with make_gateway(with_tcp_vm(echo.port)) as gw, Helper(gw, "echo01", echo.port, "--token", "v1.bad.token") as helper:
        r, w = await asyncio.open_connection("127.0.0.1", helper.local)
        async with asyncio.timeout(20):
            with contextlib.suppress(ConnectionResetError):  # an abort may arrive as a reset
                assert await r.read() == b""
        w.close()
        await wait_for(lambda: "the gateway refused the tunnel (401)" in helper.text, helper.changed)


async def test_forced_disconnect_ends_one_tunnel_with_the_notice(make_gateway: GatewayFactory, echo: Echo) -> None:
    """An operator ends one tunnelled connection: the helper prints the notice, that connection closes,
    the session leaves the registry, and another tunnelled connection keeps working."""
    async with make_gateway(with_tcp_vm(echo.port)) as gw, Helper(gw, "echo01", echo.port) as helper:
        r1, w1 = await asyncio.open_connection("127.0.0.1", helper.local)
        w1.write(b"one")
        async with asyncio.timeout(20):
            assert await r1.readexactly(3) == b"one"
        r2, w2 = await asyncio.open_connection("127.0.0.1", helper.local)
        w2.write(b"two")
        async with asyncio.timeout(20):
            assert await r2.readexactly(3) == b"two"
        await wait_for(lambda: len(gw.app.registry.list()) == 2, gw.logs.changed)
        first = min(gw.app.registry.list(), key=lambda s: s.started_at)
        assert first.protocol == "tcp"
        assert gw.app.registry.terminate(first.id, "closing RDP for patching", 0)
        await wait_for(lambda: "You have been disconnected. closing RDP for patching" in helper.text, helper.changed)
        async with asyncio.timeout(20):
            with_reset = False
            try:
                rest = await r1.read()
            except ConnectionResetError:
                with_reset, rest = True, b""
            assert rest == b"" or with_reset
        await wait_for(lambda: gw.app.registry.get(first.id) is None, gw.logs.changed)
        w2.write(b"still")
        async with asyncio.timeout(20):
            assert await r2.readexactly(5) == b"still"
        w1.close()
        w2.close()


async def test_oversized_message_closes_the_tunnel(make_gateway: GatewayFactory, echo: Echo) -> None:
    """A WebSocket message over the size limit (1 MiB by default) ends the tunnel and its session, relaying nothing.

    aiohttp drops the connection on an oversized message without sending a close frame, so the client
    sees 1006 (abnormal closure) rather than 1009."""
    async with make_gateway(with_tcp_vm(echo.port)) as gw:
        token = (await gw.ssh("alice", "token")).text.strip()
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"wss://127.0.0.1:{gw.port}/v1/tunnel?vm=echo01&port={echo.port}", headers={"Authorization": f"Bearer {token}"}, ssl=ctx
            ) as ws,
        ):
            await ws.send_bytes(b"x" * (1024 * 1024 + 1))
            async with asyncio.timeout(20):
                msg = await ws.receive()
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code in (1006, 1009)
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed)
        assert gw.logs.events("session_closed")[0]["bytes_up"] == 0


async def test_static_token_from_config_opens_a_tunnel(make_gateway: GatewayFactory, echo: Echo) -> None:
    """A per-user automation token configured as a SHA-256 digest works with the helper's --token."""
    import hashlib

    token = "automation-" + "z" * 30

    def edit(cfg: dict[str, Any]) -> None:
        with_tcp_vm(echo.port)(cfg)
        cfg["users"][0]["tokens_sha256"] = [hashlib.sha256(token.encode()).hexdigest()]

    async with make_gateway(edit) as gw, Helper(gw, "echo01", echo.port, "--token", token) as helper:
        assert await roundtrip(helper.local, b"automated") == b"automated"
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed)
        assert gw.logs.events("session_closed")[0]["user"] == "alice"


async def test_junk_control_messages_are_ignored(make_gateway: GatewayFactory, echo: Echo) -> None:
    """Deeply nested or oversized JSON in text frames (once a RecursionError and a lingering session) is ignored:
    the tunnel keeps relaying and ends normally, with nothing but JSON lines logged."""
    async with make_gateway(with_tcp_vm(echo.port)) as gw:
        token = (await gw.ssh("alice", "token")).text.strip()
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        url = f"wss://127.0.0.1:{gw.port}/v1/tunnel?vm=echo01&port={echo.port}"
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers={"Authorization": f"Bearer {token}"}, ssl=ctx) as ws:
            for junk in ("[" * 50_000, '{"type": ' * 2000, "not json", '{"type": 7}', "[]"):
                await ws.send_str(junk)
            await ws.send_bytes(b"still here")
            async with asyncio.timeout(20):
                msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == b"still here"
            await ws.send_str('{"type":"eof"}')
            async with asyncio.timeout(20):
                closed = await ws.receive()
            assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1000
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed)
        [line] = gw.logs.events("session_closed")
        assert line["reason"] == "client_closed"


async def test_a_plain_get_of_an_allowed_tunnel_dials_nothing(make_gateway: GatewayFactory, watcher: socket.socket) -> None:
    """GET /v1/tunnel without the WebSocket upgrade, for a VM and port that are granted: 400, and the VM's port is
    never dialled (before, the gateway dialled it and only then refused)."""
    port = watcher.getsockname()[1]
    async with make_gateway(with_tcp_vm(port)) as gw:
        token = (await gw.ssh("alice", "token")).text.strip()
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        url = f"https://127.0.0.1:{gw.port}/v1/tunnel?vm=echo01&port={port}"
        async with aiohttp.ClientSession() as http, http.get(url, headers={"Authorization": f"Bearer {token}"}, ssl=ctx) as resp:
            assert resp.status == 400
            assert "WebSocket upgrade" in (await resp.json())["message"]
        with pytest.raises(BlockingIOError):
            watcher.accept()
        assert not gw.logs.events("session_opened")


async def test_a_new_tunnel_resumes_the_tls_session_and_still_sends_its_token(make_gateway: GatewayFactory, echo: Echo) -> None:
    """The helper's second tunnel resumes the TLS session of its first (no new certificate check, no new server
    signature), and the gateway still checks a token on it: two sessions, each opened by the token's user."""
    from gateway.client.tunnel import TokenSource, Tunnel

    async with make_gateway(with_tcp_vm(echo.port)) as gw:
        token = (await gw.ssh("alice", "token")).text.strip()
        out = io.StringIO()
        tunnel = Tunnel(f"127.0.0.1:{gw.port}", "echo01", echo.port, TokenSource(fixed=token), ca_file=str(gw.ca_file), out=out)
        _, port = await tunnel.start("127.0.0.1", 0)
        try:
            assert await roundtrip(port, b"first") == b"first"
            assert tunnel.resumed == 0
            assert await roundtrip(port, b"second") == b"second"
            assert tunnel.resumed == 1
        finally:
            await tunnel.stop()
        await wait_for(lambda: len(gw.logs.events("session_closed")) == 2, gw.logs.changed)
        assert [e["user"] for e in gw.logs.events("session_opened")] == ["alice", "alice"]


async def test_a_refused_token_on_a_resumed_session_is_still_refused(make_gateway: GatewayFactory, echo: Echo) -> None:
    """TLS resumption skips the handshake's certificate work, never the token: a helper whose TLS session came
    from a good tunnel but whose next token is bad gets 401 on that tunnel."""
    from gateway.client.tunnel import TokenSource, Tunnel

    async with make_gateway(with_tcp_vm(echo.port)) as gw:
        token = (await gw.ssh("alice", "token")).text.strip()
        out = io.StringIO()
        tokens = TokenSource(fixed=token)
        tunnel = Tunnel(f"127.0.0.1:{gw.port}", "echo01", echo.port, tokens, ca_file=str(gw.ca_file), out=out)
        _, port = await tunnel.start("127.0.0.1", 0)
        try:
            assert await roundtrip(port, b"good") == b"good"
            tokens.fixed = "v1.bad.token"
            r, w = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(20):
                with contextlib.suppress(ConnectionResetError):
                    assert await r.read() == b""
            w.close()
            assert "the gateway refused the tunnel (401)" in out.getvalue()
            assert tunnel.resumed == 1
        finally:
            await tunnel.stop()


def masked(op: int, payload: bytes, *, fin: bool = True) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | op])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def test_the_gateway_reads_fragments_answers_pings_and_ends_on_close(make_gateway: GatewayFactory, echo: Echo) -> None:
    """A hand-written client over TLS: a binary message in three fragments (one header split across writes)
    reaches the VM whole, a ping is answered with a pong carrying its payload, and a CLOSE 1000 ends the session
    as client_closed with every byte counted."""
    async with make_gateway(with_tcp_vm(echo.port)) as gw:
        token = (await gw.ssh("alice", "token")).text.strip()
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        r, w = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx, server_hostname="127.0.0.1")
        w.write(
            f"GET /v1/tunnel?vm=echo01&port={echo.port} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        async with asyncio.timeout(20):
            head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        first = masked(0x2, b"frag-", fin=False)
        w.write(first[:3])
        await w.drain()
        w.write(first[3:] + masked(0x0, b"ment" * 100, fin=False) + masked(0x9, b"ping!") + masked(0x0, b"-end"))
        expected = b"frag-" + b"ment" * 100 + b"-end"
        got, pong = bytearray(), b""
        async with asyncio.timeout(20):
            while len(got) < len(expected) or not pong:
                b0, b1 = await r.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    n = int.from_bytes(await r.readexactly(2))
                payload = await r.readexactly(n)
                if b0 & 0x0F == 0x2:
                    got += payload
                elif b0 & 0x0F == 0xA:
                    pong = payload
        assert bytes(got) == expected and pong == b"ping!"
        w.write(masked(0x8, (1000).to_bytes(2)))
        async with asyncio.timeout(20):
            b0, b1 = await r.readexactly(2)
            assert b0 & 0x0F == 0x8 and int.from_bytes(await r.readexactly(b1 & 0x7F)) == 1000
        w.close()
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed)
        [line] = gw.logs.events("session_closed")
        assert line["reason"] == "client_closed" and line["bytes_up"] == len(expected) == line["bytes_down"]
