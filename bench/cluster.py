"""What a cluster costs: one node with N sessions against three nodes on one redis-server with N/3 each.

In one run it measures

- (a) one `bastion serve` process with no [cluster], holding N sessions, and
- (b) three `bastion serve` processes on one redis-server, holding N sessions spread evenly,

where a session is a WebSocket tunnel (`wss://.../v1/tunnel`) to a TCP "VM" (an asyncio sink in this
process), opened from this process against each node's own public port and kept open. Per setup:
`GET /v1/sessions` on node 1 (median and p95 of --calls calls; in (b) two thirds of the rows come from
Redis), a bulk `POST /v1/sessions/disconnect` of all N ids sent to node 1 (wall time, every result must be
`disconnected`), the nodes' idle CPU over --idle seconds and, for (b), Redis memory per session
(`MEMORY USAGE bastion:rows:<node>`) and CPU seconds per heartbeat. The nodes are started with
tests/hostile/test_cluster_processes.py's `cluster()` (its config gets this bench's edits on the way).

Run: .venv/bin/python bench/cluster.py [--sessions 1000] [--calls 30] [--idle 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
import tomli_w  # noqa: E402

import tests.hostile.test_cluster_processes as tcp  # noqa: E402
from tests.e2e.conftest import Keys  # noqa: E402
from tests.hostile.test_cluster_processes import Node, cluster, until  # noqa: E402
from tests.support.peers import SSHD, make_key, running_sshd  # noqa: E402
from tests.support.redis import RedisServer, running_redis  # noqa: E402

HOST = "127.0.0.1"
VM = "sink01"
RESULTS = REPO / "bench" / "results" / "cluster.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- setup


def make_keys(d: Path) -> Keys:
    return Keys(
        dir=d,
        alice=make_key(d / "alice"),
        bob=make_key(d / "bob"),
        carol=make_key(d / "carol"),
        stranger=make_key(d / "stranger"),
        gw_to_vm=make_key(d / "gw_to_vm"),
        ca=make_key(d / "user_ca"),
    )


def bench_edit(sink_port: int, n: int, *, clustered: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """This bench's changes to the config `cluster()` writes, applied just before it is dumped."""

    def edit(cfg: dict[str, Any]) -> dict[str, Any]:
        cfg["vms"].append({"name": VM, "address": HOST, "ssh_port": 22, "trust_on_first_use": True})
        cfg["rules"].append({"users": ["alice"], "vms": [VM], "protocols": ["ssh-jump", "tcp"], "ports": [sink_port]})
        cfg["sessions"] = {**cfg.get("sessions", {}), "max_per_user": 100_000, "rate_per_user": "off"}
        # Pings every 10 min: the idle window then measures the heartbeat, not 1000 WebSocket pings.
        cfg["tunnel"] = {**cfg.get("tunnel", {}), "max_per_token": 10_000, "ping_interval": "600s"}
        # Every tunnel comes from 127.0.0.1, straight to the node's port (no balancer, so no PROXY header).
        cfg["public"].pop("proxy_protocol_from", None)
        cfg["public"]["max_connections_per_source"] = max(1000, 2 * n)
        if not clustered:
            cfg.pop("cluster", None)
        return cfg

    return edit


@contextlib.asynccontextmanager
async def nodes_of(
    tmp: Path, keys: Keys, vm: SSHD, redis: RedisServer, count: int, edit: Callable[[dict[str, Any]], dict[str, Any]]
) -> AsyncIterator[list[Node]]:
    """tests/hostile's `cluster()` with `count` nodes and `edit` applied to each node's config (restored after)."""
    old_nodes, old_tomli = tcp.NODES, vars(tcp)["tomli_w"]

    def restore() -> None:
        tcp.NODES = old_nodes
        setattr(tcp, "tomli_w", old_tomli)  # noqa: B010 (the module does not export it)

    tcp.NODES = count
    setattr(tcp, "tomli_w", types.SimpleNamespace(dumps=lambda cfg: tomli_w.dumps(edit(cfg))))  # noqa: B010
    try:
        async with cluster(tmp, keys, vm, redis) as nodes:
            restore()  # the configs are written: nothing else sees the patch
            yield nodes
    finally:
        restore()


