"""The delivery core: how fetched records reach the agents, and when their input
offsets may be committed.

`streams.app` builds the worker's Faust app from the classes here; the agent side
(batches, `emit`, `guarded`, abandoning a batch) is `streams.processing`, the
exactly-once commit gate `streams.eos`. Terms: a record is *acked* once Faust may commit
its offset (`Event.ack`); a batch is *taken* when an agent's batch iterator hands it out;
under exactly-once a batch is *stale* when it was taken before the last revoke or in an
earlier consumer generation.

Records reach an agent by one of two paths (`AGENTSTREAM_DELIVERY`). The native path,
the default, hands the records of each fetch to the one agent of their topic as lists
(`BatchDeliveryConsumer._deliver_native`, `NativeChannel`; the agent side is
`streams.processing._native_batches`). The per-record path, for every other topic
(changelogs, a topic several agents read, a stream's of several topics, an agent's of
several instances) and for all of them under
``AGENTSTREAM_DELIVERY=per-record``, is Faust's: one `Event` per record through the
conductor. The invariants below hold on both; docs/design/batch-delivery.md restates
them for a list.

Invariants (every change here must keep them)
---------------------------------------------
Commits

1. An input offset may be committed only once its record is acked, and a record is
   acked only when the agent that took its batch comes back for the next one: the batch
   is finished (`streams.processing.event_batches`). A batch its agent left by an
   exception, and a stale batch, are never acked. A record an agent holds past its
   batch (`HOLDS`: an LLM request until its final response is out) is acked by its
   holder, and no commit passes the lowest offset still held in its partition
   (`BatchDeliveryConsumer._new_offset`: Faust's own check lets a commit pass one
   unacked record at a partition's head, and any number before its first commit).
   A revoke forgets the holds of the revoked partitions (their holders are cancelled).
2. No offset is committed after an undelivered output or an abandoned batch. An output
   the broker refused (`delivery_failed`, from the producer's future: `emit`,
   `watch_delivery`) or a batch abandoned without a revoke (9) or the worker's stop (10)
   to explain it (`processing_failed`) goes into `DELIVERY_FAILURES`; from then on this
   process commits nothing (`BatchDeliveryConsumer._commit`, `commit`, the revoke's
   commit) and crashes (`app.crash`), and its restart consumes again from the last
   committed offsets. `refuse_commits` stops the commits without crashing.
3. Exactly-once commits only between batches (`BatchDeliveryConsumer.commit`): new
   batches wait at `streams.eos.GATE`, the batches in progress finish and are acked
   within `EOS_COMMIT_WAIT_S` (else the commit is skipped: a later one catches up),
   pending table records are handed to the producer, then Faust commits. A transaction
   commits a batch's outputs together with its offsets, or neither.
4. A commit this worker made is never forgotten: `_commit_offsets` keeps, per assigned
   partition, the highest offset it committed, and `perform_seek` never sets Faust's
   committed offset below it (under exactly-once the broker shows a transaction's
   offsets only once its markers are written).

Records in flight

5. A record dropped before an agent took it is fetched again: records `getmany` drops
   (partition paused, flow stopped or generation changed while the fetch waited) or the
   native path does not take from the fetch for the same reasons (G1-G4), the
   rest of a batch whose delivery was cancelled (rebalance, stop, crash), what a
   flow-control clear empties from the stream queues (6), and records an agent skips
   (old generation, flow suspended) go to `BatchDeliveryConsumer.refetch`. Before its
   next fetch the consumer seeks each partition still assigned back to the lowest such
   offset, never forward and never below the partition's committed offset, which was
   committed as done since (`_seek_back_to_dropped`); changelog partitions keep their
   own positions. Why: aiokafka's seek to committed skips a partition with no commit
   yet.
6. A flow-control clear (`RefetchingFlowControl.clear`, on every `flow_control.resume()`)
   empties the agents' queues and the native channels, and refetches what they held
   (5). The record being
   delivered meanwhile lands in a queue after the clear: it is marked stale
   (`STALE_DELIVERIES`), dropped unacked by its agent and refetched too. Batches that
   agents already took are not touched.
7. A refetch (5) or a seek to the committed offsets (`perform_seek`, run by recovery)
   bumps the refetch epoch. The delivery under way (`_deliver`) then stops: the record
   handed over across the bump and the rest of its batch are refetched, and that record
   does not set the read offset (the seek did). Nothing fetched before a seek is
   delivered after it: a batch is delivered only in the epoch its fetch was issued in
   (a fetch can wait in the consumer thread across the bump), else it is refetched.
   So records reach the streams in offset order from the read offset on, and a gap
   between the read offset and the next record means offsets that hold no record
   (transaction markers, compaction), which Faust counts as done.
8. Within one consumer generation an agent is handed each offset once: a copy at or
   below the highest offset handed out on its partition (a seek or refetch that starts
   lower) is neither processed nor acked (`streams.processing.event_batches`, marks in
   `HANDED_MARKS`). A new generation starts afresh.
9. A revoke under exactly-once (of every partition: the protocol is eager;
   `BatchDeliveryConsumer.on_partitions_revoked`) closes the gate, waits at most
   `EOS_COMMIT_WAIT_S` for the batches in progress and commits them (batches that finish
   within the wait are never stale). Then, still inside the window, it counts the
   revoke: every batch taken so far is stale and is abandoned (`BatchAbandoned`) at its
   next output, gate entry or table flush, unacked, for the partition's next owner to
   process. If the wait ran out or the commit failed, the open transactions are ended
   uncommitted (`_end_transactions`) before any commit can run (Faust keeps the
   producer of a partition assigned to this worker again and would commit them with
   later offsets); the next owner's producer (same transactional id) aborts them, and
   every in-memory table forgets its data (`forget_uncommitted_folds`): this rebalance's
   recovery reads every assigned changelog partition from its start, so the tables
   come back without what the aborted transactions folded. Revoked partitions leave
   (4). Under at-least-once a revoke commits what is acked (within
   `REVOKE_COMMIT_TIMEOUT_S`, through the same path as every commit: 2, 11) and waits
   for nothing: the batches in progress stay unacked, and the next owner starts from
   that commit.
10. A stop or crash cancels the delivery under way (5). An agent cancelled by the stop
    with a batch in hand leaves it unacked (exactly-once: also `refuse_commits`, since
    the open transactions may hold part of its outputs); an agent that raises otherwise
    abandons its batch and crashes the worker (`BatchAgent`, 2). After a crash everything
    since the last commit is consumed again; under exactly-once the restarted producers
    fence and abort the open transactions.

Guarantees

11. At-least-once: every input ends accepted, rejected or dead-lettered, at least once.
    Its offset is committed only after its batch finished (1), the batch's table
    records were handed to the producer (`streams.tables.writer.flush_pending`, before
    the ack and again before every commit) and Faust flushed the producer, never after
    a refused output (2). What was processed since the last commit
    may be processed again after a crash, revoke or restart (consumers deduplicate on
    the event id / `causation_id`).
12. Exactly-once: the same, exactly once for a `read_committed` reader, for what a batch
    sends into its input partition's transaction (outputs, dead letters, table
    changelogs). Records other tasks send (LLM calls, timers) stay at-least-once; one
    sent with no input in hand (a timer's) goes out in no transaction
    (`streams.processing.send_record`). A stale batch's table writes are refused
    (`streams.tables.writer`), and after a revoke that ended transactions uncommitted
    the in-memory tables come back from the committed changelogs (9).

Recovery (tables from their changelogs)

13. A changelog partition's end is asked of the broker (`RecoveryOffsetsConsumerThread.
    _highwaters`; the last stable offset under `read_committed`), not taken from the
    fetcher, which knows it only after a fetch from that partition. A start offset never
    built (None) is the start of the log (`_seek_wait`).
14. Under exactly-once, recovery ends as soon as every changelog partition is read to
    its end (`end_recovery_at_log_end`, started by `AgentStreamApp.on_first_start`): its
    position has reached the last stable offset and nothing fetched is on its way (no
    batch being handed over, the changelog queue empty), checked again after the
    positions were read. Why: a changelog ends in transaction markers (and aborted
    records) that a `read_committed` consumer never receives.

Records the client cannot parse

15. No record a producer wrote fails a fetch. Where aiokafka cannot parse what it
    fetched (a header key that is not UTF-8, a codec it cannot decode), its fetcher hands
    on a *stand-in* in its place (`streams.record_batches`, installed by
    `new_transport`): a record that does not parse alone is a stand-in at its own offset;
    the rest of a batch whose records cannot be found is one stand-in at the batch's last
    offset. Its value is an `Unreadable` (the bytes kept: the record's value, or the raw
    batch; the reason; the offsets it stands for), a type no producer can forge. To the
    delivery it is an ordinary record (1-14): its agent dead-letters it
    (`streams.processing.decoded_batches`) and it is acked with its batch. The offsets
    before a batch's stand-in hold no record that will be delivered: they are a gap
    counted as done (7), which Faust folds into a commit only below a higher acked
    offset, so no commit passes them before the stand-in's dead letter is out (1, 11).
    A crash before that fetches the batch again and makes the same stand-in (same
    offset, same dead letter id). A batch whose CRC does not match still fails the
    fetch (corrupted on the way, not as written: the broker checks the CRC), as before.

Components

* `BatchDeliveryConsumer`, mixed into Faust's aiokafka consumer by `new_transport`:
  fetching, delivering one batch per task, refetch, commits, seek, revoke (2-5, 7, 9);
  at each seek to the committed offsets, the ones retention removed unread
  (`skipped_offsets`: a warning and `agentstream_offsets_skipped_total`).
* `RefetchingFlowControl`, the app's `flow_control` (6); `BatchAgent`, the app's agent
  class (10); `DELIVERY_FAILURES` with `delivery_failed`, `processing_failed` and
  `refuse_commits` (2).
* `FetchWaitConsumerThread` (fetch.max.wait.ms from the settings),
  `RecoveryOffsetsConsumerThread` (13) and `MetadataReadyConsumerThread` (the group is
  joined once the broker lists every subscribed topic, so the first assignment holds the
  changelogs created at start), the consumer thread; `end_recovery_at_log_end` (14).
* `streams.processing`: taking, acking and abandoning batches (1, 8-10), outputs (3, 12).
* `consumer_state`: the consumer's partitions and offsets in the SIGUSR2 task dump.
* `streams.record_batches`: stand-ins for what aiokafka cannot parse (15).

`streams.app` imports this module, so this module never imports `streams.app` at import
time: what needs the app takes it from its objects (`self.app`) or as an argument, and
`delivery_failed` imports it when called.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faust
from faust.transport import by_url
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from mode.utils.queues import FlowControlEvent

from agentstream.streams import record_batches
from agentstream.streams.observability import OFFSETS_SKIPPED
from agentstream.streams.tables.writer import flush_pending

log = logging.getLogger(__name__)


class FetchWaitConsumerThread:
    """Faust's consumer thread with a configurable fetch.max.wait.ms (Faust hard-codes
    1500 ms).

    aiokafka keeps one fetch request per broker in flight and builds it only from the
    partitions whose previously fetched records have all been consumed. A partition
    consumed while that fetch waits at the broker is not in it, so its next records wait
    until the fetch returns: up to fetch.max.wait.ms when the partitions in the fetch
    stay quiet. Under a steady LLM load this stalled `llm.requests` for up to 1.5 s at a
    time (bench: pipeline p99 2.3 s); an idle worker pays for the lower wait with a few
    more empty fetches per second.
    """

    app: Any

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)  # type: ignore[misc]
        consumer._fetch_max_wait_ms = int(getattr(self.app, "fetch_max_wait_ms", 100))
        return consumer


class RecoveryOffsetsConsumerThread:
    """Faust's consumer thread, with the changelog end offsets and seeks its table
    recovery needs under exactly-once.

    * **Highwaters.** In a transaction Faust takes a changelog partition's end from
      `last_stable_offset`, which aiokafka knows only once a fetch from that partition
      returned: right after a rebalance it is unknown (-1), while the recovery still
      holds the offset it read up to before the rebalance. Faust's consistency check
      (`persisted offset N > highwater -1`) then crashed the worker in every recovery
      that followed a kill or stop of another member, again and again. Here the end is
      asked of the broker (ListOffsets); under `read_committed` the broker answers the
      last stable offset, which is what recovery must read up to.
    * **Seeks.** A standby partition whose start offset was never built (assigned while
      a rebalance interrupted the recovery) reaches `seek_wait` as None, and aiokafka
      refuses it (`ValueError: Offset must be a positive integer`), crashing the worker
      as soon as a group with standby replicas formed. An unknown start is the start of
      the log: it is sought to the beginning.
    """

    async def _highwaters(self, partitions: Any) -> Any:
        consumer = self._ensure_consumer()  # type: ignore[attr-defined]
        return await consumer.end_offsets(list(partitions))

    async def _seek_wait(self, consumer: Any, partitions: Any) -> None:
        unknown = [tp for tp, offset in partitions.items() if offset is None]
        if unknown:
            consumer.seek_to_beginning(*unknown)
            for tp in unknown:
                self.consumer._read_offset.pop(tp, None)  # type: ignore[attr-defined]
        known = {tp: offset for tp, offset in partitions.items() if offset is not None}
        await super()._seek_wait(consumer, known)  # type: ignore[misc]
        if unknown:
            await asyncio.wait_for(
                asyncio.gather(*[consumer.position(tp) for tp in unknown]),
                timeout=self.app.conf.broker_request_timeout,  # type: ignore[attr-defined]
            )


#: seconds a worker waits, before it joins its group, for the broker's metadata to list
#: every topic it subscribes to. A topic just created (the worker creates its changelogs
#: at start) is listed within a second on a healthy cluster; one that stays unlisted
#: (deleted, its brokers down, an internal topic not described to the worker) must not keep
#: the worker from starting: it joins anyway, and its consumer rejoins once a metadata
#: refresh lists the topic. A catalogue topic not described to it never gets here:
#: `agentstream worker` stops at once in `streams.admin.ensure_topics`.
SUBSCRIBE_METADATA_WAIT_S = 30.0
#: seconds between full metadata requests while waiting
SUBSCRIBE_METADATA_POLL_S = 0.1


def unlisted_topics(cluster: Any, topics: Any) -> list[str]:
    """The `topics` that aiokafka's `ClusterMetadata` does not list with their partitions
    (a topic being created is not listed, or listed with an error), sorted. A partition
    without a leader still counts: the group assignment needs the partitions, not their
    leaders, and a restart must not wait for a broker that is down."""
    return sorted(t for t in topics if not cluster.partitions_for_topic(t))


async def await_topics_listed(
    client: Any,
    topics: Any,
    wait_s: float = SUBSCRIBE_METADATA_WAIT_S,
    poll: float = SUBSCRIBE_METADATA_POLL_S,
) -> list[str]:
    """Wait until a full metadata request to `client` (an aiokafka client) lists every one
    of `topics`; the topics still unlisted after `wait_s`. A topic the worker may not
    describe is left out of such an answer like one that does not exist: it would cost
    the whole wait, so `agentstream worker` asks about the catalogue topics by name before
    (`streams.admin.ensure_topics` stops it at once, naming them); of Faust's own topics,
    one not described to the worker still costs the wait, and the warning names it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            # every topic, not the ones named: a metadata request naming a missing topic
            # creates it on a broker with auto.create.topics.enable
            cluster = await client.fetch_all_metadata()
        except Exception as exc:  # no broker answered: the wait goes on to its deadline
            log.debug("metadata before subscribing unavailable: %r", exc)
            missing = sorted(topics)
        else:
            missing = unlisted_topics(cluster, topics)
        if not missing or time.monotonic() >= deadline:
            return missing
        await asyncio.sleep(poll)


