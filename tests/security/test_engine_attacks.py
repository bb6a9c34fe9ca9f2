"""A hostile sender against the pure policy engine: one test per way around a rule.

The sender controls every field of its own message (claims, encodings, ids, metadata, the
proof's metadata, the partition it writes to). Each test here is an attack that got
through before identities, replay protection, normalisation and bounded scanning; the
topic-level attacks (forged rule changes, forged audit records, secrets on outputs) are
in the integration tests of this folder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentstream.agents.security.crypto import encrypt_content, new_key, sign_message
from agentstream.agents.security.identity import Identity, IdentityRegistry
from agentstream.agents.security.policy import (
    CompiledPolicy,
    Context,
    Evaluation,
    PolicySet,
    Seen,
    StaticKeys,
    compiled,
    evaluate,
    masked_copy,
)
from agentstream.schemas import Event, encode, registry
from agentstream.schemas.errors import SchemaError
from agentstream.schemas.messages import AgentMessage, AuthProof
from agentstream.schemas.security import AgentIdentity, SecurityConfig, SecurityPolicy, Verdict

INTERN_KEY = new_key()
PLANNER_KEY = new_key()
ENC = new_key()
KEYS = StaticKeys(
    signing={"intern-1": INTERN_KEY, "planner-1": PLANNER_KEY},
    encryption={"k-pair": ENC, "k-other": new_key()},
    tokens={42: "token-of-42", 7: "token-of-7"},
)
IDS = IdentityRegistry(
    [
        Identity.of(
            AgentIdentity(
                agent_id="intern-1",
                roles=["intern"],
                levels=["standard"],
                token_user_id=7,
                encryption_key_ids=["k-pair"],
            )
        ),
        Identity.of(AgentIdentity(agent_id="planner-1", roles=["planner"], token_user_id=42)),
    ]
)
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
CTX = Context(identities=IDS, now=NOW)


def _set(*policies: SecurityPolicy, **config: Any) -> PolicySet:
    cfg = SecurityConfig(**config)
    return PolicySet(
        [compiled(p) for p in policies],
        enabled=True,
        default_action=Verdict(cfg.default_action),
        config=cfg,
    )


def _msg(content: str = "hello", **kw: Any) -> AgentMessage:
    return AgentMessage(
        message_id=kw.pop("message_id", "m1"),
        sender_id=kw.pop("sender_id", "intern-1"),
        recipient_id=kw.pop("recipient_id", "boss"),
        content=content,
        **kw,
    )


def _signed(message: AgentMessage, key: bytes = INTERN_KEY, **kw: Any) -> AgentMessage:
    return sign_message(message, key, issued_at=kw.pop("issued_at", NOW), **kw)


def _eval(message: AgentMessage, policies: PolicySet, ctx: Context = CTX) -> Evaluation:
    return evaluate(message, policies, KEYS, ctx=ctx)


# -- claims: roles and levels are granted, never claimed -----------------------------------

INTERNS_REPORT_ONLY = SecurityPolicy(
    policy_id="interns", level="*", applies_to_roles=["intern"], allowed_patterns=["^report:"]
)


FULLWIDTH_INTERN = "\uff49\uff4e\uff54\uff45\uff52\uff4e"


@pytest.mark.parametrize("claim", ["agent", "Intern", "intern ", "INTERN", FULLWIDTH_INTERN, ""])
def test_an_intern_cannot_claim_its_way_out_of_its_policy(claim: str) -> None:
    policies = _set(INTERNS_REPORT_ONLY, default_action="allow")
    result = _eval(_signed(_msg("chit chat", sender_role=claim)), policies)
    assert result.verdict is Verdict.DENY
    if claim.strip().lower() in ("intern", FULLWIDTH_INTERN, ""):
        assert result.rules == ["allowed_patterns"]  # a spelling of its own role still fits
        assert result.roles == ("intern",)
    else:
        assert "role_not_granted" in result.rules


def test_an_unverified_intern_is_anonymous_whatever_it_claims() -> None:
    policies = _set(INTERNS_REPORT_ONLY, default_action="deny")
    result = _eval(_msg("chit chat", sender_role="intern"), policies)
    assert result.verdict is Verdict.DENY and result.roles == ("anonymous",)
    assert set(result.rules) == {"role_not_granted", "default_action"}
    # claiming nothing: anonymous, so the default decides — never "no policy for interns"
    assert _eval(_msg("chit chat"), policies).rules == ["default_action"]


def test_a_signer_with_its_own_valid_key_cannot_claim_planner() -> None:
    policies = _set(SecurityPolicy(policy_id="plans", level="*", allowed_roles=["planner"]))
    forged = _eval(_signed(_msg("the plan", sender_role="planner")), policies)
    assert forged.verified and forged.rules == ["allowed_roles", "role_not_granted"]
    genuine = _signed(_msg("the plan", sender_id="planner-1"), PLANNER_KEY)
    assert _eval(genuine, policies).verdict is Verdict.ALLOW


@pytest.mark.parametrize("level", ["xyz", "top secret", "standard\u200b"])
def test_a_level_no_policy_knows_is_denied(level: str) -> None:
    policies = _set(SecurityPolicy(policy_id="std", level="standard"), default_action="allow")
    result = _eval(_signed(_msg(security_level=level)), policies)
    assert result.rules == ["security_level"]


def test_a_level_the_sender_may_not_use_is_denied_and_case_does_not_matter() -> None:
    policies = _set(SecurityPolicy(policy_id="any", level="*"))
    assert _eval(_signed(_msg(security_level="Standard ")), policies).rules == []
    assert _eval(_signed(_msg(security_level="public")), policies).rules == ["security_level"]
    anonymous = _set(SecurityPolicy(policy_id="any", level="*"), anonymous_levels=["public"])
    assert _eval(_msg(security_level="secret"), anonymous).rules == ["security_level"]
    assert _eval(_msg(security_level="public"), anonymous).rules == []


def test_trust_claimed_roles_is_the_documented_unsafe_switch() -> None:
    policies = _set(INTERNS_REPORT_ONLY, default_action="allow", trust_claimed_roles=True)
    assert _eval(_msg("chit chat", sender_role="agent"), policies).verdict is Verdict.ALLOW
    assert _eval(_msg("chit chat", sender_role="Intern"), policies).rules == ["allowed_patterns"]


# -- credentials belong to one sender ---------------------------------------------------


def test_a_token_authenticates_only_the_sender_it_is_granted_to() -> None:
    policies = _set(SecurityPolicy(policy_id="auth", level="*", require_authentication=True))
    token_42 = AuthProof(method="access-token", token="token-of-42", user_id=42, issued_at=NOW)
    stolen = _msg().model_copy(update={"auth": token_42})  # sender intern-1, user 42's token
    result = _eval(stolen, policies)
    assert result.rules == ["require_authentication"] and not result.verified
    assert "not granted" in result.reasons[0]
    own = _msg(sender_id="planner-1").model_copy(update={"auth": token_42})
    assert _eval(own, policies).verdict is Verdict.ALLOW


def test_a_key_granted_to_another_agent_does_not_sign_for_me() -> None:
    policies = _set(SecurityPolicy(policy_id="auth", level="*", require_authentication=True))
    # intern-1 signs as planner-1 with intern-1's key, naming the key id
    spoof = _signed(_msg(sender_id="planner-1"), INTERN_KEY, key_id="intern-1")
    assert _eval(spoof, policies).rules == ["require_authentication"]


# -- replay -------------------------------------------------------------------------------


def test_a_signed_message_replays_only_as_its_own_redelivery() -> None:
    policies = _set(SecurityPolicy(policy_id="any", level="*"))
    msg = _signed(_msg())
    first = Seen(partition=0, offset=5, at=NOW.timestamp())
    redelivered = Context(identities=IDS, now=NOW, seen=first, partition=0, offset=5)
    assert _eval(msg, policies, redelivered).verdict is Verdict.ALLOW
    replayed = Context(identities=IDS, now=NOW, seen=first, partition=0, offset=9)
    assert _eval(msg, policies, replayed).rules == ["replay"]
    # a fresh envelope around the same signed message is the same message
    rewrapped = registry.decode(encode(Event.of(msg, source="replayer"))).payload
    assert _eval(rewrapped, policies, replayed).rules == ["replay"]


@pytest.mark.parametrize("age", [timedelta(minutes=6), timedelta(minutes=-6), timedelta(days=30)])
def test_a_signed_message_outside_the_window_is_denied(age: timedelta) -> None:
    policies = _set(SecurityPolicy(policy_id="any", level="*"))
    assert _eval(_signed(_msg(), issued_at=NOW - age), policies).rules == ["issued_at"]
    assert _eval(_signed(_msg(), issued_at=NOW - age / 2), policies).rules == (
        [] if abs(age) < timedelta(minutes=11) else ["issued_at"]
    )


def test_a_verified_message_on_another_partition_than_its_sender_is_denied() -> None:
    policies = _set(SecurityPolicy(policy_id="any", level="*"))
    elsewhere = Context(identities=IDS, now=NOW, partition=1, offset=3, expected_partition=0)
    assert _eval(_signed(_msg()), policies, elsewhere).rules == ["misrouted"]


# -- encodings and other fields ------------------------------------------------------------

NO_PASSWORDS = SecurityPolicy(
    policy_id="no-passwords", level="*", blocked_patterns=["(?i)password"]
)


@pytest.mark.parametrize(
    "hidden",
    [
        "pass\u200bword",  # zero-width space
        "pass\u00adword",  # soft hyphen
        "\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44",  # full-width letters
        "\u0440\u0430ssword",  # Cyrillic er and a
        "pass\x00word",  # NUL
        "pass\u202eword",  # bidi override
        "pa\u2060ss\ufeffword",  # word joiner, BOM
    ],
)
def test_a_blocked_word_cannot_hide_behind_an_encoding(hidden: str) -> None:
    policies = _set(NO_PASSWORDS, default_action="allow")
    assert _eval(_msg(f"my {hidden} is hunter2"), policies).rules == ["blocked_patterns"]


@pytest.mark.parametrize(
    "where",
    [
        {"metadata": {"note": "password: hunter2"}},
        {"metadata": {"a": [{"b": {"c": ["x", "my password"]}}]}},
        {"metadata": {"password": 1}},
        {"content_type": "text/password"},
        {"message_id": "password-hunter2"},
        {"recipient_id": "password"},
    ],
)
def test_a_blocked_word_in_another_field_is_found(where: dict[str, Any]) -> None:
    policies = _set(NO_PASSWORDS, default_action="allow")
    assert _eval(_msg("nothing here", **where), policies).rules == ["blocked_patterns"]
    narrowed = NO_PASSWORDS.model_copy(update={"scan_fields": ["content"]})
    assert _eval(_msg("nothing here", **where), _set(narrowed, default_action="allow")).rules == []


def test_control_characters_can_be_denied_outright() -> None:
    strict = NO_PASSWORDS.model_copy(update={"deny_control_characters": True})
    result = _eval(_msg("invoice\u202efdp.exe"), _set(strict, default_action="allow"))
    assert result.rules == ["forbidden_characters"] and "U+202E" in result.reasons[0]
    assert _eval(_msg("nul\x00byte"), _set(strict)).rules == ["forbidden_characters"]


def test_a_rejected_message_carries_the_match_masked() -> None:
    keys = SecurityPolicy(policy_id="keys", level="*", blocked_patterns=["sk-[a-z0-9]{8,}"])
    msg = _msg("use sk-abcdef123456 now", metadata={"k": "sk-zyxwvu987654"})
    forwarded = masked_copy(msg, _eval(msg, _set(keys)).masked)
    dumped = forwarded.model_dump_json()
    assert "sk-abcdef123456" not in dumped and "sk-zyxwvu987654" not in dumped
    assert forwarded.content == "use [MASKED] now"
    hashed = _eval(msg, _set(keys, rejected_redaction="hash")).masked
    assert "[sha256:" in masked_copy(msg, hashed).content


# -- bounded cost ------------------------------------------------------------------------


class _Trap:
    """Stands in for a pattern list that must not be run on the content or metadata of a
    message over the limit (it may be on the ids and content type, which the schema
    bounds: what they hold is masked in the rejected copy)."""

    patterns = ("x",)

    def __bool__(self) -> bool:
        return True

    def any_match(self, data: bytes) -> bool:
        if b"y" * 50 in data or b"z" * 50 in data:
            raise AssertionError("content or metadata over the size limit was scanned")
        return False

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the pattern list was used beyond a bounded field ({name})")


def test_content_over_the_limit_is_denied_without_scanning() -> None:
    policy = SecurityPolicy(policy_id="p", level="*", max_message_size=100, blocked_patterns=["x"])
    good = CompiledPolicy.build(policy)
    trap = CompiledPolicy(
        policy,
        good.allowed,
        _Trap(),
        good.allowed_roles,
        good.applies_to_roles,
        "*",
        good.view,  # type: ignore[arg-type]
    )
    policies = PolicySet([trap], enabled=True, default_action=Verdict.DENY)
    assert evaluate(_msg("y" * 1000), policies, KEYS, ctx=CTX).rules == ["max_message_size"]
    big_meta = _msg("y", metadata={"blob": "z" * 200})
    assert evaluate(big_meta, policies, KEYS, ctx=CTX).rules == ["max_message_size"]


def test_metadata_nested_too_deep_is_refused_by_the_schema() -> None:
    from agentstream.schemas import Event, encode

    deep: dict[str, Any] = {}
    node = deep
    for _ in range(300):
        node["a"] = {}
        node = node["a"]
    raw = encode(Event.of(_msg(), source="x")).replace(
        b'"metadata":{}', b'"metadata":' + _dump(deep)
    )
    with pytest.raises(SchemaError):
        registry.decode(raw)


def _dump(value: Any) -> bytes:
    # orjson refuses > 254 levels; build the bytes by hand as a hostile producer would
    depth = 0
    node = value
    while node:
        depth += 1
        node = node["a"]
    return b'{"a":' * depth + b"{}" + b"}" * depth


# -- encryption ---------------------------------------------------------------------------


def test_an_envelope_under_a_key_not_in_the_keychain_does_not_count_as_encrypted() -> None:
    policies = _set(SecurityPolicy(policy_id="enc", level="*", require_encryption=True))
    sealed = encrypt_content(_msg("hi"), ENC, "k-pair")
    assert _eval(sealed, policies).rules == []
    unknown = evaluate(sealed, policies, StaticKeys(), ctx=CTX)
    assert unknown.rules == ["require_encryption"]
    # an "envelope" of base64 plaintext under a made-up key id
    fake = sealed.model_copy(
        update={"encryption": sealed.encryption.model_copy(update={"key_id": "nobody"})}
    )
    assert "decryption" in _eval(fake, policies).rules


def test_an_encryption_key_is_scoped_to_the_senders_it_is_granted_to() -> None:
    policies = _set(SecurityPolicy(policy_id="enc", level="*", require_encryption=True))
    other = encrypt_content(_msg("hi", sender_id="planner-1"), ENC, "k-pair")
    assert set(_eval(other, policies).rules) == {"decryption", "require_encryption"}
    # granted to the sender, but the recipient has an identity without that key
    to_planner = encrypt_content(_msg("hi", recipient_id="planner-1"), ENC, "k-pair")
    result = _eval(to_planner, policies)
    assert set(result.rules) == {"decryption", "require_encryption"}
    assert "recipient" in result.reasons[0]


# -- one meaning for a policy set: the fast path agrees with checking every rule -----------

WORDS = [
    "report: ok",
    "password",
    "pass\u200bword",
    "\uff50\uff41\uff53\uff53",
    "secret",
    "fine",
    "x" * 30,
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.lists(st.sampled_from(WORDS), max_size=3).map(" ".join),
    meta=st.dictionaries(
        st.sampled_from(["a", "password", "n"]), st.sampled_from(WORDS), max_size=2
    ),
    claim=st.sampled_from(["", "intern", "planner", "agent"]),
    signed=st.booleans(),
    level=st.sampled_from(["standard", "public", "Standard"]),
)
def test_fast_path_and_full_evaluation_agree(
    content: str, meta: dict[str, str], claim: str, signed: bool, level: str
) -> None:
    policies = _set(
        SecurityPolicy(policy_id="a", level="*", blocked_patterns=["(?i)pass(word)?"]),
        SecurityPolicy(policy_id="b", allowed_patterns=["^report", "ok$"], max_message_size=40),
        SecurityPolicy(policy_id="c", level="*", blocked_patterns=["secret"], max_message_size=60),
        SecurityPolicy(
            policy_id="d", level="*", applies_to_roles=["intern"], blocked_patterns=["x{9}"]
        ),
        default_action="allow",
    )
    msg = _msg(content, metadata=meta, sender_role=claim, security_level=level)
    if signed:
        msg = _signed(msg)
    fast = evaluate(msg, policies, KEYS, ctx=CTX)
    full = evaluate(msg, policies, KEYS, ctx=CTX, fast=False)
    assert (fast.verdict, fast.policies, fast.roles) == (full.verdict, full.policies, full.roles)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=40),
    ident=st.text(min_size=1, max_size=20),
    fields=st.lists(st.sampled_from(["content", "metadata", "content_type", "ids"]), unique=True),
    fold=st.booleans(),
)
def test_the_direct_field_list_is_the_normaliser_s(
    text: str, ident: str, fields: list[str], fold: bool
) -> None:
    """Messages without metadata skip the walk (`policy._fields`): same fields, same text."""
    from agentstream.agents.security.normalize import scanned_fields
    from agentstream.agents.security.policy import _UNSCANNED, _fields

    msg = _msg(text, message_id=ident, recipient_id=ident + "r", content_type=text[:100] or "x")
    view = (tuple(f for f in ("content", "metadata", "content_type", "ids") if f in fields), fold)
    walked = [
        (p, t)
        for p, t in scanned_fields(msg, view[0], fold_confusables=fold)
        if p not in _UNSCANNED
    ]
    assert _fields(msg, view) == walked
