"""The one source of truth for live sessions.

`run_session()` (in `gateway.protocols.lifecycle`) opens every session with
`async with registry.open(spec, limits=...)`; the registry owns the live
`Session` objects, counts bytes through them, decides the close reason (the
first `end()` wins, whatever wakes first afterwards), logs the canonical
`session_closed` line and publishes events to bounded subscriber queues.

Disconnect requests only record a `Pending` end on the session and wake its
lifecycle; the lifecycle shows the user the texts and ends the session. A later
request with an earlier end replaces a pending one (its reason and text win).
"""

from __future__ import annotations

import asyncio
import builtins
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol

from structlog.typing import FilteringBoundLogger

from gateway.clock import Clock
from gateway.config import Limits
from gateway.errors import GatewayError
from gateway.kinds import Protocol as SessionProtocol
from gateway.kinds import Reason
from gateway.sessions.model import Pending, Progress, SessionEvent, SessionInfo, SessionSpec
from gateway.text import one_line

NoticeCallback = Callable[[str], bool]
# Does the session's access still hold under the current policy? None: yes; else the text the user reads.
Recheck = Callable[[], str | None]
# A subscriber's queue holds this many events; a burst bigger than that costs it one resync, never a silent gap.
EVENT_QUEUE_SIZE = 8192
MAX_SUBSCRIBERS = 64


class SessionObserver(Protocol):
    """Told about every session's start and end (metrics implement this)."""

    def session_opened(self, info: SessionInfo) -> None: ...

    def session_closed(self, info: SessionInfo, reason: str, duration_s: float) -> None: ...


Side = Literal["user", "vm"]


class Session:
    """A live session. Its mutable state is owned here; the lifecycle and the relay report into it.

    The relay calls `add_up`/`add_down` for bytes (user input counts as activity),
    `half_closed(side)` when one direction finished, and `end(reason)` when a side
    went away. The first `end()` decides the reason; later ones are ignored.
    """

    __slots__ = (
        "_clock",
        "_ended",
        "_relayed",
        "_spec",
        "_wake",
        "bytes_down",
        "bytes_up",
        "end_text",
        "half_closed_at",
        "half_closed_side",
        "id",
        "last_input",
        "limits",
        "node",
        "notice_cb",
        "pending",
        "recheck",
        "started_at",
        "started_mono",
        "view_cache",
    )

    def __init__(
        self,
        sid: str,
        spec: SessionSpec,
        *,
        node: str,
        clock: Clock,
        limits: Limits,
        notice: NoticeCallback | None,
        relayed: builtins.list[int] | None = None,
    ) -> None:
        self.id = sid
        self._spec = spec
        self.node = node
        self._clock = clock
        self.limits = limits
        self.started_at = clock.now()
        self.started_mono = clock.monotonic()
        self.last_input = self.started_mono
        self.bytes_up = 0
        self.bytes_down = 0
        # [up, down] bytes of every session of this protocol, live and closed, that the registry keeps: the metrics
        # read it without walking sessions.
        self._relayed = relayed if relayed is not None else [0, 0]
        self.pending: Pending | None = None
        self.half_closed_at: float | None = None
        self.half_closed_side: Side | None = None
        self.end_text: str | None = None
        self.notice_cb = notice
        self.recheck: Recheck | None = None
        loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[Reason] = loop.create_future()
        # What the control API encodes once of the fields that never change after open (its own type; None until listed).
        self.view_cache: object | None = None
        self._wake: asyncio.Future[None] | None = None

    @property
    def spec(self) -> SessionSpec:
        return self._spec

    # -- reported by the relay --
    def add_up(self, n: int) -> None:
        """Bytes from the user to the VM. Input is activity: it resets the idle timer."""
        self.bytes_up += n
        self._relayed[0] += n
        self.last_input = self._clock.monotonic()

    def add_down(self, n: int) -> None:
        """Bytes from the VM to the user. Output is not activity."""
        self.bytes_down += n
        self._relayed[1] += n

    def activity(self) -> None:
        """User input that carries no payload bytes (a window change, a signal)."""
        self.last_input = self._clock.monotonic()

    def half_closed(self, side: Side) -> None:
        """`side` finished sending; the other side now has `half_close_timeout` to finish."""
        if self.half_closed_at is None:
            self.half_closed_at = self._clock.monotonic()
            self.half_closed_side = side
            self.poke()

    def end(self, reason: Reason, text: str | None = None) -> bool:
        """End the session for `reason` (the first call wins). `text` is what the user is shown."""
        if self._ended.done():
            return False
        self.end_text = text
        self._ended.set_result(reason)
        self.poke()
        return True

    # -- read by the lifecycle --
    @property
    def reason(self) -> Reason | None:
        return self._ended.result() if self._ended.done() else None

    @property
    def ended(self) -> bool:
        return self._ended.done()

    def poke(self) -> None:
        """Wake the lifecycle so it re-reads deadlines and pending ends."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def wait_change(self, timeout: float | None) -> None:
        """Wait until poked, ended, or `timeout` seconds of the session's clock passed."""
        if self._ended.done():
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = wake
        # A timer, not a sleeping task: thousands of idle sessions each wait here.
        timer = self._clock.call_later(timeout, self.poke) if timeout is not None else None
        try:
            await wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    def snapshot(self) -> SessionInfo:
        s = self._spec
        state: Literal["active", "terminating", "closed"] = "closed" if self._ended.done() else "active"
        if state == "active" and self.pending is not None:
            state = "terminating"
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
            state=state,
            ends_at=self.pending.ends_at if self.pending is not None and state == "terminating" else None,
            connection_id=s.connection_id,
            client_name=s.client_name,
        )


