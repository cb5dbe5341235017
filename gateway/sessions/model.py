"""Session value objects and events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal


@dataclass(frozen=True)
class SessionSpec:
    """What a handler knows when it opens a session."""

    user: str
    source_ip: str
    source_port: int
    vm: str
    target_address: str
    target_port: int
    protocol: str
    login: str | None = None


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of one live or ended session."""

    id: str
    user: str
    source_ip: str
    source_port: int
    vm: str
    target_address: str
    target_port: int
    protocol: str
    login: str | None
    started_at: datetime
    bytes_up: int
    bytes_down: int
    node: str
    state: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "source_ip": self.source_ip,
            "source_port": self.source_port,
            "vm": self.vm,
            "target_address": self.target_address,
            "target_port": self.target_port,
            "protocol": self.protocol,
            "login": self.login,
            "started_at": self.started_at.isoformat().replace("+00:00", "Z"),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "node": self.node,
            "state": self.state,
        }


@dataclass(frozen=True)
class SessionEvent:
    kind: Literal["opened", "closed", "updated"]
    session: SessionInfo
    reason: str | None = None
