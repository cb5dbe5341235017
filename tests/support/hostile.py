"""Shared by the hostile tests: connections from a chosen loopback source, counters, and a bounded wait."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.e2e.conftest import Gateway


async def open_from(source: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to 127.0.0.1:port from `source` (any 127.0.0.0/8 address), as asyncio streams."""
    sock = socket.socket()
    try:
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def ssh_hello(gw: Gateway, source: str, held: list[asyncio.StreamWriter], timeout: float = 10.0) -> bool:
    """Send an SSH version from `source` and nothing more: True if the gateway answered with its banner, False
    if it closed the connection at once. The writer is kept in `held` either way (the caller closes it)."""
    r, w = await open_from(source, gw.port)
    held.append(w)
    w.write(b"SSH-2.0-hostile\r\n")
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):  # closed with our hello unread: the kernel may reset
            return (await r.readline()).startswith(b"SSH-2.0-Bastion")
    return False


async def closed_by_peer(r: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    """Read until the gateway closes the connection (bounded); True if it did."""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):
            while await r.read(65536):
                pass
    return True


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
    writers.clear()


def sample(gw: Gateway, name: str, **labels: str) -> float:
    """A metric's value from the gateway's own registry (0 if absent)."""
    return gw.app.metrics.registry.get_sample_value(name, labels) or 0.0


def refused(gw: Gateway, reason: str, listener: str = "public") -> float:
    return sample(gw, "bastion_connections_refused_total", listener=listener, reason=reason)


def tracebacks(gw: Gateway) -> list[dict[str, Any]]:
    """Log lines that carry a traceback (an `exception` field) or a loop exception."""
    return [e for e in gw.logs.events() if "exception" in e or e.get("event") in ("loop_exception", "task_failed", "connection_failed")]


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, every: float = 0.05) -> float:
    """Wait (bounded) until `predicate()` holds; for state with no event to wait on (a count that drops when a
    task's done callback runs). Returns the seconds it took."""
    t0 = time.monotonic()
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(every)
    return time.monotonic() - t0


async def control(gw: Gateway, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """One control API request (the operator's token unless `token`), answered as (status, JSON)."""
    import json
    import ssl

    import aiohttp

    from tests.e2e.conftest import OPERATOR_TOKEN

    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Authorization": f"Bearer {token or OPERATOR_TOKEN}"}
    async with aiohttp.ClientSession() as http, http.request(method, gw.control_url + path, json=body, headers=headers, ssl=ctx) as resp:
        return resp.status, json.loads(await resp.text())


async def finish(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> tuple[int, str]:
    """Wait (bounded) for a client started with stderr=PIPE to exit; (status, stderr). Kills it if it does not."""
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")
