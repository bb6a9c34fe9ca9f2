"""Review (policy engine vs a hostile sender): what a reader of the forwarded copy or of
the decision chain can tell about *who* sent a message and *which* message a decision
was about.

Recipient agents read `agent.messages.accepted` but, by the ACLs `agentstream acls`
prints, not `security.decisions` (docs/acls.md): the accepted copy is all they see.

Each test asserts the secure behaviour and FAILS on the code it was written against:

* an unverified sender impersonating a token-authenticated agent produces an accepted
  copy identical to the genuine one: it sets the pipeline's own marker
  `auth.redacted: true` itself (or sends a wrong token, which the worker then removes
  and marks the same way);
* a decision does not bind the content it decided: two different messages decided at
  the same coordinates get the same record, so "check each accepted message against its
  signed decision by event id" (docs/security.md, threat model) accepts any content.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from agentstream.agents.security import agent
from agentstream.agents.security.identity import Identity, IdentityRegistry
from agentstream.agents.security.policy import PolicySet, StaticKeys, compiled
from agentstream.schemas import AgentMessage, Event, encode, registry, utc_now
from agentstream.schemas.messages import AuthProof
from agentstream.schemas.security import AgentIdentity, SecurityConfig, SecurityPolicy, Verdict
from agentstream.streams.processing import Inbound

#: the docs' example policy: level "*", no `applies_to_roles`, so it fits anonymous
#: senders too (the default action never decides for them)
NO_CREDENTIALS = SecurityPolicy(
    policy_id="no-credentials",
    level="*",
    blocked_patterns=[r"(?i)password\s*[:=]", "sk-[A-Za-z0-9]{20,}"],
)
POLICIES = PolicySet(
    [compiled(NO_CREDENTIALS)], enabled=True, default_action=Verdict.DENY, config=SecurityConfig()
)
PLANNER = IdentityRegistry(
    [Identity.of(AgentIdentity(agent_id="planner-1", roles=["planner"], token_user_id=42))]
)
KEYS = StaticKeys(tokens={42: "the-real-token-of-42"})


@dataclass
class _Record:
    topic: str = "agent.messages"
    partition: int = 0
    offset: int = 7


def _decide(message: AgentMessage, event: Event[Any] | None = None) -> Any:
    sent = event or Event.of(message, source=message.sender_id)
    parsed, data = registry.parse(encode(sent))
    inbound = Inbound(parsed, _Record(), data)
    # a verified message must sit in its sender's partition (rule `misrouted`)
    inbound.message.partition = agent._home_partition(message.sender_id, agent._partitions(inbound))
    return agent.decide(inbound, POLICIES, KEYS, PLANNER)


def _token(token: str | None = None, **kw: Any) -> AuthProof:
    """An access-token proof of user 42, issued now (a verified one needs an issue time
    within the worker's replay window: made when the test runs, not when the module is
    collected, which under pytest-xdist can be many minutes earlier)."""
    return AuthProof(method="access-token", user_id=42, token=token, issued_at=utc_now(), **kw)


def _order(auth: AuthProof) -> AgentMessage:
    return AgentMessage(
        message_id="m-1",
        sender_id="planner-1",
        recipient_id="executor-3",
        content="deploy build 512 to production",
        auth=auth,
    )


@pytest.mark.parametrize(
    "forged",
    [
        # no token at all: the schema accepts it because the pipeline's marker is set
        {"redacted": True},
        # a wrong token: the worker removes it and sets the marker itself
        {"token": "guessed"},
    ],
    ids=["sender-set-redacted", "wrong-token"],
)
def test_an_impersonated_token_sender_is_distinguishable_in_the_accepted_copy(
    forged: dict[str, Any],
) -> None:
    genuine = _decide(_order(_token(KEYS.tokens[42])))
    # (an impersonator copies whatever it sees: the issue time is as fresh as the genuine's)
    fake = _decide(_order(_token(**forged)))
    assert genuine.result.verified and not fake.result.verified
    # both accepted (the policy fits anonymous senders; nothing blocked in them)
    assert genuine.topic == fake.topic == agent.AGENT_MESSAGES_ACCEPTED
    seen_genuine = registry.decode(genuine.forwarded).payload
    seen_fake = registry.decode(fake.forwarded).payload
    # what a recipient reads must tell the verified sender from the impersonator
    assert seen_genuine.model_dump() != seen_fake.model_dump()


def test_a_decision_binds_the_content_it_decided() -> None:
    when = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    first = _order(_token(KEYS.tokens[42]))
    other = first.model_copy(update={"content": "delete the production database"})
    event = Event.of(first, source="planner-1").model_copy(update={"occurred_at": when})
    a = _decide(first, event=event)
    b = _decide(other, event=event.model_copy(update={"payload": other}))

    def shown(outcome: Any) -> dict[str, Any]:
        payload = dict(outcome.decision["payload"])
        for varying in ("evaluated_at", "evaluation_us"):
            payload.pop(varying)
        return payload

    assert a.result.verdict is b.result.verdict is Verdict.ALLOW
    # a reader checking an accepted copy against this decision must be able to tell
    # the content that was decided from other content
    assert shown(a) != shown(b)
