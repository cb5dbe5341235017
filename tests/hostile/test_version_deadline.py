"""ssh.version_timeout: a connection handed to the SSH door must send its identification string soon."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.e2e.conftest import GatewayFactory
from tests.support.hostile import close_all, closed_by_peer, eventually, open_from, refused, sample, ssh_hello, tracebacks
from tests.support.probes import fd_count, legit_login_seconds


async def test_silent_clients_are_dropped_at_the_version_deadline(make_gateway: GatewayFactory) -> None:
    """version_timeout 1s (login_grace_time is 20s): twenty silent clients from 20 sources get the banner and are
    closed soon after, each counted as version_timeout and reported as grace exceeded; alice logs in meanwhile."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["ssh"].update(version_timeout="1s")
        cfg["public"]["detect_timeout"] = "200ms"
        cfg["penalties"] = {"exempt": []}

    async with make_gateway(edit) as gw:
        fds0 = fd_count()
        conns = [await open_from(f"127.0.5.{i + 1}", gw.port) for i in range(20)]
        try:
            took = await legit_login_seconds(gw)
            peak = fd_count()
            for r, _ in conns:
                assert (await r.readline()).startswith(b"SSH-2.0-Bastion")  # served: the server speaks first
                assert await closed_by_peer(r, timeout=10)
        finally:
            close_all([w for _, w in conns])
        assert refused(gw, "version_timeout") == 20
        assert sample(gw, "bastion_penalties_total", event="grace_exceeded") == 20
        lines = [e for e in gw.logs.events("connection_refused") if e["reason"] == "version_timeout"]
        assert 1 <= len(lines) < 20
        assert not gw.logs.events("ssh_handshake_ended")  # one rate-limited line, not one per connection
        assert not tracebacks(gw)
        await eventually(lambda: fd_count() <= fds0 + 5)
        print(f"legit login with 20 silent SSH clients: {took:.2f}s; fds {fds0} -> peak {peak} -> {fd_count()}")


async def test_a_client_that_sent_its_version_is_not_cut_off(make_gateway: GatewayFactory) -> None:
    """A client that sent its version in time but is slow to log in keeps its connection past version_timeout."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["ssh"].update(version_timeout="1s", login_grace_time="3s")

    async with make_gateway(edit) as gw:
        reader, w = await open_from("127.0.0.2", gw.port)
        try:
            t0 = asyncio.get_running_loop().time()
            w.write(b"SSH-2.0-slow\r\n")
            assert (await reader.readline()).startswith(b"SSH-2.0-Bastion")
            assert await closed_by_peer(reader, timeout=15)
            assert asyncio.get_running_loop().time() - t0 >= 2.5  # login_grace_time, not the 1s version deadline
        finally:
            w.close()
        assert refused(gw, "version_timeout") == 0
        assert [e for e in gw.logs.events("ssh_handshake_ended") if e["reason"] == "login_timeout"]


async def test_silent_clients_earn_a_penalty(make_gateway: GatewayFactory) -> None:
    """grace_exceeded 10s, min 15s: two silent clients from 127.0.0.2 make 20s; the third is refused at accept."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["ssh"].update(version_timeout="1s")
        cfg["public"]["detect_timeout"] = "200ms"
        cfg["penalties"] = {"exempt": []}

    async with make_gateway(edit) as gw:
        conns = [await open_from("127.0.0.2", gw.port) for _ in range(2)]
        held: list[asyncio.StreamWriter] = [w for _, w in conns]
        try:
            for r, _ in conns:
                assert await closed_by_peer(r, timeout=10)
            await eventually(lambda: sample(gw, "bastion_penalties_total", event="grace_exceeded") == 2)
            assert not await ssh_hello(gw, "127.0.0.2", held)
        finally:
            close_all(held)
        assert refused(gw, "penalty") == 1
        await legit_login_seconds(gw)
        assert not tracebacks(gw)
