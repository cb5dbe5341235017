"""The SSH door: asyncssh on accepted sockets, authentication, and channel routing.

One `GatewaySSHServer` per connection authenticates the user (public key or
an OpenSSH user certificate from a trusted CA), enforces the auth-try cap and
MaxStartups, then routes each channel:

- a session channel with a VM in the user name -> `run_session` with the terminating handler;
- a session channel without one -> the gateway's own shell (banner, `token`, `ls`);
- a direct-tcpip channel -> `run_session` with the jump handler.

Policy, the dial and the session's life are `run_session`'s; the door only
authenticates and turns requests into handler requests.

Remote forwarding, agent forwarding, X11 and streamlocal are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Coroutine
from typing import Any, Protocol

import asyncssh
from asyncssh.encryption import get_encryption_algs
from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs
from structlog.typing import FilteringBoundLogger

from gateway.config import SSH_CIPHERS, SSH_KEX_ALGS, SSH_MAC_ALGS, StartupPolicy
from gateway.kinds import PenaltyEvent, Refusal
from gateway.locks import LockStore
from gateway.net.listener import ConnectionObserver
from gateway.net.penalties import Penalties
from gateway.net.ratelog import RateLimitedLog
from gateway.net.startups import Startups
from gateway.policy import Policy, Principal, parse_username
from gateway.protocols.asyncssh_options import run_shared_server
from gateway.protocols.gateway_shell import GatewayShellSession
from gateway.protocols.lifecycle import CLOSE_DEADLINE, END_DEADLINE, Client, Deps, ProtocolHandler, fmt_duration, run_session
from gateway.protocols.ssh_disconnect import disconnect_connection
from gateway.protocols.ssh_jump import ChannelSide, JumpRequest, JumpSide
from gateway.protocols.ssh_terminate import TerminateRequest, UserSide, bounded_channel
from gateway.protocols.upstream_ssh import supported
from gateway.sessions.connections import Connection, ConnectionRegistry
from gateway.tokens import TokenService
from gateway.userca import Identities, UserCA


class DoorObserver(Protocol):
    """Told about authentication failures and refusals (metrics implement this)."""

    def auth_failed(self, method: str, reason: str) -> None: ...

    def refused(self, reason: str) -> None: ...


class _NullObserver:
    def auth_failed(self, method: str, reason: str) -> None:
        return None

    def refused(self, reason: str) -> None:
        return None


class SSHDoor:
    """Shared by every SSH connection: options, policy, handlers, and the unauthenticated count."""

    def __init__(
        self,
        *,
        host_keys: list[asyncssh.SSHKey],
        deps: Deps,
        user_ca_keys: tuple[str, ...],
        terminate: ProtocolHandler[TerminateRequest, Any, UserSide],
        jump: ProtocolHandler[JumpRequest, Any, JumpSide],
        node: str,
        login_grace_time: float,
        max_auth_tries: int,
        max_startups: StartupPolicy,
        keepalive_interval: float,
        keepalive_count: int,
        log: FilteringBoundLogger,
        max_sessions: int = 10,
        max_forwards: int = 100,
        public_hint: str = "GATEWAY",
        public_port: int = 443,
        observer: DoorObserver | None = None,
        tokens: TokenService | None = None,
        connections: ConnectionRegistry | None = None,
        locks: LockStore | None = None,
        idle_connection_timeout: float | None = None,
        user_ca: UserCA | None = None,
        identities: Identities | None = None,
        penalties: Penalties | None = None,
        version_timeout: float = 10.0,
        refusals: ConnectionObserver | None = None,
    ) -> None:
        self.penalties = penalties
        self.version_timeout = version_timeout
        self.refusals = refusals
        self.observer: DoorObserver = observer or _NullObserver()
        self.tokens = tokens
        self.connections = connections or ConnectionRegistry(node, deps.registry.clock)
        self.locks = locks
        self.idle_connection_timeout = idle_connection_timeout
        self.user_ca = user_ca  # the gateway's own CA (`bastion login` certificates)
        self.identities = identities
        self.deps = deps
        self.policy: Policy = deps.policy
        # Each user's keys parsed once, as the wire blobs clients present.
        self.key_blobs: dict[str, frozenset[bytes]] = {
            name: frozenset(asyncssh.import_public_key(k).public_data for k in user.keys) for name, user in self.policy.users().items()
        }
        self.user_ca_keys = user_ca_keys
        self.terminate = terminate
        self.jump = jump
        self.node = node
        self.max_auth_tries = max_auth_tries
        self.max_startups = max_startups
        self.startups = Startups(max_startups, random.random)
        self._refusal_log = RateLimitedLog()
        self.max_sessions = max_sessions
        self.max_forwards = max_forwards
        self.log = log
        self.public_hint = public_hint
        self.public_port = public_port
        self.login_hint = f"{public_hint}:{public_port}"
        self._options = _server_options(host_keys, login_grace_time, keepalive_interval, keepalive_count)

    def reconfigure(
        self,
        *,
        host_keys: list[asyncssh.SSHKey],
        user_ca_keys: tuple[str, ...],
        terminate: ProtocolHandler[TerminateRequest, Any, UserSide],
        jump: ProtocolHandler[JumpRequest, Any, JumpSide],
        login_grace_time: float,
        max_auth_tries: int,
        max_startups: StartupPolicy,
        keepalive_interval: float,
        keepalive_count: int,
        max_sessions: int,
        max_forwards: int,
        idle_connection_timeout: float | None,
        version_timeout: float,
    ) -> None:
        """A reload: new connections get these; live ones keep what they authenticated with.

        The policy was replaced in place already; the users' key blobs are parsed again from it.
        """
        self.key_blobs = {
            name: frozenset(asyncssh.import_public_key(k).public_data for k in user.keys) for name, user in self.policy.users().items()
        }
        self.user_ca_keys = user_ca_keys
        self.terminate = terminate
        self.jump = jump
        self.max_auth_tries = max_auth_tries
        self.max_startups = max_startups
        self.startups.set_policy(max_startups)
        self.max_sessions = max_sessions
        self.max_forwards = max_forwards
        self.idle_connection_timeout = idle_connection_timeout
        self.version_timeout = version_timeout
        self._options = _server_options(host_keys, login_grace_time, keepalive_interval, keepalive_count)

    def _log_refusal(self, log: FilteringBoundLogger, reason: str) -> None:
        """Refusals a scanner can trigger are logged at most once a second per reason, saying how many were not."""
        self._refusal_log.warning(log, "connection_refused", reason, unauthenticated=self.startups.total)

    def _penalize(self, server: GatewaySSHServer, peer: tuple[str, int], reason: str) -> None:
        """One penalty per connection that ended unauthenticated, like sshd: failed keys count once, when the
        client gives up or is cut off, so a user whose agent offers a few wrong keys before the right one, and
        logs in, earns nothing."""
        if self.penalties is None:
            return
        if reason in (Refusal.VERSION_TIMEOUT, "login_timeout"):
            event = PenaltyEvent.GRACE_EXCEEDED
        elif server._failures:  # the door owns its connections' servers
            event = PenaltyEvent.AUTH_FAILURE
        elif server.username is None:
            event = PenaltyEvent.NO_AUTH
        else:
            return
        self.penalties.record(peer[0], event)

    def _version_deadline(self, server: GatewaySSHServer, late: list[bool]) -> None:
        """A client that has not sent its identification string by now is cut off (asyncssh would wait for the
        whole login_grace_time).

        asyncssh 2.24.1 parses the peer's version in the private `_recv_version` and publishes it at once with
        `set_extra_info(client_version=...)`; `get_extra_info("client_version")` is documented API, so this timer
        reads that instead of patching `_recv_version` or wrapping `data_received`. Peeking for the line before
        asyncssh starts would be simpler but would hang clients that wait for the server's version first.
        """
        conn = server._conn  # set by connection_made, the one place asyncssh hands the connection over
        if conn is not None and not server.authenticated and conn.get_extra_info("client_version") is None:
            late.append(True)
            conn.abort()

    def _version_refused(self, log: FilteringBoundLogger) -> None:
        if self.refusals is not None:
            self.refusals.connection_refused("public", Refusal.VERSION_TIMEOUT)
        self._refusal_log.warning(log, "connection_refused", Refusal.VERSION_TIMEOUT, limit_s=self.version_timeout)

    async def handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Own `sock` from here: run SSH on it until the connection ends."""
        log = self.log.bind(source_ip=peer[0], source_port=peer[1])
        refused = self.startups.admit(peer[0])
        if refused is not None:
            self.observer.refused(refused)
            sock.close()
            self._log_refusal(log, refused)
            return
        server = GatewaySSHServer(self, peer, log)
        conn: asyncssh.SSHServerConnection | None = None
        late: list[bool] = []
        timer = asyncio.get_running_loop().call_later(self.version_timeout, self._version_deadline, server, late)
        try:
            conn = await run_shared_server(sock, self._options, lambda: server)
        except asyncio.CancelledError:
            server.cancel_all()
            raise
        except (asyncssh.Error, OSError, TimeoutError, ValueError) as exc:
            if not server.authenticated:
                reason = Refusal.VERSION_TIMEOUT if late else _slug(exc)
                if not late:
                    log.info("ssh_handshake_ended", reason=reason, detail=str(exc)[:200], user=server.username)
                self._penalize(server, peer, reason)
            if late:
                self._version_refused(log)
            return
        finally:
            timer.cancel()
            server.release_startup()
            if conn is None:
                sock.close()  # asyncssh may fail before its transport owns the socket
        if late:  # abort() ends asyncssh's wait without an error: run_server returns the closed connection
            conn.abort()
            self._penalize(server, peer, Refusal.VERSION_TIMEOUT)
            self._version_refused(log)
            return
        try:
            await conn.wait_closed()
        finally:
            conn.abort()
            await server.wait_tasks()
            server.forget()


