"""PROXY protocol on the public port: the real client address behind a load balancer, and only from the balancer.

127.0.0.1 plays the balancer (`public.proxy_protocol_from = ["127.0.0.1/32"]`): raw sockets from it send hand-made
headers, and Debian's haproxy (TCP mode, `send-proxy-v2`, `source 127.0.0.1`) relays real OpenSSH and HTTPS clients
bound to other loopback addresses. 203.0.113.7 (TEST-NET-3) only ever appears inside a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncssh

from tests.e2e.conftest import Gateway, GatewayFactory
from tests.support.haproxy import running_haproxy
from tests.support.hostile import close_all, closed_by_peer, eventually, open_from, refused, tracebacks

BALANCER = "127.0.0.1"
CLAIMED = ("203.0.113.7", 5555)
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(source: tuple[str, int], destination: tuple[str, int] = ("192.0.2.1", 443)) -> bytes:
    body = socket.inet_aton(source[0]) + socket.inet_aton(destination[0]) + struct.pack("!HH", source[1], destination[1])
    return V2_SIG + b"\x21\x11" + struct.pack("!H", len(body)) + body


def v1_header(source: tuple[str, int]) -> bytes:
    return f"PROXY TCP4 {source[0]} 192.0.2.1 {source[1]} 443\r\n".encode()


def balanced(*extra: str, **public: Any) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["public"]["proxy_protocol_from"] = [f"{BALANCER}/32", *extra]
        cfg["public"].update(public)

    return edit


async def banner_after(gw: Gateway, source: str, prefix: bytes, held: list[asyncio.StreamWriter]) -> bool:
    """From `source`, send `prefix` then an SSH version: True if the gateway answered with its banner."""
    r, w = await open_from(source, gw.port)
    held.append(w)
    w.write(prefix + b"SSH-2.0-hostile\r\n")
    async with asyncio.timeout(10):
        with contextlib.suppress(ConnectionResetError):
            return (await r.readline()).startswith(b"SSH-2.0-Bastion")
    return False


def no_logins(gw: Gateway) -> bool:
    names = {"auth_succeeded", "auth_failed", "session_opened", "session_closed", "ssh_handshake_ended"}
    return not [e for e in gw.logs.events() if e.get("event") in names] and not gw.app.registry.list()


async def test_a_v2_header_from_the_balancer_gives_an_ssh_session_the_claimed_source(make_gateway: GatewayFactory) -> None:
    """A raw socket from the balancer sends a v2 header naming 203.0.113.7:5555, then a real SSH session (asyncssh,
    alice+web01, `exit 3`): the session runs, and its registry entry, `auth_succeeded` and `session_closed` carry
    the claimed address and port, never the balancer's."""
    async with make_gateway(balanced()) as gw:
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        try:
            sock.sendall(v2_header(CLAIMED))
            sock.setblocking(False)
            trusted = [k.convert_to_public() for k in gw.app.host_keys]
            async with asyncio.timeout(30):
                conn = await asyncssh.connect(
                    sock=sock, username="alice+web01", client_keys=[str(gw.keys.alice.private)],
                    known_hosts=(trusted, [], []), agent_path=None,
                )  # fmt: skip
                async with conn:
                    proc = await conn.create_process("sleep 30")
                    await eventually(lambda: len(gw.app.registry.list()) == 1)
                    live = gw.app.registry.list()[0]
                    assert (live.source_ip, live.source_port) == CLAIMED
                    proc.close()
                    result = await conn.run("exit 3")
                    assert result.exit_status == 3
        finally:
            sock.close()
        await eventually(lambda: len(gw.logs.events("session_closed")) >= 2)
        closed = gw.logs.events("session_closed")
        assert {(e["source_ip"], e["source_port"]) for e in closed} == {CLAIMED}
        assert [e["source_ip"] for e in gw.logs.events("auth_succeeded")] == [CLAIMED[0]]
        assert not tracebacks(gw)


# --------------------------------------------------------------------------- haproxy in front of the gateway


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def haproxy(gw: Gateway) -> AsyncIterator[int]:
    """haproxy in front of `gw` with send-proxy-v2 from 127.0.0.1; yields its port."""
    with running_haproxy([f"server gw1 127.0.0.1:{gw.port} send-proxy-v2 source 127.0.0.1"]) as port:
        yield port


async def test_openssh_through_haproxy_is_registered_with_its_own_address(make_gateway: GatewayFactory) -> None:
    """`ssh -b 127.0.0.9 -p HAPROXY alice+web01@127.0.0.1 true` through haproxy (send-proxy-v2 from 127.0.0.1): the
    login works and `auth_succeeded` and `session_closed` say 127.0.0.9, the real client, not haproxy's 127.0.0.1."""
    async with make_gateway(balanced()) as gw, haproxy(gw) as port:
        # known_hosts entries are per [host]:port: the same host key, listed for the haproxy port too.
        kh = gw.tmp / "known_hosts"
        lines = "".join(f"[127.0.0.1]:{port} {k.export_public_key().decode().strip()}\n" for k in gw.app.host_keys)
        kh.write_text(kh.read_text() + lines)
        argv = gw.ssh_argv_keys("alice+web01", gw.keys.alice.private, opts=("-b", "127.0.0.9"))
        argv[argv.index("-p") + 1] = str(port)
        result = await gw.run(*argv, "true", timeout=60)
        assert result.rc == 0, result.errtext
        await eventually(lambda: len(gw.logs.events("session_closed")) == 1)
        (closed,) = gw.logs.events("session_closed")
        assert closed["source_ip"] == "127.0.0.9"
        assert [e["source_ip"] for e in gw.logs.events("auth_succeeded")] == ["127.0.0.9"]
        assert refused(gw, "proxy_header") == 0
        assert not tracebacks(gw)


