"""Terminating SSH through the gateway with real OpenSSH clients and a real sshd VM."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
from asyncio.subprocess import PIPE
from collections import Counter
from pathlib import Path
from typing import Any

import asyncssh

from gateway.doors.ssh import GatewaySSHServer
from gateway.protocols import asyncssh_fast
from gateway.protocols.ssh_terminate import UserSide, VMSide
from gateway.sessions.registry import Session
from tests.e2e.conftest import Gateway, GatewayFactory, Keys, wait_for
from tests.support.peers import free_port, running_sshd


async def test_exec_passes_output_and_exit_status(gw: Gateway) -> None:
    """`ssh alice+web01@gw CMD` runs CMD on the VM; stdout, stderr and the exit code come back."""
    r = await gw.ssh("alice+web01", "echo out; echo err >&2; exit 7")
    assert r.rc == 7, r.errtext
    assert r.text == "out\n"
    assert "err\n" in r.errtext


async def test_at_sign_form_reaches_the_vm(gw: Gateway) -> None:
    """`ssh alice@web01@gw` (the PuTTY way) is the same as alice+web01."""
    r = await gw.run("ssh", "-F", str(gw.ssh_config), "-l", "alice@web01", "gw", "echo at-form")
    assert r.rc == 0, r.errtext
    assert r.text == "at-form\n"


async def test_login_chosen_in_user_name(gw: Gateway) -> None:
    """USER+VM+LOGIN picks a granted login; a login the rules do not grant is refused with a reason."""
    ok = await gw.ssh(f"alice+web01+{gw.vm.login}", "id -un")
    assert ok.rc == 0, ok.errtext
    assert ok.text.strip() == gw.vm.login
    denied = await gw.ssh("alice+web01+operator", "id -un")
    assert denied.rc == 255
    assert "login 'operator' is not available on VM 'web01'" in denied.errtext


async def test_stdin_and_eof_pass_through(gw: Gateway) -> None:
    """Input reaches the VM and EOF ends it: `wc -c` counts exactly what was sent."""
    payload = os.urandom(3 * 1024 * 1024)
    r = await gw.ssh("alice+web01", "wc -c", stdin=payload)
    assert r.rc == 0, r.errtext
    assert int(r.text.split()[0]) == len(payload)


async def test_allowed_env_passes_and_others_are_dropped(gw: Gateway) -> None:
    """Only variables the rule's `env` patterns allow reach the VM."""
    r = await gw.ssh(
        "alice+web01",
        'echo "[$LC_BASTION_T][$BASTION_SECRET]"',
        opts=("-o", "SetEnv=LC_BASTION_T=yes BASTION_SECRET=no"),
    )
    assert r.rc == 0, r.errtext
    assert r.text.strip() == "[yes][]"


async def test_scp_20mb_both_ways(gw: Gateway) -> None:
    """A 20 MB file survives scp up and down through the gateway byte for byte."""
    src = gw.tmp / "up.bin"
    data = os.urandom(20 * 1024 * 1024)
    src.write_bytes(data)
    remote = gw.tmp / "remote.bin"  # the VM is on this machine, so the remote path is local too
    cfg = str(gw.ssh_config)
    up = await gw.run("scp", "-F", cfg, str(src), f"alice+web01@gw:{remote}", timeout=120)
    assert up.rc == 0, up.errtext
    assert hashlib.sha256(remote.read_bytes()).digest() == hashlib.sha256(data).digest()
    back = gw.tmp / "down.bin"
    down = await gw.run("scp", "-F", cfg, f"alice+web01@gw:{remote}", str(back), timeout=120)
    assert down.rc == 0, down.errtext
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()


async def test_sftp_put_and_get(gw: Gateway) -> None:
    """sftp (a subsystem) works through the gateway: put, ls, get."""
    src = gw.tmp / "sftp-src.bin"
    src.write_bytes(os.urandom(1024 * 1024 + 17))
    remote = gw.tmp / "sftp-remote.bin"
    back = gw.tmp / "sftp-back.bin"
    batch = f"put {src} {remote}\nls -l {remote}\nget {remote} {back}\n".encode()
    r = await gw.run("sftp", "-F", str(gw.ssh_config), "-b", "-", "alice+web01@gw", stdin=batch)
    assert r.rc == 0, r.errtext
    assert back.read_bytes() == src.read_bytes()


