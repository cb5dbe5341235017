"""TOML -> frozen, validated config objects.

Every problem is collected with its key path and the offending value, so an
operator fixes a config in one pass. Unknown keys are errors. Nothing here
reads key material: files are only checked for existence by `app.py` at start.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import ConfigError
from gateway.kinds import Protocol
from gateway.text import one_line

# Names are matched exactly; restricting them to ASCII means a Unicode
# lookalike typed by a client can never equal a configured name.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")
# `+` and `@` separate user, VM and login in SSH user names; keep them out of names.
# What a rule may grant. `rdp` rules grant RDP by every path (tunnel, ssh -L, RD Gateway) and `ssh` rules a shell
# by every path (ssh, the browser): `rdp-gateway` and `ssh-web` are sessions' protocols, not what a rule names.
PROTOCOLS = frozenset(p.value for p in Protocol if p not in (Protocol.RDP_GATEWAY, Protocol.SSH_WEB))
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")  # ASCII digits: `\d` also matches Arabic-Indic ones, which float() reads
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse "30s", "10m", "1.5h", "500ms" into seconds. Raises ValueError."""
    m = _DURATION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"not a duration like '30s' or '10m': {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """Parse "0.0.0.0:443", "[::1]:443" or "127.0.0.1:0". Raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"expected 'HOST:PORT', got {text!r}")  # noqa: TRY004 - callers report ValueErrors as config problems
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})", text) or re.fullmatch(r"([^:\[\]\s]+):([0-9]{1,5})", text)
    if not m:
        raise ValueError(f"expected 'HOST:PORT' or '[IPV6]:PORT', got {text!r}")
    host, port = m.group(1), int(m.group(2))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"listen host must be an IP address, got {host!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return ListenAddress(host, port)


@dataclass(frozen=True)
class GatewaySection:
    node: str
    state_dir: Path
    connect_timeout: float = 10.0
    shutdown_grace: float = 30.0
    shutdown_notice: str = "The gateway is restarting: please reconnect in a minute."
    notice_prefix: str = "[bastion]"  # before every notice a user reads, so it stands out from program output; "" for none
    workers: int = 1  # worker processes `bastion serve` runs (the config's default, "auto", is the number of cores)


