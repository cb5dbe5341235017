"""The sessions page in a real browser (Debian's Chromium driven by Playwright) with live SSH sessions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.e2e.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, Gateway
from tests.e2e.test_control_api import Live

CHROMIUM = "/usr/bin/chromium"


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


async def open_page(browser: Browser, gw: Gateway, token: str) -> Page:
    page = await browser.new_page(ignore_https_errors=True)  # the test gateway's self-signed certificate
    await page.goto(gw.control_url + "/ui")
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await expect(page.locator("#main")).to_be_visible()
    await expect(page.locator("#login")).to_be_hidden()
    return page


async def test_operator_sees_sessions_live_and_disconnects_one(browser: Browser, gw: Gateway, tmp_path: Path) -> None:
    """An operator signs in, sees the live session, sees a new one appear without reloading, refreshes,
    selects one, confirms Disconnect with a reason: its row disappears and its user reads the reason."""
    async with Live(gw) as first:
        page = await open_page(browser, gw, OPERATOR_TOKEN)
        try:
            row = page.locator(f'tr[data-id="{first.id}"]')
            await expect(row).to_be_visible()
            await expect(row.locator("td").nth(1)).to_have_text("alice")
            await expect(row.locator("td").nth(2)).to_have_text("web01")
            await expect(page.locator("#whoami")).to_have_text("noc (operator)")

            async with Live(gw) as second:
                await expect(page.locator(f'tr[data-id="{second.id}"]')).to_be_visible()  # live, no reload
                await page.click("#refresh")
                await expect(page.locator("#status")).to_contain_text("Updated")
                await expect(page.locator("tbody tr")).to_have_count(2)

                await row.locator("input[type=checkbox]").check()
                await page.click("#disconnect")
                await expect(page.locator("#confirm")).to_be_visible()
                await expect(page.locator("#confirm-text")).to_contain_text("Disconnect 1 session?")
                await page.fill("#reason", "from the browser")
                await page.click("#confirm-ok")
                await expect(row).to_have_count(0)
                await expect(page.locator(f'tr[data-id="{second.id}"]')).to_be_visible()
                await expect(page.locator("#status")).to_contain_text("Disconnected 1 of 1")
                code, err = await first.finish()
                assert code == 255 and "You have been disconnected. from the browser" in err
                assert gw.app.registry.get(second.id) is not None
            await expect(page.locator(f'tr[data-id="{second.id}"]')).to_have_count(0)  # it ended on its own
        finally:
            await page.screenshot(path=str(tmp_path / "sessions.png"))
            await page.close()
    [audit] = gw.logs.events("operator_action")
    assert audit["operator"] == "noc" and audit["reason"] == "from the browser"


async def test_viewer_sees_no_disconnect_and_a_wrong_token_is_refused(browser: Browser, gw: Gateway) -> None:
    """A viewer gets the table without the Disconnect button; a wrong token does not get in."""
    async with Live(gw) as live:
        page = await open_page(browser, gw, VIEWER_TOKEN)
        try:
            await expect(page.locator(f'tr[data-id="{live.id}"]')).to_be_visible()
            await expect(page.locator("#disconnect")).to_be_hidden()
        finally:
            await page.close()
    page = await browser.new_page(ignore_https_errors=True)
    try:
        await page.goto(gw.control_url + "/ui")
        await page.fill("#token", "not-a-token")
        await page.click("button[type=submit]")
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#main")).to_be_hidden()
    finally:
        await page.close()


async def test_page_is_locked_against_framing_and_foreign_scripts(gw: Gateway) -> None:
    """The page is served with a strict Content-Security-Policy and no framing."""
    import ssl

    import aiohttp

    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    async with aiohttp.ClientSession() as http, http.get(gw.control_url + "/ui", ssl=ctx) as resp:
        assert resp.status == 200
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "Bearer" not in await resp.text()
