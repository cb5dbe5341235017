"""`bastion demo`: the gateway, two demo VMs and a demo user on loopback, no config, no root.

The demo VMs are small SSH servers (asyncssh) that run a real shell as the
user who started the demo, with scp and sftp. They accept the gateway's
login key (terminating mode) and the demo user's key (jump mode, where the
user logs in to the VM end to end).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import pty
import secrets
import shlex
import shutil
import struct
import sys
import termios
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh

from gateway.app import App
from gateway.config import parse_config
from gateway.errors import ConfigError, StartupError
from gateway.logs import make_logger, quiet_libraries

VMS = ("web01", "web02")
LOGIN = "azureuser"


def _key(path: Path) -> asyncssh.SSHKey:
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment=path.name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        path.with_suffix(".pub").write_bytes(key.export_public_key())
    return asyncssh.read_private_key(path)


def _winsize(fd: int, size: tuple[int, int, int, int]) -> None:
    cols, rows, xpix, ypix = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows or 24, cols or 80, xpix, ypix))


def session_leader_on(tty_fd: int) -> Callable[[], None]:
    """For preexec_fn: a new session whose controlling terminal is `tty_fd`.

    uvloop runs preexec_fn before it moves the pipes onto 0, 1, 2, so the pty's own fd is used.
    """

    def child() -> None:
        os.setsid()
        fcntl.ioctl(tty_fd, termios.TIOCSCTTY, 0)

    return child


async def _feed(process: asyncssh.SSHServerProcess[bytes], sink: asyncio.StreamWriter) -> None:
    try:
        while data := await process.stdin.read(65536):
            sink.write(data)
            await sink.drain()
        sink.close()
    except (BrokenPipeError, ConnectionResetError, asyncssh.BreakReceived, asyncssh.SignalReceived, asyncssh.TerminalSizeChanged):
        pass


async def _drain(source: asyncio.StreamReader, sink: asyncssh.SSHWriter[bytes]) -> None:
    while data := await source.read(65536):
        sink.write(data)
        await sink.drain()


async def _vm_process(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """Run the request as a real local process: a shell on a PTY, or `sh -c COMMAND`."""
    shell = os.environ.get("SHELL") or "/bin/sh"
    env = dict(os.environ)
    env.update({k: v for k, v in process.env.items() if isinstance(k, str) and isinstance(v, str)})
    if process.term_type is None:
        argv = [shell, "-c", process.command] if process.command else [shell]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=os.path.expanduser("~"),
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        # Own pumps rather than process.redirect(): redirect raised when the command
        # exited before the client's EOF arrived, and the VM dropped the connection.
        feeder = asyncio.create_task(_feed(process, proc.stdin))
        try:
            await asyncio.gather(_drain(proc.stdout, process.stdout), _drain(proc.stderr, process.stderr))
            status = await proc.wait()
        finally:
            feeder.cancel()
        process.exit(status)
        return
    env["TERM"] = process.term_type
    master, slave = pty.openpty()
    _winsize(master, process.term_size)
    argv = [shell, "-c", process.command] if process.command else [shell, "-l"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=os.path.expanduser("~"),
        preexec_fn=session_leader_on(slave),
    )
    os.close(slave)
    loop = asyncio.get_running_loop()
    out_done = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(master, 65536)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(master)
            if not out_done.done():
                out_done.set_result(None)
            return
        process.stdout.write(data)

    loop.add_reader(master, readable)

    async def pump_in() -> None:
        while True:
            try:
                data = await process.stdin.read(65536)
            except asyncssh.TerminalSizeChanged as exc:
                _winsize(master, (exc.width, exc.height, exc.pixwidth, exc.pixheight))
                continue
            except asyncssh.BreakReceived:
                continue
            except asyncssh.SignalReceived:
                continue
            if not data:
                return
            os.write(master, data)

    pump = asyncio.create_task(pump_in())
    try:
        status = await proc.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await out_done
    finally:
        pump.cancel()
        loop.remove_reader(master)
        os.close(master)
    process.exit(status)


class _DemoSFTPServer(asyncssh.SFTPServer):
    """asyncssh's SFTP server, plus the exit status OpenSSH's sftp-server sends (scp needs it)."""

    def exit(self) -> None:
        super().exit()
        chan = self.channel
        if isinstance(chan, asyncssh.SSHServerChannel):
            chan.exit(0)


async def start_demo_vm(name: str, host_key: asyncssh.SSHKey, authorized: str) -> asyncssh.SSHAcceptor:
    return await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(authorized),
        process_factory=_vm_process,
        sftp_factory=_DemoSFTPServer,
        allow_scp=True,
        encoding=None,
        line_editor=False,
        password_auth=False,
        kbdint_auth=False,
        config=None,
    )


async def run_demo(stop: asyncio.Event, state_dir: str, port: int, control_port: int = 10444) -> int:
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = state / "keys"
    keys.mkdir(exist_ok=True, mode=0o700)
    alice = _key(keys / "alice")
    gw_login = _key(keys / "gateway-to-vm")
    authorized = "".join(k.export_public_key().decode() for k in (gw_login, alice))
    token_file = state / "operator.token"
    if not token_file.exists():
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    token = token_file.read_text().strip()
    vms: dict[str, tuple[asyncssh.SSHAcceptor, asyncssh.SSHKey]] = {}
    for name in VMS:
        hk = _key(keys / f"{name}-host")
        vms[name] = (await start_demo_vm(name, hk, authorized), hk)
    try:
        config: dict[str, Any] = {
            "gateway": {"node": "demo", "state_dir": str(state / "gateway")},
            "public": {"listen": [f"127.0.0.1:{port}"]},
            "control": {"listen": [f"127.0.0.1:{control_port}"]},
            "operators": [{"name": "demo-operator", "role": "operator", "token_sha256": hashlib.sha256(token.encode()).hexdigest()}],
            "ssh": {"max_startups": 20},
            "vms": [
                {
                    "name": name,
                    "address": "127.0.0.1",
                    "ssh_port": acc.get_port(),
                    "host_key": hk.export_public_key().decode().strip(),
                    "default_login": LOGIN,
                    "logins": {LOGIN: {"key": str(keys / "gateway-to-vm")}},
                }
                for name, (acc, hk) in vms.items()
            ],
            "users": [{"name": "alice", "keys": [alice.export_public_key().decode().strip()], "groups": ["ops"]}],
            "rules": [
                {
                    "groups": ["ops"],
                    "vms": ["*"],
                    "protocols": ["ssh", "ssh-jump"],
                    "logins": [LOGIN],
                    "ports": sorted(acc.get_port() for acc, _ in vms.values()),
                    "env": ["LANG", "LC_*"],
                },
            ],
        }
        try:
            cfg = parse_config(config)
        except ConfigError as exc:  # a bug in the demo itself
            print(f"bastion demo: {exc.message}", file=sys.stderr)
            return 1
        quiet_libraries()
        logfile = state / "gateway.log"
        with logfile.open("a") as logstream:
            app = App(cfg, make_logger(logstream, fmt="json", node="demo"))
            try:
                await app.start()
            except StartupError as exc:
                print(f"bastion demo: cannot start: {exc.message}", file=sys.stderr)
                return 1
            try:
                _write_client_files(state, port, app, vms)
                _print_howto(state, port, logfile, control_port)
                await stop.wait()
            finally:
                await app.stop()
        print("\nbastion demo: stopped.")
        return 0
    finally:
        for acc, _ in vms.values():
            acc.close()
            await acc.wait_closed()


def _write_client_files(state: Path, port: int, app: App, vms: dict[str, tuple[asyncssh.SSHAcceptor, asyncssh.SSHKey]]) -> None:
    kh = [f"[127.0.0.1]:{port} {k.export_public_key().decode().strip()}" for k in app.host_keys]
    kh += [f"[{name}]:{acc.get_port()} {hk.export_public_key().decode().strip()}" for name, (acc, hk) in vms.items()]
    (state / "known_hosts").write_text("\n".join(kh) + "\n")
    q = shlex.quote
    lines = [
        "# Written by `bastion demo`; rewritten at each start.",
        "Host bastion-demo",
        "  HostName 127.0.0.1",
        f"  Port {port}",
        f"  IdentityFile {q(str(state / 'keys' / 'alice'))}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {q(str(state / 'known_hosts'))}",
        "  StrictHostKeyChecking yes",
    ]
    for name, (acc, _) in vms.items():
        lines += [
            f"Host {name}",
            f"  Port {acc.get_port()}",
            f"  User {LOGIN}",
            "  ProxyJump alice@bastion-demo",
            f"  IdentityFile {q(str(state / 'keys' / 'alice'))}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {q(str(state / 'known_hosts'))}",
            "  StrictHostKeyChecking yes",
        ]
    (state / "ssh_config").write_text("\n".join(lines) + "\n")


def _print_howto(state: Path, port: int, logfile: Path, control_port: int) -> None:
    cfg = shlex.quote(str(state / "ssh_config"))
    bastion = shutil.which("bastion") or f"{sys.executable} -m gateway"
    ca = shlex.quote(str(state / "gateway" / "tls.crt"))
    tok = shlex.quote(str(state / "operator.token"))
    print(
        f"""Bastion demo is running on 127.0.0.1:{port} (SSH and HTTPS on one port). Ctrl-C stops everything.

