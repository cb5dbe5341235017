"""The tunnel and rdp helpers fetch their tokens over SSH with the `bastion login` certificate when there is one."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.cli import _identity_args


def test_an_explicit_identity_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert _identity_args(argparse.Namespace(identity="/keys/mine")) == ["-i", "/keys/mine"]


def test_the_login_certificate_is_used_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert _identity_args(argparse.Namespace(identity=None)) == []  # no login yet: ssh's own keys and agent
    d = tmp_path / "bastion"
    d.mkdir()
    (d / "id_ed25519").write_text("key")
    (d / "id_ed25519-cert.pub").write_text("cert")
    assert _identity_args(argparse.Namespace(identity=None)) == [
        "-i",
        str(d / "id_ed25519"),
        "-o",
        f"CertificateFile={d / 'id_ed25519-cert.pub'}",
    ]
