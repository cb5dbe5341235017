"""The RD Gateway at the protocol level, with a FreeRDP-like test client (tests/support/rdg_client.py) against the
real gateway: tokens good and bad, targets not granted, bytes, kills with the notice and the token revoked,
limits, and what a stranger can send before the token is seen."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest

import gateway.protocols.rdg_codec as c
from gateway.tokens import TokenService
from tests.e2e.conftest import Gateway, GatewayFactory, wait_for
from tests.support.clock import FakeClock
from tests.support.hostile import control, tracebacks
from tests.support.rdg_client import RdgRefused, RdgTunnel, connect, freerdp_ws_key

Transport = Literal["websocket", "http"]


class EchoVM:
    """A loopback TCP server playing the VM's RDP port: it echoes everything."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while data := await r.read(256 * 1024):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()


@pytest.fixture
async def echo_vm() -> AsyncIterator[EchoVM]:
    vm = EchoVM()
    vm.server = await asyncio.start_server(vm.handle, "127.0.0.1", 0)
    vm.port = vm.server.sockets[0].getsockname()[1]
    try:
        yield vm
    finally:
        vm.server.close()
        await vm.server.wait_closed()


def with_win(port: int, **rule: Any) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["vms"].append({"name": "win01", "address": "127.0.0.1", "ssh_port": 22, "rdp_port": port, "trust_on_first_use": True})
        cfg["vms"].append({"name": "win02", "address": "127.0.0.1", "ssh_port": 22, "rdp_port": port, "trust_on_first_use": True})
        cfg["rules"].append({"groups": ["ops"], "vms": ["win01"], "protocols": ["rdp"], **rule})

    return edit


def ctx(gw: Gateway) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(gw.ca_file))


async def token_for(gw: Gateway, vm: str = "win01") -> str:
    r = await gw.ssh("alice", "rdp", vm)
    assert r.rc == 0, r.errtext
    [line] = [ln for ln in r.text.splitlines() if ln.startswith("gatewayaccesstoken:s:")]
    return line.removeprefix("gatewayaccesstoken:s:")


async def open_tunnel(gw: Gateway, token: str, port: int, resource: str = "win01", transport: Transport = "websocket") -> RdgTunnel:
    return await connect("127.0.0.1", gw.port, ctx(gw), token=token, resource=resource, rdp_port=port, transport=transport)


async def echo_through(tunnel: RdgTunnel, payload: bytes) -> bytes:
    """Send `payload` while reading the echo (both ways at once, so neither side's buffers fill up)."""

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), 1 << 20):
            await tunnel.sendall(bytes(view[i : i + (1 << 20)]))

    got = bytearray()
    sender = asyncio.ensure_future(send())
    async with asyncio.timeout(120):
        while len(got) < len(payload):
            chunk = await tunnel.recv()
            assert chunk, f"the tunnel ended after {len(got)} of {len(payload)} bytes"
            got += chunk
    await sender
    return bytes(got)


@pytest.mark.parametrize(("transport", "size"), [("websocket", 200 * 1024 * 1024), ("http", 20 * 1024 * 1024)])
async def test_bytes_go_through_unchanged_and_are_counted(
    make_gateway: GatewayFactory, echo_vm: EchoVM, transport: Transport, size: int
) -> None:
    """200 MB (WebSocket) and 20 MB (HTTP transport) echoed through the RD Gateway come back with the same SHA-256;
    the session is rdp-gateway with the client's name, and its byte counts are exact; the client's end is client_closed."""
    async with make_gateway(with_win(echo_vm.port)) as gw:
        tunnel = await open_tunnel(gw, await token_for(gw), echo_vm.port, transport=transport)
        payload = os.urandom(size)
        got = await echo_through(tunnel, payload)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        [live] = gw.app.registry.list()
        assert (live.protocol, live.vm, live.user, live.client_name) == ("rdp-gateway", "win01", "alice", "testpc")
        await tunnel.close()
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed, timeout=20)
        [closed] = gw.logs.events("session_closed")
        assert closed["bytes_up"] == size and closed["bytes_down"] == size and closed["reason"] == "client_closed"
        assert not tracebacks(gw)


