"""Bulk throughput of the WebSocket tunnel (`bastion tunnel`) vs a direct connection and vs `ssh -L`.

Everything runs on 127.0.0.1 in separate processes, so no two parties share an
event loop:

    direct:      client (this process) ---------------------------------------------------> sink (subprocess)
    tunnel:      client (this process) -> bastion tunnel (subprocess) -> gateway (subprocess) -> sink
    ssh-L:       client (this process) -> ssh -L (subprocess)         -> gateway (same one)   -> sink
    haproxy:     client (this process) -> haproxy, TCP mode (subprocess) ----------------------> sink
    haproxy-tls: client (this process) -> haproxy (TCP in, TLS out) -> haproxy (TLS in, TCP out) -> sink

haproxy-tls is the tunnel's shape built from haproxy: a local TCP port, one TLS hop on loopback, TCP to the VM,
in two processes (nbthread 1 each), as the helper and the gateway are two.

The gateway is one `python -m gateway serve` process that grants the sink's port both as
`tcp` (the WebSocket tunnel, with a static automation token) and as `ssh-jump` (the -L
forward). Each transfer connects, sends N MB (10**6 bytes each) from a preallocated
buffer, half-closes, and waits for the sink's byte count; the time from connect to reply
is the sample. The paths are measured alternately (direct, tunnel, ssh-L, direct, ...)
so slow drift on a shared machine hits all of them about equally; compare the ratios,
not the absolute numbers. The sink, the transfer and the ssh -L code come from
bench/ssh_forward.py.

With `--base SRC` (another source tree, e.g. `git archive BASE | tar -x -C /tmp/base`), a sixth path,
tunnel-base, runs the gateway and the helper from SRC (a second pair of processes, same venv), alternating with
the rest, so a change is compared with its base in one run.

CPU per MB and per new connection comes from the processes' own counters (/proc/PID/stat, utime + stime)
over each path's measured transfers: the gateway plus the helper for a tunnel, both haproxy processes for
haproxy-tls (the origin also carries the plain haproxy path, which is idle while haproxy-tls runs). The CPU per
new connection is also printed process by process (gateway and helper; origin and terminator).
Where processes land on the two cores changes the throughput ratio, not the CPU ratio.

TLS sessions: haproxy's TLS origin resumes its TLS sessions to the terminator by default (it keeps the last
session per server), and the helper offers its last session too; both hops do one full handshake and then
resumptions, so the connection rate compares like with like.

Run: .venv/bin/python bench/tunnel.py [--mb 200] [--rounds 5] [--base SRC]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import ssh_forward  # noqa: E402
from bench.ssh_forward import (  # noqa: E402
    CHUNK,
    DEFAULT_CIPHER,
    HOST,
    MB,
    Forward,
    GatewayProc,
    cores,
    hard_timeout,
    on_sigterm,
    start_forward,
    start_gateway_with,
    start_sink,
    stop_process,
    tail,
    toml_value,
    transfer,
    versions,
)
from gateway.net.tls import write_self_signed  # noqa: E402
from tests.support.peers import KeyPair, free_port, make_key  # noqa: E402

VM = "sink01"
RESULTS = REPO / "bench" / "results" / "tunnel.json"
PATHS = ("direct", "tunnel", "ssh-L", "haproxy", "haproxy-tls")
WHAT = {  # the process each path needs alive
    "direct": "the sink", "tunnel": "bastion tunnel", "tunnel-base": "bastion tunnel (--base)",
    "ssh-L": "ssh -L", "haproxy": "haproxy", "haproxy-tls": "haproxy (TLS origin)",
}  # fmt: skip
HAPROXY = """global
    maxconn 1000
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
{frontends}
"""


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if not found:
        raise RuntimeError("haproxy is missing: run scripts/install-test-deps.sh (make bench does)")
    return found


def start_haproxy(workdir: Path, name: str, frontends: str, port: int) -> subprocess.Popen[bytes]:
    cfg = workdir / f"{name}.cfg"
    cfg.write_text(HAPROXY.format(frontends=frontends))
    log = (workdir / f"{name}.log").open("ab")
    proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy {name} exited: {tail(workdir / f'{name}.log')}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return proc
        time.sleep(0.05)
    stop_process(proc)
    raise TimeoutError(f"haproxy {name} did not listen on {port}")


def start_haproxies(workdir: Path, sink_port: int) -> tuple[Forward, Forward, subprocess.Popen[bytes]]:
    """haproxy in TCP mode to the sink; and a TLS hop from two haproxy processes (origin, terminator)."""
    pem = workdir / "haproxy.pem"
    write_self_signed(workdir / "haproxy.crt", workdir / "haproxy.key", [HOST])
    pem.write_bytes((workdir / "haproxy.crt").read_bytes() + (workdir / "haproxy.key").read_bytes())
    tcp_port, orig_port, term_port = free_port(HOST), free_port(HOST), free_port(HOST)
    term = start_haproxy(
        workdir, "haproxy-term", f"listen term\n    bind {HOST}:{term_port} ssl crt {pem}\n    server sink {HOST}:{sink_port}", term_port
    )
    origin = start_haproxy(
        workdir, "haproxy-origin",
        f"listen tcp\n    bind {HOST}:{tcp_port}\n    server sink {HOST}:{sink_port}\n"
        f"listen origin\n    bind {HOST}:{orig_port}\n    server term {HOST}:{term_port} ssl verify none",
        orig_port,
    )  # fmt: skip
    return (
        Forward("haproxy", tcp_port, origin, workdir / "haproxy-origin.log"),
        Forward("haproxy-tls", orig_port, origin, workdir / "haproxy-origin.log"),
        term,
    )


# --------------------------------------------------------------------------- gateway


def gateway_toml(*, state_dir: Path, port: int, alice: KeyPair, token_sha256: str, sink_port: int, rdp_port: int | None = None) -> str:
    """The gateway's config; with `rdp_port` the VM lists it as its RDP port and an `rdp` rule grants it (bench/rdg.py)."""
    lines = [
        "[gateway]",
        f"node = {toml_value('bench')}",
        f"state_dir = {toml_value(str(state_dir))}",
        f"connect_timeout = {toml_value('5s')}",
        "workers = 1",  # one process: its CPU is the gateway's (bench/workers.py measures several)
        "",
        "[public]",
        f"listen = {toml_value([f'{HOST}:{port}'])}",
        "",
        "[control]",
        f"listen = {toml_value([f'{HOST}:0'])}",  # an ephemeral port: never collides with another gateway
        "",
        "[sessions]",  # the connection-rate rounds open hundreds of sessions a second: a policy limit, not a cost
        f"rate_per_user = {toml_value('off')}",
        "",
        "[[vms]]",
        f"name = {toml_value(VM)}",
        f"address = {toml_value(HOST)}",
        f"ssh_port = {toml_value(22)}",  # never dialled: neither path logs in to the VM
        f"trust_on_first_use = {toml_value(True)}",
        *([f"rdp_port = {toml_value(rdp_port)}"] if rdp_port is not None else []),
        "",
        "[[users]]",
        f"name = {toml_value('alice')}",
        f"keys = {toml_value([alice.public])}",
        f"groups = {toml_value(['bench'])}",
        f"tokens_sha256 = {toml_value([token_sha256])}",
        "",
        "[[rules]]",
        f"groups = {toml_value(['bench'])}",
        f"vms = {toml_value([VM])}",
        f"protocols = {toml_value(['tcp'])}",
        f"ports = {toml_value([sink_port])}",
        "",
        "[[rules]]",
        f"groups = {toml_value(['bench'])}",
        f"vms = {toml_value([VM])}",
        f"protocols = {toml_value(['ssh-jump'])}",
        f"ports = {toml_value([sink_port])}",
    ]
    if rdp_port is not None:  # no `ports`: an rdp rule grants the VM's rdp_port (tunnel, ssh -L and RD Gateway)
        lines += ["", "[[rules]]", f"groups = {toml_value(['bench'])}", f"vms = {toml_value([VM])}", f"protocols = {toml_value(['rdp'])}"]
    return "\n".join(lines) + "\n"


