"""The two plugins build on the core and never on each other; the core imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ("vllm_dwdp", "vllm_flextensor")


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of ``package`` imports (at any depth of its code)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("vllm_dwdp", {"vllm_flextensor"}),
    ("vllm_flextensor", {"vllm_dwdp"}),
    ("vllm_moe_core", set(PLUGINS)),
])
def test_no_cross_imports(package, forbidden):
    found = {module: sorted(names & forbidden)
             for module, names in imported_packages(package).items() if names & forbidden}
    assert not found, f"{package} must not import {sorted(forbidden)}: {found}"


def test_both_plugins_use_the_core():
    for package in PLUGINS:
        assert any("vllm_moe_core" in names for names in imported_packages(package).values())
