"""run_session(): the one lifecycle, with typed fakes for the handler and the user's side and the shared fake clock.

No sockets and no real waits: idle, max duration, half-close and grace are jumped over with the fake clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.config import Limits, Rule
from gateway.errors import GatewayError, UpstreamRefused
from gateway.kinds import Protocol, Reason
from gateway.logs import make_logger
from gateway.policy import Grant, Policy, Principal
from gateway.protocols.lifecycle import Client, Deps, run_session
from gateway.sessions.registry import Session, SessionRegistry
from tests.support.clock import FakeClock
from tests.unit.helpers import make_policy

ALICE = Principal("alice", ("ops",), "publickey")
CLIENT = Client(ALICE, "203.0.113.7", 50000)


@dataclass
class FakeSide:
    """The user's side: records what the user was shown."""

    can_show: bool = True
    notices: list[str] = field(default_factory=list)
    ended_with: list[str] = field(default_factory=list)
    refused: list[GatewayError] = field(default_factory=list)

    def notice(self, text: str) -> bool:
        if self.can_show:
            self.notices.append(text)
        return self.can_show

    async def refuse(self, error: GatewayError) -> None:
        self.refused.append(error)

    async def end(self, text: str) -> None:
        self.ended_with.append(text)


@dataclass
class FakeRelay:
    closed: bool = False

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeHandler:
    """A protocol whose relay does nothing by itself: the test drives the session."""

    limits: Limits = field(default_factory=Limits)
    dial_error: GatewayError | None = None
    serve_error: GatewayError | None = None
    relay: FakeRelay = field(default_factory=FakeRelay)
    session: Session | None = None
    served: asyncio.Event = field(default_factory=asyncio.Event)
    kind: str = "fake"

    def authorize(self, policy: Policy, request: str) -> Grant:
        grant = policy.check_forward(ALICE, request, 22)
        return Grant(grant.vm, Protocol.SSH_JUMP, 22, None, (), self.limits)

    async def connect(self, request: str, grant: Grant) -> str:
        if self.dial_error is not None:
            raise self.dial_error
        return "upstream"

    def discard(self, upstream: str) -> None:
        return None

    async def serve(self, request: str, grant: Grant, upstream: str, client: FakeSide, session: Session) -> FakeRelay:
        if self.serve_error is not None:
            raise self.serve_error
        self.session = session
        self.served.set()
        return self.relay


@dataclass
class Counting:
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def dial_succeeded(self, vm: str, seconds: float) -> None:
        self.calls.append(("dial_ok", vm))

    def dial_failed(self, vm: str, reason: str) -> None:
        self.calls.append(("dial_failed", reason))

    def refused(self, reason: str) -> None:
        self.calls.append(("refused", reason))


@dataclass
class World:
    clock: FakeClock
    registry: SessionRegistry
    deps: Deps
    stream: io.StringIO
    observer: Counting

    def closed(self) -> dict[str, Any]:
        lines = [json.loads(x) for x in self.stream.getvalue().splitlines()]
        [line] = [x for x in lines if x["event"] == "session_closed"]
        return line


@pytest.fixture
def world() -> World:
    clock = FakeClock()
    stream = io.StringIO()
    log = make_logger(stream, fmt="json")
    registry = SessionRegistry("gw1", clock, log)
    observer = Counting()
    policy = make_policy(Rule(users=("alice",), vms=("web01",), protocols=("ssh-jump",)))
    return World(clock, registry, Deps(registry, policy, log, observer), stream, observer)


async def start(world: World, handler: FakeHandler, side: FakeSide, target: str = "web01") -> asyncio.Task[Reason | None]:
    task = asyncio.create_task(run_session(world.deps, handler, target, CLIENT, side, target=target))
    await world.clock.settle()
    return task


