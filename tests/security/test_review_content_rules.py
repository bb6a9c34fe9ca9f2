"""Review (policy engine vs a hostile sender): content rules that a sender gets around.

Each test asserts the secure behaviour and FAILS on the code it was written against:

* Unicode line and paragraph separators (U+2028, U+2029) and the Ogham space mark
  (U+1680) are white space to a reader but survive normalisation, and RE2's ``\\s`` is
  ASCII: the docs' own example pattern ``(?i)password\\s*[:=]`` misses
  ``password<U+2028>: hunter2``, and the docs' advice for spacing ("``\\s+`` in the
  pattern is the tool") cannot catch them;
* "metadata is held to the same limit" (`max_message_size`) is measured on the
  *normalised* metadata text, and only when the policy scans metadata: 60 KB of
  metadata pass a 1 KiB policy when they are mostly invisible characters, and any
  metadata passes when `scan_fields` leaves metadata out.
"""

from __future__ import annotations

from typing import Any

import pytest

from agentstream.agents.security.policy import PolicySet, StaticKeys, compiled, evaluate
from agentstream.schemas import AgentMessage
from agentstream.schemas.security import SecurityConfig, SecurityPolicy, Verdict

NO_CREDENTIALS = SecurityPolicy(
    policy_id="no-credentials",
    level="*",
    max_message_size=1024,
    blocked_patterns=[r"(?i)password\s*[:=]"],  # docs/security.md, policy file example
)


def _policies(*policies: SecurityPolicy) -> PolicySet:
    return PolicySet(
        [compiled(p) for p in policies],
        enabled=True,
        default_action=Verdict.ALLOW,
        config=SecurityConfig(default_action="allow"),
    )


def _message(content: str = "hello", **kw: Any) -> AgentMessage:
    return AgentMessage(
        message_id="m1", sender_id="agent-7", recipient_id="boss", content=content, **kw
    )


@pytest.mark.parametrize(
    "space",
    ["\u2028", "\u2029", "\u1680"],
    ids=["line-separator", "paragraph-separator", "ogham-space"],
)
def test_unicode_white_space_does_not_hide_a_blocked_assignment(space: str) -> None:
    result = evaluate(
        _message(f"password{space}: hunter2"), _policies(NO_CREDENTIALS), StaticKeys()
    )
    assert result.rules == ["blocked_patterns"]


@pytest.mark.parametrize(
    "metadata, policy",
    [
        # 20,000 zero-width spaces (60 KB) and one letter: 1 byte once normalised
        ({"blob": "\u200b" * 20_000 + "x"}, NO_CREDENTIALS),
        # a policy that only scans the content holds metadata to no limit at all
        ({"blob": "y" * 20_000}, NO_CREDENTIALS.model_copy(update={"scan_fields": ["content"]})),
    ],
    ids=["invisible-padding", "content-only-scan"],
)
def test_metadata_is_held_to_the_policy_size_limit(
    metadata: dict[str, Any], policy: SecurityPolicy
) -> None:
    message = _message("hi", metadata=metadata)
    assert (
        len(message.model_dump_json(include={"metadata"}).encode()) > 15 * policy.max_message_size
    )
    result = evaluate(message, _policies(policy), StaticKeys())
    assert result.rules == ["max_message_size"]
