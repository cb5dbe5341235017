"""Stock xfreerdp through the gateway's RD Gateway on the public port, to a real xrdp VM: the .rdp file from
`ssh alice@gw rdp win01`, both transports, a full desktop login, and an operator's disconnect the user reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e import test_rdp
from tests.e2e.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, Gateway, GatewayFactory, wait_for
from tests.e2e.test_rdp import Client
from tests.support.rdp import XRDP, follow_logs, wait_for_desktop

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="xrdp tests create a login and need root (CI runs as root)")


# The xrdp VM and the Xvfb display, as tests/e2e/test_rdp.py makes them (pytest finds fixtures by these names).
xrdp = test_rdp.xrdp
display = test_rdp.display


def with_win_vm(rdp_port: int) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["vms"].append({"name": "win01", "address": "127.0.0.1", "ssh_port": 22, "rdp_port": rdp_port, "trust_on_first_use": True})
        cfg["rules"].append({"groups": ["ops"], "vms": ["win01"], "protocols": ["rdp"]})

    return edit


async def rdp_file(gw: Gateway) -> dict[str, str]:
    """`ssh alice@gw rdp win01`, parsed: the .rdp file a user saves and opens."""
    r = await gw.ssh("alice", "rdp", "win01")
    assert r.rc == 0, r.errtext
    fields = {}
    for line in r.text.splitlines():
        key, _, value = line.partition(":s:") if ":s:" in line else line.partition(":i:")
        fields[key] = value
    return fields


@contextlib.asynccontextmanager
async def xfreerdp_via_gateway(display: str, xrdp: XRDP, gw: Gateway, target: str, token: str, *extra: str) -> AsyncIterator[Client]:
    """Stock xfreerdp 2.11 with the gateway as its RD Gateway (`/g:` `/gat:`), ended by PID if still running."""
    proc = await asyncio.create_subprocess_exec(
        "xfreerdp", f"/v:{target}", f"/u:{xrdp.user}", f"/p:{xrdp.password}", "/cert:ignore",
        f"/g:127.0.0.1:{gw.port}", f"/gat:{token}", *extra,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=dict(os.environ) | {"DISPLAY": display},
    )  # fmt: skip
    assert proc.stdout is not None
    client = Client(proc, asyncio.create_task(proc.stdout.read()))
    try:
        yield client
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await client.output


async def run_to_end(client: Client, timeout: float = 60) -> tuple[int, str]:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await client.proc.wait()
    assert client.proc.returncode is not None, "xfreerdp did not end"
    return client.proc.returncode, await client.text()


@pytest.mark.parametrize("transport", ["websocket", "http"])
async def test_the_rdp_file_gets_freerdp_through_the_rd_gateway(
    make_gateway: GatewayFactory, xrdp: XRDP, display: str, transport: str
) -> None:
    """The .rdp file names win01, the gateway and a token; xfreerdp with that gateway and token completes the RDP
    handshake with xrdp (+auth-only exits 0) over the WebSocket and the legacy HTTP transport; the session was
    tracked as rdp-gateway with the client's machine name."""
    async with make_gateway(with_win_vm(xrdp.port)) as gw:
        rdp = await rdp_file(gw)
        assert rdp["full address"] == f"win01:{xrdp.port}"
        assert rdp["gatewayhostname"] == f"127.0.0.1:{gw.port}" and rdp["gatewayusagemethod"] == "1"
        extra = ("/gt:http,no-websockets",) if transport == "http" else ()
        async with xfreerdp_via_gateway(display, xrdp, gw, rdp["full address"], rdp["gatewayaccesstoken"], "+auth-only", *extra) as c:
            rc, out = await run_to_end(c)
        assert rc == 0, out
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed, timeout=20)
        [closed] = gw.logs.events("session_closed")
        assert (closed["protocol"], closed["vm"], closed["user"], closed["target_port"]) == ("rdp-gateway", "win01", "alice", xrdp.port)
        assert closed["client_name"] and closed["bytes_down"] > 1000 and closed["bytes_up"] > 100
        assert not [e for e in gw.logs.events() if "exception" in e]


