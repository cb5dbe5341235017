"""gateway.oidc against a real OpenID Connect provider process on loopback (`oidc-provider-mock`).

The provider starts once for the module (about 3 s); every test builds its own client and clock. The
authorize step is the provider's own form driven with aiohttp (`tests.support.oidc.authorize`): no browser.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from gateway.config import OIDCSection
from gateway.oidc import REASONS, Identity, OIDCClient, OIDCError, PendingLogin, PendingLogins
from tests.support.clock import FakeClock
from tests.support.oidc import OIDCProvider, authorize, redeem, running_oidc_provider
from tests.support.peers import free_port

pytestmark = pytest.mark.timeout(60)

CLIENT_ID = "bastion-test"
REDIRECT = "https://gw.example.test/login/oidc/callback"
USERS = {
    "alice-sub": {"preferred_username": "alice", "email": "alice@example.com", "groups": ["ops", "staff"]},
    "bob-sub": {"preferred_username": "bob", "groups": ["marketing"]},
    "carol-sub": {"preferred_username": "Carol", "groups": []},
    "dave-sub": {"preferred_username": "dave smith!", "groups": ["ops"]},
}
GROUP_MAP = {"ops": ("operators",), "staff": ("users", "operators")}


@pytest.fixture(scope="module")
def provider() -> Iterator[OIDCProvider]:
    with running_oidc_provider(USERS) as p:
        yield p


def _section(issuer: str, client_id: str = CLIENT_ID) -> OIDCSection:
    return OIDCSection(
        issuer=issuer,
        client_id=client_id,
        client_secret_file=Path("/nonexistent/secret"),
        group_map=GROUP_MAP,
        allowed_http_issuer=True,
    )


def _clock(offset: float = 0.0) -> FakeClock:
    """A fake clock whose wall time is now (plus `offset` seconds): the provider stamps tokens with real time."""
    return FakeClock(wall=datetime.now(UTC) + timedelta(seconds=offset))


@pytest.fixture
async def client(provider: OIDCProvider) -> AsyncIterator[OIDCClient]:
    c = OIDCClient(_section(provider.url), _clock(), "s3cret")
    await c.discover()
    yield c
    await c.close()


async def _sign_in(c: OIDCClient, sub: str) -> tuple[PendingLogin, str]:
    url, pending = c.begin(REDIRECT)
    code, state = await authorize(url, sub)
    assert state == pending.state
    return pending, code


async def _refusal(c: OIDCClient, pending: PendingLogin, code: str) -> OIDCError:
    with pytest.raises(OIDCError) as info:
        await c.finish(pending, code)
    assert info.value.reason in REASONS
    return info.value


# --- discovery ----------------------------------------------------------------------------------------------


async def test_discovery_reads_the_providers_document_and_keys(client: OIDCClient) -> None:
    """discover() fetched the document and the JWKS: the client is ready to begin a sign-in."""
    assert client.ready


async def test_discovery_refuses_an_issuer_that_differs_from_the_configured_one(provider: OIDCProvider) -> None:
    """The provider calls itself `http://127.0.0.1:PORT`; a config saying `.../` (a trailing slash) is refused, naming both."""
    c = OIDCClient(_section(provider.url + "/"), _clock(), "s3cret")
    try:
        with pytest.raises(OIDCError) as info:
            await c.discover()
    finally:
        await c.close()
    assert info.value.reason == "oidc_unreachable"
    assert repr(provider.url) in info.value.message and repr(provider.url + "/") in info.value.message


async def test_an_unreachable_issuer_is_refused_with_a_clear_message() -> None:
    """Nothing listens on the issuer's port: discover() raises oidc_unreachable naming the host, quickly."""
    port = free_port()
    c = OIDCClient(_section(f"http://127.0.0.1:{port}"), _clock(), "s3cret")
    try:
        with pytest.raises(OIDCError) as info:
            await c.discover()
    finally:
        await c.close()
    assert info.value.reason == "oidc_unreachable"
    assert f"cannot reach the identity provider at 127.0.0.1:{port}" in info.value.message


async def test_begin_before_discovery_is_refused() -> None:
    """A client that never reached its provider cannot start a sign-in."""
    c = OIDCClient(_section("http://127.0.0.1:9"), _clock(), "s3cret")
    with pytest.raises(OIDCError) as info:
        c.begin(REDIRECT)
    assert info.value.reason == "oidc_unreachable"


# --- begin() ------------------------------------------------------------------------------------------------