class MetadataReadyConsumerThread:
    """Faust's consumer thread, joining its group only once the broker's metadata lists
    the topics it subscribes to.

    Faust creates the changelog topics at start, then subscribes; the group leader assigns
    the partitions of the topics its metadata lists. Asked right after the creation, a
    broker may not list the new topics yet, and the leader silently left them out of the
    assignment: the worker ran with no active changelog partition (views answered
    `unowned_partitions`, the tables were neither recovered nor swept) until a metadata
    refresh (`metadata.max.age.ms`, minutes) made it rejoin. A catalogue topic created by
    this start would not have been consumed at all meanwhile."""

    async def subscribe(self, topics: Any) -> None:
        wanted = set(topics)
        missing = await self.call_thread(  # type: ignore[attr-defined]
            self._await_topics_listed, wanted
        )
        if missing:
            log.warning(
                "joining without metadata for %s after %.0f s: their partitions are "
                "assigned once a metadata refresh lists them",
                ", ".join(missing),
                SUBSCRIBE_METADATA_WAIT_S,
            )
        await super().subscribe(wanted)  # type: ignore[misc]

    async def _await_topics_listed(self, topics: Any) -> list[str]:
        # in the consumer thread, whose event loop the aiokafka client belongs to
        client = self._ensure_consumer()._client  # type: ignore[attr-defined]
        return await await_topics_listed(client, topics)


#: how often an exactly-once table recovery checks whether it has read its changelogs to
#: their end: each check is a position lookup per changelog partition still behind
RECOVERY_END_POLL_S = 0.2


