"""The import direction of DESIGN.md, enforced: lower layers never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "gateway"
SHARED_PROTOCOL_MODULES = {"gateway.protocols.base", "gateway.protocols.upstream_ssh", "gateway.protocols.ssh_disconnect"}

# module prefix -> prefixes it must not import
FORBIDDEN = {
    "gateway.net": (
        "gateway.doors",
        "gateway.protocols",
        "gateway.app",
        "gateway.cli",
        "gateway.control",
        "gateway.policy",
        "gateway.auth",
    ),
    "gateway.sessions": ("gateway.doors", "gateway.protocols", "gateway.app", "gateway.cli", "gateway.control", "gateway.net"),
    "gateway.config": ("gateway.doors", "gateway.protocols", "gateway.app", "gateway.cli", "gateway.net", "gateway.sessions"),
    "gateway.errors": ("gateway.",),
    "gateway.clock": ("gateway.",),
    "gateway.policy": ("gateway.doors", "gateway.protocols", "gateway.app", "gateway.cli", "gateway.net"),
    "gateway.protocols": ("gateway.doors", "gateway.app", "gateway.cli", "gateway.control", "gateway.metrics"),
    "gateway.doors": ("gateway.app", "gateway.cli", "gateway.control"),
    "gateway.control": ("gateway.protocols", "gateway.doors", "gateway.app", "gateway.cli"),
    "gateway.metrics": ("gateway.protocols", "gateway.doors", "gateway.app", "gateway.cli", "gateway.control"),
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out.append((name, path))
    return out


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_module_respects_the_import_direction(module: str, path: Path) -> None:
    """No module imports a layer above its own (see DESIGN.md, Layout)."""
    imported = _imports(path)
    for prefix, banned in FORBIDDEN.items():
        if module == prefix or module.startswith(prefix + "."):
            bad = sorted(i for i in imported if i.startswith(banned) and i != module)
            assert not bad, f"{module} imports {bad}"
    if module.startswith("gateway.protocols.") and module not in SHARED_PROTOCOL_MODULES:
        others = sorted(i for i in imported if i.startswith("gateway.protocols.") and i not in SHARED_PROTOCOL_MODULES)
        assert not others, f"protocol {module} imports another protocol: {others}"
