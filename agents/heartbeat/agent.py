"""track_heartbeats: folds `agent.heartbeats` and `agent.status` into the heartbeat
table; a timer every `heartbeat_interval_s` publishes one `AgentStatusChanged` per
transition (see `monitor.py` for the rules).

Restarts and rebalances: after partitions are (re)assigned the monitor decides nothing
until this worker has folded both topics up to the end offsets they had at assignment.
Until then the table may lack a transition this worker (or the previous owner) already
published, or heartbeats still waiting in the backlog — deciding early is how duplicates
and false "down"s happen.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from faust.types import TP

from agentstream.agents.heartbeat.monitor import HeartbeatMonitor, Transition, to_event_payload
from agentstream.schemas import AgentStatusChanged, Event, Heartbeat
from agentstream.schemas.errors import InvalidEvent
from agentstream.streams.app import app, settings
from agentstream.streams.delivery import HANDED_MARKS, marks_key
from agentstream.streams.health import register_check
from agentstream.streams.observability import AGENTS, Throttled
from agentstream.streams.processing import (
    Inbound,
    dead_letter,
    decoded_batches,
    emit,
    guarded,
    refuse_table_full,
)
from agentstream.streams.tables import home_partition, origin_of
from agentstream.streams.tables.monitoring import (
    HEARTBEATS_TABLE,
    TableFull,
    heartbeats_writer,
    invalidate_indexes,
)
from agentstream.streams.topics import AGENT_HEARTBEATS, AGENT_STATUS

log = logging.getLogger(__name__)

CONSUMER = "track_heartbeats"
HEARTBEATS_TOPIC = settings.topic(AGENT_HEARTBEATS)
STATUS_TOPIC = settings.topic(AGENT_STATUS)

writer = heartbeats_writer()
monitor = HeartbeatMonitor(
    writer,
    interval_s=settings.heartbeat_interval_s,
    timeout_s=settings.heartbeat_timeout_s,
    max_missed=settings.heartbeat_max_missed,
    expire_s=settings.heartbeat_expire_s,
    max_agents=settings.heartbeat_max_agents_per_partition,
)
#: one WARNING a minute, at most, for heartbeats refused because the table is full
full_warning = Throttled(log)

source = app.topic(
    HEARTBEATS_TOPIC,
    STATUS_TOPIC,
    key_serializer="raw",
    value_serializer="raw",
    internal=False,
)


class CatchUpGate:
    """Open once every assigned partition of both topics has been folded up to the end
    offset it had when the gate (re)started.

    A partition is folded to its end when its last record was folded (or committed), or
    — as a topic written in transactions ends in a transaction marker that no
    `read_committed` consumer receives (the monitor's own `agent.status` under
    exactly-once) — when the consumer's position has passed the end, nothing is on its
    way to the agent (its stream queue empty, no fetched batch being handed over), every
    record handed to the agent is folded or committed, and all of that was so at the
    previous check too (a batch still being formed is in no queue and not yet handed)."""

    def __init__(self, topics: tuple[str, ...]) -> None:
        self.topics = topics
        self.open = False
        self.targets: dict[tuple[str, int], int] | None = None
        self.folded: dict[tuple[str, int], int] = {}
        #: the agent's stream (`watch`), for what is still on its way to it
        self.stream: Any = None
        #: what `_read_to_end` saw at the previous check
        self._seen: list[tuple[Any, ...]] | None = None

    def watch(self, stream: Any) -> None:
        self.stream = stream

    def reset(self) -> None:
        self.open = False
        self.targets = None
        self._seen = None
        self._resets += 1

    #: resets so far: a check that awaited across one drops what it found (targets of the
    #: old assignment would open the gate early)
    _resets = 0

    def note(self, topic: str, partition: int, offset: int) -> None:
        key = (topic, partition)
        if offset > self.folded.get(key, -1):
            self.folded[key] = offset

    async def check(self) -> bool:
        if self.open:
            return True
        if app.rebalancing or not app.tables.recovery.completed.is_set():
            return False
        tps = [tp for tp in app.assignor.assigned_actives() if tp.topic in self.topics]
        if not tps:
            # nothing of either topic assigned here (more workers than partitions): no
            # agent to catch up on; closed, its /ready said "catching up" for good and the
            # cluster-wide `deciding` stayed false. An assignment resets it.
            self.open = True
            log.info("heartbeat monitor holds no partition: nothing to catch up on")
            return True
        if self.targets is None:
            resets = self._resets
            try:
                ends = await app.consumer.highwaters(*tps)
                starts = await app.consumer.earliest_offsets(*tps)
            except Exception as exc:  # the broker away: the timer asks again (a raise
                # in a timer crashes the worker)
                log.info("heartbeat monitor: end offsets unavailable: %r", exc)
                return False
            if resets != self._resets:
                return False  # reassigned meanwhile: these ends are the old assignment's
            self.targets = {
                (tp.topic, tp.partition): int(end)
                for tp, end in ends.items()
                if end is not None and int(end) > int(starts.get(tp) or 0)
            }
        committed = getattr(app.consumer, "_committed_offset", {})
        short: list[tuple[TP, int, int]] = []
        for (topic, partition), end in self.targets.items():
            done = self.folded.get((topic, partition), -1)
            for tp, off in list(committed.items()):
                if tp.topic == topic and tp.partition == partition and off is not None:
                    done = max(done, int(off) - 1)
            if done < end - 1:
                short.append((TP(topic, partition), end, done))
        resets = self._resets
        if short and not await self._read_to_end(short):
            return False
        if resets != self._resets:
            return False  # reassigned while the positions were read
        self.open = True
        log.info("heartbeat monitor caught up on %d partition(s): deciding", len(self.targets))
        return True

    async def _read_to_end(self, short: list[tuple[TP, int, int]]) -> bool:
        """Whether the partitions in `short` ((tp, end, done)), whose last offsets were
        not folded, are read to their ends all the same (the class docstring)."""
        stream, consumer = self.stream, app.consumer
        if stream is None:
            return False
        queue = stream.channel.queue

        def in_flight() -> bool:
            return not queue.empty() or bool(getattr(consumer, "_handing_over", False))

        if in_flight():
            self._seen = None
            return False
        handed = HANDED_MARKS.get(marks_key(stream)) or {}
        seen: list[tuple[Any, ...]] = []
        for tp, end, done in short:
            mark = handed.get(tp)
            last_handed = mark[1] if mark is not None else -1
            if done < last_handed:
                self._seen = None
                return False  # handed to the agent, not yet folded
            try:
                position = await consumer.position(tp)
            except Exception:  # a rebalance or the broker away: asked again next time
                position = None
            if position is None or position < end:
                self._seen = None
                return False
            seen.append((tp, last_handed, done))
        if in_flight():
            self._seen = None
            return False
        settled, self._seen = seen == self._seen, seen
        return settled


gate = CatchUpGate((HEARTBEATS_TOPIC, STATUS_TOPIC))
#: per heartbeats partition: the newest record timestamp folded (how far the stream got)
_watermark: dict[int, float] = {}


@app.on_partitions_revoked.connect
async def _on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
    gate.reset()
    monitor.reset_pending()


@app.on_partitions_assigned.connect
async def _on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
    gate.reset()
    monitor.reset_pending()
    invalidate_indexes(writer)


@app.on_rebalance_complete.connect
async def _on_restored(sender: Any, **kwargs: Any) -> None:
    # the table was restored from its changelog (after the assignment, where a batch
    # still folding may have rebuilt the expiry index from the partial table): stale
    invalidate_indexes(writer)


@app.agent(source, name=CONSUMER)
async def track_heartbeats(stream: Any) -> None:
    gate.watch(stream)
    async for batch in decoded_batches(
        stream, consumer=CONSUMER, accept=[Heartbeat.TYPE, AgentStatusChanged.TYPE]
    ):
        for inbound in batch:
            await guarded(inbound, CONSUMER, _fold)


def advance_watermark(
    marks: dict[int, float], partition: int, record_ts: float | None, now: float
) -> None:
    """Move `partition`'s watermark (the newest record folded) to `record_ts`, taken no
    later than `now`: a record's timestamp is its producer's (CreateTime), and one dated
    ahead would pin the watermark in the future, where the lag check's horizon (never
    past now) stops protecting that partition's agents from a false "down"."""
    if record_ts:
        ts = min(float(record_ts), now)
        if ts > marks.get(partition, 0.0):
            marks[partition] = ts