@pytest.mark.parametrize("case", ["garbage", "expired", "tunnel_token", "tampered", "missing"])
async def test_bad_tokens_are_refused_at_tunnel_create(make_gateway: GatewayFactory, echo_vm: EchoVM, case: str) -> None:
    """A made-up, expired, tampered, missing token or a tunnel (non-RDG) token: E_PROXY_COOKIE_AUTHENTICATION_ACCESS_DENIED
    at TUNNEL_CREATE, counted as an auth failure, and the VM is never dialled."""
    async with make_gateway(with_win(echo_vm.port)) as gw:
        key = (gw.tmp / "state" / "token.key").read_bytes()
        if case == "garbage":
            token = "v1.bm90.aXQ"
        elif case == "expired":
            past = FakeClock(wall=datetime.now(UTC) - timedelta(hours=1))
            token, _ = TokenService(key, past, 60).issue("alice", vm="win01", port=echo_vm.port)
        elif case == "tunnel_token":
            token = (await gw.ssh("alice", "token")).text.strip()
        elif case == "tampered":
            good = await token_for(gw)
            token = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
        else:
            token = ""
        with pytest.raises(RdgRefused) as refused:
            await open_tunnel(gw, token, echo_vm.port)
        assert (refused.value.stage, refused.value.status) == ("tunnel", c.E_PROXY_COOKIE_AUTHENTICATION_ACCESS_DENIED)
        assert echo_vm.accepted == 0 and not gw.logs.events("session_opened")
        reasons = {e["reason"] for e in gw.logs.events("rdg_refused")}
        expected = {"garbage": "token_invalid", "expired": "token_expired", "tunnel_token": "token_wrong_purpose"}
        expected |= {"tampered": "token_invalid", "missing": "token_missing"}
        assert expected[case] in reasons, reasons
        assert not tracebacks(gw)


@pytest.mark.parametrize("case", ["other_vm", "unknown_vm", "port_not_granted", "other_user"])
async def test_targets_not_granted_are_refused_at_channel_create(make_gateway: GatewayFactory, echo_vm: EchoVM, case: str) -> None:
    """alice's token used for win02, a token for a VM not in the inventory, for a port no rdp rule grants, or bob's
    token (bob has no rdp rule): E_PROXY_RAP_ACCESSDENIED at CHANNEL_CREATE, nothing dialled."""
    async with make_gateway(with_win(echo_vm.port)) as gw:
        tokens = gw.app.tokens
        resource, port = "win01", echo_vm.port
        if case == "other_vm":
            token, resource = await token_for(gw), "win02"
        elif case == "unknown_vm":
            token, _ = tokens.issue("alice", vm="nosuch", port=3389)
            resource, port = "nosuch", 3389
        elif case == "port_not_granted":
            token, _ = tokens.issue("alice", vm="win01", port=22)
            port = 22
        else:
            token, _ = tokens.issue("bob", vm="win01", port=echo_vm.port)
        with pytest.raises(RdgRefused) as refused:
            await open_tunnel(gw, token, port, resource=resource)
        assert (refused.value.stage, refused.value.status) == ("channel", c.E_PROXY_RAP_ACCESSDENIED)
        assert echo_vm.accepted == 0
        assert [e for e in gw.logs.events("session_refused") if e["handler"] == "rdg"]
        assert not tracebacks(gw)


