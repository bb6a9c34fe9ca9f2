"""Tamper-evident, signed audit trails: every sealed record carries the sha256 of the
previous record in the same partition (`prev_hash`) and its own (`hash`), and the writing
worker's Ed25519 signature vouches for the chain.

    hash = sha256(sorted JSON of the record as it is on the wire,
                  with payload.hash = "" and payload.signature = "")

(`record_hash`; ``signature`` is blanked only when the record has the field, so records
written before signing existed keep their hash, and the hash is computed over the decoded
wire JSON, never over a re-dump of the model: a field added to a schema later, with a
default, changes no old record's hash). ``signed_by`` is covered, so a signature cannot
be re-attributed to another key. Altering any field, deleting, inserting or reordering
records breaks the chain, which `agentstream audit verify` reports.

Signatures
----------
A bare hash chain can be recomputed by anyone: a record appended with produce access and
chained with these same functions would look genuine. So the worker signs
(`streams.signing.chain_bytes`: ``b"agentstream.chain.v1\\n" + hash``) with its chain key
(keychain entry ``chain_key.<AGENTSTREAM_CHAIN_KEY_ID>``, public half published, admin-
signed, on `security.worker_keys`). Since `hash` covers `prev_hash`, one signature vouches
for its record and every earlier record of the partition: the at-least-once fast path of
`enforce_policy` signs only the **last record it writes to a partition in each batch**
(one Ed25519 signature, ~30 µs, per partition and batch instead of per decision);
`ChainWriter.emit` (LLM responses, and decisions under exactly-once) signs every record.
A record is *vouched for* when it is validly signed, or when the nearest signed record
after it in the chain is (see `agents.audit.verify`).

One writer per partition
------------------------
A chained topic has exactly one writer per partition: agents emit the sealed record to the
*same partition number* as their input record (the input and output topics have the same
partition count), and only the worker that owns an input partition writes to that output
partition.

Where a chain continues
-----------------------
The head of a partition is read back from the topic itself the first time a worker
writes to it (and again after every rebalance), so a crash — even kill -9 — never needs
state that could be lost. A worker never continues a chain from a record it cannot
verify (`last_hash`): the head is the newest record validly signed by a key it trusts
(its own chain key, and the keys on `security.worker_keys` whose records verify against
`AGENTSTREAM_SECURITY_ADMIN_KEYS`); anything after it — a forger's append, with however
correct a hash — is skipped, and the new record links past it, so the forgery stays
visible to `verify` instead of being vouched for by the worker's next signature.

The price, under at-least-once: a worker killed after the broker took part of a batch's
decisions but before it took the signed last one (a batch larger than one producer
batch) leaves a genuine unsigned tail; the next writer links past it to the last signed
record, and `verify` reports those records as ``unsigned`` (they are on the topic, but
nothing vouches for them) — never silently accepted. Their inputs are processed again
(their offsets were not committed), so their decisions are written again, signed.

Chains written before signing existed: a partition with **no signed record at all**
continues from its newest sealed record, as before (existing deployments keep working);
its first signed record then vouches for that history. See `last_hash` for the bounded
search and the case of signatures by keys the worker does not trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from aiokafka import TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agentstream.schemas import Event, encode, registry
from agentstream.schemas.errors import SchemaError
from agentstream.streams import signing
from agentstream.streams.client import group_less_consumer, listed_partitions
from agentstream.streams.errors import BrokerError
from agentstream.streams.settings import Settings

log = logging.getLogger(__name__)

GENESIS = "0" * 64


# -- hashing ------------------------------------------------------------------------------
def _digest(record: Any) -> str:
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """The hash of a record as decoded from the wire (``orjson.loads`` of its value), with
    ``payload.hash`` and (when present) ``payload.signature`` blanked. `record` is not
    changed."""
    payload = dict(record["payload"])
    payload["hash"] = ""
    if "signature" in payload:
        payload["signature"] = ""
    body = dict(record)
    body["payload"] = payload
    return _digest(body)


def compute_hash(event: Event[Any]) -> str:
    """`record_hash` of the event as `schemas.encode` puts it on the wire (for events built
    with pydantic; to check a record read from a topic, hash its raw JSON instead: a
    re-dump of a decoded old record carries fields it never had)."""
    return record_hash(orjson.loads(encode(event)))


# -- signing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChainSigner:
    """A chain key: signs record hashes as `key_id`."""

    key_id: str
    key: Ed25519PrivateKey = field(repr=False)

    def sign(self, record_hash: str) -> str:
        """base64 Ed25519 signature over `streams.signing.chain_bytes(record_hash)`."""
        return signing.sign(self.key, signing.chain_bytes(record_hash))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    @property
    def public_b64(self) -> str:
        return signing.public_b64(self.key)


def signature_problem(
    payload: Mapping[str, Any], record_hash: str, trusted: Mapping[str, Ed25519PublicKey]
) -> str | None:
    """None when `payload` carries a valid signature over `record_hash` by a key of
    `trusted`; else why not ("unsigned" when it carries no signature)."""
    signature = str(payload.get("signature") or "")
    signed_by = str(payload.get("signed_by") or "")
    if not signature:
        return "unsigned"
    key = trusted.get(signed_by)
    if key is None:
        return f"signed by {signed_by!r}, which is not a trusted chain key"
    if not signing.verify(key, signing.chain_bytes(record_hash), signature):
        return f"the signature by {signed_by!r} does not verify"
    return None


def seal(event: Event[Any], prev_hash: str, signer: ChainSigner | None = None) -> Event[Any]:
    """A copy of `event` with `prev_hash` set, `hash` computed and, with a `signer`,
    `signed_by` and `signature` set (a payload without those fields cannot be signed)."""
    update: dict[str, Any] = {"prev_hash": prev_hash, "hash": ""}
    if "signed_by" in type(event.payload).model_fields:
        update["signed_by"] = signer.key_id if signer is not None else ""
        update["signature"] = ""
    elif signer is not None:
        raise TypeError(f"{event.type} records carry no signature")
    payload = event.payload.model_copy(update=update)
    unsealed = event.model_copy(update={"payload": payload})
    digest = compute_hash(unsealed)
    final: dict[str, Any] = {"hash": digest}
    if signer is not None:
        final["signature"] = signer.sign(digest)
    return unsealed.model_copy(update={"payload": payload.model_copy(update=final)})


# -- chain keys -----------------------------------------------------------------------------
async def load_chain_key(
    settings: Settings, key_id: str | None = None, *, create: bool = True, provider: Any = None
) -> tuple[ChainSigner, bool]:
    """(the chain key `key_id` — default `settings.chain_key_id` — from the keychain,
    whether it was created now). A missing key is generated and stored when `create`;
    raises `CredentialsError` (no keychain) or `SigningError` (missing, or unreadable)."""
    from agentstream.streams.credentials import KeychainCredentialsProvider

    kid = key_id or settings.chain_key_id
    entry = signing.CHAIN_ENTRY.format(kid)
    provider = provider or KeychainCredentialsProvider(settings)
    stored = await provider.get_secret(entry)
    created = False
    if stored is None:
        if not create:
            raise signing.SigningError(f"no chain key {kid!r} in the keychain ({entry})")
        await provider.set_secret(entry, signing.private_to_b64(signing.new_private_key()))
        # read back: another process on this keychain may have stored its key first
        stored = await provider.get_secret(entry)
        if stored is None:
            raise signing.SigningError(f"the keychain did not keep the chain key {entry}")
        created = True
    return ChainSigner(kid, signing.private_from_b64(stored)), created


@dataclass
class PublishedKeys:
    """`security.worker_keys` folded: the keys in force whose records verify against the
    admin keys, and why the other records were ignored."""

    #: {key_id: WorkerKeyPublished JSON} in force
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (offset, reason) of every record not applied
    ignored: list[tuple[int, str]] = field(default_factory=list)
    #: why no published key can be trusted at all (no admin key configured ...)
    problem: str | None = None

    def trusted(self) -> dict[str, Ed25519PublicKey]:
        """The published keys that are not revoked."""
        out: dict[str, Ed25519PublicKey] = {}
        for kid, raw in self.keys.items():
            if raw.get("revoked"):
                continue
            try:
                out[kid] = signing.public_from_b64(str(raw.get("public_key") or ""))
            except signing.SigningError:
                continue
        return out

    def revoked(self) -> frozenset[str]:
        return frozenset(kid for kid, raw in self.keys.items() if raw.get("revoked"))


#: seconds reading security.worker_keys may take
KEYS_TIMEOUT_S = 30.0


async def read_worker_keys(settings: Settings) -> PublishedKeys:
    """Fold `security.worker_keys` from its beginning with the same checks as every rule
    topic (`streams.tables.security.check_record`: admin-signed, newer version wins). A
    missing topic holds no key."""
    from agentstream.streams.tables.security import apply_change, check_record, trusted_admin_keys
    from agentstream.streams.topics import SECURITY_WORKER_KEYS

    admin, problem = trusted_admin_keys(settings.security_admin_keys)
    out = PublishedKeys(problem=problem)
    topic = settings.topic(SECURITY_WORKER_KEYS)
    consumer = group_less_consumer(settings, "worker-keys", auto_offset_reset="earliest")
    await consumer.start()
    try:
        async with asyncio.timeout(KEYS_TIMEOUT_S):
            parts = await listed_partitions(consumer, topic)
            if not parts:
                return out
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            records: list[Any] = []
            for tp in tps:
                while await consumer.position(tp) < ends[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=200)
                    records += [r for r in batch.get(tp, []) if r.offset < ends[tp]]
    except TimeoutError:
        raise BrokerError(f"reading {topic} took over {KEYS_TIMEOUT_S:g}s") from None
    finally:
        await consumer.stop()
    for rec in records:
        checked = check_record(
            SECURITY_WORKER_KEYS,
            rec.key,
            rec.value,
            out.keys,
            admin,
            max_bytes=settings.max_event_bytes,
        )
        if checked.apply and checked.event is not None:
            apply_change(out.keys, checked.event)
        elif checked.refusal is not None:
            out.ignored.append((rec.offset, checked.refusal.text))
    return out


@dataclass
class _SignerState:
    signer: ChainSigner | None = None
    error: str | None = None
    failed_at: float | None = None
    lock: asyncio.Lock | None = None


_SIGNER = _SignerState()
#: seconds before a worker whose chain key could not be loaded tries again
SIGNER_RETRY_S = 60.0


def _app_settings() -> Settings:
    from agentstream.streams.app import settings

    return settings


async def chain_signer(settings: Settings | None = None) -> ChainSigner | None:
    """This worker's chain key (keychain entry ``chain_key.<chain_key_id>``), loaded once.

    A missing key is generated and stored, and the line an admin must publish is logged
    (``agentstream audit worker-key publish --key-id ID``). Without a usable keychain the
    worker keeps running and writes unsigned records (`verify` reports them), trying
    again every `SIGNER_RETRY_S`; `/ready` says degraded meanwhile."""
    state = _SIGNER
    if state.signer is not None:
        return state.signer
    if state.failed_at is not None and time.monotonic() - state.failed_at < SIGNER_RETRY_S:
        return None
    if state.lock is None:
        state.lock = asyncio.Lock()
    async with state.lock:
        retry_due = state.failed_at is None or time.monotonic() - state.failed_at >= SIGNER_RETRY_S
        if state.signer is None and retry_due:
            await _load_signer(settings or _app_settings())
    return state.signer


async def _load_signer(settings: Settings) -> None:
    state = _SIGNER
    kid = settings.chain_key_id
    try:
        signer, created = await load_chain_key(settings)
    except Exception as exc:  # never crash the worker over its chain key
        state.error = f"chain key {kid!r} unavailable: {exc}"
        state.failed_at = time.monotonic()
        log.error(
            "%s: this worker writes UNSIGNED chain records (audit verify reports them); "
            "trying again in %gs",
            state.error,
            SIGNER_RETRY_S,
        )
        return
    state.signer, state.error, state.failed_at = signer, None, None
    publish = (
        f"agentstream audit worker-key publish --key-id {kid} (where the admin key is), "
        f"or pin it for audits: --trust-key {kid}={signer.public_b64}"
    )
    if created:
        log.warning(
            "created chain key %r (secret chain_key.%s, in the first writable of the secret "
            "sources %s); publish its public half: %s",
            kid,
            kid,
            settings.secret_sources,
            publish,
        )
        return
    # in the background: the first batch waits for the key, not for this check
    task = asyncio.get_running_loop().create_task(_check_published(settings, signer, publish))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[None]] = set()


async def _check_published(settings: Settings, signer: ChainSigner, publish: str) -> None:
    kid = signer.key_id
    try:
        published = (await read_worker_keys(settings)).keys.get(kid)
    except Exception as exc:
        log.warning("could not check whether chain key %r is published: %r", kid, exc)
        return
    if published is None or published.get("public_key") != signer.public_b64:
        log.warning(
            "chain key %r is not published on security.worker_keys (or another key is, "
            "under its id): other workers will not continue its chains, and audits that "
            "do not pin it report its records as forged; publish it: %s",
            kid,
            publish,
        )
    elif published.get("revoked"):
        log.error(
            "chain key %r is REVOKED on security.worker_keys: its records are reported as forged",
            kid,
        )
    else:
        log.info("signing hash chains with chain key %r", kid)


async def _chain_key_health() -> tuple[Any, str]:
    if _SIGNER.error:
        return "degraded", _SIGNER.error
    if _SIGNER.signer is not None:
        return "ok", f"signing as {_SIGNER.signer.key_id!r}"
    return "ok", "not loaded yet"


@dataclass
class _TrustCache:
    published: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    read_at: float | None = None
    lock: asyncio.Lock | None = None


_TRUST = _TrustCache()
#: seconds the published keys read for a chain-head lookup are reused
TRUST_TTL_S = 10.0


async def worker_trust(settings: Settings | None = None) -> dict[str, Ed25519PublicKey]:
    """The chain keys this worker continues chains from: the published, admin-signed,
    unrevoked keys of `security.worker_keys` (re-read at most every `TRUST_TTL_S`, and
    after a rebalance), and its own chain key."""
    settings = settings or _app_settings()
    cache = _TRUST
    if cache.lock is None:
        cache.lock = asyncio.Lock()
    async with cache.lock:
        if cache.read_at is None or time.monotonic() - cache.read_at > TRUST_TTL_S:
            try:
                cache.published = (await read_worker_keys(settings)).trusted()
                cache.read_at = time.monotonic()
            except Exception as exc:
                log.error(
                    "reading security.worker_keys failed (%r): chain heads are judged with "
                    "the keys read before (%d)",
                    exc,
                    len(cache.published),
                )
    trusted = dict(cache.published)
    signer = await chain_signer(settings)
    if signer is not None:
        trusted[signer.key_id] = signer.public_key
    return trusted


# -- chain heads ----------------------------------------------------------------------------
#: seconds a chain-head lookup may take in all
HEAD_TIMEOUT_S = 60.0
#: seconds a chain-head read may go without its position moving before it gives up
STALL_S = 10.0
#: how far back (records, seconds) a head lookup searches for a signed record before it
#: treats the partition as a chain written before signing existed
SCAN_LIMIT = 500_000
SCAN_BUDGET_S = 20.0


@dataclass
class _HeadScan:
    """What the backward search has found so far (windows are read newest first)."""

    trusted: Mapping[str, Ed25519PublicKey]
    #: the newest record validly signed by a trusted key
    head: str | None = None
    #: the newest signed record (any key) whose hash recomputes, and its signer
    signed: str | None = None
    signed_by: str = ""
    signed_at: int = -1
    #: the newest sealed record (the pre-signing rule)
    sealed: str | None = None
    scanned: int = 0
    #: in the current window
    _w_head: str | None = None
    _w_signed: tuple[str, str, int] | None = None
    _w_sealed: str | None = None

    def see(self, offset: int, value: bytes | None) -> None:
        try:
            data = orjson.loads(value or b"")
            payload = data["payload"]
            digest = payload["hash"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return
        if not isinstance(digest, str) or not digest:
            return
        if payload.get("signature"):
            try:
                intact = record_hash(data) == digest
            except (TypeError, orjson.JSONEncodeError):
                return
            if not intact:
                return
            if signature_problem(payload, digest, self.trusted) is None:
                self._w_head = digest
            self._w_signed = (digest, str(payload.get("signed_by") or ""), offset)
        elif self.sealed is None:
            # only until the newest sealed record is known (the first window holding one)
            try:
                registry.from_dict(data)
            except SchemaError:
                return
            self._w_sealed = digest

    def end_window(self, size: int) -> None:
        self.scanned += size
        if self.head is None and self._w_head is not None:
            self.head = self._w_head
        if self.signed is None and self._w_signed is not None:
            self.signed, self.signed_by, self.signed_at = self._w_signed
        if self.sealed is None and self._w_sealed is not None:
            self.sealed = self._w_sealed
        self._w_head = self._w_sealed = None
        self._w_signed = None


async def last_hash(
    settings: Settings,
    topic: str,
    partition: int,
    lookback: int = 64,
    trusted: Mapping[str, Ed25519PublicKey] | None = None,
) -> str:
    """The hash a new record of this partition links to: the newest record validly
    signed by a key of `trusted` (GENESIS for an empty partition).

    Records after it — unsigned, signed by an unknown key, or with a signature that
    does not verify — are skipped: a forger's append is never continued from, and a
    genuine unsigned tail (a worker killed before the signed last record of its batch
    reached the broker, at-least-once) is abandoned; `verify` reports either as
    ``unsigned``/``forged``. When the search finds no such record:

    * no record carries a signature (a chain written before signing existed): the newest
      sealed record, as before signing — existing deployments keep working;
    * signatures exist, none by a trusted key (another worker's key not yet published,
      or admin keys not configured here): the newest signed record, with an error logged
      — an unsigned tail is still never adopted, and `verify` judges that signature on its
      own.

    Reads the last `lookback` offsets, and further back, eight times as far each round,
    down to the partition's first retained offset, or `SCAN_LIMIT` records /
    `SCAN_BUDGET_S` seconds (a long chain written before signing: the search then
    assumes it unsigned, and logs that). Under exactly-once a crash leaves aborted
    transactions at the end of the log, which a read-committed reader skips. A partition
    that stops answering raises `BrokerError` rather than return an older head, which
    would fork the chain.
    """
    scan = _HeadScan(trusted or {})
    known = _UNSIGNED_BELOW.get((topic, partition))
    consumer = group_less_consumer(settings, "chain-head", auto_offset_reset="earliest")
    await consumer.start()
    try:
        # bounded as a whole: a chain writer waits for this with its partition locked
        async with asyncio.timeout(HEAD_TIMEOUT_S):
            loop = asyncio.get_running_loop()
            began = loop.time()
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            first = (await consumer.beginning_offsets([tp]))[tp]
            # what an earlier search of this process found unsigned is not read again
            floor = max(first, known[0]) if known is not None else first
            start = end
            cut_short = False
            while start > floor:
                # the limits hold for the window about to be read too, not only between
                # windows: the sixth (up to 2M records) alone could outlast the timeout,
                # and then every lookup failed and the chain could never be continued
                span = min(lookback, SCAN_LIMIT - scan.scanned)
                elapsed = loop.time() - began
                if scan.scanned and elapsed > 0:
                    rate = scan.scanned / elapsed  # records/s read so far
                    span = min(span, max(1, int(rate * (SCAN_BUDGET_S - elapsed))))
                start, stop = max(first, start - span), start
                await _scan(consumer, tp, start, stop, scan)
                scan.end_window(stop - start)
                if scan.head is not None:
                    return scan.head
                if scan.scanned >= SCAN_LIMIT or loop.time() - began > SCAN_BUDGET_S:
                    cut_short = start > floor
                    break
                lookback *= 8
    except TimeoutError:
        raise BrokerError(
            f"reading the chain head of {topic}[{partition}] took over {HEAD_TIMEOUT_S:g}s"
        ) from None
    finally:
        await consumer.stop()
    if scan.signed is not None:
        log.error(
            "%s[%d]: no record signed by a chain key this worker trusts (%s); continuing "
            "from the newest signed record (offset %d, by %r): publish that key on "
            "security.worker_keys, or check AGENTSTREAM_SECURITY_ADMIN_KEYS",
            topic,
            partition,
            ", ".join(sorted(scan.trusted)) or "none",
            scan.signed_at,
            scan.signed_by,
        )
        return scan.signed
    if scan.sealed is None and known is not None:
        scan.sealed = known[1]
    _UNSIGNED_BELOW[(topic, partition)] = (end, scan.sealed)
    if cut_short and scan.sealed is not None:
        log.warning(
            "%s[%d]: no signed record in the newest %d records; continuing from the newest "
            "one as for a chain written before signing existed",
            topic,
            partition,
            scan.scanned,
        )
    return scan.sealed or GENESIS


#: {(topic, partition): (offset, newest sealed hash below it)} of head searches that found
#: no signed record below that offset (a chain written before signing is searched once)
_UNSIGNED_BELOW: dict[tuple[str, int], tuple[int, str | None]] = {}


async def _scan(consumer: Any, tp: TopicPartition, start: int, stop: int, scan: _HeadScan) -> None:
    """Feed the records at offsets [start, stop) to `scan`, in offset order."""
    consumer.seek(tp, start)
    loop = asyncio.get_running_loop()
    position = start
    moved = loop.time()
    # short polls: a transaction marker ends the range under exactly-once, and reading
    # past it returns no record, only a new position
    while (now_at := await consumer.position(tp)) < stop:
        if now_at != position:
            position, moved = now_at, loop.time()
        elif loop.time() - moved > STALL_S:
            raise BrokerError(
                f"reading the chain head of {tp.topic}[{tp.partition}] made no progress "
                f"for {STALL_S:g}s at offset {position}"
            )
        batch = await consumer.getmany(tp, timeout_ms=100)
        for rec in batch.get(tp, []):
            if rec.offset >= stop:
                return
            scan.see(rec.offset, rec.value)


@dataclass
class ChainHead:
    """The hash of the newest record of one partition's chain (see `ChainWriter.head`)."""

    hash: str


