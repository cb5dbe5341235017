"""A real RDP server (xrdp) as a VM and a real client (FreeRDP under Xvfb), following shared/recipes.

Only as root. Each run creates its own test login `bastion-rdp-<random>` (useradd; `userdel -r`
when the run ends, pass or fail) and runs xrdp-sesman, which needs the system's sesman port 3350
(xrdp 0.9 reads that port from the system file): so one xrdp per machine at a time, and runs
take turns through a lock file (a second run waits for the first instead of colliding).

Cleanup touches only what this run started: the xrdp and sesman PIDs it spawned, their
descendants, the members of the process sessions they lead, and the processes of this run's
own login (its X server, session script and xrdp-chansrv, which only this run's sessions
started). Signals go through pidfds after checking each process's start time, so a PID that
ended and was reused is never hit. Nothing is ended by name; no other account is looked at.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.peers import free_port, wait_port

# What xrdp 0.9.21 needs to run a desktop on Debian 12: the Xorg server sesman starts
# (sesman.ini [Xorg] param=/usr/lib/xorg/Xorg, package xserver-xorg-core), and xorgxrdp: the
# config sesman passes it (-config xrdp/xorg.conf) and the driver that config loads.
BACKEND = (Path("/usr/lib/xorg/Xorg"), Path("/etc/X11/xrdp/xorg.conf"), Path("/usr/lib/xorg/modules/drivers/xrdpdev_drv.so"))
SESMAN_PORT = 3350
LOCK = Path("/run/lock/bastion-xrdp-tests.lock")

# One full session in xrdp 0.9.21's log (Xorg session through libxup):
#   [20261201-20:16:28] [INFO ] login successful for user bastion-rdp-413d573a on display 10
#   [20261201-20:16:28] [INFO ] started connecting
#   [20261201-20:16:28] [INFO ] lib_mod_connect: connecting via UNIX socket
#   [20261201-20:16:28] [INFO ] lib_mod_log_peer: xrdp_pid=13193 connected to X11rdp_pid=13199 ...
#   [20261201-20:16:28] [INFO ] connected ok       <- the session's X server is up and xrdp is attached
# Without xorgxrdp xrdp's log stops at "connecting via UNIX socket" (for minutes); sesman's says why:
#   [ERROR] Error starting X server on display 10                      (no /usr/lib/xorg/Xorg)
#   [ERROR] There is no X server active on display 10                  (Xorg without xorgxrdp)
#   [ERROR] A fatal error has occurred attempting to start the X server on display 10, aborting connection
LOGIN_OK = "login successful for user {user} on display"  # then the display number
DESKTOP_UP = re.compile(r"\] connected ok$")
DESKTOP_FAILED = (
    "A fatal error has occurred",
    "Error starting X server",
    "There is no X server active",
    "connection problem, giving up",
    "Error connecting to user session",
    "login failed for user",
)


@dataclass(frozen=True)
class RdpAccount:
    """A login that exists only for this run, with a password only this run knows."""

    name: str
    password: str
    uid: int
    home: Path
    # Processes that already ran as this uid when the login was made (left by some earlier,
    # deleted account that had the same uid): not ours, never signalled.
    foreign: frozenset[tuple[int, int]] = frozenset()


def create_rdp_account() -> RdpAccount:
    name = f"bastion-rdp-{secrets.token_hex(4)}"
    password = f"Rdp-{secrets.token_urlsafe(12)}-9a!"
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True)
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True)
        home = Path(f"/home/{name}")
        # The session's foreground program dies with X, so a session never outlives its X server.
        script = home / "startwm.sh"
        script.write_text('#!/bin/sh\nexec xterm -geometry 60x6+10+10 -e sh -c "echo SESSION-UP; exec sleep 3600"\n')
        script.chmod(0o755)
        shutil.chown(script, name, name)
        uid = int(subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True).stdout)
    except BaseException:
        remove_rdp_account(name, None)
        raise
    foreign = frozenset((pid, p.start) for pid, p in _snapshot().items() if p.uid == uid)
    return RdpAccount(name, password, uid, home, foreign)


def remove_rdp_account(name: str, account: RdpAccount | None) -> None:
    """End the account's processes (all started by this run), then `userdel -r` it (home and mail too)."""
    if account is not None:
        _end(lambda: _collect([], account))
    result = subprocess.run(["userdel", "-r", name], capture_output=True, text=True, check=False)
    # 6: already gone; 12: home or mail spool not removable (useradd -m makes no spool), the login is gone.
    if result.returncode not in (0, 6, 12):
        raise RuntimeError(f"userdel -r {name} failed ({result.returncode}): {result.stderr.strip()}")


