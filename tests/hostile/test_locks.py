"""Locks as operators and users meet them: a live session and connection end with the lock's reason, new logins,
tokens and tunnels are refused with it while it holds, old tokens stay void after it is lifted, and it survives a
restart. Real `ssh`, the real control API, the `bastion lock` command."""

from __future__ import annotations

import asyncio
import ssl
import sys
from asyncio.subprocess import PIPE

import aiohttp

from gateway.app import App
from gateway.config import parse_config
from gateway.logs import make_logger
from tests.e2e.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, Gateway, GatewayFactory, LogLines, wait_for
from tests.support.hostile import control, finish, tracebacks


async def open_session(gw: Gateway, user: str = "alice+web01", *opts: str) -> tuple[asyncio.subprocess.Process, str]:
    """`ssh USER@gw cat`, held open; returns it once its session is in the registry."""
    sub = gw.app.registry.subscribe()
    proc = await asyncio.create_subprocess_exec(*gw.ssh_argv(user, *opts), "cat", stdin=PIPE, stdout=PIPE, stderr=PIPE)
    try:
        async with asyncio.timeout(20):
            while True:
                ev = await sub.get()
                if ev is not None and ev.kind == "opened":
                    return proc, ev.session.id
    finally:
        gw.app.registry.unsubscribe(sub)


async def test_user_lock_ends_live_access_and_refuses_new_logins(gw: Gateway) -> None:
    """alice has a shell session on web01 and a gateway-shell connection; an operator locks alice: both end and her
    ssh prints the reason; a new login is refused with it; bob is not touched; lifting the lock lets alice back in."""
    proc, sid = await open_session(gw)
    shell = await asyncio.create_subprocess_exec(*gw.ssh_argv("alice", "-tt"), stdin=PIPE, stdout=PIPE, stderr=PIPE)
    await wait_for(lambda: len(gw.app.connections.list()) == 2, gw.logs.changed)
    bob, _ = await open_session(gw, "bob+web01", "-i", str(gw.keys.bob.private))

    status, body = await control(gw, "POST", "/v1/locks", {"user": "alice", "reason": "laptop stolen", "expires": "2h"})
    assert status == 201, body
    assert body["lock"]["kind"] == "user" and body["lock"]["target"] == "alice" and body["lock"]["created_by"] == "noc"
    assert (body["sessions_ended"], body["connections_ended"]) == (1, 2)

    rc, err = await finish(proc)
    assert rc == 255 and "Access to your account is locked by an operator: laptop stolen." in err, err
    rc, err = await finish(shell)
    assert rc == 255 and "locked by an operator: laptop stolen" in err, err
    await wait_for(lambda: any(e.get("id") == sid or e.get("session_id") == sid for e in gw.logs.events("session_closed")), gw.logs.changed)
    [closed] = [e for e in gw.logs.events("session_closed") if e["user"] == "alice"]
    assert closed["reason"] == "locked"
    assert gw.app.registry.list() and all(s.user == "bob" for s in gw.app.registry.list())

    again = await gw.ssh("alice+web01", "true")
    assert again.rc == 255 and "access to your account is locked by an operator: laptop stolen" in again.errtext, again.errtext
    assert [e for e in gw.logs.events("login_refused") if e["reason"] == "locked"]

    status, listed = await control(gw, "GET", "/v1/locks", token=VIEWER_TOKEN)
    assert status == 200 and [lk["id"] for lk in listed["locks"]] == [body["lock"]["id"]]
    status, _ = await control(gw, "DELETE", f"/v1/locks/{body['lock']['id']}", token=VIEWER_TOKEN)
    assert status == 403
    status, lifted = await control(gw, "DELETE", f"/v1/locks/{body['lock']['id']}")
    assert status == 200 and lifted["lock"]["id"] == body["lock"]["id"]
    assert (await gw.ssh("alice+web01", "true")).rc == 0
    actions = [e["action"] for e in gw.logs.events("operator_action")]
    assert actions.count("lock") == 1 and actions.count("unlock") == 1
    bob.kill()
    await bob.wait()
    assert not tracebacks(gw)


async def test_vm_and_source_locks(gw: Gateway) -> None:
    """A VM lock refuses every user's sessions to that VM (and only after the policy check, so a stranger still reads
    'does not exist or you may not reach it'); a source lock refuses logins from that network only."""
    status, vm_lock = await control(gw, "POST", "/v1/locks", {"vm": "web01", "reason": "patching"})
    assert status == 201
    r = await gw.ssh("alice+web01", "true")
    assert r.rc != 0 and "access to VM 'web01' is locked by an operator: patching" in r.errtext, r.errtext
    r = await gw.ssh("alice+web02", "true")  # alice has no rule for web02: the lock is not what she learns
    assert r.rc != 0 and "does not exist or you may not reach it" in r.errtext and "locked" not in r.errtext
    await control(gw, "DELETE", f"/v1/locks/{vm_lock['lock']['id']}")

    status, src = await control(gw, "POST", "/v1/locks", {"source": "127.0.0.2", "reason": "scanner"})
    assert status == 201 and src["lock"]["target"] == "127.0.0.2/32"
    r = await gw.ssh("alice+web01", "true", opts=("-b", "127.0.0.2"))
    assert r.rc == 255 and "access to your network is locked by an operator: scanner" in r.errtext, r.errtext
    assert (await gw.ssh("alice+web01", "true")).rc == 0  # 127.0.0.1 is not locked
    assert not tracebacks(gw)


