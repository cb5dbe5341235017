"""gateway.sessions.registry.SessionRegistry with a fake clock and a JSON logger on a StringIO."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import weakref
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.errors import GatewayError, PolicyDenied
from gateway.kinds import Protocol, Reason
from gateway.logs import make_logger
from gateway.sessions.model import SessionSpec
from gateway.sessions.registry import SessionRegistry, SubscriberLimit, Subscription, Totals
from tests.support.clock import START, FakeClock


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
        protocol=Protocol.SSH,
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


async def test_a_closed_session_is_freed_without_the_collector() -> None:
    """A protocol holds its session and the session its notice and recheck callbacks, bound to the protocol's objects:
    once closed, the session is freed by reference counting alone (no cycle waits for a full collection)."""

    class Side:
        session: object = None

        def notice(self, text: str) -> bool:
            return True

        def recheck(self) -> str | None:
            return None

    h = make_harness()
    side = Side()
    gc.collect()
    gc.disable()
    try:
        async with h.registry.open(spec(), notice=side.notice, recheck=side.recheck) as session:
            side.session = session
        gone = weakref.ref(side)  # Session has slots and no weak references: the side stands for the cycle
        del session, side
        assert gone() is None
    finally:
        gc.enable()


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
        h.clock.mono += 12.3456
        session.end(Reason.VM_CLOSED)
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
        "reason": "vm_closed",
    }
    assert {k: line.get(k) for k in expected} == expected


async def test_duration_uses_monotonic_time() -> None:
    """duration_s is the monotonic time the session lived."""
    h = make_harness()
    async with h.registry.open(spec()):
        h.clock.mono += 2.0
    assert h.closed_line()["duration_s"] == 2.0


async def test_block_that_ends_without_a_reason_is_an_internal_error() -> None:
    """A block that ends without anyone calling end() is a bug, and says so."""
    h = make_harness()
    async with h.registry.open(spec()):
        pass
    assert h.closed_line()["reason"] == "internal_error"


async def test_first_end_decides_the_reason() -> None:
    """end() called by the side that went away first wins over every later one."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        assert session.end(Reason.CLIENT_CLOSED) is True
        assert session.end(Reason.VM_CLOSED) is False
    assert h.closed_line()["reason"] == "client_closed"


async def test_end_wins_over_a_later_exception() -> None:
    """A reason set before an error escapes the block is kept."""
    h = make_harness()
    with pytest.raises(RuntimeError):
        async with h.registry.open(spec()) as session:
            session.end(Reason.VM_RESET)
            raise RuntimeError("teardown failed")
    assert h.closed_line()["reason"] == "vm_reset"


async def test_reason_from_gateway_error_slug() -> None:
    """A GatewayError whose slug is a close reason logs that reason."""
    h = make_harness()
    with pytest.raises(GatewayError):
        async with h.registry.open(spec()):
            raise GatewayError("the VM refused", reason="upstream_refused")
    assert h.closed_line()["reason"] == "upstream_refused"


async def test_gateway_error_without_a_close_reason_is_internal() -> None:
    """An error slug that is not a close reason (a policy slug) is an internal error here."""
    h = make_harness()
    with pytest.raises(PolicyDenied):
        async with h.registry.open(spec()):
            raise PolicyDenied("no", reason="login_denied")
    assert h.closed_line()["reason"] == "internal_error"


async def test_cancelled_session_is_a_gateway_shutdown() -> None:
    """Only the gateway cancels a session that has not ended: it logs gateway_shutdown and propagates."""
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
    assert h.closed_line()["reason"] == "gateway_shutdown"


async def test_reason_for_unexpected_exception() -> None:
    """A non-gateway exception logs `internal_error` with its type and propagates."""
    h = make_harness()
    with pytest.raises(KeyError):
        async with h.registry.open(spec()):
            raise KeyError("bug")
    line = h.closed_line()
    assert line["reason"] == "internal_error"
    assert line["error"].startswith("KeyError")


# --- terminate --------------------------------------------------------------


async def test_terminate_records_a_pending_end() -> None:
    """terminate() records reason, text and the end time, and shows the session as terminating."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        result = h.registry.terminate(session.id, "maintenance", grace=5.0)
        assert result is not None and result.changed
        assert result.pending.reason is Reason.TERMINATED_BY_OPERATOR
        assert result.pending.text == "maintenance"
        assert result.pending.ends_mono == h.clock.mono + 5.0
        info = h.registry.get(session.id)
        assert info is not None and info.state == "terminating" and info.ends_at == result.pending.ends_at
        session.end(Reason.TERMINATED_BY_OPERATOR)


async def test_shorter_grace_replaces_a_pending_end_and_its_reason() -> None:
    """A second disconnect that ends the session sooner wins, with its own text."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        h.registry.terminate(session.id, "in 30 s", grace=30.0)
        second = h.registry.terminate(session.id, "now", grace=0.0)
        assert second is not None and second.changed
        assert session.pending is not None and session.pending.text == "now"
        assert session.pending.ends_mono == h.clock.mono
        session.end(Reason.TERMINATED_BY_OPERATOR)


