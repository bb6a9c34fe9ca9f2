"""The import arrows point one way (schemas ← streams ← agents), and everything of ours
is imported under the one top-level name `agentstream` (the OpenAI Agents SDK installs
`agents`; a bare `import agents` would load theirs, or ours twice under two names)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from agentstream.streams.settings import BUILTIN_AGENTS

REPO = Path(__file__).resolve().parents[2]
OURS = {"schemas", "streams", "agents", "infra"}

FORBIDDEN = {
    "schemas": {"streams", "agents", "infra", "bench"},
    "streams": {"agents", "bench"},
}


def _imports(path: Path) -> set[str]:
    """The packages of ours `path` imports: `x` for `agentstream.x...`, `bench` for bench."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    modules: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
    for module in modules:
        parts = module.split(".")
        if parts[0] == "agentstream" and len(parts) > 1:
            names.add(parts[1])
        elif parts[0] == "bench":
            names.add("bench")
    return names


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    offenders = []
    for path in sorted((REPO / package).rglob("*.py")):
        bad = _imports(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    assert not offenders, offenders


@pytest.mark.parametrize("folder", ["schemas", "streams", "agents", "infra", "bench", "tests"])
def test_our_packages_are_imported_only_as_agentstream(folder: str) -> None:
    offenders = [
        f"{path.relative_to(REPO)} imports {sorted(bad)}"
        for path in sorted((REPO / folder).rglob("*.py"))
        if (bad := _top_level_imports(path) & OURS)
    ]
    assert not offenders, offenders


def test_app_module_never_imports_agents() -> None:
    app = REPO / "streams" / "app.py"
    assert "agents" not in _imports(app)
    # the agents are named only through the setting Faust's autodiscovery reads
    assert "autodiscover=settings.agent_modules" in app.read_text()


@pytest.mark.parametrize("name", ["agents", "streams", "schemas", "infra"])
def test_subpackages_resolve_to_the_repository_folders(name: str) -> None:
    module = importlib.import_module(f"agentstream.{name}")
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == REPO / name


def test_builtin_agent_names_are_the_agent_subpackages() -> None:
    on_disk = {p.parent.name for p in (REPO / "agents").glob("*/__init__.py")}
    assert set(BUILTIN_AGENTS) == on_disk