async def end_recovery_at_log_end(app: Any) -> None:
    """Exactly-once: end a table recovery as soon as every changelog is read to its end.

    Faust recovers a changelog partition until it has applied the record at the end
    offset minus one. Written in transactions, a changelog ends with a transaction
    marker — and, after a kill, with the aborted records of the killed worker's open
    transaction and their abort marker — none of which a `read_committed` consumer ever
    receives. Faust notices only when its changelog queue has stayed empty for two 5 s
    timeouts (`Recovery._slurp_changelogs`, "Aborted tx until highwater"): every restart
    or rebalance of an exactly-once worker held its partitions for 10 s more. A partition
    is read to its end when the consumer's position has reached the last stable offset
    and nothing fetched is still on its way to the tables: no batch is being handed over
    and the changelog queue is empty. Then it is marked done as Faust's own check would,
    and once all are done recovery ends the way Faust ends it.
    """
    recovery = app.tables.recovery
    consumer = app.consumer
    queue = app.tables.changelog_queue

    def in_flight() -> bool:
        return bool(getattr(consumer, "_handing_over", False)) or not queue.empty()

    while not app.should_stop:
        await asyncio.sleep(RECOVERY_END_POLL_S)
        if not recovery.in_recovery or not recovery.need_recovery() or in_flight():
            continue
        offsets = recovery.active_offsets
        behind = [
            (tp, last)
            for tp, last in recovery.active_highwaters.items()
            if last is not None and last >= 0 and (offsets.get(tp) or -1) < last
        ]
        try:
            positions = [await consumer.position(tp) for tp, _ in behind]
        except Exception as exc:  # a rebalance under way: recovery restarts anyway
            recovery.log.debug("changelog positions unavailable: %r", exc)
            continue
        at_end = [
            pos is not None and pos > last for pos, (_, last) in zip(positions, behind, strict=True)
        ]
        if not behind or not all(at_end):
            continue
        if in_flight() or not recovery.in_recovery:
            continue  # records arrived while the positions were read: check again
        for tp, last in behind:
            offsets[tp] = last
        if not recovery.need_recovery():
            recovery.log.info(
                "changelogs read to their end (%d partition(s) end in transaction "
                "markers or aborted records): recovery complete",
                len(behind),
            )
            recovery.flush_buffers()
            recovery._set_recovery_ended()
            recovery.signal_recovery_end.set()


