"""What stops the event loop, measured: the collector's pauses and the loop's lateness.

One Python process serves every connection on one loop, so anything that holds it (a full garbage collection of
a million objects, a long stretch of work) stops every relay, handshake and deadline at once; at scale that is the
first thing an operator needs to see. `Stalls` puts both on the gateway's metrics:

- `bastion_gc_pause_seconds{generation}`: how long each collection held the process (a `gc.callbacks` hook: two
  clock reads per collection);
- `bastion_event_loop_lag_seconds`: how late a 250 ms timer fires (four wake-ups a second);

and logs `event_loop_stalled` (lag, the collector's share of it) when the loop was held for `STALL_WARN` or more,
at most once a minute with the count of stalls left out. Started and stopped by the App (a process may run
several in its tests: each removes its own hook).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from structlog.typing import FilteringBoundLogger

from gateway.clock import Clock
from gateway.net.ratelog import RateLimitedLog

TICK = 0.25  # seconds between two looks at the loop
STALL_WARN = 0.5  # a loop held this long is logged
_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Stalls:
    def __init__(self, registry: CollectorRegistry, log: FilteringBoundLogger, clock: Clock) -> None:
        self._log = log
        self._ratelog = RateLimitedLog(clock, every=60.0)
        pauses = Histogram(
            "bastion_gc_pause_seconds", "Garbage collections, by generation, and how long each held the process.", ["generation"],
            buckets=_BUCKETS, registry=registry,
        )  # fmt: skip
        self._pauses = [pauses.labels(str(g)) for g in range(3)]  # a child per generation: no labels() per collection
        self._lag = Histogram(
            "bastion_event_loop_lag_seconds", f"How late the event loop ran a {TICK:g} s timer.", buckets=_BUCKETS, registry=registry
        )
        self._since = 0.0
        self._collecting = 0.0  # seconds the collector held the process since the last tick
        self._task: asyncio.Task[None] | None = None
        self.ticked = asyncio.Event()  # set after every look at the loop (whoever waits clears it first)

    def __repr__(self) -> str:
        return f"Stalls(running={self._task is not None})"

    def start(self) -> None:
        gc.callbacks.append(self._gc)
        self._task = asyncio.create_task(self._watch(), name="stalls")

    async def stop(self) -> None:
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._since = time.perf_counter()
            return
        took = time.perf_counter() - self._since
        self._collecting += took
        generation = info.get("generation", 0)
        self._pauses[generation if generation in (0, 1, 2) else 0].observe(took)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            self._collecting = 0.0
            await asyncio.sleep(TICK)
            lag = max(0.0, loop.time() - before - TICK)
            self._lag.observe(lag)
            if lag >= STALL_WARN:
                self._ratelog.warning(self._log, "event_loop_stalled", "stall", lag_s=round(lag, 3), collector_s=round(self._collecting, 3))
            self.ticked.set()
