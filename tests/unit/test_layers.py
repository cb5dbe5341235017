"""The import direction of DESIGN.md, enforced as an allow-list that covers every module of the package.

`cli -> app -> doors -> protocols/control -> policy/auth/metrics/logs -> net/sessions/config -> errors/clock/kinds`.
Each module may import only the gateway modules its entry allows; a module with no entry fails the test, so a
new module has to say where it sits. Protocol modules never import each other, only the shared lifecycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "gateway"

BOTTOM = ("gateway.errors", "gateway.clock", "gateway.kinds", "gateway.text", "gateway.filemodes")
LOW = (*BOTTOM, "gateway.config")
# Shared by every protocol: the lifecycle and the three SSH helpers. Everything else in protocols/ is one protocol.
SHARED_PROTOCOL = (
    "gateway.protocols.lifecycle",
    "gateway.protocols.upstream_ssh",
    "gateway.protocols.ssh_disconnect",
    "gateway.protocols.asyncssh_options",
)
PROTOCOL_DEPS = (*LOW, "gateway.net", "gateway.sessions", "gateway.policy", "gateway.tokens", *SHARED_PROTOCOL)

# module (or package prefix) -> the gateway modules (or prefixes) it may import. The longest match wins.
ALLOWED: dict[str, tuple[str, ...]] = {
    "gateway": (),
    "gateway.__main__": ("gateway.cli",),
    "gateway.errors": (),
    "gateway.clock": (),
    "gateway.kinds": (),
    "gateway.text": (),
    "gateway.filemodes": ("gateway.errors",),
    "gateway.logs": (),
    "gateway.sdnotify": (),
    "gateway.config": ("gateway.errors", "gateway.kinds", "gateway.text"),
    "gateway.tokens": ("gateway.errors", "gateway.clock", "gateway.filemodes"),
    "gateway.oidc": ("gateway.errors", "gateway.clock", "gateway.config", "gateway.text"),
    "gateway.locks": LOW,
    "gateway.access": (*LOW, "gateway.sessions", "gateway.locks", "gateway.websessions"),
    "gateway.websessions": (*LOW, "gateway.policy"),
    "gateway.net": (*LOW, "gateway.net"),
    "gateway.sessions": (*LOW, "gateway.sessions"),
    "gateway.policy": LOW,
    "gateway.metrics": (*LOW, "gateway.sessions", "gateway"),
    "gateway.metrics_merge": (),
    # What stops the loop (collector pauses, loop lag), on the metrics' registry: beside metrics, never above it.
    "gateway.stalls": ("gateway.clock", "gateway.net.ratelog"),
    "gateway.hub": ("gateway.sdnotify",),
    # The supervisor of several workers: it binds (net), runs the hub and knows a worker's config; never the app.
    "gateway.workers": (*LOW, "gateway.hub", "gateway.net", "gateway.sdnotify"),
    "gateway.protocols.lifecycle": (*LOW, "gateway.net", "gateway.sessions", "gateway.policy"),
    "gateway.protocols.upstream_ssh": (*LOW, "gateway.net", "gateway.protocols.asyncssh_options"),
    "gateway.protocols.asyncssh_options": (),
    "gateway.protocols.ssh_disconnect": (),
    "gateway.protocols.rdg_codec": ("gateway.errors",),
    "gateway.protocols.rdg": (*PROTOCOL_DEPS, "gateway.protocols.rdg_codec"),
    "gateway.protocols": PROTOCOL_DEPS,
    "gateway.control": (*LOW, "gateway.sessions", "gateway.control", "gateway.locks", "gateway.access", "gateway.websessions"),
    "gateway.doors": (*PROTOCOL_DEPS, "gateway.protocols", "gateway.locks", "gateway.websessions", "gateway.userca"),
    "gateway.userca": LOW,
    "gateway.client": ("gateway.client",),
    "gateway.app": (
        *PROTOCOL_DEPS,
        "gateway.protocols",
        "gateway.doors",
        "gateway.control",
        "gateway.metrics",
        "gateway.metrics_merge",
        "gateway.stalls",
        "gateway.workers",
        "gateway.sdnotify",
        "gateway.logs",
        "gateway.locks",
        "gateway.access",
        "gateway.websessions",
        "gateway.oidc",
        "gateway.userca",
    ),
    "gateway.demo": (*LOW, "gateway.app", "gateway.logs", "gateway.net", "gateway.tokens"),
    "gateway.cli": (
        *LOW,
        "gateway",
        "gateway.app",
        "gateway.logs",
        "gateway.sdnotify",
        "gateway.client",
        "gateway.demo",
        "gateway.workers",
    ),
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
            if node.module == "gateway":  # `from gateway import x` may name a submodule
                names.update(f"gateway.{a.name}" for a in node.names if (PKG / f"{a.name}.py").exists() or (PKG / a.name).is_dir())
    return {n for n in names if n == "gateway" or n.startswith("gateway.")}


def _entry(module: str) -> tuple[str, ...] | None:
    best = None
    for prefix in ALLOWED:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None or (best == "gateway" and module != "gateway") else ALLOWED[best]


def _allowed(imported: str, allowed: tuple[str, ...]) -> bool:
    return any(imported == a or (a != "gateway" and imported.startswith(a + ".")) for a in allowed)


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_module_respects_the_import_direction(module: str, path: Path) -> None:
    """Every module imports only what its layer allows (see docs/architecture.md, Layers)."""
    allowed = _entry(module)
    assert allowed is not None, f"{module} has no entry in ALLOWED: say which layer it belongs to"
    bad = sorted(i for i in _imports(path) if i != module and not _allowed(i, allowed))
    assert not bad, f"{module} may not import {bad}"


@pytest.mark.parametrize(("module", "path"), [(m, p) for m, p in _modules() if m.startswith("gateway.protocols.")])
def test_protocols_do_not_import_each_other(module: str, path: Path) -> None:
    """A protocol handler imports only the shared lifecycle modules and its own wire codec (`<protocol>_codec`), never
    another protocol, a door or the control app."""
    own = (module, module + "_codec")
    others = sorted(i for i in _imports(path) if i.startswith("gateway.protocols.") and i not in SHARED_PROTOCOL and i not in own)
    assert not others, f"protocol {module} imports another protocol: {others}"
    assert not any(i.startswith(("gateway.doors", "gateway.control", "gateway.metrics", "gateway.app")) for i in _imports(path))


def test_the_allow_list_has_no_stale_entries() -> None:
    """Every ALLOWED key names a module or package that exists."""
    names = {m for m, _ in _modules()}
    stale = [k for k in ALLOWED if not any(n == k or n.startswith(k + ".") for n in names)]
    assert not stale
