"""The import arrows point one way (schemas ← streams ← agents), and the generic package
names resolve to this repository (the OpenAI Agents SDK also installs `agents`)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "schemas": {"streams", "agents", "infra", "bench"},
    "streams": {"agents", "bench"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    offenders = []
    for path in sorted((REPO / package).rglob("*.py")):
        bad = _imports(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    assert not offenders, offenders


def test_app_module_never_imports_agents() -> None:
    assert "agents" not in _imports(REPO / "streams" / "app.py")
    assert "agents" in (REPO / "streams" / "app.py").read_text()  # named only for autodiscovery


@pytest.mark.parametrize("name", ["agents", "streams", "schemas"])
def test_generic_package_names_resolve_to_this_repo(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == REPO / name
