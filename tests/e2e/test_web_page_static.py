"""The web terminal page (gateway/doors/static/web) in Debian's Chromium, against a fake of the backend contract.

The fake serves the real static files with the real CSP and implements /api/me, /api/vms, /logout and a
/ws/terminal that behaves like a tiny shell (echoes keystrokes, runs `echo`), records resize messages, and sends
notice and ended messages when a test asks. No gateway, no VM: this pins the page's logic to the contract.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

pytestmark = pytest.mark.timeout(90)

STATIC = Path(__file__).resolve().parents[2] / "gateway" / "doors" / "static" / "web"
CHROMIUM = "/usr/bin/chromium"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
EVIL_VM = "<b>x</b>"
EVIL_USER = "<img src=x>alice"


@dataclass
class Fake:
    """The backend contract, faked. Tests flip `signed_in`/`oidc` and drive the open terminal socket."""

    signed_in: bool = True
    oidc: bool = True
    vms: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"name": "web01", "logins": ["alice"], "default_login": "alice"},
            {"name": EVIL_VM, "logins": ["root", "<i>y</i>"], "default_login": "<i>y</i>"},
        ]
    )
    logouts: list[str | None] = field(default_factory=list)
    sockets: asyncio.Queue[tuple[web.WebSocketResponse, dict[str, str]]] = field(default_factory=asyncio.Queue)
    received: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    resizes: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    closed: asyncio.Queue[web.WebSocketResponse] = field(default_factory=asyncio.Queue)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/api/me", self.me)
        app.router.add_get("/api/vms", self.list_vms)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/ws/terminal", self.terminal)
        app.router.add_static("/static/web", STATIC)
        app.on_response_prepare.append(self.csp)
        return app

    async def csp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Content-Security-Policy"] = CSP

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def me(self, request: web.Request) -> web.Response:
        if not self.signed_in:
            return web.json_response({"error": "signed_out", "message": "Please sign in.", "oidc": self.oidc}, status=401)
        return web.json_response(
            {"user": EVIL_USER, "groups": ["ops"], "auth_method": "oidc", "expires_at": "2099-01-01T00:00:00Z", "oidc": self.oidc}
        )

    async def list_vms(self, request: web.Request) -> web.Response:
        if not self.signed_in:
            return web.json_response({"error": "signed_out", "message": "Please sign in.", "oidc": self.oidc}, status=401)
        return web.json_response({"vms": self.vms})

    async def logout(self, request: web.Request) -> web.Response:
        self.logouts.append(request.headers.get("X-Requested-With"))
        self.signed_in = False
        return web.Response(status=204)

    async def terminal(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await self.sockets.put((ws, dict(request.query)))
        await ws.send_bytes(b"fake shell\r\n$ ")
        line = b""
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await self.resizes.put(json.loads(msg.data))
            elif msg.type == WSMsgType.BINARY:
                await self.received.put(msg.data)
                for byte in msg.data:
                    if byte == 13:
                        out = b"\r\n" + (line[5:] + b"\r\n" if line.startswith(b"echo ") else b"") + b"$ "
                        line = b""
                    elif byte == 3:
                        out, line = b"^C\r\n$ ", b""
                    else:
                        out, line = bytes([byte]), line + bytes([byte])
                    await ws.send_bytes(out)
        await self.closed.put(ws)
        return ws


@dataclass
class Site:
    fake: Fake
    page: Page
    url: str
    errors: list[str]
    shots: Path

    async def open_terminal(self, vm: str = "web01") -> tuple[web.WebSocketResponse, dict[str, str]]:
        await self.page.locator(f'#vms li[data-vm="{vm}"] button.open').click()
        async with asyncio.timeout(10):
            ws, query = await self.fake.sockets.get()
        await self.page.wait_for_function("() => window.bastionTerminalText().includes('$ ')")
        return ws, query

    async def screen(self) -> str:
        text = await self.page.evaluate("window.bastionTerminalText()")
        assert isinstance(text, str)
        return text

    async def wait_for_line(self, line: str) -> None:
        await self.page.wait_for_function("(want) => window.bastionTerminalText().split('\\n').some((l) => l === want)", arg=line)

    async def received(self, want: bytes) -> None:
        got = b""
        async with asyncio.timeout(10):
            while want not in got:
                got += await self.fake.received.get()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def fake() -> Fake:
    return Fake()


@pytest.fixture
async def site(browser: Browser, fake: Fake, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    scheme = getattr(request, "param", "light")
    page = await browser.new_page(
        viewport={"width": 1000, "height": 640}, color_scheme=scheme, permissions=["clipboard-read", "clipboard-write"]
    )
    errors: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        # Chromium logs every non-2xx answer; a 401 from /api/me is how "signed out" is said.
        expected = "status of 401" in msg.text and msg.location.get("url", "").endswith("/api/me")
        if msg.type == "error" and not expected:
            errors.append(f"{msg.text} ({msg.location.get('url')})")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    url = f"http://127.0.0.1:{server.port}/"
    try:
        yield Site(fake=fake, page=page, url=url, errors=errors, shots=tmp_path)
        # Nothing the page did tripped the CSP or threw (a CSP violation is logged as a console error).
        assert errors == []
    finally:
        await page.close()
        await server.close()


async def test_signed_out_shows_sign_in_with_idp_button_and_ssh_hint(site: Site) -> None:
    """Signed out with OIDC configured: the sign-in view offers the IdP button and the `ssh ... web` command."""
    site.fake.signed_in = False
    await site.page.goto(site.url)
    await expect(site.page.locator("#signin")).to_be_visible()
    button = site.page.get_by_role("link", name="Sign in with your identity provider")
    await expect(button).to_be_visible()
    await expect(button).to_have_attribute("href", "/login/oidc")
    port = site.url.rsplit(":", 1)[1].strip("/")
    await expect(site.page.locator("#signin")).to_contain_text(f"Or run ssh -p {port} USER@127.0.0.1 web for a one-time sign-in link")
    await expect(site.page.locator("#vms")).to_be_hidden()
    await expect(site.page.locator("#signout")).to_be_hidden()
    await site.page.screenshot(path=str(site.shots / "signin.png"))


async def test_signed_out_without_oidc_shows_only_the_ssh_hint(site: Site) -> None:
    """Signed out with no IdP: no IdP button, the `ssh ... web` hint is still there."""
    site.fake.signed_in = False
    site.fake.oidc = False
    await site.page.goto(site.url)
    await expect(site.page.locator("#signin")).to_be_visible()
    await expect(site.page.get_by_role("link", name="Sign in with your identity provider")).to_have_count(0)
    await expect(site.page.locator("#ssh-command")).to_be_visible()
    await expect(site.page.locator("#link-hint")).to_have_text(re.compile(r"^Run ssh -p \d+ USER@127\.0\.0\.1 web for"))


async def test_vm_list_and_user_render_as_text(site: Site) -> None:
    """Signed in: the user name and every VM show literally (HTML in them is text), a login select only where
    there is a choice, preset to the default login."""
    await site.page.goto(site.url)
    await expect(site.page.locator("#user")).to_have_text(EVIL_USER)
    await expect(site.page.locator("#vms li")).to_have_count(2)
    evil = site.page.locator(f'#vms li[data-vm="{EVIL_VM}"]')
    await expect(evil.locator(".name")).to_have_text(EVIL_VM)
    await expect(evil.locator("select")).to_have_value("<i>y</i>")
    await expect(evil.locator("option")).to_have_text(["root", "<i>y</i>"])
    await expect(site.page.locator('#vms li[data-vm="web01"] select')).to_have_count(0)
    await expect(site.page.locator("#vms b, #vms i, header img")).to_have_count(0)
    await expect(site.page.locator("#vms button.open")).to_have_count(2)
    await expect(site.page.locator("#signin")).to_be_hidden()
    await site.page.set_viewport_size({"width": 800, "height": 600})
    await site.page.screenshot(path=str(site.shots / "vms.png"))


async def test_terminal_echoes_typing_and_sends_ctrl_c_and_paste(site: Site) -> None:
    """Open a terminal: the socket carries the VM, login and size; typed `echo hi` + Enter reaches the fake
    shell as UTF-8 bytes and its answer shows on screen; Ctrl-C and a Ctrl-Shift-V paste go to the VM too, and
    Ctrl-Shift-C copies the selection."""
    await site.page.goto(site.url)
    _, query = await site.open_terminal("web01")
    assert query["vm"] == "web01" and query["login"] == "alice"
    assert int(query["cols"]) > 40 and int(query["rows"]) > 10
    await site.page.keyboard.type("echo hi")
    await site.page.keyboard.press("Enter")
    await site.received(b"echo hi\r")
    await site.wait_for_line("hi")
    assert "$ echo hi" in await site.screen()

    await site.page.keyboard.type("sleep 9")
    await site.page.keyboard.press("Control+c")
    await site.received(b"\x03")

    # Paste with the browser's own shortcut (xterm turns the paste event into input), copy with Ctrl-Shift-C.
    await site.page.evaluate("navigator.clipboard.writeText('echo pasted-é')")
    await site.page.keyboard.press("Control+Shift+V")
    await site.page.keyboard.press("Enter")
    await site.received("echo pasted-é\r".encode())
    await site.wait_for_line("pasted-é")
    box = await site.page.locator("#terminal .xterm-screen").bounding_box()
    assert box is not None
    await site.page.mouse.move(box["x"] + 1, box["y"] + 8)
    await site.page.mouse.down()
    await site.page.mouse.move(box["x"] + 200, box["y"] + 8)
    await site.page.mouse.up()
    await site.page.keyboard.press("Control+Shift+C")
    await site.page.wait_for_function("async () => (await navigator.clipboard.readText()).startsWith('fake shell')")
    await site.page.screenshot(path=str(site.shots / "terminal.png"))


async def test_resizing_the_window_sends_the_new_size(site: Site) -> None:
    """Shrinking the window refits the terminal and sends a resize message with the new, smaller size."""
    await site.page.goto(site.url)
    _, query = await site.open_terminal()
    await site.page.set_viewport_size({"width": 800, "height": 480})
    async with asyncio.timeout(10):
        msg = await site.fake.resizes.get()
    assert msg["type"] == "resize"
    assert 0 < msg["cols"] < int(query["cols"]) and 0 < msg["rows"] < int(query["rows"])
    rows = await site.page.evaluate("window.bastionTerminalText().split('\\n').length")
    assert rows == msg["rows"]


@pytest.mark.parametrize("site", ["dark"], indirect=True)
async def test_notice_shows_a_banner_without_taking_the_keyboard(site: Site) -> None:
    """A notice shows as a dismissable banner (as text) while typing still reaches the VM; dark theme."""
    await site.page.goto(site.url)
    ws, _ = await site.open_terminal()
    await site.page.keyboard.type("ec")
    await ws.send_str(json.dumps({"type": "notice", "message": "<b>Maintenance</b> in 5 minutes"}))
    banner = site.page.locator("#banner")
    await expect(banner).to_be_visible()
    await expect(banner).to_have_attribute("data-kind", "notice")
    await expect(banner).to_contain_text("<b>Maintenance</b> in 5 minutes")
    await site.page.keyboard.type("ho still-typing")
    await site.page.keyboard.press("Enter")
    await site.wait_for_line("still-typing")
    await site.page.screenshot(path=str(site.shots / "notice.png"))
    await banner.get_by_role("button", name="Dismiss notice").click()
    await expect(banner).to_be_hidden()
    await site.page.keyboard.type("echo back")
    await site.page.keyboard.press("Enter")
    await site.wait_for_line("back")


async def test_ended_banner_stays_after_the_socket_closes(site: Site) -> None:
    """The server's `ended` message shows a banner that stays after it closes the socket; its button leads
    back to the VM list."""
    await site.page.goto(site.url)
    ws, _ = await site.open_terminal()
    text = "You have been disconnected. Maintenance window"
    await ws.send_str(json.dumps({"type": "ended", "message": text, "reason": "terminated_by_operator"}))
    await ws.close(code=4000, message=b"terminated_by_operator")
    await expect(site.page.locator("#term-state")).to_have_text("Disconnected")
    banner = site.page.locator("#banner")
    await expect(banner).to_be_visible()
    await expect(banner).to_have_attribute("data-kind", "ended")
    await expect(banner).to_contain_text(text)
    await expect(banner).not_to_contain_text("connection to the gateway was lost")
    back = banner.get_by_role("button", name="Back to the VM list")
    await expect(back).to_be_focused()
    await site.page.screenshot(path=str(site.shots / "ended.png"))
    await back.click()
    await expect(site.page.locator("#vms li")).to_have_count(2)
    await expect(banner).to_be_hidden()


async def test_a_close_without_ended_says_the_connection_was_lost(site: Site) -> None:
    """A socket that closes without an `ended` message shows the close code in a persistent banner."""
    await site.page.goto(site.url)
    ws, _ = await site.open_terminal()
    await ws.close(code=1011)
    banner = site.page.locator("#banner")
    await expect(banner).to_have_attribute("data-kind", "ended")
    await expect(banner).to_contain_text("The connection to the gateway was lost (code 1011)")


async def test_sign_out_returns_to_sign_in(site: Site) -> None:
    """Sign out from an open terminal: the socket closes, the POST carries X-Requested-With, the sign-in view
    comes back."""
    await site.page.goto(site.url)
    ws, _ = await site.open_terminal()
    await site.page.locator("#signout").click()
    await expect(site.page.locator("#signin")).to_be_visible()
    assert site.fake.logouts == ["bastion"]
    async with asyncio.timeout(10):
        assert await site.fake.closed.get() is ws
    await expect(site.page.locator("#terminal")).to_be_hidden()
    await expect(site.page.locator("#user")).to_have_text("")
