"""The metrics and comms tables against a sender that invents a series, a label set or an
agent id per record, and against groups that stop reporting: each partition holds at
most its bound of groups (the rest are dead letters), and a group not seen for its
retention by the partition's append clock leaves the table, in the live fold and in a
rebuild alike. Driven through the agents' `_fold`, as the worker calls it."""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

import agentstream.agents.comms.agent as comms_agent
import agentstream.agents.metrics.agent as metrics_agent
import agentstream.streams.processing as processing
from agentstream.agents.audit.rebuild import _fold_into
from agentstream.schemas import CommunicationRecord, Event, MetricSample
from agentstream.streams.observability import TABLE_FULL, Throttled
from agentstream.streams.processing import Inbound
from agentstream.streams.settings import Settings, get_settings
from agentstream.streams.tables import Origin, TableSpec
from agentstream.streams.tables.monitoring import (
    TableFull,
    fold_record,
    fold_sample,
    home_partition,
    make_comms_fold,
    make_metrics_fold,
)

T0 = 1_800_000_000.0
#: what the agents' `origin_of` takes for these topics (the catalogue fixes no count)
PARTITIONS = get_settings().topic_partitions


def named(prefix: str, partition: int, n: int = 1, partitions: int = PARTITIONS) -> list[str]:
    """`n` names starting with `prefix` whose keys hash to `partition`."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        name = f"{prefix}{i}"
        if home_partition(name, partitions) == partition:
            out.append(name)
        i += 1
    return out


class Sink:
    """One agent module's fold around a dict table: what it stored, what it refused."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: ModuleType, **env: str) -> None:
        self.module = module
        self.table: dict[str, Any] = {}
        self.dead: list[tuple[Any, BaseException]] = []
        self.log: list[tuple[Event[Any], Origin]] = []
        self.offsets: dict[int, int] = {}
        self.settings = Settings.from_env({f"AGENTSTREAM_{k.upper()}": v for k, v in env.items()})
        monkeypatch.setattr(module, "writer", SimpleNamespace(at=lambda p: self.table))
        monkeypatch.setattr(module, "settings", self.settings)

        async def dead_letter(msg: Any, exc: BaseException, consumer: str) -> None:
            self.dead.append((msg, exc))

        monkeypatch.setattr(processing, "_EOS", False)
        monkeypatch.setattr(processing, "dead_letter", dead_letter)
        if hasattr(module, "dead_letter"):
            monkeypatch.setattr(module, "dead_letter", dead_letter)
        if hasattr(module, "full_warning"):
            monkeypatch.setattr(module, "full_warning", Throttled(module.log))

    async def send(self, topic: str, payload: Any, key: str, at: float) -> None:
        """The record as a producer sends it: under `key`, in the partition it hashes to."""
        partition = home_partition(key, PARTITIONS)
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        event = Event.of(payload, source="t")
        msg = SimpleNamespace(
            topic=self.settings.topic(topic),
            partition=partition,
            offset=offset,
            timestamp=at,
            key=key.encode(),
        )
        self.log.append((event, Origin(topic, partition, offset, at, key.encode(), PARTITIONS)))
        await processing.guarded(Inbound(event, msg), self.module.CONSUMER, self.module._fold)

    def rebuilt(self, spec: TableSpec) -> dict[str, Any]:
        state: dict[str, Any] = {}
        _fold_into(state, spec, self.log)
        return state


def sample(series: str, ts: float, **labels: str) -> MetricSample:
    return MetricSample(series=series, timestamp=ts, value=1.0, labels=labels)


def record(rid: str, agent: str, ts: float) -> CommunicationRecord:
    return CommunicationRecord(
        record_id=rid, kind="token", agent_id=agent, recorded_at=datetime.fromtimestamp(ts, UTC)
    )


def groups(table: dict[str, Any]) -> set[str]:
    """series␟labels of every metric window."""
    return {k.rsplit("\x1f", 1)[0] for k in table}


def metrics_spec(s: Sink) -> TableSpec:
    return TableSpec(
        name="m",
        sources=("metrics.samples",),
        apply_at=make_metrics_fold(
            s.settings.metrics_collection_interval_s,
            s.settings.metrics_retention_s,
            s.settings.metrics_max_series_per_partition,
        ),
    )


def comms_spec(s: Sink) -> TableSpec:
    return TableSpec(
        name="c",
        sources=("comms.records",),
        apply_at=make_comms_fold(
            s.settings.comms_retention_s, s.settings.comms_max_agents_per_partition
        ),
    )


