"""Policy evaluation: pure functions of (message, policies in force, keys), no I/O.

Which policies apply
--------------------
A policy *fits* a message when its `level` equals the message's `security_level` (or is
``"*"``) and its `applies_to_roles` is empty or lists the sender's role. Every fitting
policy is applied and every violated rule of every one of them is reported. When none
fits, the config's `default_action` decides. When security is disabled, every message is
allowed (and the decision still recorded).

Checks, in this order, per fitting policy (ordered by policy id)
----------------------------------------------------------------
1. ``allowed_roles``          the sender's role is listed (empty list = any role)
2. ``require_authentication`` a valid HMAC-SHA256 signature by the sender's key, or the
                              access token stored for `auth.user_id`
3. ``require_encryption``     a well-formed AES-256-GCM envelope and no plaintext content
4. ``max_message_size``       content size in UTF-8 bytes (of the plaintext: for an
                              envelope, ciphertext size minus the GCM tag)
5. ``blocked_patterns``       no pattern matches the content
6. ``allowed_patterns``       when non-empty, at least one pattern matches the content

Before the policies, once per message: an envelope that is malformed, travels with
plaintext content, or fails to decrypt with a key from the keychain denies the message
(rule ``decryption``), whatever the policies say. Encrypted content whose key is not in the
keychain cannot be checked against patterns: a fitting policy with patterns then denies it
(rule ``content_unreadable``) — unreadable content never slips past a blocked pattern.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from agents.security import crypto
from agents.security.patterns import PatternError, PatternList
from schemas.messages import AgentMessage
from schemas.security import ANY_LEVEL, SecurityConfig, SecurityPolicy, Verdict
from streams.tables.security import CONFIG_KEY

RULES = (
    "allowed_roles",
    "require_authentication",
    "require_encryption",
    "max_message_size",
    "blocked_patterns",
    "allowed_patterns",
    "content_unreadable",
    "decryption",
    "invalid_policy",
    "default_action",
)


class KeyView(Protocol):
    """The secrets an evaluation may need, already fetched (see `required_keys`)."""

    def signing_key(self, agent_id: str) -> bytes | None: ...

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

    def signing_key(self, agent_id: str) -> bytes | None:
        return self.signing.get(agent_id)

    def encryption_key(self, key_id: str) -> bytes | None:
        return self.encryption.get(key_id)

    def access_token(self, user_id: int) -> str | None:
        return self.tokens.get(user_id)


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
    #: {policy_id: version} of every applied policy
    policies: dict[str, int]
    default_applied: bool
    security_enabled: bool

    @property
    def reasons(self) -> list[str]:
        return [v.reason for v in self.violations]

    @property
    def rules(self) -> list[str]:
        return sorted({v.rule for v in self.violations})


@dataclass(frozen=True)
class CompiledPolicy:
    policy: SecurityPolicy
    allowed: PatternList
    blocked: PatternList
    allowed_roles: frozenset[str]
    applies_to_roles: frozenset[str]
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

    def fits(self, level: str, role: str) -> bool:
        if self.policy.level != ANY_LEVEL and self.policy.level != level:
            return False
        return not self.applies_to_roles or role in self.applies_to_roles

    @classmethod
    def build(cls, policy: SecurityPolicy) -> CompiledPolicy:
        try:
            allowed = PatternList.build(policy.allowed_patterns)
            blocked = PatternList.build(policy.blocked_patterns)
            broken = None
        except PatternError as exc:
            allowed = blocked = PatternList.build(())
            broken = str(exc)
        return cls(
            policy,
            allowed,
            blocked,
            frozenset(policy.allowed_roles),
            frozenset(policy.applies_to_roles),
            broken,
        )


@dataclass(frozen=True)
class FitGroup:
    """The policies fitting one (level, role), with what lets most messages be allowed
    in one scan: their blocked patterns as one union, the smallest size limit, and
    whether anything (roles, authentication, encryption, a broken policy) needs the
    full per-policy evaluation anyway. The result is the same either way; the fast path
    only skips work for messages that violate nothing."""

    policies: tuple[CompiledPolicy, ...]
    versions: dict[str, int]
    fast: bool
    min_size: int
    blocked: PatternList
    allowed: tuple[PatternList, ...]

    @classmethod
    def build(cls, policies: tuple[CompiledPolicy, ...], role: str) -> FitGroup:
        fast = all(
            p.broken is None
            and not p.policy.require_authentication
            and not p.policy.require_encryption
            and (not p.allowed_roles or role in p.allowed_roles)
            for p in policies
        )
        blocked = PatternList.build(())
        if fast:
            try:
                blocked = PatternList.build(x for p in policies for x in p.blocked.patterns)
            except PatternError:  # each compiled alone already; a union cannot add errors
                fast = False
        return cls(
            policies,
            {p.id: p.version for p in policies},
            fast and bool(policies),
            min((p.policy.max_message_size for p in policies), default=0),
            blocked,
            tuple(p.allowed for p in policies if p.allowed),
        )

    def allows_plaintext(self, content: bytes) -> bool:
        """True when no fitting policy can object to this plaintext message."""
        return (
            self.fast
            and len(content) <= self.min_size
            and not (self.blocked and self.blocked.any_match(content))
            and all(a.any_match(content) for a in self.allowed)
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


class PolicySet:
    """The policies in force and the config, compiled; immutable — a change builds a new one."""

    def __init__(
        self,
        policies: Iterable[CompiledPolicy],
        *,
        enabled: bool,
        default_action: Verdict,
        invalid: Mapping[str, str] | None = None,
    ) -> None:
        self.policies = tuple(sorted(policies, key=lambda p: p.id))
        self.enabled = enabled
        self.default_action = default_action
        #: stored records that are not valid policies at all: {key: problem}
        self.invalid = dict(invalid or {})
        self._fitting: dict[tuple[str, str], FitGroup] = {}

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], *, enabled: bool = True, default_action: str = "deny"
    ) -> PolicySet:
        """Build from the materialised table (see `streams.tables.security`).

        `enabled`/`default_action` are the settings' initial values, used until a config
        event exists. Published policies win over inline config policies of the same id.
        """
        invalid: dict[str, str] = {}
        by_id: dict[str, SecurityPolicy] = {}
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
        )

    def fitting(self, level: str, role: str) -> tuple[CompiledPolicy, ...]:
        return self.group(level, role).policies

    def group(self, level: str, role: str) -> FitGroup:
        key = (level, role)
        hit = self._fitting.get(key)
        if hit is None:
            hit = FitGroup.build(tuple(p for p in self.policies if p.fits(level, role)), role)
            if len(self._fitting) < 10_000:  # levels and roles are few; bound it anyway
                self._fitting[key] = hit
        return hit

    def versions(self) -> dict[str, int]:
        return {p.id: p.version for p in self.policies}


def required_keys(message: AgentMessage, policies: PolicySet) -> set[KeyRequest]:
    """The secrets evaluating `message` may need (so the agent fetches them in one go)."""
    if not policies.enabled:
        return set()
    needed: set[KeyRequest] = set()
    if message.encryption is not None:
        needed.add(KeyRequest("encryption", message.encryption.key_id))
    auth = message.auth
    if auth is not None and any(
        p.policy.require_authentication
        for p in policies.fitting(message.security_level, message.sender_role)
    ):
        if auth.method == "hmac-sha256":
            needed.add(KeyRequest("signing", message.sender_id))
        elif auth.user_id is not None:
            needed.add(KeyRequest("token", str(auth.user_id)))
    return needed


def evaluate(
    message: AgentMessage, policies: PolicySet, keys: KeyView, *, fast: bool = True
) -> Evaluation:
    """Decide one message. `fast=False` skips the one-scan shortcut (tests compare both)."""
    if not policies.enabled:
        return Evaluation(Verdict.ALLOW, (), {}, False, False)
    group = policies.group(message.security_level, message.sender_role)
    if (
        fast
        and group.fast
        and message.encryption is None
        and group.allows_plaintext(message.content.encode())
    ):
        return Evaluation(Verdict.ALLOW, (), dict(group.versions), False, True)
    violations: list[Violation] = []

    # -- content: plaintext, or the envelope's (decrypted when the key is known) ---------
    content: bytes | None
    size: int
    envelope = message.encryption
    envelope_ok = envelope is not None
    if envelope is None:
        content = message.content.encode()
        size = len(content)
    else:
        content = None
        try:
            size = crypto.plaintext_size(envelope)
            if message.content:
                raise crypto.EnvelopeError("plaintext content travels next to the envelope")
            key = keys.encryption_key(envelope.key_id)
            if key is not None:
                content = crypto.decrypt_content(message, key).encode()
        except crypto.EnvelopeError as exc:
            envelope_ok = False
            size = len(message.content.encode())
            violations.append(Violation("decryption", str(exc)))

    fitting = group.policies
    authenticated: tuple[bool, str] | None = None  # computed at most once
    for policy in fitting:
        p = policy.policy
        pid, ver = policy.id, policy.version
        if policy.broken is not None:
            violations.append(Violation("invalid_policy", policy.broken, pid, ver))
            continue
        if policy.allowed_roles and message.sender_role not in policy.allowed_roles:
            violations.append(
                Violation("allowed_roles", f"role {message.sender_role!r} is not allowed", pid, ver)
            )
        if p.require_authentication:
            if authenticated is None:
                authenticated = _authenticate(message, keys)
            if not authenticated[0]:
                violations.append(Violation("require_authentication", authenticated[1], pid, ver))
        if p.require_encryption and not envelope_ok:
            detail = "no encryption envelope" if envelope is None else "envelope is not valid"
            violations.append(Violation("require_encryption", detail, pid, ver))
        if size > p.max_message_size:
            violations.append(
                Violation(
                    "max_message_size",
                    f"content is {size} bytes, limit {p.max_message_size}",
                    pid,
                    ver,
                )
            )
        if not policy.has_patterns:
            continue
        if content is None:
            if envelope_ok:  # a broken envelope is already reported once
                violations.append(
                    Violation(
                        "content_unreadable",
                        "encrypted with a key not in the keychain; patterns cannot be applied",
                        pid,
                        ver,
                    )
                )
            continue
        if policy.blocked and policy.blocked.any_match(content):
            shown = ", ".join(repr(x) for x in policy.blocked.matching(content)[:5])
            violations.append(Violation("blocked_patterns", f"matched {shown}", pid, ver))
        if policy.allowed and not policy.allowed.any_match(content):
            violations.append(Violation("allowed_patterns", "no allowed pattern matches", pid, ver))

    default_applied = not fitting
    if default_applied and policies.default_action is Verdict.DENY:
        violations.append(
            Violation(
                "default_action",
                f"no policy fits level {message.security_level!r} and role "
                f"{message.sender_role!r}; the default action is deny",
            )
        )
    verdict = Verdict.DENY if violations else Verdict.ALLOW
    return Evaluation(
        verdict,
        tuple(violations),
        {p.id: p.version for p in fitting},
        default_applied,
        True,
    )


def _authenticate(message: AgentMessage, keys: KeyView) -> tuple[bool, str]:
    auth = message.auth
    if auth is None:
        return False, "the message carries no proof of identity"
    if auth.method == "hmac-sha256":
        key = keys.signing_key(message.sender_id)
        if key is None:
            return False, f"no signing key for sender {message.sender_id!r} in the keychain"
        if not crypto.verify_signature(message, key, auth.signature or ""):
            return False, "the signature does not verify"
        return True, ""
    if auth.user_id is None:
        return False, "an access-token proof needs user_id"
    stored = keys.access_token(auth.user_id)
    if stored is None:
        return False, f"no access token stored for user {auth.user_id}"
    if not crypto.tokens_equal(stored, auth.token or ""):
        return False, f"the access token of user {auth.user_id} does not match"
    return True, ""


def redact(message: AgentMessage, extra_metadata: Mapping[str, Any] | None = None) -> AgentMessage:
    """The message as it may be forwarded: no access token, `extra_metadata` added."""
    update: dict[str, Any] = {}
    auth = message.auth
    if auth is not None and auth.token is not None:
        update["auth"] = auth.model_copy(update={"token": None, "redacted": True})
    if extra_metadata:
        update["metadata"] = {**message.metadata, **extra_metadata}
    return message.model_copy(update=update) if update else message


#: a JSON "token" member; also an unterminated one at the end (truncated input)
_TOKEN_MEMBER = re.compile(rb'("token"\s*:\s*)"(?:[^"\\]|\\.)*(?:"|\\?$)')


def redact_raw(value: bytes) -> bytes:
    """Raw record bytes with every "token" string blanked (for dead letters of input that
    could not be decoded: the access token must not travel on with it)."""
    if b'"token"' not in value:
        return value
    return _TOKEN_MEMBER.sub(rb'\1"[REDACTED]"', value)
