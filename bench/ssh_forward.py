"""Bulk throughput of one `ssh -L` forward: the gateway's jump mode vs OpenSSH sshd.

Everything runs on 127.0.0.1 in separate processes, so no two parties share an
event loop:

    client (this process) -> ssh -L -> gateway (subprocess, uvloop) -> sink (subprocess)
    client (this process) -> ssh -L -> sshd    (subprocess)         -> sink (same sink)

Each transfer connects to the local forward port, sends N MB (10**6 bytes each)
from a preallocated buffer, half-closes, and waits for the sink's byte count.
The time from connect to reply is the sample. The two paths are measured
alternately (gateway, sshd, gateway, sshd, ...) so slow drift on a shared
machine hits both about equally; compare the ratio, not the absolute numbers.

With `--tree NAME=PATH` the gateway of another source tree (e.g. a `git archive` of an earlier commit) is measured
too, in the same rounds: gateway, sshd, NAME, gateway, sshd, NAME, ... Each gateway's CPU per MB is its process's
user+system time over the transfer.

Run: .venv/bin/python bench/ssh_forward.py [--mb 200] [--rounds 5] [--tree base=/tmp/base]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncssh  # noqa: E402

from tests.support.peers import SSHD, KeyPair, free_port, make_key, start_sshd, wait_port  # noqa: E402

HOST = "127.0.0.1"
MB = 1_000_000  # MB and MB/s are decimal: 10**6 bytes
CHUNK = MB  # one preallocated send buffer, reused for every sendall
DEFAULT_CIPHER = "aes128-gcm@openssh.com"
RESULTS = REPO / "bench" / "results" / "ssh_forward.json"
# --------------------------------------------------------------------------- sink


def run_sink(fd: int, lifetime: float) -> int:
    """The sink process: for each connection read to EOF, reply with the byte count, close.

    It serves on a listening socket inherited from the parent (no port race) and
    exits on its own after `lifetime` seconds if nobody stops it.
    """
    deadline = time.monotonic() + lifetime
    srv = socket.socket(fileno=fd)
    srv.settimeout(1.0)
    while time.monotonic() < deadline:  # bounded by time; at most one accept per second when idle
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_drain, args=(conn, deadline), daemon=True).start()
    srv.close()
    return 0


def _drain(conn: socket.socket, deadline: float) -> None:
    buf = bytearray(1 << 20)
    total = 0
    with conn:
        conn.settimeout(120.0)
        try:
            while time.monotonic() < deadline:  # bounded by time (and by EOF)
                n = conn.recv_into(buf)
                if n == 0:
                    conn.sendall(str(total).encode())
                    return
                total += n
        except OSError:
            return


def start_sink(workdir: Path, lifetime: float) -> tuple[subprocess.Popen[bytes], int]:
    """Bind the sink's socket here, hand it to a child process, return (process, port)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        srv.bind((HOST, 0))
        srv.listen(64)
        port = int(srv.getsockname()[1])
        with (workdir / "sink.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--sink-fd", str(srv.fileno()), "--sink-lifetime", str(lifetime)],
                pass_fds=(srv.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
    finally:
        srv.close()  # the child holds its own copy
    return proc, port


# --------------------------------------------------------------------------- processes


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """End one process we started, by its PID: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 20.0) -> None:
    """wait_port in bounded slices, failing fast if the process that should listen has exited."""
    for _ in range(max(1, int(timeout / 0.25))):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {HOST}:{port}\n{tail(log)}")
        try:
            wait_port(HOST, port, timeout=0.25)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"{what} not listening on {HOST}:{port} after {timeout}s\n{tail(log)}")


# --------------------------------------------------------------------------- gateway


def toml_value(v: Any) -> str:
    """Just enough TOML for the config below (JSON strings are valid TOML basic strings)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"unsupported TOML value: {v!r}")


def gateway_toml(*, state_dir: Path, port: int, sshd: SSHD, vm_login_key: KeyPair, alice: KeyPair, sink_port: int) -> str:
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
        "[control]",  # an ephemeral port, so a gateway already on 4443 does not stop the benchmark
        f"listen = {toml_value([f'{HOST}:0'])}",
        "",
        "[[vms]]",
        f"name = {toml_value('sink01')}",
        f"address = {toml_value(HOST)}",
        f"ssh_port = {toml_value(sshd.port)}",
        f"host_key = {toml_value(sshd.host_key.public)}",
        f"default_login = {toml_value('bench')}",
        "[vms.logins.bench]",
        f"key = {toml_value(str(vm_login_key.private))}",  # jump mode never logs in to the VM
        "",
        "[[users]]",
        f"name = {toml_value('alice')}",
        f"keys = {toml_value([alice.public])}",
        f"groups = {toml_value(['bench'])}",
        "",
        "[[rules]]",
        f"groups = {toml_value(['bench'])}",
        f"vms = {toml_value(['sink01'])}",
        f"protocols = {toml_value(['ssh-jump'])}",
        f"ports = {toml_value([sink_port])}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class GatewayProc:
    proc: subprocess.Popen[bytes]
    port: int
    host_key: str  # OpenSSH one-line public key
    log: Path


