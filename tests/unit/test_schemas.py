"""Schemas: round trips, upcasting and every kind of bad input ends in one typed error."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from agentstream.schemas import (
    AgentMessage,
    DeadLetter,
    Event,
    Heartbeat,
    LLMRequest,
    MetricSample,
    SecurityPolicy,
    encode,
    registry,
)
from agentstream.schemas.errors import (
    InvalidEvent,
    PipelineError,
    SchemaError,
    UndecodableEvent,
    UnknownEventType,
    UnsupportedSchemaVersion,
)


def _msg(**kw: Any) -> AgentMessage:
    base: dict[str, Any] = {
        "message_id": "m1",
        "sender_id": "a1",
        "recipient_id": "a2",
        "content": "hi",
    }
    return AgentMessage(**{**base, **kw})


def test_round_trip_preserves_every_field() -> None:
    ev = Event.of(_msg(metadata={"k": [1, 2]}), source="agent-a1", correlation_id="c-1")
    back = registry.decode(encode(ev))
    assert back == ev
    assert isinstance(back.payload, AgentMessage)
    assert back.occurred_at.tzinfo is not None
    assert back.key == "a1"
    assert back.correlation_id == "c-1"


def test_occurred_at_is_normalised_to_utc() -> None:
    local = datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    ev = Event.of(_msg(), source="s", occurred_at=local)
    assert ev.occurred_at == local and ev.occurred_at.utcoffset() == timedelta(0)
    assert b'"occurred_at":"2026-01-01T10:00:00Z"' in encode(ev)


def test_naive_timestamp_is_rejected() -> None:
    data = orjson.loads(encode(Event.of(_msg(), source="s")))
    data["occurred_at"] = "2026-01-01T10:00:00"
    with pytest.raises(InvalidEvent, match="occurred_at"):
        registry.from_dict(data)


def test_caused_keeps_correlation_and_links_cause() -> None:
    first = Event.of(_msg(), source="s")
    follow = first.caused(_msg(message_id="m2"), source="enforce_policy")
    assert follow.correlation_id == first.correlation_id == str(first.event_id)
    assert follow.causation_id == str(first.event_id)


def test_v1_agent_message_is_upcast_on_read() -> None:
    v1 = {
        "event_id": "5f0c3c3e-3f0b-4a8e-9a59-1c1f3a6e2b10",
        "type": "agent.message",
        "schema_version": 1,
        "occurred_at": "2025-06-01T00:00:00Z",
        "source": "legacy",
        "correlation_id": "c",
        "payload": {
            "message_id": "m",
            "sender_id": "a",
            "recipient_id": "b",
            "body": "old text",
            "role": "planner",
        },
    }
    ev = registry.decode(json.dumps(v1).encode())
    assert ev.schema_version == AgentMessage.VERSION
    assert ev.payload.content == "old text"
    assert ev.payload.sender_role == "planner"
    assert ev.payload.security_level == "standard"
    # parse hands back no object for it: what was read is not the current version
    assert registry.parse(json.dumps(v1).encode()) == (ev, None)


def test_parse_hands_back_the_object_a_current_event_was_read_from() -> None:
    raw = encode(Event.of(_msg(), source="s"))
    event, data = registry.parse(raw)
    assert event == registry.decode(raw)
    assert data == orjson.loads(raw)
    # the caller's own: changing it leaves the event as it was
    assert data is not None
    data["source"] = "changed"
    data["payload"]["content"] = "changed"
    assert event == registry.decode(raw)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", UndecodableEvent),
        (b"not json", UndecodableEvent),
        (b"\xff\xfe", UndecodableEvent),
        (b"[1,2]", UndecodableEvent),
        (b'"a string"', UndecodableEvent),
        (b"{}", InvalidEvent),
        (b'{"type": 5}', InvalidEvent),
        (b'{"type": "no.such", "schema_version": 1}', UnknownEventType),
        (
            b'{"type": "agent.message", "schema_version": 99, "payload": {}}',
            UnsupportedSchemaVersion,
        ),
        (b'{"type": "agent.message", "schema_version": "2"}', InvalidEvent),
        (b'{"type": "agent.message", "schema_version": true}', InvalidEvent),
        (
            b'{"type": "agent.heartbeat", "schema_version": 1, "source": "s", "payload": {}}',
            InvalidEvent,
        ),
        (
            b'{"type": "agent.message", "schema_version": 1, "source": "s", "payload": []}',
            InvalidEvent,
        ),
    ],
)
def test_bad_input_raises_one_typed_error(raw: bytes, error: type[SchemaError]) -> None:
    with pytest.raises(error) as info:
        registry.decode(raw)
    assert isinstance(info.value, PipelineError)
    assert info.value.retriable is False
    assert str(info.value)


def test_oversized_event_is_refused_before_parsing() -> None:
    ev = Event.of(_msg(content="x" * 5000), source="s")
    with pytest.raises(UndecodableEvent, match="exceeds"):
        registry.decode(encode(ev), max_bytes=4096)


def test_wrong_types_and_unknown_fields_are_named() -> None:
    data = orjson.loads(encode(Event.of(_msg(), source="s")))
    data["payload"]["sender_id"] = 42
    data["payload"]["surprise"] = True
    with pytest.raises(InvalidEvent) as info:
        registry.from_dict(data)
    assert "payload.sender_id" in str(info.value)
    assert "payload.surprise" in str(info.value)


def test_missing_field_is_named() -> None:
    data = orjson.loads(encode(Event.of(_msg(), source="s")))
    del data["payload"]["recipient_id"]
    with pytest.raises(InvalidEvent, match=r"payload\.recipient_id"):
        registry.from_dict(data)


def test_llm_config_never_carries_an_api_key() -> None:
    payload = {
        "request_id": "r1",
        "agent_id": "a",
        "context": {"messages": [{"role": "user", "content": "hi"}]},
        "config": {"model": "m", "api_key": "sk-secret"},
    }
    with pytest.raises(InvalidEvent, match="api_key"):
        registry.from_dict(
            {"type": "llm.request", "schema_version": 1, "source": "s", "payload": payload}
        )
    assert "api_key" not in LLMRequest.model_json_schema()["$defs"]["LLMConfig"]["properties"]


def test_non_finite_metric_values_are_invalid() -> None:
    raw = (
        b'{"type":"metrics.sample","schema_version":1,"source":"s",'
        b'"payload":{"series":"cpu","timestamp":1,"value":NaN}}'
    )
    with pytest.raises(SchemaError):
        registry.decode(raw)
    assert MetricSample(series="cpu", timestamp=1, value=0.5).value == 0.5


def test_every_registered_type_has_a_version_and_key_field() -> None:
    for model in registry.models():
        assert model.VERSION >= 1
        assert model.KEY_FIELD is None or model.KEY_FIELD in model.model_fields


def test_policy_and_deadletter_models_keep_design_fields() -> None:
    assert {
        "level",
        "allowed_patterns",
        "blocked_patterns",
        "max_message_size",
        "require_encryption",
        "require_authentication",
        "allowed_roles",
    } <= set(SecurityPolicy.model_fields)
    assert {
        "original_b64",
        "topic",
        "partition",
        "offset",
        "key_b64",
        "error_class",
        "error_message",
        "consumer",
    } <= set(DeadLetter.model_fields)
    hb = Heartbeat(agent_id="a", sent_at=datetime.now(UTC))
    assert Event.of(hb, source="a").key == "a"


@pytest.mark.parametrize("occurred_at", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"])
def test_a_time_out_of_range_in_utc_is_an_invalid_event(occurred_at: str) -> None:
    # astimezone(UTC) overflows for these; an OverflowError is no SchemaError, so it left
    # the decoding stage before any dead letter and crash-looped every consumer on replay
    raw = orjson.dumps(
        {
            "type": "agent.message",
            "schema_version": 2,
            "event_id": "00000000-0000-4000-8000-000000000001",
            "occurred_at": occurred_at,
            "source": "x",
            "correlation_id": "c",
            "payload": {"message_id": "m", "sender_id": "a", "recipient_id": "b", "content": ""},
        }
    )
    with pytest.raises(InvalidEvent, match="occurred_at"):
        registry.decode(raw)


def test_no_envelope_or_payload_makes_decoding_raise_anything_but_a_schema_error() -> None:
    # Every bad input must become a SchemaError (a dead letter); anything else escapes the
    # decoding stage, is never acknowledged and comes back after every restart.
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from agentstream.schemas.errors import SchemaError

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),  # what JSON bytes carry here
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
        st.sampled_from(
            ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "1e400", "-0", "P1D"]
        ),
    )
    values = st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
        max_leaves=8,
    )
    types = st.sampled_from(sorted(registry.types()))

    @settings(max_examples=400, deadline=None)
    @given(types, st.dictionaries(st.text(max_size=12), values, max_size=6), values)
    def check(type_: str, payload: dict[str, Any], occurred: Any) -> None:
        data = {
            "type": type_,
            "schema_version": 1,
            "event_id": "00000000-0000-4000-8000-000000000001",
            "occurred_at": occurred,
            "source": "x",
            "payload": payload,
        }
        with contextlib.suppress(SchemaError):  # a dead letter; anything else fails here
            registry.decode(orjson.dumps(data))

    check()


@pytest.mark.parametrize(
    ("type_", "payload"),
    [
        ("agent.heartbeat", {"agent_id": "victim", "sent_at": "9999-12-31T23:59:59-14:00"}),
        (
            "comms.record",
            {
                "record_id": "r",
                "agent_id": "a",
                "kind": "message",
                "recorded_at": "0001-01-01T00:00:00+14:00",
            },
        ),
    ],
)
def test_a_payload_time_out_of_range_in_utc_is_an_invalid_event(
    type_: str, payload: dict[str, Any]
) -> None:
    # such a sent_at was accepted, then crash-looped the heartbeat monitor when it built
    # a transition (fromtimestamp: year 10000), restored from the changelog each restart
    raw = orjson.dumps({"type": type_, "schema_version": 1, "source": "x", "payload": payload})
    with pytest.raises(InvalidEvent, match="range of times in UTC"):
        registry.decode(raw)


def test_a_reason_quotes_the_inputs_keys_without_their_line_breaks() -> None:
    # the reason is logged and put into the dead letter: a key of the sender's must not
    # add a forged log line or an escape sequence to it
    key = "k\n[2030-01-01 00:00:00,000] [1] [WARNING] agentstream: all clear\x1b]0;x\x07"
    raw = orjson.dumps(
        {
            "type": "agent.heartbeat",
            "schema_version": 1,
            "source": "x",
            "payload": {"agent_id": "a", "sent_at": "2026-01-01T00:00:00Z", "info": {key: 1}},
        }
    )
    with pytest.raises(InvalidEvent) as caught:
        registry.decode(raw)
    text = str(caught.value)
    assert "\n" not in text and "\x1b" not in text, text
    assert "all clear" in text  # shown, quoted