@pytest.mark.parametrize("transport", ["websocket", "http"])
async def test_a_kill_shows_the_notice_closes_the_channel_and_revokes_the_token(
    make_gateway: GatewayFactory, echo_vm: EchoVM, transport: Transport
) -> None:
    """An operator disconnects with a reason: the client gets it as a service message, then CLOSE_CHANNEL; the session
    ends as terminated_by_operator; a reconnect with the same token (FreeRDP's auto-reconnect) is refused."""
    async with make_gateway(with_win(echo_vm.port)) as gw:
        token = await token_for(gw)
        tunnel = await open_tunnel(gw, token, echo_vm.port, transport=transport)
        assert await echo_through(tunnel, b"hello") == b"hello"
        [live] = gw.app.registry.list()
        status, body = await control(gw, "DELETE", f"/v1/sessions/{live.id}", {"reason": "patch night"})
        assert status == 200 and body["result"] == "disconnected", body
        async with asyncio.timeout(10):
            await tunnel.wait_closed()
        assert tunnel.service_messages == ["[bastion] You have been disconnected. patch night"]
        assert tunnel.close_status == 0
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed, timeout=10)
        [closed] = gw.logs.events("session_closed")
        assert closed["reason"] == "terminated_by_operator"
        with pytest.raises(RdgRefused) as refused:
            await open_tunnel(gw, token, echo_vm.port, transport=transport)
        assert refused.value.stage == "tunnel"
        assert [e for e in gw.logs.events("rdg_refused") if e["reason"] == "token_revoked"]


async def test_notices_and_grace_warnings_are_service_messages(make_gateway: GatewayFactory, echo_vm: EchoVM) -> None:
    """A broadcast notice and a grace disconnect's warning reach an RD Gateway session as service messages."""
    async with make_gateway(with_win(echo_vm.port)) as gw:
        tunnel = await open_tunnel(gw, await token_for(gw), echo_vm.port)
        status, body = await control(gw, "POST", "/v1/notices", {"message": "backup at noon"})
        assert status == 200 and set(body["results"].values()) == {"delivered"}
        [live] = gw.app.registry.list()
        status, body = await control(gw, "DELETE", f"/v1/sessions/{live.id}", {"reason": "soon", "grace_s": 30})
        assert body["result"] == "pending"
        assert await echo_through(tunnel, b"x") == b"x"  # a round trip: both messages were sent before it

        async def both() -> None:
            while len(tunnel.service_messages) < 2:
                await asyncio.sleep(0.02)

        async with asyncio.timeout(10):
            await both()
        assert tunnel.service_messages[0] == "[bastion] backup at noon"
        assert tunnel.service_messages[1].startswith("[bastion] You will be disconnected in 30 seconds: soon")
        await tunnel.close()


async def test_an_idle_limit_ends_with_session_timeout(make_gateway: GatewayFactory, echo_vm: EchoVM) -> None:
    """A rule's idle_timeout of 1 s: the session ends as idle_timeout, the client reads why, and CLOSE_CHANNEL carries
    E_PROXY_SESSIONTIMEOUT, which FreeRDP names."""
    async with make_gateway(with_win(echo_vm.port, idle_timeout="1s", warn_before="1s")) as gw:
        tunnel = await open_tunnel(gw, await token_for(gw), echo_vm.port)
        async with asyncio.timeout(15):
            await tunnel.wait_closed()
        assert tunnel.close_status == c.E_PROXY_SESSIONTIMEOUT
        assert any("idle timeout" in m for m in tunnel.service_messages), tunnel.service_messages
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed, timeout=10)
        [closed] = gw.logs.events("session_closed")
        assert closed["reason"] == "idle_timeout"


async def test_one_tunnel_at_a_time_per_token(make_gateway: GatewayFactory, echo_vm: EchoVM) -> None:
    """A second tunnel on a token whose first is still open is refused; once the first ends, the token works again
    (FreeRDP reconnecting after a network failure)."""
    async with make_gateway(with_win(echo_vm.port)) as gw:
        token = await token_for(gw)
        first = await open_tunnel(gw, token, echo_vm.port)
        with pytest.raises(RdgRefused):
            await open_tunnel(gw, token, echo_vm.port)
        await first.close()
        await wait_for(lambda: not gw.app.registry.list(), gw.logs.changed, timeout=20)
        again = await open_tunnel(gw, token, echo_vm.port)
        assert await echo_through(again, b"back") == b"back"
        await again.close()


