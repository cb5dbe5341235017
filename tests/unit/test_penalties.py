"""gateway.net.penalties: per-source penalties like OpenSSH's PerSourcePenalties, on the fake clock."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from gateway.config import PenaltyPolicy
from gateway.kinds import PenaltyEvent
from gateway.net.penalties import Penalties
from tests.support.clock import FakeClock

AUTH, GRACE, NOAUTH = PenaltyEvent.AUTH_FAILURE, PenaltyEvent.GRACE_EXCEEDED, PenaltyEvent.NO_AUTH


class Seen:
    def __init__(self) -> None:
        self.events: list[PenaltyEvent] = []
        self.evicted = 0

    def penalty_recorded(self, event: PenaltyEvent) -> None:
        self.events.append(event)

    def penalty_evicted(self) -> None:
        self.evicted += 1


def make(**changes: object) -> tuple[Penalties, FakeClock, Seen]:
    clock, seen = FakeClock(), Seen()
    return Penalties(replace(PenaltyPolicy(), **changes), clock, observer=seen), clock, seen  # type: ignore[arg-type]


def test_penalties_below_min_do_not_refuse() -> None:
    """Defaults (auth failure 5s, min 15s): three failures make 15s, not more than min: the source still connects."""
    p, _, seen = make()
    for _ in range(3):
        p.record("192.0.2.1", AUTH)
    assert p.refused("192.0.2.1") is None
    assert seen.events == [AUTH] * 3


def test_exceeding_min_refuses_until_the_penalty_expires() -> None:
    """A fourth failure makes 20s > 15s: refused for the 20s, then let in again and forgotten."""
    p, clock, _ = make()
    for _ in range(4):
        p.record("192.0.2.1", AUTH)
    assert p.refused("192.0.2.1") == 20.0
    assert p.refused("192.0.2.2") is None  # another source is not affected
    clock.mono += 19.5
    assert p.refused("192.0.2.1") == 0.5
    clock.mono += 0.5
    assert p.refused("192.0.2.1") is None
    assert p.tracked == 0


def test_penalties_decay_with_time() -> None:
    """Penalties are an expiry: failures spread out over time never add up past min."""
    p, clock, _ = make()
    for _ in range(20):
        p.record("192.0.2.1", AUTH)
        clock.mono += 5
    assert p.refused("192.0.2.1") is None


def test_each_event_has_its_own_duration() -> None:
    """grace exceeded 10s, no auth 1s: two grace timeouts (20s) refuse, fifteen no-auth connections do not."""
    p, _, _ = make()
    p.record("192.0.2.1", GRACE)
    p.record("192.0.2.1", GRACE)
    assert p.refused("192.0.2.1") == 20.0
    for _ in range(15):
        p.record("192.0.2.9", NOAUTH)
    assert p.refused("192.0.2.9") is None


def test_penalty_is_capped_at_max() -> None:
    """max 30s: a hundred failures still expire 30s after the last one."""
    p, clock, _ = make(max=30.0)
    for _ in range(100):
        p.record("192.0.2.1", AUTH)
    assert p.refused("192.0.2.1") == 30.0
    clock.mono += 30
    assert p.refused("192.0.2.1") is None


def test_exempt_networks_are_never_penalized() -> None:
    """An exempt /8 (and its IPv4-mapped IPv6 form) earns nothing; a neighbour outside it does."""
    p, _, seen = make(exempt=(ipaddress.ip_network("10.0.0.0/8"),))
    for _ in range(10):
        p.record("10.1.2.3", AUTH)
        p.record("::ffff:10.1.2.4", AUTH)
        p.record("11.0.0.1", AUTH)
    assert p.refused("10.1.2.3") is None and p.refused("::ffff:10.1.2.4") is None
    assert p.refused("11.0.0.1") is not None
    assert seen.events == [AUTH] * 10


def test_ipv6_sources_are_penalized_per_64() -> None:
    """A host rotating addresses inside its /64 is one source."""
    p, _, _ = make()
    for i in range(4):
        p.record(f"2001:db8:1:2::{i + 1}", AUTH)
    assert p.refused("2001:db8:1:2:ffff::9") is not None
    assert p.refused("2001:db8:1:3::1") is None


def test_disabled_records_nothing() -> None:
    p, _, seen = make(enabled=False)
    for _ in range(10):
        p.record("192.0.2.1", GRACE)
    assert p.refused("192.0.2.1") is None and p.tracked == 0 and seen.events == []


def test_a_zero_duration_event_is_ignored() -> None:
    """no_auth = "0s" turns that event off."""
    p, _, seen = make(no_auth=0.0)
    for _ in range(100):
        p.record("192.0.2.1", NOAUTH)
    assert p.tracked == 0 and seen.events == []


def test_table_is_bounded_and_evicts_the_least_recently_penalized() -> None:
    """max_sources 3: a fourth source evicts the oldest live one (counted); expired ones are swept uncounted."""
    p, clock, seen = make(max_sources=3)
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        for _ in range(4):
            p.record(ip, AUTH)
    p.record("192.0.2.1", AUTH)  # refreshed: now the most recent
    p.record("192.0.2.4", AUTH)
    assert p.tracked == 3 and seen.evicted == 1 and p.evicted == 1
    assert p.refused("192.0.2.2") is None  # the evicted one
    assert p.refused("192.0.2.1") is not None and p.refused("192.0.2.3") is not None
    clock.mono += 1000
    for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        p.record(ip, NOAUTH)
    assert seen.evicted == 1  # the entries pushed out had expired


def test_events_recorded_here_are_shared_and_remote_ones_are_not_shared_again() -> None:
    """With [cluster], `on_record` hears each event recorded here (not the exempt or disabled ones); another node's
    event counts the same but is not handed back (no echo), and a source that is not an IP literal is ignored."""
    p, _, _ = make(exempt=(ipaddress.ip_network("10.0.0.0/8"),))
    shared: list[tuple[str, PenaltyEvent]] = []
    p.on_record = lambda source, event: shared.append((source, event))
    p.record("192.0.2.1", AUTH)
    p.record("10.1.2.3", AUTH)
    assert shared == [("192.0.2.1", AUTH)]
    for _ in range(3):
        p.record_remote("192.0.2.1", AUTH)
    p.record_remote("not-an-address", AUTH)
    assert shared == [("192.0.2.1", AUTH)] and p.refused("192.0.2.1") is not None and p.tracked == 1
