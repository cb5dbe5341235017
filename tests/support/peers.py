"""Real peers for tests and benchmarks: OpenSSH sshd as a VM, keys, client configs.

Every process started here is ended by its PID; every file lives in a temp dir
the caller owns.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh

SSHD_BIN = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts on host:port (bounded by `timeout`).

    The one polling wait in the tests: sshd, the daemon and `ssh -L` are other processes that
    signal nothing when their listener is up, so the bound port itself is what we wait on.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: str  # OpenSSH one-line public key

    @property
    def key(self) -> asyncssh.SSHKey:
        return asyncssh.read_private_key(self.private)


def make_key(path: Path, comment: str = "") -> KeyPair:
    """Write an unencrypted ed25519 key (0600) and its .pub beside it."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment or path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    pub = key.export_public_key().decode().strip()
    path.with_name(path.name + ".pub").write_text(pub + "\n")
    return KeyPair(path, pub)


@dataclass
class SSHD:
    """An OpenSSH sshd on loopback playing a VM."""

    host: str
    port: int
    host_key: KeyPair
    login: str
    proc: subprocess.Popen[bytes]
    workdir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_sshd(workdir: Path, authorized: list[str], host: str = "127.0.0.1", extra: str = "") -> SSHD:
    """Start `sshd -D` with its own config, host key and authorized keys for the current user.

    As root, sshd needs /run/sshd (privilege separation); it is created if missing.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = make_key(workdir / "ssh_host_ed25519_key")
    (workdir / "authorized_keys").write_text("".join(k + "\n" for k in authorized))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    last_err = ""
    for _ in range(5):
        port = free_port(host)
        cfg = workdir / "sshd_config"
        cfg.write_text(
            f"""Port {port}
ListenAddress {host}
HostKey {host_key.private}
PidFile none
AuthorizedKeysFile {workdir}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AcceptEnv LANG LC_* BASTION_*
Subsystem sftp internal-sftp
PrintMotd no
PrintLastLog no
LogLevel ERROR
MaxStartups 100:30:200
MaxSessions 50
{extra}
"""
        )
        proc = subprocess.Popen([SSHD_BIN, "-D", "-e", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(host, port, timeout=5)
        except TimeoutError:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            last_err = err.decode(errors="replace")
            continue
        if proc.poll() is not None:
            last_err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
            continue
        return SSHD(host, port, host_key, getpass.getuser(), proc, workdir)
    raise RuntimeError(f"sshd did not start: {last_err}")


@contextlib.contextmanager
def running_sshd(workdir: Path, authorized: list[str], **kw: str) -> Iterator[SSHD]:
    sshd = start_sshd(workdir, authorized, **kw)
    try:
        yield sshd
    finally:
        sshd.stop()


def client_config(
    path: Path, *, gw_port: int, identity: Path, known_hosts: Path, jump_hosts: dict[str, int] | None = None, user: str = "alice"
) -> Path:
    """An ssh_config for OpenSSH clients: `gw` is the gateway; each jump host goes through it."""
    lines = [
        "Host gw 127.0.0.1",
        "  HostName 127.0.0.1",
        f"  Port {gw_port}",
        f"  IdentityFile {identity}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {known_hosts}",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "  ConnectTimeout 10",
        "  ServerAliveInterval 0",
    ]
    for name, port in (jump_hosts or {}).items():
        lines += [
            f"Host {name}",
            f"  Port {port}",
            f"  ProxyJump {user}@gw",
            f"  IdentityFile {identity}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {known_hosts}",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path
