"""Bulk throughput of the RD Gateway (both transports) vs a direct connection and vs the WebSocket tunnel.

Everything runs on 127.0.0.1; the gateway and the VM stand-in are their own processes:

    direct:   client (this process) ------------------------------------------------> vm (subprocess)
    tunnel:   client (this process) -> bastion tunnel (subprocess) -> gateway (subprocess) -> vm
    rdg-ws:   RD Gateway test client (this process, WebSocket transport) -> gateway (same one) -> vm
    rdg-http: RD Gateway test client (this process, HTTP transport: OUT + IN) -> gateway -> vm

The VM stand-in listens on the inventory VM's `rdp_port` (an `rdp` rule grants it to alice, for the tunnel and
the RD Gateway alike). Each connection starts with a 9-byte request (`U`pload, `D`ownload or `E`cho and a
length); the VM answers one byte `R` once it has read it, so tunnel setup (TLS, WebSocket upgrade, RDG
handshake, token check, dial) is timed apart from the transfer:

    upload   the client sends N bytes, the VM replies with its 8-byte count: ready -> count
    download the VM sends N bytes from a preallocated buffer: ready -> the last byte
    echo     the client sends N bytes while reading them back: ready -> the last byte back

The client always closes first (neither WebSockets nor the RD Gateway can half-close). Each RD Gateway
transfer gets a fresh token from the gateway shell (`ssh alice@gw rdp sink01`, untimed), as a user would.
The paths are measured alternately within each round and direction (direct, tunnel, rdg-ws, rdg-http, ...);
compare ratios from the same run, not absolute numbers. Gateway CPU is utime+stime from /proc/PID/stat
around each transfer.

Run: .venv/bin/python bench/rdg.py [--mb 200] [--rounds 3] [--directions upload,download,echo]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import uvloop  # noqa: E402

from bench.ssh_forward import (  # noqa: E402
    CHUNK,
    HOST,
    MB,
    GatewayProc,
    cores,
    hard_timeout,
    on_sigterm,
    remaining,
    tail,
    versions,
)
from bench.tunnel import VM, cleanup_uninterrupted, start_gateway, start_helper, stop_all  # noqa: E402
from tests.support import rdg_client  # noqa: E402
from tests.support.peers import KeyPair, make_key  # noqa: E402

RESULTS = REPO / "bench" / "results" / "rdg.json"
PATHS = ("direct", "tunnel", "rdg-ws", "rdg-http")
DIRECTIONS = ("upload", "download", "echo")
MODE = {"upload": b"U", "download": b"D", "echo": b"E"}
REQUEST = struct.Struct("!cQ")  # mode, length
COUNT = struct.Struct("!Q")
READY = b"R"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the VM stand-in


def run_vm(fd: int, lifetime: float) -> int:
    """The VM process: per connection, read the 9-byte request, answer READY, then upload/download/echo.

    Serves on a listening socket inherited from the parent and exits by itself after `lifetime` seconds.
    """
    deadline = time.monotonic() + lifetime
    payload = memoryview(os.urandom(CHUNK))
    srv = socket.socket(fileno=fd)
    srv.settimeout(1.0)
    while time.monotonic() < deadline:  # bounded by time; at most one accept a second when idle
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_serve_vm, args=(conn, payload, deadline), daemon=True).start()
    srv.close()
    return 0


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    for _ in range(n):  # bounded: at least one byte per read
        if len(out) == n:
            break
        data = conn.recv(n - len(out))
        if not data:
            raise ConnectionError("EOF inside the request")
        out += data
    return bytes(out)


def _serve_vm(conn: socket.socket, payload: memoryview, deadline: float) -> None:
    buf = bytearray(CHUNK)
    with conn:
        conn.settimeout(120.0)
        try:
            mode, n = REQUEST.unpack(_recv_exactly(conn, REQUEST.size))
            conn.sendall(READY)
            done = 0
            if mode == b"U":
                while done < n and time.monotonic() < deadline:
                    k = conn.recv_into(buf, min(len(buf), n - done))
                    if k == 0:
                        return
                    done += k
                conn.sendall(COUNT.pack(done))
            elif mode == b"D":
                for _ in range(-(-n // len(payload))):  # ceil(n / chunk) sends
                    k = min(len(payload), n - done)
                    conn.sendall(payload[:k])
                    done += k
            elif mode == b"E":
                view = memoryview(buf)
                while done < n and time.monotonic() < deadline:
                    k = conn.recv_into(buf, min(len(buf), n - done))
                    if k == 0:
                        return
                    conn.sendall(view[:k])
                    done += k
            else:
                return
            while time.monotonic() < deadline and conn.recv(65536):  # the client closes first
                pass
        except OSError:
            return


def start_vm(workdir: Path, lifetime: float) -> tuple[subprocess.Popen[bytes], int]:
    """Bind the VM's socket here, hand it to a child process, return (process, port)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        srv.bind((HOST, 0))
        srv.listen(64)
        port = int(srv.getsockname()[1])
        with (workdir / "vm.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--vm-fd", str(srv.fileno()), "--vm-lifetime", str(lifetime)],
                pass_fds=(srv.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
    finally:
        srv.close()
    return proc, port


# --------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class Timing:
    setup: float  # connect -> READY
    transfer: float  # READY -> done


def _check(direction: str, nbytes: int, got: int) -> None:
    if got != nbytes:
        raise RuntimeError(f"{direction}: {got} bytes instead of {nbytes}")


def stream_transfer(port: int, direction: str, nbytes: int, chunk: memoryview, deadline: float) -> Timing:
    """One transfer over a plain TCP connection to `port` (the VM itself or the bastion tunnel helper)."""
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=remaining(deadline)) as s:
        s.settimeout(remaining(deadline))
        s.sendall(REQUEST.pack(MODE[direction], nbytes))
        if _recv_exactly(s, 1) != READY:
            raise RuntimeError("the VM did not answer READY")
        t1 = time.perf_counter()
        if direction == "upload":
            _send_all(s, nbytes, chunk, deadline)
            _check(direction, nbytes, COUNT.unpack(_recv_exactly(s, COUNT.size))[0])
        elif direction == "download":
            _check(direction, nbytes, _recv_all(s, nbytes, deadline))
        else:
            errors: list[BaseException] = []

            def send() -> None:
                try:
                    _send_all(s, nbytes, chunk, deadline)
                except BaseException as exc:  # handed to the main thread, which raises it
                    errors.append(exc)

            sender = threading.Thread(target=send, name="echo-sender", daemon=True)
            sender.start()
            try:
                got = _recv_all(s, nbytes, deadline)
            finally:
                sender.join(timeout=remaining(deadline))
            if errors:
                raise errors[0]
            _check(direction, nbytes, got)
        return Timing(t1 - t0, time.perf_counter() - t1)