class RefetchingFlowControl(FlowControlEvent):
    """Faust's flow control, except that records it drops are fetched again.

    `flow_control.resume()` empties every stream queue, on every call, to drop what was
    fetched before a rebalance. But Faust's recovery resumes flow twice: once before it
    reads the changelogs (the fetcher starts), and again after `on_recovery_completed`
    has resumed the stream partitions and awaited `perform_seek`. Records fetched from
    the stream partitions in between reach an agent's queue and are wiped by the second
    resume, while the consumer position is already past them and nothing acked them:
    without a committed offset to seek back to, the worker neither processes nor
    commits them (seen right after a quick restart). So the consumer is told what is
    dropped here and seeks back to it before its next fetch.
    """

    def __init__(self, app: faust.App, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._app = app

    def clear(self) -> None:
        dropped = [
            item.message
            for queue in self._queues
            for item in queue._queue
            if getattr(item, "message", None) is not None
        ]
        super().clear()
        consumer = self._app.consumer
        if not isinstance(consumer, BatchDeliveryConsumer):
            return
        # The record being delivered right now is past the await at which this clear ran
        # (Faust's on_message waits for flow control and for the producer buffer to
        # ebb): it lands in a queue AFTER the clear, ahead of the cleared records before
        # it, which are fetched again. Handed out first, it would make those look like
        # copies of records already handed (`streams.processing.event_batches`): skipped,
        # never processed, and Faust's commit either stalls at the gap or, with nothing
        # committed yet, passes over it. So it is stale: agents drop it and it is fetched
        # again with the others.
        delivering = consumer._delivering
        if delivering is not None:
            STALE_DELIVERIES.add(delivering)
            dropped.append(delivering)
        if dropped or NATIVE_CHANNELS:
            # the native channels are emptied too (their refetch drains them)
            consumer.refetch(dropped)


#: Records delivered to stream queues after those queues were cleared, which agents must
#: not handle (`RefetchingFlowControl.clear`); held weakly: a record's entry goes with it.
STALE_DELIVERIES: weakref.WeakSet[Any] = weakref.WeakSet()


class Holds:
    """Records held past their batch, per partition (invariant 1): `hold` takes a
    reference on the record (`Message.incref`) and notes its offset; `release` acks it
    (`Message.ack`, which makes it committable once no reference is left) and drops the
    note. `floor` is the lowest offset held in a partition: no commit may pass it."""

    def __init__(self) -> None:
        self._by_tp: dict[Any, dict[int, int]] = {}

    def hold(self, message: Any) -> None:
        message.incref()
        held = self._by_tp.setdefault(message.tp, {})
        held[message.offset] = held.get(message.offset, 0) + 1

    def release(self, message: Any, consumer: Any) -> bool:
        """Ack `message` for one `hold`; True when that made it committable."""
        try:
            return bool(message.ack(consumer))
        finally:
            held = self._by_tp.get(message.tp)
            n = held.get(message.offset) if held is not None else None
            if held is not None and n is not None:
                if n > 1:
                    held[message.offset] = n - 1
                else:
                    del held[message.offset]
                    if not held:
                        del self._by_tp[message.tp]

    def floor(self, tp: Any) -> int | None:
        held = self._by_tp.get(tp)
        return min(held) if held else None

    def forget(self, tps: Any) -> None:
        """The partitions left this worker: their holders were cancelled unacked."""
        for tp in tps:
            self._by_tp.pop(tp, None)

    def __len__(self) -> int:
        return sum(len(h) for h in self._by_tp.values())


#: the worker's held records (invariant 1)
HOLDS = Holds()

#: Why no further offset may be committed: delivery errors of produced records (see
#: `streams.processing.emit`) and batches an agent left unfinished (see
#: `streams.processing.abandon_open_batch`). Once non-empty the consumer commits no more
#: offsets and the app crashes (unless it was stopping anyway).
DELIVERY_FAILURES: list[BaseException] = []
_CRASHING: list[asyncio.Future[None]] = []  # keeps the crash task referenced


def delivery_failed(exc: BaseException) -> None:
    """Record an undeliverable output and crash the worker (a supervisor restarts it and
    the uncommitted inputs are consumed again)."""
    refuse_commits(exc)
    if len(DELIVERY_FAILURES) == 1:
        # the worker's app, imported here: streams.app imports this module
        from agentstream.streams.app import app

        _CRASHING.append(asyncio.ensure_future(app.crash(exc)))


def forget_uncommitted_folds(app: Any) -> int:
    """Exactly-once, after a revoke ended transactions uncommitted: every in-memory
    table forgets its data; returns the number of keys dropped.

    Those transactions' changelog records are aborted, but the tables in memory kept
    what their batches folded: a key only they created (an LLM request's dedup entry)
    would outlive its aborted response, a counter would count the inputs again when
    they are folded a second time. So the stores are emptied and the recovery's start
    offsets forgotten: the rebalance under way then reads every assigned changelog
    partition from its start (a memory store persists no offset; without the reset,
    Faust would start a partition this worker keeps where its last recovery ended, and
    every key written before that would be gone), `read_committed`, and the tables come
    back with what the changelogs committed and nothing else. The revoke comes before
    the assignment that builds the new start offsets (`Recovery.on_rebalance`). Folds a
    stale batch makes later are refused by the table writer (`streams.tables.writer`).
    Indexes built over a table are rebuilt once the rebalance completes (the agents
    that keep them invalidate them then)."""
    from faust.stores.memory import Store

    dropped = 0
    for table in app.tables.values():
        store = table.data
        if isinstance(store, Store):
            dropped += len(store.data)
            store.data.clear()
            store._key_partition.clear()
    recovery = app.tables.recovery
    recovery.active_offsets.clear()  # so Faust's recovery starts each at the beginning
    recovery.standby_offsets.clear()
    if dropped:
        log.warning(
            "revoke: transactions ended uncommitted; %d table key(s) in memory dropped, "
            "restored from the committed changelogs by this rebalance's recovery",
            dropped,
        )
    return dropped


def processing_failed(exc: BaseException) -> None:
    """An agent left a batch unfinished by an exception: its outputs may be partly sent,
    or not at all, so the offsets behind it must never be committed. Same as an
    undeliverable output: commit nothing more and crash; after the restart the inputs
    since the last commit are processed again (under exactly-once the restarted
    producers fence and abort the open transactions that may hold part of them)."""
    delivery_failed(exc)


def refuse_commits(exc: BaseException) -> None:
    """Commit no further offset in this process (without crashing it)."""
    DELIVERY_FAILURES.append(exc)


class BatchAgent(faust.Agent):
    """Faust's agent, except that when the agent body raises, the batch it holds is
    abandoned at once: not acked, and the worker crashes unless a revoke or the
    worker's stop explains it (`streams.processing.abandon_open_batch`). Faust would log
    the error and restart the agent, and the batch iterator's clean-up, whenever the
    collector ran it, acked the batch: its inputs were lost."""

    async def _execute_actor(self, coro: Any, aref: Any) -> None:
        await super()._execute_actor(self._abandoning(coro), aref)

    async def _abandoning(self, coro: Any) -> None:
        try:
            await coro
        except BaseException as exc:
            from agentstream.streams.processing import abandon_open_batch

            await abandon_open_batch(exc, stopping=bool(self.should_stop or self.app.should_stop))
            raise


#: how long an exactly-once commit waits for the batches in progress before it gives up
#: (a later commit catches up); bounded so that a stuck agent cannot stall a rebalance.
#: A revoke waits as long for them (`BatchDeliveryConsumer.on_partitions_revoked`).
EOS_COMMIT_WAIT_S = 10.0

#: how long an at-least-once revoke may spend committing (a producer flush and one offset
#: commit: milliseconds with a healthy broker). Bounded because every member waits for
#: the slowest one's revoke before partitions are assigned again; giving up costs only
#: duplicates, never loss (the last commit stays in force).
REVOKE_COMMIT_TIMEOUT_S = 5.0


#: how long the seek waits for the log start offsets it checks the committed ones against
SKIPPED_OFFSETS_CHECK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SkippedOffsets:
    """A stream partition whose committed offset the log no longer holds: retention (or
    delete-records) removed `count` records the consumer group had not consumed, and the
    consumer resumes at the log start (`auto_offset_reset=earliest`), past them."""

    tp: Any
    committed: int
    log_start: int

    @property
    def count(self) -> int:
        return self.log_start - self.committed


def skipped_offsets(
    committed: Mapping[Any, int | None],
    log_start: Mapping[Any, int],
    reported: Mapping[Any, int],
) -> list[SkippedOffsets]:
    """The partitions of `committed` (the group's committed offsets, None: no commit)
    whose offset is below their `log_start`, sorted, leaving out those whose committed
    offset is the one `reported` holds for them: Faust seeks to the committed offsets
    several times per assignment (after recovery, on fetches while the flow is stopped),
    and one gap is one loss. A partition without a commit is no loss: a new group starts
    at the log start by design."""
    out = []
    for tp, offset in committed.items():
        start = log_start.get(tp)
        if offset is None or start is None or offset >= start or reported.get(tp) == offset:
            continue
        out.append(SkippedOffsets(tp, offset, start))
    return sorted(out, key=lambda s: (s.tp.topic, s.tp.partition))


class BatchDeliveryConsumer:
    """Faust's consumer, delivering each fetched batch under ONE `wait_first`.

    Faust wraps every single record in `wait_first(callback, suspend_flow.wait())`:
    four tasks and an `asyncio.wait` per record, which caps any Faust worker at roughly
    13k records/s here however cheap the agent is (see docs/bench.md). This does the
    same per-record work (read offsets, gaps, commit_every, the conductor callback) in
    one task per batch that a rebalance (`suspend_flow`), stop or crash still cancels.

    Faust drops fetched records in several places and counts on its next seek to the
    committed offsets to fetch them again: `getmany` drops records of a partition paused
    (or flow stopped, generation changed) while the fetch waited, a cancelled delivery
    drops the rest of its batch, `flow_control.resume()` empties the stream queues. But
    aiokafka's `seek_to_committed` does not seek a partition without a committed offset
    (nor one at 0), so there those records were simply skipped: after a crash before
    the first commit, the restarted worker stalled on its input. Here every such drop
    is noted (`refetch`) and the partition is sought back to it before the next fetch.
    """

    #: per partition, the lowest offset of a record dropped before any stream read it
    _refetch_from: dict[Any, int] | None = None
    #: bumped by every `refetch`: a batch being delivered then stops, see `_deliver`
    _refetch_epoch = 0
    #: the record whose delivery to the streams (Faust's on_message) is under way
    _delivering: Any = None
    #: a fetched batch is being handed to the streams and changelog queue (`_deliver`)
    _handing_over = False

    def refetch(self: Any, messages: list[Any]) -> None:
        """Fetch these records again: they were dropped before a stream read them."""
        self._refetch_offsets([(message.tp, message.offset) for message in messages])

    def _refetch_offsets(self: Any, offsets: list[tuple[Any, int]]) -> None:
        """Note offsets to fetch again and bump the refetch epoch. Records waiting in
        the native channels join them in the same step: once the partitions are sought
        back, records handed out from above the seek would make the refetched ones below
        look like copies (invariant 8) and be skipped, never processed."""
        pending = self._refetch_from
        if pending is None:
            pending = self._refetch_from = {}
        if NATIVE_CHANNELS:
            offsets = [*offsets, *drain_native_channels()]
        for tp, offset in offsets:
            if self._is_changelog_tp(tp):
                continue  # recovery and standbys keep their own positions
            if tp not in pending or offset < pending[tp]:
                pending[tp] = offset
        self._refetch_epoch += 1

    #: per assigned partition, the highest offset this consumer has committed since the
    #: partition was assigned (see `perform_seek`)
    _committed_high: dict[Any, int] | None = None

    async def _commit_offsets(self: Any, offsets: Any, start_new_transaction: bool = True) -> bool:
        if not self.app.in_transaction:
            # Table records not yet in the producer: Faust's producer flush, next in
            # super(), waits only for what the producer holds (streams/tables/writer.py).
            # Under exactly-once the commit window has done this (streams/eos.py).
            await flush_pending()
        did: bool = await super()._commit_offsets(  # type: ignore[misc]
            offsets, start_new_transaction=start_new_transaction
        )
        if did:
            high = self._committed_high
            if high is None:
                high = self._committed_high = {}
            assignment = self.assignment()
            for tp, offset in offsets.items():
                if tp in assignment and offset > high.get(tp, -1):
                    high[tp] = offset
        return did

    #: revokes so far: under exactly-once a batch taken before the last one is
    #: abandoned (module docstring, 9); under either guarantee it extends no signed
    #: chain (`streams.processing.check_not_rebalanced`)
    _revokes = 0

    async def on_partitions_revoked(self: Any, revoked: Any) -> None:
        if not self.app.in_transaction:
            # at-least-once: from here on a batch taken before is stale for the chain
            # writers (`check_not_rebalanced`), not only once the next assignment's
            # generation is known (exactly-once counts inside the revoke's window)
            self._revokes += 1
        if self.assignment():
            if self.app.in_transaction:
                await self._finish_batches_before_revoke()
            else:
                await self._commit_before_revoke()
        high = self._committed_high
        if high:
            for tp in revoked:
                high.pop(tp, None)
        HOLDS.forget(revoked)
        self._revoked_since_assign = (self._revoked_since_assign or set()) | set(revoked)
        await super().on_partitions_revoked(revoked)  # type: ignore[misc]

    #: partitions revoked and not assigned again since (see `counts_ack`)
    _revoked_since_assign: set[Any] | None = None

    async def on_partitions_assigned(self: Any, assigned: Any, generation_id: int = 0) -> None:
        # the new generation is set on the app before this runs (Faust's rebalance
        # listener): records of the old one are told apart by their generation from here
        if self._revoked_since_assign:
            self._revoked_since_assign.difference_update(assigned)
        await super().on_partitions_assigned(assigned, generation_id)  # type: ignore[misc]

    def counts_ack(self: Any, message: Any) -> bool:
        """Whether an ack of `message` may count toward a commit (invariant 1): it was
        fetched in the current consumer generation, and its partition was not revoked
        since. A record taken before a revoke and acked after it (a batch or an LLM call
        that finished late) is consumed again from the committed offset by whoever owns
        its partition now; counted, it would land in the bookkeeping the revoke emptied
        (`_acked` with no committed offset) and let a commit pass the records never
        processed once the partition came back."""
        revoked = self._revoked_since_assign
        if revoked and message.tp in revoked:
            return False
        return bool(message.generation_id == self.app.consumer_generation_id)

    def ack(self: Any, message: Any) -> bool:
        if not self.counts_ack(message):
            self._unacked_messages.discard(message)
            return False
        return bool(super().ack(message))  # type: ignore[misc]

    def _new_offset(self: Any, tp: Any) -> int | None:
        """Faust's next offset to commit for `tp`, never past the lowest held offset
        (invariant 1). Faust's head check (`min(acked) - committed > 1`) takes its
        committed offset for the last one processed, but it is the next one to read: with
        10 committed, 10 held by an LLM call and 11 acked, Faust commits 12, and a crash
        before 10's answer loses it. Before the first commit (None, or 0) it checks
        nothing at all. The check is kept as it is otherwise: its slack of one lets a
        transaction marker at the head pass, which no record is delivered for. The acked
        offsets at or above the floor wait for a later commit."""
        floor = HOLDS.floor(tp)
        if floor is None:
            return super()._new_offset(tp)  # type: ignore[misc]
        acked = self._acked[tp]
        above = [o for o in acked if o >= floor]
        if not above:
            return super()._new_offset(tp)  # type: ignore[misc]
        acked[:] = [o for o in acked if o < floor]
        try:
            if not acked:
                return None
            return super()._new_offset(tp)  # type: ignore[misc]
        finally:
            acked.extend(above)
            acked.sort()

    async def _commit_before_revoke(self: Any) -> None:
        """At-least-once: commit what the agents finished before the partitions move, so
        their next owner starts after the last finished batch, not at the last periodic
        commit. Without it every rebalance processed up to a commit interval's worth of
        every member's input twice (Faust commits on revoke only from `wait_empty`, which
        this app turns off; one SIGSTOP'ed worker causes up to four rebalances). Batches
        in progress are not waited for: their records are not acked, and their next
        owner processes them (11). Bounded by `REVOKE_COMMIT_TIMEOUT_S`; a commit that
        fails or times out leaves the last one in force, which is where the next owner
        would have started anyway."""
        try:
            async with asyncio.timeout(REVOKE_COMMIT_TIMEOUT_S):
                await self.commit()
        except Exception as exc:  # the revoke goes on; the next owner starts earlier
            self.log.warning("revoke: committing the finished batches failed: %r", exc)

    async def _finish_batches_before_revoke(self: Any) -> None:
        """Exactly-once: let the batches in progress finish (at most EOS_COMMIT_WAIT_S)
        and commit them, then mark every batch taken so far as stale.

        Faust stops the revoked partitions' transactional producers without committing
        (and `stream_wait_empty=False` does not wait for the agents), so a batch running
        through a revoke used to send the rest of its outputs outside any transaction:
        duplicated when the next owner processed its inputs again. Now a batch either
        finishes here and is committed with its outputs, or is abandoned at its next
        output (`streams.processing.check_batch_current`) and processed by the next
        owner; what it sent before stays in a transaction that is never committed.
        New batches wait at the gate meanwhile and are abandoned when they enter it."""
        from agentstream.streams.eos import GATE

        async with GATE.commit_window(EOS_COMMIT_WAIT_S) as quiet:
            try:
                if not quiet:
                    self.log.warning(
                        "revoke: batches still in progress after %.0f s are abandoned",
                        EOS_COMMIT_WAIT_S,
                    )
                elif not self._delivery_failed():
                    await self.app.producer.buffer.flush()
                    await super().commit()  # type: ignore[misc]
            except Exception as exc:  # the revoke goes on; nothing uncommitted is lost
                self.log.warning("revoke: committing the finished batches failed: %r", exc)
                quiet = False
            finally:
                # inside the window: batches waiting to enter the gate see it first
                self._revokes += 1
                if not quiet:
                    # The open transactions may hold outputs of the abandoned batches.
                    # Faust keeps the producer of a partition assigned again to this
                    # worker, and would commit them with the next offsets: end them all
                    # (still inside the window, so no commit runs before); the next
                    # owner of each partition, this worker included, starts a producer
                    # with the same transactional id, which aborts them (seen: ~250
                    # duplicates per rebalance with batches longer than the wait).
                    await self._end_transactions()
                    forget_uncommitted_folds(self.app)

    async def _end_transactions(self: Any) -> None:
        producer = self.transactions.producer
        for tid in list(getattr(producer, "_transaction_producers", None) or ()):
            try:
                await producer.stop_transaction(tid)
            except Exception as exc:  # fenced or broken already: aborted either way
                self.log.warning("revoke: stopping transaction %s failed: %r", tid, exc)

    #: per stream partition, the committed offset whose skip was last reported
    #: (`skipped_offsets`)
    _skips_reported: dict[Any, int] | None = None

    async def seek_to_committed(self: Any) -> Any:
        """Faust's seek to the committed offsets (`perform_seek` calls it), saying which
        of them the log no longer holds. aiokafka seeks there and, its fetch refused with
        OffsetOutOfRange, resets to the log start with an INFO line at most: records that
        retention removed before this group consumed them were skipped, never processed,
        and nobody was told. Here: a WARNING per partition and
        `agentstream_offsets_skipped_total` (docs/monitoring.md)."""
        committed = await super().seek_to_committed()  # type: ignore[misc]
        try:
            await self._report_skipped_offsets(committed)
        except Exception as exc:  # a failed check must not fail the seek (a rebalance)
            self.log.warning("checking committed offsets against the log start: %r", exc)
        return committed

    async def _report_skipped_offsets(self: Any, committed: Any) -> None:
        streams = {
            tp: offset
            for tp, offset in committed.items()
            if offset is not None and not self._is_changelog_tp(tp)
        }
        if not streams:
            return
        reported = self._skips_reported
        if reported is None:
            reported = self._skips_reported = {}
        # bounded: this runs inside every assignment's seek, and a slow ListOffsets answer
        # must not hold the partitions' resume (a missed report is logged by the caller)
        log_start = await asyncio.wait_for(
            self.earliest_offsets(*streams), SKIPPED_OFFSETS_CHECK_TIMEOUT_S
        )
        for skip in skipped_offsets(streams, log_start, reported):
            reported[skip.tp] = skip.committed
            OFFSETS_SKIPPED.labels(skip.tp.topic).inc(skip.count)
            self.log.warning(
                "%s[%d]: committed offset %d is below the log start %d: %d offset(s) "
                "removed (retention, delete-records) before this consumer group read "
                "them are skipped, never processed",
                skip.tp.topic,
                skip.tp.partition,
                skip.committed,
                skip.log_start,
                skip.count,
            )

    async def perform_seek(self: Any) -> None:
        """Faust's seek of every partition to its committed offset, except that a commit
        this worker made is not forgotten because the broker does not show it yet.

        Recovery calls this after the stream partitions were resumed, so the agents may
        already have processed and committed records meanwhile. Faust then replaces its
        committed offsets with what the broker answers, and the broker can answer the
        offset from before that commit: under exactly-once a transaction's offsets become
        visible only once its markers are written, after `commit_transaction` returned.
        Faust's commit would then wait forever for acks of offsets below the one it
        committed (the agents skip those records as copies), while the open transaction
        holds every output since. The seek also bumps the refetch epoch: records fetched
        before it are not delivered after it (`_deliver`).
        """
        before = {tp: self._committed_offset.get(tp) for tp in self.assignment()}
        # Records fetched before the seek are not delivered after it (see `_deliver`).
        # Bumped before: the seek sets the read offsets first and then awaits the
        # consumer thread, and a batch fetched from the old position that started its
        # delivery meanwhile made the offsets between the new read offset and its records
        # a gap counted as done. And after: a fetch issued while the seek was on its way
        # to the consumer thread can still return records from the old position.
        self._refetch_offsets([])
        await super().perform_seek()  # type: ignore[misc]
        self._refetch_offsets([])
        high = self._committed_high or {}
        for tp, was in sorted(before.items()):
            if not self._is_changelog_tp(tp):
                # a restart's recovery is where records were lost or held before: say
                # what the seek found, once per stream partition
                self.log.info(
                    "seek to committed: %s[%d] committed %s before, broker %s, ours %s",
                    tp.topic,
                    tp.partition,
                    was,
                    self._committed_offset.get(tp),
                    high.get(tp),
                )
        for tp, offset in high.items():  # assigned partitions only (on_partitions_revoked)
            known = self._committed_offset.get(tp)
            if known is None or known < offset:
                self.log.info(
                    "%s: the broker answered committed offset %s, this worker committed %d "
                    "already; keeping %d",
                    tp,
                    known,
                    offset,
                    offset,
                )
                self._committed_offset[tp] = offset

    #: the records the last `_getmany` returned, to find those `getmany` then dropped
    _last_fetch: Any = None

    async def _getmany(self: Any, active_partitions: Any, timeout: float) -> Any:  # noqa: ASYNC109
        # Faust passes its live set of active partitions, which recovery mutates while the
        # fetch waits; aiokafka reads an EMPTY set as "every assigned partition" and hands
        # back records of paused stream partitions (which getmany then drops).
        if active_partitions is not None:
            active_partitions = _NeverEmpty(active_partitions)
        records = await super()._getmany(active_partitions, timeout)  # type: ignore[misc]
        self._last_fetch = records
        return records

    # -- the `getmany` bypass for topics with a native channel -------------------------
    #
    # Faust's `getmany` generator does per record what a native list needs once: a
    # round-robin step (`scheduler.iterate`), the flow and generation checks, the
    # active/buffered partition filter, `highwater` + `monitor.track_tp_end_offset`,
    # then `_to_message`. For the partitions of topics with a native channel,
    # `_wait_next_records` below takes their records out of the fetch before `getmany`
    # sees it and makes the messages itself. What that relies on:
    #
    # G1. Same instant as Faust's checks. `getmany` reads the generation and
    #     `flow_active` right after `_wait_next_records` returns and yields every record
    #     without suspending (the fetch is drained by one comprehension, `_fetch`), so
    #     its per-record checks see one state per fetch: the state here, where the take
    #     is decided. A stop, flow stopped, or a partition neither active nor buffered
    #     at that instant takes nothing (the generation cannot change in between).
    # G2. Nothing taken or yielded is lost: records `getmany` did not yield and the
    #     native ones not taken are fetched again from the lowest such offset per
    #     partition (`_refetch_undelivered` against `_last_fetch`, invariant 5); a take
    #     is all of a partition's fetched records or none.
    # G3. Messages as Faust makes them: `_to_message` per record (generation stamped
    #     then, as `getmany` does), `highwater`/`track_tp_end_offset` once per
    #     partition; per-partition offset order kept.
    # G4. Every other topic goes through Faust's `getmany` unchanged (same order among
    #     themselves, same checks); `_deliver` hands the taken lists to
    #     `_deliver_native`, which applies read offsets, gaps, epochs, flow control and
    #     cancel exactly as for lists it split itself (invariants 5-8).

    #: set by `_fetch` while `getmany` runs: the records taken for the native channels
    _native_take: dict[Any, list[Any]] | None = None

    async def _wait_next_records(self: Any, timeout: float) -> Any:  # noqa: ASYNC109
        records, active_partitions = await super()._wait_next_records(timeout)  # type: ignore[misc]
        take = self._native_take
        if take is None or not records or not NATIVE_CHANNELS:
            return records, active_partitions
        if self.should_stop or not self.flow_active:
            return records, active_partitions  # getmany drops the whole fetch (G1, G2)
        buffered = self._buffered_partitions
        taken, rest = split_fetch(
            records,
            NATIVE_CHANNELS,
            lambda tp: active_partitions is None or tp in active_partitions or tp in buffered,
        )
        if taken:
            to_message = self._to_message
            track = self.app.monitor.track_tp_end_offset
            for tp, tp_records in taken.items():
                track(tp, self.highwater(tp))
                take[tp] = [to_message(tp, record) for record in tp_records]
        return rest, active_partitions

    async def _fetch(self: Any) -> tuple[list[tuple[Any, Any]], dict[Any, list[Any]]]:
        """One fetch: the records `getmany` yields (per record, for the conductor) and
        those taken for the native channels (per partition); what neither holds is
        fetched again (G2)."""
        take: dict[Any, list[Any]] | None = {} if NATIVE_CHANNELS else None
        self._native_take = take
        try:
            batch = [item async for item in self.getmany(timeout=1.0)]
        finally:
            self._native_take = None
        native = take or {}
        fetched, self._last_fetch = self._last_fetch, None
        if fetched:
            handed = len(batch) + sum(map(len, native.values()))
            if handed != sum(map(len, fetched.values())):
                self._refetch_undelivered(fetched, batch, native)
        return batch, native

    def _refetch_undelivered(
        self: Any,
        fetched: Any,
        batch: list[tuple[Any, Any]],
        native: Mapping[Any, list[Any]] | None = None,
    ) -> None:
        """`getmany` silently drops fetched records (partition paused meanwhile, flow
        stopped, generation changed) although the consumer position has moved past them;
        Faust counts on the next seek to committed offsets to fetch them again, which
        does not happen for a partition without a committed offset. `native`: the
        records `_wait_next_records` took for the native channels (each partition's
        whole fetch or nothing, G2)."""
        yielded: dict[Any, int] = {tp: len(messages) for tp, messages in (native or {}).items()}
        for tp, _ in batch:
            yielded[tp] = yielded.get(tp, 0) + 1
        self._refetch_offsets(
            [
                (tp, records[yielded.get(tp, 0)].offset)
                for tp, records in fetched.items()
                if yielded.get(tp, 0) < len(records)
            ]
        )

    async def _seek_back_to_dropped(self: Any) -> None:
        pending, self._refetch_from = self._refetch_from, None
        assigned = self.assignment()
        for tp, offset in (pending or {}).items():
            if tp not in assigned:
                continue  # revoked: its new owner starts from the committed offset
            committed = self._committed_offset.get(tp)
            if committed is not None and offset < committed:
                # what lies below was committed since (by this worker or, while the
                # partition was elsewhere, its owner then): done, not to be done twice
                offset = committed
            try:
                position = await self.position(tp)
                # Only ever backwards: a seek to the committed offset since may already
                # have rewound further, and skipping records would lose them.
                if position is None or offset < position:
                    self.log.info(
                        "fetching %s again from offset %d (was at %s): records were "
                        "dropped from stream queues before they were read",
                        tp,
                        offset,
                        position,
                    )
                    await self.seek(tp, offset)
            except Exception as exc:  # a rebalance under way: it seeks to committed
                self.log.warning("could not seek %s back to %d: %r", tp, offset, exc)

    async def commit(self: Any, topics: Any = None, start_new_transaction: bool = True) -> bool:
        """Under exactly_once, commit only between batches (see streams/eos.py).

        A transaction holds every record produced for its partition so far; committed
        mid-batch it would publish outputs of events whose offsets it does not commit,
        which are then processed again after a crash. So new batches wait, the ones in
        progress finish and are acknowledged, buffered table updates are flushed into
        their transactions, and only then does Faust commit.
        """
        if not self.app.in_transaction:
            return bool(
                await super().commit(  # type: ignore[misc]
                    topics, start_new_transaction=start_new_transaction
                )
            )
        from agentstream.streams.eos import GATE

        if self._delivery_failed():
            return False
        async with GATE.commit_window(EOS_COMMIT_WAIT_S) as quiet:
            if not quiet:
                # nothing is lost: the open transactions are committed by a later commit
                self.log.warning(
                    "commit skipped: batches still in progress after %.0f s", EOS_COMMIT_WAIT_S
                )
                return False
            # table records Faust buffers itself (ours: streams.tables.writer.flush_pending)
            await self.app.producer.buffer.flush()
            return bool(
                await super().commit(  # type: ignore[misc]
                    topics, start_new_transaction=start_new_transaction
                )
            )

    def _delivery_failed(self: Any) -> bool:
        """An output was refused by the broker, or an agent left a batch unfinished: no
        further offset may be committed."""
        if DELIVERY_FAILURES:
            self.log.error(
                "refusing to commit: %d output record(s) were not delivered or batch(es) "
                "not finished (first: %r)",
                len(DELIVERY_FAILURES),
                DELIVERY_FAILURES[0],
            )
            return True
        return False

    async def _commit(self: Any, offsets: Any) -> bool:
        # After an output could not be delivered, committing any further input offset
        # could acknowledge the input behind the lost output: commit nothing more, and
        # let the crash restart us from the last committed offsets (at-least-once).
        if self._delivery_failed():
            return False
        ok: bool = await super()._commit(offsets)  # type: ignore[misc]
        return ok

    async def _deliver(
        self: Any,
        batch: list[tuple[Any, Any]],
        epoch: int | None = None,
        native: Mapping[Any, list[Any]] | None = None,
    ) -> None:
        """Hand a fetched batch to the streams (Faust's per-record work, see the class).

        `epoch` is the refetch epoch when the fetch that returned `batch` was issued: a
        seek or refetch since (the fetch waited in the consumer thread meanwhile) means
        the batch may come from the position before the seek, and none of it is
        delivered. Delivered after a seek to the committed offset, a record from above
        it made the offsets in between look like a gap with nothing to fetch: counted as
        done, committed, and lost (seen after restarts under both guarantees).
        `native`: records taken from the fetch for the native channels, per partition
        (`_wait_next_records`)."""
        if epoch is None:
            epoch = self._refetch_epoch
        if NATIVE_CHANNELS or native:
            batch = await self._deliver_native(batch, epoch, native)
        callback = self.callback
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        if epoch is None:
            epoch = self._refetch_epoch
        for i, (tp, message) in enumerate(batch, 1):
            try:
                if i % 100 == 0:
                    await asyncio.sleep(0)  # let web views and timers run
                if self._refetch_epoch != epoch:
                    # A seek or clear while this batch waited (the await above, the previous
                    # record's hand-over, or the fetch itself): the read offset below may be
                    # the seek's, and measured against it this record would make the offsets
                    # in between a gap counted as done (seen: 45-224 inputs lost after a
                    # restart). The rest of the batch is fetched again.
                    self.refetch([m for _, m in batch[i - 1 :]])
                    return
                offset = message.offset
                r_offset = get_read_offset(tp)
                if r_offset is None or offset >= r_offset:
                    gap = offset - (r_offset or 0)
                    if gap > 1 and r_offset is not None and acks_enabled_for(message.topic):
                        # offsets no record was fetched for (transaction markers, compaction)
                        # count as done; on a plain input topic a gap means records skipped
                        self.log.info(
                            "%s[%d]: offsets %d..%d not delivered, counted as done",
                            tp.topic,
                            tp.partition,
                            r_offset + 1,
                            offset - 1,
                        )
                        # up to the record before this one: Faust's upstream code passes
                        # `offset`, which counts this record done before it is processed
                        # (a commit could then pass it while a holder keeps it)
                        await self._add_gap(tp, r_offset + 1, offset - 1)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    # checked after the awaits above, right before the record goes out
                    if self._refetch_epoch != epoch:
                        # Queues were just emptied and will be refilled from a lower offset:
                        # delivering the rest now would deliver it twice.
                        self.refetch([m for _, m in batch[i - 1 :]])
                        return
                    self._delivering = message
                    try:
                        await callback(message)
                    finally:
                        self._delivering = None
                    if self._refetch_epoch != epoch:
                        # Queues were cleared (or partitions sought back) while this record was
                        # handed over: it is stale (RefetchingFlowControl.clear) and fetched
                        # again. Its offset must not become the read offset: the seek set that,
                        # and records below it would then be passed over when fetched again
                        # (seen: a restart's refetched records skipped, the commit stuck).
                        self.refetch([m for _, m in batch[i - 1 :]])
                        return
                    set_read_offset(tp, offset)
            except asyncio.CancelledError:
                # a rebalance (suspend_flow), stop or crash at any await of this record's
                # hand-over (the yield every 100 records, a gap, a commit, the callback):
                # it and the rest of the batch did not go out, and the position is past
                # them; they must be fetched again
                self.refetch([m for _, m in batch[i - 1 :]])
                raise

    async def _deliver_native(
        self: Any,
        batch: list[tuple[Any, Any]],
        epoch: int,
        native: Mapping[Any, list[Any]] | None = None,
    ) -> list[tuple[Any, Any]]:
        """The native path (`processing.NATIVE_ENABLED`, design/batch-delivery.md): hand the records
        of topics with a native channel to it as one `FetchedList` per topic, without
        the conductor; returns the records of every other topic, for the per-record path.

        Per topic, as the per-record path does per record: records below the read offset
        are passed over, a gap on an acking topic is counted as done, and the read
        offsets move only once the list is in its channel in the epoch it was fetched in
        (7). A bump before or during the `put` refetches this list (the bump drained it,
        `drain_native_channels`) and the topics after it; a cancel during the `put` does
        too, and the records of the other topics in `batch` with it (none went out yet).
        Flow control and the producer buffer's ebb are waited for once per batch.
        `native` (per partition, taken from the fetch by `_wait_next_records`) joins the
        lists split from `batch` (a record of a topic whose channel was registered after
        its fetch). Not kept on this path: records are not tracked as unacked
        (`wait_empty`, off in this app)."""
        channels = NATIVE_CHANNELS
        rest: list[tuple[Any, Any]] = []
        per_topic: dict[str, dict[Any, list[Any]]] = {}
        for tp, messages in (native or {}).items():
            per_topic.setdefault(tp.topic, {})[tp] = messages
        for tp, message in batch:
            if tp.topic in channels:
                per_topic.setdefault(tp.topic, {}).setdefault(tp, []).append(message)
            else:
                rest.append((tp, message))
        if not per_topic:
            return rest
        topics = list(per_topic.items())

        def refetch_from(i: int, rest: list[tuple[Any, Any]] = rest) -> None:
            self.refetch(
                [m for _, tps in topics[i:] for ms in tps.values() for m in ms]
                + [m for _, m in rest]
            )

        try:
            await self.app.flow_control.acquire()
            await self.app.producer.buffer.wait_until_ebb()
        except asyncio.CancelledError:
            # a rebalance, stop or crash before any list went out: the whole fetch,
            # native and other topics alike, is fetched again (5)
            refetch_from(0)
            raise
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        #: topics[:went] are in their channels; `pending` is the list being put
        went, pending = 0, None
        try:
            for i, (topic, by_tp) in enumerate(topics):
                went = i
                if self._refetch_epoch != epoch:
                    refetch_from(i, [])  # the rest: `_deliver` sees the bump, refetches it
                    return rest
                out: list[Any] = []
                last: dict[Any, int] = {}
                gaps = acks_enabled_for(topic)
                for tp, messages in by_tp.items():
                    r_offset = read_offset.get(tp)
                    for message in messages:
                        offset = message.offset
                        if r_offset is not None and offset < r_offset:
                            continue  # as the per-record path: below the read offset
                        if gaps and r_offset is not None and offset - r_offset > 1:
                            await self._add_gap(tp, r_offset + 1, offset - 1)  # as `_deliver`
                        out.append(message)
                        r_offset = offset
                    if r_offset is not None:
                        last[tp] = r_offset
                if not out:
                    continue
                if self._refetch_epoch != epoch:  # bumped during `_add_gap`
                    refetch_from(i, [])
                    return rest
                channel = channels[topic]
                pending = FetchedList(out, epoch)
                await channel.put(pending)
                pending = None
                went = i + 1
                if self._refetch_epoch != epoch:
                    # bumped while the list was on its way in: that bump drained it (stale,
                    # never handed out); the seek sets the read offsets, not this list
                    refetch_from(i + 1, [])
                    return rest
                for tp, offset in last.items():
                    read_offset[tp] = offset
            went = len(topics)
            commit_every = self._commit_every
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
        except asyncio.CancelledError:
            # a rebalance, stop or crash at an await (a gap counted, a `put` waiting for
            # room, the commit): the lists not in their channels, and the other topics'
            # records of the fetch (none went to the conductor yet), are fetched again; a
            # list cancelled in its `put` never reaches its agent
            if pending is not None:
                pending.stale = True
            refetch_from(went)
            raise
        return rest

    async def _drain_messages(self: Any, fetcher: Any) -> None:  # pragma: no cover - worker
        deliver = self._deliver
        try:
            while not (self._stopped.is_set() or fetcher._stopped.is_set()):
                if self._refetch_from:
                    await self._seek_back_to_dropped()
                self.diag.set_flag(CONSUMER_FETCHING)
                epoch = self._refetch_epoch  # as the fetch is issued (see `_deliver`)
                await self.sleep(0)
                if not self.should_stop:
                    batch, native = await self._fetch()
                    if batch or native:
                        self._handing_over = True
                        try:
                            await self.wait_first(
                                deliver(batch, epoch, native), self.suspend_flow.wait()
                            )
                        finally:
                            self._handing_over = False
                    self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)


