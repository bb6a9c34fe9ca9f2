"""SystemMonitor (real psutil, real directories), cached walks, and health aggregation."""

from __future__ import annotations

import os
from pathlib import Path

from agentstream.agents.health.status import Component, HealthTracker, lag_status, overall
from agentstream.agents.system.monitor import (
    SystemMonitor,
    dependencies_dir,
    dir_size,
    memory_usage,
)
from agentstream.schemas import Event, SystemStats, encode, registry


def test_dir_size_counts_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "b").write_bytes(b"y" * 2345)
    os.symlink(tmp_path / "a", tmp_path / "link")  # not followed, not counted twice
    assert dir_size(tmp_path) == 3345
    assert dir_size(tmp_path / "missing") == 0


def test_memory_figures_are_consistent() -> None:
    before = memory_usage()
    blob = bytearray(64 * 1024 * 1024)  # 64 MiB on the heap (mmapped by malloc)
    after = memory_usage()
    assert after.rss > 0 and after.heap_total >= after.heap_used > 0
    assert after.heap_used - before.heap_used >= 60 * 1024 * 1024
    del blob


def test_sample_and_cache(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "w.log").write_bytes(b"z" * 500)
    walks: list[Path] = []
    now = [1000.0]

    def sizer(p: Path) -> int:
        walks.append(p)
        return dir_size(p)

    mon = SystemMonitor(
        worker_id="w1",
        logs_dir=logs,
        project_root=tmp_path,
        dependencies=tmp_path / "deps",
        cache_s=60,
        clock=lambda: now[0],
        sizer=sizer,
    )
    s1 = mon.sample()
    assert s1.disk_usage.logs == 500 and s1.disk_usage.dependencies == 0
    assert s1.disk_usage.total == 500
    assert s1.timestamp == 1000.0 and s1.worker_id == "w1"
    n = len(walks)
    now[0] += 10
    (logs / "w.log").write_bytes(b"z" * 700)
    s2 = mon.sample()
    assert len(walks) == n and s2.disk_usage.logs == 500  # cached
    now[0] += 61
    assert mon.sample().disk_usage.logs == 700
    assert mon.latest is not None
    # what goes on the wire decodes back to the same model
    ev = Event.of(s2, source="t")
    assert registry.decode(encode(ev)).payload == s2
    assert isinstance(registry.decode(encode(ev)).payload, SystemStats)


def test_dependencies_dir_is_this_interpreters_site_packages() -> None:
    import pydantic

    assert Path(pydantic.__file__).resolve().is_relative_to(dependencies_dir().resolve())


def test_health_aggregation_and_transitions() -> None:
    assert overall([Component("a", "ok"), Component("b", "degraded")]) == "degraded"
    assert overall([Component("a", "down"), Component("b", "degraded")]) == "down"
    assert lag_status({"t:0": 5, "t:1": 20}, 10).status == "down"
    assert lag_status({"t:0": 5}, 10).status == "ok"
    t = HealthTracker("w")
    assert t.observe(Component("broker", "ok")) is None  # startup is not news
    ch = t.observe(Component("broker", "down", "refused"))
    assert ch is not None and (ch.previous, ch.current, ch.detail) == ("ok", "down", "refused")
    assert t.observe(Component("broker", "down")) is None
    back = t.observe(Component("broker", "ok"))
    assert back is not None and back.current == "ok"
    first_bad = t.observe(Component("llm:x", "degraded"))
    assert first_bad is not None and first_bad.previous is None
