"""`agentstream audit verify`: walk hash-chained topics partition by partition and report
every record that was altered, deleted, inserted, reordered, forged or left unsigned.

A sealed record carries `hash` (sha256 of the record as it is on the wire with `hash` and
`signature` blanked, see `streams.audit_chain.record_hash`), `prev_hash` (the `hash` of
the record before it in the same partition) and, on the last record of each batch a
worker writes to a partition, `signed_by` and `signature` (Ed25519 over the hash by the
worker's chain key). The classification, per partition:

* **altered** — the recomputed hash differs from the stored one (a field was changed),
  or the record no longer decodes at all — the Kafka client itself cannot parse it
  included (a stand-in, `streams.record_batches`: a header key that is not UTF-8, a
  codec this host lacks). A worker writes neither, and what cannot be read cannot be
  checked; a stand-in for a whole batch is reported at the batch's last offset, and the
  next record's link to the batch as deleted.
* **inserted** — a record no successor points at, while its successor points past it to
  the record before it (a forged record slipped into the chain); an exact copy of an
  earlier record is reported as inserted too.
* **deleted** — a record's `prev_hash` names a record that is not in the partition: one
  or more records before it are gone (or were replaced by re-sealed forgeries — the chain
  cannot tell those apart: both break the link at the same place).
* **reordered** — a record's predecessor is present but elsewhere: reported once per
  displaced run, at the record that appears before its own predecessor.
* **forged** — a signature that does not verify, or by a key that is not trusted
  (unknown, revoked, or not among the pinned keys).
* **unsigned** — a record no valid signature vouches for. A signature vouches for its
  own record and, following `prev_hash` back, for the unsigned records before it up to
  the previous signed record (its batch); a record whose batch signature is forged, a
  tail no signed record follows (a batch cut short by a crash, or an append by someone
  without a chain key) and a run the chain skips are unsigned. A record that is both
  skipped by the chain and unsigned (or forged) is reported once, as unsigned (forged).

Trusted chain keys are the keys published on `security.worker_keys` whose records verify
against the admin keys (`AGENTSTREAM_SECURITY_ADMIN_KEYS`) and are not revoked; keys
pinned by the auditor (`--trust-key`, `--trusted-keys`) replace them. ``unsigned`` is
reported in a partition that holds at least one signature, and — with
`require_signatures`, by default whenever any chain key is trusted — in partitions with
no signature at all too: otherwise a forger could write a whole partition the workers
never wrote to (or that predates signing) without a signature and pass.

What the chain cannot show: records deleted from the *end* of a partition (the newest
batches) leave a valid chain behind; compare with a copy of the heads kept elsewhere
(checkpoints, an external notary) for that. Anyone holding a trusted chain key can of
course sign what they like.

Offsets of a range deleted after the walk planned it and before it read them
(retention, `delete-records`) are not skipped silently: each partition's report lists
them (`PartitionReport.lost`, `streams.replay.Gap`) and the result is not ok — their
records were never checked. A read that stops moving (a broker gone mid-walk) raises
`BrokerError` after `AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S` (`streams.replay.read_partition`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agentstream.schemas import PolicyDecision, registry
from agentstream.schemas.errors import SchemaError
from agentstream.streams import record_batches
from agentstream.streams.audit_chain import (
    GENESIS,
    read_worker_keys,
    record_hash,
    signature_problem,
)
from agentstream.streams.client import group_less_consumer, listed_partitions
from agentstream.streams.record_batches import unreadable
from agentstream.streams.replay import (
    Gap,
    Progress,
    full_topic_names,
    parse_time,
    plan_ranges,
    read_partition,
    start_reader,
    stop_reader,
    to_ms,
)
from agentstream.streams.settings import Settings
from agentstream.streams.topics import (
    CATALOGUE,
    LLM_RESPONSES,
    SECURITY_DECISIONS,
    SECURITY_POLICIES,
)

#: the topics whose records are sealed into a hash chain
CHAINED_TOPICS: tuple[str, ...] = (SECURITY_DECISIONS, LLM_RESPONSES)

Kind = Literal["altered", "deleted", "inserted", "reordered", "forged", "unsigned"]
KINDS: tuple[Kind, ...] = ("altered", "deleted", "inserted", "reordered", "forged", "unsigned")

#: records read past the end of a range to find the signature vouching for its last ones
LOOKAHEAD = 10_000

#: {(policy_id, version, admin key id that signed it): decisions}
PolicyCounts = Counter[tuple[str, int, str]]


@dataclass(frozen=True, slots=True)
class ChainRecord:
    """What the walk needs of one record (hashes only: a long partition stays cheap)."""

    offset: int
    hash: str
    prev_hash: str
    #: recomputed hash; None when the record does not decode or carries no hash
    computed: str | None
    event_id: str = ""
    error: str = ""
    signed_by: str = ""
    signature: str = ""


@dataclass(frozen=True)
class ChainTrust:
    """The chain keys signatures are checked against."""

    keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    #: key ids published as revoked (for the report's wording)
    revoked: frozenset[str] = frozenset()
    #: where the keys come from: "pinned" or "security.worker_keys"
    source: str = "security.worker_keys"
    #: why no published key could be trusted (no admin keys ...), if so
    problem: str | None = None

    def check(self, rec: ChainRecord) -> str | None:
        """None when `rec` carries a valid signature by a trusted key; else why not."""
        problem = signature_problem(
            {"signed_by": rec.signed_by, "signature": rec.signature}, rec.hash, self.keys
        )
        if problem is not None and rec.signed_by in self.revoked:
            return f"signed by {rec.signed_by!r}, whose key is revoked on security.worker_keys"
        if problem is not None and rec.signed_by not in self.keys and self.source == "pinned":
            return f"signed by {rec.signed_by!r}, which is not among the pinned chain keys"
        return problem


@dataclass(frozen=True, slots=True)
class Finding:
    kind: Kind
    topic: str
    partition: int
    offset: int
    detail: str
    event_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class PartitionReport:
    topic: str
    partition: int
    first_offset: int | None
    last_offset: int | None
    records: int
    anchored: bool
    findings: list[Finding]
    #: records in range that carry a valid signature by a trusted key
    signed: int = 0
    #: decisions per signed policy version (security.decisions only)
    policies: PolicyCounts = field(default_factory=Counter)
    #: offsets of the range deleted before they were read: not checked
    lost: list[Gap] = field(default_factory=list)


@dataclass(frozen=True)
class Placement:
    """Where a chained record was read: the event types its topic carries and its
    partition. The hash and its signature cover neither, so a chain copied whole into
    another partition, or onto another chained topic, links and verifies there; what the
    record itself says of its place is checked against them instead."""

    types: tuple[str, ...]
    partition: int


def chain_record(
    offset: int,
    value: bytes | None,
    tally: PolicyCounts | None = None,
    *,
    place: Placement | None = None,
) -> ChainRecord:
    """Decode and re-hash one record of a chained topic (the hash of its raw JSON: see
    `streams.audit_chain.record_hash`). With `tally`, count the signed policy versions a
    decision names. A stand-in for what the Kafka client cannot parse is altered: its
    content is not checked, whatever bytes it kept."""
    stand_in = unreadable(value)
    if stand_in is not None:
        # a record's stand-in keeps its value: its links still place it in the chain
        stored, prev = ("", "") if stand_in.whole_batch else _raw_hashes(bytes(stand_in))
        problem = f"the Kafka client cannot parse it ({stand_in.describe()})"
        return ChainRecord(offset, stored, prev, None, error=problem)
    try:
        if value is None:
            raise SchemaError("empty value")
        event = registry.decode(value)
        data = orjson.loads(value)
    except SchemaError as exc:
        # keep whatever hashes the raw JSON still shows, so that the links around a
        # damaged record are judged on their own
        stored, prev = _raw_hashes(value)
        return ChainRecord(offset, stored, prev, None, error=f"undecodable: {exc}")
    payload = data["payload"]
    stored = str(payload.get("hash") or "")
    prev = str(payload.get("prev_hash") or "")
    eid = str(event.event_id)
    if not stored:
        return ChainRecord(offset, "", prev, None, eid, "record is not sealed")
    if place is not None:
        misplaced = _misplaced(event, place)
        if misplaced:
            return ChainRecord(offset, stored, prev, None, eid, misplaced)
    try:
        computed = record_hash(data)
    except (TypeError, ValueError) as exc:
        # decodable, but not serialisable again (nested past orjson's 254 levels in a
        # free-form field): its hash cannot be what a worker computed, so it is altered,
        # and the walk goes on (this raised out of `audit verify`, a traceback)
        return ChainRecord(offset, stored, prev, None, eid, f"cannot be hashed: {exc}")
    if tally is not None:
        _tally(payload, tally)
    return ChainRecord(
        offset,
        stored,
        prev,
        computed,
        eid,
        signed_by=str(payload.get("signed_by") or ""),
        signature=str(payload.get("signature") or ""),
    )


def _misplaced(event: Any, place: Placement) -> str:
    """Why `event` cannot have been written where it was read ("" when it can): its type
    is not its topic's, or a decision names another source partition (a worker writes
    each decision to its input's partition number)."""
    if event.type not in place.types:
        return f"a {event.type} event, which this topic does not carry (a copy?)"
    source = getattr(event.payload, "source_partition", None)
    if isinstance(event.payload, PolicyDecision) and source not in (None, place.partition):
        return (
            f"a decision on a message of partition {source}, read in partition "
            f"{place.partition} (a copy?)"
        )
    return ""