def split_fetch(
    records: Mapping[Any, list[Any]], native_topics: Any, readable: Any
) -> tuple[dict[Any, list[Any]], dict[Any, list[Any]]]:
    """A fetch's record map split into (taken, rest): `taken` holds the partitions of
    `native_topics` that are `readable` (active or buffered, as `getmany` filters),
    each with all its records; `rest` every partition of the other topics, for Faust's
    `getmany`. A native partition not readable is in neither: dropped, fetched again
    (`BatchDeliveryConsumer._refetch_undelivered`)."""
    taken: dict[Any, list[Any]] = {}
    rest: dict[Any, list[Any]] = {}
    for tp, tp_records in records.items():
        if tp.topic not in native_topics:
            rest[tp] = tp_records
        elif tp_records and readable(tp):
            taken[tp] = tp_records
    return taken, rest


class _NeverEmpty:
    """A live set of partitions as aiokafka's fetch filter (`if partitions and tp not in
    partitions`): membership as the set has it when records arrive, but never falsy, so
    that no partition becoming paused widens the filter to every partition."""

    __slots__ = ("tps",)

    def __init__(self, tps: Any) -> None:
        self.tps = tps

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: object) -> bool:
        return tp in self.tps


def install_produce_fence() -> None:
    """Make every produce request of this process check first that the event loop has not
    stood still past the session timeout (`streams.processing.check_not_frozen`); after
    such a freeze the request's record batches fail with `WorkerFroze` instead of going
    out (aiokafka's `SendProduceReqHandler.do`, which writes the request, patched once).

    Why: a paused worker (SIGSTOP, a frozen VM) is evicted and its partitions move; on
    waking it restarts before it writes another chain record, but the batches it had
    already handed to the producer would still be sent - after the new owner continued
    the partition's hash chain, forking it. Exactly-once fences them with the
    transaction; at-least-once had nothing. The check is at the last step before the
    request is written, so batches drained or requests created before the freeze are
    fenced too (a request already written before it is on the wire: nothing to do).
    Transactional producers are left alone (see the comment inside)."""
    from aiokafka.producer.sender import SendProduceReqHandler

    if getattr(SendProduceReqHandler.do, "_agentstream_fence", False):
        return
    original = SendProduceReqHandler.do

    @functools.wraps(original)  # __wrapped__: the upgrade contracts read the original
    async def do(self: Any, node_id: Any) -> None:
        from agentstream.streams.processing import WorkerFroze, check_not_frozen

        txn = self._sender._txn_manager
        if txn is not None and txn.transactional_id is not None:
            # exactly-once: the transaction fences a zombie (its successor's producer
            # bumps the epoch); failing its batches here would let a commit already
            # under way send the offsets without them (aiokafka's flush_for_commit
            # waits for failed batches too)
            await original(self, node_id)
            return
        try:
            check_not_frozen()
        except WorkerFroze as exc:
            for batch in self._batches.values():
                batch.failure(exception=exc)
            log.error(
                "not sending %d record batch(es) to broker %s: %s (they would land after "
                "the partitions' new owners' records)",
                len(self._batches),
                node_id,
                exc,
            )
            return
        await original(self, node_id)

    do._agentstream_fence = True  # type: ignore[attr-defined]
    SendProduceReqHandler.do = do


