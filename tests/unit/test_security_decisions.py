"""The hand-built decision record is exactly the pydantic event, sealed exactly like
`streams.audit_chain.seal`: verification cannot tell the two paths apart."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from agentstream.agents.security.decisions import bound_digest, decision_record, seal_record
from agentstream.agents.security.policy import (
    PolicySet,
    StaticKeys,
    compiled,
    evaluate,
    masked_copy,
)
from agentstream.schemas import AgentMessage, Event, registry
from agentstream.schemas.security import PolicyDecision, SecurityConfig, SecurityPolicy, Verdict
from agentstream.streams.audit_chain import GENESIS, compute_hash, seal


@pytest.mark.parametrize("micro", [0, 456, 120000])
@pytest.mark.parametrize("content", ["fine", "a secret that is far too long"])
def test_record_equals_the_pydantic_event_and_seals_identically(micro: int, content: str) -> None:
    policies = PolicySet(
        [
            compiled(
                SecurityPolicy(
                    policy_id="p", version=3, max_message_size=10, blocked_patterns=["secret"]
                )
            )
        ],
        enabled=True,
        default_action=Verdict.DENY,
    )
    message_event = Event.of(
        AgentMessage(message_id="m1", sender_id="alice", recipient_id="bob", content=content),
        source="alice",
        correlation_id="corr-1",
    )
    result = evaluate(message_event.payload, policies, StaticKeys())
    at = datetime(2026, 11, 25, 12, 0, 1, micro, tzinfo=UTC)
    eid = str(uuid.uuid4())
    record = decision_record(
        message_event,
        result,
        source="enforce_policy",
        evaluated_at=at,
        evaluation_us=17,
        partition=3,
        offset=99,
        event_id=eid,
    )

    via_pydantic = message_event.caused(
        PolicyDecision(
            message_id="m1",
            message_event_id=str(message_event.event_id),
            message_digest=bound_digest(message_event.payload, result),
            sender_id="alice",
            recipient_id="bob",
            verdict=result.verdict,
            reasons=result.reasons,
            rules=result.rules,
            policies=result.policies,
            default_applied=result.default_applied,
            security_enabled=result.security_enabled,
            evaluated_at=at,
            evaluation_us=17,
            source_partition=3,
            source_offset=99,
            verified=result.verified,
            claimed_role=result.claimed_role,
            roles=list(result.roles),
            issued_at=result.issued_at,
        ),
        source="enforce_policy",
    ).model_copy(update={"event_id": uuid.UUID(eid), "occurred_at": at})
    assert record == via_pydantic.model_dump(mode="json")

    value, digest = seal_record(record, "ab" * 32)
    decoded = registry.decode(value)
    sealed = seal(via_pydantic, "ab" * 32)
    assert decoded == sealed
    assert (
        digest
        == sealed.payload.hash
        == compute_hash(
            decoded.model_copy(update={"payload": decoded.payload.model_copy(update={"hash": ""})})
        )
    )
    assert decoded.causation_id == str(message_event.event_id)
    assert decoded.correlation_id == "corr-1"
    # chaining: the next record points at this one
    value2, _ = seal_record(dict(record, payload=dict(record["payload"])), digest)
    assert orjson.loads(value2)["payload"]["prev_hash"] == digest != GENESIS


@pytest.mark.parametrize("redaction", ["mask", "hash"])
def test_the_decision_shows_the_ids_as_the_rejected_copy_does(redaction: str) -> None:
    policies = PolicySet(
        [compiled(SecurityPolicy(policy_id="p", blocked_patterns=["sk-[a-z0-9]{8,}"]))],
        enabled=True,
        default_action=Verdict.DENY,
        config=SecurityConfig(rejected_redaction=redaction),  # type: ignore[arg-type]
    )
    secret = "sk-abcdef123456"
    message = AgentMessage(
        message_id=f"ref-{secret}", sender_id="alice", recipient_id=f"{secret}@x", content="hi"
    )
    result = evaluate(message, policies, StaticKeys())
    at = datetime(2026, 11, 25, 12, 0, 1, tzinfo=UTC)
    record = decision_record(
        Event.of(message, source="alice"),
        result,
        source="enforce_policy",
        evaluated_at=at,
        evaluation_us=1,
        partition=0,
        offset=1,
    )
    copy = masked_copy(message, result.masked, result.withheld)
    assert record["payload"]["message_id"] == copy.message_id != message.message_id
    assert record["payload"]["recipient_id"] == copy.recipient_id != message.recipient_id
    assert secret not in orjson.dumps(record).decode()
    assert copy.message_id.startswith("ref-[")  # masked, not withheld
