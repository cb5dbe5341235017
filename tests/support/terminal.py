"""A real pseudo-terminal for driving interactive clients (ssh -tt) as a person would."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import struct
import termios

from gateway.demo import session_leader_on


class Terminal:
    """A pseudo-terminal running a real `ssh -tt`; reads are collected as the screen would get them."""

    def __init__(self, argv: list[str], rows: int = 24, cols: int = 80) -> None:
        self.argv = argv
        self.master, self.slave = pty.openpty()
        self.resize(rows, cols)
        self.buf = bytearray()
        self.proc: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Event()

    def resize(self, rows: int, cols: int) -> None:
        # On a pty the kernel sends SIGWINCH to the foreground process group, as a terminal emulator would.
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            preexec_fn=session_leader_on(self.slave),
        )
        os.close(self.slave)
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
        self.buf.extend(data)
        self._changed.set()

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    async def expect(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        """Wait until `pattern` shows up in the output after what earlier expects consumed.

        On a timeout the AssertionError shows the screen's tail, so a failure explains itself.
        """
        rx = re.compile(pattern)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    text = self.buf.decode(errors="replace")
                    m = rx.search(text)
                    if m:
                        del self.buf[: len(text[: m.end()].encode())]
                        return m
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            tail = self.buf.decode(errors="replace")[-600:]
            raise AssertionError(f"{pattern!r} did not appear within {timeout}s; screen tail: {tail!r}") from None

    async def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        os.close(self.master)
