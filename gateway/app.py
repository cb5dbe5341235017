"""Composition root and lifecycle: build everything from config, start, drain, stop.

Only this module knows the concrete classes; the handler table below is the one
place a protocol is registered. Everything that can fail on bad files or busy
ports is checked in `start()` before anything accepts traffic.

Stopping is a drain: not ready, stop accepting, tell every session "the gateway
is restarting" and give it `shutdown_grace`, end what is left with
`gateway_shutdown`, stop the public side, and close the control port last.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import asyncssh
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from structlog.typing import FilteringBoundLogger

from gateway.access import AccessControl
from gateway.clock import Clock, SystemClock
from gateway.config import Config
from gateway.control.api import ControlAPI
from gateway.doors.https import PublicApp, public_https
from gateway.doors.rdg import RdgDoor
from gateway.doors.ssh import SSHDoor
from gateway.doors.web import WebDoor
from gateway.errors import ConfigError, GatewayError, StartupError
from gateway.filemodes import check_private_file, check_state_dir, read_private_key
from gateway.kinds import PenaltyEvent, Reason
from gateway.locks import LockStore
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.metrics_merge import merge
from gateway.net import tls
from gateway.net.detect import Door
from gateway.net.https import HTTPSServer
from gateway.net.listener import Caps, Listener, bind, default_max_connections
from gateway.net.penalties import Penalties
from gateway.oidc import OIDCClient, PendingLogins, read_client_secret
from gateway.policy import Policy
from gateway.protocols import asyncssh_fast
from gateway.protocols.lifecycle import CLOSE_DEADLINE, END_DEADLINE, Deps
from gateway.protocols.rdg import RdgHandler
from gateway.protocols.ssh_jump import SSHJumpHandler
from gateway.protocols.ssh_terminate import SSHTerminateHandler
from gateway.protocols.ssh_web import SSHWebHandler
from gateway.protocols.tunnel import TunnelHandler
from gateway.protocols.upstream_ssh import Credentials, HostKeys, login_key_path
from gateway.sdnotify import Notifier, ServiceNotifier
from gateway.sessions.cluster import RedisCluster
from gateway.sessions.connections import ConnectionRegistry
from gateway.sessions.registry import SessionRegistry
from gateway.stalls import Stalls
from gateway.tokens import TokenService, load_key, load_or_create_key
from gateway.userca import CliLogins, Identities, UserCA
from gateway.websessions import WebSessions
from gateway.workers import WorkerSpec, supervisor_status


def ensure_state_dir(path: Path) -> Path:
    """Create the state directory (mode 0700). Raises StartupError if it cannot, or if an existing one is
    not the gateway's own or is open to group or others (`filemodes.check_state_dir`)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartupError(f"gateway.state_dir: cannot create {str(path)!r}: {exc.strerror}") from None
    check_state_dir(path)
    if not os.access(path, os.W_OK):
        raise StartupError(f"gateway.state_dir: not writable: {str(path)!r}")
    return path


def load_host_keys(config: Config, state_dir: Path, log: FilteringBoundLogger) -> list[asyncssh.SSHKey]:
    """The gateway's own SSH host keys; an ed25519 key is generated in state_dir when none are configured."""
    keys = [read_private_key(p, f"ssh.host_keys[{i}]", "SSH host key") for i, p in enumerate(config.ssh.host_keys)]
    if keys:
        return keys
    path = state_dir / GENERATED_HOST_KEY
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        (state_dir / "ssh_host_ed25519_key.pub").write_bytes(key.export_public_key())
        log.info("host_key_generated", path=str(path), fingerprint=key.get_fingerprint())
    return [read_private_key(path, "gateway.state_dir", "generated SSH host key")]


def load_tls(config: Config, state_dir: Path, log: FilteringBoundLogger) -> ssl.SSLContext:
    if config.public.tls_cert is not None and config.public.tls_key is not None:
        return tls.server_context(config.public.tls_cert, config.public.tls_key)
    cert, key = state_dir / "tls.crt", state_dir / "tls.key"
    if not cert.exists() or not key.exists():
        names = sorted(
            {"localhost", "127.0.0.1", "::1", config.gateway.node}
            | {a.host for a in config.public.listen if a.host not in ("0.0.0.0", "::")}
        )
        tls.write_self_signed(cert, key, names)
        log.warning("tls_self_signed_generated", cert=str(cert), hint="set public.tls_cert and public.tls_key for production")
    return _generated_tls(state_dir)


