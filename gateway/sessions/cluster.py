"""Several gateways, one view: each node publishes its sessions to Redis and answers disconnects for them.

Each node's registry stays the source of truth for its own sessions. Every `heartbeat` the node writes its
whole session list to `bastion:node:<node>` with a TTL of `node_ttl`, so a node that dies (SIGKILL, a cut
cable) drops out of every other node's view within `node_ttl`, and a list from any node is complete within one
heartbeat. A disconnect for a session on another node is published on `bastion:control:<node>`; the owner ends
it with its own registry (the user reads the notice as usual) and answers on a reply channel. Every Redis call
has a deadline (`timeout`): when Redis is unreachable the node goes on serving its users, answers from local
state and says `degraded`; it converges by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from structlog.typing import FilteringBoundLogger

from gateway.clock import Clock
from gateway.sessions.model import iso
from gateway.sessions.registry import SessionRegistry

_LOCKS = "bastion:locks"  # a hash (id -> lock) and the channel of changes (locks and revoked tokens)
_REVOKED = "bastion:revoked"  # a hash: token id -> when it expires
_NODE = "bastion:node:"
_CONTROL = "bastion:control:"
_REPLY = "bastion:reply:"
_MAX_SERVING = 1000  # disconnects served at once; beyond, requests are dropped and the asker sees node_unreachable
MAX_REMOTE = 100_000  # sessions read from other nodes at once (beyond: the list is cut and says so)


@dataclass(frozen=True)
class RemoteView:
    sessions: list[dict[str, Any]]  # other nodes' sessions, as their API would show them
    nodes: dict[str, str]  # node -> its last heartbeat (ISO time), this node included
    degraded: bool  # Redis could not be read: only this node's sessions are shown


class RedisCluster:
    """Owns the Redis client, the heartbeat task and the control subscriber. `start()` never waits on Redis."""

    def __init__(
        self,
        registry: SessionRegistry,
        node: str,
        url: str,
        *,
        heartbeat: float,
        node_ttl: float,
        timeout: float,
        log: FilteringBoundLogger,
        clock: Clock,
        password: str | None = None,
    ) -> None:
        self._registry = registry
        self.node = node
        self._url = url
        self._password = password
        self.heartbeat = heartbeat
        self.node_ttl = node_ttl
        self.timeout = timeout
        self._log = log
        self._clock = clock
        self._redis: redis.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.degraded = True  # until the first heartbeat lands
        self.failures = 0
        self._serving: set[asyncio.Task[None]] = set()  # disconnects being served (each may wait for its session)
        self._sending: set[asyncio.Task[None]] = set()  # lock changes being published
        # Set by the app: a lock another node made or lifted (dicts: this layer knows no Lock).
        self.on_lock: Callable[[dict[str, Any]], None] | None = None
        self.on_unlock: Callable[[str], None] | None = None
        self.on_revoke: Callable[[str, float], None] | None = None

    def __repr__(self) -> str:
        return f"RedisCluster(node={self.node!r}, heartbeat={self.heartbeat:g}s, node_ttl={self.node_ttl:g}s)"

    async def start(self) -> None:
        self._redis = redis.from_url(
            self._url, password=self._password, socket_timeout=self.timeout, socket_connect_timeout=self.timeout, decode_responses=True
        )
        self._tasks = [
            asyncio.create_task(self._beat(), name="cluster-heartbeat"),
            asyncio.create_task(self._serve_control(), name="cluster-control"),
        ]

    async def stop(self) -> None:
        if self._sending:  # lock changes made just before the stop still reach the cluster (bounded)
            await asyncio.wait(list(self._sending), timeout=self.timeout)
        for t in [*self._tasks, *self._serving, *self._sending]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._serving, *self._sending, return_exceptions=True)
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await self._redis.delete(_NODE + self.node)  # a clean stop leaves at once, not after node_ttl
            await self._redis.aclose()

    def _down(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        if not self.degraded:
            self._log.warning("cluster_degraded", during=what, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        self.degraded = True

    def _up(self) -> None:
        if self.degraded:
            self._log.info("cluster_connected", node=self.node)
        self.degraded = False

    async def _beat(self) -> None:
        assert self._redis is not None
        while True:
            payload = json.dumps(
                {"node": self.node, "at": iso(self._clock.now()), "sessions": [s.as_dict() for s in self._registry.list()]},
                separators=(",", ":"),
            )
            try:
                async with asyncio.timeout(self.timeout):
                    await self._redis.set(_NODE + self.node, payload, px=int(self.node_ttl * 1000))
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._down("heartbeat", exc)
            else:
                self._up()
            await self._clock.sleep(self.heartbeat)

    async def view(self) -> RemoteView:
        """The other nodes' sessions (within one heartbeat), or a degraded view of none. Bounded by `timeout`."""
        if self._redis is None:
            return RemoteView([], {}, True)
        try:
            async with asyncio.timeout(self.timeout):
                keys = [k async for k in self._redis.scan_iter(match=_NODE + "*", count=500)]
                values = await self._redis.mget(keys) if keys else []
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._down("view", exc)
            return RemoteView([], {self.node: iso(self._clock.now())}, True)
        sessions: list[dict[str, Any]] = []
        nodes: dict[str, str] = {}
        for raw in values:
            if raw is None:
                continue  # expired between SCAN and MGET
            try:
                doc = json.loads(raw)
                node, at, rows = str(doc["node"]), str(doc["at"]), list(doc["sessions"])
            except (ValueError, KeyError, TypeError):
                continue
            nodes[node] = at
            if node != self.node:
                sessions.extend(r for r in rows if isinstance(r, dict))
        return RemoteView(sessions[:MAX_REMOTE], nodes, self.degraded)

    async def disconnect(self, node: str, sid: str, reason: str, grace: float) -> tuple[str, str | None]:
        """Ask `node` to end its session `sid`: (result, ends_at) as that node's registry answered, or node_unreachable."""
        answer = await self._ask(node, {"op": "disconnect", "id": sid, "reason": reason, "grace": grace}, wait=12.0)
        if answer is None:
            return "node_unreachable", None
        ends = answer.get("ends_at")
        return str(answer.get("result", "failed")), ends if isinstance(ends, str) else None

    async def notice(self, node: str, sid: str | None, message: str) -> dict[str, str] | None:
        """Show `message` in `node`'s session `sid` (None: all of its sessions): results per id, None if unreachable."""
        answer = await self._ask(node, {"op": "notice", "id": sid, "message": message}, wait=0.0)
        results = answer.get("results") if answer is not None else None
        return {str(k): str(v) for k, v in results.items()} if isinstance(results, dict) else None

    async def _ask(self, node: str, request: dict[str, Any], wait: float) -> dict[str, Any] | None:
        """Publish `request` to `node` and wait (timeout + `wait`) for its answer; None if no node took it."""
        if self._redis is None:
            return None
        reply = _REPLY + secrets.token_hex(8)
        try:
            async with asyncio.timeout(self.timeout + wait):
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(reply)
                try:
                    if await self._redis.publish(_CONTROL + node, json.dumps({**request, "reply": reply})) == 0:
                        return None
                    while True:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None:
                            answer = json.loads(msg["data"])
                            return answer if isinstance(answer, dict) else None
                finally:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        except (redis.RedisError, OSError, TimeoutError, ValueError) as exc:
            self._down("request", exc)
            return None

    def publish_lock(self, lock: dict[str, Any]) -> None:
        """Share a lock made here: kept in the cluster's hash (for nodes that start later) and announced."""
        self._send(self._store_lock(lock))

    def publish_unlock(self, lock_id: str) -> None:
        self._send(self._drop_lock(lock_id))

    def publish_revoke(self, token_id: str, expires_at: float) -> None:
        """A token revoked here (an RD Gateway session the gateway ended): no node may accept it again."""
        self._send(self._store_revoke(token_id, expires_at))

    async def _store_revoke(self, token_id: str, expires_at: float) -> None:
        assert self._redis is not None
        try:
            async with asyncio.timeout(self.timeout):
                await self._redis.hset(_REVOKED, token_id, str(expires_at))
                change = {"op": "revoke", "id": token_id, "expires_at": expires_at, "origin": self.node}
                await self._redis.publish(_LOCKS, json.dumps(change))
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._down("revoke", exc)

    def _send(self, coro: Coroutine[Any, Any, None]) -> None:
        if len(self._sending) >= _MAX_SERVING:
            coro.close()
            self._log.warning("cluster_lock_not_shared", reason="too many changes in flight")
            return
        task = asyncio.create_task(coro, name="cluster-lock")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _store_lock(self, lock: dict[str, Any]) -> None:
        assert self._redis is not None
        raw = json.dumps({**lock, "origin": self.node})
        try:
            async with asyncio.timeout(self.timeout):
                await self._redis.hset(_LOCKS, str(lock["id"]), raw)
                await self._redis.publish(_LOCKS, json.dumps({"op": "lock", "lock": raw}))
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._down("lock", exc)  # the lock holds here; others get it from the hash when Redis is back

    async def _drop_lock(self, lock_id: str) -> None:
        assert self._redis is not None
        try:
            async with asyncio.timeout(self.timeout):
                await self._redis.hdel(_LOCKS, lock_id)
                await self._redis.publish(_LOCKS, json.dumps({"op": "unlock", "id": lock_id, "origin": self.node}))
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._down("unlock", exc)

    async def _sync_locks(self) -> None:
        """Every lock of the cluster (after a (re)connect: what was missed while Redis was away)."""
        assert self._redis is not None
        async with asyncio.timeout(self.timeout):
            locks = await self._redis.hgetall(_LOCKS)
        for raw in list(locks.values())[:10_000]:
            self._lock_message(raw if isinstance(raw, str) else raw.decode(errors="replace"))
        async with asyncio.timeout(self.timeout):
            revoked = await self._redis.hgetall(_REVOKED)
        now = self._clock.now().timestamp()
        gone = []
        for token_id, until in list(revoked.items())[:1_000_000]:
            try:
                expires = float(until)
            except ValueError:
                continue
            if expires <= now:
                gone.append(token_id)
            elif self.on_revoke is not None:
                self.on_revoke(str(token_id), expires)
        if gone:  # the hash is kept small: tokens past their expiry need no revocation
            async with asyncio.timeout(self.timeout):
                await self._redis.hdel(_REVOKED, *gone[:10_000])

    def _lock_message(self, raw: str) -> None:
        try:
            lock = json.loads(raw)
        except ValueError:
            return
        if isinstance(lock, dict) and lock.get("origin") != self.node and self.on_lock is not None:
            self.on_lock(lock)

    async def _serve_control(self) -> None:
        """Requests for this node (disconnects) and the cluster's lock changes. Reconnects by itself after failures."""
        assert self._redis is not None
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(_CONTROL + self.node, _LOCKS)
                try:
                    await self._sync_locks()
                    while True:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is None:
                            continue
                        if msg["channel"] == _LOCKS:
                            self._lock_change(msg["data"])
                        elif len(self._serving) < _MAX_SERVING:
                            task = asyncio.create_task(self._handle(msg["data"]), name="cluster-disconnect")
                            self._serving.add(task)
                            task.add_done_callback(self._serving.discard)
                finally:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._down("control", exc)
                await self._clock.sleep(self.heartbeat)

    def _lock_change(self, data: str) -> None:
        try:
            change = json.loads(data)
        except ValueError:
            return
        if not isinstance(change, dict):
            return
        if change.get("op") == "lock" and isinstance(change.get("lock"), str):
            self._lock_message(change["lock"])
        elif change.get("op") == "unlock" and change.get("origin") != self.node and self.on_unlock is not None:
            self.on_unlock(str(change.get("id", ""))[:32])
        elif change.get("op") == "revoke" and change.get("origin") != self.node and self.on_revoke is not None:
            expires = change.get("expires_at")
            if isinstance(expires, int | float) and not isinstance(expires, bool):
                self.on_revoke(str(change.get("id", ""))[:32], float(expires))

    async def _handle(self, data: str) -> None:
        try:
            req = json.loads(data)
            reply = str(req["reply"])
        except (ValueError, KeyError, TypeError):
            return
        if not reply.startswith(_REPLY):
            return
        if req.get("op") == "notice":
            answer = self._notice(req)
        elif req.get("op") == "disconnect":
            answer = await self._disconnect(req)
        else:
            return
        if answer is None:
            return
        assert self._redis is not None
        with contextlib.suppress(redis.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self.timeout):
                await self._redis.publish(reply, json.dumps(answer))

    def _notice(self, req: dict[str, Any]) -> dict[str, Any] | None:
        message, sid = req.get("message"), req.get("id")
        if not isinstance(message, str) or len(message) > 400 or (sid is not None and not isinstance(sid, str)):
            return None
        results: dict[str, str] = {}
        for target in [sid] if sid is not None else self._registry.ids():
            shown = self._registry.notify(target, message)
            results[target] = "not_found" if shown is None else ("delivered" if shown else "unsupported")
        return {"results": results}

    async def _disconnect(self, req: dict[str, Any]) -> dict[str, Any] | None:
        try:
            sid, reason, grace = str(req["id"]), str(req["reason"]), float(req["grace"])
        except (ValueError, KeyError, TypeError):
            return None
        if len(sid) > 64 or len(reason) > 400 or not 0 <= grace <= 3600:
            return None
        result = self._registry.terminate(sid, reason, grace)
        answer: dict[str, Any]
        if result is None:
            answer = {"result": "not_found"}
        elif result.pending.ends_mono - self._clock.monotonic() > 0:
            answer = {"result": "pending", "ends_at": iso(result.pending.ends_at)}
        else:
            gone = await self._registry.wait_closed(sid, 10.0)
            answer = {"result": "disconnected" if gone else "failed"}
        self._log.info("cluster_disconnect_served", session_id=sid, result=answer["result"])
        return answer
