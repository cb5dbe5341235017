"""Sign-in with a real OpenID Connect provider (oidc-provider-mock, its own process on loopback) and the gateway's
group mapping: an IdP user with no [[users]] entry reaches what her mapped groups grant, in a browser terminal;
a user in no mapped group reaches nothing; a replayed or forged callback is refused."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import expect

from tests.e2e import test_web_page_static
from tests.e2e.conftest import OPERATOR_TOKEN, Gateway, GatewayFactory, wait_for
from tests.support.oidc import OIDCProvider, authorize, running_oidc_provider


@pytest.fixture(scope="module")
def provider() -> Iterator[OIDCProvider]:
    users = {
        "zoe-sub": {"preferred_username": "zoe", "groups": ["idp-ops", "idp-other"]},
        "nobody-sub": {"preferred_username": "nobody", "groups": ["idp-guests"]},
    }
    with running_oidc_provider(users) as p:
        yield p


def with_oidc(provider: OIDCProvider, tmp: Path) -> Any:
    secret = tmp / "oidc.secret"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o600)

    def edit(cfg: dict[str, Any]) -> None:
        cfg["oidc"] = {
            "issuer": provider.url,
            "client_id": "bastion-test",
            "client_secret_file": str(secret),
            "allowed_http_issuer": True,  # the mock serves plain HTTP on loopback
            "group_map": {"idp-ops": ["ops"]},
        }

    return edit


@pytest.fixture
async def oidc_gw(make_gateway: GatewayFactory, provider: OIDCProvider, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with make_gateway(with_oidc(provider, tmp_path)) as gw:
        await wait_for(lambda: bool(gw.logs.events("oidc_ready")), gw.logs.changed, timeout=30)
        yield gw


async def sign_in(gw: Gateway, http: aiohttp.ClientSession, ctx: ssl.SSLContext, sub: str) -> None:
    base = f"https://127.0.0.1:{gw.port}"
    async with http.get(base + "/login/oidc", ssl=ctx, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
    code, state = await authorize(location, sub)
    async with http.get(base + "/login/oidc/callback", params={"code": code, "state": state}, ssl=ctx, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
    async with http.get(base + "/login/oidc/callback", params={"code": code, "state": state}, ssl=ctx, allow_redirects=False) as resp:
        assert resp.status == 400  # the state was spent: a replayed callback signs nobody in


async def test_an_idp_user_opens_a_terminal_through_her_mapped_group(oidc_gw: Gateway) -> None:
    """zoe (no [[users]] entry; IdP groups idp-ops and idp-other) signs in at the provider; idp-ops maps to ops, so
    she may open web01, as ops may; the terminal's session names her, and the audit line says oidc."""
    gw = oidc_gw
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await sign_in(gw, http, ctx, "zoe-sub")
        base = f"https://127.0.0.1:{gw.port}"
        async with http.get(base + "/api/me", ssl=ctx) as resp:
            me = await resp.json()
        assert (me["user"], me["groups"], me["auth_method"]) == ("zoe", ["ops"], "oidc")
        async with http.get(base + "/api/vms", ssl=ctx) as resp:
            assert [v["name"] for v in (await resp.json())["vms"]] == ["web01", "bad01"]
        ws = await http.ws_connect(f"wss://127.0.0.1:{gw.port}/ws/terminal?vm=web01&cols=80&rows=24", ssl=ctx, headers={"Origin": base})
        try:
            await ws.send_bytes(b"echo zoe-$((3*3))\r")
            text = ""
            async with asyncio.timeout(15):
                while "zoe-9" not in text:
                    msg = await ws.receive()
                    assert msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT), msg
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        text += msg.data.decode(errors="replace")
            [live] = gw.app.registry.list()
            assert (live.user, live.protocol) == ("zoe", "ssh-web")
        finally:
            await ws.close()
    [signed_in] = gw.logs.events("web_signed_in")
    assert (signed_in["user"], signed_in["method"]) == ("zoe", "oidc")