async def test_registry_holds_the_session_while_it_runs(gw: Gateway) -> None:
    """While `cat` runs on the VM the registry shows who, from where, to which VM, and the bytes;
    when it ends, one session_closed line carries all of it plus duration and reason."""
    events = gw.app.registry.subscribe()
    proc = await asyncio.create_subprocess_exec(*gw.ssh_argv("alice+web01"), "cat", stdin=PIPE, stdout=PIPE, stderr=PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            opened = await events.get()
            assert opened is not None and opened.kind == "opened"
            proc.stdin.write(b"hello\n")
            await proc.stdin.drain()
            assert await proc.stdout.readline() == b"hello\n"
        [s] = gw.app.registry.list()
        assert (s.user, s.vm, s.protocol, s.login, s.node) == ("alice", "web01", "ssh", gw.vm.login, "test-node")
        assert s.source_ip == "127.0.0.1" and s.source_port > 0
        assert (s.target_address, s.target_port) == (gw.vm.host, gw.vm.port)
        assert s.bytes_up >= 6 and s.bytes_down >= 6
        assert gw.app.registry.get(s.id) == s
    finally:
        proc.stdin.close()
        async with asyncio.timeout(20):
            await proc.wait()
    async with asyncio.timeout(20):
        closed = await events.get()
    assert closed is not None and closed.kind == "closed"
    assert not gw.app.registry.list()
    [line] = [e for e in gw.logs.events("session_closed") if e["session_id"] == s.id]
    for key in ("user", "source_ip", "source_port", "vm", "target_address", "target_port", "protocol", "login", "started_at", "node"):
        assert line[key] == s.as_dict()[key if key != "session_id" else "id"], key
    assert line["bytes_up"] >= 6 and line["bytes_down"] >= 6
    assert line["duration_s"] >= 0
    assert line["reason"] == "vm_closed"  # the user only sent EOF; cat on the VM exited and closed the session


async def test_denied_vm_is_refused_without_saying_it_exists(gw: Gateway) -> None:
    """web02 exists but no rule grants it; the message is the same as for a VM that does not exist."""
    denied = await gw.ssh("alice+web02", "true")
    missing = await gw.ssh("alice+nosuchvm", "true")
    assert denied.rc == 255 and missing.rc == 255
    assert "VM 'web02' does not exist or you may not reach it" in denied.errtext
    assert "VM 'nosuchvm' does not exist or you may not reach it" in missing.errtext
    assert not gw.app.registry.list()


async def test_host_key_mismatch_refuses_and_logs_an_error(gw: Gateway) -> None:
    """bad01's inventory key is not the VM's: the user is told, an error is logged, nothing is relayed."""
    r = await gw.ssh("alice+bad01", "echo should-not-run")
    assert r.rc == 255
    assert "should-not-run" not in r.text
    assert "identity of VM 'bad01' could not be verified" in r.errtext
    errors = gw.logs.events("upstream_host_key_mismatch")
    assert errors and errors[0]["level"] == "error" and errors[0]["vm"] == "bad01"
    await wait_for(lambda: not gw.app.registry.list(), gw.logs.changed)


async def test_client_killed_mid_session_leaves_no_session_behind(gw: Gateway) -> None:
    """An ssh client that dies (SIGKILL) mid-command: the session leaves the registry and is logged."""
    events = gw.app.registry.subscribe()
    proc = await asyncio.create_subprocess_exec(*gw.ssh_argv("alice+web01"), "sleep 60", stdin=PIPE, stdout=PIPE, stderr=PIPE)
    try:
        async with asyncio.timeout(20):
            opened = await events.get()
        assert opened is not None and opened.kind == "opened"
    finally:
        proc.kill()
        await proc.wait()
    async with asyncio.timeout(20):
        closed = await events.get()
    assert closed is not None and closed.kind == "closed"
    assert closed.reason == "client_lost"  # the connection dropped without the SSH channel being closed
    assert not gw.app.registry.list()


async def test_command_without_vm_is_answered_by_the_gateway(gw: Gateway) -> None:
    """`ssh alice@gw CMD` names no VM: the gateway says how to name one and exits 2."""
    r = await gw.ssh("alice", "uptime")
    assert r.rc == 2
    assert "the gateway runs only `token`, `web`, `rdp VM` and `ls`; connect as alice+VM" in r.errtext


async def test_malformed_user_name_is_just_a_failed_login(gw: Gateway) -> None:
    """A user name the gateway cannot parse is denied like any unknown user; the gateway keeps serving."""
    r = await gw.ssh("alice+web01+root+extra", "true")
    assert r.rc == 255
    assert "Permission denied (publickey)" in r.errtext
    ok = await gw.ssh("alice+web01", "echo fine")
    assert ok.text == "fine\n"


async def test_unreachable_vm_is_reported_to_the_user(make_gateway: GatewayFactory) -> None:
    """A VM whose SSH port refuses connections: the user reads why, the failure is logged, no session stays."""
    dead = free_port()

    def edit(cfg: dict[str, Any]) -> None:
        down = dict(cfg["vms"][0]) | {"name": "down01", "ssh_port": dead}
        cfg["vms"].append(down)
        cfg["rules"][0]["vms"].append("down01")

    async with make_gateway(edit) as gw:
        r = await gw.ssh("alice+down01", "true")
        assert r.rc == 255
        assert "bastion: cannot reach VM 'down01': connection refused" in r.errtext
        [failed] = gw.logs.events("upstream_dial_failed")
        assert (failed["vm"], failed["reason"]) == ("down01", "upstream_refused")
        assert not gw.app.registry.list()


async def test_a_command_that_closes_its_output_early_runs_to_its_end(make_gateway: GatewayFactory) -> None:
    """`ssh host 'job > log 2>&1'`: the VM sends EOF at once and the job runs on. The half-close limit is for byte
    streams, so even a 1 s one does not cut the session: the exit status arrives and the session ends vm_closed."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["sessions"] = {"half_close_timeout": "1s"}

    async with make_gateway(edit) as gw:
        r = await gw.ssh("alice+web01", "exec >/dev/null 2>&1; sleep 3; exit 4", stdin=None)
        assert r.rc == 4, r.errtext
        await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed)
        [line] = gw.logs.events("session_closed")
        assert line["reason"] == "vm_closed" and line["duration_s"] >= 3


async def test_environment_per_channel_is_bounded(gw: Gateway) -> None:
    """A client that sends 200 env entries gets the first 64 through and the rest refused; the session works."""
    pairs = " ".join(f"LC_BASTION_{i:03d}=x" for i in range(200))
    r = await gw.ssh("alice+web01", "env | grep -c '^LC_BASTION_'", opts=("-o", f"SetEnv={pairs}"))
    assert r.rc == 0, r.errtext
    assert int(r.text.strip()) == 64


async def test_vm_leg_offers_only_the_configured_ciphers(make_gateway: GatewayFactory, keys: Keys, tmp_path: Path) -> None:
    """A VM that speaks only chacha20-poly1305 is reached with the default `ssh.vm_ciphers` (AES-GCM first, then
    chacha20) and refused with `vm_ciphers = ["aes128-gcm@openssh.com"]`: the list is what the gateway offers."""
    with running_sshd(tmp_path / "chacha-vm", [keys.gw_to_vm.public], extra="Ciphers chacha20-poly1305@openssh.com") as vm:

        def to_chacha_vm(cfg: dict[str, Any]) -> None:
            cfg["vms"][0] |= {"ssh_port": vm.port, "host_key": vm.host_key.public}

        async with make_gateway(to_chacha_vm) as gw:
            r = await gw.ssh("alice+web01", "echo reached")
            assert (r.rc, r.text) == (0, "reached\n"), r.errtext

        def aes_only(cfg: dict[str, Any]) -> None:
            to_chacha_vm(cfg)
            cfg["ssh"]["vm_ciphers"] = ["aes128-gcm@openssh.com"]

        async with make_gateway(aes_only) as gw:
            r = await gw.ssh("alice+web01", "echo reached")
            assert r.rc == 255
            assert "reached" not in r.text


async def test_bulk_both_ways_through_the_patched_receive_path(gw: Gateway) -> None:
    """The gateway runs asyncssh's receive path patched (`asyncssh_fast`): 32 MB of random bytes go up to the VM and
    come back through both asyncssh legs, many packets per read and packets split across reads, unchanged."""
    assert asyncssh_fast.applied()
    data = os.urandom(32 * 1024 * 1024)
    r = await gw.ssh("alice+web01", "cat", stdin=data, timeout=120)
    assert r.rc == 0, r.errtext
    assert hashlib.sha256(r.out).digest() == hashlib.sha256(data).digest()


async def _public_connections_done() -> None:
    """Until every public connection's task (the door's whole handling of it) has finished."""
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("conn-")]
    if tasks:
        async with asyncio.timeout(30):
            await asyncio.wait(tasks)


async def test_a_closed_session_leaves_no_reference_cycle(gw: Gateway) -> None:
    """With the collector off, a terminating session through real OpenSSH ends and its connection is done: none of its
    objects (the session, both sides, the door's server, the asyncssh connection and channel) is left as cyclic
    garbage, which at 9,000 sessions only a full collection, a stop of every relay, would free."""
    watched = (Session, UserSide, VMSide, GatewaySSHServer, asyncssh.SSHServerConnection, asyncssh.SSHServerChannel)
    first = await gw.ssh("alice+web01", "true")  # what the first session caches is not its garbage
    assert first.rc == 0, first.errtext
    await _public_connections_done()
    gc.collect()
    gc.disable()
    try:
        r = await gw.ssh("alice+web01", "echo once")
        assert r.rc == 0 and r.text == "once\n", r.errtext
        await _public_connections_done()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = Counter(type(o).__name__ for o in gc.garbage if isinstance(o, watched))
        assert not cyclic, cyclic
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
