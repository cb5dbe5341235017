"""The STATE column of `bastion sessions`: a pending disconnect counts down on the operator's clock."""

from __future__ import annotations

import datetime as dt

from gateway.cli import session_state

NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def test_a_pending_disconnect_counts_down() -> None:
    """A session ending 12 s (and 90.2 s) from now reads `terminating in 12s` (`terminating in 1m31s`)."""
    assert session_state({"state": "terminating", "ends_at": "2025-01-02T03:04:17Z"}, NOW) == "terminating in 12s"
    assert session_state({"state": "terminating", "ends_at": "2025-01-02T03:05:35.200Z"}, NOW) == "terminating in 1m31s"


def test_a_due_or_unreadable_end_reads_terminating_and_an_active_one_active() -> None:
    """An end time already past, or one that does not parse, says only `terminating`; no end time is the state."""
    assert session_state({"state": "terminating", "ends_at": "2025-01-02T03:04:05.500Z"}, NOW) == "terminating"
    assert session_state({"state": "terminating", "ends_at": "soon"}, NOW) == "terminating"
    assert session_state({"state": "active", "ends_at": None}, NOW) == "active"
