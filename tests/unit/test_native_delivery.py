"""The experimental batch-native delivery path: fetched records reach an agent as lists
through a `NativeChannel`, and no record waiting in a channel survives a refetch.

The model (streams/delivery.py, invariants 5-8; docs/design/batch-delivery.md, 3): a
refetch or seek bumps the refetch epoch and the partitions are sought back to the lowest
dropped offset. A record still in a channel at that moment — queued, on its way in, or
the untaken rest of the list the agent holds — must not be handed out afterwards: the
agent's handed mark would then pass over the refetched records below it, which are
never processed. So the bump drains the channels into the refetch, in the same step.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest

from agentstream.streams import delivery, processing
from agentstream.streams.delivery import (
    NATIVE_CHANNELS,
    BatchDeliveryConsumer,
    FetchedList,
    NativeChannel,
)
from agentstream.streams.processing import _native_batches, _native_channel

#: a deadline for what must happen now; never reached when the code is right
SOON_S = 5.0


class TP(NamedTuple):
    topic: str
    partition: int


@dataclass(eq=False)
class Msg:
    topic: str
    partition: int
    offset: int
    generation_id: int = 1
    acked: bool = False

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


class FlowControl:
    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active

    async def acquire(self) -> None:
        return None


class Buffer:
    async def wait_until_ebb(self) -> None:
        return None


class Topics:
    def acks_enabled_for(self, topic: str) -> bool:
        return True


class App:
    def __init__(self) -> None:
        self.flow_control = FlowControl()
        self.producer = type("Producer", (), {"buffer": Buffer()})()
        self.topics = Topics()
        self.consumer_generation_id = 1
        self.monitor = None
        self.agents: dict[str, Any] = {}
        self.consumer: Consumer


class Consumer(BatchDeliveryConsumer):
    """The consumer's bookkeeping as Faust keeps it, around the real delivery code."""

    def __init__(self, app: App) -> None:
        self.app = app
        app.consumer = self
        self._read_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        self._committed_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set)
        self._acked: defaultdict[TP, list[int]] = defaultdict(list)
        self._waiting_for_ack = None
        self._commit_every = None
        self._n_acked = 0
        self.gaps: list[tuple[TP, int, int]] = []
        self.log = logging.getLogger("test.native")

    def _is_changelog_tp(self, tp: Any) -> bool:
        return False

    async def _add_gap(self, tp: TP, start: int, end: int) -> None:
        self.gaps.append((tp, start, end))

    async def commit(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def assignment(self) -> set[TP]:
        return {TP("in", 0), TP("in", 1), TP("other", 0)}

    async def position(self, tp: TP) -> int:
        return (self._read_offset[tp] or 0) + 1  # past everything fetched

    async def seek(self, tp: TP, offset: int) -> None:
        self._read_offset[tp] = offset if offset else None  # as Faust's Consumer.seek


class Stream:
    def __init__(self, app: App, topic: str = "in") -> None:
        self.app = app
        self.channel = type("Channel", (), {"topics": (topic,)})()
        self.should_stop = False
        self.shortlabel = f"native-{topic}"

    async def maybe_start(self) -> bool:
        return False


@pytest.fixture
def channel() -> Any:
    NATIVE_CHANNELS.clear()
    NATIVE_CHANNELS["in"] = ch = NativeChannel(2)
    yield ch
    NATIVE_CHANNELS.clear()


@pytest.fixture
def consumer() -> Consumer:
    return Consumer(App())


def records(offsets: range | list[int], topic: str = "in", partition: int = 0) -> list[Any]:
    return [(TP(topic, partition), Msg(topic, partition, o)) for o in offsets]


def offsets_of(batch: list[Any]) -> list[tuple[int, int]]:
    return [(m.partition, m.offset) for m in batch]


async def test_a_batch_is_split_by_topic_in_partition_order(
    consumer: Consumer, channel: NativeChannel
) -> None:
    other = records([7, 8], topic="other")
    batch = records([0, 1], partition=1) + other[:1] + records([0, 1, 2]) + other[1:]
    rest = await consumer._deliver_native(batch, consumer._refetch_epoch)
    assert [m for _, m in rest] == [m for _, m in other]  # the per-record path's share
    fetched = await channel.get()
    assert offsets_of(fetched.messages) == [(1, 0), (1, 1), (0, 0), (0, 1), (0, 2)]
    assert consumer._read_offset[TP("in", 0)] == 2
    assert consumer._read_offset[TP("in", 1)] == 1


async def test_records_below_the_read_offset_are_passed_over_and_a_gap_counts_as_done(
    consumer: Consumer, channel: NativeChannel
) -> None:
    consumer._read_offset[TP("in", 0)] = 5
    await consumer._deliver_native(records([3, 4, 5, 6, 9]), consumer._refetch_epoch)
    fetched = await channel.get()
    assert offsets_of(fetched.messages) == [(0, 5), (0, 6), (0, 9)]
    assert consumer.gaps == [(TP("in", 0), 7, 9)]
    assert consumer._read_offset[TP("in", 0)] == 9


async def test_a_refetch_drains_the_queued_lists_into_it(
    consumer: Consumer, channel: NativeChannel
) -> None:
    await consumer._deliver_native(records(range(10, 20)), consumer._refetch_epoch)
    await consumer._deliver_native(records(range(20, 30)), consumer._refetch_epoch)
    # another agent drops a record (flow stopped): every partition may be sought back
    consumer.refetch([Msg("other", 0, 100)])
    assert consumer._refetch_from == {TP("other", 0): 100, TP("in", 0): 10}
    assert channel.qsize() == 0
    agent = _native_batches(Stream(consumer.app), channel, 100)
    await consumer._seek_back_to_dropped()
    await consumer._deliver_native(records(range(10, 13)), consumer._refetch_epoch)
    first = await asyncio.wait_for(agent.__anext__(), SOON_S)
    assert offsets_of(first) == [(0, 10), (0, 11), (0, 12)]  # the refetched copies, once
    await agent.aclose()


async def test_a_refetch_takes_the_untaken_rest_of_the_list_the_agent_holds(
    consumer: Consumer, channel: NativeChannel
) -> None:
    agent = _native_batches(Stream(consumer.app), channel, 4)
    await consumer._deliver_native(records(range(10)), consumer._refetch_epoch)
    first = await asyncio.wait_for(agent.__anext__(), SOON_S)
    assert offsets_of(first) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    consumer.refetch([Msg("other", 0, 0)])  # while the agent works on its first chunk
    assert consumer._refetch_from is not None
    assert consumer._refetch_from[TP("in", 0)] == 4  # not 0..3: the agent has those
    await consumer._seek_back_to_dropped()
    await consumer._deliver_native(records(range(4, 6)), consumer._refetch_epoch)
    second = await asyncio.wait_for(agent.__anext__(), SOON_S)
    assert offsets_of(second) == [(0, 4), (0, 5)]
    assert consumer._acked[TP("in", 0)] == [0, 1, 2, 3]  # the first chunk, acked
    await agent.aclose()


async def test_a_refetch_during_a_blocked_put_leaves_that_list_unhanded_and_unread(
    consumer: Consumer, channel: NativeChannel
) -> None:
    epoch = consumer._refetch_epoch
    await consumer._deliver_native(records(range(0, 5)), epoch)
    await consumer._deliver_native(records(range(5, 10)), epoch)
    blocked = asyncio.ensure_future(
        consumer._deliver_native(records(range(10, 15)) + records([1], "in", 1), epoch)
    )
    while channel.putting is None:  # the channel is full: the third list waits for room
        await asyncio.sleep(0)
    consumer.refetch([Msg("other", 0, 0)])
    assert consumer._refetch_from is not None
    assert consumer._refetch_from[TP("in", 0)] == 0
    assert consumer._refetch_from[TP("in", 1)] == 1
    await asyncio.wait_for(blocked, SOON_S)  # the drain made room; the list is stale
    assert consumer._read_offset[TP("in", 0)] == 9  # not 14: the seek sets it
    assert consumer._read_offset[TP("in", 1)] is None
    agent = _native_batches(Stream(consumer.app), channel, 100)
    await consumer._seek_back_to_dropped()
    await consumer._deliver_native(records(range(0, 2)), consumer._refetch_epoch)
    first = await asyncio.wait_for(agent.__anext__(), SOON_S)
    assert offsets_of(first) == [(0, 0), (0, 1)]
    await agent.aclose()


async def test_a_fetch_from_before_a_bump_is_refetched_whole(
    consumer: Consumer, channel: NativeChannel
) -> None:
    epoch = consumer._refetch_epoch
    consumer.refetch([Msg("other", 0, 0)])  # a seek while the fetch waited
    rest = await consumer._deliver_native(records(range(3)) + records([4], "other"), epoch)
    assert len(rest) == 1
    assert channel.qsize() == 0
    assert consumer._refetch_from is not None
    assert consumer._refetch_from[TP("in", 0)] == 0
    assert consumer._read_offset[TP("in", 0)] is None


async def test_a_cancelled_put_refetches_its_records(
    consumer: Consumer, channel: NativeChannel
) -> None:
    epoch = consumer._refetch_epoch
    await consumer._deliver_native(records(range(0, 5)), epoch)
    await consumer._deliver_native(records(range(5, 10)), epoch)
    blocked = asyncio.ensure_future(consumer._deliver_native(records(range(10, 15)), epoch))
    while channel.putting is None:
        await asyncio.sleep(0)
    blocked.cancel()  # a rebalance, stop or crash
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert consumer._refetch_from is not None
    assert consumer._refetch_from[TP("in", 0)] == 0  # the refetch drained the queue too
    assert channel.putting is None and channel.qsize() == 0


async def test_records_of_an_old_generation_are_refetched_with_the_rest_of_their_list(
    consumer: Consumer, channel: NativeChannel
) -> None:
    agent = _native_batches(Stream(consumer.app), channel, 2)
    await consumer._deliver_native(records(range(4)), consumer._refetch_epoch)
    consumer.app.consumer_generation_id = 2  # a rebalance after the fetch
    more = asyncio.ensure_future(agent.__anext__())
    while consumer._refetch_from is None:
        await asyncio.sleep(0)
    assert consumer._refetch_from == {TP("in", 0): 0}
    assert channel.holding is None  # the list was given up whole
    fresh = [Msg("in", 0, o, generation_id=2) for o in range(2)]
    await channel.put(FetchedList(fresh, consumer._refetch_epoch))
    assert offsets_of(await asyncio.wait_for(more, SOON_S)) == [(0, 0), (0, 1)]
    await agent.aclose()


async def test_an_agent_leaving_mid_list_has_the_rest_fetched_again(
    consumer: Consumer, channel: NativeChannel
) -> None:
    agent = _native_batches(Stream(consumer.app), channel, 3)
    await consumer._deliver_native(records(range(8)), consumer._refetch_epoch)
    await asyncio.wait_for(agent.__anext__(), SOON_S)
    await agent.aclose()  # the batch 0..2 is abandoned, unacked; 3..7 never taken
    assert consumer._acked[TP("in", 0)] == []
    assert consumer._refetch_from == {TP("in", 0): 3}
    assert channel.holding is None


async def test_a_topic_read_by_two_agents_keeps_per_record_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processing, "NATIVE_ENABLED", True)
    monkeypatch.setattr(processing, "_EOS", False)
    NATIVE_CHANNELS.clear()
    app = App()

    def agent_of(topic: str) -> Any:
        return type("Agent", (), {"channel": type("Topic", (), {"topics": (topic,)})()})()

    try:
        app.agents = {"a": agent_of("in"), "b": agent_of("other")}
        assert _native_channel(Stream(app)) is NATIVE_CHANNELS["in"]
        NATIVE_CHANNELS.clear()
        app.agents["c"] = agent_of("in")
        assert _native_channel(Stream(app)) is None
        assert "in" not in NATIVE_CHANNELS  # the consumer keeps handing its records on
    finally:
        NATIVE_CHANNELS.clear()


def test_the_switch_is_off_by_default() -> None:
    assert delivery.NATIVE_ENABLED is (
        __import__("os").environ.get("AGENTSTREAM_EXPERIMENTAL_BATCH_DELIVERY") == "1"
    )
