"""Per-source penalties on real sockets: failed logins, silent and no-auth connections earn a refusal window."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.e2e.conftest import GatewayFactory
from tests.support.hostile import close_all, eventually, refused, sample, ssh_hello, tracebacks
from tests.support.probes import fd_count, legit_login_seconds


async def test_failed_logins_get_a_source_refused_at_accept(make_gateway: GatewayFactory) -> None:
    """Four real `ssh` logins with a key nobody knows from 127.0.0.2 (5s each, more than min 15s): the next
    connection from 127.0.0.2 is closed at accept, before any SSH, and counted; alice logs in from 127.0.0.1 and
    from 127.0.0.3 meanwhile. The exempt list is empty here: 127.0.0.1 is protected only by not misbehaving."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["penalties"] = {"exempt": []}

    async with make_gateway(edit) as gw:
        fds0 = fd_count()
        for _ in range(4):
            r = await gw.run(*gw.ssh_argv_keys("alice+web01", gw.keys.stranger.private, opts=("-b", "127.0.0.2")), "true")
            assert r.rc == 255 and "Permission denied" in r.errtext
        assert sample(gw, "bastion_penalties_total", event="auth_failure") == 4
        held: list[asyncio.StreamWriter] = []
        try:
            assert not any([await ssh_hello(gw, "127.0.0.2", held) for _ in range(10)])
        finally:
            close_all(held)
        assert refused(gw, "penalty") == 10
        assert gw.app.metrics.registry.get_sample_value("bastion_penalty_sources") == 1
        took = await legit_login_seconds(gw)
        ok = await gw.ssh("alice+web01", "echo elsewhere", opts=("-b", "127.0.0.3"))
        assert ok.rc == 0 and ok.text == "elsewhere\n", ok.errtext
        assert [e for e in gw.logs.events("connection_refused") if e["reason"] == "penalty"]
        assert not tracebacks(gw)
        assert fd_count() <= fds0 + 10
        print(f"legit login while 127.0.0.2 is penalized: {took:.2f}s")


async def test_a_penalty_expires(make_gateway: GatewayFactory) -> None:
    """auth_failure 1s, min 1.5s, max 2s: two failures refuse 127.0.0.2, and within a few seconds (the penalty
    is capped at 2s) alice logs in from 127.0.0.2 again."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["penalties"] = {"exempt": [], "auth_failure": "1s", "min": "1500ms", "max": "2s"}

    async with make_gateway(edit) as gw:
        for _ in range(2):
            r = await gw.run(*gw.ssh_argv_keys("alice+web01", gw.keys.stranger.private, opts=("-b", "127.0.0.2")), "true")
            assert r.rc == 255
        held: list[asyncio.StreamWriter] = []
        try:
            assert not await ssh_hello(gw, "127.0.0.2", held)

            async with asyncio.timeout(10):
                while not await ssh_hello(gw, "127.0.0.2", held):
                    await asyncio.sleep(0.1)  # a bounded poll: refused probes earn no penalty
        finally:
            close_all(held)
        ok = await gw.ssh("alice+web01", "echo back", opts=("-b", "127.0.0.2"))
        assert ok.rc == 0 and ok.text == "back\n", ok.errtext
        assert not tracebacks(gw)


async def test_connections_that_never_try_to_log_in_earn_no_auth(make_gateway: GatewayFactory) -> None:
    """no_auth 4s: four connections from 127.0.0.2 that send a version and hang up make 16s > 15s; the fifth is
    refused. alice's real logins (which authenticate) earn nothing, even with the exemption cleared."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["penalties"] = {"exempt": [], "no_auth": "4s"}

    async with make_gateway(edit) as gw:
        held: list[asyncio.StreamWriter] = []
        try:
            for _ in range(4):
                assert await ssh_hello(gw, "127.0.0.2", held)
                close_all(held)
            await eventually(lambda: sample(gw, "bastion_penalties_total", event="no_auth") == 4)
            assert not await ssh_hello(gw, "127.0.0.2", held)
        finally:
            close_all(held)
        for _ in range(3):
            await legit_login_seconds(gw)
        assert sample(gw, "bastion_penalties_total", event="no_auth") == 4
        assert refused(gw, "penalty") == 1
        assert not tracebacks(gw)
