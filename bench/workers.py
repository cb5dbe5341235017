"""How the gateway scales with `[gateway] workers = N`: logins per second and aggregate upload throughput with 1, 2
and 4 workers, against sshd and an OpenSSH hop measured in the same rounds.

With N > 1, `bastion serve` is a supervisor running N worker processes; the kernel picks a worker for each new
connection by the client's source address modulo N (gateway/workers.py), so the clients here come from different
loopback addresses (`-o BindAddress=127.0.0.K`). Everything runs on 127.0.0.0/8 in separate processes:

    gateway N: ssh -o BindAddress=127.0.0.K alice+vm01@127.0.0.1 CMD -> gateway (workers = N) -> sshd "vm"
    direct:    ssh -o BindAddress=127.0.0.K vm CMD                    -> sshd "vm"
    hop:       ssh -o BindAddress=127.0.0.K hop 'ssh vm CMD'           -> sshd "hop" -> ssh -> sshd "vm"

Per round, each gateway N is started fresh (and stopped after), and the order of the gateways and the baselines
reverses every round so that load drift hits all alike. Measured:

- logins per second: `--clients` loops (client k from 127.0.0.k+1), each running `ssh ... true` back to back for
  `--seconds`; completed logins / wall time (from the start to the last loop's end). Gateway, direct and hop.
  Also the gateway's CPU ms per login (the supervisor and every worker, /proc/PID/stat);
- aggregate upload: `--streams` concurrent `cat >/dev/null` sessions (from different addresses), `--mb` MB each;
  total MB / wall time from the first byte (every VM said `ready`) to the last exit. Gateway and hop. CPU ms per MB
  of the gateway (supervisor + workers) and of the hop (its sshd plus reaped children), the logins included;
- the gateway's RSS at idle right after start: VmRSS of the supervisor + every worker;
- how the kernel spread the sessions: `session_opened` lines per worker node (`bench.w1`, ...).

Every OpenSSH client uses aes128-gcm and curve25519-sha256; both sshds run with `SetEnv SHLVL=1` (root's .bashrc
would cost 100 ms per login). Four workers on a two-core box show the cost of oversubscription.

Run: .venv/bin/python bench/workers.py [--rounds 3] [--seconds 2.5] [--mb 50] [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ssh_forward import cores, hard_timeout, on_sigterm, stop_process, tail, versions  # noqa: E402
from bench.ssh_terminate import DEFAULT_CIPHER, HOST, MB, cpu_of, gateway_toml, live_children, ssh_base  # noqa: E402
from tests.support.notify import ReadySocket  # noqa: E402
from tests.support.peers import SSHD, KeyPair, free_port, make_key, start_sshd  # noqa: E402

RESULTS = REPO / "bench" / "results" / "workers.json"
MAX_LOGINS_PER_LOOP = 10_000  # a bound besides the time
LOGIN_TIMEOUT = 20.0


def source(k: int) -> str:
    """The k-th client's loopback address (k from 0): 127.0.0.1, 127.0.0.2, ..."""
    return f"127.0.0.{k + 1}"


def worker_toml(state: Path, port: int, vm: SSHD, vm_login: KeyPair, alice: KeyPair, workers: int) -> str:
    """ssh_terminate's gateway with `workers = N`, a short drain, and no per-user session rate: these logins are
    all alice's, and the token bucket (10 a second) would measure itself, not the workers."""
    text = gateway_toml(state, port, vm, vm_login, alice, workers=workers)
    text = text.replace("[gateway]\n", '[gateway]\nshutdown_grace = "2s"\n', 1)
    return text + '[sessions]\nrate_per_user = "off"\nmax_per_user = 1000\n'