async def test_idle_session_is_warned_then_ended(world: World) -> None:
    """No input for idle_timeout: a warning warn_before ahead, then the end with reason idle_timeout and a notice."""
    handler = FakeHandler(limits=Limits(idle_timeout=600, max_duration=None, warn_before=60))
    side = FakeSide()
    task = await start(world, handler, side)
    await world.clock.advance(539)
    assert side.notices == []
    await world.clock.advance(1)
    assert side.notices == ["You will be disconnected in 60 seconds: idle"]
    await world.clock.advance(59)
    assert not task.done()
    await world.clock.advance(1)
    assert await task == Reason.IDLE_TIMEOUT
    assert side.ended_with == ["You have been disconnected. No input for 10m (idle timeout)."]
    assert handler.relay.closed
    assert world.closed()["reason"] == "idle_timeout"


async def test_input_moves_the_idle_deadline_and_output_does_not(world: World) -> None:
    """User input restarts the idle timer; bytes from the VM do not."""
    handler = FakeHandler(limits=Limits(idle_timeout=100, max_duration=None, warn_before=10))
    side = FakeSide()
    task = await start(world, handler, side)
    assert handler.session is not None
    await world.clock.advance(80)
    handler.session.add_up(1)
    await world.clock.advance(80)
    handler.session.add_down(1000)
    assert not task.done()
    await world.clock.advance(20)
    assert await task == Reason.IDLE_TIMEOUT
    assert world.clock.mono == 1000 + 180


async def test_max_duration_ends_an_active_session(world: World) -> None:
    """A busy session still ends at max_duration, warned first."""
    handler = FakeHandler(limits=Limits(idle_timeout=None, max_duration=3600, warn_before=120))
    side = FakeSide()
    task = await start(world, handler, side)
    assert handler.session is not None
    for _ in range(36):
        handler.session.add_up(1)
        await world.clock.advance(100)
    assert await task == Reason.MAX_DURATION
    assert "You will be disconnected in 120 seconds: maximum session duration" in side.notices
    assert side.ended_with == ["You have been disconnected. The session reached its maximum duration of 1h."]


async def test_half_close_timeout_ends_the_session_without_a_notice(world: World) -> None:
    """After one side's EOF the other has half_close_timeout to finish; then the session ends quietly."""
    handler = FakeHandler(limits=Limits(idle_timeout=None, max_duration=None, half_close_timeout=30))
    side = FakeSide()
    task = await start(world, handler, side)
    assert handler.session is not None
    await world.clock.advance(500)
    handler.session.half_closed("user")
    await world.clock.advance(29.9)
    assert not task.done()
    await world.clock.advance(0.1)
    assert await task == Reason.HALF_CLOSE_TIMEOUT
    assert side.ended_with == []
    assert world.closed()["half_closed_by"] == "user"


async def test_grace_disconnect_warns_at_once_and_ends_on_time(world: World) -> None:
    """terminate(grace=30): the user is warned at once and the session ends 30 s later with the operator's text."""
    handler = FakeHandler(limits=Limits(idle_timeout=None, max_duration=None))
    side = FakeSide()
    task = await start(world, handler, side)
    assert handler.session is not None
    world.registry.terminate(handler.session.id, "patching", 30)
    await world.clock.settle()
    assert side.notices == ["You will be disconnected in 30 seconds: patching"]
    await world.clock.advance(29)
    assert not task.done()
    await world.clock.advance(1)
    assert await task == Reason.TERMINATED_BY_OPERATOR
    assert side.ended_with == ["You have been disconnected. patching"]


async def test_a_shorter_second_disconnect_wins(world: World) -> None:
    """disconnect --grace 30 then disconnect --reason now: it ends now, with the second text."""
    handler = FakeHandler(limits=Limits(idle_timeout=None, max_duration=None))
    side = FakeSide()
    task = await start(world, handler, side)
    assert handler.session is not None
    world.registry.terminate(handler.session.id, "in a while", 30)
    await world.clock.advance(5)
    world.registry.terminate(handler.session.id, "now", 0)
    await world.clock.settle()
    assert task.done()
    assert await task == Reason.TERMINATED_BY_OPERATOR
    assert side.ended_with == ["You have been disconnected. now"]
    assert world.clock.mono == 1005


