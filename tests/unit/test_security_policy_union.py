"""The full evaluation's one scan per view (`FitGroup.unions`) decides exactly as every
policy scanning with its own patterns (`evaluate(..., union=False)`): same verdict,
reasons in the same order, rules and masked text, over random policy sets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentstream.agents.security.crypto import encrypt_content, new_key, sign_message
from agentstream.agents.security.identity import Identity, IdentityRegistry
from agentstream.agents.security.policy import (
    Context,
    Evaluation,
    PolicySet,
    StaticKeys,
    compiled,
    evaluate,
)
from agentstream.schemas.messages import AgentMessage
from agentstream.schemas.security import (
    SCAN_FIELDS,
    AgentIdentity,
    SecurityConfig,
    SecurityPolicy,
    Verdict,
)

SIGNING = new_key()
ENC = new_key()
#: granted to alice but not in the keychain: encrypted content that cannot be read
UNHELD = new_key()
KEYS = StaticKeys(signing={"alice": SIGNING}, encryption={"k1": ENC})
IDS = IdentityRegistry(
    [
        Identity.of(
            AgentIdentity(
                agent_id="alice", roles=["planner", "intern"], encryption_key_ids=["k1", "k2"]
            )
        )
    ]
)
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
CTX = Context(identities=IDS, now=NOW)

#: overlapping (``pass`` / ``password`` / ``(?i)pass(word)?``), anchored, empty-matching,
#: Unicode and confusable-targeted patterns, shared between policies in any order, and
#: (`REFUSED`) patterns RE2 or the compiler refuses (a policy listing one is broken)
PATTERNS = [
    "secret",
    "(?i)secret",
    "password",
    "pass",
    "(?i)pass(word)?",
    r"hunter\d",
    r"\bkey\b",
    "^report",
    "ok$",
    "x{3}",
    "x*",
    "é+",
    "(?i)É",
    "paypal",
    r"\Qa.b\E",
    "m1",
    "bob",
    r"\d{2}",
    ".",
    "^$",
    r"\z",
    "日本",
]
REFUSED = ["(?=x)", r"\Qopen", "(a"]
WORDS = [
    "secret",
    "SECRET",
    "password",
    "pass\u200bword",
    "\uff50\uff41\uff53\uff53",  # fullwidth "pass"
    "\u0440aypal",  # Cyrillic er: "paypal" once confusables are folded
    "paypal",
    "hunter2",
    "key",
    "report",
    "ok",
    "xxxx",
    "é",
    "É",
    "\u202e",
    "\x00",
    "a.b",
    "日本",
    "12",
    "",
]
#: two keys longer than a path shows (64 characters): both fields get the same path
LONG_KEYS = ["k" * 70 + "1", "k" * 70 + "2"]

text = st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join)
policy = st.builds(
    SecurityPolicy,
    policy_id=st.just("p"),
    level=st.sampled_from(["standard", "*", "*", "confidential"]),
    blocked_patterns=st.one_of(
        st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=5),
        st.lists(st.sampled_from(PATTERNS + REFUSED), max_size=4),
    ),
    allowed_patterns=st.one_of(
        st.just([]), st.lists(st.sampled_from(PATTERNS + REFUSED), max_size=2)
    ),
    # few views, so that policies share one (and its union) as often as not
    scan_fields=st.sampled_from([list(SCAN_FIELDS)] * 4 + [["content"], ["metadata", "ids"], []]),
    fold_confusables=st.sampled_from([True, True, True, False]),
    max_message_size=st.sampled_from([8, 40, 65536]),
    allowed_roles=st.sampled_from([[], ["planner"], ["anonymous"]]),
    applies_to_roles=st.sampled_from([[], [], ["intern"], ["planner"]]),
    require_authentication=st.booleans(),
    require_encryption=st.booleans(),
    deny_control_characters=st.booleans(),
)
metadata = st.dictionaries(
    st.sampled_from(["a", "secret", "k", *LONG_KEYS]),
    st.one_of(text, st.integers(-100, 100), st.lists(text, max_size=2)),
    max_size=3,
)


@st.composite
def policy_sets(draw: st.DrawFn) -> PolicySet:
    drawn = draw(st.lists(policy, min_size=2, max_size=6))
    config = SecurityConfig(
        default_action=draw(st.sampled_from(["allow", "deny"])),
        rejected_redaction=draw(st.sampled_from(["mask", "hash"])),
    )
    return PolicySet(
        [compiled(p.model_copy(update={"policy_id": f"p-{i}"})) for i, p in enumerate(drawn)],
        enabled=True,
        default_action=Verdict(config.default_action),
        config=config,
    )


@st.composite
def messages(draw: st.DrawFn) -> AgentMessage:
    message = AgentMessage(
        message_id=draw(st.sampled_from(["m1", "secret-1", "id-xxxx"])),
        sender_id=draw(st.sampled_from(["alice", "alice", "mallory"])),
        recipient_id=draw(st.sampled_from(["bob", "key", "\u0440aypal"])),
        sender_role=draw(st.sampled_from(["", "intern", "planner"])),
        security_level=draw(st.sampled_from(["standard", "confidential", "Standard", "public"])),
        content=draw(text),
        content_type=draw(st.sampled_from(["text/plain", "secret/x", "text/\u0440aypal"])),
        metadata=draw(metadata),
    )
    sealed = draw(st.sampled_from(["plain", "plain", "plain", "k1", "k2", "bad"]))
    if sealed == "k1":
        message = encrypt_content(message, ENC, "k1")
    elif sealed == "k2":
        message = encrypt_content(message, UNHELD, "k2")
    elif sealed == "bad":  # plaintext travelling next to the envelope
        message = encrypt_content(message, ENC, "k1").model_copy(update={"content": "secret"})
    proof = draw(st.sampled_from(["none", "signed", "signed", "wrong key"]))
    if proof != "none":
        key = SIGNING if proof == "signed" else new_key()
        message = sign_message(message, key, issued_at=NOW)
    return message


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies=policy_sets(), message=messages())
def test_the_union_scan_decides_as_every_policy_scanning_alone(
    policies: PolicySet, message: AgentMessage
) -> None:
    for fast in (True, False):
        union = _outcome(message, policies, fast=fast, union=True)
        alone = _outcome(message, policies, fast=fast, union=False)
        assert union == alone
        if isinstance(union, Evaluation) and isinstance(alone, Evaluation):
            assert union.reasons == alone.reasons  # what a sender learns, in order


def _outcome(
    message: AgentMessage, policies: PolicySet, *, fast: bool, union: bool
) -> Evaluation | tuple[str, str]:
    """The evaluation, or the error it raises. Two policies masking the same field apply
    the second's spans (found in the normalised text) to the first's masked text, where
    they can fall outside it (ValueError): a flaw older than the union scan, which both
    ways must share."""
    try:
        return evaluate(message, policies, KEYS, fast=fast, union=union, ctx=CTX)
    except ValueError as exc:
        return type(exc).__name__, str(exc)


def _policies(*policies: SecurityPolicy) -> PolicySet:
    return PolicySet([compiled(p) for p in policies], enabled=True, default_action=Verdict.DENY)


def _msg(content: str, **kw: Any) -> AgentMessage:
    return AgentMessage(
        message_id="m1", sender_id="alice", recipient_id="bob", content=content, **kw
    )


def test_policies_sharing_patterns_in_another_order_each_report_theirs() -> None:
    policies = _policies(
        SecurityPolicy(policy_id="a", blocked_patterns=["pass", "secret"], scan_fields=["content"]),
        SecurityPolicy(policy_id="b", blocked_patterns=["secret", "key", "pass"]),
        SecurityPolicy(
            policy_id="c",
            blocked_patterns=["key"],
            scan_fields=["content"],
            fold_confusables=False,
        ),
    )
    message = _msg("a secret pass", metadata={"n": "key"})
    result = evaluate(message, policies, KEYS, ctx=CTX)
    assert result == evaluate(message, policies, KEYS, union=False, ctx=CTX)
    assert result.reasons == [
        "blocked_patterns: matched 'pass', 'secret' in content [policy a v1]",
        "blocked_patterns: matched 'key', 'pass', 'secret' in content, metadata.n [policy b v1]",
    ]


def test_groups_of_the_same_policies_share_their_unions() -> None:
    """Which policies fit depends on few things; the role set on many (claimed roles, when
    trusted): a new role set must not compile the patterns again."""
    policies = _policies(
        SecurityPolicy(policy_id="a", blocked_patterns=["secret"], allowed_roles=["x"]),
        SecurityPolicy(policy_id="b", blocked_patterns=["key"], applies_to_roles=["intern"]),
    )
    one = policies.group("standard", frozenset({"r1"}))
    other = policies.group("standard", frozenset({"r2"}))
    assert one is not other and one.unions is other.unions
    assert policies.group("standard", frozenset({"intern"})).unions is not one.unions
