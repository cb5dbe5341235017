"""The `bastion` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from gateway import __version__
from gateway.errors import ConfigError, StartupError


def _run(coro_factory: Callable[[asyncio.Event], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop until the coroutine ends or SIGINT/SIGTERM sets the stop event."""
    import uvloop

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await coro_factory(stop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for path, msg in exc.problems:
            print(f"{args.config}: {path}: {msg}", file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"OK: {len(cfg.vms)} VMs, {len(cfg.users)} users, {len(cfg.rules)} rules")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import App
    from gateway.config import load_config
    from gateway.logs import loop_exception_handler, make_logger, quiet_libraries, route_stdlib_logging
    from gateway.sdnotify import Notifier

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for path, msg in exc.problems:
            print(f"bastion: {args.config}: {path}: {msg}", file=sys.stderr)
        return 2
    route_stdlib_logging(fmt=args.log_format)
    quiet_libraries()
    log = make_logger(fmt=args.log_format, node=cfg.gateway.node)

    async def serve(stop: asyncio.Event) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(loop_exception_handler(log))
        app = App(cfg, log, notifier=Notifier.from_env(os.environ), reload_config=lambda: load_config(args.config))
        # SIGHUP (systemctl reload) re-reads the config; without a handler it would kill the process.
        loop.add_signal_handler(signal.SIGHUP, app.request_reload)
        try:
            await app.run_until(stop)
        except StartupError as exc:
            print(f"bastion: cannot start: {exc.message}", file=sys.stderr)
            log.error("gateway_start_failed", reason=exc.reason, error=exc.message)
            return 1
        return 0

    return _run(serve)


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return _run(lambda stop: run_demo(stop, state_dir=args.state_dir, port=args.port, control_port=args.control_port))


def cmd_hash_token(args: argparse.Namespace) -> int:
    import hashlib

    token = sys.stdin.readline().strip()
    if not token:
        print("bastion hash-token: give the token on standard input", file=sys.stderr)
        return 2
    if len(token) < 20:
        print("bastion hash-token: warning: tokens shorter than 20 characters are easy to guess", file=sys.stderr)
    print(hashlib.sha256(token.encode()).hexdigest())
    return 0


def _client(args: argparse.Namespace) -> Any:
    from gateway.client.api import ControlClient

    url = args.url or os.environ.get("BASTION_CONTROL_URL")
    token = args.token or os.environ.get("BASTION_TOKEN")
    if not url or not token:
        raise SystemExit("bastion: set --url/BASTION_CONTROL_URL and --token/BASTION_TOKEN")
    return ControlClient(url=url, token=token, ca_file=args.ca_file, insecure=args.insecure)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _duration(seconds: float) -> str:
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def render_sessions(rows: list[dict[str, Any]]) -> str:
    """The `bastion sessions` table."""
    header = ("ID", "USER", "VM", "SOURCE IP", "PROTOCOL", "STARTED", "DURATION", "UP", "DOWN", "STATE")
    table = [header] + [
        (
            r["id"],
            r["user"],
            r["vm"],
            r["source_ip"],
            r["protocol"],
            r["started_at"].replace("T", " ")[:19],
            _duration(r["duration_s"]),
            _human_bytes(r["bytes_up"]),
            _human_bytes(r["bytes_down"]),
            f"terminating, ends {r['ends_at'].replace('T', ' ')[:19]}" if r.get("ends_at") else r.get("state", "active"),
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    if not rows:
        lines.append("(no sessions)")
    return "\n".join(lines)


def cmd_sessions(args: argparse.Namespace) -> int:
    from gateway.client.api import ControlError

    client = _client(args)
    params = {k: v for k, v in (("user", args.user), ("vm", args.vm), ("protocol", args.protocol)) if v}
    path = "v1/sessions" + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")

    async def once() -> list[dict[str, Any]]:
        data = await client.request("GET", path)
        rows: list[dict[str, Any]] = data["sessions"]
        return rows

    async def run(stop: asyncio.Event) -> int:
        try:
            rows = await once()
            if args.json:
                print(json.dumps(rows, indent=2))
                return 0
            if not args.watch:
                print(render_sessions(rows))
                return 0
            while not stop.is_set():
                print("\033[H\033[2J" + render_sessions(rows), flush=True)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(args.interval):
                        await stop.wait()
                if not stop.is_set():
                    rows = await once()
        except ControlError as exc:
            print(f"bastion: {exc.message}", file=sys.stderr)
            return 1
        return 0

    return _run(run)


def cmd_disconnect(args: argparse.Namespace) -> int:
    from gateway.client.api import ControlError

    client = _client(args)

    async def run(stop: asyncio.Event) -> int:
        try:
            data = await client.request("POST", "v1/sessions/disconnect", {"ids": args.ids, "reason": args.reason, "grace_s": args.grace})
        except ControlError as exc:
            print(f"bastion: {exc.message}", file=sys.stderr)
            return 1
        results: dict[str, str] = data["results"]
        ends: dict[str, str] = data.get("ends_at") or {}
        for sid in args.ids:
            result = results.get(sid, "not_found")
            print(f"{sid}: {result} (ends at {ends[sid]})" if sid in ends else f"{sid}: {result}")
        return 0 if all(r in ("disconnected", "pending") for r in results.values()) else 3

    return _run(run)


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None, show: Callable[[Any], int]) -> int:
    """One control API request; prints the error and returns 1 when it is refused or unreachable."""
    from gateway.client.api import ControlError

    client = _client(args)

    async def run(stop: asyncio.Event) -> int:
        try:
            data = await client.request(method, path, body)
        except ControlError as exc:
            print(f"bastion: {exc.message}", file=sys.stderr)
            return 1
        return show(data)

    return _run(run)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], empty: str) -> str:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines if rows else [*lines, empty])


