"""What a dead letter carries (`streams.processing.dead_letter_of`), and the per-consumer
redaction hook (`redact_dead_letters`) — no Kafka: the letter is built, not sent."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agentstream.schemas.errors import InvalidEvent, UndecodableEvent
from agentstream.streams import processing
from agentstream.streams.processing import dead_letter_of, redact_dead_letters
from agentstream.streams.settings import get_settings

TOKEN_RECORD = b'{"type":"agent.message","payload":{"auth":{"token":"tok-secret","user_id":7}'


@dataclass
class Record:
    """The fields of a Faust message a dead letter reads."""

    value: Any
    topic: str = "ns.agent.messages"
    partition: int = 3
    offset: int = 41
    key: Any = b"sender-1"
    timestamp: float | None = 1_700_000_000.5


@pytest.fixture
def consumer() -> Iterator[str]:
    """A consumer name of this test only; its redactor is removed afterwards."""
    name = "test-consumer"
    yield name
    processing._REDACTORS.pop(name, None)


def original(letter: Any) -> bytes:
    return base64.b64decode(letter.original_b64)


def test_letter_carries_original_bytes_and_coordinates(consumer: str) -> None:
    letter = dead_letter_of(Record(TOKEN_RECORD), UndecodableEvent("truncated"), consumer)
    assert original(letter) == TOKEN_RECORD and letter.original_size == len(TOKEN_RECORD)
    assert not letter.original_truncated
    assert (letter.topic, letter.partition, letter.offset) == ("ns.agent.messages", 3, 41)
    assert base64.b64decode(letter.key_b64 or "") == b"sender-1"
    assert letter.timestamp_ms == 1_700_000_000_500
    assert letter.error_class == "UndecodableEvent" and "truncated" in letter.error_message
    assert letter.consumer == consumer and not letter.retriable


def test_redactor_applies_to_its_consumer_only(consumer: str) -> None:
    redact_dead_letters(consumer, lambda raw: raw.replace(b"tok-secret", b"[REDACTED]"))
    exc = InvalidEvent("event type 'x' does not belong on ns.agent.messages", type="x")
    letter = dead_letter_of(Record(TOKEN_RECORD), exc, consumer)
    want = TOKEN_RECORD.replace(b"tok-secret", b"[REDACTED]")
    assert original(letter) == want and letter.original_size == len(want)
    # the coordinates still point at the original record, the reason is kept
    assert (letter.topic, letter.partition, letter.offset) == ("ns.agent.messages", 3, 41)
    assert letter.error_class == "InvalidEvent" and "does not belong" in letter.error_message
    other = dead_letter_of(Record(TOKEN_RECORD), exc, consumer + "-other")
    assert original(other) == TOKEN_RECORD


def test_enforce_policy_blanks_access_tokens_on_every_path() -> None:
    """The security agent registers its redactor on import: dead letters written by
    decoding (`decoded_batches`), by `guarded` or by the agent itself all go through
    `dead_letter_of` with its consumer name."""
    from agentstream.agents.security.agent import CONSUMER

    for exc in (UndecodableEvent("bad json"), RuntimeError("a bug in deciding")):
        letter = dead_letter_of(Record(TOKEN_RECORD), exc, CONSUMER)
        assert b"tok-secret" not in original(letter)
        assert b'"token":"[REDACTED]"' in original(letter)
        assert letter.consumer == CONSUMER and letter.offset == 41


def test_a_failing_redactor_withholds_the_bytes(consumer: str) -> None:
    def broken(raw: bytes) -> bytes:
        raise ValueError("cannot parse")

    redact_dead_letters(consumer, broken)
    letter = dead_letter_of(Record(TOKEN_RECORD), UndecodableEvent("x"), consumer)
    assert original(letter) == b""
    assert letter.original_truncated and letter.original_size == len(TOKEN_RECORD)
    assert (letter.partition, letter.offset) == (3, 41)


def test_the_cap_applies_to_the_redacted_bytes(consumer: str) -> None:
    cap = get_settings().deadletter_max_original_bytes
    redact_dead_letters(consumer, lambda raw: raw[:-10])
    big = b"x" * (cap + 5)
    letter = dead_letter_of(Record(big), UndecodableEvent("x"), consumer)
    assert letter.original_size == cap - 5 and not letter.original_truncated
    letter = dead_letter_of(Record(big + b"y" * 20), UndecodableEvent("x"), consumer)
    assert letter.original_truncated and letter.original_size == cap + 15
    assert len(original(letter)) == cap


def test_non_bytes_and_missing_values(consumer: str) -> None:
    assert original(dead_letter_of(Record(None), UndecodableEvent("x"), consumer)) == b""
    assert original(dead_letter_of(Record("text"), UndecodableEvent("x"), consumer)) == b"text"
    letter = dead_letter_of(Record(b"v", key="not-bytes"), UndecodableEvent("x"), consumer)
    assert letter.key_b64 is None


def test_a_record_dead_lettered_again_is_the_same_event(consumer: str) -> None:
    # At-least-once replays a crash's records: the same bad record dead-lettered twice
    # must be one event to a consumer deduplicating on event ids (docs/guarantees.md)
    # and to `audit report`, which counts dead letters.
    from agentstream.agents.audit.report import ReportBuilder
    from agentstream.streams.processing import dead_letter_event

    bad = UndecodableEvent("truncated")
    first = dead_letter_event(dead_letter_of(Record(b"{"), bad, consumer))
    again = dead_letter_event(dead_letter_of(Record(b"{"), InvalidEvent("other"), consumer))
    assert first.event_id == again.event_id
    others = [
        dead_letter_event(dead_letter_of(Record(b"{", offset=42), bad, consumer)),
        dead_letter_event(dead_letter_of(Record(b"{", partition=4), bad, consumer)),
        dead_letter_event(dead_letter_of(Record(b"{", topic="ns.llm.requests"), bad, consumer)),
        dead_letter_event(dead_letter_of(Record(b"{"), bad, "another-consumer")),
    ]
    assert len({first.event_id, *(o.event_id for o in others)}) == 5
    report = ReportBuilder()
    for offset, event in enumerate((first, again, *others)):
        report.add("pipeline.deadletter", event, 0, offset)
    assert report.dead_letters[consumer] == 4
    assert report.duplicates == 1


def test_the_room_goes_to_a_normal_key_then_the_original_then_the_rest_of_the_key() -> None:
    from agentstream.streams.processing import fit_dead_letter

    assert fit_dead_letter(100, 8, 10_000, cap=50) == (50, 8)  # the cap holds
    assert fit_dead_letter(100, None, 10_000, cap=1000) == (100, 0)
    # a key of a normal size stays whole however large the original
    assert fit_dead_letter(10**6, 100, 1000, cap=10**6) == ((1000 - 136) // 4 * 3, 100)
    # a huge key takes what the original leaves
    assert fit_dead_letter(1, 750_000, 1000, cap=10**6) == (1, (1000 - 4) // 4 * 3)
    kept, key = fit_dead_letter(10**6, 10**6, 100_000, cap=50_000)
    assert kept == 50_000 and key == (100_000 - 66_668) // 4 * 3
    assert fit_dead_letter(10, 10, -5, cap=100) == (0, 0)  # no room at all


def test_a_dead_letter_withheld_keeps_its_coordinates(consumer: str) -> None:
    letter = processing.withheld(dead_letter_of(Record(b"xyz"), UndecodableEvent("x"), consumer))
    assert original(letter) == b"" and letter.original_truncated and letter.original_size == 3
    assert letter.key_b64 is None and letter.key_truncated and letter.key_size == 8
    assert (letter.topic, letter.partition, letter.offset) == ("ns.agent.messages", 3, 41)
    keyless = dead_letter_of(Record(b"xyz", key=None), UndecodableEvent("x"), consumer)
    assert not processing.withheld(keyless).key_truncated


def test_a_whole_record_batch_is_withheld_from_a_redacting_consumer(consumer: str) -> None:
    """A stand-in for a record batch the client could not parse carries the raw batch,
    compressed if it was: a redactor cannot see inside it, so a secret would pass."""
    from agentstream.streams.record_batches import Unreadable

    redact_dead_letters(consumer, lambda raw: raw.replace(b"tok-secret", b"[REDACTED]"))
    raw_batch = Unreadable(
        b"\x00compressed" + TOKEN_RECORD,
        reason="record batch 5..8 (zstd) unreadable",
        first_offset=5,
        last_offset=8,
        whole_batch=True,
    )
    letter = dead_letter_of(Record(raw_batch), UndecodableEvent("x"), consumer)
    assert original(letter) == b"" and letter.original_truncated
    assert letter.original_size == len(raw_batch) and letter.offset == 41
    # one record's value is redacted as any value; a consumer without a redactor keeps
    # the batch's bytes for whoever investigates
    one = Unreadable(TOKEN_RECORD, reason="header key", first_offset=41, last_offset=41)
    assert b"tok-secret" not in original(
        dead_letter_of(Record(one), UndecodableEvent("x"), consumer)
    )
    kept = dead_letter_of(Record(raw_batch), UndecodableEvent("x"), consumer + "-other")
    assert original(kept) == bytes(raw_batch)
