"""`bastion sessions`, `bastion disconnect` and `bastion hash-token` against a running gateway."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

from tests.e2e.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, Gateway
from tests.e2e.test_control_api import Live

BASTION = [sys.executable, "-m", "gateway"]


async def cli(
    gw: Gateway,
    *args: str,
    token: str = OPERATOR_TOKEN,
    env_flags: bool = True,
    stdin: bytes = b"",
    extra_env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """Run the CLI with the URL and token in the environment (as an operator's shell would have them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    if env_flags:
        env |= {"BASTION_CONTROL_URL": gw.control_url, "BASTION_TOKEN": token}
    env |= extra_env or {}
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
        assert re.search(r"  terminating in (30|2\d)s$", table.splitlines()[1]), table
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
        *BASTION, "sessions", "--watch", "--interval", "0.5", "--ca-file", str(gw.ca_file), stdout=PIPE, stderr=PIPE, env=env
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            assert b"(no sessions)" in await proc.stdout.readuntil(b"(no sessions)")
        async with Live(gw) as live:
            async with asyncio.timeout(20):
                await proc.stdout.readuntil(live.id.encode())
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    assert proc.returncode == 0
    assert err == b""  # Ctrl-C is how --watch ends: no traceback, no message


def one_line_error(rc: int, err: str) -> str:
    """The CLI's error contract: a non-zero status and exactly one line on stderr, no traceback."""
    assert rc != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


async def test_a_url_without_https_is_one_line_error(gw: Gateway) -> None:
    """`--url 127.0.0.1:PORT` (no scheme) names the URL and the https:// it needs, in one line."""
    hostport = gw.control_url.removeprefix("https://")
    rc, out, err = await cli(gw, "sessions", "--url", hostport, "--ca-file", str(gw.ca_file))
    line = one_line_error(rc, err)
    assert rc == 1 and out == ""
    assert line.startswith("bastion: ") and repr(hostport) in line and "https://" in line


async def test_a_missing_ca_file_is_one_line_error(gw: Gateway, tmp_path: Path) -> None:
    """`--ca-file` naming no file, and BASTION_CA_FILE naming no file, each say which file is missing."""
    missing = tmp_path / "no-such-ca.pem"
    rc, _, err = await cli(gw, "sessions", "--ca-file", str(missing))
    assert one_line_error(rc, err) == f"bastion: CA file not found: '{missing}'"
    env = {"BASTION_CA_FILE": str(missing)}
    rc, _, err = await cli(gw, "sessions", extra_env=env)
    assert one_line_error(rc, err) == f"bastion: CA file not found: '{missing}'"


async def test_bastion_ca_file_verifies_the_control_port(gw: Gateway) -> None:
    """With BASTION_CONTROL_URL, BASTION_TOKEN and BASTION_CA_FILE set, no flag is needed."""
    rc, out, err = await cli(gw, "sessions", extra_env={"BASTION_CA_FILE": str(gw.ca_file)})
    assert (rc, err) == (0, "")
    assert "(no sessions)" in out


async def test_watch_into_a_closed_pipe_exits_cleanly(gw: Gateway) -> None:
    """`bastion sessions --watch | head -n 1`: once head has its line and exits, the next refresh meets a closed pipe
    and bastion exits 0 without a BrokenPipeError."""
    env = dict(os.environ) | {"BASTION_CONTROL_URL": gw.control_url, "BASTION_TOKEN": VIEWER_TOKEN}
    script = '"$@" | head -n 1; echo "bastion exited ${PIPESTATUS[0]}" >&2'
    argv = [*BASTION, "sessions", "--watch", "--interval", "0.5", "--ca-file", str(gw.ca_file)]
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, "pipeline", *argv, stdout=PIPE, stderr=PIPE, env=env, start_new_session=True
    )
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert out.decode().split() == ["ID", "USER", "VM", "SOURCE", "IP", "PROTOCOL", "STARTED", "DURATION", "UP", "DOWN", "STATE"]
    assert err.decode() == "bastion exited 0\n"


