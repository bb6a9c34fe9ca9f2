"""Metrics windows with retention, comms queries, system stats and health views, on the
real broker with one worker."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agentstream.schemas import CommunicationRecord, DeadLetter, MetricSample, SystemStats
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from agentstream.streams.tables.monitoring import split_window_key
from tests.support import (
    Worker,
    assert_rebuild_equal,
    await_until,
    cli,
    read_topic,
    web_client,
)

pytestmark = pytest.mark.integration

RETENTION = 30.0
INTERVAL = 2.0


async def test_metrics_comms_system_and_health_views(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    log_file = tmp_path / "logs" / "worker.log"
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "metrics,comms,system,health",
        "AGENTSTREAM_METRICS_COLLECTION_INTERVAL_S": str(INTERVAL),
        "AGENTSTREAM_METRICS_RETENTION_S": str(RETENTION),
        "AGENTSTREAM_COMMS_RETENTION_S": "3600",
        "AGENTSTREAM_SYSTEM_MONITORING_INTERVAL_S": "1",
        "AGENTSTREAM_LOG_FILE": str(log_file),
    }
    settings = Settings.from_env(env)
    worker = Worker(env, tmp_path / "worker.log")
    await asyncio.to_thread(worker.start)
    http = web_client(env)
    try:
        async with AsyncClient(settings, source="test") as client:
            now = time.time()
            # two minutes of samples, one per second, in time order: the oldest windows
            # must be pruned from the table as newer samples arrive
            samples = [
                MetricSample(
                    series="cpu.load",
                    timestamp=now - 120 + i,
                    value=float(i),
                    labels={"host": "h1"},
                )
                for i in range(121)
            ]
            samples += [
                MetricSample(series="cpu.load", timestamp=now, value=-1.0, labels={"host": "h2"})
            ]
            await client.publish_many("metrics.samples", samples)
            await client.publish_raw("metrics.samples", b'{"type": "metrics.sample"}', key=b"x")

            t0 = datetime.now(UTC).timestamp()
            records = []
            for i in range(12):
                records.append(
                    CommunicationRecord(
                        record_id=f"r{i}",
                        kind=("token", "wallet", "model")[i % 3],
                        agent_id=f"ag{i % 2 + 1}",
                        counterparty="peer",
                        recorded_at=datetime.fromtimestamp(t0 - 600 + i * 50, UTC),
                        amount=float(i),
                        unit="tok",
                    )
                )
            await client.publish_many("comms.records", records + records[:3])  # + redelivery

        # -- metrics: windows and retention ------------------------------------------------
        async def windows() -> list[dict]:
            r = await http.get("/metrics/series/cpu.load", params={"label": "host=h1"})
            if r.status_code == 503:  # the view's answer while partitions move: retry
                return []
            w = r.json()["windows"]
            return w if w and w[-1]["last"] == 120.0 else []

        got = await await_until(windows, 30, 0.3, "metric windows")
        newest = now
        assert all(w["end"] > newest - RETENTION - 5 for w in got)  # (5 s: test latency)
        assert sum(w["count"] for w in got) <= RETENTION / INTERVAL * 2 + 2
        for w in got:  # aggregates of the 1-per-second values 0..120 in each window
            assert w["min"] <= w["last"] <= w["max"] and w["count"] >= 1
            assert w["sum"] == pytest.approx(w["avg"] * w["count"])
        # from the samples' own clock, not the query's: "-6s" read late finds none
        since = str(int((now - 6) * 1000))
        recent = (
            await http.get("/metrics/series/cpu.load", params={"since": since, "label": "host=h1"})
        ).json()["windows"]
        assert 1 <= len(recent) <= 6 / INTERVAL + 1
        # the pruning happened in the table: its changelog holds tombstones for old windows
        changelog = await read_topic(
            settings.bootstrap, f"{settings.app_id}-metric_windows-changelog", idle=1.0
        )
        last: dict[str, bytes | None] = {}
        for rec, _ in changelog:
            last[json.loads(rec.key)] = rec.value
        live = {k for k, v in last.items() if v is not None}
        gone = {k for k, v in last.items() if v is None}
        assert len(gone) >= (120 - RETENTION) / INTERVAL - 2, (len(gone), len(live))
        for k in live:
            parsed = split_window_key(k)
            assert parsed is not None
            assert parsed[2] + INTERVAL > newest - RETENTION - INTERVAL
        assert len([k for k in live if "h1" in k]) >= len(got)

        prom = (await http.get("/metrics")).text
        assert (
            'agentstream_series_last_value{labels="{\\"host\\":\\"h1\\"}",series="cpu.load"} 120.0'
            in prom
        )
        assert 'series="cpu.load"} -1.0' in prom
        assert "agentstream_events_in_total" in prom

        # nobody has asked /ready yet: the health timer alone exports its components
        async def readiness() -> str:
            text = (await http.get("/metrics")).text
            return text if 'agentstream_ready_component{component="tables"} 0.0' in text else ""

        prom = await await_until(readiness, 30, 0.5, "readiness on /metrics")
        assert 'agentstream_ready_component{component="broker"} 0.0' in prom
        assert 'agentstream_ready_component{component="consumer_lag"} 0.0' in prom

        letters = await read_topic(
            settings.bootstrap, settings.topic("pipeline.deadletter"), expect=1
        )
        assert [
            ev.payload.consumer
            for _, ev in letters
            if ev is not None and isinstance(ev.payload, DeadLetter)
        ] == ["collect_metrics"]

        # -- comms: queries over HTTP and the CLI --------------------------------------------
        async def all_comms() -> dict:
            body = (await http.get("/comms")).json()
            return body if len(body["records"]) == 12 else {}

        body = await await_until(all_comms, 30, 0.3, "comms records")
        expected_counts: dict[str, dict[str, int]] = {}
        for r in records:
            per = expected_counts.setdefault(r.agent_id, {})
            per[r.kind] = per.get(r.kind, 0) + 1
        assert body["counts"] == expected_counts
        since, until = t0 - 400, t0 - 100
        want = [
            r.record_id
            for r in records
            if r.agent_id == "ag1"
            and r.kind == "token"
            and since <= r.recorded_at.timestamp() < until
        ]
        assert want
        out = await asyncio.to_thread(
            cli,
            env,
            "comms",
            "--agent",
            "ag1",
            "--kind",
            "token",
            "--since",
            str(int(since * 1000)),
            "--until",
            str(int(until * 1000)),
            "--json",
        )
        assert out.returncode == 0, out.stderr
        assert [r["record_id"] for r in json.loads(out.stdout)["records"]] == want
        bad = await http.get("/comms", params={"kind": "telepathy"})
        assert bad.status_code == 400
        # no unbounded answer: limit 0 or below returned every record of every worker;
        # a time beyond the calendar was a 500
        for params in ({"limit": "0"}, {"limit": "-1"}, {"limit": "100000"}):
            assert (await http.get("/comms", params=params)).status_code == 400, params
        far = await http.get("/comms", params={"since": "-99999999999999d"})
        assert far.status_code == 400 and "out of range" in far.json()["error"]
        # a view's answer is not sniffed or framed
        ok = await http.get("/comms")
        assert ok.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in ok.headers["content-security-policy"]

        # -- system stats ---------------------------------------------------------------------
        stats = await read_topic(settings.bootstrap, settings.topic("system.stats"), expect=1)
        first = next(ev.payload for _, ev in stats if ev is not None)
        latest = (await http.get("/system/stats")).json()
        assert isinstance(first, SystemStats) and first.worker_id == latest["worker_id"]
        assert latest["memory"]["rss"] > 0 and latest["memory"]["heap_used"] > 0
        assert latest["disk_usage"]["dependencies"] > 1_000_000
        assert latest["disk_usage"]["total"] >= latest["disk_usage"]["dependencies"]
        assert latest["paths"]["logs"] == str(log_file.parent)
        assert log_file.exists() and log_file.stat().st_size > 0  # the worker logs to it

        # -- health -----------------------------------------------------------------------------
        assert (await http.get("/health")).json()["status"] == "alive"
        ready = await http.get("/ready")
        comps = ready.json()["components"]
        assert ready.status_code == 200, ready.json()
        assert {"broker", "tables", "consumer_lag"} <= set(comps)
        assert worker.alive(), worker.tail()

        # both tables rebuilt from their source topics equal the live ones (changelogs)
        await asyncio.to_thread(worker.stop)
        rebuild_env = {**env, "AGENTSTREAM_AGENTS": "metrics,comms,audit"}
        for table in ("metric_windows", "comms_records"):
            await asyncio.to_thread(assert_rebuild_equal, rebuild_env, table)
    finally:
        await http.aclose()
        worker.stop()
