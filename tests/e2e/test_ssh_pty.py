"""An interactive shell through the gateway, driven like a person at a terminal."""

from __future__ import annotations

from tests.e2e.conftest import Gateway
from tests.support.terminal import Terminal

# The VM shell's prompt, set first thing. Typed as PS1='PTY''-READY$ ', so the echo of that line never
# matches: only the shell printing its prompt does. Each command is typed only once the prompt shows,
# as a person would: a line typed while the VM's tty is still handling Ctrl-C is flushed with it.
PROMPT = r"PTY-READY\$ "


async def test_interactive_shell_with_pty_resize_ctrl_c_and_exit_status(gw: Gateway) -> None:
    """A person opens a shell on web01: it has a TTY of their size, follows a window resize,
    Ctrl-C interrupts a command on the VM, and `exit 3` ends ssh with status 3."""
    term = Terminal(["ssh", "-tt", "-F", str(gw.ssh_config), "alice+web01@gw"], rows=30, cols=100)
    await term.start()
    try:
        term.send("PS1='PTY''-READY$ '; tty; stty size; echo MARK$((6*7))\r")
        await term.expect(r"/dev/pts/\d+")
        await term.expect(r"30 100")
        await term.expect(r"MARK42")
        await term.expect(PROMPT)
        [s] = gw.app.registry.list()
        assert (s.protocol, s.vm) == ("ssh", "web01")

        term.resize(50, 132)
        # The window-change travels ssh -> gateway -> VM asynchronously; ask until it shows.
        # Each try waits for the command's prompt before the next, so no typing lands mid-command.
        for _ in range(50):
            term.send("stty size\r")
            size = (await term.expect(r"(\d+ \d+)\r?\n")).group(1)  # the output: the echo has no digits
            await term.expect(PROMPT)
            if size == "50 132":
                break
        else:
            raise AssertionError("window size change never reached the VM")

        # STARTED is printed by the command itself, so when it shows, that process already holds the
        # tty's foreground (bash hands it over before the command runs) and Ctrl-C reaches it; with
        # `echo STARTED; sleep 30` the echo is bash's own, and a Ctrl-C sent before bash gave sleep
        # the tty would hit bash instead and leave sleep running.
        term.send("sh -c 'echo STAR\"\"TED; exec sleep 30'; echo not-interrupted\r")
        await term.expect(r"[\r\n]STARTED")  # the command's output, not the echo of what was typed
        term.send("\x03")
        await term.expect(PROMPT)  # the shell is back: sleep was interrupted and the tty is done with ^C
        term.send("echo RC=$?\r")
        await term.expect(r"[\r\n]RC=130")
        await term.expect(PROMPT)

        term.send("exit 3\r")
        assert await term.wait() == 3
    finally:
        term.close()
    assert "not-interrupted" not in term.buf.decode(errors="replace")
