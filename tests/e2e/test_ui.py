"""The operator sessions page on the control port (`/ui`) in a real browser (Debian's Chromium driven by
Playwright) against the gateway in-process, with real `ssh` sessions through it to the real sshd VM.

Every test saves a screenshot into one temp dir per run (printed with `-s`, named after the test).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from gateway.sessions.model import iso
from tests.e2e import test_web_page_static
from tests.e2e.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, Gateway

pytestmark = pytest.mark.timeout(90)
browser = test_web_page_static.browser  # the Chromium launch fixture, reused
TIMEOUT_MS = 15_000
_DURATION = re.compile(r"^(\d+m )?\d+s$")
_BYTES = re.compile(r"^\u2191 [\d.]+ (B|KiB|MiB)\u2193 [\d.]+ (B|KiB|MiB)$")
_COUNTDOWN = re.compile(r"^ending in 0:0[1-8]$")
HEADERS = ["Session", "User", "Source", "VM", "Protocol", "Login", "Started", "Duration", "Bytes", "Node", "State"]


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ui-shots")
    print(f"\nsessions page screenshots: {d}")
    return d


class Ssh:
    """`ssh USER+web01@gw cat` held open through the gateway; `id` is its session once the registry has it."""

    def __init__(self, gw: Gateway, user: str = "alice") -> None:
        self.gw = gw
        self.user = user
        self.proc: asyncio.subprocess.Process | None = None
        self.id = ""
        self.err = b""

    async def __aenter__(self) -> Ssh:
        events = self.gw.app.registry.subscribe()
        try:
            if self.user == "alice":
                argv = self.gw.ssh_argv("alice+web01")
            else:
                argv = self.gw.ssh_argv_keys(f"{self.user}+web01", getattr(self.gw.keys, self.user).private)
            self.proc = await asyncio.create_subprocess_exec(*argv, "cat", stdin=PIPE, stdout=PIPE, stderr=PIPE)
            async with asyncio.timeout(20):
                while True:
                    ev = await events.get()
                    if ev is not None and ev.kind == "opened" and ev.session is not None and ev.session.user == self.user:
                        self.id = ev.session.id
                        break
        finally:
            self.gw.app.registry.unsubscribe(events)
        return self

    async def stderr_until(self, text: str) -> str:
        """Read the user's stderr (bounded) until `text` shows; everything read so far."""
        assert self.proc is not None and self.proc.stderr is not None
        async with asyncio.timeout(20):
            while text.encode() not in self.err:
                chunk = await self.proc.stderr.read(4096)
                assert chunk, f"ssh ended before printing {text!r}: {self.err!r}"
                self.err += chunk
        return self.err.decode(errors="replace")

    async def finish(self) -> tuple[int, str]:
        """Wait (bounded) for ssh to end: its exit code and all it wrote on stderr."""
        assert self.proc is not None
        async with asyncio.timeout(20):
            _, err = await self.proc.communicate()
        assert self.proc.returncode is not None
        return self.proc.returncode, (self.err + err).decode(errors="replace")

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@asynccontextmanager
async def page_for(browser: Browser, gw: Gateway, shot: Path, token: str | None = OPERATOR_TOKEN, **context: Any) -> AsyncIterator[Page]:
    """A fresh browser context on /ui, signed in with `token` (None: left at the sign-in form). Saves `shot` at the
    end and fails the test on any script error in the page."""
    ctx = await browser.new_context(ignore_https_errors=True, **{"viewport": {"width": 1280, "height": 720}, **context})
    ctx.set_default_timeout(TIMEOUT_MS)
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto(gw.control_url + "/ui")
        if token is not None:
            await page.fill("#token", token)
            await page.press("#token", "Enter")
            await expect(page.locator("#main")).to_be_visible()
        yield page
        assert errors == []
    finally:
        await page.screenshot(path=str(shot), full_page=True)
        await ctx.close()


def row(page: Page, sid: str) -> Any:
    return page.locator(f'#rows tr[data-id="{sid}"]')


