"""`bastion demo`: the product on loopback with no config, tried the way its banner says."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp

from tests.support.peers import free_port, wait_port


async def test_demo_runs_the_commands_it_prints_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """The demo prints ssh commands; they work (shell command, scp, jump), and SIGINT stops it cleanly."""
    port = free_port()
    state = tmp_path / "demo-state"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", "--state-dir", str(state), "--port", str(port), "--control-port", str(free_port()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        await asyncio.to_thread(wait_port, "127.0.0.1", port, 30)
        async with asyncio.timeout(30):
            banner = (await proc.stdout.readuntil(b"Gateway log")).decode()
        cfg = str(state / "ssh_config")
        assert f"ssh -F {cfg} alice+web01@bastion-demo" in banner

        async def sh(*argv: str) -> tuple[int, str]:
            p = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            async with asyncio.timeout(30):
                out, _ = await p.communicate()
            assert p.returncode is not None
            return p.returncode, out.decode()

        assert await sh("ssh", "-F", cfg, "alice+web02@bastion-demo", "echo demo-ok; exit 4") == (4, "demo-ok\n")
        src = tmp_path / "payload"
        src.write_bytes(b"x" * 100_000)
        rc, out = await sh("scp", "-F", cfg, str(src), f"alice+web01@bastion-demo:{tmp_path / 'copied'}")
        assert rc == 0, out
        assert (tmp_path / "copied").read_bytes() == src.read_bytes()
        rc, out = await sh("ssh", "-F", cfg, "web01", "echo jumped")
        assert (rc, out) == (0, "jumped\n")
        # The browser path it prints: `ssh ... web` gives a one-time link that signs a browser in.
        assert f"ssh -F {cfg} alice@bastion-demo web" in banner
        rc, out = await sh("ssh", "-F", cfg, "alice@bastion-demo", "web")
        link = next(line for line in out.splitlines() if line.startswith("https://"))
        assert rc == 0 and f":{port}/login/link?t=" in link, out
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
            http.get(link.replace("bastion-demo", "127.0.0.1"), ssl=False, allow_redirects=False) as resp,
        ):
            assert resp.status == 303 and "bastion_session=" in resp.headers["Set-Cookie"]
        # The operator commands it prints work too.
        assert "sessions --ca-file" in banner
        token = (state / "operator.token").read_text().strip()
        control = banner.split("control port https://", 1)[1].split(",", 1)[0]
        env_cmd = ["env", f"BASTION_CONTROL_URL=https://{control}", f"BASTION_TOKEN={token}"]
        rc, out = await sh(*env_cmd, sys.executable, "-m", "gateway", "sessions", "--ca-file", str(state / "gateway" / "tls.crt"))
        assert rc == 0 and out.startswith("ID"), out
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            rest, _ = await proc.communicate()
    assert proc.returncode == 0
    assert b"bastion demo: stopped." in rest