Demo user alice, key {state / "keys" / "alice"}; demo VMs web01 and web02 (login {LOGIN}).
Try, in another terminal:

  ssh -F {cfg} alice+web01@bastion-demo                 # a shell on web01 through the gateway
  ssh -F {cfg} alice+web02@bastion-demo uname -a        # a command, with its exit status
  scp -F {cfg} /etc/hostname alice+web01@bastion-demo:/tmp/bastion-demo-copy
  sftp -F {cfg} alice+web01@bastion-demo
  ssh -F {cfg} web01                                    # jump mode (ssh -J) to web01
  ssh -F {cfg} -N -L 12222:web02:$(awk '/^Host web02/{{f=1}} f&&/Port/{{print $2; exit}}' {cfg}) alice@bastion-demo
  curl -k https://127.0.0.1:{port}/healthz               # the HTTPS door on the same port
  ssh -F {cfg} alice@bastion-demo web                   # a one-time link: a terminal in your browser
                                                        # (self-signed certificate: accept it once)

Operators (control port https://127.0.0.1:{control_port}, operator token in {state / "operator.token"}):

  export BASTION_CONTROL_URL=https://127.0.0.1:{control_port} BASTION_TOKEN="$(cat {tok})"
  {bastion} sessions --ca-file {ca}                 # add --watch to follow live
  {bastion} disconnect SESSION_ID --reason "demo over" --ca-file {ca}
  curl --cacert {ca} -H "Authorization: Bearer $BASTION_TOKEN" https://127.0.0.1:{control_port}/metrics
  Browser: https://127.0.0.1:{control_port}/ui (self-signed certificate; sign in with the token)

Without the config file:
  ssh -i {state / "keys" / "alice"} -o UserKnownHostsFile={state / "known_hosts"} -p {port} alice+web01@127.0.0.1

Gateway log (JSON lines, one session_closed per session): {logfile}
""",
        flush=True,
    )