def _tally(payload: Mapping[str, Any], tally: PolicyCounts) -> None:
    policies = payload.get("policies")
    signers = payload.get("policy_signers")
    if not isinstance(policies, Mapping):
        return
    signers = signers if isinstance(signers, Mapping) else {}
    for pid, version in policies.items():
        if isinstance(version, int):
            tally[(str(pid), version, str(signers.get(pid) or ""))] += 1


def _raw_hashes(value: bytes | None) -> tuple[str, str]:
    try:
        data = orjson.loads(value or b"")
        payload = data.get("payload", {}) if isinstance(data, dict) else {}
        return str(payload.get("hash", "") or ""), str(payload.get("prev_hash", "") or "")
    except (orjson.JSONDecodeError, AttributeError):
        return "", ""


def check_chain(
    records: Sequence[ChainRecord],
    anchor: str | None,
    *,
    topic: str = "",
    partition: int = 0,
    trust: ChainTrust | None = None,
    require_signatures: bool = False,
    following: Sequence[ChainRecord] = (),
) -> list[Finding]:
    """Findings for one partition's records in offset order. `anchor` is the hash the
    first record must point at (GENESIS at the start of a partition, the previous
    record's hash when the range starts later); None = unknown (records expired).
    `following` are records after the range, read only to find the signatures that
    vouch for its last records (never reported)."""
    return _check(records, anchor, topic, partition, trust, require_signatures, following)[0]


