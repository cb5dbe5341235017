"""Two gateway nodes sharing one view through a real redis-server: each lists the other's sessions with their node,
a disconnect sent to one node ends a session on the other (the user's real ssh prints the notice), a node that
stops heartbeating drops out within node_ttl, and with Redis down each node serves its users, answers from its
own state as degraded, and converges when Redis is back; every node's events reach every node's stream, a node that
dies has its sessions reported lost, and a one-time link works once across nodes. (In-process nodes; the three
`bastion serve` processes behind haproxy are in test_cluster_processes.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.e2e.conftest import OPERATOR_TOKEN, Gateway, GatewayFactory, wait_for
from tests.support import sse
from tests.support.redis import RedisServer, Store, running_hub, running_redis
from tests.support.sse import NextEvent

HEARTBEAT, NODE_TTL = 0.3, 1.2


@pytest.fixture(params=["redis-server", "hub"])
def redis_server(request: pytest.FixtureRequest) -> Iterator[Store]:
    """A real redis-server, and the workers' hub (gateway/hub.py) in its place: the same tests hold for both."""
    if request.param == "redis-server":
        with running_redis() as server:
            yield server
    else:
        with running_hub() as hub:
            yield hub


def node(tmp: Path, name: str, redis: Store, key: Path) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["state_dir"] = str(tmp / name)
        cfg["gateway"]["node"] = name
        cfg["tunnel"] = {"token_key_file": str(key)}
        cfg["cluster"] = {"redis_url": redis.url, "heartbeat": f"{HEARTBEAT}s", "node_ttl": f"{NODE_TTL}s", "timeout": "0.5s"}

    return edit


@pytest.fixture
async def nodes(make_gateway: GatewayFactory, redis_server: Store, tmp_path: Path) -> AsyncIterator[tuple[Gateway, Gateway]]:
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
        _LIVE.clear()
        try:
            yield watch(a), watch(b)
        finally:
            _LIVE.clear()


def argv(gw: Gateway, user: str, *command: str) -> list[str]:
    """`ssh USER@this node COMMAND` as alice (her key, the shared known_hosts)."""
    return [*gw.ssh_argv_keys(user, gw.keys.alice.private), *command]


