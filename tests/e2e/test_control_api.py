"""The control port's API against a live gateway with real SSH sessions, checked against its OpenAPI document."""

from __future__ import annotations

import asyncio
import gc
import json
import ssl
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonschema
import pytest

from gateway.control.openapi import OPENAPI
from tests.e2e.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, Gateway, GatewayFactory


def schema(name: str) -> dict[str, Any]:
    """A component schema with its $refs resolvable."""
    return {"$ref": f"#/components/schemas/{name}", "components": OPENAPI["components"]}


def check(name: str, body: Any) -> None:
    jsonschema.validate(body, schema(name))


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a Server-Sent Events response, as they arrive."""
    kind, data = "", ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif not line and data:
            yield kind, json.loads(data)
            kind, data = "", ""


class Api:
    def __init__(self, gw: Gateway, http: aiohttp.ClientSession) -> None:
        self.gw = gw
        self.http = http
        self.ssl = ssl.create_default_context(cafile=str(gw.ca_file))

    async def call(self, method: str, path: str, token: str | None = OPERATOR_TOKEN, **kw: Any) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, self.gw.control_url + path, headers=headers, ssl=self.ssl, **kw) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except json.JSONDecodeError:
                return resp.status, text


@pytest.fixture
async def api(gw: Gateway) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as http:
        yield Api(gw, http)


class Live:
    """`ssh alice+web01@gw cat`: a session that stays open until closed."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.proc: asyncio.subprocess.Process | None = None
        self.id = ""

    async def __aenter__(self) -> Live:
        events = self.gw.app.registry.subscribe()
        self.proc = await asyncio.create_subprocess_exec(*self.gw.ssh_argv("alice+web01"), "cat", stdin=PIPE, stdout=PIPE, stderr=PIPE)
        async with asyncio.timeout(20):
            while True:
                ev = await events.get()
                if ev is not None and ev.kind == "opened":
                    self.id = ev.session.id
                    break
        self.gw.app.registry.unsubscribe(events)
        return self

    async def finish(self) -> tuple[int, str]:
        assert self.proc is not None
        async with asyncio.timeout(20):
            _, err = await self.proc.communicate()
        assert self.proc.returncode is not None
        return self.proc.returncode, err.decode()

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def test_list_get_and_filters(gw: Gateway, api: Api) -> None:
    """GET /v1/sessions lists the live session with every field; filters and GET by id agree; unknown ids are 404."""
    async with Live(gw) as live:
        status, body = await api.call("GET", "/v1/sessions")
        assert status == 200
        check("SessionList", body)
        [row] = body["sessions"]
        assert (row["id"], row["user"], row["vm"], row["protocol"], row["state"]) == (live.id, "alice", "web01", "ssh", "active")
        assert row["started_at"].endswith("Z") and row["duration_s"] >= 0
        for query, expected in (("?user=alice", 1), ("?user=bob", 0), ("?vm=web01", 1), ("?protocol=ssh-jump", 0), ("?protocol=ssh", 1)):
            status, body = await api.call("GET", "/v1/sessions" + query)
            assert status == 200 and len(body["sessions"]) == expected, query
        status, one = await api.call("GET", f"/v1/sessions/{live.id}", token=VIEWER_TOKEN)
        assert status == 200
        check("Session", one)
        status, missing = await api.call("GET", "/v1/sessions/nope")
        assert status == 404
        check("Error", missing)
        status, bad = await api.call("GET", "/v1/sessions?colour=red")
        assert status == 400 and "colour" in bad["message"]
        status, bad = await api.call("GET", "/v1/sessions?protocol=bogus")
        assert status == 400 and "'bogus'" in bad["message"] and "ssh-jump" in bad["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/sessions"),
        ("GET", "/v1/sessions/x"),
        ("DELETE", "/v1/sessions/x"),
        ("POST", "/v1/sessions/disconnect"),
        ("POST", "/v1/notices"),
        ("GET", "/v1/events"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/metrics"),
    ],
)
async def test_every_route_needs_a_valid_token(gw: Gateway, api: Api, method: str, path: str) -> None:
    """No token or a wrong token gets 401 (with WWW-Authenticate) on every route but health."""
    for token in (None, "wrong-token"):
        status, body = await api.call(method, path, token=token)
        assert status == 401, (token, body)
        check("Error", body)
    assert gw.logs.events("control_auth_failed")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("DELETE", "/v1/sessions/x", None),
        ("POST", "/v1/sessions/disconnect", {"ids": ["x"]}),
        ("POST", "/v1/notices", {"message": "hi"}),
    ],
)
async def test_viewer_cannot_act(gw: Gateway, api: Api, method: str, path: str, body: Any) -> None:
    """A viewer's token reads but gets 403 on every mutating route, before any handler runs."""
    async with Live(gw) as live:
        status, answer = await api.call(method, path.replace("/x", f"/{live.id}"), token=VIEWER_TOKEN, json=body)
        assert status == 403
        check("Error", answer)
        assert gw.app.registry.get(live.id) is not None
    assert not gw.logs.events("operator_action")


