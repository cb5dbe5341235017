"""Reload: a valid config applies without a restart (new users, rules, operators), an invalid one is refused with
every problem and changes nothing, and a live session the new rules no longer grant ends with a notice (or goes
on, with sessions.on_revoke = "continue"). The real daemon reloads on SIGHUP and tells systemd RELOADING=1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import socket
import tempfile
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Gateway, GatewayFactory, Keys, wait_for
from tests.e2e.test_daemon import BASTION, write_config
from tests.support.hostile import control, finish
from tests.support.peers import SSHD, free_port, make_key


async def live_cat(gw: Gateway, user: str = "alice+web01") -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*gw.ssh_argv(user), "cat", stdin=PIPE, stdout=PIPE, stderr=PIPE)
    await wait_for(lambda: bool(gw.app.registry.list()), gw.logs.changed, timeout=20)
    return proc


async def test_a_valid_reload_adds_a_user_without_a_restart(gw: Gateway, tmp_path: Path) -> None:
    """dave is added with a key and a rule; after the reload he logs in, alice's live session went on untouched,
    and one config_reloaded line says what was loaded."""
    dave = make_key(tmp_path / "dave")
    proc = await live_cat(gw)
    gw.raw["users"].append({"name": "dave", "keys": [dave.public], "groups": []})
    gw.raw["rules"].append({"users": ["dave"], "vms": ["web01"], "protocols": ["ssh"]})
    assert await gw.app.reload()
    [line] = gw.logs.events("config_reloaded")
    assert (line["users"], line["rules"], line["sessions_ended"]) == (4, 3, 0)
    r = await gw.run(*gw.ssh_argv_keys("dave+web01", dave.private), "echo", "hi")
    assert r.rc == 0 and r.text.strip() == "hi", r.errtext
    assert proc.returncode is None and len(gw.app.registry.list()) == 1
    assert proc.stdin is not None
    proc.stdin.close()
    rc, _ = await finish(proc)
    assert rc == 0


async def test_an_invalid_reload_changes_nothing_and_names_every_problem(gw: Gateway) -> None:
    """A reload with a bad key and an unknown VM in a rule is refused: both problems are logged with their key paths,
    and the running config (alice's access) is unchanged."""
    gw.raw["users"][0]["keys"] = ["ssh-ed25519 not-a-key"]
    gw.raw["rules"][0]["vms"].append("web99")
    assert not await gw.app.reload()
    [line] = gw.logs.events("config_reload_failed")
    assert any(p.startswith("users[0].keys[0]: not an OpenSSH public key") for p in line["problems"]), line
    assert any("rules[0].vms[2]: no such VM in the inventory: 'web99'" in p for p in line["problems"]), line
    assert not gw.logs.events("config_reloaded")
    assert (await gw.ssh("alice+web01", "true")).rc == 0


async def test_a_missing_file_is_a_failed_reload(gw: Gateway, tmp_path: Path) -> None:
    """A VM login key that does not exist is caught before anything changes (not at the next login)."""
    login = gw.vm.login
    gw.raw["vms"][0]["logins"][login]["key"] = str(tmp_path / "missing_key")
    assert not await gw.app.reload()
    [line] = gw.logs.events("config_reload_failed")
    assert "missing_key" in " ".join(line["problems"]), line
    assert (await gw.ssh("alice+web01", "true")).rc == 0


async def test_a_revoked_session_ends_with_a_notice(gw: Gateway) -> None:
    """alice's group loses its rule for web01 while she has a shell there: the reload ends that session with a notice
    she reads, the reason is access_revoked, and a new login is refused."""
    proc = await live_cat(gw)
    gw.raw["rules"] = [r for r in gw.raw["rules"] if r.get("groups") != ["ops"]]
    assert await gw.app.reload()
    rc, err = await finish(proc)
    assert rc == 255 and "no longer grants this session" in err, err
    await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed)
    assert gw.logs.events("session_closed")[0]["reason"] == "access_revoked"
    assert gw.logs.events("config_reloaded")[0]["sessions_ended"] == 1
    r = await gw.ssh("alice+web01", "true")
    assert r.rc != 0 and "does not exist or you may not reach it" in r.errtext


