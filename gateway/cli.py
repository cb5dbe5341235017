"""The `bastion` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from gateway import __version__
from gateway.errors import ConfigError, StartupError

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from gateway.config import Config


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
    from gateway.app import preflight
    from gateway.config import load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        problems = [f"{path}: {msg}" for path, msg in exc.problems]
    else:
        problems = [] if args.no_files else preflight(cfg)
    for problem in problems:
        print(f"{args.config}: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    files = "files not checked" if args.no_files else "every file it names checked"
    print(f"OK: {len(cfg.vms)} VMs, {len(cfg.users)} users, {len(cfg.rules)} rules; {files}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import App, preflight
    from gateway.config import load_config
    from gateway.logs import loop_exception_handler, make_logger, quiet_libraries, route_stdlib_logging
    from gateway.sdnotify import Notifier
    from gateway.workers import WORKER_ENV, WorkerSpec, worker_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for path, msg in exc.problems:
            print(f"bastion: {args.config}: {path}: {msg}", file=sys.stderr)
        return 2
    route_stdlib_logging(fmt=args.log_format)
    quiet_libraries()
    spec: WorkerSpec | None = None
    if os.environ.get(WORKER_ENV):  # started by a supervisor (gateway/workers.py): its sockets and its node name
        try:
            spec = WorkerSpec.from_env(os.environ[WORKER_ENV])
        except StartupError as exc:
            print(f"bastion: cannot start: {exc.message}", file=sys.stderr)
            return 1
        cfg = worker_config(cfg, spec)
    log = make_logger(fmt=args.log_format, node=cfg.gateway.node)
    problems = preflight(cfg)  # the checks `check-config` makes, all of them, before anything binds
    if problems:
        for problem in problems:
            print(f"bastion: cannot start: {problem}", file=sys.stderr)
        log.error("gateway_start_failed", reason=StartupError.reason, problems=problems)
        return 1
    if spec is None and cfg.gateway.workers > 1:
        # Workers read the config again on SIGHUP, whatever their working directory.
        return _run(functools.partial(_supervise, cfg, Path(os.path.abspath(args.config)), args.log_format, log))

    def reread() -> Config:
        new = load_config(args.config)
        return worker_config(new, spec) if spec is not None else new

    async def serve(stop: asyncio.Event) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(loop_exception_handler(log))
        try:
            app = App(cfg, log, notifier=Notifier.from_env(os.environ), reload_config=reread, worker=spec)
            # SIGHUP (systemctl reload) re-reads the config; without a handler it would kill the process.
            loop.add_signal_handler(signal.SIGHUP, app.request_reload)
            await app.run_until(stop)
        except StartupError as exc:
            print(f"bastion: cannot start: {exc.message}", file=sys.stderr)
            log.error("gateway_start_failed", reason=exc.reason, error=exc.message)
            return 1
        return 0

    return _run(serve)


async def _supervise(cfg: Config, path: Path, log_format: str, log: FilteringBoundLogger, stop: asyncio.Event) -> int:
    """`gateway.workers` > 1: bind once, run that many workers (gateway/workers.py) until SIGTERM/SIGINT."""
    from gateway.app import prepare_state
    from gateway.logs import loop_exception_handler
    from gateway.sdnotify import Notifier
    from gateway.workers import Supervisor, worker_command

    asyncio.get_running_loop().set_exception_handler(loop_exception_handler(log))
    try:
        prepare_state(cfg, log)
        supervisor = Supervisor(cfg, path, log, Notifier.from_env(os.environ), worker_command(path, log_format))
        return await supervisor.run(stop)
    except StartupError as exc:
        print(f"bastion: cannot start: {exc.message}", file=sys.stderr)
        log.error("gateway_start_failed", reason=exc.reason, error=exc.message)
        return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return _run(lambda stop: run_demo(stop, state_dir=args.state_dir, port=args.port, control_port=args.control_port))


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash (or zsh, through its bashcompinit) completion for `bastion`: its commands, then each command's
    options, and the choices of an option that has them. Built from the argument parser, so it never drifts."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = sorted(sub.choices)
    cases = []
    for name in commands:
        cmd = sub.choices[name]
        opts = sorted(o for a in cmd._actions for o in a.option_strings if o.startswith("--"))
        choices = [
            f"{o}) COMPREPLY=($(compgen -W '{' '.join(map(str, a.choices))}' -- \"$cur\")); return;;"
            for a in cmd._actions
            if a.choices and a.option_strings
            for o in a.option_strings
        ]
        prev = f'case "$prev" in {" ".join(choices)} esac; ' if choices else ""
        cases.append(f"        {name}) {prev}COMPREPLY=($(compgen -W '{' '.join(opts)}' -- \"$cur\"));;")
    body = "\n".join(cases)
    script = f"""_bastion() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W '{" ".join(commands)} --help --version' -- "$cur")); return
    fi
    case "${{COMP_WORDS[1]}}" in
{body}
    esac
}}
complete -o default -F _bastion bastion
"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(build_parser(), args.shell), end="")
    return 0


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
    """The control API client from the flags, else BASTION_CONTROL_URL, BASTION_TOKEN and BASTION_CA_FILE.
    Raises ControlError for a missing or malformed URL or token or an unusable CA file (before any request)."""
    from gateway.client.api import ControlClient, ControlError

    url = args.url or os.environ.get("BASTION_CONTROL_URL")
    token = args.token or os.environ.get("BASTION_TOKEN")
    if not url or not token:
        raise ControlError("set --url/BASTION_CONTROL_URL and --token/BASTION_TOKEN")
    ca_file = args.ca_file or os.environ.get("BASTION_CA_FILE") or None
    return ControlClient(url=url, token=token, ca_file=ca_file, insecure=args.insecure)


