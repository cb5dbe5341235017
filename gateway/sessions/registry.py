"""The one source of truth for live sessions.

Handlers open a session with `async with registry.open(spec, terminate=cb)`;
the registry owns the live objects, counts bytes through them, logs the
canonical `session_closed` line, and calls `terminate` when an operator
ends a session.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from gateway.clock import Clock
from gateway.errors import GatewayError
from gateway.sessions.model import SessionEvent, SessionInfo, SessionSpec

TerminateCallback = Callable[[str, float], Awaitable[None]]
NoticeCallback = Callable[[str], Awaitable[bool]]


class SessionObserver(Protocol):
    """Told about every session's start and end (metrics implement this)."""

    def session_opened(self, info: SessionInfo) -> None: ...

    def session_closed(self, info: SessionInfo, reason: str, duration_s: float) -> None: ...


class Session:
    """A live session. Mutable state is owned here; handlers only add bytes and set a close reason."""

    __slots__ = (
        "_spec",
        "bytes_down",
        "bytes_up",
        "close_reason",
        "id",
        "node",
        "notice_cb",
        "started_at",
        "started_mono",
        "state",
        "terminate_cb",
    )

    def __init__(
        self,
        sid: str,
        spec: SessionSpec,
        node: str,
        clock: Clock,
        *,
        terminate: TerminateCallback | None = None,
        notice: NoticeCallback | None = None,
    ) -> None:
        self.id = sid
        self._spec = spec
        self.node = node
        self.started_at = clock.now()
        self.started_mono = clock.monotonic()
        self.bytes_up = 0
        self.bytes_down = 0
        self.state = "active"
        self.close_reason: str | None = None
        self.terminate_cb = terminate
        self.notice_cb = notice

    @property
    def spec(self) -> SessionSpec:
        return self._spec

    def add_up(self, n: int) -> None:
        self.bytes_up += n

    def add_down(self, n: int) -> None:
        self.bytes_down += n

    def snapshot(self) -> SessionInfo:
        s = self._spec
        return SessionInfo(
            id=self.id,
            user=s.user,
            source_ip=s.source_ip,
            source_port=s.source_port,
            vm=s.vm,
            target_address=s.target_address,
            target_port=s.target_port,
            protocol=s.protocol,
            login=s.login,
            started_at=self.started_at,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            node=self.node,
            state=self.state,
        )


@dataclass(frozen=True)
class Totals:
    active: int
    opened: int
    closed: int


