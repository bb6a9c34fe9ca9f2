"""Security tables: the rule changes in force (policies, config, identities), and decision
counts.

``security_policies`` — folded from the compacted, single-partition `security.policies`.
Every worker needs *all* policies (not the partitions it happens to be assigned), so each
worker folds the whole topic into its own in-memory state with a consumer outside the
app's consumer group (`agents.security.store`); on start it reads the topic from the
beginning before deciding anything, so a restart loses nothing. State layout::

    {policy_id: SecurityPolicy JSON, "__config__": SecurityConfig JSON,
     "__removed__": {policy_id: version of its removal}}

``security_identities`` — folded the same way from `security.identities`::

    {agent_id: AgentIdentity JSON, "__revoked__": {agent_id: version of its revocation}}

Rule changes are applied only when signed (`check_record`, `check_event`): a record is
ignored when it is a tombstone, undecodable, of a type that does not belong on its topic,
under a reserved key or a key other than its event's, not signed by a trusted admin key
(`streams.signing.check_change`), or not newer than the version in force for its id
(a replayed older record must not roll a change back). The live store, the guard agent
that reports ignored records (`security.changes.rejected`) and `agentstream rebuild` all
go through these functions, so they cannot disagree about what is in force.
`policy_view` / `identity_view` strip the bookkeeping keys (``__removed__`` ...) off a
state before it is handed to `PolicySet.from_state` / `IdentityRegistry.from_state`.

``security_decision_counts`` — a Faust table folded from `security.decisions` (kept live
by `enforce_policy`), keyed ``"<partition>|<verdict>|<rule>"`` with rule ``*`` for the total
of a verdict. The partition is part of the key because a Faust table's changelog is
partitioned like its source: the same key written from two partitions would overwrite
itself on recovery. Each counter is written (`streams.tables.write`) to the changelog
partition its key names, the partition of the messages it counts. A value is
``[count, highest source offset counted]`` (`counted`), so that messages decided again
after an at-least-once crash are counted once, live and in a rebuild alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agentstream.schemas import Event, registry
from agentstream.schemas.errors import SchemaError
from agentstream.schemas.security import (
    RESERVED_PREFIX,
    AgentIdentity,
    AgentIdentityRevoked,
    PolicyDecision,
    SecurityConfig,
    SecurityPolicy,
    SecurityPolicyRemoved,
    SignedChange,
    WorkerKeyPublished,
)
from agentstream.streams.record_batches import unreadable
from agentstream.streams.signing import SigningError, check_change, parse_public_keys
from agentstream.streams.tables import TableSpec, register
from agentstream.streams.topics import (
    SECURITY_DECISIONS,
    SECURITY_IDENTITIES,
    SECURITY_POLICIES,
    SECURITY_WORKER_KEYS,
)

log = logging.getLogger(__name__)

CONFIG_KEY = "__config__"
#: policies state: {policy_id: version of its removal} (a removal is a version too)
REMOVED_KEY = "__removed__"
#: identities state: {agent_id: version of its revocation}
REVOKED_KEY = "__revoked__"
ALL_RULES = "*"

Trusted = Mapping[str, Ed25519PublicKey]

#: the event types each signed topic carries
TOPIC_TYPES: dict[str, frozenset[str]] = {
    SECURITY_POLICIES: frozenset(
        {SecurityPolicy.TYPE, SecurityPolicyRemoved.TYPE, SecurityConfig.TYPE}
    ),
    SECURITY_IDENTITIES: frozenset({AgentIdentity.TYPE, AgentIdentityRevoked.TYPE}),
    SECURITY_WORKER_KEYS: frozenset({WorkerKeyPublished.TYPE}),
}

# -- why a record is ignored ------------------------------------------------------------
#: reason codes (the first word of every `Refusal.text`)
TOMBSTONE = "tombstone"
UNDECODABLE = "undecodable"
MISPLACED = "misplaced"
RESERVED_KEY = "reserved_key"
KEY_MISMATCH = "key_mismatch"
UNSIGNED = "unsigned"
UNTRUSTED_KEY = "untrusted_key"
BAD_SIGNATURE = "bad_signature"
ROLLBACK = "rollback"
REASON_CODES = (
    TOMBSTONE,
    UNDECODABLE,
    MISPLACED,
    RESERVED_KEY,
    KEY_MISMATCH,
    UNSIGNED,
    UNTRUSTED_KEY,
    BAD_SIGNATURE,
    ROLLBACK,
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a record on a signed topic is not applied: a code (`REASON_CODES`) and a
    human-readable detail (never key material)."""

    code: str
    detail: str

    @property
    def text(self) -> str:
        return f"{self.code}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Checked:
    """A record of a signed topic, judged: `event` (None when it did not decode) and
    `refusal` (None = apply it)."""

    event: Event[Any] | None
    refusal: Refusal | None

    @property
    def apply(self) -> bool:
        return self.refusal is None and self.event is not None

    @property
    def signed_by(self) -> str:
        payload = self.event.payload if self.event is not None else None
        return payload.signed_by if isinstance(payload, SignedChange) else ""


