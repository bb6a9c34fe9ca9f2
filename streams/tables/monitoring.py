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

Bounds. A sender may invent an agent id, a series or a label set per record, and groups
that stop reporting have no newer record of their own to prune them: every table is
bounded per partition of its source by that partition's *clock*, the newest append time
(the broker's `LogAppendTime`, from the record's `Origin`) of a record whose fold stored
something. A group (agent, series and label set) not seen for its expiry by that clock
is deleted whole, and a record of a group the partition does not hold yet is refused
(`TableFull`, a dead letter) while it holds its maximum. The clock is a function of the
log, so a rebuild makes the same decisions; the indexes that make them cost O(1)
amortized per record (`HeartbeatIndex`, `Recency`) are derived from the table.

The agents fold into these Faust tables through a `TableWriter` (`streams.tables.writer`)
set to the partition of the *input record being folded* (``writer.at(partition)``):
they fold batches, where Faust's "current event" is just the last one of the batch.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

import orjson

from agentstream.schemas import (
    AgentStatusChanged,
    CommunicationRecord,
    Event,
    Heartbeat,
    MetricSample,
)
from agentstream.schemas.errors import InvalidEvent
from agentstream.streams.settings import get_settings
from agentstream.streams.tables import (
    Origin,
    TableSpec,
    TableWriter,
    home_partition,
    misplaced,
    refuse_misplaced,
    register,
)
from agentstream.streams.topics import (
    AGENT_HEARTBEATS,
    AGENT_STATUS,
    COMMS_RECORDS,
    METRICS_SAMPLES,
)

_I = TypeVar("_I")

SEP = "\x1f"  # cannot occur in series names, agent ids in practice, or JSON text

HEARTBEATS_TABLE = "agent_heartbeats"
METRICS_TABLE = "metric_windows"
COMMS_TABLE = "comms_records"


# -- heartbeats ---------------------------------------------------------------------------
class TableFull(InvalidEvent):
    """A record that would add a key (an agent id, a series and label set) to a partition
    of a table already holding its maximum of them: refused, a dead letter."""


class HeartbeatIndex:
    """Per heartbeats partition: its clock (the newest append time of a heartbeat stored),
    the agents with heartbeats in the order they were last seen, and the entries without
    heartbeats (statuses held for heartbeats not folded yet, or an older version's), by
    time. With them a fold drops what expired, and counts the agents, without scanning
    the table.

    The clock only moves forward and each heartbeat stores it as the agent's time, so the
    order of `seen` is the order of those times: the front is the first to expire. Derived
    data, like `KeyIndex`: built from the state on first use and again when the state
    changed behind the fold's back (`invalidate_indexes`)."""

    def __init__(self) -> None:
        self.clock: dict[int, float] = {}
        self.seen: dict[int, OrderedDict[str, float]] = {}
        self.loose: dict[int, list[tuple[float, str]]] = {}

    def order(self, partition: int) -> OrderedDict[str, float]:
        got = self.seen.get(partition)
        if got is None:
            got = self.seen[partition] = OrderedDict()
        return got

    def add_loose(self, partition: int, ts: float, agent_id: str) -> None:
        heapq.heappush(self.loose.setdefault(partition, []), (ts, agent_id))

    def agents(self, partition: int) -> int:
        """Agents with heartbeats in `partition` (what its bound counts)."""
        got = self.seen.get(partition)
        return len(got) if got is not None else 0


def _loose_time(rec: dict[str, Any]) -> float:
    """When an entry without heartbeats may expire: its time, or its first held status's
    (an entry owed its "down": when it was kept, `_expire_entry`)."""
    if rec.get("owed_since") is not None:
        return float(rec["owed_since"])
    last = rec.get("last_heartbeat_at")
    if last is not None:
        return float(last)
    held = rec.get("ahead") or []
    return float(held[0]["at"]) if held else -math.inf