async def test_begin_builds_a_code_flow_url_with_pkce_s256_a_nonce_and_a_state(client: OIDCClient, provider: OIDCProvider) -> None:
    """The authorization URL asks for a code, carries state and nonce, and the S256 challenge of the kept verifier."""
    url, pending = client.begin(REDIRECT)
    u = urlsplit(url)
    assert f"{u.scheme}://{u.netloc}{u.path}" == provider.url + "/oauth2/authorize"
    q = {k: v[0] for k, v in parse_qs(u.query).items()}
    expected = base64.urlsafe_b64encode(hashlib.sha256(pending.code_verifier.encode()).digest()).rstrip(b"=").decode()
    assert q == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT,
        "scope": "openid profile email",
        "state": pending.state,
        "nonce": pending.nonce,
        "code_challenge": expected,
        "code_challenge_method": "S256",
    }
    assert 43 <= len(pending.code_verifier) <= 128
    assert len(pending.state) >= 32 and len(pending.nonce) >= 32
    _, other = client.begin(REDIRECT)
    assert {other.state, other.nonce, other.code_verifier}.isdisjoint({pending.state, pending.nonce, pending.code_verifier})
    assert pending.nonce not in repr(pending) and pending.code_verifier not in repr(pending)


# --- the whole flow -----------------------------------------------------------------------------------------


async def test_a_full_sign_in_maps_the_idp_groups_to_gateway_groups(client: OIDCClient) -> None:
    """alice signs in on the provider's form; her IdP groups ops and staff map to operators and users."""
    pending, code = await _sign_in(client, "alice-sub")
    identity = await client.finish(pending, code)
    assert identity == Identity(user="alice", groups=("operators", "users"), idp_groups=("ops", "staff"), subject="alice-sub")


async def test_a_user_in_no_mapped_group_signs_in_with_no_groups(client: OIDCClient) -> None:
    """bob's only IdP group is not in group_map: he is bob with no gateway groups (the rules decide the rest)."""
    pending, code = await _sign_in(client, "bob-sub")
    identity = await client.finish(pending, code)
    assert (identity.user, identity.groups, identity.idp_groups) == ("bob", (), ("marketing",))


async def test_the_user_name_is_lower_cased(client: OIDCClient) -> None:
    """The IdP's `Carol` is the gateway user `carol`."""
    pending, code = await _sign_in(client, "carol-sub")
    assert (await client.finish(pending, code)).user == "carol"


async def test_an_idp_user_name_that_cannot_be_a_gateway_user_is_refused(client: OIDCClient) -> None:
    """`dave smith!` breaks the user-name rules: oidc_user, with the name in the message."""
    pending, code = await _sign_in(client, "dave-sub")
    err = await _refusal(client, pending, code)
    assert err.reason == "oidc_user"
    assert err.message == "your identity provider's user name 'dave smith!' cannot be a gateway user name"


async def test_a_wrong_nonce_is_refused(client: OIDCClient) -> None:
    """The ID token carries the nonce of the request; a login kept with another nonce refuses it (a replayed token)."""
    pending, code = await _sign_in(client, "alice-sub")
    err = await _refusal(client, dataclasses.replace(pending, nonce="some-other-nonce"), code)
    assert err.reason == "oidc_nonce"


async def test_a_code_used_twice_is_refused(client: OIDCClient) -> None:
    """The provider redeems a code once; the second finish() gets oidc_token and no identity."""
    pending, code = await _sign_in(client, "alice-sub")
    await client.finish(pending, code)
    err = await _refusal(client, pending, code)
    assert err.reason == "oidc_token"
    assert code not in err.message


async def test_an_expired_id_token_is_refused(provider: OIDCProvider) -> None:
    """The provider's ID tokens live an hour; a gateway clock two hours ahead finds this one expired."""
    c = OIDCClient(_section(provider.url), _clock(offset=2 * 3600), "s3cret")
    try:
        await c.discover()
        pending, code = await _sign_in(c, "alice-sub")
        err = await _refusal(c, pending, code)
    finally:
        await c.close()
    assert err.reason == "oidc_expired"


# --- the ID token itself ------------------------------------------------------------------------------------


async def _raw_id_token(client: OIDCClient, provider: OIDCProvider, sub: str = "alice-sub") -> tuple[str, PendingLogin]:
    pending, code = await _sign_in(client, sub)
    answer = await redeem(provider, code, REDIRECT, client_id=CLIENT_ID)
    return str(answer["id_token"]), pending