def _operator(args: argparse.Namespace, work: Callable[[Any, asyncio.Event], Coroutine[Any, Any, int]], *, interrupted: int = 130) -> int:
    """Run one operator command against the control API.

    The client is built (and its URL and CA file checked) first. A refused or failed request prints one line and
    returns 1. Ctrl-C or SIGTERM cancels the work wherever it is and returns `interrupted` (130, the shell's code
    for SIGINT; 0 for `sessions --watch`, whose normal end it is), with nothing more printed.
    """
    from gateway.client.api import ControlError

    client = _client(args)

    async def run(stop: asyncio.Event) -> int:
        task = asyncio.create_task(work(client, stop), name="operator-command")
        stopped = asyncio.create_task(stop.wait(), name="operator-stop")
        try:
            await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stopped, task):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
        if task.cancelled():
            return interrupted
        try:
            return task.result()
        except ControlError as exc:
            print(f"bastion: {exc.message}", file=sys.stderr)
            return 1

    return _run(run)


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


def _when(iso: str) -> datetime.datetime | None:
    with contextlib.suppress(ValueError, TypeError):
        when = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
        return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)
    return None


def session_state(row: dict[str, Any], now: datetime.datetime) -> str:
    """The STATE column: `active`, or `terminating in 12s` for a pending disconnect (`terminating` once it is due)."""
    state = str(row.get("state") or "active")
    ends = _when(row["ends_at"]) if row.get("ends_at") else None
    if ends is None:
        return state
    left = (ends - now).total_seconds()
    return f"terminating in {_duration(math.ceil(left))}" if left >= 1 else "terminating"


def render_sessions(rows: list[dict[str, Any]], now: datetime.datetime | None = None) -> str:
    """The `bastion sessions` table (`now` for the STATE column's countdown; default: this machine's clock)."""
    now = now or datetime.datetime.now(datetime.UTC)
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
            session_state(r, now),
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    if not rows:
        lines.append("(no sessions)")
    return "\n".join(lines)


