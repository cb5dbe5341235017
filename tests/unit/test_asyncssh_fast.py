"""The asyncssh receive-path patch is pinned to one asyncssh version.

That it parses exactly as asyncssh does is held end to end: tests/e2e/test_asyncssh_fast.py (asyncssh on both
ends, two ciphers) and every e2e test of the terminating relay (OpenSSH clients, an sshd VM, the patch applied by
`App.start`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import asyncssh
from asyncssh.connection import SSHConnection

from gateway.protocols import asyncssh_fast

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_pins_the_asyncssh_the_patch_was_written_for() -> None:
    """Moving the asyncssh pin fails here until the patch is re-read against the new version and PINNED follows."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split(";")[0].strip() for d in deps if d.startswith("asyncssh")]
    assert pins == [f"asyncssh=={asyncssh_fast.PINNED}"]
    assert asyncssh.__version__ == asyncssh_fast.PINNED


def test_another_version_is_left_alone() -> None:
    """On any asyncssh but the pinned one, apply() changes nothing and says so."""
    before = SSHConnection.__dict__.get("_recv_data")
    assert asyncssh_fast.apply(version="2.25.0") is False
    assert SSHConnection.__dict__.get("_recv_data") is before


def test_apply_patches_once() -> None:
    """apply() replaces the three receive methods and is idempotent."""
    assert asyncssh_fast.apply() is True
    patched = SSHConnection.__dict__["_recv_packet"]
    assert asyncssh_fast.apply() is True
    assert asyncssh_fast.applied()
    assert SSHConnection.__dict__["_recv_packet"] is patched


def test_padding_bytes_are_random_and_never_reused() -> None:
    """Send-side padding comes from a pooled os.urandom buffer: consecutive takes are fresh bytes, across refills."""
    pad = asyncssh_fast._Padding()
    taken = b"".join(pad.take(n) for n in [4, 19, 255, 4, 7] * 200)
    assert len(taken) == 289 * 200
    chunks = {taken[i : i + 16] for i in range(0, len(taken) - 16, 16)}
    assert len(chunks) == len(taken) // 16  # 16 random bytes repeating would mean reuse
