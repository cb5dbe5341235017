"""The gateway's own SSH user CA: short-lived OpenSSH user certificates for people who signed in on the web.

`bastion login` sends a public key; once its user approves the sign-in in a browser (a web session, by OIDC or a
one-time link), the gateway signs that key: principal = the user name, valid for `lifetime` (8 h), key id
`USER@bastion`. The SSH door trusts this CA for exactly that principal. A user from the identity provider has
no [[users]] entry, so the groups she signed in with are kept (`Identities`, in `state_dir/identities.json`,
0600) until her certificate expires: the SSH door needs them to apply the rules.

`CliLogins` holds the logins waiting for approval: bounded, each for 10 minutes, approved once with the code
the command printed (so a link alone, sent by someone else, approves nothing).
"""

from __future__ import annotations

import json
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from gateway.clock import Clock
from gateway.errors import StartupError
from gateway.filemodes import check_private_file

CERT_LIFETIME = 8 * 3600.0
PENDING_TTL = 600.0
MAX_PENDING = 1000
MAX_IDENTITIES = 100_000
_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")


class UserCA:
    """Owns the CA key. `sign()` issues one certificate."""

    def __init__(self, key: asyncssh.SSHKey, clock: Clock, lifetime: float = CERT_LIFETIME) -> None:
        self._key = key
        self._clock = clock
        self.lifetime = lifetime

    def __repr__(self) -> str:
        return f"UserCA({self.public_line()[:40]}..., lifetime={self.lifetime:g}s)"

    @classmethod
    def load_or_create(cls, path: Path, clock: Clock, lifetime: float = CERT_LIFETIME) -> UserCA:
        """The CA key in the state dir, generated (0600) on first start. Raises StartupError naming the file."""
        if not path.exists():
            key = asyncssh.generate_private_key("ssh-ed25519", comment="bastion user CA")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.export_private_key())
        check_private_file(path, "gateway.state_dir", "user CA key")
        try:
            return cls(asyncssh.read_private_key(path), clock, lifetime)
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            raise StartupError(f"the user CA key {str(path)!r} is unusable: {exc}") from None

    def public_line(self) -> str:
        return self._key.export_public_key().decode().strip()

    def sign(self, public_key: asyncssh.SSHKey, user: str) -> tuple[str, float]:
        """An OpenSSH user certificate for `public_key` as `user`: (its text, when it expires in Unix seconds)."""
        now = self._clock.now().timestamp()
        until = now + self.lifetime
        cert = self._key.generate_user_certificate(
            public_key,
            key_id=f"{user}@bastion",
            serial=secrets.randbits(63),
            principals=[user],
            valid_after=int(now - 60),  # a little clock skew between hosts
            valid_before=int(until),
            permit_x11_forwarding=False,
            permit_agent_forwarding=False,
            permit_user_rc=False,
        )
        return cert.export_certificate().decode().strip(), until


def parse_public_key(text: object) -> asyncssh.SSHKey:
    """A user's public key as `bastion login` sends it. Raises ValueError saying what is wrong."""
    if not isinstance(text, str) or not 0 < len(text) <= 16 * 1024:
        raise ValueError("public_key must be an OpenSSH public key line")
    try:
        key = asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError):
        raise ValueError("public_key is not an OpenSSH public key") from None
    name = key.get_algorithm()
    if name not in _KEY_TYPES and not name.startswith("rsa-sha2-"):
        raise ValueError(f"keys of type {name!r} are not accepted (use ed25519)")
    return key


@dataclass
class CliLogin:
    id: str
    code: str
    public_key: asyncssh.SSHKey = field(repr=False)
    created: float
    certificate: str | None = None
    user: str | None = None
    valid_before: float | None = None


class CliLogins:
    """Logins of `bastion login` waiting for their user's approval in a browser."""

    def __init__(self, clock: Clock, ttl: float = PENDING_TTL, max_pending: int = MAX_PENDING) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max_pending
        self._by_id: OrderedDict[str, CliLogin] = OrderedDict()

    def start(self, public_key: asyncssh.SSHKey) -> CliLogin | None:
        """A new pending login, or None when the table is full (the caller answers 503)."""
        self._sweep()
        if len(self._by_id) >= self._max:
            return None
        code = "".join(secrets.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(8))
        login = CliLogin(secrets.token_urlsafe(24), f"{code[:4]}-{code[4:]}", public_key, self._clock.monotonic())
        self._by_id[login.id] = login
        return login

    def get(self, login_id: str) -> CliLogin | None:
        self._sweep()
        return self._by_id.get(login_id)

    def take(self, login_id: str) -> CliLogin | None:
        """The approved login, removed (its certificate is handed over once)."""
        login = self.get(login_id)
        if login is None or login.certificate is None:
            return None
        del self._by_id[login_id]
        return login

    def _sweep(self) -> None:
        now = self._clock.monotonic()
        for key in [k for k, v in self._by_id.items() if now - v.created > self._ttl]:
            del self._by_id[key]


class Identities:
    """Groups of identity-provider users who hold a gateway certificate, until it expires; kept across restarts."""

    def __init__(self, path: Path | None, clock: Clock) -> None:
        self._path = path
        self._clock = clock
        self._by_user: dict[str, tuple[tuple[str, ...], float]] = {}

    def load(self) -> None:
        if self._path is None or not self._path.exists():
            return
        check_private_file(self._path, "gateway.state_dir", "identities file")
        try:
            raw = json.loads(self._path.read_text())
            self._by_user = {str(u): (tuple(str(g) for g in v["groups"]), float(v["until"])) for u, v in dict(raw).items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StartupError(
                f"identities file {str(self._path)!r} is unusable ({exc}); remove it (users run `bastion login` again)"
            ) from None
        self._sweep()

    def remember(self, user: str, groups: tuple[str, ...], until: float) -> None:
        self._sweep()
        if len(self._by_user) >= MAX_IDENTITIES and user not in self._by_user:
            oldest = min(self._by_user, key=lambda u: self._by_user[u][1])
            del self._by_user[oldest]
        self._by_user[user] = (groups, until)
        self._save()

    def groups(self, user: str) -> tuple[str, ...] | None:
        entry = self._by_user.get(user)
        if entry is None or entry[1] <= self._clock.now().timestamp():
            return None
        return entry[0]

    def expired(self, user: str) -> bool:
        entry = self._by_user.get(user)
        return entry is not None and entry[1] <= self._clock.now().timestamp()

    def _sweep(self) -> None:
        # Kept a day past expiry, so the SSH door can tell an expired user to run `bastion login` again.
        now = self._clock.now().timestamp()
        self._by_user = {u: v for u, v in self._by_user.items() if v[1] + 86400 > now}

    def _save(self) -> None:
        if self._path is None:
            return
        data = {u: {"groups": list(g), "until": t} for u, (g, t) in self._by_user.items()}
        tmp = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")  # workers share the state dir
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