def start_gateway(
    workdir: Path, *, alice: KeyPair, token_sha256: str, sink_port: int, rdp_port: int | None = None, src: Path = REPO
) -> tuple[GatewayProc, Path]:
    """`python -m gateway serve` in its own process (see bench.ssh_forward), from the source tree `src`.
    Returns it and its tls.crt."""
    saved = ssh_forward.REPO
    ssh_forward.REPO = src  # the gateway's working directory: `python -m gateway` imports the tree found there
    try:
        gw = start_gateway_with(
            workdir,
            lambda state_dir, port: gateway_toml(
                state_dir=state_dir, port=port, alice=alice, token_sha256=token_sha256, sink_port=sink_port, rdp_port=rdp_port
            ),
        )
    finally:
        ssh_forward.REPO = saved
    return gw, workdir / "gw-state" / "tls.crt"  # written before the port is bound


# --------------------------------------------------------------------------- bastion tunnel


def wait_for_line(proc: subprocess.Popen[bytes], log: Path, offset: int, needle: bytes, what: str, timeout: float = 20.0) -> None:
    """Poll `log` past `offset` for `needle` in bounded slices, failing fast if `proc` has exited.

    Used instead of a test connection: every connection to the helper's port opens a tunnel.
    """
    for _ in range(max(1, int(timeout / 0.05))):
        with log.open("rb") as f:
            f.seek(offset)
            if needle in f.read():
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}\n{tail(log)}")
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not print {needle.decode()!r} after {timeout}s\n{tail(log)}")