async def _fold(inbound: Inbound) -> None:
    msg = inbound.message
    payload = inbound.event.payload
    writer.at(msg.partition)  # the monitor folds into `writer`
    if isinstance(payload, Heartbeat):
        if msg.topic != HEARTBEATS_TOPIC:
            raise InvalidEvent(f"a heartbeat does not belong on {msg.topic}", type=Heartbeat.TYPE)
        refused: InvalidEvent | None = None
        try:
            accepted = monitor.record(payload, origin_of(msg, AGENT_HEARTBEATS))
        except InvalidEvent as exc:  # the table as it was
            accepted, refused = False, exc
        gate.note(msg.topic, msg.partition, msg.offset)
        advance_watermark(_watermark, msg.partition, msg.timestamp, time.time())
        if refused is not None:
            # what a sender chose (its key, its partition, a new agent id in a full
            # table): a dead letter saying why, without the traceback `guarded` logs for
            # a failure of ours
            if isinstance(refused, TableFull):
                what = "heartbeats of new agent ids"
                await refuse_table_full(
                    msg, refused, CONSUMER, HEARTBEATS_TABLE, what, full_warning
                )
            else:
                await dead_letter(msg, refused, CONSUMER)
            return
        if accepted and gate.open:
            tr = monitor.evaluate(payload.agent_id, allow_down=False)
            if tr is not None:
                await _publish([tr], inbound.event)
    else:
        if msg.topic != STATUS_TOPIC:
            raise InvalidEvent(
                f"a status change does not belong on {msg.topic}", type=AgentStatusChanged.TYPE
            )
        monitor.record_status(payload, origin_of(msg, AGENT_STATUS))
        gate.note(msg.topic, msg.partition, msg.offset)