async def user_column(page: Page) -> list[str]:
    return await page.locator("#rows td.user").all_text_contents()


async def test_columns_show_each_session_field(browser: Browser, gw: Gateway, shots: Path) -> None:
    """An operator in Tokyo signs in while alice has a session: its row shows the short session ID, user, source
    IP and port, VM, protocol, login, the start with date, time and zone (relative on hover), a duration, bytes
    both ways (6 each once cat echoed a line), node and state."""
    async with Ssh(gw) as alice, page_for(browser, gw, shots / "columns.png", timezone_id="Asia/Tokyo", locale="en-US") as page:
        s = gw.app.registry.get(alice.id)
        assert s is not None
        heads = [t.strip() for t in await page.locator("#sessions thead th:visible").all_inner_texts()]
        assert heads[1:-1] == HEADERS and heads[-1] == "Actions"
        r = row(page, alice.id)
        await expect(r.locator("td.id code")).to_have_text(alice.id[:8])
        await expect(r.locator("td.id code")).to_have_attribute("title", alice.id)
        await expect(r.locator("td.user")).to_have_text("alice")
        await expect(r.locator("td.source")).to_have_text(f"{s.source_ip}:{s.source_port}")
        await expect(r.locator("td.vm")).to_have_text("web01")
        await expect(r.locator("td.protocol")).to_have_text("ssh")
        await expect(r.locator("td.login")).to_have_text(gw.vm.login)
        tokyo = s.started_at.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d %H:%M:%S")
        await expect(r.locator("td.started")).to_have_text(f"{tokyo} GMT+9")
        ago = re.compile(r"^started (now|\d+ seconds? ago) \(" + re.escape(iso(s.started_at)) + r"\)$")
        await expect(r.locator("td.started")).to_have_attribute("title", ago)
        await expect(r.locator("td.duration")).to_have_text(_DURATION)
        await expect(r.locator("td.bytes")).to_have_text(_BYTES)
        assert alice.proc is not None and alice.proc.stdin is not None and alice.proc.stdout is not None
        alice.proc.stdin.write(b"hello\n")  # cat echoes it: bytes both ways, and the page follows the counts
        async with asyncio.timeout(20):
            assert await alice.proc.stdout.readexactly(6) == b"hello\n"
        await expect(r.locator("td.bytes")).to_have_text("\u2191 6 B\u2193 6 B")
        await expect(r.locator("td.bytes")).to_have_attribute("title", "6 bytes up (from the user), 6 bytes down")
        await expect(r.locator("td.node")).to_have_text("test-node")
        await expect(r.locator("td.state")).to_have_text("active")
        await expect(page.locator("#whoami")).to_have_text("noc (operator)")
        await expect(page.locator("#count")).to_have_text("1 session")


async def test_copy_puts_the_full_session_id_on_the_clipboard(browser: Browser, gw: Gateway, shots: Path) -> None:
    """The operator clicks Copy next to a short session ID: the clipboard holds the whole ID."""
    async with Ssh(gw) as alice, page_for(browser, gw, shots / "copy.png", permissions=["clipboard-read", "clipboard-write"]) as page:
        await row(page, alice.id).locator("button.copy").click()
        await expect(page.locator("#status")).to_have_text(f"Copied session ID {alice.id}.")
        assert await page.evaluate("navigator.clipboard.readText()") == alice.id


async def test_a_new_session_appears_and_an_ended_one_leaves_live(browser: Browser, gw: Gateway, shots: Path) -> None:
    """With the page open, a user connects (the row appears without a reload) and then quits (the row leaves and
    the line of live news says why)."""
    async with page_for(browser, gw, shots / "live.png") as page:
        await expect(page.locator("#rows")).to_have_text("No sessions.")
        async with Ssh(gw) as alice:
            await expect(row(page, alice.id)).to_be_visible()
            assert alice.proc is not None and alice.proc.stdin is not None
            alice.proc.stdin.close()
            await alice.finish()
            await expect(row(page, alice.id)).to_have_count(0)
            await expect(page.locator("#feed")).to_have_text(f"Session {alice.id[:8]} of alice on web01 ended: vm closed.")