def render_locks(locks: list[dict[str, Any]]) -> str:
    """The `bastion locks` table."""
    rows = [
        (
            lk["id"],
            lk["kind"],
            lk["target"],
            (lk["expires_at"] or "until lifted").replace("T", " ")[:19],
            lk["created_by"],
            lk["reason"],
        )
        for lk in locks
    ]
    return _table(("ID", "KIND", "TARGET", "EXPIRES", "BY", "REASON"), rows, "(no locks)")


def cmd_lock(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {k: v for k, v in (("user", args.user), ("vm", args.vm), ("source", args.source)) if v is not None}
    if len(body) != 1:
        print("bastion lock: give exactly one of --user, --vm, --source", file=sys.stderr)
        return 2
    body["reason"] = args.reason
    if args.expires:
        body["expires"] = args.expires

    def show(data: Any) -> int:
        lk = data["lock"]
        until = lk["expires_at"] or "until lifted"
        print(f"locked {lk['kind']} {lk['target']} ({until}): lock {lk['id']}")
        print(f"ended {data['sessions_ended']} session(s) and {data['connections_ended']} connection(s)")
        return 0

    return _call(args, "POST", "v1/locks", body, show)


def cmd_unlock(args: argparse.Namespace) -> int:
    def show(data: Any) -> int:
        lk = data["lock"]
        print(f"lifted lock {lk['id']} on {lk['kind']} {lk['target']}")
        return 0

    return _call(args, "DELETE", f"v1/locks/{args.id}", None, show)


def cmd_locks(args: argparse.Namespace) -> int:
    def show(data: Any) -> int:
        print(json.dumps(data["locks"], indent=2) if args.json else render_locks(data["locks"]))
        return 0

    return _call(args, "GET", "v1/locks", None, show)


def render_connections(rows: list[dict[str, Any]]) -> str:
    """The `bastion connections` table."""
    table = [
        (
            r["id"],
            r["user"],
            r["source_ip"],
            r["door"],
            r["auth_method"],
            r["since"].replace("T", " ")[:19],
            str(r["channels"]),
            _duration(r["idle_s"]) if r["channels"] == 0 else "-",
        )
        for r in rows
    ]
    return _table(("ID", "USER", "SOURCE IP", "DOOR", "AUTH", "SINCE", "CHANNELS", "IDLE"), table, "(no connections)")


def cmd_connections(args: argparse.Namespace) -> int:
    def show(data: Any) -> int:
        rows = data["connections"]
        print(json.dumps(rows, indent=2) if args.json else render_connections(rows))
        return 0

    if args.end:

        def ended(data: Any) -> int:
            print(f"{data['id']}: {data['result']} ({data['sessions_ended']} session(s) told)")
            return 0

        return _call(args, "DELETE", f"v1/connections/{args.end}", {"reason": args.reason}, ended)
    return _call(args, "GET", "v1/connections", None, show)


def cmd_login(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.client.login import Files, LoginError, default_dir, login

    gateway = args.gateway or os.environ.get("BASTION_GATEWAY")
    if not gateway:
        print("bastion login: set --gateway HOST:PORT (or BASTION_GATEWAY)", file=sys.stderr)
        return 2
    files = Files(Path(args.dir) if args.dir else default_dir())

    async def run(stop: asyncio.Event) -> int:
        try:
            await login(gateway, files, ca_file=args.ca_file, insecure=args.insecure, open_browser=not args.no_browser)
        except LoginError as exc:
            print(f"bastion login: {exc.message}", file=sys.stderr)
            return 1
        return 0

    return _run(run)


def cmd_logout(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.client.login import Files, default_dir, logout

    files = Files(Path(args.dir) if args.dir else default_dir())
    print("signed out: certificate and key removed" if logout(files) else "nothing to remove")
    return 0


def _gateway_of(args: argparse.Namespace) -> str:
    """--gateway (or BASTION_GATEWAY); else where `ssh -G` says the --ssh-host alias goes (one port for SSH and HTTPS)."""
    import subprocess

    gateway = args.gateway or os.environ.get("BASTION_GATEWAY")
    if not gateway and args.ssh_host:
        argv = ["ssh", *(["-F", args.ssh_config] if args.ssh_config else []), "-G", args.ssh_host]
        got = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)  # noqa: S603 - argv, no shell
        seen = dict(line.split(" ", 1) for line in got.stdout.decode(errors="replace").splitlines() if " " in line)
        if got.returncode != 0 or "hostname" not in seen or "port" not in seen:
            raise SystemExit(f"bastion: cannot read host {args.ssh_host!r} with `ssh -G`: {got.stderr.decode(errors='replace').strip()}")
        host = seen["hostname"]
        gateway = f"[{host}]:{seen['port']}" if ":" in host else f"{host}:{seen['port']}"
    if not gateway:
        raise SystemExit("bastion: set --gateway HOST:PORT (or BASTION_GATEWAY), or --ssh-host with an alias of your ssh config")
    host, _, gw_port = gateway.rpartition(":")
    if not host or not gw_port.isdigit():
        raise SystemExit(f"bastion: --gateway must be HOST:PORT, got {gateway!r}")
    return gateway


def _ssh_to_gateway(args: argparse.Namespace, gateway: str, *command: str) -> list[str]:
    """The ssh command that runs a gateway command (`token`, `rdp VM`): to the --ssh-host alias, so its HostName,
    Port, User and known_hosts apply; else to the --gateway host and port as $USER (or --user)."""
    argv = ["ssh", *(["-F", args.ssh_config] if args.ssh_config else []), *_identity_args(args)]
    if args.ssh_host:
        return [*argv, f"{args.user}@{args.ssh_host}" if args.user else args.ssh_host, *command]
    host, _, gw_port = gateway.rpartition(":")
    return [*argv, "-p", gw_port, f"{args.user or os.environ.get('USER', '')}@{host.strip('[]')}", *command]


def _tunnel_from_args(args: argparse.Namespace) -> tuple[Any, tuple[str, int]]:
    from gateway.client.tunnel import TokenSource, Tunnel
    from gateway.config import parse_listen

    gateway = _gateway_of(args)
    try:
        local = parse_listen(args.local)
    except ValueError as exc:
        raise SystemExit(f"bastion: --local: {exc}") from None
    token = args.token or os.environ.get("BASTION_TUNNEL_TOKEN")
    ssh_argv = _ssh_to_gateway(args, gateway, "token")
    tunnel = Tunnel(gateway, args.vm, args.port, TokenSource(fixed=token, ssh_argv=ssh_argv), ca_file=args.ca_file, insecure=args.insecure)
    return tunnel, (local.host, local.port)


def cmd_tunnel(args: argparse.Namespace) -> int:
    from gateway.client.tunnel import run_tunnel

    tunnel, local = _tunnel_from_args(args)
    return _run(lambda stop: run_tunnel(stop, tunnel, local))


def _identity_args(args: argparse.Namespace) -> list[str]:
    """`-i KEY` as given; else the `bastion login` certificate when there is one (so its user needs no key of her own)."""
    if args.identity:
        return ["-i", args.identity]
    from gateway.client.login import Files, default_dir

    files = Files(default_dir())
    if files.cert.exists() and files.key.exists():
        return ["-i", str(files.key), "-o", f"CertificateFile={files.cert}"]
    return []


def _native_rdp(args: argparse.Namespace, client: str) -> int:
    """`bastion rdp VM --native`: the .rdp file from `ssh USER@GATEWAY rdp VM`, then the RDP client on it (RD Gateway)."""
    import subprocess
    import tempfile

    ssh = _ssh_to_gateway(args, _gateway_of(args), "rdp", args.vm)
    got = subprocess.run(ssh, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)  # noqa: S603 - argv, no shell
    if got.returncode != 0 or b"gatewayaccesstoken:s:" not in got.stdout:
        print(f"bastion rdp: could not get an .rdp file: {got.stderr.decode(errors='replace').strip() or got.returncode}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bastion-rdp-") as d:  # 0700: the file holds a token
        path = os.path.join(d, f"{args.vm}.rdp")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(got.stdout)
        argv = [client, path, *args.client_args] if "xfreerdp" in client else [client, path]
        return subprocess.run(argv, check=False).returncode  # noqa: S603 - the user's own RDP client


def cmd_rdp(args: argparse.Namespace) -> int:
    import shutil

    from gateway.client.tunnel import TunnelError, run_tunnel

    client = shutil.which("xfreerdp") or shutil.which("mstsc")
    if client is None:
        print("bastion rdp: no RDP client found (install FreeRDP's xfreerdp, or use mstsc on Windows)", file=sys.stderr)
        return 1
    if args.native:
        return _native_rdp(args, client)
    args.local = "127.0.0.1:0"
    tunnel, local = _tunnel_from_args(args)
    result = 0

    async def launch(host: str, port: int) -> None:
        nonlocal result
        try:  # the token and the grant first: the RDP client starts only for a tunnel the gateway will open
            await tunnel.check()
        except TunnelError as exc:
            tunnel.say(str(exc))
            result = 1
            return
        argv = [client, f"/v:{host}:{port}", *args.client_args] if "xfreerdp" in client else [client, f"/v:{host}:{port}"]
        proc = await asyncio.create_subprocess_exec(*argv)
        result = await proc.wait()

    code = _run(lambda stop: run_tunnel(stop, tunnel, local, on_ready=launch))
    return code or result


def _tunnel_flags(p: argparse.ArgumentParser, *, vm_flag: bool = True) -> None:
    p.add_argument("--gateway", help="the gateway's public HOST:PORT (env BASTION_GATEWAY)")
    if vm_flag:
        p.add_argument("--vm", required=True, help="VM name from the inventory")
    p.add_argument("--token", help="a tunnel token (env BASTION_TUNNEL_TOKEN); default: fetched with `ssh USER@GATEWAY token`")
    p.add_argument("--user", help="your gateway user name for fetching a token (default: $USER)")
    p.add_argument("--identity", help="SSH private key for fetching a token (default: your ssh config and agent)")
    p.add_argument("--ssh-config", help="ssh config file for fetching a token")
    p.add_argument(
        "--ssh-host",
        help="the ssh destination for fetching a token: a Host alias (e.g. of --ssh-config) whose HostName, Port, User and"
        " known_hosts apply; also the gateway's HOST:PORT when --gateway is not given",
    )
    p.add_argument("--ca-file", help="CA or certificate to verify the gateway with")
    p.add_argument("--insecure", action="store_true", help="do not verify the gateway's certificate (tests only)")


def _control_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="control URL, e.g. https://127.0.0.1:4443 (env BASTION_CONTROL_URL)")
    p.add_argument("--token", help="operator token (env BASTION_TOKEN)")
    p.add_argument("--ca-file", help="CA or certificate to verify the control port with")
    p.add_argument("--insecure", action="store_true", help="do not verify the control port's certificate (tests only)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bastion", description="Reach private VMs through one public port.")
    p.add_argument("--version", action="version", version=f"bastion {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", "-c", required=True, help="TOML config file")
    s.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a config file and print every problem")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)

    d = sub.add_parser("demo", help="run a self-contained demo on loopback (no config, no root)")
    default_state = os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "bastion-demo")
    d.add_argument("--state-dir", default=default_state)
    d.add_argument("--port", type=int, default=10443, help="public port on 127.0.0.1 (default 10443)")
    d.add_argument("--control-port", type=int, default=10444, help="control port on 127.0.0.1 (default 10444)")
    d.set_defaults(func=cmd_demo)

    h = sub.add_parser("hash-token", help="read a token on stdin, print its SHA-256 for [[operators]] token_sha256")
    h.set_defaults(func=cmd_hash_token)

    ls = sub.add_parser("sessions", help="list live sessions from the control port")
    _control_flags(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    ls.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    ls.add_argument("--user")
    ls.add_argument("--vm")
    ls.add_argument("--protocol")
    ls.set_defaults(func=cmd_sessions)

    dc = sub.add_parser("disconnect", help="force sessions to end, with a notice to their users")
    _control_flags(dc)
    dc.add_argument("ids", nargs="+", metavar="ID")
    dc.add_argument("--reason", default="", help="shown to the users")
    dc.add_argument("--grace", type=float, default=0.0, help="seconds of warning before the disconnect")
    dc.set_defaults(func=cmd_disconnect)

    lk = sub.add_parser("lock", help="lock a user, a VM or a source network: live access ends, new access is refused")
    _control_flags(lk)
    who = lk.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user name")
    who.add_argument("--vm", help="a VM name")
    who.add_argument("--source", help="an IP address or CIDR network, e.g. 203.0.113.0/24")
    lk.add_argument("--reason", default="", help="shown to the users it locks out")
    lk.add_argument("--expires", help="a duration ('30m', '2h') or an ISO 8601 time; default: until lifted")
    lk.set_defaults(func=cmd_lock)

    ul = sub.add_parser("unlock", help="lift a lock")
    _control_flags(ul)
    ul.add_argument("id", metavar="LOCK_ID")
    ul.set_defaults(func=cmd_unlock)

    lks = sub.add_parser("locks", help="list the locks in force")
    _control_flags(lks)
    lks.add_argument("--json", action="store_true", help="print JSON")
    lks.set_defaults(func=cmd_locks)

    cn = sub.add_parser("connections", help="list authenticated connections (or end one with --end ID)")
    _control_flags(cn)
    cn.add_argument("--json", action="store_true", help="print JSON")
    cn.add_argument("--end", metavar="ID", help="end this connection and its sessions")
    cn.add_argument("--reason", default="", help="with --end: shown to the user")
    cn.set_defaults(func=cmd_connections)

    li = sub.add_parser("login", help="sign in (in a browser) and get a short-lived SSH certificate for ssh, scp, sftp, ssh -J")
    li.add_argument("--gateway", help="the gateway's public HOST:PORT (env BASTION_GATEWAY)")
    li.add_argument("--dir", help="where the key, certificate and ssh_config go (default ~/.config/bastion)")
    li.add_argument("--ca-file", help="CA or certificate to verify the gateway with")
    li.add_argument("--insecure", action="store_true", help="do not verify the gateway's certificate (tests only)")
    li.add_argument("--no-browser", action="store_true", help="print the URL only (a headless machine)")
    li.set_defaults(func=cmd_login)

    lo = sub.add_parser("logout", help="remove the certificate and key `bastion login` wrote")
    lo.add_argument("--dir", help="the directory `bastion login` used")
    lo.set_defaults(func=cmd_logout)

    tn = sub.add_parser("tunnel", help="a local port whose connections are tunnelled to a VM port through the gateway")
    _tunnel_flags(tn)
    tn.add_argument("--port", type=int, required=True, help="the VM's port, e.g. 3389")
    tn.add_argument("--local", default="127.0.0.1:0", help="where to listen locally (default 127.0.0.1:0, an ephemeral port)")
    tn.set_defaults(func=cmd_tunnel)

    rd = sub.add_parser("rdp", help="tunnel to a VM's RDP port and start the RDP client (xfreerdp or mstsc)")
    rd.add_argument("vm", metavar="VM")
    _tunnel_flags(rd, vm_flag=False)
    rd.add_argument("--port", type=int, default=3389, help="the VM's RDP port (default 3389)")
    rd.add_argument(
        "--native", action="store_true", help="no local tunnel: the client talks RD Gateway to the gateway itself (an .rdp file)"
    )
    rd.set_defaults(func=cmd_rdp, client_args=[])  # arguments after `--` go to xfreerdp
    return p


def _ensure_std_fds() -> None:
    """Open /dev/null on any of fds 0-2 that a supervisor left closed.

    Otherwise the next socket or pipe takes that number, and a child process
    started with that fd as its stdin/stdout (the demo VMs' shells) gets a
    stranger's socket.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    _ensure_std_fds()
    words = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if words[:1] == ["rdp"] and "--" in words:
        cut = words.index("--")
        words, passthrough = words[:cut], words[cut + 1 :]
    args = build_parser().parse_args(words)
    if passthrough:
        args.client_args = passthrough
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)