# -- metrics ------------------------------------------------------------------------------
async def test_invented_label_sets_stop_at_the_bound_of_their_partition(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = Sink(monkeypatch, metrics_agent, metrics_max_series_per_partition="50")
    refused_before = TABLE_FULL.labels("metric_windows")._value.get()
    with caplog.at_level(logging.WARNING, logger=metrics_agent.__name__):
        await s.send("metrics.samples", sample("cpu", T0, host="real"), "cpu", T0)
        for i in range(10_000):
            at = T0 + i * 0.01
            await s.send("metrics.samples", sample("cpu", at, req=f"r{i}"), "cpu", at)
        await s.send("metrics.samples", sample("cpu", T0 + 100, host="real"), "cpu", T0 + 100)
    assert len(groups(s.table)) == 50
    assert 'cpu\x1f{"host":"real"}' in groups(s.table)  # held before the flood: kept
    assert len(s.dead) == 10_001 - 49 - 1
    assert all(isinstance(exc, TableFull) for _, exc in s.dead)
    assert "AGENTSTREAM_METRICS_MAX_SERIES_PER_PARTITION" in str(s.dead[0][1])
    refused = TABLE_FULL.labels("metric_windows")._value.get() - refused_before
    assert refused == len(s.dead)
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
    assert s.rebuilt(metrics_spec(s)) == s.table


async def test_a_series_that_stops_reporting_leaves_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # its windows were pruned only by a newer sample of the same series and label set:
    # one that stopped reporting stayed for good
    s = Sink(monkeypatch, metrics_agent, metrics_retention_s="600")
    gone, alive = named("gone", 0)[0], named("alive", 0)[0]
    other = named("other", 1)[0]
    await s.send("metrics.samples", sample(gone, T0, host="a"), gone, T0)
    for i in range(1, 80):  # another series of the partition reports for 790 s
        at = T0 + i * 10
        await s.send("metrics.samples", sample(alive, at, host="a"), alive, at)
    assert groups(s.table) == {f'{alive}\x1f{{"host":"a"}}'}
    assert s.rebuilt(metrics_spec(s)) == s.table
    # a partition that gets no record expires nothing: its clock did not move
    await s.send("metrics.samples", sample(other, T0, host="a"), other, T0)
    await s.send("metrics.samples", sample(alive, T0 + 800, host="a"), alive, T0 + 800)
    assert f'{other}\x1f{{"host":"a"}}' in groups(s.table)


def test_metric_bounds_never_scan_the_table() -> None:
    class Watched(dict[str, Any]):
        scans = 0

        def __iter__(self) -> Any:
            Watched.scans += 1
            return super().__iter__()

        def keys(self) -> Any:
            Watched.scans += 1
            return super().keys()

        def items(self) -> Any:
            Watched.scans += 1
            return super().items()

    state = Watched()
    for i in range(20_000):
        fold_sample(
            state,
            "s",
            {"i": str(i % 5000)},
            T0 + i,
            1.0,
            interval_s=10.0,
            retention_s=100.0,
            at=T0 + i,
            partition=0,
            max_series=4000,
        )
    assert Watched.scans <= 1  # the index, built once from the (empty) table
    assert len(groups(state)) == 101


# -- comms --------------------------------------------------------------------------------
async def test_invented_comms_agent_ids_stop_at_the_bound_of_their_partition(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = Sink(monkeypatch, comms_agent, comms_max_agents_per_partition="50")
    with caplog.at_level(logging.WARNING, logger=comms_agent.__name__):
        await s.send("comms.records", record("real-0", "real", T0), "real", T0)
        invented = named("x", home_partition("real", PARTITIONS), 10_000)
        for i, x in enumerate(invented):
            at = T0 + i * 0.01
            await s.send("comms.records", record(x, x, at), x, at)
        await s.send("comms.records", record("real-1", "real", T0 + 100), "real", T0 + 100)
    agents = {k.split("\x1f")[1] for k in s.table if k.startswith("c\x1f")}
    assert len(agents) == 50 and "real" in agents
    assert s.table["c\x1freal"] == {"token": 2}
    assert len(s.dead) == 10_000 - 49
    assert all(isinstance(exc, TableFull) for _, exc in s.dead)
    assert "AGENTSTREAM_COMMS_MAX_AGENTS_PER_PARTITION" in str(s.dead[0][1])
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
    assert s.rebuilt(comms_spec(s)) == s.table


async def test_an_agent_that_stops_sending_leaves_the_comms_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = Sink(monkeypatch, comms_agent, comms_retention_s="600")
    gone, alive = named("gone", 0)[0], named("alive", 0)[0]  # agents of one partition
    await s.send("comms.records", record("g0", gone, T0), gone, T0)
    await s.send("comms.records", record("g1", gone, T0 + 1), gone, T0 + 1)
    for i in range(1, 80):
        at = T0 + i * 10
        await s.send("comms.records", record(f"a{i}", alive, at), alive, at)
    assert not [k for k in s.table if gone in k]  # records and counts
    assert s.table[f"c\x1f{alive}"] == {"token": 61}  # its own retention, as before
    assert s.rebuilt(comms_spec(s)) == s.table


def test_comms_bounds_by_append_time_ignore_the_senders_clock() -> None:
    # a record dated a year ahead by its sender neither keeps its agent past the
    # retention by the append clock, nor expires anyone else early
    state: dict[str, Any] = {}
    ahead = T0 + 365 * 86400
    fold_record(state, record("f", "future", ahead), retention_s=600, at=T0, partition=0)
    fold_record(state, record("n", "now", T0), retention_s=600, at=T0 + 1, partition=0)
    assert {k for k in state if k.startswith("c\x1f")} == {"c\x1ffuture", "c\x1fnow"}
    # (records after an idle partition move its clock a tenth of the retention each)
    for i in range(12):
        t = T0 + 700 + i
        fold_record(state, record(f"n{i + 2}", "now", t), retention_s=600, at=t, partition=0)
    assert {k for k in state if k.startswith("c\x1f")} == {"c\x1fnow"}


@pytest.mark.parametrize("table", ["metrics", "comms"])
def test_a_restart_rebuilds_the_bounds_from_the_table(table: str) -> None:
    # groups come and stop, some are refused at the bound; the worker restarts halfway
    # (its table restored, the index built again from it): the same table as a rebuild
    rng = random.Random(3)
    records: list[tuple[Event[Any], Origin]] = []
    series = [named("s", p, partitions=2)[0] for p in (0, 1)]  # one series per partition
    for i in range(3000):
        g = rng.choice(range(40)) if i < 1500 else rng.choice(range(20, 60))
        at = T0 + i
        if table == "metrics":
            key = series[g % 2]
            payload: Any = sample(key, at, g=str(g))
        else:
            key = f"a{g}"
            payload = record(f"r{i}", key, at)
        p = home_partition(key, 2)
        ev: Event[Any] = Event.of(payload, source="t")
        records.append((ev, Origin(f"{table}.x", p, i, at, key.encode(), 2)))
    fold = make_metrics_fold(10.0, 300.0, 15) if table == "metrics" else make_comms_fold(300.0, 15)
    spec = TableSpec(name=table, sources=(f"{table}.x",), apply_at=fold)
    live: dict[str, Any] = {}
    _fold_into(live, spec, records[:1700])
    restored = dict(live)
    _fold_into(restored, spec, records[1700:])
    rebuilt: dict[str, Any] = {}
    _fold_into(rebuilt, spec, records)
    assert rebuilt == restored
    # bounded, and the groups of the first half that stopped are gone
    names = {
        (v.get("labels") or {}).get("g") or v.get("agent_id")
        for k, v in rebuilt.items()
        if not k.startswith("c\x1f")
    }
    assert 0 < len(names) <= 30
    assert not any(n in names for n in ("0", "a0", "1", "a1"))


def test_a_series_from_before_the_upgrade_read_from_another_partition_is_kept() -> None:
    """A window written by the previous version (no partition in it) waits on its home
    partition's heap; when its series is read from another partition since, the home
    partition's clock passing its time must not drop it whole (361 live windows were)."""
    from agentstream.streams.settings import get_settings
    from agentstream.streams.tables.monitoring import home_partition, labels_key, window_key

    n = get_settings().topic_partitions
    home = home_partition("cpu", n)
    other = (home + 1) % n
    state: dict[str, Any] = {
        window_key("cpu", labels_key({}), T0): {
            "series": "cpu",
            "labels": {},
            "start": T0,
            "end": T0 + 10,
            "count": 1,
            "sum": 1.0,
            "min": 1.0,
            "max": 1.0,
            "last": 1.0,
            "last_ts": T0,
        }
    }
    kw: dict[str, Any] = {"interval_s": 10, "retention_s": 3600}
    for i in range(1, 400):
        t = T0 + 10 * i
        fold_sample(state, "cpu", {}, t, 1.0, at=t, partition=other, **kw)
    before = sum(1 for k in state if k.startswith("cpu"))
    # the home partition's clock passes the old window's time (another series there)
    for i in range(5):
        t = T0 + 3700 + i
        fold_sample(state, "mem", {}, t, 1.0, at=t, partition=home, **kw)
    assert sum(1 for k in state if k.startswith("cpu")) == before > 300


@pytest.mark.parametrize("table", ["metrics", "comms"])
def test_a_group_moving_into_a_full_partition_is_refused(table: str) -> None:
    # the bound is per partition: a group another partition holds is new to this one
    state: dict[str, Any] = {}

    def put(group: str, partition: int, t: float) -> None:
        if table == "metrics":
            fold_sample(
                state,
                group,
                {},
                t,
                1.0,
                interval_s=10,
                retention_s=3600,
                at=t,
                partition=partition,
                max_series=2,
            )
        else:
            fold_record(
                state,
                record(f"{group}{t}", group, t),
                retention_s=3600,
                at=t,
                partition=partition,
                max_agents=2,
            )

    put("a", 0, T0)
    put("b", 0, T0 + 1)
    put("c", 1, T0 + 2)
    with pytest.raises(TableFull):
        put("c", 0, T0 + 3)
    put("a", 0, T0 + 4)  # one it holds still folds