async def test_a_user_in_no_mapped_group_reaches_nothing(oidc_gw: Gateway) -> None:
    """nobody's only IdP group is not mapped: the sign-in works, the VM list is empty, a terminal is refused."""
    gw = oidc_gw
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    base = f"https://127.0.0.1:{gw.port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await sign_in(gw, http, ctx, "nobody-sub")
        async with http.get(base + "/api/vms", ssl=ctx) as resp:
            assert (await resp.json())["vms"] == []
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"wss://127.0.0.1:{gw.port}/ws/terminal?vm=web01", ssl=ctx, headers={"Origin": base})
        assert refused.value.status == 403
    assert not gw.logs.events("session_opened")


async def test_a_forged_callback_is_refused(oidc_gw: Gateway) -> None:
    """A callback with a state the gateway never issued, or a code the provider never gave, signs nobody in."""
    gw = oidc_gw
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    base = f"https://127.0.0.1:{gw.port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(base + "/login/oidc/callback", params={"code": "x", "state": "made-up"}, ssl=ctx, allow_redirects=False) as r:
            assert r.status == 400 and "Set-Cookie" not in r.headers
        async with http.get(base + "/login/oidc", ssl=ctx, allow_redirects=False) as resp:
            location = resp.headers["Location"]
        state = dict(part.split("=", 1) for part in location.split("?", 1)[1].split("&"))["state"]
        async with http.get(base + "/login/oidc/callback", params={"code": "forged", "state": state}, ssl=ctx, allow_redirects=False) as r:
            assert r.status == 401 and "Set-Cookie" not in r.headers
        async with http.get(base + "/api/me", ssl=ctx) as resp:
            assert resp.status == 401
    reasons = [e["reason"] for e in gw.logs.events("web_sign_in_refused")]
    assert reasons[0] == "oidc_state" and reasons[1].startswith("oidc_")


chromium = test_web_page_static.browser  # the Chromium launch fixture (pytest names it `chromium` here)


async def test_sign_in_in_a_real_browser_at_the_providers_own_page(chromium: Any, oidc_gw: Gateway, tmp_path: Path) -> None:
    """Chromium: the gateway's sign-in page, "Sign in with your identity provider", the provider's own form (type the
    user, Authorize), back to the gateway signed in as zoe with her VM list; then a terminal; lock zoe from the
    control API: the terminal ends with the lock's reason and the browser is signed out."""
    gw = oidc_gw
    context = await chromium.new_context(ignore_https_errors=True, viewport={"width": 1000, "height": 640})
    page = await context.new_page()
    try:
        await page.goto(f"https://127.0.0.1:{gw.port}/")
        await page.get_by_role("link", name="Sign in with your identity provider").click()
        await page.wait_for_url(re.compile(r"^http://127\.0\.0\.1:\d+/oauth2/authorize"))
        await page.screenshot(path=str(tmp_path / "provider.png"))
        await page.locator('input[name="sub"]').fill("zoe-sub")
        await page.get_by_role("button", name=re.compile("Authorize", re.I)).click()
        await expect(page.locator("#user")).to_have_text("zoe", timeout=15_000)
        await expect(page.locator('#vms li[data-vm="web01"]')).to_be_visible()
        await page.locator('#vms li[data-vm="web01"] button.open').click()
        await expect(page.locator("#term-state")).to_have_text("")
        await page.keyboard.type("echo oidc-$((6*7))")
        await page.keyboard.press("Enter")
        await page.wait_for_function("() => window.bastionTerminalText().includes('oidc-42')")
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(gw.control_url + "/v1/locks", json={"user": "zoe", "reason": "left the company"}, headers=headers, ssl=ctx) as r,
        ):
            assert r.status == 201
        await expect(page.locator("#banner-text")).to_contain_text("locked by an operator: left the company")
        async with aiohttp.ClientSession() as http:
            cookies = {c["name"]: c["value"] for c in await context.cookies()}
            async with http.get(f"https://127.0.0.1:{gw.port}/api/me", cookies=cookies, ssl=ctx) as r:
                assert r.status == 401  # the lock ended the browser session too
    finally:
        await context.close()
