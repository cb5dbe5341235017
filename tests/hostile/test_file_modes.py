"""Secrets at rest, against the real daemon: `bastion serve` refuses a state dir or key others may reach.

Each case starts `python -m gateway serve --config FILE` as a process, as systemd would, with one thing
loosened, and asserts the exit status, the one stderr line naming the config key, the file and its mode, and
that nothing was bound (no `gateway_started`, both ports still free). One case with safe modes starts, so the
refusals are the modes' doing and not the config's.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.support.peers import free_port, make_key, wait_port

BASTION = [sys.executable, "-m", "gateway"]


@dataclass
class Setup:
    tmp: Path
    state: Path
    login_key: Path
    host_key: Path
    public_port: int
    control_port: int

    def config(self, *, host_keys: bool = False) -> Path:
        vm_host = make_key(self.tmp / "vm_host").public
        data: dict[str, Any] = {
            "gateway": {"node": "modes", "state_dir": str(self.state)},
            "public": {"listen": [f"127.0.0.1:{self.public_port}"]},
            "control": {"listen": [f"127.0.0.1:{self.control_port}"]},
            "ssh": {"host_keys": [str(self.host_key)]} if host_keys else {},
            "vms": [{"name": "web01", "address": "127.0.0.1", "host_key": vm_host, "logins": {"deploy": {"key": str(self.login_key)}}}],
            "users": [{"name": "alice", "keys": [make_key(self.tmp / "alice").public]}],
            "rules": [{"users": ["alice"], "vms": ["web01"], "protocols": ["ssh"]}],
        }
        path = self.tmp / "bastion.toml"
        path.write_bytes(tomli_w.dumps(data).encode())
        return path


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(
        tmp=tmp_path,
        state=tmp_path / "state",
        login_key=make_key(tmp_path / "deploy").private,
        host_key=make_key(tmp_path / "host_key").private,
        public_port=free_port(),
        control_port=free_port(),
    )


async def serve_until_exit(cfg: Path, timeout: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *BASTION, "serve", "--config", str(cfg), "--log-format", "json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def assert_nothing_bound(setup: Setup, err: str) -> None:
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "gateway_start_failed" in events and "gateway_started" not in events, events
    for port in (setup.public_port, setup.control_port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # raises EADDRINUSE if the daemon had bound it and left it behind


def _loosen_state_dir(s: Setup) -> Path:
    s.state.mkdir()
    s.state.chmod(0o755)
    return s.state


def _loosen_login_key(s: Setup) -> Path:
    s.login_key.chmod(0o640)
    return s.login_key


def _loosen_token_key(s: Setup) -> Path:
    s.state.mkdir(mode=0o700)
    key = s.state / "token.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o644)
    return key


@pytest.mark.parametrize(
    ("loosen", "host_keys", "line"),
    [
        pytest.param(
            _loosen_state_dir, False, "gateway.state_dir: state directory {path!r} has mode 0755, so group or others may list and enter it",
            id="state-dir-0755",
        ),
        pytest.param(
            lambda s: (s.host_key.chmod(0o640), s.host_key)[1], True,
            "ssh.host_keys[0]: UNPROTECTED PRIVATE KEY FILE: SSH host key {path!r} has mode 0640, so group or others may read it",
            id="host-key-0640",
        ),
        pytest.param(
            _loosen_login_key, False,
            "vms[web01].logins.deploy.key: UNPROTECTED PRIVATE KEY FILE: VM login key {path!r} has mode 0640",
            id="vm-login-key-0640",
        ),
        pytest.param(
            _loosen_token_key, False,
            "gateway.state_dir: UNPROTECTED PRIVATE KEY FILE: token signing key {path!r} has mode 0644",
            id="token-key-0644",
        ),
    ],
)  # fmt: skip
async def test_daemon_refuses_secrets_others_may_reach(setup: Setup, loosen: Callable[[Setup], Path], host_keys: bool, line: str) -> None:
    """An operator who left a key group-readable or the state dir 0755 gets exit status 1 and one line naming
    the key, the file, its mode and the chmod to run; no port is bound and no traceback is printed."""
    cfg = setup.config(host_keys=host_keys)
    path = loosen(setup)
    rc, err = await serve_until_exit(cfg)
    assert rc == 1, err
    expected = "bastion: cannot start: " + line.format(path=str(path))
    assert expected in err, err
    assert f"run `chmod {700 if path.is_dir() else 600} {path}`" in err
    assert "Traceback" not in err
    assert_nothing_bound(setup, err)


async def test_daemon_starts_with_private_modes(setup: Setup) -> None:
    """The same config with the keys 0600 and a fresh state dir starts and binds (so the refusals are the modes'),
    and what it generates in the state dir is private."""
    cfg = setup.config(host_keys=True)
    proc = await asyncio.create_subprocess_exec(
        *BASTION, "serve", "--config", str(cfg), "--log-format", "json", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await asyncio.to_thread(wait_port, "127.0.0.1", setup.public_port, 20)
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert (setup.state.stat().st_mode & 0o777) == 0o700
    for name in ("token.key", "tls.key"):
        assert ((setup.state / name).stat().st_mode & 0o777) == 0o600, name