GENERATED_HOST_KEY = "ssh_host_ed25519_key"


def _generated_tls(state_dir: Path) -> ssl.SSLContext:
    key = state_dir / "tls.key"
    check_private_file(key, "gateway.state_dir", "generated TLS key")
    return tls.server_context(state_dir / "tls.crt", key)


def _state_dir_creatable(path: Path) -> None:
    """What `ensure_state_dir` checks, without creating anything. Raises StartupError."""
    if path.exists() or path.is_symlink():
        check_state_dir(path)
        if not os.access(path, os.W_OK):
            raise StartupError(f"gateway.state_dir: not writable: {str(path)!r}")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StartupError(f"gateway.state_dir: cannot create {str(path)!r}: {str(parent)!r} is not a writable directory")


def _readable_text(path: Path, key: str) -> None:
    try:
        path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"{key}: cannot read {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None


def _client_secret(path: Path) -> str:
    """The OIDC client secret, checked as `start` checks it. Raises StartupError."""
    check_private_file(path, "oidc.client_secret_file", "client secret file")
    return read_client_secret(path)


def prepare_state(cfg: Config, log: FilteringBoundLogger) -> None:
    """Create what the gateway generates in its state dir on first start (host key, TLS, token key, user CA), once,
    before several workers start (they would race to create them). Raises StartupError naming the file."""
    state_dir = ensure_state_dir(cfg.gateway.state_dir)
    load_files(cfg, state_dir, log)
    if not cfg.tunnel.token_key_file:
        load_or_create_key(state_dir / "token.key")
    UserCA.load_or_create(cfg.ca.key or state_dir / "user_ca_ed25519", SystemClock(), cfg.ca.certificate_lifetime)


def preflight(cfg: Config) -> list[str]:
    """Every check `serve` makes before it binds, each problem found (not only the first), as one line each.

    The state dir; every file the config names (exists, readable, the gateway's own and closed to others where
    it is a secret, parses as what it must be): TLS certificates and keys, SSH host keys, VM login keys, token
    signing keys, the user CA key, the OIDC client secret, the Redis password; and what the gateway keeps in
    its state dir when it is there already (generated keys, locks, identities, learned host keys). Creates and
    changes nothing: a file the gateway generates on first start is checked only when it exists.
    `bastion check-config` prints the list and `bastion serve` refuses to start on it, so the two cannot drift.
    Binding the ports is not part of it.
    """
    problems: list[str] = []

    def check(fn: Callable[[], object]) -> None:
        try:
            fn()
        except StartupError as exc:
            problems.extend(exc.problems)

    state = cfg.gateway.state_dir
    check(lambda: _state_dir_creatable(state))
    clock = SystemClock()
    for label, section in (("public", cfg.public), ("control", cfg.control)):
        cert, key = section.tls_cert, section.tls_key
        if cert is not None and key is not None:
            check(functools.partial(tls.server_context, cert, key, label=label))
    if (cfg.public.tls_cert is None or cfg.public.tls_key is None) and (state / "tls.crt").exists() and (state / "tls.key").exists():
        check(lambda: _generated_tls(state))
    for i, p in enumerate(cfg.ssh.host_keys):
        check(functools.partial(read_private_key, p, f"ssh.host_keys[{i}]", "SSH host key"))
    if not cfg.ssh.host_keys and (state / GENERATED_HOST_KEY).exists():
        check(functools.partial(read_private_key, state / GENERATED_HOST_KEY, "gateway.state_dir", "generated SSH host key"))
    for vm in cfg.vms.values():
        for login in vm.logins.values():
            check(functools.partial(read_private_key, login.key, login_key_path(vm, login.name), "VM login key"))
    if cfg.tunnel.token_key_file is not None:
        check(functools.partial(load_key, cfg.tunnel.token_key_file, "tunnel.token_key_file"))
    elif (state / "token.key").exists():
        check(functools.partial(load_or_create_key, state / "token.key"))  # exists: only read and checked
    if cfg.tunnel.previous_token_key_file is not None:
        check(functools.partial(load_key, cfg.tunnel.previous_token_key_file, "tunnel.previous_token_key_file"))
    ca_key = cfg.ca.key or state / "user_ca_ed25519"
    if ca_key.exists():  # a missing one is generated, as `serve` does
        check(functools.partial(UserCA.load_or_create, ca_key, clock, cfg.ca.certificate_lifetime))
    check(LockStore(state / "locks.json", clock).load)
    check(Identities(state / "identities.json", clock).load)
    if (state / "known_hosts_tofu").exists():
        check(functools.partial(_readable_text, state / "known_hosts_tofu", "gateway.state_dir"))
    if cfg.oidc is not None:
        check(functools.partial(_client_secret, cfg.oidc.client_secret_file))
    if cfg.cluster is not None and cfg.cluster.password_file is not None:
        check(functools.partial(read_secret_file, cfg.cluster.password_file, "cluster.password_file"))
    return problems


