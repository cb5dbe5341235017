"""`bastion demo`: the product on loopback with no config, tried by running the very lines its banner prints.

One demo runs for the module (it starts three VMs, a web app and xrdp); each test runs the printed lines of one
feature through bash, with the banner's own `export` lines first, as a user pasting them would.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE

import aiohttp
import pytest

from tests.support.peers import free_port, wait_port
from tests.support.terminal import Terminal


def uncommented(line: str) -> str:
    """A printed line without its trailing `# comment`, to add arguments to it."""
    return re.sub(r"\s+#\s.*$", "", line)


@dataclass
class Demo:
    proc: subprocess.Popen[bytes]
    banner: str
    state: Path

    def line(self, start: str, contains: str = "") -> str:
        """The one printed command line that starts with `start` (and holds `contains`)."""
        found = [x.strip() for x in self.banner.splitlines() if x.strip().startswith(start) and contains in x]
        assert len(found) == 1, (start, contains, found)
        return found[0]

    @property
    def prelude(self) -> str:
        return "\n".join(x.strip() for x in self.banner.splitlines() if x.strip().startswith("export "))

    def bash(self, line: str) -> list[str]:
        return ["bash", "-c", f"{self.prelude}\n{line}"]

    async def run(self, line: str, stdin: bytes = b"", timeout: float = 60) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(
            *self.bash(line), stdin=PIPE, stdout=PIPE, stderr=PIPE, start_new_session=True
        )  # fmt: skip
        try:
            async with asyncio.timeout(timeout):
                out, err = await p.communicate(stdin)
        finally:
            if p.returncode is None:  # the line's whole process group (xvfb-run starts an Xvfb of its own)
                os.killpg(p.pid, signal.SIGKILL)
                await p.wait()
        assert p.returncode is not None
        return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    tmp = Path(tempfile.mkdtemp(prefix="bastion-demo-test-"))
    state = tmp / "state"
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "demo", "--state-dir", str(state), "--port", str(port), "--control-port", str(free_port())]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port("127.0.0.1", port, 60)
        assert proc.stdout is not None
        text = b""
        while b"Gateway log" not in text:  # printed right after the port listens; EOF ends it too
            chunk = proc.stdout.readline()
            assert chunk, f"the demo ended early: {proc.stderr.read().decode() if proc.stderr else ''}"
            text += chunk
        yield Demo(proc, text.decode(), state)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        assert proc.returncode == 0 and b"bastion demo: stopped." in rest, rest


async def test_the_banner_names_the_vms_their_login_and_puts_bastion_on_the_path(demo: Demo) -> None:
    """Three VMs with their own ports and homes, the invoking user as login, and `bastion` callable as printed."""
    for name in ("web01", "web02", "desk01"):
        assert re.search(rf"^  {name} +SSH on 127\.0\.0\.1:\d+ +home {re.escape(str(demo.state / 'vms' / name))}$", demo.banner, re.M)
    assert f"logging in as {getpass.getuser()}:" in demo.banner
    rc, out, _ = await demo.run("bastion --version")
    assert rc == 0 and out.startswith("bastion "), out


async def test_a_shell_on_web01_is_in_its_own_home_under_its_own_name(demo: Demo) -> None:
    """The printed `ssh ... alice+web01@bastion-demo` in a terminal: web01's banner, a prompt naming web01, its home."""
    term = Terminal(demo.bash(demo.line("ssh -F", "alice+web01@bastion-demo   ")))
    await term.start()
    try:
        await term.expect(r"Demo VM web01: a shell as")
        await term.expect(rf"{re.escape(getpass.getuser())}@web01:")
        term.send("pwd; exit\r")
        await term.expect(re.escape(str(demo.state / "vms" / "web01")))
        assert await term.wait() == 0
    finally:
        term.close()


async def test_a_command_on_web02_gives_its_home_and_exit_status(demo: Demo) -> None:
    """`ssh ... alice+web02@bastion-demo 'pwd; exit 3'`: web02's home (not web01's), exit status 3."""
    rc, out, err = await demo.run(demo.line("ssh -F", "alice+web02@bastion-demo"))
    assert (rc, out) == (3, f"{demo.state / 'vms' / 'web02'}\n"), err


