"""Monitoring tables: agent heartbeats/status, metric windows and communication records.

Every table here is a pure fold over its source events (`TableSpec.apply`), used both on
the live Faust table and by `rebuild`. Nothing in a fold reads the wall clock: decisions
that depend on "now" (is an agent down? is a window past retention?) are taken by timers
and views, so a rebuild from history reproduces the live table byte for byte.

``agent_heartbeats`` (key: agent id) — folded from BOTH `agent.heartbeats` and
`agent.status`. Heartbeats are folded in log order: one not after the last one folded
(by offset in its partition) is ignored, so a redelivery changes nothing; each sets
``last_heartbeat_at`` to its record's timestamp — the broker's append time, not the
sender's ``sent_at`` (kept as information). The fold knows the record through its
`Origin`, which a rebuild reads too; a heartbeat whose key is not its agent id, or
that is not in the partition that id hashes to, is refused (`misplaced_heartbeat`).
`AgentStatusChanged` events set ``status``. The heartbeat monitor decides transitions on
a timer and *publishes* them; the status in the table only changes when that event is
read back. Because the event is the source of truth, a worker that crashes after
publishing finds the transition in the log on restart instead of publishing it twice.

``metric_windows`` (key: ``series␟labels-json␟window-start-ms``) — count, sum, min, max
and last per series, label set and collection interval. Windows older than the
retention *relative to the newest sample of the same series and label set* are deleted
by the fold (event time keeps it deterministic); views additionally hide windows older
than the retention relative to the wall clock.

``comms_records`` (keys ``r␟agent␟kind␟recorded-at-ms␟record-id`` → record, and
``c␟agent`` → {kind: count}) — one entry per record, so a changelog write stays small;
counts are of the records currently retained. Retention is by event time per agent,
like the metric windows.

The agents fold into these Faust tables through a `TableWriter` (`streams.tables.writer`)
set to the partition of the *input record being folded* (``writer.at(partition)``):
they fold batches, where Faust's "current event" is just the last one of the batch.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from aiokafka.partitioner import murmur2

from agentstream.schemas import (
    AgentStatusChanged,
    CommunicationRecord,
    Event,
    Heartbeat,
    MetricSample,
)
from agentstream.schemas.errors import InvalidEvent
from agentstream.streams.settings import get_settings
from agentstream.streams.tables import Origin, TableSpec, TableWriter, register
from agentstream.streams.topics import (
    AGENT_HEARTBEATS,
    AGENT_STATUS,
    COMMS_RECORDS,
    METRICS_SAMPLES,
)

SEP = "\x1f"  # cannot occur in series names, agent ids in practice, or JSON text

HEARTBEATS_TABLE = "agent_heartbeats"
METRICS_TABLE = "metric_windows"
COMMS_TABLE = "comms_records"


# -- heartbeats ---------------------------------------------------------------------------
def fold_heartbeat(
    state: MutableMapping[str, Any],
    agent_id: str,
    *,
    at: float,
    partition: int,
    offset: int,
    sent_at: float | None = None,
    sequence: int = 0,
    info: dict[str, str] | None = None,
) -> bool:
    """Apply one heartbeat read at (`partition`, `offset`) and appended by the broker at
    `at`; False when it is not newer than the last one folded (a redelivery).

    Heartbeats are taken in log order, dated by the broker's append time: the sender's
    `sent_at` is kept as information only. A sender whose clock ran ahead and was set
    right is not ignored until its clock catches up, and a `sent_at` in the future keeps
    nobody up."""
    cur = state.get(agent_id)
    if cur is not None and not _newer_heartbeat(cur, partition, offset, at):
        return False
    beats = int(cur.get("beats", 0)) if cur is not None else 0
    if cur is None:
        cur = {"status": None, "status_changed_at": None, "reason": None, "info": {}}
    new = dict(cur)
    new["last_heartbeat_at"] = at
    new["sent_at"] = sent_at
    new["sequence"] = sequence
    new["beats"] = beats + 1
    if beats == 0 or new.get("first_seen_at") is None:
        # an entry a status event made (read before its heartbeats) is first seen at the
        # first heartbeat, as it was where the heartbeats came first
        new["first_seen_at"] = at
    new["partition"] = partition
    new["offset"] = offset
    if info:
        new["info"] = dict(info)
    elif "info" not in new:
        new["info"] = {}
    state[agent_id] = new
    return True


def _newer_heartbeat(cur: dict[str, Any], partition: int, offset: int, at: float) -> bool:
    """Whether a heartbeat at (`partition`, `offset`, `at`) comes after the one `cur` holds:
    by offset in the same partition (exact, whatever the clocks), by append time across
    partitions."""
    last_offset = cur.get("offset")
    if last_offset is None:  # made by a status event, or by an older version of this fold
        return True
    if cur.get("partition") == partition:
        return offset > int(last_offset)
    return at > float(cur.get("last_heartbeat_at") or 0.0)


def fold_status(state: MutableMapping[str, Any], change: AgentStatusChanged) -> None:
    cur = state.get(change.agent_id)
    if cur is None:
        last = change.last_heartbeat_at.timestamp() if change.last_heartbeat_at else None
        cur = {
            "last_heartbeat_at": last,
            "sent_at": None,
            "sequence": 0,
            "beats": 0,
            "first_seen_at": last,
            "status": None,
            "status_changed_at": None,
            "reason": None,
            "info": {},
            "partition": None,
            "offset": None,
        }
    new = dict(cur)
    new["status"] = change.current
    new["status_changed_at"] = change.changed_at.timestamp()
    new["reason"] = change.reason
    state[change.agent_id] = new


def home_partition(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner puts `key` in (murmur2, as Java's and
    aiokafka's; librdkafka's default, ``consistent_random``, is CRC32 and differs)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def misplaced_heartbeat(agent_id: str, origin: Origin) -> str | None:
    """Why a heartbeat of `agent_id` read at `origin` is refused, or None.

    `agent.heartbeats` is keyed by the agent id, and an agent's heartbeats must all be in
    the partition that key hashes to: its entry, its status events and the worker that
    judges it are there. One sent under another key, or put in another partition, made
    a second worker judge the same agent (its status flapping between the two), and the
    entry a changelog partition that its key's restore does not read."""
    if origin.key != agent_id.encode():
        shown = origin.key[:64] if origin.key is not None else None
        return (
            f"heartbeat of {agent_id!r} sent with the key {shown!r}: agent.heartbeats is "
            "keyed by the agent id (key mismatch)"
        )
    home = home_partition(agent_id, origin.partitions)
    if origin.partition != home:
        return (
            f"heartbeat of {agent_id!r} read from partition {origin.partition}: its key "
            f"hashes to partition {home} (Kafka's default partitioner, murmur2; set "
            "partitioner=murmur2_random on a librdkafka producer)"
        )
    return None


