"""Prometheus metrics from the control port: valid exposition (promtool) that follows the registry."""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
from typing import Any

import aiohttp

from tests.e2e.conftest import VIEWER_TOKEN, Gateway, GatewayFactory, wait_for


async def scrape(gw: Gateway, token: str | None = VIEWER_TOKEN) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(gw.control_url + "/metrics", headers=headers, ssl=ctx) as resp:
        return resp.status, await resp.text()


def value(text: str, name: str, **labels: str) -> float:
    """The sample `name{labels}` (labels matched as a subset); 0 when absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return 0.0


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False)


async def test_metrics_are_valid_and_follow_sessions(gw: Gateway) -> None:
    """The exposition passes `promtool check metrics`, and the gauges and counters move as a session
    opens, relays and closes; failed logins and refusals are counted by closed-set reasons."""
    status, before = await scrape(gw)
    assert status == 200
    check = promtool_check(before)
    assert check.returncode == 0, check.stdout + check.stderr
    assert value(before, "bastion_build_info") == 1
    assert value(before, "bastion_sessions_active", protocol="ssh", vm="web01") == 0

    proc = await asyncio.create_subprocess_exec(
        *gw.ssh_argv("alice+web01"), "cat", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"x" * 1000)
    await proc.stdin.drain()
    async with asyncio.timeout(20):
        assert len(await proc.stdout.readexactly(1000)) == 1000
    _, during = await scrape(gw)
    assert value(during, "bastion_sessions_active", protocol="ssh", vm="web01") == 1
    assert value(during, "bastion_relayed_bytes_total", protocol="ssh", direction="up") >= 1000
    assert value(during, "bastion_sessions_started_total", protocol="ssh") == 1
    assert value(during, "bastion_upstream_dial_seconds_count", vm="web01") == 1
    proc.stdin.close()
    async with asyncio.timeout(20):
        await proc.wait()

    await gw.ssh("mallory+web01", "true")  # unknown user
    await gw.ssh("alice+web02", "true")  # not granted
    await gw.ssh("alice", opts=("-W", "10.0.0.1:22"))  # not an inventory name

    await wait_for(lambda: not gw.app.registry.list(), gw.logs.changed)
    _, after = await scrape(gw)
    check = promtool_check(after)
    assert check.returncode == 0, check.stdout + check.stderr
    assert value(after, "bastion_sessions_ended_total", protocol="ssh", reason="vm_closed") == 1
    assert value(after, "bastion_session_duration_seconds_count", protocol="ssh") == 1
    assert value(after, "bastion_relayed_bytes_total", protocol="ssh", direction="down") >= 1000
    assert value(after, "bastion_auth_failures_total", method="publickey", reason="unknown_user") >= 1
    assert value(after, "bastion_refusals_total", reason="policy_denied") == 1
    assert value(after, "bastion_refusals_total", reason="target_not_inventory") == 1
    assert "10.0.0.1" not in after and "mallory" not in after  # nothing a client typed becomes a label
    assert value(after, "process_resident_memory_bytes") > 0


async def test_forced_disconnects_and_dial_failures_are_counted(make_gateway: GatewayFactory) -> None:
    """A forced disconnect and an unreachable VM show up in their counters."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["vms"].append(dict(cfg["vms"][0]) | {"name": "down01", "ssh_port": 9})
        cfg["rules"][0]["vms"].append("down01")

    async with make_gateway(edit) as gw:
        events = gw.app.registry.subscribe()
        proc = await asyncio.create_subprocess_exec(
            *gw.ssh_argv("alice+web01"), "sleep 60", stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(20):
                opened = await events.get()
            assert opened is not None
            gw.app.registry.terminate(opened.session.id, "metrics test", 0)
            async with asyncio.timeout(20):
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await gw.ssh("alice+down01", "true")
        _, text = await scrape(gw)
        assert value(text, "bastion_forced_disconnects_total") == 1
        assert value(text, "bastion_sessions_ended_total", protocol="ssh", reason="terminated_by_operator") == 1
        assert value(text, "bastion_upstream_dial_failures_total", vm="down01", reason="upstream_refused") == 1


async def test_metrics_need_a_token_unless_public(make_gateway: GatewayFactory) -> None:
    """/metrics is 401 without a token by default, and open with metrics_public = true."""
    async with make_gateway() as gw:
        status, _ = await scrape(gw, token=None)
        assert status == 401

    def public(cfg: dict[str, Any]) -> None:
        cfg["control"]["metrics_public"] = True

    async with make_gateway(public) as gw:
        status, text = await scrape(gw, token=None)
        assert status == 200 and "bastion_sessions_active" in text
