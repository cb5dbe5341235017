"""Sign-in with the organisation's OpenID Connect provider: the authorization code flow with PKCE and a nonce.

authlib does the protocol pieces (tokens, the S256 code challenge, the ID token's claims rules) and joserfc,
authlib's own JOSE library (`authlib.jose` is deprecated in its favour), checks the ID token's signature
against the issuer's JWKS. Nothing here checks a JWT by hand. HTTP goes through aiohttp, every request
bounded in time (`HTTP_TIMEOUT`) and size (`MAX_DOCUMENT`), redirects not followed.

Who owns what: `OIDCClient` owns its aiohttp session (`close()` ends it) and the cached discovery document and
JWKS. `PendingLogins` owns the logins begun and not finished yet; the web door keeps one, server-side, keyed by
the `state` it sent. Every failure is an `OIDCError` whose reason is one of `REASONS` and whose message is safe
to show the user and to log: it never carries a token, a code, the client secret or the IdP's own error text.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiohttp
from authlib.common.security import generate_token
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
    MissingAlgorithmError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from gateway.clock import Clock
from gateway.config import USER_RE, OIDCSection, is_loopback_host
from gateway.errors import AuthError, StartupError
from gateway.text import one_line

HTTP_TIMEOUT = 10.0  # seconds for one request to the identity provider, connect to last byte
MAX_DOCUMENT = 64 * 1024  # bytes of one answer (discovery, JWKS, token), after decompression
JWKS_REFRESH_INTERVAL = 60.0  # an unknown `kid` fetches the JWKS again at most this often
LEEWAY = 60  # seconds of clock skew allowed on exp and iat
MAX_GROUPS = 256
MAX_CODE = 4096  # an authorization code longer than this is not one
# Asymmetric only: an HMAC algorithm would let anyone who knows the client secret mint ID tokens, and `none` none.
SIGNING_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519")
_ERROR_CODE = re.compile(r"[a-z_]{1,40}")  # an OAuth error code (invalid_grant, ...): the only IdP text shown
REASONS = ("oidc_state", "oidc_token", "oidc_signature", "oidc_nonce", "oidc_expired", "oidc_user", "oidc_unreachable")


class OIDCError(AuthError):
    """A sign-in with the identity provider failed. `reason` is one of `REASONS`; the message is safe to show."""

    reason = "oidc_token"


@dataclass(frozen=True)
class Identity:
    """Who signed in: the gateway user name, the gateway groups the IdP groups map to, and what the IdP said."""

    user: str
    groups: tuple[str, ...]
    idp_groups: tuple[str, ...]
    subject: str


@dataclass(frozen=True)
class PendingLogin:
    """A login begun by `OIDCClient.begin` and not finished yet. Kept server-side; only `state` leaves the gateway.

    `created` is the clock's monotonic time.
    """

    state: str
    nonce: str = field(repr=False)
    code_verifier: str = field(repr=False)
    redirect_uri: str
    created: float


class PendingLogins:
    """The logins begun and not finished, keyed by `state`: single use, expiring after `ttl`, at most `max`.

    When full, the oldest pending login is dropped (its user starts again); a flood of sign-in starts is the
    door's rate limit to stop, and this bound keeps it from growing memory.
    """

    def __init__(self, clock: Clock, ttl: float = 600.0, max: int = 10_000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max
        self._items: OrderedDict[str, PendingLogin] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def _expired(self, p: PendingLogin) -> bool:
        return self._clock.monotonic() - p.created >= self._ttl

    def _purge(self) -> None:
        while self._items:
            oldest = next(iter(self._items.values()))
            if not self._expired(oldest):
                break
            self._items.popitem(last=False)

    def add(self, pending: PendingLogin) -> None:
        self._purge()
        self._items.pop(pending.state, None)
        while len(self._items) >= self._max:
            self._items.popitem(last=False)
        self._items[pending.state] = pending

    def take(self, state: str | None) -> PendingLogin | None:
        """The pending login for `state`, removed; None if unknown, already taken or expired."""
        self._purge()
        if not state:
            return None
        p = self._items.pop(state, None)
        if p is None or self._expired(p):
            return None
        return p


def read_client_secret(path: Path) -> str:
    """The client secret from its file (surrounding whitespace stripped). Raises StartupError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"oidc.client_secret_file: cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        secret = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise StartupError(f"oidc.client_secret_file: {str(path)!r} is not UTF-8 text") from None
    if not secret or len(secret) > 4096 or "\n" in secret:
        raise StartupError(f"oidc.client_secret_file: {str(path)!r} must hold the secret on one line (1 to 4096 characters)")
    return secret


# -- typed wrappers around authlib and joserfc ----------------------------------------------------------------


def new_token(length: int) -> str:
    """A random token of `length` letters and digits (authlib's generator, on `secrets`)."""
    return str(generate_token(length))


