"""What a worker exports from the metrics table on its own `/metrics`: at most
`metrics_export_max_series` series and label sets, the rest counted; and the console,
sampling every two seconds, never scans the table at all."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import agentstream.agents.health.console as health_console
import agentstream.agents.metrics.agent as metrics_agent
from agentstream.agents.health import views as health_views
from agentstream.agents.metrics.windows import exported_series
from agentstream.streams.tables.monitoring import fold_sample

INTERVAL, RETENTION = 10.0, 3600.0


def table(label_sets: int, now: float) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for i in range(label_sets):
        fold_sample(
            state,
            "cpu",
            {"host": f"h{i:04d}"},
            now - 1,
            float(i),
            interval_s=INTERVAL,
            retention_s=RETENTION,
        )
    return state


def test_exported_series_are_the_first_ones_and_the_rest_are_counted() -> None:
    now = time.time()
    state = table(5, now)
    # one more, past the retention by the wall clock: neither exported nor counted
    old = now - 2 * RETENTION
    fold_sample(state, "cpu", {"host": "old"}, old, 1.0, interval_s=INTERVAL, retention_s=RETENTION)
    rows, dropped = exported_series(state.items(), now=now, retention_s=RETENTION, limit=2)
    assert rows == [
        ("cpu", '{"host":"h0000"}', 0.0),
        ("cpu", '{"host":"h0001"}', 1.0),
    ]
    assert dropped == 3
    rows, dropped = exported_series(state.items(), now=now, retention_s=RETENTION, limit=10)
    assert len(rows) == 5 and dropped == 0


def _samples(families: list[Any], name: str) -> list[Any]:
    return [s for f in families if f.name == name for s in f.samples]


def test_the_worker_exports_at_most_the_configured_number_of_label_sets(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a producer inventing label sets: each was a series of the worker's own /metrics
    monkeypatch.setattr(metrics_agent, "writer", table(2500, time.time()))
    monkeypatch.setattr(
        metrics_agent,
        "settings",
        metrics_agent.settings.model_copy(update={"metrics_export_max_series": 100}),
    )
    collector = metrics_agent.SeriesCollector()
    with caplog.at_level(logging.WARNING):
        families = list(collector.collect())
        list(collector.collect())
    assert len(_samples(families, "agentstream_series_last_value")) == 100
    assert [s.value for s in _samples(families, "agentstream_series_export_dropped")] == [2400]
    warned = [r for r in caplog.records if "MAX_SERIES" in r.getMessage()]
    assert len(warned) == 1  # once, not at every scrape


class TableScan(Collector):
    """Stands for `SeriesCollector`: counts the scans."""

    def __init__(self) -> None:
        self.scans = 0

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("agentstream_series_last_value", "x", labels=["series"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.scans += 1
        yield from self.describe()


def test_the_console_reads_its_counters_without_scanning_tables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry(auto_describe=True)
    events_in = Counter("agentstream_events_in_total", "in", ["consumer"], registry=registry)
    events_in.labels("collect_metrics").inc(7)
    scan = TableScan()
    registry.register(scan)
    monkeypatch.setattr(health_console, "REGISTRY", registry)
    monkeypatch.setattr(health_views, "consumer_lags", dict)
    monkeypatch.setattr(health_console, "self_url", lambda: "http://w1")
    share = health_console.worker_share()
    assert share["counters"]["agentstream_events_in"] == {"collect_metrics": 7.0}
    assert scan.scans == 0
