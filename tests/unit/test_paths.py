"""Where state and caches go: the checkout's var/ when run from source, XDG folders when
installed, AGENTSTREAM_STATE_DIR above both; nothing is created by asking."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentstream.infra import paths
from agentstream.streams.settings import Settings, SettingsError, agent_modules

REPO = Path(__file__).resolve().parents[2]


def test_a_checkout_keeps_its_state_in_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTSTREAM_STATE_DIR", raising=False)
    assert paths.source_checkout() == REPO
    assert paths.state_home() == REPO / "var"


def test_an_installed_copy_uses_xdg_state_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    site = tmp_path / "site-packages" / "agentstream"
    (site / "infra").mkdir(parents=True)
    monkeypatch.setattr(paths, "PACKAGE_ROOT", site)
    monkeypatch.delenv("AGENTSTREAM_STATE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert paths.source_checkout() is None
    assert paths.state_home() == tmp_path / "home" / ".local" / "state" / "agentstream"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert paths.state_home() == tmp_path / "xdg" / "agentstream"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # invalid per the XDG spec
    assert paths.state_home() == tmp_path / "home" / ".local" / "state" / "agentstream"
    assert not (tmp_path / "home").exists(), "asking for a folder must not create it"
    assert Settings.from_env({}).data_dir == paths.state_home() / "worker"


def test_the_state_dir_variable_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AGENTSTREAM_STATE_DIR", str(tmp_path / "s"))
    assert paths.state_home() == tmp_path / "s"
    assert Settings.from_env({}).data_dir == tmp_path / "s" / "worker"


def test_caches_follow_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paths.cache_home() == tmp_path / "agentstream"


def test_agents_setting_short_names_and_module_paths() -> None:
    assert agent_modules("all") == ["agentstream.agents"]
    assert agent_modules("security, llm,") == [
        "agentstream.agents.security",
        "agentstream.agents.llm",
    ]
    assert agent_modules("bench.passthrough") == ["bench.passthrough"]
    assert agent_modules("") == []


@pytest.mark.parametrize(
    ("value", "told"),
    [
        # the OpenAI Agents SDK's import name: importing it would load the wrong package
        ("agents.security", "write `security`"),
        ("agents", "write `all` or a short name"),
        ("securty", "did you mean 'security'?"),
    ],
)
def test_agents_setting_mistakes_are_told_at_start(value: str, told: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"AGENTSTREAM_AGENTS": value})
    (line,) = info.value.problems
    assert line.startswith(f"AGENTSTREAM_AGENTS={value!r}: ")
    assert told in line