async def _publish(transitions: list[Transition], cause: Event[Any] | None = None) -> None:
    for i, tr in enumerate(transitions):
        payload = to_event_payload(tr)
        event = (
            cause.caused(payload, source=CONSUMER) if cause else Event.of(payload, source=CONSUMER)
        )
        try:
            await emit(AGENT_STATUS, event)
        except Exception:
            monitor.cancel(transitions[i:])
            raise


def _owned_filter() -> Any:
    """Agents whose partition this worker owns (standby copies are someone else's job)."""
    actives = {
        tp.partition for tp in app.assignor.assigned_actives() if tp.topic == HEARTBEATS_TOPIC
    }
    n = app.consumer.topic_partitions(HEARTBEATS_TOPIC) or settings.topic_partitions

    def owned(agent_id: str) -> bool:
        return _partition(agent_id, n) in actives

    return owned


def _partition(agent_id: str, n: int) -> int:
    """The heartbeats partition `agent_id`'s entry was folded from (for an agent no longer
    in the table, owed a "down": where its heartbeats go, murmur2 of the id)."""
    rec = writer.get(agent_id)
    p = rec.get("partition") if rec else None
    return int(p) if p is not None else home_partition(agent_id, n)


def _horizon_filter(now: float) -> Any:
    """A lagging partition may hold newer heartbeats not folded yet: there "silent"
    only counts up to the newest record folded (its watermark), not up to now."""
    horizons: dict[int, float | None] = {}
    for p in {
        tp.partition for tp in app.assignor.assigned_actives() if tp.topic == HEARTBEATS_TOPIC
    }:
        try:
            high = app.consumer.highwater(TP(HEARTBEATS_TOPIC, p))
        except Exception:  # no fetch for this partition yet
            high = None
        folded = gate.folded.get((HEARTBEATS_TOPIC, p), -1)
        lagging = high is not None and folded < int(high) - 1
        horizons[p] = min(now, _watermark.get(p, float("-inf"))) if lagging else None

    n = app.consumer.topic_partitions(HEARTBEATS_TOPIC) or settings.topic_partitions

    def horizon(agent_id: str) -> float | None:
        return horizons.get(_partition(agent_id, n))

    return horizon


@app.timer(settings.heartbeat_interval_s, name="check_heartbeats")
async def check_heartbeats() -> None:
    if not await gate.check():
        return
    started = time.perf_counter()
    now = time.time()
    transitions = monitor.check(now, owned=_owned_filter(), horizon=_horizon_filter(now))
    if transitions:
        await _publish(transitions)
    counts = monitor.counts()
    AGENTS.labels("up").set(counts["up"])
    AGENTS.labels("down").set(counts["down"])
    elapsed = time.perf_counter() - started
    if elapsed > settings.heartbeat_interval_s / 2:
        log.warning("heartbeat check took %.3fs for %d agents", elapsed, len(writer))


async def _agents_check() -> tuple[Any, str]:
    if not gate.open:
        return "degraded", "heartbeat monitor catching up after (re)assignment"
    counts = monitor.counts()
    if counts["down"]:
        return "degraded", f"{counts['down']} agent(s) down, {counts['up']} up"
    return "ok", f"{counts['up']} agent(s) up"


register_check("agents", _agents_check)
