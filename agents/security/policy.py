"""Policy evaluation: pure functions of (message, policies in force, identities, keys,
replay state), no I/O.

Who sends (before any policy; agents/security/identity.py)
----------------------------------------------------------
The sender is *verified* when it has an identity (`security.identities`) and its proof
verifies with a credential that identity grants: an HMAC signature by a granted key id,
or the access token of its token user. Roles come from the identity, never from the
message: a claimed `sender_role` narrows the roles to that one and is denied (rule
``role_not_granted``) unless granted; an unverified sender's only role is ``anonymous``.
Then, once per message:

* ``security_level``  the level (normalised) is one the config or a policy knows, and
                      one the sender may use (its identity's levels; for unverified
                      senders the config's `anonymous_levels`)
* ``issued_at``       a verified message carries a signed issue time within the config's
                      replay window of the deciding worker's clock
* ``replay``          a verified (sender, message id) was not decided before within the
                      window at another offset (the same offset again is a redelivery)
* ``misrouted``       a verified message sits in the partition its sender id hashes to
                      (the replay state of a sender lives there)
* ``decryption``      an envelope is well formed, travels without plaintext, uses a key id
                      granted to the sender (and to the recipient, when it has an
                      identity), and decrypts with that key when it is in the keychain

Which policies apply
--------------------
A policy *fits* a message when its `level` equals the message's normalised
`security_level` (or is ``"*"``) and its `applies_to_roles` is empty or names one of the
sender's roles. Every fitting policy is applied and every violated rule of every one of
them is reported. When none fits, the config's `default_action` decides. When security is
disabled, every message is allowed (and the decision still recorded).

Checks, in this order, per fitting policy (ordered by policy id)
----------------------------------------------------------------
1. ``allowed_roles``          one of the sender's roles is listed (empty list = any role)
2. ``require_authentication`` the sender is verified
3. ``require_encryption``     a valid envelope under a key the keychain holds, no plaintext
4. ``max_message_size``       content size in UTF-8 bytes (of the plaintext: for an
                              envelope, ciphertext size minus the GCM tag); metadata, as
                              JSON as sent, is held to the same limit whatever the
                              policy scans (ids are bounded by the schema).
                              Over it, the policy's patterns run on the ids and content
                              type only (the schema bounds them): the cost of a decision
                              is bounded by the limits, not by what the sender sends
5. ``forbidden_characters``   with `deny_control_characters`: no bidi override/isolate or
                              NUL in the content
6. ``blocked_patterns``       no pattern matches any field of `scan_fields` (content,
                              metadata keys and values, content type, ids), each matched
                              after normalisation (agents/security/normalize.py)
7. ``allowed_patterns``       when non-empty, at least one pattern matches the content

Encrypted content whose key is not in the keychain cannot be checked against patterns: a
fitting policy with patterns then denies it (rule ``content_unreadable``).

What a fitting policy with blocked patterns did not scan (content and metadata over its
limit or unreadable; every field when the policy is broken) is withheld from the
rejected copy (`Evaluation.withheld`, `masked_copy`): nothing says what in it the
patterns would have masked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from annotated_types import MaxLen
from pydantic import ValidationError

from agentstream.agents.security import crypto
from agentstream.agents.security.identity import (
    EMPTY,
    Identity,
    IdentityRegistry,
    norm_name,
    norm_names,
)
from agentstream.agents.security.normalize import (
    byte_spans_to_char_spans,
    forbidden_controls,
    hide_keys,
    mask_spans,
    normalize,
    scanned_fields,
)
from agentstream.agents.security.patterns import PatternError, PatternList
from agentstream.schemas.messages import AgentMessage, AuthProof
from agentstream.schemas.security import (
    ANONYMOUS_ROLE,
    ANY_LEVEL,
    SCAN_FIELDS,
    SecurityConfig,
    SecurityLevel,
    SecurityPolicy,
    Verdict,
)
from agentstream.streams.tables.security import CONFIG_KEY

RULES = (
    "allowed_roles",
    "require_authentication",
    "require_encryption",
    "max_message_size",
    "forbidden_characters",
    "blocked_patterns",
    "allowed_patterns",
    "content_unreadable",
    "decryption",
    "invalid_policy",
    "default_action",
    "role_not_granted",
    "security_level",
    "issued_at",
    "replay",
    "misrouted",
)


class KeyView(Protocol):
    """The secrets an evaluation may need, already fetched (see `required_keys`)."""

    def signing_key(self, key_id: str) -> bytes | None: ...

    def encryption_key(self, key_id: str) -> bytes | None: ...

    def access_token(self, user_id: int) -> str | None: ...


@dataclass(frozen=True)
class KeyRequest:
    kind: str  # "signing" | "encryption" | "token"
    name: str


@dataclass
class StaticKeys:
    """A KeyView over plain dicts (what the agent fills per batch, and tests use)."""

    signing: Mapping[str, bytes | None] = field(default_factory=dict)
    encryption: Mapping[str, bytes | None] = field(default_factory=dict)
    tokens: Mapping[int, str | None] = field(default_factory=dict)

    def signing_key(self, key_id: str) -> bytes | None:
        return self.signing.get(key_id)

    def encryption_key(self, key_id: str) -> bytes | None:
        return self.encryption.get(key_id)

    def access_token(self, user_id: int) -> str | None:
        return self.tokens.get(user_id)


@dataclass(frozen=True)
class Seen:
    """Where a verified (sender, message id) was decided first (the replay table)."""

    partition: int
    offset: int
    #: its signed issue time, epoch seconds (dates the entry for the table's retention)
    at: float


@dataclass(frozen=True)
class Context:
    """What deciding a message needs besides the message, the policies and the keys."""

    identities: IdentityRegistry = EMPTY
    #: the deciding worker's clock (the replay window is measured against it)
    now: datetime | None = None
    #: the replay table's entry for this message's (sender, message id), if any
    seen: Seen | None = None
    #: where the message was read, and where its sender's key hashes to
    partition: int | None = None
    offset: int | None = None
    expected_partition: int | None = None


NO_CONTEXT = Context()


@dataclass(frozen=True)
class Violation:
    rule: str
    detail: str
    policy_id: str | None = None
    policy_version: int | None = None

    @property
    def reason(self) -> str:
        where = f" [policy {self.policy_id} v{self.policy_version}]" if self.policy_id else ""
        return f"{self.rule}: {self.detail}{where}"


@dataclass(frozen=True)
class Evaluation:
    verdict: Verdict
    violations: tuple[Violation, ...]
    #: {policy_id: version} of every applied policy (the fit group's own map: read-only)
    policies: dict[str, int]
    default_applied: bool
    security_enabled: bool
    #: whether the sender's proof verified against a credential its identity grants
    verified: bool = False
    #: the role the message claimed, normalised ("" = none)
    claimed_role: str = ""
    #: the roles policies were fitted and checked with
    roles: tuple[str, ...] = ()
    #: the signed issue time, when the message is verified and carries one
    issued_at: datetime | None = None
    #: {field path: the normalised text with what a blocked pattern matched masked}
    masked: dict[str, str] = field(default_factory=dict)
    #: the fields (`WITHHOLDABLE`) a fitting policy with blocked patterns did not scan
    #: (content and metadata over its size limit or not readable; every field of a
    #: policy that does not compile): a rejected copy carries `WITHHELD` instead of them,
    #: since nothing says what in them the patterns would have masked
    withheld: frozenset[str] = frozenset()

    @property
    def reasons(self) -> list[str]:
        return [v.reason for v in self.violations]

    @property
    def rules(self) -> list[str]:
        return sorted({v.rule for v in self.violations})


#: how a policy's blocked patterns see a message: (scan fields, fold confusables)
View = tuple[tuple[str, ...], bool]


@dataclass(frozen=True)
class CompiledPolicy:
    policy: SecurityPolicy
    allowed: PatternList
    blocked: PatternList
    allowed_roles: frozenset[str]
    applies_to_roles: frozenset[str]
    #: the normalised level ("*" = every level)
    level: str
    view: View
    #: set when the stored policy cannot be compiled: it then denies what it fits
    broken: str | None = None

    @property
    def id(self) -> str:
        return self.policy.policy_id

    @property
    def version(self) -> int:
        return self.policy.version

    @property
    def has_patterns(self) -> bool:
        return bool(self.allowed) or bool(self.blocked)

    def fits(self, level: str, roles: frozenset[str]) -> bool:
        if self.level != ANY_LEVEL and self.level != level:
            return False
        return not self.applies_to_roles or not self.applies_to_roles.isdisjoint(roles)

    @classmethod
    def build(cls, policy: SecurityPolicy) -> CompiledPolicy:
        try:
            allowed = PatternList.build(policy.allowed_patterns)
            blocked = PatternList.build(policy.blocked_patterns)
            broken = None
        except PatternError as exc:
            allowed = blocked = PatternList.build(())
            broken = str(exc)
        level = policy.level if policy.level == ANY_LEVEL else norm_name(policy.level)
        fields = tuple(f for f in SCAN_FIELDS if f in policy.scan_fields)
        return cls(
            policy,
            allowed,
            blocked,
            norm_names(policy.allowed_roles),
            norm_names(policy.applies_to_roles),
            level,
            (fields, policy.fold_confusables),
            broken,
        )


@dataclass(frozen=True)
class BlockedUnion:
    """The blocked patterns of the (not broken) policies of a group that see messages
    one way, as one list: a field is scanned once for all of them, and `owners` says whose
    patterns matched. A pattern matches in the union exactly when it matches in its own
    policy's list (`PatternList.indices` is exact either way)."""

    blocked: PatternList
    #: per pattern of `blocked`: (position in the group, index in its blocked list) of
    #: each policy listing it
    owners: tuple[tuple[tuple[int, int], ...], ...]
    #: the smallest size limit of those policies. A message within it is scanned by every
    #: one of them, so one union scan costs no more than theirs; over it, some of them
    #: never scan it and each policy that does scans its own list (cost bounded by limits)
    min_size: int

    @classmethod
    def build(cls, policies: tuple[CompiledPolicy, ...], view: View) -> BlockedUnion | None:
        owners: dict[str, list[tuple[int, int]]] = {}
        limits = []
        for position, policy in enumerate(policies):
            if policy.broken is None and policy.view == view and policy.blocked:
                limits.append(policy.policy.max_message_size)
                for index, pattern in enumerate(policy.blocked.patterns):
                    owners.setdefault(pattern, []).append((position, index))
        try:
            # already unique: the list's indices are `owners`' order
            blocked = PatternList.build(owners)
        except PatternError:  # each compiled alone already; a union cannot add errors
            return None
        return cls(blocked, tuple(map(tuple, owners.values())), min(limits, default=0))

    def covers(self, size: int, metadata_size: int) -> bool:
        """Whether a message of these sizes is scanned with the union: within every
        limit, and the list is one RE2::Set (otherwise its policies' own Sets are
        faster than a search per pattern)."""
        return (
            self.blocked.matcher is not None
            and size <= self.min_size
            and metadata_size <= self.min_size
        )