def _flip(token: str, part: int) -> str:
    """`token` with one byte of its `part` (0 header, 1 payload, 2 signature) changed."""
    parts = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(parts[part] + "=" * (-len(parts[part]) % 4)))
    raw[len(raw) // 2] ^= 0x01
    parts[part] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    return ".".join(parts)


async def test_the_untampered_id_token_verifies(client: OIDCClient, provider: OIDCProvider) -> None:
    """The control for the tampering tests: the provider's own token, checked directly, gives its claims."""
    token, pending = await _raw_id_token(client, provider)
    claims = await client.verify_id_token(token, nonce=pending.nonce)
    assert claims["sub"] == "alice-sub" and claims["aud"] == [CLIENT_ID]


async def test_an_id_token_with_a_flipped_signature_byte_is_refused(client: OIDCClient, provider: OIDCProvider) -> None:
    """One byte of the signature changed: oidc_signature, and the message carries no part of the token."""
    token, pending = await _raw_id_token(client, provider)
    with pytest.raises(OIDCError) as info:
        await client.verify_id_token(_flip(token, 2), nonce=pending.nonce)
    assert info.value.reason == "oidc_signature"
    assert not any(part in info.value.message for part in token.split("."))


async def test_an_id_token_with_a_changed_payload_is_refused(client: OIDCClient, provider: OIDCProvider) -> None:
    """One byte of the claims changed (the signature kept): oidc_signature."""
    token, pending = await _raw_id_token(client, provider)
    with pytest.raises(OIDCError) as info:
        await client.verify_id_token(_flip(token, 1), nonce=pending.nonce)
    assert info.value.reason == "oidc_signature"


async def test_an_id_token_for_another_client_is_refused(client: OIDCClient, provider: OIDCProvider) -> None:
    """A genuine token issued to client `other` (same provider, same nonce) fails the audience check."""
    other = OIDCClient(_section(provider.url, client_id="other"), _clock(), "s3cret")
    try:
        await other.discover()
        pending, code = await _sign_in(other, "alice-sub")
        answer = await redeem(provider, code, REDIRECT, client_id="other")
    finally:
        await other.close()
    with pytest.raises(OIDCError) as info:
        await client.verify_id_token(answer["id_token"], nonce=pending.nonce)
    assert info.value.reason == "oidc_token"
    assert "'aud'" in info.value.message


class _CountingClient(OIDCClient):
    fetches = 0

    async def _fetch_keys(self, jwks_uri: str) -> KeySet:
        self.fetches += 1
        return await super()._fetch_keys(jwks_uri)


async def test_an_unknown_kid_fetches_the_jwks_again_at_most_once_a_minute(provider: OIDCProvider) -> None:
    """A token signed by a key the provider never published (kid `rogue`) is refused; the first refusal a minute
    after the last fetch looks the key set up again, the next within the minute does not."""
    clock = _clock()
    c = _CountingClient(_section(provider.url), clock, "s3cret")
    try:
        await c.discover()
        assert c.fetches == 1
        rogue = RSAKey.generate_key(2048, parameters={"kid": "rogue"})
        now = int(clock.now().timestamp())
        claims = {"iss": provider.url, "aud": CLIENT_ID, "sub": "alice-sub", "iat": now, "exp": now + 300, "nonce": "n"}
        token = jwt.encode({"alg": "RS256", "kid": "rogue"}, claims, rogue)
        with pytest.raises(OIDCError) as info:
            await c.verify_id_token(token, nonce="n")
        assert info.value.reason == "oidc_signature" and c.fetches == 1  # fetched at discovery, under a minute ago
        await clock.advance(61)
        with pytest.raises(OIDCError):
            await c.verify_id_token(token, nonce="n")
        assert c.fetches == 2
        with pytest.raises(OIDCError):
            await c.verify_id_token(token, nonce="n")
        assert c.fetches == 2
    finally:
        await c.close()


# --- pending logins -----------------------------------------------------------------------------------------


def _pending(state: str, created: float) -> PendingLogin:
    return PendingLogin(state=state, nonce="n", code_verifier="v" * 43, redirect_uri=REDIRECT, created=created)


def test_a_state_is_good_once() -> None:
    """take() hands a pending login back once; the same state again (a replayed callback) gets None."""
    clock = FakeClock()
    logins = PendingLogins(clock)
    logins.add(_pending("s1", clock.monotonic()))
    assert logins.take("s1") is not None
    assert logins.take("s1") is None
    assert logins.take("never-issued") is None
    assert logins.take("") is None


async def test_a_pending_login_expires_after_its_ttl() -> None:
    """A sign-in not finished within the ttl (600 s) is gone."""
    clock = FakeClock()
    logins = PendingLogins(clock, ttl=600)
    logins.add(_pending("s1", clock.monotonic()))
    logins.add(_pending("s2", clock.monotonic()))
    await clock.advance(599)
    assert logins.take("s1") is not None
    await clock.advance(2)
    assert logins.take("s2") is None
    assert len(logins) == 0


def test_pending_logins_are_bounded_dropping_the_oldest() -> None:
    """At `max` pending logins, a new one drops the oldest."""
    clock = FakeClock()
    logins = PendingLogins(clock, max=3)
    for i in range(5):
        logins.add(_pending(f"s{i}", clock.monotonic()))
    assert len(logins) == 3
    assert logins.take("s0") is None and logins.take("s1") is None
    assert logins.take("s4") is not None
