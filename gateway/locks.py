"""Locks: an operator's "nobody gets in as this user / to this VM / from this network" until it expires or is lifted.

A lock names one target: a user, a VM, or a source (an IP address or a CIDR). While it holds,
new logins, tokens and tunnels of the target are refused with the lock's reason, and the app
ends what is live (`app.py` does that: this module only knows the locks). A user lock also
revokes every tunnel token issued to that user before it, for good: lifting the lock does not
bring old tokens back.

Locks survive a restart in a small JSON file in the state dir, written atomically (temp file,
fsync, rename) with mode 0600. A file that cannot be read or parsed stops the start with its
name: silently starting without the locks would let locked users back in.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from gateway.clock import Clock
from gateway.config import NAME_RE, USER_RE, parse_duration
from gateway.errors import StartupError
from gateway.text import one_line

LockKind = Literal["user", "vm", "source"]
KINDS: tuple[LockKind, ...] = ("user", "vm", "source")
MAX_LOCKS = 10_000
MAX_REASON = 300
_VERSION = 1


class LockError(ValueError):
    """A lock request that cannot be taken; the message names the field and the value."""


@dataclass(frozen=True)
class Lock:
    id: str
    kind: LockKind
    target: str  # a user name, a VM name, or a network in CIDR form ("192.0.2.7/32")
    reason: str
    created_at: float  # Unix seconds
    expires_at: float | None  # Unix seconds; None: until lifted
    created_by: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "reason": self.reason,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at) if self.expires_at is not None else None,
            "created_by": self.created_by,
        }

    def to_dict(self) -> dict[str, Any]:
        """Unix times, as the locks file and the cluster carry it."""
        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "reason": self.reason,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "created_by": self.created_by,
        }

    def refusal(self) -> str:
        """What a refused user reads."""
        what = {"user": "your account", "vm": f"VM {self.target!r}", "source": "your network"}[self.kind]
        return f"access to {what} is locked by an operator" + (f": {self.reason}" if self.reason else "")

    def applies(self, user: str | None, vm: str | None, source: str | None) -> bool:
        if self.kind == "user":
            return user is not None and user == self.target
        if self.kind == "vm":
            return vm is not None and vm == self.target
        return source is not None and _in_network(source, self.target)


def lock_from_dict(raw: dict[str, Any]) -> Lock:
    """A lock as another node published it (`Lock.to_dict`). Raises LockError/ValueError/KeyError on anything else."""
    kind, target = parse_target(str(raw["kind"]), raw["target"])
    expires = raw.get("expires_at")
    return Lock(
        id=str(raw["id"])[:32],
        kind=kind,
        target=target,
        reason=clean_reason(raw.get("reason", "")),
        created_at=float(raw["created_at"]),
        expires_at=float(expires) if expires is not None else None,
        created_by=str(raw.get("created_by", ""))[:64],
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _in_network(address: str, network: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip in ipaddress.ip_network(network)
    except ValueError:
        return False


def parse_target(kind: str, target: object) -> tuple[LockKind, str]:
    """Validate a lock's target. Raises LockError naming the field and the value."""
    if kind not in KINDS:
        raise LockError(f"give exactly one of {', '.join(KINDS)}")
    if not isinstance(target, str) or not target:
        raise LockError(f"{kind} must be a non-empty string")
    if kind == "user":
        if not USER_RE.fullmatch(target):
            raise LockError(f"user: not a valid user name: {target[:64]!r}")
        return "user", target
    if kind == "vm":
        if not NAME_RE.fullmatch(target):
            raise LockError(f"vm: not a valid VM name: {target[:64]!r}")
        return "vm", target
    try:
        net = ipaddress.ip_network(target, strict=False)
    except ValueError:
        raise LockError(f"source: not an IP address or CIDR network: {target[:64]!r}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen == 128 and net.network_address.ipv4_mapped is not None:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/32")
    return "source", str(net)


