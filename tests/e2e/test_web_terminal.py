"""The browser terminal's backend with a plain HTTP client: the one-time link from `ssh alice@gw web`, the cookie,
the VM list, a PTY shell on the real sshd over the WebSocket, resizing, a notice, an operator's disconnect, and
everything refused that should be (no cookie, another origin, a spent link, a VM not granted, a signed-out
cookie). The page itself is tested in Chromium by test_web_page*.py."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import OPERATOR_TOKEN, Gateway, wait_for


@dataclass
class Browser:
    gw: Gateway
    http: aiohttp.ClientSession
    ctx: ssl.SSLContext

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.gw.port}"

    @property
    def origin(self) -> dict[str, str]:
        return {"Origin": self.base}

    async def sign_in(self) -> None:
        r = await self.gw.ssh("alice", "web")
        assert r.rc == 0, r.errtext
        link = r.text.strip()
        assert link.startswith(self.base + "/login/link?t=")
        async with self.http.get(link, ssl=self.ctx, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/"
            cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.base + path, ssl=self.ctx) as resp:
            return resp.status, await resp.json(content_type=None)

    async def terminal(self, vm: str = "web01", **extra: str) -> aiohttp.ClientWebSocketResponse:
        query = "&".join(f"{k}={v}" for k, v in {"vm": vm, "cols": "100", "rows": "30", **extra}.items())
        return await self.http.ws_connect(f"wss://127.0.0.1:{self.gw.port}/ws/terminal?{query}", ssl=self.ctx, headers=self.origin)


@pytest.fixture
async def browser(gw: Gateway) -> AsyncIterator[Browser]:
    # Secure cookies are kept for https://127.0.0.1 only with an unsafe jar (an IP address, not a domain).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield Browser(gw, http, ssl.create_default_context(cafile=str(gw.ca_file)))


async def read_until(ws: aiohttp.ClientWebSocketResponse, needle: str, timeout: float = 15) -> tuple[str, list[dict[str, Any]]]:
    """Terminal text until `needle` shows (and the control messages seen on the way)."""
    text, controls = "", []
    async with asyncio.timeout(timeout):
        while needle not in text:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                text += msg.data.decode(errors="replace")
            elif msg.type == aiohttp.WSMsgType.TEXT:
                controls.append(json.loads(msg.data))
            else:
                raise AssertionError(f"the terminal closed before {needle!r}: {msg.type} {text[-300:]!r} {controls}")
    return text, controls


async def test_sign_in_with_a_link_and_use_a_shell(browser: Browser) -> None:
    """The link signs alice in (once); /api/me and /api/vms say who she is and what she may open; the terminal is a PTY
    shell of the requested size on the VM, resizes, and is an ssh-web session with her source and the login."""
    await browser.sign_in()
    status, me = await browser.get("/api/me")
    assert status == 200 and me["user"] == "alice" and me["auth_method"] == "link" and "ops" in me["groups"]
    status, vms = await browser.get("/api/vms")
    assert status == 200 and [v["name"] for v in vms["vms"]] == ["web01", "bad01"]  # what her ssh rule grants, no more
    ws = await browser.terminal()
    try:
        await ws.send_bytes(b"stty size; echo hel''lo-$((6*7))\r")
        text, _ = await read_until(ws, "hello-42")
        assert "30 100" in text
        [live] = browser.gw.app.registry.list()
        assert (live.protocol, live.user, live.vm, live.source_ip, live.login) == (
            "ssh-web",
            "alice",
            "web01",
            "127.0.0.1",
            browser.gw.vm.login,
        )
        await ws.send_str(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
        await ws.send_bytes(b"stty size\r")
        await read_until(ws, "40 120")
        await ws.send_bytes(b"exit\r")
        async with asyncio.timeout(15):
            while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                pass
    finally:
        await ws.close()
    await wait_for(lambda: bool(browser.gw.logs.events("session_closed")), browser.gw.logs.changed)
    [closed] = browser.gw.logs.events("session_closed")
    assert closed["protocol"] == "ssh-web" and closed["reason"] == "vm_closed"


async def test_an_operator_disconnect_is_shown_in_the_terminal(browser: Browser) -> None:
    """A notice arrives as a banner message; an operator's disconnect arrives as `ended` with the reason, then the
    close (4001); the session's reason is terminated_by_operator."""
    await browser.sign_in()
    ws = await browser.terminal()
    try:
        await ws.send_bytes(b"echo ready-$((1+1))\r")
        await read_until(ws, "ready-2")
        [live] = browser.gw.app.registry.list()
        ctx = browser.ctx
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        async with browser.http.post(browser.gw.control_url + "/v1/notices", json={"message": "lunch"}, headers=headers, ssl=ctx) as r:
            assert (await r.json())["results"] == {live.id: "delivered"}
        async with browser.http.delete(
            browser.gw.control_url + f"/v1/sessions/{live.id}", json={"reason": "kernel update"}, headers=headers, ssl=ctx
        ) as r:
            assert r.status == 200
        controls: list[dict[str, Any]] = []
        async with asyncio.timeout(15):
            while (msg := await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                if msg.type == aiohttp.WSMsgType.TEXT:
                    controls.append(json.loads(msg.data))
        assert {"type": "notice", "message": "[bastion] lunch"} in controls
        assert controls[-1]["type"] == "ended" and controls[-1]["message"] == "[bastion] You have been disconnected. kernel update"
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4001  # the close frame's code
    finally:
        await ws.close()
    await wait_for(lambda: bool(browser.gw.logs.events("session_closed")), browser.gw.logs.changed)
    assert browser.gw.logs.events("session_closed")[0]["reason"] == "terminated_by_operator"


async def test_what_is_refused(browser: Browser) -> None:
    """No cookie: 401 and no dial. Another origin: 403. A spent link: 401. A VM not granted: 403 before any dial.
    After sign-out the cookie is worthless and the open terminal ends."""
    gw = browser.gw
    status, _ = await browser.get("/api/me")
    assert status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await browser.terminal()
    assert e.value.status == 401
    r = await gw.ssh("alice", "web")
    link = r.text.strip()
    async with browser.http.get(link, ssl=browser.ctx, allow_redirects=False) as resp:
        assert resp.status == 303
    async with browser.http.get(link, ssl=browser.ctx, allow_redirects=False) as resp:
        assert resp.status == 401  # a link works once
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await browser.http.ws_connect(
            f"wss://127.0.0.1:{gw.port}/ws/terminal?vm=web01", ssl=browser.ctx, headers={"Origin": "https://evil.example"}
        )
    assert e.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await browser.terminal("web02")
    assert e.value.status == 403
    assert not gw.logs.events("session_opened")
    ws = await browser.terminal()
    try:
        await ws.send_bytes(b"echo up-$((2+2))\r")
        await read_until(ws, "up-4")
        async with browser.http.post(f"{browser.base}/logout", ssl=browser.ctx, headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 403
        async with browser.http.post(f"{browser.base}/logout", ssl=browser.ctx, headers=browser.origin) as resp:
            assert resp.status == 204
        async with asyncio.timeout(15):
            while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                pass
    finally:
        await ws.close()
    status, _ = await browser.get("/api/me")
    assert status == 401