def _check(
    records: Sequence[ChainRecord],
    anchor: str | None,
    topic: str,
    partition: int,
    trust: ChainTrust | None,
    require_signatures: bool,
    following: Sequence[ChainRecord],
) -> tuple[list[Finding], int]:
    """(findings, records in range validly signed by a trusted key)."""
    structural = _structural(records, anchor, topic, partition)
    signatures, valid = _signatures(
        records, following, trust or ChainTrust(), require_signatures, topic, partition
    )
    return _merge(structural, signatures), valid


def _structural(
    records: Sequence[ChainRecord], anchor: str | None, topic: str, partition: int
) -> list[Finding]:
    def finding(kind: Kind, rec: ChainRecord, detail: str) -> Finding:
        return Finding(kind, topic, partition, rec.offset, detail, rec.event_id)

    found: list[Finding] = []
    for rec in records:
        if rec.computed is None:
            found.append(finding("altered", rec, rec.error or "cannot recompute the hash"))
        elif rec.computed != rec.hash:
            found.append(
                finding(
                    "altered",
                    rec,
                    f"content hashes to {rec.computed[:12]}…, the record says {rec.hash[:12]}…",
                )
            )

    # exact copies of earlier records take no part in the chain
    first_at: dict[str, ChainRecord] = {}
    linked: list[ChainRecord] = []
    for rec in records:
        if not rec.hash:
            continue
        earlier = first_at.get(rec.hash)
        if earlier is not None and rec.computed == rec.hash:
            found.append(finding("inserted", rec, f"copy of the record at offset {earlier.offset}"))
            continue
        first_at.setdefault(rec.hash, rec)
        linked.append(rec)

    # pass 1: runs of records skipped over by a link, that nothing outside points at
    inserted = _inserted(linked, anchor)
    for i in sorted(inserted):
        rec = linked[i]
        found.append(
            finding(
                "inserted",
                rec,
                "no record points at it; its successor links to the record before it",
            )
        )
    chain = [r for i, r in enumerate(linked) if i not in inserted]

    # pass 2: breaks in what remains
    pos = {r.hash: i for i, r in enumerate(chain)}
    covered: set[int] = set()
    for k, rec in enumerate(chain):
        expected = chain[k - 1].hash if k else anchor
        if k == 0 and anchor is None:
            continue  # the range starts where earlier records expired: nothing to link to
        if rec.prev_hash == expected:
            continue
        p = -1 if (anchor is not None and rec.prev_hash == anchor) else pos.get(rec.prev_hash)
        if p is None or p == k:
            found.append(
                finding(
                    "deleted",
                    rec,
                    f"its predecessor {rec.prev_hash[:12]}… is "
                    "missing: record(s) deleted (or replaced) before it",
                )
            )
        elif p > k:
            found.append(
                finding(
                    "reordered", rec, f"appears before its predecessor at offset {chain[p].offset}"
                )
            )
            covered.update(range(k, p + 1))
        elif not any(q in covered for q in range(p + 1, k)):
            at = "the start" if p < 0 else f"offset {chain[p].offset}"
            found.append(
                finding("reordered", rec, f"its predecessor is at {at}, not right before it")
            )
            covered.update(range(p + 1, k + 1))
    return found


