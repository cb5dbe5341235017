"""The real `bastion` command: check-config, serve, startup failures, and the log it writes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from tests.e2e.conftest import OPERATOR_TOKEN, Echo, Keys, base_config
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
    junk.chmod(0o600)  # a key others may read is refused before it is parsed (tests/hostile/test_file_modes.py)
    data = base_config(tmp_path, keys, vm)
    data["public"]["listen"] = [f"127.0.0.1:{free_port()}"]
    data["vms"][1]["logins"][vm.login]["key"] = str(junk)
    rc, _, err = await run(*BASTION, "serve", "--config", str(write_config(tmp_path, data)))
    assert rc == 1
    assert f"vms[web02].logins.{vm.login}.key: not a usable private key" in err
    assert "Traceback" not in err


# -- check-config and serve make the same file checks (gateway.app.preflight) ------------------------------------


def _missing_tls(tmp: Path, data: dict[str, Any]) -> None:
    data["public"] |= {"tls_cert": str(tmp / "missing.crt"), "tls_key": str(tmp / "missing.key")}


def _missing_keys(tmp: Path, data: dict[str, Any]) -> None:
    data["ssh"]["host_keys"] = [str(tmp / "missing_host_key")]
    data["vms"][0]["logins"][data["vms"][0]["default_login"]]["key"] = str(tmp / "missing_vm_key")


def _unprotected_vm_key(tmp: Path, data: dict[str, Any]) -> None:
    key = tmp / "open_vm_key"
    shutil.copy(data["vms"][1]["logins"][data["vms"][1]["default_login"]]["key"], key)
    key.chmod(0o644)
    data["vms"][1]["logins"][data["vms"][1]["default_login"]]["key"] = str(key)


def _junk_control_key_and_short_token_key(tmp: Path, data: dict[str, Any]) -> None:
    junk = tmp / "control.key"
    junk.write_text("not a key\n")
    junk.chmod(0o600)
    cert = tmp / "control.crt"
    cert.write_text("not a certificate\n")
    short = tmp / "token.key"
    short.write_bytes(b"0123456789")
    short.chmod(0o600)
    data["control"] |= {"tls_cert": str(cert), "tls_key": str(junk)}
    data["tunnel"] = {"token_key_file": str(short)}


def _open_state_dir_and_bad_locks(tmp: Path, data: dict[str, Any]) -> None:
    state = Path(data["gateway"]["state_dir"])
    state.mkdir(mode=0o700)
    state.chmod(0o755)
    (state / "locks.json").write_text("{not json")


def _missing_redis_password(tmp: Path, data: dict[str, Any]) -> None:
    data["cluster"] = {"redis_url": "redis://127.0.0.1:1/0", "password_file": str(tmp / "missing_redis_password")}


BROKEN: dict[str, Callable[[Path, dict[str, Any]], None]] = {
    "missing TLS certificate and key": _missing_tls,
    "missing host and VM login keys": _missing_keys,
    "VM login key others may read": _unprotected_vm_key,
    "junk control TLS files and a short token key": _junk_control_key_and_short_token_key,
    "state dir open to others and an unreadable locks file": _open_state_dir_and_bad_locks,
    "missing Redis password file": _missing_redis_password,
}


async def run_killed_after(timeout: float, *argv: str) -> tuple[int, str, str]:
    """Run a command that should exit by itself; if it does not within `timeout`, kill it and fail."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{argv[3]} did not exit: it accepted a broken config") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def check_and_serve(tmp: Path, data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The problems `check-config` lists and those `serve` refuses to start on, each without its prefix."""
    data["public"]["listen"] = [f"127.0.0.1:{free_port()}"]
    cfg = write_config(tmp, data)
    rc, _, check_err = await run_killed_after(60, *BASTION, "check-config", str(cfg))
    assert rc == 1 and "Traceback" not in check_err, check_err
    checked = [line.removeprefix(f"{cfg}: ") for line in check_err.splitlines() if line.startswith(f"{cfg}: ")]
    assert check_err.splitlines()[-1] == f"{len(checked)} problem(s) found"
    rc, _, serve_err = await run_killed_after(60, *BASTION, "serve", "--config", str(cfg), "--log-format", "json")
    assert rc == 1 and "Traceback" not in serve_err, serve_err
    refused = [
        line.removeprefix("bastion: cannot start: ") for line in serve_err.splitlines() if line.startswith("bastion: cannot start: ")
    ]
    return checked, refused


@pytest.mark.parametrize("case", BROKEN)
async def test_check_config_reports_every_problem_serve_refuses(tmp_path: Path, keys: Keys, vm: SSHD, case: str) -> None:
    """For a config naming broken files, `serve` refuses to start and `check-config` (which used to say OK) names
    every problem `serve` names."""
    data = base_config(tmp_path, keys, vm)
    BROKEN[case](tmp_path, data)
    checked, refused = await check_and_serve(tmp_path, data)
    assert refused, "serve named no problem"
    assert set(refused) <= set(checked)


async def test_check_config_lists_every_file_problem_at_once(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """With every breakage at once, check-config lists each of them in one run (and serve names them all, not only
    the first), without creating the state dir it checks."""
    data = base_config(tmp_path, keys, vm)
    for name, brk in BROKEN.items():
        if name != "state dir open to others and an unreadable locks file":  # it creates the state dir
            brk(tmp_path, data)
    checked, refused = await check_and_serve(tmp_path, data)
    assert not (tmp_path / "state").exists()
    login = data["vms"][0]["default_login"]
    expected = [
        f"public.tls_cert: file not found: '{tmp_path / 'missing.crt'}'",
        f"public.tls_key: file not found: '{tmp_path / 'missing.key'}'",
        f"ssh.host_keys[0]: file not found: '{tmp_path / 'missing_host_key'}'",
        f"vms[web01].logins.{login}.key: file not found: '{tmp_path / 'missing_vm_key'}'",
        f"vms[web02].logins.{data['vms'][1]['default_login']}.key: UNPROTECTED PRIVATE KEY FILE",
        f"cannot load TLS certificate '{tmp_path / 'control.crt'}'",
        f"tunnel.token_key_file: '{tmp_path / 'token.key'}' is shorter than 32 bytes",
        f"cluster.password_file: file not found: '{tmp_path / 'missing_redis_password'}'",
    ]
    for fragment in expected:
        assert [p for p in checked if p.startswith(fragment)], (fragment, checked)
    assert len(checked) == len(expected)
    assert refused == checked


async def test_check_config_checks_the_state_dir_serve_would_use(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """A state dir others may list and a locks file that does not parse are both named by check-config."""
    data = base_config(tmp_path, keys, vm)
    _open_state_dir_and_bad_locks(tmp_path, data)
    checked, _ = await check_and_serve(tmp_path, data)
    assert [p for p in checked if p.startswith("gateway.state_dir: state directory") and "mode 0755" in p], checked
    assert [p for p in checked if p.startswith("locks file") and "locks.json" in p], checked


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
    """The documented example config passes check-config, so the docs cannot drift from the code (its key and
    certificate paths are a real host's, so only the file itself is checked here)."""
    example = Path(__file__).resolve().parents[2] / "config" / "example.toml"
    rc, out, err = await run(*BASTION, "check-config", "--no-files", str(example))
    assert rc == 0, err
    assert out.startswith("OK:")


# -- the real daemon as a process: its JSON stderr, its ports, its signals --------------------------------


class Output:
    """Everything a child process writes to one pipe, collected as it arrives; `changed` fires on every chunk."""

    def __init__(self, stream: asyncio.StreamReader | None) -> None:
        self.buf = bytearray()
        self.changed = asyncio.Event()
        self.eof = False
        self._task = asyncio.create_task(self._pump(stream)) if stream is not None else None

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        try:
            while chunk := await stream.read(65536):
                self.buf.extend(chunk)
                self.changed.set()
        finally:
            self.eof = True
            self.changed.set()

    @property
    def text(self) -> str:
        return self.buf.decode(errors="replace")

    async def expect(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """Wait (bounded) until `pattern` shows up; a timeout shows what did arrive."""
        rx = re.compile(pattern)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self.changed.clear()
                    if m := rx.search(self.text):
                        return m
                    if self.eof:
                        raise AssertionError(f"{pattern!r} never came before EOF; got {self.text[-800:]!r}")
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"{pattern!r} did not come within {timeout}s; got {self.text[-800:]!r}") from None

    async def finished(self) -> None:
        if self._task is not None:
            async with asyncio.timeout(10):
                await self._task


class Child:
    """A client process (ssh, curl) whose stdout and stderr are collected; killed by its PID if still running."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = Output(proc.stdout)
        self.err = Output(proc.stderr)

    @classmethod
    async def start(cls, *argv: str, stdin: bool = False) -> Child:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def wait(self, timeout: float = 20) -> int:
        async with asyncio.timeout(timeout):
            rc = await self.proc.wait()
        await self.out.finished()
        await self.err.finished()
        return rc

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        await self.wait()


class Daemon:
    """`python -m gateway serve --config FILE --log-format json` as a child process.

    stderr is kept as the bytes the daemon wrote; `events()` reads what parses, `json_lines()` insists
    that every line parses. The ports come from the `gateway_started` line (the config listens on :0).
    """

    def __init__(self, proc: asyncio.subprocess.Process, tmp: Path, keys: Keys, vm: SSHD) -> None:
        self.proc = proc
        self.tmp = tmp
        self.keys = keys
        self.vm = vm
        self.stderr = Output(proc.stderr)
        self.stdout = Output(proc.stdout)
        self.public_port = 0
        self.control_port = 0
        self.ssh_config = tmp / "ssh_config"
        self.signalled_at: float | None = None
        self.exited_at: float | None = None
        self.children: list[Child] = []

    async def spawn(self, *argv: str, stdin: bool = False) -> Child:
        """Start a client (ssh, curl); one still running when the daemon's block ends is killed by its PID."""
        child = await Child.start(*argv, stdin=stdin)
        self.children.append(child)
        return child

    @property
    def ca_file(self) -> Path:
        return self.tmp / "state" / "tls.crt"

    @property
    def control_url(self) -> str:
        return f"https://127.0.0.1:{self.control_port}"

    def lines(self) -> list[str]:
        return self.stderr.text.splitlines()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.lines():
            with contextlib.suppress(ValueError):
                d = json.loads(line)
                if isinstance(d, dict) and (name is None or d.get("event") == name):
                    out.append(d)
        return out

    def json_lines(self) -> list[dict[str, Any]]:
        """Every stderr line as JSON; fails naming each line that is not one JSON object."""
        bad: list[str] = []
        parsed: list[dict[str, Any]] = []
        for line in self.lines():
            try:
                d = json.loads(line)
            except ValueError:
                bad.append(line)
                continue
            if isinstance(d, dict):
                parsed.append(d)
            else:
                bad.append(line)
        assert not bad, f"{len(bad)} stderr line(s) are not JSON objects: {bad[:20]!r}"
        assert self.stderr.text.endswith("\n") or not self.stderr.text, "stderr ends in a partial line"
        return parsed

    async def wait_event(self, name: str, count: int = 1, timeout: float = 20) -> list[dict[str, Any]]:
        """Wait (bounded) until the log has `count` lines of event `name`."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self.stderr.changed.clear()
                    found = self.events(name)
                    if len(found) >= count:
                        return found
                    if self.stderr.eof:
                        raise AssertionError(f"the daemon exited before {count} {name!r}; stderr tail: {self.stderr.text[-2000:]}")
                    await self.stderr.changed.wait()
        except TimeoutError:
            raise AssertionError(f"{count} {name!r} not logged within {timeout}s; stderr tail: {self.stderr.text[-2000:]}") from None

    async def started(self, timeout: float = 30) -> None:
        """Wait for `gateway_started`, take the ports from it, and write the clients' known_hosts and ssh_config."""
        [line, *_] = await self.wait_event("gateway_started", timeout=timeout)
        self.public_port = int(line["public"][0].rsplit(":", 1)[1])
        self.control_port = int(line["control"][0].rsplit(":", 1)[1])
        host_key = (self.tmp / "state" / "ssh_host_ed25519_key.pub").read_text().strip()
        kh = self.tmp / "known_hosts"
        kh.write_text(f"[127.0.0.1]:{self.public_port} {host_key}\n[web01]:{self.vm.port} {self.vm.host_key.public}\n")
        client_config(
            self.ssh_config, gw_port=self.public_port, identity=self.keys.alice.private, known_hosts=kh, jump_hosts={"web01": self.vm.port}
        )

    def ssh_argv(self, user: str, *args: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), f"{user}@gw", *args]

    def jump_argv(self, *command: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), "-J", "alice@gw", f"{self.vm.login}@web01", *command]

    async def get(self, path: str, *, token: str | None = None, port: int | None = None) -> tuple[int, Any]:
        """One HTTPS GET on the control port (or `port`), verifying the daemon's own certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = f"https://127.0.0.1:{port or self.control_port}{path}"
        async with aiohttp.ClientSession() as http, asyncio.timeout(10):
            async with http.get(url, headers=headers, ssl=ctx) as resp:
                text = await resp.text()
                try:
                    return resp.status, json.loads(text)
                except ValueError:
                    return resp.status, text

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.signalled_at = asyncio.get_running_loop().time()
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            rc = await self.proc.wait()
        self.exited_at = asyncio.get_running_loop().time()
        await self.stderr.finished()
        await self.stdout.finished()
        return rc

    @property
    def stop_seconds(self) -> float:
        assert self.signalled_at is not None and self.exited_at is not None
        return self.exited_at - self.signalled_at


@contextlib.asynccontextmanager
async def running_daemon(
    tmp: Path,
    keys: Keys,
    vm: SSHD,
    edit: Callable[[dict[str, Any]], None] | None = None,
    *,
    env: dict[str, str] | None = None,
    wait_started: bool = True,
) -> AsyncIterator[Daemon]:
    """Start the real daemon on loopback (ports :0 unless `edit` says otherwise); on exit it is gone, by its PID."""
    data = base_config(tmp, keys, vm)
    if edit is not None:
        edit(data)
    cfg = write_config(tmp, data)
    proc = await asyncio.create_subprocess_exec(
        *BASTION, "serve", "--config", str(cfg), "--log-format", "json",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    daemon = Daemon(proc, tmp, keys, vm)
    try:
        if wait_started:
            await daemon.started()
        yield daemon
    finally:
        for child in daemon.children:
            if child.proc.returncode is None:
                child.proc.kill()
            with contextlib.suppress(TimeoutError):
                await child.wait(10)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await daemon.stderr.finished()
        await daemon.stdout.finished()


# -- systemd notify ----------------------------------------------------------------------------------------


async def recv_notify(sock: socket.socket, timeout: float) -> str:
    async with asyncio.timeout(timeout):
        data = await asyncio.get_running_loop().sock_recv(sock, 4096)
    return data.decode()


async def test_systemd_notify_ready_watchdog_and_stopping(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """Under NOTIFY_SOCKET and WATCHDOG_USEC the daemon sends READY=1 once its ports accept connections,
    WATCHDOG=1 every half WATCHDOG_USEC, and STOPPING=1 when SIGTERM starts the drain."""
    sock_dir = Path(tempfile.mkdtemp(prefix="bastion-notify-", dir="/tmp"))  # short: sun_path holds 108 bytes
    public, control = free_port(), free_port()

    def edit(cfg: dict[str, Any]) -> None:
        cfg["public"]["listen"] = [f"127.0.0.1:{public}"]
        cfg["control"]["listen"] = [f"127.0.0.1:{control}"]

    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env |= {"NOTIFY_SOCKET": str(sock_dir / "notify"), "WATCHDOG_USEC": "1000000"}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
            rx.bind(str(sock_dir / "notify"))
            rx.setblocking(False)
            async with running_daemon(tmp_path, keys, vm, edit, env=env, wait_started=False) as d:
                first = await recv_notify(rx, 30)
                assert first.splitlines()[0] == "READY=1", first
                assert "STATUS=serving 1 public and 1 control listeners" in first.splitlines()
                # Ready means serving: both ports accept now, and the public one speaks SSH to a silent client.
                r, w = await asyncio.open_connection("127.0.0.1", public)
                async with asyncio.timeout(10):
                    assert (await r.readline()).startswith(b"SSH-2.0-")
                w.close()
                _, w = await asyncio.open_connection("127.0.0.1", control)
                w.close()
                received = [first]
                while sum(m.splitlines()[0] == "WATCHDOG=1" for m in received) < 2:
                    received.append(await recv_notify(rx, 5))  # every 0.5 s with WATCHDOG_USEC=1 s
                await d.started()
                d.signal(signal.SIGTERM)
                while not any(m.splitlines()[0] == "STOPPING=1" for m in received):
                    received.append(await recv_notify(rx, 10))
                assert await d.wait_exit(20) == 0
            states = [m.splitlines()[0] for m in received]
            assert states.count("READY=1") == 1 and states.index("READY=1") == 0
            assert set(states) == {"READY=1", "WATCHDOG=1", "STOPPING=1"}, states
            [stopping] = [m for m in received if m.startswith("STOPPING=1")]
            assert "STATUS=draining 0 sessions" in stopping.splitlines()
            d.json_lines()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


# -- clients that vanish: the log stays JSON lines ---------------------------------------------------------


def rst_abort(w: asyncio.StreamWriter) -> None:
    """Drop a connection with a TCP RST (SO_LINGER 0, then abort), as a crashed client or a middlebox would."""
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


class RawTLS:
    """A TLS client on a raw stream, for requests cut off mid-way; `abort()` resets the connection."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int, ca_file: Path) -> RawTLS:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        async with asyncio.timeout(10):
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.w.write(data)
        await self.w.drain()

    async def read_until(self, marker: bytes, timeout: float = 20) -> bytes:
        async with asyncio.timeout(timeout):
            while marker not in self.buf:
                chunk = await self.r.read(65536)
                assert chunk, f"EOF before {marker!r}; got {bytes(self.buf[-400:])!r}"
                self.buf.extend(chunk)
        head, _, rest = bytes(self.buf).partition(marker)
        self.buf[:] = rest
        return head + marker

    def abort(self) -> None:
        rst_abort(self.w)


