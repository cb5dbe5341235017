"""A real RDP server (xrdp) as a VM and a real client (FreeRDP under Xvfb), following shared/recipes.

Only as root: it creates the test login `bastion-rdp` (once) and runs xrdp-sesman, which
needs the system's sesman port 3350 (xrdp 0.9 reads that port from the system file), so one
xrdp per machine at a time. Every process started here is ended by PID, with its descendants.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.peers import free_port, wait_port

RDP_USER = "bastion-rdp"
RDP_PASSWORD = "Rdp-Test-Pass-123!"


def ensure_rdp_user() -> None:
    if subprocess.run(["id", RDP_USER], capture_output=True, check=False).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", RDP_USER], check=True)
    subprocess.run(["chpasswd"], input=f"{RDP_USER}:{RDP_PASSWORD}\n", text=True, check=True)
    home = Path(f"/home/{RDP_USER}")
    script = home / "startwm.sh"
    script.write_text('#!/bin/sh\nexec xterm -geometry 60x6+10+10 -e sh -c "echo SESSION-UP; exec sleep 3600"\n')
    script.chmod(0o755)
    shutil.chown(script, RDP_USER, RDP_USER)


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


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                child = int(entry.name)
                found += [child, *_descendants(child)]
    return found


def _in_sessions(sids: set[int]) -> list[int]:
    """Processes whose session is one we started (each Popen had start_new_session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                sid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[4])
            except (OSError, IndexError, ValueError):
                continue
            if sid in sids:
                found.append(int(entry.name))
    return found


def _owned_by(user: str) -> list[int]:
    """Processes of the test-only RDP login: every one of them was started by these tests."""
    try:
        uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True, check=True).stdout)
    except (subprocess.CalledProcessError, ValueError):
        return []
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _uid_of(e) == uid]


def _uid_of(entry: Path) -> int | None:
    try:
        for line in (entry / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _stop_tree(procs: list[subprocess.Popen[bytes]]) -> None:
    # sesman forks a per-login sesman that is re-parented to init, and xrdp-chansrv starts its own
    # session: walk our sessions, and every process of the test-only login, too.
    pids = [p.pid for p in procs] + _in_sessions({p.pid for p in procs}) + _owned_by(RDP_USER)
    for pid in list(pids):
        pids += _descendants(pid)
    pids = list(dict.fromkeys(pids))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    for pid in pids:  # a session's sesman child survives a TERM to its parent
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


@dataclass
class XRDP:
    port: int
    log: Path


@contextmanager
def running_xrdp(workdir: Path) -> Iterator[XRDP]:
    ensure_rdp_user()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    xrdp_ini = workdir / "xrdp.ini"
    sesman_ini = workdir / "sesman.ini"
    log = workdir / "xrdp.log"
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
                "Logging": {"LogFile": str(workdir / "sesman.log"), "EnableSyslog": "false"},
                "ChansrvLogging": {"EnableSyslog": "false"},
            },
        )
    )
    sockdir = Path("/run/xrdp/sockdir")
    sockdir.mkdir(parents=True, exist_ok=True)
    sockdir.chmod(0o1777)
    procs = [
        subprocess.Popen(
            ["xrdp-sesman", "--nodaemon", "--config", str(sesman_ini)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            ["xrdp", "--nodaemon", "--config", str(xrdp_ini)], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ),
    ]
    try:
        wait_port("127.0.0.1", port, timeout=15)
        yield XRDP(port=port, log=log)
    finally:
        _stop_tree(procs)


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
