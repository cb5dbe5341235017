"""Scale: one `bastion serve` process holding N idle sessions, and what the control port costs the relays then.

Per N (--sizes, default 1000 9000) and per gateway source tree (--src, default this checkout; give a second
tree, e.g. the code before a change exported with `git archive`, to compare both in one run, measured in
alternating order), one fresh gateway process:

- holds N idle jump sessions (`ssh -J`'s direct-tcpip channels, from asyncssh clients in this process, up to
  --per-conn channels per SSH connection) and --ws WebSocket tunnels (`wss://.../v1/tunnel`), all to an echo
  "VM" in its own process; RSS per session is the growth of the gateway's VmRSS over each batch (read after a
  list, so each row's cached text is counted);
- `GET /v1/sessions` --calls times, then `GET /metrics` --calls times, one new HTTPS connection per call, from a
  child process (the operator's client is not the user's): p50, p99 (the largest of the calls when there are
  fewer than 100), the time to the answer's headers, the answer's size;
- the largest round trip of 64 bytes echoed through one more open jump channel, in a loop, while the lists
  are fetched (and, as the floor, over the same number of round trips with nothing else going on);
- a bulk `POST /v1/sessions/disconnect` of 1,000 ids: wall time, every result must be `disconnected`;
- then every session but the prober's closed: the gateway's RSS after a mass close.

For the sizes of --term-sizes (default 1000), a second fresh gateway holds N idle terminating SSH sessions
(`ssh alice+idle01@gw idle`: the user's SSH connection to the gateway and the gateway's to the VM, 2 N
connections in the gateway). The VM is one asyncssh server in its own process (its host key pinned in the
gateway's inventory, the gateway logging in with its own key, as with any VM): an honest stand-in for measuring
the gateway's memory, where one sshd per session would be 9,000 processes. Reported: KiB per session, the
gateway's CPU per session opened, opens per second, RSS at N and after closing all.

It prints one JSON line per setup, the load average at start and end, a table of medians over --rounds per N and
tree and, with two trees, their ratios (last tree / first; below 1 is better). Results go to bench/results/scale.json.

Run: .venv/bin/python bench/scale.py [--sizes 1000 5000 9000] [--term-sizes 1000 5000 9000] [--src /tmp/base] [--calls 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import hashlib
import json
import os
import resource
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import asyncssh  # noqa: E402

from bench.ssh_forward import HOST, cores, stop_process, tail, toml_value, wait_listening  # noqa: E402
from tests.support.peers import KeyPair, free_port, make_key  # noqa: E402

VM = "sink01"
SSH_VM = "idle01"  # the terminating sessions' VM
RESULTS = REPO / "bench" / "results" / "scale.json"
OPERATOR_TOKEN = secrets.token_urlsafe(24)
USER_TOKEN = "bench-" + secrets.token_urlsafe(24)
PING = b"p" * 64


# --------------------------------------------------------------------------- the echo VM


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()


async def _echo_main() -> None:
    server = await asyncio.start_server(_echo, HOST, 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def start_echo(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = (workdir / "echo.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--echo"], stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


# --------------------------------------------------------------------------- the SSH "VM" of terminating sessions


async def _idle(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """An idle command: it ends when the gateway closes the channel (EOF or the channel gone)."""
    with contextlib.suppress(asyncssh.Error, OSError):
        await process.stdin.read()
    process.exit(0)


async def _vm_main(workdir: Path) -> None:
    """One asyncssh server standing in for every VM of the terminating sessions (one sshd per session would be 9,000
    processes): the gateway logs in with its VM login key and pins this host key, as for any VM."""
    acceptor = await asyncssh.listen(
        HOST,
        0,
        server_host_keys=[str(workdir / "vm_host_key")],
        authorized_client_keys=str(workdir / "vm_login.pub"),
        process_factory=_idle,
        encoding=None,
        backlog=4096,
        login_timeout=60,
    )
    print(acceptor.get_port(), flush=True)
    await acceptor.wait_closed()


def start_ssh_vm(workdir: Path) -> tuple[subprocess.Popen[bytes], int, str, KeyPair]:
    """The SSH VM in its own process: (process, port, its host key's public line, the gateway's login key for it)."""
    host = make_key(workdir / "vm_host_key")
    login = make_key(workdir / "vm_login")
    log = (workdir / "ssh-vm.log").open("wb")
    argv = [sys.executable, str(Path(__file__).resolve()), "--ssh-vm", str(workdir)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline()), host.public, login


# --------------------------------------------------------------------------- the operator fetching lists


async def _lister_main(spec: dict[str, Any]) -> None:
    """Fetches each path of `spec["calls"]` a number of times, one new HTTPS connection per call, in its own process:
    decrypting megabytes of lists must not stall the prober's loop and be charged to the gateway. Prints JSON."""
    api = Api(spec["base"], Path(spec["ca"]), os.environ["SCALE_OPERATOR_TOKEN"])
    out: dict[str, Any] = {}
    for path, calls in spec["calls"]:
        secs: list[float] = []
        api.heads.clear()
        data = b""
        for _ in range(calls):
            status, data, took = await api.call("GET", path)
            if status != 200:
                raise RuntimeError(f"GET {path}: {status}")
            secs.append(took)
        rows = len(json.loads(data)["sessions"]) if path == "/v1/sessions" else None
        out[path] = {"secs": secs, "heads": list(api.heads), "size": len(data), "rows": rows}
    print(json.dumps(out), flush=True)


