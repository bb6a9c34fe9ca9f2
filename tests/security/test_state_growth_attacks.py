"""A producer growing a worker's state with huge free-form values: a heartbeat's `info`,
a metric sample's `labels`, a communication record's `details` (each kept per agent or
label set in a table and its compacted changelog, restored on every restart), and the
metadata of messages and LLM requests. Each field is bounded by a producer limit
(`schemas.limits`): an event over it is an invalid event, dead-lettered like any other;
readers of history still read records written before the limits existed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

import agentstream.streams.processing as processing
from agentstream.schemas import Heartbeat, MetricSample, registry
from agentstream.schemas.errors import InvalidEvent
from agentstream.schemas.limits import (
    COMMS_DETAILS,
    HEARTBEAT_INFO,
    MESSAGE_METADATA,
    METRIC_LABELS,
)
from agentstream.streams.client import _received
from agentstream.streams.processing import decoded_batches
from agentstream.streams.replay import ReplayRecord
from tests.unit.test_event_batches import App, Ev, Msg, Stream

HALF_MB = 500_000


def heartbeat(info: dict[str, Any]) -> dict[str, Any]:
    return {"agent_id": "a", "sent_at": "2026-01-01T00:00:00Z", "sequence": 1, "info": info}


def sample(labels: dict[str, Any]) -> dict[str, Any]:
    return {"series": "cpu", "timestamp": 1.0, "value": 1.0, "labels": labels}


def record(details: dict[str, Any]) -> dict[str, Any]:
    return {
        "record_id": "r",
        "kind": "token",
        "agent_id": "a",
        "recorded_at": "2026-01-01T00:00:00Z",
        "details": details,
    }


def message(metadata: dict[str, Any]) -> dict[str, Any]:
    return {"message_id": "m", "sender_id": "a", "recipient_id": "b", "metadata": metadata}


def llm_request(metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "request_id": "q",
        "agent_id": "a",
        "context": {"messages": [{"role": "user", "content": "hi"}], "metadata": metadata},
    }


def wire(type_: str, payload: dict[str, Any], version: int = 1) -> bytes:
    return orjson.dumps(
        {"type": type_, "schema_version": version, "source": "x", "payload": payload}
    )


OVERSIZE = [
    ("agent.heartbeat", 1, heartbeat({"x": "v" * HALF_MB}), "payload.info"),
    ("agent.heartbeat", 1, heartbeat({"k" * 10_000: "v"}), "payload.info"),
    ("agent.heartbeat", 1, heartbeat({f"k{i}": "v" for i in range(1000)}), "payload.info"),
    # every entry within its own bound, together over the total
    ("agent.heartbeat", 1, heartbeat({f"k{i}": "v" * 1000 for i in range(20)}), "payload.info"),
    ("metrics.sample", 1, sample({"host": "h" * HALF_MB}), "payload.labels"),
    ("metrics.sample", 1, sample({"h" * 1000: "x"}), "payload.labels"),
    ("metrics.sample", 1, sample({f"k{i}": "v" * 250 for i in range(32)}), "payload.labels"),
    ("comms.record", 1, record({"blob": "z" * HALF_MB}), "payload.details"),
    ("comms.record", 1, record({f"k{i}": i for i in range(5000)}), "payload.details"),
    ("agent.message", 2, message({"blob": "z" * HALF_MB}), "payload.metadata"),
    ("llm.request", 3, llm_request({"blob": "z" * HALF_MB}), "payload.context.metadata"),
]


@pytest.mark.parametrize(("type_", "version", "payload", "field"), OVERSIZE)
def test_an_oversize_free_form_field_is_an_invalid_event(
    type_: str, version: int, payload: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        registry.decode(wire(type_, payload, version))
    assert field in str(caught.value), caught.value


@pytest.mark.parametrize(("type_", "version", "payload", "field"), OVERSIZE)
def test_history_still_reads_a_record_written_before_the_limits(
    type_: str, version: int, payload: dict[str, Any], field: str
) -> None:
    """`replay`, `tail`, `audit report` and client subscriptions read every record that
    was valid when written; a rebuild refuses it, as the live fold now does."""
    raw = wire(type_, payload, version)
    assert registry.decode(raw, limits=False).type == type_
    rec = ReplayRecord("t", 0, 7, 0, b"a", raw, orjson.loads(raw), None)
    assert rec.event.type == type_
    with pytest.raises(InvalidEvent):
        rec.checked_event()
    got = _received(
        "t", SimpleNamespace(partition=0, offset=7, timestamp=0, key=b"a", value=raw), len(raw)
    )
    assert got.event is not None and got.error is None


def test_real_use_fits_the_limits() -> None:
    """The documented examples, and each field filled up to its limits."""
    full_info = {f"k{i:03d}": "v" * (HEARTBEAT_INFO.total_chars // 8 - 4) for i in range(8)}
    assert HEARTBEAT_INFO.value_chars == 1024
    full_labels = {f"l{i:02d}": "v" * 124 for i in range(METRIC_LABELS.entries)}
    for type_, version, payload in [
        ("agent.heartbeat", 1, heartbeat({"version": "1.2"})),
        ("agent.heartbeat", 1, heartbeat({"v": "x" * HEARTBEAT_INFO.value_chars})),
        ("agent.heartbeat", 1, heartbeat(full_info)),
        ("metrics.sample", 1, sample({"agent": "agent-7"})),
        ("metrics.sample", 1, sample({"path": "/" * METRIC_LABELS.value_chars})),
        ("metrics.sample", 1, sample(full_labels)),
        ("comms.record", 1, record({"model": "m1"})),
        ("comms.record", 1, record({"tx": "0x" + "ab" * (COMMS_DETAILS.json_bytes // 2 - 20)})),
        ("agent.message", 2, message({"blob": "z" * (MESSAGE_METADATA.json_bytes - 20)})),
        ("llm.request", 3, llm_request({"trace": "t-1"})),
    ]:
        assert registry.decode(wire(type_, payload, version)).type == type_


def test_a_producer_building_an_oversize_payload_is_told_at_once() -> None:
    with pytest.raises(ValidationError, match="info"):
        Heartbeat(agent_id="a", sent_at="2026-01-01T00:00:00Z", info={"x": "v" * HALF_MB})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="labels"):
        MetricSample(series="cpu", timestamp=1, value=1, labels={"host": "h" * 1000})


async def test_the_worker_dead_letters_an_oversize_heartbeat_and_keeps_going(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dead: list[tuple[int, BaseException]] = []

    async def dead_letter(msg: Any, exc: BaseException, consumer: str) -> None:
        dead.append((msg.offset, exc))

    monkeypatch.setattr(processing, "_EOS", False)
    monkeypatch.setattr(processing, "dead_letter", dead_letter)
    stream = Stream(App())
    values = [
        wire("agent.heartbeat", heartbeat({"x": "v" * HALF_MB})),
        wire("agent.heartbeat", heartbeat({"version": "1.2"})),
    ]
    for offset, value in enumerate(values):
        stream.channel.queue.put_nowait(Ev(Msg("agent.heartbeats", 0, offset, 1), value))
    folded: list[int] = []
    async for batch in decoded_batches(stream, consumer="c", max_batch=10, within_s=0.01):
        folded += [i.message.offset for i in batch]
        stream.should_stop = True
    assert folded == [1]
    assert [(offset, type(exc)) for offset, exc in dead] == [(0, InvalidEvent)]
    assert "payload.info" in str(dead[0][1])