def check_record(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    state: Mapping[str, Any],
    trusted: Trusted,
    *,
    max_bytes: int,
) -> Checked:
    """Judge one raw record of the signed `topic` (a catalogue name) against the state
    folded so far: the one function the store, the guard agent and the CLI share."""
    if value is None:
        return Checked(
            None, Refusal(TOMBSTONE, "a tombstone (deletes are published as signed removals)")
        )
    stand_in = unreadable(value)
    if stand_in is not None:
        # what the Kafka client could not parse (`streams.record_batches`): never applied,
        # even a record-level stand-in whose value bytes are a well-signed change, by the
        # worker and every CLI fold alike
        return Checked(
            None,
            Refusal(
                UNDECODABLE,
                f"a record the Kafka client cannot parse: {stand_in.describe()}"[:300],
            ),
        )
    try:
        event = registry.decode(value, max_bytes=max_bytes)
    except SchemaError as exc:
        return Checked(None, Refusal(UNDECODABLE, str(exc).splitlines()[0][:300]))
    return Checked(event, check_event(topic, event, state, trusted, key=_key_text(key)))


def _key_text(key: bytes | None) -> str | None:
    return None if key is None else key.decode("utf-8", "replace")


def check_event(
    topic: str,
    event: Event[Any],
    state: Mapping[str, Any],
    trusted: Trusted,
    *,
    key: str | None = None,
) -> Refusal | None:
    """None when a worker applies `event` (read from `topic`, under the Kafka `key` when
    known) on top of `state`; else why not."""
    payload = event.payload
    if event.type not in TOPIC_TYPES.get(topic, ()) or not isinstance(payload, SignedChange):
        return Refusal(MISPLACED, f"a {event.type} does not belong on {topic}")
    if key is not None:
        if key.startswith(RESERVED_PREFIX) and not (
            key == CONFIG_KEY and isinstance(payload, SecurityConfig)
        ):
            return Refusal(RESERVED_KEY, f"a {event.type} under the reserved key {key[:80]!r}")
        if key != event.key:
            return Refusal(
                KEY_MISMATCH, f"record key {key[:80]!r} is not the event's key {event.key!r}"
            )
    signed = payload.model_dump(mode="json", exclude_unset=True)
    signer = str(signed.get("signed_by") or "")
    if not signer or not signed.get("signature"):
        return Refusal(UNSIGNED, "no admin signature")
    if signer not in trusted:
        return Refusal(UNTRUSTED_KEY, f"signed by {signer!r}, which is not a trusted admin key")
    problem = check_change(event.type, signed, trusted)
    if problem is not None:
        return Refusal(BAD_SIGNATURE, problem)
    floor, what = _version_floor(payload, state)
    version = int(getattr(payload, "version", 0))
    if version <= floor:
        return Refusal(
            ROLLBACK,
            f"{event.type} {event.key!r} v{version} is not newer than {what} v{floor} "
            "(a replayed or rolled back change)",
        )
    return None


def _version(raw: Any) -> int:
    if isinstance(raw, Mapping):
        try:
            return int(raw.get("version") or 0)
        except (TypeError, ValueError):
            return 0
    return 0


