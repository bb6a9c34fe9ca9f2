"""Commit bookkeeping the worker's consumer gets right where Faust's alone does not.

Holds (delivery invariant 1): an LLM call holds its request's record until the final
response is out (`hold`, `release`). Calls finish in any order, so a later request of a
partition can be acked while an earlier one is still held. Faust's own
`Consumer._new_offset` then commits past the held one when it is at the partition's
head (it reads its committed offset, the next one to read, as the last one processed)
or before the partition's first commit: a crash before that call answers loses the
request.

Gaps after offset 0 (delivery invariant 7): offsets between two delivered records that
hold none (transaction markers, aborted records, compaction) count as done; after a
record at offset 0 they were never noted, and the partition stopped committing.

Late acks (delivery invariant 1): a record taken before a revoke and acked after it
(a batch or a call that finished late) counts for nothing: Faust emptied the
partition's bookkeeping at the revoke, and a late ack there let a commit pass records
never processed once the partition came back.

These tests use Faust's real consumer bookkeeping and messages under the worker's
consumer class.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.consumer import ConsumerMessage
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP
from intervaltree import IntervalTree

from agentstream.streams.delivery import HOLDS, BatchDeliveryConsumer
from agentstream.streams.processing import hold, release

TOPIC = "llm.requests"
PART = TP(TOPIC, 0)


class _Topics:
    def acks_enabled_for(self, topic: str) -> bool:
        return True


class _App:
    topics = _Topics()
    consumer_generation_id = 1


class Consumer(BatchDeliveryConsumer, AIOKafkaConsumer):  # type: ignore[misc]
    """The worker's consumer class (as `new_transport` builds it), with only the
    ack/commit bookkeeping `Consumer.ack` and `_new_offset` read (no Kafka, no service)."""

    def __init__(self, committed: int | None) -> None:  # Faust's __init__ starts services
        self.app = _App()
        self._acked: dict[Any, list[int]] = defaultdict(list)
        self._acked_index: dict[Any, set[int]] = defaultdict(set)
        self._gap: dict[Any, IntervalTree] = defaultdict(IntervalTree)
        self._committed_offset: dict[Any, int | None] = defaultdict(lambda: None)
        self._committed_offset[PART] = committed
        self._unacked_messages: set[Any] = set()
        self._n_acked = 0
        self._waiting_for_ack: Any = None


def record(offset: int, generation: int = 1) -> ConsumerMessage:
    """A fetched record as its batch has it: one reference, the batch's."""
    m = ConsumerMessage(
        TOPIC, 0, offset, 0.0, 0, [], b"k", b"v", None, 1, 1, PART, generation_id=generation
    )
    m.refcount = 1
    return m


def batch_done(consumer: Consumer, *messages: ConsumerMessage) -> None:
    """The batch comes back for the next one: its own reference is released."""
    for m in messages:
        m.ack(consumer)


@pytest.fixture(autouse=True)
def no_holds() -> Iterator[None]:
    HOLDS.forget(list(HOLDS._by_tp))
    yield
    HOLDS.forget(list(HOLDS._by_tp))


def test_faust_alone_commits_past_a_record_held_at_the_head() -> None:
    # why the override exists; should Faust fix its check, this fails and says so
    c = Consumer(committed=10)
    c._acked[PART] = [11]
    c._acked_index[PART] = {11}
    assert FaustConsumer._new_offset(c, PART) == 12


def test_no_commit_passes_a_request_whose_call_is_still_running() -> None:
    c = Consumer(committed=10)
    first, second = record(10), record(11)
    hold(first)  # each request's call starts in the batch
    hold(second)
    batch_done(c, first, second)
    assert c._acked[PART] == [] and HOLDS.floor(PART) == 10
    assert release(second, c) is True  # the second call answers first
    assert c._acked[PART] == [11]
    assert c._new_offset(PART) is None  # Faust alone: 12, past the running call
    assert c._acked[PART] == [11]  # kept for a later commit
    assert release(first, c) is True
    assert HOLDS.floor(PART) is None
    assert c._new_offset(PART) == 12


def test_before_the_first_commit_no_commit_passes_a_held_record() -> None:
    # Faust checks nothing at all while its committed offset is None (or 0)
    for committed in (None, 0):
        c = Consumer(committed=committed)
        held, done1, done2 = record(0), record(1), record(2)
        hold(held)
        batch_done(c, held, done1, done2)
        assert c._acked[PART] == [1, 2]
        assert c._new_offset(PART) is None
        release(held, c)
        assert c._new_offset(PART) == 3


