"""Review (policy engine vs a hostile or careless sender): secrets that reach the
rejected topic or the decision chain despite "every text a blocked pattern matched is
masked" (docs/security.md, "Secrets never leave").

Each test asserts the secure behaviour and FAILS on the code it was written against:

* a blocked secret in a metadata *key* is repeated, unmasked, in the path that names it
  (the masked metadata's keys, `rejection_reasons`, the decision's `reasons`);
* a message denied before its patterns run (over a size limit, an envelope the worker
  cannot open) is forwarded to the rejected topic without any masking;
* the decision record carries `message_id` and `recipient_id` as sent, although the
  rejected copy masks them.
* the decision's `message_digest`, an unsalted SHA-256 of the unmasked message, lets
  whoever reads it and the rejected copy guess a short masked secret offline.

The decision chain is append-only and signed: a secret written there cannot be scrubbed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from agentstream.agents.security import agent
from agentstream.agents.security.crypto import encrypt_content, message_digest, new_key
from agentstream.agents.security.identity import Identity, IdentityRegistry
from agentstream.agents.security.policy import PolicySet, StaticKeys, compiled
from agentstream.schemas import AgentMessage, Event, encode, registry
from agentstream.schemas.security import AgentIdentity, SecurityConfig, SecurityPolicy, Verdict
from agentstream.streams.processing import Inbound

SECRET = "sk-" + "Q7" * 12  # what the docs' example pattern catches
KEYS_POLICY = SecurityPolicy(
    policy_id="no-credentials",
    level="*",
    max_message_size=16384,
    blocked_patterns=["sk-[A-Za-z0-9]{20,}", r"(?i)password\s*[:=]"],
)


@dataclass
class _Record:
    topic: str = "agent.messages"
    partition: int = 0
    offset: int = 7


def _policies(*policies: SecurityPolicy) -> PolicySet:
    return PolicySet(
        [compiled(p) for p in policies],
        enabled=True,
        default_action=Verdict.ALLOW,
        config=SecurityConfig(default_action="allow"),
    )


def _message(content: str = "hello", **kw: Any) -> AgentMessage:
    ids = {"message_id": "m1", "sender_id": "agent-7", "recipient_id": "boss", **kw}
    return AgentMessage(content=content, **ids)


def _decide(
    message: AgentMessage,
    policies: PolicySet,
    keys: StaticKeys | None = None,
    identities: IdentityRegistry | None = None,
) -> agent.Outcome:
    """What `enforce_policy` sends for `message`: the forwarded bytes and the decision."""
    event, data = registry.parse(encode(Event.of(message, source=message.sender_id)))
    return agent.decide(Inbound(event, _Record(), data), policies, keys or StaticKeys(), identities)


def _leaks(outcome: agent.Outcome) -> list[str]:
    where = []
    if SECRET in outcome.forwarded.decode():
        where.append(f"the copy on {outcome.topic}")
    if SECRET in orjson.dumps(outcome.decision).decode():
        where.append("the decision record")
    return where


@pytest.mark.parametrize(
    "metadata",
    [
        {SECRET: "alice"},  # a plain key: shown as metadata.<key>
        {"tokens": {SECRET: "alice"}},  # a parent key repeats in every child's path
        {f"Bearer {SECRET}": "x"},  # any other key: shown JSON-quoted
        {SECRET: {"note": "password: hunter2"}},  # the key is in the value's path too
    ],
)
def test_a_secret_in_a_metadata_key_is_not_repeated_in_its_path(metadata: dict[str, Any]) -> None:
    outcome = _decide(_message("nothing here", metadata=metadata), _policies(KEYS_POLICY))
    assert outcome.result.verdict is Verdict.DENY
    assert _leaks(outcome) == []


def test_a_secret_in_an_oversized_message_is_not_forwarded_in_clear() -> None:
    # an honest agent pastes a config dump with an API key into a too-long message: the
    # size check denies it without scanning, and the copy carries the key as sent
    content = "config dump follows\n" + "x" * 20_000 + f"\nOPENAI_KEY={SECRET}\n"
    outcome = _decide(_message(content), _policies(KEYS_POLICY))
    assert outcome.result.rules == ["max_message_size"]
    assert _leaks(outcome) == []


def test_a_secret_in_metadata_over_the_limit_is_not_forwarded_in_clear() -> None:
    small = KEYS_POLICY.model_copy(update={"max_message_size": 256})
    message = _message("hi", metadata={"env": {"OPENAI_KEY": SECRET}, "log": "y" * 400})
    outcome = _decide(message, _policies(small))
    assert outcome.result.rules == ["max_message_size"]
    assert _leaks(outcome) == []


def test_plaintext_metadata_of_an_unreadable_envelope_is_not_forwarded_in_clear() -> None:
    # end-to-end encrypted content under a key the worker does not hold, with a
    # credential in the (plaintext) metadata: denied `content_unreadable`, and neither
    # the metadata nor anything else of the message was scanned
    e2e = new_key()
    identities = IdentityRegistry(
        [Identity.of(AgentIdentity(agent_id="agent-7", roles=["agent"], encryption_key_ids=["k"]))]
    )
    message = encrypt_content(
        _message("the report", metadata={"headers": {"authorization": f"Bearer {SECRET}"}}),
        e2e,
        "k",
    )
    outcome = _decide(message, _policies(KEYS_POLICY), StaticKeys(), identities)
    assert outcome.result.rules == ["content_unreadable"]
    assert _leaks(outcome) == []


def test_plaintext_next_to_an_envelope_is_not_forwarded_in_clear() -> None:
    e2e = new_key()
    sealed = encrypt_content(_message("x"), e2e, "k")
    message = sealed.model_copy(update={"content": f"and in clear: {SECRET}"})
    outcome = _decide(message, _policies(KEYS_POLICY))
    assert outcome.result.rules == ["decryption"]
    assert _leaks(outcome) == []


@pytest.mark.parametrize("field", ["message_id", "recipient_id"])
def test_the_decision_does_not_carry_a_masked_id_in_clear(field: str) -> None:
    outcome = _decide(_message("hi", **{field: f"ref-{SECRET}"}), _policies(KEYS_POLICY))
    assert outcome.result.rules == ["blocked_patterns"]
    assert SECRET not in outcome.forwarded.decode()  # the rejected copy masks it (holds)
    assert _leaks(outcome) == []


def _guess_from(copy: dict[str, Any], digest: str, guesses: list[str]) -> str | None:
    """What a reader of the rejected copy and the decision recovers: the guess whose
    message (the copy with its masked content replaced by it) has the decision's digest."""
    for guess in guesses:
        fields = dict(copy, content=guess, metadata={})
        fields.pop("auth", None)
        if message_digest(AgentMessage(**fields)) == digest:
            return guess
    return None


