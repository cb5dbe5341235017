"""asyncssh options prepared once and shared by every connection (`gateway.protocols.asyncssh_options`)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import asyncssh
import pytest

from gateway.protocols.asyncssh_options import _Shared, run_shared_server


class _Echo(asyncssh.SSHServerSession[bytes]):
    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def exec_requested(self, command: str) -> bool:
        return True

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._chan.write(data)

    def eof_received(self) -> bool:
        self._chan.exit(0)
        return False


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> _Echo:
        return _Echo()


def test_a_shared_view_has_its_own_waiter_and_factory_and_refuses_updates() -> None:
    """Each connection's view reads the template's options but keeps its own waiter and SSHServer factory; an update
    (which would change every connection's options) raises."""
    template = asyncssh.SSHServerConnectionOptions(server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")])
    a, b = _Shared(template, _Server), _Shared(template, asyncssh.SSHServer)
    a.waiter, b.waiter = 1, 2
    assert (a.waiter, b.waiter) == (1, 2) and not hasattr(template, "waiter")
    assert a.protocol_factory is _Server and b.protocol_factory is asyncssh.SSHServer
    assert a.server_host_keys is template.server_host_keys and a.kex_algs is b.kex_algs
    with pytest.raises(RuntimeError):
        a.update(login_timeout=1)


async def test_server_connections_share_one_prepared_template() -> None:
    """Two clients log in to `run_shared_server` and echo through it: both connections read the one template (none
    prepared its own options, also not at user auth), each with its own SSHServer."""
    template = asyncssh.SSHServerConnectionOptions(
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")], encoding=None, public_key_auth=False
    )
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    loop = asyncio.get_running_loop()
    conns: list[asyncssh.SSHServerConnection] = []
    servers: list[_Server] = []

    def factory() -> _Server:
        servers.append(_Server())
        return servers[-1]

    async def serve_one() -> None:
        sock, _ = await loop.sock_accept(listener)
        conns.append(await run_shared_server(sock, template, factory))

    try:
        for _ in range(2):
            accepting = asyncio.create_task(serve_one())
            async with asyncio.timeout(30):
                client = await asyncssh.connect(
                    "127.0.0.1", port, known_hosts=None, username="u", client_keys=None, agent_path=None, config=None
                )
                await accepting
                result = await client.run("echo", input=b"shared", encoding=None)
                assert result.stdout == b"shared"
                client.close()
                await client.wait_closed()
    finally:
        listener.close()
    views: list[Any] = [c._options for c in conns]
    assert all(isinstance(v, _Shared) and v._template is template for v in views)
    assert views[0] is not views[1] and len(servers) == 2 and servers[0] is not servers[1]
