"""Debian's haproxy as a child of a test: TCP mode, its one frontend on a socket the test has already bound and
listening (`bind fd@N`), so clients may connect at once (the kernel queues them) and nothing polls for a port."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

CONFIG = """\
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend public
    bind fd@{fd}
    default_backend gateways
backend gateways
    balance roundrobin
{servers}
"""


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    assert found, "haproxy is missing: run scripts/install-test-deps.sh"
    return found


@contextlib.contextmanager
def running_haproxy(servers: list[str]) -> Iterator[int]:
    """haproxy -db in front of `servers` (haproxy `server` lines); yields its port; stopped by its PID, its dir removed."""
    d = Path(tempfile.mkdtemp(prefix="bastion-haproxy-"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = int(listener.getsockname()[1])
    cfg = d / "haproxy.cfg"
    cfg.write_text(CONFIG.format(fd=listener.fileno(), servers="\n".join(f"    {s}" for s in servers)))
    proc = subprocess.Popen(
        [haproxy_binary(), "-db", "-f", str(cfg)], pass_fds=[listener.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=d
    )
    listener.close()  # haproxy holds its own copy
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        shutil.rmtree(d, ignore_errors=True)
