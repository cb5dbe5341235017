"""Several gateways, one view: each node publishes its sessions to Redis and answers disconnects for them.

Each node's registry stays the source of truth for its own sessions. Every `heartbeat` the node writes two keys:
`bastion:alive:<node>` (a few bytes: when, how many sessions) with a TTL of `node_ttl`, and its whole session
list to `bastion:rows:<node>` (one JSON line per session) with twice that TTL. A node that dies (SIGKILL, a cut
cable) drops out of every other node's view within `node_ttl`, since a list shows only the rows of live nodes, and
a list from any node is complete within one heartbeat. Its registry's events (opened, updated, closed, progress)
go out as they happen on `bastion:events`, so every node's event stream carries every node's sessions; a node
reads that channel only while one of its own event streams is open (an idle worker or node has no use for every
other node's events, and at every login they cost it and Redis work). Each
heartbeat a node also reads the others' liveness keys, never their rows (at thousands of sessions a node, reading
every row every second was the cluster's biggest shared cost): a node whose key expired without saying it left
(SIGKILL) is reported lost, its rows (which outlive its liveness key) are read once, and each of its sessions is
closed in every event stream with reason `node_lost`, logged and counted. A disconnect for a session on another node is
published on `bastion:control:<node>`; the owner ends it with its own registry (the user reads the notice as
usual) and answers on a reply channel. Every Redis call has a deadline (`timeout`): when Redis is unreachable the
node goes on serving its users, answers from local state and says `degraded`; it converges by itself when Redis
is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

import redis.asyncio as redis
from structlog.typing import FilteringBoundLogger

from gateway.clock import Clock
from gateway.sessions.model import iso
from gateway.sessions.registry import SessionRegistry, StreamEnded, Subscription

_LOCKS = "bastion:locks"  # a hash (id -> lock) and the channel of changes (locks and revoked tokens)
_REVOKED = "bastion:revoked"  # a hash: token id -> when it expires
_ALIVE = "bastion:alive:"  # {"node", "at", "sessions": count}, TTL node_ttl: the node is alive while it exists
_ROWS = "bastion:rows:"  # a head line {"node", "at", "sessions"} then one JSON line per session, TTL 2 node_ttl
_CONTROL = "bastion:control:"
_REPLY = "bastion:reply:"
_EVENTS = "bastion:events"  # every node's registry events, batched: {"origin", "events": [...]} | {"origin", "resync"}
_NODES = "bastion:nodes"  # a node leaving or lost: {"origin", "left"} | {"origin", "lost", "last"} (every node listens)
_PENALTIES = "bastion:penalties"  # per-source penalty events: {"origin", "source", "event"}
_SPENT = "bastion:spent:"  # one-time tokens (browser sign-in links) spent on some node
_EVENT_KINDS = ("opened", "updated", "closed", "progress")
_MAX_BATCH = 500  # events in one published message
MAX_LOST = 50  # lost nodes remembered for the summary
_MAX_SERVING = 1000  # disconnects served at once; beyond, requests are dropped and the asker sees node_unreachable
MAX_REDIS_CONNECTIONS = 128  # this node's connections to Redis at most (pub/sub subscribers and replies included)
MAX_BULK = 1000  # session ids in one disconnect_many request (the API's own limit per bulk request)
MAX_REMOTE = 100_000  # sessions read from other nodes at once (beyond: the list is cut and says so)


@dataclass(frozen=True)
class RemoteView:
    lines: list[str]  # other nodes' sessions as they wrote them: one compact JSON object (SessionInfo.as_dict()) each
    nodes: dict[str, str]  # node -> its last heartbeat (ISO time), this node included
    degraded: bool  # Redis could not be read: only this node's sessions are shown

    async def sessions(self) -> list[dict[str, Any]]:
        """The rows parsed (a line that does not parse is left out), the loop given back every `_BEAT_SLICE` of them.
        The session list does without: it adds the lines as they are (`control/api`)."""
        return await _parse_rows(self.lines)


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
        self.local_locks: Callable[[], list[dict[str, Any]]] | None = None  # every lock this node holds (to_dict form)
        self.on_penalty: Callable[[str, str], None] | None = None  # another node's penalty event: (source address, event)
        # Workers of one gateway (`gateway/workers.py`): the other workers' node names, and this node's metrics text.
        self.siblings: tuple[str, ...] = ()
        self.render_metrics: Callable[[], bytes] | None = None
        self._events: Subscription | None = None  # this node's registry events, forwarded to the others
        self._resync_due = False  # an event could not be published: the others start over from a snapshot
        self._beat_rows: dict[str, tuple[tuple[int, int, object, bool], str]] = {}  # id -> (what it showed, its row)
        self._known: dict[str, tuple[str, int]] = {}  # node -> (last heartbeat, its session count), last watch
        self._left: set[str] = set()  # nodes that said they stopped (not lost)
        self._lost_nodes: set[str] = set()
        self.lost: deque[dict[str, Any]] = deque(maxlen=MAX_LOST)  # newest last: {node, detected_at, last_heartbeat, sessions}
        self.nodes_lost = 0
        self.sessions_lost = 0
        self.last_beat_mono: float | None = None  # this node's last heartbeat that Redis took
        self.cluster_sessions = 0  # sessions of every node, at the last watch
        self.cluster_nodes = 0
        self._up_since = 0.0  # when Redis last became reachable (monotonic)
        # Set after every heartbeat (taken or failed) and every message from the cluster: what this node knows of the
        # others may have changed. Whoever waits on it clears it first (the tests wait on it instead of sleeping).
        self.changed = asyncio.Event()
        # Another node's sessions its events opened and did not close, while this node reads them: node -> id -> row.
        self._remote_open: dict[str, dict[str, dict[str, Any]]] = {}
        self._remote_open_count = 0
        self._want_events = asyncio.Event()  # an event stream is open here: read the other nodes' events
        self.events_live = asyncio.Event()  # subscribed to them now

    def __repr__(self) -> str:
        return f"RedisCluster(node={self.node!r}, heartbeat={self.heartbeat:g}s, node_ttl={self.node_ttl:g}s)"

    async def start(self) -> None:
        # A bounded pool whose callers wait (up to `timeout`) for a free connection: the default pool fails at once
        # past 100 connections in use, which a burst of disconnects or lock changes reached.
        pool = redis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=MAX_REDIS_CONNECTIONS,
            timeout=self.timeout,
            password=self._password,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            decode_responses=True,
            protocol=2,  # RESP2: what every Redis speaks, and the workers' hub (gateway/hub.py)
        )
        self._redis = redis.Redis.from_pool(pool)
        self._events = self._registry.subscribe(local_only=True)
        self._tasks = [
            asyncio.create_task(self._beat(), name="cluster-heartbeat"),
            asyncio.create_task(self._serve_control(), name="cluster-control"),
            asyncio.create_task(self._forward(), name="cluster-events"),
            asyncio.create_task(self._receive_events(), name="cluster-events-in"),
        ]
        self._registry.on_streams = self._streams_changed
        self._streams_changed()

    async def stop(self) -> None:
        self._registry.on_streams = None
        if self._sending:  # lock changes made just before the stop still reach the cluster (bounded)
            await asyncio.wait(list(self._sending), timeout=self.timeout)
        if self._events is not None:  # the drain's closed events still reach the others
            self._events.end()
            await asyncio.wait([self._tasks[2]], timeout=self.timeout)
            self._registry.unsubscribe(self._events)
        await _cancel_all([*self._tasks, *self._serving, *self._sending], self.timeout)
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await self._redis.publish(_NODES, json.dumps({"origin": self.node, "left": True}))
                    await self._redis.delete(_ALIVE + self.node, _ROWS + self.node)  # a clean stop leaves at once
            with contextlib.suppress(redis.RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await self._redis.aclose()

    def heartbeat_age(self) -> float | None:
        """Seconds since Redis last took this node's heartbeat; None before the first."""
        return None if self.last_beat_mono is None else max(0.0, self._clock.monotonic() - self.last_beat_mono)

    def _down(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        if not self.degraded:
            self._log.warning("cluster_degraded", during=what, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        self.degraded = True

    def _up(self) -> None:
        if self.degraded:
            self._log.info("cluster_connected", node=self.node)
            self._up_since = self._clock.monotonic()
        self.degraded = False

    async def _beat(self) -> None:
        assert self._redis is not None
        while True:
            at, count, rows = await self._heartbeat_payload()
            alive = json.dumps({"node": self.node, "at": at, "sessions": count}, separators=(",", ":"))
            was_degraded = self.degraded
            try:
                async with asyncio.timeout(self.timeout):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        # The rows first: a node that reads this liveness key finds rows at least as new.
                        pipe.set(_ROWS + self.node, rows, px=int(2 * self.node_ttl * 1000))
                        pipe.set(_ALIVE + self.node, alive, px=int(self.node_ttl * 1000))
                        await pipe.execute()
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._down("heartbeat", exc)
            else:
                self.last_beat_mono = self._clock.monotonic()
                self._up()
                try:
                    await self._watch(resync=was_degraded)
                except Exception:  # a bug here must not stop the heartbeat: the node would drop out of every view
                    self._log.exception("cluster_watch_failed")
            self.changed.set()
            await self._clock.sleep(self.heartbeat)

    async def _heartbeat_payload(self) -> tuple[str, int, str]:
        """(when, how many sessions, the rows document): encoded 256 rows at a time with the loop given back between
        them (9,000 rows in one stretch stopped every relay for tens of milliseconds, every heartbeat)."""
        at = iso(self._clock.now())
        rows: list[str] = []
        cache: dict[str, tuple[tuple[int, int, object, bool], str]] = {}  # only the sessions of this beat are kept
        live = self._registry.live
        for i, s in enumerate(self._registry.sessions()):
            if i and i % _BEAT_SLICE == 0:
                await asyncio.sleep(0)
            if i >= _BEAT_SLICE and live(s.id) is not s:
                continue  # closed while the loop was given back
            # A row is encoded again only when what it shows moved (bytes, a pending end, its end): an idle session's
            # row is the same text every beat. Compact JSON never holds a raw newline (json.dumps escapes it).
            mark = (s.bytes_up, s.bytes_down, s.pending, s.ended)
            hit = self._beat_rows.get(s.id)
            text = hit[1] if hit is not None and hit[0] == mark else json.dumps(s.snapshot().as_dict(), separators=(",", ":"))
            cache[s.id] = (mark, text)
            rows.append(text)
        self._beat_rows = cache
        head = json.dumps({"node": self.node, "at": at, "sessions": len(rows)}, separators=(",", ":"))
        return at, len(rows), "\n".join([head, *rows])

    async def _alive(self) -> dict[str, tuple[str, int]]:
        """Every live node's last heartbeat and session count, this one's included: its liveness key only, never its
        rows. Raises on Redis errors (bounded by `timeout`)."""
        assert self._redis is not None
        async with asyncio.timeout(self.timeout):
            keys = [k async for k in self._redis.scan_iter(match=_ALIVE + "*", count=500)]
            values = await self._redis.mget(keys) if keys else []
        out: dict[str, tuple[str, int]] = {}
        for raw in values:
            if raw is not None and (beat := _alive_doc(raw)) is not None:  # None: expired between SCAN and MGET
                out[beat[0]] = beat[1:]
        return out

    async def _last_rows(self, node: str) -> list[dict[str, Any]] | None:
        """A lost node's rows from its last heartbeat, None if they are gone (parsed with the loop given back)."""
        assert self._redis is not None
        async with asyncio.timeout(self.timeout):
            raw = await self._redis.get(_ROWS + node)
        split = _rows_head(raw, MAX_REMOTE)
        return await _parse_rows(split[2]) if split is not None else None

    async def view(self) -> RemoteView:
        """The other nodes' sessions (within one heartbeat), or a degraded view of none. Bounded by `timeout`."""
        if self._redis is None:
            return RemoteView([], {}, True)
        try:
            alive = await self._alive()
            others = sorted(n for n in alive if n != self.node)
            values: list[Any] = []
            if others:
                async with asyncio.timeout(self.timeout):
                    values = await self._redis.mget([_ROWS + n for n in others])
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._down("view", exc)
            return RemoteView([], {self.node: iso(self._clock.now())}, True)
        lines: list[str] = []
        for raw in values:  # split, not parsed: a list of 9,000 other rows needs no dict per row
            if (split := _rows_head(raw, MAX_REMOTE - len(lines))) is not None:
                lines.extend(split[2])
        return RemoteView(lines, {node: at for node, (at, _) in alive.items()}, self.degraded)

    async def _watch(self, *, resync: bool) -> None:
        """After each heartbeat: which nodes joined, left, or were lost (their key expired without a word)."""
        try:
            read = await self._alive()
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._down("watch", exc)
            return
        self.cluster_nodes = len(read)
        self.cluster_sessions = sum(count for _, count in read.values())
        # Until this node has been connected for node_ttl, a missing key may only mean Redis was away (or restarted
        # empty) and the others have not beaten since: those nodes are kept, not reported lost.
        settled = self._clock.monotonic() - self._up_since >= self.node_ttl
        waiting: dict[str, tuple[str, int]] = {}
        for node in sorted(self._known.keys() - read.keys() - {self.node}):
            at, count = self._known[node]
            if node in self._left:
                self._left.discard(node)
                self._log.info("cluster_node_left", node=node)
            elif settled:
                # Its rows outlive its liveness key (2 node_ttl): every session it had at its last heartbeat.
                rows: list[dict[str, Any]] | None = None
                try:
                    rows = await self._last_rows(node)
                except (redis.RedisError, OSError, TimeoutError) as exc:
                    self._down("watch", exc)
                self._lost(node, at, count, rows)
            else:
                waiting[node] = self._known[node]
        joined = read.keys() - self._known.keys() - {self.node}
        for node in joined:
            if node in self._lost_nodes:
                self._lost_nodes.discard(node)
                self._log.warning("cluster_node_returned", node=node, sessions=read[node][1])
            elif self._known:
                self._log.info("cluster_node_joined", node=node)
        self._known = {**read, **waiting}
        self._left &= read.keys()  # a node that said it left and is gone needs no remembering; one that came back may leave again
        if resync or joined:  # events may have been missed: every stream starts over from a snapshot
            self._registry.resync()

    def _lost(self, node: str, last_heartbeat: str, count: int, rows: list[dict[str, Any]] | None) -> None:
        """Report `node` lost with its sessions: `rows` from its last heartbeat, or None when they could not be read
        (then only their number is known, and every event stream starts over from a snapshot without them).
        that node. A session it opened after its last heartbeat reached the streams as `opened` but is in no row:
        the sessions its events opened (and did not close) are closed too, so none stays on an operator's page."""
        opened = self._remote_open.pop(node, {})  # what its events opened since this node began reading them
        self._remote_open_count -= len(opened)
        if rows is not None:
            known = {str(r.get("id")) for r in rows}
            rows = rows + [r for sid, r in opened.items() if sid not in known]
        ids = [str(r.get("id")) for r in rows] if rows is not None else []
        sessions = len(ids) if rows is not None else count
        self.nodes_lost += 1
        self.sessions_lost += sessions
        self._lost_nodes.add(node)
        record = {"node": node, "detected_at": iso(self._clock.now()), "last_heartbeat": last_heartbeat, "sessions": sessions}
        self.lost.append(record)
        self._log.warning("cluster_node_lost", node=node, last_heartbeat=last_heartbeat, sessions=sessions, session_ids=ids[:100])
        if rows is None:
            self._registry.resync()
            return
        for row in rows[:MAX_REMOTE]:
            self._registry.relay("closed", {"session": row, "reason": "node_lost"})

    async def summary(self) -> dict[str, Any]:
        """Nodes, sessions per node, last heartbeats and recently lost nodes (bounded by `timeout`)."""
        now = self._clock.now()
        nodes: list[dict[str, Any]] = []
        degraded = self.degraded
        read: dict[str, tuple[str, int]] = {}
        if self._redis is not None:
            try:
                read = await self._alive()
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._down("summary", exc)
                degraded = True
        for node, (at, count) in sorted(read.items()):
            nodes.append({"node": node, "self": node == self.node, "sessions": count, "last_heartbeat": at, "age_s": _age(now, at)})
        if self.node not in read:  # degraded, or before the first heartbeat: this node from its own state
            nodes.insert(0, {"node": self.node, "self": True, "sessions": len(self._registry.ids()), "last_heartbeat": None, "age_s": None})
        return {
            "node": self.node,
            "clustered": True,
            "degraded": degraded,
            "heartbeat_s": self.heartbeat,
            "node_ttl_s": self.node_ttl,
            "nodes": nodes,
            "sessions": sum(n["sessions"] for n in nodes),
            "lost": list(self.lost),
        }

    async def claim_once(self, token_id: str, expires_at: float) -> bool | None:
        """Spend a one-time token cluster-wide: True if this is its first use anywhere, False if some node spent it,
        None if Redis could not say (the caller falls back to this node's own memory)."""
        if self._redis is None:
            return None
        ttl_ms = max(1000, int((expires_at - self._clock.now().timestamp()) * 1000) + 1000)
        try:
            async with asyncio.timeout(self.timeout):
                took = await self._redis.set(_SPENT + token_id[:64], self.node, nx=True, px=ttl_ms)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._down("claim", exc)
            return None
        return bool(took)

    async def _forward(self) -> None:
        """This node's registry events to the others, in batches, as they happen."""
        assert self._events is not None and self._redis is not None
        while True:
            try:
                first = await self._events.get()
            except StreamEnded:
                return
            batch: list[dict[str, Any]] = []
            resync = first is None
            for ev in [first, *self._events.drain()]:
                if ev is None:
                    continue
                if ev.kind == "progress":
                    batch.append({"kind": "progress", "data": {"sessions": [
                        {"id": p.id, "bytes_up": p.bytes_up, "bytes_down": p.bytes_down} for p in ev.progress
                    ]}})  # fmt: skip
                elif ev.session is not None:
                    data: dict[str, Any] = {"session": ev.session.as_dict()}
                    if ev.reason is not None:
                        data["reason"] = str(ev.reason)
                    batch.append({"kind": ev.kind, "data": data})
            messages: list[dict[str, Any]] = []
            if resync or self._resync_due:
                messages.append({"origin": self.node, "resync": True})
            messages.extend({"origin": self.node, "events": batch[i : i + _MAX_BATCH]} for i in range(0, len(batch), _MAX_BATCH))
            if not messages:
                continue
            try:
                async with asyncio.timeout(self.timeout):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for m in messages:
                            pipe.publish(_EVENTS, json.dumps(m, separators=(",", ":")))
                        await pipe.execute()
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._down("events", exc)
                self._resync_due = True
            else:
                self._resync_due = False

    def _streams_changed(self) -> None:
        if self._registry.streams():
            self._want_events.set()
        # The last stream closing is noticed by the reader itself (within a second): no reconnect per page reload.

    async def events_ready(self) -> None:
        """Until this node reads the other nodes' events (bounded by `timeout`): an event stream opened here waits for
        it before its first snapshot, so nothing published after that snapshot is missed."""
        if self._redis is None or self.events_live.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout):
                await self.events_live.wait()

    async def _receive_events(self) -> None:
        """The other nodes' events on `bastion:events`, subscribed only while an event stream is open here. After a
        failure while streams were open, every stream starts over from a snapshot (events were missed)."""
        assert self._redis is not None
        missed = False
        while True:
            await self._want_events.wait()
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(_EVENTS)
                try:
                    # Live once Redis confirmed it: a stream's first snapshot comes after, so no event falls between.
                    async with asyncio.timeout(self.timeout):
                        while (msg := await pubsub.get_message(timeout=self.timeout)) is None or msg["type"] != "subscribe":
                            pass
                    self.events_live.set()
                    if missed:
                        self._registry.resync()
                        missed = False
                    while self._registry.streams():
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None:
                            self._event_message(msg["data"])
                            self.changed.set()
                finally:
                    self.events_live.clear()
                    self._remote_open.clear()
                    self._remote_open_count = 0
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                if not self._registry.streams():
                    self._want_events.clear()
                    if self._registry.streams():  # one opened while the subscription closed
                        self._want_events.set()
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._down("events", exc)
                missed = True
                await self._clock.sleep(self.heartbeat)

    def _from_other(self, data: str) -> dict[str, Any] | None:
        """Another node's message as a dict; None if it does not parse or is this node's own."""
        try:
            doc = json.loads(data)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) and doc.get("origin") != self.node else None

    def _node_message(self, data: str) -> None:
        """Another node left (a clean stop) or was lost (its workers' supervisor saw it die)."""
        if (doc := self._from_other(data)) is None:
            return
        if doc.get("left") is True:
            self._left.add(str(doc.get("origin"))[:64])
            return
        if doc.get("lost") is True:  # the workers' supervisor saw this worker die: no need to wait for its key to expire
            node = str(doc.get("origin"))[:128]
            known = self._known.pop(node, None)
            beat = _rows_doc_now(doc.get("last"), MAX_REMOTE)
            if beat is not None:
                self._lost(node, beat[0], len(beat[1]), beat[1])
            elif known is not None:
                self._lost(node, known[0], known[1], None)

    def _event_message(self, data: str) -> None:
        """Another node's events, to this node's event streams. A message that does not parse is dropped."""
        if (doc := self._from_other(data)) is None:
            return
        if doc.get("resync") is True:
            self._registry.resync()
            return
        events = doc.get("events")
        if not isinstance(events, list):
            return
        origin = str(doc.get("origin"))[:128]
        for ev in events[:_MAX_BATCH]:
            if isinstance(ev, dict) and ev.get("kind") in _EVENT_KINDS and isinstance(ev.get("data"), dict):
                kind: str = ev["kind"]
                payload: dict[str, Any] = ev["data"]
                if kind in ("opened", "closed") and isinstance(row := payload.get("session"), dict):
                    self._track(origin, kind, row)
                self._registry.relay(cast(Literal["opened", "closed", "updated", "progress"], kind), payload)

    def _track(self, origin: str, kind: str, row: dict[str, Any]) -> None:
        """Remember which of another node's sessions its events opened (bounded), to close them if it is lost."""
        sid = str(row.get("id"))[:64]
        mine = self._remote_open.get(origin)
        if kind == "closed":
            if mine is not None and mine.pop(sid, None) is not None:
                self._remote_open_count -= 1
        elif self._remote_open_count < MAX_REMOTE and (mine is None or sid not in mine):
            self._remote_open.setdefault(origin, {})[sid] = row
            self._remote_open_count += 1

    async def disconnect(self, node: str, sid: str, reason: str, grace: float) -> tuple[str, str | None]:
        """Ask `node` to end its session `sid`: (result, ends_at) as that node's registry answered, or node_unreachable."""
        answer = await self._ask(node, {"op": "disconnect", "id": sid, "reason": reason, "grace": grace}, wait=12.0)
        if answer is None:
            return "node_unreachable", None
        ends = answer.get("ends_at")
        return str(answer.get("result", "failed")), ends if isinstance(ends, str) else None

    async def disconnect_many(self, node: str, sids: list[str], reason: str, grace: float) -> dict[str, tuple[str, str | None]]:
        """Ask `node` to end these sessions of its own in one request (a bulk disconnect: one Redis connection and one
        wait per node, not per session): {id: (result, ends_at)}, node_unreachable for every id it did not answer."""
        results: dict[str, tuple[str, str | None]] = dict.fromkeys(sids, ("node_unreachable", None))
        for i in range(0, len(sids), MAX_BULK):
            part = sids[i : i + MAX_BULK]
            answer = await self._ask(node, {"op": "disconnect_many", "ids": part, "reason": reason, "grace": grace}, wait=12.0)
            got = answer.get("results") if answer is not None else None
            if not isinstance(got, dict):
                continue
            for sid in part:
                one = got.get(sid)
                if isinstance(one, list) and len(one) == 2 and isinstance(one[0], str):
                    results[sid] = (one[0][:32], one[1] if isinstance(one[1], str) else None)
        return results

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

    async def sibling_metrics(self) -> tuple[list[bytes], int]:
        """Every other worker's metrics text (asked at once, each bounded by `timeout`), and how many did not answer."""

        async def one(node: str) -> bytes | None:
            answer = await self._ask(node, {"op": "metrics"}, wait=0.0)
            text = answer.get("text") if answer is not None else None
            return text.encode() if isinstance(text, str) else None

        answers = await asyncio.gather(*(one(n) for n in self.siblings))
        return [a for a in answers if a is not None], sum(a is None for a in answers)

    async def supervisor_status(self) -> str | None:
        """The supervisor's figures from the workers' hub (None without them, or when it cannot be read)."""
        if self._redis is None:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self._redis.get("bastion:supervisor")
        except (redis.RedisError, OSError, TimeoutError):
            return None
        return raw if isinstance(raw, str) else None

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

    def publish_penalty(self, source: str, event: str) -> None:
        """A penalty event recorded here (a failed login, a silent client): every node counts it for that source."""
        self._send(self._store_penalty(source, event), what="penalty")

    async def _store_penalty(self, source: str, event: str) -> None:
        assert self._redis is not None
        try:
            async with asyncio.timeout(self.timeout):
                await self._redis.publish(_PENALTIES, json.dumps({"origin": self.node, "source": source, "event": event}))
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._down("penalty", exc)

    def _penalty_message(self, data: str) -> None:
        try:
            doc = json.loads(data)
        except ValueError:
            return
        if isinstance(doc, dict) and doc.get("origin") != self.node and self.on_penalty is not None:
            source, event = doc.get("source"), doc.get("event")
            if isinstance(source, str) and isinstance(event, str) and len(source) <= 64:
                self.on_penalty(source, event)

    def _send(self, coro: Coroutine[Any, Any, None], what: str = "lock") -> None:
        if len(self._sending) >= _MAX_SERVING:
            coro.close()
            self._log.warning("cluster_change_not_shared", what=what, reason="too many changes in flight")
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
        mine = self.local_locks() if self.local_locks is not None else []
        if not locks and mine:
            # The cluster's hash is empty although this node holds locks: Redis restarted without its data. Put them
            # back, so a node that starts later is locked too. (Only when empty: a lock lifted elsewhere while this
            # node was away is not brought back.)
            async with asyncio.timeout(self.timeout):
                await self._redis.hset(_LOCKS, mapping={str(lk["id"]): json.dumps({**lk, "origin": self.node}) for lk in mine[:10_000]})
            self._log.warning("cluster_locks_restored", locks=len(mine[:10_000]), reason="the cluster had none")
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
                await pubsub.subscribe(_CONTROL + self.node, _LOCKS, _NODES, _PENALTIES)
                try:
                    await self._sync_locks()
                    while True:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is None:
                            continue
                        if msg["channel"] == _NODES:
                            self._node_message(msg["data"])
                        elif msg["channel"] == _PENALTIES:
                            self._penalty_message(msg["data"])
                        elif msg["channel"] == _LOCKS:
                            self._lock_change(msg["data"])
                        elif len(self._serving) < _MAX_SERVING:
                            task = asyncio.create_task(self._handle(msg["data"]), name="cluster-disconnect")
                            self._serving.add(task)
                            task.add_done_callback(self._serving.discard)
                        self.changed.set()
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
        elif req.get("op") == "disconnect_many":
            answer = await self._disconnect_many(req)
        elif req.get("op") == "metrics" and self.render_metrics is not None:
            answer = {"text": self.render_metrics().decode()}
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

    async def _disconnect_many(self, req: dict[str, Any]) -> dict[str, Any] | None:
        try:
            ids, reason, grace = req["ids"], str(req["reason"]), float(req["grace"])
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(ids, list) or not 0 < len(ids) <= MAX_BULK or not all(isinstance(i, str) and len(i) <= 64 for i in ids):
            return None
        if len(reason) > 400 or not 0 <= grace <= 3600:
            return None
        results: dict[str, list[str | None]] = {}
        ending: list[str] = []
        for sid in dict.fromkeys(ids):
            result = self._registry.terminate(sid, reason, grace)
            if result is None:
                results[sid] = ["not_found", None]
            elif result.pending.ends_mono - self._clock.monotonic() > 0:
                results[sid] = ["pending", iso(result.pending.ends_at)]
            else:
                ending.append(sid)
        still = await self._registry.wait_all_closed(ending, 10.0)  # one waiter for all of them
        for sid in ending:
            results[sid] = ["failed" if sid in still else "disconnected", None]
        counts: dict[str, int] = {}
        for outcome, _ in results.values():
            counts[str(outcome)] = counts.get(str(outcome), 0) + 1
        self._log.info("cluster_disconnect_served", session_ids=list(results)[:100], sessions=len(results), results=counts)
        return {"results": results}


