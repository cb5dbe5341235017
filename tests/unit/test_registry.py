"""gateway.sessions.registry.SessionRegistry with a fake clock and a JSON logger on a StringIO."""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.errors import PolicyDenied, UpstreamTimeout
from gateway.logs import make_logger
from gateway.sessions.model import SessionSpec
from gateway.sessions.registry import SessionRegistry, Totals

START = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


class FakeClock:
    """A Clock whose wall time is fixed and whose monotonic time only moves when told."""

    def __init__(self, wall: datetime = START, mono: float = 1000.0) -> None:
        self.wall = wall
        self.mono = mono

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.mono += seconds


@dataclass
class RecordingTerminate:
    """A terminate callback that records each (reason, grace) it receives."""

    calls: list[tuple[str, float]] = field(default_factory=list)

    async def __call__(self, reason: str, grace: float) -> None:
        self.calls.append((reason, grace))


@dataclass
class Harness:
    registry: SessionRegistry
    clock: FakeClock
    stream: io.StringIO

    def lines(self, event: str | None = None) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [p for p in parsed if event is None or p["event"] == event]

    def closed_line(self) -> dict[str, Any]:
        closed = self.lines("session_closed")
        assert len(closed) == 1, closed
        return closed[0]


def make_harness(queue_size: int = 256) -> Harness:
    stream = io.StringIO()
    clock = FakeClock()
    registry = SessionRegistry(node="gw1", clock=clock, log=make_logger(stream, fmt="json"), event_queue_size=queue_size)
    return Harness(registry=registry, clock=clock, stream=stream)


def spec(user: str = "alice", vm: str = "web01") -> SessionSpec:
    return SessionSpec(
        user=user,
        source_ip="203.0.113.7",
        source_port=51234,
        vm=vm,
        target_address="10.0.0.5",
        target_port=22,
        protocol="ssh",
        login="deploy",
    )


# --- tracking ---------------------------------------------------------------


async def test_open_session_is_listed() -> None:
    """A session inside its block appears in list() with its spec."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        listed = h.registry.list()
        assert [s.id for s in listed] == [session.id]
        assert (listed[0].user, listed[0].vm, listed[0].state) == ("alice", "web01", "active")


async def test_open_session_found_by_id() -> None:
    """get(id) returns a snapshot of the live session."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        session.add_up(10)
        info = h.registry.get(session.id)
        assert info is not None
        assert (info.id, info.bytes_up, info.node, info.started_at) == (session.id, 10, "gw1", START)


async def test_session_leaves_registry_on_exit() -> None:
    """After the block the session is neither listed nor found."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        pass
    assert h.registry.list() == []
    assert h.registry.get(session.id) is None


async def test_session_leaves_registry_when_block_raises() -> None:
    """A failing block still removes the session."""
    h = make_harness()
    with pytest.raises(RuntimeError):
        async with h.registry.open(spec()):
            raise RuntimeError("boom")
    assert h.registry.list() == []


async def test_session_ids_are_unique() -> None:
    """Two concurrent sessions get different ids."""
    h = make_harness()
    async with h.registry.open(spec("alice")) as a, h.registry.open(spec("bob")) as b:
        assert a.id != b.id
        assert {s.user for s in h.registry.list()} == {"alice", "bob"}


async def test_get_unknown_id_is_none() -> None:
    """get() of an id never issued returns None."""
    assert make_harness().registry.get("0123456789abcdef") is None


# --- the session_closed line ------------------------------------------------


async def test_exactly_one_session_closed_line() -> None:
    """Closing a session logs session_closed once."""
    h = make_harness()
    async with h.registry.open(spec()):
        pass
    assert len(h.lines("session_closed")) == 1


async def test_session_opened_line() -> None:
    """Opening a session logs session_opened with its id."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        opened = h.lines("session_opened")
        assert [o["session_id"] for o in opened] == [session.id]
        assert h.lines("session_closed") == []


