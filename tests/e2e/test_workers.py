"""`[gateway] workers = 2`: the real `bastion serve` as a supervisor with two worker processes, real OpenSSH clients
from two loopback addresses (the kernel sends each address to one worker), one control port with one view.

127.0.0.1 and 127.0.0.2 differ in their lowest bit, so they reach different workers whatever the order: each test
checks that the two sessions' nodes differ instead of assuming which is which.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.conftest import OPERATOR_TOKEN, Keys
from tests.e2e.test_daemon import Child, Daemon, recv_notify, running_daemon
from tests.support.peers import SSHD
from tests.support.redis import running_redis
from tests.support.sse import event_stream

SOURCES = ("127.0.0.1", "127.0.0.2")


def two_workers(cfg: dict[str, Any]) -> None:
    cfg["gateway"]["workers"] = 2
    cfg["gateway"]["shutdown_grace"] = "2s"


@contextlib.asynccontextmanager
async def gateway(tmp: Path, keys: Keys, vm: SSHD, env: dict[str, str] | None = None) -> AsyncIterator[Daemon]:
    async with running_daemon(tmp, keys, vm, two_workers, env=env) as d:
        await d.wait_event("gateway_started", count=2)
        await d.wait_event("workers_started")
        yield d


async def open_cat(d: Daemon, source: str) -> tuple[Child, dict[str, Any]]:
    """A long-lived `ssh alice+web01@gw cat` from `source`, and its session_opened line (which names the worker)."""
    before = len(d.events("session_opened"))
    child = await d.spawn(*d.ssh_argv("alice+web01", "-o", f"BindAddress={source}", "cat"), stdin=True)
    opened = await d.wait_event("session_opened", count=before + 1)
    [mine] = [e for e in opened[before:] if e["source_ip"] == source]
    return child, mine


def worker_pids(d: Daemon) -> dict[int, int]:
    """worker index -> its pid, the latest start of each."""
    return {e["worker"]: e["pid"] for e in d.events("worker_started")}


async def control(d: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    ctx = ssl.create_default_context(cafile=str(d.ca_file))
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    async with aiohttp.ClientSession() as http, asyncio.timeout(15):
        async with http.request(method, d.control_url + path, json=body, headers=headers, ssl=ctx) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()


async def listed_all(d: Daemon, ids: set[str]) -> dict[str, Any]:
    """GET /v1/sessions until it lists every one of `ids`: another worker's rows come with its heartbeat (1 s)."""
    async with asyncio.timeout(10):
        while True:
            status, listed = await control(d, "GET", "/v1/sessions")
            assert status == 200
            if ids <= {r["id"] for r in listed["sessions"]}:
                return dict(listed)
            await asyncio.sleep(0.25)  # another process's state: no event here to wait on