async def test_shutdown_reads_the_restart_notice(world: World) -> None:
    """A drain's pending end warns with the restart notice and ends as gateway_shutdown."""
    handler = FakeHandler(limits=Limits(idle_timeout=None, max_duration=None))
    side = FakeSide()
    task = await start(world, handler, side)
    assert handler.session is not None
    world.registry.terminate(handler.session.id, "The gateway is restarting: upgrade.", 10, reason=Reason.GATEWAY_SHUTDOWN)
    await world.clock.settle()
    assert side.notices == ["The gateway is restarting: upgrade. You will be disconnected in 10 seconds."]
    await world.clock.advance(10)
    assert await task == Reason.GATEWAY_SHUTDOWN
    assert side.ended_with == ["You have been disconnected. The gateway is restarting: upgrade."]


async def test_a_side_going_away_ends_it_with_no_notice(world: World) -> None:
    """The relay reports the first side to go away; the user is shown nothing and the relay is closed."""
    handler = FakeHandler()
    side = FakeSide()
    task = await start(world, handler, side)
    assert handler.session is not None
    handler.session.end(Reason.VM_CLOSED)
    handler.session.end(Reason.CLIENT_CLOSED)
    assert await task == Reason.VM_CLOSED
    assert side.ended_with == [] and handler.relay.closed
    assert world.observer.calls == [("dial_ok", "web01")]


async def test_policy_refusal_opens_nothing_and_dials_nothing(world: World) -> None:
    """A VM the rules do not grant: refused with the not-found text, counted, no session, no dial."""
    handler = FakeHandler()
    side = FakeSide()
    task = await start(world, handler, side, target="web02")
    assert await task is None
    assert [e.message for e in side.refused] == ["VM 'web02' does not exist or you may not reach it"]
    assert world.observer.calls == [("refused", "unknown_vm")]
    assert world.registry.totals().opened == 0


async def test_dial_failure_names_the_vm_and_opens_no_session(world: World) -> None:
    """The VM cannot be reached: the user reads why, the failure is counted, no session was opened."""
    handler = FakeHandler(dial_error=UpstreamRefused("connection refused"))
    side = FakeSide()
    assert await (await start(world, handler, side)) is None
    assert [e.message for e in side.refused] == ["cannot reach VM 'web01' port 22: connection refused"]
    assert world.observer.calls == [("dial_failed", "upstream_refused")]
    assert world.registry.totals().opened == 0


async def test_vm_refusing_the_session_after_the_dial_is_recorded(world: World) -> None:
    """serve() raising (the VM refused the channel): the user is told and the session ends upstream_refused."""
    handler = FakeHandler(serve_error=GatewayError("VM 'web01' refused the session: nope", reason="upstream_refused"))
    side = FakeSide()
    assert await (await start(world, handler, side)) == Reason.UPSTREAM_REFUSED
    assert [e.message for e in side.refused] == ["VM 'web01' refused the session: nope"]
    assert world.closed()["reason"] == "upstream_refused"


async def test_protocol_without_text_is_not_warned(world: World) -> None:
    """A side that cannot show text (jump) gets no warning, and the end still happens on time."""
    handler = FakeHandler(limits=Limits(idle_timeout=120, max_duration=None, warn_before=60))
    side = FakeSide(can_show=False)
    task = await start(world, handler, side)
    await world.clock.advance(120)
    assert await task == Reason.IDLE_TIMEOUT
    assert side.notices == []


async def test_sessions_per_user_are_capped_and_the_slot_comes_back() -> None:
    """With max_per_user=2 a third concurrent session is refused before any dial, with a message that says why;
    when one ends its slot is free again."""
    clock = FakeClock()
    stream = io.StringIO()
    log = make_logger(stream, fmt="json")
    registry = SessionRegistry("gw1", clock, log, max_per_user=2)
    observer = Counting()
    policy = make_policy(Rule(users=("alice",), vms=("web01",), protocols=("ssh-jump",)))
    w = World(clock, registry, Deps(registry, policy, log, observer), stream, observer)
    first, second, third = FakeHandler(), FakeHandler(), FakeHandler(dial_error=UpstreamRefused("must not be dialled"))
    t1 = await start(w, first, FakeSide())
    t2 = await start(w, second, FakeSide())
    side3 = FakeSide()
    assert await (await start(w, third, side3)) is None
    assert [e.reason for e in side3.refused] == ["user_session_limit"]
    assert "already have 2 sessions open" in side3.refused[0].message
    assert ("refused", "user_session_limit") in observer.calls and ("dial_failed", "upstream_refused") not in observer.calls
    assert first.session is not None
    first.session.end(Reason.CLIENT_CLOSED)
    assert await t1 == Reason.CLIENT_CLOSED
    fourth = FakeHandler()
    t4 = await start(w, fourth, FakeSide())
    assert fourth.session is not None and registry.totals().active == 2
    for h, t in ((second, t2), (fourth, t4)):
        assert h.session is not None
        h.session.end(Reason.VM_CLOSED)
        await t