def sse_request(token: str) -> bytes:
    return f"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()


def ws_frame(payload: bytes) -> bytes:
    """One masked binary WebSocket frame (client to server), payload under 126 bytes."""
    mask = os.urandom(4)
    return bytes([0x82, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def curl_events(d: Daemon) -> Child:
    """`curl -N` on /v1/events, returned once it has printed the first `snapshot` event."""
    c = await d.spawn(
        "curl", "-sS", "-N", "--http1.1", "--max-time", "120", "--cacert", str(d.ca_file),
        "-H", f"Authorization: Bearer {OPERATOR_TOKEN}", f"{d.control_url}/v1/events",
    )  # fmt: skip
    await c.out.expect(r"event: snapshot\ndata: \{.*\}\n\n")
    return c


async def raw_events(d: Daemon) -> RawTLS:
    s = await RawTLS.connect(d.control_port, d.ca_file)
    await s.send(sse_request(OPERATOR_TOKEN))
    head = await s.read_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    await s.read_until(b"event: snapshot\n")
    await s.read_until(b"\n\n")
    return s


async def test_vanishing_clients_leave_only_json_lines(tmp_path: Path, keys: Keys, vm: SSHD, echo: Echo) -> None:
    """20 event-stream clients dropped abruptly (curl SIGKILLed, raw TLS reset), some mid-stream while sessions
    open and close; a WebSocket tunnel reset mid-stream and one reset mid-upgrade; HTTPS requests and a TLS
    handshake reset mid-way. The daemon's stderr stays one JSON object per line, every stream is ended
    with its log line, and the daemon goes on serving."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["vms"].append({"name": "echo01", "address": "127.0.0.1", "ssh_port": 22, "trust_on_first_use": True})
        cfg["rules"].append({"groups": ["ops"], "vms": ["echo01"], "protocols": ["tcp"], "ports": [echo.port]})

    async with running_daemon(tmp_path, keys, vm, edit) as d:
        sessions_done = 0

        async def one_session() -> None:
            nonlocal sessions_done
            c = await d.spawn(*d.ssh_argv("alice+web01", "echo through"))
            assert await c.wait(30) == 0, c.err.text
            sessions_done += 1

        # 1. Eight clients read their snapshot and are dropped at once: four curls SIGKILLed, four raw resets.
        for _ in range(4):
            await (await curl_events(d)).kill()
            (await raw_events(d)).abort()

        # 2. Twelve clients drop mid-stream, while sessions open and close: each reads an event past the
        # snapshot first; the raw ones that stop reading are reset with unread events queued.
        curls = [await curl_events(d) for _ in range(6)]
        raws = [await raw_events(d) for _ in range(6)]
        await one_session()
        for c in curls[:3]:
            await c.out.expect(r"event: closed\n")
            await c.kill()
        for s in raws[:3]:
            await s.read_until(b"event: closed\n")
            s.abort()
        busy = [asyncio.create_task(one_session()) for _ in range(3)]
        for c in curls[3:]:
            await c.out.expect(r"event: opened\n")
            await c.kill()
        for s in raws[3:]:
            await s.read_until(b"event: opened\n")
            s.abort()  # the rest of the stream is still arriving, unread
        await asyncio.gather(*busy)

        # 3. A WebSocket tunnel reset mid-stream, one reset mid-upgrade, HTTPS reset mid-headers, TLS mid-handshake.
        fetch = await d.spawn(*d.ssh_argv("alice", "token"))
        assert await fetch.wait(30) == 0, fetch.err.text
        token = fetch.out.text.strip()
        upgrade = (
            f"GET /v1/tunnel?vm=echo01&port={echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{d.public_port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        ws = await RawTLS.connect(d.public_port, d.ca_file)
        await ws.send(upgrade)
        assert (await ws.read_until(b"\r\n\r\n")).startswith(b"HTTP/1.1 101"), "the tunnel was not upgraded"
        await ws.send(ws_frame(b"through the tunnel"))
        await ws.read_until(b"through the tunnel")  # echoed by the VM: the relay is live
        await d.wait_event("session_opened", sessions_done + 1)
        ws.abort()
        [tunnel] = [e for e in await d.wait_event("session_closed", sessions_done + 1) if e["protocol"] == "tcp"]
        assert tunnel["reason"] in ("client_lost", "client_closed"), tunnel
        cut = len(upgrade) // 2
        for port, partial in (
            (d.public_port, upgrade[:cut]),
            (d.public_port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: "),
            (d.control_port, b"GET /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bea"),
        ):
            s = await RawTLS.connect(port, d.ca_file)
            await s.send(partial)
            # A half-sent request gets no answer. A full request on the same port does: once it is answered, the
            # gateway's loop has had its turn at the partial bytes, which were queued on loopback before.
            assert (await d.get("/healthz", port=port))[0] == 200
            s.abort()
        for port in (d.public_port, d.control_port):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
            await w.drain()
            assert (await d.get("/healthz", port=port))[0] == 200  # as above: the gateway has seen the partial hello
            rst_abort(w)

        # Events after the drops make every server-side stream write to its dead client.
        await one_session()
        await one_session()
        await d.wait_event("event_stream_closed", 20)
        status, body = await d.get("/healthz")
        assert (status, body["status"]) == (200, "ok")
        status, body = await d.get("/healthz", port=d.public_port)
        assert (status, body["status"]) == (200, "ok")
        fresh = await raw_events(d)  # the 20 dropped streams gave their subscriptions back
        fresh.abort()
        r = await d.spawn(*d.ssh_argv("alice+web01", "echo still-serving"))
        assert await r.wait(30) == 0 and r.out.text == "still-serving\n"
        lines = d.json_lines()
        assert "Traceback" not in d.stderr.text
        assert not [e for e in lines if e.get("event") in ("loop_exception", "connection_failed", "log_record_failed")]
        d.signal(signal.SIGTERM)
        assert await d.wait_exit(20) == 0
    lines = d.json_lines()
    assert d.stdout.text == ""
    assert not [e for e in lines if e.get("level") in ("error", "critical")], [e for e in lines if e.get("level") == "error"]
    assert lines[-1]["event"] == "gateway_stopped"
