"""An interactive shell through the gateway, driven like a person at a terminal."""

from __future__ import annotations

from tests.e2e.conftest import Gateway
from tests.support.terminal import Terminal


async def test_interactive_shell_with_pty_resize_ctrl_c_and_exit_status(gw: Gateway) -> None:
    """A person opens a shell on web01: it has a TTY of their size, follows a window resize,
    Ctrl-C interrupts a command on the VM, and `exit 3` ends ssh with status 3."""
    term = Terminal(["ssh", "-tt", "-F", str(gw.ssh_config), "alice+web01@gw"], rows=30, cols=100)
    await term.start()
    try:
        term.send("PS1='$ '; tty; stty size; echo MARK$((6*7))\r")
        await term.expect(r"/dev/pts/\d+")
        await term.expect(r"30 100")
        await term.expect(r"MARK42")
        [s] = gw.app.registry.list()
        assert (s.protocol, s.vm) == ("ssh", "web01")

        term.resize(50, 132)
        # The window-change travels ssh -> gateway -> VM asynchronously; ask until it shows.
        for _ in range(50):
            term.send("stty size\r")
            try:
                await term.expect(r"50 132", timeout=0.5)
                break
            except AssertionError:
                continue
        else:
            raise AssertionError("window size change never reached the VM")

        term.send("echo STAR''TED; sleep 30; echo not-interrupted\r")
        await term.expect(r"[\r\n]STARTED")  # the command's output, not the echo of what was typed
        term.send("\x03")
        term.send("echo RC=$?\r")
        await term.expect(r"RC=130")

        term.send("exit 3\r")
        assert await term.wait() == 3
    finally:
        term.close()
    assert "not-interrupted" not in term.buf.decode(errors="replace")
