"""What every protocol handler shares: who the client is, and how a handler is started."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.policy import Principal


@dataclass(frozen=True)
class Client:
    """The authenticated peer of a door."""

    principal: Principal
    source_ip: str
    source_port: int


class Spawner(Protocol):
    """The owner of a connection's tasks (the door's connection supervisor)."""

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]: ...


class ProtocolHandler(Protocol):
    """One way of reaching a VM. `kind` is the session protocol it records."""

    kind: str


class UpstreamObserver(Protocol):
    """Told how reaching VMs went (metrics implement this). VM names are inventory names."""

    def dial_succeeded(self, vm: str, seconds: float) -> None: ...

    def dial_failed(self, vm: str, reason: str) -> None: ...


class NullUpstreamObserver:
    def dial_succeeded(self, vm: str, seconds: float) -> None:
        return None

    def dial_failed(self, vm: str, reason: str) -> None:
        return None