def _server_options(
    host_keys: list[asyncssh.SSHKey], login_grace_time: float, keepalive_interval: float, keepalive_count: int
) -> asyncssh.SSHServerConnectionOptions:
    return asyncssh.SSHServerConnectionOptions(
        server_host_keys=host_keys,
        server_version="Bastion",
        kex_algs=supported(SSH_KEX_ALGS, get_kex_algs()),
        encryption_algs=supported(SSH_CIPHERS, get_encryption_algs()),
        mac_algs=supported(SSH_MAC_ALGS, get_mac_algs()),
        login_timeout=login_grace_time,
        keepalive_interval=keepalive_interval,
        keepalive_count_max=keepalive_count,
        public_key_auth=True,
        password_auth=False,
        kbdint_auth=False,
        host_based_auth=False,
        gss_host=None,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_pty=True,
        line_editor=False,
        encoding=None,
    )


def _slug(exc: BaseException) -> str:
    """A closed-set reason for a connection that ended before authentication completed."""
    if isinstance(exc, asyncssh.PermissionDenied):
        return "auth_failed"
    if isinstance(exc, TimeoutError) or (isinstance(exc, asyncssh.DisconnectError) and "timeout" in exc.reason.lower()):
        return "login_timeout"
    if isinstance(exc, asyncssh.ConnectionLost | ConnectionError):
        return "connection_lost"
    if isinstance(exc, asyncssh.DisconnectError):
        return "client_disconnected"
    return "handshake_failed"


