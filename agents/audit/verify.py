"""`agentstream audit verify`: walk hash-chained topics partition by partition and report
every record that was altered, deleted, inserted or reordered.

A sealed record carries `hash` (sha256 of the record with `hash` blanked, see
`streams.audit_chain`) and `prev_hash` (the `hash` of the record before it in the same
partition). The classification, per partition:

* **altered** — the recomputed hash differs from the stored one (a field was changed),
  or the record no longer decodes at all.
* **inserted** — a record no successor points at, while its successor points past it to
  the record before it (a forged record slipped into the chain); an exact copy of an
  earlier record is reported as inserted too.
* **deleted** — a record's `prev_hash` names a record that is not in the partition: one
  or more records before it are gone (or were replaced by re-sealed forgeries — the chain
  cannot tell those apart: both break the link at the same place).
* **reordered** — a record's predecessor is present but elsewhere: reported once per
  displaced run, at the record that appears before its own predecessor.

What the chain cannot show: the chain is unkeyed sha256, so records *appended* at the
tail with correct hashes, or a whole tail rewritten consistently, look valid; compare with
a copy of the heads kept elsewhere (checkpoints, an external notary) for that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import registry
from schemas.errors import SchemaError
from streams.audit_chain import GENESIS, compute_hash
from streams.client import group_less_consumer
from streams.replay import full_topic_names, parse_time, plan_ranges, to_ms
from streams.settings import Settings
from streams.topics import LLM_RESPONSES, SECURITY_DECISIONS

#: the topics whose records are sealed into a hash chain
CHAINED_TOPICS: tuple[str, ...] = (SECURITY_DECISIONS, LLM_RESPONSES)

Kind = Literal["altered", "deleted", "inserted", "reordered"]
KINDS: tuple[Kind, ...] = ("altered", "deleted", "inserted", "reordered")


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


def chain_record(offset: int, value: bytes | None) -> ChainRecord:
    """Decode and re-hash one record of a chained topic."""
    try:
        if value is None:
            raise SchemaError("empty value")
        event = registry.decode(value)
    except SchemaError as exc:
        # keep whatever hashes the raw JSON still shows, so that the links around a
        # damaged record are judged on their own
        stored, prev = _raw_hashes(value)
        return ChainRecord(offset, stored, prev, None, error=f"undecodable: {exc}")
    stored = str(getattr(event.payload, "hash", "") or "")
    prev = str(getattr(event.payload, "prev_hash", "") or "")
    if not stored:
        return ChainRecord(offset, "", prev, None, str(event.event_id), "record is not sealed")
    return ChainRecord(offset, stored, prev, compute_hash(event), str(event.event_id))


def _raw_hashes(value: bytes | None) -> tuple[str, str]:
    try:
        data = orjson.loads(value or b"")
        payload = data.get("payload", {}) if isinstance(data, dict) else {}
        return str(payload.get("hash", "") or ""), str(payload.get("prev_hash", "") or "")
    except (orjson.JSONDecodeError, AttributeError):
        return "", ""


def check_chain(
    records: Sequence[ChainRecord], anchor: str | None, *, topic: str = "", partition: int = 0
) -> list[Finding]:
    """Findings for one partition's records in offset order. `anchor` is the hash the
    first record must point at (GENESIS at the start of a partition, the previous
    record's hash when the range starts later); None = unknown (records expired)."""

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
    found.sort(key=lambda f: (f.offset, KINDS.index(f.kind)))
    return found


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


async def verify(
    settings: Settings,
    topics: Sequence[str] = CHAINED_TOPICS,
    since: Any = None,
    until: Any = "now",
) -> list[PartitionReport]:
    """Walk every partition of `topics` within [since, until] (offsets-for-times), with
    its own group-less consumer, and check each chain."""
    names = full_topic_names(settings, topics)
    since_ms = to_ms(parse_time(since)) if since is not None else None
    until_ms = to_ms(parse_time(until)) if until is not None else None
    consumer = group_less_consumer(settings.bootstrap, "verify")
    await consumer.start()
    reports: list[PartitionReport] = []
    try:
        ranges = await plan_ranges(consumer, names, since_ms, until_ms)
        begin = await consumer.beginning_offsets([r.tp for r in ranges])
        for r in ranges:
            anchor: str | None
            if r.start <= begin[r.tp]:
                anchor = GENESIS if begin[r.tp] == 0 else None
            else:
                anchor = await _hash_before(consumer, r.tp, r.start, begin[r.tp])
            recs = await _read(consumer, r.tp, r.start, r.stop)
            findings = check_chain(recs, anchor, topic=r.tp.topic, partition=r.tp.partition)
            reports.append(
                PartitionReport(
                    r.tp.topic,
                    r.tp.partition,
                    recs[0].offset if recs else None,
                    recs[-1].offset if recs else None,
                    len(recs),
                    anchor is not None,
                    findings,
                )
            )
    finally:
        await consumer.stop()
    return reports


async def _read(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, stop: int
) -> list[ChainRecord]:
    out: list[ChainRecord] = []
    if stop <= start:
        return out
    consumer.assign([tp])
    consumer.seek(tp, start)
    while True:
        batch = await consumer.getmany(tp, timeout_ms=1000, max_records=2000)
        recs = batch.get(tp, [])
        for rec in recs:
            if rec.offset >= stop:
                return out
            out.append(chain_record(rec.offset, rec.value))
        if await consumer.position(tp) >= stop:
            return out
        if not recs and await consumer.position(tp) >= (await consumer.end_offsets([tp]))[tp]:
            return out


async def _hash_before(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, begin: int
) -> str | None:
    """The hash of the last sealed record before `start` (the range's anchor)."""
    lookback = max(begin, start - 64)
    recs = await _read(consumer, tp, lookback, start)
    for rec in reversed(recs):
        if rec.hash:
            return rec.hash
    return GENESIS if lookback == 0 and not recs else None


def summary(reports: Sequence[PartitionReport]) -> dict[str, Any]:
    counts = {k: 0 for k in KINDS}
    for rep in reports:
        for f in rep.findings:
            counts[f.kind] += 1
    return {
        "ok": not any(counts.values()),
        "records": sum(r.records for r in reports),
        "partitions": len(reports),
        "counts": counts,
        "findings": [f.to_dict() for r in reports for f in r.findings],
        "unanchored": [f"{r.topic}:{r.partition}" for r in reports if not r.anchored and r.records],
    }
