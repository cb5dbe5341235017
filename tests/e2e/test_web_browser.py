"""The browser path end to end: Debian's Chromium (Playwright, headless) against the real gateway in-process and
the real sshd VM. Sign-in with the one-time link printed by `ssh alice@gw web`, the VM list, the cookie's flags,
a terminal on web01 (typing, resizing, a full-screen program), an operator's disconnect and a broadcast notice
as banners, and what must be refused (a WebSocket from another origin, a VM the user was not granted).

The full-screen program is `vi` (Debian's vim.basic on this machine, which the sshd VM shares). The page is
tested against a fake backend in test_web_page_static.py and the backend with aiohttp in test_web_terminal.py;
this file checks that the two meet. Screenshots land in tmp_path: signed_out.png, vms.png, terminal.png, ended.png.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.e2e import test_web_page_static
from tests.e2e.conftest import OPERATOR_TOKEN, Gateway, wait_for

pytestmark = pytest.mark.timeout(60)
chromium = test_web_page_static.browser  # the Chromium launch fixture, reused (pytest names it `chromium` here)

TIMEOUT_MS = 15_000
# Open a WebSocket from the page's own context and say whether it opened (and how it closed).
PROBE_WS = """(url) => new Promise((resolve) => {
  const ws = new WebSocket(url);
  ws.onopen = () => { ws.close(); resolve({ opened: true, code: null }); };
  ws.onclose = (ev) => resolve({ opened: false, code: ev.code });
})"""
# The last line on the terminal's screen with something on it.
LAST_LINE = "window.bastionTerminalText().split('\\n').map((l) => l.trimEnd()).filter(Boolean).pop()"
# The groups of `re` (multi-line) matched against the terminal's screen, once it matches.
MATCH_SCREEN = """(re) => {
  const m = window.bastionTerminalText().match(new RegExp(re, "m"));
  return m ? m.slice(1) : null;
}"""


def base(gw: Gateway) -> str:
    return f"https://127.0.0.1:{gw.port}"


@asynccontextmanager
async def new_page(browser: Browser, **kw: Any) -> AsyncIterator[tuple[BrowserContext, Page]]:
    context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1000, "height": 640}, **kw)
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield context, page
        assert errors == []
    finally:
        await context.close()


async def web_link(gw: Gateway, user: str = "alice") -> str:
    if user == "alice":
        r = await gw.ssh("alice", "web")
    else:
        r = await gw.run(*gw.ssh_argv_keys(user, getattr(gw.keys, user).private), "web")
    assert r.rc == 0, r.errtext
    link = r.text.strip()
    assert link.startswith(base(gw) + "/login/link?t="), link
    return link


async def sign_in(gw: Gateway, page: Page, user: str = "alice") -> str:
    link = await web_link(gw, user)
    await page.goto(link)
    await expect(page.locator("#user")).to_have_text(user)
    return link


async def screen_match(page: Page, pattern: str) -> list[str]:
    """Wait (bounded) until the terminal shows a line matching `pattern`; its groups."""
    handle = await page.wait_for_function(MATCH_SCREEN, arg=pattern)
    groups = await handle.json_value()
    assert isinstance(groups, list)
    return [str(g) for g in groups]


async def run(page: Page, command: str) -> None:
    await page.keyboard.type(command)
    await page.keyboard.press("Enter")


async def open_terminal(gw: Gateway, page: Page, vm: str = "web01") -> str:
    """Click "Open terminal" on `vm`, wait for the shell's prompt, check typing reaches it, and return the prompt."""
    await page.locator(f'#vms li[data-vm="{vm}"] button.open').click()
    await expect(page.locator("#term-state")).to_have_text("")  # the socket is open
    handle = await page.wait_for_function(f"() => {{ const l = {LAST_LINE}; return l && /[#$]$/.test(l) && l; }}")
    prompt = str(await handle.json_value())
    await run(page, "echo hello-$RANDOM")
    [digits] = await screen_match(page, r"^hello-(\d+)$")
    assert digits.isdigit()
    assert f"{prompt} echo hello-$RANDOM" in await page.evaluate("window.bastionTerminalText()")
    return prompt


def live_session(gw: Gateway, user: str = "alice") -> Any:
    [live] = [s for s in gw.app.registry.list() if s.protocol == "ssh-web" and s.user == user]
    return live


def control_ssl(gw: Gateway) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(gw.ca_file))


