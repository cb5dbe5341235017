"""What a hostile test measures on the side: this process's fds and memory, and a legitimate login's time."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.e2e.conftest import Gateway


def fd_count() -> int:
    """Open file descriptors of this process (the gateway runs in it)."""
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def legit_login_seconds(gw: Gateway, user: str = "alice+web01", timeout: float = 30.0) -> float:
    """Time for a real `ssh USER@gw true` through the gateway; asserts it succeeded."""
    t0 = time.monotonic()
    r = await gw.ssh(user, "true", timeout=timeout)
    took = time.monotonic() - t0
    assert r.rc == 0, r.errtext
    return took
