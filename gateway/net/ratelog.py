"""Rate-limited log lines for refusals a scanner can trigger: at most one a second per reason, with a count.

A flood of refused connections must not become a flood of log lines (Teleport does the same), but the operator
must still see that it happened and how big it was: each line carries `suppressed`, the number of refusals for the
same reason left out since the previous line. Reasons come from closed sets, so the table stays small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from structlog.typing import FilteringBoundLogger

from gateway.clock import Clock, SystemClock

EVERY = 1.0  # seconds between two lines for one reason


class RateLimitedLog:
    """Owns the last-logged time and the skipped count per reason. Not thread-safe (one event loop)."""

    def __init__(self, clock: Clock | None = None, every: float = EVERY) -> None:
        self._clock: Clock = clock or SystemClock()
        self._every = every
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, log: FilteringBoundLogger, event: str, reason: str, **fields: Any) -> bool:
        """Log `event` with `reason`, `suppressed` and `fields` unless one was logged for `reason` less than a second ago.

        Returns True if the line was written.
        """
        return self._line(log.warning, event, reason, fields)

    def info(self, log: FilteringBoundLogger, event: str, reason: str, **fields: Any) -> bool:
        """`warning()` at info level: for what a scanner causes all day (failed handshakes, unknown protocols)."""
        return self._line(log.info, event, reason, fields)

    def _line(self, emit: Callable[..., Any], event: str, reason: str, fields: dict[str, Any]) -> bool:
        now = self._clock.monotonic()
        last, skipped = self._last.get(reason, (None, 0))
        if last is not None and now - last < self._every:
            self._last[reason] = (last, skipped + 1)
            return False
        self._last[reason] = (now, 0)
        emit(event, reason=reason, suppressed=skipped, **fields)
        return True