def blocked_unions(policies: tuple[CompiledPolicy, ...]) -> dict[View, BlockedUnion]:
    """A `BlockedUnion` per way `policies` see messages; a view whose union cannot be
    built has none (its policies scan their own lists)."""
    out = {}
    for view in dict.fromkeys(p.view for p in policies):
        union = BlockedUnion.build(policies, view)
        if union is not None:
            out[view] = union
    return out


@dataclass(frozen=True)
class FitGroup:
    """The policies fitting one (level, roles), with what lets most messages be allowed
    in one scan per field: their blocked patterns as one list, the smallest size limit,
    and whether anything (roles, authentication, encryption, control characters, a
    broken policy, policies that see a message differently) needs the full per-policy
    evaluation anyway. The result is the same either way (a property test checks it);
    the fast path only skips work for messages that violate nothing. The full
    evaluation scans each field once per view too (`unions`), and matches, spans and
    masks per policy only for the policies whose patterns matched."""

    policies: tuple[CompiledPolicy, ...]
    versions: dict[str, int]
    fast: bool
    min_size: int
    blocked: PatternList
    allowed: tuple[PatternList, ...]
    #: how every fitting policy sees a message (fast path only)
    view: View
    #: the blocked patterns of the policies, one union per view (`blocked_unions`)
    unions: Mapping[View, BlockedUnion]
    #: {normalised text: matches the blocked union} for fields that repeat across
    #: messages (sender, recipient, content type): scanned once, not once per message
    seen_clean: dict[str, bool] = field(default_factory=dict, compare=False)

    @classmethod
    def build(
        cls,
        policies: tuple[CompiledPolicy, ...],
        roles: frozenset[str],
        unions: Mapping[View, BlockedUnion],
    ) -> FitGroup:
        views = {p.view for p in policies}
        fast = len(views) == 1 and all(
            p.broken is None
            and not p.policy.require_authentication
            and not p.policy.require_encryption
            and not p.policy.deny_control_characters
            and (not p.allowed_roles or not p.allowed_roles.isdisjoint(roles))
            for p in policies
        )
        view = next(iter(views)) if len(views) == 1 else ((), True)
        union = unions.get(view)
        return cls(
            policies,
            {p.id: p.version for p in policies},
            fast and union is not None and bool(policies),
            min((p.policy.max_message_size for p in policies), default=0),
            union.blocked if fast and union is not None else PatternList.build(()),
            tuple(p.allowed for p in policies if p.allowed),
            view,
            unions,
        )


