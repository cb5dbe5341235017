"""gateway.net.startups: MaxStartups with random early drop and a per-source cap, with an injected random draw."""

from __future__ import annotations

import pytest

from gateway.config import StartupPolicy
from gateway.net.startups import Startups, source_key


def test_a_plain_number_is_a_hard_cap() -> None:
    """max_startups = 3: three are let in, the fourth is refused whatever the draw."""
    s = Startups(StartupPolicy.parse(3, per_source=100), draw=lambda: 0.999)
    assert [s.admit(f"10.0.0.{i}") for i in range(3)] == [None, None, None]
    assert s.admit("10.0.0.9") == "max_startups"


def test_early_drop_grows_from_rate_to_full() -> None:
    """10:30:20 admits everyone below 10, refuses 30% at 10 rising to 100% at 20 (a draw of 0.5 is refused at 50%+)."""
    s = Startups(StartupPolicy.parse("10:30:20", per_source=100), draw=lambda: 0.5)
    admitted = [s.admit(f"10.0.{i}.1") is None for i in range(30)]
    # at 10..13 the refusal chance is 30, 37, 44, 51%: a draw of 50 passes three times, then every draw fails
    assert admitted.count(True) == 13 and admitted[:13] == [True] * 13
    low = Startups(StartupPolicy.parse("10:30:20", per_source=100), draw=lambda: 0.0)
    assert sum(low.admit(f"10.1.{i}.1") is None for i in range(30)) == 10  # a draw of 0 is always below the chance


def test_one_source_cannot_take_every_slot() -> None:
    """per_source 2: a third connection from the same address is refused while others still get in."""
    s = Startups(StartupPolicy.parse(100, per_source=2), draw=lambda: 0.0)
    assert [s.admit("192.0.2.7") for _ in range(3)] == [None, None, "per_source_max_startups"]
    assert s.admit("192.0.2.8") is None
    s.release("192.0.2.7")
    assert s.admit("192.0.2.7") is None


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    """A host with a whole /64 is one source; ::ffff:1.2.3.4 is 1.2.3.4."""
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"


@pytest.mark.parametrize("spec", ["0", "10:0:20", "10:101:20", "20:30:10", "a:b:c", "10:30", ""])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match=r"expected|need"):
        StartupPolicy.parse(spec, per_source=10)