def fold_heartbeat_record(state: MutableMapping[str, Any], beat: Heartbeat, origin: Origin) -> bool:
    """`fold_heartbeat` of the heartbeat `beat` read at `origin`; `InvalidEvent` (a dead
    letter, the table unchanged) when it is misplaced (`misplaced_heartbeat`)."""
    problem = misplaced_heartbeat(beat.agent_id, origin)
    if problem is not None:
        raise InvalidEvent(problem, type=Heartbeat.TYPE)
    return fold_heartbeat(
        state,
        beat.agent_id,
        at=origin.timestamp,
        partition=origin.partition,
        offset=origin.offset,
        sent_at=beat.sent_at.timestamp(),
        sequence=beat.sequence,
        info=beat.info,
    )


def apply_heartbeat_record(
    state: MutableMapping[str, Any], event: Event[Any], origin: Origin
) -> None:
    p = event.payload
    if isinstance(p, Heartbeat):
        fold_heartbeat_record(state, p, origin)
    elif isinstance(p, AgentStatusChanged):
        fold_status(state, p)


# -- time-ordered key index (pruning by event time) ----------------------------------------
@dataclass
class _Group:
    newest: float = -math.inf
    heap: list[tuple[float, str]] = field(default_factory=list)


class KeyIndex:
    """Per group (series+labels, or agent): the keys of the state ordered by time, so a
    fold can drop what falls out of retention without scanning the state.

    It is derived data: built from the state on first use and rebuilt when the state
    changed behind the fold's back (a Faust table restored from its changelog after a
    rebalance — the agent calls `invalidate`).
    """

    def __init__(self) -> None:
        self.groups: dict[str, _Group] = {}

    def add(self, group: str, ts: float, key: str, newest: float | None = None) -> _Group:
        """Index `key` under time `ts`; `newest` (default `ts`) advances the group's
        newest event time."""
        g = self.groups.get(group)
        if g is None:
            g = self.groups[group] = _Group()
        heapq.heappush(g.heap, (ts, key))
        g.newest = max(g.newest, ts if newest is None else newest)
        return g

    def newest(self, group: str) -> float:
        g = self.groups.get(group)
        return g.newest if g is not None else -math.inf

    def expire(self, group: str, cutoff: float) -> Iterator[str]:
        """Pop the keys of `group` with a time before `cutoff`."""
        g = self.groups.get(group)
        if g is None:
            return
        while g.heap and g.heap[0][0] < cutoff:
            yield heapq.heappop(g.heap)[1]