async def tls(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx(gw))


async def closed_by_gateway(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """Everything the gateway sent until it closed (bounded)."""
    out = bytearray()
    async with asyncio.timeout(timeout):
        try:
            while data := await reader.read(65536):
                out += data
        except (ConnectionResetError, ssl.SSLError):
            pass
    return bytes(out)


def ws_upgrade() -> bytes:
    key = freerdp_ws_key()
    return (
        "RDG_OUT_DATA /remoteDesktopGateway/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-Websocket-Version: 13\r\nSec-Websocket-Key: {key}\r\nRDG-Auth-Scheme: PAA\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def test_strangers_are_cut_at_the_preauth_deadline_and_on_bad_bytes(make_gateway: GatewayFactory, echo_vm: EchoVM) -> None:
    """Before the token is seen: a client that upgrades and then says nothing, one that sends half a request head, and
    one that sends garbage packets are each closed (the first two at the 1 s deadline), with a log line and no
    traceback; an NTLM handshake is refused with a failed HANDSHAKE_RESPONSE; aiohttp still serves /healthz."""

    def edit(cfg: dict[str, Any]) -> None:
        with_win(echo_vm.port)(cfg)
        cfg["public"]["header_timeout"] = "1s"

    async with make_gateway(edit) as gw:
        r1, w1 = await tls(gw)
        w1.write(ws_upgrade())
        r2, w2 = await tls(gw)
        w2.write(b"RDG_OUT_DATA /remoteDesktopGateway/ HTTP/1.1\r\nHost: x\r\n")
        r3, w3 = await tls(gw)
        w3.write(ws_upgrade())
        w3.write(c.ws_client_frame(c.WS_BINARY, b"\x01\x00\x00\x00\xff\xff\xff\x7f" + b"x" * 32, os.urandom(4)))
        r4, w4 = await tls(gw)
        w4.write(ws_upgrade())
        w4.write(c.ws_client_frame(c.WS_BINARY, c.handshake_request(c.HTTP_EXTENDED_AUTH_NONE), os.urandom(4)))
        got = await asyncio.gather(*(closed_by_gateway(r) for r in (r1, r2, r3, r4)))
        assert got[0].startswith(b"HTTP/1.1 101") and got[1] == b"" and got[2].startswith(b"HTTP/1.1 101")
        frames = c.WsClientReader().feed(got[3].split(b"\r\n\r\n", 1)[1])
        [hs] = c.ServerPacketReader().feed(frames[0][1])
        assert isinstance(hs, c.HandshakeResponse) and c.failed(hs.error)
        for w in (w1, w2, w3, w4):
            w.close()
        reasons = {e["reason"] for e in gw.logs.events("rdg_refused")}
        assert "preauth_timeout" in reasons and "auth_scheme" in reasons and reasons & {"too_large", "bad_packet"}, reasons
        assert echo_vm.accepted == 0 and not tracebacks(gw)
        reader, writer = await tls(gw)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await closed_by_gateway(reader)).startswith(b"HTTP/1.1 200")
        writer.close()


async def test_a_bad_token_earns_its_source_a_penalty(make_gateway: GatewayFactory, echo_vm: EchoVM) -> None:
    """Like a failed SSH login: a refused RD Gateway token adds to its source's penalty; above the minimum, that
    source's next connection is closed at accept (counted as `penalty`)."""
    from tests.support.hostile import refused

    def edit(cfg: dict[str, Any]) -> None:
        with_win(echo_vm.port)(cfg)
        cfg["penalties"] = {"exempt": [], "auth_failure": "30s", "min": "15s"}

    async with make_gateway(edit) as gw:
        with pytest.raises(RdgRefused):
            await open_tunnel(gw, "v1.bm90.aXQ", echo_vm.port)
        before = refused(gw, "penalty")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            assert await closed_by_gateway(reader) == b""
        finally:
            writer.close()
        assert refused(gw, "penalty") == before + 1