class SessionRegistry:
    def __init__(
        self,
        node: str,
        clock: Clock,
        log: FilteringBoundLogger,
        event_queue_size: int = 256,
        observer: SessionObserver | None = None,
    ) -> None:
        self._observer = observer
        self._node = node
        self._clock = clock
        self._log = log
        self._sessions: dict[str, Session] = {}
        self._subscribers: set[asyncio.Queue[SessionEvent | None]] = set()
        self._queue_size = event_queue_size
        self._opened = 0
        self._closed = 0
        self._closed_bytes: dict[tuple[str, str], int] = {}
        self._progress: dict[str, tuple[int, int]] = {}

    def set_observer(self, observer: SessionObserver) -> None:
        self._observer = observer

    @asynccontextmanager
    async def open(
        self, spec: SessionSpec, terminate: TerminateCallback | None = None, notice: NoticeCallback | None = None
    ) -> AsyncIterator[Session]:
        """Track a session for the duration of the block.

        On exit the session leaves the registry and one `session_closed` line is
        logged with the reason: `session.close_reason` if the handler set one,
        else the exception's reason slug, else `closed`. Exceptions propagate.
        """
        sid = secrets.token_hex(8)
        session = Session(sid, spec, self._node, self._clock, terminate=terminate, notice=notice)
        self._sessions[sid] = session
        self._opened += 1
        self._publish(SessionEvent("opened", session.snapshot()))
        if self._observer is not None:
            self._observer.session_opened(session.snapshot())
        self._log.info("session_opened", **_fields(session.snapshot()))
        error: BaseException | None = None
        try:
            yield session
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._sessions.pop(sid, None)
            self._closed += 1
            session.state = "closed"
            reason = session.close_reason
            if reason is None:
                if isinstance(error, GatewayError):
                    reason = error.reason
                elif isinstance(error, asyncio.CancelledError):
                    reason = "cancelled"
                elif error is not None:
                    reason = "internal_error"
                else:
                    reason = "closed"
            info = session.snapshot()
            for direction, n in (("up", info.bytes_up), ("down", info.bytes_down)):
                key = (info.protocol, direction)
                self._closed_bytes[key] = self._closed_bytes.get(key, 0) + n
            duration = round(self._clock.monotonic() - session.started_mono, 3)
            self._publish(SessionEvent("closed", info, reason))
            self._log.info("session_closed", **_fields(info), duration_s=duration, reason=reason)
            if self._observer is not None:
                self._observer.session_closed(info, reason, duration)

    def list(self) -> list[SessionInfo]:
        return [s.snapshot() for s in self._sessions.values()]

    def get(self, sid: str) -> SessionInfo | None:
        s = self._sessions.get(sid)
        return s.snapshot() if s else None

    async def terminate(self, sid: str, reason: str, grace: float = 0.0) -> bool:
        """Ask a session to end, after `grace` seconds. Returns False if there is no such session.

        Repeating it is harmless (a second request while one is pending changes
        nothing). The handler's callback warns the user when there is a grace
        period, then shows the notice and makes the session's block exit; it
        returns once the request is accepted, not when the session has ended.
        """
        s = self._sessions.get(sid)
        if s is None:
            return False
        if s.state == "terminating":
            return True
        s.state = "terminating"
        s.close_reason = "terminated_by_operator"
        self._publish(SessionEvent("updated", s.snapshot()))
        if s.terminate_cb is not None:
            await s.terminate_cb(reason, grace)
        return True

    async def notify(self, sid: str, message: str) -> bool | None:
        """Show `message` to a session's user. None: no such session; False: its protocol cannot show text."""
        s = self._sessions.get(sid)
        if s is None:
            return None
        if s.notice_cb is None:
            return False
        return await s.notice_cb(message)

    async def wait_closed(self, sid: str, timeout: float) -> bool:
        """Wait (bounded) until a session has left the registry. True if it has."""
        if sid not in self._sessions:
            return True
        q = self.subscribe()
        try:
            async with asyncio.timeout(timeout):
                while sid in self._sessions:
                    ev = await q.get()
                    if ev is None:  # fell behind: poll instead
                        q = self.subscribe()
        except TimeoutError:
            return sid not in self._sessions
        finally:
            self.unsubscribe(q)
        return True

    def publish_progress(self) -> int:
        """Publish an `updated` event for every session whose byte counts moved since the last call.

        Called on a timer by the owner of the registry, so live views see bytes grow. Returns how many.
        """
        n = 0
        for sess in self._sessions.values():
            mark = (sess.bytes_up, sess.bytes_down)
            if self._progress.get(sess.id) != mark:
                self._progress[sess.id] = mark
                self._publish(SessionEvent("updated", sess.snapshot()))
                n += 1
        for sid in [k for k in self._progress if k not in self._sessions]:
            del self._progress[sid]
        return n

    def bytes_by_protocol(self) -> dict[tuple[str, str], int]:
        """Bytes relayed so far, by (protocol, direction), live sessions included."""
        out = dict(self._closed_bytes)
        for sess in self._sessions.values():
            p = sess.spec.protocol
            out[(p, "up")] = out.get((p, "up"), 0) + sess.bytes_up
            out[(p, "down")] = out.get((p, "down"), 0) + sess.bytes_down
        return out

    def subscribe(self) -> asyncio.Queue[SessionEvent | None]:
        """A bounded event stream. A subscriber that falls behind gets `None` and is dropped."""
        q: asyncio.Queue[SessionEvent | None] = asyncio.Queue(self._queue_size)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[SessionEvent | None]) -> None:
        self._subscribers.discard(q)

    def totals(self) -> Totals:
        return Totals(active=len(self._sessions), opened=self._opened, closed=self._closed)

    def _publish(self, event: SessionEvent) -> None:
        for q in list(self._subscribers):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                self._subscribers.discard(q)
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)


def _fields(info: SessionInfo) -> dict[str, object]:
    d = info.as_dict()
    d["session_id"] = d.pop("id")
    return d
