"""Metric windows: aggregates per series and label set, retention by event time, views."""

from __future__ import annotations

import random

from agentstream.agents.metrics.windows import latest_values, series_between
from agentstream.schemas import Event, MetricSample
from agentstream.streams.tables import Origin, TableSpec, digest, rebuild
from agentstream.streams.tables.monitoring import fold_sample, make_metrics_fold

INTERVAL = 10.0
RETENTION = 60.0


def appended(series: str, offset: int, at: float) -> Origin:
    """A sample of `series` read at `offset` of metrics.samples (one partition, keyed by
    the series), appended by the broker at `at`."""
    return Origin("metrics.samples", 0, offset, at, series.encode())


def add(state: dict, series: str, ts: float, value: float, **labels: str) -> bool:
    return fold_sample(state, series, labels, ts, value, interval_s=INTERVAL, retention_s=RETENTION)


def test_aggregates_per_window_and_label_set() -> None:
    s: dict = {}
    for ts, v in [(100.0, 3.0), (101.0, 1.0), (109.9, 5.0), (110.0, 7.0)]:
        add(s, "cpu", ts, v, host="a")
    add(s, "cpu", 105.0, 100.0, host="b")
    got = series_between(s.items(), "cpu", 0, 1000, labels={"host": "a"})
    assert [(w["start"], w["count"], w["sum"], w["min"], w["max"], w["last"]) for w in got] == [
        (100.0, 3, 9.0, 1.0, 5.0, 5.0),
        (110.0, 1, 7.0, 7.0, 7.0, 7.0),
    ]
    assert got[0]["avg"] == 3.0
    assert [w["labels"] for w in series_between(s.items(), "cpu", 0, 1000)] == [
        {"host": "a"},
        {"host": "b"},
        {"host": "a"},
    ]
    # the time range selects overlapping windows only
    assert [w["start"] for w in series_between(s.items(), "cpu", 110, 115)] == [110.0]


def test_last_is_by_timestamp_not_arrival() -> None:
    s: dict = {}
    add(s, "q", 105.0, 1.0)
    add(s, "q", 101.0, 9.0)  # late sample in the same window
    (w,) = series_between(s.items(), "q", 0, 1000)
    assert w["last"] == 1.0 and w["count"] == 2 and w["max"] == 9.0


def test_windows_pruned_after_retention_by_event_time() -> None:
    s: dict = {}
    for t in range(0, 200, 5):
        add(s, "m", float(t), float(t))
    starts = [w["start"] for w in series_between(s.items(), "m", 0, 1000)]
    newest = 195.0
    # every kept window ends within the retention of the newest sample, none is missing
    assert starts == [x * INTERVAL for x in range(int((newest - RETENTION) // INTERVAL), 20)]
    assert all(st + INTERVAL > newest - RETENTION for st in starts)
    assert len(s) == len(starts)  # pruned from the state, not just hidden
    # a sample older than the retention is refused instead of resurrecting a window
    assert not add(s, "m", 10.0, 1.0)
    assert len(s) == len(starts)


def test_views_hide_windows_past_retention_by_wall_clock() -> None:
    s: dict = {}
    add(s, "m", 100.0, 1.0)
    assert series_between(s.items(), "m", 0, 1000, now=150.0, retention_s=RETENTION)
    assert series_between(s.items(), "m", 0, 1000, now=171.0, retention_s=RETENTION) == []
    assert latest_values(s.items(), now=171.0, retention_s=RETENTION) == {}


def test_latest_values_per_group() -> None:
    s: dict = {}
    add(s, "m", 100.0, 1.0, k="x")
    add(s, "m", 125.0, 2.0, k="x")
    add(s, "m", 120.0, 3.0, k="y")
    latest = {k: v["last"] for k, v in latest_values(s.items()).items()}
    assert latest == {("m", '{"k":"x"}'): 2.0, ("m", '{"k":"y"}'): 3.0}


def test_rebuild_matches_live_fold_with_a_fresh_index() -> None:
    rnd = random.Random(7)
    events = [
        Event.of(
            MetricSample(
                series=f"s{rnd.randint(0, 2)}",
                timestamp=t + rnd.random() * 30,
                value=rnd.random(),
                labels={"l": str(rnd.randint(0, 1))},
            ),
            source="t",
        )
        for t in range(0, 600, 2)
    ]
    records = [(ev, appended(ev.key, i, 1000.0 + i)) for i, ev in enumerate(events)]
    spec = TableSpec(
        "m", ("metrics.samples",), apply_at=make_metrics_fold(INTERVAL, RETENTION, 100)
    )
    live: dict = {}
    for ev, origin in records[:150]:
        spec.fold(live, ev, origin)
    # a worker restart: the table is restored (copied) and its index rebuilt from it
    restored = dict(live)
    for ev, origin in records[150:]:
        spec.fold(restored, ev, origin)
    assert digest(rebuild(spec, records).items()) == digest(restored.items())


def test_a_window_restored_behind_the_index_is_folded_into_and_pruned() -> None:
    """The pruning index is built from the table on first use. A batch still folding at
    an assignment could build it from the partially restored table; a window restored
    after that was unknown to it: the next sample into it raised KeyError (a dead
    letter for an input already counted) and the window was never pruned."""
    from agentstream.streams.tables.monitoring import invalidate_indexes

    restored: dict = {}
    add(restored, "cpu", 100.0, 1.0, host="a")  # what the changelog holds
    state: dict = {}
    invalidate_indexes(state)
    add(state, "mem", 100.0, 1.0, host="a")  # the index is built now, from a partial table
    state.update(restored)  # the restore applies the changelog behind the index
    assert add(state, "cpu", 101.0, 2.0, host="a")  # into the restored window
    assert [w["count"] for w in series_between(state.items(), "cpu", 0, 1000)] == [2]
    add(state, "cpu", 100.0 + RETENTION + INTERVAL + 1, 3.0, host="a")
    assert [w["start"] for w in series_between(state.items(), "cpu", 0, 1000)] == [170.0]


def test_a_sample_whose_sum_overflows_is_refused_with_the_window_as_it_was() -> None:
    # 1e308 + 1e308 is inf, which the changelog's JSON writes as null: after a restore
    # the window failed every later sample and the series view answered 500
    import pytest

    from agentstream.agents.audit.rebuild import _fold_into
    from agentstream.schemas.errors import InvalidEvent

    s: dict = {}
    add(s, "big", 100.0, 1e308)
    before = dict(s)
    with pytest.raises(InvalidEvent):
        add(s, "big", 101.0, 1e308)
    assert s == before
    (w,) = series_between(s.items(), "big", 0, 1000)
    assert w["count"] == 1 and w["sum"] == 1e308
    # the rebuild skips it as the live fold does (a dead letter there)
    spec = TableSpec("m", ("metrics.samples",), apply_at=make_metrics_fold(INTERVAL, RETENTION))
    events = [
        (
            Event.of(MetricSample(series="big", timestamp=t, value=1e308), source="t"),
            appended("big", i, t),
        )
        for i, t in enumerate((100.0, 101.0, 102.5))
    ]
    rebuilt: dict = {}
    _fold_into(rebuilt, spec, events)
    (w,) = rebuilt.values()
    assert (w["count"], w["sum"]) == (1, 1e308)