async def api(gw: Gateway, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    ctx = ssl.create_default_context(cafile=str(Path(gw.raw["gateway"]["state_dir"]) / "tls.crt"))
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    async with aiohttp.ClientSession() as http, http.request(method, gw.control_url + path, json=body, headers=headers, ssl=ctx) as r:
        return r.status, await r.json()


_LIVE: list[asyncio.Event] = []  # the `changed` events of the nodes running in this test (their fixtures add them)


def watch(gw: Gateway) -> Gateway:
    """Let `until` wake on this node's cluster changes (a heartbeat, a message from another node)."""
    cluster = gw.app._cluster
    assert cluster is not None
    _LIVE.append(cluster.changed)
    return gw


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Re-check (bounded) each time any running node's view of the cluster changed: the other node's state arrives by
    heartbeat or pub/sub, so its change on this side is the event to wait on."""
    async with asyncio.timeout(timeout):
        while True:
            for ev in _LIVE:
                ev.clear()
            if await check():
                return
            waits = [asyncio.ensure_future(ev.wait()) for ev in _LIVE]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()


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


async def test_a_bulk_disconnect_asks_each_other_node_once(nodes: tuple[Gateway, Gateway]) -> None:
    """One bulk request to node A for three of B's sessions (one with a grace), one of A's and an unknown id: A asks B
    once for all of B's (B logs one cluster_disconnect_served for three), each result is B's own answer, and the
    users' ssh print the notice."""
    a, b = nodes
    procs = [await open_cat(b) for _ in range(3)] + [await open_cat(a)]
    try:
        await wait_for(lambda: len(b.app.registry.ids()) == 3, b.logs.changed, timeout=30)
        await wait_for(lambda: len(a.app.registry.ids()) == 1, a.logs.changed, timeout=30)
        on_b, [on_a] = b.app.registry.ids(), a.app.registry.ids()

        async def listed() -> bool:
            body = await sessions_on(a)
            return {s["id"] for s in body["sessions"]} == {*on_b, on_a} and not body["degraded"]

        await until(listed)
        # A grace on the first of B's: pending with its end, as B answers it.
        status, answer = await api(a, "POST", "/v1/sessions/disconnect", {"ids": [on_b[0]], "reason": "soon", "grace_s": 600})
        assert status == 200 and answer["results"] == {on_b[0]: "pending"} and on_b[0] in answer["ends_at"], answer
        status, answer = await api(a, "POST", "/v1/sessions/disconnect", {"ids": [*on_b, on_a, "f" * 16], "reason": "bulk from A"})
        assert status == 200, answer
        assert answer["results"] == {**dict.fromkeys(on_b, "disconnected"), on_a: "disconnected", "f" * 16: "not_found"}, answer
        served = b.logs.events("cluster_disconnect_served")
        assert [(e["sessions"], e["results"]) for e in served] == [(1, {"pending": 1}), (3, {"disconnected": 3})], served
        for proc in procs:
            async with asyncio.timeout(20):
                _, err = await proc.communicate()
            assert "You have been disconnected. bulk from A" in err.decode(), err
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_a_silent_node_drops_out_and_redis_down_is_degraded(nodes: tuple[Gateway, Gateway], redis_server: Store) -> None:
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


def event_stream(gw: Gateway) -> contextlib.AbstractAsyncContextManager[NextEvent]:
    """Node `gw`'s /v1/events, read as the page reads it."""
    return sse.event_stream(gw.control_url, OPERATOR_TOKEN, str(Path(gw.raw["gateway"]["state_dir"]) / "tls.crt"))


async def open_cat(gw: Gateway) -> asyncio.subprocess.Process:
    """alice's `cat` on web01 through node `gw`: a session that stays open until its stdin closes."""
    return await asyncio.create_subprocess_exec(
        *argv(gw, "alice+web01", "cat"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def test_every_node_s_events_reach_every_node_s_stream(nodes: tuple[Gateway, Gateway]) -> None:
    """An operator watching node A's event stream sees alice's session on node B open (with node-b) and close with
    its true reason when node B's operator ends it; the snapshot after a resync lists both nodes' sessions."""
    a, b = nodes
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    async with event_stream(a) as next_event:
        await next_event(lambda kind, _: kind == "snapshot")
        proc = await open_cat(b)
        try:
            opened = await next_event(lambda kind, d: kind == "opened" and d["session"]["node"] == "node-b")
            sid = opened["session"]["id"]
            assert opened["session"]["user"] == "alice" and opened["session"]["vm"] == "web01"
            assert opened["session"]["duration_s"] >= 0
            status, _ = await api(b, "DELETE", f"/v1/sessions/{sid}", {"reason": "seen from A"})
            assert status == 200
            closed = await next_event(lambda kind, d: kind == "closed" and d["session"]["id"] == sid)
            assert closed["reason"] == "terminated_by_operator" and closed["session"]["node"] == "node-b"
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_a_node_reads_the_others_events_only_while_a_stream_is_open(nodes: tuple[Gateway, Gateway], redis_server: Store) -> None:
    """Neither node has an event stream: neither is subscribed to the other nodes' events (at every login they cost
    every idle node and Redis work). A stream opened on A subscribes A before its first snapshot, so B's session
    opened right after reaches it; once the stream closes, A unsubscribes."""
    a, b = nodes
    ca, cb = a.app._cluster, b.app._cluster
    assert ca is not None and cb is not None

    async def subscribers() -> int | None:
        if not isinstance(redis_server, RedisServer):
            return None  # the hub has no PUBSUB command; the nodes' own flags below still say it
        client = aioredis.from_url(redis_server.url, protocol=2)
        try:
            [(_, n)] = await client.pubsub_numsub("bastion:events")
            return int(n)
        finally:
            await client.aclose()

    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    assert not ca.events_live.is_set() and not cb.events_live.is_set()
    assert await subscribers() in (0, None)
    async with event_stream(a) as next_event:
        await next_event(lambda kind, _: kind == "snapshot")
        assert ca.events_live.is_set() and not cb.events_live.is_set()
        assert await subscribers() in (1, None)
        proc = await open_cat(b)
        try:
            opened = await next_event(lambda kind, d: kind == "opened")
            assert opened["session"]["node"] == "node-b"
        finally:
            proc.kill()
            await proc.wait()

    async def unsubscribed() -> bool:
        return not ca.events_live.is_set() and await subscribers() in (0, None)

    await until(unsubscribed)


def listed_on(gw: Gateway, node: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:  # a session of `node` is on gw's list
        return any(r["node"] == node for r in (await sessions_on(gw))["sessions"])

    return check


async def test_a_node_that_dies_has_its_sessions_reported_lost(nodes: tuple[Gateway, Gateway]) -> None:
    """Node B dies with alice's session open (its heartbeat and Redis link stop, as under SIGKILL): within node_ttl
    node A's stream closes that session with reason node_lost, A's /v1/cluster lists node-b as lost with one session,
    the metrics count it, and the log says so once, with the session id."""
    a, b = nodes
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    proc = await open_cat(b)
    try:
        await until(listed_on(a, "node-b"))
        sid = next(r["id"] for r in (await sessions_on(a))["sessions"] if r["node"] == "node-b")
        status, summary = await api(a, "GET", "/v1/cluster")
        assert status == 200 and summary["clustered"] is True and summary["lost"] == []
        assert {n["node"]: n["sessions"] for n in summary["nodes"]} == {"node-a": 0, "node-b": 1}
        async with event_stream(a) as next_event:
            await next_event(lambda kind, _: kind == "snapshot")
            cluster = b.app._cluster
            assert cluster is not None
            for t in cluster._tasks:  # what SIGKILL does to its heartbeat and its Redis link, without killing the test
                t.cancel()
            lost = await next_event(lambda kind, d: kind == "closed" and d["session"]["id"] == sid)
            assert lost["reason"] == "node_lost" and lost["session"]["node"] == "node-b"
        # Its rows outlive its liveness key (they were just read to report it), yet no list shows them any more.
        assert not any(r["node"] == "node-b" for r in (await sessions_on(a))["sessions"])
        status, summary = await api(a, "GET", "/v1/cluster")
        assert [n["node"] for n in summary["nodes"]] == ["node-a"]
        assert [(x["node"], x["sessions"]) for x in summary["lost"]] == [("node-b", 1)]
        metrics = a.app.metrics.render().decode()
        assert "bastion_cluster_sessions_lost_total 1.0" in metrics and "bastion_cluster_nodes_lost_total 1.0" in metrics
        assert "bastion_cluster_nodes 1.0" in metrics
        [line] = a.logs.events("cluster_node_lost")
        assert line["node"] == "node-b" and line["session_ids"] == [sid]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_a_session_opened_after_a_lost_node_s_last_heartbeat_leaves_the_streams(nodes: tuple[Gateway, Gateway]) -> None:
    """Node B's heartbeat stops, then alice opens a session on B: A's stream shows it `opened` (B's events still flow),
    but no heartbeat row has it. B dies: A's stream closes it as node_lost too, not a zombie row."""
    a, b = nodes
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    cluster = b.app._cluster
    assert cluster is not None
    async with event_stream(a) as next_event:
        await next_event(lambda kind, _: kind == "snapshot")
        beat = cluster._tasks[0]
        assert beat.get_name() == "cluster-heartbeat"
        beat.cancel()
        await asyncio.wait([beat])
        proc = await open_cat(b)
        try:
            opened = await next_event(lambda kind, d: kind == "opened" and d["session"]["node"] == "node-b")
            sid = opened["session"]["id"]
            for t in cluster._tasks:
                t.cancel()
            await asyncio.wait(cluster._tasks)
            lost = await next_event(lambda kind, d: kind == "closed" and d["session"]["id"] == sid)
            assert lost["reason"] == "node_lost" and lost["session"]["node"] == "node-b"
        finally:
            proc.kill()
            await proc.wait()
    [line] = a.logs.events("cluster_node_lost")
    assert line["node"] == "node-b" and line["sessions"] == 1 and line["session_ids"] == [sid]


async def test_a_lost_node_whose_rows_are_gone_is_reported_by_its_count(nodes: tuple[Gateway, Gateway], redis_server: Store) -> None:
    """Node B dies with a session open and its rows are gone too (say, evicted): A still reports it lost with its
    session count from B's last liveness key, and every event stream starts over from a snapshot without that
    session, since there is no row to close it with."""
    a, b = nodes
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    proc = await open_cat(b)
    try:
        await until(listed_on(a, "node-b"))
        async with event_stream(a) as next_event:
            await next_event(lambda kind, _: kind == "snapshot")
            cluster = b.app._cluster
            assert cluster is not None
            for t in cluster._tasks:
                t.cancel()
            await asyncio.wait(cluster._tasks)
            client = aioredis.from_url(redis_server.url, protocol=2)
            try:
                assert await client.delete("bastion:rows:node-b") == 1
            finally:
                await client.aclose()
            snapshot = await next_event(lambda kind, _: kind == "snapshot")
            assert [r["node"] for r in snapshot["sessions"]] == []
        [line] = a.logs.events("cluster_node_lost")
        assert line["node"] == "node-b" and line["sessions"] == 1 and line["session_ids"] == []
        _, summary = await api(a, "GET", "/v1/cluster")
        assert [(x["node"], x["sessions"]) for x in summary["lost"]] == [("node-b", 1)]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_heartbeats_read_liveness_keys_not_every_node_s_rows(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    """What a real redis-server is sent (MONITOR) while two nodes beat: each writes its own rows, but no heartbeat
    reads another node's rows (at thousands of sessions a node, that was every node parsing every row every second);
    a list does read them."""
    key = tmp_path / "token.key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    with running_redis() as server:
        monitor_client = aioredis.from_url(server.url, protocol=2)
        try:
            async with (
                make_gateway(node(tmp_path, "node-a", server, key)) as a,
                make_gateway(node(tmp_path, "node-b", server, key)),
                monitor_client.monitor() as monitor,
            ):
                seen: list[str] = []
                beats = {"node-a": 0, "node-b": 0}
                async with asyncio.timeout(20):
                    while min(beats.values()) < 4:  # four heartbeats of each node, watches included
                        command = str((await monitor.next_command())["command"])
                        seen.append(command)
                        for n in beats:
                            if command.startswith(f"SET bastion:alive:{n} "):
                                beats[n] += 1
                reads = [c for c in seen if "bastion:rows:" in c and not c.startswith("SET ")]
                assert reads == [], reads[:5]
                assert any(c.startswith("SET bastion:rows:node-b ") for c in seen)
                assert (await sessions_on(a))["nodes"].keys() == {"node-a", "node-b"}
                async with asyncio.timeout(10):
                    while not (command := str((await monitor.next_command())["command"])).startswith("MGET bastion:rows:"):
                        pass
                assert command == "MGET bastion:rows:node-b"
        finally:
            await monitor_client.aclose()


async def test_a_node_that_stops_cleanly_is_not_reported_lost(
    nodes: tuple[Gateway, Gateway], make_gateway: GatewayFactory, redis_server: Store, tmp_path: Path
) -> None:
    """A third node that joins and then stops cleanly (its sessions drained) leaves every view at once, and node A logs
    it as left, not lost."""
    a, _ = nodes
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))

    def logged(event: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:  # A's heartbeat notices joins and departures
            return any(e["node"] == "node-c" for e in a.logs.events(event))

        return check

    async with make_gateway(node(tmp_path, "node-c", redis_server, tmp_path / "token.key")) as c:
        watch(c)
        await until(lambda: _has_nodes(a, {"node-a", "node-b", "node-c"}))
        await until(logged("cluster_node_joined"))
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))  # at once: its key is gone, not waiting out node_ttl
    await until(logged("cluster_node_left"))
    _, summary = await api(a, "GET", "/v1/cluster")
    assert summary["lost"] == [] and not a.logs.events("cluster_node_lost")


async def test_a_one_time_link_works_once_across_nodes(nodes: tuple[Gateway, Gateway]) -> None:
    """Behind a balancer the same browser sign-in link can reach two nodes: the first use signs in, the second (on
    the other node, before any revocation could travel) is refused as already used."""
    a, b = nodes
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    a.app.tokens.on_revoke = b.app.tokens.on_revoke = None  # only the cluster-wide claim may stop the second use
    token, _ = a.app.tokens.issue("alice", use="web", lifetime=60)

    async def use_on(gw: Gateway) -> tuple[int, str]:
        ctx = ssl.create_default_context(cafile=str(Path(gw.raw["gateway"]["state_dir"]) / "tls.crt"))
        url = f"https://127.0.0.1:{gw.port}/login/link?t={token}"
        async with aiohttp.ClientSession() as http, http.get(url, ssl=ctx, allow_redirects=False) as r:
            return r.status, await r.text()

    assert (await use_on(a))[0] == 303
    status, text = await use_on(b)
    assert status == 401 and "already used" in text


async def test_one_node_without_a_cluster_is_a_cluster_of_one(make_gateway: GatewayFactory) -> None:
    """Without [cluster], /v1/cluster describes this node alone (and no Redis is touched)."""
    async with make_gateway() as gw:
        status, summary = await api(gw, "GET", "/v1/cluster")
        assert status == 200 and summary["clustered"] is False and summary["lost"] == []
        assert [(n["node"], n["sessions"], n["self"]) for n in summary["nodes"]] == [(summary["node"], 0, True)]


async def test_locks_survive_a_redis_that_restarts_empty(
    nodes: tuple[Gateway, Gateway], make_gateway: GatewayFactory, redis_server: Store, tmp_path: Path
) -> None:
    """A lock is made on node A; Redis restarts without its data; the nodes put the lock back, so node C, which
    starts after, refuses alice too."""
    a, b = nodes
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    status, made = await api(a, "POST", "/v1/locks", {"user": "alice", "reason": "incident 9"})
    assert status == 201

    async def b_has_it() -> bool:
        return bool((await api(b, "GET", "/v1/locks"))[1]["locks"])

    await until(b_has_it)
    redis_server.stop()
    await until(_degraded(a, True))
    redis_server.start()
    await until(_degraded(a, False))

    async def restored() -> bool:
        return any(e["event"] == "cluster_locks_restored" for gw in (a, b) for e in gw.logs.events())

    await until(restored)
    async with make_gateway(node(tmp_path, "node-c", redis_server, tmp_path / "token.key")) as c:
        watch(c)

        async def c_has_it() -> bool:
            return [lk["id"] for lk in (await api(c, "GET", "/v1/locks"))[1]["locks"]] == [made["lock"]["id"]]

        await until(c_has_it)


async def test_a_sources_penalty_budget_is_the_clusters(nodes: tuple[Gateway, Gateway]) -> None:
    """Behind a balancer a scanner's logins spread over the nodes: two failed logins from 127.0.0.2 on each node
    (5 s each; a source is refused past 15 s) are 10 s per node alone, but every node counts every node's events, so
    127.0.0.2 is refused on both while alice from 127.0.0.1 still logs in."""
    a, b = nodes
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    for gw in (a, b, a, b):
        r = await gw.run(*gw.ssh_argv_keys("alice+web01", gw.keys.stranger.private, opts=("-b", "127.0.0.2")), "true")
        assert r.rc == 255 and "Permission denied" in r.errtext, r.errtext
    for gw in (a, b):
        penalties = gw.app._penalties
        assert penalties is not None

        async def refused_here(p: Any = penalties) -> bool:
            return p.refused("127.0.0.2") is not None

        await until(refused_here)
        r = await gw.run(*gw.ssh_argv_keys("alice+web01", gw.keys.alice.private, opts=("-b", "127.0.0.2")), "true")
        assert r.rc == 255 and [e for e in gw.logs.events("connection_refused") if e["reason"] == "penalty"], r.errtext
        ok = await gw.run(*argv(gw, "alice+web01", "echo", "still-in"))
        assert ok.rc == 0 and ok.text.strip() == "still-in"