async def test_health_needs_no_token(api: Api) -> None:
    """/healthz and /readyz answer without a token."""
    for path, expected in (("/healthz", "ok"), ("/readyz", "ready")):
        status, body = await api.call("GET", path, token=None)
        assert status == 200 and body["status"] == expected


async def test_delete_ends_the_session_with_the_notice_and_is_idempotent(gw: Gateway, api: Api) -> None:
    """DELETE with a reason ends the session; the user reads it; a repeat is a harmless 404; it is audit-logged."""
    async with Live(gw) as live:
        status, body = await api.call("DELETE", f"/v1/sessions/{live.id}", json={"reason": "rotating keys"})
        assert status == 200
        check("DisconnectResult", body)
        assert body == {"id": live.id, "result": "disconnected"}
        assert gw.app.registry.get(live.id) is None  # gone by the time the API answered
        rc, err = await live.finish()
        assert rc == 255 and "You have been disconnected. rotating keys" in err
        status, again = await api.call("DELETE", f"/v1/sessions/{live.id}")
        assert status == 404 and again["error"] == "not_found"
    [audit, *_] = gw.logs.events("operator_action")
    assert (audit["operator"], audit["role"], audit["action"], audit["reason"]) == ("noc", "operator", "disconnect", "rotating keys")
    assert audit["session_ids"] == [live.id] and audit["results"] == {live.id: "disconnected"} and audit["source_ip"] == "127.0.0.1"


async def test_bulk_disconnect_answers_per_id(gw: Gateway, api: Api) -> None:
    """POST /v1/sessions/disconnect with live, unknown and repeated ids answers per id."""
    async with Live(gw) as a, Live(gw) as b:
        status, body = await api.call("POST", "/v1/sessions/disconnect", json={"ids": [a.id, "missing", b.id, a.id], "reason": "bulk"})
        assert status == 200
        check("BulkResults", body)
        assert body["results"] == {a.id: "disconnected", "missing": "not_found", b.id: "disconnected"}
        assert not gw.app.registry.list()
        status, body = await api.call("POST", "/v1/sessions/disconnect", json={"ids": [a.id]})
        assert body["results"] == {a.id: "not_found"}


async def test_grace_period_keeps_the_session_until_it_ends(gw: Gateway, api: Api) -> None:
    """With grace_s the API answers `pending` with ends_at at once; the session shows terminating until then."""
    async with Live(gw) as live:
        status, body = await api.call("DELETE", f"/v1/sessions/{live.id}", json={"reason": "soon", "grace_s": 1.5})
        assert status == 200 and body["result"] == "pending"
        s = gw.app.registry.get(live.id)
        assert s is not None and s.state == "terminating"
        assert s.ends_at is not None and body["ends_at"] == s.ends_at.isoformat().replace("+00:00", "Z")
        status, shown = await api.call("GET", f"/v1/sessions/{live.id}")
        assert shown["state"] == "terminating" and shown["ends_at"] == body["ends_at"]
        rc, err = await live.finish()
        assert "You will be disconnected in 2 seconds: soon" in err
        assert "You have been disconnected. soon" in err
        assert rc == 255