async def test_a_removed_user_loses_connections_and_a_removed_operator_its_token(gw: Gateway) -> None:
    """bob is removed: his idle gateway shell connection ends; the viewer operator is removed: its token gets 401."""
    from tests.e2e.conftest import VIEWER_TOKEN

    shell = await asyncio.create_subprocess_exec(
        *gw.ssh_argv_keys("bob", gw.keys.bob.private, opts=("-tt",)), stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    await wait_for(lambda: any(c.user == "bob" for c in gw.app.connections.list()), gw.logs.changed, timeout=20)
    assert (await control(gw, "GET", "/v1/sessions", token=VIEWER_TOKEN))[0] == 200
    gw.raw["users"] = [u for u in gw.raw["users"] if u["name"] != "bob"]
    gw.raw["rules"] = [r for r in gw.raw["rules"] if r.get("users") != ["bob"]]
    gw.raw["operators"] = [o for o in gw.raw["operators"] if o["role"] != "viewer"]
    assert await gw.app.reload()
    rc, err = await finish(shell)
    assert rc == 255 and "removed from the gateway's configuration" in err, err
    assert (await control(gw, "GET", "/v1/sessions", token=VIEWER_TOKEN))[0] == 401


async def test_on_revoke_continue_keeps_live_sessions(make_gateway: GatewayFactory) -> None:
    """With sessions.on_revoke = "continue" the revoked rule applies to new sessions only."""

    def edit(c: dict[str, Any]) -> None:
        c["sessions"] = {"on_revoke": "continue"}

    async with make_gateway(edit) as gw:
        proc = await live_cat(gw)
        gw.raw["rules"] = [r for r in gw.raw["rules"] if r.get("groups") != ["ops"]]
        assert await gw.app.reload()
        assert (await gw.ssh("alice+web01", "true")).rc != 0
        assert proc.returncode is None and len(gw.app.registry.list()) == 1
        assert proc.stdin is not None
        proc.stdin.close()
        rc, _ = await finish(proc)
        assert rc == 0


async def test_the_daemon_reloads_on_sighup_and_tells_systemd(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """`bastion serve` under a fake NOTIFY_SOCKET: SIGHUP after a config edit logs config_reloaded, sends RELOADING=1
    (with MONOTONIC_USEC) then READY=1, and the process keeps serving; a broken edit logs config_reload_failed and
    the process still serves. Nothing is written to stderr but JSON lines."""
    from tests.e2e.conftest import base_config

    data = base_config(tmp_path, keys, vm)
    port = free_port()
    data["public"]["listen"] = [f"127.0.0.1:{port}"]
    data["control"]["listen"] = [f"127.0.0.1:{free_port()}"]
    cfg = write_config(tmp_path, data)
    sock_dir = Path(tempfile.mkdtemp(prefix="bastion-notify-"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_dir / "notify"))
    notify.setblocking(False)
    env = {"NOTIFY_SOCKET": str(sock_dir / "notify"), "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(*BASTION, "serve", "--config", str(cfg), "--log-format", "json", stderr=PIPE, env=env)
    loop = asyncio.get_running_loop()
    lines: list[dict[str, Any]] = []

    async def until_event(name: str) -> dict[str, Any]:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while True:
                raw = await proc.stderr.readline()
                assert raw, "the daemon exited"
                d = json.loads(raw)
                lines.append(d)
                if d.get("event") == name:
                    return d

    async def datagram() -> str:
        async with asyncio.timeout(30):
            return (await loop.sock_recv(notify, 4096)).decode()

    try:
        await until_event("gateway_started")
        assert "READY=1" in await datagram()
        data["users"].append({"name": "erin", "keys": [keys.carol.public], "groups": []})
        data["operators"].append({"name": "new-op", "role": "viewer", "token_sha256": hashlib.sha256(b"x" * 40).hexdigest()})
        write_config(tmp_path, data)
        proc.send_signal(signal.SIGHUP)
        reloaded = await until_event("config_reloaded")
        assert reloaded["users"] == 4 and reloaded["operators"] == 3
        first = await datagram()
        assert first.startswith("RELOADING=1\nMONOTONIC_USEC="), first
        assert "READY=1" in await datagram()
        data["ssh"]["max_auth_tries"] = 0
        write_config(tmp_path, data)
        proc.send_signal(signal.SIGHUP)
        failed = await until_event("config_reload_failed")
        assert any("ssh.max_auth_tries" in p for p in failed["problems"])
        assert proc.returncode is None
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(64).startswith(b"SSH-2.0-Bastion")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        notify.close()
        for f in sock_dir.iterdir():
            f.unlink()
        sock_dir.rmdir()


async def test_reloaded_caps_apply_to_new_connections(gw: Gateway) -> None:
    """public.max_connections_per_source lowered to 2 by a reload: a third connection from 127.0.0.2 is closed at
    accept and counted, while alice from 127.0.0.1 still logs in."""
    from tests.support.hostile import close_all, closed_by_peer, open_from, refused

    gw.raw["public"]["max_connections_per_source"] = 2
    assert await gw.app.reload()
    held = []
    try:
        for _ in range(2):
            _, w = await open_from("127.0.0.2", gw.port)
            held.append(w)
        before = refused(gw, "max_connections_per_source")
        r, w = await open_from("127.0.0.2", gw.port)
        held.append(w)
        assert await closed_by_peer(r)
        assert refused(gw, "max_connections_per_source") == before + 1
        assert (await gw.ssh("alice+web01", "true")).rc == 0
    finally:
        close_all(held)