@dataclass(frozen=True)
class Totals:
    active: int
    opened: int
    closed: int


@dataclass(frozen=True)
class TerminateResult:
    """What a disconnect request did: the end now in force for the session."""

    pending: Pending
    changed: bool  # False: an earlier end was already pending and stays


class StreamEnded(Exception):
    """The registry closed this subscription (the gateway is stopping)."""


class Subscription:
    """A bounded event stream. On overflow it is emptied and marked for one resync, never silently gapped."""

    def __init__(self, size: int, *, local_only: bool = False) -> None:
        self.local_only = local_only  # this node's own events only (the cluster's forwarder)
        self._queue: asyncio.Queue[SessionEvent] = asyncio.Queue(size)
        self.overflowed = False
        self.ended = False
        self._signal = asyncio.Event()

    def end(self) -> None:
        self.ended = True
        self._signal.set()

    def put(self, event: SessionEvent) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflow()
        self._signal.set()

    def overflow(self) -> None:
        """Drop what is queued: the reader's next `get()` returns None (resync from a snapshot)."""
        self.overflowed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._signal.set()

    async def get(self) -> SessionEvent | None:
        """The next event, or None when events were lost: the caller resyncs from `registry.list()`.

        Raises StreamEnded once the registry ended the subscription and every queued event was read.
        """
        while True:
            if self.ended and self._queue.empty():
                raise StreamEnded
            if self.overflowed:
                self.overflowed = False
                return None
            if not self._queue.empty():
                return self._queue.get_nowait()
            self._signal.clear()
            await self._signal.wait()

    def drain(self) -> Iterator[SessionEvent]:
        while not self._queue.empty() and not self.overflowed:
            yield self._queue.get_nowait()


class SubscriberLimit(GatewayError):
    reason = "too_many_subscribers"