async def fetch_in_child(api: Api, calls: list[tuple[str, int]]) -> dict[str, Any]:
    """`_lister_main` in a child process (bounded by a timeout); its answer."""
    spec = json.dumps({"base": api.base, "ca": str(api.ca), "calls": calls})
    env = {**os.environ, "SCALE_OPERATOR_TOKEN": api.token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--lister", spec, stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        async with asyncio.timeout(600):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the lister failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out)
    return result


# --------------------------------------------------------------------------- the gateway


@dataclass(frozen=True)
class SshVm:
    port: int
    host_key: str  # the public line the gateway pins
    login: KeyPair  # the gateway's key for its login on it


@dataclass(frozen=True)
class Env:
    """What every setup of a run shares: its temp dir, alice's key, the echo VM's port, the SSH VM."""

    workdir: Path
    key: KeyPair
    sink_port: int
    vm: SshVm

    def gateway(self, src: Path, prefix: str, n: int) -> Gateway:
        return start_gateway(src, Path(tempfile.mkdtemp(dir=self.workdir, prefix=prefix)), self.key, self.sink_port, n, self.vm)


def config(state_dir: Path, port: int, alice: KeyPair, sink_port: int, n: int, vm: SshVm) -> str:
    op_sha = hashlib.sha256(OPERATOR_TOKEN.encode()).hexdigest()
    user_sha = hashlib.sha256(USER_TOKEN.encode()).hexdigest()
    return "\n".join(
        [
            "[gateway]",
            f"node = {toml_value('bench')}",
            f"state_dir = {toml_value(str(state_dir))}",
            "workers = 1",  # one process: its RSS and its loop are what is measured
            "[public]",
            f"listen = {toml_value([f'{HOST}:{port}'])}",
            f"max_connections_per_source = {toml_value(max(1000, 2 * n))}",
            "[control]",
            f"listen = {toml_value([f'{HOST}:0'])}",
            "[ssh]",
            "max_forwards = 1000",
            'max_startups = "100:30:200"',  # the terminating sessions log in 32 at a time from one address
            "per_source_max_startups = 64",
            "[sessions]",
            "max_per_user = 100000",
            'rate_per_user = "off"',
            "[tunnel]",
            "max_per_token = 10000",
            'ping_interval = "600s"',  # idle means idle: no 1,000 pings inside the window
            "[[operators]]",
            'name = "bench"',
            'role = "operator"',
            f"token_sha256 = {toml_value(op_sha)}",
            "[[vms]]",
            f"name = {toml_value(VM)}",
            f"address = {toml_value(HOST)}",
            "ssh_port = 22",
            "trust_on_first_use = true",
            "[[vms]]",
            f"name = {toml_value(SSH_VM)}",
            f"address = {toml_value(HOST)}",
            f"ssh_port = {vm.port}",
            f"host_key = {toml_value(vm.host_key)}",
            'default_login = "bench"',
            "[vms.logins.bench]",
            f"key = {toml_value(str(vm.login.private))}",
            "[[users]]",
            'name = "alice"',
            f"keys = {toml_value([alice.public])}",
            'groups = ["bench"]',
            f"tokens_sha256 = {toml_value([user_sha])}",
            "[[rules]]",
            'groups = ["bench"]',
            f"vms = {toml_value([VM])}",
            'protocols = ["tcp", "ssh-jump"]',
            f"ports = {toml_value([sink_port])}",
            "[[rules]]",
            'groups = ["bench"]',
            f"vms = {toml_value([SSH_VM])}",
            'protocols = ["ssh"]',
            'logins = ["bench"]',
        ]
    )


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    public: int
    control: int
    ca: Path
    log: Path

    def cpu_s(self) -> float:
        """User + system CPU seconds of the gateway so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def start_gateway(src: Path, workdir: Path, alice: KeyPair, sink_port: int, n: int, vm: SshVm) -> Gateway:
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "gw-state"
    cfg, log = workdir / "gateway.toml", workdir / "gateway.log"
    port = free_port(HOST)
    cfg.write_text(config(state, port, alice, sink_port, n, vm) + "\n")
    env = {**os.environ, "PYTHONPATH": str(src)}
    with log.open("ab") as out:
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--log-format", "json"]
        proc = subprocess.Popen(argv, cwd=src, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    wait_listening(port, proc, "gateway", log)
    for _ in range(200):
        for line in log.read_text(errors="replace").splitlines():
            if '"gateway_started"' in line:
                control = int(json.loads(line)["control"][0].rsplit(":", 1)[1])
                return Gateway(proc, port, control, state / "tls.crt", log)
        time.sleep(0.05)
    raise RuntimeError(f"no gateway_started line\n{tail(log)}")


# --------------------------------------------------------------------------- sessions


class Jump:
    """Direct-tcpip channels over a few asyncssh connections, as `ssh -J` opens them."""

    def __init__(self, gw: Gateway, key: KeyPair, sink_port: int) -> None:
        self.gw, self.key, self.sink_port = gw, key, sink_port
        self.conns: list[asyncssh.SSHClientConnection] = []
        self.streams: list[tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]] = []

    async def connect(self) -> asyncssh.SSHClientConnection:
        conn = await asyncssh.connect(
            HOST, self.gw.public, username="alice", client_keys=[str(self.key.private)], known_hosts=None, agent_path=None
        )
        self.conns.append(conn)
        return conn

    async def open(self, count: int, per_conn: int, parallel: int = 100) -> None:
        sem = asyncio.Semaphore(parallel)

        async def one(conn: asyncssh.SSHClientConnection) -> None:
            async with sem, asyncio.timeout(60):
                r, w = await conn.open_connection(VM, self.sink_port, encoding=None)
                self.streams.append((r, w))

        left = count
        while left > 0:
            k = min(per_conn, left)
            conn = await self.connect()
            await asyncio.gather(*(one(conn) for _ in range(k)))
            left -= k

    async def close(self) -> None:
        for c in self.conns:
            c.close()
        for c in self.conns:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await c.wait_closed()


async def open_tunnels(http: aiohttp.ClientSession, gw: Gateway, sink_port: int, count: int) -> list[aiohttp.ClientWebSocketResponse]:
    ctx = ssl.create_default_context(cafile=gw.ca)
    url = f"wss://{HOST}:{gw.public}/v1/tunnel?vm={VM}&port={sink_port}"
    sem = asyncio.Semaphore(20)
    out: list[aiohttp.ClientWebSocketResponse] = []

    async def one() -> None:
        for attempt in range(3):  # on a loaded box a ClientHello can miss the detect deadline (then the door is SSH's)
            try:
                async with sem, asyncio.timeout(60):
                    out.append(await http.ws_connect(url, headers={"Authorization": f"Bearer {USER_TOKEN}"}, ssl=ctx, heartbeat=None))
                return
            except aiohttp.ClientConnectorError:
                if attempt == 2:
                    raise

    await asyncio.gather(*(one() for _ in range(count)))
    return out


class Terminating:
    """Terminating SSH sessions (`ssh alice+idle01@gw idle`), one SSH connection each, as OpenSSH opens them: the
    gateway holds the user's connection and its own to the VM for each."""

    def __init__(self, gw: Gateway, key: KeyPair) -> None:
        self.gw, self.key = gw, key
        self.conns: list[asyncssh.SSHClientConnection] = []

    async def open(self, count: int, parallel: int) -> None:
        sem = asyncio.Semaphore(parallel)

        async def one() -> None:
            async with sem, asyncio.timeout(120):
                conn = await asyncssh.connect(
                    HOST,
                    self.gw.public,
                    username=f"alice+{SSH_VM}",
                    client_keys=[str(self.key.private)],
                    known_hosts=None,
                    agent_path=None,
                )
                self.conns.append(conn)
                await conn.create_session(asyncssh.SSHClientSession, "idle", encoding=None)

        await asyncio.gather(*(one() for _ in range(count)))

    async def close(self) -> None:
        await close_all(self.conns)
        self.conns.clear()


async def close_all(conns: list[asyncssh.SSHClientConnection]) -> None:
    for c in conns:
        c.close()
    for c in conns:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await c.wait_closed()


async def until_count(api: Api, done: Callable[[int], bool], what: str) -> None:
    """Until the gateway's session count (`GET /v1/cluster`, no list) satisfies `done`; at most 600 polls."""
    for _ in range(600):
        try:
            status, body = await api.get_json("/v1/cluster")
        except aiohttp.ClientError:  # a control connection refused while the gateway is saturated by logins: ask again
            status, body = 0, None
        if status == 200 and done(int(body["sessions"])):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the gateway never had {what}")


# --------------------------------------------------------------------------- control API


class Api:
    def __init__(self, base: str, ca: Path, token: str) -> None:
        self.base, self.ca, self.token = base, ca, token
        self.ctx = ssl.create_default_context(cafile=ca)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.heads: list[float] = []  # per call: seconds until the answer's headers arrived (the body is built by then)

    @classmethod
    def of(cls, gw: Gateway) -> Api:
        return cls(f"https://{HOST}:{gw.control}", gw.ca, OPERATOR_TOKEN)

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes, float]:
        """One request on a new HTTPS connection (the gateway closes every connection after its answer)."""
        t0 = time.perf_counter()
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ctx, force_close=True)) as http,
            http.request(method, self.base + path, json=body, headers=self.headers, timeout=aiohttp.ClientTimeout(total=120)) as r,
        ):
            self.heads.append(time.perf_counter() - t0)
            data = await r.read()
            return r.status, data, time.perf_counter() - t0

    async def get_json(self, path: str) -> tuple[int, Any]:
        status, data, _ = await self.call("GET", path)
        return status, json.loads(data)


