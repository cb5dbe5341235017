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
