"""asyncssh connection options prepared once and shared by the connections they fit.

`asyncssh.run_server(sock, options=...)` and `asyncssh.connect(...)` prepare a new options object for every connection
(in an executor thread): about 6 KiB each, its lists of algorithm names, its host key pairs, its config, all held by
the connection for its whole life. A terminating SSH session holds two connections, so 12.7 KiB of its 78 were the same
options prepared twice over. Every connection here gets `_Shared` instead: a slotted view of one prepared template with
the two things asyncssh keeps per connection (the waiter `_connect` sets and, on the server, the `SSHServer` factory).

asyncssh reads its options while it builds a connection and later through `conn._options`, and never writes to them
except `waiter` and `update()` (host canonicalisation or a config `Match final`, neither of which a template here
enables: `update()` raises rather than change every connection's options). A server connection also prepares its
options again at the first user-auth request (`reload_config`, for an sshd config's `Match` blocks, which the gateway
never loads): `run_shared_server` connections skip that. The connections are made with asyncssh's
own private `_connect`, the one function behind `run_server` and `connect` on an accepted or dialled socket, of the
pinned asyncssh (`asyncssh_fast.PINNED`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast

import asyncssh
from asyncssh.connection import SSHConnectionOptions, _connect  # the pinned version's, see the module docstring

_NO_ALGS: frozenset[bytes] = frozenset()


class _Shared:
    """One connection's view of `template`: its own `waiter` and `protocol_factory`, every other option the template's."""

    __slots__ = ("_template", "protocol_factory", "waiter")

    def __init__(self, template: SSHConnectionOptions[Any], protocol_factory: Callable[[], object] | None = None) -> None:
        self._template = template
        self.protocol_factory = template.protocol_factory if protocol_factory is None else protocol_factory

    def __getattr__(self, name: str) -> Any:
        return getattr(self._template, name)

    def update(self, **kwargs: object) -> None:
        raise RuntimeError("shared asyncssh options cannot be updated per connection")


class _Connection(asyncssh.SSHServerConnection):
    async def reload_config(self) -> None:
        """asyncssh prepares the options again at the first user-auth request, so an sshd config's `Match user` and
        `Match address` blocks see the user and the peer. The gateway loads no sshd config (`config=()`): the template
        is what a reload would prepare, and the connection keeps the shared view."""


async def run_shared_server(
    sock: socket.socket, template: asyncssh.SSHServerConnectionOptions, server_factory: Callable[[], asyncssh.SSHServer]
) -> asyncssh.SSHServerConnection:
    """`asyncssh.run_server(sock, options=template, server_factory=...)` without preparing the options again.

    `template` loads no sshd config (see `_Connection`). Returns once the client authenticated; raises what asyncssh
    raises (the caller closes `sock` if asyncssh never took it).
    """
    loop = asyncio.get_running_loop()
    options = cast(asyncssh.SSHServerConnectionOptions, _Shared(template, server_factory))

    def conn_factory() -> asyncssh.SSHServerConnection:
        return _Connection(loop, options, wait="auth")

    async with asyncio.timeout(template.connect_timeout):
        return await _connect(options, (), loop, 0, sock, conn_factory, "Starting SSH server on")


async def connect_shared(sock: socket.socket, template: asyncssh.SSHClientConnectionOptions) -> asyncssh.SSHClientConnection:
    """`asyncssh.connect(sock=sock, options=template)` without preparing the options again: the template names the host,
    port, login, keys and trusted host keys. Returns once logged in; raises what asyncssh raises."""
    loop = asyncio.get_running_loop()
    options = cast(asyncssh.SSHClientConnectionOptions, _Shared(template))

    def conn_factory() -> asyncssh.SSHClientConnection:
        return asyncssh.SSHClientConnection(loop, options, wait="auth")

    async with asyncio.timeout(template.connect_timeout):
        conn = await _connect(options, None, loop, 0, sock, conn_factory, "Opening SSH connection to")
    # The server's signature algorithms (EXT_INFO, about 1.5 KiB) choose how the login key signs: logged in, asyncssh
    # reads them no more (a re-key does not authenticate again).
    cast(Any, conn)._server_sig_algs = _NO_ALGS
    return conn