def _edit_ini(text: str, changes: dict[str, dict[str, str]]) -> str:
    """Set `key=value` inside the named [sections] of an xrdp ini file."""
    out, section = [], ""
    for raw in text.splitlines():
        line = raw
        m = re.match(r"^\[(.+)\]\s*$", raw)
        if m:
            section = m.group(1)
        else:
            key = raw.split("=", 1)[0].strip().lstrip("#")
            if "=" in raw and key in changes.get(section, {}):
                line = f"{key}={changes[section][key]}"
        out.append(line)
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class _Proc:
    ppid: int
    sid: int
    uid: int
    start: int  # start time in clock ticks since boot: with the PID, names one process for good
    zombie: bool


def _read_proc(pid: int) -> _Proc | None:
    entry = Path(f"/proc/{pid}")
    try:
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # [state, ppid, pgrp, session, ...]
        return _Proc(int(fields[1]), int(fields[3]), entry.stat().st_uid, int(fields[19]), fields[0] == "Z")
    except (OSError, IndexError, ValueError):
        return None


def _snapshot() -> dict[int, _Proc]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (proc := _read_proc(int(entry.name))) is not None:
            table[int(entry.name)] = proc
    return table


def _ours(table: dict[int, _Proc], roots: set[int], sids: set[int], account: RdpAccount) -> set[int]:
    """`roots` (our live Popen PIDs), members of the sessions they lead, processes of this run's own
    login, and every descendant of those; zombies have already ended and are left to their parents.

    Linux does not reuse a PID while it still names a session, so a live member of one of our
    sessions is ours; a process whose PID is one of `sids` but is not our live leader means the
    session ended and the number was reused, so that session is skipped. The login was created
    by this run, so its processes are ours (but for any that predate it: `account.foreign`)."""
    sids = {sid for sid in sids if sid in roots or sid not in table}
    found = {
        pid for pid, p in table.items() if pid in roots or p.sid in sids or (p.uid == account.uid and (pid, p.start) not in account.foreign)
    }
    children: dict[int, list[int]] = {}
    for pid, p in table.items():
        children.setdefault(p.ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid for pid in found if not table[pid].zombie}


def _signal(table: dict[int, _Proc], pids: set[int], sig: signal.Signals) -> list[int]:
    """Send `sig` through a pidfd to each process still the one in `table` (same start time), so a
    PID that ended and was reused by someone else is never signalled; returns the open pidfds."""
    fds = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # ended meanwhile
            continue
        now = _read_proc(pid)
        if now is None or now.start != table[pid].start:
            os.close(fd)
            continue
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, sig)
        fds.append(fd)
    return fds


def _wait_exit(fds: list[int], timeout: float) -> None:
    """Wait until every pidfd reports its process ended (readable), or `timeout`; closes them."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    left, deadline = set(fds), time.monotonic() + timeout
    try:
        while left and (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                left.discard(fd)
    finally:
        for fd in fds:
            os.close(fd)


def _collect(procs: list[subprocess.Popen[bytes]], account: RdpAccount) -> tuple[dict[int, _Proc], set[int]]:
    """This run's processes now: our Popens still running, the members of their sessions, the
    processes of this run's login, and all their descendants."""
    # poll() first: it reaps a Popen that ended, so the snapshot never shows our own leader as a
    # zombie (which would read as "that PID was reused" and hide the rest of its session).
    live = {p.pid for p in procs if p.poll() is None}
    table = _snapshot()
    return table, _ours(table, live, {p.pid for p in procs}, account)


