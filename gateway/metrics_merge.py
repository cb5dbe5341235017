"""One `/metrics` for several worker processes: their expositions merged into one.

Counters, histograms and most gauges are sums over the workers (sessions open, bytes relayed, refusals: what
one process would have counted). A few gauges describe the shared view or a clock, where a sum would be wrong:
those take the largest value (`MAX_GAUGES`); `*_created` and `process_start_time_seconds` take the earliest.
A series only some workers export is summed over those that do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# The cluster's view is the same from every worker; the heartbeat age and the degraded flag are each worker's own.
MAX_GAUGES = frozenset({
    "bastion_cluster_nodes", "bastion_cluster_sessions", "bastion_cluster_heartbeat_age_seconds", "bastion_cluster_degraded",
    "bastion_build_info",
})  # fmt: skip
_EARLIEST = ("_created",)


def _combine(name: str, family: str, old: float, new: float) -> float:
    if name.endswith(_EARLIEST) or name == "process_start_time_seconds":
        return min(old, new)
    if family in MAX_GAUGES:
        return max(old, new)
    return old + new


def merge(texts: Iterable[bytes], extra: Iterable[Metric] = ()) -> bytes:
    """The merged exposition (text format 0.0.4) of `texts`, plus `extra` families. A text that does not parse is
    skipped whole (never half-counted)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        try:
            parsed = list(text_string_to_metric_families(text.decode()))
        except (ValueError, UnicodeDecodeError):
            continue
        for fam in parsed:
            families.setdefault(fam.name, fam)
            slot = values.setdefault(fam.name, {})
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                slot[key] = _combine(s.name, fam.name, slot[key], s.value) if key in slot else s.value

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            for name, fam in families.items():
                out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                out.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]
                yield out
            yield from extra

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
