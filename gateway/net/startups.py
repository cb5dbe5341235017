"""Who may start an unauthenticated connection now: OpenSSH's MaxStartups and PerSourceMaxStartups, as pure logic.

`max_startups` is `start:rate:full` (or one number N, meaning `N:100:N`): below `start` unauthenticated
connections every new one is let in; from `start` on, each is refused with a probability that grows linearly
from `rate`% to 100% at `full`. `per_source` caps the unauthenticated connections of one source (an IPv4
address, or an IPv6 /64), so one address cannot take every slot. The random draw is injected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from gateway.config import StartupPolicy


def source_key(address: str) -> str:
    """The unit a per-source limit counts: the IPv4 address, or the IPv6 /64 (one host often has a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Startups:
    """Counts unauthenticated connections, globally and per source. Owned by the SSH door."""

    def __init__(self, policy: StartupPolicy, draw: Callable[[], float]) -> None:
        self._policy = policy
        self._draw = draw  # uniform in [0, 1)
        self.total = 0
        self._by_source: dict[str, int] = {}

    def set_policy(self, policy: StartupPolicy) -> None:
        """A reload: the counts stay, the limits change."""
        self._policy = policy

    def admit(self, address: str) -> str | None:
        """Count a new unauthenticated connection, or say why not (a refusal reason slug)."""
        p = self._policy
        key = source_key(address)
        if self._by_source.get(key, 0) >= p.per_source:
            return "per_source_max_startups"
        if self.total >= p.full:
            return "max_startups"
        if self.total >= p.start:
            span = p.full - p.start
            chance = p.rate + (100 - p.rate) * ((self.total - p.start) / span if span else 1.0)
            if self._draw() * 100 < chance:
                return "max_startups"
        self.total += 1
        self._by_source[key] = self._by_source.get(key, 0) + 1
        return None

    def release(self, address: str) -> None:
        """The connection authenticated or ended: free its slot (call once per admitted connection)."""
        key = source_key(address)
        self.total -= 1
        n = self._by_source.get(key, 0) - 1
        if n > 0:
            self._by_source[key] = n
        else:
            self._by_source.pop(key, None)
