"""Three real `bastion serve` processes on one redis-server behind Debian's haproxy (TCP, send-proxy-v2, round robin):
real OpenSSH sessions land on every node, every node lists all of them with their node and the true source
address; a disconnect sent to one node reaches the session's own node; SIGKILL of a node drops its sessions from
the others' lists within node_ttl and reports them lost; every node's events reach every node's stream; a lock made
on one node refuses logins on every node; a tunnel token minted by one node works on every node (the real
`bastion tunnel`); with Redis stopped every node serves SSH and answers as degraded, and converges when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from gateway.net.tls import write_self_signed
from tests.e2e.conftest import OPERATOR_TOKEN, Keys, base_config
from tests.support.haproxy import running_haproxy
from tests.support.notify import ReadySocket, ready_socket
from tests.support.peers import SSHD, free_port, make_key
from tests.support.redis import RedisServer, running_redis
from tests.support.sse import NextEvent, event_stream

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

    @property
    def ca(self) -> str:
        """The cluster's one certificate (the control port uses the public one, as the balancer's address needs)."""
        return str(self.dir.parent / "cluster.crt")

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        ctx = ssl.create_default_context(cafile=self.ca)
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        url = f"https://127.0.0.1:{self.control}{path}"
        async with aiohttp.ClientSession() as http, http.request(method, url, json=body, headers=headers, ssl=ctx) as r:
            return r.status, await r.json()


@contextlib.asynccontextmanager
async def cluster(tmp: Path, keys: Keys, vm: SSHD, redis: RedisServer) -> AsyncIterator[list[Node]]:
    host_key = make_key(tmp / "cluster_host_key")  # one host key and one certificate for the one address the balancer gives
    write_self_signed(tmp / "cluster.crt", tmp / "cluster.key", ["127.0.0.1"])
    token_key = tmp / "token.key"
    token_key.write_bytes(os.urandom(32))
    os.chmod(token_key, 0o600)
    nodes = [Node(f"node-{i}", tmp / f"node-{i}", free_port(), free_port()) for i in range(1, NODES + 1)]
    readies: list[tuple[ReadySocket, subprocess.Popen[bytes]]] = []
    stack = contextlib.ExitStack()
    try:
        for n in nodes:
            n.dir.mkdir()
            cfg = base_config(n.dir, keys, vm)
            cfg["gateway"]["node"] = n.name
            cfg["public"] = {
                "listen": [f"127.0.0.1:{n.public}"], "proxy_protocol_from": ["127.0.0.1/32"],
                "tls_cert": str(tmp / "cluster.crt"), "tls_key": str(tmp / "cluster.key"),
            }  # fmt: skip
            cfg["rules"].append({"groups": ["ops"], "vms": ["web01"], "protocols": ["tcp"], "ports": [vm.port]})
            cfg["control"]["listen"] = [f"127.0.0.1:{n.control}"]
            cfg["ssh"]["host_keys"] = [str(host_key.private)]
            cfg["tunnel"] = {"token_key_file": str(token_key)}
            cfg["cluster"] = {"redis_url": redis.url, "heartbeat": f"{HEARTBEAT}s", "node_ttl": f"{NODE_TTL}s", "timeout": "0.5s"}
            path = n.dir / "bastion.toml"
            path.write_bytes(tomli_w.dumps(cfg).encode())
            log = (n.dir / "gateway.log").open("wb")
            ready = stack.enter_context(ready_socket())
            n.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--log-format", "json"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ready.env()},
            )  # fmt: skip
            readies.append((ready, n.proc))
        for ready, proc in readies:  # each node's own READY=1: both its ports are bound and it serves
            await ready.wait(proc, 30)
        yield nodes
    finally:
        stack.close()
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


@contextlib.asynccontextmanager
async def balancer(nodes: list[Node]) -> AsyncIterator[int]:
    """haproxy round robin over the nodes with send-proxy-v2 from 127.0.0.1; yields its port."""
    with running_haproxy([f"server {n.name} 127.0.0.1:{n.public} send-proxy-v2 source 127.0.0.1" for n in nodes]) as port:
        yield port


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


def ssh_argv(tmp: Path, keys: Keys, port: int, target: str, *command: str) -> list[str]:
    host_pub = (tmp / "cluster_host_key.pub").read_text().strip()
    kh = tmp / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    return [
        "ssh", "-F", "/dev/null", "-p", str(port), "-b", "127.0.0.9", "-o", f"UserKnownHostsFile={kh}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(keys.alice.private),
        target, *command,
    ]  # fmt: skip


async def run(argv: list[str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def events_of(node: Node) -> contextlib.AbstractAsyncContextManager[NextEvent]:
    """`node`'s /v1/events."""
    return event_stream(f"https://127.0.0.1:{node.control}", OPERATOR_TOKEN, node.ca)