_COMPILED: dict[str, CompiledPolicy] = {}


def compiled(policy: SecurityPolicy) -> CompiledPolicy:
    """Compile once per distinct policy content (a config change does not recompile all)."""
    fingerprint = hashlib.sha256(
        orjson.dumps(policy.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    hit = _COMPILED.get(fingerprint)
    if hit is None:
        if len(_COMPILED) > 4096:
            _COMPILED.clear()
        hit = _COMPILED[fingerprint] = CompiledPolicy.build(policy)
    return hit


_DEFAULT_CONFIG = SecurityConfig()


class PolicySet:
    """The policies in force and the config, compiled; immutable — a change builds a new one."""

    def __init__(
        self,
        policies: Iterable[CompiledPolicy],
        *,
        enabled: bool,
        default_action: Verdict,
        invalid: Mapping[str, str] | None = None,
        config: SecurityConfig = _DEFAULT_CONFIG,
        signers: Mapping[str, str] | None = None,
    ) -> None:
        self.policies = tuple(sorted(policies, key=lambda p: p.id))
        self.enabled = enabled
        self.default_action = default_action
        #: stored records that are not valid policies at all: {key: problem}
        self.invalid = dict(invalid or {})
        self.trust_claimed_roles = config.trust_claimed_roles
        self.replay_window_s = config.replay_window_s
        self.rejected_redaction = config.rejected_redaction
        #: every level a message may name: the config's and those policies name
        self.levels = norm_names(config.levels) | {
            p.level for p in self.policies if p.level != ANY_LEVEL
        }
        self.anonymous_levels = (
            None if config.anonymous_levels is None else norm_names(config.anonymous_levels)
        )
        #: {policy id: admin key id that signed the version in force}
        self.signers = dict(signers or {})
        self._fitting: dict[tuple[str, frozenset[str]], FitGroup] = {}
        #: {ids of the fitting policies: their unions}: groups of the same policies share
        #: them, so a flood of new role sets (claimed roles, when trusted) compiles
        #: nothing. Few keys: which policies fit depends on the level (one of `levels`,
        #: or unknown) and on which `applies_to_roles` names the roles include
        self._unions: dict[tuple[str, ...], dict[View, BlockedUnion]] = {}

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        *,
        enabled: bool = True,
        default_action: str = "deny",
        signers: Mapping[str, str] | None = None,
    ) -> PolicySet:
        """Build from the materialised table (see `streams.tables.security`).

        `enabled`/`default_action` are the settings' initial values, used until a config
        event exists. Published policies win over inline config policies of the same id.
        """
        invalid: dict[str, str] = {}
        by_id: dict[str, SecurityPolicy] = {}
        config = _DEFAULT_CONFIG
        raw_config = state.get(CONFIG_KEY)
        if raw_config is not None:
            try:
                config = SecurityConfig.model_validate(raw_config)
                enabled, default_action = config.enabled, config.default_action
                by_id.update({p.policy_id: p for p in config.policies})
            except ValidationError as exc:
                invalid[CONFIG_KEY] = str(exc).splitlines()[0]
                # an unreadable config must not open the gate
                enabled, default_action = True, "deny"
        for key, raw in state.items():
            if key == CONFIG_KEY:
                continue
            try:
                by_id[key] = SecurityPolicy.model_validate(raw)
            except ValidationError as exc:
                invalid[key] = str(exc).splitlines()[0]
        return cls(
            (compiled(p) for p in by_id.values()),
            enabled=enabled,
            default_action=Verdict(default_action),
            invalid=invalid,
            config=config,
            signers=signers,
        )

    def fitting(self, level: str, roles: frozenset[str]) -> tuple[CompiledPolicy, ...]:
        return self.group(level, roles).policies

    def group(self, level: str, roles: frozenset[str]) -> FitGroup:
        key = (level, roles)
        hit = self._fitting.get(key)
        if hit is None:
            fitting = tuple(p for p in self.policies if p.fits(level, roles))
            ids = tuple(p.id for p in fitting)
            unions = self._unions.get(ids)
            if unions is None:
                unions = self._unions[ids] = blocked_unions(fitting)
            hit = FitGroup.build(fitting, roles, unions)
            if len(self._fitting) < 10_000:  # levels and role sets are few; bound it anyway
                self._fitting[key] = hit
        return hit

    def versions(self) -> dict[str, int]:
        return {p.id: p.version for p in self.policies}


# -- who sends ------------------------------------------------------------------------


def signing_key_id(message: AgentMessage) -> str:
    """The keychain id of the key a signed message names (default: the sender's own)."""
    auth = message.auth
    return (auth.key_id if auth is not None and auth.key_id else None) or message.sender_id


def required_keys(
    message: AgentMessage, policies: PolicySet, identities: IdentityRegistry = EMPTY
) -> set[KeyRequest]:
    """The secrets evaluating `message` may need (so the agent fetches them in one go).

    Only credentials the sender's identity grants are ever looked up: a flood of
    messages naming made-up senders or key ids costs no keychain access."""
    if not policies.enabled:
        return set()
    needed: set[KeyRequest] = set()
    identity = identities.get(message.sender_id)
    if message.encryption is not None and (
        identity is not None and message.encryption.key_id in identity.encryption_key_ids
    ):
        needed.add(KeyRequest("encryption", message.encryption.key_id))
    auth = message.auth
    if auth is not None and identity is not None:
        if auth.method == "hmac-sha256":
            key_id = signing_key_id(message)
            if key_id in identity.signing_key_ids:
                needed.add(KeyRequest("signing", key_id))
        elif auth.user_id is not None and auth.user_id == identity.token_user_id:
            needed.add(KeyRequest("token", str(auth.user_id)))
    return needed


def authenticate(
    message: AgentMessage, identity: Identity | None, keys: KeyView
) -> tuple[bool, str]:
    """(verified, why not): the proof must verify with a credential `identity` grants."""
    auth = message.auth
    if auth is None:
        return False, "the message carries no proof of identity"
    if auth.redacted or auth.verified:
        # the pipeline's own marks on what it forwards: a proof carrying them is a copy
        # taken from an output topic, or a sender dressing up as a verified one
        return False, "auth.redacted and auth.verified are set by enforce_policy, not by senders"
    if identity is None:
        return False, f"sender {message.sender_id!r} has no identity (agentstream identity grant)"
    if auth.method == "hmac-sha256":
        key_id = signing_key_id(message)
        if key_id not in identity.signing_key_ids:
            return False, f"signing key {key_id!r} is not granted to {message.sender_id!r}"
        key = keys.signing_key(key_id)
        if key is None:
            return False, f"no signing key {key_id!r} in the keychain"
        if not crypto.verify_signature(message, key, auth.signature or ""):
            return False, "the signature does not verify"
        return True, ""
    if auth.user_id is None:
        return False, "an access-token proof needs user_id"
    if auth.user_id != identity.token_user_id:
        return False, f"the token of user {auth.user_id} is not granted to {message.sender_id!r}"
    stored = keys.access_token(auth.user_id)
    if stored is None:
        return False, f"no access token stored for user {auth.user_id}"
    if not crypto.tokens_equal(stored, auth.token or ""):
        return False, f"the access token of user {auth.user_id} does not match"
    return True, ""


@dataclass(frozen=True)
class Sender:
    verified: bool
    why_not: str
    claimed: str
    roles: frozenset[str]
    identity: Identity | None
    violations: tuple[Violation, ...]


def resolve_sender(
    message: AgentMessage, policies: PolicySet, keys: KeyView, identities: IdentityRegistry
) -> Sender:
    """Verification, roles and level: the checks made once per message, before policies."""
    identity = identities.get(message.sender_id)
    verified, why_not = authenticate(message, identity, keys)
    claimed = norm_name(message.sender_role)
    violations: list[Violation] = []
    if policies.trust_claimed_roles:
        roles = frozenset({claimed or ANONYMOUS_ROLE})
    else:
        granted = identity.roles if verified and identity is not None else frozenset()
        roles = granted or frozenset({ANONYMOUS_ROLE})
        if claimed and claimed in roles:
            roles = frozenset({claimed})
        elif claimed:
            who = "its verified sender" if verified else "an unverified sender"
            violations.append(
                Violation(
                    "role_not_granted",
                    f"role {claimed!r} is not granted to {who} "
                    f"(roles: {', '.join(sorted(roles))})" + ("" if verified else f"; {why_not}"),
                )
            )
    level = norm_name(message.security_level)
    if level not in policies.levels:
        violations.append(Violation("security_level", f"unknown security level {level!r}"))
    elif verified and identity is not None and identity.levels and level not in identity.levels:
        violations.append(
            Violation("security_level", f"{message.sender_id!r} may not send at level {level!r}")
        )
    elif (
        not verified
        and policies.anonymous_levels is not None
        and level not in policies.anonymous_levels
    ):
        violations.append(
            Violation("security_level", f"unverified senders may not send at level {level!r}")
        )
    return Sender(verified, why_not, claimed, roles, identity, tuple(violations))


def freshness(
    message: AgentMessage, policies: PolicySet, ctx: Context
) -> tuple[datetime | None, list[Violation]]:
    """(issued_at, violations) of the replay protection of a verified message."""
    auth = message.auth
    issued = auth.issued_at if auth is not None else None
    if issued is None:
        return None, [Violation("issued_at", "a verified message needs a signed issue time")]
    now = ctx.now or datetime.now(UTC)
    skew = (now - issued).total_seconds()
    window = policies.replay_window_s
    out: list[Violation] = []
    if abs(skew) > window:
        when = "old" if skew > 0 else "in the future"
        out.append(Violation("issued_at", f"issued {abs(skew):.0f}s {when} (window {window:g}s)"))
    seen = ctx.seen
    if seen is not None and (seen.partition, seen.offset) != (ctx.partition, ctx.offset):
        out.append(
            Violation(
                "replay",
                f"message {message.message_id!r} of {message.sender_id!r} was decided before "
                f"(partition {seen.partition}, offset {seen.offset})",
            )
        )
    if (
        ctx.expected_partition is not None
        and ctx.partition is not None
        and ctx.partition != ctx.expected_partition
    ):
        out.append(
            Violation(
                "misrouted",
                f"read from partition {ctx.partition}; messages of {message.sender_id!r} "
                f"belong in partition {ctx.expected_partition} (keyed by the sender id)",
            )
        )
    return issued, out


# -- the decision ---------------------------------------------------------------------


def evaluate(
    message: AgentMessage,
    policies: PolicySet,
    keys: KeyView,
    *,
    fast: bool = True,
    union: bool = True,
    ctx: Context = NO_CONTEXT,
) -> Evaluation:
    """Decide one message. `fast=False` skips the one-scan shortcut; `union=False` has
    every policy scan the fields with its own patterns instead of reading what the one
    scan per view found (the reference: tests compare them)."""
    if not policies.enabled:
        return Evaluation(Verdict.ALLOW, (), {}, False, False)
    sender = resolve_sender(message, policies, keys, ctx.identities)
    violations = list(sender.violations)
    issued_at = None
    if sender.verified:
        issued_at, stale = freshness(message, policies, ctx)
        violations += stale
    level = norm_name(message.security_level)
    group = policies.group(level, sender.roles)

    def result(
        verdict: Verdict,
        found: list[Violation],
        masked: dict[str, str],
        withheld: frozenset[str] = frozenset(),
    ) -> Evaluation:
        return Evaluation(
            verdict,
            tuple(found),
            group.versions,  # shared by every decision of the group: read-only
            not group.policies,
            True,
            sender.verified,
            sender.claimed,
            tuple(sorted(sender.roles)),
            issued_at,
            masked,
            withheld,
        )

    if (
        fast
        and group.fast
        and not violations
        and message.encryption is None
        and _fast_allows(message, group)
    ):
        return result(Verdict.ALLOW, [], {})

    # -- content: plaintext, or the envelope's (decrypted when the key is known) ---------
    plain: str | None
    size: int
    envelope = message.encryption
    envelope_ok = False  # a valid envelope under a key the keychain holds
    envelope_bad = False  # malformed, not granted, or fails to decrypt
    if envelope is None:
        plain = message.content
        size = len(plain.encode())
    else:
        plain = None
        try:
            size = crypto.plaintext_size(envelope)
            if message.content:
                raise crypto.EnvelopeError("plaintext content travels next to the envelope")
            identity = sender.identity
            if identity is None or envelope.key_id not in identity.encryption_key_ids:
                raise crypto.EnvelopeError(
                    f"encryption key {envelope.key_id!r} is not granted to {message.sender_id!r}"
                )
            # a key shared with one peer must not carry messages to another: a recipient
            # with an identity must be granted the key too
            peer = ctx.identities.get(message.recipient_id)
            if peer is not None and envelope.key_id not in peer.encryption_key_ids:
                raise crypto.EnvelopeError(
                    f"encryption key {envelope.key_id!r} is not granted to recipient "
                    f"{message.recipient_id!r}"
                )
            key = keys.encryption_key(envelope.key_id)
            if key is not None:
                plain = crypto.decrypt_content(message, key)
                envelope_ok = True
        except crypto.EnvelopeError as exc:
            envelope_bad = True
            size = len(message.content.encode())
            violations.append(Violation("decryption", str(exc)))

    fitting = group.policies
    scanned = _Scanned(message, plain if plain is not None else "")
    #: {field path: (its text as the first policy to block something in it saw it, the
    #: character spans to mask)}: masked once, after every policy, with every policy's
    #: spans; masking policy by policy applied a later policy's spans to text an earlier
    #: one had already shortened, leaving blocked text readable or raising
    blocked_spans: dict[str, tuple[str, list[tuple[int, int]]]] = {}
    #: (index in `violations`, patterns shown, paths) of each blocked_patterns violation:
    #: its paths are renamed once every policy has said which keys it matched
    blocked_at: list[tuple[int, list[str], list[str]]] = []
    #: the fields a policy with blocked patterns did not scan (`Evaluation.withheld`)
    withheld: set[str] = set()

    def record(matches: list[_Hit], pid: str, ver: int) -> None:
        """Note what a policy's blocked patterns matched: spans to mask, a violation."""
        hits: dict[str, list[str]] = {}
        for path, text, matched, spans in matches:
            hits[path] = matched
            chars = byte_spans_to_char_spans(text, spans)
            kept = blocked_spans.get(path)
            if kept is None:
                blocked_spans[path] = (text, chars)
            elif kept[0] == text:
                kept[1].extend(chars)
            else:
                # a policy that normalises differently (confusables): its spans do
                # not index the kept text, so none of that text may be shown
                kept[1].append((0, len(kept[0])))
        if hits:
            shown = sorted({x for found in hits.values() for x in found})[:5]
            blocked_at.append((len(violations), shown, list(hits)))
            violations.append(_blocked(shown, hits, pid, ver))

    def skipped(policy: CompiledPolicy) -> None:
        """A policy with blocked patterns that does not scan this message (over its limit,
        content it cannot read) still scans the fields the schema bounds (ids, content
        type: the cost stays bounded), and the rejected copy withholds the rest."""
        withheld.update(_unscanned(message, policy.view))
        names, fold = policy.view
        bounded = tuple(name for name in names if name in _BOUNDED_FIELDS)
        if bounded:
            fields = scanned.fields((bounded, fold))
            record(_own_hits(policy.blocked, fields), policy.id, policy.version)

    for position, policy in enumerate(fitting):
        p = policy.policy
        pid, ver = policy.id, policy.version
        if policy.broken is not None:
            violations.append(Violation("invalid_policy", policy.broken, pid, ver))
            if p.blocked_patterns:  # what it was meant to catch is unknown: every field
                withheld.update(_unscanned(message, policy.view, bounded=True))
            continue
        if policy.allowed_roles and policy.allowed_roles.isdisjoint(sender.roles):
            violations.append(
                Violation(
                    "allowed_roles",
                    f"role {', '.join(sorted(sender.roles))!r} is not allowed",
                    pid,
                    ver,
                )
            )
        if p.require_authentication and not sender.verified:
            violations.append(Violation("require_authentication", sender.why_not, pid, ver))
        if p.require_encryption and not envelope_ok:
            if envelope is None:
                detail = "no encryption envelope"
            elif envelope_bad:
                detail = "envelope is not valid"
            else:
                detail = f"key {envelope.key_id!r} is not in the keychain: cannot be checked"
            violations.append(Violation("require_encryption", detail, pid, ver))
        limit = p.max_message_size
        meta = scanned.metadata_bytes
        if size > limit or meta > limit:
            if size > limit:
                violations.append(
                    Violation(
                        "max_message_size", f"content is {size} bytes, limit {limit}", pid, ver
                    )
                )
            if meta > limit:
                violations.append(
                    Violation(
                        "max_message_size",
                        f"metadata is {meta} bytes of JSON, limit {limit}",
                        pid,
                        ver,
                    )
                )
            if policy.blocked:
                skipped(policy)
            continue  # never scan what is over the limit: the cost stays bounded
        if not policy.has_patterns and not p.deny_control_characters:
            continue
        if plain is None:
            if not envelope_bad and policy.has_patterns:  # a broken one is reported once
                violations.append(
                    Violation(
                        "content_unreadable",
                        "encrypted with a key not in the keychain; patterns cannot be applied",
                        pid,
                        ver,
                    )
                )
            if policy.blocked:
                skipped(policy)
            continue
        if p.deny_control_characters:
            bad = forbidden_controls(plain)
            if bad:
                violations.append(Violation("forbidden_characters", ", ".join(bad), pid, ver))
        fields = scanned.fields(policy.view)
        if policy.blocked:
            shared = group.unions.get(policy.view) if union else None
            if shared is not None and shared.covers(size, meta):
                matches = _union_hits(
                    policy.blocked, scanned.union_scan(policy.view, shared), position
                )
            else:
                matches = _own_hits(policy.blocked, fields)
            record(matches, pid, ver)
        if policy.allowed and not policy.allowed.any_match(scanned.content(policy.view)):
            violations.append(Violation("allowed_patterns", "no allowed pattern matches", pid, ver))

    if not fitting and policies.default_action is Verdict.DENY:
        violations.append(
            Violation(
                "default_action",
                f"no policy fits level {level!r} and roles "
                f"{', '.join(sorted(sender.roles))!r}; the default action is deny",
            )
        )
    hidden = [path for path in blocked_spans if path.endswith("#key")]
    if hidden:
        # a matched metadata key is spelt out in its path (and in the paths under it):
        # wherever a path is shown, the key is named by its position instead
        renamed = hide_keys(scanned.message.metadata, hidden)
        blocked_spans = {renamed.get(path, path): kept for path, kept in blocked_spans.items()}
        for index, shown, paths in blocked_at:
            where = [renamed.get(path, path) for path in paths]
            old = violations[index]
            violations[index] = _blocked(shown, where, old.policy_id, old.policy_version)
    masked = {
        path: mask_spans(text, spans, policies.rejected_redaction)
        for path, (text, spans) in blocked_spans.items()
    }
    return result(
        Verdict.DENY if violations else Verdict.ALLOW, violations, masked, frozenset(withheld)
    )


#: the fields a rejected copy can withhold, per scan field (`sender_id` never is: the
#: rejected message, its key and its decision are attributed by it)
_WITHHOLDABLE_OF = {
    "content": ("content",),
    "content_type": ("content_type",),
    "ids": ("message_id", "recipient_id"),
    "metadata": ("metadata",),
}
WITHHOLDABLE = ("content", "content_type", "message_id", "recipient_id", "metadata")


#: the scan fields the schema bounds (ids 256 characters, the content type 128): scanned
#: by a policy even when the message is over its size limit or its content unreadable
_BOUNDED_FIELDS = frozenset({"content_type", "ids"})


def _unscanned(message: AgentMessage, view: View, *, bounded: bool = False) -> list[str]:
    """The withholdable fields of `message` a policy seeing it as `view` scans, those the
    schema bounds only when `bounded` (a policy that scans nothing). An empty content or
    metadata has nothing to withhold."""
    return [
        name
        for scan_field in view[0]
        if bounded or scan_field not in _BOUNDED_FIELDS
        for name in _WITHHOLDABLE_OF[scan_field]
        if not (name == "content" and not message.content)
        and not (name == "metadata" and not message.metadata)
    ]


def _blocked(
    patterns: list[str], paths: Iterable[str], pid: str | None, ver: int | None
) -> Violation:
    where = ", ".join(sorted(paths)[:5])
    return Violation(
        "blocked_patterns", f"matched {', '.join(repr(x) for x in patterns)} in {where}", pid, ver
    )


#: constrained by other checks (a level must be known, a role granted), so a pattern
#: matching them could only deny every message at a level or in a role
_UNSCANNED = frozenset({"security_level", "sender_role"})


_ID_FIELDS = ("message_id", "sender_id", "recipient_id")
#: fields whose values repeat from message to message (their scan results are cached)
_REPEATING = frozenset({"sender_id", "recipient_id", "content_type"})


def _fields(message: AgentMessage, view: View) -> list[tuple[str, str]]:
    """The normalised fields a policy with this view scans, in `scanned_fields`' order.
    Without metadata (most messages) they are built directly: the same list, without a
    walk that has nothing to walk (a unit test checks both agree)."""
    names, fold = view
    if message.metadata:
        return [
            (path, text)
            for path, text in scanned_fields(message, names, fold_confusables=fold)
            if path not in _UNSCANNED
        ]
    out: list[tuple[str, str]] = []
    if "content" in names:
        out.append(("content", normalize(message.content, fold_confusables=fold)))
    if "content_type" in names:
        out.append(("content_type", normalize(message.content_type, fold_confusables=fold)))
    if "ids" in names:
        for name in _ID_FIELDS:
            out.append((name, normalize(getattr(message, name), fold_confusables=fold)))
    return out


def metadata_bytes(message: AgentMessage) -> int:
    """What a policy's size limit holds metadata to, whatever its `scan_fields`: the
    size of the metadata as JSON (0 when there is none), as sent. Not of its normalised
    text, which a sender can make as small as it likes (a character and 20,000 zero-width
    spaces normalise to one byte); the ids are bounded by the schema."""
    if not message.metadata:
        return 0
    # a value not of JSON's types (metadata built in Python) measured as it is scanned
    return len(orjson.dumps(message.metadata, default=str, option=orjson.OPT_NON_STR_KEYS))


#: one field a blocked pattern matched: (path, normalised text, the matching patterns (in
#: no particular order: a reason sorts them), byte spans of their matches)
_Hit = tuple[str, str, list[str], list[tuple[int, int]]]
#: a union scan of one view: {position of a policy in the group: (path, normalised text,
#: its UTF-8, indices in the policy's own blocked list of its patterns that match) per
#: field in which some matched, in field order}
_UnionScan = dict[int, list[tuple[str, str, bytes, list[int]]]]


class _Scanned:
    """The normalised fields of one message, computed once per way of seeing it."""

    def __init__(self, message: AgentMessage, plain: str) -> None:
        self.message = (
            message if plain == message.content else message.model_copy(update={"content": plain})
        )
        self._views: dict[View, list[tuple[str, str]]] = {}
        self._metadata_bytes: int | None = None
        self._scans: dict[View, _UnionScan] = {}

    def fields(self, view: View) -> list[tuple[str, str]]:
        hit = self._views.get(view)
        if hit is None:
            hit = self._views[view] = _fields(self.message, view)
        return hit

    @property
    def metadata_bytes(self) -> int:
        if self._metadata_bytes is None:
            self._metadata_bytes = metadata_bytes(self.message)
        return self._metadata_bytes

    def union_scan(self, view: View, union: BlockedUnion) -> _UnionScan:
        """What the view's union found in each field: one scan per field for all of the
        view's policies, made when the first of them needs it."""
        hit = self._scans.get(view)
        if hit is None:
            hit = self._scans[view] = {}
            for path, text in self.fields(view):
                data = text.encode()
                mine: dict[int, list[int]] = {}
                for found in union.blocked.indices(data):
                    for position, index in union.owners[found]:
                        mine.setdefault(position, []).append(index)
                for position, indices in mine.items():
                    hit.setdefault(position, []).append((path, text, data, indices))
        return hit

    def content(self, view: View) -> bytes:
        for path, text in self.fields((("content",), view[1])):
            if path == "content":
                return text.encode()
        return b""


def _own_hits(blocked: PatternList, fields: list[tuple[str, str]]) -> list[_Hit]:
    """The fields a policy's blocked patterns match, scanned with its own list: where a
    view has no union to read (and the reference the union scan is tested against)."""
    out = []
    for path, text in fields:
        data = text.encode()
        if blocked.any_match(data):
            out.append((path, text, blocked.matching(data), blocked.spans(data)))
    return out


def _union_hits(blocked: PatternList, scan: _UnionScan, position: int) -> list[_Hit]:
    """`_own_hits` of the policy at `position` (its list `blocked`), with which of its
    patterns match each field read from the union's scan: its own list then only finds
    the spans, in the fields where something matched."""
    return [
        (path, text, [blocked.patterns[i] for i in indices], blocked.spans_of(data, indices))
        for path, text, data, indices in scan.get(position, ())
    ]


def _fast_allows(message: AgentMessage, group: FitGroup) -> bool:
    """True when no fitting policy can object to this plaintext message (every fitting
    policy sees it the same way: `FitGroup.fast`)."""
    content = message.content.encode()
    if len(content) > group.min_size:
        return False
    if message.metadata and metadata_bytes(message) > group.min_size:
        return False
    fields = _fields(message, group.view)
    text = next((t for path, t in fields if path == "content"), None)
    if text is None:
        text = scanned_fields(message, ("content",), fold_confusables=group.view[1])[0][1]
    data = text.encode()
    if group.blocked:
        cache = group.seen_clean
        for path, t in fields:
            if path in _REPEATING:
                hit = cache.get(t)
                if hit is None:
                    if len(cache) > 10_000:
                        cache.clear()
                    hit = cache[t] = group.blocked.any_match(t.encode())
            else:
                hit = group.blocked.any_match(t.encode())
            if hit:
                return False
    return all(a.any_match(data) for a in group.allowed)


def forwarded_auth(auth: AuthProof | None, verified: bool) -> dict[str, Any] | None:
    """The fields of a forwarded proof that `enforce_policy` owns, when `auth` does not
    hold those values already (None: forward it as it is):

    * ``token``: never forwarded;
    * ``redacted``: the copy is of an access-token proof, or a token was removed (the
      schema takes an access-token proof without a token only so marked);
    * ``verified``: whether it verified (`Evaluation.verified`).

    Whatever the sender set in ``redacted`` and ``verified`` is replaced: an unverified
    sender must not be able to forward a proof that reads like a verified agent's."""
    if auth is None:
        return None
    redacted = auth.method == "access-token" or auth.token is not None
    if auth.token is None and auth.redacted == redacted and auth.verified == verified:
        return None
    return {"token": None, "redacted": redacted, "verified": verified}


def redact(
    message: AgentMessage,
    extra_metadata: Mapping[str, Any] | None = None,
    *,
    verified: bool = False,
) -> AgentMessage:
    """The message as it may be forwarded: its proof as `forwarded_auth` says (no access
    token; `verified` whether it verified), `extra_metadata` added."""
    update: dict[str, Any] = {}
    auth = message.auth
    fields = forwarded_auth(auth, verified)
    if auth is not None and fields is not None:
        update["auth"] = auth.model_copy(update=fields)
    if extra_metadata:
        update["metadata"] = {**message.metadata, **extra_metadata}
    return message.model_copy(update=update) if update else message


#: how much longer than the field it replaces a masked text of a rejected copy may be:
#: room for the markers of short matches ("[MASKED]" for a 4-digit PIN). Past it the
#: text is cut and ends in `CUT`: normalised text can be ten times its input (NFKC spells
#: U+FDFA out in 18 characters, 33 bytes for 3), and a masked metadata text repeats its
#: whole path, so that a rejected copy grew past what the broker takes and the worker
#: crashed on the message after every restart.
MASKED_SLACK = 1024
#: ends a masked text cut to its bound
CUT = "[TRUNCATED]"
#: what a rejected copy carries for a field no policy that should have scanned it did
WITHHELD = "[WITHHELD: not scanned]"
#: the fields a rejected copy carries masked, and the schema's length limit of each
_MASKED_FIELDS: dict[str, int | None] = {
    name: next(
        (m.max_length for m in AgentMessage.model_fields[name].metadata if isinstance(m, MaxLen)),
        None,
    )
    for name in ("content", "content_type", "message_id", "recipient_id")
}


def masked_copy(
    message: AgentMessage, masked: Mapping[str, str], withheld: Collection[str] = ()
) -> AgentMessage:
    """A rejected message without the text its blocked patterns matched: each matched
    field carries its normalised text with the matches masked (or hashed); metadata in
    which anything matched is replaced as a whole by its masked leaves. A `withheld`
    field (`Evaluation.withheld`: no policy that should have scanned it did) carries
    `WITHHELD` whatever was masked in it, metadata `{"withheld": WITHHELD}`.

    Never much larger than `message`: a masked field is at most `MASKED_SLACK` bytes
    longer than the field it replaces (and within the schema's length limit), the masked
    metadata at most that much longer than the metadata; past that a text is cut
    (`CUT`), and the metadata texts that find no room at all are left out and counted
    (``metadata.masked_withheld``)."""
    if not masked and not withheld:
        return message
    update: dict[str, Any] = {
        name: _masked_field(message, name, masked, withheld)
        for name in _MASKED_FIELDS
        if name in masked or name in withheld
    }
    meta = [(path, text) for path, text in masked.items() if path.startswith("metadata")]
    if "metadata" in withheld:
        update["metadata"] = {"withheld": WITHHELD}
    elif meta:
        update["metadata"] = _masked_metadata(
            meta, len(orjson.dumps(message.metadata)) + MASKED_SLACK
        )
    return message.model_copy(update=update)


def _masked_field(
    message: AgentMessage, name: str, masked: Mapping[str, str], withheld: Collection[str]
) -> str:
    """The text a rejected copy of `message` carries in the field `name` (one of
    `_MASKED_FIELDS`)."""
    if name in withheld:
        return WITHHELD
    if name not in masked:
        text: str = getattr(message, name)
        return text
    size = _utf8_size(getattr(message, name))
    if name == "content" and message.encryption is not None:
        size += len(message.encryption.ciphertext)  # the plaintext came in it
    return cut_text(masked[name], size + MASKED_SLACK, _MASKED_FIELDS[name])


def shown_id(message: AgentMessage, name: str, result: Evaluation) -> str:
    """`message_id` or `recipient_id` (`name`) as the rejected copy of `message` carries
    it: masked where a blocked pattern matched it, `WITHHELD` where a policy that should
    have scanned it did not, else as sent. The decision records the same, so that the
    signed chain never holds what the copy hides."""
    if not result.masked and not result.withheld:
        text: str = getattr(message, name)
        return text
    return _masked_field(message, name, result.masked, result.withheld)


def _masked_metadata(texts: list[tuple[str, str]], budget: int) -> dict[str, Any]:
    """``{"masked": {path: masked text}}`` in about `budget` bytes of JSON: the texts in
    order while they fit, the first that does not cut to the room left, and the number
    of those left out (``masked_withheld``)."""
    kept: dict[str, str] = {}
    used = len('{"masked":{}}')
    for path, text in texts:
        # its JSON, "path":"text", (escapes aside: the input escaped the same characters)
        cost = _utf8_size(path) + _utf8_size(text) + 6
        if used + cost > budget:
            room = budget - used - _utf8_size(path) - 6
            if room >= len(CUT):
                kept[path] = cut_text(text, room)
            break
        kept[path] = text
        used += cost
    left_out = len(texts) - len(kept)  # paths are unique
    return {"masked": kept, "masked_withheld": left_out} if left_out else {"masked": kept}


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def cut_text(text: str, max_bytes: int, max_chars: int | None = None) -> str:
    """`text`, or when it is longer than `max_bytes` in UTF-8 (or `max_chars` characters)
    its longest prefix that fits with `CUT` after it. A cut only takes text away: what
    a masked text hid stays hidden."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes and (max_chars is None or len(text) <= max_chars):
        return text
    keep = max(0, max_bytes - len(CUT))
    while 0 < keep < len(data) and data[keep] & 0xC0 == 0x80:
        keep -= 1  # not inside a character's UTF-8 sequence
    head = data[:keep].decode("utf-8", "surrogatepass")
    if max_chars is not None:
        head = head[: max(0, max_chars - len(CUT))]
    return head + CUT


# the level names the schema knows, normalised (for docs and the CLI)
STANDARD_LEVELS = tuple(level.value for level in SecurityLevel)