def _no_vm_match(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str | None:
    """The warning for a --vm filter that matched nothing. The CLI cannot see the inventory, so it says only that."""
    if args.vm and not rows:
        return f"no session to VM {args.vm!r} (is the name right?)"
    return None


def cmd_sessions(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    params = {k: v for k, v in (("user", args.user), ("vm", args.vm), ("protocol", args.protocol)) if v}
    path = "v1/sessions" + ("?" + urlencode(params) if params else "")
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""  # a pipe gets tables one after another, no escapes

    async def work(client: Any, stop: asyncio.Event) -> int:
        rows: list[dict[str, Any]] = (await client.request("GET", path))["sessions"]
        if not args.watch:
            print(json.dumps(rows, indent=2) if args.json else render_sessions(rows))
            if warning := _no_vm_match(args, rows):
                print(f"bastion: {warning}", file=sys.stderr)
            return 0
        while True:
            warning = _no_vm_match(args, rows)
            if args.json:  # one JSON array a line, for `| jq` and the like
                print(json.dumps(rows), flush=True)
            else:
                print(clear + render_sessions(rows) + (f"\n({warning})" if warning else ""), end="\n" if clear else "\n\n", flush=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.interval):
                    await stop.wait()
            if stop.is_set():  # Ctrl-C: the normal end of --watch
                return 0
            rows = (await client.request("GET", path))["sessions"]

    return _operator(args, work, interrupted=0 if args.watch else 130)


def cmd_disconnect(args: argparse.Namespace) -> int:
    async def work(client: Any, stop: asyncio.Event) -> int:
        data = await client.request("POST", "v1/sessions/disconnect", {"ids": args.ids, "reason": args.reason, "grace_s": args.grace})
        results: dict[str, str] = data["results"]
        ends: dict[str, str] = data.get("ends_at") or {}
        for sid in args.ids:
            result = results.get(sid, "not_found")
            print(f"{sid}: {result} (ends at {ends[sid]})" if sid in ends else f"{sid}: {result}")
        return 0 if all(r in ("disconnected", "pending") for r in results.values()) else 3

    return _operator(args, work)


def cmd_notice(args: argparse.Namespace) -> int:
    """`bastion notice TEXT [--id ID]...`: a line for the users of the given sessions (all without --id)."""
    message = " ".join(args.message.split())
    if not message:
        print("bastion notice: give the text to show", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"message": message}
    if args.ids:
        body["ids"] = args.ids

    async def work(client: Any, stop: asyncio.Event) -> int:
        results: dict[str, str] = (await client.request("POST", "v1/notices", body))["results"]
        for sid in args.ids or sorted(results):
            print(f"{sid}: {results.get(sid, 'not_found')}")
        if not results:
            print("(no sessions)")
        if not args.ids:  # to everyone: a session that cannot show text (ssh -J) is not a failure
            return 0
        return 0 if all(results.get(sid) == "delivered" for sid in args.ids) else 3

    return _operator(args, work)


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None, show: Callable[[Any], int]) -> int:
    """One control API request; prints the error and returns 1 when it is refused or unreachable."""

    async def work(client: Any, stop: asyncio.Event) -> int:
        return show(await client.request(method, path, body))

    return _operator(args, work)


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


def render_cluster(data: dict[str, Any]) -> str:
    """The `bastion nodes` table: every node this node sees, then the nodes lost lately."""
    rows = [
        (
            n["node"] + (" *" if n["self"] else ""),
            str(n["sessions"]),
            (n["last_heartbeat"] or "-").replace("T", " ")[:19],
            "-" if n["age_s"] is None else f"{n['age_s']:.1f}s ago",
        )
        for n in data["nodes"]
    ]
    out = [_table(("NODE", "SESSIONS", "LAST HEARTBEAT", "AGE"), rows, "(no nodes)")]
    if not data["clustered"]:
        out.append("(one node, no [cluster])")
    elif data["degraded"]:
        out.append("degraded: Redis is unreachable from this node; only its own sessions are shown")
    for lost in data["lost"]:
        out.append(f"lost {lost['node']} at {lost['detected_at'][:19].replace('T', ' ')}: {lost['sessions']} session(s) ended as node_lost")
    return "\n".join(out)


def cmd_nodes(args: argparse.Namespace) -> int:
    def show(data: Any) -> int:
        print(json.dumps(data, indent=2) if args.json else render_cluster(data))
        return 0

    return _call(args, "GET", "v1/cluster", None, show)


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
    p.add_argument("--ca-file", help="CA or certificate to verify the control port with (env BASTION_CA_FILE)")
    p.add_argument("--insecure", action="store_true", help="do not verify the control port's certificate (tests only)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to read more, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


MIN_INTERVAL = 0.5  # seconds between --watch refreshes: an operator's screen, not a load test of the control port
MAX_GRACE = 3600.0  # what the control API accepts for grace_s


def _seconds(low: float, high: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds within [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            if high is None:
                raise argparse.ArgumentTypeError(f"must be at least {low:g} seconds, got {text!r}")
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g} seconds, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from gateway.kinds import Protocol

    p = _Parser(prog="bastion", description="Reach private VMs through one public port.")
    p.add_argument("--version", action="version", version=f"bastion {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", "-c", required=True, help="TOML config file")
    s.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a config file and the files it names; print every problem `serve` would refuse")
    c.add_argument("config")
    c.add_argument("--no-files", action="store_true", help="check the config file only, not the files it names (e.g. on a build machine)")
    c.set_defaults(func=cmd_check_config)

    d = sub.add_parser("demo", help="run a self-contained demo on loopback (no config, no root)")
    default_state = os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "bastion-demo")
    d.add_argument("--state-dir", default=default_state)
    d.add_argument("--port", type=int, default=10443, help="public port on 127.0.0.1 (default 10443)")
    d.add_argument("--control-port", type=int, default=10444, help="control port on 127.0.0.1 (default 10444)")
    d.set_defaults(func=cmd_demo)

    cp = sub.add_parser("completion", help="print a shell completion script: source <(bastion completion bash)")
    cp.add_argument("shell", choices=["bash", "zsh"])
    cp.set_defaults(func=cmd_completion)

    h = sub.add_parser("hash-token", help="read a token on stdin, print its SHA-256 for [[operators]] token_sha256")
    h.set_defaults(func=cmd_hash_token)

    ls = sub.add_parser("sessions", help="list live sessions from the control port")
    _control_flags(ls)
    ls.add_argument("--json", action="store_true", help="print JSON (with --watch: one array a line)")
    ls.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    ls.add_argument(
        "--interval", type=_seconds(MIN_INTERVAL), default=2.0, help=f"seconds between refreshes with --watch (at least {MIN_INTERVAL:g})"
    )
    ls.add_argument("--user", help="only this user's sessions")
    ls.add_argument("--vm", help="only sessions to this VM")
    ls.add_argument("--protocol", choices=[str(k) for k in Protocol], help="only sessions of this protocol")
    ls.set_defaults(func=cmd_sessions)

    dc = sub.add_parser("disconnect", help="force sessions to end, with a notice to their users")
    _control_flags(dc)
    dc.add_argument("ids", nargs="+", metavar="ID")
    dc.add_argument("--reason", default="", help="shown to the users")
    dc.add_argument(
        "--grace", type=_seconds(0.0, MAX_GRACE), default=0.0, help=f"seconds of warning before the disconnect (0 to {MAX_GRACE:g})"
    )
    dc.set_defaults(func=cmd_disconnect)

    nt = sub.add_parser("notice", help="show a line of text to the users of live sessions (all of them without --id)")
    _control_flags(nt)
    nt.add_argument("message", metavar="TEXT", help="one line, shown as typed")
    nt.add_argument("--id", dest="ids", action="append", metavar="ID", help="a session to tell (repeat for several)")
    nt.set_defaults(func=cmd_notice)

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

    nd = sub.add_parser("nodes", help="the cluster's nodes, their sessions and last heartbeats (* marks the node answering)")
    _control_flags(nd)
    nd.add_argument("--json", action="store_true", help="print JSON")
    nd.set_defaults(func=cmd_nodes)

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


def _stdout_gone() -> None:
    """The reader of stdout went away (`bastion sessions --watch | head`): point fd 1 at /dev/null, so the
    interpreter's last flush does not fail again with a second BrokenPipeError."""
    null = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError):
        os.dup2(null, sys.stdout.fileno())
    os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    """The `bastion` command. Every error is one line on stderr and a non-zero status, never a traceback
    (BASTION_DEBUG=1 shows one for an unexpected error); a closed stdout ends a command quietly with 0, Ctrl-C
    with 130. `serve` and `demo` keep a traceback for a bug: it is the report a daemon's journal needs."""
    _ensure_std_fds()
    words = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if words[:1] == ["rdp"] and "--" in words:
        cut = words.index("--")
        words, passthrough = words[:cut], words[cut + 1 :]
    try:
        args = build_parser().parse_args(words)
        if passthrough:
            args.client_args = passthrough
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except KeyboardInterrupt:  # before or after the loop's own SIGINT handler
        return 130
    except BrokenPipeError:
        _stdout_gone()
        return 0
    except Exception as exc:
        from gateway.client.api import ControlError

        if isinstance(exc, ControlError):
            print(f"bastion: {exc.message}", file=sys.stderr)
            return 1
        if words[:1] in (["serve"], ["demo"]) or os.environ.get("BASTION_DEBUG"):
            raise
        print(f"bastion: unexpected error: {type(exc).__name__}: {exc} (BASTION_DEBUG=1 shows where)", file=sys.stderr)
        return 1
