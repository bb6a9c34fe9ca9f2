"""The rule changes in force on this worker, and the keys `enforce_policy` needs.

`PolicyStore` folds the whole compacted `security.policies` and `security.identities`
topics (one partition each) with its own consumer, outside the app's consumer group:
every worker must hold every policy and identity, whichever `agent.messages` partitions
it is assigned, and a change must reach every worker without a restart. `ready` is set
once both topics have been read up to the ends they had at start, and `enforce_policy`
waits for it: deciding on a partial policy set would apply the default action to
messages a policy should have judged.

Only signed changes apply (`streams.tables.security.check_record`): a record must carry
a valid Ed25519 signature by an admin key of `AGENTSTREAM_SECURITY_ADMIN_KEYS` (parsed
once; unset or unreadable = no key trusted, nothing published applies and `problem`
says so) and be newer than the version in force for its id. Every ignored record is
counted (`ignored`, by reason code) and logged; the `reject_unsigned_changes` agent
(agents/security/changes.py) publishes the same verdicts to `security.changes.rejected`.

`KeyCache` keeps keychain lookups in memory for a short while, so the keychain (a file or
D-Bus call in a thread) is asked once per key and TTL, not once per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agentstream.agents.security.identity import IdentityRegistry
from agentstream.agents.security.policy import KeyRequest, PolicySet, StaticKeys
from agentstream.streams.client import group_less_consumer, listed_partitions
from agentstream.streams.errors import BrokerError
from agentstream.streams.settings import Settings
from agentstream.streams.tables.security import (
    Checked,
    apply_change,
    check_record,
    identity_view,
    policy_view,
    signers_of,
    trusted_admin_keys,
)
from agentstream.streams.topics import SECURITY_IDENTITIES, SECURITY_POLICIES

log = logging.getLogger(__name__)

#: the topics the store folds, in the order they are read
STORE_TOPICS = (SECURITY_POLICIES, SECURITY_IDENTITIES)


class PolicyStore:
    """The signed policies, config and identities in force (immutable snapshots:
    `policy_set`, `identities`, `signers`), rebuilt on every change."""

    def __init__(
        self, settings: Settings, *, trusted: Mapping[str, Ed25519PublicKey] | None = None
    ) -> None:
        self.settings = settings
        if trusted is None:
            # logged when the store runs (`run`), not here: every CLI command builds one
            keys, problem = trusted_admin_keys(settings.security_admin_keys)
        else:
            keys, problem = dict(trusted), None
        #: the admin public keys a change must be signed by
        self.trusted: dict[str, Ed25519PublicKey] = keys
        #: why nothing published can apply (no trusted admin key), for /ready
        self.problem: str | None = problem
        #: the folded `security.policies` (see streams.tables.security for the layout)
        self.state: dict[str, Any] = {}
        #: the folded `security.identities`
        self.identity_state: dict[str, Any] = {}
        self.policy_set = self._build()
        self.identities = IdentityRegistry.from_state(identity_view(self.identity_state))
        #: {policy_id: the admin key id that signed the version in force}
        self.signers: dict[str, str] = {}
        self.records = 0
        #: records not applied, by reason code (streams.tables.security.REASON_CODES)
        self.ignored: Counter[str] = Counter()
        self.failures = 0
        self.updated_at: float | None = None
        self._ready: asyncio.Event | None = None

    @property
    def ready(self) -> asyncio.Event:
        if self._ready is None:
            self._ready = asyncio.Event()
        return self._ready

    @property
    def invalid_records(self) -> int:
        """Records that did not decode (kept for the views and older callers)."""
        return self.ignored["undecodable"]

    def _build(self) -> PolicySet:
        return PolicySet.from_state(
            policy_view(self.state),
            enabled=self.settings.security_enabled,
            default_action=self.settings.security_default_action,
            signers=signers_of(self.state),
        )

    def apply_record(
        self,
        key: bytes | None,
        value: bytes | None,
        state: dict[str, Any] | None = None,
        *,
        topic: str = SECURITY_POLICIES,
        offset: int | None = None,
    ) -> Checked:
        """Judge one record of `topic` (a catalogue name) and fold it into `state`
        (default: the live state of that topic; no rebuild, see `commit`) when it is a
        signed change newer than the one in force. Returns the verdict."""
        if state is not None:
            target = state
        else:
            target = self.identity_state if topic == SECURITY_IDENTITIES else self.state
        self.records += 1
        checked = check_record(
            topic, key, value, target, self.trusted, max_bytes=self.settings.max_event_bytes
        )
        if checked.apply:
            assert checked.event is not None
            apply_change(target, checked.event)
        else:
            assert checked.refusal is not None
            self.ignored[checked.refusal.code] += 1
            # Every worker reads these topics: a dead letter from each would duplicate
            # it; `reject_unsigned_changes` reports each once on security.changes.rejected.
            log.warning(
                "ignored a record on %s%s (key %r): %s",
                topic,
                f" at offset {offset}" if offset is not None else "",
                (key or b"").decode("utf-8", "replace")[:80],
                checked.refusal.text,
            )
        return checked

    def commit(
        self, state: dict[str, Any] | None = None, identity_state: dict[str, Any] | None = None
    ) -> None:
        if state is not None:
            self.state = state
        if identity_state is not None:
            self.identity_state = identity_state
        self.policy_set = self._build()
        self.identities = IdentityRegistry.from_state(identity_view(self.identity_state))
        self.signers = signers_of(self.state)
        self.updated_at = time.time()
        for key, problem in self.policy_set.invalid.items():
            log.error("policy record %s is not valid and is not applied: %s", key, problem)
        for key, problem in self.identities.invalid.items():
            log.error("identity record %s is not valid and is not applied: %s", key, problem)

    async def run_forever(self, backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        """`run`, restarted after a broker error: the changes in force stay in force
        meanwhile, and the topics are read again from the beginning."""
        delay = backoff_s
        while True:
            try:
                await self.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                log.error(
                    "reading %s failed (%r); retrying in %.1fs",
                    " and ".join(STORE_TOPICS),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_backoff_s)
            else:
                delay = backoff_s

    async def run(self, poll_ms: int = 250) -> None:
        """Fold both topics from the beginning into fresh states, swap them in once both
        are caught up with the ends they had when we started, then follow them."""
        if self.problem:
            log.error("policy store: %s", self.problem)
        names = {self.settings.topic(t): t for t in STORE_TOPICS}
        consumer = group_less_consumer(self.settings, f"{self.settings.app_id}-policy-store")
        await consumer.start()
        try:
            tps = [TopicPartition(topic, 0) for topic in names]
            for topic in names:
                while not consumer.partitions_for_topic(topic):
                    await consumer._client.force_metadata_update()
                    await asyncio.sleep(0.2)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            fresh: dict[str, dict[str, Any]] = {t: {} for t in STORE_TOPICS}
            caught_up = False
            while True:
                if not caught_up and all([await consumer.position(tp) >= end[tp] for tp in tps]):
                    caught_up = True
                    # a partial state is never put in force
                    self.commit(fresh[SECURITY_POLICIES], fresh[SECURITY_IDENTITIES])
                    if not self.ready.is_set():
                        self.ready.set()
                        log.info(
                            "policy store ready: %d policies, %d identities, security %s, "
                            "default %s, %d records ignored",
                            len(self.policy_set.policies),
                            len(self.identities),
                            "enabled" if self.policy_set.enabled else "disabled",
                            self.policy_set.default_action.value,
                            sum(self.ignored.values()),
                        )
                batch = await consumer.getmany(*tps, timeout_ms=poll_ms)
                changed = False
                for tp, records in batch.items():
                    name = names[tp.topic]
                    for rec in records:
                        checked = self.apply_record(
                            rec.key,
                            rec.value,
                            fresh[name] if not caught_up else None,
                            topic=name,
                            offset=rec.offset,
                        )
                        changed = changed or checked.apply
                if changed and caught_up:
                    self.commit()
        finally:
            await consumer.stop()


async def fold_topic(
    settings: Settings,
    topic: str,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    until: int | None = None,
    timeout_s: float = 30.0,
    on_record: Callable[[Any, Checked], None] | None = None,
) -> dict[str, Any]:
    """The state of the signed `topic` (a catalogue name) folded from its beginning up to
    offset `until` (exclusive; None = its end now), applying only what `check_record`
    accepts. `on_record(record, verdict)` sees every record read. A topic that does not
    exist yet is empty. Raises TimeoutError when the broker stops delivering, BrokerError
    when it fails (a client that cannot start: `streams.kafka_security`)."""
    name = settings.topic(topic)
    consumer = group_less_consumer(settings, f"fold-{topic}")
    await consumer.start()
    state: dict[str, Any] = {}
    try:
        tp = TopicPartition(name, 0)
        if not consumer.partitions_for_topic(name) and not await listed_partitions(consumer, name):
            return state
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        stop = end if until is None else min(until, end)
        while await consumer.position(tp) < stop:
            batch = await consumer.getmany(tp, timeout_ms=int(timeout_s * 1000))
            if not batch:
                raise TimeoutError(f"timed out reading {name}")
            for rec in batch.get(tp, []):
                if rec.offset >= stop:
                    return state
                checked = check_record(
                    topic,
                    rec.key,
                    rec.value,
                    state,
                    trusted,
                    max_bytes=settings.max_event_bytes,
                )
                if checked.apply:
                    assert checked.event is not None
                    apply_change(state, checked.event)
                if on_record is not None:
                    on_record(rec, checked)
        return state
    except KafkaError as exc:
        # the broker went away or refused us mid-read: one line naming the topic, for
        # the CLI to print (the consumer is stopped below either way)
        raise BrokerError(f"reading {name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        await consumer.stop()


Fetch = Callable[[KeyRequest], Awaitable[bytes | str | None]]


class KeyCache:
    """Keychain answers kept for `ttl_s` (misses for `miss_ttl_s`, so a key added to the
    keychain is picked up soon without hammering it for unknown senders)."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl_s: float = 30.0,
        miss_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self._fetch = fetch
        self.ttl_s = ttl_s
        self.miss_ttl_s = miss_ttl_s
        self._clock = clock
        self._max = max_entries
        self._entries: dict[KeyRequest, tuple[float, bytes | str | None]] = {}
        self.fetches = 0

    async def view(self, requests: set[KeyRequest]) -> StaticKeys:
        """The keys of `requests`. A fetch that fails (a corrupt or unreachable keychain)
        counts as a miss: the key is unknown, so whatever needs it fails closed, and it is
        asked again after `miss_ttl_s`. The failures of one call are logged once, by kind
        and exception type only (never a value)."""
        now = self._clock()
        missing = [r for r in requests if (hit := self._entries.get(r)) is None or hit[0] <= now]
        if missing:
            results = await asyncio.gather(
                *(self._fetch(r) for r in missing), return_exceptions=True
            )
            self.fetches += len(missing)
            if len(self._entries) + len(missing) > self._max:
                self._entries.clear()
            failed: set[str] = set()
            for request, result in zip(missing, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result  # cancellation and the like are not a lookup failure
                    failed.add(f"{request.kind} key ({type(result).__name__})")
                    value = None
                else:
                    value = result
                ttl = self.ttl_s if value is not None else self.miss_ttl_s
                self._entries[request] = (now + ttl, value)
            if failed:
                log.error(
                    "keychain lookup failed, counted as unknown: %s", ", ".join(sorted(failed))
                )
        signing: dict[str, bytes | None] = {}
        encryption: dict[str, bytes | None] = {}
        tokens: dict[int, str | None] = {}
        for request in requests:
            value = self._entries[request][1]
            if request.kind == "signing":
                signing[request.name] = value if isinstance(value, bytes) else None
            elif request.kind == "encryption":
                encryption[request.name] = value if isinstance(value, bytes) else None
            elif request.kind == "token":
                tokens[int(request.name)] = value if isinstance(value, str) else None
        return StaticKeys(signing, encryption, tokens)

    def clear(self) -> None:
        self._entries.clear()
