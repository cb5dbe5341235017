"""The `bastion` command."""

from __future__ import annotations

import argparse
import asyncio
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
    from gateway.logs import make_logger, quiet_libraries

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for path, msg in exc.problems:
            print(f"bastion: {args.config}: {path}: {msg}", file=sys.stderr)
        return 2
    quiet_libraries()
    log = make_logger(fmt=args.log_format, node=cfg.gateway.node)

    async def serve(stop: asyncio.Event) -> int:
        app = App(cfg, log)
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

    return _run(lambda stop: run_demo(stop, state_dir=args.state_dir, port=args.port))


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
    d.set_defaults(func=cmd_demo)
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
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)