async def test_ctrl_c_during_a_request_exits_130_quietly(gw: Gateway) -> None:
    """SIGINT while the CLI waits for a control port that accepted the connection but never answers: exit 130,
    nothing printed, without waiting out the request's timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        silent.setblocking(False)
        url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        env = dict(os.environ) | {"BASTION_CONTROL_URL": url, "BASTION_TOKEN": OPERATOR_TOKEN}
        proc = await asyncio.create_subprocess_exec(*BASTION, "disconnect", "abc", "--insecure", stdout=PIPE, stderr=PIPE, env=env)
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(20):
                conn, _ = await loop.sock_accept(silent)  # the request is in flight now
            with conn:
                proc.send_signal(signal.SIGINT)
                async with asyncio.timeout(10):  # well inside the client's 15 s request timeout
                    out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert (proc.returncode, out, err) == (130, b"", b"")


async def test_interval_zero_or_negative_is_refused(gw: Gateway) -> None:
    """`--watch --interval 0` (or -1) is refused before any request, in one line naming the minimum."""
    for value in ("0", "-1", "nan"):
        rc, out, err = await cli(gw, "sessions", "--watch", f"--interval={value}", "--ca-file", str(gw.ca_file))
        line = one_line_error(rc, err)
        assert rc == 2 and out == ""
        assert "--interval" in line and "at least 0.5 seconds" in line and repr(value) in line
    assert not [e for e in gw.logs.events() if e.get("event") == "operator_action"]


async def test_a_bogus_protocol_filter_is_refused_with_the_known_ones(gw: Gateway) -> None:
    """`--protocol bogus` is an error listing every protocol the gateway knows (from its Protocol enum)."""
    from gateway.kinds import Protocol

    rc, out, err = await cli(gw, "sessions", "--protocol", "bogus", "--ca-file", str(gw.ca_file))
    line = one_line_error(rc, err)
    assert rc == 2 and out == ""
    assert "'bogus'" in line and all(repr(str(p)) in line for p in Protocol)


async def test_a_vm_filter_that_matched_nothing_warns(gw: Gateway) -> None:
    """`--vm web99` with no session to it prints the empty table and says on stderr that the name may be wrong."""
    async with Live(gw):
        rc, out, err = await cli(gw, "sessions", "--vm", "web99", "--ca-file", str(gw.ca_file))
        assert rc == 0
        assert "(no sessions)" in out
        assert err == "bastion: no session to VM 'web99' (is the name right?)\n"
        rc, out, err = await cli(gw, "sessions", "--vm", "web01", "--ca-file", str(gw.ca_file))
        assert rc == 0 and err == "" and "web01" in out


async def test_notice_reaches_the_session_named_and_reports_each_id(gw: Gateway) -> None:
    """`bastion notice TEXT --id ID --id GONE` writes the line into the live session and reports per id."""
    async with Live(gw) as live:
        rc, out, err = await cli(gw, "notice", "Patching at 18:00", "--id", live.id, "--id", "gone", "--ca-file", str(gw.ca_file))
        assert rc == 3, err  # not every id got it
        assert out.splitlines() == [f"{live.id}: delivered", "gone: not_found"]
        assert live.proc is not None and live.proc.stdin is not None
        live.proc.stdin.close()
        code, user_err = await live.finish()
        assert code == 0 and "Patching at 18:00" in user_err


async def test_notice_without_ids_tells_every_session(gw: Gateway) -> None:
    """`bastion notice TEXT` goes to every live session; a viewer may not send one."""
    async with Live(gw) as live:
        rc, out, err = await cli(gw, "notice", "Gateway restarts at noon", "--ca-file", str(gw.ca_file))
        assert (rc, out, err) == (0, f"{live.id}: delivered\n", "")
        rc, _, err = await cli(gw, "notice", "hi", "--ca-file", str(gw.ca_file), token=VIEWER_TOKEN)
        assert one_line_error(rc, err).startswith("bastion: 403")


async def test_nodes_on_one_node_without_a_cluster(gw: Gateway) -> None:
    """`bastion nodes` on a gateway without [cluster] shows it alone, with its live session count."""
    async with Live(gw):
        rc, out, err = await cli(gw, "nodes", "--ca-file", str(gw.ca_file), token=VIEWER_TOKEN)
        assert rc == 0, err
        header, row, note = out.splitlines()
        assert header.split() == ["NODE", "SESSIONS", "LAST", "HEARTBEAT", "AGE"]
        assert row.split()[1:3] == ["*", "1"] and note == "(one node, no [cluster])"
