"""enforce_policy: every message on agent.messages ends accepted, rejected or dead-lettered,
and every decoded one leaves exactly one hash-chained `PolicyDecision`.

Per batch: take the policy set and the identities in force (immutable snapshots), fetch
the keys the batch needs from the keychain (cached), then decide each message with the
pure evaluator in `agents.security.policy`, against the replay table of verified
(sender, message id) pairs (`agents.security.replay`). Access tokens never leave this
agent: forwarded messages carry a redacted proof, rejected ones carry what a blocked
pattern matched masked, and every dead letter of this consumer gets its secrets removed
(`redact_dead_letters`, applied by the shared `streams.processing` path).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from time import time_ns
from typing import Any
from uuid import UUID

import orjson

from agentstream.agents.security import replay
from agentstream.agents.security.decisions import decision_record, seal_record
from agentstream.agents.security.identity import IdentityRegistry
from agentstream.agents.security.normalize import confusables_source
from agentstream.agents.security.policy import (
    Context,
    Evaluation,
    KeyRequest,
    KeyView,
    PolicySet,
    evaluate,
    forwarded_auth,
    masked_copy,
    redact,
    required_keys,
)
from agentstream.agents.security.store import KeyCache, PolicyStore
from agentstream.schemas import AgentMessage, Event, encode, utc_now
from agentstream.schemas.security import Verdict
from agentstream.streams.app import app, catalogue_topic, settings
from agentstream.streams.audit_chain import ChainWriter, chain_writer
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.errors import CredentialsError
from agentstream.streams.health import register_check
from agentstream.streams.observability import DECISION_SECONDS, DECISIONS, EVENTS_OUT
from agentstream.streams.processing import (
    Inbound,
    _producer,
    check_not_frozen,
    dead_letter,
    decoded_batches,
    fault_point,
    redact_dead_letters,
    send_in_transaction,
    send_record_batches,
    source_transactions,
)
from agentstream.streams.redaction import redact_raw
from agentstream.streams.tables import write
from agentstream.streams.tables.security import counted, decision_counts_table, keys_for
from agentstream.streams.tables.writer import note_partition
from agentstream.streams.topics import (
    AGENT_MESSAGES,
    AGENT_MESSAGES_ACCEPTED,
    AGENT_MESSAGES_REJECTED,
    SECURITY_DECISIONS,
)

log = logging.getLogger(__name__)

CONSUMER = "enforce_policy"

STORE = PolicyStore(settings)
COUNTS = decision_counts_table()
REPLAY = replay.table()  # declared at import: Faust needs every table before it starts
# whatever path dead-letters a message (undecodable, misplaced, a bug in deciding it),
# an access token in it must not travel on to pipeline.deadletter
redact_dead_letters(CONSUMER, redact_raw)


class _Keychain:
    """The provider, created on first need; without a usable keychain every key is
    unknown (authentication and decryption then fail closed) and /ready says degraded."""

    def __init__(self) -> None:
        self.provider: KeychainCredentialsProvider | None = None
        self.error: str | None = None
        self._tried = False

    def get(self) -> KeychainCredentialsProvider | None:
        if not self._tried:
            self._tried = True
            try:
                self.provider = KeychainCredentialsProvider(settings)
            except CredentialsError as exc:
                self.error = str(exc)
                log.error("no keychain for enforce_policy: %s", exc)
        return self.provider

    async def fetch(self, request: KeyRequest) -> bytes | str | None:
        provider = self.get()
        if provider is None:
            return None
        try:
            if request.kind == "signing":
                return await provider.get_signing_key(request.name)
            if request.kind == "encryption":
                return await provider.get_encryption_key(request.name)
            return await provider.get_access_token(int(request.name))
        except CredentialsError as exc:
            self.error = str(exc)
            log.error("keychain lookup of a %s key failed: %s", request.kind, exc)
            return None


KEYCHAIN = _Keychain()


class _NoKeys:
    def signing_key(self, agent_id: str) -> bytes | None:
        return None

    def encryption_key(self, key_id: str) -> bytes | None:
        return None

    def access_token(self, user_id: int) -> str | None:
        return None


_NO_KEYS = _NoKeys()
KEYS = KeyCache(KEYCHAIN.fetch)


@app.task
async def _fold_policies() -> None:
    await STORE.run_forever()


@app.task
async def _warm_normaliser() -> None:
    # the confusables table is built on first use (~50 ms): not on a message's time
    await asyncio.to_thread(confusables_source)


async def _keychain_health() -> tuple[Any, str]:
    KEYCHAIN.get()
    if KEYCHAIN.error:
        return "degraded", KEYCHAIN.error
    return "ok", KEYCHAIN.provider.backend_name if KEYCHAIN.provider else ""


async def _policies_health() -> tuple[Any, str]:
    if not STORE.ready.is_set():
        return "down", "reading security.policies"
    problem = getattr(STORE, "problem", None)
    if problem:
        return "degraded", problem
    return "ok", f"{len(STORE.policy_set.policies)} policies"


register_check("security.keychain", _keychain_health)
register_check("security.policies", _policies_health)


@app.agent(catalogue_topic(AGENT_MESSAGES), name=CONSUMER)
async def enforce_policy(stream: Any) -> None:
    await STORE.ready.wait()
    writer = chain_writer(SECURITY_DECISIONS)
    async for batch in decoded_batches(
        stream,
        consumer=CONSUMER,
        accept=[AgentMessage.TYPE],
        # under exactly-once a batch holds the commit gate: look keys up before it
        prepare=_warm_keys if settings.processing_guarantee == "exactly_once" else None,
        keep_json=True,  # forwarded from it (`forward_bytes`)
    ):
        policies, identities = STORE.policy_set, _identities()
        replay.set_window(policies.replay_window_s)
        needed = _needed(batch, policies, identities)
        keys: KeyView = await KEYS.view(needed) if needed else _NO_KEYS
        seen = _SeenInBatch()
        outcomes: list[Outcome] = []
        for inbound in batch:
            try:
                outcomes.append(decide(inbound, policies, keys, identities, seen))
            except Exception as exc:  # a bug on one message must not stop the stream
                log.exception("%s failed on %s", CONSUMER, inbound.origin)
                await dead_letter(inbound.message, exc, CONSUMER)
        await _publish(outcomes, writer, seen.writes)
        _count(_tally(outcomes))


#: `observe` of the decision-time histogram per verdict, bound once: a decision costs
#: ~50 µs, and `.labels()` per observation would add a lookup under a lock to each
_OBSERVE_DECISION = {v.value: DECISION_SECONDS.labels(v.value).observe for v in Verdict}


def _tally(outcomes: list[Outcome]) -> dict[tuple[int, str], list[int]]:
    """Count a published batch's decisions in the Prometheus metrics (after the batch, so
    the per-message loop does no metric work) and return, per (partition, key) of the
    decision-count table, the offsets of the messages it counts, in log order."""
    counts: dict[tuple[int, str], list[int]] = {}
    verdicts: Counter[str] = Counter()
    # the table keys of a (partition, verdict, rules): a batch repeats few of them
    keys_of: dict[tuple[int, str, tuple[str, ...]], list[tuple[int, str]]] = {}
    for outcome in outcomes:
        verdict = outcome.result.verdict.value
        verdicts[verdict] += 1
        _OBSERVE_DECISION[verdict](outcome.evaluation_s)
        what = (outcome.partition, verdict, tuple(outcome.result.rules))
        keys = keys_of.get(what)
        if keys is None:
            keys = keys_of[what] = [
                (outcome.partition, k) for k in keys_for(outcome.partition, verdict, list(what[2]))
            ]
        for key in keys:
            got = counts.get(key)
            if got is None:
                counts[key] = [outcome.offset]
            else:
                got.append(outcome.offset)
    for verdict, n in verdicts.items():
        DECISIONS.labels(verdict).inc(n)
    return counts


def _identities() -> IdentityRegistry:
    found = getattr(STORE, "identities", None)
    return found if isinstance(found, IdentityRegistry) else IdentityRegistry()


def _needed(
    batch: list[Inbound], policies: PolicySet, identities: IdentityRegistry
) -> set[KeyRequest]:
    needed: set[KeyRequest] = set()
    for inbound in batch:
        needed |= required_keys(inbound.event.payload, policies, identities)
    return needed


class _SeenInBatch:
    """The replay table, plus the verified messages of the batch being decided (a replay
    within one batch is caught before the table has its entry)."""

    def __init__(self) -> None:
        self.table = replay.table()
        self._lookup = replay.lookup(self.table.data)
        self.added: dict[str, replay.Seen] = {}
        #: (partition, key, value) of the table entries this batch adds, in order: sent
        #: with the batch's outputs (`_publish`), not one Faust changelog send each
        self.writes: list[tuple[int, str, dict[str, Any]]] = []

    def get(self, key: str) -> replay.Seen | None:
        hit = self.added.get(key)
        return hit if hit is not None else replay.seen_of(self._lookup(key))

    def remember(self, key: str, partition: int, offset: int, at: float) -> None:
        if self.get(key) is None:
            self.added[key] = replay.Seen(partition, offset, at)
            self.writes.append((partition, key, replay.entry(partition, offset, at)))


async def _warm_keys(batch: list[Inbound]) -> None:
    """Fetch the keys a batch will need into the cache, outside the commit gate (a slow
    keychain then delays this agent, not every commit of the worker)."""
    needed = _needed(batch, STORE.policy_set, _identities())
    if needed:
        await KEYS.view(needed)


@dataclass(slots=True)
class Outcome:
    """What one message turns into: its (unsealed) decision record and the forwarded
    message."""

    partition: int
    result: Evaluation
    decision: dict[str, Any]
    topic: str
    key: bytes
    #: the forwarded message, encoded
    forwarded: bytes
    #: seconds `evaluate` took (the decision record carries it in whole µs)
    evaluation_s: float = 0.0
    #: the offset the message was read at (in `partition`)
    offset: int = -1


def decide(
    inbound: Inbound,
    policies: PolicySet,
    keys: KeyView,
    identities: IdentityRegistry | None = None,
    seen: _SeenInBatch | None = None,
) -> Outcome:
    event: Event[Any] = inbound.event
    message: AgentMessage = event.payload
    partition, offset = inbound.message.partition, inbound.message.offset
    key = replay.replay_key(message.sender_id, message.message_id)
    now = _clock()
    started = time.perf_counter()
    ctx = Context(
        identities=identities or IdentityRegistry(),
        now=now,
        seen=seen.get(key) if seen is not None else None,
        partition=partition,
        offset=offset,
        expected_partition=_home_partition(message.sender_id, _partitions(inbound)),
    )
    result: Evaluation = evaluate(message, policies, keys, ctx=ctx)
    elapsed = time.perf_counter() - started
    elapsed_us = int(elapsed * 1_000_000)
    decision = decision_record(
        event,
        result,
        source=CONSUMER,
        evaluated_at=now,
        evaluation_us=elapsed_us,
        partition=partition,
        offset=offset,
        signers=policies.signers,
    )
    if (
        seen is not None
        and result.verified
        and result.issued_at is not None
        and partition == ctx.expected_partition
    ):
        # a copy on another partition must not make the genuine message look replayed.
        # Remembered under the message id the decision shows (`replay.apply_decision`
        # folds the decisions: a rebuild must find the same keys): a verified message
        # whose id was masked or withheld is not recognised when replayed; it is denied
        # by the same rule again
        shown = decision["payload"]["message_id"]
        if shown != message.message_id:
            key = replay.replay_key(message.sender_id, shown)
        seen.remember(key, partition, offset, result.issued_at.timestamp())
    # either way the copy's proof has no token and says whether it verified, whatever
    # the sender wrote in it (`forwarded_auth`)
    auth: dict[str, Any] | None = None
    if result.verdict is Verdict.ALLOW:
        topic, forwarded = AGENT_MESSAGES_ACCEPTED, message
        auth = forwarded_auth(message.auth, result.verified)  # set by forward_bytes
    else:
        topic = AGENT_MESSAGES_REJECTED
        forwarded = redact(
            masked_copy(message, result.masked, result.withheld),
            {"rejection_reasons": result.reasons, "rejection_rules": result.rules},
            verified=result.verified,
        )
    return Outcome(
        inbound.message.partition,
        result,
        decision,
        topic,
        message.sender_id.encode(),
        forward_bytes(
            event, forwarded, inbound.data, inbound.message.topic, partition, offset, auth
        ),
        elapsed,
        offset,
    )


class _MillisecondClock:
    """`utc_now()` to the millisecond: decisions made within one share a datetime, so
    their records format it once (`decisions._iso_of_last`). A message is then judged at
    most 1 ms early, well inside the clock skew the replay window already allows."""

    __slots__ = ("ms", "now")

    def __init__(self) -> None:
        self.ms = -1
        self.now = utc_now()

    def __call__(self) -> datetime:
        ms = time_ns() // 1_000_000
        if ms != self.ms:
            self.ms = ms
            seconds, millis = divmod(ms, 1000)
            self.now = datetime.fromtimestamp(seconds, UTC).replace(microsecond=millis * 1000)
        return self.now


_clock = _MillisecondClock()


def _partitions(inbound: Inbound) -> int:
    """The partition count of the input's topic (what the producer's partitioner used)."""
    topic = inbound.message.topic
    hit = _PARTITIONS.get(topic)
    if hit is None:
        found = None
        # the aiokafka producer's metadata (Faust's consumer wraps its client deeper)
        client = getattr(getattr(app.producer, "_producer", None), "client", None)
        try:
            found = client.cluster.partitions_for_topic(topic) if client is not None else None
        except Exception:  # metadata is an optimisation here; the setting is the fallback
            found = None
        hit = len(found) if found else settings.topic_partitions
        _PARTITIONS[topic] = hit
    return hit


_PARTITIONS: dict[str, int] = {}


def _home_partition(sender_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner puts a sender's messages in (murmur2, the
    key's hash cached by `streams.tables.key_hash`: senders repeat)."""
    return replay.partition_of(sender_id, partitions)


