"""A real redis-server for the cluster tests: its own process on a loopback port, no persistence, stopped by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.notify import ready_socket
from tests.support.peers import free_port

START_TIMEOUT = 10.0


@dataclass
class RedisServer:
    port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) it on the same port; returns once it says READY=1 (systemd's protocol, bounded)."""
        argv = ["/usr/bin/redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--protected-mode", "yes", "--supervised", "systemd"]  # fmt: skip
        self.process = _start_ready(argv, self.dir, "redis-server")

    def stop(self) -> None:
        """End it by its PID (TERM, then KILL). Idempotent."""
        _stop(self.process)


def _start_ready(argv: list[str], dir: Path, name: str) -> subprocess.Popen[bytes]:
    """Start `argv` logging to DIR/NAME.log; returns once it says READY=1 (systemd's protocol, bounded)."""
    log = dir / f"{name}.log"
    with ready_socket() as ready:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, **ready.env()}
        )
        try:
            ready.wait_sync(process, START_TIMEOUT)
        except RuntimeError as exc:
            _stop(process)
            raise RuntimeError(f"{name}: {exc}: {log.read_text()[-2000:]}") from None
    return process


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(5)


@dataclass
class HubServer:
    """The workers' hub (gateway/hub.py) as its own process, in RedisServer's shape: the cluster's tests run against
    it as against redis-server (a restart comes back empty, as a Redis without persistence does)."""

    dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"unix://{self.dir / 'hub.sock'}"

    def start(self) -> None:
        self.process = _start_ready([sys.executable, "-m", "gateway.hub", str(self.dir / "hub.sock")], self.dir, "hub")

    def stop(self) -> None:
        _stop(self.process)


Store = RedisServer | HubServer  # what the cluster's tests run against


@contextlib.contextmanager
def running_hub() -> Iterator[HubServer]:
    d = Path(tempfile.mkdtemp(prefix="bh-"))  # short: a socket path must fit in 108 bytes
    server = HubServer(d)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    d = Path(tempfile.mkdtemp(prefix="bastion-redis-"))
    server = RedisServer(free_port(), d)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)
