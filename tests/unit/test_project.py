"""The project's own files: the licence matches pyproject, the version has one home, types ship, the
changelog and the contributing guide say what they must."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import gateway

ROOT = Path(__file__).resolve().parents[2]


def test_licence_file_matches_pyproject() -> None:
    """pyproject says Apache-2.0 and ships LICENSE; LICENSE is the Apache License 2.0 text."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_the_version_lives_in_one_place() -> None:
    """pyproject takes the version from gateway.__version__; the installed metadata and the changelog agree."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in data["project"] and "version" in data["project"]["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gateway.__version__"}
    assert importlib.metadata.version("bastion-gateway") == gateway.__version__
    assert f"## {gateway.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_the_package_says_it_is_typed() -> None:
    """PEP 561: gateway/py.typed exists and is package data."""
    assert (ROOT / "gateway" / "py.typed").exists()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in data["tool"]["setuptools"]["package-data"]["gateway"]


def test_contributing_names_the_commands_that_exist() -> None:
    """CONTRIBUTING.md's make targets are the Makefile's."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("test-fast", "test", "demo", "bench"):
        assert f"make {target}" in text and f"\n{target}:" in makefile
