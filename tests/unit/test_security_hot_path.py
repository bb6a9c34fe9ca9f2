"""What enforce_policy saves per message must not change what it writes: event ids stay
random version-4 UUIDs (and a forked child never repeats its parent's), each record names
the signers of exactly the policies it applied, decision times are real UTC times to the
millisecond, the replay lookup answers as the table does, and the decision counts per
batch are what counting each decision gives."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from faust.stores.memory import Store

import agentstream.agents.security.agent as agent
from agentstream.agents.security import replay
from agentstream.agents.security.crypto import message_digest, new_key, sign_message
from agentstream.agents.security.decisions import decision_record, new_event_id
from agentstream.agents.security.identity import Identity, IdentityRegistry
from agentstream.agents.security.policy import (
    PolicySet,
    StaticKeys,
    compiled,
    evaluate,
    forwarded_auth,
)
from agentstream.schemas import AgentMessage, Event, encode, registry, utc_now
from agentstream.schemas.messages import AuthProof
from agentstream.schemas.security import AgentIdentity, SecurityPolicy, Verdict
from agentstream.streams.processing import Inbound
from agentstream.streams.tables.security import keys_for


def test_event_ids_are_distinct_uuid4_text() -> None:
    ids = [new_event_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:2000] + ids[-2000:]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
    # every variant nibble and version-4 position is drawn, not fixed by the formatting
    assert {text[19] for text in ids} == set("89ab")
    assert {text[14] for text in ids} == {"4"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_reuse_its_parents_ids() -> None:
    new_event_id()  # the parent's pool now holds the next ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        try:
            os.write(write, ",".join(new_event_id() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split(","))
    os.waitpid(pid, 0)
    parent = {new_event_id() for _ in range(10)}
    assert len(child) == 10 and not child & parent


def _policies(signers: dict[str, str]) -> PolicySet:
    return PolicySet(
        [
            compiled(SecurityPolicy(policy_id=pid, blocked_patterns=["secret"]))
            for pid in ("a", "b", "c")
        ],
        enabled=True,
        default_action=Verdict.DENY,
        signers=signers,
    )


def _record(policies: PolicySet, content: str = "fine") -> dict[str, Any]:
    event = Event.of(
        AgentMessage(message_id="m", sender_id="s", recipient_id="r", content=content),
        source="s",
    )
    result = evaluate(event.payload, policies, StaticKeys())
    return decision_record(
        event,
        result,
        source="enforce_policy",
        evaluated_at=datetime(2026, 12, 5, tzinfo=UTC),
        evaluation_us=1,
        partition=0,
        offset=0,
        signers=policies.signers,
    )


def test_each_record_names_the_signers_of_its_policy_set() -> None:
    first = _policies({"a": "admin-1", "b": "admin-1", "x": "admin-9"})
    one, two = _record(first), _record(first, "a secret")
    assert one["payload"]["policies"] == {"a": 1, "b": 1, "c": 1}
    # only applied policies, and only those with a known signer
    assert one["payload"]["policy_signers"] == {"a": "admin-1", "b": "admin-1"}
    assert two["payload"]["policy_signers"] == one["payload"]["policy_signers"]
    # a new policy set (re-signed by another admin) is not answered from the old one
    second = _policies({"a": "admin-2", "c": "admin-2"})
    assert _record(second)["payload"]["policy_signers"] == {"a": "admin-2", "c": "admin-2"}
    assert _record(_policies({}))["payload"]["policy_signers"] == {}
    assert _record(first)["payload"]["policy_signers"] == {"a": "admin-1", "b": "admin-1"}


def test_the_decision_clock_is_utc_to_the_millisecond() -> None:
    clock = agent._MillisecondClock()
    before = datetime.now(UTC).replace(microsecond=0)
    times = [clock() for _ in range(20_000)]
    after = datetime.now(UTC)
    assert all(t.tzinfo is UTC and t.microsecond % 1000 == 0 for t in times)
    assert before <= times[0] and times[-1] <= after
    assert times == sorted(times)
    # within one millisecond the same object, so its text is formatted once
    assert len({id(t) for t in times}) == len(set(times))


def test_the_replay_lookup_answers_as_the_store() -> None:
    store: Any = Store(url="memory://", app=agent.app, table=replay.table())
    store["k"] = {"p": 1, "o": 2, "at": 3}
    fast = replay.lookup(store)
    assert fast == store.data.get  # the dict's own get, not Mapping.get
    for key in ("k", "missing", ""):
        assert fast(key) == store.get(key)

    plain: dict[str, Any] = {"k": 1}
    assert replay.lookup(plain)("k") == 1 and replay.lookup(plain)("x") is None


@dataclass
class _Result:
    verdict: Verdict
    rules: list[str]


@dataclass
class _Outcome:
    partition: int
    result: _Result
    offset: int
    evaluation_s: float = 0.001


def test_batch_counts_equal_counting_each_decision() -> None:
    outcomes: list[Any] = [
        _Outcome(p, _Result(v, rules), 10 * p + i)
        for p in (0, 1, 3)
        for i, (v, rules) in enumerate(
            (
                (Verdict.ALLOW, []),
                (Verdict.DENY, ["blocked_pattern"]),
                (Verdict.DENY, ["blocked_pattern", "size"]),
                (Verdict.ALLOW, []),
            )
        )
    ]
    expected: dict[tuple[int, str], list[int]] = {}
    for o in outcomes:
        for key in keys_for(o.partition, o.result.verdict.value, o.result.rules):
            expected.setdefault((o.partition, key), []).append(o.offset)
    assert agent._tally(outcomes) == expected


def test_an_unchanged_message_is_forwarded_as_the_object_it_was_read_from() -> None:
    event = Event.of(
        AgentMessage(message_id="m", sender_id="s", recipient_id="r", content="hi"),
        source="s",
        correlation_id="c",
    )
    raw = encode(event)
    decoded, data = registry.parse(raw)
    at = ("ns.agent.messages", 3, 41)
    from_data = agent.forward_bytes(decoded, decoded.payload, data, *at)
    from_model = agent.forward_bytes(decoded, decoded.payload, None, *at)
    forwarded = registry.decode(from_data)
    assert forwarded == registry.decode(from_model)
    # its own event id, derived from the input's coordinates; the input's as causation id
    assert forwarded.event_id == uuid.uuid5(agent.FORWARDED_IDS, "ns.agent.messages\n3\n41")
    assert forwarded.causation_id == str(event.event_id)
    assert forwarded.correlation_id == "c" and forwarded.payload == event.payload
    # a changed (e.g. redacted) message is written from the model, not from the input
    redacted = decoded.payload.model_copy(update={"content": "[redacted]"})
    again = registry.decode(agent.forward_bytes(decoded, redacted, data, *at))
    assert again.payload.content == "[redacted]" and again.event_id == forwarded.event_id


def test_a_forwarded_proof_is_marked_alike_from_the_input_object_and_from_the_model() -> None:
    proof = AuthProof(method="access-token", user_id=7, token="tok-zz9", issued_at=utc_now())
    message = AgentMessage(message_id="m", sender_id="s", recipient_id="r", auth=proof)
    decoded, data = registry.parse(encode(Event.of(message, source="s")))
    at = ("agent.messages", 0, 1)
    fields = forwarded_auth(message.auth, True)
    assert fields == {"token": None, "redacted": True, "verified": True}
    from_model = registry.decode(agent.forward_bytes(decoded, decoded.payload, None, *at, fields))
    raw = agent.forward_bytes(decoded, decoded.payload, data, *at, fields)
    assert registry.decode(raw) == from_model and b"tok-zz9" not in raw
    assert from_model.payload.auth == proof.model_copy(update=fields)


def test_a_forwarded_id_is_the_uuid5_of_the_input_coordinates() -> None:
    for topic, partition, offset in [("agent.messages", 0, 0), ("p.agent.messages", 7, 2**40)]:
        assert agent.forwarded_id(topic, partition, offset) == str(
            uuid.uuid5(agent.FORWARDED_IDS, f"{topic}\n{partition}\n{offset}")
        )
    ids = {agent.forwarded_id("t", p, o) for p in range(3) for o in range(3)}
    assert len(ids) == 9


class _Seen:
    """The replay state `decide` reads and adds to, without the table."""

    def __init__(self) -> None:
        self.remembered: list[str] = []

    def get(self, key: str) -> None:
        return None

    def remember(self, key: str, partition: int, offset: int, at: float) -> None:
        self.remembered.append(key)


@dataclass
class _Record:
    topic: str = "agent.messages"
    partition: int = 0
    offset: int = 5


@pytest.mark.parametrize("message_id", ["m-plain", "ref-sk-abcdef123456"])
def test_the_replay_entry_of_a_decision_is_the_one_its_fold_makes(message_id: str) -> None:
    key = new_key()
    identities = IdentityRegistry([Identity.of(AgentIdentity(agent_id="alice", roles=["a"]))])
    policies = PolicySet(
        [compiled(SecurityPolicy(policy_id="p", level="*", blocked_patterns=["sk-[a-z0-9]{8,}"]))],
        enabled=True,
        default_action=Verdict.DENY,
    )
    message = sign_message(
        AgentMessage(message_id=message_id, sender_id="alice", recipient_id="bob"), key
    )
    parsed, data = registry.parse(encode(Event.of(message, source="alice")))
    inbound = Inbound(parsed, _Record(), data)
    inbound.message.partition = agent._home_partition("alice", agent._partitions(inbound))
    seen = _Seen()
    outcome = agent.decide(
        inbound,
        policies,
        StaticKeys(signing={"alice": key}),
        identities,
        seen,  # type: ignore[arg-type]
    )
    assert outcome.result.verified
    # the live table and a rebuild from the decisions (`agentstream rebuild`) agree
    folded: dict[str, Any] = {}
    replay.apply_decision(folded, registry.decode(orjson.dumps(outcome.decision)))
    assert seen.remembered == list(folded)
    assert "sk-abcdef123456" not in seen.remembered[0]


def test_an_accepted_copy_has_the_digest_its_decision_records() -> None:
    proof = AuthProof(method="access-token", user_id=7, token="tok-zz9", issued_at=utc_now())
    message = AgentMessage(
        message_id="m", sender_id="s", recipient_id="r", content="hi", auth=proof
    )
    parsed, data = registry.parse(encode(Event.of(message, source="s")))
    policies = PolicySet(
        [compiled(SecurityPolicy(policy_id="p", level="*"))],
        enabled=True,
        default_action=Verdict.DENY,
    )
    outcome = agent.decide(Inbound(parsed, _Record(), data), policies, StaticKeys())
    assert outcome.topic == agent.AGENT_MESSAGES_ACCEPTED
    copy = registry.decode(outcome.forwarded).payload
    digest = outcome.decision["payload"]["message_digest"]
    assert copy.auth.token is None and message_digest(copy) == digest == message_digest(message)
    for changed in ({"content": "hi!"}, {"recipient_id": "r2"}, {"metadata": {"k": 1}}):
        assert message_digest(copy.model_copy(update=changed)) != digest