def _build_heartbeat_index(state: Any) -> HeartbeatIndex:
    idx = HeartbeatIndex()
    stored: list[tuple[float, str, int]] = []
    for agent_id, rec in list(state.items()):
        if not isinstance(rec, dict):
            continue
        p = rec.get("partition")
        if p is None:  # an entry of a version that did not store its partition
            p = home_partition(agent_id, get_settings().topic_partitions)
        if (
            rec.get("offset") is not None
            and int(rec.get("beats", 0)) > 0
            and rec.get("owed_since") is None
        ):
            stored.append((float(rec["last_heartbeat_at"]), agent_id, int(p)))
        else:
            idx.add_loose(int(p), _loose_time(rec), agent_id)
    for ts, agent_id, p in sorted(stored):
        idx.order(p)[agent_id] = ts
        idx.clock[p] = max(idx.clock.get(p, -math.inf), ts)
    return idx


#: a record moves its partition's clock at most this fraction of the expiry (retention)
#: past the clock: see `advance_clock`
CLOCK_STEP = 0.1


def advance_clock(clock: float | None, at: float, step: float) -> float:
    """The partition's clock once a record appended at `at` is folded: `at` when it is
    later, but never more than `step` past the clock as it was.

    One record dated far ahead (a broker's clock stepping forward once, or a producer's
    own time on a topic still using CreateTime) would otherwise pin the clock there:
    every group of the partition expired at once, and every later record dated then.
    Bounded, one record moves the clock by `step` at most; records that keep coming
    at the new time move it on (a broker's clock that really moved, or a partition
    that was idle: it catches up in a few records). Only the clock and what was folded
    decide it, so a rebuild moves it the same way."""
    if clock is None or not math.isfinite(clock):
        return at
    return max(clock, min(at, clock + step))


def heartbeat_index(state: Any) -> HeartbeatIndex:
    return index_for(HEARTBEATS_TABLE, state, _build_heartbeat_index)


def _expire_heartbeats(
    state: MutableMapping[str, Any],
    idx: HeartbeatIndex,
    partition: int,
    now: float,
    cutoff: float,
    expired: list[tuple[str, dict[str, Any]]] | None,
) -> None:
    """Delete the entries of `partition` dated before `cutoff`: amortized O(1) per record
    (each entry is removed once), never a scan."""
    order = idx.seen.get(partition)
    while order:
        agent_id, ts = next(iter(order.items()))
        if ts >= cutoff:
            break
        gone = state.get(agent_id)
        if gone is not None:
            _expire_entry(state, idx, partition, now, cutoff, agent_id, gone, expired)
        order.popitem(last=False)
    heap = idx.loose.get(partition)
    while heap and heap[0][0] < cutoff:
        _ts, agent_id = heapq.heappop(heap)
        rec = state.get(agent_id)
        if rec is None or agent_id in idx.order(partition):
            continue  # gone already, or it has heartbeats now: dated in `seen`
        if _loose_time(rec) >= cutoff:
            continue  # a newer item of it is on the heap
        _expire_entry(state, idx, partition, now, cutoff, agent_id, rec, expired)