def s256_challenge(verifier: str) -> str:
    """The PKCE S256 code challenge for `verifier` (RFC 7636)."""
    return str(create_s256_code_challenge(verifier))


def _import_jwks(document: Mapping[str, Any]) -> KeySet:
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise OIDCError("the identity provider's key set (JWKS) has no keys", reason="oidc_unreachable")
    try:
        return KeySet.import_key_set({"keys": [k for k in keys if isinstance(k, dict)]})
    except (JoseError, ValueError, TypeError, KeyError):
        raise OIDCError("the identity provider's key set (JWKS) holds no usable key", reason="oidc_unreachable") from None


def _decode_jws(token: str, keys: KeySet, algorithms: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a compact JWS after its signature checked out. Raises joserfc errors."""
    decoded = jwt.decode(token, keys, registry=JWSRegistry(algorithms=algorithms, strict_check_header=False))
    return dict(decoded.header), dict(decoded.claims)


def _validate_claims(
    claims: dict[str, Any], header: dict[str, Any], *, issuer: str, client_id: str, nonce: str, access_token: str | None, now: int
) -> None:
    """OpenID Connect Core 3.1.3.7 through authlib's CodeIDToken: iss, aud (and azp), exp, iat, nonce, at_hash.

    Raises joserfc ClaimError subclasses.
    """
    options = {"iss": {"essential": True, "value": issuer}, "aud": {"essential": True, "value": client_id}}
    params: dict[str, Any] = {"nonce": nonce, "client_id": client_id}
    if access_token:
        params["access_token"] = access_token
    CodeIDToken(claims, header, options, params).validate(now=now, leeway=LEEWAY)


# -- the client ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Metadata:
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    auth_method: str  # client_secret_basic or client_secret_post


class OIDCClient:
    """One relying party at one issuer. `discover()` before `begin()`; `close()` when done.

    Raises only OIDCError. Cancellation is never swallowed: a cancelled request leaves the cache as it was.
    """

    def __init__(self, section: OIDCSection, clock: Clock, secret: str) -> None:
        self._section = section
        self._clock = clock
        self._secret = secret
        self._meta: _Metadata | None = None
        self._keys: KeySet | None = None
        self._keys_fetched = float("-inf")
        self._keys_lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OIDCClient(issuer={self._section.issuer!r}, client_id={self._section.client_id!r})"

    @property
    def section(self) -> OIDCSection:
        return self._section

    @property
    def ready(self) -> bool:
        return self._meta is not None and self._keys is not None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- HTTP --
    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT),
                connector=aiohttp.TCPConnector(limit=20),
                headers={"Accept": "application/json"},
            )
        return self._http

    async def _json(self, method: str, url: str, what: str, **kwargs: Any) -> tuple[int, Any]:
        """(status, parsed JSON) of one bounded request. Raises OIDCError(oidc_unreachable) naming `what`."""
        host = urlsplit(url).netloc
        try:
            async with asyncio.timeout(HTTP_TIMEOUT), self._session().request(method, url, allow_redirects=False, **kwargs) as resp:
                body = bytearray()
                async for chunk in resp.content.iter_chunked(16384):
                    body += chunk
                    if len(body) > MAX_DOCUMENT:
                        raise OIDCError(
                            f"the identity provider's {what} at {host} is larger than {MAX_DOCUMENT // 1024} KiB", reason="oidc_unreachable"
                        )
                status = resp.status
        except TimeoutError:
            raise OIDCError(
                f"the identity provider at {host} did not answer the {what} request within {HTTP_TIMEOUT:g}s", reason="oidc_unreachable"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise OIDCError(
                f"cannot reach the identity provider at {host} for its {what} ({type(exc).__name__})", reason="oidc_unreachable"
            ) from None
        try:
            return status, json.loads(bytes(body))
        except ValueError:
            if status >= 300:
                raise OIDCError(
                    f"the identity provider at {host} answered the {what} request with HTTP {status}", reason="oidc_unreachable"
                ) from None
            raise OIDCError(f"the identity provider's {what} at {host} is not JSON", reason="oidc_unreachable") from None

    def _endpoint(self, doc: Mapping[str, Any], key: str) -> str:
        value = doc.get(key)
        ok = isinstance(value, str) and len(value) < 2048
        if ok:
            u = urlsplit(str(value))
            loopback = is_loopback_host(u.hostname or "")
            ok = bool(u.hostname) and (u.scheme == "https" or (u.scheme == "http" and self._section.allowed_http_issuer and loopback))
        if not ok:
            raise OIDCError(f"the identity provider's discovery document has no usable https:// {key}", reason="oidc_unreachable")
        return str(value)

    # -- discovery and keys --
    async def discover(self) -> None:
        """Fetch the discovery document and the JWKS. Raises OIDCError naming the problem."""
        issuer = self._section.issuer
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        status, doc = await self._json("GET", url, "discovery document")
        if status != 200 or not isinstance(doc, dict):
            raise OIDCError(
                f"the identity provider's discovery document answered HTTP {status}, not a JSON object", reason="oidc_unreachable"
            )
        if doc.get("issuer") != issuer:
            shown = one_line(str(doc.get("issuer")))[:200]
            raise OIDCError(
                f"the identity provider says its issuer is {shown!r}, but oidc.issuer is {issuer!r}: they must be equal",
                reason="oidc_unreachable",
            )
        types = doc.get("response_types_supported")
        if isinstance(types, list) and "code" not in types:
            raise OIDCError("the identity provider does not offer the authorization code flow", reason="oidc_unreachable")
        pkce = doc.get("code_challenge_methods_supported")
        if isinstance(pkce, list) and "S256" not in pkce:
            raise OIDCError("the identity provider does not offer PKCE with S256", reason="oidc_unreachable")
        offered = doc.get("id_token_signing_alg_values_supported")
        algorithms = tuple(a for a in SIGNING_ALGORITHMS if a in offered) if isinstance(offered, list) else ("RS256",)
        if not algorithms:
            raise OIDCError(
                f"the identity provider signs ID tokens only with algorithms the gateway does not accept ({one_line(str(offered))[:100]})",
                reason="oidc_unreachable",
            )
        methods = doc.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
        methods = methods if isinstance(methods, list) else []
        method = next((m for m in ("client_secret_basic", "client_secret_post") if m in methods), None)
        if method is None:
            raise OIDCError(
                "the identity provider offers neither client_secret_basic nor client_secret_post at its token endpoint",
                reason="oidc_unreachable",
            )
        meta = _Metadata(
            authorization_endpoint=self._endpoint(doc, "authorization_endpoint"),
            token_endpoint=self._endpoint(doc, "token_endpoint"),
            jwks_uri=self._endpoint(doc, "jwks_uri"),
            algorithms=algorithms,
            auth_method=method,
        )
        keys = await self._fetch_keys(meta.jwks_uri)
        self._meta, self._keys, self._keys_fetched = meta, keys, self._clock.monotonic()

    async def _fetch_keys(self, jwks_uri: str) -> KeySet:
        status, doc = await self._json("GET", jwks_uri, "key set (JWKS)")
        if status != 200 or not isinstance(doc, dict):
            raise OIDCError(f"the identity provider's key set (JWKS) answered HTTP {status}, not a JSON object", reason="oidc_unreachable")
        return _import_jwks(doc)

    async def _refresh_keys(self) -> bool:
        """Fetch the JWKS again unless it was fetched within `JWKS_REFRESH_INTERVAL`. True if it was fetched."""
        assert self._meta is not None
        async with self._keys_lock:
            if self._clock.monotonic() - self._keys_fetched < JWKS_REFRESH_INTERVAL:
                return False
            # Counted even if it fails, so a token with a made-up kid cannot make every sign-in fetch the JWKS.
            self._keys_fetched = self._clock.monotonic()
            self._keys = await self._fetch_keys(self._meta.jwks_uri)
            return True

    def _metadata(self) -> _Metadata:
        if self._meta is None or self._keys is None:
            raise OIDCError("sign-in with the identity provider is not available yet: it was not reached", reason="oidc_unreachable")
        return self._meta

    # -- the flow --
    def begin(self, redirect_uri: str) -> tuple[str, PendingLogin]:
        """The authorization URL to send the browser to, and the login to keep until it comes back."""
        meta = self._metadata()
        pending = PendingLogin(
            state=new_token(43),
            nonce=new_token(43),
            code_verifier=new_token(64),  # RFC 7636: 43 to 128 unreserved characters
            redirect_uri=redirect_uri,
            created=self._clock.monotonic(),
        )
        params = {
            "response_type": "code",
            "client_id": self._section.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self._section.scopes),
            "state": pending.state,
            "nonce": pending.nonce,
            "code_challenge": s256_challenge(pending.code_verifier),
            "code_challenge_method": "S256",
        }
        u = urlsplit(meta.authorization_endpoint)
        query = urlencode([*parse_qsl(u.query, keep_blank_values=True), *params.items()])
        return urlunsplit((u.scheme, u.netloc, u.path, query, "")), pending

    async def finish(self, pending: PendingLogin, code: str) -> Identity:
        """Redeem `code` at the token endpoint, verify the ID token, and say who signed in. Raises OIDCError."""
        meta = self._metadata()
        if not code or len(code) > MAX_CODE:
            raise OIDCError("the identity provider's answer carried no usable authorization code", reason="oidc_state")
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": pending.redirect_uri,
            "code_verifier": pending.code_verifier,
        }
        headers: dict[str, str] = {}
        if meta.auth_method == "client_secret_basic":
            # RFC 6749 2.3.1: both are form-urlencoded before they go into the Basic header.
            pair = f"{quote(self._section.client_id, safe='')}:{quote(self._secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        else:
            form |= {"client_id": self._section.client_id, "client_secret": self._secret}
        status, body = await self._json("POST", meta.token_endpoint, "token", data=form, headers=headers)
        if status != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            code_name = error if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else f"HTTP {status}"
            raise OIDCError(
                f"the identity provider refused to complete the sign-in ({code_name}): please sign in again", reason="oidc_token"
            )
        id_token = body.get("id_token")
        access_token = body.get("access_token")
        if not isinstance(id_token, str) or not id_token:
            raise OIDCError("the identity provider's answer carried no ID token", reason="oidc_token")
        claims = await self.verify_id_token(
            id_token, nonce=pending.nonce, access_token=access_token if isinstance(access_token, str) else None
        )
        return self.identity(claims)

    async def verify_id_token(self, id_token: str, *, nonce: str, access_token: str | None = None) -> dict[str, Any]:
        """The claims of `id_token` once its signature (the issuer's JWKS), iss, aud, exp, iat, nonce and at_hash
        checked out. An unknown `kid` fetches the JWKS again (at most once a minute). Raises OIDCError."""
        meta = self._metadata()
        if len(id_token) > MAX_DOCUMENT:
            raise OIDCError("the identity provider's ID token is too large", reason="oidc_token")
        header, claims = await self._check_signature(id_token, meta)
        now = int(self._clock.now().timestamp())
        try:
            _validate_claims(
                claims,
                header,
                issuer=self._section.issuer,
                client_id=self._section.client_id,
                nonce=nonce,
                access_token=access_token,
                now=now,
            )
        except ExpiredTokenError:
            raise OIDCError("the identity provider's ID token has expired: please sign in again", reason="oidc_expired") from None
        except ClaimError as exc:
            if exc.claim == "nonce":
                raise OIDCError(
                    "the ID token was not issued for this sign-in (its nonce differs): please sign in again", reason="oidc_nonce"
                ) from None
            raise OIDCError(f"the identity provider's ID token has a wrong or missing {exc.claim!r} claim", reason="oidc_token") from None
        return claims

    async def _check_signature(self, id_token: str, meta: _Metadata) -> tuple[dict[str, Any], dict[str, Any]]:
        for attempt in range(2):
            assert self._keys is not None
            try:
                return _decode_jws(id_token, self._keys, meta.algorithms)
            except InvalidKeyIdError:
                if attempt == 0 and await self._refresh_keys():
                    continue
                raise OIDCError(
                    "the ID token is signed with a key the identity provider does not publish", reason="oidc_signature"
                ) from None
            except BadSignatureError:
                raise OIDCError(
                    "the ID token's signature does not verify against the identity provider's keys", reason="oidc_signature"
                ) from None
            except (MissingAlgorithmError, UnsupportedAlgorithmError):
                raise OIDCError("the ID token is signed with an algorithm the gateway does not accept", reason="oidc_signature") from None
            except (JoseError, ValueError, TypeError, KeyError):
                raise OIDCError("the identity provider's ID token is malformed", reason="oidc_token") from None
        raise AssertionError("unreachable")

    def identity(self, claims: Mapping[str, Any]) -> Identity:
        """The gateway identity for verified `claims`: the user claim, and the groups claim through group_map."""
        section = self._section
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise OIDCError("the identity provider's ID token has no subject", reason="oidc_token")
        raw_user = claims.get(section.user_claim)
        if not isinstance(raw_user, str) or not raw_user:
            raise OIDCError(f"your identity provider did not send the {section.user_claim!r} claim that names you here", reason="oidc_user")
        user = raw_user.lower()
        if not USER_RE.fullmatch(user):
            shown = one_line(raw_user)[:64]
            raise OIDCError(f"your identity provider's user name {shown!r} cannot be a gateway user name", reason="oidc_user")
        raw_groups = claims.get(section.groups_claim, [])
        if not isinstance(raw_groups, list) or not all(isinstance(g, str) for g in raw_groups):
            raise OIDCError(f"the identity provider's {section.groups_claim!r} claim is not a list of group names", reason="oidc_token")
        if len(raw_groups) > MAX_GROUPS:
            raise OIDCError(f"the identity provider sent more than {MAX_GROUPS} groups", reason="oidc_token")
        idp_groups = tuple(dict.fromkeys(raw_groups))
        mapped: dict[str, None] = {}
        for g in idp_groups:
            for target in section.group_map.get(g, ()):
                mapped[target] = None
        return Identity(
            user=user,
            groups=tuple(sorted(mapped)),
            idp_groups=tuple(one_line(g)[:256] for g in idp_groups),
            subject=subject,
        )
