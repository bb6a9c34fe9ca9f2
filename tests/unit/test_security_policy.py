"""The pure policy evaluator: each rule, all reasons at once, fitting, defaults.

Roles come from identities: `IDS` grants alice her roles, signing key, token user and
encryption key; a message that is not verified is anonymous."""

from __future__ import annotations

from typing import Any

import pytest

from agentstream.agents.security.crypto import encrypt_content, new_key, sign_message
from agentstream.agents.security.identity import Identity, IdentityRegistry
from agentstream.agents.security.policy import (
    Context,
    Evaluation,
    KeyRequest,
    PolicySet,
    StaticKeys,
    compiled,
    evaluate,
    forwarded_auth,
    redact,
    required_keys,
)
from agentstream.schemas import utc_now
from agentstream.schemas.messages import AgentMessage, AuthProof
from agentstream.schemas.security import AgentIdentity, SecurityPolicy, Verdict

SIGNING = new_key()
ENC = new_key()
KEYS = StaticKeys(signing={"alice": SIGNING}, encryption={"k1": ENC}, tokens={7: "tok-seven"})
IDS = IdentityRegistry(
    [
        Identity.of(
            AgentIdentity(
                agent_id="alice",
                roles=["planner", "intern"],
                token_user_id=7,
                encryption_key_ids=["k1"],
            )
        )
    ]
)
CTX = Context(identities=IDS)


def _eval(message: AgentMessage, policies: PolicySet, keys: StaticKeys = KEYS) -> Evaluation:
    return evaluate(message, policies, keys, ctx=CTX)


def _set(*policies: SecurityPolicy, enabled: bool = True, default: str = "deny") -> PolicySet:
    return PolicySet(
        [compiled(p) for p in policies], enabled=enabled, default_action=Verdict(default)
    )


def _msg(content: str = "hello", **kw: Any) -> AgentMessage:
    return AgentMessage(
        message_id=kw.pop("message_id", "m1"),
        sender_id=kw.pop("sender_id", "alice"),
        recipient_id="bob",
        content=content,
        **kw,
    )


def _rules(message: AgentMessage, policies: PolicySet, keys: StaticKeys = KEYS) -> list[str]:
    return _eval(message, policies, keys).rules


def test_each_rule_denies_on_its_own() -> None:
    size = _set(SecurityPolicy(policy_id="size", max_message_size=5))
    assert _rules(_msg("12345"), size) == []
    assert _rules(_msg("123456"), size) == ["max_message_size"]
    assert _rules(_msg("héllo"), size) == ["max_message_size"]  # UTF-8 bytes, not characters

    blocked = _set(SecurityPolicy(policy_id="b", blocked_patterns=["secret", "(?i)password"]))
    assert _rules(_msg("PassWord!"), blocked) == ["blocked_patterns"]
    assert _rules(_msg("fine"), blocked) == []

    allowed = _set(SecurityPolicy(policy_id="a", allowed_patterns=["^report:", "^status:"]))
    assert _rules(_msg("status: ok"), allowed) == []
    assert _rules(_msg("chit chat"), allowed) == ["allowed_patterns"]

    roles = _set(SecurityPolicy(policy_id="r", allowed_roles=["planner"]))
    assert _rules(sign_message(_msg(sender_role="planner"), SIGNING), roles) == []
    assert _rules(sign_message(_msg(sender_role="intern"), SIGNING), roles) == ["allowed_roles"]
    assert _rules(_msg(sender_role="planner"), roles) == ["allowed_roles", "role_not_granted"]

    enc = _set(SecurityPolicy(policy_id="e", require_encryption=True))
    assert _rules(_msg("x"), enc) == ["require_encryption"]
    assert _rules(encrypt_content(_msg("x"), ENC, "k1"), enc) == []

    auth = _set(SecurityPolicy(policy_id="au", require_authentication=True))
    assert _rules(_msg(), auth) == ["require_authentication"]
    assert _rules(sign_message(_msg(), SIGNING), auth) == []
    assert _rules(sign_message(_msg(), new_key()), auth) == ["require_authentication"]
    token = _msg().model_copy(
        update={
            "auth": AuthProof(
                method="access-token", token="tok-seven", user_id=7, issued_at=utc_now()
            )
        }
    )
    assert _rules(token, auth) == []
    wrong = token.model_copy(
        update={
            "auth": AuthProof(
                method="access-token", token="tok-sevem", user_id=7, issued_at=utc_now()
            )
        }
    )
    assert _rules(wrong, auth) == ["require_authentication"]
    unknown_user = token.model_copy(
        update={"auth": AuthProof(method="access-token", token="x", user_id=8)}
    )
    assert _rules(unknown_user, auth) == ["require_authentication"]
    no_identity = sign_message(_msg(sender_id="mallory"), SIGNING)
    assert "has no identity" in _eval(no_identity, auth).reasons[0]