def _signatures(
    records: Sequence[ChainRecord],
    following: Sequence[ChainRecord],
    trust: ChainTrust,
    require: bool,
    topic: str,
    partition: int,
) -> tuple[list[Finding], int]:
    """`forged` and `unsigned` findings (see the module docstring), and the number of
    records in range validly signed."""
    every = [*records, *following]
    #: offset -> "valid" | "forged" | "broken" (signed, but altered) | "none"
    state: dict[int, str] = {}
    found: list[Finding] = []
    in_range = {r.offset for r in records}
    for rec in every:
        if not rec.signature:
            state[rec.offset] = "none"
        elif rec.computed is None or rec.computed != rec.hash:
            state[rec.offset] = "broken"  # reported as altered; vouches for nothing
        else:
            problem = trust.check(rec)
            state[rec.offset] = "valid" if problem is None else "forged"
            if problem is not None and rec.offset in in_range:
                found.append(Finding("forged", topic, partition, rec.offset, problem, rec.event_id))
    valid = sum(1 for r in records if state[r.offset] == "valid")
    signed_any = any(s != "none" for s in state.values())
    if not (signed_any or require):
        return found, valid

    # each signed record claims the unsigned records before it in the chain, up to the
    # previous signed one; a valid claim wins over an invalid one (a fork)
    by_hash: dict[str, ChainRecord] = {}
    for rec in every:
        if rec.hash:
            by_hash.setdefault(rec.hash, rec)
    claimed: dict[int, ChainRecord] = {}
    for rec in every:
        st = state[rec.offset]
        if st == "none":
            continue
        cur = by_hash.get(rec.prev_hash)
        while cur is not None and state[cur.offset] == "none":
            holder = claimed.get(cur.offset)
            if holder is not None and (holder is rec or state[holder.offset] == "valid"):
                break
            claimed[cur.offset] = rec
            cur = by_hash.get(cur.prev_hash)

    for rec in records:
        if state[rec.offset] != "none":
            continue
        holder = claimed.get(rec.offset)
        if holder is not None and state[holder.offset] == "valid":
            continue
        if holder is not None:
            why = "altered" if state[holder.offset] == "broken" else "forged"
            detail = f"not signed, and the signature covering it (offset {holder.offset}) is {why}"
        elif not signed_any:
            detail = "not signed: no record of this partition in range is signed"
        else:
            detail = (
                "not signed, and no validly signed record after it links back to it "
                "(a batch cut short by a worker crash, or appended without a chain key)"
            )
        found.append(Finding("unsigned", topic, partition, rec.offset, detail, rec.event_id))
    return found, valid


