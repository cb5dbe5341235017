"""gateway.net.ratelog (one refusal line a second per reason, with a count) and the derived connection cap."""

from __future__ import annotations

import io
import json
import resource

from gateway.logs import make_logger
from gateway.net.listener import default_max_connections
from gateway.net.ratelog import RateLimitedLog
from tests.support.clock import FakeClock


def test_one_line_a_second_per_reason_with_the_count_left_out() -> None:
    """Ten refusals in a second write one line; the next second's line says nine were suppressed; reasons are apart."""
    out = io.StringIO()
    log = make_logger(out, fmt="json", node="n")
    clock = FakeClock()
    rl = RateLimitedLog(clock)
    written = [rl.warning(log, "connection_refused", "max_connections", n=i) for i in range(10)]
    assert written == [True] + [False] * 9
    assert rl.warning(log, "connection_refused", "penalty")
    clock.mono += 1.0
    assert rl.warning(log, "connection_refused", "max_connections")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["reason"], x["suppressed"]) for x in lines] == [("max_connections", 0), ("penalty", 0), ("max_connections", 9)]


def test_default_max_connections_stays_below_the_fd_limit() -> None:
    """Half of what the reserve leaves (each held connection may dial one VM), at least 1, at most 100000."""
    assert default_max_connections(1024) == 480
    assert default_max_connections(65536) == 32736
    assert default_max_connections(10) == 1
    assert default_max_connections(resource.RLIM_INFINITY) == 100_000
    assert 1 <= default_max_connections() < resource.getrlimit(resource.RLIMIT_NOFILE)[0]
