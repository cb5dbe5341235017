"""The loop's stalls on the metrics: a real collection is timed by generation, a loop held past STALL_WARN is
measured as lag and logged once (rate-limited), and stopping removes the collector hook."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import time

from prometheus_client import CollectorRegistry

from gateway.clock import SystemClock
from gateway.logs import make_logger
from gateway.stalls import STALL_WARN, TICK, Stalls


def sample(reg: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    value = reg.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def test_collections_and_a_held_loop_are_measured_and_logged() -> None:
    reg, stream = CollectorRegistry(), io.StringIO()
    stalls = Stalls(reg, make_logger(stream, fmt="json"), SystemClock())
    stalls.start()
    try:
        before = sample(reg, "bastion_gc_pause_seconds_count", {"generation": "2"})
        gc.collect()
        assert sample(reg, "bastion_gc_pause_seconds_count", {"generation": "2"}) == before + 1
        assert sample(reg, "bastion_gc_pause_seconds_sum", {"generation": "2"}) > 0

        async def next_tick() -> None:
            stalls.ticked.clear()
            async with asyncio.timeout(5):
                await stalls.ticked.wait()

        await next_tick()  # a tick under way from here on: the next one is what is measured
        time.sleep(STALL_WARN + TICK + 0.1)  # the loop held (the timer waited TICK of it), as by a long collection
        await next_tick()
        held = sample(reg, "bastion_event_loop_lag_seconds_bucket", {"le": "5.0"}) - sample(
            reg, "bastion_event_loop_lag_seconds_bucket", {"le": "0.5"}
        )
        assert held == 1, "the held loop was not measured"
        await next_tick()
        time.sleep(STALL_WARN + TICK + 0.1)  # a second stall within the minute: counted, not logged again
        await next_tick()
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        stalled = [x for x in lines if x["event"] == "event_loop_stalled"]
        assert len(stalled) == 1 and stalled[0]["lag_s"] >= STALL_WARN and stalled[0]["level"] == "warning", lines
    finally:
        await stalls.stop()
    assert all(getattr(cb, "__self__", None) is not stalls for cb in gc.callbacks)
    before = sample(reg, "bastion_gc_pause_seconds_count", {"generation": "2"})
    gc.collect()
    assert sample(reg, "bastion_gc_pause_seconds_count", {"generation": "2"}) == before  # the hook is gone