WEB_SESSION_LIFETIME = 8 * 3600.0  # a browser sign-in lasts this long (the cookie's Max-Age too)

# Operators, scrapers and event streams (at most 64) on the control port: a few hundred at most, from few sources.
CONTROL_CAPS = Caps(total=256, per_source=256)


@dataclass(frozen=True)
class Files:
    """Everything the config points at, read and checked: what start and reload need before they change anything."""

    ssh_host_keys: list[asyncssh.SSHKey]
    tls: ssl.SSLContext
    control_tls: ssl.SSLContext
    credentials: Credentials
    vm_host_keys: HostKeys
    token_keys: tuple[bytes, bytes | None] | None = None  # configured signing keys (current, previous), if any


def load_files(cfg: Config, state_dir: Path, log: FilteringBoundLogger) -> Files:
    """Read every key and certificate the config names. Raises StartupError naming the key and the file."""
    ssl_ctx = load_tls(cfg, state_dir, log)
    control_ssl = (
        tls.server_context(cfg.control.tls_cert, cfg.control.tls_key, label="control")
        if cfg.control.tls_cert is not None and cfg.control.tls_key is not None
        else ssl_ctx
    )
    return Files(
        ssh_host_keys=load_host_keys(cfg, state_dir, log),
        tls=ssl_ctx,
        control_tls=control_ssl,
        credentials=Credentials.load(cfg.vms),
        vm_host_keys=HostKeys(cfg.vms, state_dir / "known_hosts_tofu", log),
        token_keys=(
            load_key(cfg.tunnel.token_key_file, "tunnel.token_key_file"),
            load_key(cfg.tunnel.previous_token_key_file, "tunnel.previous_token_key_file") if cfg.tunnel.previous_token_key_file else None,
        )
        if cfg.tunnel.token_key_file
        else None,
    )


# What a reload cannot change: the sockets are bound and the state dir is open. A change is logged and waits for a restart.
RESTART_ONLY = (
    "gateway.node", "gateway.state_dir", "gateway.notice_prefix", "gateway.workers", "public.listen", "control.listen", "oidc", "ca",
)  # fmt: skip


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    pairs = {
        "gateway.node": (old.gateway.node, new.gateway.node),
        "gateway.state_dir": (old.gateway.state_dir, new.gateway.state_dir),
        "gateway.notice_prefix": (old.gateway.notice_prefix, new.gateway.notice_prefix),
        "gateway.workers": (old.gateway.workers, new.gateway.workers),
        "public.listen": (old.public.listen, new.public.listen),
        "control.listen": (old.control.listen, new.control.listen),
        "oidc": (old.oidc, new.oidc),
        "ca": (old.ca, new.ca),
    }
    return [key for key in RESTART_ONLY if pairs[key][0] != pairs[key][1]]


def read_secret_file(path: Path, key: str) -> str:
    """A password on one line of a private file. Raises StartupError naming `key` and the file."""
    check_private_file(path, key, "password file")
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"{key}: cannot read {str(path)!r}: {exc}") from None
    if not text or "\n" in text:
        raise StartupError(f"{key}: {str(path)!r} must hold the password on one line")
    return text


def public_caps(cfg: Config) -> Caps:
    return Caps(cfg.public.max_connections or default_max_connections(), cfg.public.max_connections_per_source)


def build_handlers(cfg: Config, credentials: Credentials, host_keys: HostKeys, clock: Clock) -> Handlers:
    """The handler table: every way of reaching a VM. A new protocol is a module and a line here."""
    keepalive = (cfg.ssh.keepalive_interval, cfg.ssh.keepalive_count)
    return Handlers(
        ssh=SSHTerminateHandler(credentials, host_keys, cfg.gateway.connect_timeout, keepalive=keepalive, ciphers=cfg.ssh.vm_ciphers),
        ssh_jump=SSHJumpHandler(cfg.gateway.connect_timeout),
        tunnel=TunnelHandler(cfg.gateway.connect_timeout),
        rdg=RdgHandler(cfg.gateway.connect_timeout, cfg.tunnel.ping_interval, clock),
        ssh_web=SSHWebHandler(credentials, host_keys, cfg.gateway.connect_timeout, keepalive=keepalive, ciphers=cfg.ssh.vm_ciphers),
    )


