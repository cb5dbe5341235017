"""What operators do to access as a whole: locks, ending connections, and a reload taking access away.

The registry ends sessions and the connection registry ends connections; this class
decides which, for a lock, an operator's "end this connection", or a reload whose
rules no longer grant a live session. Every session it ends gets the text the user
reads and its true reason (`locked`, `terminated_by_operator`, `access_revoked`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from structlog.typing import FilteringBoundLogger

from gateway.kinds import Reason
from gateway.locks import Lock, LockError, LockKind, LockStore, lock_from_dict
from gateway.sessions.connections import ConnectionRegistry
from gateway.sessions.model import notice_text, prefixed
from gateway.sessions.registry import SessionRegistry
from gateway.websessions import WebSessions


@dataclass(frozen=True)
class Ended:
    sessions: int
    connections: int


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


class AccessControl:
    def __init__(
        self,
        registry: SessionRegistry,
        connections: ConnectionRegistry,
        locks: LockStore,
        log: FilteringBoundLogger,
        *,
        notice_prefix: str = "",
    ) -> None:
        self.registry = registry
        self._prefix = notice_prefix
        self.connections = connections
        self.locks = locks
        self._log = log
        self.web_sessions: WebSessions | None = None
        # With [cluster]: tell the other nodes (fire and forget; a node that misses it syncs when it reconnects).
        self.publish_lock: Callable[[dict[str, Any]], None] | None = None
        self.publish_unlock: Callable[[str], None] | None = None

    def _notice(self, text: str) -> str:
        """What the user of a connection this ends reads: the notice, after the configured prefix."""
        return prefixed(self._prefix, notice_text(text))

    def lock(self, kind: LockKind, target: str, reason: str, expires_at: float | None, by: str) -> tuple[Lock, Ended]:
        """Add a lock, then end every live session and connection it covers. Raises LockError, OSError (not saved)."""
        lock = self.locks.add(kind, target, reason, expires_at, by)
        ended = self._enforce(lock, by)
        if self.publish_lock is not None:
            self.publish_lock(lock.to_dict())
        return lock, ended

    def remote_lock(self, raw: dict[str, Any]) -> None:
        """A lock made on another node: kept here too, and what it covers on this node ends."""
        try:
            lock = lock_from_dict(raw)
        except (LockError, ValueError, KeyError, TypeError):
            self._log.warning("cluster_lock_ignored", reason="malformed")
            return
        if self.locks.add_existing(lock):
            self._enforce(lock, lock.created_by)

    def remote_unlock(self, lock_id: str) -> None:
        lock = self.locks.remove(lock_id)
        if lock is not None:
            self._log.info("lock_removed", lock_id=lock.id, kind=lock.kind, target=lock.target, operator="(another node)")

    def _enforce(self, lock: Lock, by: str) -> Ended:
        text = _sentence(lock.refusal()) + "."
        sessions = 0
        for info in self.registry.list():
            if lock.applies(info.user, info.vm, info.source_ip) and self.registry.terminate(info.id, text, 0.0, Reason.LOCKED):
                sessions += 1
        connections = 0
        for conn in self.connections.all():
            if lock.kind != "vm" and lock.applies(conn.user, None, conn.source_ip) and conn.end(self._notice(text)):
                connections += 1
        if lock.kind == "user" and self.web_sessions is not None:
            connections += len(self.web_sessions.end_user(lock.target))  # browser sign-ins of a locked user end too
        self._log.info(
            "lock_added", lock_id=lock.id, kind=lock.kind, target=lock.target, operator=by,
            sessions_ended=sessions, connections_ended=connections,
        )  # fmt: skip
        return Ended(sessions, connections)

    def unlock(self, lock_id: str, by: str) -> Lock | None:
        lock = self.locks.remove(lock_id)
        if lock is not None:
            self._log.info("lock_removed", lock_id=lock.id, kind=lock.kind, target=lock.target, operator=by)
            if self.publish_unlock is not None:
                self.publish_unlock(lock.id)
        return lock

    def end_connection(self, cid: str, text: str, reason: Reason = Reason.TERMINATED_BY_OPERATOR) -> Ended | None:
        """End one connection and the sessions it carries, showing `text`. None: no such connection."""
        conn = self.connections.get(cid)
        if conn is None:
            return None
        sessions = 0
        for info in self.registry.list():
            if info.connection_id == cid and self.registry.terminate(info.id, text, 0.0, reason):
                sessions += 1
        ended = conn.end(self._notice(text))
        return Ended(sessions, int(ended))

    def revoke(self, still_a_user: Callable[[str], bool]) -> Ended:
        """After a reload: end the sessions the new policy no longer grants, and the connections of removed users."""
        sessions = 0
        for sid in self.registry.ids():
            session = self.registry.live(sid)
            if session is None or session.recheck is None or session.ended:
                continue
            why = session.recheck()
            if why is not None and self.registry.terminate(sid, why, 0.0, Reason.ACCESS_REVOKED):
                sessions += 1
        connections = 0
        for conn in self.connections.all():
            if not still_a_user(conn.user) and conn.end(self._notice("Your account was removed from the gateway's configuration.")):
                connections += 1
        return Ended(sessions, connections)
