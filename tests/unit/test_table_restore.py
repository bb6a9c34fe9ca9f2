"""`streams.tables.restore`: the bulk restore decodes changelog records exactly as Faust's
own recovery does, for every table the agents declare, and applies them as Faust would
(tombstones delete, each key remembers its partition)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from faust.types import TP
from faust.types.tuples import Message

from agentstream.streams.tables.restore import bulk_capable, decode_batch

#: values every table's changelog could hold (or that a broken writer could have put
#: there): each is decoded by both paths, which must agree, or both fail
SAMPLES: list[bytes | None] = [
    orjson.dumps({"count": 3, "last_message_id": "m7", "at": 1.5}),
    orjson.dumps({"nested": {"list": [1, 2, {"a": None}]}, "__faust": {"ns": "nope"}}),
    orjson.dumps(42),
    orjson.dumps("text"),
    orjson.dumps([1, "two"]),
    b"not json",
    b"\xff\xfe",
    b"",
    None,
]
KEYS: list[bytes] = [b"agent-1", orjson.dumps("agent-1"), orjson.dumps(7), b"\xc3\xa9t\xc3\xa9"]


def _app_tables() -> dict[str, Any]:
    from agentstream.streams.app import app

    app.discover()
    assert app.tables, "no tables declared"
    return dict(app.tables.items())


class _Fetched:
    def __init__(self, key: bytes, value: bytes | None, offset: int) -> None:
        self.key, self.value, self.offset = key, value, offset


def _by_faust(app: Any, table: Any, key: bytes, value: bytes | None) -> tuple[Any, Any]:
    """What Faust's recovery gets: the changelog topic's schema decoding the message."""
    schema = table.changelog_topic.schema
    message = Message(
        topic=table.changelog_topic.get_topic_name(),
        partition=0,
        offset=0,
        timestamp=0.0,
        timestamp_type=0,
        headers=[],
        key=key,
        value=value,
        checksum=None,
    )
    k = schema.loads_key(app, message)
    v = None if value is None else schema.loads_value(app, message)
    return k, v


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception:
        return "error", None


@pytest.mark.parametrize("name", sorted(_app_tables()))
def test_bulk_decoding_equals_fausts_for_every_table(name: str) -> None:
    table = _app_tables()[name]
    app = table.app
    compared = 0
    for key in KEYS:
        for value in SAMPLES:
            faust_side = _outcome(lambda: _by_faust(app, table, key, value))  # noqa: B023
            ours = _outcome(
                lambda: (
                    (r.key, r.value)
                    for r in decode_batch(app, table, 0, [_Fetched(key, value, 0)])  # noqa: B023
                ).__next__()
            )
            assert ours == faust_side, (name, key, value)
            compared += faust_side[0] == "ok"
    assert compared, f"{name}: no sample decodes at all"


def test_every_agent_table_restores_in_bulk() -> None:
    """A table left to Faust's per-record path would be silently slow, not wrong: keep
    the agents' tables on the bulk path."""
    tables = _app_tables()
    assert all(bulk_capable(t) for t in tables.values()), [
        n for n, t in tables.items() if not bulk_capable(t)
    ]


def test_applied_batch_sets_deletes_and_remembers_partitions() -> None:
    table = _app_tables()["accepted_by_sender"]
    app = table.app
    store = table.data
    store.data.clear()
    fetched = [
        _Fetched(b"a", orjson.dumps({"n": 1}), 0),
        _Fetched(b"b", orjson.dumps({"n": 2}), 1),
        _Fetched(b"a", None, 2),  # a tombstone removes "a"
        _Fetched(b"c", orjson.dumps({"n": 3}), 3),
    ]
    table.apply_changelog_batch(decode_batch(app, table, 2, fetched))
    assert dict(store.data) == {"b": {"n": 2}, "c": {"n": 3}}
    assert store._key_partition["b"] == 2
    # keys of partitions this worker no longer holds go at the end of recovery, as with
    # Faust's own path
    import asyncio

    asyncio.run(store.on_recovery_completed({TP(table.changelog_topic.get_topic_name(), 0)}, set()))
    assert dict(store.data) == {}


class _Rec:
    def __init__(self, offset: int, key: bytes, value: bytes) -> None:
        self.offset, self.key, self.value = offset, key, value