def test_signature_covers_the_content_and_the_routing() -> None:
    auth = _set(SecurityPolicy(policy_id="au", require_authentication=True))
    signed = sign_message(_msg("pay 10"), SIGNING)
    for change in (
        {"content": "pay 1000"},
        {"recipient_id": "eve"},
        {"metadata": {"x": 1}},
        {"security_level": "public"},
    ):
        tampered = signed.model_copy(update=change)
        assert _rules(
            tampered, _set(SecurityPolicy(policy_id="au", level="*", require_authentication=True))
        ) == ["require_authentication"], change
    assert _rules(signed, auth) == []


def test_all_violations_are_reported_not_only_the_first() -> None:
    policies = _set(
        SecurityPolicy(
            policy_id="p1",
            max_message_size=10,
            allowed_roles=["planner"],
            require_authentication=True,
        ),
        SecurityPolicy(
            policy_id="p2",
            version=3,
            allowed_patterns=["^report:"],
            blocked_patterns=["secret", "token"],
        ),
    )
    result = _eval(_msg("a secret token, long enough", sender_role="intern"), policies)
    assert result.verdict is Verdict.DENY
    assert result.rules == [
        "allowed_patterns",
        "allowed_roles",
        "blocked_patterns",
        "max_message_size",
        "require_authentication",
        "role_not_granted",
    ]
    assert result.policies == {"p1": 1, "p2": 3}
    blocked = next(r for r in result.reasons if r.startswith("blocked_patterns"))
    assert "'secret'" in blocked and "'token'" in blocked and "[policy p2 v3]" in blocked
    assert any(r.startswith("max_message_size") and "[policy p1 v1]" in r for r in result.reasons)


def test_policies_fit_by_level_and_role() -> None:
    policies = _set(
        SecurityPolicy(policy_id="std", level="standard", blocked_patterns=["std"]),
        SecurityPolicy(policy_id="conf", level="confidential", blocked_patterns=["conf"]),
        SecurityPolicy(policy_id="any", level="*", max_message_size=1000),
        SecurityPolicy(
            policy_id="interns", level="*", applies_to_roles=["intern"], blocked_patterns=["intern"]
        ),
    )
    assert _eval(_msg(), policies).policies == {"std": 1, "any": 1}
    conf = _eval(_msg("std", security_level="confidential"), policies)
    assert conf.policies == {"conf": 1, "any": 1} and conf.verdict is Verdict.ALLOW
    intern = _eval(sign_message(_msg("intern", sender_role="intern"), SIGNING), policies)
    assert intern.policies == {"std": 1, "any": 1, "interns": 1}
    assert intern.rules == ["blocked_patterns"]
    # no claim: every granted role (intern among them); a claim narrows to that role
    assert "interns" in _eval(sign_message(_msg("x"), SIGNING), policies).policies
    planner = _eval(sign_message(_msg("x", sender_role="planner"), SIGNING), policies)
    assert "interns" not in planner.policies


@pytest.mark.parametrize(("default", "verdict"), [("allow", Verdict.ALLOW), ("deny", Verdict.DENY)])
def test_no_fitting_policy_applies_the_default(default: str, verdict: Verdict) -> None:
    policies = _set(SecurityPolicy(policy_id="conf", level="confidential"), default=default)
    result = _eval(_msg(), policies)
    assert result.verdict is verdict and result.default_applied and result.policies == {}
    assert result.rules == ([] if default == "allow" else ["default_action"])


def test_disabled_security_allows_everything() -> None:
    policies = _set(SecurityPolicy(policy_id="size", max_message_size=1), enabled=False)
    result = _eval(_msg("far too long"), policies)
    assert result.verdict is Verdict.ALLOW and not result.security_enabled
    assert required_keys(sign_message(_msg(), SIGNING), policies) == set()