class Prober:
    """Echoes 64 bytes through one open jump channel in a loop and keeps every round trip."""

    def __init__(self, r: asyncssh.SSHReader[bytes], w: asyncssh.SSHWriter[bytes]) -> None:
        self.r, self.w = r, w
        self.samples: list[float] = []

    async def once(self) -> float:
        t0 = time.perf_counter()
        self.w.write(PING)
        await self.r.readexactly(len(PING))
        return time.perf_counter() - t0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.samples.append(await self.once())


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def one_setup(src: Path, label: str, n: int, args: argparse.Namespace, env: Env) -> dict[str, Any]:
    """N jump sessions and the tunnels in one fresh gateway: memory, lists, metrics, relay round trips, a bulk
    disconnect, then every session closed (RSS after a mass close)."""
    key, sink_port = env.key, env.sink_port
    gw = env.gateway(src, f"{label}-{n}-", n)  # a fresh log per setup
    out: dict[str, Any] = {"src": label, "n": n}
    jump = Jump(gw, key, sink_port)
    tunnels: list[aiohttp.ClientWebSocketResponse] = []
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))  # aiohttp holds 100 connections by default
    api = Api.of(gw)
    try:
        probe_conn = await jump.connect()
        pr, pw = await probe_conn.open_connection(VM, sink_port, encoding=None)
        prober = Prober(pr, pw)
        for _ in range(20):  # warm-up: the first round trips pay for imports and caches
            await prober.once()
        await api.call("GET", "/v1/sessions")
        await api.call("GET", "/metrics")
        rss0 = gw.rss_kib()
        out["rss_start_mib"] = round(rss0 / 1024, 1)
        await jump.open(n, args.per_conn)
        await until_count(api, lambda k: k >= n + 1, f"{n + 1} sessions")
        await api.call("GET", "/v1/sessions")  # what a polled gateway holds: each row's cached text included
        rss1 = gw.rss_kib()
        out["jump_kib_per_session"] = round((rss1 - rss0) / n, 1)
        if args.ws:
            tunnels = await open_tunnels(http, gw, sink_port, args.ws)
            await until_count(api, lambda k: k >= n + 1 + args.ws, f"{n + 1 + args.ws} sessions")
            await api.call("GET", "/v1/sessions")
            rss2 = gw.rss_kib()
            out["ws_kib_per_session"] = round((rss2 - rss1) / args.ws, 1)
        out["rss_mib"] = round(gw.rss_kib() / 1024, 1)
        # This process holds every client end (a million objects at 9,000): its own full collections would stall the
        # prober and be charged to the gateway. Freeze them; unfrozen again after the setup.
        gc.collect()
        gc.freeze()
        total = n + 1 + args.ws
        # The floor: round trips with nothing else asked of the gateway.
        floor = [await prober.once() for _ in range(200)]
        out["rtt_idle_max_ms"] = round(max(floor) * 1000, 2)
        stop = asyncio.Event()
        prober.samples.clear()
        probing = asyncio.create_task(prober.run(stop), name="probe")
        try:
            fetched = await fetch_in_child(api, [("/v1/sessions", args.calls), ("/metrics", args.calls)])
        finally:
            stop.set()
            await probing
        lists, metrics = fetched["/v1/sessions"], fetched["/metrics"]
        if lists["rows"] != total:
            raise RuntimeError(f"the list had {lists['rows']} rows, not {total}")
        out |= {
            "list_p50_ms": round(statistics.median(lists["secs"]) * 1000, 1),
            "list_p99_ms": round(pct(lists["secs"], 0.99) * 1000, 1),
            "list_headers_p50_ms": round(statistics.median(lists["heads"]) * 1000, 1),
            "list_bytes": lists["size"],
            "metrics_p50_ms": round(statistics.median(metrics["secs"]) * 1000, 1),
            "metrics_p99_ms": round(pct(metrics["secs"], 0.99) * 1000, 1),
            "rtt_during_lists_max_ms": round(max(prober.samples) * 1000, 2),
            "rtt_during_lists_p50_ms": round(statistics.median(prober.samples) * 1000, 2),
            "rtt_samples": len(prober.samples),
        }
        status, body = await api.get_json("/v1/sessions")
        ids = [r["id"] for r in body["sessions"] if r["protocol"] == "ssh-jump"][1:][-1000:]  # not the prober (the oldest)
        t0 = time.perf_counter()
        status, data, _ = await api.call("POST", "/v1/sessions/disconnect", {"ids": ids, "reason": "bench"})
        out["bulk_disconnect_s"] = round(time.perf_counter() - t0, 3)
        results = json.loads(data).get("results", {}) if status == 200 else {}
        out["bulk_all_disconnected"] = status == 200 and sum(v == "disconnected" for v in results.values()) == len(ids)
        out["bulk_ids"] = len(ids)
        # A mass close: every session but the prober's ends; what the gateway's RSS is then.
        for ws in tunnels:
            with contextlib.suppress(Exception):
                await ws.close()
        tunnels.clear()
        await close_all(jump.conns[1:])
        await until_count(api, lambda k: k <= 1, "only the prober's session left")
        out["rss_after_close_mib"] = round(gw.rss_kib() / 1024, 1)
    finally:
        for ws in tunnels:
            with contextlib.suppress(Exception):
                await ws.close()
        await http.close()
        await jump.close()
        stop_process(gw.proc)
        gc.unfreeze()
    return out