def _expire_entry(
    state: MutableMapping[str, Any],
    idx: HeartbeatIndex,
    partition: int,
    now: float,
    cutoff: float,
    agent_id: str,
    rec: dict[str, Any],
    expired: list[tuple[str, dict[str, Any]]] | None,
) -> None:
    """Delete an expired entry (a tombstone on the changelog). Statuses it held for
    heartbeats not folded yet that are still within the expiry are of a later life of
    the agent: they stay, in an entry without heartbeats (`fold_status`).

    An entry whose status is still "up" (the monitor was away longer than the expiry:
    its "down" was never decided) is kept instead, marked ``owed_since`` (the partition's
    clock then), outside the bound's count: the monitor publishes its "down" like any
    other's, and folding that "down" back deletes it (`fold_status`). In the table, not
    in memory, so a crash or a rebalance before it is published does not lose it, and a
    rebuild keeps it alike. A heartbeat of the agent makes it a new entry (first seen);
    if its "down" is not folded within another expiry, it goes for good."""
    held = [h for h in rec.get("ahead") or [] if float(h["at"]) >= cutoff]
    if rec.get("status") == "up" and rec.get("owed_since") is None:
        kept = {**rec, "owed_since": now, "partition": partition}
        kept.pop("ahead", None)
        if held:
            kept["ahead"] = held
        state[agent_id] = kept
        idx.add_loose(partition, float(kept["owed_since"]), agent_id)
        return
    if held:
        state[agent_id] = _held_entry(partition, held)
        idx.add_loose(partition, float(held[0]["at"]), agent_id)
    else:
        del state[agent_id]
    if expired is not None and int(rec.get("beats", 0)) > 0:
        expired.append((agent_id, rec))


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
    expire_s: float = math.inf,
    max_agents: int | None = None,
    expired: list[tuple[str, dict[str, Any]]] | None = None,
) -> bool:
    """Apply one heartbeat read at (`partition`, `offset`) and appended by the broker at
    `at`; False when it is not newer than the last one folded (a redelivery).

    Heartbeats are taken in log order, dated by the broker's append time: the sender's
    `sent_at` is kept as information only. A sender whose clock ran ahead and was set
    right is not ignored until its clock catches up, and a `sent_at` in the future keeps
    nobody up.

    Bounds, by the partition's clock (the newest append time stored, so the same in a
    rebuild): an entry not seen for `expire_s` is deleted (appended to `expired`, for
    the monitor), and a heartbeat of an agent the partition does not hold yet is refused
    (`TableFull`) while it holds `max_agents` agents."""
    idx = heartbeat_index(state)
    now = advance_clock(idx.clock.get(partition), at, expire_s * CLOCK_STEP)
    _expire_heartbeats(state, idx, partition, now, now - expire_s, expired)
    cur = state.get(agent_id)
    if cur is not None and cur.get("owed_since") is not None:
        # kept for its owed "down" only: a heartbeat starts a new life (first seen)
        held = cur.get("ahead")
        cur = _held_entry(partition, held) if held else None
    elif cur is not None and not _newer_heartbeat(cur, partition, offset, at):
        return False
    order = idx.order(partition)
    if agent_id not in order and max_agents is not None and len(order) >= max_agents:
        raise TableFull(
            f"heartbeat of {agent_id!r}: partition {partition} of the agent table holds "
            f"its maximum of {max_agents} agents (table full; "
            "AGENTSTREAM_HEARTBEAT_MAX_AGENTS_PER_PARTITION)",
            type=Heartbeat.TYPE,
        )
    beats = int(cur.get("beats", 0)) if cur is not None else 0
    if cur is None:
        cur = {"status": None, "status_changed_at": None, "reason": None, "info": {}}
    new = dict(cur)
    # the partition's clock, not `at`: the same as `at` while the broker's clock goes
    # forward, and it keeps `seen` in time order (the expiry's premise) if it is set back.
    # After a record dated ahead it can be ahead of the wall clock (by `CLOCK_STEP` of
    # the expiry at most): the monitor judges liveness by its own receipt time then.
    new["last_heartbeat_at"] = now
    new["sent_at"] = sent_at
    new["sequence"] = sequence
    new["beats"] = beats + 1
    if beats == 0 or new.get("first_seen_at") is None:
        new["first_seen_at"] = now
    new["partition"] = partition
    new["offset"] = offset
    if info:
        new["info"] = dict(info)
    elif "info" not in new:
        new["info"] = {}
    _settle_held(new)
    state[agent_id] = new
    moved = cur.get("partition")
    if moved is not None and moved != partition:  # the topic's partitions changed
        idx.order(int(moved)).pop(agent_id, None)
    order[agent_id] = now
    order.move_to_end(agent_id)
    idx.clock[partition] = now
    return True


def _newer_heartbeat(cur: dict[str, Any], partition: int, offset: int, at: float) -> bool:
    """Whether a heartbeat at (`partition`, `offset`, `at`) comes after the one `cur` holds:
    by offset in the same partition (exact, whatever the clocks), by append time across
    partitions."""
    last_offset = cur.get("offset")
    if last_offset is None:  # no heartbeat yet, or one folded by an older version
        return True
    if cur.get("partition") == partition:
        return offset > int(last_offset)
    return at > float(cur.get("last_heartbeat_at") or 0.0)


