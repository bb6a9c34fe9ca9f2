"""No commit passes a record held past its batch (delivery invariant 1).

An LLM call holds its request's record until the final response is out (`hold`,
`release`). Calls finish in any order, so a later request of a partition can be acked
while an earlier one is still held. Faust's own `Consumer._new_offset` then commits past
the held one when it is at the partition's head (it reads its committed offset, the next
one to read, as the last one processed) or before the partition's first commit: a crash
before that call answers loses the request. These tests use Faust's real consumer
bookkeeping and messages under `BatchDeliveryConsumer._new_offset`.
"""

from __future__ import annotations

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


def record(offset: int) -> ConsumerMessage:
    """A fetched record as its batch has it: one reference, the batch's."""
    m = ConsumerMessage(TOPIC, 0, offset, 0.0, 0, [], b"k", b"v", None, 1, 1, PART)
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
