"""A producer's record whose *output* is too large for the producer or the broker: the
worker crashed on sending it, and again on every restart (a poison pill that takes the
consumer group down partition by partition).

* A dead letter carries the original bytes and key in base64 (4/3 of them) next to its
  other fields: a 760 KB undecodable value, or a 1-byte invalid one under a 750 KB key,
  made a dead letter over the producer's 1,000,000-byte request limit.
* A rejected copy carries the masked fields as the patterns saw them, normalised: NFKC
  spells U+FDFA out in 18 characters (33 bytes for 3), and a masked metadata text repeats
  its whole path, so a rejected copy grew ten to a hundred times past its input.

The unit tests build the outputs with the same functions the agents use; the one marked
`integration` sends both attacks to a worker on the real broker."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from agentstream.agents.security.policy import (
    PolicySet,
    StaticKeys,
    compiled,
    evaluate,
    masked_copy,
    redact,
)
from agentstream.schemas import AgentMessage, DeadLetter, Event, encode, registry
from agentstream.schemas.errors import UndecodableEvent
from agentstream.schemas.security import SecurityConfig, SecurityPolicy, Verdict
from agentstream.streams import processing
from agentstream.streams.app import app
from agentstream.streams.processing import dead_letter_event, dead_letter_of
from agentstream.streams.settings import get_settings

CONSUMER = "enforce_policy"
#: what Kafka adds to a record's key and value in a record batch, at most (aiokafka's
#: estimate for one record is below this)
RECORD_HEADERS = 1024
#: how much longer than the field it replaces a masked field may be (docs/security.md)
MASKED_ROOM = 1024


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


# -- rejected copies ------------------------------------------------------------------------

PASSWORDS = SecurityPolicy(
    policy_id="no-passwords", level="*", blocked_patterns=[r"(?i)password\s*[:=]"]
)


def policy_set(*policies: SecurityPolicy, redaction: str = "mask") -> PolicySet:
    return PolicySet(
        [compiled(p) for p in policies],
        enabled=True,
        default_action=Verdict.ALLOW,
        config=SecurityConfig(rejected_redaction=redaction),  # type: ignore[arg-type]
    )


def rejected(message: AgentMessage, policies: PolicySet) -> AgentMessage:
    """The rejected copy of `message`, as `enforce_policy` makes it and a reader of the
    rejected topic gets it. The record is at most a little larger than its input: the
    reasons (what audits count, unchanged) and a little room per masked field."""
    event = Event.of(message, source=message.sender_id)
    result = evaluate(message, policies, StaticKeys())
    assert result.verdict is Verdict.DENY
    notes = {"rejection_reasons": result.reasons, "rejection_rules": result.rules}
    out = encode(
        event.model_copy(update={"payload": redact(masked_copy(message, result.masked), notes)})
    )
    bound = len(encode(event)) + len(orjson.dumps(notes)) + 5 * MASKED_ROOM
    assert len(out) <= bound, (len(encode(event)), len(out))
    back: AgentMessage = registry.decode(out).payload
    assert back.metadata["rejection_reasons"] == result.reasons
    assert back.metadata["rejection_rules"] == result.rules == ["blocked_patterns"]
    return back


def _message(content: str = "hello", **kw: Any) -> AgentMessage:
    ids = {"message_id": "m1", "sender_id": "s1", "recipient_id": "r1", **kw}
    return AgentMessage(content=content, **ids)


@pytest.mark.parametrize("limit", [65_536, 300_000])
def test_normalisation_does_not_make_a_rejected_copy_ten_times_larger(limit: int) -> None:
    policy = PASSWORDS.model_copy(update={"max_message_size": limit})
    content = "password: " + "\ufdfa" * ((limit - 10) // 3)
    copy = rejected(_message(content), policy_set(policy))
    assert copy.content.startswith("[MASKED] \u0635\u0644\u0649")  # U+FDFA spelled out
    assert copy.content.endswith("[TRUNCATED]")


@pytest.mark.parametrize("redaction", ["mask", "hash"])
def test_masked_ids_stay_ids(redaction: str) -> None:
    # 128 one-character matches: "[MASKED]," each, 1,152 characters for a 256-character
    # id, which no reader of the rejected topic could decode (an id is 256 at most)
    policy = SecurityPolicy(policy_id="p", level="*", blocked_patterns=["q"])
    message = _message("q", message_id="q," * 128)
    copy = rejected(message, policy_set(policy, redaction=redaction))
    assert len(copy.message_id) <= 256 and copy.message_id.endswith("[TRUNCATED]")
    assert "q" not in copy.message_id.removesuffix("[TRUNCATED]").replace("[MASKED]", "")


def test_masked_metadata_does_not_repeat_its_paths_past_the_input() -> None:
    # 14 levels of 64-character keys, then 4,000 one-letter leaves: every masked text is
    # listed under its whole path (about 900 bytes), 158 times the input
    deep: dict[str, Any] = {}
    node = deep
    for level in range(14):
        node[f"{level:02d}" + "k" * 62] = node = {}
    for i in range(4000):
        node[f"x{i}"] = "q"
    policy = SecurityPolicy(policy_id="p", level="*", blocked_patterns=["q"])
    copy = rejected(_message(metadata=deep), policy_set(policy, redaction="hash"))
    masked = copy.metadata["masked"]
    assert masked and all("q" not in t.replace("[TRUNCATED]", "") for t in masked.values())
    assert copy.metadata["masked_withheld"] == 4000 - len(masked)


def test_a_small_rejected_copy_is_as_before() -> None:
    message = _message("my password: hunter2", metadata={"note": "password=x"})
    copy = rejected(message, policy_set(PASSWORDS))
    assert copy.content == "my [MASKED] hunter2"
    assert copy.metadata["masked"] == {"metadata.note": "[MASKED]x"}
    assert "masked_withheld" not in copy.metadata


# -- on the real broker -----------------------------------------------------------------------


@pytest.mark.integration
async def test_outputs_too_large_for_the_broker_do_not_crash_the_worker(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    """Both attacks against a worker with the default limits (and a policy whose size
    limit lets 150 KB of content be scanned): every record ends where it belongs and the
    worker keeps running. Before, the first bad record crashed it, and every restart."""
    from aiokafka import AIOKafkaProducer

    from agentstream.streams.admin import ensure_topics
    from agentstream.streams.settings import Settings
    from agentstream.streams.topics import SECURITY_POLICIES
    from tests.support import AdminSigner, Worker, read_topic, with_admin_key

    signer = AdminSigner()
    env = with_admin_key({**settings_env, "AGENTSTREAM_AGENTS": "security"}, tmp_path, signer)
    settings = Settings.from_env(env)
    await ensure_topics(settings)
    policy = PASSWORDS.model_copy(update={"max_message_size": 200_000})
    big = "password: " + "\ufdfa" * 50_000  # 150 KB: 1.65 MB normalised
    inputs = settings.topic("agent.messages")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        for payload in (policy, SecurityConfig(default_action="allow")):
            key, value = signer.record(payload)
            await producer.send_and_wait(settings.topic(SECURITY_POLICIES), value, key=key)
        worker = Worker(env, tmp_path / "worker.log").start()
        try:
            await producer.send_and_wait(inputs, b"\xff" * 760_000, key=b"k", partition=0)
            await producer.send_and_wait(inputs, b"\xff", key=b"k" * 750_000, partition=0)
            for mid, content in (("big", big), ("after", "hello")):
                event = Event.of(_message(content, message_id=mid), source="s1")
                await producer.send_and_wait(inputs, encode(event), key=b"s1", partition=0)
            letters = await read_topic(
                settings.bootstrap, settings.topic("pipeline.deadletter"), expect=2, timeout=60
            )
            refused = await read_topic(
                settings.bootstrap, settings.topic("agent.messages.rejected"), expect=1, timeout=60
            )
            accepted = await read_topic(
                settings.bootstrap, settings.topic("agent.messages.accepted"), expect=1, timeout=60
            )
            assert worker.alive(), worker.tail()
        finally:
            worker.stop()
    finally:
        await producer.stop()
    dead = sorted((ev.payload for _, ev in letters if ev is not None), key=lambda d: d.offset)
    assert [(d.original_size, d.original_truncated, d.key_truncated) for d in dead] == [
        (760_000, True, False),
        (1, False, True),
    ]
    assert [ev.payload.message_id for _, ev in refused if ev is not None] == ["big"]
    [(rec, copy)] = refused
    assert copy is not None and rec.value is not None and len(rec.value) < 160_000
    assert copy.payload.metadata["rejection_rules"] == ["blocked_patterns"]
    assert [ev.payload.message_id for _, ev in accepted if ev is not None] == ["after"]