def fold_status(
    state: MutableMapping[str, Any],
    change: AgentStatusChanged,
    *,
    partition: int | None = None,
    expire_s: float = math.inf,
) -> bool:
    """Set the status `change` confirms; False when it is for an entry that expired.

    A status event is dated by the heartbeat it was decided on (`last_heartbeat_at`) and
    belongs to the entry that heartbeat is part of. Live, it is read after that heartbeat
    was folded. A rebuild merges the two topics by append time, which brokers' clocks
    apart can invert, and so can a worker that took a partition over (a changelog record
    lost in a crash: the heartbeat is folded again, after its status): the fold takes
    them in either order.

    * Dated before the entry's first heartbeat, it is of an earlier life of the agent
      (before the entry expired and a heartbeat made a new one): ignored; with no entry,
      so is one dated before what `partition`'s clock keeps.
    * Dated after the entry's last heartbeat (or with no entry), it is held (``ahead``)
      and applied when a heartbeat reaches its time; when the entry expires first, it
      is of a later life and stays held for it (`_expire_entry`)."""
    at = change.last_heartbeat_at.timestamp() if change.last_heartbeat_at else None
    status = {
        "status": change.current,
        "status_changed_at": change.changed_at.timestamp(),
        "reason": change.reason,
    }
    cur = state.get(change.agent_id)
    if cur is None:
        p = 0 if partition is None else partition
        idx = heartbeat_index(state)
        if at is None or at < idx.clock.get(p, -math.inf) - expire_s:
            return False
        state[change.agent_id] = _held_entry(p, [{**status, "at": at}])
        idx.add_loose(p, at, change.agent_id)
        return True
    first, last = cur.get("first_seen_at"), cur.get("last_heartbeat_at")
    if at is not None and first is not None and at < float(first):
        return False
    new = dict(cur)
    if at is None or (last is not None and at <= float(last)):
        new.update(status)
        if cur.get("owed_since") is not None and change.current == "down":
            # the "down" it was kept for: the entry goes (`_expire_entry`), but for
            # statuses it holds for a later life
            held = cur.get("ahead")
            if held:
                p = int(cur["partition"])
                state[change.agent_id] = _held_entry(p, held)
                heartbeat_index(state).add_loose(p, float(held[0]["at"]), change.agent_id)
            else:
                del state[change.agent_id]
            return True
    else:
        new["ahead"] = [*(cur.get("ahead") or []), {**status, "at": at}]
    state[change.agent_id] = new
    return True


def _held_entry(partition: int, held: list[dict[str, Any]]) -> dict[str, Any]:
    """An entry without heartbeats, holding status events for heartbeats not folded yet
    (only a rebuild, or a worker folding a heartbeat again after its status, makes one)."""
    return {
        "last_heartbeat_at": None,
        "sent_at": None,
        "sequence": 0,
        "beats": 0,
        "first_seen_at": None,
        "status": None,
        "status_changed_at": None,
        "reason": None,
        "info": {},
        "partition": partition,
        "offset": None,
        "ahead": held,
    }


def _settle_held(rec: dict[str, Any]) -> None:
    """Apply, in order, the statuses `rec` held whose heartbeat it has now; drop those
    dated before its first heartbeat (an earlier life's, whose heartbeats are behind)."""
    held = rec.get("ahead")
    if not held:
        return
    first, last = float(rec["first_seen_at"]), float(rec["last_heartbeat_at"])
    keep = []
    for h in held:
        if float(h["at"]) < first:
            continue
        if float(h["at"]) <= last:
            rec.update({k: v for k, v in h.items() if k != "at"})
        else:
            keep.append(h)
    if keep:
        rec["ahead"] = keep
    else:
        del rec["ahead"]


HEARTBEATS_KEYED_BY = "agent.heartbeats is keyed by the agent id"


def misplaced_heartbeat(agent_id: str, origin: Origin) -> str | None:
    """`misplaced` for a heartbeat of `agent_id`."""
    return misplaced(f"heartbeat of {agent_id!r}", agent_id, origin, HEARTBEATS_KEYED_BY)


