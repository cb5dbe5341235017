"""A real redis-server for the cluster tests: its own process on a loopback port, no persistence, stopped by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
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
        with ready_socket() as ready:
            self.process = subprocess.Popen(
                ["/usr/bin/redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--dir", str(self.dir), "--protected-mode", "yes", "--supervised", "systemd"],
                stdin=subprocess.DEVNULL, stdout=(self.dir / "redis.log").open("ab"), stderr=subprocess.STDOUT,
                env={**os.environ, **ready.env()},
            )  # fmt: skip
            try:
                ready.wait_sync(self.process, START_TIMEOUT)
            except RuntimeError as exc:
                raise RuntimeError(f"redis-server: {exc}: {(self.dir / 'redis.log').read_text()[-2000:]}") from None

    def stop(self) -> None:
        """End it by its PID (TERM, then KILL). Idempotent."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


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
