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
import os
from datetime import datetime
from typing import Any

import orjson

from agentstream.agents.security.crypto import message_digest
from agentstream.agents.security.policy import Evaluation, shown_id
from agentstream.schemas import AgentMessage, Event
from agentstream.schemas.security import PolicyDecision, Verdict
from agentstream.streams.audit_chain import ChainSigner


def iso(ts: datetime) -> str:
    """A UTC datetime as pydantic writes it in JSON mode."""
    return ts.isoformat().replace("+00:00", "Z")


class _IsoOfLast:
    """`iso` of the datetime it was last asked for: every record writes its decision time
    twice, and decisions made in the same instant share it."""

    __slots__ = ("at", "text")

    def __init__(self) -> None:
        self.at: datetime | None = None
        self.text = ""

    def __call__(self, ts: datetime) -> str:
        if ts != self.at:
            self.at, self.text = ts, iso(ts)
        return self.text


_iso_of_last = _IsoOfLast()

#: the variant nibble of an RFC 4122 UUID (10xx) for each random hex digit
_VARIANT = "89ab" * 4
_pool: list[str] = []


def new_event_id() -> str:
    """`str(uuid4())`, a quarter of its cost: 122 random bits from one `os.urandom` call
    per 256 ids (uuid4 reads the OS's random source once per id), formatted as version
    4. The pool is emptied in a forked child, which must not reuse its parent's ids."""
    if not _pool:
        raw = os.urandom(16 * 256).hex()
        _pool.extend(
            f"{raw[i : i + 8]}-{raw[i + 8 : i + 12]}-4{raw[i + 13 : i + 16]}-"
            f"{_VARIANT[int(raw[i + 16], 16)]}{raw[i + 17 : i + 20]}-{raw[i + 20 : i + 32]}"
            for i in range(0, 32 * 256, 32)
        )
    return _pool.pop()


os.register_at_fork(after_in_child=_pool.clear)


class _SignersOf:
    """{policy id: signer} of the policies a decision applied, built once per (applied
    policies, signers) pair instead of once per record. Both are owned by an immutable
    policy set (`FitGroup.versions`, `PolicySet.signers`): the entry holds them, so an id
    cannot be reused by another dict while it is cached, and the identity check makes a
    stale entry a miss."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], tuple[Any, Any, dict[str, str]]] = {}

    def __call__(self, policies: dict[str, int], signers: dict[str, str] | None) -> dict[str, str]:
        if not signers:
            return {}
        key = (id(policies), id(signers))
        hit = self.entries.get(key)
        if hit is not None and hit[0] is policies and hit[1] is signers:
            return hit[2]
        subset = {pid: signers[pid] for pid in policies if pid in signers}
        if len(self.entries) >= 4096:  # a new policy set makes new groups; drop the old
            self.entries.clear()
        self.entries[key] = (policies, signers, subset)
        return subset


_signers_of = _SignersOf()


def bound_digest(message: AgentMessage, result: Evaluation) -> str:
    """`message_digest` of `message` when its copy carries it whole (accepted, or
    rejected with nothing masked or withheld), else "". An unsalted digest of a message
    whose copy masks a short secret (a PIN, a card number) lets whoever reads both the
    rejected copy and the decision guess the secret offline: the copy gives every other
    byte. The digest exists to check an accepted copy against its decision; a copy that
    shows the message adds nothing to learn."""
    if result.verdict is Verdict.ALLOW or not (result.masked or result.withheld):
        return message_digest(message)
    return ""


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
    """The unsealed record of one decision. Its `policies` and `policy_signers` maps may be
    shared with other records of the same policy set: read them, never change them.

    Its `message_id` and `recipient_id` are the rejected copy's (`policy.shown_id`):
    masked where a blocked pattern matched them, withheld where a policy that does not
    compile should have scanned them. The chain is append-only and signed: what is
    written there stays."""
    message = event.payload
    input_id = str(event.event_id)
    ts = _iso_of_last(evaluated_at)
    return {
        "event_id": event_id or new_event_id(),
        "type": PolicyDecision.TYPE,
        "schema_version": PolicyDecision.VERSION,
        "occurred_at": ts,
        "source": source,
        "correlation_id": event.correlation_id or input_id,
        "causation_id": input_id,
        "payload": {
            "message_id": shown_id(message, "message_id", result),
            "message_event_id": input_id,
            "message_digest": bound_digest(message, result),
            "sender_id": message.sender_id,
            "recipient_id": shown_id(message, "recipient_id", result),
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
            "policy_signers": _signers_of(result.policies, signers),
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