def fold_heartbeat_record(
    state: MutableMapping[str, Any],
    beat: Heartbeat,
    origin: Origin,
    *,
    expire_s: float = math.inf,
    max_agents: int | None = None,
    expired: list[tuple[str, dict[str, Any]]] | None = None,
) -> bool:
    """`fold_heartbeat` of the heartbeat `beat` read at `origin`; `InvalidEvent` (a dead
    letter, the table unchanged) when it is misplaced (`misplaced_heartbeat`)."""
    refuse_misplaced(
        f"heartbeat of {beat.agent_id!r}",
        beat.agent_id,
        origin,
        HEARTBEATS_KEYED_BY,
        Heartbeat.TYPE,
    )
    return fold_heartbeat(
        state,
        beat.agent_id,
        at=origin.timestamp,
        partition=origin.partition,
        offset=origin.offset,
        sent_at=beat.sent_at.timestamp(),
        sequence=beat.sequence,
        info=beat.info,
        expire_s=expire_s,
        max_agents=max_agents,
        expired=expired,
    )


def fold_status_record(
    state: MutableMapping[str, Any],
    change: AgentStatusChanged,
    origin: Origin,
    *,
    expire_s: float = math.inf,
) -> bool:
    """`fold_status` of a status event read at `origin`: its agent's heartbeats partition
    is where the agent id hashes to (`misplaced_heartbeat` holds them to it)."""
    return fold_status(
        state,
        change,
        partition=home_partition(change.agent_id, origin.partitions),
        expire_s=expire_s,
    )


def make_heartbeat_fold(expire_s: float, max_agents: int | None) -> Any:
    """The fold of `agent_heartbeats` for an expiry and a bound (they shape the table:
    the live monitor folds with the same, `HeartbeatMonitor`)."""

    def apply(state: MutableMapping[str, Any], event: Event[Any], origin: Origin) -> None:
        p = event.payload
        if isinstance(p, Heartbeat):
            fold_heartbeat_record(state, p, origin, expire_s=expire_s, max_agents=max_agents)
        elif isinstance(p, AgentStatusChanged):
            fold_status_record(state, p, origin, expire_s=expire_s)

    return apply


# -- time-ordered key index (pruning by event time) ----------------------------------------
@dataclass
class _Group:
    newest: float = -math.inf
    heap: list[tuple[float, str]] = field(default_factory=list)
    #: the source partition the group's newest record was read from (None: written by a
    #: version of the fold that did not store it)
    partition: int | None = None


class Recency:
    """Per partition of a source topic: its clock — the newest append time of a record
    whose fold stored something — and its groups (series and label sets, agents) in the
    order they were last seen, each with that time. The clock only moves forward and is
    what a group's time is set to, so that order is the order of their times: the front
    is the first to expire. Groups whose entries carry no append time (written before
    the tables stored one) wait in a heap, by their event time, until they are seen."""

    def __init__(self) -> None:
        self.clock: dict[int, float] = {}
        self.seen: dict[int, OrderedDict[str, float]] = {}
        self.old: dict[int, list[tuple[float, str]]] = {}

    def now(self, partition: int, at: float, step: float = math.inf) -> float:
        """The partition's clock once a record appended at `at` is folded
        (`advance_clock`: at most `step` past the clock as it was)."""
        return advance_clock(self.clock.get(partition), at, step)

    def count(self, partition: int) -> int:
        got = self.seen.get(partition)
        return len(got) if got is not None else 0

    def touch(self, partition: int, group: str, now: float, was: int | None = None) -> None:
        if was is not None and was != partition:  # read from another partition before
            self.seen.get(was, OrderedDict()).pop(group, None)
        order = self.seen.get(partition)
        if order is None:
            order = self.seen[partition] = OrderedDict()
        order[group] = now
        order.move_to_end(group)
        self.clock[partition] = now

    def due(self, partition: int, cutoff: float) -> list[str]:
        """Pop the groups of `partition` last seen before `cutoff`: amortized O(1) per
        record (each group leaves once), never a scan."""
        out = []
        order = self.seen.get(partition)
        while order:
            group, ts = next(iter(order.items()))
            if ts >= cutoff:
                break
            order.popitem(last=False)
            out.append(group)
        heap = self.old.get(partition)
        while heap and heap[0][0] < cutoff:
            _ts, group = heapq.heappop(heap)
            # not seen since it was indexed, in this partition or any other (one read
            # from another partition since is dated there, by that partition's clock)
            if not any(group in seen for seen in self.seen.values()):
                out.append(group)
        return out