_INDEXES: dict[tuple[str, int], tuple[Any, KeyIndex]] = {}


def index_for(kind: str, state: Any, build: Any) -> KeyIndex:
    """The KeyIndex of `state` (cached by identity, holding a reference so ids are not
    reused); `build(state)` makes one from scratch."""
    entry = _INDEXES.get((kind, id(state)))
    if entry is not None and entry[0] is state:
        return entry[1]
    if len(_INDEXES) > 16:  # rebuilds make throwaway dicts: do not keep them alive
        for k in [k for k in _INDEXES if k[0] == kind][:8]:
            _INDEXES.pop(k, None)
    idx = build(state)
    _INDEXES[(kind, id(state))] = (state, idx)
    return idx


def invalidate_indexes(state: Any) -> None:
    for k in [k for k, v in _INDEXES.items() if v[0] is state]:
        _INDEXES.pop(k, None)


# -- metric windows -------------------------------------------------------------------------
def labels_key(labels: dict[str, str]) -> str:
    return orjson.dumps(labels, option=orjson.OPT_SORT_KEYS).decode()


def window_key(series: str, labels: str, start: float) -> str:
    return f"{series}{SEP}{labels}{SEP}{round(start * 1000):015d}"


def split_window_key(key: str) -> tuple[str, str, float] | None:
    parts = str(key).split(SEP)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2]) / 1000


def _build_metric_index(state: Any) -> KeyIndex:
    idx = KeyIndex()
    for key in list(state.keys()):
        parsed = split_window_key(key)
        if parsed is not None:
            series, labels, start = parsed
            value = state.get(key) or {}
            idx.add(f"{series}{SEP}{labels}", start, key, float(value.get("last_ts", start)))
    return idx


def make_metrics_fold(interval_s: float, retention_s: float) -> Any:
    """The fold for one (interval, retention): both shape the state, so they are fixed
    per table (changing them means rebuilding the table)."""

    def apply(state: MutableMapping[str, Any], event: Event[Any]) -> None:
        p = event.payload
        if isinstance(p, MetricSample):
            fold_sample(
                state,
                p.series,
                p.labels,
                p.timestamp,
                p.value,
                interval_s=interval_s,
                retention_s=retention_s,
            )

    return apply


def fold_sample(
    state: MutableMapping[str, Any],
    series: str,
    labels: dict[str, str],
    ts: float,
    value: float,
    *,
    interval_s: float,
    retention_s: float,
) -> bool:
    """Add a sample to its window; False if it is already past retention for its group."""
    lk = labels_key(labels)
    group = f"{series}{SEP}{lk}"
    idx = index_for(METRICS_TABLE, state, _build_metric_index)
    newest = max(idx.newest(group), ts)
    start = math.floor(ts / interval_s) * interval_s
    # a window is retained while its end is within `retention_s` of the group's newest sample
    if start + interval_s <= newest - retention_s:
        return False
    key = window_key(series, lk, start)
    cur = state.get(key)
    if cur is None:
        state[key] = {
            "series": series,
            "labels": labels,
            "start": start,
            "end": start + interval_s,
            "count": 1,
            "sum": value,
            "min": value,
            "max": value,
            "last": value,
            "last_ts": ts,
        }
        idx.add(group, start, key, ts)
    else:
        total = float(cur["sum"]) + value
        if not math.isfinite(total):
            # two finite values can sum to inf, which the changelog's JSON writes as
            # null: the window would be unreadable after a restore. Refused (a dead
            # letter), the window as it was; the rebuild skips it alike.
            raise InvalidEvent(
                f"metric {series}: adding {value!r} to the window's sum {cur['sum']!r} overflows"
            )
        new = dict(cur)
        new["count"] = int(cur["count"]) + 1
        new["sum"] = total
        new["min"] = min(float(cur["min"]), value)
        new["max"] = max(float(cur["max"]), value)
        if ts >= float(cur["last_ts"]):
            new["last"], new["last_ts"] = value, ts
        state[key] = new
        g = idx.groups.get(group)
        if g is None:  # a window the index never saw (restored behind its back)
            idx.add(group, start, key, newest)
        else:
            g.newest = newest
    # expire windows with start + interval <= newest - retention (starts are multiples of
    # the interval, so a small epsilon turns the strict comparison into <=)
    for old in idx.expire(group, newest - retention_s - interval_s + 1e-6):
        state.pop(old, None)
    return True