async def terminating_setup(src: Path, label: str, n: int, args: argparse.Namespace, env: Env) -> dict[str, Any]:
    """N idle terminating SSH sessions in one fresh gateway (2 N SSH connections there): memory per session, the
    gateway's CPU per session opened, a list, then every session closed (RSS after a mass close)."""
    gw = env.gateway(src, f"{label}-term-{n}-", n)
    out: dict[str, Any] = {"src": label, "n": n, "kind": "terminating"}
    api = Api.of(gw)
    term = Terminating(gw, env.key)
    try:
        await api.call("GET", "/v1/sessions")
        await api.call("GET", "/metrics")
        await term.open(1, 1)  # warm-up: the first login pays for imports and caches
        await until_count(api, lambda k: k >= 1, "the warm-up session")
        await term.close()
        await until_count(api, lambda k: k == 0, "no session")
        rss0, cpu0, t0 = gw.rss_kib(), gw.cpu_s(), time.perf_counter()
        out["rss_start_mib"] = round(rss0 / 1024, 1)
        await term.open(n, args.term_parallel)
        await until_count(api, lambda k: k >= n, f"{n} terminating sessions")
        secs, cpu = time.perf_counter() - t0, gw.cpu_s() - cpu0
        status, data, took = await api.call("GET", "/v1/sessions")
        if status != 200 or len(json.loads(data)["sessions"]) != n:
            raise RuntimeError(f"GET /v1/sessions: {status}, not {n} rows")
        out["term_list_ms"] = round(took * 1000, 1)
        rss1 = gw.rss_kib()
        out |= {
            "term_kib_per_session": round((rss1 - rss0) / n, 1),
            "term_open_per_s": round(n / secs, 1),
            "term_cpu_ms_per_open": round(cpu / n * 1000, 2),
            "term_rss_mib": round(rss1 / 1024, 1),
        }
        await term.close()
        await until_count(api, lambda k: k == 0, "no session")
        out["term_rss_after_close_mib"] = round(gw.rss_kib() / 1024, 1)
    finally:
        await term.close()
        stop_process(gw.proc)
    return out