class KeyIndex:
    """Per group (series+labels, or agent): the keys of the state ordered by time, so a
    fold can drop what falls out of retention without scanning the state; and per
    source partition the groups' `Recency`, so that it can drop a group that stopped
    reporting, and count them.

    It is derived data: built from the state on first use and rebuilt when the state
    changed behind the fold's back (a Faust table restored from its changelog after a
    rebalance — the agent calls `invalidate`).
    """

    def __init__(self) -> None:
        self.groups: dict[str, _Group] = {}
        self.recency = Recency()

    def admit(
        self,
        state: MutableMapping[str, Any],
        group: str,
        partition: int,
        at: float,
        retention_s: float,
        cap: int | None,
        full: Callable[[], Exception],
        dropped: Callable[[str], object] | None = None,
    ) -> float:
        """Before a record of `group` appended at `at` to `partition` is folded: the
        partition's clock once it is (`advance_clock`), after deleting the partition's
        groups not seen for `retention_s` by that clock (`dropped` is told each one).
        Raises `full()` if the partition does not hold `group` and already holds `cap`
        groups: new groups are refused rather than the oldest evicted (docs/monitoring.md)."""
        now = self.recency.now(partition, at, retention_s * CLOCK_STEP)
        for gone in self.recency.due(partition, now - retention_s):
            self.drop(state, gone)
            if dropped is not None:
                dropped(gone)
        if (
            cap is not None
            and not self.held(group, partition)
            and self.recency.count(partition) >= cap
        ):
            raise full()
        return now

    def drop(self, state: MutableMapping[str, Any], group: str) -> list[str]:
        """Delete every key of `group` from `state` (tombstones) and forget the group;
        returns the keys."""
        g = self.groups.pop(group, None)
        keys = [key for _ts, key in g.heap] if g is not None else []
        for key in keys:
            state.pop(key, None)
        return keys

    def seen_from(
        self,
        entries: list[tuple[str, int | None, float | None, float, int]],
    ) -> None:
        """Fill `recency` from (group, partition, appended-at, event time, default
        partition) of every entry, at a build."""
        best: dict[str, tuple[float, int]] = {}
        old: dict[str, tuple[float, int]] = {}
        for group, partition, appended, event_ts, home in entries:
            if partition is not None and appended is not None:
                if group not in best or appended > best[group][0]:
                    best[group] = (appended, partition)
            elif group not in old or event_ts > old[group][0]:
                old[group] = (event_ts, home)
        for group, (ts, p) in sorted(best.items(), key=lambda kv: (kv[1][0], kv[0])):
            self.recency.touch(p, group, ts)
            self.groups[group].partition = p
        for group, (ts, p) in old.items():
            if group not in best:
                heapq.heappush(self.recency.old.setdefault(p, []), (ts, group))
                self.groups[group].partition = p

    def add(self, group: str, ts: float, key: str, newest: float | None = None) -> _Group:
        """Index `key` under time `ts`; `newest` (default `ts`) advances the group's
        newest event time."""
        g = self.groups.get(group)
        if g is None:
            g = self.groups[group] = _Group()
        heapq.heappush(g.heap, (ts, key))
        g.newest = max(g.newest, ts if newest is None else newest)
        return g

    def held(self, group: str, partition: int) -> bool:
        """Whether `partition` holds `group` (counted in its bound): a group held by
        another partition that is now read from this one is new to it."""
        g = self.groups.get(group)
        return g is not None and g.partition == partition

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


_INDEXES: dict[tuple[str, int], tuple[Any, Any]] = {}


