"""`net.upstream.dial` on loopback: connected, refused and timed-out dials, each with its error."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.errors import UpstreamRefused, UpstreamTimeout
from gateway.net.upstream import dial


async def test_a_dial_returns_a_connected_socket_with_keepalive() -> None:
    """A listening VM: the socket is connected to it, non-blocking, with TCP_NODELAY and keepalive set."""
    accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result(None) or w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sock = await dial("127.0.0.1", port, 5.0)
        try:
            assert sock.getpeername() == ("127.0.0.1", port) and not sock.getblocking()
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            await accepted
        finally:
            sock.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_closed_port_is_refused() -> None:
    """Nothing listens: UpstreamRefused, at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: a connect is refused
        with pytest.raises(UpstreamRefused):
            await dial("127.0.0.1", port, 5.0)


async def test_a_full_backlog_times_out() -> None:
    """A VM that never completes the handshake: UpstreamTimeout after the deadline."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # fill the accept queue (never accepted), so the next SYN is dropped
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(("127.0.0.1", port))
                fillers.append(f)
            with pytest.raises(UpstreamTimeout):
                await dial("127.0.0.1", port, 0.3)
        finally:
            for f in fillers:
                f.close()
