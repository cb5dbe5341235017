"""One session lifecycle for every protocol: `run_session()`.

A door authenticates the user and builds a request; `run_session()` does the
rest the same way for every protocol:

1. ask the handler whether policy grants the request (a refusal is logged,
   counted and told to the user through `ClientSide.refuse`);
2. dial the inventory address through the handler, timed, counted and logged;
3. open the session in the registry with the grant's limits;
4. let the handler start its relay (`serve`), which reports bytes, half-closes
   and the first side to go away into the `Session`;
5. watch the session: idle, max duration, half-close and pending disconnects,
   each with its reason, warning the user first where the protocol can show text;
6. when the session ends for a reason the user did not cause, show the notice
   (`ClientSide.end`), then close the relay, each step bounded in time.

The close reason is the first `Session.end()`, not whichever task wakes first.
Cancellation propagates (the registry records `gateway_shutdown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar, cast

from structlog.typing import FilteringBoundLogger

from gateway.clock import Clock
from gateway.config import Limits
from gateway.errors import BadRequest, GatewayError, PolicyDenied, TargetRefused, UpstreamError, UpstreamHostKeyMismatch
from gateway.kinds import Protocol as SessionProtocol
from gateway.kinds import Reason
from gateway.policy import Grant, Policy, Principal
from gateway.sessions.model import SessionSpec, notice_text, prefixed, seconds_text, warning_text
from gateway.sessions.registry import Session, SessionRegistry

# How long showing a notice and closing a relay may take before they are cut short.
END_DEADLINE = 5.0
CLOSE_DEADLINE = 5.0


@dataclass(frozen=True)
class Client:
    """The authenticated peer of a door."""

    principal: Principal
    source_ip: str
    source_port: int
    connection_id: str | None = None  # the authenticated connection carrying the session (operators can end it)
    client_name: str | None = None  # the machine name the client gave (RD Gateway), already cleaned and bounded


class ClientSide(Protocol):
    """The user's end of one session, as the door that accepted it offers it."""

    def notice(self, text: str) -> bool:
        """Show one line to the user now. False when this protocol cannot show text or the user is gone."""
        ...

    async def refuse(self, error: GatewayError) -> None:
        """Nothing was (or could be) opened: tell the user why (`error.message` is safe to show)."""
        ...

    async def end(self, text: str) -> None:
        """End the user's side, showing `text` as this protocol allows. Never raises for a side already gone."""
        ...


class Relay(Protocol):
    """A running relay, returned by `ProtocolHandler.serve`."""

    async def close(self) -> None:
        """End both sides now. The lifecycle bounds how long this may take."""
        ...


R_contra = TypeVar("R_contra", contravariant=True)
U = TypeVar("U")
S_contra = TypeVar("S_contra", bound=ClientSide, contravariant=True)
S = TypeVar("S", bound=ClientSide)


class ProtocolHandler(Protocol[R_contra, U, S_contra]):
    """One way of reaching a VM. A new protocol is one module implementing this plus one line in `app.py`."""

    @property
    def kind(self) -> str:
        """A name for logs (the session protocol comes from the grant)."""
        ...

    def authorize(self, policy: Policy, request: R_contra) -> Grant:
        """What policy grants this request. Raises PolicyDenied, TargetRefused or BadRequest."""
        ...

    async def connect(self, request: R_contra, grant: Grant) -> U:
        """Reach the granted inventory address. Raises UpstreamError. The caller owns the result."""
        ...

    def discard(self, upstream: U) -> None:
        """Close an upstream that will not be served (the session could not open)."""
        ...

    async def serve(self, request: R_contra, grant: Grant, upstream: U, client: S_contra, session: Session) -> Relay:
        """Start relaying; from here `serve` owns `upstream`.

        Report into `session`: `add_up`/`add_down`, `half_closed(side)`, and `end(reason)`
        when a side goes away. Raises GatewayError when the VM refuses the session after
        the dial (the lifecycle tells the user and records the reason).
        """
        ...


