"""Jump mode: `ssh -J`, `ssh -W` and `ssh -L` through the gateway to inventory names only."""

from __future__ import annotations

import asyncio
import os
import socket
from asyncio.subprocess import PIPE
from typing import Any

import pytest

from tests.e2e.conftest import Echo, Gateway, GatewayFactory, wait_for
from tests.support.peers import free_port, wait_port


def with_echo_vm(port: int) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["vms"].append({"name": "echo01", "address": "127.0.0.1", "ssh_port": port, "trust_on_first_use": True})
        cfg["rules"].append({"groups": ["ops"], "vms": ["echo01"], "protocols": ["ssh-jump"], "ports": [port]})

    return edit


async def open_forward(gw: Gateway, user: str, spec: str, *extra: str) -> asyncio.subprocess.Process:
    """Start `ssh -L spec` and wait until the local port accepts."""
    proc = await asyncio.create_subprocess_exec(
        *gw.ssh_argv(user, "-o", "ExitOnForwardFailure=yes", "-L", spec, *extra), stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    port = int(spec.split(":", maxsplit=1)[0])
    # ssh -L signals nothing when its listener is up: wait for the port it binds, or for ssh to give up.
    bound = asyncio.create_task(asyncio.to_thread(wait_port, "127.0.0.1", port, 20))
    exited = asyncio.create_task(proc.wait())
    done, _ = await asyncio.wait({bound, exited}, return_when=asyncio.FIRST_COMPLETED)
    if exited in done:
        bound.cancel()
        raise AssertionError("ssh -L exited before its forward was up")
    exited.cancel()
    bound.result()
    return proc


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
    async with asyncio.timeout(10):
        await proc.wait()


async def roundtrip(port: int, payload: bytes) -> bytes:
    """Send payload, half-close, read everything back until EOF."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()

    async def reader() -> None:
        while data := await r.read(65536):
            got.extend(data)

    async with asyncio.timeout(60):
        task = asyncio.create_task(reader())
        w.write(payload)
        await w.drain()
        w.write_eof()
        await task
    w.close()
    return bytes(got)


async def test_proxyjump_reaches_the_vm_end_to_end(gw: Gateway) -> None:
    """`ssh -J alice@gw USER@web01` logs in to the VM with the user's own key, through the gateway."""
    r = await gw.run("ssh", "-F", str(gw.ssh_config), "-J", "alice@gw", f"{gw.vm.login}@web01", "echo jumped")
    assert r.rc == 0, r.errtext
    assert r.text == "jumped\n"
    await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed)
    [line] = gw.logs.events("session_closed")
    assert (line["protocol"], line["vm"], line["target_port"], line["user"]) == ("ssh-jump", "web01", gw.vm.port, "alice")
    assert line["bytes_up"] > 0 and line["bytes_down"] > 0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("127.0.0.1", "'127.0.0.1' is an address; name a VM from the inventory instead"),
        ("localhost", "VM 'localhost' does not exist or you may not reach it"),
        ("nosuchvm", "VM 'nosuchvm' does not exist or you may not reach it"),
        ("WEB01", "VM 'WEB01' does not exist or you may not reach it"),
        ("web01.", "VM 'web01.' does not exist or you may not reach it"),
        ("web02", "VM 'web02' does not exist or you may not reach it"),
    ],
)
async def test_non_inventory_targets_are_refused_without_a_connection(
    make_gateway: GatewayFactory, watcher: socket.socket, target: str, message: str
) -> None:
    """IP literals, localhost, unknown, case-changed, trailing-dot and ungranted names are refused
    with a reason the client prints, and the gateway never connects to them."""
    port = watcher.getsockname()[1]
    async with make_gateway(with_echo_vm(port)) as gw:
        r = await gw.ssh("alice", opts=("-W", f"{target}:{port}"))
        assert r.rc == 255
        assert message in r.errtext, r.errtext
        with pytest.raises(BlockingIOError):
            watcher.accept()
        assert gw.logs.events("session_refused")


async def test_port_not_granted_is_refused(gw: Gateway) -> None:
    """web01 is granted on its SSH port only; another port on it is refused by name."""
    r = await gw.ssh("alice", opts=("-W", "web01:3389"))
    assert r.rc == 255
    assert "port 3389 on VM 'web01' is not granted to you" in r.errtext


async def test_user_without_jump_rule_cannot_forward(gw: Gateway) -> None:
    """bob may open shells on web01 but has no ssh-jump rule: he reads which protocol is missing (he knows web01)."""
    r = await gw.run(*gw.ssh_argv_keys("bob", gw.keys.bob.private, opts=("-W", f"web01:{gw.vm.port}")))
    assert r.rc == 255
    assert "VM 'web01' does not grant you 'ssh-jump' (you may use: ssh" in r.errtext, r.errtext


async def test_local_forward_relays_both_ways_with_half_close(make_gateway: GatewayFactory, echo: Echo) -> None:
    """`ssh -N -L` to an inventory VM: 8 MB go through and come back intact, and the client's
    half-close reaches the VM, whose close reaches the client after all data."""
    async with make_gateway(with_echo_vm(echo.port)) as gw:
        lport = free_port()
        proc = await open_forward(gw, "alice", f"{lport}:echo01:{echo.port}", "-N")
        try:
            payload = os.urandom(8 * 1024 * 1024)
            assert await roundtrip(lport, payload) == payload
            # The first echo01 session is open_forward's readiness probe; the transfer is the second.
            await wait_for(lambda: len([e for e in gw.logs.events("session_closed") if e["vm"] == "echo01"]) == 2, gw.logs.changed)
            line = [e for e in gw.logs.events("session_closed") if e["vm"] == "echo01"][-1]
            assert line["bytes_up"] == len(payload) and line["bytes_down"] == len(payload)
        finally:
            await stop(proc)


