"""No session outlives its connection: every path x every way a side goes away (issue item 7).

Each cell starts a gateway with short limits, opens one session through a real client (OpenSSH `ssh`
and `sftp`, the real `bastion tunnel` helper as a subprocess, loopback sockets), makes one side go away,
and checks that the session left the registry within its bound and with the expected reason, and that
the daemon-side log stream held only JSON lines (stdlib logging and loop exceptions are routed into it
the way `bastion serve` does). The time from the event to the registry's `closed` event is recorded per
cell; the table is written to /tmp/bastion-matrix.md (and printed) when the module finishes.

The sides: the VM of the terminating paths is the suite's real sshd; killing "the VM" there means
killing the sshd processes that serve this one connection (new descendants of the fixture's sshd,
proved by PID and start time). The VM of the byte-stream paths (`ssh -W`, `ssh -L`, the tunnel) is a
loopback TCP server in this file that the test drives: echo, hold after EOF, burst, stop reading, FIN,
RST. RDP through the tunnel is covered by tests/e2e/test_rdp.py and is not repeated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import termios
import time
from asyncio.subprocess import PIPE
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.kinds import Reason
from gateway.logs import loop_exception_handler, make_logger, quiet_libraries, route_stdlib_logging
from gateway.sessions.model import SessionInfo
from gateway.sessions.registry import Session, SessionRegistry, Subscription
from tests.e2e.conftest import Gateway, GatewayFactory, wait_for
from tests.support.peers import free_port

BASTION = [sys.executable, "-m", "gateway"]
TABLE = Path("/tmp/bastion-matrix.md")
TCP_VM = "tcp01"

# Limits of the cells (every cell gets its own gateway with these).
IDLE = 2.0  # [sessions] idle_timeout of the "VM stops reading" cells
HALF_CLOSE = 1.0  # [sessions] half_close_timeout of the half-close cells
KEEPALIVE = (1.0, 2)  # [ssh] keepalive_interval, keepalive_count of the silent cells
PING = 1.0  # [tunnel] ping_interval of the silent tunnel cell
# How long a side going away may take to end its session when no limit is involved: the relay's
# close is bounded at 2 s for terminating SSH (the exit status first), the rest is scheduling.
AT_ONCE = 3.0
# What the limit cells may take beyond their limit (the stall before input stops, the relay close, load).
SLACK = 2.5
# How long input may keep moving into a VM that stopped reading (the buffers on the way fill first).
STALL = 10.0
# Limits of the cells that must not end by a limit: far beyond every bound here.
LONG = "60s"

# -- the table ----------------------------------------------------------------------------------------------

PATHS = {
    "pty": "`ssh -tt alice+web01@gw` (shell)",
    "exec": "`ssh alice+web01@gw CMD`",
    "sftp": "`sftp alice+web01@gw` (interactive, on a pipe)",
    "jump-W": "`ssh -W tcp01:PORT alice@gw`",
    "forward-L": "`ssh -N -L P:tcp01:PORT alice@gw` + local TCP client",
    "tunnel": "`bastion tunnel` + local TCP client",
}
EVENTS = {
    "client_fin": "client FIN / the client exits",
    "client_fin_busy": "the client exits in order while the VM sends output",
    "client_kill": "client SIGKILL",
    "client_rst": "client RST with unread data",
    "helper_kill_after_local_close": "helper SIGKILL after its local client closed",
    "vm_fin": "VM FIN",
    "vm_rst": "VM RST",
    "vm_stops_reading": "VM stops reading, client floods",
    "vm_holds_after_eof": "VM never closes after the user's EOF",
    "client_silent": "client silent (SIGSTOP)",
    "vm_silent": "VM silent (SIGSTOP)",
}


@dataclass(frozen=True)
class Row:
    path: str
    event: str
    how: str
    reason: str
    seconds: float | None
    bound: str
    note: str = ""


ROWS: list[Row] = []

# Cells that do not apply, and why (they are listed in the table, not run).
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    **{(p, "helper_kill_after_local_close"): "no helper on this path" for p in ("pty", "exec", "sftp", "jump-W", "forward-L")},
    **{
        (p, "vm_holds_after_eof"): "by design the user's EOF starts no half-close timer in terminating SSH "
        "(`ssh host cmd < file` runs as long as cmd does); idle_timeout/max_duration bound it"
        for p in ("pty", "exec", "sftp")
    },
    ("sftp", "vm_fin"): "internal-sftp ends only on the client's EOF (`bye`, the client_fin cell); killing it is vm_rst",
    ("sftp", "vm_stops_reading"): "the suite's sshd serves sftp in-process; it cannot be made to stop reading without "
    "stopping it altogether (the vm_silent cell)",
    **{
        (p, "vm_silent"): "a VM host that vanished needs its packets dropped: on loopback the kernel answers the "
        "gateway's TCP keepalives (30 s + 3 x 10 s, gateway/net/upstream.py) even for a stopped process; "
        "a TCP VM that goes quiet is the vm_stops_reading cell"
        for p in ("jump-W", "forward-L", "tunnel")
    },
}


@pytest.fixture(scope="module", autouse=True)
def matrix_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """Write the table once every cell of the module ran (and print it past pytest's capture)."""
    yield
    text = render_table()
    TABLE.write_text(text)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    ctx = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
    with ctx:
        print("\n" + text, flush=True)


def render_table() -> str:
    rows = {(r.path, r.event): r for r in ROWS}
    out = [
        "# Bastion session-end matrix",
        "",
        f"Seconds from the event (kill/close/stop) to the registry's `closed` event. Limits: idle_timeout {IDLE:g}s, "
        f"half_close_timeout {HALF_CLOSE:g}s, ssh keepalive {KEEPALIVE[0]:g}s x {KEEPALIVE[1]}, tunnel ping {PING:g}s; "
        f"elsewhere the limits are {LONG} so that only the event can end the session.",
        "",
        "| path | event | how | reason | seconds | bound | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in PATHS:
        for e, what in EVENTS.items():
            r = rows.get((p, e))
            if r is not None:
                secs = f"{r.seconds:.2f}" if r.seconds is not None else "FAILED"
                out.append(f"| {p} | {what} | {r.how} | {r.reason} | {secs} | {r.bound} | {r.note} |")
            elif (p, e) in NOT_APPLICABLE:
                out.append(f"| {p} | {what} | - | n/a | - | - | {NOT_APPLICABLE[(p, e)]} |")
    out += ["", "Paths: " + "; ".join(f"{k} = {v}" for k, v in PATHS.items()) + ".", ""]
    out.append("RDP through the tunnel is covered by tests/e2e/test_rdp.py and not repeated here.")
    return "\n".join(out) + "\n"


# -- processes we start, and processes we can prove are ours ---------------------------------------------------


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of a live process, None if there is none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


@dataclass(frozen=True)
class Owned:
    """A process this test can prove is its own: the PID with the start time it had when we found it."""

    pid: int
    started: int
    cmd: str

    def alive(self) -> bool:
        st = proc_stat(self.pid)
        return st is not None and st[1] == self.started

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def descendants(root: int) -> dict[int, Owned]:
    """Every live descendant of `root`, found through /proc."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st is not None:
                parents.setdefault(st[0], []).append(int(entry.name))
                starts[int(entry.name)] = st[1]
    out: dict[int, Owned] = {}
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = Owned(pid, starts[pid], cmdline(pid))
        todo.extend(parents.get(pid, []))
    return out


class VMProcesses:
    """The sshd processes (and what they run) that serve this cell's one connection to the suite's sshd VM.

    The snapshot is taken before the client connects; what is new under the fixture's sshd once the
    session runs is ours (cells run one at a time, and the sshd is this pytest process's own).
    """

    def __init__(self, sshd_pid: int) -> None:
        self._root = sshd_pid
        self._before = {(o.pid, o.started) for o in descendants(sshd_pid).values()}
        self.ours: list[Owned] = []

    def find(self) -> list[Owned]:
        now = descendants(self._root)
        self.ours = [o for o in now.values() if (o.pid, o.started) not in self._before]
        assert self.ours, "no sshd process serves this session"
        return self.ours

    def signal_sshd(self, sig: int) -> None:
        """Signal the sshd processes of the connection (they hold its socket), not what they run."""
        for o in self.ours:
            if o.cmd.startswith("sshd:"):
                o.signal(sig)

    def cleanup(self) -> None:
        for o in self.ours:
            o.signal(signal.SIGCONT)
            o.signal(signal.SIGKILL)


class ProcessWatch:
    """Wait for a process that is not our child to exit, through a pidfd (readable once it exited)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(fd, self._exited)

    @classmethod
    async def open(cls, proc: Owned) -> ProcessWatch:
        fd = os.pidfd_open(proc.pid)
        if not proc.alive():  # the PID was reused between finding it and opening the pidfd
            os.close(fd)
            raise AssertionError(f"{proc.cmd} exited before it could be watched")
        return cls(fd)

    def _exited(self) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        asyncio.get_running_loop().remove_reader(self.fd)

    def close(self) -> None:
        if not self.gone.done():
            asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


class Client:
    """A client process we start (in its own process group, so its children share its fate).

    stdout and stderr are read all the time (a flood never blocks on us); the last 64 KiB of stdout
    and all of stderr are kept, and `changed` fires on every read.
    """

    KEEP = 64 * 1024

    def __init__(self, *argv: str) -> None:
        self.argv = list(argv)
        self.proc: asyncio.subprocess.Process | None = None
        self.out = bytearray()
        self.head = bytearray()  # the first KEEP bytes, where markers like READY are
        self.out_total = 0
        self.out_eof = asyncio.Event()
        self.err = bytearray()
        self.changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> Client:
        self.proc = await asyncio.create_subprocess_exec(*self.argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, start_new_session=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._tasks = [asyncio.create_task(self._read_out(self.proc.stdout)), asyncio.create_task(self._read_err(self.proc.stderr))]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def _read_out(self, stream: asyncio.StreamReader) -> None:
        while data := await stream.read(65536):
            self.out_total += len(data)
            if len(self.head) < self.KEEP:
                self.head.extend(data[: self.KEEP - len(self.head)])
            self.out.extend(data)
            del self.out[: max(0, len(self.out) - self.KEEP)]
            self.changed.set()
        self.out_eof.set()
        self.changed.set()

    async def _read_err(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.err.extend(line)
            self.changed.set()

    @property
    def errtext(self) -> str:
        return self.err.decode(errors="replace")

    async def wait_out(self, marker: bytes, timeout: float = 20) -> None:
        try:
            await wait_for(lambda: marker in self.head or marker in self.out, self.changed, timeout)
        except TimeoutError:
            raise AssertionError(f"{self.argv[0]} never printed {marker!r}; stderr: {self.errtext[-2000:]}") from None

    async def wait_err(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            m = re.search(pattern, self.errtext)
            if m:
                found.append(m)
            return m is not None

        try:
            await wait_for(seen, self.changed, timeout)
        except TimeoutError:
            raise AssertionError(f"{self.argv[0]} never printed {pattern!r}; stderr: {self.errtext[-2000:]}") from None
        return found[0]

    async def write(self, data: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    def close_stdin(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()

    async def flood_stdin(self) -> None:
        """Write to stdin until it blocks for good (the task is cancelled) or the pipe breaks."""
        chunk = b"f" * 1023 + b"\n"
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await self.write(chunk * 16)

    def signal(self, sig: int) -> None:
        """Signal the whole process group; only while our process is unreaped, so the group is provably ours."""
        assert self.proc is not None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def exited(self, timeout: float) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def reap(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- the TCP VM and the local TCP client ---------------------------------------------------------------------


class VMConn(asyncio.Protocol):
    """One connection to the TCP VM."""

    def __init__(self, vm: TcpVM) -> None:
        self.vm = vm
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.got_eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_exc: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.vm.conns.append(self)
        self.vm.changed.set()
        if self.vm.burst:
            transport.write(self.vm.burst)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.vm.changed.set()
        if self.vm.mode == "echo" and self.transport is not None:
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.got_eof.set()
        self.vm.changed.set()
        # An echo VM is a normal server: it closes once the client is done. The others hold on.
        return self.vm.mode != "echo"

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self.lost.set()
        self.vm.changed.set()

    def fin(self) -> None:
        assert self.transport is not None
        self.transport.close()

    def rst(self) -> None:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def stop_reading(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def tcp_state(self) -> str:
        """The kernel's TCP state of the VM's end (it changes without the VM reading: a FIN makes it CLOSE_WAIT)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None and not self.lost.is_set() else None
        if sock is None:
            return "CLOSED"  # the VM's own transport is gone
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        except OSError:
            return "CLOSED"
        return TCP_STATES.get(state, str(state))


TCP_STATES = {1: "ESTABLISHED", 7: "CLOSED", 8: "CLOSE_WAIT", 9: "LAST_ACK", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT"}


class TcpVM:
    """A loopback TCP server standing in for a VM: `echo` (closes after EOF) or `hold` (never closes)."""

    def __init__(self, mode: str = "echo", burst: bytes = b"") -> None:
        self.mode = mode
        self.burst = burst  # written to every new connection
        self.conns: list[VMConn] = []
        self.changed = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TcpVM:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: VMConn(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def conn(self, timeout: float = 20) -> VMConn:
        await wait_for(lambda: bool(self.conns), self.changed, timeout)
        return self.conns[-1]

    async def stop(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class LocalClient:
    """A TCP client on loopback with a raw socket, so what sits unread stays in the kernel's receive buffer."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.got = 0
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()  # "eof" or "reset"
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(self, port: int) -> LocalClient:
        await asyncio.get_running_loop().sock_connect(self.sock, ("127.0.0.1", port))
        return self

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv_exactly(self, n: int, timeout: float = 20) -> bytes:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        async with asyncio.timeout(timeout):
            while len(buf) < n:
                data = await loop.sock_recv(self.sock, n - len(buf))
                assert data, f"EOF after {len(buf)} of {n} bytes"
                buf.extend(data)
        return bytes(buf)

    def pump(self, *, close_on_eof: bool = False) -> None:
        """Read (and drop) everything from here on; `ended` tells how the stream ended."""
        self._tasks.append(asyncio.create_task(self._pump(close_on_eof)))

    async def _pump(self, close_on_eof: bool) -> None:
        loop = asyncio.get_running_loop()
        how = "eof"
        try:
            while data := await loop.sock_recv(self.sock, 65536):
                self.got += len(data)
        except (ConnectionResetError, BrokenPipeError):
            how = "reset"
        except OSError:
            return  # we closed the socket ourselves
        if not self.ended.done():
            self.ended.set_result(how)
        if close_on_eof:
            self.close()

    def flood(self) -> None:
        self._tasks.append(asyncio.create_task(self._flood()))

    async def _flood(self) -> None:
        try:
            while True:
                await self.send(b"c" * 65536)
        except OSError as exc:
            if not self.ended.done():
                self.ended.set_result("reset" if isinstance(exc, ConnectionResetError | BrokenPipeError) else "eof")

    def unread(self) -> int:
        """Bytes waiting in the kernel's receive buffer (FIONREAD)."""
        buf = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """An orderly close: FIN (nothing unread, or the kernel would reset)."""
        if self.sock.fileno() != -1:
            self.sock.close()

    def reset(self) -> None:
        """SO_LINGER 0, then close: the kernel sends RST."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    async def cleanup(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.close()


# -- the daemon's view -----------------------------------------------------------------------------------------


class Events:
    """The registry's event stream, filtered to what a cell waits for."""

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry
        self.sub: Subscription = registry.subscribe()
        self.bytes_down: dict[str, int] = {}

    async def _next(self) -> Any:
        ev = await self.sub.get()
        assert ev is not None, "the registry's event queue overflowed"
        for p in ev.progress:
            self.bytes_down[p.id] = p.bytes_down
        return ev

    async def opened(self, vm: str, timeout: float = 30) -> SessionInfo:
        async with asyncio.timeout(timeout):
            while True:
                ev = await self._next()
                if ev.kind == "opened" and ev.session is not None and ev.session.vm == vm:
                    return ev.session  # type: ignore[no-any-return]

    async def closed(self, sid: str, timeout: float) -> tuple[Reason, float]:
        """The session's `closed` event and when it arrived (time.monotonic())."""
        async with asyncio.timeout(timeout):
            while True:
                ev = await self._next()
                if ev.kind == "closed" and ev.session is not None and ev.session.id == sid:
                    assert ev.reason is not None
                    return ev.reason, time.monotonic()

    async def bytes_down_over(self, sid: str, n: int, timeout: float = 20) -> None:
        """Until a progress event (every 2 s) shows more than `n` bytes sent to the user."""
        async with asyncio.timeout(timeout):
            while self.bytes_down.get(sid, 0) <= n:
                await self._next()

    async def settled(self, sid: str, quiet: float = 5, timeout: float = 30) -> None:
        """Until no progress event (every 2 s, only for sessions whose counts moved) names `sid` for `quiet` s."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    async with asyncio.timeout(quiet):
                        while True:
                            ev = await self._next()
                            if any(p.id == sid for p in ev.progress):
                                break
                except TimeoutError:
                    return

    def close(self) -> None:
        self.registry.unsubscribe(self.sub)


@contextlib.contextmanager
def daemon_logging(stream: Any) -> Iterator[None]:
    """Route stdlib logging and loop exceptions into the gateway's log stream, as `bastion serve` does."""
    root = logging.getLogger()
    saved_root = root.level
    saved = {n: logging.getLogger(n).level for n in ("asyncssh", "aiohttp.access")}
    handler = route_stdlib_logging(stream, fmt="json")
    quiet_libraries()
    loop = asyncio.get_running_loop()
    saved_handler = loop.get_exception_handler()
    loop.set_exception_handler(loop_exception_handler(make_logger(stream, fmt="json", node="test-node")))
    try:
        yield
    finally:
        loop.set_exception_handler(saved_handler)
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for n, lvl in saved.items():
            logging.getLogger(n).setLevel(lvl)


def only_json(text: str, what: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{what}: a line that is not JSON: {line[:300]!r}") from None
        assert isinstance(d, dict), f"{what}: not a JSON object: {line[:300]!r}"
        out.append(d)
    return out


# -- cells -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    path: str
    event: str
    reason: Reason
    how: str
    note: str = ""

    @property
    def limit(self) -> tuple[float, float, str]:
        """(floor, bound, description): how long from the event to `closed` this cell may take."""
        if self.event == "vm_stops_reading":
            return IDLE - 0.05, IDLE + SLACK, f"idle_timeout {IDLE:g}s + {SLACK:g}s after the last input"
        if self.event == "vm_holds_after_eof":
            return HALF_CLOSE - 0.05, HALF_CLOSE + SLACK, f"half_close_timeout {HALF_CLOSE:g}s + {SLACK:g}s"
        if self.event in ("client_silent", "vm_silent") and self.path != "tunnel":
            i, n = KEEPALIVE
            return i * n - 0.1, i * (n + 1) + SLACK, f"{i:g}s x ({n}+1) + {SLACK:g}s"
        if self.event == "client_silent":
            return 0.0, PING * 1.5 + SLACK, f"ping {PING:g}s x 1.5 + {SLACK:g}s"
        return 0.0, AT_ONCE, f"{AT_ONCE:g}s (no limit involved)"

    def edit(self, vm_port: int) -> Callable[[dict[str, Any]], None]:
        def edit(cfg: dict[str, Any]) -> None:
            cfg["gateway"]["shutdown_grace"] = "1s"
            cfg["sessions"] = {
                "idle_timeout": f"{IDLE:g}s" if self.event == "vm_stops_reading" else LONG,
                "max_duration": "off",
                "half_close_timeout": f"{HALF_CLOSE:g}s" if self.event == "vm_holds_after_eof" else LONG,
            }
            silent = self.event in ("client_silent", "vm_silent")
            cfg["ssh"]["keepalive_interval"] = f"{KEEPALIVE[0]:g}s" if silent else LONG
            cfg["ssh"]["keepalive_count"] = KEEPALIVE[1] if silent else 3
            cfg["tunnel"] = {"ping_interval": f"{PING:g}s" if silent else LONG}
            cfg["vms"].append({"name": TCP_VM, "address": "127.0.0.1", "ssh_port": 22, "trust_on_first_use": True})
            cfg["rules"].append({"groups": ["ops"], "vms": [TCP_VM], "protocols": ["ssh-jump", "tcp"], "ports": [vm_port]})

        return edit


C = Cell
R = Reason
CELLS = [
    # terminating SSH with a PTY: a shell on the suite's sshd
    C("pty", "client_fin", R.CLIENT_CLOSED, "SIGTERM ssh at the prompt: it writes SSH DISCONNECT, then exits (FIN)"),
    C("pty", "client_kill", R.CLIENT_LOST, "SIGKILL ssh"),
    C("pty", "client_rst", R.CLIENT_LOST, "SIGSTOP ssh, the shell's `cat FIFO` sends 512 KiB that pile up unread, SIGKILL"),
    C("pty", "vm_fin", R.VM_CLOSED, "`exit` typed: the shell ends"),
    C("pty", "vm_rst", R.VM_RESET, "SIGKILL the sshd process of the connection"),
    C("pty", "vm_stops_reading", R.IDLE_TIMEOUT, "`sleep 600` in the shell, the client floods input"),
    C("pty", "client_silent", R.CLIENT_SILENT, "SIGSTOP ssh"),
    C("pty", "vm_silent", R.VM_SILENT, "SIGSTOP the sshd process of the connection"),
    # terminating SSH, a command without PTY
    C("exec", "client_fin", R.CLIENT_CLOSED, "SIGTERM ssh running `sleep 600`: DISCONNECT, then FIN"),
    C("exec", "client_kill", R.CLIENT_LOST, "SIGKILL ssh running `sleep 600`"),
    C("exec", "client_rst", R.CLIENT_LOST, "SIGSTOP ssh, the command `cat FIFO` sends 512 KiB that pile up unread, SIGKILL"),
    C("exec", "vm_fin", R.VM_CLOSED, "the command (`read x; exit 3`) exits"),
    C("exec", "vm_rst", R.VM_RESET, "SIGKILL the sshd process of the connection"),
    C("exec", "vm_stops_reading", R.IDLE_TIMEOUT, "`sleep 600` never reads stdin, the client floods it"),
    C("exec", "client_silent", R.CLIENT_SILENT, "SIGSTOP ssh"),
    C("exec", "vm_silent", R.VM_SILENT, "SIGSTOP the sshd process of the connection"),
    # sftp (a subsystem)
    C(
        "sftp",
        "client_fin",
        R.VM_CLOSED,
        "`bye`: sftp's ssh sends EOF, the VM's sftp server exits",
        "the VM ends the channel after the user's EOF: the gateway cannot tell this from a command that ends on its own",
    ),
    C("sftp", "client_kill", R.CLIENT_LOST, "SIGKILL sftp and its ssh"),
    C("sftp", "client_rst", R.CLIENT_LOST, "`get` of a sparse 8 GiB file; SIGSTOP sftp and its ssh until data piles up unread, SIGKILL"),
    C("sftp", "vm_rst", R.VM_RESET, "SIGKILL the sshd process of the connection"),
    C("sftp", "client_silent", R.CLIENT_SILENT, "SIGSTOP sftp and its ssh"),
    C("sftp", "vm_silent", R.VM_SILENT, "SIGSTOP the sshd process of the connection"),
    # ssh -W: a jump stream to the TCP VM on ssh's stdin/stdout
    C("jump-W", "client_fin", R.CLIENT_CLOSED, "close ssh's stdin (EOF); the echo VM closes in reply"),
    C("jump-W", "client_kill", R.CLIENT_LOST, "SIGKILL ssh"),
    C("jump-W", "client_rst", R.CLIENT_LOST, "SIGSTOP ssh, the VM sends 512 KiB that pile up unread, SIGKILL"),
    C("jump-W", "vm_fin", R.VM_CLOSED, "the VM closes (FIN); ssh's stdout ends and the client closes stdin in reply"),
    C("jump-W", "vm_rst", R.VM_RESET, "the VM closes with SO_LINGER 0 (RST)"),
    C("jump-W", "vm_stops_reading", R.IDLE_TIMEOUT, "the VM stops reading, the client floods stdin"),
    C("jump-W", "vm_holds_after_eof", R.HALF_CLOSE_TIMEOUT, "close ssh's stdin; the VM never closes"),
    C("jump-W", "client_silent", R.CLIENT_SILENT, "SIGSTOP ssh"),
    # ssh -L: a local forward, a local TCP client
    C("forward-L", "client_fin", R.CLIENT_CLOSED, "the local client closes (FIN); the echo VM closes in reply"),
    C("forward-L", "client_kill", R.CLIENT_LOST, "SIGKILL ssh -L"),
    C(
        "forward-L",
        "client_rst",
        R.CLIENT_CLOSED,
        "the local client resets (SO_LINGER 0) with VM data unread",
        "ssh -L passes a local reset on as the channel's EOF and close: an orderly close is all the gateway sees",
    ),
    C("forward-L", "vm_fin", R.VM_CLOSED, "the VM closes (FIN); the local client closes in reply"),
    C("forward-L", "vm_rst", R.VM_RESET, "the VM closes with SO_LINGER 0 (RST)"),
    C("forward-L", "vm_stops_reading", R.IDLE_TIMEOUT, "the VM stops reading, the local client floods"),
    C("forward-L", "vm_holds_after_eof", R.HALF_CLOSE_TIMEOUT, "the local client shuts down writing; the VM never closes"),
    C("forward-L", "client_silent", R.CLIENT_SILENT, "SIGSTOP ssh -L"),
    # the WebSocket tunnel: the bastion tunnel helper, a local TCP client
    C("tunnel", "client_fin", R.CLIENT_CLOSED, "the local client closes (FIN); the echo VM closes in reply"),
    C("tunnel", "client_kill", R.CLIENT_LOST, "SIGKILL the helper"),
    C("tunnel", "client_rst", R.CLIENT_LOST, "the local client resets (SO_LINGER 0) with VM data unread"),
    C("tunnel", "helper_kill_after_local_close", R.CLIENT_LOST, "the local client closes, the VM holds, SIGKILL the helper"),
    C("tunnel", "vm_fin", R.VM_CLOSED, "the VM closes (FIN); the local client closes in reply"),
    C("tunnel", "vm_rst", R.VM_RESET, "the VM closes with SO_LINGER 0 (RST)"),
    C("tunnel", "vm_stops_reading", R.IDLE_TIMEOUT, "the VM stops reading, the local client floods"),
    C("tunnel", "vm_holds_after_eof", R.HALF_CLOSE_TIMEOUT, "the local client shuts down writing; the VM never closes"),
    C("tunnel", "client_silent", R.CLIENT_SILENT, "SIGSTOP the helper"),
]


@dataclass
class Run:
    """One cell's moving parts; everything here is cleaned up by `cleanup()`."""

    gw: Gateway
    cell: Cell
    events: Events
    vm: TcpVM
    clients: list[Client] = field(default_factory=list)
    locals: list[LocalClient] = field(default_factory=list)
    vm_procs: VMProcesses | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    session: SessionInfo | None = None
    live: Session | None = None  # the registry's Session object, read after it closed (last input)
    note: str = ""
    files: list[Path] = field(default_factory=list)
    connection: ProcessWatch | None = None  # the process that holds the user's connection, if not ours
    fifo: Path | None = None
    fds: list[int] = field(default_factory=list)

    async def opened(self, vm: str) -> SessionInfo:
        self.session = await self.events.opened(vm)
        self.live = self.gw.app.registry.live(self.session.id)
        return self.session

    async def client(self, *argv: str) -> Client:
        c = Client(*argv)
        self.clients.append(c)
        return await c.start()

    async def local(self, port: int) -> LocalClient:
        lc = LocalClient()
        self.locals.append(lc)
        return await lc.connect(port)

    def spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.create_task(coro))

    async def cleanup(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for lc in self.locals:
            await lc.cleanup()
        for c in self.clients:
            await c.reap()
        if self.vm_procs is not None:
            self.vm_procs.cleanup()
        await self.vm.stop()
        self.events.close()
        for f in self.files:
            f.unlink(missing_ok=True)
        if self.connection is not None:
            self.connection.close()
        for fd in self.fds:
            os.close(fd)


# Each driver opens the session (returns once bytes flow) and then makes the cell's event happen,
# returning time.monotonic() at the moment of the event.


async def terminating(run: Run) -> float:
    gw, cell = run.gw, run.cell
    run.vm_procs = VMProcesses(gw.vm.proc.pid)
    cfg = str(gw.ssh_config)
    if cell.event == "client_rst" and cell.path != "sftp":
        run.fifo = gw.tmp / "flood.fifo"  # the VM is this machine: the test feeds the VM's `cat` through it
        os.mkfifo(run.fifo)
        run.files.append(run.fifo)
    if cell.path == "pty":
        c = await run.client(*gw.ssh_argv("alice+web01", "-tt"))
        # The prompt is the shell's last output: once it is shown, nothing is in flight towards the client.
        await c.write(b"PS1='matrix''> '; echo RE''ADY\n")
    elif cell.path == "exec":
        command = {
            "client_rst": f"echo READY; exec cat {run.fifo}",
            "vm_fin": "echo READY; read x; exit 3",
        }.get(cell.event, "echo READY; exec sleep 600")
        c = await run.client(*gw.ssh_argv("alice+web01"), command)
    else:
        c = await run.client("sftp", "-F", cfg, "alice+web01@gw")
        await c.write(b"pwd\n")
    session = await run.opened("web01")
    await c.wait_out({"pty": b"matrix> ", "exec": b"READY"}.get(cell.path, b"Remote working directory"))
    run.vm_procs.find()
    if cell.path == "sftp":
        # The user's connection is sftp's ssh: watch it (through a pidfd, which pins the process) to see it go.
        [ssh] = [o for o in descendants(c.pid).values() if Path(o.cmd.split()[0]).name == "ssh"]
        run.connection = await ProcessWatch.open(ssh)

    ev = cell.event
    # What must be under way before the event.
    if ev == "client_rst":
        if cell.path == "sftp":  # sftp keeps requests in flight: what they bring piles up once the client stops
            big = gw.tmp / "sparse.bin"  # the VM is this machine: a sparse 8 GiB file reads at memory speed
            run.files.append(big)
            with big.open("wb") as f:
                f.truncate(8 << 30)
            await c.write(f"get {big} /dev/null\n".encode())
            await run.events.bytes_down_over(session.id, 1 << 20)
            await pile_up_unread(run, c, None)
        else:  # the shell/command on the VM relays what the test writes into a FIFO
            assert run.fifo is not None
            if cell.path == "pty":
                await c.write(f"echo C''AT; cat {run.fifo}\n".encode())
                await c.wait_out(b"CAT\r\n")  # the shell runs the line
            await pile_up_unread(run, c, run.fifo)
    if ev == "vm_stops_reading" and cell.path == "pty":
        await c.write(b"sleep 600\n")

    t = time.monotonic()
    if ev == "client_fin" and cell.path == "sftp":
        await c.write(b"bye\n")
    elif ev == "client_fin":
        c.signal(signal.SIGTERM)
    elif ev in ("client_kill", "client_rst"):
        c.signal(signal.SIGKILL)
    elif ev == "vm_fin":
        await c.write(b"exit\n" if cell.path == "pty" else b"go\n")
    elif ev == "vm_rst":
        run.vm_procs.signal_sshd(signal.SIGKILL)
    elif ev == "vm_stops_reading":
        run.spawn(c.flood_stdin())
    elif ev == "client_silent":
        c.signal(signal.SIGSTOP)
    elif ev == "vm_silent":
        run.vm_procs.signal_sshd(signal.SIGSTOP)
    else:
        raise AssertionError(f"no such event {ev}")
    return t


def unread(run: Run) -> int:
    """Bytes unread in the receive buffer of the client's connection to the gateway (/proc/net/tcp)."""
    assert run.session is not None
    mine, gw = f"0100007F:{run.session.source_port:04X}", f"0100007F:{run.gw.port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == mine and f[2] == gw:
            return int(f[4].split(":")[1], 16)
    raise AssertionError("the client's connection to the gateway is not in /proc/net/tcp")


PILE = 512 * 1024  # what the VM sends to a stopped client: well inside OpenSSH's 2 MiB channel window


async def pile_up_unread(run: Run, c: Client, fifo: Path | VMConn | None) -> None:
    """Stop the client (SIGSTOP), then have the VM send PILE bytes (through `fifo`, or the TCP VM's connection;
    None: what is in flight), so that they pile up unread in the client's socket and the SIGKILL that follows
    makes its kernel answer with RST. The gateway's progress events (every 2 s) say when it sent them."""
    assert run.session is not None and run.live is not None
    c.signal(signal.SIGSTOP)
    before = run.live.bytes_down
    if isinstance(fifo, Path):
        run.fds.append(await write_fifo(fifo, b"z" * PILE))
    elif isinstance(fifo, VMConn):
        assert fifo.transport is not None
        fifo.transport.write(b"z" * PILE)
    if fifo is None:
        # What was in flight may already be all the gateway could send (a loaded client fell behind, so the
        # gateway was held back by TCP before the stop): wait until the counts stop moving, not for them to grow.
        await run.events.settled(run.session.id)
    else:
        await run.events.bytes_down_over(run.session.id, before + PILE - 1)
    n = unread(run)
    assert n > 0, "nothing unread in the stopped client's socket"
    run.note = f"{n} bytes unread in the client's socket at the kill"


async def writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, lambda: None if ready.done() else ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def write_fifo(path: Path, data: bytes, timeout: float = 20) -> int:
    """Write `data` into a FIFO that a VM command reads; returns the fd, kept open (no EOF) until cleanup.

    O_RDWR never blocks on open (it is a reader too, but never reads); full-pipe waits are on writability.
    """
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    view = memoryview(data)
    try:
        async with asyncio.timeout(timeout):
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await writable(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def jump_w(run: Run) -> float:
    gw, cell, vm = run.gw, run.cell, run.vm
    c = await run.client(*gw.ssh_argv("alice", "-W", f"{TCP_VM}:{vm.port}"))
    await run.opened(TCP_VM)
    conn = await vm.conn()
    await c.write(b"ping")
    if vm.mode == "echo":
        await c.wait_out(b"ping")
    else:
        await wait_for(lambda: conn.received >= 4, vm.changed)

    ev = cell.event
    if ev == "client_rst":
        await pile_up_unread(run, c, conn)
    t = time.monotonic()
    if ev in ("client_fin", "vm_holds_after_eof"):
        c.close_stdin()
    elif ev in ("client_kill", "client_rst"):
        c.signal(signal.SIGKILL)
    elif ev == "vm_fin":
        conn.fin()

        async def react() -> None:
            async with asyncio.timeout(20):
                await c.out_eof.wait()  # like an inner ssh that sees EOF: it exits, closing our stdin
            c.close_stdin()

        run.spawn(react())
    elif ev == "vm_rst":
        conn.rst()
    elif ev == "vm_stops_reading":
        conn.stop_reading()
        run.spawn(c.flood_stdin())
    elif ev == "client_silent":
        c.signal(signal.SIGSTOP)
    else:
        raise AssertionError(f"no such event {ev}")
    return t


async def stream_client(run: Run, local_port: int) -> tuple[LocalClient, VMConn]:
    """Connect the local TCP client through the forward or the helper; returns once bytes flow."""
    vm = run.vm
    lc = await run.local(local_port)
    await run.opened(TCP_VM)
    conn = await vm.conn()
    if vm.burst:
        assert await lc.recv_exactly(1) == vm.burst[:1]
    elif vm.mode == "echo":
        await lc.send(b"ping")
        assert await lc.recv_exactly(4) == b"ping"
    else:
        await lc.send(b"ping")
        await wait_for(lambda: conn.received >= 4, vm.changed)
    return lc, conn


async def stream_event(run: Run, lc: LocalClient, conn: VMConn, proc: Client) -> float:
    ev = run.cell.event
    if ev == "client_rst":
        # The rest of the VM's burst sits unread in the local client's receive buffer; SO_LINGER 0 resets anyway.
        run.note = f"{lc.unread()} bytes unread at the reset"
        t = time.monotonic()
        lc.reset()
        return t
    if ev == "helper_kill_after_local_close":
        lc.close()
        async with asyncio.timeout(20):
            await conn.got_eof.wait()  # the helper's EOF reached the VM; the VM holds on
        t = time.monotonic()
        proc.signal(signal.SIGKILL)
        return t
    t = time.monotonic()
    if ev == "client_fin":
        lc.close()
    elif ev == "client_kill":
        proc.signal(signal.SIGKILL)
    elif ev == "vm_fin":
        lc.pump(close_on_eof=True)  # a client that closes once the VM's stream ended
        conn.fin()
    elif ev == "vm_rst":
        lc.pump()
        conn.rst()
    elif ev == "vm_stops_reading":
        conn.stop_reading()
        lc.flood()
    elif ev == "vm_holds_after_eof":
        lc.pump()
        lc.shutdown_write()
    elif ev == "client_silent":
        proc.signal(signal.SIGSTOP)
    else:
        raise AssertionError(f"no such event {ev}")
    return t


async def forward_l(run: Run) -> float:
    gw, vm = run.gw, run.vm
    port = free_port()
    c = await run.client(*gw.ssh_argv("alice", "-v", "-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{port}:{TCP_VM}:{vm.port}"))
    # ssh -v prints "Local forwarding listening on ..." before bind() and listen(); the listener's channel
    # ("channel N: new port-listener") is made after them, so that line means a connect will be accepted.
    await c.wait_err(rf"(?s)Local forwarding listening on 127\.0\.0\.1 port {port}\b.*?channel \d+: new port-listener")
    lc, conn = await stream_client(run, port)
    return await stream_event(run, lc, conn, c)


async def tunnel(run: Run) -> float:
    gw, vm = run.gw, run.vm
    c = await run.client(
        *BASTION, "tunnel", "--gateway", f"127.0.0.1:{gw.port}", "--vm", TCP_VM, "--port", str(vm.port),
        "--local", "127.0.0.1:0", "--ca-file", str(gw.ca_file), "--user", "alice", "--ssh-config", str(gw.ssh_config),
    )  # fmt: skip
    m = await c.wait_err(r"listening on 127\.0\.0\.1:(\d+)")
    lc, conn = await stream_client(run, int(m.group(1)))
    return await stream_event(run, lc, conn, c)


DRIVERS = {"pty": terminating, "exec": terminating, "sftp": terminating, "jump-W": jump_w, "forward-L": forward_l, "tunnel": tunnel}


def vm_mode(cell: Cell) -> tuple[str, bytes]:
    if cell.event in ("vm_holds_after_eof", "helper_kill_after_local_close"):
        return "hold", b""
    if cell.event == "client_rst":
        # -W: the VM sends to the stopped ssh (pile_up_unread). -L: ssh turns the local reset into an EOF (or EOF and close),
        # so the VM is one that closes after EOF. The tunnel: the helper passes the reset on, the VM holds.
        return {"jump-W": ("echo", b""), "forward-L": ("echo", b"b" * 200_000)}.get(cell.path, ("hold", b"b" * 200_000))
    return "echo", b""


ALARMS = ("loop_exception", "task_failed", "relay_close_timeout")


def check_output(logs: Any, capfd: pytest.CaptureFixture[str], problems: list[str]) -> None:
    """Only JSON lines from the daemon side: its log stream, and this process's own stdout and stderr."""
    lines = only_json(logs.getvalue(), "the gateway's log stream")
    # A relay that could not close in time, a crashed task or an error a library logged: the gateway's fault.
    bad = [d["event"] for d in lines if d.get("event") in ALARMS or d.get("level") in ("error", "critical")]
    if bad:
        problems.append(f"the gateway logged {', '.join(bad)}")
    out, err = capfd.readouterr()
    only_json(out, "the test process's stdout")
    only_json(err, "the test process's stderr")


async def client_side_ended(run: Run, timeout: float = 10) -> None:
    """The user's side saw the end too: the client process exited, or the local connection was closed."""
    ev = run.cell.event
    if ev in ("client_kill", "client_rst", "client_silent", "helper_kill_after_local_close"):
        return  # killed or stopped by the test itself
    try:
        if run.cell.path in ("forward-L", "tunnel"):
            if ev != "client_fin":  # the local client is still there: its connection must have ended
                async with asyncio.timeout(timeout):
                    await run.locals[-1].ended
        elif run.connection is not None:
            async with asyncio.timeout(timeout):
                await run.connection.gone
        else:
            await run.clients[-1].exited(timeout)
    except TimeoutError:
        raise AssertionError(f"the session left the registry but the user's side was still connected {timeout:g}s later") from None


@pytest.mark.parametrize("cell", CELLS, ids=[f"{c.path}-{c.event}" for c in CELLS])
async def test_session_ends_with_its_connection(cell: Cell, make_gateway: GatewayFactory, capfd: pytest.CaptureFixture[str]) -> None:
    floor, bound, bound_text = cell.limit
    mode, burst = vm_mode(cell)
    vm = await TcpVM(mode, burst).start()
    seconds: float | None = None
    reason: Reason | None = None
    logs: Any = None
    run: Run | None = None
    problems: list[str] = []
    try:
        async with make_gateway(cell.edit(vm.port)) as gw:
            logs = gw.logs
            # Stopping the gateway at the end of this block is still under daemon_logging: it is checked too.
            with daemon_logging(gw.logs):
                run = Run(gw, cell, Events(gw.app.registry), vm)
                try:
                    event_at = await DRIVERS[cell.path](run)
                    assert run.session is not None and run.live is not None
                    try:
                        reason, closed_at = await run.events.closed(run.session.id, bound + STALL + 10)
                    except TimeoutError:
                        raise AssertionError(f"the session outlived its connection by more than {bound + STALL + 10:g}s") from None
                    seconds = closed_at - event_at
                    assert not gw.app.registry.list(), "a session was left behind"
                    [line] = [e for e in gw.logs.events("session_closed") if e["session_id"] == run.session.id]
                    assert line["reason"] == reason
                    if cell.event == "vm_stops_reading":
                        # Input still moved while the buffers on the way filled; the idle limit counts from the last of it.
                        moved, idle = run.live.last_input - event_at, closed_at - run.live.last_input
                        run.note = f"input moved for {moved:.2f}s after the event ({line['bytes_up']} bytes), then idle {idle:.2f}s"
                        if not floor <= idle <= bound:
                            problems.append(f"closed {idle:.2f}s after the last input, expected {floor:.2f}..{bound:.2f}s")
                        if seconds > bound + STALL:
                            problems.append(f"input kept moving for {moved:.2f}s into a VM that stopped reading")
                    await client_side_ended(run)
                    if vm.conns and vm.conns[-1].tcp_state() == "ESTABLISHED":
                        # No FIN, no RST: the gateway still holds its connection to the VM after the session ended.
                        problems.append("the gateway's connection to the VM is still ESTABLISHED after the session closed (no FIN, no RST)")
                finally:
                    await run.cleanup()
        check_output(logs, capfd, problems)
        if reason != cell.reason:
            problems.append(f"ended {reason}, expected {cell.reason}")
        if cell.event != "vm_stops_reading" and not floor <= seconds <= bound:
            problems.append(f"closed {seconds:.2f}s after the event, expected {floor:.2f}..{bound:.2f}s")
        assert not problems, "; ".join(problems)
    except AssertionError as exc:
        if not problems:
            problems.append(str(exc).splitlines()[0])
        raise
    finally:
        fails = [f"**FAIL: {p}**" for p in problems]
        note = "; ".join(x for x in (cell.note, run.note if run is not None else "", *fails) if x)
        ROWS.append(Row(cell.path, cell.event, cell.how, str(reason) if reason else "(none)", seconds, bound_text, note))
        await vm.stop()


TRIES = 12


async def test_orderly_exit_while_the_vm_talks_ends_on_the_user_side(
    make_gateway: GatewayFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    """`ssh` exits in order (SIGTERM: it writes SSH DISCONNECT "disconnected by user", then exits) while the VM
    floods it. Output was still arriving, so its kernel answers the next segment with RST. The user ended the
    session: client_closed when the gateway read the DISCONNECT first, client_lost when its next write met the
    RST before it read the DISCONNECT waiting on the socket (a known limit: the reset wins the race in the
    transport, and the encrypted DISCONNECT cannot be read after it). Never a VM reason, always at once."""
    cell = Cell("exec", "client_fin_busy", R.CLIENT_CLOSED, f"SIGTERM ssh while `yes` floods it ({TRIES} tries)")
    vm = await TcpVM().start()
    reasons: list[Reason] = []
    times: list[float] = []
    problems: list[str] = []
    logs: Any = None
    try:
        async with make_gateway(cell.edit(vm.port)) as gw:
            logs = gw.logs
            with daemon_logging(gw.logs):
                for _ in range(TRIES):
                    run = Run(gw, cell, Events(gw.app.registry), vm)
                    try:
                        c = await run.client(*gw.ssh_argv("alice+web01"), "echo READY; exec yes")
                        session = await run.opened("web01")
                        await c.wait_out(b"READY")
                        t = time.monotonic()
                        c.signal(signal.SIGTERM)
                        reason, closed_at = await run.events.closed(session.id, AT_ONCE + 10)
                        reasons.append(reason)
                        times.append(closed_at - t)
                        await c.exited(10)
                    finally:
                        await run.cleanup()
        check_output(logs, capfd, problems)
        wrong = [r for r in reasons if r not in (R.CLIENT_CLOSED, R.CLIENT_LOST)]
        if wrong:
            problems.append(f"{len(wrong)} of {TRIES} orderly exits ended {', '.join(sorted(set(wrong)))}")
        if max(times) > AT_ONCE:
            problems.append(f"closed {max(times):.2f}s after the event, expected at most {AT_ONCE:g}s")
        assert not problems, "; ".join(problems)
    finally:
        counts = ", ".join(f"{r} x{reasons.count(r)}" for r in sorted(set(reasons)))
        fails = "; ".join(f"**FAIL: {p}**" for p in problems)
        ROWS.append(Row(cell.path, cell.event, cell.how, counts or "(none)", max(times) if times else None, f"{AT_ONCE:g}s", fails))
        await vm.stop()
