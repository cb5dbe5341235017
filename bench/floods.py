"""What the floods of issue 8 cost a legitimate user: login latency during each flood vs. no flood.

One gateway (`python -m gateway serve`, its own process, from `--tree`, default this checkout) terminates SSH
to a real OpenSSH sshd playing the VM. This process measures `ssh alice+web01@127.0.0.1 true` (a real OpenSSH
client, a full login through the gateway to the VM) with no flood (the baseline), then during each flood:

    silent      connections from 127.0.0.2 that send nothing (the SSH door's pre-auth slots)
    one-byte    connections from 127.0.0.3 that send `S` or `\\x16` and stop (the detector)
    half-tls    connections from 127.0.0.4 that send the first 45 bytes of a 512-byte ClientHello (TLS handshakes)
    keepalive   TLS connections from 127.0.0.5 that get a 404 with `Connection: keep-alive` and then idle
    tls-burst   full TLS handshakes + GET /healthz from 127.0.0.6, as fast as 8 threads go (CPU)

Each flood is bounded: a fixed number of connections held open (those the gateway closes are reopened, at a
capped rate and up to a fixed total), for `--flood-seconds` (15) from its start. Logins start once the flood
is up (and the detect deadline has passed, so silent connections reached the SSH door) and are spread over the
rest of the flood; each has a deadline, and a login the gateway refused or that ran out of time counts as failed. Beside the logins it
samples the gateway's fds and RSS (/proc/PID) and CPU, and counts how many hostile connections the gateway
closed while the flood was on ("refused").

Every address is on 127.0.0.0/8. Every process started here is ended by its PID.

Run: .venv/bin/python bench/floods.py [--tree PATH] [--logins 8] [--flood-seconds 15] [--only silent,half-tls]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ssh_forward import hard_timeout, stop_process, tail, toml_value, wait_listening  # noqa: E402
from tests.support.peers import SSHD, KeyPair, free_port, make_key, start_sshd  # noqa: E402

HOST = "127.0.0.1"
MIB = 1024 * 1024
RESULTS = REPO / "bench" / "results" / "floods.json"
FLOODS = ("silent", "one-byte", "half-tls", "keepalive", "tls-burst")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the gateway under test


def gateway_python(tree: Path) -> tuple[list[str], dict[str, str]]:
    """The interpreter and environment that run `tree`'s gateway: its own venv if it has one, else this one's
    with the tree first on the path (an old checkout in a worktree has no venv; the dependencies are the same)."""
    env = dict(os.environ)
    own = tree / ".venv" / "bin" / "python"
    if own.exists():
        return [str(own)], env
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable], env


def imported_from(tree: Path) -> str:
    """Where `import gateway` resolves with that interpreter: proof the run measures the tree it names."""
    argv, env = gateway_python(tree)
    out = subprocess.run(
        [*argv, "-c", "import gateway; print(gateway.__file__)"], cwd=tree, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    return out.stdout.strip() or out.stderr.strip()[-200:]


def gateway_toml(*, state_dir: Path, port: int, sshd: SSHD, vm_login_key: KeyPair, alice: KeyPair) -> str:
    """Only keys every version since before the hardening accepts; limits are each tree's defaults."""
    login = sshd.login
    lines = [
        "[gateway]",
        f"node = {toml_value('bench')}",
        f"state_dir = {toml_value(str(state_dir))}",
        f"connect_timeout = {toml_value('5s')}",
        "workers = 1",  # one process: the flood and the logins measure one event loop (bench/workers.py measures several)
        "",
        "[public]",
        f"listen = {toml_value([f'{HOST}:{port}'])}",
        "",
        "[control]",
        f"listen = {toml_value([f'{HOST}:0'])}",
        "",
        "[[vms]]",
        f"name = {toml_value('web01')}",
        f"address = {toml_value(HOST)}",
        f"ssh_port = {toml_value(sshd.port)}",
        f"host_key = {toml_value(sshd.host_key.public)}",
        f"default_login = {toml_value(login)}",
        f"[vms.logins.{login}]",
        f"key = {toml_value(str(vm_login_key.private))}",
        "",
        "[[users]]",
        f"name = {toml_value('alice')}",
        f"keys = {toml_value([alice.public])}",
        f"groups = {toml_value(['ops'])}",
        "",
        "[[rules]]",
        f"groups = {toml_value(['ops'])}",
        f"vms = {toml_value(['web01'])}",
        f"protocols = {toml_value(['ssh'])}",
        f"logins = {toml_value([login])}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class GatewayProc:
    proc: subprocess.Popen[bytes]
    port: int
    host_key: str
    log: Path
    state_dir: Path


def start_gateway(tree: Path, workdir: Path, **config: Any) -> GatewayProc:
    state_dir = workdir / "gw-state"
    cfg = workdir / "gateway.toml"
    log = workdir / "gateway.log"
    argv, env = gateway_python(tree)
    last: Exception | None = None
    for _ in range(3):  # a lost port race is retried
        port = free_port(HOST)
        cfg.write_text(gateway_toml(state_dir=state_dir, port=port, **config))
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
        return GatewayProc(proc, port, host_key, log, state_dir)
    raise RuntimeError(f"gateway did not start: {last}")


# --------------------------------------------------------------------------- /proc probes


def fds_of(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of `pid` so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


class Sampler(threading.Thread):
    """Peak fds and RSS of the gateway every 100 ms until stopped (bounded by `deadline`)."""

    def __init__(self, pid: int, deadline: float) -> None:
        super().__init__(daemon=True, name="sampler")
        self.pid = pid
        self.deadline = deadline
        self.stop = threading.Event()
        self.peak_fds = fds_of(pid)
        self.peak_rss = rss_of(pid)

    def run(self) -> None:
        while not self.stop.wait(0.1) and time.monotonic() < self.deadline:
            self.peak_fds = max(self.peak_fds, fds_of(self.pid))
            self.peak_rss = max(self.peak_rss, rss_of(self.pid))


# --------------------------------------------------------------------------- legitimate logins


@dataclass
class Logins:
    seconds: list[float] = field(default_factory=list)  # successful logins
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        return len(self.seconds) + self.failed


def login_argv(gw: GatewayProc, alice: KeyPair, known_hosts: Path, connect_timeout: int) -> list[str]:
    return [
        "ssh", "-F", "/dev/null", "-p", str(gw.port),
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-i", str(alice.private),
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", f"ConnectTimeout={connect_timeout}",
        "-o", "KexAlgorithms=curve25519-sha256",  # one key exchange on every run (no sntrup761 cost)
        f"alice+web01@{HOST}", "true",
    ]  # fmt: skip


def run_logins(
    gw: GatewayProc, alice: KeyPair, known_hosts: Path, n: int, deadline: float, per_login: float, *, spread: bool = False
) -> Logins:
    """Up to `n` logins one after another, each within `per_login` seconds, none starting after `deadline`.

    With `spread`, login i starts no earlier than i/n of the way to `deadline`, so the logins sample the whole
    flood (before and after its connections meet a deadline) instead of its first seconds.
    """
    out = Logins()
    start = time.monotonic()
    step = max(0.0, deadline - start - per_login / 2) / n if spread else 0.0
    for i in range(n):
        wait = start + i * step - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        left = deadline - time.monotonic()
        if left < 1.0:
            break
        limit = min(per_login, left)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            login_argv(gw, alice, known_hosts, max(1, int(limit))),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)
            out.failed += 1
            out.errors.append(f"no answer within {limit:.0f}s")
            continue
        took = time.monotonic() - t0
        if proc.returncode == 0:
            out.seconds.append(took)
        else:
            out.failed += 1
            out.errors.append(err.decode(errors="replace").strip().splitlines()[-1:][0][:160] if err.strip() else f"rc {proc.returncode}")
    return out


# --------------------------------------------------------------------------- floods


def half_client_hello() -> bytes:
    """A TLS record announcing a 512-byte ClientHello, and only its first 40 bytes."""
    return b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + os.urandom(34)


@dataclass
class FloodStats:
    opened: int = 0
    connect_failed: int = 0
    closed_by_gateway: int = 0  # while the flood was on
    held_at_end: int = 0
    served: int = 0  # tls-burst: handshakes + answers completed; keepalive: answers read
    failed: int = 0  # tls-burst: handshakes refused or broken

    def refused_text(self, kind: str) -> str:
        if kind == "tls-burst":
            return f"served {self.served}, failed {self.failed}"
        if kind == "keepalive":
            return f"{self.closed_by_gateway}/{self.served} closed after the 404"
        return f"{self.closed_by_gateway}/{self.opened} closed, {self.held_at_end} held"


class HeldFlood(threading.Thread):
    """Holds `count` raw connections from `source` open, each having sent `first()`; reopens the ones the
    gateway closes, at most `rate` a second and `max_opens` in all; runs until stopped or `deadline`."""

    def __init__(
        self, port: int, source: str, count: int, first: Callable[[int], bytes], rate: float, max_opens: int, deadline: float
    ) -> None:
        super().__init__(daemon=True, name=f"flood-{source}")
        self.port, self.source, self.count, self.first = port, source, count, first
        self.rate, self.max_opens, self.deadline = rate, max_opens, deadline
        self.stats = FloodStats()
        self.stop = threading.Event()
        self.up = threading.Event()  # the first `count` were opened

    def _open(self, sel: selectors.BaseSelector) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((self.source, 0))
            s.settimeout(2.0)
            s.connect((HOST, self.port))
            data = self.first(self.stats.opened)
            if data:
                s.sendall(data)
            s.setblocking(False)
        except OSError:
            s.close()
            self.stats.connect_failed += 1
            return
        self.stats.opened += 1
        sel.register(s, selectors.EVENT_READ)

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        budget, last = float(self.count), time.monotonic()  # the first `count` at once, then `rate` a second
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                now = time.monotonic()
                budget = min(budget + (now - last) * self.rate, float(self.count))
                last = now
                for _ in range(self.count):  # bounded top-up
                    if len(sel.get_map()) >= self.count or budget < 1 or self.stats.opened >= self.max_opens:
                        break
                    self._open(sel)
                    budget -= 1
                if len(sel.get_map()) >= self.count or self.stats.opened >= self.max_opens:
                    self.up.set()
                for key, _ in sel.select(timeout=0.05):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:  # FIN or RST: the gateway let go of it
                        sel.unregister(s)
                        s.close()
                        self.stats.closed_by_gateway += 1
        finally:
            self.up.set()
            self.stats.held_at_end = len(sel.get_map())
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()


def tls_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the gateway's self-signed certificate; nothing secret goes over this
    return ctx


def read_head(s: ssl.SSLSocket, limit: int = 65536) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < limit:  # bounded by size (and the socket's timeout)
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


class KeepAliveFlood(threading.Thread):
    """`count` TLS connections from `source`, each asks for a missing page with keep-alive, reads the 404, then
    idles; counts the ones the gateway closes while the flood is on."""

    def __init__(self, port: int, source: str, count: int, deadline: float) -> None:
        super().__init__(daemon=True, name=f"keepalive-{source}")
        self.port, self.source, self.count, self.deadline = port, source, count, deadline
        self.stats = FloodStats()
        self.stop = threading.Event()
        self.up = threading.Event()

    def run(self) -> None:
        ctx = tls_context()
        sel = selectors.DefaultSelector()
        try:
            for _ in range(self.count):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    break
                raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    raw.bind((self.source, 0))
                    raw.settimeout(5.0)
                    raw.connect((HOST, self.port))
                    s = ctx.wrap_socket(raw, server_hostname=HOST)
                    s.sendall(b"GET /nosuch HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n\r\n")
                    head = read_head(s)
                except OSError:
                    raw.close()
                    self.stats.connect_failed += 1
                    continue
                self.stats.opened += 1
                if head.startswith(b"HTTP/1.1 404"):
                    self.stats.served += 1
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            self.up.set()
            while not self.stop.is_set() and time.monotonic() < self.deadline and sel.get_map():
                for key, _ in sel.select(timeout=0.1):
                    s = key.fileobj
                    assert isinstance(s, ssl.SSLSocket)
                    try:
                        data = s.recv(4096)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(s)
                        s.close()
                        self.stats.closed_by_gateway += 1
        finally:
            self.up.set()
            self.stats.held_at_end = len(sel.get_map())
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()


class BurstFlood(threading.Thread):
    """Full TLS handshakes and a GET /healthz from `source`, `workers` at a time, at most `max_total`."""

    def __init__(self, port: int, source: str, workers: int, max_total: int, deadline: float) -> None:
        super().__init__(daemon=True, name=f"burst-{source}")
        self.port, self.source, self.workers, self.max_total, self.deadline = port, source, workers, max_total, deadline
        self.stats = FloodStats()
        self.stop = threading.Event()
        self.up = threading.Event()
        self._lock = threading.Lock()

    def _one(self, ctx: ssl.SSLContext) -> bool:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            raw.bind((self.source, 0))
            raw.settimeout(5.0)
            raw.connect((HOST, self.port))
            with ctx.wrap_socket(raw, server_hostname=HOST) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                return read_head(s).startswith(b"HTTP/1.1 200")
        except OSError:
            return False
        finally:
            raw.close()

    def _worker(self) -> None:
        ctx = tls_context()
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            with self._lock:
                if self.stats.opened >= self.max_total:
                    return
                self.stats.opened += 1
            ok = self._one(ctx)
            with self._lock:
                if ok:
                    self.stats.served += 1
                else:
                    self.stats.failed += 1

    def run(self) -> None:
        threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        self.up.set()
        for t in threads:
            t.join(timeout=max(0.0, self.deadline - time.monotonic()) + 10)


def make_flood(kind: str, port: int, deadline: float) -> HeldFlood | KeepAliveFlood | BurstFlood:
    if kind == "silent":
        return HeldFlood(port, "127.0.0.2", 120, lambda i: b"", rate=10, max_opens=400, deadline=deadline)
    if kind == "one-byte":
        return HeldFlood(port, "127.0.0.3", 300, lambda i: b"S" if i % 2 else b"\x16", rate=200, max_opens=3000, deadline=deadline)
    if kind == "half-tls":
        return HeldFlood(port, "127.0.0.4", 1000, lambda i: half_client_hello(), rate=100, max_opens=3000, deadline=deadline)
    if kind == "keepalive":
        return KeepAliveFlood(port, "127.0.0.5", 200, deadline=deadline)
    if kind == "tls-burst":
        return BurstFlood(port, "127.0.0.6", workers=8, max_total=3000, deadline=deadline)
    raise ValueError(kind)


# --------------------------------------------------------------------------- one phase


@dataclass
class Phase:
    name: str
    logins: Logins
    peak_fds: int
    peak_rss: int
    cpu_s: float
    wall_s: float
    refused: str = ""
    stats: dict[str, int] = field(default_factory=dict)


def settle(pid: int, fds: int, timeout: float = 15.0) -> int:
    """Wait (bounded) until the gateway's fds are back near `fds` after a flood; polled, /proc signals nothing."""
    n = fds_of(pid)
    for _ in range(int(timeout / 0.1)):
        n = fds_of(pid)
        if n <= fds + 8:
            break
        time.sleep(0.1)
    return n


def measure_phase(
    kind: str | None, gw: GatewayProc, alice: KeyPair, known_hosts: Path, *, logins: int, flood_seconds: float, per_login: float
) -> Phase:
    pid = gw.proc.pid
    t0 = time.monotonic()
    deadline = t0 + flood_seconds
    sampler = Sampler(pid, deadline + 5)
    cpu0 = cpu_of(pid)
    sampler.start()
    flood = make_flood(kind, gw.port, deadline) if kind else None
    try:
        if flood is not None:
            flood.start()
            flood.up.wait(timeout=min(5.0, flood_seconds / 2))
            time.sleep(1.5)  # past the detect deadline (1 s): silent connections have reached the SSH door
        if flood is None:
            result = run_logins(gw, alice, known_hosts, logins, t0 + logins * per_login, per_login)
        else:
            result = run_logins(gw, alice, known_hosts, logins, deadline, per_login, spread=True)
            # The flood runs its full time, so "hostile connections" shows which deadlines closed them within it.
            flood.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
    finally:
        if flood is not None:
            flood.stop.set()
            flood.join(timeout=30)
        sampler.stop.set()
        sampler.join(timeout=5)
    phase = Phase(
        name=kind or "no flood",
        logins=result,
        peak_fds=sampler.peak_fds,
        peak_rss=sampler.peak_rss,
        cpu_s=cpu_of(pid) - cpu0,
        wall_s=time.monotonic() - t0,
    )
    if flood is not None:
        phase.refused = flood.stats.refused_text(kind or "")
        phase.stats = dict(flood.stats.__dict__)
    return phase


# --------------------------------------------------------------------------- main


def fmt_row(p: Phase, base_median: float | None) -> str:
    s = p.logins.seconds
    med = statistics.median(s) if s else None
    ratio = f"{med / base_median:.2f}" if med is not None and base_median else "-"
    ok = f"{len(s)}/{p.logins.attempted}"
    med_t = f"{med:.2f}" if med is not None else "-"
    max_t = f"{max(s):.2f}" if s else "-"
    return (
        f"| {p.name:<9} | {ok:>6} | {med_t:>8} | {max_t:>6} | {ratio:>6} | {p.peak_fds:>7} | {p.peak_rss / MIB:>7.0f} |"
        f" {p.cpu_s:>5.1f} | {p.refused} |"
    )


HEADER = (
    "| flood     | logins | median s |  max s | ratio  | gw fds  | RSS MiB | CPU s | hostile connections |\n"
    "|-----------|--------|----------|--------|--------|---------|---------|-------|---------------------|"
)


def run(args: argparse.Namespace) -> int:
    tree = Path(args.tree).resolve()
    kinds = [k for k in FLOODS if not args.only or k in args.only.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-floods-"))
    sshd: SSHD | None = None
    gw: GatewayProc | None = None
    try:
        keys = tmp / "keys"
        alice = make_key(keys / "alice")
        vm_login = make_key(keys / "gw_to_vm")
        # SetEnv SHLVL=1: root's ~/.bashrc (pyenv init, ~100 ms of CPU) is skipped, so a login measures the path.
        sshd = start_sshd(tmp / "sshd", [vm_login.public], extra="SetEnv SHLVL=1")
        gw = start_gateway(tree, tmp, sshd=sshd, vm_login_key=vm_login, alice=alice)
        kh = tmp / "known_hosts"
        kh.write_text(f"[{HOST}]:{gw.port} {gw.host_key}\n")
        rev = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--", "gateway"], capture_output=True, text=True, timeout=10, check=False
        )
        label = rev.stdout.strip() + (" + uncommitted gateway/ changes" if dirty.stdout.strip() else "")
        print(f"floods: tree {tree} ({label}); gateway imported from {imported_from(tree)}")
        print(
            f"cores {os.cpu_count()}; {args.logins} logins per phase, each within {args.per_login:.0f}s;",
            f"floods at most {args.flood_seconds:.0f}s",
        )

        run_logins(gw, alice, kh, 2, time.monotonic() + 60, args.per_login)  # warm-up: caches, first dial
        phases = [measure_phase(None, gw, alice, kh, logins=args.logins, flood_seconds=args.flood_seconds, per_login=args.per_login)]
        base_fds = fds_of(gw.proc.pid)
        for kind in kinds:
            if gw.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with status {gw.proc.returncode}\n{tail(gw.log)}")
            phases.append(
                measure_phase(kind, gw, alice, kh, logins=args.logins, flood_seconds=args.flood_seconds, per_login=args.per_login)
            )
            after = settle(gw.proc.pid, base_fds)
            print(f"  {kind}: done; gateway fds {after} (baseline {base_fds})", flush=True)
        phases.append(measure_phase(None, gw, alice, kh, logins=args.logins, flood_seconds=args.flood_seconds, per_login=args.per_login))
        phases[-1].name = "no flood²"
        alive = gw.proc.poll() is None

        base = phases[0].logins.seconds
        base_median = statistics.median(base) if base else None
        print()
        print(HEADER)
        for p in phases:
            print(fmt_row(p, base_median))
        print()
        print("ratio = median login during the flood / median with no flood (first row), same run; ² = again after all floods")
        print(f"gateway still running at the end: {alive}")
        for p in phases:
            if p.logins.errors:
                print(f"  {p.name}: failed logins, e.g. {sorted(set(p.logins.errors))[:2]}")

        summary = {
            "benchmark": "floods",
            "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "tree": str(tree),
            "revision": label,
            "cores": os.cpu_count(),
            "logins_per_phase": args.logins,
            "flood_seconds": args.flood_seconds,
            "phases": [
                {
                    "name": p.name,
                    "login_seconds": [round(x, 3) for x in p.logins.seconds],
                    "failed": p.logins.failed,
                    "errors": sorted(set(p.logins.errors))[:5],
                    "peak_fds": p.peak_fds,
                    "peak_rss_bytes": p.peak_rss,
                    "cpu_s": round(p.cpu_s, 3),
                    "wall_s": round(p.wall_s, 3),
                    "flood": p.stats,
                }
                for p in phases
            ],
        }
        out = Path(args.results) if args.results else RESULTS
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out}")
        return 0 if alive else 1
    finally:
        if gw is not None:
            stop_process(gw.proc, grace=10.0)
        if sshd is not None:
            sshd.stop()
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`, so children are ended


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Login latency of a legitimate user during each flood of issue 8, against no flood.")
    p.add_argument("--tree", default=str(REPO), help="source tree whose gateway to run (default: this checkout)")
    p.add_argument("--logins", type=int, default=8, help="logins measured per phase (default 8)")
    p.add_argument("--per-login", type=float, default=10.0, help="seconds a login may take before it counts as failed (default 10)")
    p.add_argument("--flood-seconds", type=float, default=15.0, help="how long each flood may last (default 15, at most 30)")
    p.add_argument("--only", help=f"comma-separated floods to run (default all: {','.join(FLOODS)})")
    p.add_argument("--results", help=f"where to write the JSON (default {RESULTS.relative_to(REPO)})")
    p.add_argument("--timeout", type=int, default=600, help="hard limit for the whole run in seconds (default 600)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (gateway log, configs) for debugging")
    args = p.parse_args(argv)
    if not 1 <= args.logins <= 100 or not 2 <= args.flood_seconds <= 30 or not 1 <= args.per_login <= 30 or args.timeout < 30:
        p.error("need 1 <= --logins <= 100, 2 <= --flood-seconds <= 30, 1 <= --per-login <= 30, --timeout >= 30")
    if args.only and not set(args.only.split(",")) <= set(FLOODS):
        p.error(f"--only takes names from {', '.join(FLOODS)}")
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with hard_timeout(args.timeout):
            return run(args)
    except (TimeoutError, RuntimeError, OSError) as exc:
        print(f"floods: FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
