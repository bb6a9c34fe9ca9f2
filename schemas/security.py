"""Security policies, the security config and the decision recorded for every message."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, Field

from schemas.base import MAX_ID_LENGTH, Payload
from schemas.registry import registry

MAX_PATTERNS = 256
MAX_PATTERN_LENGTH = 1024


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
    level: str = Field(default=SecurityLevel.STANDARD, max_length=64)
    allowed_patterns: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    blocked_patterns: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    max_message_size: int = Field(default=65536, ge=0)
    require_encryption: bool = False
    require_authentication: bool = False
    #: empty = every role
    allowed_roles: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)


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
    reasons: list[str] = Field(default_factory=list)
    #: {policy_id: version} of every policy that was applied
    policies: dict[str, int] = Field(default_factory=dict)
    default_applied: bool = False
    security_enabled: bool = True
    evaluated_at: AwareDatetime
    evaluation_us: int = Field(ge=0)
    #: tamper evidence: sha256 of the previous decision in this partition, and of this one
    prev_hash: str = ""
    hash: str = ""