def test_offsets_up_to_the_held_one_commit_and_those_above_it_wait() -> None:
    c = Consumer(committed=10)
    ms = [record(o) for o in range(10, 14)]
    hold(ms[2])  # 12 held
    batch_done(c, *ms)
    assert c._acked[PART] == [10, 11, 13]
    assert c._new_offset(PART) == 12  # the next to read is the held record
    assert c._acked[PART] == [13]
    c._committed_offset[PART] = 12
    assert c._new_offset(PART) is None
    release(ms[2], c)
    assert c._new_offset(PART) == 14


def test_a_record_held_twice_stays_held_until_both_release() -> None:
    c = Consumer(committed=5)
    m, later = record(5), record(6)
    hold(m)
    hold(m)
    batch_done(c, m, later)
    release(m, c)
    assert HOLDS.floor(PART) == 5 and c._new_offset(PART) is None
    release(m, c)
    assert HOLDS.floor(PART) is None and c._new_offset(PART) == 7


def test_a_revoke_forgets_the_holds_of_the_partitions_it_takes() -> None:
    other = TP(TOPIC, 1)
    m = record(3)
    hold(m)
    HOLDS.forget({other})
    assert HOLDS.floor(PART) == 3
    HOLDS.forget({PART})  # the call is cancelled unacked; its next owner answers it
    assert HOLDS.floor(PART) is None and len(HOLDS) == 0


def test_releases_from_threads_keep_the_count() -> None:
    # Message.ack may run on another thread (Faust's ack_lock); the notes must not drift
    c = Consumer(committed=0)
    ms = [record(o) for o in range(200)]
    for m in ms:
        hold(m)
    batch_done(c, *ms)
    threads = [
        threading.Thread(target=lambda part=ms[i::4]: [release(m, c) for m in part])
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(HOLDS) == 0 and c._new_offset(PART) == 200


def delivering(delivered: list[ConsumerMessage]) -> Consumer:
    """A consumer before its first commit whose `_deliver` hands records to `delivered`."""
    c = Consumer(committed=None)
    c._read_offset = defaultdict(lambda: None)
    c._commit_every = None
    c._refetch_epoch = 0
    c.log = logging.getLogger("test.commit")

    async def callback(message: ConsumerMessage) -> None:
        delivered.append(message)

    c.callback = callback
    return c


async def test_a_gap_after_a_record_at_offset_0_counts_as_done() -> None:
    # record 0, a commit marker at 1, an aborted transaction at 2-3 (read_committed
    # delivers none of them), records from 4 on
    delivered: list[ConsumerMessage] = []
    c = delivering(delivered)
    await c._deliver([(PART, record(o)) for o in (0, 4, 5, 6)])
    assert [m.offset for m in delivered] == [0, 4, 5, 6]
    batch_done(c, *delivered)
    # without the gap noted: 1 committed, then nothing ever again (min(acked) 4 - 1 > 1)
    assert c._new_offset(PART) == 7


async def test_a_gap_never_counts_the_record_after_it_done() -> None:
    # 0 delivered, 1-3 hold no record, 4 delivered and held by its call, 5 answered:
    # Faust's own `_add_gap(tp, 1, 4)` counted 4 as done with the gap, and the gap's
    # merge then committed 5, past the held record
    c = delivering([])
    ms = {o: record(o) for o in (0, 4, 5)}
    await c._deliver(list((PART, m) for m in ms.values()))
    hold(ms[4])
    batch_done(c, *ms.values())
    # not past the held record (the gap before it waits with it: Faust merges only the
    # gaps below the highest offset it is given)
    assert c._new_offset(PART) == 1
    release(ms[4], c)
    assert c._new_offset(PART) == 6


async def test_a_late_ack_of_a_revoked_partitions_record_counts_for_nothing() -> None:
    c = Consumer(committed=10)
    held, answered = record(10), record(11)
    hold(held)
    hold(answered)
    batch_done(c, held, answered)
    HOLDS.forget({PART})  # the revoke: its calls are cancelled, Faust empties the rest
    c._revoked_since_assign = {PART}
    c._acked.pop(PART, None)
    c._acked_index.pop(PART, None)
    c._committed_offset.pop(PART, None)
    release(answered, c)  # its table write came after the revoke
    assert c._acked.get(PART, []) == []
    # the partition comes back (a new generation), before recovery seeks: nothing to
    # commit, where the late ack made Faust commit 12 past the cancelled call's 10
    c._revoked_since_assign.discard(PART)
    _App.consumer_generation_id = 2
    try:
        assert c._new_offset(PART) is None
        again = record(10, generation=2)  # consumed again from the committed offset
        batch_done(c, again)
        c._committed_offset[PART] = 10
        assert c._new_offset(PART) == 11
    finally:
        _App.consumer_generation_id = 1
