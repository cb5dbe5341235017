"""The one fake clock of the test suite: monotonic time moves only when a test says so.

`sleep()` parks the caller until `advance()` moves time past its deadline, so
grace periods, idle and duration limits and the progress ticker are tested
without real waits. `advance()` lets the woken tasks run before it returns.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

START = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


class FakeClock:
    def __init__(self, wall: datetime = START, mono: float = 1000.0) -> None:
        self._wall0 = wall
        self._mono0 = mono
        self.mono = mono
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._wall0 + timedelta(seconds=self.mono - self._mono0)

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.mono + max(0.0, seconds), next(self._seq), fut))
        await fut

    def call_later(self, seconds: float, callback: Callable[[], object]) -> asyncio.Future[None]:
        """A sleeper that calls `callback` when `advance()` passes its deadline; `cancel()` it to drop it."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: None if f.cancelled() else callback())
        heapq.heappush(self._sleepers, (self.mono + max(0.0, seconds), next(self._seq), fut))
        return fut

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def settle(self, rounds: int = 20) -> None:
        """Let ready tasks run (each round is one pass of the event loop)."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline passed, in deadline order."""
        target = self.mono + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            self.mono = max(self.mono, when)
            if not fut.done():
                fut.set_result(None)
            await self.settle()
        self.mono = target
        await self.settle()
