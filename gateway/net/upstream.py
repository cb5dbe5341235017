"""Dial a resolved inventory address with a deadline.

Only ever called with an address that came from the inventory, never with
what a client typed: that is what keeps the gateway from being an open proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from typing import Any

from gateway.errors import UpstreamError, UpstreamRefused, UpstreamTimeout

# TCP keepalive on every VM connection: a VM host that vanished without a FIN or RST (powered off, link
# down) is found by the kernel after KEEPIDLE + KEEPCNT x KEEPINTVL seconds of silence, and its session
# ends `vm_silent`. SSH-level keepalives cover terminating SSH too; this also covers raw TCP (jump, tunnels).
KEEPIDLE, KEEPINTVL, KEEPCNT = 30, 10, 3


def keepalive(sock: socket.socket, idle: int = KEEPIDLE, interval: int = KEEPINTVL, count: int = KEEPCNT) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the system defaults apply
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


async def dial(address: str, port: int, timeout: float) -> socket.socket:
    """Return a connected, non-blocking socket. The caller owns it.

    Raises UpstreamTimeout, UpstreamRefused or UpstreamError.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(address, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            last: OSError | None = None
            for family, type_, proto, _, addr in infos:
                sock = socket.socket(family, type_, proto)
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    keepalive(sock)
                    await _connect(loop, sock, addr)
                    return sock
                except OSError as exc:
                    sock.close()
                    last = exc
                except BaseException:
                    sock.close()
                    raise
            raise last or OSError("no address")
    except TimeoutError:
        raise UpstreamTimeout(f"no answer within {timeout:g}s") from None
    except ConnectionRefusedError:
        raise UpstreamRefused("connection refused") from None
    except OSError as exc:
        raise UpstreamError(exc.strerror or str(exc)) from None


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple[Any, ...]) -> None:
    """Connect a non-blocking socket to a resolved address. Raises OSError (ConnectionRefusedError, ...).

    Not `loop.sock_connect`: uvloop resolves the address again there, through a thread of its pool (its fast
    path for numeric addresses needs a socket type, which sock_connect does not pass), a thread hop for every dial.
    """
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EINTR):  # under way (EAGAIN, no local port free, is an error: raised below)
        writable: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _wake, writable)
        try:
            await writable
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def reset(transport: asyncio.WriteTransport) -> None:
    """Drop a connection now, with an RST, whatever is still queued for the peer.

    `transport.abort()` alone closes the socket, and the kernel then keeps an orphan trying to deliver the
    queued bytes to a peer that stopped reading (FIN_WAIT with a zero window, for minutes). SO_LINGER 0 makes
    the close a reset, so the peer and both kernels are done with it at once.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
