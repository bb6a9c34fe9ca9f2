"""Security policies, the security config and the decision recorded for every message."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, field_validator

from agentstream.schemas.base import MAX_ID_LENGTH, Payload, Time
from agentstream.schemas.registry import registry

MAX_PATTERNS = 256
MAX_PATTERN_LENGTH = 1024
#: a policy whose `level` is this fits messages of every security level
ANY_LEVEL = "*"
#: the role of a sender without valid authentication (see agents/security/identity.py)
ANONYMOUS_ROLE = "anonymous"
#: ids beginning with this are reserved for the pipeline's own keys (``__config__``)
RESERVED_PREFIX = "__"
#: the fields a policy's blocked patterns apply to (`scan_fields`); "ids" = message,
#: sender and recipient ids (the claimed role and the level are checked, not scanned)
ScanField = Literal["content", "metadata", "content_type", "ids"]
SCAN_FIELDS: tuple[ScanField, ...] = ("content", "metadata", "content_type", "ids")
MAX_SIGNATURE_LENGTH = 256


def _not_reserved(value: str) -> str:
    if value.startswith(RESERVED_PREFIX):
        raise ValueError(f"ids beginning with {RESERVED_PREFIX!r} are reserved")
    return value


class SignedChange(Payload):
    """A rule change (policy, removal, config, identity, worker key): applied by workers
    only when `signature` is a valid Ed25519 signature by an admin key they trust
    (`AGENTSTREAM_SECURITY_ADMIN_KEYS`) over `streams.signing.change_bytes` of the
    event type and the payload with `signature` blanked."""

    #: the admin key id that signed this change ("" = unsigned: never applied)
    signed_by: str = Field(default="", max_length=MAX_ID_LENGTH)
    #: base64 Ed25519 signature
    signature: str = Field(default="", max_length=MAX_SIGNATURE_LENGTH)


class SecurityLevel(StrEnum):
    PUBLIC = "public"
    STANDARD = "standard"
    CONFIDENTIAL = "confidential"
    SECRET = "secret"  # noqa: S105 - a level name, not a password


@registry.register
class SecurityPolicy(SignedChange):
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
    #: what `blocked_patterns` are matched against (allowed patterns: the content only)
    scan_fields: list[ScanField] = Field(default_factory=lambda: list(SCAN_FIELDS))
    #: fold look-alike characters (Cyrillic er -> Latin "p") before matching
    fold_confusables: bool = True
    #: deny content carrying bidi overrides/isolates or NUL outright (rule
    #: ``forbidden_characters``)
    deny_control_characters: bool = False

    _policy_id_not_reserved = field_validator("policy_id")(_not_reserved)

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
class SecurityPolicyRemoved(SignedChange):
    TYPE = "security.policy_removed"
    VERSION = 1
    KEY_FIELD = "policy_id"

    policy_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    #: greater than the removed policy's version (a removal cannot be replayed over a
    #: newer policy of the same id)
    version: int = Field(default=1, ge=1)


@registry.register
class SecurityConfig(SignedChange):
    """The global switch and default. Published under the key `__config__`."""

    TYPE = "security.config"
    VERSION = 1
    KEY_FIELD = "config_id"

    config_id: Literal["__config__"] = "__config__"
    #: increases with every published config (an older config is never applied again)
    version: int = Field(default=1, ge=1)
    enabled: bool = True
    #: policies may also be given inline; the table merges them with published ones
    policies: list[SecurityPolicy] = Field(default_factory=list)
    default_action: Literal["allow", "deny"] = "deny"
    #: UNSAFE: take the role a message claims instead of the roles granted to its
    #: verified sender (`security.identities`); for migrating old producers only
    trust_claimed_roles: bool = False
    #: the security levels that exist (besides those policies name); a message at any
    #: other level is denied (rule ``security_level``)
    levels: list[str] = Field(
        default_factory=lambda: [level.value for level in SecurityLevel], max_length=64
    )
    #: levels a sender without valid authentication may send at; None = every level
    anonymous_levels: list[str] | None = Field(default=None, max_length=64)
    #: signed messages must be issued within this many seconds of the deciding worker's
    #: clock (either way), and a (sender, message id) seen within it is a replay
    replay_window_s: float = Field(default=300.0, gt=0, le=7 * 86400)
    #: what rejected messages carry in place of the text a blocked pattern matched
    rejected_redaction: Literal["mask", "hash"] = "mask"


@registry.register
class AgentIdentity(SignedChange):
    """What an agent is granted. Published keyed by `agent_id` to the compacted
    `security.identities`; policies select and check on these grants of the *verified*
    sender, never on what a message claims."""

    TYPE = "security.identity"
    VERSION = 1
    KEY_FIELD = "agent_id"

    agent_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    version: int = Field(default=1, ge=1)
    description: str = Field(default="", max_length=2048)
    #: roles the agent may act in; a message claiming another role is denied
    roles: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    #: security levels the agent may send at; empty = every known level
    levels: list[str] = Field(default_factory=list, max_length=64)
    #: keychain ids (``signing_key.<id>``) of the HMAC keys that may sign for the agent;
    #: empty = the key stored under the agent's own id
    signing_key_ids: list[str] = Field(default_factory=list, max_length=64)
    #: keychain ids (``encryption_key.<id>``) of the AES keys the agent may encrypt with
    encryption_key_ids: list[str] = Field(default_factory=list, max_length=64)
    #: the user whose access token authenticates this agent (``access_token.<user>``)
    token_user_id: int | None = None

    _agent_id_not_reserved = field_validator("agent_id")(_not_reserved)


@registry.register
class AgentIdentityRevoked(SignedChange):
    TYPE = "security.identity_revoked"
    VERSION = 1
    KEY_FIELD = "agent_id"

    agent_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    #: greater than the revoked identity's version
    version: int = Field(default=1, ge=1)


@registry.register
class WorkerKeyPublished(SignedChange):
    """The public half of a key workers sign hash chains with (`security.worker_keys`,
    compacted, keyed by `key_id`); signed by an admin key like every rule change."""

    TYPE = "security.worker_key"
    VERSION = 1
    KEY_FIELD = "key_id"

    key_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    algorithm: Literal["ed25519"] = "ed25519"
    #: base64 of the raw 32-byte Ed25519 public key
    public_key: str = Field(min_length=1, max_length=128)
    version: int = Field(default=1, ge=1)
    #: a revoked key no longer vouches for records (those it signed are reported)
    revoked: bool = False


@registry.register
class SecurityChangeRejected(Payload):
    """A record on a rule topic that workers ignore: unsigned, signed by an unknown key,
    a signature that does not verify, a reserved id, or an older version than in force
    (a rollback). One per ignored record (`security.changes.rejected`)."""

    TYPE = "security.change_rejected"
    VERSION = 1
    KEY_FIELD = "key"

    topic: str = Field(max_length=512)
    partition: int
    offset: int
    #: the Kafka key of the ignored record
    key: str = Field(default="", max_length=MAX_ID_LENGTH * 2)
    event_type: str = Field(default="", max_length=128)
    signed_by: str = Field(default="", max_length=MAX_ID_LENGTH)
    reason: str = Field(max_length=2048)


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@registry.register
class PolicyDecision(Payload):
    """One per decoded message on `security.decisions`, hash-chained per partition."""

    TYPE = "security.decision"
    VERSION = 2
    KEY_FIELD = "sender_id"

    #: as the rejected copy shows it (masked or withheld when a policy says so)
    message_id: str = Field(max_length=MAX_ID_LENGTH)
    message_event_id: str = Field(max_length=64)
    #: lowercase hex SHA-256 of the decided message's canonical bytes, what a signature
    #: covers (`crypto.message_digest`): every field but the proof, plus the proof's
    #: method, issue time and key id. A forwarded accepted copy has the same digest, so a
    #: reader can tell whether a copy is the message this decision was about. "" when
    #: the rejected copy masks or withholds anything (the digest and the copy's other
    #: bytes would let its readers guess a short secret), and in v1 decisions
    message_digest: str = Field(default="", max_length=64)
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
    evaluated_at: Time
    evaluation_us: int = Field(ge=0)
    #: where the message was read (the decision is written to the same partition number)
    source_partition: int | None = None
    source_offset: int | None = None
    #: who sent it as far as the pipeline could verify: whether the proof verified, the
    #: role the message claimed ("" = none) and the roles the decision used
    verified: bool = False
    claimed_role: str = Field(default="", max_length=128)
    roles: list[str] = Field(default_factory=list)
    #: the signed issue time of the message (replay window), when it had one
    issued_at: Time | None = None
    #: {policy_id: admin key id that signed the applied version}
    policy_signers: dict[str, str] = Field(default_factory=dict)
    #: tamper evidence: sha256 of the previous decision in this partition, and of this one
    prev_hash: str = ""
    hash: str = ""
    #: the writing worker's Ed25519 signature over `hash` (see streams.audit_chain); set on
    #: the last record of each batch it writes to a partition, which vouches for every
    #: record before it through the hash chain
    signed_by: str = Field(default="", max_length=MAX_ID_LENGTH)
    signature: str = Field(default="", max_length=MAX_SIGNATURE_LENGTH)


@registry.upcaster(PolicyDecision.TYPE, 1)
def _policy_decision_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 bound no digest of the message it decided (read as ""); what it has means the
    same. Its chain hashes are over the record as written, so they still verify."""
    return payload