class _GatedConsumer:
    """The restore's consumer: the first fetch returns records 0-2 at once, the second
    waits for `gate` (the broker answering just as a rebalance lands)."""

    def __init__(self, log: list[_Rec], gate: asyncio.Event) -> None:
        self.log, self.gate, self.pos, self.calls = log, gate, {}, 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def assign(self, tps: Any) -> None:
        return None

    def seek(self, ktp: Any, offset: int) -> None:
        self.pos[ktp] = offset

    async def getmany(self, *ktps: Any, timeout_ms: int, max_records: int) -> Any:
        self.calls += 1
        if self.calls > 1:
            await self.gate.wait()
        out = {}
        for k in ktps:
            recs = [r for r in self.log if r.offset >= self.pos[k]][
                : 3 if self.calls == 1 else None
            ]
            if recs:
                self.pos[k] = recs[-1].offset + 1
                out[k] = recs
        return out

    async def position(self, ktp: Any) -> int:
        return int(self.pos[ktp])


def test_a_rebalance_during_the_bulk_read_notes_no_start_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebalance lands while the bulk read waits for a fetch; Faust cancels the read a
    few loop turns later, but the fetch's answer came first. The read went on: applied
    the records and noted a start offset for the partition just revoked (0 from the
    end offsets' Counter, which Faust had emptied for it). The entry outlived the
    revoke, and when the partition came straight back its restore began after it: the
    record at offset 0 was never restored."""
    from faust.tables.recovery import RebalanceAgain

    import agentstream.streams.kafka_security as kafka_security
    from agentstream.streams.tables.restore import restore_in_bulk

    table = _app_tables()["accepted_by_sender"]
    app = table.app
    rec = app.tables.recovery
    tp = TP(table.changelog_topic.get_topic_name(), 0)
    log = [_Rec(i, f"k{i}".encode(), orjson.dumps({"n": i})) for i in range(10)]
    gate = asyncio.Event()
    monkeypatch.setattr(kafka_security, "new_consumer", lambda *a, **k: _GatedConsumer(log, gate))
    rec.tp_to_table[tp] = table
    rec.active_tps.add(tp)
    rec.active_offsets[tp] = -1
    rec.active_highwaters[tp] = 9
    table.data.data.clear()

    async def scenario() -> None:
        read = asyncio.ensure_future(
            rec._wait(
                restore_in_bulk(rec, {tp}, rec.active_offsets, rec.active_highwaters, budget_s=5)
            )
        )
        for _ in range(20):
            await asyncio.sleep(0)
        assert rec.active_offsets[tp] == 2  # the first fetch applied
        # Recovery.on_rebalance's synchronous part: tp revoked, a new recovery signalled;
        # the second fetch's answer arrives in the same instant
        rec.revoke(tp)
        rec.active_tps.discard(tp)
        rec.signal_recovery_start.set()
        gate.set()
        with pytest.raises(RebalanceAgain):
            await read

    try:
        rec.loop.run_until_complete(scenario())
        assert tp not in rec.active_offsets
        assert sorted(table.data.data) == ["k0", "k1", "k2"]  # nothing after the rebalance
    finally:
        rec.signal_recovery_start.clear()
        rec.active_tps.discard(tp)
        rec.tp_to_table.pop(tp, None)
        rec.active_offsets.pop(tp, None)
        rec.active_highwaters.pop(tp, None)
        table.data.data.clear()


@pytest.mark.filterwarnings("ignore:Setting new value for configuration key")
def test_the_bulk_read_never_outlasts_fausts_timeout_for_its_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Faust waits for the start-offsets step at most broker_request_timeout, and past
    it stops its recovery for good (the worker stays paused). The bulk read's own
    deadline was checked only between fetches: a fetch, a position lookup or the
    consumer's start that hung took the step past it."""
    from faust.tables.recovery import Recovery

    from agentstream.streams.tables import restore

    table = _app_tables()["accepted_by_sender"]
    rec = table.app.tables.recovery
    tp = TP(table.changelog_topic.get_topic_name(), 0)

    async def faust_offsets(*args: Any, **kwargs: Any) -> None:
        return None

    async def hangs(*args: Any, **kwargs: Any) -> int:
        await asyncio.Event().wait()
        return 0

    monkeypatch.setattr(Recovery, "_build_offsets", faust_offsets)
    monkeypatch.setattr(restore, "restore_in_bulk", hangs)
    monkeypatch.setattr(table.app.conf, "broker_request_timeout", 3.0)

    async def step() -> float:
        started = time.monotonic()
        await asyncio.wait_for(rec._build_offsets(None, {tp}, {}, "active"), 10)
        return time.monotonic() - started

    took = rec.loop.run_until_complete(step())
    assert took < 3.0  # cut off inside Faust's timeout; Faust's recovery goes on
