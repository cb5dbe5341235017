"""A control port's /v1/events read as the sessions page reads it (Server-Sent Events over HTTPS)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

Match = Callable[[str, dict[str, Any]], bool]
NextEvent = Callable[[Match], Awaitable[dict[str, Any]]]


@contextlib.asynccontextmanager
async def event_stream(control_url: str, token: str, cafile: str, timeout: float = 20.0) -> AsyncIterator[NextEvent]:
    """Yields `next(match)`: the first event whose (kind, data) `match` accepts, as {"kind", **data}, within `timeout`."""
    ctx = ssl.create_default_context(cafile=cafile)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http, http.get(control_url + "/v1/events", headers=headers, ssl=ctx) as r:
        assert r.status == 200

        async def next_event(match: Match) -> dict[str, Any]:
            kind = ""
            async with asyncio.timeout(timeout):
                async for raw in r.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and match(kind, data := json.loads(line[6:])):
                        return {"kind": kind, **data}
            raise AssertionError("the event stream ended")

        yield next_event
