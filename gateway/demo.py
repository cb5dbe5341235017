"""`bastion demo`: the gateway, three demo VMs and a demo user on loopback, no config, no root.

The demo VMs are small SSH servers (asyncssh) run by the demo, each on its own fixed port where it is free.
They run a real shell, scp and sftp as the user who started the demo (without root nothing else is
honest: that is also the login the inventory names), but each in its own home directory under the state
dir (the working directory and $HOME of every session, the root of relative scp/sftp paths) and under its
own name (a banner and the prompt of a shell say which VM you are on). They accept the gateway's login key
(terminating mode) and the demo user's key (jump mode, where the user logs in to the VM end to end).
The third VM, desk01, also serves a small web app (granted as `tcp`, and to `ssh -L`) and, when xrdp is
installed, a real xrdp (granted as `rdp`) run as the same user with its own config and certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import getpass
import hashlib
import os
import pty
import re
import secrets
import shlex
import shutil
import socket
import struct
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
from aiohttp import web

from gateway.app import App
from gateway.config import parse_config
from gateway.errors import ConfigError, StartupError
from gateway.logs import make_logger, quiet_libraries
from gateway.net.tls import write_self_signed

# Fixed, documented ports (README "Try it"); a port that is taken falls back to a free one, and the banner says so.
VM_PORTS = {"web01": 10122, "web02": 10222, "desk01": 10322}
APP_PORT = 10380  # desk01's web app: `bastion tunnel` and `ssh -L` reach it
RDP_PORT = 10389  # desk01's xrdp, when xrdp is installed
FORWARD_PORT = 18080  # the local end of the printed `ssh -L`
TUNNEL_PORT = 18081  # the local end of the printed `bastion tunnel`
LOGIN = getpass.getuser()


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


@dataclass(frozen=True)
class VMIdentity:
    """What makes a demo VM look like its own machine without root: a name and a home directory."""

    name: str
    home: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        env.update(HOME=str(self.home), PWD=str(self.home), USER=LOGIN, LOGNAME=LOGIN, BASTION_DEMO_VM=self.name)
        env.pop("OLDPWD", None)
        return env

    def prepare(self) -> None:
        """The home directory, a shell startup file naming the VM in the prompt, and a file to look at."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.home / ".bashrc").write_text(
            f"# Written by `bastion demo`: the shell of demo VM {self.name} (HOME is {self.home}).\nPS1='{LOGIN}@{self.name}:\\w\\$ '\n"
        )
        (self.home / "README").write_text(f"This is the home directory of demo VM {self.name}.\n")

    def shell_argv(self, command: str | None, *, pty_shell: bool) -> list[str]:
        bash = shutil.which("bash")
        if command:
            return [bash or "/bin/sh", "-c", command]
        if bash and pty_shell:
            return [bash, "--rcfile", str(self.home / ".bashrc"), "-i"]
        return [bash or "/bin/sh"]

    def banner(self) -> str:
        return f"Demo VM {self.name}: a shell as {LOGIN} in {self.home} (the demo's stand-in for a private VM).\r\n"


