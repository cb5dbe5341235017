"""Authenticated connections are first-class: operators list them (SSH and WebSocket), end one with a reason the
user reads, and an SSH connection that holds no channel ends after `ssh.idle_connection_timeout`."""

from __future__ import annotations

import asyncio
import ssl
import time
from asyncio.subprocess import PIPE
from typing import Any

import aiohttp
import jsonschema

from gateway.control.openapi import OPENAPI
from tests.e2e.conftest import VIEWER_TOKEN, Gateway, GatewayFactory, wait_for
from tests.support.hostile import control
from tests.support.peers import free_port


def check(name: str, body: Any) -> None:
    jsonschema.validate(body, {"$ref": f"#/components/schemas/{name}", "components": OPENAPI["components"]})


async def test_list_and_end_an_ssh_connection(gw: Gateway) -> None:
    """One `ssh alice@gw -N -L ...` connection (a listening forward, no channel yet): the list shows who, from where,
    how, and no channel; a viewer may not end it; an operator does, and ssh exits printing the operator's reason."""
    proc = await asyncio.create_subprocess_exec(
        *gw.ssh_argv("alice", "-N", "-L", f"127.0.0.1:{free_port()}:web01:{gw.vm.port}"), stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    try:
        await wait_for(lambda: len(gw.app.connections.list()) == 1, gw.logs.changed)
        status, body = await control(gw, "GET", "/v1/connections", token=VIEWER_TOKEN)
        assert status == 200
        [row] = body["connections"]
        check("Connection", row)
        assert (row["user"], row["source_ip"], row["door"], row["auth_method"], row["channels"]) == (
            "alice",
            "127.0.0.1",
            "ssh",
            "publickey",
            0,
        )
        status, _ = await control(gw, "DELETE", f"/v1/connections/{row['id']}", {"reason": "rotating keys"}, token=VIEWER_TOKEN)
        assert status == 403
        status, answer = await control(gw, "DELETE", f"/v1/connections/{row['id']}", {"reason": "rotating keys"})
        assert status == 200 and answer["result"] == "ending", answer
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
        assert proc.returncode == 255
        assert "rotating keys" in err.decode(), err.decode()[-500:]
        await wait_for(lambda: not gw.app.connections.list(), gw.logs.changed)
        status, answer = await control(gw, "DELETE", f"/v1/connections/{row['id']}", {})
        assert status == 404
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sessions_name_their_connection_and_channels_are_counted(gw: Gateway) -> None:
    """A shell session's `connection_id` is the listed SSH connection, whose channel count is 1 while it is open."""
    proc = await asyncio.create_subprocess_exec(*gw.ssh_argv("alice+web01"), "cat", stdin=PIPE, stdout=PIPE, stderr=PIPE)
    try:
        await wait_for(lambda: bool(gw.app.registry.list()), gw.logs.changed)
        [session] = gw.app.registry.list()
        [conn] = gw.app.connections.list()
        assert session.connection_id == conn.id and conn.channels == 1 and conn.idle_s == 0
        assert proc.stdin is not None
        proc.stdin.close()
        async with asyncio.timeout(20):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_an_idle_connection_ends_after_the_timeout(make_gateway: GatewayFactory) -> None:
    """With idle_connection_timeout = 1s, `ssh -N alice@gw` (no channel at all) is ended with a message saying why,
    while a connection that holds a shell is not."""

    def edit(c: dict[str, Any]) -> None:
        c["ssh"]["idle_connection_timeout"] = "1s"

    async with make_gateway(edit) as gw:
        busy = await asyncio.create_subprocess_exec(*gw.ssh_argv("alice+web01"), "cat", stdin=PIPE, stdout=PIPE, stderr=PIPE)
        try:
            await wait_for(lambda: bool(gw.app.registry.list()), gw.logs.changed)
            t0 = time.monotonic()
            r = await gw.ssh("alice", opts=("-N",), timeout=20)
            took = time.monotonic() - t0
            assert r.rc == 255 and "idle connection timeout" in r.errtext, r.errtext
            assert took < 10  # the limit is 1 s; generous for a shared machine
            [line] = gw.logs.events("connection_idle_timeout")
            assert line["user"] == "alice" and line["limit_s"] == 1.0
            assert busy.returncode is None and len(gw.app.registry.list()) == 1
        finally:
            busy.kill()
            await busy.wait()


async def test_websocket_tunnels_are_listed_as_connections(make_gateway: GatewayFactory) -> None:
    """A WebSocket tunnel is one connection (door websocket, auth token) while it lasts; ending it ends its session."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def edit(c: dict[str, Any]) -> None:
        c["vms"].append({"name": "echo01", "address": "127.0.0.1", "trust_on_first_use": True})
        c["rules"].append({"users": ["alice"], "vms": ["echo01"], "protocols": ["tcp"], "ports": [port]})

    try:
        async with make_gateway(edit) as gw:
            token = (await gw.ssh("alice", "token")).text.strip()
            ctx = ssl.create_default_context(cafile=str(gw.ca_file))
            url = f"wss://127.0.0.1:{gw.port}/v1/tunnel?vm=echo01&port={port}"
            async with aiohttp.ClientSession() as http, http.ws_connect(url, headers={"Authorization": f"Bearer {token}"}, ssl=ctx) as ws:
                await wait_for(lambda: any(c.door == "websocket" for c in gw.app.connections.list()), gw.logs.changed)
                [conn] = [c for c in gw.app.connections.list() if c.door == "websocket"]
                assert (conn.user, conn.auth_method, conn.channels) == ("alice", "token", 1)
                status, answer = await control(gw, "DELETE", f"/v1/connections/{conn.id}", {"reason": "bye"})
                assert status == 200 and answer["sessions_ended"] == 1
                async with asyncio.timeout(20):
                    msg = await ws.receive()
                    while msg.type == aiohttp.WSMsgType.TEXT:
                        msg = await ws.receive()
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            await wait_for(lambda: bool(gw.logs.events("session_closed")), gw.logs.changed)
            assert gw.logs.events("session_closed")[0]["reason"] == "terminated_by_operator"
    finally:
        server.close()
        await server.wait_closed()
