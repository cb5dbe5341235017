"""Terminating SSH: bulk upload/download and echo round trips, the gateway vs a hop built from OpenSSH.

Everything runs on 127.0.0.1 in separate processes:

    gateway: ssh alice+vm01@gw CMD        -> gateway (subprocess, uvloop) -> sshd "vm"
    hop:     ssh hop 'ssh vm CMD'         -> sshd "hop" -> ssh            -> sshd "vm" (the same VM)
    NAME:    (with --tree NAME=PATH) as gateway, from another source tree (e.g. a `git archive` of an earlier commit)

Every OpenSSH client uses the same cipher (`--cipher`, aes128-gcm by default) and curve25519-sha256; the gateway
picks its own VM leg's algorithms (that is what is measured). Per path and round:

- upload: `cat >/dev/null` on the VM, `--mb` MB written to `ssh`'s stdin; MB/s from the VM's first output to the exit;
- download: `head -c N /dev/zero` on the VM, read from `ssh`'s stdout, MB/s from the first byte to EOF;
- CPU per MB: the gateway process's user+system time over the transfer; for the hop, the hop sshd's own time
  plus its reaped children (the session process and the `ssh` it ran), read once the session was reaped;
- echo: `cat` on the VM through pipes (no PTY), one byte written and read back `--echoes` times; p50 and p99, and
  the CPU per echo (the gateway's without its login; the hop sshd's with its reaped children, login included, so
  not comparable: compare gateways, e.g. against `--tree`).

Paths run alternately (gateway, hop, [base], gateway, hop, ...); compare ratios from the same run.

Run: .venv/bin/python bench/ssh_terminate.py [--mb 200] [--rounds 5] [--tree base=/tmp/base]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.floods import gateway_python  # noqa: E402
from bench.ssh_forward import cores, hard_timeout, on_sigterm, stop_process, toml_value, versions, wait_listening  # noqa: E402
from tests.support.peers import SSHD, KeyPair, free_port, make_key, start_sshd  # noqa: E402

HOST = "127.0.0.1"
MB = 1_000_000
DEFAULT_CIPHER = "aes128-gcm@openssh.com"
RESULTS = REPO / "bench" / "results" / "ssh_terminate.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int, *, children: bool = False, user: bool = False) -> float:
    """User + system CPU seconds of `pid` (plus its reaped children's with `children`; only user time with `user`)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + (0 if user else int(fields[12]))
    if children:
        ticks += int(fields[13]) + (0 if user else int(fields[14]))
    return ticks / CLK_TCK


def live_children(pid: int) -> int:
    n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        n += len((task / "children").read_text().split())
    return n


def gateway_toml(state_dir: Path, port: int, vm: SSHD, vm_login: KeyPair, alice: KeyPair, *, workers: int = 1) -> str:
    login = vm.login
    lines = [
        "[gateway]",
        f"node = {toml_value('bench')}",
        f"state_dir = {toml_value(str(state_dir))}",
        f"connect_timeout = {toml_value('5s')}",
        f"workers = {workers}",  # one process by default: its CPU is the gateway's (bench/workers.py measures several)
        "[public]",
        f"listen = {toml_value([f'{HOST}:{port}'])}",
        "[control]",
        f"listen = {toml_value([f'{HOST}:0'])}",
        "[[vms]]",
        f"name = {toml_value('vm01')}",
        f"address = {toml_value(HOST)}",
        f"ssh_port = {toml_value(vm.port)}",
        f"host_key = {toml_value(vm.host_key.public)}",
        f"default_login = {toml_value(login)}",
        f"[vms.logins.{login}]",
        f"key = {toml_value(str(vm_login.private))}",
        "[[users]]",
        f"name = {toml_value('alice')}",
        f"keys = {toml_value([alice.public])}",
        f"groups = {toml_value(['ops'])}",
        "[[rules]]",
        f"groups = {toml_value(['ops'])}",
        f"vms = {toml_value(['vm01'])}",
        f"protocols = {toml_value(['ssh'])}",
        f"logins = {toml_value([login])}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Path_:
    name: str
    argv: list[str]  # ssh ... up to (not including) the remote command
    wrap: bool  # the hop: the command runs in `ssh vm` on the hop
    cpu_pid: int
    cpu_children: bool
    inner: list[str] = field(default_factory=list)
    up: list[float] = field(default_factory=list)
    down: list[float] = field(default_factory=list)
    cpu_up: list[float] = field(default_factory=list)  # CPU seconds per MB
    cpu_down: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)  # microseconds
    p99: list[float] = field(default_factory=list)
    cpu_echo: list[float] = field(default_factory=list)  # CPU µs per echo
    user_echo: list[float] = field(default_factory=list)  # of which user space

    def command(self, remote: str) -> list[str]:
        if not self.wrap:
            return [*self.argv, remote]
        inner = " ".join([*self.inner, f"'{remote}'"])
        return [*self.argv, inner]

    def settle(self, deadline: float) -> None:
        """The hop's session is reaped (its CPU is in the sshd's children time) before CPU is read."""
        if not self.cpu_children:
            return
        for _ in range(10_000):  # bounded by the deadline as well
            if live_children(self.cpu_pid) == 0 or time.monotonic() > deadline:
                return
            time.sleep(0.005)


def ssh_base(identity: Path, known_hosts: Path, cipher: str, port: int) -> list[str]:
    return [
        "ssh", "-T", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(identity),
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "KexAlgorithms=curve25519-sha256",
        "-c", cipher, "-p", str(port),
    ]  # fmt: skip


def bulk(path: Path_, upload: bool, chunk: memoryview, nbytes: int, timeout: float) -> tuple[float, float]:
    """(MB/s, CPU seconds per MB) of one `ssh` run. The rate is timed from the first byte (upload: the VM's
    `ready` line) to the end, so the login is not in it; the CPU is the whole run's, login included."""
    remote = "echo ready; exec cat >/dev/null" if upload else f"head -c {nbytes} /dev/zero"
    cpu0 = cpu_of(path.cpu_pid, children=path.cpu_children)
    proc = subprocess.Popen(path.command(remote), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    got = 0
    try:
        if upload:
            if proc.stdout.readline() != b"ready\n":
                raise RuntimeError(f"{path.name}: no ready line")
            t0 = time.perf_counter()
            for _ in range(nbytes // len(chunk)):
                proc.stdin.write(chunk)
            proc.stdin.close()
            proc.wait(timeout=timeout)
            got = nbytes
        else:
            proc.stdin.close()
            buf = bytearray(1 << 20)
            n = proc.stdout.readinto(buf)
            t0 = time.perf_counter()
            while n:
                got += n
                n = proc.stdout.readinto(buf)
            proc.wait(timeout=timeout)
        secs = time.perf_counter() - t0
    finally:
        stop_process(proc)
    err = proc.stderr.read() if proc.stderr else b""
    if proc.returncode != 0 or got != nbytes:
        raise RuntimeError(f"{path.name}: exited {proc.returncode}, {got} of {nbytes} bytes: {err.decode(errors='replace')[-400:]}")
    path.settle(time.monotonic() + 10)
    cpu = cpu_of(path.cpu_pid, children=path.cpu_children) - cpu0
    return nbytes / MB / secs, cpu / (nbytes / MB)


def echo(path: Path_, count: int, timeout: float) -> tuple[float, float, float, float]:
    """p50 and p99 (µs) of one byte written to `cat` on the VM and read back, and the CPU µs per echo: a gateway's
    from the first echo on (its login left out); the hop's is only known once its session is reaped, login included.
    The last is the user-space part of that CPU (the Python, for a gateway)."""
    cpu0 = cpu_of(path.cpu_pid, children=path.cpu_children)
    user0 = cpu_of(path.cpu_pid, children=path.cpu_children, user=True)
    proc = subprocess.Popen(path.command("cat"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
    samples: list[float] = []
    deadline = time.monotonic() + timeout
    try:
        os.write(wfd, b"x")
        if os.read(rfd, 1) != b"x":  # the first echo includes the login
            raise RuntimeError(f"{path.name}: no echo")
        if not path.cpu_children:
            cpu0, user0 = cpu_of(path.cpu_pid), cpu_of(path.cpu_pid, user=True)
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(wfd, b"y")
            got = os.read(rfd, 1)
            samples.append((time.perf_counter() - t0) * 1e6)
            if got != b"y" or time.monotonic() > deadline:
                raise RuntimeError(f"{path.name}: echo lost or too slow")
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop_process(proc)  # type: ignore[arg-type]
    path.settle(time.monotonic() + 10)
    cpu = (cpu_of(path.cpu_pid, children=path.cpu_children) - cpu0) / count * 1e6
    user = (cpu_of(path.cpu_pid, children=path.cpu_children, user=True) - user0) / count * 1e6
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))], cpu, user


def start_gw(tree: Path, workdir: Path, vm: SSHD, vm_login: KeyPair, alice: KeyPair) -> tuple[subprocess.Popen[bytes], int, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    argv, env = gateway_python(tree)
    state = workdir / "state"
    port = free_port(HOST)
    cfg = workdir / "gateway.toml"
    cfg.write_text(gateway_toml(state, port, vm, vm_login, alice))
    log = workdir / "gateway.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*argv, "-m", "gateway", "serve", "--config", str(cfg), "--log-format", "json"],
            cwd=tree,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    wait_listening(port, proc, f"gateway ({tree})", log)
    return proc, port, (state / "ssh_host_ed25519_key.pub").read_text().strip()


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"


def run(args: argparse.Namespace) -> int:
    nbytes = args.mb * MB
    tmp = Path(tempfile.mkdtemp(prefix="bench-ssh-terminate-"))
    procs: list[subprocess.Popen[bytes]] = []
    sshds: list[SSHD] = []
    try:
        alice = make_key(tmp / "keys" / "alice")
        vm_login = make_key(tmp / "keys" / "vm_login")
        vm = start_sshd(tmp / "vm", [vm_login.public], extra="SetEnv SHLVL=1")
        hop = start_sshd(tmp / "hop", [alice.public], extra="SetEnv SHLVL=1")
        sshds += [vm, hop]
        chunk = memoryview(os.urandom(MB))
        kh = tmp / "known_hosts"
        lines = [f"[{HOST}]:{vm.port} {vm.host_key.public}", f"[{HOST}]:{hop.port} {hop.host_key.public}"]
        trees = [("gateway", REPO)] + [(n, Path(t).resolve()) for n, _, t in (x.partition("=") for x in args.tree)]
        gws = []
        for name, tree in trees:
            proc, port, key = start_gw(tree, tmp / name, vm, vm_login, alice)
            procs.append(proc)
            lines.append(f"[{HOST}]:{port} {key}")
            gws.append((name, proc, port))
        kh.write_text("\n".join(lines) + "\n")
        paths = []
        for name, proc, port in gws:
            paths.append(Path_(name, [*ssh_base(alice.private, kh, args.cipher, port), f"alice+vm01@{HOST}"], False, proc.pid, False))
        inner = [*ssh_base(vm_login.private, kh, args.cipher, vm.port), f"{vm.login}@{HOST}"]
        paths.insert(
            1, Path_("hop", [*ssh_base(alice.private, kh, args.cipher, hop.port), f"{hop.login}@{HOST}"], True, hop.proc.pid, True, inner)
        )

        load = os.getloadavg()
        print(f"ssh_terminate: {args.mb} MB, {args.rounds} rounds, {args.echoes} echoes, alternating {' / '.join(p.name for p in paths)}")
        print(f"cipher {args.cipher} on every OpenSSH leg; {versions()}; {cores()}; load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        for p in paths:  # warm-up
            bulk(p, True, chunk, nbytes, args.per_run)
        for r in range(1, args.rounds + 1):
            for p in paths:
                up, cu = bulk(p, True, chunk, nbytes, args.per_run)
                down, cd = bulk(p, False, chunk, nbytes, args.per_run)
                p50, p99, ce, ue = echo(p, args.echoes, args.per_run)
                p.up.append(up)
                p.down.append(down)
                p.cpu_up.append(cu * 1000)
                p.cpu_down.append(cd * 1000)
                p.p50.append(p50)
                p.p99.append(p99)
                p.cpu_echo.append(ce)
                p.user_echo.append(ue)
                print(f"  round {r} {p.name:<8} up {up:7.1f} MB/s ({cu * 1000:.2f} ms CPU/MB)  down {down:7.1f} MB/s ({cd * 1000:.2f})"
                      f"  echo p50 {p50:6.0f} µs p99 {p99:6.0f} ({ce:.0f} µs CPU, {ue:.0f} user)")  # fmt: skip
        print()
        hopp = paths[1]
        summary: dict[str, object] = {
            "mb": args.mb,
            "rounds": args.rounds,
            "cipher": args.cipher,
            "load_before": load,
        }
        for p in paths:
            print(
                f"{p.name:<8} up {med(p.up)} MB/s, {med(p.cpu_up)} ms CPU/MB | down {med(p.down)} MB/s, {med(p.cpu_down)} ms CPU/MB"
                f" | echo p50 {med(p.p50)} µs, p99 {med(p.p99)} µs, {med(p.cpu_echo)} µs CPU/echo ({med(p.user_echo)} user)"
            )
            ratios = {
                "up": statistics.median(p.up) / statistics.median(hopp.up),
                "down": statistics.median(p.down) / statistics.median(hopp.down),
                "cpu_up": statistics.median(p.cpu_up) / statistics.median(hopp.cpu_up),
                "cpu_down": statistics.median(p.cpu_down) / statistics.median(hopp.cpu_down),
                "p50": statistics.median(p.p50) / statistics.median(hopp.p50),
            }
            if p is not hopp:
                print("         vs hop: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
            summary[p.name] = {"up": p.up, "down": p.down, "cpu_up_ms_per_mb": p.cpu_up, "cpu_down_ms_per_mb": p.cpu_down,
                               "p50_us": p.p50, "p99_us": p.p99, "cpu_us_per_echo": p.cpu_echo,
                               "user_us_per_echo": p.user_echo, "ratios_vs_hop": ratios}  # fmt: skip
        end = os.getloadavg()
        print(f"load at end {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
        return 0
    finally:
        for proc in procs:
            stop_process(proc, grace=10.0)
        for s in sshds:
            s.stop()
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Terminating SSH vs an OpenSSH hop: upload, download, CPU per MB, echo RTT.")
    p.add_argument("--mb", type=int, default=200, help="MB per transfer (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per path (default 5)")
    p.add_argument("--echoes", type=int, default=2000, help="echo round trips per round (default 2000)")
    p.add_argument("--cipher", default=DEFAULT_CIPHER, help=f"cipher of every OpenSSH client (default {DEFAULT_CIPHER})")
    p.add_argument("--tree", action="append", default=[], help="NAME=PATH: also measure the gateway of another source tree")
    p.add_argument("--per-run", type=float, default=120.0, help="limit for one ssh run in seconds")
    p.add_argument("--timeout", type=int, default=1500, help="hard limit for the whole run in seconds")
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with hard_timeout(args.timeout):
            return run(args)
    except (TimeoutError, RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"ssh_terminate: FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