async def test_link_signs_in_once_lists_the_granted_vms_and_sets_a_strict_cookie(chromium: Browser, gw: Gateway, tmp_path: Path) -> None:
    """Signed out, `/` shows the sign-in view. The link from `ssh alice@gw web` signs alice in: her name and the VMs
    her rules grant (web01, bad01; not web02) show; the cookie is HttpOnly, Secure, SameSite=Strict. The same link
    in a fresh browser is refused."""
    async with new_page(chromium) as (_, page):
        await page.goto(base(gw) + "/")
        await expect(page.locator("#signin")).to_be_visible()
        await expect(page.locator("#ssh-command")).to_have_text(f"ssh -p {gw.port} USER@127.0.0.1 web")
        await page.screenshot(path=str(tmp_path / "signed_out.png"))

    async with new_page(chromium) as (context, page):
        link = await sign_in(gw, page)
        assert page.url == base(gw) + "/"  # the 303 took the token out of the address bar
        names = page.locator("#vms li")
        await expect(names).to_have_count(2)
        assert [await li.get_attribute("data-vm") for li in await names.all()] == ["web01", "bad01"]
        await expect(page.locator('#vms li[data-vm="web02"]')).to_have_count(0)
        await expect(page.locator("#signout")).to_be_visible()
        await expect(page.locator("#signin")).to_be_hidden()
        [cookie] = [c for c in await context.cookies() if c["name"] == "bastion_session"]
        assert cookie["httpOnly"] is True and cookie["secure"] is True and cookie["sameSite"] == "Strict"
        assert cookie["domain"] == "127.0.0.1" and cookie["path"] == "/"
        assert await page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts
        await page.screenshot(path=str(tmp_path / "vms.png"))

    async with new_page(chromium) as (context, page):
        answer = await page.goto(link)
        assert answer is not None and answer.status == 401
        await expect(page.locator("body")).to_contain_text("This sign-in link is not valid (it works once, for a minute)")
        assert [c for c in await context.cookies() if c["name"] == "bastion_session"] == []


async def test_terminal_types_resizes_and_runs_vi(chromium: Browser, gw: Gateway, tmp_path: Path) -> None:
    """A terminal on web01: `echo hello-$RANDOM` typed on the keyboard echoes its digits; shrinking the window
    changes what `stty size` prints (fewer rows and columns, rows = the lines on screen); `vi` takes the screen
    and `:q!` gives the prompt back."""
    async with new_page(chromium) as (_, page):
        await sign_in(gw, page)
        prompt = await open_terminal(gw, page)
        live = live_session(gw)
        assert (live.vm, live.login, live.source_ip) == ("web01", gw.vm.login, "127.0.0.1")

        await run(page, 'echo "size1=$(stty size)"')
        rows1, cols1 = map(int, await screen_match(page, r"^size1=(\d+) (\d+)$"))
        assert rows1 == await page.evaluate("window.bastionTerminalText().split('\\n').length")
        await page.set_viewport_size({"width": 760, "height": 460})
        await page.wait_for_function("(r) => window.bastionTerminalText().split('\\n').length < r", arg=rows1)
        await run(page, 'echo "size2=$(stty size)"')
        rows2, cols2 = map(int, await screen_match(page, r"^size2=(\d+) (\d+)$"))
        assert rows2 < rows1 and cols2 < cols1, (rows1, cols1, rows2, cols2)
        assert rows2 == await page.evaluate("window.bastionTerminalText().split('\\n').length")

        await run(page, "vi")
        # vim's empty buffer: the filler `~` on (nearly) every row, and the prompt gone from the screen.
        await page.wait_for_function(
            "(n) => window.bastionTerminalText().split('\\n').filter((l) => l.startsWith('~')).length >= n", arg=rows2 - 4
        )
        await run(page, ":q!")
        await page.wait_for_function(f"(p) => {LAST_LINE} === p", arg=prompt)
        await run(page, "echo back-$((40+2))")
        await screen_match(page, r"^(back-42)$")
        await page.screenshot(path=str(tmp_path / "terminal.png"))


async def test_operator_disconnect_shows_a_banner_that_stays(chromium: Browser, gw: Gateway, tmp_path: Path) -> None:
    """DELETE /v1/sessions/{id} with a reason: the terminal shows "You have been disconnected. REASON" as an
    `ended` banner that is still there after the socket closed; the session closes as terminated_by_operator."""
    async with new_page(chromium) as (_, page):
        await sign_in(gw, page)
        await open_terminal(gw, page)
        live = live_session(gw)
        async with (
            aiohttp.ClientSession() as http,
            http.delete(
                f"{gw.control_url}/v1/sessions/{live.id}",
                json={"reason": "kernel update"},
                headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
                ssl=control_ssl(gw),
            ) as r,
        ):
            assert r.status == 200, await r.text()
        banner = page.locator("#banner")
        await expect(banner).to_have_attribute("data-kind", "ended")
        await expect(page.locator("#term-state")).to_have_text("Disconnected")  # the socket's close event came
        await expect(banner).to_be_visible()
        await expect(page.locator("#banner-text")).to_have_text("[bastion] You have been disconnected. kernel update")
        await expect(banner.get_by_role("button", name="Back to the VM list")).to_be_visible()
        # Also written into the terminal, where it stays in the scrollback under the banner.
        assert "You have been disconnected. kernel update" in await page.evaluate("window.bastionTerminalText()")
        await page.screenshot(path=str(tmp_path / "ended.png"))
    await wait_for(lambda: bool(closed_web(gw)), gw.logs.changed)
    [closed] = closed_web(gw)
    assert closed["reason"] == "terminated_by_operator" and closed["user"] == "alice"