def _end(collect: Callable[[], tuple[dict[int, _Proc], set[int]]], grace: float = 5.0) -> None:
    """TERM what `collect` finds and wait for it to end; collect again (sesman forks session
    children as it goes down) until nothing is left; after `grace`, the same with KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace
        while (found := collect())[1]:
            if time.monotonic() >= deadline:
                break
            _wait_exit(_signal(*found, sig), deadline - time.monotonic())
        else:
            return
    if left := collect()[1]:
        raise RuntimeError(f"xrdp test processes survived SIGKILL: {sorted(left)}")


def _stop_all(procs: list[subprocess.Popen[bytes]], account: RdpAccount) -> None:
    # sesman forks per-login sesman children (re-parented to init when sesman ends, but still in
    # its session), and xrdp-chansrv starts its own session as the login: see _collect.
    _end(lambda: _collect(procs, account))
    for p in procs:  # reap them (poll() above reaps too; a reaped PID is never signalled again)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


@dataclass
class XRDP:
    port: int
    log: Path
    sesman_log: Path
    account: RdpAccount

    @property
    def user(self) -> str:
        return self.account.name

    @property
    def password(self) -> str:
        return self.account.password


def _listening_inodes(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    found.add(cols[9])
    return found


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    return True
    return False


def _wait_sesman(sesman: subprocess.Popen[bytes], log: Path, timeout: float = 15) -> None:
    """Until our sesman holds the listener on port 3350 (it binds ::1 for ListenAddress=127.0.0.1).

    Not by connecting (sesman logs every probe as a failed login): by the socket in its fds. If
    it exits instead, the port is someone else's: our xrdp would log in through a sesman this run
    did not start, so refuse rather than mix sessions. Polls /proc like wait_port polls a port:
    sesman signals nothing when it listens."""
    deadline = time.monotonic() + timeout
    while not _holds_socket(sesman.pid, _listening_inodes(SESMAN_PORT)):
        if sesman.poll() is not None or time.monotonic() > deadline:
            holder = "another xrdp-sesman (a system xrdp, or another run?)" if _listening_inodes(SESMAN_PORT) else "nobody"
            raise RuntimeError(
                f"our xrdp-sesman is not listening on port {SESMAN_PORT} (rc {sesman.poll()}); it is held by {holder}. "
                f"The xrdp tests need that port. sesman's log:\n{_tail(log)}"
            )
        time.sleep(0.02)


@contextmanager
def _machine_lock() -> Iterator[None]:
    """Runs on one machine take turns: a second run blocks here until the first releases the lock
    (the kernel drops it when the holder exits, however it exits); pytest's timeout bounds the wait."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def running_xrdp(workdir: Path) -> Iterator[XRDP]:
    """xrdp + sesman with configs in `workdir` and a login of their own; everything ends with the block."""
    with _machine_lock():
        workdir.mkdir(parents=True, exist_ok=True)
        account = create_rdp_account()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            yield _start(workdir, account, procs)
        finally:
            try:
                _stop_all(procs, account)
            finally:
                remove_rdp_account(account.name, account)