def index_for(kind: str, state: Any, build: Callable[[Any], _I]) -> _I:
    """The index of `state` (a `KeyIndex`, a `HeartbeatIndex`; cached by identity, holding
    a reference so ids are not reused); `build(state)` makes one from scratch."""
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
    entries = []
    partitions = get_settings().topic_partitions
    for key in list(state.keys()):
        parsed = split_window_key(key)
        if parsed is not None:
            series, labels, start = parsed
            value = state.get(key) or {}
            group = f"{series}{SEP}{labels}"
            last_ts = float(value.get("last_ts", start))
            idx.add(group, start, key, last_ts)
            entries.append(
                (
                    group,
                    value.get("partition"),
                    value.get("appended_at"),
                    last_ts,
                    home_partition(series, partitions),
                )
            )
    idx.seen_from(entries)
    return idx


def make_metrics_fold(interval_s: float, retention_s: float, max_series: int | None = None) -> Any:
    """The fold for one (interval, retention, bound): they shape the state, so they are
    fixed per table (changing them means rebuilding the table)."""

    def apply(state: MutableMapping[str, Any], event: Event[Any], origin: Origin) -> None:
        p = event.payload
        if isinstance(p, MetricSample):
            fold_sample_record(
                state,
                p,
                origin,
                interval_s=interval_s,
                retention_s=retention_s,
                max_series=max_series,
            )

    return apply


def fold_sample_record(
    state: MutableMapping[str, Any],
    sample: MetricSample,
    origin: Origin,
    *,
    interval_s: float,
    retention_s: float,
    max_series: int | None = None,
) -> bool:
    """`fold_sample` of the sample read at `origin`; `InvalidEvent` (a dead letter, the
    table unchanged) when it is not under its series' key in that key's partition
    (`misplaced`)."""
    refuse_misplaced(
        f"metric sample of {sample.series!r}",
        sample.series,
        origin,
        "metrics.samples is keyed by the series",
        MetricSample.TYPE,
    )
    return fold_sample(
        state,
        sample.series,
        sample.labels,
        sample.timestamp,
        sample.value,
        interval_s=interval_s,
        retention_s=retention_s,
        at=origin.timestamp,
        partition=origin.partition,
        max_series=max_series,
    )


def fold_sample(
    state: MutableMapping[str, Any],
    series: str,
    labels: dict[str, str],
    ts: float,
    value: float,
    *,
    interval_s: float,
    retention_s: float,
    at: float | None = None,
    partition: int | None = None,
    max_series: int | None = None,
) -> bool:
    """Add a sample to its window; False if it is already past retention for its group.

    With the record's append time `at` and `partition`: a series and label set of that
    partition not seen for `retention_s` by the partition's clock (its newest append
    time folded) is deleted whole — a group that stopped reporting has no newer sample
    of its own to prune it —, and a sample of a group the table does not hold is
    refused (`TableFull`) while the partition holds `max_series` groups."""
    lk = labels_key(labels)
    group = f"{series}{SEP}{lk}"
    idx = index_for(METRICS_TABLE, state, _build_metric_index)
    now = -math.inf
    if at is not None and partition is not None:
        now = idx.admit(
            state,
            group,
            partition,
            at,
            retention_s,
            max_series,
            lambda: TableFull(
                f"metric {series} {lk}: partition {partition} of the metrics table holds "
                f"its maximum of {max_series} series and label sets (table full; "
                "AGENTSTREAM_METRICS_MAX_SERIES_PER_PARTITION)",
                type=MetricSample.TYPE,
            ),
        )
    newest = max(idx.newest(group), ts)
    start = math.floor(ts / interval_s) * interval_s
    # a window is retained while its end is within `retention_s` of the group's newest sample
    if start + interval_s <= newest - retention_s:
        return False
    key = window_key(series, lk, start)
    cur = state.get(key)
    seen = {"partition": partition, "appended_at": now} if partition is not None else {}
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
            **seen,
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
        new.update(seen)
        state[key] = new
        g = idx.groups.get(group)
        if g is None:  # a window the index never saw (restored behind its back)
            idx.add(group, start, key, newest)
        else:
            g.newest = newest
    if partition is not None:
        g = idx.groups[group]
        idx.recency.touch(partition, group, now, g.partition)
        g.partition = partition
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
    entries = []
    partitions = get_settings().topic_partitions
    for key in list(state.keys()):
        parsed = split_record_key(key)
        if parsed is not None:
            agent, _kind, ts, _rid = parsed
            idx.add(agent, ts, key)
            value = state.get(key) or {}
            entries.append(
                (
                    agent,
                    value.get("partition"),
                    value.get("appended_at"),
                    ts,
                    home_partition(agent, partitions),
                )
            )
    idx.seen_from(entries)
    return idx