async def test_longer_grace_leaves_the_pending_end() -> None:
    """A second disconnect that would end the session later changes nothing and says so."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        h.registry.terminate(session.id, "soon", grace=5.0)
        later = h.registry.terminate(session.id, "later", grace=50.0)
        assert later is not None and not later.changed
        assert later.pending.text == "soon"
        session.end(Reason.TERMINATED_BY_OPERATOR)


async def test_terminate_unknown_or_gone_id_is_none() -> None:
    """terminate() of an unknown id, or of a session that has left the registry, returns None."""
    h = make_harness()
    assert h.registry.terminate("feedfacecafebeef", "x") is None
    async with h.registry.open(spec()) as session:
        session.end(Reason.CLIENT_CLOSED)
    assert h.registry.terminate(session.id, "late") is None


async def test_terminate_of_a_session_already_ending_changes_nothing() -> None:
    """A session that ended but is still leaving (showing its notice) is not "not found": the request is a no-op."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        session.end(Reason.VM_CLOSED)
        result = h.registry.terminate(session.id, "late")
        assert result is not None and not result.changed and result.pending.ends_mono == h.clock.mono
        assert session.pending is None
    assert h.closed_line()["reason"] == "vm_closed"


async def test_terminate_wakes_the_session() -> None:
    """A session waiting for a change wakes when a disconnect is requested."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        waiter = asyncio.create_task(session.wait_change(None))
        await h.clock.settle()
        assert not waiter.done()
        h.registry.terminate(session.id, "x", grace=10.0)
        await asyncio.wait_for(waiter, 1)
        session.end(Reason.TERMINATED_BY_OPERATOR)


async def test_pending_reason_is_logged_beside_the_real_one() -> None:
    """The session_closed line says what really ended it, and what had been requested."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        h.registry.terminate(session.id, "later", grace=60.0)
        session.end(Reason.CLIENT_CLOSED)
    line = h.closed_line()
    assert (line["reason"], line["requested_reason"]) == ("client_closed", "terminated_by_operator")


async def test_wait_closed_returns_once_the_session_is_gone() -> None:
    """wait_closed() returns True once the session has left the registry, False on timeout."""
    h = make_harness()
    gate = asyncio.Event()

    async def hold() -> None:
        async with h.registry.open(spec()) as session:
            session.end(Reason.CLIENT_CLOSED)
            await gate.wait()

    task = asyncio.create_task(hold())
    await h.clock.settle()
    [sid] = h.registry.ids()
    assert await h.registry.wait_closed(sid, 0.05) is False
    gate.set()
    assert await h.registry.wait_closed(sid, 5) is True
    await task


async def test_wait_all_closed_is_one_waiter_for_many_ids() -> None:
    """200 sessions told to end: one waiter covers them all, returns once the last left, and leaves nothing behind."""
    h = make_harness()
    gates = [asyncio.Event() for _ in range(200)]

    async def hold(gate: asyncio.Event) -> None:
        async with h.registry.open(spec()):
            await gate.wait()

    tasks = [asyncio.create_task(hold(g)) for g in gates]
    await h.clock.settle()
    ids = h.registry.ids()
    waiting = asyncio.create_task(h.registry.wait_all_closed([*ids, "gone-already"], 30))
    await h.clock.settle()
    waiters = {id(w) for ws in h.registry._gone_waiters.values() for w in ws}
    assert len(waiters) == 1 and set(h.registry._gone_waiters) == set(ids)
    for g in gates[:-1]:
        g.set()
    await asyncio.gather(*tasks[:-1])
    assert not waiting.done()
    gates[-1].set()
    assert await waiting == set()
    assert h.registry._gone_waiters == {}
    await tasks[-1]


async def test_wait_all_closed_names_the_ids_still_open_after_the_timeout() -> None:
    """One session ends, one stays: after the timeout the answer is the one that stayed, and its waiter is removed."""
    h = make_harness()
    stay, leave = asyncio.Event(), asyncio.Event()

    async def hold(gate: asyncio.Event) -> None:
        async with h.registry.open(spec()):
            await gate.wait()

    t1, t2 = asyncio.create_task(hold(stay)), asyncio.create_task(hold(leave))
    await h.clock.settle()
    a, b = h.registry.ids()
    leave.set()
    await t2
    assert await h.registry.wait_all_closed([a, b], 0.05) == {a}
    assert h.registry._gone_waiters == {}
    stay.set()
    await t1


# --- subscribe and totals ---------------------------------------------------


def events(sub: Subscription) -> list[Any]:
    return list(sub.drain())


async def test_subscriber_receives_opened_and_closed() -> None:
    """A subscriber sees `opened` then `closed` with the reason."""
    h = make_harness()
    sub = h.registry.subscribe()
    async with h.registry.open(spec()) as session:
        session.end(Reason.CLIENT_CLOSED)
    opened, closed = events(sub)
    assert opened.session is not None and closed.session is not None
    assert (opened.kind, opened.session.id, opened.reason) == ("opened", session.id, None)
    assert (closed.kind, closed.session.id, closed.session.state, closed.reason) == ("closed", session.id, "closed", "client_closed")


