"""Per-source penalties, like OpenSSH's PerSourcePenalties, as pure logic (an injected clock, no sockets).

A source (an IPv4 address or an IPv6 /64, see `startups.source_key`) earns a penalty each time one of its
connections misbehaves (`PenaltyEvent`): the event's duration is added to the source's penalty, which is kept as
an expiry time, so it decays in real time and is capped at `max` from now. Once the penalty left exceeds `min`,
the source is refused (at accept, before TLS or SSH cost anything) until the penalty expires. A source in an exempt
network is never penalized. At most `max_sources` sources are tracked; a new one evicts the least recently
penalized (counted, so an operator sees an address-rotating flood pushing the table).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.clock import Clock
from gateway.config import PenaltyPolicy
from gateway.kinds import PenaltyEvent
from gateway.net.startups import source_key


class PenaltyObserver(Protocol):
    """Told about recorded penalties and evictions (metrics implement this)."""

    def penalty_recorded(self, event: PenaltyEvent) -> None: ...

    def penalty_evicted(self) -> None: ...


@dataclass
class _Entry:
    expiry: float  # clock.monotonic() when the penalty is served
    active: bool  # refused until expiry (set once the penalty left exceeded `min`)


class Penalties:
    """Owns the table of penalized sources. Shared by the listener (asks) and the SSH door (reports)."""

    def __init__(self, policy: PenaltyPolicy, clock: Clock, observer: PenaltyObserver | None = None) -> None:
        self._policy = policy
        self._clock = clock
        self._observer = observer
        self._by_source: OrderedDict[str, _Entry] = OrderedDict()  # least recently penalized first
        self.evicted = 0
        # With [cluster]: every event recorded here is shared, so behind a balancer a source's budget is the cluster's.
        self.on_record: Callable[[str, PenaltyEvent], None] | None = None

    def set_policy(self, policy: PenaltyPolicy) -> None:
        """A reload: penalties already earned keep counting down; new events and checks use `policy`."""
        self._policy = policy

    @property
    def tracked(self) -> int:
        """Sources in the table now (some may have expired and not been swept yet)."""
        return len(self._by_source)

    def _exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._policy.exempt)

    def _duration(self, event: PenaltyEvent) -> float:
        p = self._policy
        return {PenaltyEvent.AUTH_FAILURE: p.auth_failure, PenaltyEvent.GRACE_EXCEEDED: p.grace_exceeded, PenaltyEvent.NO_AUTH: p.no_auth}[
            event
        ]

    def record(self, address: str, event: PenaltyEvent) -> None:
        """Add `event`'s penalty to the source of `address` (nothing if disabled, exempt or the duration is 0)."""
        if self._add(address, event) and self.on_record is not None:
            self.on_record(address, event)

    def record_remote(self, address: str, event: PenaltyEvent) -> None:
        """Another node's event for `address` (an IP literal; anything else is ignored): counted here too, not shared again."""
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return
        self._add(address, event)

    def _add(self, address: str, event: PenaltyEvent) -> bool:
        p = self._policy
        seconds = self._duration(event)
        if not p.enabled or seconds <= 0 or self._exempt(address):
            return False
        now = self._clock.monotonic()
        key = source_key(address)
        entry = self._by_source.pop(key, None)
        if entry is None or entry.expiry <= now:
            entry = _Entry(expiry=now, active=False)
        entry.expiry = min(entry.expiry + seconds, now + p.max)
        if entry.expiry - now > p.min:
            entry.active = True
        self._by_source[key] = entry
        if self._observer is not None:
            self._observer.penalty_recorded(event)
        self._bound(now)
        return True

    def _bound(self, now: float) -> None:
        while len(self._by_source) > self._policy.max_sources:
            _, oldest = self._by_source.popitem(last=False)
            if oldest.expiry > now:  # an expired entry is only swept, not a loss
                self.evicted += 1
                if self._observer is not None:
                    self._observer.penalty_evicted()

    def refused(self, address: str) -> float | None:
        """Seconds the source of `address` is still refused for, or None if it may connect."""
        if not self._policy.enabled or not self._by_source:
            return None
        key = source_key(address)
        entry = self._by_source.get(key)
        if entry is None:
            return None
        left = entry.expiry - self._clock.monotonic()
        if left <= 0:
            del self._by_source[key]
            return None
        return left if entry.active else None
