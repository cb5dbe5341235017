"""Forced disconnects and notices as users see them, with the real OpenSSH client, many times in a row."""

from __future__ import annotations

import asyncio
from asyncio.subprocess import PIPE

from tests.e2e.conftest import Gateway
from tests.support.terminal import Terminal

REPEAT = 8


async def first_session_id(gw: Gateway, events: asyncio.Queue) -> str:  # type: ignore[type-arg]
    async with asyncio.timeout(20):
        ev = await events.get()
    assert ev is not None and ev.kind == "opened"
    return str(ev.session.id)


async def test_terminal_user_sees_the_notice_and_ssh_reports_it(gw: Gateway) -> None:
    """In a PTY shell, the user reads 'You have been disconnected. REASON' in the terminal, and ssh
    prints the same text as the disconnect message when it exits (repeated to catch races)."""
    for i in range(REPEAT):
        events = gw.app.registry.subscribe()
        term = Terminal(["ssh", "-tt", "-F", str(gw.ssh_config), "alice+web01@gw"])
        await term.start()
        try:
            sid = await first_session_id(gw, events)
            term.send("echo READY$((40+2))\r")
            await term.expect("READY42")
            reason = f"maintenance window {i}"
            assert gw.app.registry.terminate(sid, reason, 0.0)
            await term.expect(f"You have been disconnected. {reason}")
            await term.expect(rf"Received disconnect from 127\.0\.0\.1 port \d+:11: \[bastion\] You have been disconnected\. {reason}")
            assert await term.wait() == 255
            assert await gw.app.registry.wait_closed(sid, 5)
        finally:
            term.close()
            gw.app.registry.unsubscribe(events)
    closed = gw.logs.events("session_closed")
    assert len(closed) == REPEAT and all(e["reason"] == "terminated_by_operator" for e in closed)


async def disconnect_while_running(gw: Gateway, argv: list[str], reason: str, protocol: str) -> tuple[int, str]:
    """Start a real client, disconnect its session with `reason` once it opens, return (status, stderr)."""
    events = gw.app.registry.subscribe()
    proc = await asyncio.create_subprocess_exec(*argv, stdin=PIPE, stdout=PIPE, stderr=PIPE)
    try:
        sid = await first_session_id(gw, events)
        session = gw.app.registry.get(sid)
        assert session is not None and session.protocol == protocol
        gw.app.registry.terminate(sid, reason, 0.0)
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        gw.app.registry.unsubscribe(events)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_command_user_sees_the_notice_on_stderr(gw: Gateway) -> None:
    """Without a PTY (ssh HOST CMD) the notice goes to stderr, and ssh reports the disconnect text."""
    for i in range(REPEAT):
        rc, text = await disconnect_while_running(gw, [*gw.ssh_argv("alice+web01"), "sleep 60"], f"bye {i}", "ssh")
        assert f"You have been disconnected. bye {i}" in text
        assert f":11: [bastion] You have been disconnected. bye {i}" in text
        assert rc == 255


async def test_jump_user_sees_the_reason_in_the_disconnect_message(gw: Gateway) -> None:
    """In jump mode the inner SSH is end to end; the reason reaches the user as ssh's disconnect message."""
    argv = ["ssh", "-F", str(gw.ssh_config), "-J", "alice@gw", f"{gw.vm.login}@web01", "sleep 60"]
    for i in range(REPEAT):
        rc, text = await disconnect_while_running(gw, argv, f"jump bye {i}", "ssh-jump")
        assert f"You have been disconnected. jump bye {i}" in text
        assert rc == 255


async def test_grace_period_warns_then_disconnects(gw: Gateway) -> None:
    """With a grace period the terminal user is warned first and keeps working until it ends."""
    events = gw.app.registry.subscribe()
    term = Terminal(["ssh", "-tt", "-F", str(gw.ssh_config), "alice+web01@gw"])
    await term.start()
    try:
        sid = await first_session_id(gw, events)
        gw.app.registry.terminate(sid, "patching", 2.0)
        await term.expect("You will be disconnected in 2 seconds: patching")
        term.send("echo STILL$((1+1))\r")
        await term.expect("STILL2")
        assert gw.app.registry.get(sid) is not None
        await term.expect("You have been disconnected. patching")
        assert await term.wait() == 255
    finally:
        term.close()


async def test_notice_reaches_the_terminal_without_disconnecting(gw: Gateway) -> None:
    """A notice is written into a live terminal; the session goes on."""
    events = gw.app.registry.subscribe()
    term = Terminal(["ssh", "-tt", "-F", str(gw.ssh_config), "alice+web01@gw"])
    await term.start()
    try:
        sid = await first_session_id(gw, events)
        assert gw.app.registry.notify(sid, "Maintenance at 18:00 UTC") is True
        await term.expect("Maintenance at 18:00 UTC")
        term.send("echo ALIVE$((2+2))\r")
        await term.expect("ALIVE4")
        term.send("exit 0\r")
        assert await term.wait() == 0
    finally:
        term.close()