async def test_session_closed_line_has_every_field() -> None:
    """session_closed carries the spec, byte counts, node, start, duration and reason."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        session.add_up(100)
        session.add_up(23)
        session.add_down(4567)
        h.clock.advance(12.3456)
    line = h.closed_line()
    expected = {
        "session_id": session.id,
        "user": "alice",
        "source_ip": "203.0.113.7",
        "source_port": 51234,
        "vm": "web01",
        "target_address": "10.0.0.5",
        "target_port": 22,
        "protocol": "ssh",
        "login": "deploy",
        "started_at": "2024-05-06T07:08:09Z",
        "bytes_up": 123,
        "bytes_down": 4567,
        "node": "gw1",
        "duration_s": 12.346,
        "reason": "closed",
    }
    assert {k: line.get(k) for k in expected} == expected


async def test_duration_uses_monotonic_not_wall_clock() -> None:
    """Moving the wall clock does not change duration_s."""
    h = make_harness()
    async with h.registry.open(spec()):
        h.clock.wall = datetime(2030, 1, 1, tzinfo=UTC)
        h.clock.advance(2.0)
    assert h.closed_line()["duration_s"] == 2.0


async def test_reason_defaults_to_closed() -> None:
    """A block that ends normally without a close_reason logs `closed`."""
    h = make_harness()
    async with h.registry.open(spec()):
        pass
    assert h.closed_line()["reason"] == "closed"


async def test_reason_from_close_reason() -> None:
    """A close_reason set by the handler is the logged reason."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        session.close_reason = "vm_closed"
    assert h.closed_line()["reason"] == "vm_closed"


async def test_close_reason_wins_over_exception() -> None:
    """A close_reason set before an error is kept."""
    h = make_harness()
    with pytest.raises(UpstreamTimeout):
        async with h.registry.open(spec()) as session:
            session.close_reason = "client_closed"
            raise UpstreamTimeout("too slow")
    assert h.closed_line()["reason"] == "client_closed"


async def test_reason_from_gateway_error_slug() -> None:
    """A GatewayError subclass escaping the block logs its reason slug."""
    h = make_harness()
    with pytest.raises(UpstreamTimeout):
        async with h.registry.open(spec()):
            raise UpstreamTimeout("VM did not answer")
    assert h.closed_line()["reason"] == "upstream_timeout"


async def test_reason_from_gateway_error_instance_reason() -> None:
    """A reason given to the error instance overrides the class slug."""
    h = make_harness()
    with pytest.raises(PolicyDenied):
        async with h.registry.open(spec()):
            raise PolicyDenied("no", reason="login_denied")
    assert h.closed_line()["reason"] == "login_denied"


async def test_reason_cancelled() -> None:
    """CancelledError escaping the block logs `cancelled` and propagates."""
    h = make_harness()
    with pytest.raises(asyncio.CancelledError):
        async with h.registry.open(spec()):
            raise asyncio.CancelledError
    assert h.closed_line()["reason"] == "cancelled"


async def test_reason_for_task_cancelled_while_in_block() -> None:
    """Cancelling the task that holds a session logs `cancelled`."""
    h = make_harness()
    entered = asyncio.Event()

    async def hold() -> None:
        async with h.registry.open(spec()):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.closed_line()["reason"] == "cancelled"


async def test_reason_for_unexpected_exception() -> None:
    """A non-gateway exception logs `internal_error` and propagates."""
    h = make_harness()
    with pytest.raises(KeyError):
        async with h.registry.open(spec()):
            raise KeyError("bug")
    assert h.closed_line()["reason"] == "internal_error"


# --- terminate --------------------------------------------------------------


async def test_terminate_calls_callback_with_reason_and_grace() -> None:
    """terminate() returns True and passes reason and grace to the callback."""
    h = make_harness()
    cb = RecordingTerminate()
    async with h.registry.open(spec(), terminate=cb) as session:
        assert await h.registry.terminate(session.id, "maintenance", grace=5.0) is True
    assert cb.calls == [("maintenance", 5.0)]