async def _vm_process(vm: VMIdentity, process: asyncssh.SSHServerProcess[bytes]) -> None:
    """Run the request as a real local process in the VM's home: a shell on a PTY, or `sh -c COMMAND`."""
    env = vm.env(dict(os.environ))
    env.update({k: v for k, v in process.env.items() if isinstance(k, str) and isinstance(v, str)})
    if process.term_type is None:
        proc = await asyncio.create_subprocess_exec(
            *vm.shell_argv(process.command, pty_shell=False),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=vm.home,
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
    if not process.command:
        process.stdout.write(vm.banner().encode())
    master, slave = pty.openpty()
    _winsize(master, process.term_size)
    proc = await asyncio.create_subprocess_exec(
        *vm.shell_argv(process.command, pty_shell=True),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=vm.home,
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
    """asyncssh's SFTP server in the VM's home (relative paths start there), plus the exit status
    OpenSSH's sftp-server sends (scp needs it)."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], home: Path) -> None:
        super().__init__(chan)
        self._home = os.fsencode(home)

    def map_path(self, path: bytes) -> bytes:
        return path if path.startswith(b"/") else os.path.join(self._home, path)

    def exit(self) -> None:
        super().exit()
        chan = self.channel
        if isinstance(chan, asyncssh.SSHServerChannel):
            chan.exit(0)


async def start_demo_vm(vm: VMIdentity, port: int, host_key: asyncssh.SSHKey, authorized: str) -> asyncssh.SSHAcceptor:
    """The VM's SSH server on 127.0.0.1:`port` (0: any free port). Raises OSError when it cannot listen."""

    async def process(p: asyncssh.SSHServerProcess[bytes]) -> None:
        await _vm_process(vm, p)

    def sftp(chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
        return _DemoSFTPServer(chan, vm.home)

    return await asyncssh.listen(
        "127.0.0.1",
        port,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(authorized),
        process_factory=process,
        sftp_factory=sftp,
        allow_scp=True,
        encoding=None,
        line_editor=False,
        password_auth=False,
        kbdint_auth=False,
        config=None,
    )


def _taken(exc: OSError) -> bool:
    return exc.errno in (errno.EADDRINUSE, errno.EACCES)


def free_or(preferred: int) -> int:
    """`preferred` when it is free on 127.0.0.1, else a free port the kernel picks (for programs the demo starts)."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                if port == 0 or not _taken(exc):
                    raise
                continue
            return int(s.getsockname()[1])
    raise AssertionError("unreachable")


async def _web_app(name: str, port: int) -> tuple[web.AppRunner, int]:
    """desk01's small web app: one page that says where it runs, so a tunnel or a forward shows it."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"Hello from {name}'s web app (127.0.0.1:{port} on the VM side).\n")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, port


def _rsa_pair(cert: Path, key: Path, name: str) -> None:
    """A self-signed RSA pair for xrdp (0600 key), made once."""
    if not (cert.exists() and key.exists()):
        write_self_signed(cert, key, [name], rsa_key=True)


def _ini(text: str, changes: dict[str, str]) -> str:
    """Set `key=value` lines of xrdp.ini (the first section's keys are unique enough: port, certificate, ...)."""
    for k, v in changes.items():
        line = f"{k}={v}"
        text, n = re.subn(rf"(?m)^{re.escape(k)}=.*$", line.replace("\\", "\\\\"), text, count=1)
        if not n:
            text = text.replace("[Globals]\n", f"[Globals]\n{k}={v}\n", 1)
    return text


@dataclass
class XRDP:
    proc: asyncio.subprocess.Process
    port: int
    log: Path

    async def stop(self) -> None:
        """TERM, then KILL after 5 s. Without sesman xrdp starts no session processes of its own to collect."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def start_xrdp(workdir: Path, port: int) -> XRDP | None:
    """A real xrdp on 127.0.0.1:`port` as this user, with its own config, certificate and log; None without xrdp.

    No session manager: a login needs xrdp-sesman (root, one per machine), so a client reaches xrdp's TLS and
    RDP handshake and its login screen, and logs in only where the machine runs its own sesman.
    """
    binary = shutil.which("xrdp") or ("/usr/sbin/xrdp" if os.access("/usr/sbin/xrdp", os.X_OK) else None)
    system_ini = Path("/etc/xrdp/xrdp.ini")
    if binary is None or not system_ini.is_file():
        return None
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key, log = workdir / "cert.pem", workdir / "key.pem", workdir / "xrdp.log"
    _rsa_pair(cert, key, "desk01")
    changes = {"port": f"tcp://127.0.0.1:{port}", "certificate": str(cert), "key_file": str(key), "security_layer": "tls"}
    changes |= {"LogFile": str(log), "EnableSyslog": "false", "autorun": ""}
    changes |= dict.fromkeys(("rdpdr", "rdpsnd", "cliprdr", "rail", "xrdpvr", "tcutils", "drdynvc"), "false")
    ini = workdir / "xrdp.ini"
    ini.write_text(_ini(system_ini.read_text(), changes))
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--nodaemon",
        "--config",
        str(ini),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    xrdp = XRDP(proc, port, log)
    for _ in range(100):  # up to 5 s for it to listen (a bounded poll: xrdp says nothing when it is ready)
        if proc.returncode is not None:
            return None
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return xrdp
        await asyncio.sleep(0.05)
    await xrdp.stop()
    return None


@dataclass
class DemoVM:
    identity: VMIdentity
    acceptor: asyncssh.SSHAcceptor
    host_key: asyncssh.SSHKey

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def port(self) -> int:
        return int(self.acceptor.get_port())


@dataclass
class Ports:
    """The ports the demo got, and a line for each fixed one that was taken."""

    public: int
    control: int
    app: int
    rdp: int | None
    notes: list[str]


async def _listen_vm(vm: VMIdentity, host_key: asyncssh.SSHKey, authorized: str, notes: list[str]) -> DemoVM:
    preferred = VM_PORTS[vm.name]
    try:
        acc = await start_demo_vm(vm, preferred, host_key, authorized)
    except OSError as exc:
        if not _taken(exc):
            raise
        acc = await start_demo_vm(vm, 0, host_key, authorized)
        notes.append(f"port {preferred} is taken: {vm.name} listens on 127.0.0.1:{acc.get_port()} instead")
    return DemoVM(vm, acc, host_key)


def _pick(preferred: int, what: str, notes: list[str]) -> int:
    got = free_or(preferred)
    if got != preferred:
        notes.append(f"port {preferred} is taken: {what} uses 127.0.0.1:{got} instead")
    return got


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
    notes: list[str] = []
    vms: list[DemoVM] = []
    runner: web.AppRunner | None = None
    xrdp: XRDP | None = None
    try:
        for name in VM_PORTS:
            identity = VMIdentity(name, state / "vms" / name)
            identity.prepare()
            vms.append(await _listen_vm(identity, _key(keys / f"{name}-host"), authorized, notes))
        runner, app_port = await _web_app("desk01", _pick(APP_PORT, "desk01's web app", notes))
        xrdp = await start_xrdp(state / "xrdp", _pick(RDP_PORT, "desk01's xrdp", notes))
        ports = Ports(
            _pick(port, "the gateway", notes), _pick(control_port, "the control port", notes), app_port, xrdp.port if xrdp else None, notes
        )
        cfg_data = _config(state, token, alice, vms, ports)
        try:
            cfg = parse_config(cfg_data)
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
                _write_client_files(state, ports, app, vms)
                print(howto(state, ports, logfile, vms, xrdp), flush=True)
                await stop.wait()
            finally:
                await app.stop()
        print("\nbastion demo: stopped.")
        return 0
    finally:
        if xrdp is not None:
            await xrdp.stop()
        if runner is not None:
            await runner.cleanup()
        for vm in vms:
            vm.acceptor.close()
            await vm.acceptor.wait_closed()


def _config(state: Path, token: str, alice: asyncssh.SSHKey, vms: list[DemoVM], ports: Ports) -> dict[str, Any]:
    keys = state / "keys"
    inventory: list[dict[str, Any]] = []
    for vm in vms:
        entry: dict[str, Any] = {
            "name": vm.name,
            "address": "127.0.0.1",
            "ssh_port": vm.port,
            "host_key": vm.host_key.export_public_key().decode().strip(),
            "default_login": LOGIN,
            "logins": {LOGIN: {"key": str(keys / "gateway-to-vm")}},
        }
        if vm.name == "desk01" and ports.rdp is not None:
            entry["rdp_port"] = ports.rdp
        inventory.append(entry)
    rules: list[dict[str, Any]] = [
        # Every VM by terminating SSH and jump mode, each on its own SSH port (a rule without `ports`).
        {"groups": ["ops"], "vms": [vm.name for vm in vms], "protocols": ["ssh", "ssh-jump"], "logins": [LOGIN], "env": ["LANG", "LC_*"]},
        # desk01's web app through a tunnel (`bastion tunnel`) or a forward (`ssh -L`).
        {"groups": ["ops"], "vms": ["desk01"], "protocols": ["tcp", "ssh-jump"], "ports": [ports.app]},
    ]
    if ports.rdp is not None:
        rules.append({"groups": ["ops"], "vms": ["desk01"], "protocols": ["rdp"]})  # its rdp_port: tunnel, -L, RD Gateway
    return {
        "gateway": {"node": "demo", "state_dir": str(state / "gateway")},
        "public": {"listen": [f"127.0.0.1:{ports.public}"]},
        "control": {"listen": [f"127.0.0.1:{ports.control}"]},
        "operators": [{"name": "demo-operator", "role": "operator", "token_sha256": hashlib.sha256(token.encode()).hexdigest()}],
        "ssh": {"max_startups": 20},
        "vms": inventory,
        "users": [{"name": "alice", "keys": [alice.export_public_key().decode().strip()], "groups": ["ops"]}],
        "rules": rules,
    }


def _write_client_files(state: Path, ports: Ports, app: App, vms: list[DemoVM]) -> None:
    kh = [f"[127.0.0.1]:{ports.public} {k.export_public_key().decode().strip()}" for k in app.host_keys]
    kh += [f"[{vm.name}]:{vm.port} {vm.host_key.export_public_key().decode().strip()}" for vm in vms]
    (state / "known_hosts").write_text("\n".join(kh) + "\n")
    q = shlex.quote
    common = [
        f"  IdentityFile {q(str(state / 'keys' / 'alice'))}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {q(str(state / 'known_hosts'))}",
        "  StrictHostKeyChecking yes",
    ]
    lines = ["# Written by `bastion demo`; rewritten at each start.", "Host bastion-demo", "  HostName 127.0.0.1", f"  Port {ports.public}"]
    lines += ["  User alice", *common]
    for vm in vms:
        lines += [f"Host {vm.name}", f"  Port {vm.port}", f"  User {LOGIN}", "  ProxyJump alice@bastion-demo", *common]
    (state / "ssh_config").write_text("\n".join(lines) + "\n")


def bastion_on_path() -> tuple[str, str | None]:
    """How to call `bastion` in the printed commands, and the `export PATH=...` line that makes it work (None: it does)."""
    here = Path(sys.executable).parent / "bastion"
    found = shutil.which("bastion")
    if found is not None and (not here.exists() or Path(found).resolve() == here.resolve()):
        return "bastion", None
    if here.exists():
        return "bastion", f'export PATH={shlex.quote(str(here.parent))}:"$PATH"'
    return f"{shlex.quote(sys.executable)} -m gateway", None


def howto(state: Path, ports: Ports, logfile: Path, vms: list[DemoVM], xrdp: XRDP | None) -> str:
    """The banner: every command copy-paste ready (tests/e2e/test_demo.py runs each line that starts with a command)."""
    q = shlex.quote
    cfg = q(str(state / "ssh_config"))
    ca = q(str(state / "gateway" / "tls.crt"))
    tok = q(str(state / "operator.token"))
    bastion, path_line = bastion_on_path()
    vm_lines = "\n".join(f"  {vm.name:<7} SSH on 127.0.0.1:{vm.port:<6} home {vm.identity.home}" for vm in vms)
    extra = f"  desk01  web app on 127.0.0.1:{ports.app}" + (
        f", xrdp on 127.0.0.1:{ports.rdp}" if ports.rdp else " (no xrdp installed: no rdp)"
    )
    notes = "".join(f"Note: {n}.\n" for n in ports.notes)
    path_hint = f"  {path_line}   # puts `bastion` on your PATH\n" if path_line else ""
    tunnel_flags = f"--ssh-config {cfg} --ssh-host bastion-demo --ca-file {ca}"
    if ports.rdp is not None and shutil.which("xfreerdp"):
        rdp = f"""
RDP to desk01's xrdp (its login screen; logging in needs the machine's own xrdp-sesman):
  {bastion} rdp desk01 --port {ports.rdp} {tunnel_flags} -- /cert:ignore   # a local tunnel, then xfreerdp on it
  ssh -F {cfg} alice@bastion-demo rdp desk01 > {q(str(state / "desk01.rdp"))}   # an .rdp file for the RD Gateway
  xfreerdp {q(str(state / "desk01.rdp"))} /cert:ignore                       # FreeRDP through the gateway's RD Gateway
"""
    elif ports.rdp is not None:
        rdp = f"""
RDP to desk01's xrdp: install FreeRDP (xfreerdp) for `bastion rdp`, or save the .rdp file for mstsc:
  ssh -F {cfg} alice@bastion-demo rdp desk01 > {q(str(state / "desk01.rdp"))}
"""
    else:
        rdp = "\nRDP: install xrdp (and FreeRDP for the client) and restart the demo: desk01 then grants rdp.\n"
    return f"""Bastion demo is running on 127.0.0.1:{ports.public} (SSH and HTTPS on one port). Ctrl-C stops everything.
{notes}
Demo user alice (key {state / "keys" / "alice"}). Demo VMs, logging in as {LOGIN}: the demo creates no system
users, so every VM's shell runs as you, each in its own home and under its own name:
{vm_lines}
{extra}

Try, in another terminal:
{path_hint}  ssh -F {cfg} alice+web01@bastion-demo                  # a shell on web01 through the gateway
  ssh -F {cfg} alice+web02@bastion-demo 'pwd; exit 3'    # a command on web02, with its exit status
  scp -F {cfg} /etc/hostname alice+web01@bastion-demo:copied-hostname   # into web01's home
  sftp -F {cfg} alice+web01@bastion-demo
  ssh -F {cfg} -J alice@bastion-demo web02 'echo $BASTION_DEMO_VM'   # jump mode: end to end to web02's sshd
  ssh -F {cfg} web01                                     # jump mode again, the ProxyJump in the config
  ssh -F {cfg} -N -L {FORWARD_PORT}:desk01:{ports.app} alice@bastion-demo   # a forward to desk01's web app, then:
  curl http://127.0.0.1:{FORWARD_PORT}/
  ssh -F {cfg} alice@bastion-demo ls                     # what alice may reach, with each VM's ports
  ssh -F {cfg} alice@bastion-demo token                  # a tunnel token (bastion tunnel fetches its own)
  {bastion} tunnel --vm desk01 --port {ports.app} --local 127.0.0.1:{TUNNEL_PORT} {tunnel_flags}   # then:
  curl http://127.0.0.1:{TUNNEL_PORT}/
  curl --cacert {ca} https://127.0.0.1:{ports.public}/healthz   # the HTTPS door on the same port
  ssh -F {cfg} alice@bastion-demo web                    # a one-time link: a terminal in your browser
                                                          # (self-signed certificate: accept it once)
{rdp}
Operators (control port https://127.0.0.1:{ports.control}, operator token in {state / "operator.token"}):
  export BASTION_CONTROL_URL=https://127.0.0.1:{ports.control} BASTION_TOKEN="$(cat {tok})" BASTION_CA_FILE={ca}
  {bastion} sessions                                 # add --watch to follow live
  {bastion} connections
  {bastion} notice "The demo ends in a minute."     # into every live terminal
  {bastion} disconnect SESSION_ID --reason "demo over"
  {bastion} nodes                                    # this node (several with [cluster])
  curl --cacert {ca} -H "Authorization: Bearer $BASTION_TOKEN" https://127.0.0.1:{ports.control}/metrics
  Browser: https://127.0.0.1:{ports.control}/ui (self-signed certificate; sign in with the token)

Without the config file:
  ssh -i {q(str(state / "keys" / "alice"))} -o UserKnownHostsFile={q(str(state / "known_hosts"))} -p {ports.public} alice+web01@127.0.0.1

Gateway log (JSON lines, one session_closed per session): {logfile}
"""