async def test_https_through_haproxy_works_and_sees_the_real_client(make_gateway: GatewayFactory) -> None:
    """Through haproxy from 127.0.0.9, TLS starts after the header: `/healthz` answers 200, and a tunnel request
    without a token is refused with a log line naming 127.0.0.9 (the HTTPS door's `request.remote`)."""
    async with make_gateway(balanced()) as gw, haproxy(gw) as port:
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.9", 0), ssl=ctx)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as http:
            async with http.get(f"https://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "ok"
            async with http.get(f"https://127.0.0.1:{port}/v1/tunnel?vm=web01&port=22") as resp:
                assert resp.status == 401
        await eventually(lambda: bool(gw.logs.events("tunnel_refused")))
        assert [e["source_ip"] for e in gw.logs.events("tunnel_refused")] == ["127.0.0.9"]
        assert refused(gw, "proxy_header") == 0
        assert not tracebacks(gw)


# --------------------------------------------------------------------------- refusals


async def test_a_proxy_header_from_a_non_balancer_is_not_trusted(make_gateway: GatewayFactory) -> None:
    """127.0.0.3 (not a balancer) sends a v2 header claiming 203.0.113.7, then a v1 one, each followed by an SSH
    version: the header is never parsed, detection closes both as unknown bytes, both are counted as
    `proxy_untrusted`, and no SSH handshake, login or session happens."""
    async with make_gateway(balanced()) as gw:
        held: list[asyncio.StreamWriter] = []
        try:
            assert not await banner_after(gw, "127.0.0.3", v2_header(CLAIMED), held)
            assert not await banner_after(gw, "127.0.0.3", v1_header(CLAIMED), held)
        finally:
            close_all(held)
        await eventually(lambda: refused(gw, "proxy_untrusted") == 2)
        assert refused(gw, "proxy_header") == 0
        lines = [e for e in gw.logs.events("connection_refused") if e["reason"] == "proxy_untrusted"]
        assert lines and lines[0]["source_ip"] == "127.0.0.3"
        assert not any(CLAIMED[0] in str(e) for e in gw.logs.events())
        assert no_logins(gw)
        assert not tracebacks(gw)


async def test_a_balancer_connection_without_a_valid_header_is_closed_and_counted(make_gateway: GatewayFactory) -> None:
    """From the balancer: HTTP bytes, a bare SSH version, a v2 header for UDP, and silence past the detect deadline
    are each closed and counted as `proxy_header` (the line says why), with no SSH banner and no login."""
    async with make_gateway(balanced(detect_timeout="500ms")) as gw:
        held: list[asyncio.StreamWriter] = []
        udp = v2_header(CLAIMED)
        udp = udp[:13] + b"\x12" + udp[14:]
        try:
            for junk in (b"GET / HTTP/1.0\r\n\r\n", b"", udp):
                assert not await banner_after(gw, BALANCER, junk, held)
            r, w = await open_from(BALANCER, gw.port)  # says nothing: a header is required, silence is not SSH
            held.append(w)
            assert await closed_by_peer(r)
        finally:
            close_all(held)
        await eventually(lambda: refused(gw, "proxy_header") == 4)
        details = {e.get("detail") for e in gw.logs.events("connection_refused") if e["reason"] == "proxy_header"}
        assert "proxy_signature" in details
        assert no_logins(gw)
        assert not tracebacks(gw)


async def test_per_source_limits_count_the_real_client_not_the_balancer(make_gateway: GatewayFactory) -> None:
    """max_connections_per_source = 2: three connections from the balancer whose headers all name 203.0.113.7 (v2,
    v1, v2): two get the SSH banner, the third is refused as `max_connections_per_source` with the claimed source
    in the line; another client behind the same balancer (203.0.113.8) still gets in, and once the held ones close,
    203.0.113.7 does too."""
    async with make_gateway(balanced(max_connections_per_source=2)) as gw:
        listener = gw.app._listener
        assert listener is not None
        held: list[asyncio.StreamWriter] = []
        other: list[asyncio.StreamWriter] = []
        try:
            assert await banner_after(gw, BALANCER, v2_header(CLAIMED), held)
            assert await banner_after(gw, BALANCER, v1_header((CLAIMED[0], 5556)), held)
            assert not await banner_after(gw, BALANCER, v2_header((CLAIMED[0], 5557)), held)
            assert refused(gw, "max_connections_per_source") == 1
            (line,) = [e for e in gw.logs.events("connection_refused") if e["reason"] == "max_connections_per_source"]
            assert (line["source_ip"], line["balancer_ip"]) == (CLAIMED[0], BALANCER)
            assert await banner_after(gw, BALANCER, v2_header(("203.0.113.8", 6000)), other)
            close_all(held)
            await eventually(lambda: listener.held == 1)
            assert await banner_after(gw, BALANCER, v2_header(CLAIMED), held)
        finally:
            close_all(held)
            close_all(other)
        await eventually(lambda: listener.held == 0 and not listener._by_source)
        assert not tracebacks(gw)
