"""systemd's readiness protocol from the test's side: a datagram socket a child process gets as NOTIFY_SOCKET, so
the test waits for the child's own READY=1 instead of polling its port (bastion serve and redis-server speak it)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


class ReadySocket:
    """One child's notify socket. `env()` goes into its environment; `wait()`/`wait_sync()` return on READY=1."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="bn-"))  # short: a socket path must fit in 108 bytes
        self.path = self._dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def _ready(self, data: bytes) -> bool:
        return b"READY=1" in data.split(b"\n")

    async def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Until `proc` says READY=1; fails at once if it exits first."""
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        async with asyncio.timeout(timeout):
            while True:
                try:
                    async with asyncio.timeout(0.5):  # wakes on the datagram; the slice only notices an early exit
                        data = await loop.sock_recv(self.sock, 4096)
                except TimeoutError:
                    if proc.poll() is not None:
                        raise AssertionError(f"the process exited with status {proc.returncode} before it was ready") from None
                    continue
                if self._ready(data):
                    return

    def wait_sync(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """The same, blocking (for synchronous fixtures)."""
        self.sock.settimeout(0.5)
        for _ in range(int(timeout / 0.5) + 1):
            if proc.poll() is not None:
                raise RuntimeError(f"the process exited with status {proc.returncode} before it was ready")
            with contextlib.suppress(TimeoutError):
                if self._ready(self.sock.recv(4096)):
                    return
        raise RuntimeError("the process did not say READY=1 in time")

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def ready_socket() -> Iterator[ReadySocket]:
    rs = ReadySocket()
    try:
        yield rs
    finally:
        rs.close()