def _marks(state: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    marks = state.get(name)
    return marks if isinstance(marks, Mapping) else {}


def _version_floor(payload: Any, state: Mapping[str, Any]) -> tuple[int, str]:
    """(the version a change of `payload`'s id must exceed, what holds it)."""
    if isinstance(payload, SecurityConfig):
        return _version(state.get(CONFIG_KEY)), "the config in force"
    if isinstance(payload, SecurityPolicy | SecurityPolicyRemoved):
        ident, marks = payload.policy_id, _marks(state, REMOVED_KEY)
    elif isinstance(payload, AgentIdentity | AgentIdentityRevoked):
        ident, marks = payload.agent_id, _marks(state, REVOKED_KEY)
    elif isinstance(payload, WorkerKeyPublished):
        return _version(state.get(payload.key_id)), "the key in force"
    else:  # pragma: no cover - check_event filters the types
        return 0, ""
    in_force = _version(state.get(ident))
    removed = int(marks.get(ident) or 0)
    if removed > in_force:
        return removed, "its removal"
    return in_force, "the one in force"


def apply_change(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    """Fold one *accepted* change into its topic's state (no checks: see `check_event`)."""
    payload = event.payload
    if isinstance(payload, SecurityPolicy):
        state[payload.policy_id] = payload.model_dump(mode="json")
        _unmark(state, REMOVED_KEY, payload.policy_id)
    elif isinstance(payload, SecurityPolicyRemoved):
        state.pop(payload.policy_id, None)
        _mark(state, REMOVED_KEY, payload.policy_id, payload.version)
    elif isinstance(payload, SecurityConfig):
        state[CONFIG_KEY] = payload.model_dump(mode="json")
    elif isinstance(payload, AgentIdentity):
        state[payload.agent_id] = payload.model_dump(mode="json")
        _unmark(state, REVOKED_KEY, payload.agent_id)
    elif isinstance(payload, AgentIdentityRevoked):
        state.pop(payload.agent_id, None)
        _mark(state, REVOKED_KEY, payload.agent_id, payload.version)
    elif isinstance(payload, WorkerKeyPublished):
        state[payload.key_id] = payload.model_dump(mode="json")


def _mark(state: MutableMapping[str, Any], name: str, ident: str, version: int) -> None:
    marks = dict(_marks(state, name))
    marks[ident] = version
    state[name] = marks


def _unmark(state: MutableMapping[str, Any], name: str, ident: str) -> None:
    marks = _marks(state, name)
    if ident in marks:
        rest = {k: v for k, v in marks.items() if k != ident}
        if rest:
            state[name] = rest
        else:
            state.pop(name, None)


def fold_change(
    topic: str,
    state: MutableMapping[str, Any],
    event: Event[Any],
    trusted: Trusted,
    *,
    key: str | None = None,
) -> Refusal | None:
    """`check_event`, and `apply_change` when it passes; returns the refusal, if any."""
    refusal = check_event(topic, event, state, trusted, key=key)
    if refusal is None:
        apply_change(state, event)
    return refusal


def policy_view(state: Mapping[str, Any]) -> dict[str, Any]:
    """The policies state as `PolicySet.from_state` takes it: {policy_id: JSON,
    "__config__": JSON}, without the bookkeeping."""
    return {k: v for k, v in state.items() if k == CONFIG_KEY or not k.startswith(RESERVED_PREFIX)}


def identity_view(state: Mapping[str, Any]) -> dict[str, Any]:
    """The identities state as `IdentityRegistry.from_state` takes it."""
    return {k: v for k, v in state.items() if not k.startswith(RESERVED_PREFIX)}


def signers_of(state: Mapping[str, Any]) -> dict[str, str]:
    """{policy_id: admin key id that signed it} for every policy in force (an inline
    policy of the config: the config's signer; a published one wins, as in `PolicySet`)."""
    out: dict[str, str] = {}
    config = state.get(CONFIG_KEY)
    if isinstance(config, Mapping):
        for inline in config.get("policies") or ():
            if isinstance(inline, Mapping) and inline.get("policy_id"):
                out[str(inline["policy_id"])] = str(config.get("signed_by") or "")
    for key, raw in policy_view(state).items():
        if key != CONFIG_KEY and isinstance(raw, Mapping):
            out[key] = str(raw.get("signed_by") or "")
    return out


def trusted_admin_keys(spec: str) -> tuple[dict[str, Ed25519PublicKey], str | None]:
    """(admin public keys, problem): `AGENTSTREAM_SECURITY_ADMIN_KEYS` parsed. A setting
    that does not parse trusts no key at all (fail closed), never part of it."""
    try:
        keys = parse_public_keys(spec)
    except SigningError as exc:
        return {}, f"AGENTSTREAM_SECURITY_ADMIN_KEYS cannot be read ({exc}): no change applies"
    if not keys:
        return {}, "no admin key is trusted (AGENTSTREAM_SECURITY_ADMIN_KEYS): no change applies"
    return keys, None


@lru_cache(maxsize=4)
def _settings_keys(spec: str) -> tuple[dict[str, Ed25519PublicKey], str | None]:
    keys, problem = trusted_admin_keys(spec)
    if problem:
        log.error("%s", problem)
    return keys, problem


def settings_admin_keys() -> dict[str, Ed25519PublicKey]:
    """The admin keys of this process's settings (parsed once per distinct setting)."""
    from agentstream.streams.settings import get_settings

    return _settings_keys(get_settings().security_admin_keys)[0]


def apply_policy_event(
    state: MutableMapping[str, Any], event: Event[Any], trusted: Trusted | None = None
) -> None:
    """The `security_policies` fold: a change applies only when signed by a trusted admin
    key (default: this process's settings) and newer than what is in force."""
    fold_change(
        SECURITY_POLICIES, state, event, settings_admin_keys() if trusted is None else trusted
    )


def apply_identity_event(
    state: MutableMapping[str, Any], event: Event[Any], trusted: Trusted | None = None
) -> None:
    """The `security_identities` fold (same rules as `apply_policy_event`)."""
    fold_change(
        SECURITY_IDENTITIES, state, event, settings_admin_keys() if trusted is None else trusted
    )


def counter_keys(decision: PolicyDecision) -> list[str]:
    """The counters one decision increments (its verdict total and each violated rule)."""
    part = decision.source_partition if decision.source_partition is not None else -1
    return keys_for(part, decision.verdict.value, decision.rules)


def keys_for(partition: int, verdict: str, rules: list[str]) -> list[str]:
    return [f"{partition}|{verdict}|{ALL_RULES}"] + [f"{partition}|{verdict}|{r}" for r in rules]


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, -1  # a bare count, kept before the offsets were
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return value[0], value[1]
    return None


def counter_value(value: Any) -> tuple[int, int]:
    """(count, highest source offset counted) of a ``security_decision_counts`` value, a
    pair ``[count, offset]``; a bare count (kept before the offsets were) is ``(n, -1)``,
    no value or one of another shape ``(0, -1)``."""
    return _pair(value) or (0, -1)


def comparable_count(value: Any) -> Any:
    """What comparisons with a rebuild see of a value: its count, or the value itself
    when it is of another shape (an undecodable changelog record shows as a difference,
    `agents.audit.rebuild`, instead of ending the comparison)."""
    pair = _pair(value)
    return value if pair is None else pair[0]


def counted(value: Any, offsets: Iterable[int | None]) -> list[int] | None:
    """`value` after counting the decisions of the messages read at `offsets` (of the
    key's source partition, in log order), or None when it has counted every one of them.

    Why the offset: under at-least-once, the messages after the last commit are decided
    again after a crash, and the decisions before it may or may not have been written,
    each output and each counter independently (a kill -9 keeps a prefix of what every
    partition was sent). A counter that remembers the highest offset it counted, in the
    same record as the count, counts each message once whichever of them survived: the
    live table skips what its restored record already counted, a rebuild skips the
    copies of decisions its fold has already seen. Both end at the count of distinct
    messages (as long as a message decided twice gets the same verdict both times, which
    `enforce_policy` keeps for a redelivery: `agents.security.replay`). A decision
    without an offset (written before decisions carried one) is always counted."""
    n, upto = counter_value(value)
    fresh = 0
    for offset in offsets:
        if offset is None:
            fresh += 1
        elif offset > upto:
            fresh, upto = fresh + 1, offset
    return [n + fresh, upto] if fresh else None


def apply_decision(state: MutableMapping[str, Any], event: Event[Any]) -> None:
    payload = event.payload
    if isinstance(payload, PolicyDecision):
        for key in counter_keys(payload):
            new = counted(state.get(key), (payload.source_offset,))
            if new is not None:
                state[key] = new


def summarise_counts(items: Any) -> dict[str, dict[str, int]]:
    """{verdict: {rule or "*": count}} summed over partitions, from table items."""
    out: dict[str, dict[str, int]] = {}
    for key, value in items:
        try:
            _part, verdict, rule = str(key).split("|", 2)
        except ValueError:
            continue
        bucket = out.setdefault(verdict, {})
        bucket[rule] = bucket.get(rule, 0) + counter_value(value)[0]
    return out


POLICIES = register(
    TableSpec(
        name="security_policies",
        sources=(SECURITY_POLICIES,),
        apply=apply_policy_event,
        description="Signed policies and security config in force (every worker holds all)",
        types=TOPIC_TYPES[SECURITY_POLICIES],
    )
)

IDENTITIES = register(
    TableSpec(
        name="security_identities",
        sources=(SECURITY_IDENTITIES,),
        apply=apply_identity_event,
        description="Signed agent identities in force (every worker holds all)",
        types=TOPIC_TYPES[SECURITY_IDENTITIES],
    )
)

DECISION_COUNTS = register(
    TableSpec(
        name="security_decision_counts",
        sources=(SECURITY_DECISIONS,),
        apply=apply_decision,
        description="Decisions per source partition, verdict and violated rule",
        types=frozenset({PolicyDecision.TYPE}),
        # the counts: the offsets kept with them are bookkeeping (`counted`), and a count
        # kept before them (a bare number) equals its rebuild's pair
        comparable=comparable_count,
    )
)


@lru_cache(maxsize=1)
def decision_counts_table() -> Any:
    """The live Faust table (created on first use so that importing the folds stays free
    of the app)."""
    from agentstream.streams.app import app

    return app.Table(
        DECISION_COUNTS.name,
        default=int,
        key_type=str,
        # [count, offset] (`counted`), or a bare count written before the offsets were kept
        help=DECISION_COUNTS.description,
    )