@dataclass(frozen=True)
class Handlers:
    """The handler table: one `ProtocolHandler` per way of reaching a VM, each served by `run_session`."""

    ssh: SSHTerminateHandler
    ssh_jump: SSHJumpHandler
    tunnel: TunnelHandler
    rdg: RdgHandler
    ssh_web: SSHWebHandler


class App:
    """The gateway. `start()` binds and serves; `stop()` ends every connection and returns."""

    def __init__(
        self,
        config: Config,
        log: FilteringBoundLogger,
        clock: Clock | None = None,
        notifier: ServiceNotifier | None = None,
        reload_config: Callable[[], Config] | None = None,
        *,
        worker: WorkerSpec | None = None,
    ) -> None:
        self.config = config
        self.worker = worker  # one of several worker processes (`gateway/workers.py`): its sockets are inherited
        self._reload_config = reload_config  # reads and validates the config again (raises ConfigError); None: no reload
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[bool]] = set()
        self.log = log
        self.clock = clock or SystemClock()
        self.notifier: ServiceNotifier = notifier or Notifier()
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self.registry = SessionRegistry(
            config.gateway.node,
            self.clock,
            log,
            max_per_user=config.max_sessions_per_user,
            rate_per_user=config.session_rate_per_user,
        )
        self.connections = ConnectionRegistry(config.gateway.node, self.clock)
        self.metrics = Metrics(self.registry, config.vms)
        self._stalls = Stalls(self.metrics.registry, log, self.clock)
        self.registry.set_observer(self.metrics)
        self.policy = Policy(config.vms, config.users, config.rules)
        self._control: Listener | None = None
        self._control_https: HTTPSServer | None = None
        self._ready = False
        self._ticker: asyncio.Task[None] | None = None
        self._listener: Listener | None = None
        self._https: HTTPSServer | None = None
        self.host_keys: list[asyncssh.SSHKey] = []
        self._ssh_door: SSHDoor | None = None
        self._public: PublicApp | None = None
        self._api: ControlAPI | None = None
        self._penalties: Penalties | None = None
        self._rdg: RdgDoor | None = None
        self._web: WebDoor | None = None
        self._oidc: OIDCClient | None = None
        self._cluster: RedisCluster | None = None
        if config.cluster is not None:
            c = config.cluster
            password = read_secret_file(c.password_file, "cluster.password_file") if c.password_file else None
            self._cluster = RedisCluster(
                self.registry, config.gateway.node, c.redis_url, heartbeat=c.heartbeat, node_ttl=c.node_ttl, timeout=c.timeout,
                log=log, clock=self.clock, password=password,
            )  # fmt: skip
        self._oidc_discovery: asyncio.Task[None] | None = None

    @property
    def public_addresses(self) -> list[tuple[str, int]]:
        return self._listener.addresses if self._listener else []

    @property
    def control_addresses(self) -> list[tuple[str, int]]:
        return self._control.addresses if self._control else []

    async def start(self) -> None:
        """Validate files, bind every port, then start serving. Raises StartupError, binding nothing on failure."""
        cfg = self.config
        if not asyncssh_fast.apply():  # before any SSH connection: the receive path without a buffer copy per packet
            self.log.warning("asyncssh_patch_skipped", asyncssh=asyncssh.__version__, written_for=asyncssh_fast.PINNED)
        state_dir = ensure_state_dir(cfg.gateway.state_dir)
        files = load_files(cfg, state_dir, self.log)
        self.host_keys = files.ssh_host_keys
        ssl_ctx, control_ssl, credentials, host_keys = files.tls, files.control_tls, files.credentials, files.vm_host_keys
        self.tokens = TokenService(
            load_key(cfg.tunnel.token_key_file, "tunnel.token_key_file")
            if cfg.tunnel.token_key_file
            else load_or_create_key(state_dir / "token.key"),
            self.clock,
            cfg.tunnel.token_lifetime,
            {d: u.name for u in cfg.users.values() for d in u.token_sha256s},
            previous=load_key(cfg.tunnel.previous_token_key_file, "tunnel.previous_token_key_file")
            if cfg.tunnel.previous_token_key_file
            else None,
        )
        self.locks = LockStore(state_dir / "locks.json", self.clock)
        self.locks.load()
        self.user_ca = UserCA.load_or_create(cfg.ca.key or state_dir / "user_ca_ed25519", self.clock, cfg.ca.certificate_lifetime)
        self.identities = Identities(state_dir / "identities.json", self.clock)
        self.identities.load()
        self.access = AccessControl(self.registry, self.connections, self.locks, self.log, notice_prefix=cfg.gateway.notice_prefix)
        sockets: list[socket.socket] = []
        control_sockets: list[socket.socket] = []
        try:
            if self.worker is not None:
                sockets, control_sockets = self.worker.sockets()
            else:
                for addr in cfg.public.listen:
                    sockets.append(bind(addr))
                for addr in cfg.control.listen:
                    control_sockets.append(bind(addr))
        except StartupError:
            for s in sockets + control_sockets:
                s.close()
            raise
        deps = Deps(self.registry, self.policy, self.log, self.metrics, locks=self.locks, notice_prefix=cfg.gateway.notice_prefix)
        handlers = build_handlers(cfg, credentials, host_keys, self.clock)
        first = cfg.public.listen[0] if cfg.public.listen else None
        hint = first.host if first and first.host not in ("0.0.0.0", "::") else "GATEWAY"
        penalties = Penalties(cfg.penalties, self.clock, observer=self.metrics)
        self._penalties = penalties
        self.metrics.watch_penalties(lambda: penalties.tracked)
        ssh_door = SSHDoor(
            penalties=penalties,
            version_timeout=cfg.ssh.version_timeout,
            refusals=self.metrics,
            host_keys=self.host_keys,
            deps=deps,
            user_ca_keys=cfg.ssh.user_ca_keys,
            terminate=handlers.ssh,
            jump=handlers.ssh_jump,
            node=cfg.gateway.node,
            login_grace_time=cfg.ssh.login_grace_time,
            max_auth_tries=cfg.ssh.max_auth_tries,
            max_startups=cfg.ssh.max_startups,
            keepalive_interval=cfg.ssh.keepalive_interval,
            keepalive_count=cfg.ssh.keepalive_count,
            max_sessions=cfg.ssh.max_sessions,
            max_forwards=cfg.ssh.max_forwards,
            log=self.log,
            public_hint=hint,
            public_port=sockets[0].getsockname()[1] if sockets else 443,
            observer=self.metrics,
            tokens=self.tokens,
            connections=self.connections,
            locks=self.locks,
            idle_connection_timeout=cfg.ssh.idle_connection_timeout,
            user_ca=self.user_ca,
            identities=self.identities,
        )
        self._ssh_door = ssh_door
        self.web_sessions = WebSessions(self.clock, cfg.oidc.session_lifetime if cfg.oidc else WEB_SESSION_LIFETIME)
        self.access.web_sessions = self.web_sessions
        if cfg.oidc is not None:
            self._oidc = OIDCClient(cfg.oidc, self.clock, _client_secret(cfg.oidc.client_secret_file))
            self._oidc_discovery = asyncio.create_task(self._discover(self._oidc), name="oidc-discovery")
        self._web = WebDoor(
            deps=deps, handler=handlers.ssh_web, sessions=self.web_sessions, tokens=self.tokens, log=self.log,
            connections=self.connections, locks=self.locks, ping_interval=cfg.tunnel.ping_interval,
            max_message=cfg.tunnel.max_message, end_connection=self.access.end_connection,
            oidc=self._oidc, pending=PendingLogins(self.clock) if self._oidc else None,
            redirect_base=cfg.oidc.redirect_base if cfg.oidc else None,
            cli=CliLogins(self.clock), user_ca=self.user_ca, identities=self.identities,
            claim_once=self._cluster.claim_once if self._cluster is not None else None,
        )  # fmt: skip
        public = PublicApp(
            cfg.gateway.node,
            deps=deps,
            tokens=self.tokens,
            tunnel=handlers.tunnel,
            max_message=cfg.tunnel.max_message,
            ping_interval=cfg.tunnel.ping_interval,
            log=self.log,
            auth_observer=self.metrics,
            connections=self.connections,
            locks=self.locks,
            max_per_token=cfg.tunnel.max_per_token,
            web=self._web,
        )
        self._public = public
        self._rdg = RdgDoor(
            deps=deps, handler=handlers.rdg, tokens=self.tokens, log=self.log, locks=self.locks, connections=self.connections,
            observer=self.metrics, preauth_deadline=cfg.public.header_timeout, penalties=penalties,
        )  # fmt: skip
        self._https = public_https(
            public, ssl_ctx, self.log, cfg.public.header_timeout, handshake_timeout=cfg.public.tls_handshake_timeout,
            max_handshakes=cfg.public.max_tls_handshakes, observer=self.metrics,
            raw=(self._rdg.probe, self._rdg.handle),
        )  # fmt: skip
        await self._https.start()
        caps = public_caps(cfg)
        doors = {Door.SSH: ssh_door.handle, Door.TLS: self._https.handle}
        listener = Listener(
            sockets, doors, cfg.public.detect_timeout, self.log, caps=caps, penalties=penalties, observer=self.metrics,
            proxy_from=cfg.public.proxy_protocol_from,
        )  # fmt: skip
        self._listener = listener
        self.metrics.watch_listener("public", lambda: listener.held)
        self._listener.start()
        api = ControlAPI(
            self.registry,
            cfg.operators,
            self.clock,
            self.log,
            metrics=self._worker_metrics if self.worker is not None and self._cluster is not None else self.metrics.render,
            metrics_content_type=CONTENT_TYPE,
            metrics_public=cfg.control.metrics_public,
            node=cfg.gateway.node,
            ready=lambda: self._ready,
            stopping=lambda: self._stopping,
            access=self.access,
            cluster=self._cluster,
        )
        self._api = api
        self.metrics.watch_connections(self.connections.counts)
        self._control_https = HTTPSServer(api.build(), control_ssl, self.log, header_timeout=cfg.control.header_timeout)
        await self._control_https.start()
        control = Listener(
            control_sockets, {Door.TLS: self._control_https.handle}, cfg.public.detect_timeout, self.log,
            caps=CONTROL_CAPS, observer=self.metrics, name="control",
        )  # fmt: skip
        self._control = control
        self.metrics.watch_listener("control", lambda: control.held)
        self._control.start()
        if self._cluster is not None:
            cluster = self._cluster
            self.metrics.watch_cluster(cluster)
            cluster.on_lock, cluster.on_unlock = self.access.remote_lock, self.access.remote_unlock
            locks = self.locks
            cluster.local_locks = lambda: [lk.to_dict() for lk in locks.list()]
            if self._penalties is not None:
                penalties = self._penalties
                penalties.on_record = lambda source, event: cluster.publish_penalty(source, str(event))
                cluster.on_penalty = partial(_remote_penalty, penalties)
            self.access.publish_lock, self.access.publish_unlock = cluster.publish_lock, cluster.publish_unlock
            cluster.on_revoke, self.tokens.on_revoke = self.tokens.revoke_id, cluster.publish_revoke
            if self.worker is not None:
                cluster.siblings, cluster.render_metrics = self.worker.siblings, self.metrics.render
            await cluster.start()  # never waits on Redis: a node without it serves its own users, degraded
        self._ticker = asyncio.create_task(self._tick(), name="session-progress")
        self._stalls.start()
        if self.notifier.watchdog_interval is not None:
            self._watchdog = asyncio.create_task(self._pet_watchdog(self.notifier.watchdog_interval), name="systemd-watchdog")
        # Everything start-up built lives as long as the process: out of the collector's reach, a full collection walks
        # only what sessions added (at 9,000 sessions it walked 1.35 M objects and stopped every relay for up to 1.2 s).
        gc.collect()
        gc.freeze()
        self._ready = True
        self.notifier.ready(f"serving {len(self.public_addresses)} public and {len(self.control_addresses)} control listeners")
        self.log.info(
            "gateway_started",
            node=cfg.gateway.node,
            public=[f"{h}:{p}" for h, p in self.public_addresses],
            control=[f"{h}:{p}" for h, p in self.control_addresses],
            operators=len(cfg.operators),
            vms=len(cfg.vms),
            users=len(cfg.users),
            rules=len(cfg.rules),
        )

    def request_reload(self) -> None:
        """SIGHUP: reload in an owned task. Reloads run one at a time, in the order asked."""
        if not self._ready or self._reload_config is None:
            self.log.warning("config_reload_ignored", reason="not serving" if not self._ready else "no config file to read again")
            return
        task = asyncio.create_task(self.reload(), name="config-reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> bool:
        """Read and validate the config again; apply it if it is valid, else log every problem and keep the old one.

        New connections and sessions use the new config at once; live ones go on, except that sessions
        the new rules no longer grant end with a notice (`access_revoked`) unless `sessions.on_revoke` is
        "continue", and connections of removed users end. Returns whether the new config was applied.
        """
        async with self._reload_lock:
            assert self._reload_config is not None
            self.notifier.reloading()
            try:
                return self._reload_now(self._reload_config)
            finally:
                self.notifier.ready("serving")

    def _reload_now(self, read: Callable[[], Config]) -> bool:
        old = self.config
        try:
            new = read()
            files = load_files(new, old.gateway.state_dir, self.log)
        except ConfigError as exc:
            self.log.error("config_reload_failed", problems=[f"{path}: {msg}" for path, msg in exc.problems], kept="the running config")
            return False
        except StartupError as exc:
            self.log.error("config_reload_failed", problems=[exc.message], kept="the running config")
            return False
        restart = _restart_only_changes(old, new)
        if restart:
            self.log.warning("config_reload_needs_restart", keys=restart, hint="these keys keep their running values until a restart")
            new = dataclasses.replace(
                new,
                gateway=dataclasses.replace(
                    new.gateway, node=old.gateway.node, state_dir=old.gateway.state_dir, notice_prefix=old.gateway.notice_prefix
                ),
                public=dataclasses.replace(new.public, listen=old.public.listen),
                control=dataclasses.replace(new.control, listen=old.control.listen),
                oidc=old.oidc,
                ca=old.ca,
            )
        self._apply(new, files)
        ended = self.access.revoke(lambda name: self.policy.user(name) is not None) if new.on_revoke == "end" else None
        self.log.info(
            "config_reloaded",
            vms=len(new.vms),
            users=len(new.users),
            rules=len(new.rules),
            operators=len(new.operators),
            sessions_ended=ended.sessions if ended else 0,
            connections_ended=ended.connections if ended else 0,
            on_revoke=new.on_revoke,
            restart_needed=restart,
        )
        return True

    def _apply(self, cfg: Config, files: Files) -> None:
        """Swap the new config in. Nothing here can fail on input: `load_files` read everything already."""
        self.config = cfg
        self.policy.replace(cfg.vms, cfg.users, cfg.rules)
        self.registry.set_limits(cfg.max_sessions_per_user, cfg.session_rate_per_user)
        self.metrics.set_vms(cfg.vms)
        self.tokens.reconfigure(cfg.tunnel.token_lifetime, {d: u.name for u in cfg.users.values() for d in u.token_sha256s})
        if files.token_keys is not None:
            self.tokens.set_keys(*files.token_keys)
        self.host_keys = files.ssh_host_keys
        handlers = build_handlers(cfg, files.credentials, files.vm_host_keys, self.clock)
        assert self._ssh_door is not None and self._public is not None and self._api is not None
        self._ssh_door.reconfigure(
            host_keys=files.ssh_host_keys,
            user_ca_keys=cfg.ssh.user_ca_keys,
            terminate=handlers.ssh,
            jump=handlers.ssh_jump,
            login_grace_time=cfg.ssh.login_grace_time,
            max_auth_tries=cfg.ssh.max_auth_tries,
            max_startups=cfg.ssh.max_startups,
            keepalive_interval=cfg.ssh.keepalive_interval,
            keepalive_count=cfg.ssh.keepalive_count,
            max_sessions=cfg.ssh.max_sessions,
            max_forwards=cfg.ssh.max_forwards,
            idle_connection_timeout=cfg.ssh.idle_connection_timeout,
            version_timeout=cfg.ssh.version_timeout,
        )
        self._public.reconfigure(
            tunnel=handlers.tunnel,
            max_message=cfg.tunnel.max_message,
            ping_interval=cfg.tunnel.ping_interval,
            max_per_token=cfg.tunnel.max_per_token,
        )
        self._api.set_operators(cfg.operators)
        if self._web is not None:
            self._web.handler = handlers.ssh_web
        if self._rdg is not None:
            self._rdg.handler = handlers.rdg
            self._rdg.preauth_deadline = cfg.public.header_timeout
        if self._penalties is not None:
            self._penalties.set_policy(cfg.penalties)
        if self._listener is not None:
            self._listener.set_caps(public_caps(cfg))
            self._listener.set_proxy_from(cfg.public.proxy_protocol_from)
        if self._https is not None:
            self._https.set_tls(files.tls, cfg.public.header_timeout, cfg.public.tls_handshake_timeout, cfg.public.max_tls_handshakes)
        if self._control_https is not None:
            self._control_https.set_tls(files.control_tls, cfg.control.header_timeout)

    async def _discover(self, oidc: OIDCClient, every: float = 10.0) -> None:
        """Owned by the App: read the provider's discovery document and keys, again every `every` s until it works
        (the gateway serves SSH and everything else meanwhile; OIDC sign-in answers that it is not ready)."""
        cfg_issuer = self.config.oidc.issuer if self.config.oidc else ""
        while True:
            try:
                await oidc.discover()
            except GatewayError as exc:
                self.log.warning("oidc_discovery_failed", reason=exc.reason, error=exc.message, retry_s=every)
            else:
                self.log.info("oidc_ready", issuer=cfg_issuer)
                return
            await self.clock.sleep(every)

    async def _tick(self, every: float = 2.0) -> None:
        """Owned by the App: lets live views (SSE, the page) see byte counts grow, one coalesced event a tick."""
        while True:
            await self.clock.sleep(every)
            self.registry.publish_progress()

    async def _pet_watchdog(self, every: float) -> None:
        """Tells systemd the loop is alive; a loop stuck for longer than WatchdogSec gets the unit restarted."""
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(every)

    async def drain(self) -> None:
        """Stop accepting and let sessions end: each is told, gets `shutdown_grace`, then ends as `gateway_shutdown`.

        Returns once no session is left (bounded: grace plus the notice and close deadlines).
        """
        if self._stopping:
            return
        self._stopping = True
        self._ready = False
        cfg = self.config.gateway
        live = self.registry.ids()
        self.notifier.stopping(f"draining {len(live)} sessions")
        self.log.info("gateway_draining", node=cfg.node, sessions=len(live), grace_s=cfg.shutdown_grace)
        for listener in (self._listener,):
            if listener is not None:
                await listener.stop_accepting()
        for sid in live:
            self.registry.terminate(sid, cfg.shutdown_notice, cfg.shutdown_grace, reason=Reason.GATEWAY_SHUTDOWN)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(cfg.shutdown_grace + END_DEADLINE + CLOSE_DEADLINE + 1):
                await self.registry.wait_empty()
        left = self.registry.totals().active
        if left:
            self.log.warning("gateway_drain_incomplete", sessions=left)

    async def stop(self) -> None:
        """Drain, then stop the public side, then the control port (last, so operators watch the drain)."""
        await self.drain()
        for task in (self._ticker, self._watchdog, self._oidc_discovery):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._listener is not None:
            await self._listener.stop()
        if self._https is not None:
            await self._https.stop()
        if self._oidc is not None:
            await self._oidc.close()
        if self._cluster is not None:
            await self._cluster.stop()
        self.registry.end_subscriptions()  # event streams end cleanly instead of waiting out aiohttp's shutdown
        if self._control is not None:
            await self._control.stop()
        await self._stalls.stop()
        if self._control_https is not None:
            await self._control_https.stop()
        self.log.info("gateway_stopped", node=self.config.gateway.node)

    async def _worker_metrics(self) -> bytes:
        """Every worker's series in one exposition (any worker may answer a scrape), with how many answered."""
        assert self._cluster is not None and self.worker is not None
        others, missing = await self._cluster.sibling_metrics()
        status = supervisor_status(await self._cluster.supervisor_status())
        answering = GaugeMetricFamily("bastion_workers_answering", "Workers whose series are in this scrape", value=1 + len(others))
        configured = GaugeMetricFamily("bastion_workers", "Worker processes configured (gateway.workers)", value=self.worker.count)
        extra: list[Metric] = [answering, configured]
        if "restarts" in status:
            restarts = CounterMetricFamily("bastion_worker_restarts", "Workers started again after they exited", value=status["restarts"])
            extra.append(restarts)
        if missing:
            self.log.warning("worker_metrics_missing", workers=missing)
        return merge([self.metrics.render(), *others], extra)

    async def run_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


def _remote_penalty(penalties: Penalties, source: str, event: str) -> None:
    """Another node's penalty event, counted here too (an unknown event name is dropped)."""
    try:
        kind = PenaltyEvent(event)
    except ValueError:
        return
    penalties.record_remote(source, kind)