def test_encrypted_content_is_checked_after_decryption() -> None:
    policies = _set(SecurityPolicy(policy_id="p", blocked_patterns=["launch"], max_message_size=20))
    assert _rules(encrypt_content(_msg("launch now"), ENC, "k1"), policies) == ["blocked_patterns"]
    big = encrypt_content(_msg("x" * 21), ENC, "k1")
    assert _rules(big, policies) == ["max_message_size"]
    # without the key: the size is still known (GCM), patterns cannot be applied -> deny
    no_key = StaticKeys()
    assert _rules(encrypt_content(_msg("fine"), ENC, "k1"), policies, no_key) == [
        "content_unreadable"
    ]
    size_only = _set(SecurityPolicy(policy_id="s", max_message_size=20))
    assert _rules(encrypt_content(_msg("fine"), ENC, "k1"), size_only, no_key) == []
    assert _rules(big, size_only, no_key) == ["max_message_size"]


def test_envelopes_that_fail_to_decrypt_are_denied() -> None:
    policies = _set(SecurityPolicy(policy_id="p"), default="allow")
    good = encrypt_content(_msg("x"), ENC, "k1")
    assert _rules(good, policies) == []
    assert _rules(encrypt_content(_msg("x"), new_key(), "k1"), policies) == ["decryption"]
    moved = good.model_copy(update={"message_id": "other"})  # bound by the associated data
    assert _rules(moved, policies) == ["decryption"]
    env = good.encryption
    assert env is not None
    for broken in ({"nonce": "!!notbase64"}, {"nonce": "AAAA"}, {"ciphertext": "AAAA"}):
        bad = good.model_copy(update={"encryption": env.model_copy(update=broken)})
        assert _rules(bad, policies) == ["decryption"], broken
    both = good.model_copy(update={"content": "plaintext too"})
    assert _rules(both, policies) == ["decryption"]


def test_a_stored_policy_with_a_bad_pattern_denies_instead_of_being_skipped() -> None:
    broken = SecurityPolicy(policy_id="bad", blocked_patterns=["(?=x)"])
    result = evaluate(_msg(), _set(broken, default="allow"), KEYS)
    assert result.rules == ["invalid_policy"] and result.verdict is Verdict.DENY


def test_state_with_config_and_inline_policies() -> None:
    state = {
        "__config__": {
            "config_id": "__config__",
            "enabled": True,
            "default_action": "allow",
            "policies": [
                {"policy_id": "inline", "version": 1, "max_message_size": 3},
                {"policy_id": "both", "version": 1, "max_message_size": 1},
            ],
        },
        "both": {"policy_id": "both", "version": 2, "max_message_size": 100},
        "junk": {"policy_id": "junk", "max_message_size": "lots"},
    }
    policies = PolicySet.from_state(state, enabled=False, default_action="deny")
    assert policies.enabled and policies.default_action is Verdict.ALLOW
    assert policies.versions() == {"both": 2, "inline": 1}  # published wins over inline
    assert set(policies.invalid) == {"junk"}
    empty = PolicySet.from_state({}, enabled=False, default_action="allow")
    assert not empty.enabled
    bad_config = PolicySet.from_state({"__config__": {"enabled": "maybe"}}, enabled=False)
    assert bad_config.enabled and bad_config.default_action is Verdict.DENY


def test_required_keys_and_redaction() -> None:
    policies = _set(SecurityPolicy(policy_id="au", require_authentication=True))
    signed = encrypt_content(sign_message(_msg(), SIGNING), ENC, "k1")
    assert required_keys(signed, policies, IDS) == {
        KeyRequest("signing", "alice"),
        KeyRequest("encryption", "k1"),
    }
    assert required_keys(signed, policies) == set()  # no identity: nothing is looked up
    token = _msg().model_copy(
        update={
            "auth": AuthProof(
                method="access-token", token="tok-seven", user_id=7, issued_at=utc_now()
            )
        }
    )
    assert required_keys(token, policies, IDS) == {KeyRequest("token", "7")}
    forwarded = redact(token, {"rejection_reasons": ["x"]})
    assert forwarded.auth is not None and forwarded.auth.token is None and forwarded.auth.redacted
    assert "tok-seven" not in forwarded.model_dump_json()
    assert forwarded.metadata == {"rejection_reasons": ["x"]}
    assert redact(signed) is signed  # nothing secret: forwarded untouched, signature still valid


