"""Short-lived tunnel tokens bound to one user, signed with a key in the state directory.

A token is `v1.<payload>.<mac>`: the payload is base64url JSON `{"sub", "iat", "exp", "jti"}` and the
MAC is HMAC-SHA256 over `v1.<payload>` with a 32-byte key only the gateway holds. Users get one with
`ssh -p 443 USER@GATEWAY token`. Tokens are never logged; their `jti` may be.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.clock import Clock
from gateway.errors import AuthError, StartupError
from gateway.filemodes import check_private_file

_PREFIX = "v1"
MAX_REVOKED = 1_000_000  # revoked tokens remembered at once (each only until it would have expired)


@dataclass(frozen=True)
class TokenClaims:
    user: str
    expires_at: float
    token_id: str
    static: bool = False
    issued_at: float = 0.0  # Unix seconds, to the millisecond
    # An RD Gateway token is bound to one VM and port (what the .rdp file names); a tunnel token to none.
    vm: str | None = None
    port: int | None = None
    use: str | None = None  # "web": a one-time browser sign-in link

    @property
    def purpose(self) -> str:
        if self.use == "web":
            return "web"
        return "rdg" if self.vm is not None else "tunnel"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_key(path: Path, key_name: str) -> bytes:
    """A configured signing key (shared by every node of a cluster): at least 32 bytes, the gateway's own, 0600.
    Raises StartupError naming `key_name` and the file."""
    check_private_file(path, key_name, "token signing key")
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"{key_name}: cannot read {str(path)!r}: {exc.strerror}") from None
    if len(key) < 32:
        raise StartupError(f"{key_name}: {str(path)!r} is shorter than 32 bytes (make one with `head -c 32 /dev/urandom`)")
    return key


def load_or_create_key(path: Path) -> bytes:
    """The signing key, created (mode 0600) on first start. Raises StartupError if unusable, or if it is not
    the gateway's own or group or others may access it (anyone who reads it can mint tokens for any user)."""
    try:
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        check_private_file(path, "gateway.state_dir", "token signing key")
        key = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"token signing key {str(path)!r}: {exc.strerror}") from None
    if len(key) < 32:
        raise StartupError(f"token signing key {str(path)!r} is shorter than 32 bytes")
    return key


