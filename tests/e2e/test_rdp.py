"""RDP to a real xrdp VM with a real FreeRDP client, through `bastion tunnel` and through `ssh -L`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import VIEWER_TOKEN, GatewayFactory, wait_for
from tests.e2e.test_ssh_jump import open_forward, stop
from tests.e2e.test_tunnel import Helper
from tests.support.peers import free_port
from tests.support.rdp import XRDP, follow_logs, running_xrdp, wait_for_desktop, xvfb_display

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="xrdp tests create a login and need root (CI runs as root)")


@pytest.fixture(scope="module")
def xrdp() -> Iterator[XRDP]:
    d = Path(tempfile.mkdtemp(prefix="bastion-xrdp-"))
    try:
        with running_xrdp(d) as server:
            yield server
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    with xvfb_display() as d:
        yield d


def with_win_vm(rdp_port: int, protocols: list[str]) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["vms"].append({"name": "win01", "address": "127.0.0.1", "ssh_port": 22, "rdp_port": rdp_port, "trust_on_first_use": True})
        cfg["rules"].append({"groups": ["ops"], "vms": ["win01"], "protocols": protocols})

    return edit


@dataclass
class Client:
    proc: asyncio.subprocess.Process
    output: asyncio.Task[bytes]  # all it printed, drained as it goes so a full pipe never blocks it

    async def text(self) -> str:
        return (await self.output).decode(errors="replace")


@contextlib.asynccontextmanager
async def rdp_client(display: str, xrdp: XRDP, port: int, *extra: str) -> AsyncIterator[Client]:
    """xfreerdp as a person runs it, as this run's RDP login. If it is still running when the block
    ends it is ended by PID with SIGTERM (SIGINT makes it print a backtrace), then KILL."""
    proc = await asyncio.create_subprocess_exec(
        "xfreerdp", f"/v:127.0.0.1:{port}", f"/u:{xrdp.user}", f"/p:{xrdp.password}", "/cert:ignore", *extra,
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


async def xfreerdp(display: str, xrdp: XRDP, port: int, *extra: str, timeout: float = 60) -> tuple[int, str]:
    """Run xfreerdp to its end (e.g. with +auth-only); ended with SIGTERM after `timeout`."""
    async with rdp_client(display, xrdp, port, *extra) as client:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await client.proc.wait()
    assert client.proc.returncode is not None
    return client.proc.returncode, await client.text()


async def test_freerdp_logs_in_through_bastion_tunnel(make_gateway: GatewayFactory, xrdp: XRDP, display: str) -> None:
    """xfreerdp +auth-only through `bastion tunnel` completes the RDP handshake (exit 0); a full session
    logs in and gets its desktop (xrdp's log says `connected ok`), and shows on the registry as
    protocol rdp while it is open. Without xorgxrdp this fails at once, saying so."""
    async with make_gateway(with_win_vm(xrdp.port, ["rdp"])) as gw, Helper(gw, "win01", xrdp.port) as helper:
        rc, out = await xfreerdp(display, xrdp, helper.local, "+auth-only")
        assert rc == 0, out
        # xrdp and sesman write their logs from other processes: follow them from before the client starts.
        async with follow_logs(xrdp) as lines, rdp_client(display, xrdp, helper.local, "/size:800x600") as client:
            await wait_for_desktop(xrdp, lines)
            # What an operator sees on the control port while the RDP session is open:
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    gw.control_url + "/v1/sessions?vm=win01",
                    headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
                    ssl=ssl.create_default_context(cafile=str(gw.ca_file)),
                ) as resp,
            ):
                live = (await resp.json())["sessions"]
            assert live and all(s["protocol"] == "rdp" and s["user"] == "alice" and s["target_port"] == xrdp.port for s in live)
            assert client.proc.returncode is None, await client.text()  # still connected until we end it
        await wait_for(lambda: not gw.app.registry.list(), gw.logs.changed, timeout=20)
        closed = [e for e in gw.logs.events("session_closed") if e["vm"] == "win01"]
        assert closed and all(e["protocol"] == "rdp" for e in closed) and max(e["bytes_down"] for e in closed) > 1000


async def test_freerdp_through_ssh_local_forward_is_an_rdp_session(make_gateway: GatewayFactory, xrdp: XRDP, display: str) -> None:
    """`ssh -L LOCAL:win01:RDPPORT alice@gw` with an rdp rule: FreeRDP completes the handshake, tracked as rdp."""
    async with make_gateway(with_win_vm(xrdp.port, ["rdp"])) as gw:
        lport = free_port()
        proc = await open_forward(gw, "alice", f"{lport}:win01:{xrdp.port}", "-N")
        try:
            rc, out = await xfreerdp(display, xrdp, lport, "+auth-only")
            assert rc == 0, out
            await wait_for(
                lambda: any(e["vm"] == "win01" and e["bytes_down"] > 1000 for e in gw.logs.events("session_closed")), gw.logs.changed
            )
            assert all(e["protocol"] == "rdp" for e in gw.logs.events("session_closed") if e["vm"] == "win01")
        finally:
            await stop(proc)


async def test_bastion_rdp_launches_freerdp_through_a_tunnel(make_gateway: GatewayFactory, xrdp: XRDP, display: str) -> None:
    """`bastion rdp win01` opens a tunnel on a free local port and runs xfreerdp against it (like az network bastion rdp)."""
    import sys

    async with make_gateway(with_win_vm(xrdp.port, ["rdp"])) as gw:
        env = dict(os.environ) | {"DISPLAY": display}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "rdp", "win01", "--port", str(xrdp.port), "--gateway", f"127.0.0.1:{gw.port}",
            "--ca-file", str(gw.ca_file), "--user", "alice", "--ssh-config", str(gw.ssh_config),
            "--", f"/u:{xrdp.user}", f"/p:{xrdp.password}", "/cert:ignore", "+auth-only",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
        async with asyncio.timeout(90):
            out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode(errors="replace")
        closed = [e for e in gw.logs.events("session_closed") if e["vm"] == "win01"]
        assert closed and all(e["protocol"] == "rdp" for e in closed)


@pytest.mark.parametrize("event", ["client_killed", "helper_killed", "operator"])
async def test_rdp_session_through_the_tunnel_ends_when_a_side_goes_away(
    make_gateway: GatewayFactory, xrdp: XRDP, display: str, event: str
) -> None:
    """A full RDP session through `bastion tunnel`: xfreerdp killed, the helper killed, or an operator's
    disconnect. Each time the session leaves the registry at once with the reason of what happened."""
    loop = asyncio.get_running_loop()
    async with make_gateway(with_win_vm(xrdp.port, ["rdp"])) as gw, Helper(gw, "win01", xrdp.port) as helper:
        assert helper.proc is not None
        async with follow_logs(xrdp) as lines, rdp_client(display, xrdp, helper.local, "/size:800x600") as client:
            await wait_for_desktop(xrdp, lines)
            [live] = gw.app.registry.list()
            started = loop.time()
            if event == "client_killed":
                client.proc.kill()
            elif event == "helper_killed":
                helper.proc.kill()
            else:
                gw.app.registry.terminate(live.id, "RDP maintenance", 0)
            await wait_for(lambda: gw.app.registry.get(live.id) is None, gw.logs.changed, timeout=20)
            took = loop.time() - started
            if event == "operator":
                async with asyncio.timeout(20):
                    await client.proc.wait()  # the RDP client notices that its connection ended
        [closed] = [e for e in gw.logs.events("session_closed") if e["session_id"] == live.id]
        expected = {
            # The killed client's socket is closed by the kernel: the helper passes its EOF or reset on, and
            # xrdp closes at once, so the user side ended it.
            "client_killed": {"client_closed", "client_lost"},
            "helper_killed": {"client_lost"},  # the WebSocket dropped without a close
            "operator": {"terminated_by_operator"},
        }[event]
        assert closed["reason"] in expected, closed
        print(f"rdp tunnel / {event}: {closed['reason']} after {took:.2f}s")
