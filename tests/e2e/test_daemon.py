"""The real `bastion` command: check-config, serve, startup failures, and the log it writes."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import tomli_w

from tests.e2e.conftest import Keys, base_config
from tests.support.peers import SSHD, client_config, free_port, wait_port

BASTION = [sys.executable, "-m", "gateway"]


def write_config(tmp: Path, data: dict[str, Any]) -> Path:
    path = tmp / "bastion.toml"
    path.write_bytes(tomli_w.dumps(data).encode())
    return path


async def run(*argv: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_config_accepts_a_valid_file(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """`bastion check-config FILE` prints OK for a good config."""
    cfg = write_config(tmp_path, base_config(tmp_path, keys, vm))
    rc, out, _ = await run(*BASTION, "check-config", str(cfg))
    assert rc == 0
    assert out.startswith("OK: 3 VMs, 3 users, 2 rules")


async def test_check_config_names_every_problem(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """Every problem is printed with its key path and value, and the exit status is non-zero."""
    data = base_config(tmp_path, keys, vm)
    data["ssh"]["max_startup"] = 5  # typo
    data["vms"][0]["ssh_port"] = 70000
    data["rules"][0]["vms"].append("web99")
    cfg = write_config(tmp_path, data)
    rc, _, err = await run(*BASTION, "check-config", str(cfg))
    assert rc == 1
    assert "ssh.max_startup: unknown key" in err
    assert "vms[0].ssh_port: port must be 1-65535, got 70000" in err
    assert "rules[0].vms[2]: no such VM in the inventory: 'web99'" in err
    assert "3 problem(s) found" in err


async def test_serve_refuses_a_bad_config_without_starting(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """`serve` stops on the same problems before binding anything."""
    data = base_config(tmp_path, keys, vm)
    port = free_port()
    data["public"]["listen"] = [f"127.0.0.1:{port}"]
    data["vms"][0]["address"] = "not a host!"
    rc, _, err = await run(*BASTION, "serve", "--config", str(write_config(tmp_path, data)))
    assert rc == 2
    assert "vms[0].address: not an IP address or host name: 'not a host!'" in err
    assert "Traceback" not in err


async def test_port_in_use_is_a_clear_startup_error(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """A busy public port stops the daemon with the address and the reason, not a traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        data = base_config(tmp_path, keys, vm)
        data["public"]["listen"] = [f"127.0.0.1:{port}"]
        rc, _, err = await run(*BASTION, "serve", "--config", str(write_config(tmp_path, data)))
    assert rc == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in err
    assert "Traceback" not in err


async def test_missing_certificate_is_a_clear_startup_error(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """A configured TLS certificate that does not exist is named."""
    data = base_config(tmp_path, keys, vm)
    data["public"]["listen"] = [f"127.0.0.1:{free_port()}"]
    data["public"]["tls_cert"] = str(tmp_path / "missing.crt")
    data["public"]["tls_key"] = str(tmp_path / "missing.key")
    rc, _, err = await run(*BASTION, "serve", "--config", str(write_config(tmp_path, data)))
    assert rc == 1
    assert f"public.tls_cert: file not found: '{tmp_path / 'missing.crt'}'" in err
    assert "Traceback" not in err


async def test_unusable_vm_key_is_a_clear_startup_error(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """A VM login key that is not a private key is named with its config path."""
    junk = tmp_path / "junk_key"
    junk.write_text("not a key\n")
    data = base_config(tmp_path, keys, vm)
    data["public"]["listen"] = [f"127.0.0.1:{free_port()}"]
    data["vms"][1]["logins"][vm.login]["key"] = str(junk)
    rc, _, err = await run(*BASTION, "serve", "--config", str(write_config(tmp_path, data)))
    assert rc == 1
    assert f"vms[web02].logins.{vm.login}.key: not a usable private key" in err
    assert "Traceback" not in err


async def test_daemon_serves_ssh_and_logs_one_session_closed_line(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """The real daemon relays `ssh alice+web01@gw` and, after SIGTERM, its JSON log has one
    session_closed line with everything an auditor needs."""
    port = free_port()
    data = base_config(tmp_path, keys, vm)
    data["public"]["listen"] = [f"127.0.0.1:{port}"]
    cfg = write_config(tmp_path, data)
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*BASTION, "serve", "--config", str(cfg), "--log-format", "json", stderr=log)
        try:
            await asyncio.to_thread(wait_port, "127.0.0.1", port, 20)
            host_key = (tmp_path / "state" / "ssh_host_ed25519_key.pub").read_text().strip()
            kh = tmp_path / "known_hosts"
            kh.write_text(f"[127.0.0.1]:{port} {host_key}\n")
            ssh_cfg = client_config(tmp_path / "ssh_config", gw_port=port, identity=keys.alice.private, known_hosts=kh)
            rc, out, err = await run("ssh", "-F", str(ssh_cfg), "alice+web01@gw", "echo through-the-daemon")
            assert rc == 0, err
            assert out == "through-the-daemon\n"
        finally:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                status = await proc.wait()
    assert status == 0
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    [closed] = [e for e in events if e["event"] == "session_closed"]
    expected = {
        "session_id",
        "user",
        "source_ip",
        "source_port",
        "vm",
        "target_address",
        "target_port",
        "protocol",
        "login",
        "started_at",
        "bytes_up",
        "bytes_down",
        "node",
        "duration_s",
        "reason",
    }
    assert expected <= closed.keys()
    assert (closed["user"], closed["vm"], closed["protocol"], closed["node"]) == ("alice", "web01", "ssh", "test-node")
    assert closed["bytes_down"] > 0
    assert [e for e in events if e["event"] == "gateway_stopped"]


async def test_example_config_is_valid() -> None:
    """The documented example config passes check-config, so the docs cannot drift from the code."""
    example = Path(__file__).resolve().parents[2] / "config" / "example.toml"
    rc, out, err = await run(*BASTION, "check-config", str(example))
    assert rc == 0, err
    assert out.startswith("OK:")