async def test_scp_and_sftp_land_in_web01s_home(demo: Demo) -> None:
    """The printed scp puts /etc/hostname into web01's home; the printed sftp starts there and lists it."""
    rc, _, err = await demo.run(demo.line("scp -F"))
    assert rc == 0, err
    assert (demo.state / "vms" / "web01" / "copied-hostname").read_bytes() == Path("/etc/hostname").read_bytes()
    rc, out, err = await demo.run(demo.line("sftp -F"), stdin=b"pwd\nls\n")
    assert rc == 0, err
    assert f"Remote working directory: {demo.state / 'vms' / 'web01'}" in out and "copied-hostname" in out, out


async def test_jump_mode_reaches_the_vms_end_to_end(demo: Demo) -> None:
    """`ssh -J alice@bastion-demo web02 ...` runs on web02; `ssh -F CFG web01` (ProxyJump) reaches web01."""
    rc, out, err = await demo.run(demo.line("ssh -F", "-J alice@bastion-demo"))
    assert (rc, out) == (0, "web02\n"), err
    rc, out, err = await demo.run(demo.line("ssh -F", " web01   "), stdin=b"echo $BASTION_DEMO_VM\n")
    assert (rc, out) == (0, "web01\n"), err


async def test_ssh_L_forwards_to_desk01s_web_app(demo: Demo) -> None:
    """The printed `ssh -N -L ...` forward, then the printed curl: desk01's web app answers."""
    line = demo.line("ssh -F", "-N -L").replace("ssh -F", "ssh -v -F", 1)  # -v says when the forward listens
    fwd = await asyncio.create_subprocess_exec(*demo.bash("exec " + line), stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert fwd.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"Local forwarding listening on" not in (got := await fwd.stderr.readline()):
                assert got, "ssh -L ended before it listened"
        rc, out, _ = await demo.run(demo.line("curl http://", ":18080/"))
        assert rc == 0 and out.startswith("Hello from desk01"), out
    finally:
        fwd.terminate()
        await fwd.wait()


async def test_ls_lists_each_vms_own_ports_and_token_prints_one(demo: Demo) -> None:
    """`ls`: web01 lists only its own SSH port, desk01 also its app and RDP ports; `token` prints one token."""
    rc, out, err = await demo.run(demo.line("ssh -F", "bastion-demo ls"))
    assert rc == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    web01, web02 = (re.search(r"SSH on 127\.0\.0\.1:(\d+)", demo.line(n)) for n in ("web01", "web02"))
    assert web01 is not None and web02 is not None
    assert rows["web01"].endswith(f"ports {web01[1]}") and web02[1] not in rows["web01"], rows
    assert "rdp, tcp" in rows["desk01"], rows
    rc, out, err = await demo.run(demo.line("ssh -F", "bastion-demo token"))
    assert rc == 0 and len(out.split()) == 1 and len(out.strip()) > 40, (out, err)


async def test_bastion_tunnel_reaches_desk01s_web_app(demo: Demo) -> None:
    """The printed `bastion tunnel ...` (token over the config's alias), then the printed curl through it."""
    helper = await asyncio.create_subprocess_exec(
        *demo.bash("exec " + demo.line("bastion tunnel")), stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    assert helper.stderr is not None
    try:
        async with asyncio.timeout(30):
            assert b"listening on" in await helper.stderr.readline()
        rc, out, err = await demo.run(demo.line("curl http://", ":18081/"))
        assert rc == 0 and out.startswith("Hello from desk01"), (out, err)
    finally:
        helper.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            await helper.wait()


async def test_https_door_and_browser_link(demo: Demo) -> None:
    """The printed healthz curl answers on the SSH port; the printed `web` link signs a browser in once."""
    rc, out, err = await demo.run(demo.line("curl --cacert", "/healthz"))
    assert rc == 0 and '"status": "ok"' in out, (out, err)
    rc, out, err = await demo.run(demo.line("ssh -F", "bastion-demo web "))
    link = next(line for line in out.splitlines() if line.startswith("https://"))
    assert rc == 0 and "/login/link?t=" in link, (out, err)
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
        http.get(link, ssl=False, allow_redirects=False) as resp,
    ):
        assert resp.status == 303 and "bastion_session=" in resp.headers["Set-Cookie"]


def _xrdp_handshakes(demo: Demo) -> int:
    log = demo.state / "xrdp" / "xrdp.log"
    return log.read_text(errors="replace").count("TLS connection established") if log.exists() else 0


async def test_bastion_rdp_and_the_rdp_file_reach_desk01s_xrdp(demo: Demo) -> None:
    """`bastion rdp desk01 ...` and the .rdp file with xfreerdp each complete the RDP handshake with the demo's
    xrdp (FreeRDP's +auth-only, under Xvfb; xrdp logs the TLS connection)."""
    assert shutil.which("xfreerdp") and shutil.which("xvfb-run"), "scripts/install-test-deps.sh installs freerdp2-x11 and xvfb"
    headless = " +auth-only /u:demo /p:demo"
    before = _xrdp_handshakes(demo)
    rc, out, err = await demo.run("xvfb-run -a " + uncommented(demo.line("bastion rdp")) + headless)
    assert rc == 0, (out, err)
    assert _xrdp_handshakes(demo) == before + 1
    rc, _, err = await demo.run(demo.line("ssh -F", "rdp desk01 >"))
    assert rc == 0 and "gatewayaccesstoken:s:" in (demo.state / "desk01.rdp").read_text(), err
    rc, out, err = await demo.run("xvfb-run -a " + uncommented(demo.line("xfreerdp ")) + headless)
    assert rc == 0, (out, err)
    assert _xrdp_handshakes(demo) == before + 2


async def test_operator_commands_list_and_end_a_session(demo: Demo) -> None:
    """With the printed exports (BASTION_CA_FILE too, no --ca-file): `bastion sessions` and `connections` list a
    live shell, `bastion notice` reaches it, `bastion nodes` shows the demo node, `bastion disconnect` ends it and its
    user reads both [bastion] texts; the metrics curl answers."""
    user = await asyncio.create_subprocess_exec(
        *demo.bash(demo.line("ssh -F", "alice+web02@bastion-demo").replace("'pwd; exit 3'", "'echo up; sleep 60'")),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert user.stdout is not None
    try:
        async with asyncio.timeout(30):
            assert await user.stdout.readline() == b"up\n"
        rc, out, err = await demo.run(demo.line("bastion sessions"))
        assert rc == 0 and out.startswith("ID"), (out, err)
        [row] = [x for x in out.splitlines() if "web02" in x]
        rc, conns, err = await demo.run(demo.line("bastion connections"))
        assert rc == 0 and "alice" in conns, (conns, err)
        rc, out, err = await demo.run(demo.line("bastion notice"))
        assert rc == 0 and "delivered" in out, (out, err)
        rc, out, err = await demo.run(demo.line("bastion nodes"))
        assert rc == 0 and out.splitlines()[1].startswith("demo *"), (out, err)
        rc, out, err = await demo.run(demo.line("bastion disconnect").replace("SESSION_ID", shlex.quote(row.split()[0])))
        assert rc == 0, (out, err)
        async with asyncio.timeout(30):
            _, user_err = await user.communicate()
        assert "[bastion] The demo ends in a minute." in user_err.decode(), user_err
        assert "[bastion] You have been disconnected. demo over" in user_err.decode(), user_err
    finally:
        if user.returncode is None:
            user.kill()
            await user.wait()
    rc, out, _ = await demo.run(demo.line("curl --cacert", "/metrics"))
    assert rc == 0 and "bastion_sessions_ended_total" in out


def test_a_taken_fixed_port_falls_back_to_a_free_one() -> None:
    """The demo's fixed ports are used where free; a taken one gives a free port instead (the banner says which)."""
    from gateway.demo import free_or

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        got = free_or(taken)
        assert got != taken and got > 0
    spare = free_port()
    assert free_or(spare) == spare