async def test_new_sessions_per_user_are_rate_limited_and_refill() -> None:
    """With rate_per_user (1/s, burst 2) a user's third new session in the same instant is refused before any dial with
    a reason that says to wait; a second later one more is allowed; another user is not affected."""
    clock = FakeClock()
    stream = io.StringIO()
    log = make_logger(stream, fmt="json")
    registry = SessionRegistry("gw1", clock, log, rate_per_user=(1.0, 2.0))
    observer = Counting()
    policy = make_policy(Rule(users=("alice", "bob"), vms=("web01",), protocols=("ssh-jump",)))
    w = World(clock, registry, Deps(registry, policy, log, observer), stream, observer)
    handlers = [FakeHandler(), FakeHandler()]
    tasks = [await start(w, h, FakeSide()) for h in handlers]
    side = FakeSide()
    assert await (await start(w, FakeHandler(dial_error=UpstreamRefused("must not be dialled")), side)) is None
    assert [e.reason for e in side.refused] == ["user_rate_limit"] and "faster than 1 a second" in side.refused[0].message
    assert ("refused", "user_rate_limit") in observer.calls
    await clock.advance(1.0)
    later = FakeHandler()
    tasks.append(await start(w, later, FakeSide()))
    assert later.session is not None
    for h, t in zip([*handlers, later], tasks, strict=True):
        assert h.session is not None
        h.session.end(Reason.CLIENT_CLOSED)
        await t


async def test_a_lock_refuses_the_session_before_any_dial() -> None:
    """A lock on the VM (as the Locks protocol reports it) refuses the session after the policy check, before the dial,
    with the lock's text and the reason `locked`."""

    class VMLocked:
        def refusal(self, *, user: str, vm: str, source: str) -> str | None:
            return "access to VM 'web01' is locked by an operator: patching" if vm == "web01" else None

    clock = FakeClock()
    stream = io.StringIO()
    log = make_logger(stream, fmt="json")
    registry = SessionRegistry("gw1", clock, log)
    observer = Counting()
    policy = make_policy(Rule(users=("alice",), vms=("web01",), protocols=("ssh-jump",)))
    w = World(clock, registry, Deps(registry, policy, log, observer, locks=VMLocked()), stream, observer)
    side = FakeSide()
    assert await (await start(w, FakeHandler(dial_error=UpstreamRefused("must not be dialled")), side)) is None
    assert [e.reason for e in side.refused] == ["locked"] and "patching" in side.refused[0].message
    assert registry.totals().active == 0


async def test_the_notice_prefix_comes_before_warnings_and_end_texts(world: World) -> None:
    """With `gateway.notice_prefix = "[bastion]"` the warning and the end text start with it; a refusal does not."""
    world.deps = dataclasses.replace(world.deps, notice_prefix="[bastion]")
    handler = FakeHandler(limits=Limits(idle_timeout=None, max_duration=None))
    side = FakeSide()
    task = await start(world, handler, side)
    assert handler.session is not None
    world.registry.terminate(handler.session.id, "patching", 30)
    await world.clock.settle()
    assert side.notices == ["[bastion] You will be disconnected in 30 seconds: patching"]
    await world.clock.advance(30)
    assert await task == Reason.TERMINATED_BY_OPERATOR
    assert side.ended_with == ["[bastion] You have been disconnected. patching"]
