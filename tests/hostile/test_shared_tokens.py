"""Nodes sharing one token signing key (tunnel.token_key_file): a token minted on one node works on another, and a
rollover (the new key beside the previous one, applied by a reload) keeps old tokens working while new ones use
the new key. Issue 11's shared tokens; the rest of the cluster is not built yet."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from gateway.tokens import TokenService
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.support.clock import FakeClock


def key_file(path: Path) -> Path:
    path.write_bytes(os.urandom(32))
    os.chmod(path, 0o600)
    return path


def node(tmp: Path, name: str, key: Path, previous: Path | None = None) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["state_dir"] = str(tmp / name)
        cfg["gateway"]["node"] = name
        cfg["tunnel"] = {"token_key_file": str(key), **({"previous_token_key_file": str(previous)} if previous else {})}

    return edit


async def tunnel_status(gw: Gateway, token: str) -> int:
    """GET /v1/tunnel without the upgrade: 401 means the token was refused, 400 that it passed and the request did not."""
    ctx = ssl.create_default_context(cafile=str(Path(gw.raw["gateway"]["state_dir"]) / "tls.crt"))
    url = f"https://127.0.0.1:{gw.port}/v1/tunnel?vm=web01&port=22"
    async with aiohttp.ClientSession() as http, http.get(url, headers={"Authorization": f"Bearer {token}"}, ssl=ctx) as resp:
        return resp.status


async def test_a_token_from_one_node_works_on_another_and_survives_a_rollover(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    k1, k2 = key_file(tmp_path / "k1"), key_file(tmp_path / "k2")
    async with make_gateway(node(tmp_path, "node-a", k1)) as a, make_gateway(node(tmp_path, "node-b", k1)) as b:
        old, _ = a.app.tokens.issue("alice")
        assert await tunnel_status(b, old) != 401  # minted on A, accepted on B
        # Rollover on B: the new key signs, the previous one still verifies.
        b.raw["tunnel"] = {"token_key_file": str(k2), "previous_token_key_file": str(k1)}
        assert await b.app.reload()
        assert await tunnel_status(b, old) != 401
        new, _ = b.app.tokens.issue("alice")
        assert await tunnel_status(b, new) != 401
        assert await tunnel_status(a, new) == 401  # A has not rolled over yet: it does not know k2
        stranger = TokenService(os.urandom(32), FakeClock(), 600)  # a node with a key of its own
        forged, _ = stranger.issue("alice")
        assert await tunnel_status(b, forged) == 401


async def test_a_key_file_that_is_unsafe_or_short_stops_the_start(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    from gateway.errors import StartupError

    short = tmp_path / "short"
    short.write_bytes(b"x" * 10)
    os.chmod(short, 0o600)
    try:
        async with make_gateway(node(tmp_path, "node-a", short)):
            raise AssertionError("started with a 10-byte key")
    except StartupError as exc:
        assert "tunnel.token_key_file" in exc.message and "shorter than 32 bytes" in exc.message
    loose = key_file(tmp_path / "loose")
    os.chmod(loose, 0o644)
    try:
        async with make_gateway(node(tmp_path, "node-b", loose)):
            raise AssertionError("started with a world-readable key")
    except StartupError as exc:
        assert "tunnel.token_key_file" in exc.message and "0644" in exc.message
