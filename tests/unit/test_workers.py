"""Pure parts of `gateway.workers = N`: the config key, the worker's specification and config, the merged /metrics,
and the hub's request parser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import MAX_WORKERS, parse_config
from gateway.errors import StartupError
from gateway.hub import MAX_ARGS, ProtocolError, _parse
from gateway.metrics_merge import merge
from gateway.workers import HUB_HEARTBEAT, WorkerSpec, worker_config

from .helpers import problem_message, problem_paths, valid_config_data


def test_workers_default_to_the_number_of_cores() -> None:
    """No `gateway.workers`: one worker per core."""
    cfg = parse_config(valid_config_data(), base_dir=Path("/cfg"))
    assert cfg.gateway.workers == min(MAX_WORKERS, os.cpu_count() or 1)


@pytest.mark.parametrize(("value", "want"), [(1, 1), (4, 4), ("auto", min(MAX_WORKERS, os.cpu_count() or 1))])
def test_workers_accepts_a_count_or_auto(value: object, want: int) -> None:
    data = valid_config_data()
    data.setdefault("gateway", {})["workers"] = value
    assert parse_config(data, base_dir=Path("/cfg")).gateway.workers == want


@pytest.mark.parametrize("value", [0, -1, MAX_WORKERS + 1, "two", 1.5, True])
def test_a_bad_workers_value_is_named(value: object) -> None:
    """The problem names the key and the value."""
    data = valid_config_data()
    data.setdefault("gateway", {})["workers"] = value
    assert problem_paths(data) == ["gateway.workers"]
    assert repr(value) in problem_message(data, "gateway.workers")


def spec(index: int = 2, hub: str | None = "unix:///run/x/hub.sock") -> WorkerSpec:
    return WorkerSpec(index=index, count=3, base="gw1", hub=hub, public_fds=(7, 8), control_fds=(9,))


def test_the_spec_goes_through_the_environment_unchanged() -> None:
    s = spec()
    assert WorkerSpec.from_env(s.to_env()) == s
    assert (s.node, s.siblings) == ("gw1.w2", ("gw1.w1", "gw1.w3"))


FOURTH_OF_THREE = '{"index": 4, "count": 3, "base": "g", "hub": null, "public_fds": [], "control_fds": []}'


@pytest.mark.parametrize("raw", ["", "{}", "[1]", FOURTH_OF_THREE])
def test_a_spec_that_no_supervisor_wrote_is_a_startup_error(raw: str) -> None:
    with pytest.raises(StartupError, match="BASTION_WORKER"):
        WorkerSpec.from_env(raw)


def test_a_worker_is_a_cluster_node_on_the_hub_unless_redis_is_named() -> None:
    cfg = parse_config(valid_config_data(), base_dir=Path("/cfg"))
    mine = worker_config(cfg, spec())
    assert mine.gateway.node == "gw1.w2"
    assert mine.cluster is not None and (mine.cluster.redis_url, mine.cluster.heartbeat) == ("unix:///run/x/hub.sock", HUB_HEARTBEAT)
    data = valid_config_data()
    data["cluster"] = {"redis_url": "redis://10.0.0.5:6379/0"}
    clustered = worker_config(parse_config(data, base_dir=Path("/cfg")), spec(hub=None))
    assert clustered.cluster is not None and clustered.cluster.redis_url == "redis://10.0.0.5:6379/0"


def exposition(sessions: float, started: float, dial: list[float], nodes: float) -> bytes:
    reg = CollectorRegistry()
    Gauge("bastion_sessions_active", "open", ["protocol"], registry=reg).labels("ssh").set(sessions)
    Counter("bastion_sessions_started", "started", ["protocol"], registry=reg).labels("ssh").inc(started)
    h = Histogram("bastion_upstream_dial_seconds", "dial", buckets=(0.1, 1.0), registry=reg)
    for v in dial:
        h.observe(v)
    Gauge("bastion_cluster_nodes", "nodes", registry=reg).set(nodes)
    return generate_latest(reg)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_merged_metrics_sum_what_one_process_would_count() -> None:
    """Gauges of sessions, counters and histogram buckets add up; the cluster's view takes the largest value; a text
    that does not parse is left out whole."""
    merged = samples(merge([exposition(2, 5, [0.05], 3), exposition(1, 7, [0.5, 2.0], 3), b"not { metrics"]))
    assert merged[("bastion_sessions_active", (("protocol", "ssh"),))] == 3
    assert merged[("bastion_sessions_started_total", (("protocol", "ssh"),))] == 12
    assert merged[("bastion_upstream_dial_seconds_bucket", (("le", "0.1"),))] == 1
    assert merged[("bastion_upstream_dial_seconds_bucket", (("le", "1.0"),))] == 2
    assert merged[("bastion_upstream_dial_seconds_count", ())] == 3
    assert merged[("bastion_cluster_nodes", ())] == 3
    created = [v for (name, _), v in merged.items() if name.endswith("_created")]
    assert created and all(v < 1e11 for v in created)  # the earliest, not a sum of timestamps


def test_the_hub_parses_pipelined_requests_and_waits_for_the_rest() -> None:
    buf = bytearray(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPI")
    assert _parse(buf) == ([b"GET", b"k"], 20)
    del buf[:20]
    assert _parse(buf) is None  # incomplete: wait for more


@pytest.mark.parametrize(
    "raw",
    [
        b"GET k\r\n",
        b"*0\r\n",
        b"*-1\r\n",
        b"*%d\r\n" % (MAX_ARGS + 1),
        b"*1\r\n:5\r\n",
        b"*1\r\n$-1\r\n",
        b"*1\r\n$3\r\nGETX\r\n",
        b"*" + b"9" * 70,
    ],
)
def test_the_hub_refuses_what_redis_py_never_sends(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        _parse(bytearray(raw))
