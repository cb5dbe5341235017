"""Terminating SSH: the user's session channel relayed to a session on the VM.

The gateway logs in to the VM with its own credential. Two small asyncssh
sessions are paired: `UserSide` (server side, facing the user) and
`VMSide` (client side, facing the VM), both with `encoding=None`. Data,
extended data, EOF, window changes, signals, breaks and the exit status pass
through; each side pauses the other's reading when its send buffer fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from structlog.typing import FilteringBoundLogger

from gateway.errors import GatewayError, UpstreamHostKeyMismatch
from gateway.policy import Grant, env_allowed
from gateway.protocols.base import Client, NullUpstreamObserver, UpstreamObserver, session_spec
from gateway.protocols.ssh_disconnect import disconnect_with_notice, notice_text, warning_text
from gateway.protocols.upstream_ssh import Credentials, HostKeys, connect_vm
from gateway.sessions.registry import Session, SessionRegistry

# Input the user sends before the VM side is open is held up to this much,
# then the user channel is paused (its window stops growing).
_EARLY_INPUT_LIMIT = 256 * 1024


@dataclass
class SessionRequest:
    """What the user's channel asked for, collected from its requests."""

    kind: str = "shell"  # shell | exec | subsystem
    command: str | None = None
    subsystem: str | None = None
    term_type: str | None = None
    term_size: tuple[int, int, int, int] | None = None
    term_modes: dict[int, int] = field(default_factory=dict)


class UserSide(asyncssh.SSHServerSession[bytes]):
    """The user's session channel. Buffers early input until `attach()`."""

    def __init__(self, start: Any) -> None:
        self._start = start
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.request = SessionRequest()
        self._vm_chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._session: Session | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._early_eof = False
        self._paused_early = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- requests (before the session starts) --
    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], term_modes: dict[int, int]) -> bool:  # type: ignore[override]
        self.request.term_type = term_type
        self.request.term_size = term_size
        self.request.term_modes = dict(term_modes)
        return True

    def shell_requested(self) -> bool:
        self.request.kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self.request.kind = "exec"
        self.request.command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.request.kind = "subsystem"
        self.request.subsystem = subsystem
        return True

    def session_started(self) -> None:
        self._start(self)

    # -- relay --
    def attach(self, vm_chan: asyncssh.SSHClientChannel[bytes], session: Session) -> None:
        """Connect the VM side and flush what the user sent early."""
        self._vm_chan = vm_chan
        self._session = session
        for chunk in self._early:
            vm_chan.write(chunk)
            session.add_up(len(chunk))
        self._early.clear()
        if self._early_eof:
            vm_chan.write_eof()
        if self._paused_early and self.chan is not None:
            self.chan.resume_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._vm_chan is not None and self._session is not None:
            self._vm_chan.write(data)
            self._session.add_up(len(data))
            return
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size > _EARLY_INPUT_LIMIT and not self._paused_early and self.chan is not None:
            self._paused_early = True
            self.chan.pause_reading()

    def eof_received(self) -> bool:
        if self._vm_chan is not None:
            self._vm_chan.write_eof()
        else:
            self._early_eof = True
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self._vm_chan is not None:
            self._vm_chan.change_terminal_size(width, height, pixwidth, pixheight)
        else:
            self.request.term_size = (width, height, pixwidth, pixheight)

    def signal_received(self, signal: str) -> None:
        if self._vm_chan is not None:
            self._vm_chan.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self._vm_chan is not None:
            self._vm_chan.send_break(msec)
            return True
        return False

    def pause_writing(self) -> None:
        if self._vm_chan is not None:
            self._vm_chan.pause_reading()

    def resume_writing(self) -> None:
        if self._vm_chan is not None:
            self._vm_chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._vm_chan is not None:
            self._vm_chan.close()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- endings --
    def fail(self, message: str, status: int = 255) -> None:
        """Tell the user why the session could not start, then end the channel."""
        if self.chan is None or self.closed.done():
            return
        self.chan.write(f"bastion: {message}\r\n".encode(), asyncssh.EXTENDED_DATA_STDERR)
        self.chan.exit(status)

    def notice(self, text: str) -> bool:
        """Write a line into the user's terminal (stdout with a PTY, else stderr). False if it is gone."""
        if self.chan is None or self.closed.done():
            return False
        data = f"\r\n{text}\r\n".encode()
        try:
            if self.request.term_type is not None:
                self.chan.write(data)
            else:
                self.chan.write(data, asyncssh.EXTENDED_DATA_STDERR)
        except (asyncssh.Error, OSError, RuntimeError):
            return False
        return True


