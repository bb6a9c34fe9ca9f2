"""A producer's record whose *output* is too large for the producer or the broker: the
worker crashed on sending it, and again on every restart (a poison pill that takes the
consumer group down partition by partition).

* A dead letter carries the original bytes and key in base64 (4/3 of them) next to its
  other fields: a 760 KB undecodable value, or a 1-byte invalid one under a 750 KB key,
  made a dead letter over the producer's 1,000,000-byte request limit.

The tests build the outputs with the same functions the agents use."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import pytest

from agentstream.schemas import DeadLetter, Event, encode
from agentstream.schemas.errors import UndecodableEvent
from agentstream.streams import processing
from agentstream.streams.app import app
from agentstream.streams.processing import dead_letter_event, dead_letter_of
from agentstream.streams.settings import get_settings

CONSUMER = "enforce_policy"
#: what Kafka adds to a record's key and value in a record batch, at most (aiokafka's
#: estimate for one record is below this)
RECORD_HEADERS = 1024


@dataclass
class Record:
    """The fields of a Faust message a dead letter reads."""

    value: Any
    key: Any = b"sender-1"
    topic: str = "ns.agent.messages"
    partition: int = 3
    offset: int = 41
    timestamp: float | None = 1_700_000_000.5


def assert_sendable(event: Event[Any]) -> bytes:
    """`event` as the worker sends it fits what its readers take (`max_event_bytes`) and
    what the producer sends (`producer_max_request_size`, key and headers included)."""
    value = encode(event)
    assert len(value) <= get_settings().max_event_bytes, len(value)
    record = len(value) + len(event.key.encode()) + RECORD_HEADERS
    assert record <= app.conf.producer_max_request_size, record
    return value


# -- dead letters ---------------------------------------------------------------------------


def test_an_undecodable_value_of_760_kb_has_a_dead_letter_that_can_be_sent() -> None:
    raw = b"\xff" * 760_000
    letter = dead_letter_of(Record(raw), UndecodableEvent("not JSON"), CONSUMER)
    assert_sendable(dead_letter_event(letter))
    kept = base64.b64decode(letter.original_b64)
    assert kept and raw.startswith(kept)
    assert letter.original_truncated and letter.original_size == len(raw)
    # a key of a normal size is never what gives way
    assert base64.b64decode(letter.key_b64 or "") == b"sender-1" and not letter.key_truncated


def test_a_huge_key_is_cut_and_flagged_and_the_original_kept_whole() -> None:
    key = b"k" * 750_000
    letter = dead_letter_of(Record(b"\xff", key=key), UndecodableEvent("not JSON"), CONSUMER)
    assert_sendable(dead_letter_event(letter))
    assert base64.b64decode(letter.original_b64) == b"\xff" and not letter.original_truncated
    kept = base64.b64decode(letter.key_b64 or "")
    assert key.startswith(kept) and len(kept) > 100_000
    assert letter.key_truncated and letter.key_size == len(key)


def test_both_huge_still_fit() -> None:
    letter = dead_letter_of(
        Record(b"\x00" * 1_000_000, key=b"k" * 1_000_000), UndecodableEvent("x" * 9000), CONSUMER
    )
    assert_sendable(dead_letter_event(letter))
    assert letter.original_truncated and letter.key_truncated
    assert len(base64.b64decode(letter.original_b64)) > 600_000  # the original comes first


async def test_a_dead_letter_that_still_does_not_fit_goes_out_without_the_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last line: whatever made a dead letter too large (a bug in the fitting, a limit
    lowered under it), it is sent with the original bytes and key withheld, never not at
    all and never so that the send fails and the worker crashes."""
    sent: list[Event[Any]] = []

    async def emit(topic: str, event: Event[Any], **kw: Any) -> None:
        sent.append(event)

    def unfitted(message: Any, exc: BaseException, consumer: str) -> DeadLetter:
        letter = dead_letter_of(Record(b"\x01"), exc, consumer)
        return letter.model_copy(update={"original_b64": "QUFB" * 300_000})

    monkeypatch.setattr(processing, "emit", emit)
    monkeypatch.setattr(processing, "dead_letter_of", unfitted)
    await processing.dead_letter(Record(b"\x01"), UndecodableEvent("not JSON"), CONSUMER)
    [event] = sent
    assert_sendable(event)
    letter = event.payload
    assert letter.original_b64 == "" and letter.original_truncated
    assert letter.key_b64 is None and letter.key_truncated
    assert (letter.topic, letter.partition, letter.offset) == ("ns.agent.messages", 3, 41)
    assert letter.error_class == "UndecodableEvent"