class Sink:
    """The TCP "VM": accepts and reads to EOF. Counts the connections it holds."""

    def __init__(self) -> None:
        self.open = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, 0, backlog=2048)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.open += 1
        self.writers.add(w)
        try:
            while await r.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            self.open -= 1
            self.writers.discard(w)
            w.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.writers):  # their handlers see EOF and end before the loop does
                w.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while self.open:
                        await asyncio.sleep(0.05)
                    await self.server.wait_closed()


async def mint_token(node: Node, keys: Keys, host_pub: str, tmp: Path) -> str:
    kh = tmp / f"known_hosts_{node.name}"
    kh.write_text(f"[{HOST}]:{node.public} {host_pub}\n")
    argv = [
        "ssh", "-F", "/dev/null", "-p", str(node.public),
        "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-i", str(keys.alice.private), f"alice@{HOST}", "token",
    ]  # fmt: skip
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=pipe, stderr=pipe)
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"ssh token on {node.name} failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    return out.decode().strip()


async def open_tunnels(
    http: aiohttp.ClientSession, node: Node, token: str, sink_port: int, count: int, parallel: int
) -> list[aiohttp.ClientWebSocketResponse]:
    ctx = ssl.create_default_context(cafile=node.ca)
    url = f"wss://{HOST}:{node.public}/v1/tunnel?vm={VM}&port={sink_port}"
    headers = {"Authorization": f"Bearer {token}"}
    sem = asyncio.Semaphore(parallel)
    out: list[aiohttp.ClientWebSocketResponse] = []

    async def one() -> None:
        async with sem, asyncio.timeout(30):
            out.append(await http.ws_connect(url, headers=headers, ssl=ctx, autoping=True, heartbeat=None))

    await asyncio.gather(*(one() for _ in range(count)))
    return out


# --------------------------------------------------------------------------- measuring


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime (fields 14 and 15)


async def list_latency(node: Node, calls: int, expect: int) -> tuple[list[float], int]:
    samples: list[float] = []
    rows = 0
    for _ in range(calls):
        t0 = time.perf_counter()
        status, body = await node.api("GET", "/v1/sessions")
        samples.append(time.perf_counter() - t0)
        if status != 200:
            raise RuntimeError(f"GET /v1/sessions: {status} {body}")
        rows = len(body["sessions"])
    if rows != expect:
        print(f"  warning: the last list had {rows} sessions, not {expect}", file=sys.stderr)
    return samples, rows


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


async def bulk_disconnect(node: Node, ids: list[str], batch: int) -> dict[str, Any]:
    """POST /v1/sessions/disconnect: first all ids in one request (noting a refusal), then in batches that fit."""
    one_status, one_body = await node.api("POST", "/v1/sessions/disconnect", {"ids": ids, "reason": "bench"})
    out: dict[str, Any] = {"single_request_status": one_status}
    results: dict[str, str] = {}
    t0 = time.perf_counter()
    if one_status == 200:
        results = one_body["results"]
        out["batches"] = 1
    else:
        out["single_request_error"] = one_body
        chunks = [ids[i : i + batch] for i in range(0, len(ids), batch)]
        answers = await asyncio.gather(*(node.api("POST", "/v1/sessions/disconnect", {"ids": c, "reason": "bench"}) for c in chunks))
        for status, body in answers:
            if status != 200:
                raise RuntimeError(f"POST /v1/sessions/disconnect: {status} {body}")
            results.update(body["results"])
        out["batches"] = len(chunks)
    out["seconds"] = time.perf_counter() - t0 if one_status != 200 else None
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r] = counts.get(r, 0) + 1
    out["results"] = counts
    out["all_disconnected"] = counts.get("disconnected", 0) == len(ids) and len(results) == len(ids)
    return out


