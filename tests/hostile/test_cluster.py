"""Two gateway nodes sharing one view through a real redis-server: each lists the other's sessions with their node,
a disconnect sent to one node ends a session on the other (the user's real ssh prints the notice), a node that
stops heartbeating drops out within node_ttl, and with Redis down each node serves its users, answers from its
own state as degraded, and converges when Redis is back. (In-process nodes; issue 11's three `bastion serve`
processes behind haproxy are not built yet.)"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import OPERATOR_TOKEN, Gateway, GatewayFactory, wait_for
from tests.support.redis import RedisServer, running_redis

HEARTBEAT, NODE_TTL = 0.3, 1.2


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


def node(tmp: Path, name: str, redis: RedisServer, key: Path) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["state_dir"] = str(tmp / name)
        cfg["gateway"]["node"] = name
        cfg["tunnel"] = {"token_key_file": str(key)}
        cfg["cluster"] = {"redis_url": redis.url, "heartbeat": f"{HEARTBEAT}s", "node_ttl": f"{NODE_TTL}s", "timeout": "0.5s"}

    return edit


@pytest.fixture
async def nodes(make_gateway: GatewayFactory, redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[tuple[Gateway, Gateway]]:
    key = tmp_path / "token.key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    async with (
        make_gateway(node(tmp_path, "node-a", redis_server, key)) as a,
        make_gateway(node(tmp_path, "node-b", redis_server, key)) as b,
    ):
        # Both nodes share the fixture's tmp dir, so its ssh_config and known_hosts name only the last one started:
        # one known_hosts with both nodes' host keys, and argv built per node (argv()).
        lines = [f"[127.0.0.1]:{gw.port} {k.export_public_key().decode().strip()}" for gw in (a, b) for k in gw.app.host_keys]
        (tmp_path / "known_hosts").write_text("\n".join(lines) + "\n")
        yield a, b


def argv(gw: Gateway, user: str, *command: str) -> list[str]:
    """`ssh USER@this node COMMAND` as alice (her key, the shared known_hosts)."""
    return [*gw.ssh_argv_keys(user, gw.keys.alice.private), *command]


async def api(gw: Gateway, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    ctx = ssl.create_default_context(cafile=str(Path(gw.raw["gateway"]["state_dir"]) / "tls.crt"))
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    async with aiohttp.ClientSession() as http, http.request(method, gw.control_url + path, json=body, headers=headers, ssl=ctx) as r:
        return r.status, await r.json()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Re-ask (bounded) until `check()` holds: the other node's state arrives by heartbeat, with no local event."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(HEARTBEAT / 2)


async def sessions_on(gw: Gateway) -> dict[str, Any]:
    status, body = await api(gw, "GET", "/v1/sessions")
    assert status == 200
    return dict(body)


async def test_one_view_and_disconnects_across_nodes(nodes: tuple[Gateway, Gateway]) -> None:
    """alice's shell on node B shows on node A's list with node-b; node A's broadcast notice and a notice to her session
    reach her terminal; node A disconnects it; her ssh prints the notice."""
    a, b = nodes
    proc = await asyncio.create_subprocess_exec(
        *argv(b, "alice+web01", "cat"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_for(lambda: bool(b.app.registry.list()), b.logs.changed, timeout=20)
        [live] = b.app.registry.list()

        async def listed() -> bool:
            body = await sessions_on(a)
            return any(s["id"] == live.id and s["node"] == "node-b" for s in body["sessions"]) and not body["degraded"]

        await until(listed)
        body = await sessions_on(a)
        assert set(body["nodes"]) == {"node-a", "node-b"}
        status, answer = await api(a, "POST", "/v1/notices", {"message": "hello from node A"})
        assert status == 200 and answer["results"] == {live.id: "delivered"}, answer
        status, answer = await api(a, "POST", "/v1/notices", {"message": "to you", "ids": [live.id]})
        assert answer["results"] == {live.id: "delivered"}, answer
        status, answer = await api(a, "POST", "/v1/sessions/disconnect", {"ids": [live.id], "reason": "from node A"})
        assert status == 200 and answer["results"] == {live.id: "disconnected"}, answer
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
        text = err.decode()
        assert "hello from node A" in text and "to you" in text and "You have been disconnected. from node A" in text, text
        closed = b.logs.events("session_closed")
        assert closed and closed[0]["reason"] == "terminated_by_operator"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_silent_node_drops_out_and_redis_down_is_degraded(nodes: tuple[Gateway, Gateway], redis_server: RedisServer) -> None:
    """Node B stops heartbeating (as if killed): within node_ttl node A lists it no more. Then Redis stops: A still
    serves SSH, answers with its own sessions and degraded = true (and /readyz says so); Redis back: it converges."""
    a, b = nodes
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    cluster = b.app._cluster
    assert cluster is not None
    for t in cluster._tasks:  # what SIGKILL does to its heartbeat, without killing the test process
        t.cancel()
    await until(lambda: _has_nodes(a, {"node-a"}), timeout=NODE_TTL + 5)

    redis_server.stop()
    await until(_degraded(a, True))
    r = await a.run(*argv(a, "alice+web01", "echo", "still-serving"))
    assert r.rc == 0 and r.text.strip() == "still-serving"
    status, ready = await api(a, "GET", "/readyz")
    assert status == 200 and ready["degraded"] is True
    metrics = a.app.metrics.render().decode()
    assert "bastion_cluster_degraded 1.0" in metrics and "bastion_cluster_redis_errors_total" in metrics
    redis_server.start()
    await until(_degraded(a, False), timeout=10)
    assert (await sessions_on(a))["nodes"].keys() == {"node-a"}


async def _has_nodes(gw: Gateway, names: set[str]) -> bool:
    body = await sessions_on(gw)
    return set(body["nodes"]) == names and not body["degraded"]


def _degraded(gw: Gateway, want: bool) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool((await sessions_on(gw))["degraded"]) is want

    return check


async def test_a_lock_on_one_node_holds_on_the_other(nodes: tuple[Gateway, Gateway]) -> None:
    """A lock added on node B refuses alice's login on node A (with the lock's text) and ends her session there;
    lifted on B, she logs in on A again. A node that joins later gets the lock from the cluster."""
    a, b = nodes
    proc = await asyncio.create_subprocess_exec(
        *argv(a, "alice+web01", "cat"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_for(lambda: bool(a.app.registry.list()), a.logs.changed, timeout=20)
        status, body = await api(b, "POST", "/v1/locks", {"user": "alice", "reason": "audit on node B"})
        assert status == 201
        lock_id = body["lock"]["id"]
        await wait_for(lambda: a.app.locks.match(user="alice") is not None, a.logs.changed, timeout=10)
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
        assert "locked by an operator: audit on node B" in err.decode(), err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    r = await a.run(*argv(a, "alice+web01", "true"))
    assert r.rc == 255 and "locked by an operator: audit on node B" in r.errtext
    status, _ = await api(b, "DELETE", f"/v1/locks/{lock_id}")
    assert status == 200
    await wait_for(lambda: a.app.locks.match(user="alice") is None, a.logs.changed, timeout=10)
    assert (await a.run(*argv(a, "alice+web01", "true"))).rc == 0


async def test_a_token_revoked_on_one_node_is_refused_on_the_other(nodes: tuple[Gateway, Gateway]) -> None:
    """An RD Gateway kill revokes its token so FreeRDP's auto-reconnect cannot come back; behind a balancer the
    reconnect may land on another node, so the revocation is shared: node B refuses a token node A revoked."""
    a, b = nodes
    token, claims = a.app.tokens.issue("alice")

    async def status_on(gw: Gateway) -> int:
        ctx = ssl.create_default_context(cafile=str(Path(gw.raw["gateway"]["state_dir"]) / "tls.crt"))
        url = f"https://127.0.0.1:{gw.port}/v1/tunnel?vm=web01&port=22"
        async with aiohttp.ClientSession() as http, http.get(url, headers={"Authorization": f"Bearer {token}"}, ssl=ctx) as r:
            return r.status

    assert await status_on(b) != 401  # the shared key: A's token is good on B
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    a.app.tokens.revoke(claims)

    async def refused_on_b() -> bool:
        return await status_on(b) == 401

    await until(refused_on_b, timeout=10)
