"""Records Faust fetched and then dropped — wiped from stream queues by
`flow_control.resume()`, or not handed out by `getmany` — must be fetched again, not left
behind the consumer position (with no committed offset nothing else rewinds to them).

The end-to-end case (a quick restart after a crash, before any commit) is
timing-dependent: `test_delivery_failure` runs it against the broker. These check the
mechanism itself on the app's real flow control, queues and consumer, deterministically."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP, Message

from agentstream.streams.app import app
from agentstream.streams.delivery import STALE_DELIVERIES, RefetchingFlowControl
from tests.support import await_until

TOPIC = "redelivery.agent.messages"


def _event(partition: int, offset: int) -> object:
    message = Message(TOPIC, partition, offset, 0.0, 0, None, None, b"v", None, generation_id=1)
    return app.create_event(None, b"v", {}, message)


def test_resume_hands_dropped_records_back_to_the_consumer() -> None:
    assert isinstance(app.flow_control, RefetchingFlowControl)
    consumer = app.consumer
    consumer._refetch_from = None
    epoch = consumer._refetch_epoch
    queue = app.FlowControlQueue(maxsize=0, clear_on_resume=True)
    other = app.FlowControlQueue(maxsize=0, clear_on_resume=True)
    for partition, offset in [(1, 7), (1, 5), (1, 9), (0, 3)]:
        queue.put_nowait(_event(partition, offset))
    other.put_nowait(_event(1, 4))

    app.flow_control.resume()

    assert queue.empty() and other.empty()
    # the lowest dropped offset of each partition, across all queues
    assert consumer._refetch_from == {TP(TOPIC, 1): 4, TP(TOPIC, 0): 3}
    # a batch being delivered stops, so its rest is not delivered twice
    assert consumer._refetch_epoch > epoch

    # nothing dropped, nothing to fetch again
    consumer._refetch_from = None
    epoch = consumer._refetch_epoch
    app.flow_control.resume()
    assert consumer._refetch_from is None and consumer._refetch_epoch == epoch


def _record(partition: int, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(TOPIC, partition, offset, 0, 0, None, b"v", None, 0, 1, [])


def test_records_fetched_but_not_handed_out_are_fetched_again() -> None:
    # Faust's getmany drops what it fetched for a partition paused meanwhile (or when flow
    # stops, or the generation changes): the consumer position is already past them.
    consumer = app.consumer
    consumer._refetch_from = None
    p0, p1 = TP(TOPIC, 0), TP(TOPIC, 1)
    fetched = {p0: [_record(0, 10), _record(0, 11)], p1: [_record(1, 3), _record(1, 4)]}
    handed_out = [(p0, fetched[p0][0])]

    consumer._refetch_undelivered(fetched, handed_out)

    assert consumer._refetch_from == {p0: 11, p1: 3}


async def test_a_record_delivered_across_a_clear_is_fetched_again_not_handed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Faust's on_message can await (flow control, the producer buffer ebbing) before it
    # puts a record into the stream queues; a clear meanwhile drops the records before it
    # and the record lands in the queue after them. Handed out, it would make the
    # refetched records before it look like copies already handed (never processed).
    consumer = app.consumer
    consumer._refetch_from = None
    tp = TP(TOPIC, 0)
    consumer._read_offset.pop(tp, None)
    queue = app.FlowControlQueue(maxsize=0, clear_on_resume=True)
    for offset in (3, 4):  # delivered earlier, not yet read by the agent
        queue.put_nowait(_event(0, offset))
    ebb = asyncio.Event()
    put: list[int] = []

    async def on_message(message: Message) -> None:
        await ebb.wait()
        queue.put_nowait(app.create_event(None, b"v", {}, message))
        put.append(message.offset)

    monkeypatch.setattr(consumer, "callback", on_message)
    batch = [
        (tp, Message(TOPIC, 0, o, 0.0, 0, None, None, b"v", None, generation_id=1)) for o in (5, 6)
    ]
    delivery = asyncio.create_task(consumer._deliver(batch))
    await await_until(
        lambda: consumer._delivering is batch[0][1], 2, interval=0.01, what="delivery under way"
    )

    # recovery seeks the partition back (Faust's perform_seek sets the read offset),
    # then resumes flow: the queues are cleared
    consumer._read_offset[tp] = 2
    app.flow_control.resume()
    ebb.set()
    await asyncio.wait_for(delivery, 2)

    assert put == [5]  # the record under way went out; the rest of the batch did not
    [late] = [item.message for item in queue._queue]
    assert late.offset == 5 and late in STALE_DELIVERIES
    # everything from the lowest dropped offset is fetched again, the late record too
    assert consumer._refetch_from == {tp: 3}
    assert consumer._delivering is None
    # and the seek's read offset stands: had the late record's offset become the read
    # offset, the refetched 3 and 4 would be passed over as already delivered
    assert consumer._read_offset[tp] == 2


def _record_delivery(
    monkeypatch: pytest.MonkeyPatch, after: Callable[[Message], None] | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """The offsets `_deliver` hands to the streams (then calls `after`), and the gaps it
    counts as done, on a topic with acks on (as the agents' input topics are)."""
    consumer = app.consumer
    handed: list[int] = []
    gaps: list[tuple[int, int]] = []

    async def on_message(message: Message) -> None:
        handed.append(message.offset)
        if after is not None:
            after(message)

    async def add_gap(tp: TP, start: int, end: int) -> None:
        gaps.append((start, end))

    monkeypatch.setattr(consumer, "callback", on_message)
    monkeypatch.setattr(consumer, "_add_gap", add_gap)
    monkeypatch.setattr(app.topics, "acks_enabled_for", lambda topic: True)
    return handed, gaps


async def test_a_batch_fetched_before_a_seek_is_not_delivered_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A restarted worker's fetcher runs during recovery, from the position it was
    # assigned at; recovery then seeks to the committed offset (951 here). A fetch issued
    # before the seek can return after it, with records from above (1078): delivered,
    # the read offset (951) made 952..1077 look like a gap with nothing to fetch, Faust
    # counted them as done and committed past them, and the agent, whose mark was then
    # 1078, skipped them as copies when they came again: 126 inputs never decided.
    consumer = app.consumer
    consumer._refetch_from = None
    tp = TP(TOPIC, 1)
    handed, gaps = _record_delivery(monkeypatch)
    epoch = consumer._refetch_epoch  # the fetch is issued
    consumer._read_offset[tp] = 951  # recovery's seek to the committed offset ...
    consumer._refetch_epoch += 1  # ... bumps the epoch (perform_seek)
    batch = [(tp, Message(TOPIC, 1, 1078, 0.0, 0, None, None, b"v", None, generation_id=1))]

    await asyncio.wait_for(consumer._deliver(batch, epoch), 2)

    assert handed == [] and gaps == []
    assert consumer._read_offset[tp] == 951
    # noted for a refetch, which never seeks forward: the position after the seek
    # (951) is below it, so the consumer simply fetches on from 951
    assert consumer._refetch_from == {tp: 1078}

    # a batch from a fetch issued after the seek is delivered
    consumer._refetch_from = None
    fresh = [(tp, Message(TOPIC, 1, 951, 0.0, 0, None, None, b"v", None, generation_id=1))]
    await asyncio.wait_for(consumer._deliver(fresh, consumer._refetch_epoch), 2)
    assert handed == [951] and gaps == []


async def test_a_seek_while_a_batch_is_delivered_leaves_no_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A batch of 150 records yields to the loop every 100: recovery's seek to the
    # committed offset (read offset 951, epoch bumped) lands in that pause. Measured
    # against the new read offset, record 1099 made 952..1098 a gap counted as done.
    consumer = app.consumer
    consumer._refetch_from = None
    tp = TP(TOPIC, 2)
    consumer._read_offset[tp] = 999
    loop = asyncio.get_running_loop()

    def seek() -> None:
        consumer._read_offset[tp] = 951
        consumer._refetch_epoch += 1

    def after(message: Message) -> None:
        if message.offset == 1098:
            loop.call_soon(seek)  # runs in the pause before record 1099

    handed, gaps = _record_delivery(monkeypatch, after)
    batch = [
        (tp, Message(TOPIC, 2, o, 0.0, 0, None, None, b"v", None, generation_id=1))
        for o in range(1000, 1150)
    ]
    await asyncio.wait_for(consumer._deliver(batch, consumer._refetch_epoch), 2)

    assert handed == list(range(1000, 1099)) and gaps == []
    assert consumer._read_offset[tp] == 951  # the seek's
    assert consumer._refetch_from == {tp: 1099}


async def test_a_commit_the_broker_does_not_show_yet_is_not_forgotten_by_the_seek(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Recovery seeks to the committed offsets after the agents already ran: under
    # exactly-once the broker answers the offset from before a commit whose transaction
    # markers are not written yet. Taken as committed, it left Faust waiting for acks of
    # records the agents skip as copies: no further commit, every output held back.
    consumer = app.consumer
    tp = TP(TOPIC, 1)
    monkeypatch.setattr(consumer, "assignment", lambda: {tp})
    monkeypatch.setattr(FaustConsumer, "_commit_offsets", _committed_upstream)
    await consumer._commit_offsets({tp: 1521})  # records up to 1520 processed, committed

    async def stale(*partitions: Any) -> dict[TP, int]:
        return {tp: 1473}

    monkeypatch.setattr(consumer, "seek_to_committed", stale)
    await consumer.perform_seek()

    assert consumer._committed_offset[tp] == 1521
    assert consumer._read_offset[tp] == 1473  # the position Faust sought to (copies follow)
    # the agents ack what follows the commit (the copies below it are skipped unacked):
    # the next commit goes on from there
    consumer._acked[tp].extend(range(1521, 1526))
    consumer._acked_index[tp].update(range(1521, 1526))
    assert consumer._new_offset(tp) == 1526

    # an answer newer than this worker's own commit (another worker's) stands
    async def newer(*partitions: Any) -> dict[TP, int]:
        return {tp: 1600}

    monkeypatch.setattr(consumer, "seek_to_committed", newer)
    await consumer.perform_seek()
    assert consumer._committed_offset[tp] == 1600

    # a revoked partition's commits no longer count (Faust's own part, which drives the
    # whole app through a rebalance, is not the point here)
    monkeypatch.setattr(FaustConsumer, "on_partitions_revoked", _revoked_upstream)
    await consumer.on_partitions_revoked({tp})
    assert not consumer._committed_high


async def _committed_upstream(self: Any, offsets: Any, start_new_transaction: bool = True) -> bool:
    self._committed_offset.update(offsets)
    return True


async def _revoked_upstream(self: Any, revoked: Any) -> None:
    return None