class UpstreamObserver(Protocol):
    """Told how reaching VMs went (metrics implement this). VM names are inventory names."""

    def dial_succeeded(self, vm: str, seconds: float) -> None: ...

    def dial_failed(self, vm: str, reason: str) -> None: ...

    def refused(self, reason: str) -> None: ...


class NullObserver:
    def dial_succeeded(self, vm: str, seconds: float) -> None:
        return None

    def dial_failed(self, vm: str, reason: str) -> None:
        return None

    def refused(self, reason: str) -> None:
        return None


class Locks(Protocol):
    """Operators' locks, as a session start sees them."""

    def refusal(self, *, user: str, vm: str, source: str) -> str | None:
        """What the user reads when a lock holds on any of these, else None."""
        ...


@dataclass(frozen=True)
class Deps:
    """What every session needs from the composition root."""

    registry: SessionRegistry
    policy: Policy
    log: FilteringBoundLogger
    observer: UpstreamObserver = field(default_factory=NullObserver)
    locks: Locks | None = None
    notice_prefix: str = ""  # `gateway.notice_prefix`: before every notice and end text the user reads


@dataclass(frozen=True)
class _Prefixed:
    """A side whose notices and end texts carry the notice prefix; refusals are errors and keep their text."""

    side: ClientSide
    prefix: str

    def notice(self, text: str) -> bool:
        return self.side.notice(prefixed(self.prefix, text))

    async def refuse(self, error: GatewayError) -> None:
        await self.side.refuse(error)

    async def end(self, text: str) -> None:
        await self.side.end(prefixed(self.prefix, text))


def session_spec(client: Client, grant: Grant) -> SessionSpec:
    """The registry entry for a relay from `client` to the granted inventory VM."""
    return SessionSpec(
        user=client.principal.name,
        source_ip=client.source_ip,
        source_port=client.source_port,
        vm=grant.vm.name,
        target_address=grant.vm.address,
        target_port=grant.port,
        protocol=SessionProtocol(grant.protocol),
        login=grant.login,
        connection_id=client.connection_id,
        client_name=client.client_name,
    )


async def run_session(
    deps: Deps,
    handler: ProtocolHandler[R_contra, U, S],
    request: R_contra,
    client: Client,
    side: S,
    *,
    target: str = "",
) -> Reason | None:
    """Run one session from policy check to the last byte. Returns why it ended (None: never opened).

    Never raises for what a client or a VM did: refusals and failures are told to
    the user and logged. Cancellation propagates after the relay was closed.
    """
    log = deps.log.bind(user=client.principal.name, source_ip=client.source_ip, source_port=client.source_port, handler=handler.kind)
    try:
        grant = handler.authorize(deps.policy, request)
    except (PolicyDenied, TargetRefused, BadRequest) as exc:
        # `target` is what the client typed: bounded, and only ever a log field, never a metric label.
        log.info("session_refused", target=target[:64], reason=exc.reason, error=exc.message)
        deps.observer.refused(exc.reason)
        await side.refuse(exc)
        return None
    user = client.principal.name
    lock = deps.locks.refusal(user=user, vm=grant.vm.name, source=client.source_ip) if deps.locks is not None else None
    if lock is not None:
        log.info("session_refused", target=target[:64], reason="locked", error=lock)
        deps.observer.refused("locked")
        await side.refuse(GatewayError(lock, reason="locked"))
        return None
    refused = deps.registry.reserve(user)
    if refused is not None:
        if refused == "user_rate_limit":
            rate = deps.registry.rate_per_user
            per_s = f"{rate[0]:g}" if rate else "?"
            text = f"you are opening sessions faster than {per_s} a second, the most allowed; wait a moment and retry"
            refusal = GatewayError(text, reason=refused)
            log.info("session_refused", target=target[:64], reason=refused, rate_per_s=rate[0] if rate else None)
        else:
            limit = deps.registry.max_per_user
            refusal = GatewayError(f"you already have {limit} sessions open, the most allowed at once; close one first", reason=refused)
            log.info("session_refused", target=target[:64], reason=refused, limit=limit)
        deps.observer.refused(refusal.reason)
        await side.refuse(refusal)
        return None
    try:
        return await _dial_and_serve(deps, handler, request, client, side, grant=grant, log=log)
    finally:
        deps.registry.release(user)


