"""The asyncssh receive-path patch is pinned to one asyncssh version.

That it parses exactly as asyncssh does is held end to end: tests/e2e/test_asyncssh_fast.py (asyncssh on both
ends, two ciphers) and every e2e test of the terminating relay (OpenSSH clients, an sshd VM, the patch applied by
`App.start`).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from asyncssh.connection import SSHConnection
from asyncssh.crypto import chacha

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


@pytest.mark.parametrize("size", [0, 1, 31, 63, 64, 65, 127, 1000, 4095, 4096, 4097, 32768])
def test_chacha_packets_are_what_asyncssh_makes_of_them(size: int) -> None:
    """The one-run chacha20-poly1305 of small packets gives asyncssh's ciphertext and tag byte for byte, decrypts
    asyncssh's packets, and refuses a packet whose tag or ciphertext was changed (sizes around the 64-byte block and
    the 4 KiB bound, sequence numbers past 2**32)."""
    assert asyncssh_fast.apply()
    cipher = chacha.ChachaCipher(os.urandom(64))
    for seq in (0, 1, 2**32 + 7):
        nonce = seq.to_bytes(8, "big")
        header, data = os.urandom(4), os.urandom(size)
        ours = cipher.encrypt_and_sign(header, data, nonce)
        assert ours == asyncssh_fast._chacha_orig_encrypt(cipher, header, data, nonce)
        sealed, tag = ours
        assert cipher.verify_and_decrypt(sealed[:4], sealed[4:], nonce, tag) == data
        assert cipher.verify_and_decrypt(sealed[:4], sealed[4:], nonce, bytes([tag[0] ^ 1]) + tag[1:]) is None
        if size:
            flipped = sealed[4:-1] + bytes([sealed[-1] ^ 0x80])
            assert cipher.verify_and_decrypt(sealed[:4], flipped, nonce, tag) is None


def test_a_small_chacha_packet_runs_the_cipher_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncssh runs ChaCha20 three times per packet (length, Poly1305 key, data); patched, a keystroke-sized packet
    runs it twice each way."""
    assert asyncssh_fast.apply()
    runs = [0]
    real = chacha.Cipher

    def counting(*args: Any, **kwargs: Any) -> Any:
        runs[0] += 1
        return real(*args, **kwargs)

    cipher = chacha.ChachaCipher(os.urandom(64))
    nonce = (5).to_bytes(8, "big")
    monkeypatch.setattr(chacha, "Cipher", counting)
    sealed, tag = cipher.encrypt_and_sign(b"\0\0\0\x10", b"k" * 16, nonce)
    assert runs[0] == 2
    runs[0] = 0
    assert cipher.decrypt_header(sealed[:4], nonce) == b"\0\0\0\x10"
    assert cipher.verify_and_decrypt(sealed[:4], sealed[4:], nonce, tag) == b"k" * 16
    assert runs[0] == 2
