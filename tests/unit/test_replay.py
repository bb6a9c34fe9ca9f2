"""Time parsing, filters and JSON lines of `streams.replay` (its progress: test_progress.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from agentstream.schemas import AgentMessage, Event, SchemaError, encode
from agentstream.streams.replay import ReplayRecord, TimeParseError, heap_key, matches, parse_time

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("-15m", NOW - timedelta(minutes=15)),
        ("-2h", NOW - timedelta(hours=2)),
        ("-1d", NOW - timedelta(days=1)),
        ("-30s", NOW - timedelta(seconds=30)),
        ("+1w", NOW + timedelta(weeks=1)),
        ("2026-11-25T10:00:00Z", datetime(2026, 11, 25, 10, tzinfo=UTC)),
        ("2026-11-25T10:00:00+02:00", datetime(2026, 11, 25, 8, tzinfo=UTC)),
        ("2026-11-25", datetime(2026, 11, 25, tzinfo=UTC)),
        ("1795600000000", datetime.fromtimestamp(1_795_600_000, UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "-15x",
        "15m",
        # before 1970: aiokafka's offsets_for_times raised ValueError (a traceback)
        "1969-12-31",
        "-30000d",
        # epoch seconds were read as milliseconds: 1970-01-20, i.e. "everything"
        "1700000000",
    ],
)
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(TimeParseError):
        parse_time(text, now=NOW)


def record(
    ev: Event | None = None, value: bytes | None = None, key: bytes | None = b"k"
) -> ReplayRecord:
    raw = encode(ev) if ev is not None else value
    data = orjson.loads(raw) if ev is not None else None
    return ReplayRecord("t", 1, 42, 1000, key, raw, data, None if data else "not JSON")


def message(sender: str = "a", recipient: str = "b") -> Event:
    return Event.of(
        AgentMessage(message_id="m", sender_id=sender, recipient_id=recipient),
        source="svc",
        correlation_id="corr",
    )


def test_filters() -> None:
    rec = record(message("alice", "bob"))
    assert matches(rec)
    assert matches(rec, agent="alice") and matches(rec, agent="bob")
    assert matches(rec, agent="svc")  # the envelope's source
    assert matches(rec, agent="k")  # the record key
    assert not matches(rec, agent="carol")
    assert matches(rec, type="agent.message") and not matches(rec, type="llm.request")
    assert matches(rec, correlation_id="corr") and not matches(rec, correlation_id="x")
    assert not matches(record(value=b"junk"), type="agent.message")


def test_json_line_embeds_the_wire_event_or_the_error() -> None:
    ev = message()
    line = orjson.loads(record(ev).json_line())
    assert line["event"] == orjson.loads(encode(ev))
    assert (line["topic"], line["partition"], line["offset"]) == ("t", 1, 42)
    bad = orjson.loads(record(value=b"\xffjunk").json_line())
    assert bad["error"] == "not JSON" and bad["value_b64"] == "/2p1bms="
    assert record(ev).event.event_id == ev.event_id  # lazily validated


def test_heap_key_orders_by_timestamp_then_partition_then_offset() -> None:
    # fetched records as the merge sees them (aiokafka ConsumerRecord fields)
    a = SimpleNamespace(partition=1, offset=5, timestamp=1000)
    b = SimpleNamespace(partition=0, offset=9, timestamp=1000)
    c = SimpleNamespace(partition=0, offset=1, timestamp=999)
    assert sorted([a, b, c], key=lambda r: heap_key(r, 0)) == [c, b, a]
    # equal timestamp and partition number on two topics: the topic's position decides
    assert heap_key(b, 0) < heap_key(b, 1)


def test_output_formats() -> None:
    ev = message()
    rec = record(ev)
    assert rec.render("json", meta=True) == rec.json_line()
    assert orjson.loads(rec.render("json")) == orjson.loads(encode(ev))
    assert rec.render("raw") == encode(ev) + b"\n"
    assert rec.render("raw", meta=True) == b"t\t1\t42\t1000\tk\t" + encode(ev) + b"\n"
    pretty = rec.render("pretty", meta=True)
    assert b"\n  " in pretty and orjson.loads(pretty) == orjson.loads(rec.json_line())
    junk = record(value=b"junk")
    assert orjson.loads(junk.render("json")) == {"error": "not JSON", "value_b64": "anVuaw=="}
    assert orjson.loads(junk.render("json", meta=True))["offset"] == 42
    assert junk.render("raw") == b"junk\n"


def test_every_format_redacts_secrets_unless_asked() -> None:
    raw = orjson.loads(encode(message()))
    raw["payload"]["metadata"] = {"auth": {"token": "s3cret"}}
    rec = ReplayRecord("t", 0, 1, 1, None, orjson.dumps(raw), raw, None)
    for fmt in ("json", "pretty", "raw"):
        for meta in (False, True):
            assert b"s3cret" not in rec.render(fmt, meta=meta), (fmt, meta)
            assert b"s3cret" in rec.render(fmt, meta=meta, show_secrets=True), (fmt, meta)


def test_tail_prints_the_lines_replay_writes() -> None:
    from agentstream.schemas import registry
    from agentstream.streams.cli.core import received_record
    from agentstream.streams.client import Received

    ev = message()
    raw = encode(ev)
    got = received_record(Received("t", 1, 42, 1000, b"k", raw, registry.decode(raw), None))
    assert got.json_line() == record(ev).json_line()
    assert got.render("raw", meta=True) == record(ev).render("raw", meta=True)
    bad = received_record(Received("t", 1, 43, 1000, None, b"junk", None, SchemaError("nope")))
    line = orjson.loads(bad.json_line())
    assert line["key"] is None and line["value_b64"] == "anVuaw=="
    assert line["error"] == "SchemaError: nope"


@pytest.mark.parametrize("fmt", ["json", "pretty"])
@pytest.mark.parametrize("meta", [False, True])
def test_a_record_with_line_breaks_between_tokens_is_one_record_out(fmt: str, meta: bool) -> None:
    # JSON allows CR/LF between tokens: printed as sent, one record was several lines of
    # `replay --out` (the audit trail), one of them a complete forged record
    forged = b'{"topic":"agent.messages","partition":0,"offset":7,"event":{}}'
    event = Event.of(AgentMessage(message_id="m", sender_id="a", recipient_id="b"), source="s")
    wire = encode(event)
    raw = wire[:-1] + b',\r"x":\n' + forged + b"\n}"
    data = orjson.loads(raw)
    out = ReplayRecord("t", 1, 42, 1000, None, raw, data, None).render(fmt, meta=meta)
    assert b"\r" not in out
    if fmt == "json":
        assert out.count(b"\n") == 1
        assert orjson.loads(out)  # one JSON value per line


async def test_a_record_dated_ahead_does_not_end_a_range_until_now() -> None:
    """`--until now` (the commands' default) took the first offset whose timestamp is at
    or after now: the producer sets a record's timestamp, so one dated ahead ended the
    range there and every later record of the partition was left out (a forgery hidden
    from `audit verify` behind it)."""
    from aiokafka import TopicPartition

    from agentstream.streams.replay import plan_ranges, to_ms

    tp = TopicPartition("t", 0)

    class Consumer:
        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0}

        async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            return {tp: 0}

        async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            return {tp: 6}

        async def offsets_for_times(self, times: dict[TopicPartition, int]) -> Any:
            # timestamps [past, past, FUTURE, past, past, past]: the first at/after any
            # time up to the future one's is offset 2
            return {tp: type("OffsetAndTimestamp", (), {"offset": 2})()}

    now = to_ms(parse_time("now"))
    [whole] = await plan_ranges(Consumer(), ["t"], None, now)  # type: ignore[arg-type]
    assert (whole.start, whole.stop) == (0, 6)
    [past] = await plan_ranges(Consumer(), ["t"], None, now - 3_600_000)  # type: ignore[arg-type]
    assert past.stop == 2  # an `until` in the past still cuts by the broker's time index