class SessionRegistry:
    def __init__(
        self,
        node: str,
        clock: Clock,
        log: FilteringBoundLogger,
        *,
        event_queue_size: int = EVENT_QUEUE_SIZE,
        observer: SessionObserver | None = None,
        max_subscribers: int = MAX_SUBSCRIBERS,
        max_per_user: int | None = None,
        rate_per_user: tuple[float, float] | None = None,
    ) -> None:
        self._observer = observer
        self._node = node
        self._clock = clock
        self._log = log
        self._sessions: dict[str, Session] = {}
        self._gone_waiters: dict[str, builtins.list[_GoneWaiter]] = {}  # by session id: who waits for it to leave
        self._subscribers: set[Subscription] = set()
        self.on_streams: Callable[[], None] | None = None  # called when an event stream opens or closes (the cluster)
        self._queue_size = event_queue_size
        self._max_subscribers = max_subscribers
        self._opened = 0
        self._closed = 0
        self._relayed: dict[str, builtins.list[int]] = {}  # by protocol: [up, down] bytes, live and closed sessions
        self._live: dict[tuple[SessionProtocol, str], int] = {}  # live sessions by (protocol, VM)
        self._progress: dict[str, tuple[int, int]] = {}
        self._empty = asyncio.Event()
        self._empty.set()
        self._max_per_user = max_per_user
        self._per_user: dict[str, int] = {}  # sessions open or being dialled, by user
        # New sessions per user: a token bucket (rate per second, burst). Buckets of users with nothing open
        # and a full bucket are dropped, so the table is bounded by the users active within a burst's refill.
        self._rate = rate_per_user
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, at monotonic)

    @property
    def clock(self) -> Clock:
        return self._clock

    def set_observer(self, observer: SessionObserver) -> None:
        self._observer = observer

    @asynccontextmanager
    async def open(
        self,
        spec: SessionSpec,
        *,
        limits: Limits | None = None,
        notice: NoticeCallback | None = None,
        recheck: Recheck | None = None,
    ) -> AsyncIterator[Session]:
        """Track a session for the duration of the block.

        On exit the session leaves the registry and one `session_closed` line is
        logged with the reason: the first `session.end()`, else the exception's
        reason slug (`internal_error` for a bug, logged with its type), else
        `internal_error` for a block that ended without saying why. Exceptions propagate.
        """
        sid = secrets.token_hex(8)
        relayed = self._relayed.setdefault(str(spec.protocol), [0, 0])
        session = Session(sid, spec, node=self._node, clock=self._clock, limits=limits or Limits(), notice=notice, relayed=relayed)
        key = (spec.protocol, spec.vm)
        self._live[key] = self._live.get(key, 0) + 1
        session.recheck = recheck
        self._sessions[sid] = session
        self._empty.clear()
        self._opened += 1
        info = session.snapshot()
        self._publish(SessionEvent("opened", info))
        if self._observer is not None:
            self._observer.session_opened(info)
        self._log.info("session_opened", **_fields(info))
        del info  # not kept in this frame for the session's life
        error: BaseException | None = None
        try:
            yield session
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not session.ended:
                if isinstance(error, GatewayError) and error.reason in Reason.__members__.values():
                    session.end(Reason(error.reason))
                elif isinstance(error, asyncio.CancelledError):
                    # Only the gateway cancels a session task that has not ended: it is stopping.
                    session.end(Reason.GATEWAY_SHUTDOWN)
                else:
                    session.end(Reason.INTERNAL_ERROR)
            self._close(session, error)

    def _close(self, session: Session, error: BaseException | None) -> None:
        self._sessions.pop(session.id, None)
        # The callbacks lead back to the protocol's objects, which hold the session: left in place, every closed
        # session is a cycle that only a full collection frees (a stop of every relay at 9,000 sessions).
        session.notice_cb = session.recheck = None
        for waiter in self._gone_waiters.pop(session.id, ()):
            waiter.gone(session.id)
        self._progress.pop(session.id, None)
        if not self._sessions:
            self._empty.set()
        self._closed += 1
        reason = session.reason or Reason.INTERNAL_ERROR
        info = session.snapshot()
        key = (session.spec.protocol, session.spec.vm)
        if self._live.get(key, 0) > 1:
            self._live[key] -= 1
        else:
            self._live.pop(key, None)
        duration = round(self._clock.monotonic() - session.started_mono, 3)
        self._publish(SessionEvent("closed", info, reason))
        extra: dict[str, object] = {}
        if session.half_closed_side is not None:
            extra["half_closed_by"] = session.half_closed_side
        if session.pending is not None:
            extra["requested_reason"] = str(session.pending.reason)
        if error is not None and not isinstance(error, GatewayError | asyncio.CancelledError):
            extra["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        self._log.info("session_closed", **_fields(info), duration_s=duration, reason=str(reason), **extra)
        if self._observer is not None:
            self._observer.session_closed(info, str(reason), duration)

    def reserve(self, user: str) -> str | None:
        """Hold one of `user`'s session slots while a session is dialled and lives, or say why not.

        None: reserved; pair it with one `release(user)`. Otherwise the refusal's reason slug:
        `user_session_limit` (at `max_per_user`) or `user_rate_limit` (new sessions faster than
        `rate_per_user` allows).
        """
        n = self._per_user.get(user, 0)
        if self._max_per_user is not None and n >= self._max_per_user:
            return "user_session_limit"
        if self._rate is not None:
            rate, burst = self._rate
            now = self._clock.monotonic()
            tokens, at = self._buckets.get(user, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate)
            if tokens < 1.0:
                self._buckets[user] = (tokens, now)
                return "user_rate_limit"
            self._buckets[user] = (tokens - 1.0, now)
            if len(self._buckets) > 4 * len(self._per_user) + 1024:
                self._forget_full_buckets(now)
        self._per_user[user] = n + 1
        return None

    def _forget_full_buckets(self, now: float) -> None:
        assert self._rate is not None
        rate, burst = self._rate
        for u, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * rate >= burst:
                del self._buckets[u]

    def set_limits(self, max_per_user: int | None, rate_per_user: tuple[float, float] | None) -> None:
        """A reload: new limits for new sessions; live sessions keep their slots."""
        self._max_per_user = max_per_user
        self._rate = rate_per_user

    @property
    def rate_per_user(self) -> tuple[float, float] | None:
        return self._rate

    def release(self, user: str) -> None:
        n = self._per_user.get(user, 0) - 1
        if n > 0:
            self._per_user[user] = n
        else:
            self._per_user.pop(user, None)

    @property
    def max_per_user(self) -> int | None:
        return self._max_per_user

    def list(self) -> list[SessionInfo]:
        return [s.snapshot() for s in self._sessions.values()]

    def get(self, sid: str) -> SessionInfo | None:
        s = self._sessions.get(sid)
        return s.snapshot() if s else None

    def live(self, sid: str) -> Session | None:
        return self._sessions.get(sid)

    def sessions(self) -> builtins.list[Session]:
        """The live sessions now, in the order they opened (a copy: the caller may yield while it reads them)."""
        return list(self._sessions.values())

    def ids(self) -> builtins.list[str]:
        return list(self._sessions)

    def terminate(self, sid: str, text: str, grace: float = 0.0, reason: Reason = Reason.TERMINATED_BY_OPERATOR) -> TerminateResult | None:
        """Ask a session to end `grace` seconds from now, showing the user `text`. None: no such session.

        The request that ends it soonest wins, with its reason and text: a later request
        with a shorter (or no) grace shortens a pending one; a longer one changes nothing.
        The session's lifecycle warns the user, then ends it; this returns at once.
        """
        s = self._sessions.get(sid)
        if s is None:
            return None
        text = one_line(text)  # the notice a user reads: one printable line, whoever asked
        now = self._clock.monotonic()
        if s.ended:  # already ending (its notice is being shown): nothing to change, it is gone in a moment
            return TerminateResult(Pending(s.reason or reason, text, now, self._clock.now()), changed=False)
        ends_mono = now + max(0.0, grace)
        current = s.pending
        if current is not None and current.ends_mono <= ends_mono:
            return TerminateResult(current, changed=False)
        pending = Pending(reason, text, ends_mono, self._clock.now() + timedelta(seconds=max(0.0, grace)))
        s.pending = pending
        self._publish(SessionEvent("updated", s.snapshot()))
        s.poke()
        return TerminateResult(pending, changed=True)

    def notify(self, sid: str, message: str) -> bool | None:
        """Show `message` to a session's user. None: no such session; False: its protocol cannot show text."""
        s = self._sessions.get(sid)
        if s is None:
            return None
        if s.notice_cb is None:
            return False
        return s.notice_cb(one_line(message))  # whoever asked, nothing but one printable line reaches a terminal

    async def wait_closed(self, sid: str, timeout: float) -> bool:
        """Wait (bounded, real time) until a session has left the registry. True if it has."""
        return not await self.wait_all_closed([sid], timeout)

    async def wait_all_closed(self, sids: Iterable[str], timeout: float) -> set[str]:
        """Wait (bounded, real time) until every session of `sids` has left the registry; the ids still here after `timeout`.

        One waiter and one timer for the whole set, however many ids (a bulk disconnect of 1,000 sessions).
        Cancellation propagates; the waiter is removed either way.
        """
        left = {sid for sid in sids if sid in self._sessions}
        if not left:
            return set()
        waiter = _GoneWaiter(left, asyncio.get_running_loop().create_future())
        for sid in left:
            self._gone_waiters.setdefault(sid, []).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter.done
        except TimeoutError:
            pass
        finally:
            for sid in waiter.left:  # the ids that left took their entries with them
                waiting = self._gone_waiters.get(sid)
                if waiting is not None:
                    waiting.remove(waiter)
                    if not waiting:
                        del self._gone_waiters[sid]
        return {sid for sid in waiter.left if sid in self._sessions}

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def publish_progress(self) -> int:
        """Publish one `progress` event for every session whose byte counts moved since the last call.

        Called on a timer by the owner of the registry, so live views see bytes grow. Returns how many moved.
        """
        moved = []
        for sess in self._sessions.values():
            mark = (sess.bytes_up, sess.bytes_down)
            if self._progress.get(sess.id) != mark:
                self._progress[sess.id] = mark
                moved.append(Progress(sess.id, *mark))
        if moved:
            self._publish(SessionEvent("progress", progress=tuple(moved)))
        return len(moved)

    def bytes_by_protocol(self) -> dict[tuple[str, str], int]:
        """Bytes relayed so far, by (protocol, direction), live sessions included (counted as they move, not summed here)."""
        out: dict[tuple[str, str], int] = {}
        for p, (up, down) in self._relayed.items():
            out[(p, "up")], out[(p, "down")] = up, down
        return out

    def counts(self) -> dict[tuple[SessionProtocol, str], int]:
        """Live sessions by (protocol, VM), for the active-sessions gauge (kept as sessions open and close)."""
        return dict(self._live)

    def subscribe(self, *, local_only: bool = False) -> Subscription:
        """A bounded event stream (`local_only`: without other nodes' events). Raises SubscriberLimit when too many are open."""
        if len(self._subscribers) >= self._max_subscribers:
            raise SubscriberLimit(f"at most {self._max_subscribers} event streams at once")
        sub = Subscription(self._queue_size, local_only=local_only)
        self._subscribers.add(sub)
        if not local_only and self.on_streams is not None:
            self.on_streams()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.discard(sub)
            if not sub.local_only and self.on_streams is not None:
                self.on_streams()

    def streams(self) -> int:
        """Event streams open that show other nodes' events too (the operators' pages and `bastion watch`)."""
        return sum(not sub.local_only for sub in self._subscribers)

    def relay(self, kind: Literal["opened", "closed", "updated", "progress"], payload: dict[str, Any]) -> None:
        """Another node's event (with [cluster]) to every event stream here, as that node's API shows it."""
        event = SessionEvent(kind, remote=payload)
        for sub in self._subscribers:
            if not sub.local_only:
                sub.put(event)

    def resync(self) -> None:
        """Every event stream starts over from a snapshot (the cluster's view changed in a way events cannot say)."""
        for sub in self._subscribers:
            if not sub.local_only:
                sub.overflow()

    def end_subscriptions(self) -> None:
        """End every event stream (the gateway is stopping): readers get what is queued, then StreamEnded."""
        for sub in list(self._subscribers):
            sub.end()
        self._subscribers.clear()

    def totals(self) -> Totals:
        return Totals(active=len(self._sessions), opened=self._opened, closed=self._closed)

    def _publish(self, event: SessionEvent) -> None:
        for sub in self._subscribers:
            sub.put(event)


class _GoneWaiter:
    """One `wait_all_closed()` call: the ids it still waits for and the future it wakes when none is left."""

    __slots__ = ("done", "left")

    def __init__(self, left: set[str], done: asyncio.Future[None]) -> None:
        self.left = left
        self.done = done

    def gone(self, sid: str) -> None:
        self.left.discard(sid)
        if not self.left and not self.done.done():
            self.done.set_result(None)


def _fields(info: SessionInfo) -> dict[str, object]:
    d = info.as_dict()
    d["session_id"] = d.pop("id")
    d.pop("ends_at", None)
    return d
