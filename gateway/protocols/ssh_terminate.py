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
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncssh
from asyncssh.packet import SSHPacket

from gateway.config import DEFAULT_VM_CIPHERS
from gateway.errors import GatewayError, UpstreamError
from gateway.kinds import Reason
from gateway.policy import Grant, Policy, Principal, env_allowed
from gateway.protocols.lifecycle import ended_reason
from gateway.protocols.ssh_disconnect import disconnect_with_notice
from gateway.protocols.upstream_ssh import ClientOptions, Credentials, HostKeys, connect_vm
from gateway.sessions.registry import Session

# Input the user sends before the VM side is open is held up to this much,
# then the user channel is paused (its window stops growing).
_EARLY_INPUT_LIMIT = 256 * 1024
# Environment a user may pass on one session channel (OpenSSH's client sends a handful). Beyond this, env
# requests are refused: 300,000 of them once cost 110 MB and delayed other users' logins.
MAX_ENV_ENTRIES = 64
MAX_ENV_BYTES = 16 * 1024


class _EnvBounded(asyncssh.SSHServerChannel[bytes]):
    """asyncssh's session channel, its env requests bounded in entries and bytes (asyncssh stores every one of them
    without a limit). `_process_env_request` is an internal of the pinned asyncssh 2.24.1, looked up per request by
    name; a subclass rather than a wrapper stored on the channel, which made every closed channel a reference cycle."""

    def _process_env_request(self, packet: SSHPacket) -> bool:
        store: dict[bytes, bytes] = self._env
        before = set(store)
        if not super()._process_env_request(packet):
            return False
        size = sum(len(k) + len(v) for k, v in store.items())
        if len(store) > MAX_ENV_ENTRIES or size > MAX_ENV_BYTES:
            for key in set(store) - before:
                del store[key]
            return False
        return True


def bounded_channel(conn: asyncssh.SSHServerConnection) -> asyncssh.SSHServerChannel[bytes]:
    """A session channel whose environment is bounded in entries and bytes (`_EnvBounded`)."""
    chan: asyncssh.SSHServerChannel[bytes] = conn.create_server_channel(encoding=None)
    chan.__class__ = _EnvBounded  # the same layout: asyncssh builds the channel, the subclass only bounds env
    return chan


@dataclass
class SessionRequest:
    """What the user's channel asked for, collected from its requests."""

    kind: str = "shell"  # shell | exec | subsystem
    command: str | None = None
    subsystem: str | None = None
    term_type: str | None = None
    term_size: tuple[int, int, int, int] | None = None
    term_modes: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TerminateRequest:
    """A session channel the SSH door authenticated, for VM `vm` as `login` (None: the default)."""

    principal: Principal
    vm: str
    login: str | None
    user: UserSide


class UserSide(asyncssh.SSHServerSession[bytes]):
    """The user's session channel (the `ClientSide` of a terminating session). Buffers early input until `attach()`."""

    def __init__(self, start: Callable[[UserSide], None]) -> None:
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
    def bind(self, session: Session) -> None:
        """From here the user's departure ends `session`."""
        self._session = session

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
        if self._session is not None:
            self._session.activity()
        if self._vm_chan is not None:
            self._vm_chan.change_terminal_size(width, height, pixwidth, pixheight)
        else:
            self.request.term_size = (width, height, pixwidth, pixheight)

    def signal_received(self, signal: str) -> None:
        if self._session is not None:
            self._session.activity()
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
        if self._session is not None:
            self._session.end(ended_reason(exc, user=True))
        if self._vm_chan is not None:
            self._vm_chan.close()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- the ClientSide of the lifecycle --
    async def refuse(self, error: GatewayError) -> None:
        self.fail(error.message)

    async def end(self, text: str) -> None:
        if not self.closed.done():
            await disconnect_with_notice(self.chan, text, pty=self.request.term_type is not None)

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
        # No half-close timer here, either way: an SSH session's EOF only ends its data. `cmd > log 2>&1`
        # closes stdout at once and runs on; the session lasts until exit-status and close (bounded by the
        # idle and duration limits).
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
        self._session.end(ended_reason(exc, user=False))
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


class _TerminateRelay:
    def __init__(self, user: UserSide, conn: asyncssh.SSHClientConnection, vm_chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._user = user
        self._conn = conn
        self._vm_chan = vm_chan

    async def close(self) -> None:
        # Let the exit status and close reach the user before the VM connection goes.
        if not self._user.closed.done() and self._user.chan is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._user.closed
            if not self._user.closed.done():
                self._user.chan.close()
        self._vm_chan.close()
        self._conn.close()


class SSHTerminateHandler:
    """Logs in to the VM for a user's session channel and pairs the two sessions."""

    kind = "ssh"

    def __init__(
        self,
        credentials: Credentials,
        host_keys: HostKeys,
        connect_timeout: float,
        *,
        keepalive: tuple[float, int] = (30.0, 3),
        ciphers: tuple[str, ...] = DEFAULT_VM_CIPHERS,
    ) -> None:
        self._credentials = credentials
        self._host_keys = host_keys
        self._timeout = connect_timeout
        self._keepalive = keepalive
        self._ciphers = ciphers
        self._options = ClientOptions()  # the VM logins' prepared asyncssh options, shared by their connections

    def authorize(self, policy: Policy, request: TerminateRequest) -> Grant:
        return policy.check_ssh(request.principal, request.vm, request.login)

    async def connect(self, request: TerminateRequest, grant: Grant) -> asyncssh.SSHClientConnection:
        assert grant.login is not None
        return await connect_vm(
            grant.vm,
            grant.login,
            self._credentials,
            self._host_keys,
            self._timeout,
            keepalive=self._keepalive,
            ciphers=self._ciphers,
            options=self._options,
        )

    def discard(self, upstream: asyncssh.SSHClientConnection) -> None:
        upstream.close()

    async def serve(
        self, request: TerminateRequest, grant: Grant, upstream: asyncssh.SSHClientConnection, client: UserSide, session: Session
    ) -> _TerminateRelay:
        conn, user, vm = upstream, request.user, grant.vm
        if user.closed.done():
            conn.close()
            session.end(Reason.CLIENT_CLOSED)
            raise GatewayError("the user left before the VM session opened", reason=Reason.CLIENT_CLOSED)
        user.bind(session)
        req = user.request
        env: dict[str | bytes, str | bytes] = {}
        if user.chan is not None:
            env = {k: v for k, v in user.chan.get_environment().items() if env_allowed(k, grant.env)}
        vm_side = VMSide(user, session)
        try:
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
            conn.close()
            raise UpstreamError(f"VM {vm.name!r} refused the session: {exc.reason}", reason=Reason.UPSTREAM_REFUSED) from None
        except (asyncssh.Error, OSError) as exc:
            conn.close()
            raise UpstreamError(f"VM {vm.name!r} refused the request: {exc}", reason=Reason.UPSTREAM_FAILED) from None
        except BaseException:
            conn.close()
            raise
        user.attach(vm_chan, session)
        return _TerminateRelay(user, conn, vm_chan)
