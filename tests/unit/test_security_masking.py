"""What a rejected copy carries: no text any fitting policy blocked, however many policies
hit the same field and however differently they see it.

Each policy's matches used to be masked into the text the previous policy had already
masked, with spans found in the unmasked text: the second policy's blocked text stayed
readable (``[MAS[MASKED]] zzz``), or its spans fell outside the shortened text and
deciding the message raised, sending it, unmasked, to the dead letters."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agentstream.agents.security.policy import (
    WITHHELD,
    PolicySet,
    StaticKeys,
    compiled,
    evaluate,
    masked_copy,
)
from agentstream.schemas.messages import AgentMessage
from agentstream.schemas.security import SecurityConfig, SecurityPolicy, Verdict

#: lowercase words with digits: none is part of a marker ("[MASKED]", "[sha256:…]")
WORDS = ["qq1", "zz2", "ww3", "vv4", "uu5", "tt6"]


def policy_set(*policies: SecurityPolicy, redaction: str = "mask") -> PolicySet:
    return PolicySet(
        [compiled(p) for p in policies],
        enabled=True,
        default_action=Verdict.ALLOW,
        config=SecurityConfig(rejected_redaction=redaction),  # type: ignore[arg-type]
    )


def decide(policies: PolicySet, content: str) -> dict[str, str]:
    message = AgentMessage(message_id="m", sender_id="s", recipient_id="r", content=content)
    result = evaluate(message, policies, StaticKeys())
    assert result.verdict is Verdict.DENY
    return result.masked


def test_two_policies_blocking_different_text_in_one_field_mask_both() -> None:
    policies = policy_set(
        SecurityPolicy(policy_id="a", blocked_patterns=["aaa"]),
        SecurityPolicy(policy_id="b", blocked_patterns=["zzz"]),
    )
    assert decide(policies, "aaa zzz")["content"] == "[MASKED] [MASKED]"


def test_a_longer_first_match_does_not_shift_the_next_policys_spans() -> None:
    policies = policy_set(
        SecurityPolicy(policy_id="a", blocked_patterns=["secret", "pass"]),
        SecurityPolicy(policy_id="b", blocked_patterns=["secret", "pass"]),
    )
    # used to raise ValueError (a span outside the masked text): a dead letter
    assert decide(policies, "secretsecretsecret pass")["content"] == "[MASKED] [MASKED]"


def test_hashing_marks_each_blocked_span_once() -> None:
    policies = policy_set(
        SecurityPolicy(policy_id="a", blocked_patterns=["aaa"]),
        SecurityPolicy(policy_id="b", blocked_patterns=["zzz"]),
        redaction="hash",
    )
    masked = decide(policies, "x aaa y zzz")["content"]
    assert "aaa" not in masked and "zzz" not in masked
    assert masked.startswith("x [sha256:") and masked.count("[sha256:") == 2


def test_policies_that_see_a_field_differently_leave_none_of_it_readable() -> None:
    # one folds confusables (Cyrillic U+0430 reads as "a"), the other does not
    policies = policy_set(
        SecurityPolicy(policy_id="a", blocked_patterns=["pass"], fold_confusables=True),
        SecurityPolicy(policy_id="b", blocked_patterns=["zz2"], fold_confusables=False),
    )
    masked = decide(policies, "p\u0430ss and zz2")["content"]
    for blocked in ("pass", "p\u0430ss", "zz2"):
        assert blocked not in masked


@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=12),
    blocked=st.lists(
        st.tuples(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    joiner=st.sampled_from([" ", "", "-", " \u00e9 "]),
    redaction=st.sampled_from(["mask", "hash"]),
)
def test_no_blocked_word_survives_in_the_rejected_copy(
    words: list[str], blocked: list[tuple[list[str], bool]], joiner: str, redaction: str
) -> None:
    policies = policy_set(
        *(
            SecurityPolicy(policy_id=f"p{i}", blocked_patterns=pats, fold_confusables=fold)
            for i, (pats, fold) in enumerate(blocked)
        ),
        redaction=redaction,
    )
    content = joiner.join(words)
    message = AgentMessage(message_id="m", sender_id="s", recipient_id="r", content=content)
    result = evaluate(message, policies, StaticKeys())
    hit = {w for pats, _ in blocked for w in pats if w in content}
    assert (result.verdict is Verdict.DENY) == bool(hit)
    if hit:
        shown = result.masked["content"]
        assert not [w for w in hit if w in shown], shown


def test_a_cut_masked_text_ends_between_characters() -> None:
    # a rejected copy's masked text past its bound (tests/security/test_output_size_attacks.py)
    from agentstream.agents.security.policy import cut_text

    assert cut_text("abc", 3) == "abc"
    assert cut_text("\u00e9" * 10, 15) == "\u00e9\u00e9[TRUNCATED]"
    assert cut_text("\u00e9" * 10, 14) == "\u00e9[TRUNCATED]"  # not half of one
    assert cut_text("a" * 300, 10_000, max_chars=256) == "a" * 245 + "[TRUNCATED]"


def _rejected(policies: PolicySet, message: AgentMessage) -> tuple[frozenset[str], AgentMessage]:
    result = evaluate(message, policies, StaticKeys())
    assert result.verdict is Verdict.DENY
    return result.withheld, masked_copy(message, result.masked, result.withheld)


def test_a_field_a_blocking_policy_did_not_scan_is_withheld_not_masked() -> None:
    message = AgentMessage(
        message_id="m-ww3",
        sender_id="s",
        recipient_id="r",
        content="qq1 " + "x" * 100,
        metadata={"note": "ww3"},
    )
    # "a" masks qq1 in the content, "small" never scans it (over its limit): what "small"
    # blocks there is unknown, so the copy holds none of what it should have scanned.
    # The ids are bounded by the schema: "small" scans them whatever the message's size
    policies = policy_set(
        SecurityPolicy(policy_id="a", blocked_patterns=["qq1"]),
        SecurityPolicy(
            policy_id="small",
            max_message_size=50,
            blocked_patterns=["ww3"],
            scan_fields=["content", "metadata", "ids"],
        ),
    )
    result = evaluate(message, policies, StaticKeys())
    assert result.rules == ["blocked_patterns", "max_message_size"]
    withheld, copy = _rejected(policies, message)
    assert withheld == {"content", "metadata"}
    assert copy.content == WITHHELD and copy.metadata == {"withheld": WITHHELD}
    assert copy.message_id == "m-[MASKED]" and copy.recipient_id == "r"
    assert copy.content_type == "text/plain" and copy.sender_id == "s"

    # a policy without blocked patterns masks nothing, so skipping it withholds nothing
    allow_only = policy_set(
        SecurityPolicy(policy_id="a", blocked_patterns=["qq1"]),
        SecurityPolicy(policy_id="small", max_message_size=50, allowed_patterns=["x"]),
    )
    withheld, copy = _rejected(allow_only, message)
    assert withheld == frozenset()
    assert copy.content == "[MASKED] " + "x" * 100 and copy.metadata == {"note": "ww3"}


def test_a_policy_that_does_not_compile_withholds_what_it_would_scan() -> None:
    message = AgentMessage(message_id="m", sender_id="s", recipient_id="r", content="qq1")
    broken = SecurityPolicy(
        policy_id="broken", blocked_patterns=["(a)\\1"], scan_fields=["content", "content_type"]
    )
    withheld, copy = _rejected(policy_set(broken), message)
    assert withheld == {"content", "content_type"}
    assert copy.content == copy.content_type == WITHHELD and copy.message_id == "m"