async def test_notices_reach_live_sessions(gw: Gateway, api: Api) -> None:
    """POST /v1/notices writes into live sessions (all of them without ids) and answers per id."""
    async with Live(gw) as live:
        status, body = await api.call("POST", "/v1/notices", json={"message": "Maintenance at 18:00"})
        assert status == 200
        check("NoticeResults", body)
        assert body["results"] == {live.id: "delivered"}
        hostile = "\x1b]0;pwned\x07again\x1b[2J \u202eevil"  # a title-setting OSC, a screen clear, a bidi override
        status, body = await api.call("POST", "/v1/notices", json={"message": hostile, "ids": [live.id, "gone"]})
        assert body["results"] == {live.id: "delivered", "gone": "not_found"}
        assert gw.app.registry.get(live.id) is not None
        assert live.proc is not None and live.proc.stdin is not None
        live.proc.stdin.close()
        rc, err = await live.finish()
        assert rc == 0
        assert "Maintenance at 18:00" in err and "]0;pwnedagain[2J evil" in err
        assert "\x1b" not in err and "\u202e" not in err and "\x07" not in err


@pytest.mark.parametrize(
    ("method", "path", "payload", "fragment"),
    [
        ("POST", "/v1/sessions/disconnect", b"{not json", "not valid JSON"),
        ("POST", "/v1/sessions/disconnect", b"[1,2]", "JSON object"),
        ("POST", "/v1/sessions/disconnect", b'{"ids": "abc"}', "ids must be"),
        ("POST", "/v1/sessions/disconnect", b'{"ids": []}', "ids must be"),
        ("POST", "/v1/sessions/disconnect", b'{"ids": ["a"], "grace_s": -1}', "grace_s"),
        ("POST", "/v1/sessions/disconnect", b'{"ids": ["a"], "grace_s": true}', "grace_s"),
        ("POST", "/v1/sessions/disconnect", b'{"ids": ["a"], "reason": 5}', "reason"),
        ("DELETE", "/v1/sessions/a", b'{"reason": "' + b"x" * 401 + b'"}', "400 characters"),
        ("POST", "/v1/notices", b"{}", "message"),
        ("POST", "/v1/notices", b'{"message": "hi", "ids": "x"}', "ids must be"),
        ("POST", "/v1/notices", b'{"message": "\\u001b\\u009b\\u202e"}', "printable text"),
        ("POST", "/v1/sessions/disconnect", b"[" * 15000, "nested too deeply"),  # once a RecursionError and a 500
    ],
)
async def test_bad_requests_get_400_naming_the_problem(api: Api, method: str, path: str, payload: bytes, fragment: str) -> None:
    """Malformed bodies get 400 with a JSON error that names what is wrong."""
    status, body = await api.call(method, path, data=payload, headers={"Content-Type": "application/json"})
    assert status == 400, body
    check("Error", body)
    assert fragment in body["message"]


async def test_large_bodies_get_413(api: Api) -> None:
    """Bodies over the small limit are refused with 413 and a JSON error."""
    status, body = await api.call("POST", "/v1/notices", data=b'{"message": "' + b"x" * 100_000 + b'"}')
    assert status == 413
    check("Error", body)


async def test_openapi_document_is_served(api: Api, gw: Gateway) -> None:
    """The OpenAPI document is served and describes exactly the routes the API answers, method by method, and
    marks as public exactly the routes that need no token."""
    status, body = await api.call("GET", "/v1/openapi.json", token=VIEWER_TOKEN)
    assert status == 200 and body["openapi"].startswith("3.")
    assert gw.app._api is not None
    served = {(m.lower(), path) for (m, path) in gw.app._api._routes}
    documented = {(m, path) for path, item in body["paths"].items() for m in item if m in {"get", "post", "delete", "put", "patch"}}
    assert documented == served
    public = {(m.lower(), path) for (m, path), route in gw.app._api._routes.items() if route.role is None}
    public_documented = {
        (m, path) for path, item in body["paths"].items() for m, op in item.items() if isinstance(op, dict) and op.get("security") == []
    }
    assert public_documented == public