def _start(workdir: Path, account: RdpAccount, procs: list[subprocess.Popen[bytes]]) -> XRDP:
    port = free_port()
    xrdp_ini = workdir / "xrdp.ini"
    sesman_ini = workdir / "sesman.ini"
    log = workdir / "xrdp.log"
    sesman_log = workdir / "sesman.log"
    xrdp_ini.write_text(
        _edit_ini(
            Path("/etc/xrdp/xrdp.ini").read_text(),
            {
                "Globals": {"port": f"tcp://127.0.0.1:{port}", "autorun": "Xorg"},
                "Logging": {"LogFile": str(log), "EnableSyslog": "false"},
                "Channels": dict.fromkeys(("rdpdr", "rdpsnd", "cliprdr", "rail", "xrdpvr", "tcutils"), "false"),
            },
        )
    )
    sesman_ini.write_text(
        _edit_ini(
            Path("/etc/xrdp/sesman.ini").read_text(),
            {
                "Globals": {"ListenAddress": "127.0.0.1"},
                "Sessions": {"Policy": "UBC", "KillDisconnected": "true"},
                "Logging": {"LogFile": str(sesman_log), "EnableSyslog": "false"},
                "ChansrvLogging": {"EnableSyslog": "false"},
            },
        )
    )
    for f in (log, sesman_log):
        f.touch()  # so a follower can start before the daemon writes its first line
    sockdir = Path("/run/xrdp/sockdir")
    sockdir.mkdir(parents=True, exist_ok=True)
    sockdir.chmod(0o1777)
    for argv in (["xrdp-sesman", "--nodaemon", "--config", str(sesman_ini)], ["xrdp", "--nodaemon", "--config", str(xrdp_ini)]):
        procs.append(subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    _wait_sesman(procs[0], sesman_log)
    wait_port("127.0.0.1", port, timeout=15)
    return XRDP(port=port, log=log, sesman_log=sesman_log, account=account)


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def desktop_failure(xrdp: XRDP, why: str) -> AssertionError:
    """The error for an RDP login that got no desktop: names the backend it needs, with the logs."""
    missing = [str(p) for p in BACKEND if not p.exists()]
    hint = "is xorgxrdp installed?" + (f" (missing: {', '.join(missing)}; run scripts/install-test-deps.sh)" if missing else "")
    xorg_logs = sorted(xrdp.account.home.glob(".xorgxrdp.*.log"))
    xorg = f"\n(Xorg log tail, {xorg_logs[-1]}:\n{_tail(xorg_logs[-1], 6)}\n)" if xorg_logs else ""
    return AssertionError(
        f"xrdp could not start a desktop: {hint} [{why}]\n"
        f"(xrdp log tail:\n{_tail(xrdp.log)}\n)\n(sesman log tail:\n{_tail(xrdp.sesman_log)}\n){xorg}"
    )


@contextlib.asynccontextmanager
async def follow_logs(xrdp: XRDP) -> AsyncIterator[asyncio.Queue[str]]:
    """The lines appended to xrdp's and sesman's logs from now on, as one queue.

    xrdp and sesman write from other processes, so each log is followed by a `tail -F` that
    starts at the byte the log has now (no line written meanwhile is lost); tails end by PID."""
    lines: asyncio.Queue[str] = asyncio.Queue()
    procs, pumps = [], []

    async def pump(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            await lines.put(line.decode(errors="replace").rstrip("\n"))

    try:
        for path in (xrdp.log, xrdp.sesman_log):
            start = path.stat().st_size + 1  # tail -c +N: from byte N, 1-based
            proc = await asyncio.create_subprocess_exec(
                "tail", "-F", "-c", f"+{start}", str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
            procs.append(proc)
            assert proc.stdout is not None
            pumps.append(asyncio.create_task(pump(proc.stdout)))
        yield lines
    finally:
        for task in pumps:
            task.cancel()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def wait_for_desktop(xrdp: XRDP, lines: asyncio.Queue[str], timeout: float = 40) -> str:
    """Read the logs (from `follow_logs`, entered before the client started) until xrdp logs
    `connected ok` after `login successful for user <this run's login> on display N`: the
    session's X server is up and xrdp is attached to it. Returns the login line.

    A failed login, or sesman failing to give display N an X server, fails at once with the logs
    and the backend it needs. (Failures on other displays, say an earlier +auth-only login's
    session, are not this session's; sesman may log display N's failure before xrdp logs the login.)"""
    login = re.compile(LOGIN_OK.format(user=re.escape(xrdp.user)) + r" (\d+)")
    display, login_line = "", ""
    failed: dict[str, str] = {}  # display -> sesman's first failure line for it
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = await lines.get()
                if not display and (m := login.search(line)):
                    display, login_line = m.group(1), line
                    if display in failed:
                        raise desktop_failure(xrdp, failed[display])
                elif display and DESKTOP_UP.search(line):
                    return login_line
                elif any(bad in line for bad in DESKTOP_FAILED):
                    on = re.search(r"display :?(\d+)", line)
                    if on is None:  # xrdp's own lines name no display: about the login in progress
                        raise desktop_failure(xrdp, line.strip())
                    failed.setdefault(on.group(1), line.strip())
                    if on.group(1) == display:
                        raise desktop_failure(xrdp, line.strip())
    except TimeoutError:
        stage = f"logged in on display {display}, xrdp never logged 'connected ok'" if display else "no 'login successful' in xrdp's log"
        raise desktop_failure(xrdp, f"{stage} within {timeout}s") from None


@contextmanager
def xvfb_display() -> Iterator[str]:
    """An Xvfb server of our own; yields its DISPLAY once Xvfb reports it ready (-displayfd)."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as ready:
            number = ready.readline().strip()  # written when the display accepts clients; EOF if Xvfb died
        if not number.isdigit():
            raise RuntimeError("Xvfb did not start")
        yield f":{number.decode()}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