def make_comms_fold(retention_s: float, max_agents: int | None = None) -> Any:
    def apply(state: MutableMapping[str, Any], event: Event[Any], origin: Origin) -> None:
        p = event.payload
        if isinstance(p, CommunicationRecord):
            fold_comms_record(state, p, origin, retention_s=retention_s, max_agents=max_agents)

    return apply


def fold_comms_record(
    state: MutableMapping[str, Any],
    rec: CommunicationRecord,
    origin: Origin,
    *,
    retention_s: float,
    max_agents: int | None = None,
) -> bool:
    """`fold_record` of the record read at `origin`; `InvalidEvent` (a dead letter, the
    table unchanged) when it is not under its agent's key in that key's partition
    (`misplaced`)."""
    refuse_misplaced(
        f"communication record of {rec.agent_id!r}",
        rec.agent_id,
        origin,
        "comms.records is keyed by the agent id",
        CommunicationRecord.TYPE,
    )
    return fold_record(
        state,
        rec,
        retention_s=retention_s,
        at=origin.timestamp,
        partition=origin.partition,
        max_agents=max_agents,
    )


def fold_record(
    state: MutableMapping[str, Any],
    rec: CommunicationRecord,
    *,
    retention_s: float,
    at: float | None = None,
    partition: int | None = None,
    max_agents: int | None = None,
) -> bool:
    """Store one record (idempotent by record id and time) and drop this agent's records
    that fell out of retention; False for a duplicate or an already-expired record.

    With the record's append time `at` and `partition`: an agent of that partition with
    no record for `retention_s` by the partition's clock (its newest append time
    folded) is deleted whole, records and counts — an agent that stopped sending has no
    newer record of its own to prune them —, and a record of an agent the table does
    not hold is refused (`TableFull`) while the partition holds `max_agents` agents."""
    ts = rec.recorded_at.timestamp()
    idx = index_for(COMMS_TABLE, state, _build_comms_index)
    now = -math.inf
    if at is not None and partition is not None:
        now = idx.admit(
            state,
            rec.agent_id,
            partition,
            at,
            retention_s,
            max_agents,
            lambda: TableFull(
                f"communication record of {rec.agent_id!r}: partition {partition} of the "
                f"comms table holds its maximum of {max_agents} agents (table full; "
                "AGENTSTREAM_COMMS_MAX_AGENTS_PER_PARTITION)",
                type=CommunicationRecord.TYPE,
            ),
            # an agent's counts go with its records
            dropped=lambda gone: state.pop(count_key(gone), None),
        )
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
        **({"partition": partition, "appended_at": now} if partition is not None else {}),
    }
    g = idx.add(rec.agent_id, ts, key)
    if partition is not None:
        idx.recency.touch(partition, rec.agent_id, now, g.partition)
        g.partition = partition
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
        apply_at=make_heartbeat_fold(
            _settings.heartbeat_expire_s, _settings.heartbeat_max_agents_per_partition
        ),
        description="Last heartbeat and confirmed up/down status per agent",
        types=frozenset({Heartbeat.TYPE, AgentStatusChanged.TYPE}),
    )
)

METRICS = register(
    TableSpec(
        name=METRICS_TABLE,
        sources=(METRICS_SAMPLES,),
        apply_at=make_metrics_fold(
            _settings.metrics_collection_interval_s,
            _settings.metrics_retention_s,
            _settings.metrics_max_series_per_partition,
        ),
        description="count/sum/min/max/last per series, label set and collection window",
        types=frozenset({MetricSample.TYPE}),
    )
)

COMMS = register(
    TableSpec(
        name=COMMS_TABLE,
        sources=(COMMS_RECORDS,),
        apply_at=make_comms_fold(
            _settings.comms_retention_s, _settings.comms_max_agents_per_partition
        ),
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
