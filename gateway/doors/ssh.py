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
import random
import socket
import time
from collections.abc import Coroutine
from typing import Any, Protocol

import asyncssh
from asyncssh.encryption import get_encryption_algs
from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs
from structlog.typing import FilteringBoundLogger

from gateway.config import StartupPolicy
from gateway.net.startups import Startups
from gateway.policy import Policy, Principal, parse_username
from gateway.protocols.gateway_shell import GatewayShellSession
from gateway.protocols.lifecycle import Client, Deps, ProtocolHandler, run_session
from gateway.protocols.ssh_jump import ChannelSide, JumpRequest, JumpSide
from gateway.protocols.ssh_terminate import TerminateRequest, UserSide, bounded_channel
from gateway.tokens import TokenService


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
        observer: DoorObserver | None = None,
        tokens: TokenService | None = None,
    ) -> None:
        self.observer: DoorObserver = observer or _NullObserver()
        self.tokens = tokens
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
        self._refusal_logged: dict[str, tuple[float, int]] = {}
        self.max_sessions = max_sessions
        self.max_forwards = max_forwards
        self.log = log
        self.public_hint = public_hint
        self._options = asyncssh.SSHServerConnectionOptions(
            server_host_keys=host_keys,
            server_version="Bastion",
            kex_algs=_supported(KEX_ALGS, get_kex_algs()),
            encryption_algs=_supported(ENCRYPTION_ALGS, get_encryption_algs()),
            mac_algs=_supported(MAC_ALGS, get_mac_algs()),
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

    def _log_refusal(self, log: FilteringBoundLogger, reason: str) -> None:
        """Refusals a scanner can trigger are logged at most once a second per reason, saying how many were not."""
        now = time.monotonic()
        last, skipped = self._refusal_logged.get(reason, (0.0, 0))
        if now - last < _REFUSAL_LOG_EVERY:
            self._refusal_logged[reason] = (last, skipped + 1)
            return
        self._refusal_logged[reason] = (now, 0)
        log.warning("connection_refused", reason=reason, unauthenticated=self.startups.total, suppressed=skipped)

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
        try:
            conn = await asyncssh.run_server(sock, options=self._options, server_factory=lambda: server)
        except asyncio.CancelledError:
            server.cancel_all()
            raise
        except (asyncssh.Error, OSError, TimeoutError, ValueError) as exc:
            if not server.authenticated:
                log.info("ssh_handshake_ended", reason=_slug(exc), detail=str(exc)[:200], user=server.username)
            return
        finally:
            server.release_startup()
            if conn is None:
                sock.close()  # asyncssh may fail before its transport owns the socket
        try:
            await conn.wait_closed()
        finally:
            conn.abort()
            await server.wait_tasks()


_REFUSAL_LOG_EVERY = 1.0  # seconds: a flood of refused connections writes one line a second per reason, with a count


# Modern algorithms only, in preference order: no SHA-1 key exchange or MAC, no CBC, RC4 or 3DES. Every
# current OpenSSH, PuTTY and Windows client speaks several of each.
KEX_ALGS = (
    "mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp521", "ecdh-sha2-nistp384", "ecdh-sha2-nistp256",
    "diffie-hellman-group-exchange-sha256", "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)  # fmt: skip
ENCRYPTION_ALGS = (
    "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes128-gcm@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr",
)  # fmt: skip
MAC_ALGS = (
    "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "umac-128-etm@openssh.com",
    "hmac-sha2-256", "hmac-sha2-512", "umac-128@openssh.com",
)  # fmt: skip


def _supported(wanted: tuple[str, ...], available: list[bytes]) -> list[str]:
    have = {a.decode() for a in available}
    return [a for a in wanted if a in have]


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

    def begin_auth(self, username: str) -> bool:
        self.username = username[:64]
        try:
            target = parse_username(username)
        except ValueError:
            self._principal = None
            return True
        user = self._door.policy.user(target.user)
        if user is None:
            self._principal = None
            return True
        self._principal = Principal(name=user.name, groups=user.groups, auth_method="publickey")
        self._vm = target.vm
        self._login = target.login
        if self._door.user_ca_keys and self._conn is not None:
            lines = "".join(f'cert-authority,principals="{user.name}" {k}\n' for k in self._door.user_ca_keys)
            self._conn.set_authorized_keys(asyncssh.import_authorized_keys(lines))
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        user = self._door.policy.user(self._principal.name) if self._principal else None
        if user is not None and key.public_data in self._door.key_blobs.get(user.name, frozenset()):
            self._key_ok = True
            return True
        self._auth_failed("unknown_user" if user is None else "key_not_authorized", "publickey")
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
        self._log.info("auth_succeeded", user=self._principal.name, method=method, vm=self._vm)

    def _client(self) -> Client:
        assert self._principal is not None
        return Client(self._principal, self._peer[0], self._peer[1])

    # -- channels --
    def _channel_allowed(self, kind: str) -> None:
        """Session channels (like sshd's MaxSessions) and forwards are capped per connection. Raises ChannelOpenError.

        Each relaying channel is one task here, named by kind, so the live count is the task count.
        """
        limit = self._door.max_sessions if kind == "session" else self._door.max_forwards
        prefix = "ssh:" if kind == "session" else "jump:"
        if sum(1 for t in self._tasks if t.get_name().startswith(prefix)) >= limit:
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
        if vm is not None:
            self._channel_allowed("session")
        if vm is None:
            return GatewayShellSession(self._door, client)
        request_login = self._login

        def start(user: UserSide) -> None:
            # A refusal is accepted as a channel and explained on stderr: a channel-open
            # failure is only printed at OpenSSH's INFO log level, which `-q` hides.
            request = TerminateRequest(client.principal, vm, request_login, user)
            self.spawn(self._run(self._door.terminate, request, client, user, vm), name=f"ssh:{client.principal.name}:{vm[:64]}")

        if self._conn is None:
            return UserSide(start)
        return bounded_channel(self._conn), UserSide(start)

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
        try:
            await run_session(self._door.deps, handler, request, client, side, target=target)
        finally:
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