def _merge(structural: list[Finding], signatures: list[Finding]) -> list[Finding]:
    """One finding per record and kind; a record skipped by the chain that is also
    unsigned or forged is reported as the latter (with the skip in its detail), an
    altered one is not reported unsigned as well."""
    altered = {f.offset for f in structural if f.kind == "altered"}
    inserted = {f.offset: f for f in structural if f.kind == "inserted"}
    out = [f for f in structural if f.kind != "inserted"]
    merged: set[int] = set()
    for f in signatures:
        if f.kind == "unsigned" and f.offset in altered:
            continue
        skip = inserted.get(f.offset)
        if skip is not None:
            f = Finding(
                f.kind, f.topic, f.partition, f.offset, f"{f.detail}; {skip.detail}", f.event_id
            )
            merged.add(f.offset)
        out.append(f)
    out += [f for off, f in inserted.items() if off not in merged]
    out.sort(key=lambda f: (f.offset, KINDS.index(f.kind)))
    return out


def _inserted(linked: Sequence[ChainRecord], anchor: str | None) -> set[int]:
    pos = {r.hash: i for i, r in enumerate(linked)}
    referrers: dict[str, list[int]] = {}
    for i, r in enumerate(linked):
        referrers.setdefault(r.prev_hash, []).append(i)
    out: set[int] = set()
    for k, rec in enumerate(linked):
        expected = linked[k - 1].hash if k else anchor
        if rec.prev_hash == expected:
            continue
        if anchor is not None and rec.prev_hash == anchor:
            p: int | None = -1
        else:
            p = pos.get(rec.prev_hash)
        if p is None or p >= k - 1:
            continue
        run = range(p + 1, k)
        outside = any(j not in run for i in run for j in referrers.get(linked[i].hash, []))
        if not outside:
            out.update(run)
    return out


# -- trust ----------------------------------------------------------------------------------
async def resolve_trust(
    settings: Settings, pinned: Mapping[str, Ed25519PublicKey] | None = None
) -> ChainTrust:
    """The pinned keys when any are given (only those), else the published ones."""
    if pinned:
        return ChainTrust(dict(pinned), source="pinned")
    published = await read_worker_keys(settings)
    return ChainTrust(
        published.trusted(),
        revoked=published.revoked(),
        source="security.worker_keys",
        problem=published.problem,
    )