def start_gateway(workdir: Path, tree: Path = REPO, **config: Any) -> GatewayProc:
    """`python -m gateway serve` (of source tree `tree`) in its own process; retried on a lost port race."""
    return start_gateway_with(workdir, lambda state_dir, port: gateway_toml(state_dir=state_dir, port=port, **config), tree)


def start_gateway_with(workdir: Path, make_toml: Callable[[Path, int], str], tree: Path = REPO) -> GatewayProc:
    """Start `python -m gateway serve` with the config `make_toml(state_dir, public_port)`, retried on a lost port race."""
    from bench.floods import gateway_python  # here: bench.floods imports this module

    argv, env = gateway_python(tree)
    workdir.mkdir(parents=True, exist_ok=True)
    state_dir = workdir / "gw-state"
    cfg = workdir / "gateway.toml"
    log = workdir / "gateway.log"
    last: Exception | None = None
    for _ in range(3):
        port = free_port(HOST)
        cfg.write_text(make_toml(state_dir, port))
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*argv, "-m", "gateway", "serve", "--config", str(cfg), "--log-format", "json"],
                cwd=tree,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        try:
            wait_listening(port, proc, "gateway", log)
        except (RuntimeError, TimeoutError) as exc:
            stop_process(proc)
            last = exc
            continue
        host_key = (state_dir / "ssh_host_ed25519_key.pub").read_text().strip()
        return GatewayProc(proc, port, host_key, log)
    raise RuntimeError(f"gateway did not start: {last}")


# --------------------------------------------------------------------------- ssh -L


@dataclass
class Forward:
    name: str
    local_port: int
    proc: subprocess.Popen[bytes]
    log: Path
    samples: list[float] = field(default_factory=list)  # MB/s
    seconds: list[float] = field(default_factory=list)
    cpu_pid: int | None = None  # a gateway: its CPU per MB is measured
    cpu: list[float] = field(default_factory=list)  # ms per MB

    def negotiated(self) -> dict[str, str]:
        """Algorithms from `ssh -v`, to prove both paths ran the same cipher."""
        text = self.log.read_text(errors="replace")
        out: dict[str, str] = {}
        if m := re.search(r"kex: algorithm: (\S+)", text):
            out["kex"] = m.group(1)
        if m := re.search(r"kex: client->server cipher: (\S+) MAC: (\S+) compression: (\S+)", text):
            out["cipher_c2s"], out["mac_c2s"], out["compression_c2s"] = m.group(1), m.group(2), m.group(3)
        if m := re.search(r"kex: server->client cipher: (\S+)", text):
            out["cipher_s2c"] = m.group(1)
        if m := re.search(r"Server host key: (\S+)", text):
            out["host_key"] = m.group(1)
        return out


def start_forward(
    name: str, workdir: Path, *, identity: Path, known_hosts: Path, cipher: str, port: int, login: str, dest: str, dest_port: int
) -> Forward:
    last: Exception | None = None
    log = workdir / f"ssh-{name}.log"
    for _ in range(3):
        local = free_port(HOST)
        argv = [
            "ssh", "-v", "-N", "-F", "/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-i", str(identity),
            "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "ExitOnForwardFailure=yes",
            "-o", "ConnectTimeout=10",
            "-c", cipher,
            "-p", str(port),
            "-L", f"{HOST}:{local}:{dest}:{dest_port}",
            f"{login}@{HOST}",
        ]  # fmt: skip
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out)
        try:
            wait_listening(local, proc, f"ssh -L ({name})", log)
        except (RuntimeError, TimeoutError) as exc:
            stop_process(proc)
            last = exc
            continue
        return Forward(name, local, proc, log)
    raise RuntimeError(f"ssh forward through {name} did not start: {last}")


# --------------------------------------------------------------------------- measuring


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("transfer deadline passed")
    return left