class VMSide(asyncssh.SSHClientSession[bytes]):
    """The session on the VM. Everything it receives goes to the user's channel."""

    def __init__(self, user: UserSide, session: Session) -> None:
        self._user = user
        self._session = session
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.exit_status: int | None = None
        self.exit_signal: tuple[str, bool, str, str] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        uc = self._user.chan
        if uc is not None and not self._user.closed.done():
            uc.write(data, datatype)
            self._session.add_down(len(data))

    def eof_received(self) -> bool:
        uc = self._user.chan
        if uc is not None and not self._user.closed.done():
            uc.write_eof()
        return True

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        if self._user.chan is not None:
            self._user.chan.pause_reading()

    def resume_writing(self) -> None:
        if self._user.chan is not None:
            self._user.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        uc = self._user.chan
        if uc is not None and not self._user.closed.done():
            if self.exit_signal is not None:
                uc.exit_with_signal(*self.exit_signal)
            elif self.exit_status is not None:
                uc.exit(self.exit_status)
            else:
                uc.close()
        if not self.closed.done():
            self.closed.set_result(None)


class SSHTerminateHandler:
    """Opens the VM side for a user's session channel and relays until either side ends."""

    kind = "ssh"

    def __init__(
        self,
        registry: SessionRegistry,
        credentials: Credentials,
        host_keys: HostKeys,
        connect_timeout: float,
        log: FilteringBoundLogger,
        *,
        observer: UpstreamObserver | None = None,
    ) -> None:
        self._observer = observer or NullUpstreamObserver()
        self._registry = registry
        self._credentials = credentials
        self._host_keys = host_keys
        self._timeout = connect_timeout
        self._log = log

    async def serve(self, grant: Grant, client: Client, user: UserSide) -> None:
        """Run one terminating session. Never raises for upstream failures: the user is told why.

        Cancellation (gateway shutdown, connection closed) propagates.
        """
        vm = grant.vm
        assert grant.login is not None
        log = self._log.bind(user=client.principal.name, source_ip=client.source_ip, vm=vm.name, login=grant.login)
        started = time.monotonic()
        try:
            conn = await connect_vm(vm, grant.login, self._credentials, self._host_keys, self._timeout)
        except GatewayError as exc:
            self._observer.dial_failed(vm.name, exc.reason)
            self._report(exc, vm.name, log, user)
            return
        self._observer.dial_succeeded(vm.name, time.monotonic() - started)
        await self._relay(grant, client, user, conn)

    def _report(self, exc: GatewayError, vm_name: str, log: FilteringBoundLogger, user: UserSide) -> None:
        if isinstance(exc, UpstreamHostKeyMismatch):
            log.error("upstream_host_key_mismatch", reason=exc.reason, error=exc.message)
            user.fail(f"the identity of VM {vm_name!r} could not be verified; the session was refused and the operator alerted")
            return
        log.warning("upstream_dial_failed", reason=exc.reason, error=exc.message)
        user.fail(f"cannot reach VM {vm_name!r}: {exc.message}")

    async def _relay(self, grant: Grant, client: Client, user: UserSide, conn: asyncssh.SSHClientConnection) -> None:
        vm = grant.vm
        if user.closed.done():
            conn.close()
            return
        req = user.request
        spec = session_spec(client, vm, vm.ssh_port, self.kind, grant.login)
        env: dict[str | bytes, str | bytes] = {}
        if user.chan is not None:
            env = {k: v for k, v in user.chan.get_environment().items() if env_allowed(k, grant.env)}

        ended: asyncio.Future[tuple[str, float]] = asyncio.get_running_loop().create_future()

        async def terminate(reason: str, grace: float) -> None:
            # Runs in the operator's request; the session's own task does the ending.
            if grace > 0:
                user.notice(warning_text(reason, grace))
            if not ended.done():
                ended.set_result((reason, grace))

        async def notice(message: str) -> bool:
            return user.notice(message)

        try:
            async with self._registry.open(spec, terminate=terminate, notice=notice) as session:
                try:
                    vm_side = VMSide(user, session)
                    vm_chan, _ = await conn.create_session(
                        lambda: vm_side,
                        command=req.command if req.kind == "exec" else None,
                        subsystem=req.subsystem if req.kind == "subsystem" else None,
                        env=env,
                        term_type=req.term_type,
                        term_size=req.term_size,
                        term_modes=req.term_modes,
                        request_pty="force" if req.term_type is not None else False,
                        encoding=None,
                    )
                except asyncssh.ChannelOpenError as exc:
                    session.close_reason = "upstream_refused"
                    user.fail(f"VM {vm.name!r} refused the session: {exc.reason}")
                    return
                except (asyncssh.Error, OSError) as exc:
                    session.close_reason = "upstream_failed"
                    user.fail(f"VM {vm.name!r} refused the request: {exc}")
                    return
                user.attach(vm_chan, session)
                watched: set[asyncio.Future[Any]] = {user.closed, vm_side.closed, ended}
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if ended in done:
                    reason, grace = ended.result()
                    if grace > 0:
                        await asyncio.wait({user.closed, vm_side.closed}, timeout=grace)
                    if not user.closed.done():
                        await disconnect_with_notice(user.chan, notice_text(reason), pty=user.request.term_type is not None)
                if session.close_reason is None:
                    session.close_reason = "client_closed" if user.closed in done and not vm_side.closed.done() else "vm_closed"
                # Let the exit status and close reach the user before the VM connection goes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await user.closed
                vm_chan.close()
        finally:
            conn.close()