@app.timer(interval=30.0)
async def _expire_replay_entries() -> None:
    """Replay entries past the window go (tombstones, so recovery does not bring them
    back); not while partitions move, as for the LLM dedup tables."""
    if app.rebalancing or getattr(app, "in_recovery", False):
        return
    from agentstream.streams.web_cluster import active_partitions

    table = replay.table()
    owned = active_partitions(table)
    if owned:
        replay.expire(owned, settings.topic_partitions)


#: the namespace of forwarded messages' event ids (`forwarded_id`); never change it
FORWARDED_IDS = UUID("0c9e6a53-2f7d-4b8e-a1c4-5d3b7e9f2a61")
_FORWARDED_NS = FORWARDED_IDS.bytes


def forwarded_id(topic: str, partition: int, offset: int) -> str:
    """The event id of the message forwarded from the input record at these
    coordinates: ``uuid5(FORWARDED_IDS, "<topic>\\n<partition>\\n<offset>")``.

    Derived, like a dead letter's: the input read again after a crash (at-least-once)
    is forwarded as the same event, and two inputs are never one event, whatever ids
    their sender chose (a sender reusing one event id for every message made them one
    message for whoever deduplicated on it, `audit report` among them). Computed here
    rather than by `uuid.uuid5` (3 µs a message, on the hot path): the same bytes."""
    name = f"{topic}\n{partition}\n{offset}".encode()
    # SHA-1 is what UUIDv5 is (an identifier, not a secret or a signature)
    digest = bytearray(hashlib.sha1(_FORWARDED_NS + name, usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def forward_bytes(
    event: Event[Any],
    message: AgentMessage,
    data: dict[str, Any] | None,
    topic: str,
    partition: int,
    offset: int,
    auth: Mapping[str, Any] | None = None,
) -> bytes:
    """The forwarded message keeps the input's envelope but for its event id, which is
    derived from the input record's coordinates (`forwarded_id`: consumers of
    accepted/rejected deduplicate at-least-once redeliveries by it), and points at the
    input with causation_id (the input's event id, which its sender chose).

    An unchanged message at the current schema version is forwarded as the JSON object
    it was decoded from (`data`, changed in place), with `causation_id` set: a pydantic
    copy costs more than deciding it. A masked, annotated or upcast one (no `data`) is
    re-encoded from the model. `auth`: fields to set in the message's proof
    (`policy.forwarded_auth`), in the JSON object or the model alike."""
    input_id = str(event.event_id)
    output_id = forwarded_id(topic, partition, offset)
    if message is event.payload and data is not None:
        data["event_id"] = output_id
        data["causation_id"] = input_id
        if auth:
            data["payload"]["auth"].update(auth)
        return orjson.dumps(data)
    update: dict[str, Any] = {"event_id": UUID(output_id), "causation_id": input_id}
    if auth and message.auth is not None:
        message = message.model_copy(update={"auth": message.auth.model_copy(update=auth)})
    if message is not event.payload:
        update["payload"] = message
    return encode(event.model_copy(update=update))


async def _publish(
    outcomes: list[Outcome],
    writer: ChainWriter,
    table_writes: list[tuple[int, str, dict[str, Any]]] = (),  # type: ignore[assignment]
) -> None:
    """Seal the decisions and send everything of one batch.

    Faust's per-record `send` costs more than deciding a message, so a batch goes out
    as one aiokafka record batch per (topic, partition): decisions sealed with the chain
    writer's per-partition head and lock, exactly as `ChainWriter.emit` would (the last
    one of each partition signed), forwarded messages to the same partition number as
    their input (the same key on topics of equal partition count).

    At-least-once: the replay table's entries travel the same way, and the acks of a
    batch are awaited while the next batch is being decided (one batch in flight); a
    failed send crashes the agent instead of being logged and forgotten, and Faust
    flushes the producer before it commits any offset. Exactly-once: every record goes
    into the transaction that commits its input's offset (`send_in_transaction`), the
    replay entries through the table (into the same transactions), and the batch holds
    the commit gate from its decoding until its events are acknowledged
    (`decoded_batches`, streams/eos.py).
    """
    fault_point("enforce_policy.publish")  # a test hook, off by default (streams.processing)
    if not outcomes:
        return
    eos = settings.processing_guarantee == "exactly_once"
    by_partition: dict[int, list[Outcome]] = {}
    for o in outcomes:
        by_partition.setdefault(o.partition, []).append(o)
    source_topic = settings.topic(AGENT_MESSAGES)
    changelog: dict[int, list[tuple[bytes, bytes]]] = {}
    if eos:
        for partition, key, entry in table_writes:  # into the batch's transactions
            replay.remember(key, entry, partition)
        # every transaction before anything is sent (a batch sends all or nothing)
        transactions = await source_transactions((source_topic, p) for p in by_partition)
    else:
        producer = (await _producer())._ensure_producer()
        # the replay table's entries travel like the outputs: one record batch per
        # partition (a Faust changelog send each would cost more than deciding the message)
        for partition, key, entry in table_writes:
            REPLAY.data[key] = entry
            note_partition(REPLAY, key, partition)  # dropped with its partition (as `write`)
            changelog.setdefault(partition, []).append((orjson.dumps(key), orjson.dumps(entry)))
    changelog_topic = REPLAY.changelog_topic.get_topic_name()
    decisions_topic = settings.topic(SECURITY_DECISIONS)
    from agentstream.streams.audit_chain import chain_signer

    signer = await chain_signer()  # signs the last decision of each partition's group
    futures: list[Any] = []
    for partition, group in by_partition.items():
        async with writer.head(partition) as head:
            records: dict[str, list[tuple[bytes, bytes]]] = {}
            decisions = records[decisions_topic] = []
            last = group[-1]
            for o in group:
                value, head.hash = seal_record(o.decision, head.hash, signer if o is last else None)
                decisions.append((o.decision["payload"]["sender_id"].encode(), value))
            for o in group:
                records.setdefault(settings.topic(o.topic), []).append((o.key, o.forwarded))
            if partition in changelog:
                records[changelog_topic] = changelog[partition]
            if eos:
                await send_in_transaction(
                    transactions[(source_topic, partition)],
                    {(name, partition, name): items for name, items in records.items()},
                )
            else:
                futures += await _send_batches(producer, records, partition)
    if not eos:
        previous, _IN_FLIGHT[:] = list(_IN_FLIGHT), futures
        try:
            await asyncio.gather(*previous)
        except BaseException:
            writer.reset()  # what reached the broker is unknown: re-read the heads
            raise
    for topic, n in Counter(o.topic for o in outcomes).items():
        EVENTS_OUT.labels(topic).inc(n)
    EVENTS_OUT.labels(SECURITY_DECISIONS).inc(len(outcomes))


#: delivery futures of the batch sent last (awaited while the next one is decided)
_IN_FLIGHT: list[Any] = []


async def _send_batches(
    producer: Any, records: dict[str, list[tuple[bytes, bytes]]], partition: int
) -> list[Any]:
    check_not_frozen()  # sealed before a freeze, these must not be sent after it
    futures = []
    for topic, items in records.items():
        # each future watched at once, not only when the next batch awaits them: the
        # offsets behind a lost record must never be committed
        futures += await send_record_batches(producer, topic, partition, items, topic)
    return futures


def _count(counts: dict[tuple[int, str], list[int]]) -> None:
    """Apply a batch's counts to the table: one changelog record per key, in the
    partition of the messages counted (the one their key names), holding the count and
    the highest offset it counted (`counted`: a message decided again after a crash, at
    an offset the restored record already counted, is not counted twice)."""
    data = COUNTS.data
    for (partition, key), offsets in counts.items():
        new = counted(data.get(key), offsets)
        if new is not None:
            write(COUNTS, key, new, partition=partition)
