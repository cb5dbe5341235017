"""The prepared asyncssh options the SSH door shares are the ones asyncssh would have prepared per connection.

That connections made from them serve users is held end to end by tests/e2e/test_asyncssh_options.py and every e2e
test of the SSH door and the terminating relay.
"""

from __future__ import annotations

from typing import Any

import asyncssh

from gateway.doors.ssh import _server_options
from gateway.protocols.asyncssh_options import _Shared


def same(a: Any, b: Any, path: str = "options") -> None:
    """Equal values, compared through containers and, for types without an equality of their own, attributes (asyncssh
    wraps the same keys in new key-pair objects on every build)."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]")
    elif type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):
        same(vars(a), vars(b), path)
    else:
        assert a == b, path


def server() -> asyncssh.SSHServer:
    return asyncssh.SSHServer()


def test_the_door_template_is_what_run_server_prepares() -> None:
    """run_server(options=template, server_factory=f) prepares (config=(), server_factory=f) per connection: the shared
    view of the template with f as its factory gives the same options."""
    template = _server_options([asyncssh.generate_private_key("ssh-ed25519")], 30.0, 15.0, 3)
    built = asyncssh.SSHServerConnectionOptions(template, config=(), server_factory=server)
    view = _Shared(template, server)
    for name, value in vars(built).items():
        if name not in ("kwargs", "waiter"):  # the arguments it was built from; set per connection by _connect
            same(getattr(view, name), value, name)


def test_reload_without_a_config_file_rebuilds_the_same_options() -> None:
    """asyncssh prepares the options again at the first user-auth request only to evaluate an sshd config's Match
    blocks; with none loaded that gives the template back, which is why `_Connection` keeps it."""
    template = asyncssh.SSHServerConnectionOptions(
        _server_options([asyncssh.generate_private_key("ssh-ed25519")], 30.0, 15.0, 3), config=(), server_factory=server
    )
    assert not template.config.loaded and not template.rdns_lookup
    reloaded = asyncssh.SSHServerConnectionOptions(
        template, reload=True, accept_addr="127.0.0.1", accept_port=2222, username="alice+vm01", client_host="127.0.0.1",
        client_addr="127.0.0.1",
    )  # fmt: skip
    reloaded.kwargs = template.kwargs
    assert reloaded.authorized_client_keys is None and template.authorized_client_keys == ()  # asyncssh only tests truth
    reloaded.authorized_client_keys = template.authorized_client_keys
    assert reloaded.config.get_options(reload=False) == template.config.get_options(reload=False) == {}  # nothing matched
    reloaded.config = template.config  # it differs only in what a Match would be evaluated against
    same(reloaded, template)