def consumer_thread_class() -> type:
    """The worker consumer's thread: Faust's aiokafka consumer thread with
    `FetchWaitConsumerThread`, `RecoveryOffsetsConsumerThread` and
    `MetadataReadyConsumerThread`."""
    return type(
        "ConsumerThread",
        (
            FetchWaitConsumerThread,
            RecoveryOffsetsConsumerThread,
            MetadataReadyConsumerThread,
            aiokafka_driver.AIOKafkaConsumerThread,
        ),
        {},
    )


def new_transport(app: Any) -> Any:
    """The worker's transport (`AgentStreamApp._new_transport`): Faust's aiokafka
    transport, its consumer a `BatchDeliveryConsumer` on a `consumer_thread_class`
    thread, its producer an `IdempotentProducer`."""
    install_produce_fence()
    # what aiokafka cannot parse reaches the agents as stand-ins to dead-letter (15); an
    # app `create_app` did not make (no settings of ours) keeps the default limit
    settings = getattr(app, "agentstream_settings", None)
    if settings is not None:
        record_batches.install(
            settings.max_decompressed_batch_bytes, settings.max_compression_ratio
        )
    else:
        record_batches.install()
    base = by_url(app.conf.broker_consumer[0])
    if not issubclass(base, aiokafka_driver.Transport):
        raise ValueError(f"unsupported broker transport: {app.conf.broker_consumer[0]}")
    thread = consumer_thread_class()

    def new_thread(consumer: Any) -> Any:
        return thread(consumer, loop=consumer.loop, beacon=consumer.beacon)

    consumer = type(
        "Consumer",
        (BatchDeliveryConsumer, base.Consumer),
        {"_new_consumer_thread": new_thread},
    )
    producer = type("Producer", (IdempotentProducer, base.Producer), {})
    return type("Transport", (base,), {"Consumer": consumer, "Producer": producer})(
        app.conf.broker_consumer, app
    )