async def test_two_workers_one_view_and_disconnects_across_them(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """Sessions on both workers are listed (with their worker as node) by the one control port, whichever worker
    answers; an operator's disconnect reaches the session on the other worker, whose user reads the notice; and
    /metrics counts both workers' sessions."""
    async with gateway(tmp_path, keys, vm) as d:
        async with event_stream(d.control_url, OPERATOR_TOKEN, str(d.ca_file)) as next_event:
            cats = [await open_cat(d, src) for src in SOURCES]
            nodes = {s["node"] for _, s in cats}
            assert nodes == {"test-node.w1", "test-node.w2"}, nodes
            ids = {s["session_id"] for _, s in cats}
            # The page's stream (served by one worker) shows both workers' sessions as they open.
            seen: set[str] = set()
            while seen != ids:
                ev = await next_event(lambda kind, data: kind in ("opened", "snapshot"))
                rows = ev["sessions"] if ev["kind"] == "snapshot" else [ev["session"]]
                seen |= {r["id"] for r in rows} & ids
            listed = await listed_all(d, ids)
            assert {r["node"] for r in listed["sessions"] if r["id"] in ids} == nodes
            assert {"test-node.w1", "test-node.w2"} <= set(listed["nodes"])
            # Disconnect each: one is on the worker that answers this control connection, one on the other.
            for child, s in cats:
                status, answer = await control(d, "DELETE", f"/v1/sessions/{s['session_id']}")
                assert status == 200, answer
                assert await child.wait(20) != 0
                await child.err.expect("You have been disconnected")
        status, metrics = await control(d, "GET", "/metrics")
        assert status == 200
        assert re.search(r"^bastion_workers 2\.0$", metrics, re.M), metrics[:2000]
        assert re.search(r"^bastion_workers_answering 2\.0$", metrics, re.M)
        started = re.findall(r'^bastion_sessions_started_total\{[^}]*protocol="ssh"[^}]*\} (\S+)$', metrics, re.M)
        assert sum(map(float, started)) == 2.0, metrics[:3000]  # one on each worker, summed
        assert re.search(r"^bastion_forced_disconnects_total 2\.0$", metrics, re.M), metrics[:3000]


async def test_a_worker_that_dies_is_restarted_and_its_sessions_are_lost(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """SIGKILL of one worker: the supervisor logs how it ended and starts it again; the other worker reports the dead
    one's session closed with reason node_lost (stream and log) at once; the restarted worker serves its clients."""
    async with gateway(tmp_path, keys, vm) as d:
        async with event_stream(d.control_url, OPERATOR_TOKEN, str(d.ca_file)) as next_event:
            await next_event(lambda kind, data: kind == "snapshot")
            cats = [await open_cat(d, src) for src in SOURCES]
            await listed_all(d, {s["session_id"] for _, s in cats})  # both heartbeats carry them: the view knows them
            control_node = await _answering_node(d)
            (victim_child, victim), (survivor_child, _) = sorted(cats, key=lambda c: c[1]["node"] == control_node)
            index = int(victim["node"].rsplit(".w", 1)[1])
            os.kill(worker_pids(d)[index], signal.SIGKILL)
            [exited] = await d.wait_event("worker_exited")
            assert (exited["worker"], exited["status"]) == (index, "signal SIGKILL")
            closed = await next_event(lambda kind, data: kind == "closed" and data["session"]["id"] == victim["session_id"])
            assert closed["reason"] == "node_lost"
            [lost] = await d.wait_event("cluster_node_lost")
            assert lost["node"] == victim["node"] and victim["session_id"] in lost["session_ids"], lost
            assert await victim_child.wait(20) != 0  # its SSH connection died with the process
            await d.wait_event("worker_started", count=3)
            await d.wait_event("gateway_started", count=3)
            again, s = await open_cat(d, victim["source_ip"])
            assert s["node"] == victim["node"]
            assert survivor_child.proc.returncode is None  # the other worker's session went on
            _, metrics = await control(d, "GET", "/metrics")
            assert re.search(r"^bastion_worker_restarts_total 1\.0$", metrics, re.M), metrics[-3000:]
            for child in (again, survivor_child):
                assert child.proc.stdin is not None
                child.proc.stdin.close()
                assert await child.wait(20) == 0


async def test_a_worker_that_hangs_is_killed_and_started_again(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """A worker that stops answering (SIGSTOP: a stuck event loop looks the same from outside) stops petting its
    watchdog; the supervisor kills it within twice the watchdog interval and starts it again."""
    async with gateway(tmp_path, keys, vm) as d:
        pid = worker_pids(d)[1]
        os.kill(pid, signal.SIGSTOP)
        try:
            [silent] = await d.wait_event("worker_unresponsive", timeout=40)
            assert (silent["worker"], silent["pid"]) == (1, pid)
            [exited] = await d.wait_event("worker_exited", timeout=10)
            assert (exited["worker"], exited["status"]) == (1, "signal SIGKILL")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await d.wait_event("gateway_started", count=3)
        assert worker_pids(d)[1] != pid


async def test_with_a_redis_cluster_each_worker_is_a_node_of_it(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """With [cluster] naming a real redis-server, the workers are nodes of that cluster (no hub): both appear in the
    cluster summary, and one control port lists the sessions of both."""
    with running_redis() as redis:

        def clustered(cfg: dict[str, Any]) -> None:
            two_workers(cfg)
            cfg["cluster"] = {"redis_url": redis.url, "heartbeat": "0.5s", "node_ttl": "2s", "timeout": "0.5s"}

        async with running_daemon(tmp_path, keys, vm, clustered) as d:
            await d.wait_event("workers_started")
            cats = [await open_cat(d, src) for src in SOURCES]
            listed = await listed_all(d, {s["session_id"] for _, s in cats})
            assert {"test-node.w1", "test-node.w2"} <= set(listed["nodes"])
            status, summary = await control(d, "GET", "/v1/cluster")
            assert status == 200 and {n["node"] for n in summary["nodes"]} == {"test-node.w1", "test-node.w2"}, summary
            for child, _ in cats:
                assert child.proc.stdin is not None
                child.proc.stdin.close()
                assert await child.wait(20) == 0


async def _answering_node(d: Daemon) -> str:
    """Which worker answers this test's control connections (from 127.0.0.1): its cluster summary names it."""
    status, summary = await control(d, "GET", "/v1/cluster")
    assert status == 200, summary
    return str(summary["node"])


async def test_signals_reach_every_worker(tmp_path: Path, keys: Keys, vm: SSHD) -> None:
    """Under NOTIFY_SOCKET the supervisor says READY=1 once both workers serve; SIGHUP reloads the config in both
    workers (RELOADING=1, then READY=1 once both have); SIGTERM drains both (each user reads the shutdown notice)
    and the supervisor exits 0 with no worker left."""
    sock_dir = Path(tempfile.mkdtemp(prefix="bw-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = str(sock_dir / "notify")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
            rx.bind(str(sock_dir / "notify"))
            rx.setblocking(False)
            async with gateway(tmp_path, keys, vm, env=env) as d:
                ready = await recv_notify(rx, 30)
                assert ready.splitlines()[0] == "READY=1" and "STATUS=serving with 2 workers" in ready.splitlines(), ready
                cats = [await open_cat(d, src) for src in SOURCES]
                d.signal(signal.SIGHUP)
                reloading = await recv_notify(rx, 10)
                assert reloading.startswith("RELOADING=1"), reloading
                assert (await recv_notify(rx, 30)).startswith("READY=1")
                reloaded = await d.wait_event("config_reloaded", count=2)
                assert {e["node"] for e in reloaded} == {"test-node.w1", "test-node.w2"}
                pids = list(worker_pids(d).values())
                d.signal(signal.SIGTERM)
                assert await d.wait_exit(30) == 0
                for child, _ in cats:
                    assert await child.wait(20) != 0
                    await child.err.expect("restarting")
                assert {e["node"] for e in d.events("gateway_stopped")} == {"test-node.w1", "test-node.w2"}
                assert d.events("workers_stopped")
                assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # reaped by the supervisor
    finally:
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()