async def test_a_full_desktop_then_an_operator_disconnect_the_user_reads(make_gateway: GatewayFactory, xrdp: XRDP, display: str) -> None:
    """A full xrdp desktop through the RD Gateway (xrdp's log proves the login); the operator ends it from the control
    API with a reason: xfreerdp prints `Service message:` and the reason, and exits; the session's reason is
    terminated_by_operator; the same token then gets E_PROXY_COOKIE_AUTHENTICATION_ACCESS_DENIED (no auto-reconnect)."""
    async with make_gateway(with_win_vm(xrdp.port)) as gw:
        rdp = await rdp_file(gw)
        target, token = rdp["full address"], rdp["gatewayaccesstoken"]
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        async with follow_logs(xrdp) as lines, xfreerdp_via_gateway(display, xrdp, gw, target, token, "/size:800x600") as client:
            await wait_for_desktop(xrdp, lines)
            [live] = gw.app.registry.list()
            assert live.protocol == "rdp-gateway"
            async with aiohttp.ClientSession() as http:
                async with http.get(gw.control_url + "/v1/sessions", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"}, ssl=ctx) as resp:
                    [row] = (await resp.json())["sessions"]
                assert row["protocol"] == "rdp-gateway" and row["client_name"]
                async with http.delete(
                    gw.control_url + f"/v1/sessions/{live.id}",
                    json={"reason": "patching win01 now"},
                    headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
                    ssl=ctx,
                ) as resp:
                    assert resp.status == 200, await resp.text()
            rc, out = await run_to_end(client, timeout=30)
        assert "Service message:" in out and "You have been disconnected. patching win01 now" in out, out[-2000:]
        [closed] = gw.logs.events("session_closed")
        assert closed["reason"] == "terminated_by_operator"
        async with xfreerdp_via_gateway(display, xrdp, gw, target, token, "+auth-only") as again:
            rc, out = await run_to_end(again)
        assert rc != 0 and "E_PROXY_COOKIE_AUTHENTICATION_ACCESS_DENIED" in out, out[-2000:]
        assert [e for e in gw.logs.events("rdg_refused") if e["reason"] == "token_revoked"]


async def test_refusals_are_named_by_freerdp(make_gateway: GatewayFactory, xrdp: XRDP, display: str) -> None:
    """A made-up token is refused at TUNNEL_CREATE, a token for another VM at CHANNEL_CREATE, each with the HRESULT
    FreeRDP prints by name; nothing reaches xrdp."""
    async with make_gateway(with_win_vm(xrdp.port)) as gw:
        async with xfreerdp_via_gateway(display, xrdp, gw, f"win01:{xrdp.port}", "v1.not.a-token", "+auth-only") as c:
            rc, out = await run_to_end(c)
        assert rc != 0 and "E_PROXY_COOKIE_AUTHENTICATION_ACCESS_DENIED" in out, out[-2000:]
        rdp = await rdp_file(gw)
        async with xfreerdp_via_gateway(display, xrdp, gw, "web01:3389", rdp["gatewayaccesstoken"], "+auth-only") as c:
            rc, out = await run_to_end(c)
        assert rc != 0 and "E_PROXY_RAP_ACCESSDENIED" in out, out[-2000:]
        assert not gw.logs.events("session_opened")


async def test_xfreerdp_opens_the_rdp_file_as_saved(make_gateway: GatewayFactory, xrdp: XRDP, display: str, tmp_path: Path) -> None:
    """What the README tells a user: `ssh ... rdp win01 > win01.rdp`, then `xfreerdp win01.rdp` (only the VM's own
    login on the command line) completes the handshake through the gateway."""
    async with make_gateway(with_win_vm(xrdp.port)) as gw:
        r = await gw.ssh("alice", "rdp", "win01")
        assert r.rc == 0 and "xfreerdp" in r.errtext  # the hint goes to stderr; stdout is the file alone
        path = tmp_path / "win01.rdp"
        path.write_bytes(r.out)
        proc = await asyncio.create_subprocess_exec(
            "xfreerdp", str(path), f"/u:{xrdp.user}", f"/p:{xrdp.password}", "/cert:ignore", "+auth-only",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=dict(os.environ) | {"DISPLAY": display},
        )  # fmt: skip
        try:
            async with asyncio.timeout(60):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed, timeout=20)
        assert gw.logs.events("session_closed")[0]["protocol"] == "rdp-gateway"


async def test_bastion_rdp_native_runs_freerdp_on_the_rdp_file(make_gateway: GatewayFactory, xrdp: XRDP, display: str) -> None:
    """`bastion rdp win01 --native`: the helper fetches the .rdp file over SSH and starts xfreerdp on it; no local
    tunnel, the client speaks RD Gateway to the gateway (the session is rdp-gateway)."""
    import sys

    async with make_gateway(with_win_vm(xrdp.port)) as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "rdp", "win01", "--native", "--gateway", f"127.0.0.1:{gw.port}",
            "--user", "alice", "--ssh-config", str(gw.ssh_config),
            "--", f"/u:{xrdp.user}", f"/p:{xrdp.password}", "/cert:ignore", "+auth-only",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=dict(os.environ) | {"DISPLAY": display},
        )  # fmt: skip
        try:
            async with asyncio.timeout(90):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed, timeout=20)
        assert [e["protocol"] for e in gw.logs.events("session_closed")] == ["rdp-gateway"]