async def test_tokens_are_refused_while_locked_and_void_after(gw: Gateway) -> None:
    """A token fetched before a user lock is refused with the lock's reason while it holds, and stays void after the
    lock is lifted (the tunnel helper is told to fetch a new one); a token fetched after works."""
    old = (await gw.ssh("alice", "token")).text.strip()
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))

    async def tunnel_status(token: str) -> tuple[int, str]:
        url = f"https://127.0.0.1:{gw.port}/v1/tunnel?vm=web01&port={gw.vm.port}"
        async with aiohttp.ClientSession() as http, http.get(url, headers={"Authorization": f"Bearer {token}"}, ssl=ctx) as resp:
            return resp.status, (await resp.json())["message"]

    _, lock = await control(gw, "POST", "/v1/locks", {"user": "alice", "reason": "offboarding"})
    status, message = await tunnel_status(old)
    assert status == 403 and "locked by an operator: offboarding" in message
    await control(gw, "DELETE", f"/v1/locks/{lock['lock']['id']}")
    status, message = await tunnel_status(old)
    assert status == 401 and "revoked" in message
    new = (await gw.ssh("alice", "token")).text.strip()
    status, message = await tunnel_status(new)
    assert status != 401 and "revoked" not in message  # past the token check (no upgrade: refused later, as a bad request)
    assert not tracebacks(gw)


async def test_bad_lock_requests_get_400_naming_the_field(gw: Gateway) -> None:
    """Two targets, none, a bad CIDR, a past or malformed expiry, a non-string reason, an unknown field: 400, nothing stored."""
    for body, words in (
        ({"user": "alice", "vm": "web01"}, "exactly one of"),
        ({"reason": "x"}, "exactly one of"),
        ({"source": "10.0.0.0/33"}, "source: not an IP address or CIDR"),
        ({"user": "Alice!"}, "user: not a valid user name"),
        ({"user": "alice", "expires": "2001-01-01T00:00:00Z"}, "expires must be in the future"),
        ({"user": "alice", "expires": "soon"}, "expires: not a duration"),
        ({"user": "alice", "reason": 7}, "reason must be a string"),
        ({"user": "alice", "until": "1h"}, "unknown field: 'until'"),
    ):
        status, answer = await control(gw, "POST", "/v1/locks", body)
        assert status == 400 and words in answer["message"], (body, answer)
    status, listed = await control(gw, "GET", "/v1/locks")
    assert listed["locks"] == []


async def test_locks_survive_a_restart_and_the_cli_manages_them(make_gateway: GatewayFactory) -> None:
    """`bastion lock --user bob` through the control port; the gateway restarts on the same state dir and bob is still
    refused; `bastion locks` lists it and `bastion unlock` lifts it."""
    async with make_gateway() as gw:
        env_args = ["--url", gw.control_url, "--token", OPERATOR_TOKEN, "--ca-file", str(gw.ca_file)]
        r = await gw.run(sys.executable, "-m", "gateway", "lock", *env_args, "--user", "bob", "--reason", "audit")
        assert r.rc == 0 and "locked user bob (until lifted)" in r.text, r.errtext
        lock_id = r.text.split("lock ")[-1].split()[0]
        raw = gw.raw
    cfg = parse_config(raw)
    logs = LogLines()
    app = App(cfg, make_logger(logs, fmt="json", node=cfg.gateway.node))
    await app.start()
    try:
        [lk] = app.locks.list()
        assert (lk.id, lk.kind, lk.target, lk.reason) == (lock_id, "user", "bob", "audit")
        assert app.locks.match(user="bob") is not None
    finally:
        await app.stop()
    async with make_gateway() as gw:
        env_args = ["--url", gw.control_url, "--token", OPERATOR_TOKEN, "--ca-file", str(gw.ca_file)]
        r = await gw.ssh("bob+web01", "true", opts=("-i", str(gw.keys.bob.private)))
        assert r.rc == 255 and "locked by an operator: audit" in r.errtext
        r = await gw.run(sys.executable, "-m", "gateway", "locks", *env_args)
        assert r.rc == 0 and lock_id in r.text and "audit" in r.text
        r = await gw.run(sys.executable, "-m", "gateway", "unlock", *env_args, lock_id)
        assert r.rc == 0 and f"lifted lock {lock_id}" in r.text
        assert (await gw.ssh("bob+web01", "true", opts=("-i", str(gw.keys.bob.private)))).rc == 0
