"""Shared typed builders for the unit tests: real keys, a valid config document, a policy inventory."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from gateway.config import VM, Rule, User, VMLogin, parse_config
from gateway.errors import ConfigError
from gateway.policy import Policy, Principal


@functools.cache
def public_key(label: str = "user") -> str:
    """A real OpenSSH ed25519 public key line, one per label, generated once per test run."""
    return str(asyncssh.generate_private_key("ssh-ed25519", comment=label).export_public_key().decode()).strip()


def valid_config_data() -> dict[str, Any]:
    """A fresh, minimal, valid config document (as tomllib would return it); safe to mutate."""
    return {
        "gateway": {"node": "gw1", "state_dir": "/var/lib/bastion-test"},
        "public": {"listen": ["127.0.0.1:2222"]},
        "ssh": {"login_grace_time": "30s"},
        "vms": [
            {
                "name": "web01",
                "address": "10.0.0.5",
                "host_key": public_key("web01-host"),
                "default_login": "deploy",
                "logins": {"deploy": {"key": "keys/deploy"}, "root": {"key": "/etc/bastion/root"}},
            }
        ],
        "users": [{"name": "alice", "keys": [public_key("alice")], "groups": ["ops"]}],
        "rules": [{"users": ["alice"], "vms": ["web01"], "protocols": ["ssh"]}],
    }


def config_problems(data: Mapping[str, Any], base_dir: Path | None = None) -> list[tuple[str, str]]:
    """The (key path, message) pairs parse_config reports; fails the test if it accepts the document."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=base_dir or Path("/cfg"))
    return info.value.problems


def problem_paths(data: Mapping[str, Any]) -> list[str]:
    return [path for path, _ in config_problems(data)]


def problem_message(data: Mapping[str, Any], path: str) -> str:
    """The single message reported at `path`."""
    messages = [msg for p, msg in config_problems(data) if p == path]
    assert len(messages) == 1, f"expected one problem at {path!r}, got {messages!r}"
    return messages[0]


# --- policy inventory -------------------------------------------------------

ALICE = Principal(name="alice", groups=("ops",), auth_method="publickey")
BOB = Principal(name="bob", groups=("dev",), auth_method="publickey")
CAROL = Principal(name="carol", groups=(), auth_method="certificate")


def _login(name: str) -> VMLogin:
    return VMLogin(name=name, key=Path(f"/etc/bastion/keys/{name}"))


def inventory() -> dict[str, VM]:
    """web01: logins deploy/root, default deploy, port 22. db01: login postgres (default), port 2222. lab01: two logins, no default."""
    return {
        "web01": VM(
            name="web01",
            address="10.0.0.5",
            ssh_port=22,
            trust_on_first_use=True,
            default_login="deploy",
            logins={"deploy": _login("deploy"), "root": _login("root")},
        ),
        "db01": VM(
            name="db01",
            address="10.0.0.6",
            ssh_port=2222,
            trust_on_first_use=True,
            default_login="postgres",
            logins={"postgres": _login("postgres")},
        ),
        "lab01": VM(
            name="lab01",
            address="10.0.0.7",
            trust_on_first_use=True,
            default_login=None,
            logins={"alpha": _login("alpha"), "beta": _login("beta")},
        ),
    }


def users() -> dict[str, User]:
    return {
        "alice": User(name="alice", groups=("ops",)),
        "bob": User(name="bob", groups=("dev",)),
        "carol": User(name="carol"),
    }


def make_policy(*rules: Rule) -> Policy:
    return Policy(inventory(), users(), rules)