class GatewaySSHServer(asyncssh.SSHServer):
    """One user connection. Owns the tasks its channels start (a small supervisor)."""

    def __init__(self, door: SSHDoor, peer: tuple[str, int], log: FilteringBoundLogger) -> None:
        self._door = door
        self._peer = peer
        self._log = log
        self._conn: asyncssh.SSHServerConnection | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures = 0
        self._counted = True
        self._key_ok = False
        self.username: str | None = None
        self.authenticated = False
        self._principal: Principal | None = None
        self._vm: str | None = None
        self._login: str | None = None
        self._record: Connection | None = None  # in the connection registry once authenticated
        self._idle: asyncio.Task[None] | None = None
        self._locked: str | None = None  # authenticated, but a lock holds (its text): being disconnected, nothing opens
        self._session_channels = 0  # session channels open now (VM sessions and gateway shells), for max_sessions

    # -- supervisor --
    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guard(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("task_failed", task=name)

    def cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    async def wait_tasks(self, grace: float = 2.0) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for t in pending:
                t.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def forget(self) -> None:
        """The connection and its tasks are over: drop the links back to it (the connection holds this server's factory,
        the record this server's end callback, the cancelled idle watch its error's frames), so what it held is freed at
        once, not by a full collection."""
        self._conn = None
        self._record = None
        self._idle = None  # cancelled by connection_lost

    def release_startup(self) -> None:
        if self._counted:
            self._counted = False
            self._door.startups.release(self._peer[0])

    # -- connection & auth --
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        # Channel sessions see connection_lost too and end their tasks normally;
        # `SSHDoor.handle` cancels whatever is left after a short grace.
        self.release_startup()
        if self._record is not None:
            self._door.connections.remove(self._record)
        if self._idle is not None:
            self._idle.cancel()

    def begin_auth(self, username: str) -> bool:
        self.username = username[:64]
        try:
            target = parse_username(username)
        except ValueError:
            self._principal = None
            return True
        user = self._door.policy.user(target.user)
        cas = list(self._door.user_ca_keys)
        if user is not None:
            self._principal = Principal(name=user.name, groups=user.groups, auth_method="publickey")
        else:
            # Someone who signed in on the web (an identity provider's user) holds only a gateway certificate.
            groups = self._door.identities.groups(target.user) if self._door.identities is not None else None
            if groups is None:
                self._principal = None
                if self._door.identities is not None and self._door.identities.expired(target.user) and self._conn is not None:
                    hint = f"bastion login --gateway {self._door.login_hint}"
                    self._conn.send_auth_banner(f"Your bastion certificate has expired: run `{hint}`.\r\n")
                return True
            self._principal = Principal(name=target.user, groups=groups, auth_method="certificate")
            cas = []
        if self._door.user_ca is not None:
            cas.append(self._door.user_ca.public_line())
        self._vm = target.vm
        self._login = target.login
        if cas and self._conn is not None:
            lines = "".join(f'cert-authority,principals="{self._principal.name}" {k}\n' for k in cas)
            self._conn.set_authorized_keys(asyncssh.import_authorized_keys(lines))
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        user = self._door.policy.user(self._principal.name) if self._principal else None
        if user is not None and key.public_data in self._door.key_blobs.get(user.name, frozenset()):
            self._key_ok = True
            return True
        self._auth_failed("unknown_user" if self._principal is None else "key_not_authorized", "publickey")
        return False

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self._auth_failed("unknown_user" if self._principal is None else "ca_not_trusted", "certificate")
        return False

    def _auth_failed(self, reason: str, method: str) -> None:
        self._failures += 1
        self._door.observer.auth_failed(method, reason)
        self._log.info("auth_failed", user=self.username, method=method, reason=reason, attempt=self._failures)
        if self._failures >= self._door.max_auth_tries and self._conn is not None:
            self._log.warning("auth_tries_exceeded", user=self.username, limit=self._door.max_auth_tries)
            self._conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "Too many authentication failures")

    def auth_completed(self) -> None:
        assert self._principal is not None
        method = "publickey" if self._key_ok else "certificate"
        self._principal = Principal(self._principal.name, self._principal.groups, method)
        self.authenticated = True
        self.release_startup()
        if self._conn is not None:
            self._conn.set_authorized_keys(None)  # the CA lines of `begin_auth` (1.4 KiB): only authentication reads them
        name = self._principal.name
        # A lock is told only to whom it concerns: after authentication, never to a stranger.
        lock = self._door.locks.match(user=name, source=self._peer[0]) if self._door.locks is not None else None
        if lock is not None:
            self._log.info("login_refused", user=name, method=method, reason="locked", lock_id=lock.id)
            self._door.observer.refused("locked")
            self._locked = lock.refusal()
            self.spawn(self._disconnect(self._locked), name="locked")
            return
        self._record = self._door.connections.add(name, self._peer, "ssh", method, self._end_requested)
        self._log.info("auth_succeeded", user=name, method=method, vm=self._vm, connection_id=self._record.id)
        limit = self._door.idle_connection_timeout
        if limit is not None:
            # Not in the supervised set: it must not delay the connection's end by the tasks' grace.
            self._idle = asyncio.create_task(self._idle_watch(self._record, limit), name=f"idle:{name}")

    async def _disconnect(self, text: str) -> None:
        if self._conn is not None:
            await disconnect_connection(self._conn, text)

    def _end_requested(self, text: str) -> None:
        """An operator or a lock ends this connection: its sessions were told already; wait for them, then DISCONNECT."""
        self.spawn(self._end_after_sessions(text), name="end-connection")

    async def _end_after_sessions(self, text: str) -> None:
        relaying = [t for t in self._tasks if t.get_name().startswith(("ssh:", "jump:"))]
        if relaying:
            await asyncio.wait(relaying, timeout=END_DEADLINE + CLOSE_DEADLINE + 1)
        self._log.info("connection_ended", user=self.username, reason=text[:200])
        await self._disconnect(text)

    async def _idle_watch(self, record: Connection, limit: float) -> None:
        """Ends the connection once it has held no channel (session, shell or forward) for `limit` seconds."""
        clock = self._door.deps.registry.clock
        while not record.ending:
            record.changed.clear()
            if record.idle_since is None:
                await record.changed.wait()
                continue
            left = record.idle_since + limit - clock.monotonic()
            if left <= 0:
                self._log.info("connection_idle_timeout", user=record.user, limit_s=limit)
                record.end(f"No session, shell or forward for {fmt_duration(limit)} (idle connection timeout).")
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await record.changed.wait()

    def _channel_opened(self) -> None:
        if self._record is not None:
            self._record.channel_opened()

    def _channel_closed(self) -> None:
        if self._record is not None:
            self._record.channel_closed()

    def _client(self) -> Client:
        assert self._principal is not None
        return Client(self._principal, self._peer[0], self._peer[1], self._record.id if self._record is not None else None)

    # -- channels --
    def _channel_allowed(self, kind: str) -> None:
        """Session channels (like sshd's MaxSessions) and forwards are capped per connection. Raises ChannelOpenError.

        Session channels (VM sessions and gateway shells) are counted from the open until the channel closes: their
        relay task starts only at session_started, so counting tasks let a burst of opens through. Each forward is
        one task from the open on, so the live forward count is the task count.
        """
        if self._locked is not None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, self._locked)
        limit = self._door.max_sessions if kind == "session" else self._door.max_forwards
        live = self._session_channels if kind == "session" else sum(1 for t in self._tasks if t.get_name().startswith("jump:"))
        if live >= limit:
            reason = "connection_session_limit" if kind == "session" else "connection_forward_limit"
            self._log.info("channel_refused", user=self.username, kind=kind, reason=reason, limit=limit)
            self._door.observer.refused(reason)
            what = "sessions" if kind == "session" else "forwarded connections"
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"at most {limit} {what} at once on one connection")

    def session_requested(
        self,
    ) -> asyncssh.SSHServerSession[bytes] | tuple[asyncssh.SSHServerChannel[bytes], asyncssh.SSHServerSession[bytes]]:
        client = self._client()
        vm = self._vm
        self._channel_allowed("session")
        self._session_channels += 1
        if vm is None:
            self._channel_opened()

            def shell_closed() -> None:
                self._session_channels -= 1
                self._channel_closed()

            shell = GatewayShellSession(self._door, client, on_close=shell_closed)
            return shell if self._conn is None else (bounded_channel(self._conn), shell)
        request_login = self._login

        def start(user: UserSide) -> None:
            # A refusal is accepted as a channel and explained on stderr: a channel-open
            # failure is only printed at OpenSSH's INFO log level, which `-q` hides.
            request = TerminateRequest(client.principal, vm, request_login, user)
            self.spawn(self._run(self._door.terminate, request, client, user, vm), name=f"ssh:{client.principal.name}:{vm[:64]}")

        user_side = UserSide(start)
        user_side.closed.add_done_callback(self._session_channel_closed)
        return user_side if self._conn is None else (bounded_channel(self._conn), user_side)

    def _session_channel_closed(self, _: object) -> None:
        self._session_channels -= 1

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        self._channel_allowed("direct-tcpip")
        client = self._client()
        side = JumpSide()
        request = JumpRequest(client.principal, dest_host, dest_port)
        self.spawn(self._run(self._door.jump, request, client, side, dest_host), name=f"jump:{client.principal.name}:{dest_host[:64]}")

        async def opened() -> ChannelSide:
            return await side.channel

        return opened()

    async def _run(self, handler: ProtocolHandler[Any, Any, Any], request: Any, client: Client, side: Any, target: str) -> None:
        self._channel_opened()
        try:
            await run_session(self._door.deps, handler, request, client, side, target=target)
        finally:
            self._channel_closed()
            if isinstance(side, JumpSide):
                side.give_up()  # a channel still waiting to open (the gateway is stopping) is refused

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self._log.info("forward_refused", user=self.username, kind="remote", reason="not_allowed")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._log.info("forward_refused", user=self.username, kind="streamlocal", reason="not_allowed")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self._log.info("forward_refused", user=self.username, kind="remote-streamlocal", reason="not_allowed")
        return False