def test_the_pipelines_marks_on_a_proof_are_never_taken_from_the_sender() -> None:
    policies = _set(SecurityPolicy(policy_id="au", require_authentication=True))

    def token(**kw: Any) -> AgentMessage:
        proof = AuthProof(method="access-token", user_id=7, issued_at=utc_now(), **kw)
        return _msg(auth=proof)

    assert _eval(token(token="tok-seven"), policies).verified
    # the genuine token, with a mark only enforce_policy sets: not verified
    for marks in ({"redacted": True}, {"verified": True}):
        result = _eval(token(token="tok-seven", **marks), policies)
        assert not result.verified and result.rules == ["require_authentication"]
        assert "set by enforce_policy" in result.reasons[0]

    # a copy says whether its proof verified, whatever the sender wrote
    forged = token(redacted=True, verified=True)
    copy = redact(forged, verified=False)
    assert copy.auth is not None and copy.auth.redacted and not copy.auth.verified
    genuine = redact(token(token="tok-seven"), verified=True)
    assert genuine.auth is not None and genuine.auth.token is None and genuine.auth.verified
    assert genuine.auth != copy.auth
    # an HMAC proof keeps its signature and is not marked redacted (it had no token)
    signed = sign_message(_msg(), SIGNING)
    copy = redact(signed, verified=True)
    assert copy.auth is not None and copy.auth.verified and not copy.auth.redacted
    assert copy.auth.signature == signed.auth.signature  # type: ignore[union-attr]
    assert forwarded_auth(None, True) is None
    assert forwarded_auth(copy.auth, True) is None  # already as forwarded


@pytest.mark.parametrize("fast", [True, False])
def test_metadata_is_held_to_the_limit_as_json_whatever_the_policy_scans(fast: bool) -> None:
    def rules(policy: SecurityPolicy, metadata: dict[str, Any]) -> list[str]:
        message = _msg("hi", metadata=metadata)
        return evaluate(message, _set(policy, default="allow"), KEYS, fast=fast, ctx=CTX).rules

    # {"k":"v"} is 9 bytes of JSON
    for scan in (["content", "metadata"], ["content"]):
        for patterns in (["zzz"], []):
            policy = SecurityPolicy(
                policy_id="p", max_message_size=9, blocked_patterns=patterns, scan_fields=scan
            )
            assert rules(policy, {"k": "v"}) == []
            assert rules(policy, {"k": "vv"}) == ["max_message_size"]
    # invisible characters count as sent (3 bytes each), not as normalised (nothing)
    policy = SecurityPolicy(policy_id="p", max_message_size=100, blocked_patterns=["zzz"])
    assert rules(policy, {"k": "\u200b" * 40}) == ["max_message_size"]


def test_fast_path_and_full_evaluation_agree() -> None:
    import random

    rng = random.Random(7)
    policies = _set(
        SecurityPolicy(
            policy_id="a", blocked_patterns=["secret", "(?i)pass(word)?"], max_message_size=40
        ),
        SecurityPolicy(policy_id="b", allowed_patterns=["^report", "ok$"], max_message_size=30),
        SecurityPolicy(policy_id="c", level="*", blocked_patterns=["drop table"]),
        SecurityPolicy(policy_id="d", level="*", applies_to_roles=["intern"], allowed_roles=["x"]),
        default="allow",
    )
    words = ["report", "ok", "secret", "PASS", "drop table", "hello", "x" * 25]
    for _ in range(500):
        msg = _msg(
            " ".join(rng.choice(words) for _ in range(rng.randint(0, 3))),
            sender_role=rng.choice(["agent", "intern"]),
            security_level=rng.choice(["standard", "public"]),
        )
        fast = evaluate(msg, policies, KEYS, ctx=CTX)
        full = evaluate(msg, policies, KEYS, fast=False, ctx=CTX)
        assert (fast.verdict, fast.policies, fast.default_applied) == (
            full.verdict,
            full.policies,
            full.default_applied,
        ), msg
