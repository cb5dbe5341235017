"""The sessions page of one node shows and ends the sessions of every node (two in-process nodes on a real
redis-server, Debian's Chromium driven by Playwright, real ssh sessions)."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from tests.e2e import test_web_page_static
from tests.e2e.conftest import Gateway
from tests.e2e.test_ui import page_for, row
from tests.hostile.test_cluster import _has_nodes, nodes, open_cat, redis_server, sessions_on, until

pytestmark = pytest.mark.timeout(120)
browser = test_web_page_static.browser  # the Chromium launch fixture, reused
__all__ = ["browser", "nodes", "redis_server"]  # fixtures, imported for pytest


async def test_node_a_s_page_lists_and_disconnects_node_b_s_session_and_drops_a_dead_node(
    browser: Browser, nodes: tuple[Gateway, Gateway], tmp_path: Path
) -> None:
    """An operator on node A's page sees alice's session on node B appear live with node-b, disconnects it from
    there (her ssh on node B ends with the reason), then sees a second session of node B leave the page when node
    B dies (its heartbeat and Redis link stop, as under SIGKILL)."""
    a, b = nodes
    await until(lambda: _has_nodes(a, {"node-a", "node-b"}))
    async with page_for(browser, a, tmp_path / "cluster-page.png") as page:
        await expect(page.locator("#rows")).to_have_text("No sessions.")
        first = await open_cat(b)
        second = None
        try:
            sid = ""

            async def listed() -> bool:
                nonlocal sid
                rows = [r for r in (await sessions_on(a))["sessions"] if r["node"] == "node-b"]
                sid = rows[0]["id"] if rows else ""
                return bool(sid)

            await until(listed)
            await expect(row(page, sid).locator("td.node")).to_have_text("node-b")
            await row(page, sid).locator("button.disconnect").click()
            await page.fill("#reason", "seen from node A")
            await page.click("#confirm-ok")
            await expect(row(page, sid)).to_have_count(0)
            _, err = await first.communicate()
            assert "You have been disconnected. seen from node A" in err.decode(), err

            second = await open_cat(b)
            await until(listed)
            await expect(row(page, sid).locator("td.node")).to_have_text("node-b")
            cluster = b.app._cluster
            assert cluster is not None
            for t in cluster._tasks:  # what SIGKILL does to its heartbeat and its Redis link, without killing the test
                t.cancel()
            await expect(row(page, sid)).to_have_count(0)
        finally:
            for proc in (first, second):
                if proc is not None and proc.returncode is None:
                    proc.kill()
                    await proc.wait()