async def test_filter_box_narrows_the_rows(browser: Browser, gw: Gateway, shots: Path) -> None:
    """alice and bob are connected; typing "bob" shows bob's row only, "user:alice" alice's, a word nobody matches
    says so, and clearing the box shows both again."""
    async with Ssh(gw) as alice, Ssh(gw, "bob") as bob, page_for(browser, gw, shots / "filter.png") as page:
        await expect(page.locator("#rows tr")).to_have_count(2)
        await page.fill("#filter", "bob")
        await expect(page.locator("#rows tr")).to_have_count(1)
        await expect(row(page, bob.id)).to_be_visible()
        await expect(page.locator("#count")).to_have_text("1 of 2 sessions shown")
        await page.fill("#filter", "user:alice")
        await expect(page.locator("#rows tr")).to_have_count(1)
        await expect(row(page, alice.id)).to_be_visible()
        await page.fill("#filter", "nobody-like-this")
        await expect(page.locator("#rows")).to_have_text("No session matches the filter.")
        await page.fill("#filter", "")
        await expect(page.locator("#rows tr")).to_have_count(2)


async def test_column_header_sorts_both_ways(browser: Browser, gw: Gateway, shots: Path) -> None:
    """Newest first by default (bob connected last); clicking User sorts alice first, clicking again bob first,
    and the header announces the direction."""
    async with Ssh(gw), Ssh(gw, "bob"), page_for(browser, gw, shots / "sort.png") as page:
        await expect(page.locator("#rows td.user")).to_have_text(["bob", "alice"])
        await expect(page.locator('th[data-key="started"]')).to_have_attribute("aria-sort", "descending")
        await page.click('th[data-key="user"] button')
        await expect(page.locator("#rows td.user")).to_have_text(["alice", "bob"])
        await expect(page.locator('th[data-key="user"]')).to_have_attribute("aria-sort", "ascending")
        await page.click('th[data-key="user"] button')
        await expect(page.locator("#rows td.user")).to_have_text(["bob", "alice"])
        await expect(page.locator('th[data-key="user"]')).to_have_attribute("aria-sort", "descending")
        await expect(page.locator('th[data-key="started"]')).not_to_have_attribute("aria-sort", "descending")


async def test_row_disconnect_ends_that_users_ssh_with_the_reason(browser: Browser, gw: Gateway, shots: Path) -> None:
    """The operator clicks Disconnect on alice's row and confirms with a reason: her row leaves, bob's stays, and
    alice's ssh ends printing the reason."""
    async with Ssh(gw) as alice, Ssh(gw, "bob") as bob, page_for(browser, gw, shots / "row-disconnect.png") as page:
        await row(page, alice.id).locator("button.disconnect").click()
        await expect(page.locator("#confirm-text")).to_have_text(
            f"Disconnect alice on web01 (session {alice.id[:8]})? The users will read your reason."
        )
        await page.fill("#reason", "patching web01")
        await page.click("#confirm-ok")
        await expect(row(page, alice.id)).to_have_count(0)
        await expect(page.locator("#status")).to_have_text(f"Disconnected alice on web01 (session {alice.id[:8]}).")
        await expect(row(page, bob.id)).to_be_visible()
        code, err = await alice.finish()
        assert code == 255 and "You have been disconnected. patching web01" in err
        assert gw.app.registry.get(bob.id) is not None