# -- communication records -----------------------------------------------------------------
def record_key(agent_id: str, kind: str, ts: float, record_id: str) -> str:
    return f"r{SEP}{agent_id}{SEP}{kind}{SEP}{round(ts * 1000):015d}{SEP}{record_id}"


def count_key(agent_id: str) -> str:
    return f"c{SEP}{agent_id}"


def split_record_key(key: str) -> tuple[str, str, float, str] | None:
    parts = str(key).split(SEP)
    if len(parts) != 5 or parts[0] != "r" or not parts[3].isdigit():
        return None
    return parts[1], parts[2], int(parts[3]) / 1000, parts[4]


def _build_comms_index(state: Any) -> KeyIndex:
    idx = KeyIndex()
    for key in list(state.keys()):
        parsed = split_record_key(key)
        if parsed is not None:
            agent, _kind, ts, _rid = parsed
            idx.add(agent, ts, key)
    return idx


def make_comms_fold(retention_s: float) -> Any:
    def apply(state: MutableMapping[str, Any], event: Event[Any]) -> None:
        p = event.payload
        if isinstance(p, CommunicationRecord):
            fold_record(state, p, retention_s=retention_s)

    return apply


def fold_record(
    state: MutableMapping[str, Any], rec: CommunicationRecord, *, retention_s: float
) -> bool:
    """Store one record (idempotent by record id and time) and drop this agent's records
    that fell out of retention; False for a duplicate or an already-expired record."""
    ts = rec.recorded_at.timestamp()
    idx = index_for(COMMS_TABLE, state, _build_comms_index)
    newest = max(idx.newest(rec.agent_id), ts)
    if ts < newest - retention_s:
        return False
    key = record_key(rec.agent_id, rec.kind, ts, rec.record_id)
    if key in state:
        return False
    state[key] = {
        "record_id": rec.record_id,
        "kind": rec.kind,
        "agent_id": rec.agent_id,
        "counterparty": rec.counterparty,
        "recorded_at": ts,
        "amount": rec.amount,
        "unit": rec.unit,
        "details": rec.details,
    }
    idx.add(rec.agent_id, ts, key)
    counts = dict(state.get(count_key(rec.agent_id)) or {})
    counts[rec.kind] = int(counts.get(rec.kind, 0)) + 1
    for old in idx.expire(rec.agent_id, newest - retention_s):
        gone = state.pop(old, None)
        if gone is not None:
            k = str(gone["kind"])
            counts[k] = max(0, int(counts.get(k, 0)) - 1)
    state[count_key(rec.agent_id)] = counts
    return True


# -- registrations ---------------------------------------------------------------------------
_settings = get_settings()

HEARTBEATS = register(
    TableSpec(
        name=HEARTBEATS_TABLE,
        sources=(AGENT_HEARTBEATS, AGENT_STATUS),
        apply_at=apply_heartbeat_record,
        description="Last heartbeat and confirmed up/down status per agent",
        types=frozenset({Heartbeat.TYPE, AgentStatusChanged.TYPE}),
    )
)

METRICS = register(
    TableSpec(
        name=METRICS_TABLE,
        sources=(METRICS_SAMPLES,),
        apply=make_metrics_fold(
            _settings.metrics_collection_interval_s, _settings.metrics_retention_s
        ),
        description="count/sum/min/max/last per series, label set and collection window",
        types=frozenset({MetricSample.TYPE}),
    )
)

COMMS = register(
    TableSpec(
        name=COMMS_TABLE,
        sources=(COMMS_RECORDS,),
        apply=make_comms_fold(_settings.comms_retention_s),
        description="Communication records per agent and kind, with retained counts",
        types=frozenset({CommunicationRecord.TYPE}),
    )
)


# -- the live Faust tables ---------------------------------------------------------------------
def _table(name: str, help_: str) -> Any:
    import faust

    from agentstream.streams.app import app

    return app.Table(
        name,
        default=None,
        key_type=str,
        # the app's default serializers are raw bytes; table values are JSON
        schema=faust.Schema(key_type=str, key_serializer="json", value_serializer="json"),
        partitions=_settings.topic_partitions,
        help=help_,
    )


@lru_cache(maxsize=1)
def heartbeats_writer() -> TableWriter:
    return TableWriter(_table(HEARTBEATS.name, HEARTBEATS.description))


@lru_cache(maxsize=1)
def metrics_writer() -> TableWriter:
    return TableWriter(_table(METRICS.name, METRICS.description))


@lru_cache(maxsize=1)
def comms_writer() -> TableWriter:
    return TableWriter(_table(COMMS.name, COMMS.description))