class IdempotentProducer:
    """Faust's producer, idempotent under at-least-once too (Faust turns idempotence on
    only with exactly-once; Kafka's own clients have it on by default since 3.0).

    Without it a produce request whose response was lost (a reset connection, a broker
    failing over) is sent again and written twice: a duplicate decision in the signed
    hash chain, which `audit verify` rightly reports as inserted (chaos network_reset).
    With it the broker drops the retry by its producer id and sequence number. Outputs
    repeated because their input is processed again after a crash are still possible:
    that is what at-least-once means, and consumers deduplicate on the event id."""

    def _settings_extra(self) -> Any:
        extra = dict(super()._settings_extra())  # type: ignore[misc]
        extra.setdefault("acks", "all")
        extra.setdefault("enable_idempotence", True)
        return extra


class FetchedList:
    """The records of one topic from one fetch, on their way to the topic's native
    agent (`streams.processing`), in per-partition offset order.

    `taken` counts the records the agent has taken so far (it takes a list in chunks of
    `batch_max`); `stale` is set when a refetch drained the rest (`NativeChannel.drain`),
    which the agent then never hands out."""

    __slots__ = ("epoch", "messages", "stale", "taken")

    def __init__(self, messages: list[Any], epoch: int) -> None:
        self.messages = messages
        #: the refetch epoch the records were fetched in
        self.epoch = epoch
        self.taken = 0
        self.stale = False

    def untaken(self) -> list[Any]:
        return self.messages[self.taken :]


