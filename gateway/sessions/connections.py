"""Authenticated client connections, as operators see them: who, from where, how, since when, how many channels.

A session is one relayed stream; a connection is what carries it: an SSH connection may
hold a gateway shell, several sessions and forwards, or nothing at all. Doors add a
connection once its user is authenticated and remove it when it goes away, and give
an `end(text)` callback so operators (and locks) can end it with a text the user reads.
The registry never holds a socket.
"""

from __future__ import annotations

import asyncio
import builtins
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.clock import Clock
from gateway.sessions.model import iso

EndCallback = Callable[[str], None]  # start ending the connection, showing the text; returns at once


@dataclass(frozen=True)
class ConnectionInfo:
    id: str
    user: str
    source_ip: str
    source_port: int
    door: str  # "ssh" | "websocket"
    auth_method: str
    since: datetime
    channels: int
    idle_s: float  # seconds without any channel (0 while one is open)
    node: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "source_ip": self.source_ip,
            "source_port": self.source_port,
            "door": self.door,
            "auth_method": self.auth_method,
            "since": iso(self.since),
            "channels": self.channels,
            "idle_s": round(self.idle_s, 3),
            "node": self.node,
        }


class Connection:
    """One live connection. The door changes `channels` through `channel_opened`/`channel_closed`."""

    def __init__(
        self, cid: str, user: str, source: tuple[str, int], door: str, auth_method: str, *, clock: Clock, node: str, end: EndCallback
    ) -> None:
        self.id = cid
        self.user = user
        self.source_ip, self.source_port = source
        self.door = door
        self.auth_method = auth_method
        self._clock = clock
        self._node = node
        self._end = end
        self.since = clock.now()
        self.channels = 0
        self.idle_since: float | None = clock.monotonic()
        self.ending = False
        self.changed = asyncio.Event()

    def channel_opened(self) -> None:
        self.channels += 1
        self.idle_since = None
        self.changed.set()

    def channel_closed(self) -> None:
        self.channels = max(0, self.channels - 1)
        if self.channels == 0:
            self.idle_since = self._clock.monotonic()
        self.changed.set()

    def end(self, text: str) -> bool:
        """Start ending it (once). False when it is already ending."""
        if self.ending:
            return False
        self.ending = True
        self._end(text)
        return True

    def snapshot(self) -> ConnectionInfo:
        idle = 0.0 if self.idle_since is None else max(0.0, self._clock.monotonic() - self.idle_since)
        return ConnectionInfo(
            self.id, self.user, self.source_ip, self.source_port, self.door, self.auth_method, self.since, self.channels, idle, self._node
        )


class ConnectionRegistry:
    """Owns the table of live authenticated connections."""

    def __init__(self, node: str, clock: Clock) -> None:
        self._node = node
        self._clock = clock
        self._live: dict[str, Connection] = {}

    def add(self, user: str, source: tuple[str, int], door: str, auth_method: str, end: EndCallback) -> Connection:
        conn = Connection(secrets.token_hex(6), user, source, door, auth_method, clock=self._clock, node=self._node, end=end)
        self._live[conn.id] = conn
        return conn

    def remove(self, conn: Connection) -> None:
        self._live.pop(conn.id, None)

    def list(self) -> builtins.list[ConnectionInfo]:
        return [c.snapshot() for c in self._live.values()]

    def get(self, cid: str) -> Connection | None:
        return self._live.get(cid)

    def all(self) -> builtins.list[Connection]:
        return list(self._live.values())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self._live.values():
            out[c.door] = out.get(c.door, 0) + 1
        return out