def closed_web(gw: Gateway) -> list[dict[str, Any]]:
    return [e for e in gw.logs.events("session_closed") if e.get("protocol") == "ssh-web"]


async def test_a_notice_shows_as_text_while_the_terminal_keeps_working(chromium: Browser, gw: Gateway) -> None:
    """POST /v1/notices mid-command: a `notice` banner shows the message literally (`<b>bold</b>` is text, no
    element), and the rest of the command typed after it still runs."""
    async with new_page(chromium) as (_, page):
        await sign_in(gw, page)
        await open_terminal(gw, page)
        live = live_session(gw)
        await page.keyboard.type("echo still-")
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{gw.control_url}/v1/notices",
                json={"message": "<b>bold</b> maintenance at noon"},
                headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
                ssl=control_ssl(gw),
            ) as r,
        ):
            assert (await r.json())["results"] == {live.id: "delivered"}
        banner = page.locator("#banner")
        await expect(banner).to_have_attribute("data-kind", "notice")
        await expect(page.locator("#banner-text")).to_have_text("[bastion] <b>bold</b> maintenance at noon")
        await expect(page.locator("#banner b")).to_have_count(0)
        await run(page, "typing-$((3*4))")
        await screen_match(page, r"^(still-typing-12)$")
        await expect(banner).to_be_visible()
        assert [s.id for s in gw.app.registry.list()] == [live.id]


async def test_a_websocket_from_another_origin_is_refused(chromium: Browser, gw: Gateway) -> None:
    """Signed in on https://127.0.0.1:PORT, a page on another port of the same host (same site, so Chromium
    sends the SameSite=Strict cookie along) opens the terminal's WebSocket: refused on the Origin, no session."""
    cert, key = gw.tmp / "state" / "tls.crt", gw.tmp / "state" / "tls.key"
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    foreign = web.Application()

    async def blank(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>elsewhere</title><p>elsewhere</p>", content_type="text/html")

    foreign.router.add_get("/", blank)
    runner = web.AppRunner(foreign)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with new_page(chromium) as (_, page):
            await sign_in(gw, page)
            await page.goto(f"https://127.0.0.1:{port}/")
            await expect(page.locator("p")).to_have_text("elsewhere")
            url = f"wss://127.0.0.1:{gw.port}/ws/terminal?vm=web01&cols=80&rows=24"
            result = await page.evaluate(PROBE_WS, url)
            assert result == {"opened": False, "code": 1006}
            await wait_for(lambda: bool(gw.logs.events("web_terminal_refused")), gw.logs.changed)
            [refused] = gw.logs.events("web_terminal_refused")
            # The cookie came along (a missing one is a 401 before this check): the Origin alone refused it.
            assert refused["reason"] == "cross_origin" and refused["user"] == "alice"
            assert refused["origin"] == f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
    assert gw.logs.events("session_opened") == []
    assert gw.app.registry.list() == []


async def test_bob_sees_only_web01_and_cannot_open_bad01(chromium: Browser, gw: Gateway) -> None:
    """Bob (an ssh rule for web01 only) signs in with his own link: the list shows web01 alone, and a hand-made
    WebSocket for bad01 from his signed-in page is refused before anything opens; web01 still works for him."""
    async with new_page(chromium) as (_, page):
        await sign_in(gw, page, "bob")
        await expect(page.locator("#vms li")).to_have_count(1)
        await expect(page.locator('#vms li[data-vm="web01"]')).to_be_visible()
        url = f"wss://127.0.0.1:{gw.port}/ws/terminal?vm=bad01&cols=80&rows=24"
        assert await page.evaluate(PROBE_WS, url) == {"opened": False, "code": 1006}
        await wait_for(lambda: bool(gw.logs.events("session_refused")), gw.logs.changed)
        [refused] = gw.logs.events("session_refused")
        assert (refused["reason"], refused["target"], refused["user"]) == ("policy_denied", "bad01", "bob")
        assert gw.logs.events("session_opened") == []
        assert gw.app.registry.list() == []
        await open_terminal(gw, page)
        assert live_session(gw, "bob").vm == "web01"


async def test_keys_typed_while_connecting_are_not_lost(chromium: Browser, gw: Gateway) -> None:
    """A person clicks "Open terminal" and types at once, while the gateway is still logging in to the VM: the page
    keeps those keys and sends them when the socket opens, so the command runs."""
    async with new_page(chromium) as (_, page):
        await sign_in(gw, page)
        await page.locator('#vms li[data-vm="web01"] button.open').click()
        await run(page, "echo early-$((5*5))")
        await screen_match(page, r"^early-(25)$")