async def _cancel_all(tasks: list[asyncio.Task[None]], every: float) -> None:
    """Cancel `tasks` and wait for them, cancelling again while any is left (bounded: 20 tries).

    On Python 3.11 a cancel that lands in the same loop turn as an `asyncio.timeout` deadline (ours, or redis-py's
    socket timeout) comes out as TimeoutError, which the loops here catch as a Redis failure and carry on from: one
    cancel was seen to leave the heartbeat asleep and the stop waiting forever (`bastion serve` stopped right after
    it started). 3.12 fixed asyncio.timeout; asking again is correct on both.
    """
    for _ in range(20):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            break
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=every)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved, so the loop does not log it as never retrieved


def _alive_doc(raw: object) -> tuple[str, str, int] | None:
    """A node's liveness key as (node, at, sessions); None if it is not one."""
    if not isinstance(raw, str) or len(raw) > 4096:
        return None
    try:
        doc = json.loads(raw)
        node, at, count = str(doc["node"]), str(doc["at"]), doc["sessions"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return None
    return node, at, count


def _rows_head(raw: object, limit: int) -> tuple[str, str, list[str]] | None:
    """A node's rows document split: (node, at, its row lines, at most `limit`); None if it is not one."""
    if not isinstance(raw, str):
        return None
    lines = raw.split("\n")
    try:
        head = json.loads(lines[0])
        node, at = str(head["node"]), str(head["at"])
    except (ValueError, KeyError, TypeError):
        return None
    return node, at, lines[1 : 1 + max(0, limit)]


def _row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


async def _parse_rows(lines: list[str]) -> list[dict[str, Any]]:
    """Row lines parsed (one that does not parse is left out), the loop given back every `_BEAT_SLICE` of them:
    another node's 9,000 rows in one stretch would stop every relay."""
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if i % _BEAT_SLICE == 0:
            await asyncio.sleep(0)
        if (row := _row(line)) is not None:
            rows.append(row)
    return rows


def _rows_doc_now(raw: object, limit: int) -> tuple[str, list[dict[str, Any]]] | None:
    """A node's rows document as (at, sessions (at most `limit`)) in one stretch, None if it is not one (a worker's
    death: once, where the order of events matters more than a pause)."""
    if (split := _rows_head(raw, limit)) is None:
        return None
    return split[1], [row for line in split[2] if (row := _row(line)) is not None]


_BEAT_SLICE = 256


def _age(now: datetime, at: str) -> float | None:
    """Seconds since an ISO time written by another node (None if it does not parse)."""
    try:
        then = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round(max(0.0, (now - then).total_seconds()), 3)