def test_the_decision_digest_does_not_let_a_reader_guess_a_masked_secret() -> None:
    # a short secret (a PIN) is masked in the rejected copy; a digest over the unmasked
    # message lets whoever reads the copy and the decision (the auditor) try every PIN
    pins = SecurityPolicy(
        policy_id="no-pins",
        level="*",
        max_message_size=16384,
        blocked_patterns=[r"(?i)pin\s*[:=]\s*\d{4}"],
    )
    outcome = _decide(_message("card ok, PIN: 4821 thanks"), _policies(pins))
    copy = orjson.loads(outcome.forwarded)["payload"]
    assert "4821" not in copy["content"]  # the copy masks it (holds)
    digest = outcome.decision["payload"]["message_digest"]
    guesses = [f"card ok, PIN: {pin:04d} thanks" for pin in range(10000)]
    assert _guess_from(copy, digest, guesses) is None
    assert digest == ""  # a masked or withheld message has no digest to check against


def test_a_decision_whose_copy_hides_nothing_keeps_its_digest() -> None:
    # denied without any masking: the rejected copy shows the message, the digest tells
    # a reader nothing more, and still binds the decision to it
    message = _message("x" * 64)
    small = SecurityPolicy(policy_id="small", level="*", max_message_size=32)
    outcome = _decide(message, _policies(small))
    assert outcome.topic == agent.AGENT_MESSAGES_REJECTED
    assert not outcome.result.masked and not outcome.result.withheld
    assert outcome.decision["payload"]["message_digest"] == message_digest(message)