async def _dial_and_serve(
    deps: Deps,
    handler: ProtocolHandler[R_contra, U, S],
    request: R_contra,
    client: Client,
    side: S,
    *,
    grant: Grant,
    log: FilteringBoundLogger,
) -> Reason | None:
    vm = grant.vm
    log = log.bind(vm=vm.name, port=grant.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        upstream = await handler.connect(request, grant)
    except GatewayError as exc:
        deps.observer.dial_failed(vm.name, exc.reason)
        if isinstance(exc, UpstreamHostKeyMismatch):
            log.error("upstream_host_key_mismatch", reason=exc.reason, error=exc.message)
            shown = GatewayError(
                f"the identity of VM {vm.name!r} could not be verified; the session was refused and the operator alerted", reason=exc.reason
            )
        else:
            log.warning("upstream_dial_failed", reason=exc.reason, error=exc.message)
            where = f"VM {vm.name!r}" if grant.protocol == SessionProtocol.SSH else f"VM {vm.name!r} port {grant.port}"
            shown = UpstreamError(f"cannot reach {where}: {exc.message}", reason=exc.reason)
        await side.refuse(shown)
        return None
    deps.observer.dial_succeeded(vm.name, loop.time() - started)
    spec = session_spec(client, grant)
    recheck = partial(_still_granted, deps, handler, request, client)
    shown_to = _Prefixed(side, deps.notice_prefix)
    async with deps.registry.open(spec, limits=grant.limits, notice=shown_to.notice, recheck=recheck) as session:
        try:
            relay = await handler.serve(request, grant, upstream, side, session)
        except GatewayError as exc:
            session.end(_reason_of(exc))
            await side.refuse(exc)
            return session.reason
        except BaseException:
            handler.discard(upstream)
            raise
        try:
            await watch(session, shown_to, deps.registry.clock)
            if session.end_text is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(END_DEADLINE):
                        await shown_to.end(session.end_text)
        finally:
            try:
                async with asyncio.timeout(CLOSE_DEADLINE):
                    await relay.close()
            except TimeoutError:
                log.warning("relay_close_timeout", session_id=session.id, limit_s=CLOSE_DEADLINE)
        return session.reason


def _still_granted(deps: Deps, handler: ProtocolHandler[R_contra, U, S], request: R_contra, client: Client) -> str | None:
    """After a reload: does the current policy still grant this session? None: yes; else what the user reads.

    The user's groups are taken from the current config; requests carry the principal, so it is replaced.
    """
    user = deps.policy.user(client.principal.name)
    if client.principal.auth_method == "oidc":
        principal = client.principal  # an identity provider's user: the groups it signed in with
    elif user is None:
        return "Your account was removed from the gateway's configuration."
    else:
        principal = Principal(user.name, user.groups, client.principal.auth_method)
    fresh: Any = request
    if dataclasses.is_dataclass(request) and hasattr(request, "principal"):
        fresh = dataclasses.replace(cast(Any, request), principal=principal)
    try:
        handler.authorize(deps.policy, fresh)
    except (PolicyDenied, TargetRefused, BadRequest):
        return "The gateway's configuration no longer grants this session."
    return None


def end_if_crashed(session: Session, task: asyncio.Task[None]) -> None:
    """A relay's pump task that died of a bug still ends its session (the registry logs the reason); it never
    lingers. Attach with `task.add_done_callback(partial(end_if_crashed, session))`."""
    if not task.cancelled() and task.exception() is not None:
        session.end(Reason.INTERNAL_ERROR)


def _reason_of(exc: GatewayError) -> Reason:
    try:
        return Reason(exc.reason)
    except ValueError:
        return Reason.UPSTREAM_FAILED if exc.reason.startswith("upstream") else Reason.INTERNAL_ERROR


@dataclass(frozen=True)
class _Deadline:
    when: float
    reason: Reason
    text: str | None  # shown when it ends the session
    warn_at: float | None
    warning: Callable[[float], str] | None  # the warning, given the seconds left


def _shutdown_warning(text: str, left: float) -> str:
    return f"{text} You will be disconnected in {seconds_text(left)}."


def fmt_duration(seconds: float) -> str:
    """`1800` -> `30m`, `7200` -> `2h`, `1.5` -> `1.5s`: durations as config spells them."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def deadlines(session: Session, now: float) -> list[_Deadline]:
    """Every way this session can end on time, from its limits and a pending disconnect."""
    out: list[_Deadline] = []
    lim: Limits = session.limits
    p = session.pending
    if p is not None:
        shutdown = p.reason is Reason.GATEWAY_SHUTDOWN
        warning = partial(_shutdown_warning, p.text) if shutdown else partial(warning_text, p.text)
        # A pending end with time left warns at once (the request time); one due now just ends.
        out.append(_Deadline(p.ends_mono, p.reason, notice_text(p.text), now, warning))
    if lim.idle_timeout is not None:
        when = session.last_input + lim.idle_timeout
        warn_at = when - lim.warn_before if lim.idle_timeout > lim.warn_before else None
        text = notice_text(f"No input for {fmt_duration(lim.idle_timeout)} (idle timeout).")
        out.append(_Deadline(when, Reason.IDLE_TIMEOUT, text, warn_at, partial(warning_text, "idle")))
    if lim.max_duration is not None:
        when = session.started_mono + lim.max_duration
        warn_at = when - lim.warn_before if lim.max_duration > lim.warn_before else None
        text = notice_text(f"The session reached its maximum duration of {fmt_duration(lim.max_duration)}.")
        out.append(_Deadline(when, Reason.MAX_DURATION, text, warn_at, partial(warning_text, "maximum session duration")))
    if lim.half_close_timeout is not None and session.half_closed_at is not None:
        out.append(_Deadline(session.half_closed_at + lim.half_close_timeout, Reason.HALF_CLOSE_TIMEOUT, None, None, None))
    return out


def _check(session: Session, side: ClientSide, now: float, warned: dict[Reason, float]) -> float | None:
    """One look at the deadlines: end the session when one passed, warn when a warning is due; else how long to wait.

    A function of its own so the deadlines, texts and lists it builds are freed before the watchdog waits (an idle
    session's frame then holds none of them)."""
    pending = deadlines(session, now)
    due = [d for d in pending if d.when <= now]
    if due:
        first = min(due, key=lambda d: d.when)
        session.end(first.reason, first.text)
        return None
    wake: list[float] = [d.when for d in pending]
    for d in pending:
        if d.warn_at is None or d.warning is None:
            continue
        if d.warn_at <= now:
            if warned.get(d.reason) != d.when:
                warned[d.reason] = d.when
                side.notice(d.warning(d.when - now))
        else:
            wake.append(d.warn_at)
    return max(0.0, min(wake) - now) if wake else None


async def watch(session: Session, side: ClientSide, clock: Clock) -> Reason:
    """The session's watchdog: returns once the session has ended, ending it itself when a deadline passes.

    Each deadline warns once (per deadline) `warn_before` ahead where the protocol can show text.
    Every wait goes through `clock`, so tests move time instead of waiting.
    """
    warned: dict[Reason, float] = {}
    while not session.ended:
        timeout = _check(session, side, clock.monotonic(), warned)
        if session.ended:
            break
        await session.wait_change(timeout)
    reason = session.reason
    assert reason is not None
    return reason


def ended_reason(exc: Exception | None, *, user: bool) -> Reason:
    """The reason for a side whose connection was lost with `exc` (None: closed cleanly)."""
    if exc is None:
        return Reason.CLIENT_CLOSED if user else Reason.VM_CLOSED
    # asyncssh: "... not responding to keepalive"; the kernel's TCP keepalive: ETIMEDOUT.
    if "keepalive" in str(exc).lower() or isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == errno.ETIMEDOUT:
        return Reason.CLIENT_SILENT if user else Reason.VM_SILENT
    return Reason.CLIENT_LOST if user else Reason.VM_RESET
