"""A worker's start against topics that keep the producer's clock: the monitoring tables
bound themselves by their sources' append time, so a producer's time there is refused
(one line, exit 2); on other topics, or where configs cannot be read, it is a warning."""

from __future__ import annotations

from typing import Any

import pytest

import agentstream.streams.admin as admin
from agentstream.streams.admin import ensure_topics
from agentstream.streams.settings import Settings, SettingsError
from agentstream.streams.topics import AGENT_HEARTBEATS, AGENT_MESSAGES, CATALOGUE

#: what the worker passes (`monitoring_clock_topics`)
MONITORING_SOURCES = ("agent.heartbeats", "metrics.samples", "comms.records")


class FakeAdmin:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    async def list_topics(self) -> list[str]:
        return self.names

    async def close(self) -> None:
        return None


def world(monkeypatch: pytest.MonkeyPatch, types: dict[str, str | None]) -> Settings:
    settings = Settings()
    full = [settings.topic(n) for n in CATALOGUE]

    async def fake_admin(*_a: Any, **_k: Any) -> FakeAdmin:
        return FakeAdmin(full)

    async def nothing(*_a: Any, **_k: Any) -> list[str]:
        return []

    async def kinds(_admin: Any, names: list[str]) -> dict[str, str | None]:
        return {n: types.get(n, "LogAppendTime") for n in names}

    monkeypatch.setattr(admin, "_admin", fake_admin)
    monkeypatch.setattr(admin, "_partition_mismatches", nothing)
    monkeypatch.setattr(admin, "_wait_visible", nothing)
    monkeypatch.setattr(admin, "_timestamp_types", kinds)
    return settings


async def test_a_monitoring_source_with_the_producers_clock_stops_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings()
    world(monkeypatch, {settings.topic(AGENT_HEARTBEATS): "CreateTime"})
    with pytest.raises(SettingsError) as got:
        await ensure_topics(settings, check_partitions=True, broker_clock_needed=MONITORING_SOURCES)
    (line,) = got.value.problems
    assert settings.topic(AGENT_HEARTBEATS) in line and "LogAppendTime" in line


async def test_other_topics_and_unreadable_configs_are_only_warned_about(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings()
    world(
        monkeypatch,
        {settings.topic(AGENT_MESSAGES): "CreateTime", settings.topic(AGENT_HEARTBEATS): None},
    )
    warned: list[str] = []
    await ensure_topics(
        settings,
        check_partitions=True,
        warn=warned.append,
        broker_clock_needed=MONITORING_SOURCES,
    )
    assert len(warned) == 1 and settings.topic(AGENT_MESSAGES) in warned[0]


def test_the_worker_refuses_for_the_monitoring_sources() -> None:
    from agentstream.streams.admin import monitoring_clock_topics

    assert monitoring_clock_topics() == MONITORING_SOURCES
