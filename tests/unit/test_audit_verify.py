"""The chain walk names each kind of tampering correctly, on chains sealed by the real
`streams.audit_chain.seal`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from agentstream.agents.audit.verify import ChainRecord, chain_record, check_chain
from agentstream.schemas import Event, PolicyDecision, encode
from agentstream.schemas.registry import registry
from agentstream.schemas.security import Verdict
from agentstream.streams.audit_chain import GENESIS, record_hash, seal
from agentstream.streams.record_batches import Unreadable


def decision(i: int) -> Event[PolicyDecision]:
    return Event.of(
        PolicyDecision(
            message_id=f"m{i}",
            message_event_id=f"e{i}",
            sender_id="agent-1",
            verdict=Verdict.ALLOW if i % 2 else Verdict.DENY,
            reasons=[f"r{i}"],
            evaluated_at=datetime(2026, 1, 1, tzinfo=UTC),
            evaluation_us=i,
        ),
        source="enforce_policy",
    )


def sealed_chain(n: int) -> list[bytes]:
    out, prev = [], GENESIS
    for i in range(n):
        ev = seal(decision(i), prev)
        prev = ev.payload.hash
        out.append(encode(ev))
    return out


def walk(values: list[bytes], anchor: str | None = GENESIS) -> list[tuple[str, int]]:
    recs = [chain_record(off, v) for off, v in enumerate(values)]
    return [(f.kind, f.offset) for f in check_chain(recs, anchor)]


def test_intact_chain_has_no_findings() -> None:
    assert walk(sealed_chain(20)) == []


def test_altered_field_is_caught_at_its_offset() -> None:
    chain = sealed_chain(6)
    chain[3] = chain[3].replace(b'"verdict":"allow"', b'"verdict":"deny"')
    assert walk(chain) == [("altered", 3)]


def test_undecodable_record_is_altered() -> None:
    chain = sealed_chain(4)
    chain[1] = b"\x00garbage"
    kinds = walk(chain)
    assert ("altered", 1) in kinds


def test_deleted_record_is_caught_at_the_next_one() -> None:
    chain = sealed_chain(6)
    del chain[2]
    assert walk(chain) == [("deleted", 2)]


def test_deleted_first_record() -> None:
    chain = sealed_chain(4)[1:]
    assert walk(chain) == [("deleted", 0)]


def test_inserted_forgery_with_a_plausible_prev_hash() -> None:
    chain = sealed_chain(6)
    prev = chain_record(0, chain[2]).hash
    forged = encode(seal(decision(99), prev))
    chain.insert(3, forged)
    assert walk(chain) == [("inserted", 3)]


def test_inserted_forgery_with_a_random_prev_hash() -> None:
    chain = sealed_chain(6)
    chain.insert(2, encode(seal(decision(99), "ab" * 32)))
    assert walk(chain) == [("inserted", 2)]


def test_inserted_run_of_two_chained_forgeries() -> None:
    chain = sealed_chain(6)
    a = seal(decision(98), chain_record(0, chain[1]).hash)
    b = seal(decision(99), a.payload.hash)
    chain[2:2] = [encode(a), encode(b)]
    assert walk(chain) == [("inserted", 2), ("inserted", 3)]


def test_duplicate_is_inserted() -> None:
    chain = sealed_chain(5)
    chain.insert(3, chain[2])
    assert walk(chain) == [("inserted", 3)]


def test_swap_is_one_reordering() -> None:
    chain = sealed_chain(8)
    chain[3], chain[4] = chain[4], chain[3]
    assert walk(chain) == [("reordered", 3)]


def test_record_moved_later_is_one_reordering() -> None:
    chain = sealed_chain(8)
    moved = chain.pop(2)
    chain.insert(5, moved)
    assert walk(chain) == [("reordered", 2)]


def test_each_kind_in_one_partition() -> None:
    chain = sealed_chain(14)
    chain[1] = chain[1].replace(b'"reasons":["r1"]', b'"reasons":["forged"]')
    del chain[3]  # r3 gone: r4 now at 3
    chain[4], chain[5] = chain[5], chain[4]  # r6 before r5
    forged = encode(seal(decision(77), chain_record(0, chain[6]).hash))  # after r7
    chain.insert(7, forged)
    got = walk(chain)
    assert got == [("altered", 1), ("deleted", 3), ("reordered", 4), ("inserted", 7)]


def test_unanchored_start_is_not_a_deletion() -> None:
    chain = sealed_chain(6)[2:]
    assert walk(chain, anchor=None) == []
    assert walk(chain, anchor=GENESIS) == [("deleted", 0)]


def test_unsealed_record_is_reported() -> None:
    rec = chain_record(0, encode(decision(1)))
    assert rec.computed is None
    assert [f.kind for f in check_chain([rec], GENESIS)] == ["altered"]
    assert isinstance(rec, ChainRecord)


def test_a_record_the_client_cannot_parse_is_altered_whatever_value_it_kept() -> None:
    """A stand-in (`streams.record_batches`) is a finding, not a pass: its value may be a
    genuine sealed record, but a worker never writes a record the client cannot parse,
    and what was not parsed was not checked. Its links still place it in the chain."""
    chain: list[bytes] = sealed_chain(5)
    why = "header key b'\\xff' is not UTF-8"
    chain[2] = Unreadable(chain[2], reason=why, first_offset=2, last_offset=2)
    recs = [chain_record(off, v) for off, v in enumerate(chain)]
    [found] = check_chain(recs, GENESIS)
    assert (found.kind, found.offset) == ("altered", 2)
    assert found.detail == f"the Kafka client cannot parse it (offset 2: {why})"


def test_a_batch_the_client_cannot_parse_is_altered_and_its_records_missing() -> None:
    chain = sealed_chain(6)
    stand_in = Unreadable(
        b"raw batch", reason="cannot decompress", first_offset=2, last_offset=3, whole_batch=True
    )
    recs = [chain_record(off, chain[off]) for off in (0, 1)]
    recs += [chain_record(3, stand_in), chain_record(4, chain[4]), chain_record(5, chain[5])]
    found = check_chain(recs, GENESIS)
    assert [(f.kind, f.offset) for f in found] == [("altered", 3), ("deleted", 4)]
    assert "offsets 2..3: cannot decompress" in found[0].detail


def _v1(i: int, prev: str) -> tuple[bytes, str]:
    """A decision as a v1 worker wrote it: no `message_digest`, schema version 1, sealed
    over its own JSON."""
    data: dict[str, Any] = orjson.loads(encode(decision(i)))
    del data["payload"]["message_digest"]
    data["schema_version"] = 1
    data["payload"]["prev_hash"] = prev
    data["payload"]["hash"] = record_hash(data)
    return orjson.dumps(data), data["payload"]["hash"]


def test_a_chain_of_v1_decisions_and_v2_after_them_still_verifies() -> None:
    values, prev = [], GENESIS
    for i in range(3):
        value, prev = _v1(i, prev)
        values.append(value)
    for i in range(3, 6):  # an upgraded worker continues the chain
        ev = seal(decision(i), prev)
        prev = ev.payload.hash
        values.append(encode(ev))
    assert walk(values) == []
    old, new = registry.decode(values[0]), registry.decode(values[-1])
    assert old.schema_version == new.schema_version == PolicyDecision.VERSION == 2
    assert old.payload.message_digest == ""  # v1 bound none
    # and an altered v1 record is still caught
    values[1] = values[1].replace(b'"verdict":"allow"', b'"verdict":"deny"')
    assert walk(values) == [("altered", 1)]


def test_a_record_too_deep_to_hash_is_altered_not_a_crash() -> None:
    # metadata nested past what orjson serialises (254 levels) decodes, but its hash
    # cannot be computed: `record_hash` raised out of `audit verify` (a traceback), so
    # one such record on llm.responses stopped every audit of the topic
    from agentstream.schemas.llm import LLMResponse

    deep: Any = {}
    for _ in range(300):
        deep = {"d": deep}
    ev = seal(Event.of(LLMResponse(request_id="r1", status="completed"), source="x"), GENESIS)
    data = orjson.loads(encode(ev))
    data["payload"]["metadata"] = deep
    raw = _dumps_deep(data)
    rec = chain_record(0, raw)
    assert rec.computed is None and rec.error, rec
    assert ("altered", 0) in [(f.kind, f.offset) for f in check_chain([rec], GENESIS)]


def _dumps_deep(data: Any) -> bytes:
    # orjson refuses to write past 254 levels; a producer may send any bytes
    import json

    return json.dumps(data).encode()


def test_a_chain_copied_into_another_partition_or_topic_is_reported() -> None:
    # the hash and its signature cover neither topic nor partition: partition 0's whole
    # chain copied from genesis into an empty partition 5 (or onto llm.responses) walked
    # clean, and `audit report` counted those decisions twice (security review)
    from agentstream.agents.audit.verify import Placement

    chain = []
    prev = GENESIS
    for i in range(3):
        ev = decision(i)
        ev = ev.model_copy(
            update={"payload": ev.payload.model_copy(update={"source_partition": 0})}
        )
        ev = seal(ev, prev)
        prev = ev.payload.hash
        chain.append(encode(ev))
    decisions = ("security.decision",)

    def kinds(place: Placement) -> list[tuple[str, int]]:
        recs = [chain_record(off, v, place=place) for off, v in enumerate(chain)]
        return [(f.kind, f.offset) for f in check_chain(recs, GENESIS)]

    assert kinds(Placement(decisions, 0)) == []
    assert kinds(Placement(decisions, 5)) == [("altered", 0), ("altered", 1), ("altered", 2)]
    assert kinds(Placement(("llm.response",), 0)) == [
        ("altered", 0),
        ("altered", 1),
        ("altered", 2),
    ]
