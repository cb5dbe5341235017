"""What every protocol handler shares: who the client is, and how a handler is started."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import VM
from gateway.policy import Principal
from gateway.sessions.model import SessionSpec


@dataclass(frozen=True)
class Client:
    """The authenticated peer of a door."""

    principal: Principal
    source_ip: str
    source_port: int


def session_spec(client: Client, vm: VM, port: int, protocol: str, login: str | None = None) -> SessionSpec:
    """The registry entry for a relay from `client` to an inventory VM."""
    return SessionSpec(
        user=client.principal.name,
        source_ip=client.source_ip,
        source_port=client.source_port,
        vm=vm.name,
        target_address=vm.address,
        target_port=port,
        protocol=protocol,
        login=login,
    )


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