async def test_unsubscribed_stream_gets_nothing() -> None:
    """After unsubscribe() no more events arrive."""
    h = make_harness()
    sub = h.registry.subscribe()
    h.registry.unsubscribe(sub)
    async with h.registry.open(spec()) as session:
        session.end(Reason.CLIENT_CLOSED)
    assert events(sub) == []


async def test_overflow_costs_one_resync_never_a_silent_gap() -> None:
    """A stream that overflows is emptied and its next get() says so (None) once; then events flow again."""
    h = make_harness(queue_size=1)
    sub = h.registry.subscribe()
    for _ in range(2):
        async with h.registry.open(spec()) as session:
            session.end(Reason.CLIENT_CLOSED)
    assert await sub.get() is None
    async with h.registry.open(spec()) as session:
        opened = await sub.get()
        assert opened is not None and opened.kind == "opened"
        session.end(Reason.CLIENT_CLOSED)


async def test_a_burst_of_1000_sessions_reaches_a_subscriber_whole() -> None:
    """1,000 sessions opened and closed at once: every opened and closed event arrives, in order."""
    h = make_harness(queue_size=8192)
    sub = h.registry.subscribe()
    gate = asyncio.Event()

    async def one(i: int) -> None:
        async with h.registry.open(spec(f"u{i}")) as session:
            await gate.wait()
            session.end(Reason.VM_CLOSED)

    tasks = [asyncio.create_task(one(i)) for i in range(1000)]
    await h.clock.settle(5)
    gate.set()
    await asyncio.gather(*tasks)
    got = events(sub)
    assert [e.kind for e in got].count("opened") == 1000
    assert [e.kind for e in got].count("closed") == 1000
    assert {e.session.id for e in got if e.kind == "opened"} == {e.session.id for e in got if e.kind == "closed"}


async def test_subscribers_are_bounded() -> None:
    """More event streams than the limit are refused, not queued."""
    stream = io.StringIO()
    reg = SessionRegistry("gw1", FakeClock(), make_logger(stream, fmt="json"), max_subscribers=2)
    reg.subscribe()
    reg.subscribe()
    with pytest.raises(SubscriberLimit):
        reg.subscribe()


async def test_totals_count_active_opened_closed() -> None:
    """totals() counts live sessions and lifetime opens and closes."""
    h = make_harness()
    assert h.registry.totals() == Totals(active=0, opened=0, closed=0)
    async with h.registry.open(spec()) as a:
        async with h.registry.open(spec("bob")) as b:
            assert h.registry.totals() == Totals(active=2, opened=2, closed=0)
            b.end(Reason.CLIENT_CLOSED)
        assert h.registry.totals() == Totals(active=1, opened=2, closed=1)
        a.end(Reason.CLIENT_CLOSED)
    assert h.registry.totals() == Totals(active=0, opened=2, closed=2)


async def test_progress_is_one_event_per_tick_for_every_moving_session() -> None:
    """publish_progress emits one coalesced `progress` event listing only the sessions whose bytes moved."""
    reg = make_harness().registry
    sub = reg.subscribe()
    async with reg.open(spec()) as a, reg.open(spec()) as b:
        events(sub)
        a.add_up(10)
        assert reg.publish_progress() == 2  # first call: both are new to it
        b.add_down(5)
        assert reg.publish_progress() == 1
        assert reg.publish_progress() == 0
        got = events(sub)
        assert [e.kind for e in got] == ["progress", "progress"]
        assert [(p.id, p.bytes_up, p.bytes_down) for p in got[1].progress] == [(b.id, 0, 5)]
        a.end(Reason.CLIENT_CLOSED)
        b.end(Reason.CLIENT_CLOSED)


async def test_input_is_activity_and_output_is_not() -> None:
    """add_up moves the idle clock, add_down does not."""
    h = make_harness()
    async with h.registry.open(spec()) as session:
        start = session.last_input
        h.clock.mono += 5
        session.add_down(100)
        assert session.last_input == start
        session.add_up(1)
        assert session.last_input == start + 5
        session.end(Reason.CLIENT_CLOSED)


async def test_counts_and_bytes_follow_sessions_without_walking_them() -> None:
    """Live sessions by (protocol, VM) and bytes by protocol: live ones counted as they move, closed ones kept."""
    h = make_harness()
    async with h.registry.open(spec(vm="web01")) as a:
        async with h.registry.open(spec(vm="web01")) as b, h.registry.open(spec(vm="db01")) as c:
            a.add_up(10)
            b.add_down(200)
            c.add_up(3)
            assert h.registry.counts() == {(Protocol.SSH, "web01"): 2, (Protocol.SSH, "db01"): 1}
            assert h.registry.bytes_by_protocol() == {("ssh", "up"): 13, ("ssh", "down"): 200}
        a.add_down(5)
        assert h.registry.counts() == {(Protocol.SSH, "web01"): 1}
        assert h.registry.bytes_by_protocol() == {("ssh", "up"): 13, ("ssh", "down"): 205}
    assert h.registry.counts() == {}
    assert h.registry.bytes_by_protocol() == {("ssh", "up"): 13, ("ssh", "down"): 205}
