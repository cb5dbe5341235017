"""At most public.max_tls_handshakes TLS handshakes at once, each within public.tls_handshake_timeout."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiohttp

from tests.e2e.conftest import GatewayFactory
from tests.support.hostile import close_all, closed_by_peer, open_from, refused, tracebacks
from tests.support.probes import fd_count, legit_login_seconds

# A TLS record header announcing a 512-byte ClientHello, and the first bytes of it: the handshake waits for the rest.
HALF_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 16


async def test_handshakes_beyond_the_cap_are_closed_at_once(make_gateway: GatewayFactory) -> None:
    """max_tls_handshakes = 8, tls_handshake_timeout = 2s: eight half-sent ClientHellos are held, the next twelve
    are closed at once and counted, alice logs in over SSH meanwhile; the eight are dropped by the deadline (not
    the old 10 s), and then a real HTTPS client is served."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["public"].update(max_tls_handshakes=8, tls_handshake_timeout="2s", detect_timeout="5s")
        cfg["penalties"] = {"enabled": False}

    async with make_gateway(edit) as gw:
        https = gw.app._https
        assert https is not None
        fds0 = fd_count()
        held: list[asyncio.StreamWriter] = []
        readers: list[asyncio.StreamReader] = []
        try:
            for i in range(8):
                r, w = await open_from(f"127.0.3.{i + 1}", gw.port)
                w.write(HALF_HELLO)
                held.append(w)
                readers.append(r)
            async with asyncio.timeout(10):
                while https.handshakes < 8:  # each reaches the TLS door after detection; no event to wait on
                    await asyncio.sleep(0.02)
            extra: list[asyncio.StreamWriter] = []
            for i in range(12):
                r, w = await open_from(f"127.0.4.{i + 1}", gw.port)
                w.write(HALF_HELLO)
                extra.append(w)
                assert await closed_by_peer(r, timeout=5)
            close_all(extra)
            assert refused(gw, "max_tls_handshakes") == 12
            peak = fd_count()
            took = await legit_login_seconds(gw)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for r in readers:
                assert await closed_by_peer(r, timeout=10)
            waited = loop.time() - t0
        finally:
            close_all(held)
        assert https.handshakes == 0
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        async with aiohttp.ClientSession() as http, http.get(f"https://127.0.0.1:{gw.port}/healthz", ssl=ctx) as resp:
            assert resp.status == 200
        lines = [e for e in gw.logs.events("connection_refused") if e["reason"] == "max_tls_handshakes"]
        assert 1 <= len(lines) < 12
        assert gw.logs.events("tls_handshake_failed")
        assert not tracebacks(gw)
        assert peak <= fds0 + 8 + 12 + 10
        print(f"legit login during a half-TLS flood: {took:.2f}s; fds {fds0} -> peak {peak}; held ones dropped after {waited:.1f}s more")
