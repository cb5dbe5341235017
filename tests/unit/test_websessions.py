"""Browser sessions on the fake clock: lifetime, sign-out, a lock on the user, the bound, and no cookie kept."""

from __future__ import annotations

from gateway.policy import Principal
from gateway.websessions import WebSessions
from tests.support.clock import FakeClock

ALICE = Principal("alice", ("ops",), "link")


def test_a_session_lives_its_lifetime_and_no_longer() -> None:
    clock = FakeClock()
    store = WebSessions(clock, lifetime=60)
    cookie, session = store.create(ALICE)
    assert store.get(cookie) is session
    clock.mono += 59
    assert store.get(cookie) is session
    clock.mono += 2
    assert store.get(cookie) is None and len(store) == 0


def test_the_store_keeps_a_digest_not_the_cookie() -> None:
    store = WebSessions(FakeClock(), lifetime=60)
    cookie, session = store.create(ALICE)
    assert cookie.encode() not in session.key and len(session.key) == 32
    assert cookie not in repr(session)
    assert store.get(cookie + "x") is None and store.get("") is None and store.get(None) is None and store.get("x" * 500) is None


def test_sign_out_and_a_lock_end_sessions() -> None:
    store = WebSessions(FakeClock(), lifetime=60)
    c1, s1 = store.create(ALICE)
    c2, _ = store.create(ALICE)
    c3, _ = store.create(Principal("bob", (), "link"))
    store.end(s1)
    assert store.get(c1) is None and store.get(c2) is not None
    assert [s.principal.name for s in store.end_user("alice")] == ["alice"]
    assert store.get(c2) is None and store.get(c3) is not None


def test_the_store_is_bounded_oldest_first() -> None:
    store = WebSessions(FakeClock(), lifetime=60, max_sessions=3)
    cookies = [store.create(ALICE)[0] for _ in range(4)]
    assert store.get(cookies[0]) is None and all(store.get(c) is not None for c in cookies[1:])
    assert store.evicted == 1 and len(store) == 3
