"""Prometheus metrics on the gateway's own CollectorRegistry.

Gauges and byte counters are computed from the session registry at scrape
time, so they cannot drift from it. Label values come only from closed sets
(protocol, reason slugs, auth method, direction) and the inventory (VM names);
never from what a client typed.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Protocol as TypingProtocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.kinds import PenaltyEvent, Protocol, Reason, Refusal
from gateway.sessions.model import SessionInfo
from gateway.sessions.registry import SessionRegistry

PROTOCOLS = tuple(p.value for p in Protocol)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LISTENERS = ("public", "control")


class _RegistryCollector(Collector):
    def __init__(self, sessions: SessionRegistry, vms: Iterable[str]) -> None:
        self._sessions = sessions
        self._vms = tuple(vms)

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily("bastion_sessions_active", "Sessions relaying now, by protocol and VM.", labels=["protocol", "vm"])
        counts: dict[tuple[str, str], int] = {(p, vm): 0 for p in PROTOCOLS for vm in self._vms}
        for (kind, vm), n in self._sessions.counts().items():  # no snapshot per session on every scrape
            counts[(str(kind), vm)] = n
        for (protocol, vm), n in sorted(counts.items()):
            active.add_metric([protocol, vm], n)
        yield active
        relayed = CounterMetricFamily(
            "bastion_relayed_bytes", "Bytes relayed, by protocol and direction (up: user to VM).", labels=["protocol", "direction"]
        )
        totals = self._sessions.bytes_by_protocol()
        for protocol in PROTOCOLS:
            for direction in ("up", "down"):
                relayed.add_metric([protocol, direction], totals.get((protocol, direction), 0))
        yield relayed

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def set_vms(self, vms: tuple[str, ...]) -> None:
        self._vms = vms


class ClusterStats(TypingProtocol):
    """What the metrics read of the cluster (gateway.sessions.cluster.RedisCluster)."""

    degraded: bool
    failures: int
    cluster_nodes: int
    cluster_sessions: int
    nodes_lost: int
    sessions_lost: int

    def heartbeat_age(self) -> float | None: ...


class _CounterFn(Collector):
    """A counter whose value its owner keeps (read at scrape time)."""

    def __init__(self, name: str, doc: str, value: Callable[[], int]) -> None:
        self._name, self._doc, self._value = name, doc, value

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._doc, value=self._value())

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _count_of(counts: Callable[[], dict[str, int]], key: str) -> int:
    return counts().get(key, 0)


class Metrics:
    """Owns the CollectorRegistry. Implements the session and upstream observer protocols."""

    def __init__(self, sessions: SessionRegistry, vms: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        vm_names = tuple(vms)
        self._vms = set(vm_names)
        self._collector: _RegistryCollector | None = None
        reg = self.registry
        ProcessCollector(registry=reg)
        self._collector = _RegistryCollector(sessions, vm_names)
        reg.register(self._collector)
        build = Gauge("bastion_build_info", "Build information; the value is always 1.", ["version", "python"], registry=reg)
        build.labels(__version__, platform.python_version()).set(1)
        self.started = Counter("bastion_sessions_started", "Sessions started, by protocol.", ["protocol"], registry=reg)
        self.ended = Counter("bastion_sessions_ended", "Sessions ended, by protocol and reason.", ["protocol", "reason"], registry=reg)
        self.duration = Histogram(
            "bastion_session_duration_seconds",
            "How long sessions lasted, by protocol.",
            ["protocol"],
            buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600),
            registry=reg,
        )
        self.auth_failures = Counter(
            "bastion_auth_failures", "Failed authentication attempts, by method and reason.", ["method", "reason"], registry=reg
        )
        self.refusals = Counter("bastion_refusals", "Requests refused after authentication, by reason.", ["reason"], registry=reg)
        self.forced = Counter("bastion_forced_disconnects", "Sessions ended by an operator.", registry=reg)
        self.dial_seconds = Histogram(
            "bastion_upstream_dial_seconds",
            "Time to reach a VM (TCP connect, and for terminating SSH the handshake and login), by VM.",
            ["vm"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=reg,
        )
        self.dial_failures = Counter(
            "bastion_upstream_dial_failures", "Failures to reach a VM, by VM and reason.", ["vm", "reason"], registry=reg
        )
        for p in PROTOCOLS:
            self.started.labels(p)
        self.connections_refused = Counter(
            "bastion_connections_refused",
            "Connections closed before any protocol ran, by listener and reason (caps, penalties, TLS handshakes, SSH version).",
            ["listener", "reason"],
            registry=reg,
        )
        self.connections_held = Gauge(
            "bastion_connections_held", "Connections a listener holds now (accepted, until their door is done).", ["listener"], registry=reg
        )
        self.penalties = Counter("bastion_penalties", "Penalties recorded against a source, by event.", ["event"], registry=reg)
        self.penalty_evictions = Counter(
            "bastion_penalty_evictions", "Penalized sources dropped from the table to keep it within penalties.max_sources.", registry=reg
        )
        self.penalty_sources = Gauge("bastion_penalty_sources", "Sources in the penalty table now.", registry=reg)
        for listener in LISTENERS:
            for refusal in Refusal:
                self.connections_refused.labels(listener, refusal.value)
        for event in PenaltyEvent:
            self.penalties.labels(event.value)

    # -- gauges read from their owners at scrape time --
    def watch_listener(self, listener: str, held: Callable[[], int]) -> None:
        """`held()` is the listener's live count (a name from LISTENERS)."""
        self.connections_held.labels(listener).set_function(held)

    def watch_penalties(self, tracked: Callable[[], int]) -> None:
        self.penalty_sources.set_function(tracked)

    def watch_connections(self, counts: Callable[[], dict[str, int]]) -> None:
        """`counts()` is the authenticated connections by door ("ssh", "websocket")."""
        gauge = Gauge(
            "bastion_connections_authenticated", "Authenticated client connections now, by door.", ["door"], registry=self.registry
        )
        for door in ("ssh", "websocket"):
            gauge.labels(door).set_function(partial(_count_of, counts, door))

    def watch_cluster(self, cluster: ClusterStats) -> None:
        """With [cluster]: Redis reachable or not, the cluster's size as this node last saw it, lost nodes. No node label:
        the per-node detail is in the control API's /v1/cluster, and each node exports its own series."""
        r = self.registry
        Gauge("bastion_cluster_degraded", "1 while Redis is unreachable: this node shows only its own sessions.", registry=r).set_function(
            lambda: 1.0 if cluster.degraded else 0.0
        )
        r.register(_CounterFn("bastion_cluster_redis_errors", "Redis calls that failed or timed out.", lambda: cluster.failures))
        Gauge("bastion_cluster_nodes", "Nodes with a live heartbeat, this one included (at the last heartbeat).", registry=r).set_function(
            lambda: cluster.cluster_nodes
        )
        Gauge("bastion_cluster_sessions", "Sessions on every node (at the last heartbeat).", registry=r).set_function(
            lambda: cluster.cluster_sessions
        )
        lost_nodes, lost_sessions = "Nodes whose heartbeat expired without a clean stop.", "Sessions of lost nodes, closed as node_lost."
        r.register(_CounterFn("bastion_cluster_nodes_lost", lost_nodes, lambda: cluster.nodes_lost))
        r.register(_CounterFn("bastion_cluster_sessions_lost", lost_sessions, lambda: cluster.sessions_lost))
        Gauge(
            "bastion_cluster_heartbeat_age_seconds", "Seconds since Redis last took this node's heartbeat (-1: never).", registry=r
        ).set_function(partial(_age_or_never, cluster))

    def set_vms(self, vms: Iterable[str]) -> None:
        """A reload: VM labels follow the inventory (labels of VMs gone stay until the restart, as counters must)."""
        names = tuple(vms)
        self._vms = set(names)
        if self._collector is not None:
            self._collector.set_vms(names)

    # -- ConnectionObserver, PenaltyObserver --
    def connection_refused(self, listener: str, reason: Refusal) -> None:
        if listener in LISTENERS:
            self.connections_refused.labels(listener, reason.value).inc()

    def penalty_recorded(self, event: PenaltyEvent) -> None:
        self.penalties.labels(event.value).inc()

    def penalty_evicted(self) -> None:
        self.penalty_evictions.inc()

    # -- SessionObserver --
    def session_opened(self, info: SessionInfo) -> None:
        self.started.labels(info.protocol).inc()

    def session_closed(self, info: SessionInfo, reason: str, duration_s: float) -> None:
        self.ended.labels(info.protocol, reason).inc()
        self.duration.labels(info.protocol).observe(duration_s)
        if reason == Reason.TERMINATED_BY_OPERATOR:
            self.forced.inc()

    # -- UpstreamObserver --
    def dial_succeeded(self, vm: str, seconds: float) -> None:
        if vm in self._vms:
            self.dial_seconds.labels(vm).observe(seconds)

    def dial_failed(self, vm: str, reason: str) -> None:
        if vm in self._vms:
            self.dial_failures.labels(vm, reason).inc()

    # -- door events --
    def auth_failed(self, method: str, reason: str) -> None:
        self.auth_failures.labels(method, reason).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _age_or_never(cluster: ClusterStats) -> float:
    age = cluster.heartbeat_age()
    return -1.0 if age is None else age