class ChainWriter:
    """Seals and sends records of one chained catalogue topic, one lock per partition."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._last: dict[int, str] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def reset(self) -> None:
        """Forget cached heads (on rebalance another worker may have written since)."""
        self._last.clear()

    @contextlib.asynccontextmanager
    async def head(self, partition: int) -> AsyncIterator[ChainHead]:
        """Hold `partition`'s lock with its current head. Seal and send records in order
        inside the block, setting `head.hash` to each sealed record's hash; the last one
        becomes the partition's head when the block exits normally. Sign (at least) the
        last record of the block (`chain_signer`): an unsigned tail is abandoned by the
        next writer that reads the head back from the topic."""
        from agentstream.streams.app import settings
        from agentstream.streams.processing import (
            check_not_frozen,
            check_not_rebalanced,
            taken_before_rebalance,
        )

        lock = self._locks.setdefault(partition, asyncio.Lock())
        async with lock:
            check_not_frozen()  # a zombie's batch would fork the chain
            # nor may a batch taken before a rebalance (or a call it started) extend a
            # chain whose partition may have another writer now (both guarantees)
            check_not_rebalanced()
            prev = self._last.get(partition)
            if prev is None:
                trusted = await worker_trust(settings)
                prev = await last_hash(
                    settings, settings.topic(self.topic), partition, trusted=trusted
                )
                check_not_rebalanced()  # the lookup can take seconds
            head = ChainHead(prev)
            try:
                yield head
            except BaseException:
                # what the block sent before failing is not known to be the head
                self._last.pop(partition, None)
                raise
            if taken_before_rebalance():
                self._last.pop(partition, None)  # reset meanwhile: not this one's to keep
            else:
                self._last[partition] = head.hash

    async def emit(self, event: Event[Any], partition: int) -> Event[Any]:
        """Seal, sign and send one record."""
        sealed, _ = await self.emit_sent(event, partition)
        return sealed

    async def emit_sent(self, event: Event[Any], partition: int) -> tuple[Event[Any], Any]:
        """`emit`, with the send's future (done once the broker has the record, or
        failed: `delivery_failed` has its error then)."""
        from agentstream.streams.app import catalogue_topic, settings
        from agentstream.streams.observability import EVENTS_OUT
        from agentstream.streams.processing import _EOS, _delivered, _producer, send_record

        catalogue_topic(self.topic)  # unknown names fail here
        # The producer Topic.send would use, fetched before taking the lock: getting it
        # through `app.maybe_start_producer()` (as Topic.send does) can yield to the
        # loop, and every record queued on this partition's lock waited for that — tens
        # of ms per response with 200 LLM calls in flight (bench/stage_llm.py).
        producer = await _producer()
        signer = await chain_signer(settings)
        async with self.head(partition) as head:
            sealed = seal(event, head.hash, signer)
            if _EOS:
                # in the transaction of the input being processed (streams/eos.py)
                fut = await send_record(
                    settings.topic(self.topic), sealed.key.encode(), encode(sealed), partition
                )
            else:
                fut = await producer.send(
                    settings.topic(self.topic),
                    sealed.key.encode(),
                    encode(sealed),
                    partition,
                    None,
                    None,
                )
            fut.add_done_callback(partial(_delivered, self.topic))
            head.hash = sealed.payload.hash
            EVENTS_OUT.labels(self.topic).inc()
            return sealed, fut


_WRITERS: dict[str, ChainWriter] = {}


def chain_writer(topic: str) -> ChainWriter:
    """The process-wide writer for a chained topic; heads are forgotten on rebalance."""
    writer = _WRITERS.get(topic)
    if writer is None:
        writer = _WRITERS[topic] = ChainWriter(topic)
        if len(_WRITERS) == 1:
            _connect_rebalance_reset()
    return writer


def _connect_rebalance_reset() -> None:
    from agentstream.streams.app import app
    from agentstream.streams.health import register_check

    register_check("audit.chain_key", _chain_key_health)

    @app.on_partitions_revoked.connect
    async def _forget_heads(app: Any, revoked: Any, **kwargs: Any) -> None:
        for writer in _WRITERS.values():
            writer.reset()
        _TRUST.read_at = None  # keys published since are read with the next head
