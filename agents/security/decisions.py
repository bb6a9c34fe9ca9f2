"""Decision records built and sealed as plain JSON, without a pydantic round trip.

A decision per message is the hot path of `enforce_policy`; building a `PolicyDecision`,
its envelope and then `audit_chain.seal` (three model copies and two dumps) costs more
than evaluating 200 patterns. The record built here is exactly
``Event.caused(PolicyDecision(...)).model_dump(mode="json")`` and it is sealed exactly
as `streams.audit_chain.seal` would (sha256 of the sorted JSON with ``hash`` and
``signature`` blanked: `streams.audit_chain.record_hash`), so `agentstream audit verify`
and `compute_hash` see no difference; the unit tests check both against the pydantic
path.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any
from uuid import uuid4

import orjson

from agentstream.agents.security.policy import Evaluation
from agentstream.schemas import Event
from agentstream.schemas.security import PolicyDecision
from agentstream.streams.audit_chain import ChainSigner


def iso(ts: datetime) -> str:
    """A UTC datetime as pydantic writes it in JSON mode."""
    return ts.isoformat().replace("+00:00", "Z")


def decision_record(
    event: Event[Any],
    result: Evaluation,
    *,
    source: str,
    evaluated_at: datetime,
    evaluation_us: int,
    partition: int | None,
    offset: int | None,
    event_id: str | None = None,
    signers: dict[str, str] | None = None,
) -> dict[str, Any]:
    message = event.payload
    input_id = str(event.event_id)
    ts = iso(evaluated_at)
    return {
        "event_id": event_id or str(uuid4()),
        "type": PolicyDecision.TYPE,
        "schema_version": PolicyDecision.VERSION,
        "occurred_at": ts,
        "source": source,
        "correlation_id": event.correlation_id or input_id,
        "causation_id": input_id,
        "payload": {
            "message_id": message.message_id,
            "message_event_id": input_id,
            "sender_id": message.sender_id,
            "recipient_id": message.recipient_id,
            "verdict": result.verdict.value,
            "reasons": result.reasons,
            "rules": result.rules,
            "policies": result.policies,
            "default_applied": result.default_applied,
            "security_enabled": result.security_enabled,
            "evaluated_at": ts,
            "evaluation_us": evaluation_us,
            "prev_hash": "",
            "hash": "",
            "source_partition": partition,
            "source_offset": offset,
            "verified": result.verified,
            "claimed_role": result.claimed_role,
            "roles": list(result.roles),
            "issued_at": iso(result.issued_at) if result.issued_at is not None else None,
            "policy_signers": {
                pid: signers[pid] for pid in result.policies if signers and pid in signers
            },
            "signed_by": "",
            "signature": "",
        },
    }


def seal_record(
    record: dict[str, Any], prev_hash: str, signer: ChainSigner | None = None
) -> tuple[bytes, str]:
    """(wire bytes, hash) of the record chained after `prev_hash`; with a `signer`, also
    signed (`signed_by` is set before hashing, so the hash covers it; the signature is
    over the hash). Sign the last record a batch writes to a partition: its signature
    vouches for the records before it through `prev_hash`."""
    payload = record["payload"]
    payload["prev_hash"] = prev_hash
    payload["hash"] = ""
    payload["signed_by"] = signer.key_id if signer is not None else ""
    payload["signature"] = ""
    digest = hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()
    payload["hash"] = digest
    if signer is not None:
        payload["signature"] = signer.sign(digest)
    return orjson.dumps(record), digest