class TokenService:
    """Issues and verifies tokens. `static` maps SHA-256 digests of configured per-user tokens to users."""

    def __init__(
        self, key: bytes, clock: Clock, lifetime: float, static: Mapping[bytes, str] | None = None, *, previous: bytes | None = None
    ) -> None:
        self._key = key
        # During a key rollover tokens signed with the previous key are still accepted; new ones use `key`.
        self._previous = previous
        self._clock = clock
        self.lifetime = lifetime
        self._static = dict(static or {})
        self._revoked: dict[str, float] = {}  # token id -> when it expires (then it is dropped)
        self.on_revoke: Callable[[str, float], None] | None = None

    def set_keys(self, key: bytes, previous: bytes | None) -> None:
        """A reload during a key rollover: sign with `key` from now on, still accept what `previous` signed."""
        self._key = key
        self._previous = previous

    def reconfigure(self, lifetime: float, static: Mapping[bytes, str]) -> None:
        """A reload: new tokens get `lifetime`; static tokens are exactly the configured ones (a removed one stops working)."""
        self.lifetime = lifetime
        self._static = dict(static)

    def __repr__(self) -> str:
        return f"TokenService(lifetime={self.lifetime:g}s, static={len(self._static)})"

    def issue(
        self, user: str, *, vm: str | None = None, port: int | None = None, use: str | None = None, lifetime: float | None = None
    ) -> tuple[str, TokenClaims]:
        """A signed token for `user`; with `vm` and `port`, an RD Gateway token good for that target only; with
        `use="web"`, a browser sign-in link's token (short `lifetime`, spent once by the web door)."""
        now = self._clock.now().timestamp()
        issued_ms = int(now * 1000)
        claims = TokenClaims(
            user=user,
            expires_at=now + (lifetime if lifetime is not None else self.lifetime),
            token_id=secrets.token_hex(8),
            issued_at=issued_ms / 1000,
            vm=vm,
            port=port,
            use=use,
        )
        body_claims: dict[str, object] = {"sub": user, "iat": int(now), "iat_ms": issued_ms, "exp": int(claims.expires_at)}
        body_claims["jti"] = claims.token_id
        if vm is not None:
            body_claims["vm"], body_claims["port"] = vm, port
        if use is not None:
            body_claims["use"] = use
        payload = _b64(json.dumps(body_claims, separators=(",", ":")).encode())
        body = f"{_PREFIX}.{payload}"
        mac = _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())
        return f"{body}.{mac}", claims

    def verify(self, token: str) -> TokenClaims:
        """Return the claims of a valid token. Raises AuthError (reason token_invalid or token_expired)."""
        token = token.strip()
        # aiohttp hands header bytes that are not UTF-8 over as lone surrogates: hash them, never fail on them.
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        for known, user in self._static.items():
            if hmac.compare_digest(digest, known):
                return TokenClaims(user=user, expires_at=float("inf"), token_id="static", static=True)  # noqa: S106 - a label, not a secret
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _PREFIX or not token.isascii():
            raise AuthError("malformed token", reason="token_invalid")
        body = f"{parts[0]}.{parts[1]}"
        try:
            given = _unb64(parts[2])
        except ValueError:
            raise AuthError("malformed token", reason="token_invalid") from None
        # The signature before the payload: nothing a client made up is parsed (deep nesting would recurse).
        keys = (self._key,) if self._previous is None else (self._key, self._previous)
        if not any(hmac.compare_digest(hmac.new(k, body.encode(), hashlib.sha256).digest(), given) for k in keys):
            raise AuthError("token signature does not verify", reason="token_invalid")
        try:
            claims = json.loads(_unb64(parts[1]))
        except ValueError:
            raise AuthError("malformed token", reason="token_invalid") from None
        if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str) or not isinstance(claims.get("exp"), int):
            raise AuthError("malformed token", reason="token_invalid")
        if claims["exp"] <= self._clock.now().timestamp():
            raise AuthError("token expired", reason="token_expired")
        # Milliseconds, so a lock revokes exactly the tokens issued before it (`iat` alone is whole seconds).
        iat_ms, iat = claims.get("iat_ms"), claims.get("iat")
        if isinstance(iat_ms, int) and not isinstance(iat_ms, bool):
            issued = iat_ms / 1000
        elif isinstance(iat, int) and not isinstance(iat, bool):
            issued = float(iat)
        else:
            issued = 0.0
        vm, port = claims.get("vm"), claims.get("port")
        if vm is not None and (not isinstance(vm, str) or not isinstance(port, int) or isinstance(port, bool)):
            raise AuthError("malformed token", reason="token_invalid")
        token_id = str(claims.get("jti", ""))
        if token_id in self._revoked:
            raise AuthError("token revoked: the session it opened was ended", reason="token_revoked")
        return TokenClaims(
            user=claims["sub"],
            expires_at=float(claims["exp"]),
            token_id=token_id,
            issued_at=issued,
            vm=vm if isinstance(vm, str) else None,
            port=port if isinstance(port, int) and vm is not None else None,
            use=claims["use"] if isinstance(claims.get("use"), str) else None,
        )

    def revoke(self, claims: TokenClaims) -> None:
        """Void one token until it would have expired anyway (an ended RD Gateway session: no auto-reconnect)."""
        if claims.static:
            return
        self.revoke_id(claims.token_id, claims.expires_at)
        if self.on_revoke is not None:  # with [cluster]: every node refuses it too
            self.on_revoke(claims.token_id, claims.expires_at)

    def revoke_id(self, token_id: str, expires_at: float) -> None:
        """Void a token by its id (another node revoked it). Bounded: entries go when the token would have expired."""
        now = self._clock.now().timestamp()
        if expires_at <= now:
            return
        self._revoked = {t: exp for t, exp in self._revoked.items() if exp > now}
        if len(self._revoked) < MAX_REVOKED:
            self._revoked[token_id[:32]] = expires_at