def parse_expires(value: object, now: float) -> float | None:
    """None (until lifted), a duration ("30m", "2h") from now, or an ISO 8601 time in the future. Raises LockError."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise LockError("expires must be a duration like '30m' or an ISO 8601 time")
    seconds: float | None = None
    with contextlib.suppress(ValueError):
        seconds = parse_duration(value)
    if seconds is not None:
        if seconds <= 0:
            raise LockError(f"expires must be in the future, got {value[:64]!r}")
        return now + seconds
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise LockError(f"expires: not a duration like '30m' or an ISO 8601 time: {value[:64]!r}") from None
    if when.tzinfo is None:
        raise LockError(f"expires: give a time zone (e.g. 'Z'): {value[:64]!r}")
    ts = when.timestamp()
    if ts <= now:
        raise LockError(f"expires must be in the future, got {value[:64]!r}")
    return ts


def clean_reason(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LockError("reason must be a string")
    text = one_line(value)
    if len(text) > MAX_REASON:
        raise LockError(f"reason is limited to {MAX_REASON} characters")
    return text


class LockStore:
    """Owns the locks and their file. Expired locks are dropped whenever the store is read."""

    def __init__(self, path: Path | None, clock: Clock) -> None:
        self._path = path
        self._clock = clock
        self._locks: dict[str, Lock] = {}
        self._revoked_before: dict[str, float] = {}  # user -> tokens issued before this time are void

    def load(self) -> None:
        """Read the file if there is one. Raises StartupError naming the file when it is unusable."""
        if self._path is None or not self._path.exists():
            return
        try:
            data = json.loads(self._path.read_text())
            if not isinstance(data, dict) or data.get("version") != _VERSION:
                raise ValueError("not a locks file of this version")  # noqa: TRY301 - reported like every other parse error below
            locks = {}
            for raw in data.get("locks", []):
                kind, target = parse_target(str(raw["kind"]), raw["target"])
                lock = Lock(
                    id=str(raw["id"]),
                    kind=kind,
                    target=target,
                    reason=clean_reason(raw.get("reason", "")),
                    created_at=float(raw["created_at"]),
                    expires_at=float(raw["expires_at"]) if raw.get("expires_at") is not None else None,
                    created_by=str(raw.get("created_by", "")),
                )
                locks[lock.id] = lock
            revoked = {str(u): float(t) for u, t in dict(data.get("tokens_revoked_before", {})).items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StartupError(f"locks file {str(self._path)!r} is unusable ({exc}); fix or remove it") from None
        self._locks = locks
        self._revoked_before = revoked
        self._prune()

    def _now(self) -> float:
        return self._clock.now().timestamp()

    def _prune(self) -> list[Lock]:
        now = self._now()
        gone = [lk for lk in self._locks.values() if lk.expires_at is not None and lk.expires_at <= now]
        for lk in gone:
            del self._locks[lk.id]
        return gone

    def _save(self) -> None:
        if self._path is None:
            return
        data = {
            "version": _VERSION,
            "locks": [
                {
                    "id": lk.id,
                    "kind": lk.kind,
                    "target": lk.target,
                    "reason": lk.reason,
                    "created_at": lk.created_at,
                    "expires_at": lk.expires_at,
                    "created_by": lk.created_by,
                }
                for lk in self._locks.values()
            ],
            "tokens_revoked_before": self._revoked_before,
        }
        tmp = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")  # workers share the state dir
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)

    def add(self, kind: LockKind, target: str, reason: str, expires_at: float | None, by: str) -> Lock:
        """Add a lock (already validated by `parse_target`/`parse_expires`) and persist it. Raises LockError when full."""
        self._prune()
        if len(self._locks) >= MAX_LOCKS:
            raise LockError(f"at most {MAX_LOCKS} locks at once; lift some first")
        now = self._now()
        lock = Lock(secrets.token_hex(6), kind, target, reason, now, expires_at, by)
        previous = dict(self._locks), dict(self._revoked_before)
        self._locks[lock.id] = lock
        if kind == "user":
            self._revoked_before[target] = now
        try:
            self._save()
        except OSError:
            self._locks, self._revoked_before = previous
            raise
        return lock

    def add_existing(self, lock: Lock) -> bool:
        """A lock another node of the cluster made: kept (and persisted) like our own. False if known or expired."""
        self._prune()
        if lock.id in self._locks or (lock.expires_at is not None and lock.expires_at <= self._now()) or len(self._locks) >= MAX_LOCKS:
            return False
        self._locks[lock.id] = lock
        if lock.kind == "user":
            self._revoked_before[lock.target] = max(self._revoked_before.get(lock.target, 0.0), lock.created_at)
        self._save()
        return True

    def remove(self, lock_id: str) -> Lock | None:
        self._prune()
        lock = self._locks.pop(lock_id, None)
        if lock is not None:
            try:
                self._save()
            except OSError:
                self._locks[lock.id] = lock
                raise
        return lock

    def list(self) -> list[Lock]:
        self._prune()
        return sorted(self._locks.values(), key=lambda lk: lk.created_at)

    def match(self, *, user: str | None = None, vm: str | None = None, source: str | None = None) -> Lock | None:
        """The first live lock that applies to any of the given targets."""
        now = self._now()
        for lk in self._locks.values():
            if (lk.expires_at is None or lk.expires_at > now) and lk.applies(user, vm, source):
                return lk
        return None

    def refusal(self, *, user: str, vm: str, source: str) -> str | None:
        lock = self.match(user=user, vm=vm, source=source)
        return lock.refusal() if lock is not None else None

    def token_revoked(self, user: str, issued_at: float) -> bool:
        """True for a token of `user` issued before a lock on that user (tokens carry milliseconds)."""
        floor = self._revoked_before.get(user)
        return floor is not None and issued_at < floor