def transfer(port: int, nbytes: int, chunk: memoryview, deadline: float) -> float:
    """Send `nbytes` through the forward, half-close, check the sink's count. Returns seconds."""
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=remaining(deadline)) as s:
        sent = 0
        for _ in range(-(-nbytes // len(chunk))):  # bounded: ceil(nbytes / chunk) sends
            n = min(len(chunk), nbytes - sent)
            s.settimeout(remaining(deadline))
            s.sendall(chunk[:n])
            sent += n
        s.shutdown(socket.SHUT_WR)
        reply = bytearray()
        for _ in range(32):  # the reply is a short decimal number, then EOF
            s.settimeout(remaining(deadline))
            data = s.recv(64)
            if not data:
                break
            reply += data
        else:
            raise RuntimeError(f"sink reply too long: {bytes(reply[:80])!r}")
    elapsed = time.perf_counter() - t0
    if reply.decode(errors="replace") != str(nbytes):
        raise RuntimeError(f"sink counted {reply.decode(errors='replace')!r} bytes, sent {nbytes} (port {port})")
    return elapsed


def measure(fwd: Forward, nbytes: int, chunk: memoryview, overall: float, per_transfer: float) -> tuple[float, float]:
    if fwd.proc.poll() is not None:
        raise RuntimeError(f"ssh -L ({fwd.name}) exited with status {fwd.proc.returncode}\n{tail(fwd.log)}")
    secs = transfer(fwd.local_port, nbytes, chunk, min(overall, time.monotonic() + per_transfer))
    return secs, nbytes / MB / secs


# --------------------------------------------------------------------------- main


@contextmanager
def hard_timeout(seconds: int) -> Iterator[None]:
    """Backstop for the whole run: SIGALRM raises in the main thread, so every `finally` still runs."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"benchmark exceeded --timeout {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`, so children are ended


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def versions() -> dict[str, str]:
    ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10, check=False)
    return {
        "python": platform.python_version(),
        "asyncssh": asyncssh.__version__,
        "uvloop": importlib.metadata.version("uvloop"),
        "openssh": (ssh_v.stderr or ssh_v.stdout).strip(),
        "kernel": platform.release(),
    }


def cores() -> dict[str, int]:
    return {"cpu_count": os.cpu_count() or 0, "usable": len(os.sched_getaffinity(0))}


def run(args: argparse.Namespace) -> int:
    nbytes = args.mb * MB
    warm = min(args.mb, 10) * MB
    per_transfer = 30.0 + args.mb  # fails below roughly 1 MB/s
    overall = time.monotonic() + args.timeout
    chunk = memoryview(os.urandom(CHUNK))
    ncores = cores()
    vers = versions()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ssh-forward-"))
    sink: subprocess.Popen[bytes] | None = None
    sshd: SSHD | None = None
    gws: list[GatewayProc] = []
    forwards: list[Forward] = []
    try:
        keys = tmp / "keys"
        alice = make_key(keys / "alice")
        vm_login = make_key(keys / "gw_to_vm")

        sink, sink_port = start_sink(tmp, lifetime=args.timeout + 60)
        sshd = start_sshd(tmp / "sshd", [alice.public])
        trees = [("gateway", REPO)] + [(n, Path(t).resolve()) for n, _, t in (x.partition("=") for x in args.tree)]
        for name, tree in trees:
            work = tmp if name == "gateway" else tmp / name
            gws.append(start_gateway(work, tree, sshd=sshd, vm_login_key=vm_login, alice=alice, sink_port=sink_port))

        kh = tmp / "known_hosts"
        kh.write_text("".join(f"[{HOST}]:{g.port} {g.host_key}\n" for g in gws) + f"[{HOST}]:{sshd.port} {sshd.host_key.public}\n")
        common: dict[str, Any] = {"identity": alice.private, "known_hosts": kh, "cipher": args.cipher, "dest_port": sink_port}
        for (name, _), g in zip(trees, gws, strict=True):
            forwards.append(start_forward(name, tmp, port=g.port, login="alice", dest="sink01", **common))
            forwards[-1].cpu_pid = g.proc.pid
        forwards.insert(1, start_forward("sshd", tmp, port=sshd.port, login=sshd.login, dest=HOST, **common))

        algos = {f.name: f.negotiated() for f in forwards}
        used = {a.get("cipher_c2s", "?") for a in algos.values()} | {a.get("cipher_s2c", "?") for a in algos.values()}
        print(f"ssh_forward: {args.mb} MB per transfer, {args.rounds} rounds, alternating {' / '.join(f.name for f in forwards)}")
        print(f"cores: {ncores['cpu_count']} (usable {ncores['usable']})", end=" | ")
        print(f"cipher requested: {args.cipher} | negotiated: {', '.join(sorted(used))}")
        for f in forwards:
            a = {k: algos[f.name].get(k, "?") for k in ("kex", "cipher_c2s", "mac_c2s", "compression_c2s")}
            print(f"  {f.name:<8} kex {a['kex']}, cipher {a['cipher_c2s']}, mac {a['mac_c2s']}, compression {a['compression_c2s']}")
        print(f"  {vers['openssh']}; python {vers['python']}, asyncssh {vers['asyncssh']}, uvloop {vers['uvloop']}")
        if used != {args.cipher}:
            print(f"warning: negotiated cipher(s) {sorted(used)} differ from the requested {args.cipher}", file=sys.stderr)

        for f in forwards:
            secs, rate = measure(f, warm, chunk, overall, per_transfer)
            print(f"  warm-up {f.name:<8} {warm // MB:>4} MB  {rate:8.1f} MB/s")

        print()
        sshd_fwd = forwards[1]
        for r in range(1, args.rounds + 1):
            for f in forwards:  # gateway, sshd, [trees], gateway, sshd, ...
                cpu0 = cpu_of(f.cpu_pid) if f.cpu_pid is not None else 0.0
                secs, rate = measure(f, nbytes, chunk, overall, per_transfer)
                f.samples.append(rate)
                f.seconds.append(secs)
                if f.cpu_pid is not None:
                    f.cpu.append((cpu_of(f.cpu_pid) - cpu0) * 1000 / (nbytes / MB))
            cells = []
            for f in forwards:
                cpu = f" {f.cpu[-1]:.2f} ms/MB" if f.cpu_pid is not None else ""
                ratio = f" ({f.samples[-1] / sshd_fwd.samples[-1]:.2f}x)" if f is not sshd_fwd else ""
                cells.append(f"{f.name} {f.samples[-1]:7.1f} MB/s{ratio}{cpu}")
            print(f"  round {r}: " + " | ".join(cells))

        med = {f.name: statistics.median(f.samples) for f in forwards}
        ratio = med["gateway"] / med["sshd"]
        print()
        headline = (
            f"gateway median {med['gateway']:.1f} MB/s | sshd median {med['sshd']:.1f} MB/s"
            f" | ratio {ratio:.2f} (gateway/sshd, higher is better)"
        )
        print(headline)
        for f in forwards:
            if f.cpu_pid is not None:
                extra = f", {med[f.name] / med['sshd']:.2f}x sshd" if f.name != "gateway" else ""
                cpu = f"{statistics.median(f.cpu):.2f} ms/MB [{min(f.cpu):.2f}-{max(f.cpu):.2f}]"
                print(f"  {f.name:<8} {med[f.name]:7.1f} MB/s{extra}, CPU {cpu}")
        print(f"cipher {args.cipher}, {ncores['cpu_count']} cores, {args.mb} MB x {args.rounds} rounds")

        summary = {
            "benchmark": "ssh_forward",
            "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mb_per_transfer": args.mb,
            "bytes_per_transfer": nbytes,
            "rounds": args.rounds,
            "order": "alternating, gateway first in each round",
            "cipher_requested": args.cipher,
            "negotiated": algos,
            "cores": ncores,
            "versions": vers,
            "samples_mb_per_s": {f.name: [round(x, 2) for x in f.samples] for f in forwards},
            "seconds": {f.name: [round(x, 4) for x in f.seconds] for f in forwards},
            "median_mb_per_s": {k: round(v, 2) for k, v in med.items()},
            "cpu_ms_per_mb": {f.name: [round(x, 3) for x in f.cpu] for f in forwards if f.cpu_pid is not None},
            "ratio_gateway_over_sshd": round(ratio, 4),
            "summary": headline,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(REPO)}")
        return 0
    finally:
        for f in forwards:
            stop_process(f.proc)
        for g in gws:
            stop_process(g.proc, grace=10.0)
        if sshd is not None:
            sshd.stop()
        stop_process(sink)
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ssh -L bulk throughput: gateway jump mode vs OpenSSH sshd, measured alternately.")
    p.add_argument("--mb", type=int, default=200, help="MB (10**6 bytes) per transfer (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="measured transfers per target (default 5)")
    p.add_argument("--cipher", default=DEFAULT_CIPHER, help=f"ssh -c CIPHER for both paths (default {DEFAULT_CIPHER})")
    p.add_argument("--timeout", type=int, default=900, help="hard limit for the whole run in seconds (default 900)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs) for debugging")
    p.add_argument("--tree", action="append", default=[], help="NAME=PATH: also measure the gateway of another source tree")
    p.add_argument("--sink-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sink-lifetime", type=float, default=600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sink_fd is not None:
        return run_sink(args.sink_fd, args.sink_lifetime)
    if not 1 <= args.mb <= 100_000 or not 1 <= args.rounds <= 1000 or args.timeout < 10:
        p.error("need 1 <= --mb <= 100000, 1 <= --rounds <= 1000, --timeout >= 10")
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with hard_timeout(args.timeout):
            return run(args)
    except (TimeoutError, RuntimeError, OSError) as exc:
        print(f"ssh_forward: FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
