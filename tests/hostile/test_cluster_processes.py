"""Three real `bastion serve` processes on one redis-server behind Debian's haproxy (TCP, send-proxy-v2, round robin):
real OpenSSH sessions land on every node, every node lists all of them with their node and the true source
address; a disconnect sent to one node reaches the session's own node; SIGKILL of a node drops its sessions from
the others' lists within node_ttl."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from tests.e2e.conftest import OPERATOR_TOKEN, Keys, base_config
from tests.hostile.test_proxy_protocol import haproxy_binary, listening
from tests.support.peers import SSHD, free_port, make_key
from tests.support.redis import RedisServer, running_redis

NODES = 3
HEARTBEAT, NODE_TTL = 0.5, 2.0


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Re-ask (bounded): other processes' state arrives by heartbeat, with no event here to wait on."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(HEARTBEAT / 2)


class Node:
    def __init__(self, name: str, dir: Path, public: int, control: int) -> None:
        self.name, self.dir, self.public, self.control = name, dir, public, control
        self.proc: subprocess.Popen[bytes] | None = None

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        ctx = ssl.create_default_context(cafile=str(self.dir / "state" / "tls.crt"))
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        url = f"https://127.0.0.1:{self.control}{path}"
        async with aiohttp.ClientSession() as http, http.request(method, url, json=body, headers=headers, ssl=ctx) as r:
            return r.status, await r.json()


@contextlib.asynccontextmanager
async def cluster(tmp: Path, keys: Keys, vm: SSHD, redis: RedisServer) -> AsyncIterator[list[Node]]:
    host_key = make_key(tmp / "cluster_host_key")  # one host key for the one address the balancer gives
    token_key = tmp / "token.key"
    token_key.write_bytes(os.urandom(32))
    os.chmod(token_key, 0o600)
    nodes = [Node(f"node-{i}", tmp / f"node-{i}", free_port(), free_port()) for i in range(1, NODES + 1)]
    try:
        for n in nodes:
            n.dir.mkdir()
            cfg = base_config(n.dir, keys, vm)
            cfg["gateway"]["node"] = n.name
            cfg["public"] = {"listen": [f"127.0.0.1:{n.public}"], "proxy_protocol_from": ["127.0.0.1/32"]}
            cfg["control"]["listen"] = [f"127.0.0.1:{n.control}"]
            cfg["ssh"]["host_keys"] = [str(host_key.private)]
            cfg["tunnel"] = {"token_key_file": str(token_key)}
            cfg["cluster"] = {"redis_url": redis.url, "heartbeat": f"{HEARTBEAT}s", "node_ttl": f"{NODE_TTL}s", "timeout": "0.5s"}
            path = n.dir / "bastion.toml"
            path.write_bytes(tomli_w.dumps(cfg).encode())
            log = (n.dir / "gateway.log").open("wb")
            n.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--log-format", "json"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        async with asyncio.timeout(30):
            while not all(listening(n.public) and listening(n.control) for n in nodes):
                assert all(n.proc is not None and n.proc.poll() is None for n in nodes), "a node exited at start"
                await asyncio.sleep(0.05)
        yield nodes
    finally:
        for n in nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
        for n in nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait(timeout=5)


HAPROXY = """global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend public
    bind 127.0.0.1:{listen}
    default_backend gateways
backend gateways
    balance roundrobin
{servers}
"""


@contextlib.asynccontextmanager
async def balancer(nodes: list[Node]) -> AsyncIterator[int]:
    d = Path(tempfile.mkdtemp(prefix="bastion-haproxy-"))
    port = free_port()
    servers = "\n".join(f"    server {n.name} 127.0.0.1:{n.public} send-proxy-v2 source 127.0.0.1" for n in nodes)
    (d / "haproxy.cfg").write_text(HAPROXY.format(listen=port, servers=servers))
    proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(d / "haproxy.cfg")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(10):
            while not listening(port):
                assert proc.poll() is None, "haproxy exited"
                await asyncio.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def redis_server() -> Any:
    with running_redis() as server:
        yield server


async def test_three_nodes_behind_haproxy_one_view(tmp_path: Path, keys: Keys, vm: SSHD, redis_server: RedisServer) -> None:
    async with cluster(tmp_path, keys, vm, redis_server) as nodes, balancer(nodes) as port:
        host_pub = (tmp_path / "cluster_host_key.pub").read_text().strip()
        kh = tmp_path / "known_hosts"
        kh.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        argv = [
            "ssh", "-F", "/dev/null", "-p", str(port), "-b", "127.0.0.9", "-o", f"UserKnownHostsFile={kh}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(keys.alice.private),
            "alice+web01@127.0.0.1", "cat",
        ]  # fmt: skip
        users = [
            await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            for _ in range(NODES)
        ]
        try:

            async def all_listed() -> bool:
                # Every node, not just one: each sees the others' sessions at their next heartbeat, which a loaded
                # machine can delay past the first node's answer.
                for n in nodes:
                    _, body = await n.api("GET", "/v1/sessions")
                    if len(body["sessions"]) != NODES or len(body["nodes"]) != NODES or body["degraded"]:
                        return False
                return True

            await until(all_listed, timeout=30)
            for n in nodes:  # every node shows every session, each with its node and the true source
                _, body = await n.api("GET", "/v1/sessions")
                rows = body["sessions"]
                assert sorted(r["node"] for r in rows) == sorted(x.name for x in nodes), rows
                assert {r["source_ip"] for r in rows} == {"127.0.0.9"} and body["degraded"] is False
            _, body = await nodes[0].api("GET", "/v1/sessions")
            on_last = next(r for r in body["sessions"] if r["node"] == nodes[-1].name)
            status, answer = await nodes[0].api("POST", "/v1/sessions/disconnect", {"ids": [on_last["id"]], "reason": "from node-1"})
            assert status == 200 and answer["results"] == {on_last["id"]: "disconnected"}, answer
            # The one whose session was on the last node exits (we do not know which ssh that is): wait for the first.
            waits = {asyncio.ensure_future(u.wait()): u for u in users}
            done, pending = await asyncio.wait(waits, timeout=20, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            assert done, "no ssh ended after the disconnect"
            errs = []
            for t in done:
                stream = waits[t].stderr
                assert stream is not None
                errs.append((await stream.read()).decode())
            assert any("You have been disconnected. from node-1" in e for e in errs), errs

            victim = nodes[1]
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(timeout=10)

            async def victim_gone() -> bool:
                _, body = await nodes[0].api("GET", "/v1/sessions")
                return victim.name not in body["nodes"] and all(r["node"] != victim.name for r in body["sessions"])

            await until(victim_gone, timeout=NODE_TTL + 10)
        finally:
            for u in users:
                if u.returncode is None:
                    u.kill()
                    await u.wait()
        lines = [json.loads(x) for x in (nodes[0].dir / "gateway.log").read_text().splitlines() if x.startswith("{")]
        assert not [e for e in lines if "exception" in e], "a traceback was logged"