def log_events(log: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == event:
                out.append(doc)
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Gateway:
    workers: int
    proc: subprocess.Popen[bytes]
    port: int
    host_key: str
    log: Path
    pids: list[int]  # the supervisor's (or the one process's) first, then every worker's

    def cpu(self) -> float:
        return sum(cpu_of(p) for p in self.pids)

    def rss_mib(self) -> float:
        return sum(rss_kib(p) for p in self.pids) / 1024

    def sessions_per_node(self) -> dict[str, int]:
        return dict(sorted(Counter(str(e.get("node")) for e in log_events(self.log, "session_opened")).items()))


def start_gateway(workdir: Path, workers: int, vm: SSHD, vm_login: KeyPair, alice: KeyPair) -> Gateway:
    """`python -m gateway serve` with `workers`, ready (its own READY=1: every worker is) with its worker pids.
    The caller stops `proc`; on failure here it is stopped before raising."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(HOST)
    cfg = workdir / "gateway.toml"
    cfg.write_text(worker_toml(workdir / "state", port, vm, vm_login, alice, workers))
    log = workdir / "gateway.log"
    ready = ReadySocket()
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--log-format", "json"],
                cwd=REPO, env={**os.environ, **ready.env()}, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        try:
            ready.wait_sync(proc, timeout=60)
        except RuntimeError as exc:
            raise RuntimeError(f"gateway with {workers} workers: {exc}\n{tail(log)}") from None
        pids = [proc.pid]
        if workers > 1:
            latest = {int(e["worker"]): int(e["pid"]) for e in log_events(log, "worker_started")}
            if len(latest) != workers:
                raise RuntimeError(f"gateway with {workers} workers: {len(latest)} worker_started lines\n{tail(log)}")
            pids += [latest[i] for i in sorted(latest)]
        key = (workdir / "state" / "ssh_host_ed25519_key.pub").read_text().strip()
        return Gateway(workers, proc, port, key, log, pids)
    except BaseException:
        stop_process(proc, grace=10.0)
        raise
    finally:
        ready.close()


# --------------------------------------------------------------------------- load


@dataclass
class Logins:
    ok: int
    failed: int
    seconds: float
    last_error: str = ""

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds


def login_loops(argv_of: Callable[[int], list[str]], clients: int, seconds: float, per_loop: int = MAX_LOGINS_PER_LOOP) -> Logins:
    """`clients` threads, each running its `argv_of(k)` back to back until `seconds` have passed (at most
    `per_loop` each, each run at most LOGIN_TIMEOUT). The wall time ends when the last loop ends."""
    ok = [0] * clients
    failed = [0] * clients
    errors = [""] * clients
    t0 = time.perf_counter()
    deadline = time.monotonic() + seconds

    def loop(k: int) -> None:
        argv = argv_of(k)
        for _ in range(per_loop):
            if time.monotonic() >= deadline:
                return
            try:
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=LOGIN_TIMEOUT, check=False)
            except subprocess.TimeoutExpired:
                failed[k] += 1
                errors[k] = "timed out"
                continue
            if r.returncode == 0:
                ok[k] += 1
            else:
                failed[k] += 1
                errors[k] = f"exit {r.returncode}: {r.stderr.decode(errors='replace').strip()[-300:]}"

    threads = [threading.Thread(target=loop, args=(k,), name=f"login-{k}", daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + LOGIN_TIMEOUT + 5)
    return Logins(sum(ok), sum(failed), time.perf_counter() - t0, next((e for e in errors if e), ""))


def uploads(argv_of: Callable[[int, str], list[str]], streams: int, nbytes: int, chunk: memoryview, timeout: float) -> float:
    """Aggregate MB/s of `streams` concurrent uploads of `nbytes` each to `cat >/dev/null`, timed from the moment
    every VM said `ready` (the logins are not in it) to the last exit. Raises RuntimeError when one fails."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for k in range(streams):
            p = subprocess.Popen(
                argv_of(k, "echo ready; exec cat >/dev/null"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            procs.append(p)
        for k, p in enumerate(procs):
            assert p.stdout is not None
            if p.stdout.readline() != b"ready\n":
                err = p.stderr.read().decode(errors="replace")[-300:] if p.stderr and p.poll() is not None else ""
                raise RuntimeError(f"upload {k}: no ready line {err}")
        failures: list[str] = []

        def push(k: int, p: subprocess.Popen[bytes]) -> None:
            assert p.stdin is not None
            try:
                for _ in range(nbytes // len(chunk)):
                    p.stdin.write(chunk)
                p.stdin.close()
                if p.wait(timeout=timeout) != 0:
                    failures.append(f"upload {k}: exit {p.returncode}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                failures.append(f"upload {k}: {exc}")

        threads = [threading.Thread(target=push, args=(k, p), name=f"upload-{k}", daemon=True) for k, p in enumerate(procs)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        secs = time.perf_counter() - t0
        if failures or any(t.is_alive() for t in threads):
            raise RuntimeError("; ".join(failures) or "an upload did not finish")
        return streams * nbytes / MB / secs
    finally:
        for p in procs:
            stop_process(p)


def settle(pid: int, deadline: float) -> None:
    """The hop sshd reaped its sessions (their CPU is in its children's time) before its CPU is read."""
    for _ in range(10_000):  # bounded by the deadline as well
        if live_children(pid) == 0 or time.monotonic() > deadline:
            return
        time.sleep(0.005)


# --------------------------------------------------------------------------- the run


@dataclass
class Samples:
    logins_per_s: list[float] = field(default_factory=list)
    login_failures: list[int] = field(default_factory=list)
    cpu_ms_per_login: list[float] = field(default_factory=list)
    busy_cores_logins: list[float] = field(default_factory=list)  # the gateway's CPU seconds per second of the logins
    mb_per_s: list[float] = field(default_factory=list)
    cpu_ms_per_mb: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    rss_supervisor_mib: list[float] = field(default_factory=list)  # with workers > 1, the supervisor's part of rss_mib
    start_s: list[float] = field(default_factory=list)  # from exec to READY=1 (every worker's)
    sessions_per_worker: list[dict[str, int]] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v}


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float], fmt: str = ".1f") -> str:
    return f"{med(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]" if xs else "-"


@dataclass
class Bench:
    """The peers every round shares: the VM's sshd, the hop's sshd, the keys and one known_hosts file."""

    args: argparse.Namespace
    tmp: Path
    alice: KeyPair
    vm_login: KeyPair
    vm: SSHD
    hop: SSHD
    chunk: memoryview = field(default_factory=lambda: memoryview(os.urandom(MB)))
    cipher: str = DEFAULT_CIPHER

    @property
    def known_hosts(self) -> Path:
        return self.tmp / "known_hosts"

    def trust(self, gw: Gateway | None) -> None:
        lines = [f"[{HOST}]:{self.vm.port} {self.vm.host_key.public}", f"[{HOST}]:{self.hop.port} {self.hop.host_key.public}"]
        if gw is not None:
            lines.append(f"[{HOST}]:{gw.port} {gw.host_key}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    def ssh(self, identity: Path, port: int, k: int) -> list[str]:
        return [*ssh_base(identity, self.known_hosts, self.cipher, port), "-o", f"BindAddress={source(k)}"]

    def direct(self, k: int, cmd: str = "true") -> list[str]:
        return [*self.ssh(self.vm_login.private, self.vm.port, k), f"{self.vm.login}@{HOST}", cmd]

    def via_hop(self, k: int, cmd: str = "true") -> list[str]:
        inner = " ".join(
            [*ssh_base(self.vm_login.private, self.known_hosts, self.cipher, self.vm.port), f"{self.vm.login}@{HOST}", f"'{cmd}'"]
        )
        return [*self.ssh(self.alice.private, self.hop.port, k), f"{self.hop.login}@{HOST}", inner]

    def via(self, gw: Gateway) -> Callable[[int, str], list[str]]:
        def argv(k: int, cmd: str = "true") -> list[str]:
            return [*self.ssh(self.alice.private, gw.port, k), f"alice+vm01@{HOST}", cmd]

        return argv

    @property
    def upload_mb(self) -> int:
        return int(self.args.streams * self.args.mb)

    def measure_direct(self, s: Samples) -> str:
        lg = login_loops(self.direct, self.args.clients, self.args.seconds)
        s.logins_per_s.append(lg.per_s)
        s.login_failures.append(lg.failed)
        return f"direct    logins {lg.per_s:6.1f}/s ({lg.ok} ok, {lg.failed} failed) {lg.last_error}"

    def measure_hop(self, s: Samples) -> str:
        lg = login_loops(self.via_hop, self.args.clients, self.args.seconds)
        pid = self.hop.proc.pid
        cpu0 = cpu_of(pid, children=True)
        up = uploads(self.via_hop, self.args.streams, self.args.mb * MB, self.chunk, self.args.per_run)
        settle(pid, time.monotonic() + 10)
        cpu_mb = (cpu_of(pid, children=True) - cpu0) * 1000 / self.upload_mb
        s.logins_per_s.append(lg.per_s)
        s.login_failures.append(lg.failed)
        s.mb_per_s.append(up)
        s.cpu_ms_per_mb.append(cpu_mb)
        logins = f"logins {lg.per_s:6.1f}/s ({lg.ok} ok, {lg.failed} failed)"
        return f"hop       {logins}  upload {up:6.1f} MB/s ({cpu_mb:.2f} ms CPU/MB) {lg.last_error}"

    def measure_gateway(self, gw: Gateway, s: Samples) -> str:
        """Idle RSS, one warm-up login per client, the login loops, the uploads; `gw` is the caller's to stop."""
        self.trust(gw)
        argv = self.via(gw)
        rss = gw.rss_mib()
        if gw.workers > 1:
            s.rss_supervisor_mib.append(rss_kib(gw.pids[0]) / 1024)
        login_loops(argv, self.args.clients, LOGIN_TIMEOUT, per_loop=1)  # every worker has served a login
        opened0 = gw.sessions_per_node()
        cpu0 = gw.cpu()
        lg = login_loops(argv, self.args.clients, self.args.seconds)
        cpu = gw.cpu() - cpu0
        cpu_login = cpu * 1000 / max(1, lg.ok)
        nodes = {k: v - opened0.get(k, 0) for k, v in gw.sessions_per_node().items()}
        cpu0 = gw.cpu()
        up = uploads(argv, self.args.streams, self.args.mb * MB, self.chunk, self.args.per_run)
        cpu_mb = (gw.cpu() - cpu0) * 1000 / self.upload_mb
        s.rss_mib.append(rss)
        s.logins_per_s.append(lg.per_s)
        s.login_failures.append(lg.failed)
        s.cpu_ms_per_login.append(cpu_login)
        s.busy_cores_logins.append(cpu / lg.seconds)
        s.mb_per_s.append(up)
        s.cpu_ms_per_mb.append(cpu_mb)
        s.sessions_per_worker.append(nodes)
        where = " ".join(f"{k.rsplit('.', 1)[-1]}:{v}" for k, v in nodes.items())
        return (
            f"{label(gw.workers)} logins {lg.per_s:6.1f}/s ({lg.ok} ok, {lg.failed} failed,"
            f" {cpu_login:.1f} ms CPU each, {cpu / lg.seconds:.2f} cores; {where})"
            f"  upload {up:6.1f} MB/s ({cpu_mb:.2f} ms CPU/MB)  RSS {rss:.0f} MiB {lg.last_error}"
        )


def label(n: int) -> str:
    return f"{n} worker{'s' if n > 1 else ' '}".ljust(9)


def scaling(gws: dict[int, Samples], base: dict[str, Samples]) -> dict[str, dict[str, float]]:
    """Per worker count: its medians over the baselines', and over one worker's when 1 was measured."""
    d, h = base["direct"], base["hop"]
    out: dict[str, dict[str, float]] = {}
    for n, s in gws.items():
        lps, up, cpu = med(s.logins_per_s), med(s.mb_per_s), med(s.cpu_ms_per_mb)
        r = {
            "logins_vs_direct": lps / med(d.logins_per_s),
            "logins_vs_hop": lps / med(h.logins_per_s),
            "upload_vs_hop": up / med(h.mb_per_s),
            "cpu_per_mb_vs_hop": cpu / med(h.cpu_ms_per_mb),
        }
        if 1 in gws:
            one = gws[1]
            r |= {
                "logins_vs_1": lps / med(one.logins_per_s),
                "cpu_per_login_vs_1": med(s.cpu_ms_per_login) / med(one.cpu_ms_per_login),
                "upload_vs_1": up / med(one.mb_per_s),
                "cpu_per_mb_vs_1": cpu / med(one.cpu_ms_per_mb),
            }
        out[str(n)] = r
    return out


def report(args: argparse.Namespace, gws: dict[int, Samples], base: dict[str, Samples], load: tuple[float, ...], wall: float) -> None:
    end = os.getloadavg()
    d, h = base["direct"], base["hop"]
    print()
    print(f"sshd direct logins {spread(d.logins_per_s)}/s")
    print(f"hop         logins {spread(h.logins_per_s)}/s | upload {spread(h.mb_per_s)} MB/s, {spread(h.cpu_ms_per_mb, '.2f')} ms CPU/MB")
    ratios = scaling(gws, base)
    for n, s in gws.items():
        print(
            f"{label(n)}   logins {spread(s.logins_per_s)}/s, {spread(s.cpu_ms_per_login)} ms CPU/login"
            f" ({spread(s.busy_cores_logins, '.2f')} cores busy)"
            f" | upload {spread(s.mb_per_s)} MB/s, {spread(s.cpu_ms_per_mb, '.2f')} ms CPU/MB | idle RSS {spread(s.rss_mib, '.0f')} MiB"
            + (f" (supervisor {med(s.rss_supervisor_mib):.0f})" if s.rss_supervisor_mib else "")
            + f" | start {spread(s.start_s)} s"
        )
        print("            " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios[str(n)].items()))
    print(f"load before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}; {cores()}; {wall:.0f} s")
    summary = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds, "seconds": args.seconds, "clients": args.clients, "streams": args.streams, "mb": args.mb,
        "cipher": DEFAULT_CIPHER, "versions": versions(), "cores": cores(), "load_before": load, "load_after": end, "wall_s": wall,
        "baselines": {k: v.json() for k, v in base.items()},
        "gateway": {str(n): s.json() for n, s in gws.items()},
        "ratios": ratios,
    }  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    sshds: list[SSHD] = []
    gw: Gateway | None = None
    try:
        alice = make_key(tmp / "keys" / "alice")
        vm_login = make_key(tmp / "keys" / "vm_login")
        sshds.append(start_sshd(tmp / "vm", [vm_login.public], extra="SetEnv SHLVL=1"))
        sshds.append(start_sshd(tmp / "hop", [alice.public], extra="SetEnv SHLVL=1"))
        b = Bench(args, tmp, alice, vm_login, *sshds)
        b.trust(None)
        gws = {n: Samples() for n in args.workers}
        base = {"direct": Samples(), "hop": Samples()}
        order: list[str | int] = ["direct", "hop", *args.workers]
        load = os.getloadavg()
        print(
            f"workers: {', '.join(map(str, args.workers))} workers against sshd direct and an OpenSSH hop; {args.rounds} rounds,"
            f" {args.clients} login loops x {args.seconds:g} s, {args.streams} uploads x {args.mb} MB"
        )
        print(f"{b.cipher} on every OpenSSH leg; {versions()}; {cores()}; load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        for r in range(1, args.rounds + 1):
            for item in order if r % 2 else order[::-1]:
                if item == "direct":
                    line = b.measure_direct(base["direct"])
                elif item == "hop":
                    line = b.measure_hop(base["hop"])
                else:
                    n = int(item)
                    t0 = time.perf_counter()
                    gw = start_gateway(tmp / f"gw{n}-r{r}", n, b.vm, vm_login, alice)
                    gws[n].start_s.append(time.perf_counter() - t0)
                    line = b.measure_gateway(gw, gws[n])
                    stop_process(gw.proc, grace=20.0)
                    gw = None
                print(f"  round {r} {line}")
        report(args, gws, base, load, time.monotonic() - began)
        return 0
    finally:
        if gw is not None:
            stop_process(gw.proc, grace=20.0)
        for sshd in sshds:
            sshd.stop()
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def counts(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(not 1 <= v <= 16 for v in values):
        raise argparse.ArgumentTypeError(f"expected worker counts from 1 to 16 like 1,2,4; got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Logins per second and aggregate upload with 1, 2 and 4 gateway workers.")
    p.add_argument("--workers", type=counts, default=[1, 2, 4], help="worker counts, comma-separated (default 1,2,4)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--seconds", type=float, default=2.5, help="seconds of each login measurement (default 2.5)")
    p.add_argument("--clients", type=int, default=8, help="concurrent login loops, one source address each (default 8)")
    p.add_argument("--streams", type=int, default=4, help="concurrent uploads, one source address each (default 4)")
    p.add_argument("--mb", type=int, default=50, help="MB per upload stream (default 50)")
    p.add_argument("--per-run", type=float, default=120.0, help="limit for one upload in seconds")
    p.add_argument("--timeout", type=int, default=900, help="hard limit for the whole run in seconds")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (the gateways' logs and configs)")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 250 or not 1 <= args.streams <= 250:
        p.error("--clients and --streams: 1 to 250 (one loopback address each)")
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with hard_timeout(args.timeout):
            return run(args)
    except (TimeoutError, RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"workers: FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
