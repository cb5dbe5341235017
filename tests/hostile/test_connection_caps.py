"""The public listener's connection caps: per source (IPv4 address / IPv6 /64) and in all, closed at accept."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.e2e.conftest import GatewayFactory
from tests.support.hostile import close_all, eventually, refused, ssh_hello, tracebacks
from tests.support.probes import fd_count, legit_login_seconds


async def test_one_source_cannot_hold_more_than_its_share(make_gateway: GatewayFactory) -> None:
    """max_connections_per_source = 5: 127.0.0.2 holds five connections, twenty more are closed at once and counted
    (logged at most once a second), while alice from 127.0.0.1 logs in during the flood and 127.0.0.2 gets back in
    once its connections are gone. fds stay bounded by what is held."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["public"]["max_connections_per_source"] = 5
        cfg["penalties"] = {"enabled": False}

    async with make_gateway(edit) as gw:
        listener = gw.app._listener
        assert listener is not None
        held: list[asyncio.StreamWriter] = []
        fds0 = fd_count()
        try:
            assert [await ssh_hello(gw, "127.0.0.2", held) for _ in range(5)] == [True] * 5
            assert not any([await ssh_hello(gw, "127.0.0.2", held) for _ in range(20)])
            assert refused(gw, "max_connections_per_source") == 20
            took = await legit_login_seconds(gw)
            assert listener.held >= 5
            await eventually(lambda: fd_count() <= fds0 + 2 * 25 + 10)  # the refused ones are closed on our side too
            close_all(held)
            await eventually(lambda: listener.held == 0)
            assert await ssh_hello(gw, "127.0.0.2", held)
        finally:
            close_all(held)
        lines = [e for e in gw.logs.events("connection_refused") if e["reason"] == "max_connections_per_source"]
        assert 1 <= len(lines) < 20 and lines[0]["listener"] == "public"
        assert not tracebacks(gw)
        print(f"legit login during a per-source flood: {took:.2f}s; fds before {fds0}, now {fd_count()}")


async def test_the_listener_holds_at_most_max_connections(make_gateway: GatewayFactory) -> None:
    """max_connections = 6 over six sources: the seventh connection, from a fresh source, is closed at once and
    counted as max_connections; the gauge shows six held; once they go, a real login works again."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["public"]["max_connections"] = 6
        cfg["penalties"] = {"enabled": False}

    async with make_gateway(edit) as gw:
        held: list[asyncio.StreamWriter] = []
        try:
            assert [await ssh_hello(gw, f"127.0.1.{i + 1}", held) for i in range(6)] == [True] * 6
            assert gw.app.metrics.registry.get_sample_value("bastion_connections_held", {"listener": "public"}) == 6
            assert not await ssh_hello(gw, "127.0.2.1", held)
            assert refused(gw, "max_connections") == 1
            close_all(held)
            assert gw.app._listener is not None
            listener = gw.app._listener
            await eventually(lambda: listener.held == 0)
            took = await legit_login_seconds(gw)
        finally:
            close_all(held)
        assert not tracebacks(gw)
        print(f"legit login after the global cap was full: {took:.2f}s")


async def test_https_connections_count_until_they_close_and_no_longer(make_gateway: GatewayFactory) -> None:
    """An HTTPS connection holds its listener slot for its whole life (not only its handshake) and gives it back when
    it closes: with 3 per source, 20 requests one after the other all succeed and nothing is held afterwards; 3 open
    TLS connections make a 4th from the same source be refused at accept."""
    import ssl

    import aiohttp

    def edit(c: dict[str, Any]) -> None:
        c["public"]["max_connections_per_source"] = 3

    async with make_gateway(edit) as gw:
        listener = gw.app._listener
        assert listener is not None
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        for _ in range(20):
            async with aiohttp.ClientSession() as http, http.get(f"https://127.0.0.1:{gw.port}/healthz", ssl=ctx) as resp:
                assert resp.status == 200
        await eventually(lambda: listener.held == 0)
        held = []
        try:
            for _ in range(3):
                r, w = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx)
                held.append(w)
            await eventually(lambda: listener.held == 3)
            before = refused(gw, "max_connections_per_source")
            r, w = await asyncio.open_connection("127.0.0.1", gw.port)
            held.append(w)
            assert await r.read() == b""
            assert refused(gw, "max_connections_per_source") == before + 1
        finally:
            close_all(held)
        await eventually(lambda: listener.held == 0)
        assert not tracebacks(gw)