async def timed_bulk_disconnect(node: Node, ids: list[str], batch: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = await bulk_disconnect(node, ids, batch)
    if out["seconds"] is None:
        out["seconds"] = time.perf_counter() - t0
    return out


async def idle_cpu(nodes: list[Node], seconds: float) -> list[float]:
    pids = [n.proc.pid for n in nodes if n.proc is not None]
    before = [cpu_seconds(p) for p in pids]
    await asyncio.sleep(seconds)
    return [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]


# --------------------------------------------------------------------------- one setup


async def run_setup(
    label: str, tmp: Path, keys: Keys, vm: SSHD, redis: RedisServer, sink: Sink, args: argparse.Namespace, count: int
) -> dict[str, Any]:
    n = args.sessions
    clustered = count > 1
    d = tmp / label
    d.mkdir()
    res: dict[str, Any] = {"nodes": count, "sessions": n}
    async with nodes_of(d, keys, vm, redis, count, bench_edit(sink.port, n, clustered=clustered)) as nodes:
        host_pub = (d / "cluster_host_key.pub").read_text().strip()
        if clustered:
            res["idle_cpu_empty_s"] = await idle_cpu(nodes, args.idle)
        token = await mint_token(nodes[0], keys, host_pub, tmp)
        for other in nodes[1:]:
            await mint_token(other, keys, host_pub, tmp)  # one per node, as the brief of this bench says; the first is used
        share = [n // count + (1 if i < n % count else 0) for i in range(count)]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            wss: list[aiohttp.ClientWebSocketResponse] = []
            try:
                t0 = time.perf_counter()
                for node, k in zip(nodes, share, strict=True):
                    wss += await open_tunnels(http, node, token, sink.port, k, args.parallel)
                res["open_s"] = time.perf_counter() - t0
                print(f"  {label}: {len(wss)} tunnels open in {res['open_s']:.1f} s ({share})")

                async def all_listed() -> bool:
                    status, body = await nodes[0].api("GET", "/v1/sessions")
                    return status == 200 and len(body["sessions"]) == n and sink.open >= n

                await until(all_listed, timeout=60)
                samples, _ = await list_latency(nodes[0], args.calls, n)
                res["list_s"] = samples
                res["list_median_s"] = statistics.median(samples)
                res["list_p95_s"] = p95(samples)
                print(f"  {label}: GET /v1/sessions median {res['list_median_s'] * 1000:.1f} ms, p95 {res['list_p95_s'] * 1000:.1f} ms")

                per = await idle_cpu(nodes, args.idle)
                res["idle_cpu_s"] = per
                if clustered:
                    beats = args.idle / tcp.HEARTBEAT
                    res["heartbeats_in_window"] = beats
                    res["cpu_per_heartbeat_s"] = [c / beats for c in per]
                    empty = res["idle_cpu_empty_s"]
                    res["cpu_per_heartbeat_over_empty_s"] = [(c - e) / beats for c, e in zip(per, empty, strict=True)]
                    r = aioredis.from_url(redis.url)
                    try:
                        mem = {x.name: await r.memory_usage(f"bastion:rows:{x.name}", samples=0) for x in nodes}
                        raw_len = {x.name: await r.strlen(f"bastion:rows:{x.name}") for x in nodes}
                    finally:
                        await r.aclose()
                    res["redis_bytes"] = mem
                    res["redis_value_bytes"] = raw_len
                    res["redis_bytes_per_session"] = {k: mem[k] / s for k, s in zip(mem, share, strict=True)}
                    print(f"  {label}: redis bytes/session {[round(v) for v in res['redis_bytes_per_session'].values()]}")
                print(f"  {label}: idle CPU over {args.idle:g} s {[round(c, 3) for c in per]}")

                _, body = await nodes[0].api("GET", "/v1/sessions")
                ids = [row["id"] for row in body["sessions"]]
                disc = await timed_bulk_disconnect(nodes[0], ids, args.batch)
                res["disconnect"] = disc
                print(f"  {label}: bulk disconnect {disc['seconds']:.2f} s in {disc['batches']} request(s): {disc['results']}")
                _, body = await nodes[0].api("GET", "/v1/sessions")
                res["left_after_disconnect"] = len(body["sessions"])
            finally:
                for ws in wss:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(2):
                            await ws.close()
        res["logged_tracebacks"] = sum(
            1
            for node in nodes
            for line in (node.dir / "gateway.log").read_text(errors="replace").splitlines()
            if line.startswith("{") and "exception" in json.loads(line)
        )
    return res


# --------------------------------------------------------------------------- main


def table(a: dict[str, Any], b: dict[str, Any]) -> str:
    def ms(x: float) -> str:
        return f"{x * 1000:.1f}"

    rows: list[tuple[str, str, str, str]] = []

    def ratio(x: float, y: float) -> str:
        return f"{y / x:.2f}" if x else "-"

    am, bm = a["list_median_s"], b["list_median_s"]
    rows.append(("GET /v1/sessions median ms", ms(am), ms(bm), ratio(am, bm)))
    rows.append(("GET /v1/sessions p95 ms", ms(a["list_p95_s"]), ms(b["list_p95_s"]), ratio(a["list_p95_s"], b["list_p95_s"])))
    da, db = a["disconnect"], b["disconnect"]
    rows.append(("bulk disconnect s", f"{da['seconds']:.2f}", f"{db['seconds']:.2f}", ratio(da["seconds"], db["seconds"])))
    rows.append(("  requests (64 KiB bodies)", str(da["batches"]), str(db["batches"]), "-"))
    rows.append(("  all disconnected", str(da["all_disconnected"]), str(db["all_disconnected"]), "-"))
    rows.append(("  results", json.dumps(da["results"]), json.dumps(db["results"]), "-"))
    rows.append(("  listed right after", str(a["left_after_disconnect"]), str(b["left_after_disconnect"]), "-"))
    ia = sum(a["idle_cpu_s"])
    ib = sum(b["idle_cpu_s"])
    rows.append(("idle CPU s, all nodes", f"{ia:.3f}", f"{ib:.3f}", ratio(ia, ib)))
    rows.append(("CPU ms/heartbeat per node", "-", " ".join(f"{c * 1000:.2f}" for c in b["cpu_per_heartbeat_s"]), "-"))
    rows.append(("  same, over 0 sessions", "-", " ".join(f"{c * 1000:.2f}" for c in b["cpu_per_heartbeat_over_empty_s"]), "-"))
    rows.append(("Redis bytes/session", "-", " ".join(f"{v:.0f}" for v in b["redis_bytes_per_session"].values()), "-"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(8, *(len(r[1]) for r in rows))
    w2 = max(8, *(len(r[2]) for r in rows))
    lines = [f"| {'measure':<{w0}} | {'(a) 1 node':>{w1}} | {'(b) 3 nodes':>{w2}} | (b)/(a) |"]
    lines.append(f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|{'-' * (w2 + 2)}|---------|")
    lines += [f"| {r[0]:<{w0}} | {r[1]:>{w1}} | {r[2]:>{w2}} | {r[3]:>7} |" for r in rows]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    sink = Sink()
    try:
        keys = make_keys(tmp / "keys")
        await sink.start()
        with running_sshd(tmp / "vm", [keys.gw_to_vm.public]) as vm, running_redis() as redis:
            print(f"cluster: {args.sessions} WebSocket tunnels; (a) 1 node, (b) 3 nodes on one redis-server; heartbeat {tcp.HEARTBEAT}s")
            a = await run_setup("a", tmp, keys, vm, redis, sink, args, 1)
            b = await run_setup("b", tmp, keys, vm, redis, sink, args, 3)
        out = table(a, b)
        print()
        print(out)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "benchmark": "cluster",
            "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "args": vars(args),
            "cores": os.cpu_count(),
            "heartbeat_s": tcp.HEARTBEAT,
            "a": a,
            "b": b,
            "table": out,
        }
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(REPO)}")
        ok = a["disconnect"]["all_disconnected"] and b["disconnect"]["all_disconnected"]
        return 0 if ok else 2
    finally:
        await sink.stop()
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def hard_timeout(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: types.FrameType | None) -> None:
        raise TimeoutError(f"the run took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One node with N tunnels vs three nodes on one redis-server with N/3 each.")
    p.add_argument("--sessions", type=int, default=1000, help="WebSocket tunnels held in each setup (default 1000)")
    p.add_argument("--calls", type=int, default=30, help="GET /v1/sessions calls timed on node 1 (default 30)")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement (default 10)")
    p.add_argument("--parallel", type=int, default=50, help="tunnels being opened at once (default 50)")
    p.add_argument("--batch", type=int, default=500, help="ids per disconnect request when all N do not fit in one (default 500)")
    p.add_argument("--timeout", type=int, default=600, help="hard limit for the whole run in seconds (default 600)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (node logs, configs)")
    args = p.parse_args(argv)
    if not 3 <= args.sessions <= 9000 or not 1 <= args.calls <= 1000 or not 1 <= args.idle <= 300 or not 1 <= args.parallel <= 256:
        p.error("need 3 <= --sessions <= 9000, 1 <= --calls <= 1000, 1 <= --idle <= 300, 1 <= --parallel <= 256")
    if not 1 <= args.batch <= 1000 or args.timeout < 30:
        p.error("need 1 <= --batch <= 1000, --timeout >= 30")
    try:
        with hard_timeout(args.timeout):
            return asyncio.run(run(args))
    except (TimeoutError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"cluster: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