@dataclass(frozen=True)
class Limits:
    """How long a session may live. None: no limit.

    idle_timeout counts from the user's last input (output from the VM is not
    activity); warn_before is how long before an idle or duration end the user is
    warned; half_close_timeout is how long the other side has to finish after one
    side's EOF on a byte stream.
    """

    idle_timeout: float | None = 1800.0
    max_duration: float | None = 12 * 3600.0
    warn_before: float = 60.0
    half_close_timeout: float | None = 30.0

    def most_permissive(self, other: Limits) -> Limits:
        """The limits of two rules that both grant the same access: rules add up, so the longer wins."""

        def longer(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else max(a, b)

        return Limits(
            idle_timeout=longer(self.idle_timeout, other.idle_timeout),
            max_duration=longer(self.max_duration, other.max_duration),
            warn_before=min(self.warn_before, other.warn_before),
            half_close_timeout=longer(self.half_close_timeout, other.half_close_timeout),
        )


LIMIT_KEYS = ("idle_timeout", "max_duration", "warn_before", "half_close_timeout")


@dataclass(frozen=True)
class PublicSection:
    listen: tuple[ListenAddress, ...]
    tls_cert: Path | None
    tls_key: Path | None
    detect_timeout: float = 1.0
    header_timeout: float = 10.0
    max_connections: int | None = None  # None: derived from RLIMIT_NOFILE at start (`net.listener.default_max_connections`)
    max_connections_per_source: int = 200  # per IPv4 address or IPv6 /64, from accept until the door is done
    max_tls_handshakes: int = 256  # TLS handshakes in progress at once; more are closed at once
    tls_handshake_timeout: float = 5.0
    # Load balancers whose connections start with a PROXY protocol header (v1 or v2) naming the real client; () = off.
    proxy_protocol_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


# SSH algorithms, modern only, in preference order: no SHA-1 key exchange or MAC, no CBC, RC4 or 3DES. Every
# current OpenSSH, PuTTY and Windows client speaks several of each. AES-GCM comes first: with AES-NI it moves about
# twice what chacha20-poly1305 does on one core here, and the terminating relay is CPU-bound.
SSH_KEX_ALGS = (
    "mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp521", "ecdh-sha2-nistp384", "ecdh-sha2-nistp256",
    "diffie-hellman-group-exchange-sha256", "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)  # fmt: skip
SSH_CIPHERS = (
    "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr",
)  # fmt: skip
SSH_MAC_ALGS = (
    "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "umac-128-etm@openssh.com",
    "hmac-sha2-256", "hmac-sha2-512", "umac-128@openssh.com",
)  # fmt: skip
# What the gateway offers a VM by default (`ssh.vm_ciphers`): the AEAD ciphers, fastest first.
DEFAULT_VM_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")


@dataclass(frozen=True)
class SSHSection:
    host_keys: tuple[Path, ...] = ()
    user_ca_keys: tuple[str, ...] = ()
    login_grace_time: float = 30.0
    max_auth_tries: int = 6
    max_startups: StartupPolicy = field(default_factory=lambda: StartupPolicy(10, 30, 100, 5))
    keepalive_interval: float = 30.0
    keepalive_count: int = 3
    max_sessions: int = 10  # session channels (shell, exec, sftp) open at once on one SSH connection, like sshd's MaxSessions
    max_forwards: int = 100  # direct-tcpip channels (ssh -J/-W/-L streams) open at once on one SSH connection
    version_timeout: float = 10.0  # a client handed to the SSH door must send its identification string this soon
    idle_connection_timeout: float | None = 900.0  # an authenticated connection with no channel at all ends after this
    vm_ciphers: tuple[str, ...] = DEFAULT_VM_CIPHERS  # offered to VMs, in preference order; each one of SSH_CIPHERS


@dataclass(frozen=True)
class PenaltyPolicy:
    """OpenSSH's PerSourcePenalties: what each event adds to a source's penalty, and when the source is refused."""

    enabled: bool = True
    auth_failure: float = 5.0
    grace_exceeded: float = 10.0
    no_auth: float = 1.0
    min: float = 15.0  # refused once the penalty left exceeds this
    max: float = 600.0  # a penalty never reaches further than this from now
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_sources: int = 65536


PENALTY_KEYS = ("enabled", "auth_failure", "grace_exceeded", "no_auth", "min", "max", "exempt", "max_sources")


_STARTUPS = re.compile(r"([0-9]+)(?::([0-9]+):([0-9]+))?")


@dataclass(frozen=True)
class StartupPolicy:
    """OpenSSH's MaxStartups `start:rate:full` (N alone: `N:100:N`) and PerSourceMaxStartups."""

    start: int
    rate: int  # percent refused at `start`, rising to 100 at `full`
    full: int
    per_source: int

    @classmethod
    def parse(cls, spec: str | int, per_source: int) -> StartupPolicy:
        """Raises ValueError naming what is wrong."""
        m = _STARTUPS.fullmatch(str(spec)) if isinstance(spec, str | int) and not isinstance(spec, bool) else None
        if m is None:
            raise ValueError(f"expected N or 'start:rate:full', got {spec!r}")
        start = int(m.group(1))
        rate = int(m.group(2)) if m.group(2) is not None else 100
        full = int(m.group(3)) if m.group(3) is not None else start
        if start < 1 or not 1 <= rate <= 100 or full < start:
            raise ValueError(f"need start >= 1, 1 <= rate <= 100 and full >= start, got {spec!r}")
        return cls(start, rate, full, per_source)


@dataclass(frozen=True)
class VMLogin:
    name: str
    key: Path = field(repr=True)  # a path, never the key material


@dataclass(frozen=True)
class VM:
    name: str
    address: str
    ssh_port: int = 22
    rdp_port: int | None = None
    host_keys: tuple[str, ...] = ()
    known_hosts: Path | None = None
    trust_on_first_use: bool = False
    default_login: str | None = None
    logins: Mapping[str, VMLogin] = field(default_factory=dict)


@dataclass(frozen=True)
class User:
    name: str
    keys: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    # SHA-256 digests of long-lived tunnel tokens for automation; never the tokens.
    token_sha256s: tuple[bytes, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class TunnelSection:
    token_lifetime: float = 600.0
    max_message: int = 1024 * 1024
    ping_interval: float = 30.0
    max_per_token: int = 20  # tunnels open at once on one token
    # Token signing key shared by the nodes of a cluster (None: generated per node in the state dir), and the
    # previous one during a rollover (tokens it signed stay valid; new tokens use token_key_file).
    token_key_file: Path | None = None
    previous_token_key_file: Path | None = None


@dataclass(frozen=True)
class Rule:
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    vms: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()
    logins: tuple[str, ...] | None = None
    ports: tuple[int, ...] | None = None
    env: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class ControlSection:
    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 4443),)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_public: bool = False
    header_timeout: float = 10.0


ROLES = frozenset({"viewer", "operator"})


@dataclass(frozen=True)
class Operator:
    name: str
    role: str
    # The SHA-256 of the bearer token, never the token. Kept out of reprs all the same.
    token_sha256: bytes = field(repr=False)


@dataclass(frozen=True)
class OIDCSection:
    """Sign-in with the organisation's OpenID Connect provider (`[oidc]`).

    `client_secret_file` is a path: the secret is read by `gateway.oidc.read_client_secret` at start, never here.
    `group_map` maps an IdP group (as the `groups_claim` carries it) to the gateway groups it grants; IdP groups
    not in it grant nothing. `allowed_http_issuer` lets tests use an http:// issuer on a loopback address.
    """

    issuer: str
    client_id: str
    client_secret_file: Path
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    user_claim: str = "preferred_username"
    groups_claim: str = "groups"
    group_map: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    allowed_http_issuer: bool = False
    redirect_base: str | None = None  # e.g. "https://gw.example.com"; None: from the request's Host
    session_lifetime: float = 8 * 3600.0


OIDC_KEYS = (
    "issuer",
    "client_id",
    "client_secret_file",
    "scopes",
    "user_claim",
    "groups_claim",
    "group_map",
    "allowed_http_issuer",
    "redirect_base",
    "session_lifetime",
)


@dataclass(frozen=True)
class ClusterSection:
    """Several nodes sharing one session view through Redis."""

    redis_url: str
    password_file: Path | None = None
    heartbeat: float = 2.0
    node_ttl: float = 6.0
    timeout: float = 1.0  # no request waits on Redis longer than this


@dataclass(frozen=True)
class CASection:
    """The gateway's SSH user CA (`bastion login` certificates): its key (None: generated in the state dir)."""

    key: Path | None = None
    certificate_lifetime: float = 8 * 3600.0


@dataclass(frozen=True)
class Config:
    gateway: GatewaySection
    public: PublicSection
    ssh: SSHSection
    vms: Mapping[str, VM]
    users: Mapping[str, User]
    rules: tuple[Rule, ...]
    control: ControlSection = field(default_factory=ControlSection)
    operators: tuple[Operator, ...] = ()
    tunnel: TunnelSection = field(default_factory=TunnelSection)
    sessions: Limits = field(default_factory=Limits)
    max_sessions_per_user: int = 50
    # New sessions a user may start: (per second, burst), a token bucket. None: unlimited.
    session_rate_per_user: tuple[float, float] | None = (10.0, 50.0)
    on_revoke: str = "end"  # a reload that no longer grants a live session: "end" it (with a notice) or let it "continue"
    penalties: PenaltyPolicy = field(default_factory=PenaltyPolicy)
    oidc: OIDCSection | None = None  # None: no sign-in with an identity provider
    ca: CASection = field(default_factory=CASection)
    cluster: ClusterSection | None = None  # None: one node, no Redis


T = TypeVar("T")


class _Reader:
    """Walks the TOML tree, records problems with key paths, never raises mid-way."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def problem(self, path: str, msg: str) -> None:
        self.problems.append((path, msg))

    def table(self, data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                self.problem(f"{path}.{key}" if path else key, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def get(
        self,
        data: Mapping[str, Any],
        path: str,
        key: str,
        kind: type[T] | tuple[type, ...],
        default: Any = None,
        *,
        required: bool = False,
    ) -> Any:
        full = f"{path}.{key}" if path else key
        if key not in data:
            if required:
                self.problem(full, "required key is missing")
            return default
        value = data[key]
        # bool is an int in Python; a port of `true` is a mistake.
        if isinstance(value, bool) and kind is not bool and (kind is int or kind == (int,)):
            self.problem(full, f"expected an integer, got {value!r}")
            return default
        if not isinstance(value, kind):
            name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.problem(full, f"expected {_kind_name(name)}, got {value!r}")
            return default
        return value

    def str_list(
        self, data: Mapping[str, Any], path: str, key: str, check: Callable[[str], str | None] | None = None, *, echo: bool = True
    ) -> tuple[str, ...] | None:
        full = f"{path}.{key}"
        if key not in data:
            return None
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(full, f"expected a list of strings, got {value!r}")
            return None
        out = []
        for i, v in enumerate(value):
            if check is not None and (msg := check(v)) is not None:
                self.problem(f"{full}[{i}]", f"{msg}: {v!r}" if echo else msg)
            else:
                out.append(v)
        return tuple(out)

    def duration(self, data: Mapping[str, Any], path: str, key: str, default: float) -> float:
        raw = self.get(data, path, key, str)
        if raw is None:
            return default
        try:
            value = parse_duration(raw)
        except ValueError as exc:
            self.problem(f"{path}.{key}", str(exc))
            return default
        if value <= 0:
            self.problem(f"{path}.{key}", f"must be positive, got {raw!r}")
            return default
        return value

    def limit(self, data: Mapping[str, Any], path: str, key: str, default: float | None) -> float | None:
        """A positive duration, or "off" for no limit."""
        if data.get(key) == "off":
            return None
        if key not in data:
            return default
        return self.duration(data, path, key, default if default is not None else 1.0)

    def limits(self, data: Mapping[str, Any], path: str, base: Limits) -> Limits:
        warn = self.duration(data, path, "warn_before", base.warn_before) if "warn_before" in data else base.warn_before
        return Limits(
            idle_timeout=self.limit(data, path, "idle_timeout", base.idle_timeout),
            max_duration=self.limit(data, path, "max_duration", base.max_duration),
            warn_before=warn,
            half_close_timeout=self.limit(data, path, "half_close_timeout", base.half_close_timeout),
        )

    def port(self, data: Mapping[str, Any], path: str, key: str, default: int | None) -> int | None:
        value = self.get(data, path, key, int)
        if value is None:
            return default
        if not 1 <= value <= 65535:
            self.problem(f"{path}.{key}", f"port must be 1-65535, got {value!r}")
            return default
        return int(value)


def _kind_name(name: str) -> str:
    return {"str": "a string", "int": "an integer", "bool": "true or false", "list": "a list", "dict": "a table"}.get(name, name)


def _name_check(v: str) -> str | None:
    return None if v == "*" or NAME_RE.fullmatch(v) else "not a valid name"


def _group_check(v: str) -> str | None:
    return None if NAME_RE.fullmatch(v) else 'not a valid group name (use users = ["*"] for everyone)'


def _user_check(v: str) -> str | None:
    return None if USER_RE.fullmatch(v) else "not a valid user name (lowercase letters, digits, _ . -)"


def _cipher_check(name: str) -> str | None:
    """Only the modern ciphers of SSH_CIPHERS (every one is in asyncssh's list; a unit test holds that)."""
    if name in SSH_CIPHERS:
        return None
    return f"must be one of {', '.join(SSH_CIPHERS)} (no CBC, RC4 or 3DES)"


def _key_check(v: str) -> str | None:
    import asyncssh

    try:
        asyncssh.import_public_key(v)
    except (asyncssh.KeyImportError, ValueError):
        return "not an OpenSSH public key"
    return None


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file. Raises ConfigError naming every problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError([("(file)", f"cannot read {str(p)!r}: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, UnicodeDecodeError, a >4300-digit integer, deep nesting
        raise ConfigError([("(file)", f"{str(p)!r} is not valid TOML: {exc}")]) from None
    return parse_config(data, base_dir=p.parent)


def parse_config(data: Mapping[str, Any], base_dir: Path | None = None) -> Config:
    """Validate an already-parsed TOML document. Raises ConfigError naming every problem.

    Relative paths are taken relative to `base_dir` (the config file's folder).
    """
    r = _Reader()
    base = base_dir or Path.cwd()

    def path_of(value: str, where: str) -> Path:
        try:
            pth = Path(value).expanduser()
        except (RuntimeError, ValueError):  # `~nosuchuser/...` (no such home) or a NUL byte
            r.problem(where, f"not a usable file path: {value!r}")
            pth = Path(value)
        return pth if pth.is_absolute() else (base / pth)

    sections = {"gateway", "public", "ssh", "vms", "users", "rules", "control", "operators", "tunnel", "sessions", "penalties", "oidc"}
    sections |= {"ca", "cluster"}
    r.table(data, "", sections)

    g = r.get(data, "", "gateway", dict, {})
    r.table(g, "gateway", {"node", "state_dir", "connect_timeout", "shutdown_grace", "shutdown_notice", "notice_prefix", "workers"})
    node = r.get(g, "gateway", "node", str, socket.gethostname())
    if not NAME_RE.fullmatch(node):
        r.problem("gateway.node", f"not a valid name: {node!r}")
    gateway = GatewaySection(
        node=node,
        state_dir=path_of(r.get(g, "gateway", "state_dir", str, "/var/lib/bastion"), "gateway.state_dir"),
        connect_timeout=r.duration(g, "gateway", "connect_timeout", 10.0),
        shutdown_grace=r.duration(g, "gateway", "shutdown_grace", 30.0),
        shutdown_notice=_notice(r, g),
        notice_prefix=_notice_prefix(r, g),
        workers=_workers(r, g),
    )
    if gateway.shutdown_grace > 600:
        r.problem("gateway.shutdown_grace", f"must be at most 10m (systemd's stop timeout exceeds it), got {g['shutdown_grace']!r}")

    sess = r.get(data, "", "sessions", dict, {})
    r.table(sess, "sessions", {*LIMIT_KEYS, "max_per_user", "rate_per_user", "burst_per_user", "on_revoke"})
    session_limits = r.limits(sess, "sessions", Limits())
    max_per_user = r.get(sess, "sessions", "max_per_user", int, 50)
    if not 1 <= max_per_user <= 100_000:
        r.problem("sessions.max_per_user", f"must be 1 to 100000, got {max_per_user!r}")
    session_rate = _session_rate(r, sess)
    on_revoke = r.get(sess, "sessions", "on_revoke", str, "end")
    if on_revoke not in ("end", "continue"):
        r.problem("sessions.on_revoke", f"must be 'end' or 'continue', got {on_revoke!r}")

    pub = r.get(data, "", "public", dict, {})
    pub_keys = {"listen", "tls_cert", "tls_key", "detect_timeout", "header_timeout", *_CAP_KEYS, "tls_handshake_timeout"}
    r.table(pub, "public", pub_keys | {"proxy_protocol_from"})
    listen, cert, key = _listener_keys(r, pub, "public", "0.0.0.0:443", path_of)
    balancers: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    r.str_list(pub, "public", "proxy_protocol_from", lambda text: _network_into(balancers, text))
    public = PublicSection(
        listen=listen,
        tls_cert=cert,
        tls_key=key,
        detect_timeout=r.duration(pub, "public", "detect_timeout", 1.0),
        header_timeout=r.duration(pub, "public", "header_timeout", 10.0),
        max_connections=_count(r, pub, "public.max_connections", None, 1_000_000),
        max_connections_per_source=_count(r, pub, "public.max_connections_per_source", 200, 1_000_000) or 200,
        max_tls_handshakes=_count(r, pub, "public.max_tls_handshakes", 256, 100_000) or 256,
        tls_handshake_timeout=r.duration(pub, "public", "tls_handshake_timeout", 5.0),
        proxy_protocol_from=tuple(balancers),
    )

    s = r.get(data, "", "ssh", dict, {})
    ssh_keys = {"host_keys", "user_ca_keys", "login_grace_time", "max_auth_tries", "max_startups", "keepalive_interval"}
    ssh_keys |= {"keepalive_count", "max_sessions", "max_forwards", "per_source_max_startups", "version_timeout"}
    ssh_keys |= {"idle_connection_timeout", "vm_ciphers"}
    r.table(s, "ssh", ssh_keys)
    vm_ciphers = r.str_list(s, "ssh", "vm_ciphers", _cipher_check)
    if vm_ciphers is None or not vm_ciphers:
        if vm_ciphers is not None and s.get("vm_ciphers") == []:
            r.problem("ssh.vm_ciphers", "must name at least one cipher")
        vm_ciphers = DEFAULT_VM_CIPHERS
    elif len(set(vm_ciphers)) != len(vm_ciphers):
        r.problem("ssh.vm_ciphers", f"names a cipher twice: {list(vm_ciphers)!r}")
    keepalive_count = r.get(s, "ssh", "keepalive_count", int, 3)
    if not 1 <= keepalive_count <= 100:
        r.problem("ssh.keepalive_count", f"must be 1 to 100, got {keepalive_count!r}")
    max_sessions = r.get(s, "ssh", "max_sessions", int, 10)
    if not 1 <= max_sessions <= 1000:
        r.problem("ssh.max_sessions", f"must be 1 to 1000, got {max_sessions!r}")
    max_forwards = r.get(s, "ssh", "max_forwards", int, 100)
    if not 1 <= max_forwards <= 10_000:
        r.problem("ssh.max_forwards", f"must be 1 to 10000, got {max_forwards!r}")
    max_auth = r.get(s, "ssh", "max_auth_tries", int, 6)
    if max_auth < 1:
        r.problem("ssh.max_auth_tries", f"must be at least 1, got {max_auth!r}")
    # Below max_startups' start: one address holding all its slots must not push every other user into early drop.
    per_source = r.get(s, "ssh", "per_source_max_startups", int, 5)
    if per_source < 1:
        r.problem("ssh.per_source_max_startups", f"must be at least 1, got {per_source!r}")
        per_source = 10
    try:
        max_startups = StartupPolicy.parse(s.get("max_startups", "10:30:100"), per_source)
    except ValueError as exc:
        r.problem("ssh.max_startups", str(exc))
        max_startups = StartupPolicy(10, 30, 100, per_source)
    ssh = SSHSection(
        host_keys=tuple(path_of(x, f"ssh.host_keys[{i}]") for i, x in enumerate(r.str_list(s, "ssh", "host_keys") or ())),
        user_ca_keys=r.str_list(s, "ssh", "user_ca_keys", _key_check) or (),
        login_grace_time=r.duration(s, "ssh", "login_grace_time", 30.0),
        max_auth_tries=max_auth,
        max_startups=max_startups,
        keepalive_interval=r.duration(s, "ssh", "keepalive_interval", 30.0),
        keepalive_count=keepalive_count,
        max_sessions=max_sessions,
        max_forwards=max_forwards,
        version_timeout=r.duration(s, "ssh", "version_timeout", 10.0),
        idle_connection_timeout=r.limit(s, "ssh", "idle_connection_timeout", 900.0),
        vm_ciphers=vm_ciphers,
    )
    penalties = _parse_penalties(r, data)

    vms: dict[str, VM] = {}
    vm_list = r.get(data, "", "vms", list, [])
    for i, v in enumerate(vm_list):
        path = f"vms[{i}]"
        if not isinstance(v, dict):
            r.problem(path, f"expected a table, got {v!r}")
            continue
        vm = _parse_vm(r, v, path, path_of)
        if vm is None:
            continue
        if vm.name in vms:
            r.problem(f"{path}.name", f"duplicate VM name: {vm.name!r}")
        vms[vm.name] = vm

    users: dict[str, User] = {}
    for i, u in enumerate(r.get(data, "", "users", list, [])):
        path = f"users[{i}]"
        if not isinstance(u, dict):
            r.problem(path, f"expected a table, got {u!r}")
            continue
        r.table(u, path, {"name", "keys", "groups", "tokens_sha256"})
        name = r.get(u, path, "name", str, required=True)
        if name is None:
            continue
        if not USER_RE.fullmatch(name):
            r.problem(f"{path}.name", f"not a valid user name (lowercase letters, digits, _ . -): {name!r}")
            continue
        if name in users:
            r.problem(f"{path}.name", f"duplicate user name: {name!r}")
        users[name] = User(
            name=name,
            keys=r.str_list(u, path, "keys", _key_check) or (),
            groups=r.str_list(u, path, "groups", _group_check) or (),
            token_sha256s=tuple(
                bytes.fromhex(t)
                for t in r.str_list(
                    u,
                    path,
                    "tokens_sha256",
                    lambda x: None if re.fullmatch(r"[0-9a-fA-F]{64}", x) else "must be 64 hex digits (the output of `bastion hash-token`)",
                    echo=False,  # a token pasted here by mistake must not reach a terminal or log
                )
                or ()
            ),
        )

    rules: list[Rule] = []
    for i, ru in enumerate(r.get(data, "", "rules", list, [])):
        path = f"rules[{i}]"
        if not isinstance(ru, dict):
            r.problem(path, f"expected a table, got {ru!r}")
            continue
        r.table(ru, path, {"users", "groups", "vms", "protocols", "logins", "ports", "env", *LIMIT_KEYS})
        rule_users = r.str_list(ru, path, "users", lambda x: None if x == "*" else _user_check(x)) or ()
        groups = r.str_list(ru, path, "groups", _group_check) or ()
        if not rule_users and not groups:
            r.problem(path, "a rule needs users or groups")
        for j, un in enumerate(rule_users):
            if un != "*" and un not in users:
                r.problem(f"{path}.users[{j}]", f"no such user: {un!r}")
        rule_vms = r.str_list(ru, path, "vms", _name_check)
        if not rule_vms:
            r.problem(f"{path}.vms", 'required: the VMs this rule grants (or ["*"])')
        for j, vn in enumerate(rule_vms or ()):
            if vn != "*" and vn not in vms:
                r.problem(f"{path}.vms[{j}]", f"no such VM in the inventory: {vn!r}")
        protos = r.str_list(
            ru, path, "protocols", lambda x: None if x in PROTOCOLS else f"unknown protocol (known: {', '.join(sorted(PROTOCOLS))})"
        )
        if not protos:
            r.problem(f"{path}.protocols", f"required: one or more of {', '.join(sorted(PROTOCOLS))}")
        ports_raw = r.get(ru, path, "ports", list)
        ports: tuple[int, ...] | None = None
        if ports_raw is not None:
            good = []
            for j, p in enumerate(ports_raw):
                if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
                    r.problem(f"{path}.ports[{j}]", f"port must be 1-65535, got {p!r}")
                else:
                    good.append(p)
            ports = tuple(good)
        rules.append(
            Rule(
                users=rule_users,
                groups=groups,
                vms=rule_vms or (),
                protocols=protos or (),
                logins=r.str_list(ru, path, "logins", lambda x: None if x == "*" or USER_RE.fullmatch(x) else "not a valid login name"),
                ports=ports,
                env=r.str_list(
                    ru, path, "env", lambda x: None if ENV_RE.fullmatch(x) else "not an environment variable name or NAME* pattern"
                )
                or (),
                limits=r.limits(ru, path, session_limits),
            )
        )

    control, operators = _parse_control(r, data, path_of)
    t = r.get(data, "", "tunnel", dict, {})
    r.table(t, "tunnel", {"token_lifetime", "max_message", "ping_interval", "max_per_token", "token_key_file", "previous_token_key_file"})
    key_file = r.get(t, "tunnel", "token_key_file", str)
    previous_file = r.get(t, "tunnel", "previous_token_key_file", str)
    if previous_file is not None and key_file is None:
        r.problem("tunnel.previous_token_key_file", "needs tunnel.token_key_file (the new key) beside it")
    max_per_token = r.get(t, "tunnel", "max_per_token", int, 20)
    if not 1 <= max_per_token <= 10_000:
        r.problem("tunnel.max_per_token", f"must be 1 to 10000, got {max_per_token!r}")
    max_message = r.get(t, "tunnel", "max_message", int, 1024 * 1024)
    if not 1024 <= max_message <= 16 * 1024 * 1024:
        r.problem("tunnel.max_message", f"must be 1024 to 16777216 bytes, got {max_message!r}")
    tunnel = TunnelSection(
        token_lifetime=r.duration(t, "tunnel", "token_lifetime", 600.0),
        max_message=max_message,
        ping_interval=r.duration(t, "tunnel", "ping_interval", 30.0),
        max_per_token=max_per_token,
        token_key_file=path_of(key_file, "tunnel.token_key_file") if key_file else None,
        previous_token_key_file=path_of(previous_file, "tunnel.previous_token_key_file") if previous_file else None,
    )

    oidc = _parse_oidc(r, data, path_of)
    ca_raw = r.get(data, "", "ca", dict, {})
    r.table(ca_raw, "ca", {"key", "certificate_lifetime"})
    ca_key = r.get(ca_raw, "ca", "key", str)
    ca = CASection(
        key=path_of(ca_key, "ca.key") if ca_key else None,
        certificate_lifetime=r.duration(ca_raw, "ca", "certificate_lifetime", 8 * 3600.0),
    )
    if ca.certificate_lifetime > 7 * 86400:
        r.problem("ca.certificate_lifetime", f"must be at most 7 days, got {ca_raw.get('certificate_lifetime')!r}")
    cluster = _parse_cluster(r, data, path_of)

    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        gateway=gateway,
        public=public,
        ssh=ssh,
        vms=vms,
        users=users,
        rules=tuple(rules),
        control=control,
        operators=operators,
        tunnel=tunnel,
        sessions=session_limits,
        max_sessions_per_user=max_per_user,
        session_rate_per_user=session_rate,
        on_revoke=on_revoke,
        penalties=penalties,
        oidc=oidc,
        ca=ca,
        cluster=cluster,
    )


def _parse_cluster(r: _Reader, data: Mapping[str, Any], path_of: Callable[[str, str], Path]) -> ClusterSection | None:
    if "cluster" not in data:
        return None
    c = r.get(data, "", "cluster", dict, {})
    r.table(c, "cluster", {"backend", "redis_url", "password_file", "heartbeat", "node_ttl", "timeout"})
    backend = r.get(c, "cluster", "backend", str, "redis")
    if backend != "redis":
        r.problem("cluster.backend", f"the only backend is 'redis', got {backend!r}")
    url = r.get(c, "cluster", "redis_url", str, required=True) or "redis://127.0.0.1:6379/0"
    if not re.fullmatch(r"rediss?://[^\s]+|unix:///[^\s]+", url):
        r.problem("cluster.redis_url", f"expected redis://HOST:PORT/DB, rediss://... or unix:///PATH, got {url!r}")
    if re.search(r"//[^/@]*:[^/@]*@", url):
        r.problem("cluster.redis_url", "put the password in cluster.password_file, not in the URL")
    pw = r.get(c, "cluster", "password_file", str)
    section = ClusterSection(
        redis_url=url,
        password_file=path_of(pw, "cluster.password_file") if pw else None,
        heartbeat=r.duration(c, "cluster", "heartbeat", 2.0),
        node_ttl=r.duration(c, "cluster", "node_ttl", 6.0),
        timeout=r.duration(c, "cluster", "timeout", 1.0),
    )
    if section.node_ttl < 2 * section.heartbeat:
        r.problem("cluster.node_ttl", f"must be at least twice the heartbeat ({section.heartbeat:g}s), got {c.get('node_ttl')!r}")
    return section


def _session_rate(r: _Reader, sess: Mapping[str, Any]) -> tuple[float, float] | None:
    """`rate_per_user` (new sessions a second, or "off") and `burst_per_user` (how many at once)."""
    raw = sess.get("rate_per_user", 10)
    if raw == "off":
        return None
    burst = r.get(sess, "sessions", "burst_per_user", int, 50)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0.01 <= raw <= 100_000:
        r.problem("sessions.rate_per_user", f'must be a number of new sessions a second from 0.01 to 100000, or "off"; got {raw!r}')
        raw = 10
    if not 1 <= burst <= 100_000:
        r.problem("sessions.burst_per_user", f"must be 1 to 100000, got {burst!r}")
        burst = 50
    return float(raw), float(burst)


_CAP_KEYS = ("max_connections", "max_connections_per_source", "max_tls_handshakes")


def _count(r: _Reader, table: Mapping[str, Any], full: str, default: int | None, most: int) -> int | None:
    """An integer key from 1 to `most`; its default (None: "derive it") when absent or bad."""
    section, key = full.rsplit(".", 1)
    value = r.get(table, section, key, int)
    if value is None:
        return default
    if not 1 <= value <= most:
        r.problem(full, f"must be 1 to {most}, got {value!r}")
        return default
    return int(value)


def _network_into(out: list[ipaddress.IPv4Network | ipaddress.IPv6Network], text: str) -> str | None:
    """A `str_list` check: append the CIDR `text` to `out`, or say what is wrong with it."""
    try:
        out.append(ipaddress.ip_network(text, strict=True))
    except ValueError:
        return "not a network like '10.0.0.0/8' or '2001:db8::/32' (no host bits after the prefix)"
    return None


def _parse_penalties(r: _Reader, data: Mapping[str, Any]) -> PenaltyPolicy:
    t = r.get(data, "", "penalties", dict, {})
    r.table(t, "penalties", set(PENALTY_KEYS))
    base = PenaltyPolicy()

    def seconds(key: str, default: float, *, zero_ok: bool) -> float:
        raw = r.get(t, "penalties", key, str)
        if raw is None:
            return default
        try:
            value = parse_duration(raw)
        except ValueError as exc:
            r.problem(f"penalties.{key}", str(exc))
            return default
        if value < 0 or (value == 0 and not zero_ok):
            r.problem(f"penalties.{key}", f"must be {'0 or more' if zero_ok else 'positive'}, got {raw!r}")
            return default
        return value

    low = seconds("min", base.min, zero_ok=True)
    high = seconds("max", base.max, zero_ok=False)
    if high <= low:
        r.problem("penalties.max", f"must be longer than penalties.min ({t.get('min', '15s')!r}), got {t.get('max', '10m')!r}")
    exempt: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []

    def network(text: str) -> str | None:
        try:
            exempt.append(ipaddress.ip_network(text, strict=True))
        except ValueError:
            return "not a network like '10.0.0.0/8' or '2001:db8::/32' (no host bits after the prefix)"
        return None

    r.str_list(t, "penalties", "exempt", network)
    max_sources = _count(r, t, "penalties.max_sources", base.max_sources, 10_000_000) or base.max_sources
    return PenaltyPolicy(
        enabled=r.get(t, "penalties", "enabled", bool, True),
        auth_failure=seconds("auth_failure", base.auth_failure, zero_ok=True),
        grace_exceeded=seconds("grace_exceeded", base.grace_exceeded, zero_ok=True),
        no_auth=seconds("no_auth", base.no_auth, zero_ok=True),
        min=low,
        max=high,
        exempt=tuple(exempt),
        max_sources=max_sources,
    )


def _notice(r: _Reader, g: Mapping[str, Any]) -> str:
    text = r.get(g, "gateway", "shutdown_notice", str, GatewaySection.shutdown_notice)
    clean = one_line(str(text))
    if not clean or len(clean) > 300:
        r.problem("gateway.shutdown_notice", f"must be 1 to 300 characters of text, got {text!r}")
        return GatewaySection.shutdown_notice
    return clean


MAX_WORKERS = 64


def _workers(r: _Reader, g: Mapping[str, Any]) -> int:
    """`gateway.workers`: a count from 1 to MAX_WORKERS, or "auto" (the default): one per core."""
    raw = g.get("workers", "auto")
    if raw == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_WORKERS:
        r.problem("gateway.workers", f'must be "auto" or a whole number from 1 to {MAX_WORKERS}, got {raw!r}')
        return 1
    return raw


def _notice_prefix(r: _Reader, g: Mapping[str, Any]) -> str:
    text = r.get(g, "gateway", "notice_prefix", str, GatewaySection.notice_prefix)
    clean = one_line(str(text))
    if len(clean) > 40 or clean != str(text).strip():
        r.problem("gateway.notice_prefix", f'must be at most 40 characters on one line ("" for none), got {text!r}')
        return GatewaySection.notice_prefix
    return clean


def _listener_keys(
    r: _Reader, table: Mapping[str, Any], section: str, default: str, path_of: Callable[[str, str], Path]
) -> tuple[tuple[ListenAddress, ...], Path | None, Path | None]:
    """`listen`, `tls_cert` and `tls_key` of a listener section, validated alike for [public] and [control]."""
    listen: list[ListenAddress] = []
    for i, item in enumerate(r.str_list(table, section, "listen") or (default,)):
        try:
            listen.append(parse_listen(item))
        except ValueError as exc:
            r.problem(f"{section}.listen[{i}]", str(exc))
    cert = r.get(table, section, "tls_cert", str)
    key = r.get(table, section, "tls_key", str)
    for k, v in (("tls_cert", cert), ("tls_key", key)):
        if v is not None and not v.strip():
            r.problem(f"{section}.{k}", f"must be a file path, got {v!r}")
    if (cert is None) != (key is None):
        r.problem(f"{section}.tls_cert" if cert is None else f"{section}.tls_key", "tls_cert and tls_key go together")
    cert_path = path_of(cert, f"{section}.tls_cert") if cert else None
    return tuple(listen), cert_path, path_of(key, f"{section}.tls_key") if key else None


def _parse_control(r: _Reader, data: Mapping[str, Any], path_of: Callable[[str, str], Path]) -> tuple[ControlSection, tuple[Operator, ...]]:
    c = r.get(data, "", "control", dict, {})
    r.table(c, "control", {"listen", "tls_cert", "tls_key", "metrics_public", "header_timeout"})
    listen, cert, key = _listener_keys(r, c, "control", "127.0.0.1:4443", path_of)
    control = ControlSection(
        listen=listen,
        tls_cert=cert,
        tls_key=key,
        metrics_public=r.get(c, "control", "metrics_public", bool, False),
        header_timeout=r.duration(c, "control", "header_timeout", 10.0),
    )
    operators: list[Operator] = []
    names: set[str] = set()
    for i, o in enumerate(r.get(data, "", "operators", list, [])):
        path = f"operators[{i}]"
        if not isinstance(o, dict):
            r.problem(path, f"expected a table, got {o!r}")
            continue
        r.table(o, path, {"name", "role", "token_sha256"})
        name = r.get(o, path, "name", str, required=True)
        role = r.get(o, path, "role", str, required=True)
        digest = r.get(o, path, "token_sha256", str, required=True)
        if name is not None and not NAME_RE.fullmatch(name):
            r.problem(f"{path}.name", f"not a valid name: {name!r}")
        if name in names:
            r.problem(f"{path}.name", f"duplicate operator name: {name!r}")
        if role is not None and role not in ROLES:
            r.problem(f"{path}.role", f"must be 'viewer' or 'operator', got {role!r}")
        raw: bytes | None = None
        if digest is not None:
            if re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raw = bytes.fromhex(digest)
            else:
                # Do not echo it: a token pasted here by mistake must not reach a terminal or log.
                r.problem(f"{path}.token_sha256", "must be 64 hex digits (the output of `bastion hash-token`)")
        if name and role in ROLES and raw is not None:
            names.add(name)
            operators.append(Operator(name=name, role=role, token_sha256=raw))
    return control, tuple(operators)


def _parse_vm(r: _Reader, v: Mapping[str, Any], path: str, path_of: Callable[[str, str], Path]) -> VM | None:
    r.table(
        v,
        path,
        {
            "name",
            "address",
            "ssh_port",
            "rdp_port",
            "host_key",
            "host_keys",
            "known_hosts",
            "trust_on_first_use",
            "default_login",
            "logins",
        },
    )
    name = r.get(v, path, "name", str, required=True)
    if name is not None and not NAME_RE.fullmatch(name):
        r.problem(f"{path}.name", f"not a valid VM name (letters, digits, . _ -): {name!r}")
        name = None
    address = r.get(v, path, "address", str, required=True)
    if address is not None and not _valid_address(address):
        r.problem(f"{path}.address", f"not an IP address or host name: {address!r}")
    host_keys: list[str] = []
    hk = r.get(v, path, "host_key", str)
    if hk is not None:
        if (msg := _key_check(hk)) is not None:
            r.problem(f"{path}.host_key", f"{msg}: {hk!r}")
        else:
            host_keys.append(hk)
    host_keys.extend(r.str_list(v, path, "host_keys", _key_check) or ())
    kh = r.get(v, path, "known_hosts", str)
    tofu = r.get(v, path, "trust_on_first_use", bool, False)
    if not host_keys and kh is None and not tofu:
        r.problem(path, "no way to verify the VM's host key: set host_key, known_hosts, or trust_on_first_use = true")
    logins: dict[str, VMLogin] = {}
    raw_logins = r.get(v, path, "logins", dict, {})
    for lname, spec in raw_logins.items():
        lpath = f"{path}.logins.{lname}"
        if not USER_RE.fullmatch(lname):
            r.problem(lpath, f"not a valid login name: {lname!r}")
            continue
        if not isinstance(spec, dict):
            r.problem(lpath, f'expected a table like {{ key = "/path" }}, got {spec!r}')
            continue
        r.table(spec, lpath, {"key"})
        key = r.get(spec, lpath, "key", str, required=True)
        if key is not None:
            logins[lname] = VMLogin(name=lname, key=path_of(key, f"{lpath}.key"))
    default_login = r.get(v, path, "default_login", str)
    if default_login is not None and default_login not in logins:
        r.problem(f"{path}.default_login", f"not one of this VM's logins: {default_login!r}")
    if default_login is None and len(logins) == 1:
        default_login = next(iter(logins))
    ssh_port = r.port(v, path, "ssh_port", 22) or 22
    rdp_port = r.port(v, path, "rdp_port", None)
    if name is None or address is None:
        return None
    return VM(
        name=name,
        address=address,
        ssh_port=ssh_port,
        rdp_port=rdp_port,
        host_keys=tuple(host_keys),
        known_hosts=path_of(kh, f"{path}.known_hosts") if kh else None,
        trust_on_first_use=tofu,
        default_login=default_login,
        logins=logins,
    )


def _valid_address(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return bool(
            re.fullmatch(
                r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", address
            )
        )


# RFC 6749 scope-token characters; claim names and client ids: printable ASCII without spaces.
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,255}")


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(r: _Reader, full: str, value: str, *, allow_http: bool, path_ok: bool) -> str | None:
    """An https:// URL (http:// only on a loopback host with `allow_http`), without query, fragment or user info."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(value)
        host = u.hostname or ""
        _ = u.port  # raises ValueError for a bad port
    except ValueError:
        r.problem(full, f"not a URL: {value!r}")
        return None
    if u.scheme == "http" and allow_http and is_loopback_host(host):
        pass
    elif u.scheme == "http" and allow_http:
        r.problem(full, f"http:// is allowed only on a loopback host (127.0.0.1, ::1, localhost), got {value!r}")
        return None
    elif u.scheme != "https":
        r.problem(full, f"must be an https:// URL, got {value!r}")
        return None
    if not host or u.username is not None or u.query or u.fragment or (not path_ok and u.path not in ("", "/")):
        what = "a path, " if not path_ok else ""
        r.problem(full, f"must be a plain URL like 'https://idp.example.com/realm' without {what}user, query or fragment, got {value!r}")
        return None
    if one_line(value) != value or " " in value:
        r.problem(full, f"must not contain spaces or control characters, got {value!r}")
        return None
    return value


def _parse_oidc(r: _Reader, data: Mapping[str, Any], path_of: Callable[[str, str], Path]) -> OIDCSection | None:
    """`[oidc]`: absent means no sign-in with an identity provider."""
    if "oidc" not in data:
        return None
    o = r.get(data, "", "oidc", dict)
    if o is None:
        return None
    r.table(o, "oidc", set(OIDC_KEYS))
    allow_http = r.get(o, "oidc", "allowed_http_issuer", bool, False)
    issuer_raw = r.get(o, "oidc", "issuer", str, required=True)
    issuer = _check_url(r, "oidc.issuer", issuer_raw, allow_http=allow_http, path_ok=True) if issuer_raw is not None else None
    client_id = r.get(o, "oidc", "client_id", str, required=True)
    if client_id is not None and not _TOKEN_RE.fullmatch(client_id):
        r.problem("oidc.client_id", f"must be 1 to 255 printable ASCII characters without spaces, got {client_id!r}")
        client_id = None
    secret_raw = r.get(o, "oidc", "client_secret_file", str, required=True)
    secret_file: Path | None = None
    if secret_raw is not None:
        if not secret_raw.strip():
            r.problem("oidc.client_secret_file", f"must be a file path (the file holds the secret), got {secret_raw!r}")
        else:
            secret_file = path_of(secret_raw, "oidc.client_secret_file")
    scopes = r.str_list(o, "oidc", "scopes", lambda x: None if _SCOPE_RE.fullmatch(x) else "not an OAuth scope")
    if scopes is not None and "openid" not in scopes:
        r.problem("oidc.scopes", f'must include "openid" (OpenID Connect needs it), got {list(scopes)!r}')
    claims: dict[str, str] = {}
    for key, default in (("user_claim", OIDCSection.user_claim), ("groups_claim", OIDCSection.groups_claim)):
        value = r.get(o, "oidc", key, str, default)
        if not _TOKEN_RE.fullmatch(value):
            r.problem(f"oidc.{key}", f"must be a claim name (printable ASCII without spaces), got {value!r}")
            value = default
        claims[key] = value
    group_map: dict[str, tuple[str, ...]] = {}
    for idp_group, targets in r.get(o, "oidc", "group_map", dict, {}).items():
        gpath = f"oidc.group_map.{idp_group}"
        if not idp_group or len(idp_group) > 256 or one_line(idp_group) != idp_group:
            r.problem(gpath, f"an identity provider group name must be 1 to 256 characters of one line, got {idp_group!r}")
            continue
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or not targets:
            r.problem(gpath, f'expected the gateway groups it grants, like ["ops"], got {targets!r}')
            continue
        good = []
        for i, t in enumerate(targets):
            if (msg := _group_check(t)) is not None:
                r.problem(f"{gpath}[{i}]", f"{msg}: {t!r}")
            else:
                good.append(t)
        group_map[idp_group] = tuple(dict.fromkeys(good))
    base_raw = r.get(o, "oidc", "redirect_base", str)
    redirect_base = None
    if base_raw is not None:
        checked = _check_url(r, "oidc.redirect_base", base_raw, allow_http=allow_http, path_ok=True)
        redirect_base = checked.rstrip("/") if checked is not None else None
    lifetime = r.duration(o, "oidc", "session_lifetime", OIDCSection.session_lifetime)
    if lifetime > 7 * 86400:
        r.problem("oidc.session_lifetime", f"must be at most 7 days (168h), got {o['session_lifetime']!r}")
    if issuer is None or client_id is None or secret_file is None:
        return None
    return OIDCSection(
        issuer=issuer,
        client_id=client_id,
        client_secret_file=secret_file,
        scopes=tuple(dict.fromkeys(scopes)) if scopes is not None else OIDCSection.scopes,
        user_claim=claims["user_claim"],
        groups_claim=claims["groups_claim"],
        group_map=group_map,
        allowed_http_issuer=allow_http,
        redirect_base=redirect_base,
        session_lifetime=lifetime,
    )
