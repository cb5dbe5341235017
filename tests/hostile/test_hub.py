"""The workers' hub (gateway/hub.py) and the worker sockets (net.listener.bind_group) against what a careless or
hostile local client does: garbage, oversized requests, a subscriber that never reads; and the kernel's choice of
worker by the client's address, on real loopback sockets."""

from __future__ import annotations

import asyncio
import collections
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from gateway.config import ListenAddress
from gateway.hub import Hub


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    h = Hub(tmp_path / "hub.sock", max_request=64 * 1024, max_backlog=256 * 1024)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


def client(h: Hub) -> redis.Redis:
    return redis.from_url(h.url, decode_responses=True, socket_timeout=2, protocol=2)


async def raw(h: Hub, data: bytes) -> bytes:
    """Send `data` on a connection of its own and read until the hub closes it (bounded)."""
    r, w = await asyncio.open_unix_connection(str(h.path))
    w.write(data)
    async with asyncio.timeout(5):
        out = await r.read()
    w.close()
    return out


async def test_only_the_gateways_user_may_open_the_hub(hub: Hub) -> None:
    assert stat.S_IMODE(hub.path.stat().st_mode) == 0o600


@pytest.mark.parametrize("junk", [b"GET k\r\n", b"*2\r\n$3\r\nGET\r\nkk\r\n", b"*1\r\n$999999999\r\n", b"\x16\x03\x01\x02\x00"])
async def test_garbage_closes_only_that_connection(hub: Hub, junk: bytes) -> None:
    """A malformed request gets an error and its connection closed; the store and another client's subscription
    carry on."""
    c = client(hub)
    try:
        await c.set("kept", "1")
        sub = c.pubsub()
        await sub.subscribe("ch")
        assert (await raw(hub, junk)).startswith(b"-ERR")
        assert await c.get("kept") == "1"
        assert await c.publish("ch", "still") == 1
        async with asyncio.timeout(5):
            while (msg := await sub.get_message(ignore_subscribe_messages=True, timeout=1.0)) is None:
                pass
        assert msg["data"] == "still"
        await sub.aclose()  # type: ignore[no-untyped-call]
    finally:
        await c.aclose()


async def test_a_request_over_the_limit_is_refused_before_it_is_buffered(hub: Hub) -> None:
    out = await raw(hub, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\n" + b"x" * 100_000 + b"\r\n")
    assert out.startswith(b"-ERR")
    c = client(hub)
    try:
        assert await c.get("k") is None
    finally:
        await c.aclose()


async def test_a_subscriber_that_stops_reading_is_dropped_not_buffered_for(hub: Hub) -> None:
    """A subscriber that never reads gets at most `max_backlog` queued before the hub drops it (it would reconnect
    and resync, as after a Redis restart); publishers are never held up."""
    r, w = await asyncio.open_unix_connection(str(hub.path))
    w.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n")
    await w.drain()
    async with asyncio.timeout(5):
        assert (await r.readuntil(b":1\r\n")).startswith(b"*3")
    c = client(hub)
    try:
        payload = "y" * 60_000
        async with asyncio.timeout(20):
            while hub.dropped == 0:
                await c.publish("ch", payload)  # bounded: the hub drops the reader after a few MB of kernel and user buffers
        assert await c.publish("ch", payload) == 0  # gone from the channel
    finally:
        await c.aclose()
        w.close()


async def test_unknown_commands_are_named(hub: Hub) -> None:
    """What the cluster never sends is an error naming the command, not a silent OK."""
    c = client(hub)
    try:
        with pytest.raises(redis.ResponseError, match="FLUSHALL"):
            await c.execute_command("FLUSHALL")
    finally:
        await c.aclose()


def test_each_client_address_always_reaches_the_same_worker() -> None:
    """Two worker sockets on one port: each source address lands on one socket every time, and different addresses
    spread over both (127.0.0.1 and 127.0.0.2 differ in the bit the kernel's program takes)."""
    from gateway.net.listener import bind_group

    group = bind_group(ListenAddress("127.0.0.1", 0), 2)
    port = group[0].getsockname()[1]
    try:
        assert [s.getsockname()[1] for s in group] == [port, port]
        hits: dict[str, collections.Counter[int]] = {}
        for src in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"):
            hits[src] = collections.Counter()
            for _ in range(8):
                with socket.socket() as c:
                    c.bind((src, 0))
                    c.connect(("127.0.0.1", port))
                    for i, s in enumerate(group):
                        s.settimeout(0.2)
                        try:
                            conn, _ = s.accept()
                        except TimeoutError:
                            continue
                        conn.close()
                        hits[src][i] += 1
        assert all(len(h) == 1 and sum(h.values()) == 8 for h in hits.values()), hits
        assert {next(iter(h)) for h in hits.values()} == {0, 1}, hits
    finally:
        for s in group:
            s.close()