class NativeChannel:
    """One topic's records on their way to its native agent: a bounded queue of
    `FetchedList`s (the bound is the backpressure on the consumer) that knows every
    record not yet taken, wherever it is: on its way in (`putting`), queued, or the
    rest of the list the agent holds (`holding`). A refetch takes them all at once
    (`drain`), so that none is handed out after the partitions are sought back."""

    def __init__(self, capacity: int) -> None:
        self._queue: asyncio.Queue[FetchedList] = asyncio.Queue(capacity)
        #: the list the consumer is putting (a `put` waiting for room)
        self.putting: FetchedList | None = None
        #: the list the agent is taking chunks of
        self.holding: FetchedList | None = None

    async def put(self, fetched: FetchedList) -> None:
        self.putting = fetched
        try:
            await self._queue.put(fetched)
        finally:
            self.putting = None

    async def get(self) -> FetchedList:
        """The next list that is not stale; the agent holds it until `release`."""
        while True:
            fetched = await self._queue.get()
            if not fetched.stale:
                self.holding = fetched
                return fetched

    def get_nowait(self) -> FetchedList | None:
        """The next list that is not stale, if one is queued (stale ones are dropped);
        the agent holds it until `release`."""
        while not self._queue.empty():
            fetched = self._queue.get_nowait()
            if not fetched.stale:
                self.holding = fetched
                return fetched
        return None

    def release(self, fetched: FetchedList) -> None:
        if self.holding is fetched:
            self.holding = None

    def qsize(self) -> int:
        return self._queue.qsize()

    def drain(self) -> list[Any]:
        """Every record not yet taken, its list marked stale; the queue is emptied."""
        lists = []
        while not self._queue.empty():
            lists.append(self._queue.get_nowait())
        lists.extend(x for x in (self.putting, self.holding) if x is not None)
        dropped: list[Any] = []
        for fetched in lists:
            if not fetched.stale:
                fetched.stale = True
                dropped.extend(fetched.untaken())
        return dropped


def drain_native_channels() -> list[tuple[Any, int]]:
    """(partition, offset) of every record in the native channels not yet taken by its
    agent; they are dropped (`NativeChannel.drain`) and must be fetched again."""
    return [(m.tp, m.offset) for channel in NATIVE_CHANNELS.values() for m in channel.drain()]


#: topic name → the channel its one native agent takes record lists from
NATIVE_CHANNELS: dict[str, NativeChannel] = {}


#: per agent stream, `streams.processing.event_batches`' marks {partition: (consumer
#: generation, highest offset handed to the agent)}, shown by the task dump
HANDED_MARKS: dict[str, dict[Any, tuple[int, int]]] = {}


def marks_key(stream: Any) -> str:
    """The key of `stream`'s marks in `HANDED_MARKS` (its label, else its identity)."""
    return str(getattr(stream, "shortlabel", None) or id(stream))


def offset_runs(offsets: Any) -> str:
    """`n a..b c..d (+k repeated)`: acked offsets as runs, so a gap shows."""
    values = sorted(offsets)
    if not values:
        return "0"
    runs: list[str] = []
    start = prev = values[0]
    repeated = 0
    for v in values[1:]:
        if v == prev:
            repeated += 1
            continue
        if v != prev + 1:
            runs.append(f"{start}..{prev}")
            start = v
        prev = v
    runs.append(f"{start}..{prev}")
    extra = f" (+{repeated} repeated)" if repeated else ""
    return f"{len(values)} {' '.join(runs[:20])}{' ...' if len(runs) > 20 else ''}{extra}"


def consumer_state(app: Any) -> list[str]:
    """The worker's consumer, for the SIGUSR2 task dump (`streams.diagnostics`). Per
    assigned partition: paused in Faust / in aiokafka, aiokafka's fetch position
    and highwater, records fetched but not yet handed to a stream, Faust's committed and
    read offsets and acked offsets not yet committed (read from the consumer thread's
    objects without locking: a diagnosis, not a decision); then what each agent was
    handed and the exactly-once commit gate."""
    from agentstream.streams.eos import GATE

    consumer: Any = app.consumer
    aio = consumer._thread._ensure_consumer()
    assignment = aio._subscription.subscription.assignment
    fetched = aio._fetcher._records
    faust_paused = set(consumer._paused_partitions)
    aio_paused = set(aio.paused())
    lines = [
        f"CONSUMER generation {app.consumer_generation_id}; topic[partition] faust_paused "
        "aiokafka_paused position highwater fetched committed read acked(n runs)"
    ]
    for tp in sorted(assignment.tps):
        state = assignment.state_value(tp)
        ftp = TP(tp.topic, tp.partition)
        span = offset_runs(consumer._acked.get(ftp, ()))
        lines.append(
            f"    {tp.topic}[{tp.partition}] {ftp in faust_paused} "
            f"{tp in aio_paused} {state.position if state.has_valid_position else None} "
            f"{state.highwater} {tp in fetched} {consumer._committed_offset.get(ftp)} "
            f"{consumer._read_offset.get(ftp)} {span}"
        )
    lines.append(f"UNACKED {len(consumer._unacked_messages)} message(s)")
    lines.append(f"COMMITTED BY THIS WORKER {consumer._committed_high}")
    for stream, marks in HANDED_MARKS.items():
        handed = ", ".join(f"{tp.topic}[{tp.partition}]={m[1]}@{m[0]}" for tp, m in marks.items())
        lines.append(f"HANDED {stream}: {handed or '-'}")
    for topic, channel in NATIVE_CHANNELS.items():
        holding = channel.holding
        rest = len(holding.messages) - holding.taken if holding is not None else 0
        lines.append(
            f"NATIVE {topic}: {channel.qsize()} list(s) queued, {rest} record(s) held untaken"
        )
    lines.append(f"GATE active {GATE.active} committing {GATE.committing}")
    return lines
