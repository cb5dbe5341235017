"""The real daemon drains on SIGTERM: not ready, no new connections, every user told, then `gateway_shutdown`.

Each test runs `python -m gateway serve` as a process with real OpenSSH clients (a shell in a PTY, a
command, `ssh -J`) against the sshd VM, and reads what users and the JSON log show.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.conftest import OPERATOR_TOKEN, Keys
from tests.e2e.test_daemon import Daemon, curl_events, running_daemon
from tests.support.peers import SSHD
from tests.support.terminal import Terminal

NOTICE = "The gateway is restarting: test upgrade."
GONE = re.escape(f"You have been disconnected. {NOTICE}")
# What ssh prints when the gateway's SSH connection ends with the notice as its disconnect message.
SSH_GONE = r"Received disconnect from 127\.0\.0\.1 port \d+:11: \[bastion\] " + GONE


def draining(grace: str) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["gateway"] |= {"shutdown_grace": grace, "shutdown_notice": NOTICE}

    return edit


def warning(seconds: int) -> str:
    return re.escape(f"{NOTICE} You will be disconnected in {seconds} seconds.")


async def shell(d: Daemon) -> Terminal:
    """`ssh -tt alice+web01@gw` holding a shell on the VM, returned once the shell answers."""
    term = Terminal(["ssh", "-tt", "-F", str(d.ssh_config), "alice+web01@gw"], rows=40, cols=220)
    await term.start()
    term.send("echo SHELL$((40+2))\r")
    await term.expect("SHELL42")
    return term


async def until_draining(d: Daemon, timeout: float = 3.0) -> tuple[list[int], dict[str, Any]]:
    """Poll /readyz from right after the signal until it answers 503 (bounded): (statuses seen, final body)."""
    seen: list[int] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                status, body = await d.get("/readyz")
                seen.append(status)
                if status != 200:
                    return seen, body
    except TimeoutError:
        raise AssertionError(f"/readyz never left 200 within {timeout}s of SIGTERM (answers: {seen})") from None


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


async def test_sigterm_drains_every_session_with_the_notice(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """SIGTERM with a shell, a command and a jump session live: /readyz says draining, new connections
    are refused while the control port answers; the terminal and command users read the notice with the
    grace, keep working, then read the disconnect; the jump user's ssh prints it; every session ends as
    gateway_shutdown after the grace; the daemon exits 0 having written only JSON lines."""
    async with running_daemon(tmp_path, keys, vm, draining("3s")) as d:
        assert await d.get("/readyz") == (200, {"status": "ready", "node": "test-node"})
        term = await shell(d)
        try:
            cmd = await d.spawn(*d.ssh_argv("alice+web01", "echo CMD-UP; sleep 60"))
            jump = await d.spawn(*d.jump_argv("echo JUMP-UP; sleep 60"))
            await cmd.out.expect("CMD-UP")
            await jump.out.expect("JUMP-UP")
            await d.wait_event("session_opened", 3)
            watcher = await curl_events(d)  # an operator watching the drain on the control port

            d.signal(signal.SIGTERM)
            seen, body = await until_draining(d)
            assert body == {"status": "draining", "node": "test-node"}
            assert all(s == 200 for s in seen[:-1]) and seen[-1] == 503, seen
            assert not d.events("gateway_stopped")

            # The grace: users are warned at once and go on working; new connections are refused.
            await term.expect(warning(3))
            await cmd.err.expect(warning(3))
            warned_at = asyncio.get_running_loop().time()
            assert refused(d.public_port)
            status, listed = await d.get("/v1/sessions", token=OPERATOR_TOKEN)
            assert status == 200 and len(listed["sessions"]) == 3  # the control port still serves the drain
            term.send("echo STILL$((1+1))\r")
            await term.expect("STILL2")

            await term.expect(GONE, timeout=15)
            gone_at = asyncio.get_running_loop().time()
            await term.expect(SSH_GONE, timeout=15)
            assert await term.wait() == 255
            assert await cmd.wait() == 255
            assert await jump.wait() == 255
            rc = await d.wait_exit(3 + 10)
            await watcher.wait()  # the stream ends when the control port closes, last
        finally:
            term.close()
    assert rc == 0
    ends = [json.loads(m) for m in re.findall(r"event: closed\ndata: (.*)\n", watcher.out.text)]
    assert sorted(e["session"]["protocol"] for e in ends) == ["ssh", "ssh", "ssh-jump"]
    assert {e["reason"] for e in ends} == {"gateway_shutdown"}, ends
    assert d.signalled_at is not None
    assert gone_at - d.signalled_at >= 2.5, "the session ended before its grace"
    assert gone_at - warned_at <= 5, "the session outlived its grace"
    print(f"drain: SIGTERM to exit {d.stop_seconds:.2f} s, to the disconnect notice {gone_at - d.signalled_at:.2f} s")

    assert re.search(warning(3) + ".*" + GONE, cmd.err.text, re.S), cmd.err.text
    assert re.search(SSH_GONE, cmd.err.text), cmd.err.text
    assert re.search(SSH_GONE, jump.err.text), jump.err.text  # the jump user gets the text as ssh's disconnect message

    lines = d.json_lines()
    events = [e["event"] for e in lines]
    closed = [e for e in lines if e["event"] == "session_closed"]
    assert sorted(e["protocol"] for e in closed) == ["ssh", "ssh", "ssh-jump"]
    assert {e["reason"] for e in closed} == {"gateway_shutdown"}, closed
    draining_at, stopped_at = events.index("gateway_draining"), events.index("gateway_stopped")
    assert lines[draining_at]["sessions"] == 3 and lines[draining_at]["grace_s"] == 3
    assert draining_at < min(i for i, e in enumerate(events) if e == "session_closed")
    assert max(i for i, e in enumerate(events) if e == "session_closed") < stopped_at == len(lines) - 1
    assert "gateway_drain_incomplete" not in events
    assert d.stop_seconds <= 3 + 10


async def test_sessions_that_end_during_the_drain_keep_their_own_reason(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """During the drain a shell user types `exit` and a jump user's command finishes: those sessions end
    as client_closed/vm_closed; the one still open after the grace ends as gateway_shutdown."""
    grace = 6  # room for both users to finish well inside it on a busy machine
    async with running_daemon(tmp_path, keys, vm, draining(f"{grace}s")) as d:
        term = await shell(d)
        try:
            [opened] = await d.wait_event("session_opened", 1)
            shell_id = opened["session_id"]
            jump = await d.spawn(*d.jump_argv("echo JUMP-UP; head -c 1 >/dev/null; echo JUMP-DONE"), stdin=True)
            await jump.out.expect("JUMP-UP")
            keeper = await d.spawn(*d.ssh_argv("alice+web01", "echo KEEP-UP; sleep 60"))
            await keeper.out.expect("KEEP-UP")
            opened_lines = await d.wait_event("session_opened", 3)
            keeper_id = next(e["session_id"] for e in opened_lines if e["session_id"] != shell_id and e["protocol"] == "ssh")

            d.signal(signal.SIGTERM)
            await d.wait_event("gateway_draining")
            await term.expect(warning(grace))
            term.send("exit 0\r")
            assert await term.wait() == 0
            assert jump.proc.stdin is not None
            jump.proc.stdin.write(b"x")
            await jump.proc.stdin.drain()
            await jump.out.expect("JUMP-DONE")
            assert await jump.wait() == 0
            ended_early = await d.wait_event("session_closed", 2)
            assert d.signalled_at is not None
            assert asyncio.get_running_loop().time() - d.signalled_at < grace, "the users' own ends came after the grace"
            assert {e["protocol"] for e in ended_early} == {"ssh", "ssh-jump"}
            assert await keeper.wait() == 255
            assert re.search(SSH_GONE, keeper.err.text), keeper.err.text
            assert await d.wait_exit(grace + 10) == 0
        finally:
            term.close()
    closed = {e["session_id"]: e for e in d.json_lines() if e["event"] == "session_closed"}
    assert len(closed) == 3
    assert closed[shell_id]["reason"] in ("client_closed", "vm_closed"), closed[shell_id]
    [jumped] = [e for e in closed.values() if e["protocol"] == "ssh-jump"]
    assert jumped["reason"] in ("client_closed", "vm_closed"), jumped
    assert closed[keeper_id]["reason"] == "gateway_shutdown", closed[keeper_id]
    print(f"drain with one session left: SIGTERM to exit {d.stop_seconds:.2f} s")


async def test_drain_ends_as_soon_as_the_last_session_does(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """With a long grace, a drain whose only user logs out after the warning does not wait out the grace."""
    async with running_daemon(tmp_path, keys, vm, draining("60s")) as d:
        term = await shell(d)
        try:
            d.signal(signal.SIGTERM)
            await term.expect(warning(60))
            term.send("exit 0\r")
            assert await term.wait() == 0
            assert await d.wait_exit(15) == 0
        finally:
            term.close()
    [closed] = [e for e in d.json_lines() if e["event"] == "session_closed"]
    assert closed["reason"] in ("client_closed", "vm_closed"), closed
    assert d.stop_seconds < 15
    print(f"drain ended by the last user: SIGTERM to exit {d.stop_seconds:.2f} s (grace 60 s)")