def _send_all(s: socket.socket, nbytes: int, chunk: memoryview, deadline: float) -> None:
    sent = 0
    for _ in range(-(-nbytes // len(chunk))):  # ceil(nbytes / chunk) sends
        n = min(len(chunk), nbytes - sent)
        remaining(deadline)
        s.sendall(chunk[:n])
        sent += n


def _recv_all(s: socket.socket, nbytes: int, deadline: float) -> int:
    buf = bytearray(CHUNK)
    got = 0
    while got < nbytes:  # bounded by the socket timeout and the deadline
        remaining(deadline)
        k = s.recv_into(buf)
        if k == 0:
            break
        got += k
    return got


async def _rdg_transfer(
    gw_port: int, ssl_ctx: ssl.SSLContext, token: str, transport: Literal["websocket", "http"], rdp_port: int, direction: str,
    nbytes: int, chunk: memoryview,
) -> Timing:  # fmt: skip
    t0 = time.perf_counter()
    tun = await rdg_client.connect(HOST, gw_port, ssl_ctx, token=token, resource=VM, rdp_port=rdp_port, transport=transport)
    try:
        await tun.sendall(REQUEST.pack(MODE[direction], nbytes))
        first = await tun.recv()
        if first[:1] != READY:
            raise RuntimeError(f"the VM did not answer READY through the RD Gateway (got {first[:16]!r}, error {tun.error!r})")
        t1 = time.perf_counter()
        rest = first[1:]  # READY may share a DATA packet with the first bytes that follow

        async def recv_n(n: int, keep: bool = False) -> tuple[int, bytes]:
            """Read until `n` bytes came (or the end); return the count and, with `keep`, the bytes."""
            got, parts = len(rest), [rest]
            while got < n:  # bounded: each recv returns data, or b"" at the end
                data = await tun.recv()
                if not data:
                    break
                got += len(data)
                if keep:
                    parts.append(data)
            return got, b"".join(parts)

        async def send_n() -> None:
            sent = 0
            for _ in range(-(-nbytes // len(chunk))):
                k = min(len(chunk), nbytes - sent)
                await tun.sendall(chunk[:k])
                sent += k

        if direction == "upload":
            await send_n()
            got, reply = await recv_n(COUNT.size, keep=True)
            _check(direction, nbytes, COUNT.unpack(reply[: COUNT.size])[0] if got >= COUNT.size else -1)
        elif direction == "download":
            _check(direction, nbytes, (await recv_n(nbytes))[0])
        else:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(send_n(), name="rdg-echo-sender")
                receiver = tg.create_task(recv_n(nbytes), name="rdg-echo-receiver")
            sender.result()
            _check(direction, nbytes, receiver.result()[0])
        return Timing(t1 - t0, time.perf_counter() - t1)
    finally:
        await tun.close()


def rdg_transfer(
    runner: asyncio.Runner, deadline: float, gw_port: int, ssl_ctx: ssl.SSLContext, token: str, transport: Literal["websocket", "http"],
    rdp_port: int, direction: str, nbytes: int, chunk: memoryview,
) -> Timing:  # fmt: skip
    async def bounded() -> Timing:
        async with asyncio.timeout(remaining(deadline)):
            return await _rdg_transfer(gw_port, ssl_ctx, token, transport, rdp_port, direction, nbytes, chunk)

    return runner.run(bounded())


def rdg_token(*, gw: GatewayProc, alice: KeyPair, known_hosts: Path, log: Path) -> str:
    """An RD Gateway token from the gateway shell, as a user gets one: `ssh alice@gw rdp sink01` prints an .rdp file."""
    argv = [
        "ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(alice.private),
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
        "-p", str(gw.port), f"alice@{HOST}", "rdp", VM,
    ]  # fmt: skip
    with log.open("ab") as err:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, timeout=30, check=False)
    for line in out.stdout.decode(errors="replace").splitlines():
        if line.startswith("gatewayaccesstoken:s:"):
            return line.split(":", 2)[2].strip()
    raise RuntimeError(f"`ssh alice@gw rdp {VM}` printed no gatewayaccesstoken (status {out.returncode})\n{tail(log)}")


# --------------------------------------------------------------------------- CPU


def proc_cpu(pid: int) -> float:
    """utime + stime of `pid` (all its threads) in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5), counted after "(comm)"


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- measuring


@dataclass
class Path_:
    name: str
    run: Callable[[str, int, float], Timing]  # (direction, nbytes, deadline) -> Timing
    helper_pid: int | None = None  # a client-side process whose CPU counts as the client's (bastion tunnel)
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def measure(path: Path_, direction: str, nbytes: int, deadline: float, pids: dict[str, int]) -> dict[str, float]:
    for name, pid in pids.items():
        if not Path(f"/proc/{pid}").exists():
            raise RuntimeError(f"{name} (pid {pid}) has exited")
    gw0, vm0, me0 = proc_cpu(pids["gateway"]), proc_cpu(pids["vm"]), self_cpu()
    h0 = proc_cpu(path.helper_pid) if path.helper_pid else 0.0
    t = path.run(direction, nbytes, deadline)
    gw1, vm1, me1 = proc_cpu(pids["gateway"]), proc_cpu(pids["vm"]), self_cpu()
    h1 = proc_cpu(path.helper_pid) if path.helper_pid else 0.0
    moved_gb = nbytes * (2 if direction == "echo" else 1) / 1e9  # echo crosses the gateway both ways
    return {
        "mb_s": nbytes / MB / t.transfer,
        "seconds": t.transfer,
        "setup_ms": t.setup * 1000,
        "gw_cpu_s_per_gb": (gw1 - gw0) / moved_gb,
        "client_cpu_s_per_gb": ((me1 - me0) + (h1 - h0)) / moved_gb,
        "vm_cpu_s_per_gb": (vm1 - vm0) / moved_gb,
    }


def med(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def run(args: argparse.Namespace) -> int:
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    nbytes = args.mb * MB
    warm = min(args.mb, 10) * MB
    per_transfer = 30.0 + args.mb  # fails below roughly 1 MB/s (echo: each way)
    overall = time.monotonic() + args.timeout
    chunk = memoryview(os.urandom(CHUNK))
    ncores = cores()
    vers = {**versions(), "aiohttp": importlib.metadata.version("aiohttp")}
    static_token = secrets.token_urlsafe(32)

    tmp = Path(tempfile.mkdtemp(prefix="bench-rdg-"))
    vm: subprocess.Popen[bytes] | None = None
    gw: GatewayProc | None = None
    helper = None
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)  # the client's loop, like the gateway's
    try:
        alice = make_key(tmp / "keys" / "alice")
        vm, vm_port = start_vm(tmp, lifetime=args.timeout + 60)
        gw, ca_file = start_gateway(
            tmp, alice=alice, token_sha256=hashlib.sha256(static_token.encode()).hexdigest(), sink_port=vm_port, rdp_port=vm_port
        )
        helper = start_helper(tmp, gw_port=gw.port, ca_file=ca_file, token=static_token, sink_port=vm_port)
        kh = tmp / "known_hosts"
        kh.write_text(f"[{HOST}]:{gw.port} {gw.host_key}\n")
        ssl_ctx = ssl.create_default_context(cafile=str(ca_file))
        ssh_log = tmp / "ssh-rdp.log"
        gw_port = gw.port

        def rdg(transport: Literal["websocket", "http"]) -> Callable[[str, int, float], Timing]:
            def go(direction: str, n: int, deadline: float) -> Timing:
                token = rdg_token(gw=gw, alice=alice, known_hosts=kh, log=ssh_log)  # untimed, before the CPU snapshot
                return rdg_transfer(runner, deadline, gw_port, ssl_ctx, token, transport, vm_port, direction, n, chunk)

            return go

        helper_port = helper.local_port
        paths = [
            Path_("direct", lambda d, n, dl: stream_transfer(vm_port, d, n, chunk, dl)),
            Path_("tunnel", lambda d, n, dl: stream_transfer(helper_port, d, n, chunk, dl), helper_pid=helper.proc.pid),
            Path_("rdg-ws", rdg("websocket")),
            Path_("rdg-http", rdg("http")),
        ]
        assert tuple(p.name for p in paths) == PATHS
        pids = {"gateway": gw.proc.pid, "vm": vm.pid, "bastion tunnel": helper.proc.pid}

        print(f"rdg: {args.mb} MB per transfer, {args.rounds} rounds, {', '.join(directions)}; alternating {' / '.join(PATHS)}")
        print(f"cores: {ncores['cpu_count']} (usable {ncores['usable']}) | python {vers['python']}, uvloop {vers['uvloop']}", end="")
        print(f", aiohttp {vers['aiohttp']} | VM {VM} rdp_port {vm_port}, gateway {HOST}:{gw.port} (TLS, self-signed)")

        for d in directions:
            for p in paths:
                s = measure(p, d, warm, min(overall, time.monotonic() + per_transfer), pids)
                print(f"  warm-up {d:<8} {p.name:<8} {warm // MB:>4} MB  {s['mb_s']:8.1f} MB/s")
        print()
        print(f"{'round':>5}  {'direction':<9}" + "".join(f"  {p.name + ' MB/s':>13}" for p in paths))
        for r in range(1, args.rounds + 1):
            for d in directions:
                for p in paths:  # direct, tunnel, rdg-ws, rdg-http, direct, ...
                    s = measure(p, d, nbytes, min(overall, time.monotonic() + per_transfer), pids)
                    p.samples.setdefault(d, []).append(s)
                print(f"{r:>5}  {d:<9}" + "".join(f"  {p.samples[d][-1]['mb_s']:>13.1f}" for p in paths))

        table = []
        for d in directions:
            base = {p.name: med(p.samples[d], "mb_s") for p in paths}
            for p in paths:
                table.append(
                    {
                        "direction": d,
                        "path": p.name,
                        "median_mb_s": base[p.name],
                        "x_direct": base[p.name] / base["direct"],
                        "x_tunnel": base[p.name] / base["tunnel"],
                        "gw_cpu_s_per_gb": med(p.samples[d], "gw_cpu_s_per_gb"),
                        "client_cpu_s_per_gb": med(p.samples[d], "client_cpu_s_per_gb"),
                        "vm_cpu_s_per_gb": med(p.samples[d], "vm_cpu_s_per_gb"),
                        "setup_ms": med(p.samples[d], "setup_ms"),
                    }
                )
        print()
        head = f"| {'direction':<9} | {'path':<8} | {'MB/s':>7} | {'/direct':>7} | {'/tunnel':>7} | {'gw CPU s/GB':>11} |"
        head += f" {'client CPU s/GB':>15} | {'setup ms':>8} |"
        print(head)
        print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
        for row in table:
            gw_cpu = "-" if row["path"] == "direct" else f"{row['gw_cpu_s_per_gb']:.2f}"
            print(
                f"| {row['direction']:<9} | {row['path']:<8} | {row['median_mb_s']:>7.0f} | {row['x_direct']:>7.2f}"
                f" | {row['x_tunnel']:>7.2f} | {gw_cpu:>11} | {row['client_cpu_s_per_gb']:>15.2f} | {row['setup_ms']:>8.1f} |"
            )
        print(f"medians of {args.rounds} rounds x {args.mb} MB, {ncores['cpu_count']} cores; MB/s higher is better, CPU lower")
        print("client CPU = this process (+ the bastion tunnel helper for `tunnel`); echo CPU is per GB through the gateway (2 x N)")

        summary = {
            "benchmark": "rdg",
            "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mb_per_transfer": args.mb,
            "rounds": args.rounds,
            "warmup_mb": warm // MB,
            "directions": directions,
            "order": "per round and direction: direct / tunnel / rdg-ws / rdg-http",
            "paths": {
                "direct": "TCP straight to the VM stand-in",
                "tunnel": "bastion tunnel (own process) -> wss /v1/tunnel -> gateway (own process) -> VM",
                "rdg-ws": "tests/support/rdg_client (this process, uvloop) -> RDG_OUT_DATA WebSocket -> gateway -> VM",
                "rdg-http": "tests/support/rdg_client (this process, uvloop) -> RDG_OUT_DATA + RDG_IN_DATA (HTTP) -> gateway -> VM",
            },
            "cores": ncores,
            "versions": vers,
            "samples": {p.name: {d: [{k: round(v, 4) for k, v in s.items()} for s in p.samples[d]] for d in directions} for p in paths},
            "table": [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in table],
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(REPO)}")
        return 0
    finally:
        with cleanup_uninterrupted():
            runner.close()
            stop_all(
                [
                    ("bastion tunnel", helper.proc if helper else None, 5.0),
                    ("gateway", gw.proc if gw else None, 10.0),
                    ("vm", vm, 5.0),
                ]
            )
            if args.keep_tmp:
                print(f"kept {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Bulk throughput: direct TCP vs bastion tunnel vs RD Gateway (WebSocket, HTTP), alternately.")
    p.add_argument("--mb", type=int, default=200, help="MB (10**6 bytes) per transfer and direction (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="measured transfers per path and direction; the median is reported (default 3)")
    p.add_argument("--directions", default=",".join(DIRECTIONS), help=f"comma-separated subset of {','.join(DIRECTIONS)} (default all)")
    p.add_argument("--timeout", type=int, default=1200, help="hard limit for the whole run in seconds (default 1200)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs) for debugging")
    p.add_argument("--vm-fd", type=int, help=argparse.SUPPRESS)  # internal: run as the VM stand-in
    p.add_argument("--vm-lifetime", type=float, default=600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vm_fd is not None:
        return run_vm(args.vm_fd, args.vm_lifetime)
    bad = [d for d in args.directions.split(",") if d.strip() and d.strip() not in DIRECTIONS]
    if bad or not args.directions.strip(","):
        p.error(f"--directions: unknown {bad}; choose from {','.join(DIRECTIONS)}")
    if not 1 <= args.mb <= 100_000 or not 1 <= args.rounds <= 1000 or args.timeout < 10:
        p.error("need 1 <= --mb <= 100000, 1 <= --rounds <= 1000, --timeout >= 10")
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with hard_timeout(args.timeout):
            return run(args)
    except (TimeoutError, RuntimeError, OSError, rdg_client.RdgRefused) as exc:
        print(f"rdg: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