def start_helper(
    workdir: Path, *, gw_port: int, ca_file: Path, token: str, sink_port: int, src: Path = REPO, name: str = "tunnel"
) -> Forward:
    """`python -m gateway tunnel` in its own process, as a user runs it; retried on a lost port race."""
    log = workdir / "tunnel-helper.log"
    # The token goes in the helper's documented environment variable (same as --token), so it is not in `ps`.
    env = {**os.environ, "BASTION_TUNNEL_TOKEN": token}
    last: Exception | None = None
    for _ in range(3):
        local = free_port(HOST)
        argv = [
            sys.executable, "-m", "gateway", "tunnel",
            "--gateway", f"{HOST}:{gw_port}", "--vm", VM, "--port", str(sink_port),
            "--local", f"{HOST}:{local}", "--ca-file", str(ca_file),
        ]  # fmt: skip
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, cwd=src, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            wait_for_line(proc, log, offset, b"listening on", "bastion tunnel")
        except (RuntimeError, TimeoutError) as exc:
            stop_process(proc)
            last = exc
            continue
        return Forward(name, local, proc, log)
    raise RuntimeError(f"bastion tunnel did not start: {last}")


# --------------------------------------------------------------------------- measuring


def cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> float:
    """utime + stime of running processes we started, in seconds."""
    total = 0
    for proc in procs:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(path: Forward, nbytes: int, chunk: memoryview, overall: float, per_transfer: float) -> tuple[float, float]:
    if path.proc.poll() is not None:
        raise RuntimeError(f"{WHAT[path.name]} ({path.name}) exited with status {path.proc.returncode}\n{tail(path.log)}")
    secs = transfer(path.local_port, nbytes, chunk, min(overall, time.monotonic() + per_transfer))
    return secs, nbytes / MB / secs


@contextmanager
def cleanup_uninterrupted() -> Iterator[None]:
    """Cancel the --timeout alarm and hold SIGTERM/SIGINT while children are ended, so cleanup runs to the end.

    Every step in it is bounded (stop_process waits at most 2 x grace).
    """
    signal.alarm(0)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a held signal is delivered here


