"""Starts of a sign-in per source, on the fake clock: a burst, then refused until the window passes; bounded."""

from __future__ import annotations

from gateway.doors.web import _PerSource
from tests.support.clock import FakeClock


def test_a_source_gets_its_burst_per_window() -> None:
    clock = FakeClock()
    budget = _PerSource(clock, burst=3, window=60)
    assert [budget.allow("192.0.2.1") for _ in range(4)] == [True, True, True, False]
    assert budget.allow("192.0.2.2")  # another source is not affected
    clock.mono += 60
    assert budget.allow("192.0.2.1")


def test_an_ipv6_slash64_is_one_source_and_the_table_is_bounded() -> None:
    budget = _PerSource(FakeClock(), burst=1, window=60, max_sources=2)
    assert budget.allow("2001:db8::1") and not budget.allow("2001:db8::2")
    assert budget.allow("192.0.2.1") and budget.allow("192.0.2.2")
    assert budget.allow("2001:db8::3")  # forgotten (oldest first), so counted afresh