async def test_forward_session_without_vm_shows_banner_and_keeps_forwarding(make_gateway: GatewayFactory, echo: Echo) -> None:
    """`ssh -L` without -N opens a session on the gateway itself: a banner, and the forward works."""
    async with make_gateway(with_echo_vm(echo.port)) as gw:
        lport = free_port()
        proc = await open_forward(gw, "alice", f"{lport}:echo01:{echo.port}")
        assert proc.stdout is not None and proc.stdin is not None
        try:
            async with asyncio.timeout(10):
                banner = (await proc.stdout.readuntil(b"VMs you may reach:\n")).decode()
            assert "signed in as alice" in banner
            assert await roundtrip(lport, b"ping") == b"ping"
            proc.stdin.close()
            async with asyncio.timeout(10):
                assert await proc.wait() == 0
        finally:
            await stop(proc)


async def test_jump_session_is_in_the_registry_while_open(make_gateway: GatewayFactory, echo: Echo) -> None:
    """An open forward connection is a session with protocol ssh-jump and the inventory address."""
    async with make_gateway(with_echo_vm(echo.port)) as gw:
        lport = free_port()
        proc = await open_forward(gw, "alice", f"{lport}:echo01:{echo.port}", "-N")
        try:
            # open_forward's readiness probe makes one short session: let it finish first.
            await wait_for(lambda: len(gw.logs.events("session_closed")) == 1, gw.logs.changed)
            r, w = await asyncio.open_connection("127.0.0.1", lport)
            w.write(b"hello")
            async with asyncio.timeout(10):
                assert await r.readexactly(5) == b"hello"
            [s] = [x for x in gw.app.registry.list() if x.vm == "echo01"]
            assert (s.protocol, s.user, s.target_address, s.target_port) == ("ssh-jump", "alice", "127.0.0.1", echo.port)
            assert s.bytes_up == 5 and s.bytes_down == 5
            w.close()
            await wait_for(lambda: not [x for x in gw.app.registry.list() if x.vm == "echo01"], gw.logs.changed)
        finally:
            await stop(proc)


async def test_connection_churn_through_a_forward(make_gateway: GatewayFactory, echo: Echo) -> None:
    """200 short half-closed connections (20 at a time) through one -L forward all come back intact,
    and every session leaves the registry (guards the uvloop half-close crash noted in DESIGN.md)."""
    async with make_gateway(with_echo_vm(echo.port)) as gw:
        lport = free_port()
        proc = await open_forward(gw, "alice", f"{lport}:echo01:{echo.port}", "-N")
        try:
            sem = asyncio.Semaphore(20)

            async def one(i: int) -> bool:
                async with sem:
                    payload = os.urandom(1000 + i)
                    return await roundtrip(lport, payload) == payload

            async with asyncio.timeout(120):
                results = await asyncio.gather(*(one(i) for i in range(200)))
            assert all(results)
            await wait_for(lambda: not gw.app.registry.list(), gw.logs.changed, timeout=30)
            assert gw.app.registry.totals().closed >= 201
        finally:
            await stop(proc)


async def test_unreachable_vm_port_is_reported(make_gateway: GatewayFactory) -> None:
    """A granted VM port where nothing listens: the client is told the VM cannot be reached, and it is logged."""
    dead = free_port()
    async with make_gateway(with_echo_vm(dead)) as gw:
        r = await gw.ssh("alice", opts=("-W", f"echo01:{dead}"))
        assert r.rc == 255
        assert f"cannot reach VM 'echo01' port {dead}: connection refused" in r.errtext
        [failed] = gw.logs.events("upstream_dial_failed")
        assert (failed["vm"], failed["reason"]) == ("echo01", "upstream_refused")
        assert not gw.app.registry.list()


async def test_forwards_per_connection_are_capped(make_gateway: GatewayFactory, echo: Echo) -> None:
    """With ssh.max_forwards = 3, one `ssh -N -L` carries 3 streams at once; a 4th is refused (the client closes
    it, the gateway logs and counts why, nothing is dialled for it); when one ends a new one is allowed."""

    def edit(cfg: dict[str, Any]) -> None:
        with_echo_vm(echo.port)(cfg)
        cfg["ssh"]["max_forwards"] = 3

    async with make_gateway(edit) as gw:
        local = free_port()
        proc = await open_forward(gw, "alice", f"{local}:echo01:{echo.port}", "-N")
        try:
            await wait_for(lambda: not gw.app.registry.list(), gw.logs.changed)  # the readiness probe's stream is gone
            streams = []
            for i in range(3):
                r, w = await asyncio.open_connection("127.0.0.1", local)
                w.write(b"x%d\n" % i)
                async with asyncio.timeout(20):
                    assert await r.readline() == b"x%d\n" % i
                streams.append((r, w))
            r4, w4 = await asyncio.open_connection("127.0.0.1", local)
            async with asyncio.timeout(20):
                assert await r4.read() == b""  # ssh closes the local socket when the channel open fails
            w4.close()
            [refused] = gw.logs.events("channel_refused")
            assert refused["reason"] == "connection_forward_limit" and refused["limit"] == 3
            assert len(gw.app.registry.list()) == 3
            _, w0 = streams.pop(0)
            w0.close()
            await wait_for(lambda: len(gw.app.registry.list()) == 2, gw.logs.changed)
            r5, w5 = await asyncio.open_connection("127.0.0.1", local)
            w5.write(b"again\n")
            async with asyncio.timeout(20):
                assert await r5.readline() == b"again\n"
            for _, w in [*streams, (r5, w5)]:
                w.close()
        finally:
            await stop(proc)
