"""Session value objects, events, and the texts users read when a session is ended for them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gateway.kinds import Protocol, Reason


@dataclass(frozen=True)
class SessionSpec:
    """What a handler knows when it opens a session."""

    user: str
    source_ip: str
    source_port: int
    vm: str
    target_address: str
    target_port: int
    protocol: Protocol
    login: str | None = None
    connection_id: str | None = None
    client_name: str | None = None  # what the client calls its machine (RD Gateway's TUNNEL_AUTH), for the audit


@dataclass(frozen=True)
class Pending:
    """A disconnect that was asked for and has not happened yet."""

    reason: Reason
    text: str  # what the user reads when it happens
    ends_mono: float
    ends_at: datetime


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
    protocol: Protocol
    login: str | None
    started_at: datetime
    bytes_up: int
    bytes_down: int
    node: str
    state: Literal["active", "terminating", "closed"]
    ends_at: datetime | None = None  # when state is terminating: when the session will be ended
    connection_id: str | None = None
    client_name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "source_ip": self.source_ip,
            "source_port": self.source_port,
            "vm": self.vm,
            "target_address": self.target_address,
            "target_port": self.target_port,
            "protocol": str(self.protocol),
            "login": self.login,
            "started_at": iso(self.started_at),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "node": self.node,
            "state": self.state,
            "ends_at": iso(self.ends_at) if self.ends_at is not None else None,
            "connection_id": self.connection_id,
            "client_name": self.client_name,
        }


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Progress:
    """Byte counts of one session, for the coalesced `progress` event."""

    id: str
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True)
class SessionEvent:
    """One change of the registry.

    `opened`, `updated` (state changed) and `closed` carry the session; `progress`
    carries every session whose byte counts moved since the last tick, in one event.
    With [cluster], another node's event arrives as `remote`: its payload as that node's API shows it.
    """

    kind: Literal["opened", "closed", "updated", "progress"]
    session: SessionInfo | None = None
    reason: Reason | None = None
    progress: tuple[Progress, ...] = ()
    remote: dict[str, Any] | None = None


def notice_text(reason: str) -> str:
    """What a user reads when a session is ended for them."""
    return "You have been disconnected." + (f" {reason}" if reason else "")


def prefixed(prefix: str, text: str) -> str:
    """`text` after the configured notice prefix (`gateway.notice_prefix`), once, so it stands out from program output."""
    return f"{prefix} {text}" if prefix and not text.startswith(prefix) else text


def seconds_text(seconds: float) -> str:
    n = max(1, math.ceil(seconds - 0.05))  # 1.5 s left reads "2 seconds"; a few ms of scheduling do not make it "1"
    return f"{n} second" if n == 1 else f"{n} seconds"


def warning_text(reason: str, seconds: float) -> str:
    """What a user reads when a session will be ended for them in `seconds`."""
    head = f"You will be disconnected in {seconds_text(seconds)}"
    return f"{head}: {reason}" if reason else f"{head}."