async def test_row_notice_reaches_that_users_terminal(browser: Browser, gw: Gateway, shots: Path) -> None:
    """The operator sends a notice from alice's row: the page says it was delivered, alice's ssh prints it, and
    her session goes on."""
    async with Ssh(gw) as alice, page_for(browser, gw, shots / "row-notice.png") as page:
        await row(page, alice.id).locator("button.notice").click()
        await expect(page.locator("#notice")).to_be_visible()
        await page.fill("#message", "reboot at 18:00, save your work")
        await page.click("#notice-ok")
        await expect(page.locator("#status")).to_have_text("Notice delivered to 1 of 1.")
        assert "reboot at 18:00, save your work" in await alice.stderr_until("save your work")
        await expect(row(page, alice.id).locator("td.state")).to_have_text("active")


async def test_bulk_disconnect_with_grace_counts_down_then_rows_leave(browser: Browser, gw: Gateway, shots: Path) -> None:
    """The operator selects all, disconnects with a reason and 8 s of grace: both rows count down ("ending in
    0:0N"), then leave, and both users' ssh end printing the reason."""
    async with Ssh(gw) as alice, Ssh(gw, "bob") as bob, page_for(browser, gw, shots / "bulk-final.png") as page:
        await page.check("#all")
        await expect(page.locator("#disconnect")).to_have_text("Disconnect selected (2)")
        await page.click("#disconnect")
        await expect(page.locator("#confirm-text")).to_have_text("Disconnect 2 sessions? The users will read your reason.")
        await page.fill("#reason", "maintenance window")
        await page.fill("#grace", "8")
        await page.click("#confirm-ok")
        await expect(page.locator("#status")).to_have_text("Disconnect of 2 sessions: 2 pending.")
        for sid in (alice.id, bob.id):
            await expect(row(page, sid).locator("td.state .badge.terminating")).to_have_text(_COUNTDOWN)
        await page.screenshot(path=str(shots / "bulk-countdown.png"))
        for sid in (alice.id, bob.id):
            await expect(row(page, sid)).to_have_count(0, timeout=30_000)
        for ssh in (alice, bob):
            code, err = await ssh.finish()
            assert code == 255 and "maintenance window" in err


async def test_wrong_token_shows_a_visible_error(browser: Browser, gw: Gateway, shots: Path) -> None:
    """A mistyped token: the sign-in form stays, says the token was not accepted, and nothing is stored."""
    async with page_for(browser, gw, shots / "wrong-token.png", token=None) as page:
        await page.fill("#token", "not-a-token")
        await page.click("#login button[type=submit]")
        await expect(page.locator("#login-error")).to_have_text("That token was not accepted. Check it and try again.")
        await expect(page.locator("#login-error")).to_be_visible()
        await expect(page.locator("#main")).to_be_hidden()
        assert await page.evaluate("sessionStorage.length") == 0


async def test_a_token_with_characters_no_header_can_carry_is_explained(browser: Browser, gw: Gateway, shots: Path) -> None:
    """A token pasted with a character outside printable ASCII gets a one-line explanation, not a network error."""
    async with page_for(browser, gw, shots / "bad-token-characters.png", token=None) as page:
        await page.fill("#token", "op-t\u00e9st token")
        await page.press("#token", "Enter")
        await expect(page.locator("#login-error")).to_have_text("A token is printable ASCII without spaces; check what was pasted.")
        await expect(page.locator("#main")).to_be_hidden()


async def test_sign_out_forgets_the_token(browser: Browser, gw: Gateway, shots: Path) -> None:
    """Signed in, the token is kept for this tab only; Sign out clears it, the table goes, and a reload of the page
    asks for a token again."""
    async with Ssh(gw) as alice, page_for(browser, gw, shots / "signed-out.png") as page:
        await expect(row(page, alice.id)).to_be_visible()
        assert await page.evaluate("localStorage.length") == 0
        assert await page.evaluate("sessionStorage.getItem('bastion-token')") == OPERATOR_TOKEN
        await page.click("#signout")
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#login-error")).to_have_text("Signed out.")
        await expect(page.locator("#main")).to_be_hidden()
        await expect(page.locator("#rows tr")).to_have_count(0)
        assert await page.evaluate("sessionStorage.getItem('bastion-token')") is None
        assert await page.input_value("#token") == ""
        await page.reload()
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#main")).to_be_hidden()