# -- the walk -------------------------------------------------------------------------------
async def verify(
    settings: Settings,
    topics: Sequence[str] = CHAINED_TOPICS,
    since: Any = None,
    until: Any = "now",
    *,
    trust: ChainTrust | None = None,
    require_signatures: bool | None = None,
    progress: Progress | None = None,
) -> list[PartitionReport]:
    """Walk every partition of `topics` within [since, until) (offsets-for-times), with
    its own group-less consumer, and check each chain. `trust` None = the published keys
    (`resolve_trust`); `require_signatures` None = whenever a chain key is trusted.
    `progress` counts the offsets of the ranges (not the few records read around them
    for an anchor or a signature)."""
    if trust is None:
        trust = await resolve_trust(settings)
    require = bool(trust.keys) if require_signatures is None else require_signatures
    names = full_topic_names(settings, topics)
    decisions_topic = settings.topic(SECURITY_DECISIONS)
    #: full topic name -> the event types its catalogue entry carries
    types_of = {settings.topic(t): CATALOGUE[t].events for t in topics if t in CATALOGUE}
    since_ms = to_ms(parse_time(since)) if since is not None else None
    until_ms = to_ms(parse_time(until)) if until is not None else None
    stall_s = settings.kafka_connect_timeout_s
    # what the client cannot parse comes as a stand-in, a finding, instead of failing
    # every fetch of the partition from there on (`chain_record`)
    record_batches.install(settings.max_decompressed_batch_bytes, settings.max_compression_ratio)
    # offsets deleted under the walk fail the fetch instead of moving it silently to the
    # log's new start: `read_partition` reports them
    consumer = group_less_consumer(settings, "verify", auto_offset_reset="none")
    complaints = await start_reader(consumer)
    reports: list[PartitionReport] = []
    try:
        ranges = await plan_ranges(consumer, names, since_ms, until_ms)
        if progress is not None:
            progress.plan(r.stop - r.start for r in ranges)
        for r in ranges:
            anchor: str | None
            if r.start <= r.begin:
                anchor = GENESIS if r.begin == 0 else None
            else:
                anchor = await _hash_before(consumer, r.tp, r.start, r.begin, stall_s, complaints)
            tally: PolicyCounts = Counter()
            lost: list[Gap] = []
            place = Placement(types_of.get(r.tp.topic, ()), r.tp.partition)
            recs = await _read(
                consumer,
                r.tp,
                r.start,
                r.stop,
                tally if r.tp.topic == decisions_topic else None,
                stall_s=stall_s,
                progress=progress,
                lost=lost.append,
                complaints=complaints,
                place=place,
            )
            following: list[ChainRecord] = []
            if recs and not recs[-1].signature and r.stop < r.end:
                following = await _read(
                    consumer,
                    r.tp,
                    r.stop,
                    min(r.end, r.stop + LOOKAHEAD),
                    stall_s=stall_s,
                    until_signed=True,
                    complaints=complaints,
                )
            findings, signed = _check(
                recs, anchor, r.tp.topic, r.tp.partition, trust, require, following
            )
            reports.append(
                PartitionReport(
                    r.tp.topic,
                    r.tp.partition,
                    recs[0].offset if recs else None,
                    recs[-1].offset if recs else None,
                    len(recs),
                    anchor is not None,
                    findings,
                    signed,
                    tally,
                    lost,
                )
            )
    finally:
        await stop_reader(consumer)
    return reports


async def _read(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    start: int,
    stop: int,
    tally: PolicyCounts | None = None,
    *,
    stall_s: float,
    until_signed: bool = False,
    progress: Progress | None = None,
    lost: Callable[[Gap], None] | None = None,
    complaints: Sequence[str] = (),
    place: Placement | None = None,
) -> list[ChainRecord]:
    """The records of [start, stop); with `until_signed`, up to the first signed one.
    `progress` is advanced by the offsets consumed, all of [start, stop) once it is read
    through (compacted or expired offsets, transaction markers included); offsets
    deleted before they were read go to `lost` (`streams.replay.read_partition`)."""
    out: list[ChainRecord] = []
    runs = read_partition(
        consumer,
        tp,
        start,
        stop,
        stall_s=stall_s,
        what="audit verify",
        progress=progress,
        lost=lost,
        complaints=complaints,
    )
    async with aclosing(runs):
        async for run in runs:
            for rec in run:
                out.append(chain_record(rec.offset, rec.value, tally, place=place))
                if until_signed and out[-1].signature:
                    return out
    return out


async def _hash_before(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    start: int,
    begin: int,
    stall_s: float,
    complaints: Sequence[str] = (),
) -> str | None:
    """The hash of the last sealed record before `start` (the range's anchor)."""
    lookback = max(begin, start - 64)
    gone: list[Gap] = []
    recs = await _read(
        consumer,
        tp,
        lookback,
        start,
        stall_s=stall_s,
        lost=gone.append,
        complaints=complaints,
    )
    for rec in reversed(recs):
        if rec.hash:
            return rec.hash
    # nothing before the range from offset 0 on: the chain starts with it, unless those
    # records were deleted while being read (then it cannot be anchored)
    return GENESIS if lookback == 0 and not recs and not gone else None