async def test_three_nodes_share_locks_tokens_events_and_survive_redis(
    tmp_path: Path, keys: Keys, vm: SSHD, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, keys, vm, redis_server) as nodes, balancer(nodes) as port:
        argv = functools.partial(ssh_argv, tmp_path, keys, port)

        async def all_see(n_nodes: int) -> bool:
            for n in nodes:
                _, body = await n.api("GET", "/v1/sessions")
                if len(body["nodes"]) != n_nodes or body["degraded"]:
                    return False
            return True

        await until(lambda: all_see(NODES), timeout=30)

        # Events: node-1's stream shows the sessions of every node as they open (three logins, round robin).
        async with events_of(nodes[0]) as next_event:
            await next_event(lambda kind, _: kind == "snapshot")
            for _ in range(NODES):
                rc, out, err = await run(argv("alice+web01@127.0.0.1", "echo", "hello"))
                assert rc == 0 and out.strip() == "hello", err
            seen: set[str] = set()
            while len(seen) < NODES:
                ev = await next_event(lambda kind, d: kind == "opened")
                seen.add(ev["session"]["node"])
            assert seen == {n.name for n in nodes}

        # A lock made on node-2 refuses alice on every node (three logins: one lands on each).
        status, answer = await nodes[1].api("POST", "/v1/locks", {"user": "alice", "reason": "incident 7"})
        assert status == 201, answer

        async def locked_everywhere() -> bool:
            return all([any(lk["target"] == "alice" for lk in (await n.api("GET", "/v1/locks"))[1]["locks"]) for n in nodes])

        await until(locked_everywhere, timeout=15)
        for _ in range(NODES):
            rc, _, err = await run(argv("alice+web01@127.0.0.1", "echo", "hello"))
            assert rc != 0 and "incident 7" in err, err
        status, _ = await nodes[2].api("DELETE", f"/v1/locks/{answer['lock']['id']}")
        assert status == 200

        async def unlocked_everywhere() -> bool:
            return all([not (await n.api("GET", "/v1/locks"))[1]["locks"] for n in nodes])

        await until(unlocked_everywhere, timeout=15)

        # A token from whichever node answered `token` opens tunnels on every node (the real `bastion tunnel`).
        rc, out, err = await run(argv("alice@127.0.0.1", "token"))
        assert rc == 0, err
        local = free_port()
        helper = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "tunnel", "--gateway", f"127.0.0.1:{port}", "--vm", "web01", "--port", str(vm.port),
            "--local", f"127.0.0.1:{local}", "--ca-file", str(tmp_path / "cluster.crt"), "--token", out.strip(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert helper.stderr is not None
            async with asyncio.timeout(20):
                while b"listening on" not in await helper.stderr.readline():
                    assert helper.returncode is None
            conns = []
            for _ in range(NODES):  # each connection is its own WebSocket, so each lands on the next node
                reader, writer = await asyncio.open_connection("127.0.0.1", local)
                async with asyncio.timeout(15):
                    assert (await reader.readline()).startswith(b"SSH-2.0-"), "no VM banner through the tunnel"
                conns.append(writer)

            async def tunnels_on_every_node() -> bool:
                _, body = await nodes[0].api("GET", "/v1/sessions")
                return {r["node"] for r in body["sessions"] if r["protocol"] == "tcp"} == {n.name for n in nodes}

            await until(tunnels_on_every_node, timeout=15)
            for w in conns:
                w.close()
        finally:
            if helper.returncode is None:
                helper.send_signal(signal.SIGINT)
                try:
                    async with asyncio.timeout(10):
                        await helper.wait()
                except TimeoutError:
                    helper.kill()
                    await helper.wait()

        # Redis stops: every node still serves SSH and says degraded; Redis back: every node sees all three again.
        redis_server.stop()

        async def all_degraded() -> bool:
            return all([(await n.api("GET", "/v1/sessions"))[1]["degraded"] for n in nodes])

        await until(all_degraded, timeout=15)
        for _ in range(NODES):
            rc, out, err = await run(argv("alice+web01@127.0.0.1", "echo", "still-serving"))
            assert rc == 0 and out.strip() == "still-serving", err
        for n in nodes:
            status, ready = await n.api("GET", "/readyz")
            assert status == 200 and ready["degraded"] is True
        redis_server.start()
        await until(lambda: all_see(NODES), timeout=30)
        _, summary = await nodes[0].api("GET", "/v1/cluster")
        assert sorted(x["node"] for x in summary["nodes"]) == [n.name for n in nodes] and summary["lost"] == []

        # SIGKILL of node-3: node-1 reports it lost, in the API and to the operator's `bastion nodes`.
        victim = nodes[2]
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=10)

        async def reported_lost() -> bool:
            _, summary = await nodes[0].api("GET", "/v1/cluster")
            return [x["node"] for x in summary["lost"]] == [victim.name]

        await until(reported_lost, timeout=NODE_TTL + 15)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env |= {
            "BASTION_CONTROL_URL": f"https://127.0.0.1:{nodes[0].control}",
            "BASTION_TOKEN": OPERATOR_TOKEN,
            "BASTION_CA_FILE": nodes[0].ca,
        }
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "nodes", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out_b, err_b = await cli.communicate()
        assert cli.returncode == 0, err_b
        table = out_b.decode().splitlines()
        assert [line.split()[0] for line in table[1:3]] == ["node-1", "node-2"] and table[1].split()[1] == "*"
        assert table[-1].startswith(f"lost {victim.name} at ")
