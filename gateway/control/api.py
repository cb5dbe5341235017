"""The control port's HTTP API: sessions, forced disconnects, notices, events, metrics, health, the page.

Access: every route but health (and /metrics when `metrics_public`) and the
static page needs `Authorization: Bearer TOKEN`. Tokens are matched by SHA-256
in constant time against every configured operator. A missing or wrong token
gets 401, a viewer on an operator route 403; neither reaches a handler. The
page's own files carry no data and load without a token; the page then sends
the token the operator types with every request (a header, never a cookie, so
other sites cannot make a browser send it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from structlog.typing import FilteringBoundLogger

from gateway.access import AccessControl
from gateway.clock import Clock
from gateway.config import Operator
from gateway.control.openapi import OPENAPI
from gateway.kinds import Protocol
from gateway.locks import KINDS, LockError, clean_reason, parse_expires, parse_target
from gateway.sessions.cluster import RedisCluster
from gateway.sessions.model import SessionEvent, SessionInfo, iso
from gateway.sessions.registry import Session, SessionRegistry, StreamEnded, SubscriberLimit
from gateway.text import one_line

MAX_BODY = 64 * 1024  # room for a bulk disconnect of MAX_IDS ids with a reason
MAX_REASON = 400
MAX_IDS = 1000
DISCONNECT_DEADLINE = 10.0  # a session told to end now has this long to leave (its notice, then its relay closed)
LIST_CHUNK = 256  # at most this many rows of GET /v1/sessions are built between two turns of the event loop
LIST_SLICE_S = 0.001  # and at most about this much time (a CPU budget per turn, not a deadline)
_BATCH = 32  # rows of the list built between two looks at the time budget
WRITE_CHUNK = 64 * 1024  # bytes of the session list encoded, and handed to TLS, at once
MAX_GRACE = 3600.0
SSE_WRITE_DEADLINE = 30.0  # an event stream whose client has not taken a write for this long is dropped
BODY_DEADLINE = 10.0  # a body trickled byte by byte must not hold a connection past this
PROTOCOLS = tuple(p.value for p in Protocol)
_ROLE_RANK = {"viewer": 1, "operator": 2}
_OPERATOR_KEY = web.RequestKey("operator", Operator)


@dataclass(frozen=True)
class Route:
    role: str | None  # None: no token needed


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def _err(status: int, error: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status, headers=headers or None)


class ControlAPI:
    """Builds the aiohttp application. Reads the registry; never imports a protocol."""

    def __init__(
        self,
        registry: SessionRegistry,
        operators: Iterable[Operator],
        clock: Clock,
        log: FilteringBoundLogger,
        *,
        metrics: Callable[[], bytes | Awaitable[bytes]] | None = None,
        metrics_content_type: str = "text/plain; version=0.0.4; charset=utf-8",
        metrics_public: bool = False,
        node: str = "",
        ready: Callable[[], bool] = lambda: True,
        stopping: Callable[[], bool] = lambda: False,
        access: AccessControl | None = None,
        cluster: RedisCluster | None = None,
    ) -> None:
        self._access_control = access
        self._cluster = cluster
        self._registry = registry
        self._operators = tuple(operators)
        self._clock = clock
        self._log = log
        self._metrics = metrics
        self._metrics_type = metrics_content_type
        self._metrics_public = metrics_public
        self._node = node
        self._ready = ready
        self._stopping = stopping
        self._routes: dict[tuple[str, str], Route] = {}

    def set_operators(self, operators: Iterable[Operator]) -> None:
        """A reload: a removed operator's token stops working at its next request."""
        self._operators = tuple(operators)

    # -- access --
    def _who(self, request: web.Request) -> Operator | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        # aiohttp hands header bytes that are not UTF-8 over as lone surrogates: a 401, never an encoding error.
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).digest()
        found: Operator | None = None
        for op in self._operators:  # compare against every operator, in constant time each
            if hmac.compare_digest(digest, op.token_sha256):
                found = op
        return found

    @web.middleware
    async def _access(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        # Unknown routes still need a token, so a 404 reveals nothing to strangers.
        route = self._routes.get((request.method, resource.canonical if resource else ""), Route("viewer"))
        try:
            if route.role is not None:
                op = self._who(request)
                if op is None:
                    self._log.info("control_auth_failed", source_ip=request.remote, path=request.path[:100])
                    return _err(401, "unauthorized", "a valid bearer token is required", **{"WWW-Authenticate": 'Bearer realm="bastion"'})
                if _ROLE_RANK[op.role] < _ROLE_RANK[route.role]:
                    return _err(403, "forbidden", f"role {op.role!r} may not do this; it needs {route.role!r}")
                request[_OPERATOR_KEY] = op
            return await handler(request)
        except ApiError as exc:
            return _err(exc.status, exc.error, exc.message)
        except web.HTTPRequestEntityTooLarge:
            return _err(413, "too_large", f"request bodies are limited to {MAX_BODY} bytes")
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _err(exc.status, "http_error", exc.reason)
            raise

    def build(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._access])
        add = self._add
        add(app, "GET", "/healthz", self.healthz, None)
        add(app, "GET", "/readyz", self.readyz, None)
        add(app, "GET", "/metrics", self.metrics, None if self._metrics_public else "viewer")
        add(app, "GET", "/v1/openapi.json", self.openapi, "viewer")
        add(app, "GET", "/v1/sessions", self.list_sessions, "viewer")
        add(app, "GET", "/v1/sessions/{id}", self.get_session, "viewer")
        add(app, "DELETE", "/v1/sessions/{id}", self.delete_session, "operator")
        add(app, "POST", "/v1/sessions/disconnect", self.disconnect_many, "operator")
        add(app, "POST", "/v1/notices", self.notices, "operator")
        add(app, "GET", "/v1/events", self.events, "viewer")
        add(app, "GET", "/v1/cluster", self.cluster_summary, "viewer")
        if self._access_control is not None:
            add(app, "GET", "/v1/connections", self.list_connections, "viewer")
            add(app, "DELETE", "/v1/connections/{id}", self.end_connection, "operator")
            add(app, "GET", "/v1/locks", self.list_locks, "viewer")
            add(app, "POST", "/v1/locks", self.add_lock, "operator")
            add(app, "DELETE", "/v1/locks/{id}", self.remove_lock, "operator")
        add(app, "GET", "/v1/whoami", self.whoami, "viewer")
        add(app, "GET", "/ui", self.page, None)
        add(app, "GET", "/ui/app.js", self.page_js, None)
        return app

    def _add(
        self,
        app: web.Application,
        method: str,
        path: str,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        role: str | None,
    ) -> None:
        # The role is per method and path: GET and DELETE on /v1/sessions/{id} differ.
        route = app.router.add_route(method, path, handler)
        assert route.resource is not None
        self._routes[(method, route.resource.canonical)] = Route(role)

    # -- helpers --
    def _view(self, s: SessionInfo) -> dict[str, Any]:
        d = s.as_dict()
        d["duration_s"] = round(max(0.0, (self._clock.now() - s.started_at).total_seconds()), 3)
        return d

    async def _body(self, request: web.Request, *, required: bool) -> dict[str, Any]:
        if not request.can_read_body:
            if required:
                raise ApiError(400, "bad_request", "a JSON object body is required")
            return {}
        try:
            async with asyncio.timeout(BODY_DEADLINE):
                raw = await request.read()
        except TimeoutError:
            raise ApiError(408, "timeout", f"the request body did not arrive within {BODY_DEADLINE:g} s") from None
        if not raw.strip():
            if required:
                raise ApiError(400, "bad_request", "a JSON object body is required")
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, "bad_request", f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "bad_request", "body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "body must be a JSON object")
        return body

    @staticmethod
    def _reason(body: dict[str, Any]) -> str:
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise ApiError(400, "bad_request", "reason must be a string")
        reason = " ".join(one_line(reason).split())  # no ESC, C1, bidi controls or line breaks into terminals
        if len(reason) > MAX_REASON:
            raise ApiError(400, "bad_request", f"reason is limited to {MAX_REASON} characters")
        return reason

    @staticmethod
    def _grace(body: dict[str, Any]) -> float:
        grace = body.get("grace_s", 0)
        # The range check before isfinite: a 400-digit integer overflows float() inside isfinite. NaN fails the range too.
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= MAX_GRACE or not math.isfinite(grace):
            raise ApiError(400, "bad_request", f"grace_s must be a number from 0 to {MAX_GRACE:g}")
        return float(grace)

    def _audit(self, request: web.Request, action: str, **fields: Any) -> None:
        op = request[_OPERATOR_KEY]
        self._log.info("operator_action", action=action, operator=op.name, role=op.role, source_ip=request.remote, **fields)

    async def _owners(self, ids: Iterable[str]) -> dict[str, str] | None:
        """With [cluster]: which node holds each id not on this node (one read of the view for the whole request).
        None when the view could not be read (those ids are then `node_unreachable`, not `not_found`)."""
        if self._cluster is None or all(self._registry.live(sid) is not None for sid in ids):
            return {}
        view = await self._cluster.view()
        if view.degraded:
            return None
        return {str(r.get("id")): str(r.get("node")) for r in await view.sessions()}

    async def _disconnect(self, sid: str, reason: str, grace: float, owners: dict[str, str] | None = None) -> tuple[str, str | None]:
        """(result, ends_at): `disconnected` once gone, `pending` with the end in force, `not_found`, `failed`, or
        with [cluster] `node_unreachable`. `owners` is `_owners()`'s answer for this request.

        A request ending a session sooner than a pending one replaces it (reason included);
        one ending it later leaves the pending one, and the answer says when that is.
        """
        local = self._end_local(sid, reason, grace)
        if local is None:
            return await self._end_remote(sid, reason, grace, owners)
        if local[0] != "ending":
            return local
        # Showing the notice takes about a second; closing the relay is bounded too.
        if await self._registry.wait_closed(sid, DISCONNECT_DEADLINE):
            return "disconnected", None
        return self._failed(sid)

    def _end_local(self, sid: str, reason: str, grace: float) -> tuple[str, str | None] | None:
        """A session of this node: ("pending", ends_at), or ("ending", None) when it ends now. None: not here."""
        result = self._registry.terminate(sid, reason, grace)
        if result is None:
            return None
        if result.pending.ends_mono - self._clock.monotonic() > 0:
            return "pending", iso(result.pending.ends_at)
        return "ending", None

    async def _end_remote(self, sid: str, reason: str, grace: float, owners: dict[str, str] | None) -> tuple[str, str | None]:
        if self._cluster is None:
            return "not_found", None
        if owners is None:
            return "node_unreachable", None
        owner = owners.get(sid)
        if owner is None:
            return "not_found", None
        return await self._cluster.disconnect(owner, sid, reason, grace)

    def _failed(self, sid: str) -> tuple[str, str | None]:
        self._log.warning("disconnect_failed", session_id=sid, error=f"the session did not end within {DISCONNECT_DEADLINE:g} s")
        return "failed", None

    # -- handlers --
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": self._node})

    async def readyz(self, request: web.Request) -> web.Response:
        if self._ready():
            body: dict[str, Any] = {"status": "ready", "node": self._node}
            if self._cluster is not None:
                body["degraded"] = self._cluster.degraded  # serving its own users either way
            return web.json_response(body)
        status = "draining" if self._stopping() else "starting"
        return web.json_response({"status": status, "node": self._node}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            raise ApiError(404, "not_found", "metrics are not enabled")
        body = self._metrics()
        if not isinstance(body, bytes):  # several workers: the others' series are asked for
            body = await body
        return web.Response(body=body, headers={"Content-Type": self._metrics_type})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def whoami(self, request: web.Request) -> web.Response:
        op = request[_OPERATOR_KEY]
        return web.json_response({"name": op.name, "role": op.role, "node": self._node})

    async def list_sessions(self, request: web.Request) -> web.StreamResponse:
        """The JSON answer goes out in the slices `_session_body()` built (about `WRITE_CHUNK` bytes each), one slice
        per turn of the loop: TLS encrypts 64 KiB between two relay packets, never a list of 9,000 sessions at once."""
        pieces = await self._session_body(request.query)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        resp.charset = "utf-8"
        resp.content_length = sum(len(p) for p in pieces)
        await resp.prepare(request)
        for piece in pieces:
            await resp.write(piece)  # waits only when the transport's buffer is full
            await asyncio.sleep(0)  # and gives the loop back either way
        await resp.write_eof()
        return resp

    async def _session_list(self, q: Mapping[str, str]) -> bytes:
        """The whole answer of `GET /v1/sessions` with the filters `q`, in one piece."""
        return b"".join(await self._session_body(q))

    async def _session_body(self, q: Mapping[str, str]) -> list[bytes]:
        """The same JSON as `json.dumps({"sessions": [_view(s)...], "node": ...})`, built without a dict per session,
        in slices of about `WRITE_CHUNK` bytes.

        Each row is the session's cached text up to its duration (re-encoded only when its bytes or state moved) plus
        the duration. The loop is given back whenever `LIST_SLICE_S` of work or `LIST_CHUNK` rows went by, while the
        rows are read and again while they are encoded, so relays run while a list of 9,000 is built: no stretch
        joins or encodes megabytes at once. Nothing per row outlives the call but text, so polling the list leaves
        the collector nothing to walk.
        """
        unknown = set(q) - {"user", "vm", "protocol"}
        if unknown:
            raise ApiError(400, "bad_request", f"unknown filter: {sorted(unknown)[0]!r} (allowed: user, vm, protocol)")
        if q.get("protocol") is not None and q["protocol"] not in PROTOCOLS:
            raise ApiError(400, "bad_request", f"unknown protocol {q['protocol'][:64]!r} (one of: {', '.join(PROTOCOLS)})")
        user, vm, protocol = q.get("user"), q.get("vm"), q.get("protocol")
        filtered = user is not None or vm is not None or protocol is not None
        keys: list[str] = []  # started_at as the answer shows it, the key the rows are sorted by
        rows: list[str] = []  # each row's JSON
        ordered = True  # the rows are in started_at order so far (sessions open in time order)
        yielded = False  # sessions may have left since the copy below was taken
        now = _micros(self._clock.now())
        turn = _Turns()
        live = self._registry.live
        sessions = self._registry.sessions()
        latest = ""  # the last started_at added
        for at in range(0, len(sessions), _BATCH):
            if at and turn.due(_BATCH):  # the budget is looked at every _BATCH rows (a row takes about 2 µs)
                await turn.give_back()  # let relays run; sessions that left meanwhile are skipped below
                now = _micros(self._clock.now())
                yielded = True
            for s in sessions[at : at + _BATCH]:
                if filtered:
                    spec = s.spec
                    if (
                        (user is not None and spec.user != user)
                        or (vm is not None and spec.vm != vm)
                        or (protocol is not None and spec.protocol != protocol)
                    ):
                        continue
                if yielded and live(s.id) is not s:
                    continue
                static = s.view_cache
                if static.__class__ is not _Static:
                    static = _Static(s)
                    s.view_cache = static
                key = static.started
                if key < latest:
                    ordered = False
                latest = key
                keys.append(key)
                rows.append(static.row(s, now))
        answer: dict[str, Any] = {"node": self._node}
        if self._cluster is not None:
            view = await self._cluster.view()
            now = _micros(self._clock.now())
            for at, line in enumerate(view.lines):
                if at and at % _BATCH == 0 and turn.due(_BATCH):
                    await turn.give_back()
                    now = _micros(self._clock.now())
                if filtered:
                    r = _parsed(line)
                    if r is None or not all(q.get(k) is None or r.get(k) == q[k] for k in ("user", "vm", "protocol")):
                        continue
                remote = _remote_row(line, now)
                if remote is not None:
                    keys.append(remote[0])
                    rows.append(remote[1])
                    ordered = False
            answer |= {"degraded": view.degraded, "nodes": view.nodes}
        # Sorted already unless the wall clock stepped back or other nodes' rows were added; then a stable sort by
        # started_at, as before.
        if not ordered:
            order = sorted(range(len(rows)), key=keys.__getitem__)
            rows = [rows[i] for i in order]
            await turn.give_back()
        del keys
        pieces: list[bytes] = []
        first, size, last = 0, 0, len(rows) - 1
        for i, row in enumerate(rows):
            size += len(row) + 2
            if size >= WRITE_CHUNK or i == last:
                # The first slice opens the list; each later one starts with the separator from the row before it.
                pieces.append(((", " if pieces else '{"sessions": [') + ", ".join(rows[first : i + 1])).encode())
                first, size = i + 1, 0
                if turn.due():
                    await turn.give_back()
        if not pieces:
            pieces.append(b'{"sessions": [')
        pieces.append(("], " + json.dumps(answer)[1:]).encode())
        return pieces

    def _remote(self, row: dict[str, Any]) -> dict[str, Any]:
        """Another node's session as this node shows its own (the duration from its start, on this node's clock)."""
        out = dict(row)
        try:
            started = datetime.fromisoformat(str(row["started_at"]).replace("Z", "+00:00"))
            out["duration_s"] = round(max(0.0, (self._clock.now() - started).total_seconds()), 3)
        except (KeyError, ValueError):
            out["duration_s"] = 0.0
        return out

    async def get_session(self, request: web.Request) -> web.Response:
        s = self._registry.get(request.match_info["id"])
        if s is None:
            raise ApiError(404, "not_found", "no such session")
        return web.json_response(self._view(s))

    async def delete_session(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        body = await self._body(request, required=False)
        reason, grace = self._reason(body), self._grace(body)
        result, ends_at = await self._disconnect(sid, reason, grace, await self._owners([sid]))
        self._audit(request, "disconnect", session_ids=[sid], reason=reason, grace_s=grace, results={sid: result})
        if result == "not_found":
            raise ApiError(404, "not_found", "no such session")
        answer: dict[str, Any] = {"id": sid, "result": result}
        if ends_at is not None:
            answer["ends_at"] = ends_at
        return web.json_response(answer, status=200 if result != "failed" else 500)

    async def disconnect_many(self, request: web.Request) -> web.Response:
        body = await self._body(request, required=True)
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids) or len(ids) > MAX_IDS:
            raise ApiError(400, "bad_request", f"ids must be a non-empty list of up to {MAX_IDS} session id strings")
        reason, grace = self._reason(body), self._grace(body)
        unique = list(dict.fromkeys(ids))
        owners = await self._owners(unique)
        outcome: dict[str, tuple[str, str | None]] = {}
        others: list[str] = []
        for sid in unique:
            local = self._end_local(sid, reason, grace)
            if local is None:
                others.append(sid)
            else:
                outcome[sid] = local
        ending = [sid for sid, (result, _) in outcome.items() if result == "ending"]

        async def wait_local() -> None:
            # One waiter for every session of this node ending now, not one per id.
            still = await self._registry.wait_all_closed(ending, DISCONNECT_DEADLINE)
            for sid in ending:
                outcome[sid] = self._failed(sid) if sid in still else ("disconnected", None)

        async def ask_others() -> None:
            # One request per owning node for all of its sessions (a Redis connection and a wait per node, not per id:
            # 1,000 ids on other nodes asked one by one exhausted the Redis client's connections).
            by_node: dict[str, list[str]] = {}
            for sid in others:
                if self._cluster is None or (owners is not None and sid not in owners):
                    outcome[sid] = ("not_found", None)
                elif owners is None:
                    outcome[sid] = ("node_unreachable", None)  # the other nodes' rows could not be read
                else:
                    by_node.setdefault(owners[sid], []).append(sid)
            if self._cluster is not None and by_node:
                cluster = self._cluster
                answers = await asyncio.gather(*(cluster.disconnect_many(n, sids, reason, grace) for n, sids in by_node.items()))
                for answer in answers:
                    outcome.update(answer)

        await asyncio.gather(wait_local(), ask_others())
        results = {sid: outcome[sid][0] for sid in unique}
        ends = {sid: outcome[sid][1] for sid in unique if outcome[sid][1] is not None}
        self._audit(request, "disconnect", session_ids=unique, reason=reason, grace_s=grace, results=results)
        answer: dict[str, Any] = {"results": results}
        if ends:
            answer["ends_at"] = ends
        return web.json_response(answer)

    async def notices(self, request: web.Request) -> web.Response:
        body = await self._body(request, required=True)
        message = body.get("message")
        if not isinstance(message, str) or not message.strip():
            raise ApiError(400, "bad_request", "message must be a non-empty string")
        message = " ".join(one_line(message).split())
        if not message:
            raise ApiError(400, "bad_request", "message must contain printable text")
        if len(message) > MAX_REASON:
            raise ApiError(400, "bad_request", f"message is limited to {MAX_REASON} characters")
        ids = body.get("ids")
        if ids is None:
            targets = self._registry.ids()  # no snapshot per session to learn their ids
        elif isinstance(ids, list) and all(isinstance(i, str) for i in ids) and len(ids) <= MAX_IDS:
            targets = list(dict.fromkeys(ids))
        else:
            raise ApiError(400, "bad_request", f"ids must be a list of up to {MAX_IDS} session id strings")
        results: dict[str, str] = {}
        for sid in targets:
            shown = self._registry.notify(sid, message)
            results[sid] = "not_found" if shown is None else ("delivered" if shown else "unsupported")
        if self._cluster is not None:
            view = await self._cluster.view()
            if ids is None:  # every session of every node
                for other in view.nodes:
                    if other != self._node:
                        results |= await self._cluster.notice(other, None, message) or {}
            else:
                owners = {str(r.get("id")): str(r.get("node")) for r in await view.sessions()}
                for sid in [s for s, r in results.items() if r == "not_found" and s in owners]:
                    remote = await self._cluster.notice(owners[sid], sid, message)
                    results[sid] = remote.get(sid, "node_unreachable") if remote is not None else "node_unreachable"
        self._audit(request, "notice", session_ids=targets, message=message, results=results)
        return web.json_response({"results": results})

    def _acl(self) -> AccessControl:
        assert self._access_control is not None
        return self._access_control

    async def list_connections(self, request: web.Request) -> web.Response:
        rows = sorted((c.as_dict() for c in self._acl().connections.list()), key=lambda r: r["since"])
        return web.json_response({"connections": rows, "node": self._node})

    async def end_connection(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        body = await self._body(request, required=False)
        reason = self._reason(body)
        conn = self._acl().connections.get(cid)
        ended = self._acl().end_connection(cid, reason or "Your connection was ended by an operator.")
        self._audit(request, "end_connection", connection_id=cid, reason=reason, found=ended is not None)
        if ended is None or conn is None:
            raise ApiError(404, "not_found", "no such connection")
        result = "ending" if ended.connections else "already_ending"
        return web.json_response({"id": cid, "result": result, "sessions_ended": ended.sessions})

    async def list_locks(self, request: web.Request) -> web.Response:
        return web.json_response({"locks": [lk.as_dict() for lk in self._acl().locks.list()]})

    async def add_lock(self, request: web.Request) -> web.Response:
        body = await self._body(request, required=True)
        unknown = set(body) - {"user", "vm", "source", "reason", "expires"}
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field: {sorted(unknown)[0][:64]!r} (allowed: user, vm, source, reason, expires)")
        kinds = [k for k in KINDS if k in body]
        if len(kinds) != 1:
            raise ApiError(400, "bad_request", f"give exactly one of {', '.join(KINDS)}")
        try:
            kind, target = parse_target(kinds[0], body[kinds[0]])
            reason = clean_reason(body.get("reason"))
            expires_at = parse_expires(body.get("expires"), self._clock.now().timestamp())
        except LockError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        op = request[_OPERATOR_KEY]
        try:
            lock, ended = self._acl().lock(kind, target, reason, expires_at, op.name)
        except LockError as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        except OSError as exc:
            self._log.error("lock_not_saved", error=exc.strerror or str(exc))
            raise ApiError(500, "not_saved", "the lock could not be saved to the state dir; nothing changed") from None
        self._audit(request, "lock", lock_id=lock.id, kind=kind, target=target, reason=reason, expires_at=lock.as_dict()["expires_at"])
        answer = {"lock": lock.as_dict(), "sessions_ended": ended.sessions, "connections_ended": ended.connections}
        return web.json_response(answer, status=201)

    async def remove_lock(self, request: web.Request) -> web.Response:
        lock_id = request.match_info["id"]
        op = request[_OPERATOR_KEY]
        try:
            lock = self._acl().unlock(lock_id, op.name)
        except OSError as exc:
            self._log.error("lock_not_saved", error=exc.strerror or str(exc))
            raise ApiError(500, "not_saved", "the locks file could not be written; the lock still holds") from None
        self._audit(request, "unlock", lock_id=lock_id[:64], found=lock is not None)
        if lock is None:
            raise ApiError(404, "not_found", "no such lock")
        return web.json_response({"lock": lock.as_dict()})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: a `snapshot` first, then `opened`, `updated`, `closed` and `progress` as they happen.

        A subscriber that fell behind gets a fresh `snapshot` (never a silent gap). A
        client that goes away ends the stream quietly: a log line, no traceback.
        """
        try:
            sub = self._registry.subscribe()
        except SubscriberLimit as exc:
            raise ApiError(503, "busy", exc.message) from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})

        async def send(data: bytes) -> None:
            # A client that stops reading must not hold its subscription (and our buffers) forever.
            async with asyncio.timeout(SSE_WRITE_DEADLINE):
                await resp.write(data)

        try:
            await resp.prepare(request)
            if self._cluster is not None:
                await self._cluster.events_ready()  # the other nodes' events from before the snapshot on
            await send(await self._snapshot())
            while True:
                try:
                    async with asyncio.timeout(15):
                        ev = await sub.get()
                except TimeoutError:
                    await send(b": keep-alive\n\n")
                    continue
                if ev is None:  # fell behind: the whole state again
                    await send(await self._snapshot(resync=True))
                    continue
                chunk = [self._event_bytes(ev)]
                for more in sub.drain():  # what else is queued goes out in one write
                    chunk.append(self._event_bytes(more))
                await send(b"".join(chunk))
        except StreamEnded:
            self._log.info("event_stream_closed", source_ip=request.remote, reason="gateway_stopping")
        except TimeoutError:
            self._log.info("event_stream_closed", source_ip=request.remote, reason="client_not_reading", limit_s=SSE_WRITE_DEADLINE)
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionError, RuntimeError) as exc:
            # aiohttp raises ClientConnectionResetError (a ConnectionError) or RuntimeError once the peer is gone.
            self._log.info("event_stream_closed", source_ip=request.remote, reason="client_gone", error=type(exc).__name__)
        finally:
            self._registry.unsubscribe(sub)
        return resp

    async def _snapshot(self, *, resync: bool = False) -> bytes:
        rows = [self._view(s) for s in self._registry.list()]
        extra: dict[str, Any] = {}
        if self._cluster is not None:  # every node's sessions, as the list shows them
            view = await self._cluster.view()
            rows.extend(self._remote(r) for r in await view.sessions())
            extra = {"degraded": view.degraded, "nodes": view.nodes}
        return _sse("snapshot", {"sessions": rows, "resync": resync, **extra})

    def _event_bytes(self, ev: SessionEvent) -> bytes:
        if ev.remote is not None:  # another node's event: its session as that node shows it, the duration from here
            data = ev.remote
            row = data.get("session")
            if isinstance(row, dict):
                data = {**data, "session": self._remote(row)}
            return _sse(ev.kind, data)
        if ev.kind == "progress":
            return _sse("progress", {"sessions": [{"id": p.id, "bytes_up": p.bytes_up, "bytes_down": p.bytes_down} for p in ev.progress]})
        assert ev.session is not None
        out: dict[str, Any] = {"session": self._view(ev.session)}
        if ev.reason is not None:
            out["reason"] = str(ev.reason)
        return _sse(ev.kind, out)

    async def cluster_summary(self, request: web.Request) -> web.Response:
        """Nodes, sessions per node, last heartbeats, lost nodes. One node without [cluster] is a cluster of one."""
        if self._cluster is not None:
            return web.json_response(await self._cluster.summary())
        count = self._registry.totals().active
        me = {"node": self._node, "self": True, "sessions": count, "last_heartbeat": iso(self._clock.now()), "age_s": 0.0}
        return web.json_response({"node": self._node, "clustered": False, "degraded": False, "nodes": [me], "sessions": count, "lost": []})

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=_static("index.html"), content_type="text/html", headers=_PAGE_HEADERS)

    async def page_js(self, request: web.Request) -> web.Response:
        return web.Response(body=_static("app.js"), content_type="application/javascript", headers=_PAGE_HEADERS)


_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(name: str) -> bytes:
    return resources.files("gateway.control").joinpath("static", name).read_bytes()


class _Static:
    """A session's row text up to its duration: the fields that never change after open, encoded once, in
    `SessionInfo.as_dict()`'s order, and its bytes and state, encoded again only when they moved."""

    __slots__ = ("down", "ended", "head", "middle", "pending", "started", "started_us", "tail", "text", "up")

    def __init__(self, s: Session) -> None:
        spec = s.spec
        first = {
            "id": s.id,
            "user": spec.user,
            "source_ip": spec.source_ip,
            "source_port": spec.source_port,
            "vm": spec.vm,
            "target_address": spec.target_address,
            "target_port": spec.target_port,
            "protocol": str(spec.protocol),
            "login": spec.login,
            "started_at": iso(s.started_at),
        }  # fmt: skip
        self.started: str = iso(s.started_at)
        self.started_us = _micros(s.started_at)
        self.head = json.dumps(first)[:-1] + ', "bytes_up": '
        self.middle = f', "node": {json.dumps(s.node)}, "state": "'
        self.tail = f', "connection_id": {json.dumps(spec.connection_id)}, "client_name": {json.dumps(spec.client_name)}, "duration_s": '
        # The bytes and state `text` was encoded with (-1: not yet).
        self.up, self.down, self.ended = -1, -1, False
        self.pending: object = None
        self.text = ""

    def row(self, s: Session, now_us: int) -> str:
        """Byte for byte `json.dumps(ControlAPI._view(s.snapshot()))` at the time `now_us` (`_micros(clock.now())`)."""
        up, down, pending, ended = s.bytes_up, s.bytes_down, s.pending, s.ended
        if up != self.up or down != self.down or pending is not self.pending or ended is not self.ended:
            if ended:
                state, ends = "closed", "null"
            elif pending is not None:
                state, ends = "terminating", f'"{iso(pending.ends_at)}"'
            else:
                state, ends = "active", "null"
            self.text = f'{self.head}{up}, "bytes_down": {down}{self.middle}{state}", "ends_at": {ends}{self.tail}'
            self.up, self.down, self.pending, self.ended = up, down, pending, ended
        return f"{self.text}{_duration_text(now_us - self.started_us)}}}"


_STARTED = '"started_at":"'


def _remote_row(line: str, now_us: int) -> tuple[str, str] | None:
    """Another node's row (its compact `SessionInfo.as_dict()` JSON, as it wrote it) as this list shows it:
    (started_at, the row with its duration from its start on this node's clock), without parsing it into a dict
    and encoding it again (25 µs a row, the most of a list where other workers hold half the sessions). None if it
    is not such a row. The first `"started_at":"` is the key: inside a JSON string a quote is always escaped."""
    if not (line.startswith('{"id":') and line.endswith("}")):
        return None
    i = line.find(_STARTED)
    if i < 0:
        return None
    i += len(_STARTED)
    started = line[i : line.find('"', i)]
    try:
        started_us = _micros(datetime.fromisoformat(started.replace("Z", "+00:00")))
    except ValueError:
        return None
    return started, f'{line[:-1]},"duration_s":{_duration_text(now_us - started_us)}}}'


def _parsed(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


# ".0", ".001" ... ".999" without trailing zeros: the fractional part of repr(ms / 1000).
_FRACTION = tuple(f".{ms:03d}".rstrip("0") if ms else ".0" for ms in range(1000))


def _duration_text(us: int) -> str:
    """`repr(round(max(0.0, us / 10**6), 3))` for a duration in integer microseconds, without round()'s and repr's
    cost (about 3 µs a row, most of a 9,000-row list). Away from a tie (`us % 1000 == 500`, left to round()) the
    float's error is far below the microsecond, so rounding the integer milliseconds is rounding the float, and
    the shortest repr of a whole number of milliseconds below 10**15 is its decimal form without trailing zeros.
    (timedelta.total_seconds() is the same integer microseconds over 10**6: the same float.)"""
    if us <= 0:
        return "0.0"
    whole, rest = divmod(us, 1000)
    if rest == 500 or us >= 10**18:
        return repr(round(us / 1_000_000, 3))
    ms = whole + (rest > 500)
    return f"{ms // 1000}{_FRACTION[ms % 1000]}"


class _Turns:
    """When a long loop gives the event loop back: after `LIST_SLICE_S` of work or `LIST_CHUNK` steps, whichever first."""

    __slots__ = ("_since", "_steps")

    def __init__(self) -> None:
        self._since = time.perf_counter()
        self._steps = 0

    def due(self, steps: int = 1) -> bool:
        self._steps += steps
        return self._steps >= LIST_CHUNK or time.perf_counter() - self._since >= LIST_SLICE_S

    async def give_back(self) -> None:
        await asyncio.sleep(0)
        self._since = time.perf_counter()
        self._steps = 0


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(t: datetime) -> int:
    return (t - _EPOCH) // _MICROSECOND


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
