"""Security policies, the security config and the decision recorded for every message."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, Field, field_validator

from schemas.base import MAX_ID_LENGTH, Payload
from schemas.registry import registry

MAX_PATTERNS = 256
MAX_PATTERN_LENGTH = 1024
#: a policy whose `level` is this fits messages of every security level
ANY_LEVEL = "*"


class SecurityLevel(StrEnum):
    PUBLIC = "public"
    STANDARD = "standard"
    CONFIDENTIAL = "confidential"
    SECRET = "secret"  # noqa: S105 - a level name, not a password


@registry.register
class SecurityPolicy(Payload):
    """One policy. Published keyed by `policy_id` to the compacted `security.policies`."""

    TYPE = "security.policy"
    VERSION = 1
    KEY_FIELD = "policy_id"

    policy_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[A-Za-z0-9._:-]+$")
    version: int = Field(default=1, ge=1)
    description: str = Field(default="", max_length=2048)
    #: the message security level this policy applies to; "*" = every level
    level: str = Field(default=SecurityLevel.STANDARD, min_length=1, max_length=64)
    #: the sender roles this policy applies to; empty = every role (fit, not a check)
    applies_to_roles: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    allowed_patterns: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    blocked_patterns: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    max_message_size: int = Field(default=65536, ge=0)
    require_encryption: bool = False
    require_authentication: bool = False
    #: a check: the sender's role must be listed; empty = every role
    allowed_roles: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)

    @field_validator("allowed_patterns", "blocked_patterns")
    @classmethod
    def _bounded_patterns(cls, patterns: list[str]) -> list[str]:
        # Syntax and program size are checked with re2 by agents.security.patterns; here
        # only what pydantic can say without a regex engine.
        for pattern in patterns:
            if not pattern:
                raise ValueError("empty pattern")
            if len(pattern) > MAX_PATTERN_LENGTH:
                raise ValueError(
                    f"pattern {pattern[:40]!r}... is {len(pattern)} characters long "
                    f"(limit {MAX_PATTERN_LENGTH})"
                )
        return patterns


@registry.register
class SecurityPolicyRemoved(Payload):
    TYPE = "security.policy_removed"
    VERSION = 1
    KEY_FIELD = "policy_id"

    policy_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)


@registry.register
class SecurityConfig(Payload):
    """The global switch and default. Published under the key `__config__`."""

    TYPE = "security.config"
    VERSION = 1
    KEY_FIELD = "config_id"

    config_id: Literal["__config__"] = "__config__"
    enabled: bool = True
    #: policies may also be given inline; the table merges them with published ones
    policies: list[SecurityPolicy] = Field(default_factory=list)
    default_action: Literal["allow", "deny"] = "deny"


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@registry.register
class PolicyDecision(Payload):
    """One per decoded message on `security.decisions`, hash-chained per partition."""

    TYPE = "security.decision"
    VERSION = 1
    KEY_FIELD = "sender_id"

    message_id: str = Field(max_length=MAX_ID_LENGTH)
    message_event_id: str = Field(max_length=64)
    sender_id: str = Field(max_length=MAX_ID_LENGTH)
    recipient_id: str = Field(default="", max_length=MAX_ID_LENGTH)
    verdict: Verdict
    #: human-readable, one per violated rule of every applied policy
    reasons: list[str] = Field(default_factory=list)
    #: the violated rule codes (max_message_size, blocked_patterns, ...), sorted, unique
    rules: list[str] = Field(default_factory=list)
    #: {policy_id: version} of every policy that was applied
    policies: dict[str, int] = Field(default_factory=dict)
    default_applied: bool = False
    security_enabled: bool = True
    evaluated_at: AwareDatetime
    evaluation_us: int = Field(ge=0)
    #: where the message was read (the decision is written to the same partition number)
    source_partition: int | None = None
    source_offset: int | None = None
    #: tamper evidence: sha256 of the previous decision in this partition, and of this one
    prev_hash: str = ""
    hash: str = ""
