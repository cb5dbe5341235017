"""The close reason is what happened first, not whichever task woke first.

Through one real `ssh -N -L` forward, 200 streams are closed by the user first and 200 by the VM first, interleaved
and concurrent; every `session_closed` line must name the side that closed first.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from tests.e2e.conftest import GatewayFactory, wait_for
from tests.e2e.test_ssh_jump import open_forward, stop
from tests.support.peers import free_port

N = int(__import__("os").environ.get("REASONS_N", "200"))


class TwoFacedVM:
    """A TCP VM: after a connection's first line it either echoes until the user's EOF ("U") or says bye and closes ("V")."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            mode = await r.readline()
            if mode.startswith(b"V"):
                w.write(b"bye\n")
                await w.drain()
            else:
                w.write(b"ok\n")
                await w.drain()
                while await r.read(65536):
                    pass
        w.close()

    async def __aenter__(self) -> TwoFacedVM:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def with_vm(port: int) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["vms"].append({"name": "tcp01", "address": "127.0.0.1", "ssh_port": 22, "trust_on_first_use": True})
        cfg["rules"].append({"groups": ["ops"], "vms": ["tcp01"], "protocols": ["ssh-jump"], "ports": [port]})
        # 40 streams at once, and an ended one lingers while its relay flushes (up to 2 s on a loaded machine):
        # more than the default 50 sessions per user can be open for a moment.
        cfg["sessions"]["max_per_user"] = 1000

    return edit


async def one(local: int, mode: bytes) -> int:
    """Open a stream; "U": the user sends EOF first and waits for the VM's close; "V": the VM closes first."""
    r, w = await asyncio.open_connection("127.0.0.1", local)
    w.write(mode + b"\n")
    await w.drain()
    line = await r.readline()
    if mode == b"U":
        assert line == b"ok\n"
        w.write_eof()
        assert await r.read() == b""
    else:
        assert line == b"bye\n"
        assert await r.read() == b""
    src_port: int = w.get_extra_info("sockname")[1]
    w.close()
    return src_port


async def test_reason_names_the_side_that_closed_first(make_gateway: GatewayFactory) -> None:
    """200 user-first and 200 VM-first closes at once: 200 client_closed and 200 vm_closed, none swapped."""
    async with TwoFacedVM() as vm, make_gateway(with_vm(vm.port)) as gw:
        local = free_port()
        proc = await open_forward(gw, "alice", f"{local}:tcp01:{vm.port}", "-N")
        try:
            sem = asyncio.Semaphore(40)  # bounded concurrency: ssh's forward and the VM's backlog stay sane

            async def bounded(mode: bytes) -> tuple[bytes, int]:
                async with sem, asyncio.timeout(60):
                    return mode, await one(local, mode)

            results = await asyncio.gather(*(bounded(b"U" if i % 2 else b"V") for i in range(2 * N)))
            # One more: the probe connection open_forward made to see that the forward was up (a user-first close).
            await wait_for(lambda: len(gw.logs.events("session_closed")) == 2 * N + 1, gw.logs.changed, timeout=60)
        finally:
            await stop(proc)
        closed = gw.logs.events("session_closed")
        reasons = [c["reason"] for c in closed]
        assert reasons.count("client_closed") == N + 1 and reasons.count("vm_closed") == N, sorted(set(reasons))
        assert sum(1 for m, _ in results if m == b"U") == N
        assert all(c["protocol"] == "ssh-jump" and c["vm"] == "tcp01" for c in closed)