def stop_all(procs: list[tuple[str, subprocess.Popen[bytes] | None, float]]) -> None:
    """End each process by its PID; one that will not die does not stop the others from being ended."""
    for name, proc, grace in procs:
        try:
            stop_process(proc, grace=grace)
        except (subprocess.TimeoutExpired, OSError) as exc:
            print(f"tunnel: could not stop {name} (pid {proc.pid if proc else '?'}): {exc}", file=sys.stderr)


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    nbytes = args.mb * MB
    warm = min(args.mb, 10) * MB
    per_transfer = 30.0 + args.mb  # fails below roughly 1 MB/s
    overall = time.monotonic() + args.timeout
    chunk = memoryview(os.urandom(CHUNK))
    ncores = cores()
    vers = {**versions(), "aiohttp": importlib.metadata.version("aiohttp")}
    token = secrets.token_urlsafe(32)

    tmp = Path(tempfile.mkdtemp(prefix="bench-tunnel-"))
    sink: subprocess.Popen[bytes] | None = None
    gw: GatewayProc | None = None
    helper: Forward | None = None
    base_gw: GatewayProc | None = None
    base_helper: Forward | None = None
    ssh_l: Forward | None = None
    haproxy: Forward | None = None
    haproxy_term: subprocess.Popen[bytes] | None = None
    try:
        alice = make_key(tmp / "keys" / "alice")
        sink, sink_port = start_sink(tmp, lifetime=args.timeout + 60)
        gw, ca_file = start_gateway(tmp, alice=alice, token_sha256=hashlib.sha256(token.encode()).hexdigest(), sink_port=sink_port)
        helper = start_helper(tmp, gw_port=gw.port, ca_file=ca_file, token=token, sink_port=sink_port)
        kh = tmp / "known_hosts"
        kh.write_text(f"[{HOST}]:{gw.port} {gw.host_key}\n")
        ssh_l = start_forward(
            "ssh-L",
            tmp,
            identity=alice.private,
            known_hosts=kh,
            cipher=args.cipher,
            port=gw.port,
            login="alice",
            dest=VM,
            dest_port=sink_port,
        )
        direct = Forward("direct", sink_port, sink, tmp / "sink.log")  # no forwarder: straight to the sink
        haproxy, haproxy_tls, haproxy_term = start_haproxies(tmp, sink_port)
        paths = [direct, helper, ssh_l, haproxy, haproxy_tls]
        assert tuple(p.name for p in paths) == PATHS
        # The processes whose CPU each path costs (the sink's is the same for all and left out).
        cpu_of: dict[str, list[subprocess.Popen[bytes]]] = {
            "tunnel": [gw.proc, helper.proc],
            "haproxy-tls": [haproxy_tls.proc, haproxy_term],
        }
        if args.base:
            src = Path(args.base).resolve()
            (tmp / "base").mkdir()
            base_gw, base_ca = start_gateway(
                tmp / "base", alice=alice, token_sha256=hashlib.sha256(token.encode()).hexdigest(), sink_port=sink_port, src=src
            )
            base_helper = start_helper(
                tmp / "base", gw_port=base_gw.port, ca_file=base_ca, token=token, sink_port=sink_port, src=src, name="tunnel-base"
            )
            paths.insert(2, base_helper)
            cpu_of["tunnel-base"] = [base_gw.proc, base_helper.proc]
            print(f"tunnel-base: gateway and helper from {src}")
        names = [p.name for p in paths]
        cpu_bulk = dict.fromkeys(cpu_of, 0.0)
        cpu_conn = dict.fromkeys(cpu_of, 0.0)
        # The same CPU per new connection, process by process (which side of a path costs what).
        roles = {"tunnel": ("gateway", "helper"), "tunnel-base": ("gateway", "helper"), "haproxy-tls": ("origin", "terminator")}
        cpu_conn_parts = {k: [0.0] * len(procs) for k, procs in cpu_of.items()}

        algos = ssh_l.negotiated()
        print(f"tunnel: {args.mb} MB per transfer, {args.rounds} rounds, alternating {' / '.join(names)}")
        print(f"cores: {ncores['cpu_count']} (usable {ncores['usable']})", end=" | ")
        print(f"ssh-L cipher requested: {args.cipher} | negotiated: {algos.get('cipher_c2s', '?')}, kex {algos.get('kex', '?')}")
        print(f"  tunnel: wss://{HOST}:{gw.port}/v1/tunnel?vm={VM}&port={sink_port} (TLS, self-signed, static token)")
        print(f"  {vers['openssh']}; python {vers['python']}, asyncssh {vers['asyncssh']}", end=", ")
        print(f"aiohttp {vers['aiohttp']}, uvloop {vers['uvloop']}")
        if algos.get("cipher_c2s") != args.cipher:
            print(f"warning: ssh -L negotiated {algos.get('cipher_c2s', '?')}, not the requested {args.cipher}", file=sys.stderr)

        for p in paths:
            _, rate = measure(p, warm, chunk, overall, per_transfer)
            print(f"  warm-up {p.name:<7} {warm // MB:>4} MB  {rate:8.1f} MB/s")

        print()
        cols = "".join(f"  {p.name + ' MB/s':>12}  {'(s)':>6}" for p in paths)
        print(f"{'round':>5}{cols}  {'tun/dir':>7}  {'tun/ssh':>7}  {'tun/tls':>7}")
        for r in range(1, args.rounds + 1):
            for p in paths:  # direct, tunnel, ssh-L, direct, ...
                c0 = cpu_seconds(cpu_of[p.name]) if p.name in cpu_of else 0.0
                secs, rate = measure(p, nbytes, chunk, overall, per_transfer)
                if p.name in cpu_of:
                    cpu_bulk[p.name] += cpu_seconds(cpu_of[p.name]) - c0
                p.samples.append(rate)
                p.seconds.append(secs)
            row = "".join(f"  {p.samples[-1]:>12.1f}  {p.seconds[-1]:>6.3f}" for p in paths)
            ratios = [helper.samples[-1] / x.samples[-1] for x in (direct, ssh_l, haproxy_tls)]
            print(f"{r:>5}{row}" + "".join(f"  {x:>7.2f}" for x in ratios))

        # New connections per second: each is connect, one byte, half-close, the sink's reply, close (through the
        # tunnel: a new WebSocket, TLS handshake and session each). Alternating blocks of --conns per path.
        conn_rates: dict[str, list[float]] = {p.name: [] for p in paths}
        if args.conns:
            print(f"\nnew connections per second ({args.conns} in a row per path and round)")
            for r in range(1, args.rounds + 1):
                for p in paths:
                    parts0 = [cpu_seconds([proc]) for proc in cpu_of.get(p.name, [])]
                    t0 = time.perf_counter()
                    for _ in range(args.conns):
                        measure(p, 1, chunk, overall, per_transfer)
                    conn_rates[p.name].append(args.conns / (time.perf_counter() - t0))
                    if p.name in cpu_of:
                        parts1 = [cpu_seconds([proc]) for proc in cpu_of[p.name]]
                        for i, (a, b) in enumerate(zip(parts0, parts1, strict=True)):
                            cpu_conn_parts[p.name][i] += b - a
                        cpu_conn[p.name] += sum(parts1) - sum(parts0)
                print(f"{r:>5}" + "".join(f"  {p.name} {conn_rates[p.name][-1]:8.0f}/s" for p in paths))
        conn_med = {k: statistics.median(v) for k, v in conn_rates.items() if v}

        med = {p.name: statistics.median(p.samples) for p in paths}
        over_direct = med["tunnel"] / med["direct"]
        over_ssh = med["tunnel"] / med["ssh-L"]
        over_tls = med["tunnel"] / med["haproxy-tls"]
        headline = (
            f"direct {med['direct']:.0f} MB/s | tunnel {med['tunnel']:.0f} MB/s | ssh-L {med['ssh-L']:.0f} MB/s"
            f" | haproxy {med['haproxy']:.0f} | haproxy-tls {med['haproxy-tls']:.0f}"
            f" | tunnel/direct {over_direct:.2f} | tunnel/ssh-L {over_ssh:.2f} | tunnel/haproxy-tls {over_tls:.2f}"
        )
        if conn_med:
            headline += (
                f" || new conns/s: tunnel {conn_med['tunnel']:.0f}, haproxy {conn_med['haproxy']:.0f},"
                f" haproxy-tls {conn_med['haproxy-tls']:.0f} | tunnel/haproxy-tls {conn_med['tunnel'] / conn_med['haproxy-tls']:.2f}"
            )
        if "tunnel-base" in med:
            headline += f" | tunnel/tunnel-base {med['tunnel'] / med['tunnel-base']:.2f}"
            if conn_med:
                headline += f", new conns/s tunnel/tunnel-base {conn_med['tunnel'] / conn_med['tunnel-base']:.2f}"
        ms_per_mb = {k: round(v * 1000 / (args.mb * args.rounds), 3) for k, v in cpu_bulk.items()}
        ms_per_conn = {k: round(v * 1000 / (args.conns * args.rounds), 3) for k, v in cpu_conn.items()} if args.conns else {}
        per_conn = 1000 / (args.conns * args.rounds) if args.conns else 0.0
        ms_per_conn_parts = {
            k: {role: round(v * per_conn, 3) for role, v in zip(roles[k], parts, strict=True)} for k, parts in cpu_conn_parts.items()
        } if args.conns else {}  # fmt: skip
        print()
        print(headline)
        print("CPU ms per MB (both processes of a path): " + ", ".join(f"{k} {v}" for k, v in ms_per_mb.items()))
        if ms_per_conn:
            print("CPU ms per new connection: " + ", ".join(f"{k} {v}" for k, v in ms_per_conn.items()))
            print(
                "  by process: "
                + " | ".join(f"{k} " + ", ".join(f"{role} {v}" for role, v in parts.items()) for k, parts in ms_per_conn_parts.items())
            )
        print(f"medians of {args.rounds} rounds x {args.mb} MB, {ncores['cpu_count']} cores; ssh-L cipher {args.cipher}; higher is better")

        summary = {
            "benchmark": "tunnel",
            "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mb_per_transfer": args.mb,
            "bytes_per_transfer": nbytes,
            "rounds": args.rounds,
            "warmup_mb": warm // MB,
            "order": "alternating, " + " / ".join(names) + " in each round",
            "base_src": str(Path(args.base).resolve()) if args.base else None,
            "cpu_ms_per_mb": ms_per_mb,
            "cpu_ms_per_conn": ms_per_conn,
            "cpu_ms_per_conn_by_process": ms_per_conn_parts,
            "paths": {
                "direct": "TCP straight to the sink",
                "tunnel": "bastion tunnel (own process) -> wss /v1/tunnel -> gateway (own process) -> sink",
                "tunnel-base": "the same, gateway and helper from --base",
                "ssh-L": "ssh -L -> gateway jump mode (same gateway process) -> sink",
                "haproxy": "haproxy TCP mode (own process, nbthread 1) -> sink",
                "haproxy-tls": "haproxy (TCP in, TLS out) -> haproxy (TLS in, TCP out) -> sink: two processes, one TLS hop",
            },
            "cipher_requested": args.cipher,
            "negotiated_ssh_l": algos,
            "cores": ncores,
            "versions": vers,
            "samples_mb_per_s": {p.name: [round(x, 2) for x in p.samples] for p in paths},
            "seconds": {p.name: [round(x, 4) for x in p.seconds] for p in paths},
            "median_mb_per_s": {k: round(v, 2) for k, v in med.items()},
            "ratio_tunnel_over_direct": round(over_direct, 4),
            "ratio_tunnel_over_ssh_l": round(over_ssh, 4),
            "ratio_tunnel_over_haproxy_tls": round(over_tls, 4),
            "conns_per_round": args.conns,
            "conns_per_s": {k: [round(x, 1) for x in v] for k, v in conn_rates.items()},
            "median_conns_per_s": {k: round(v, 1) for k, v in conn_med.items()},
            "summary": headline,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(REPO)}")
        return 0
    finally:
        with cleanup_uninterrupted():
            stop_all(
                [
                    ("bastion tunnel", helper.proc if helper else None, 5.0),
                    ("bastion tunnel (base)", base_helper.proc if base_helper else None, 5.0),
                    ("gateway (base)", base_gw.proc if base_gw else None, 10.0),
                    ("ssh -L", ssh_l.proc if ssh_l else None, 5.0),
                    ("haproxy", haproxy.proc if haproxy else None, 5.0),
                    ("haproxy (TLS end)", haproxy_term, 5.0),
                    ("gateway", gw.proc if gw else None, 10.0),
                    ("sink", sink, 5.0),
                ]
            )
            if args.keep_tmp:
                print(f"kept {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Bulk throughput: direct TCP vs bastion tunnel vs ssh -L through the gateway, alternately.")
    p.add_argument("--mb", type=int, default=200, help="MB (10**6 bytes) per transfer (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="measured transfers per path (default 5)")
    p.add_argument("--conns", type=int, default=200, help="new connections per path and round for the connection rate (0: skip)")
    p.add_argument("--cipher", default=DEFAULT_CIPHER, help=f"ssh -c CIPHER for the ssh-L path (default {DEFAULT_CIPHER})")
    p.add_argument("--timeout", type=int, default=900, help="hard limit for the whole run in seconds (default 900)")
    p.add_argument("--base", metavar="SRC", help="also run a tunnel-base path: gateway and helper from this source tree")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs) for debugging")
    args = p.parse_args(argv)
    if not 1 <= args.mb <= 100_000 or not 1 <= args.rounds <= 1000 or args.timeout < 10:
        p.error("need 1 <= --mb <= 100000, 1 <= --rounds <= 1000, --timeout >= 10")
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with hard_timeout(args.timeout):
            return run(args)
    except (TimeoutError, RuntimeError, OSError) as exc:
        print(f"tunnel: FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