async def test_terminate_twice_calls_callback_once() -> None:
    """A repeated terminate() is harmless: True again, no second callback."""
    h = make_harness()
    cb = RecordingTerminate()
    async with h.registry.open(spec(), terminate=cb) as session:
        await h.registry.terminate(session.id, "maintenance")
        assert await h.registry.terminate(session.id, "again") is True
    assert cb.calls == [("maintenance", 0.0)]


async def test_terminate_unknown_id() -> None:
    """terminate() of an unknown id returns False."""
    assert await make_harness().registry.terminate("feedfacecafebeef", "x") is False


async def test_terminate_after_close() -> None:
    """terminate() of a session that already ended returns False and does not call back."""
    h = make_harness()
    cb = RecordingTerminate()
    async with h.registry.open(spec(), terminate=cb) as session:
        pass
    assert await h.registry.terminate(session.id, "late") is False
    assert cb.calls == []


async def test_terminate_without_callback() -> None:
    """A session opened without a callback can still be marked terminated."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        assert await h.registry.terminate(session.id, "x") is True


async def test_terminate_marks_state_terminating() -> None:
    """A terminated session shows state `terminating` until its block exits."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        await h.registry.terminate(session.id, "x")
        info = h.registry.get(session.id)
        assert info is not None
        assert info.state == "terminating"


async def test_terminated_session_logs_operator_reason() -> None:
    """The session_closed line of a terminated session says terminated_by_operator."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        await h.registry.terminate(session.id, "maintenance")
    assert h.closed_line()["reason"] == "terminated_by_operator"


# --- subscribe and totals ---------------------------------------------------


async def test_subscriber_receives_opened_and_closed() -> None:
    """A subscriber sees `opened` then `closed` with the reason."""
    h = make_harness()
    q = h.registry.subscribe()
    async with h.registry.open(spec()) as session:
        session.close_reason = "client_closed"
    opened, closed = q.get_nowait(), q.get_nowait()
    assert opened is not None
    assert closed is not None
    assert (opened.kind, opened.session.id, opened.reason) == ("opened", session.id, None)
    assert (closed.kind, closed.session.id, closed.session.state, closed.reason) == ("closed", session.id, "closed", "client_closed")
    assert q.empty()


async def test_unsubscribed_queue_gets_nothing() -> None:
    """After unsubscribe() no more events arrive."""
    h = make_harness()
    q = h.registry.subscribe()
    h.registry.unsubscribe(q)
    async with h.registry.open(spec()):
        pass
    assert q.empty()


async def test_slow_subscriber_gets_none_and_is_dropped() -> None:
    """A full queue is drained to a single None and receives nothing further."""
    h = make_harness(queue_size=1)
    q = h.registry.subscribe()
    async with h.registry.open(spec()):
        pass
    async with h.registry.open(spec()):
        pass
    assert q.get_nowait() is None
    assert q.empty()


async def test_totals_count_active_opened_closed() -> None:
    """totals() counts live sessions and lifetime opens and closes."""
    h = make_harness()
    assert h.registry.totals() == Totals(active=0, opened=0, closed=0)
    async with h.registry.open(spec()):
        async with h.registry.open(spec("bob")):
            assert h.registry.totals() == Totals(active=2, opened=2, closed=0)
        assert h.registry.totals() == Totals(active=1, opened=2, closed=1)
    assert h.registry.totals() == Totals(active=0, opened=2, closed=2)


async def test_publish_progress_reports_only_sessions_whose_bytes_moved() -> None:
    """publish_progress emits `updated` for sessions with new bytes, once per change."""
    reg = make_harness().registry
    q = reg.subscribe()
    async with reg.open(spec()) as a, reg.open(spec()) as b:
        while not q.empty():
            q.get_nowait()
        a.add_up(10)
        assert reg.publish_progress() == 2  # first call: both are new to it
        b.add_down(5)
        assert reg.publish_progress() == 1
        assert reg.publish_progress() == 0
        kinds = [ev.kind for ev in (q.get_nowait() for _ in range(3)) if ev is not None]
        assert kinds == ["updated", "updated", "updated"]
