"""Where the session view is shared. One node alone needs only the local backend."""

from __future__ import annotations

from typing import Protocol

from gateway.sessions.model import SessionEvent, SessionInfo


class SessionBackend(Protocol):
    async def publish(self, event: SessionEvent) -> None: ...

    async def list_remote(self) -> list[SessionInfo]: ...


class LocalBackend:
    """The embedded default: nothing to share with."""

    async def publish(self, event: SessionEvent) -> None:
        return None

    async def list_remote(self) -> list[SessionInfo]:
        return []