async def test_whoami_and_cluster_answers_match_the_document(api: Api) -> None:
    """/v1/whoami and /v1/cluster (one node: a cluster of one) answer as the document says."""
    status, body = await api.call("GET", "/v1/whoami", token=VIEWER_TOKEN)
    assert status == 200
    jsonschema.validate(body, OPENAPI["paths"]["/v1/whoami"]["get"]["responses"]["200"]["content"]["application/json"]["schema"])
    status, body = await api.call("GET", "/v1/cluster", token=VIEWER_TOKEN)
    assert status == 200 and body["clustered"] is False
    jsonschema.validate(body, OPENAPI["paths"]["/v1/cluster"]["get"]["responses"]["200"]["content"]["application/json"]["schema"])


async def test_events_stream_follows_a_real_session(gw: Gateway, api: Api) -> None:
    """GET /v1/events sends a snapshot, then opened and closed events for a session as it happens."""
    headers = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    async with api.http.get(gw.control_url + "/v1/events", headers=headers, ssl=api.ssl) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")

        stream = sse_events(resp)

        async def next_event() -> tuple[str, dict[str, Any]]:
            async with asyncio.timeout(20):
                return await anext(stream)

        kind, snap = await next_event()
        assert kind == "snapshot" and snap["sessions"] == []
        r = await gw.ssh("alice+web01", "echo via-events")
        assert r.rc == 0
        kind, opened = await next_event()
        assert kind == "opened"
        check("Session", opened["session"])
        assert opened["session"]["vm"] == "web01"
        kind, closed = await next_event()
        assert kind == "closed" and closed["session"]["id"] == opened["session"]["id"] and closed["reason"] == "vm_closed"


async def test_event_stream_delivers_every_event_of_a_1000_session_burst(gw: Gateway, api: Api) -> None:
    """1,000 sessions opened and then closed in one burst: an SSE client over HTTPS reads every opened and closed
    event (no resync, no gap), and progress arrives as coalesced events, not one per session."""
    from gateway.kinds import Protocol, Reason
    from gateway.sessions.model import SessionSpec

    headers = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    counts: dict[str, int] = {}
    ids: dict[str, set[str]] = {"opened": set(), "closed": set()}
    async with api.http.get(gw.control_url + "/v1/events", headers=headers, ssl=api.ssl) as resp:
        assert resp.status == 200

        async def read_until_all_closed() -> None:
            async for kind, body in sse_events(resp):
                counts[kind] = counts.get(kind, 0) + 1
                if kind in ids:
                    ids[kind].add(body["session"]["id"])
                assert not (kind == "snapshot" and body.get("resync")), "the stream fell behind"
                if len(ids["closed"]) == 1000:
                    return

        reader = asyncio.create_task(read_until_all_closed())
        release, all_open = asyncio.Event(), asyncio.Event()
        opened = 0

        async def one(i: int) -> None:
            nonlocal opened
            spec = SessionSpec(f"user{i}", "127.0.0.1", 40000 + i, "web01", "127.0.0.1", 22, Protocol.SSH, "root")
            async with gw.app.registry.open(spec) as session:
                opened += 1
                if opened == 1000:
                    all_open.set()
                session.add_up(i)
                await release.wait()
                session.end(Reason.CLIENT_CLOSED)

        # The stream subscribed before its headers were sent, so every session below arrives as an event.
        sessions = [asyncio.create_task(one(i)) for i in range(1000)]
        async with asyncio.timeout(30):
            await all_open.wait()
        gw.app.registry.publish_progress()
        release.set()
        await asyncio.gather(*sessions)
        async with asyncio.timeout(30):
            await reader
    assert len(ids["opened"]) == 1000 and ids["opened"] == ids["closed"]
    assert counts.get("progress", 0) <= 5 and counts["snapshot"] == 1


async def test_start_freezes_what_it_built(make_gateway: GatewayFactory) -> None:
    """Once the gateway serves, what start-up built is frozen: a full collection never walks it again."""
    gc.unfreeze()  # what earlier tests' gateways froze
    assert gc.get_freeze_count() == 0
    try:
        async with make_gateway():
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
