"""Browser sign-ins: who holds which session cookie, until when.

A browser session is created by a one-time link (`ssh USER@GATEWAY web`) or an OIDC sign-in and is named by a
random 256-bit id that only the browser's HttpOnly cookie carries (the store keeps its SHA-256, so a memory
dump or a log line can never be replayed as a cookie). It has a fixed lifetime, ends on sign-out, and is
ended by a lock on its user. The store is bounded; the oldest sessions go first when it is full.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

from gateway.clock import Clock
from gateway.policy import Principal

MAX_SESSIONS = 10_000


@dataclass
class WebSession:
    principal: Principal
    created: float  # Unix seconds
    expires: float
    key: bytes = field(repr=False)  # SHA-256 of the cookie value
    connections: set[str] = field(default_factory=set)  # connection ids of this browser's terminals


def _digest(cookie: str) -> bytes:
    return hashlib.sha256(cookie.encode("utf-8", "surrogatepass")).digest()


class WebSessions:
    """Owns the browser sessions. Not thread-safe (one event loop)."""

    def __init__(self, clock: Clock, lifetime: float, max_sessions: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self.lifetime = lifetime
        self._max = max_sessions
        self._by_key: OrderedDict[bytes, WebSession] = OrderedDict()
        self.evicted = 0

    def create(self, principal: Principal) -> tuple[str, WebSession]:
        """A new session; returns the cookie value (shown to nobody but the browser) and the session."""
        now = self._clock.now().timestamp()
        self._sweep(now)
        while len(self._by_key) >= self._max:
            self._by_key.popitem(last=False)
            self.evicted += 1
        cookie = secrets.token_urlsafe(32)
        session = WebSession(principal, now, now + self.lifetime, _digest(cookie))
        self._by_key[session.key] = session
        return cookie, session

    def get(self, cookie: str | None) -> WebSession | None:
        if not cookie or len(cookie) > 128:
            return None
        session = self._by_key.get(_digest(cookie))
        if session is None:
            return None
        if session.expires <= self._clock.now().timestamp():
            del self._by_key[session.key]
            return None
        return session

    def end(self, session: WebSession) -> None:
        self._by_key.pop(session.key, None)

    def end_user(self, user: str) -> list[WebSession]:
        """A lock on `user`: every browser session of theirs ends (the caller ends their terminals)."""
        gone = [s for s in self._by_key.values() if s.principal.name == user]
        for s in gone:
            del self._by_key[s.key]
        return gone

    def __len__(self) -> int:
        return len(self._by_key)

    def _sweep(self, now: float) -> None:
        for key in [k for k, s in self._by_key.items() if s.expires <= now]:
            del self._by_key[key]