# -- the signed policy versions that decided ------------------------------------------------
async def policy_versions(
    settings: Settings, reports: Sequence[PartitionReport]
) -> list[dict[str, Any]]:
    """Per (policy id, version, admin key that signed it): how many decisions in range
    applied it, and whether that signed version is still on `security.policies` (a
    compacted topic keeps only the latest record per policy, so an older version is
    normally gone) with a signature that verifies against the admin keys configured here
    (None when no admin key is configured)."""
    counts: PolicyCounts = Counter()
    for rep in reports:
        counts.update(rep.policies)
    if not counts:
        return []
    on_topic = await _published_policy_versions(settings)
    rows = []
    for (pid, version, signer), n in sorted(counts.items()):
        rows.append(
            {
                "policy_id": pid,
                "version": version,
                "signed_by": signer,
                "decisions": n,
                "on_topic": (pid, version, signer) in on_topic,
                "signature_valid": on_topic.get((pid, version, signer)),
            }
        )
    return rows


async def _published_policy_versions(settings: Settings) -> dict[tuple[str, int, str], bool | None]:
    """{(policy id, version, signer): signature valid (None: no admin key to check)} of
    every policy on `security.policies`, inline config policies included."""
    from agentstream.schemas.security import SecurityConfig, SecurityPolicy
    from agentstream.streams.signing import check_change
    from agentstream.streams.tables.security import trusted_admin_keys

    admin, _problem = trusted_admin_keys(settings.security_admin_keys)
    topic = settings.topic(SECURITY_POLICIES)
    consumer = group_less_consumer(settings, "verify-policies", auto_offset_reset="none")
    complaints = await start_reader(consumer)
    out: dict[tuple[str, int, str], bool | None] = {}
    stall_s = settings.kafka_connect_timeout_s
    try:
        parts = await listed_partitions(consumer, topic)
        if not parts:
            return out
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        for tp in tps:
            for rec in await _raw(consumer, tp, begin[tp], end[tp], stall_s, complaints):
                try:
                    event = registry.decode(rec)
                except SchemaError:
                    continue
                payload = event.payload
                if isinstance(payload, SecurityPolicy):
                    entries = [(payload.policy_id, payload.version)]
                elif isinstance(payload, SecurityConfig):
                    entries = [(p.policy_id, p.version) for p in payload.policies]
                else:
                    continue
                valid: bool | None = None
                if admin:
                    signed = payload.model_dump(mode="json", exclude_unset=True)
                    valid = check_change(event.type, signed, admin) is None
                for pid, version in entries:
                    key = (pid, version, payload.signed_by)
                    # one valid copy is enough
                    out[key] = valid if valid is None else bool(out.get(key)) or valid
    finally:
        await stop_reader(consumer)
    return out


async def _raw(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    start: int,
    stop: int,
    stall_s: float,
    complaints: Sequence[str] = (),
) -> list[bytes]:
    """The values of [start, stop). A policy record deleted before it was read is simply
    not on the topic, which is what the report says of it."""
    out: list[bytes] = []
    runs = read_partition(
        consumer, tp, start, stop, stall_s=stall_s, what="audit verify", complaints=complaints
    )
    async with aclosing(runs):
        async for run in runs:
            out += [r.value for r in run if r.value is not None]
    return out


def summary(
    reports: Sequence[PartitionReport],
    *,
    trust: ChainTrust | None = None,
    require_signatures: bool | None = None,
    policies: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    counts = {k: 0 for k in KINDS}
    for rep in reports:
        for f in rep.findings:
            counts[f.kind] += 1
    lost = [g for r in reports for g in r.lost]
    out: dict[str, Any] = {
        # offsets deleted before they were read were never checked: not a pass
        "ok": not any(counts.values()) and not lost,
        "records": sum(r.records for r in reports),
        "signed": sum(r.signed for r in reports),
        "partitions": len(reports),
        "counts": counts,
        "findings": [f.to_dict() for r in reports for f in r.findings],
        "unanchored": [f"{r.topic}:{r.partition}" for r in reports if not r.anchored and r.records],
        "lost": [g.to_dict() for g in lost],
        "policy_versions": [dict(p) for p in policies],
    }
    if trust is not None:
        out["trusted_keys"] = sorted(trust.keys)
        out["trust_source"] = trust.source
        out["trust_problem"] = trust.problem
        out["require_signatures"] = (
            bool(trust.keys) if require_signatures is None else require_signatures
        )
    return out
