"""`bastion sessions`, `bastion disconnect` and `bastion hash-token` against a running gateway."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from asyncio.subprocess import PIPE

from tests.e2e.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, Gateway
from tests.e2e.test_control_api import Live

BASTION = [sys.executable, "-m", "gateway"]


async def cli(gw: Gateway, *args: str, token: str = OPERATOR_TOKEN, env_flags: bool = True, stdin: bytes = b"") -> tuple[int, str, str]:
    """Run the CLI with the URL and token in the environment (as an operator's shell would have them)."""
    env = dict(os.environ)
    if env_flags:
        env |= {"BASTION_CONTROL_URL": gw.control_url, "BASTION_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(*BASTION, *args, stdin=PIPE, stdout=PIPE, stderr=PIPE, env=env)
    async with asyncio.timeout(30):
        out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_sessions_table_and_json(gw: Gateway) -> None:
    """`bastion sessions` prints a table with the live session; --json prints the API's rows."""
    async with Live(gw) as live:
        rc, out, err = await cli(gw, "sessions", "--ca-file", str(gw.ca_file), token=VIEWER_TOKEN)
        assert rc == 0, err
        header, row = out.splitlines()[:2]
        assert header.split() == ["ID", "USER", "VM", "SOURCE", "IP", "PROTOCOL", "STARTED", "DURATION", "UP", "DOWN", "STATE"]
        assert row.split()[:5] == [live.id, "alice", "web01", "127.0.0.1", "ssh"]
        assert row.split()[-1] == "active"
        rc, out, _ = await cli(gw, "sessions", "--json", "--vm", "web01", "--ca-file", str(gw.ca_file))
        assert rc == 0
        [item] = json.loads(out)
        assert item["id"] == live.id and item["user"] == "alice"


async def test_disconnect_reports_each_result_and_the_user_sees_the_reason(gw: Gateway) -> None:
    """`bastion disconnect ID MISSING --reason` reports per id; the session's user reads the reason."""
    async with Live(gw) as live:
        rc, out, err = await cli(gw, "disconnect", live.id, "nosuchid", "--reason", "cli test", "--ca-file", str(gw.ca_file))
        assert rc == 3, err  # not every id was disconnected
        assert out.splitlines() == [f"{live.id}: disconnected", "nosuchid: not_found"]
        code, user_err = await live.finish()
        assert code == 255 and "You have been disconnected. cli test" in user_err


async def test_a_second_disconnect_without_grace_ends_a_pending_one_with_its_reason(gw: Gateway) -> None:
    """`disconnect --grace 30`, then `disconnect --reason now`: the first answers pending with its end time and the
    list shows it terminating; the second ends the session at once, and the user reads the second reason."""
    async with Live(gw) as live:
        ca = str(gw.ca_file)
        rc, out, err = await cli(gw, "disconnect", live.id, "--grace", "30", "--reason", "in a while", "--ca-file", ca)
        assert rc == 0, err
        assert out.startswith(f"{live.id}: pending (ends at ") and out.strip().endswith("Z)")
        rc, table, _ = await cli(gw, "sessions", "--ca-file", ca)
        assert "terminating, ends " in table.splitlines()[1]
        rc, out, err = await cli(gw, "disconnect", live.id, "--reason", "now", "--ca-file", ca)
        assert (rc, out.strip()) == (0, f"{live.id}: disconnected"), err
        code, user_err = await live.finish()
        assert "You will be disconnected in 30 seconds: in a while" in user_err
        assert "You have been disconnected. now" in user_err and code == 255
        [closed] = [e for e in gw.logs.events("session_closed") if e["session_id"] == live.id]
        assert closed["reason"] == "terminated_by_operator" and closed["duration_s"] < 25


async def test_cli_verifies_the_certificate_and_explains_failures(gw: Gateway) -> None:
    """Without --ca-file the self-signed control certificate is rejected with a hint; a viewer cannot
    disconnect; a missing URL or token is named; --insecure is explicit."""
    rc, _, err = await cli(gw, "sessions")
    assert rc == 1 and "cannot verify the control port's certificate" in err and "--ca-file" in err
    rc, _, err = await cli(gw, "disconnect", "abc", "--ca-file", str(gw.ca_file), token=VIEWER_TOKEN)
    assert rc == 1 and err.startswith("bastion: 403")
    rc, _, err = await cli(gw, "sessions", env_flags=False)
    assert rc != 0 and "BASTION_CONTROL_URL" in err
    rc, out, _ = await cli(gw, "sessions", "--insecure", "--url", gw.control_url, "--token", VIEWER_TOKEN, env_flags=False)
    assert rc == 0 and "(no sessions)" in out


async def test_hash_token_prints_the_sha256(gw: Gateway) -> None:
    """`bastion hash-token` reads the token on stdin and prints the digest the config wants."""
    rc, out, _ = await cli(gw, "hash-token", stdin=b"a-long-enough-operator-token-123\n")
    assert rc == 0
    assert out.strip() == hashlib.sha256(b"a-long-enough-operator-token-123").hexdigest()


async def test_sessions_watch_refreshes_until_interrupted(gw: Gateway) -> None:
    """`bastion sessions --watch` redraws the table and a session that starts meanwhile appears; Ctrl-C ends it."""
    env = dict(os.environ) | {"BASTION_CONTROL_URL": gw.control_url, "BASTION_TOKEN": VIEWER_TOKEN}
    proc = await asyncio.create_subprocess_exec(
        *BASTION, "sessions", "--watch", "--interval", "0.2", "--ca-file", str(gw.ca_file), stdout=PIPE, stderr=PIPE, env=env
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            assert b"(no sessions)" in await proc.stdout.readuntil(b"(no sessions)")
        async with Live(gw) as live:
            async with asyncio.timeout(20):
                await proc.stdout.readuntil(live.id.encode())
    finally:
        proc.send_signal(2)
        async with asyncio.timeout(20):
            await proc.wait()
    assert proc.returncode == 0