async def test_viewer_sees_no_controls_it_cannot_use(browser: Browser, gw: Gateway, shots: Path) -> None:
    """A viewer sees alice's row with its ID and Copy, but no select boxes, no Disconnect or Notice buttons and no
    bulk bar."""
    async with Ssh(gw) as alice, page_for(browser, gw, shots / "viewer.png", token=VIEWER_TOKEN) as page:
        r = row(page, alice.id)
        await expect(r.locator("td.user")).to_have_text("alice")
        await expect(page.locator("#whoami")).to_have_text("watcher (viewer)")
        await expect(r.locator("button.copy")).to_be_visible()
        await expect(page.locator("#sessions input[type=checkbox]:visible")).to_have_count(0)
        await expect(page.locator("#sessions button.disconnect, #sessions button.notice")).to_have_count(0)
        await expect(page.locator("#bulk")).to_be_hidden()
        await expect(page.locator("#sessions th:visible")).to_have_count(len(HEADERS))


async def test_keyboard_alone_disconnects_a_row(browser: Browser, gw: Gateway, shots: Path) -> None:
    """From the filter box the operator Tabs to alice's Disconnect, presses Enter, types a reason and presses Enter:
    the session ends with that reason and the focus goes back to the filter box."""
    async with Ssh(gw) as alice, page_for(browser, gw, shots / "keyboard.png") as page:
        button = row(page, alice.id).locator("button.disconnect")
        await expect(button).to_be_visible()
        await page.focus("#filter")
        for _ in range(40):
            if await button.evaluate("(b) => b === document.activeElement"):
                break
            await page.keyboard.press("Tab")
        await expect(button).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.locator("#confirm")).to_be_visible()
        await expect(page.locator("#reason")).to_be_focused()
        await page.keyboard.type("keyboard only")
        await page.keyboard.press("Enter")
        await expect(row(page, alice.id)).to_have_count(0)
        await expect(page.locator("#filter")).to_be_focused()  # focus is not lost with the row
        code, err = await alice.finish()
        assert code == 255 and "keyboard only" in err


async def test_800_px_wide_has_no_sideways_page_scroll(browser: Browser, gw: Gateway, shots: Path) -> None:
    """At 800 px wide the page itself does not scroll sideways, and a row's Disconnect and Notice are on screen."""
    viewport = {"width": 800, "height": 600}
    async with Ssh(gw) as alice, Ssh(gw, "bob"), page_for(browser, gw, shots / "narrow-800.png", viewport=viewport) as page:
        r = row(page, alice.id)
        await expect(r).to_be_visible()
        assert await page.evaluate("document.documentElement.scrollWidth") <= await page.evaluate("document.documentElement.clientWidth")
        for sel in ("button.disconnect", "button.notice"):
            box = await r.locator(sel).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], (sel, box)


async def test_dark_scheme_follows_the_browser(browser: Browser, gw: Gateway, shots: Path) -> None:
    """The same page in a browser set to dark has a dark background; set to light, a light one."""
    background = "getComputedStyle(document.body).backgroundColor"
    async with Ssh(gw), page_for(browser, gw, shots / "light.png", color_scheme="light") as light:
        light_bg = await light.evaluate(background)
        async with page_for(browser, gw, shots / "dark.png", color_scheme="dark") as dark:
            dark_bg = await dark.evaluate(background)
    assert _luminance(light_bg) > 0.8 and _luminance(dark_bg) < 0.2, (light_bg, dark_bg)


async def test_page_is_locked_against_framing_and_foreign_scripts(gw: Gateway) -> None:
    """The page is served with a strict Content-Security-Policy and no framing."""
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    async with aiohttp.ClientSession() as http, http.get(gw.control_url + "/ui", ssl=ctx) as resp:
        assert resp.status == 200
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "Bearer" not in await resp.text()


def _luminance(css: str) -> float:
    r, g, b = (int(x) / 255 for x in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b