FIELDS = (
    "jump_kib_per_session",
    "ws_kib_per_session",
    "term_kib_per_session",
    "rss_mib",
    "list_p50_ms",
    "list_p99_ms",
    "list_headers_p50_ms",
    "metrics_p50_ms",
    "metrics_p99_ms",
    "rtt_idle_max_ms",
    "rtt_during_lists_max_ms",
    "bulk_disconnect_s",
    "rss_start_mib",
    "rss_after_close_mib",
    "term_rss_mib",
    "term_rss_after_close_mib",
    "term_open_per_s",
    "term_cpu_ms_per_open",
)


async def run(args: argparse.Namespace) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the gateway and the echo VM inherit it
    srcs = [(Path(s).resolve(), Path(s).resolve().name if s != str(REPO) else "this") for s in args.src]
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    echo, sink_port = start_echo(tmp)
    ssh_vm: subprocess.Popen[bytes] | None = None
    key = make_key(tmp / "alice")
    rows: list[dict[str, Any]] = []
    load0 = os.getloadavg()
    try:
        ssh_vm, vm_port, vm_host_key, vm_login = start_ssh_vm(tmp)
        env = Env(tmp, key, sink_port, SshVm(vm_port, vm_host_key, vm_login))
        for i, n in enumerate(args.sizes):
            order = srcs if i % 2 == 0 else srcs[::-1]  # alternate which tree goes first
            for _round in range(args.rounds):
                for src, label in order:
                    row = await one_setup(src, label, n, args, env)
                    if n in args.term_sizes:
                        term = await terminating_setup(src, label, n, args, env)
                        row |= {k: v for k, v in term.items() if k.startswith("term_")}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                order = order[::-1]
    finally:
        stop_process(ssh_vm)
        stop_process(echo)
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    print(f"\nload average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    labels = [label for _, label in srcs]
    print("| N | tree | " + " | ".join(FIELDS) + " |")
    print("|---" * (len(FIELDS) + 2) + "|")
    for n in args.sizes:
        for label in labels:
            mine = [r for r in rows if r["n"] == n and r["src"] == label]
            cells = [str(statistics.median([r[f] for r in mine if f in r])) if any(f in r for r in mine) else "-" for f in FIELDS]
            print(f"| {n} | {label} | " + " | ".join(cells) + " |")
        if len(labels) > 1:  # the last tree against the first, measured in the same run: below 1 is better
            first, last = ([r for r in rows if r["n"] == n and r["src"] == lb] for lb in (labels[0], labels[-1]))
            ratios = []
            for f in FIELDS:
                if not all(any(f in r for r in side) for side in (first, last)):
                    ratios.append("-")
                    continue
                a, b = (statistics.median([r[f] for r in side if f in r]) for side in (first, last))
                ratios.append(f"{b / a:.2f}" if a else "-")
            print(f"| {n} | {labels[-1]}/{labels[0]} | " + " | ".join(ratios) + " |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"when": dt.datetime.now(dt.UTC).isoformat(), "cores": cores(), "load": [load0, load1], "args": vars(args), "rows": rows},
            indent=1,
            default=str,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 9000])
    p.add_argument("--src", nargs="+", default=[str(REPO)], help="gateway source trees to compare (default: this checkout)")
    p.add_argument("--ws", type=int, default=1000, help="WebSocket tunnels held besides the N jump sessions")
    p.add_argument("--per-conn", type=int, default=500, help="jump channels per SSH connection")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--term-sizes", type=int, nargs="*", default=[1000], help="the sizes that also hold N terminating SSH sessions")
    p.add_argument("--term-parallel", type=int, default=32, help="terminating SSH logins in flight at once")
    p.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ssh-vm", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--lister", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo:
        asyncio.run(_echo_main())
        return 0
    if args.ssh_vm is not None:
        asyncio.run(_vm_main(args.ssh_vm))
        return 0
    if args.lister is not None:
        asyncio.run(_lister_main(json.loads(args.lister)))
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
