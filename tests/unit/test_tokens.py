"""Tunnel tokens: signed, expiring, bound to one user; static ones matched by hash."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from gateway.errors import AuthError
from gateway.tokens import TokenService

KEY = b"k" * 32


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.t

    def monotonic(self) -> float:
        return self.t.timestamp()


def test_issued_token_verifies_for_its_user() -> None:
    """A fresh token names its user and expires after the lifetime."""
    clock = Clock()
    svc = TokenService(KEY, clock, lifetime=600)
    token, claims = svc.issue("alice")
    got = svc.verify(token)
    assert got.user == "alice" and got.expires_at == claims.expires_at == clock.t.timestamp() + 600


def test_expired_token_is_refused() -> None:
    """After its lifetime the token is refused with reason token_expired."""
    clock = Clock()
    svc = TokenService(KEY, clock, lifetime=600)
    token, _ = svc.issue("alice")
    clock.t += timedelta(seconds=601)
    with pytest.raises(AuthError) as err:
        svc.verify(token)
    assert err.value.reason == "token_expired"


@pytest.mark.parametrize(
    "mangle", [lambda t: t[:-2] + "xx", lambda t: t.replace("v1.", "v2."), lambda t: t + ".x", lambda t: "", lambda t: "a.b.c"]
)
def test_tampered_tokens_are_refused(mangle: object) -> None:
    """Changing any part of a token makes it invalid."""
    svc = TokenService(KEY, Clock(), lifetime=600)
    token, _ = svc.issue("alice")
    with pytest.raises(AuthError) as err:
        svc.verify(mangle(token))  # type: ignore[operator]
    assert err.value.reason == "token_invalid"


def test_changed_user_in_payload_does_not_verify() -> None:
    """Re-encoding the payload for another user breaks the signature."""
    import base64
    import json

    svc = TokenService(KEY, Clock(), lifetime=600)
    token, _ = svc.issue("alice")
    prefix, payload, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(AuthError):
        svc.verify(f"{prefix}.{forged}.{mac}")


def test_token_from_another_key_is_refused() -> None:
    """A token signed by another gateway's key is refused."""
    other, _ = TokenService(b"o" * 32, Clock(), lifetime=600).issue("alice")
    with pytest.raises(AuthError):
        TokenService(KEY, Clock(), lifetime=600).verify(other)


def test_static_token_matches_by_hash() -> None:
    """A configured automation token (stored as SHA-256) maps to its user and does not expire."""
    svc = TokenService(KEY, Clock(), lifetime=600, static={hashlib.sha256(b"automation-token-123456").digest(): "ci-bot"})
    claims = svc.verify("automation-token-123456")
    assert claims.user == "ci-bot" and claims.static
    assert "automation" not in repr(svc)
