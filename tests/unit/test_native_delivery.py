"""The batch-native delivery path: fetched records reach an agent as lists
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
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.utils import DefaultSchedulingStrategy

from agentstream.streams import delivery, processing
from agentstream.streams.delivery import (
    NATIVE_CHANNELS,
    BatchDeliveryConsumer,
    FetchedList,
    NativeChannel,
)
from agentstream.streams.processing import NativeBatch, _native_batches, _native_channel
from agentstream.streams.settings import (
    DELIVERY_PATHS,
    DELIVERY_VAR,
    Settings,
    SettingsError,
    child_environ,
    delivery_path,
    get_settings,
    native_delivery,
)

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
    refcount: int = 0

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
        # mode's Service events (set as the worker begins to stop, or crashes)
        self._stopped = asyncio.Event()
        self._crashed = asyncio.Event()


class Record(NamedTuple):
    """A record as aiokafka's fetcher hands it over (what `_to_message` reads)."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None = 1_700_000_000_000
    timestamp_type: int = 0
    headers: tuple[Any, ...] = ()
    key: bytes | None = b"k"
    value: bytes | None = b"v"
    checksum: None = None
    serialized_key_size: int = 1
    serialized_value_size: int = 1


class Monitor:
    def __init__(self) -> None:
        self.end_offsets: list[tuple[TP, int]] = []
        self.stream_inbound_time: dict[TP, float] = {}

    def track_tp_end_offset(self, tp: TP, offset: int) -> None:
        self.end_offsets.append((tp, offset))


class FaustFetch:
    """Faust's side of one fetch: its real `getmany` generator (round-robin scheduler,
    flow/generation/partition checks, `highwater`, `_to_message`) over a scripted
    `_getmany`; `while_fetching` runs while the fetch waits in the consumer thread."""

    getmany = faust_consumer.Consumer.getmany
    _to_message = faust_aiokafka.Consumer._to_message
    scheduler = DefaultSchedulingStrategy()
    flow_active = True
    should_stop = False

    def init_fetch(self) -> None:
        self.script: list[dict[TP, list[Record]]] = []
        self.active: set[TP] = {TP("in", 0), TP("in", 1), TP("other", 0), TP("other", 1)}
        self._buffered_partitions: set[TP] = set()
        self.while_fetching: Any = lambda: None
        self.highwaters_read: list[TP] = []

    async def _wait_next_records(self, timeout: float) -> Any:
        active = self.active
        return await self._getmany(active, timeout), active

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
        self.while_fetching()
        return self.script.pop(0)

    def highwater(self, tp: TP) -> int:
        self.highwaters_read.append(tp)
        return 1000


class Consumer(BatchDeliveryConsumer, FaustFetch):
    """The consumer's bookkeeping as Faust keeps it, around the real delivery code."""

    def __init__(self, app: App) -> None:
        self.app = app
        app.consumer = self
        self.init_fetch()
        self._read_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        self._committed_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set)
        self._acked: defaultdict[TP, list[int]] = defaultdict(list)
        self._waiting_for_ack = None
        self._commit_every = None
        self._n_acked = 0
        self.gaps: list[tuple[TP, int, int]] = []
        self.log = logging.getLogger("test.native")
        self.log.dev = self.log.debug  # type: ignore[attr-defined]  # mode's logger level

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


def offsets_of(batch: Any) -> list[tuple[int, int]]:
    messages = batch.messages if isinstance(batch, NativeBatch) else batch
    return [(m.partition, m.offset) for m in messages]


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
    assert consumer.gaps == [(TP("in", 0), 7, 8)]  # 9 is a record, not a gap
    assert consumer._read_offset[TP("in", 0)] == 9


@pytest.mark.parametrize("ending", ["_stopped", "_crashed"])
async def test_an_agent_waiting_on_an_empty_channel_ends_when_the_worker_stops(
    consumer: Consumer, channel: NativeChannel, ending: str
) -> None:
    # Faust's supervisor restarts an agent that raised even while the worker stops; the
    # new actor waited on the empty channel and held the worker's stop forever
    agent = _native_batches(Stream(consumer.app), channel, 100)
    waiting = asyncio.ensure_future(agent.__anext__())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    getattr(consumer.app, ending).set()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, SOON_S)
    # nothing was taken from the channel on the way out
    await channel.put(delivery.FetchedList([m for _, m in records([0])], 0))
    assert channel.qsize() == 1


async def test_an_agent_ends_when_the_worker_stops_with_only_stale_lists_queued(
    consumer: Consumer, channel: NativeChannel
) -> None:
    # a refetch marks the queued lists stale (and may leave one behind in a blocked put)
    stale = delivery.FetchedList([m for _, m in records([5])], 0)
    stale.stale = True
    await channel.put(stale)
    consumer.app._stopped.set()
    agent = _native_batches(Stream(consumer.app), channel, 100)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(agent.__anext__(), SOON_S)


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
    first.ack()  # finished (`_decoded_batches` acks it inside the gate)
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


async def test_an_agent_with_several_instances_keeps_per_record_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a channel hands each list to one taker and tracks the list one taker holds: two
    # instances of the agent (concurrency > 1) would take lists side by side
    monkeypatch.setattr(processing, "NATIVE_ENABLED", True)
    monkeypatch.setattr(processing, "_EOS", False)
    NATIVE_CHANNELS.clear()
    app = App()
    topic = type("Topic", (), {"topics": ("in",)})()
    try:
        app.agents = {"a": type("Agent", (), {"channel": topic, "concurrency": 2})()}
        assert _native_channel(Stream(app)) is None
        assert "in" not in NATIVE_CHANNELS
        app.agents = {"a": type("Agent", (), {"channel": topic, "concurrency": 1})()}
        assert _native_channel(Stream(app)) is NATIVE_CHANNELS["in"]
    finally:
        NATIVE_CHANNELS.clear()


def test_the_native_path_is_the_default_and_per_record_turns_it_off() -> None:
    # the worker's validated setting decides, not the raw environment
    assert processing.NATIVE_ENABLED is (get_settings().delivery == "native")
    assert native_delivery({}) and native_delivery({DELIVERY_VAR: "native"})
    assert not native_delivery({DELIVERY_VAR: "per-record"})
    # what the harnesses record is one of the setting's values, and the default's
    assert delivery_path({}) == Settings.from_env({}).delivery == "native"
    assert delivery_path({DELIVERY_VAR: "per-record"}) == "per-record"
    assert set(DELIVERY_PATHS) == {"native", "per-record"}
    # the setting takes only the two paths: a worker refuses anything else at start
    assert Settings.from_env({}).delivery == "native"
    with pytest.raises(SettingsError, match="AGENTSTREAM_DELIVERY='per_record'"):
        Settings.from_env({DELIVERY_VAR: "per_record"})


class RecordBatch:
    def __init__(self, capacity: int) -> None:
        self.records: list[tuple[bytes, bytes]] = []
        self.capacity = capacity

    def append(self, *, key: bytes, value: bytes, timestamp: None) -> object | None:
        if len(self.records) == self.capacity:
            return None
        self.records.append((key, value))
        return object()

    def record_count(self) -> int:
        return len(self.records)


class AioProducer:
    """aiokafka's producer as the batch sends use it: metadata, partitioner, batches."""

    def __init__(self, name: str, log: list[Any], lock: asyncio.Lock | None = None) -> None:
        self.name, self.log, self.lock = name, log, lock

    class _metadata:  # aiokafka's attribute, read by `_partitioner`
        @staticmethod
        def partitions_for_topic(topic: str) -> set[int]:
            return {0, 1}

        available_partitions_for_topic = partitions_for_topic

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}

    @staticmethod
    def _partitioner(key: bytes, every: list[int], available: list[int]) -> int:
        return every[int(key.decode()[-1]) % len(every)]

    def create_batch(self) -> RecordBatch:
        return RecordBatch(capacity=2)

    async def send_batch(self, batch: RecordBatch, topic: str, *, partition: int) -> Any:
        assert self.lock is None or self.lock.locked(), "sent outside the transaction's lock"
        self.log.append((self.name, topic, partition, [k for k, _ in batch.records]))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


async def test_exactly_once_outputs_go_into_the_transaction_of_the_input_they_came_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[Any] = []
    locks = {"tx-0": asyncio.Lock(), "tx-1": asyncio.Lock()}
    faust_producer = type(
        "FaustProducer",
        (),
        {
            "_transaction_producers": {
                tid: AioProducer(tid, sent, lock) for tid, lock in locks.items()
            },
            "_trn_locks": locks,
        },
    )()
    manager = type("Manager", (), {"producer": faust_producer})()

    async def producer() -> Any:
        return manager

    monkeypatch.setattr(processing, "_producer", producer)
    monkeypatch.setattr(
        processing, "_source_transaction", lambda m, source, warn: f"tx-{source[1]}"
    )
    outbox: list[processing.Output] = [
        ("out", f"k{i}".encode(), b"v", "agent.messages.accepted", ("in", i % 2)) for i in range(6)
    ]
    await processing._send_outbox_in_transactions(outbox)
    # per transaction, per output partition, emit order kept, at most 2 per record batch
    assert sent == [
        ("tx-0", "out", 0, [b"k0", b"k2"]),
        ("tx-0", "out", 0, [b"k4"]),
        ("tx-1", "out", 1, [b"k1", b"k3"]),
        ("tx-1", "out", 1, [b"k5"]),
    ]


async def test_exactly_once_an_output_without_its_transaction_is_never_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[Any] = []
    faust_producer = type(
        "FaustProducer",
        (),
        {"_transaction_producers": {"tx-0": AioProducer("tx-0", sent)}, "_trn_locks": {}},
    )()
    manager = type("Manager", (), {"producer": faust_producer})()

    async def producer() -> Any:
        return manager

    monkeypatch.setattr(processing, "_producer", producer)
    monkeypatch.setattr(processing, "_source_transaction", lambda m, source, warn: None)
    monkeypatch.setattr(processing.app, "rebalancing", True, raising=False)
    outbox: list[processing.Output] = [("out", b"k0", b"v", "agent.messages.accepted", ("in", 0))]
    with pytest.raises(processing.BatchAbandoned):
        await processing._send_outbox_in_transactions(outbox)
    assert sent == []


async def test_exactly_once_a_batch_missing_one_transaction_sends_into_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # outputs sent into the transactions still open would be committed with later
    # offsets while the abandoned batch's inputs are processed again: duplicates
    sent: list[Any] = []
    lock = asyncio.Lock()
    faust_producer = type(
        "FaustProducer",
        (),
        {"_transaction_producers": {"tx-0": AioProducer("tx-0", sent, lock)}, "_trn_locks": {}},
    )()
    faust_producer._trn_locks = {"tx-0": lock}
    manager = type("Manager", (), {"producer": faust_producer})()

    async def producer() -> Any:
        return manager

    monkeypatch.setattr(processing, "_producer", producer)
    monkeypatch.setattr(
        processing,
        "_source_transaction",
        lambda m, source, warn: "tx-0" if source[1] == 0 else None,
    )
    monkeypatch.setattr(processing.app, "rebalancing", True, raising=False)
    outbox: list[processing.Output] = [
        ("out", f"k{i}".encode(), b"v", "agent.messages.accepted", ("in", i % 2)) for i in range(4)
    ]
    with pytest.raises(processing.BatchAbandoned):
        await processing._send_outbox_in_transactions(outbox)
    assert sent == []


async def test_exactly_once_a_batch_taken_before_a_revoke_sends_and_acks_nothing(
    monkeypatch: pytest.MonkeyPatch, consumer: Consumer
) -> None:
    monkeypatch.setattr(processing, "_EOS", True)
    sent: list[Any] = []

    async def send(outbox: list[Any]) -> None:
        sent.extend(outbox)

    monkeypatch.setattr(processing, "_send_outbox_in_transactions", send)
    consumer._revokes = 0
    task = asyncio.current_task()
    taken = (task, consumer.app, 0, consumer.app.consumer_generation_id)
    batch = NativeBatch(consumer.app, [Msg("in", 0, 5)], taken)
    batch.outbox.append(("out", b"k", b"v", "agent.messages.accepted", ("in", 0)))
    token = processing._TAKEN.set(taken)
    try:
        consumer._revokes = 1  # the revoke's window counted it: the batch is stale
        with pytest.raises(processing.BatchAbandoned):
            await batch.send()
        batch.ack()
    finally:
        processing._TAKEN.reset(token)
    assert sent == []
    assert consumer._acked[TP("in", 0)] == []


async def test_decoded_batches_sends_a_native_batch_and_acks_it_inside_the_gate(
    monkeypatch: pytest.MonkeyPatch, consumer: Consumer, channel: NativeChannel
) -> None:
    """The whole native path through `decoded_batches` under exactly-once: the dead
    letter and the agent's `emit` wait in the outbox, which is sent (with the input
    partition each came from) after the body and before the ack, all inside the gate."""
    from agentstream.schemas import AgentMessage, Event, encode

    log: list[str] = []

    class Gate:
        async def enter(self) -> None:
            log.append("enter")

        def leave(self) -> None:
            log.append(f"leave, acked:{consumer._acked[TP('in', 0)]}")

    async def send(outbox: list[Any]) -> None:
        log.append(f"send:{[(o[3], o[4]) for o in outbox]}")
        log.append(f"acked before send:{consumer._acked[TP('in', 0)]}")

    def message(n: int) -> bytes:
        event = AgentMessage(message_id=f"m{n}", sender_id="a", recipient_id="b", content="hi")
        return encode(Event.of(event, source="test"))

    monkeypatch.setattr(processing, "NATIVE_ENABLED", True)
    monkeypatch.setattr(processing, "_EOS", True)
    monkeypatch.setattr(processing, "GATE", Gate())
    monkeypatch.setattr(processing, "_send_outbox_in_transactions", send)
    consumer._revokes = 0
    msgs = [Msg("in", 0, 0), Msg("in", 0, 1), Msg("in", 0, 2)]
    for m, value in zip(msgs, [message(0), b"{not json", message(2)], strict=True):
        m.value = value  # type: ignore[attr-defined]
        m.key = b"k"  # type: ignore[attr-defined]
        m.timestamp = None  # type: ignore[attr-defined]
    await channel.put(FetchedList(msgs, consumer._refetch_epoch))
    stream = Stream(consumer.app)
    async for batch in processing.decoded_batches(stream, consumer="c", max_batch=10):
        log.append(f"body:{[i.message.offset for i in batch]}")
        for inbound in batch:
            await processing.guarded(
                inbound,
                "c",
                lambda i: processing.emit("agent.messages.accepted", i.event),
            )
        stream.should_stop = True
    assert log == [
        "enter",
        "body:[0, 2]",
        "send:[('pipeline.deadletter', ('in', 0)), ('agent.messages.accepted', ('in', 0)), "
        "('agent.messages.accepted', ('in', 0))]",
        "acked before send:[]",
        "leave, acked:[0, 1, 2]",  # the dead letter's offset too
    ]


async def test_records_conducted_before_the_channel_existed_are_fetched_again(
    monkeypatch: pytest.MonkeyPatch, consumer: Consumer
) -> None:
    """An agent with seconds of start-up work asks for its first batch after the
    consumer's first fetches: those records went the conductor's way, into the stream's
    queue, which a native agent never reads (seen: the first 173 records of a partition
    neither forwarded nor dead-lettered)."""
    monkeypatch.setattr(processing, "NATIVE_ENABLED", True)
    NATIVE_CHANNELS.clear()
    stream = Stream(consumer.app)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for offset in (7, 8, 9):
        queue.put_nowait(type("Event", (), {"message": Msg("in", 0, offset)})())
    stream.channel.queue = queue
    try:
        assert _native_channel(stream) is NATIVE_CHANNELS["in"]
        assert queue.empty()
        assert consumer._refetch_from == {TP("in", 0): 7}
        consumer._refetch_from = None
        assert _native_channel(stream) is NATIVE_CHANNELS["in"]  # once, at registration
        assert consumer._refetch_from is None
    finally:
        NATIVE_CHANNELS.clear()


async def test_a_record_another_task_holds_is_acked_by_that_task_not_by_its_batch(
    consumer: Consumer, channel: NativeChannel
) -> None:
    """An LLM request is held (`incref`) by its call until the final response is out:
    the batch that admitted it must not make its offset committable (seen: a worker
    stopped with a call in flight had committed the request, and its restart never
    answered it)."""
    agent = _native_batches(Stream(consumer.app), channel, 10)
    await consumer._deliver_native(records(range(3)), consumer._refetch_epoch)
    batch = await asyncio.wait_for(agent.__anext__(), SOON_S)
    held = batch.messages[1]
    held.refcount += 1  # the call's hold (Faust's Message.incref)
    batch.ack()
    assert consumer._acked[TP("in", 0)] == [0, 2]
    assert (held.acked, held.refcount) == (False, 1)  # its holder's Message.ack ends it
    await agent.aclose()


async def test_a_flow_control_clear_empties_the_native_channels(
    consumer: Consumer, channel: NativeChannel
) -> None:
    """Delivery 6 for the native path: what a resume's clear finds in a channel is
    fetched again, like what it finds in the stream queues, even when those are empty."""
    from agentstream.streams.delivery import RefetchingFlowControl

    flow = RefetchingFlowControl(consumer.app)
    await consumer._deliver_native(records(range(20, 25)), consumer._refetch_epoch)
    epoch = consumer._refetch_epoch
    flow.clear()
    assert channel.qsize() == 0
    assert consumer._refetch_from == {TP("in", 0): 20}
    assert consumer._refetch_epoch == epoch + 1


def test_child_processes_keep_the_delivery_path_but_not_the_other_settings() -> None:
    fetch = "AGENTSTREAM_CONSUMER_MAX_PARTITION_FETCH_BYTES"
    env = child_environ(
        {"PATH": "/bin", "AGENTSTREAM_APP_ID": "mine", DELIVERY_VAR: "per-record", fetch: "2"}
    )
    assert env == {"PATH": "/bin", DELIVERY_VAR: "per-record", fetch: "2"}


async def test_a_seek_back_never_goes_below_the_committed_offset(consumer: Consumer) -> None:
    # copies of 15..19 were dropped and noted before a rebalance; the partition's owner
    # meanwhile (another member, or this one) processed and committed up to 20: fetching
    # 15..19 again would process them a second time (under exactly-once: committed twice)
    tp = TP("in", 0)
    consumer._committed_offset[tp] = 20
    consumer._read_offset[tp] = 19  # position 20
    consumer._refetch_from = {tp: 15}
    await consumer._seek_back_to_dropped()
    assert consumer._read_offset[tp] == 19  # not sought back
    consumer._committed_offset[tp] = 17
    consumer._refetch_from = {tp: 15}
    await consumer._seek_back_to_dropped()
    assert consumer._read_offset[tp] == 17  # back to the committed offset, no lower


async def test_a_delivery_cancelled_while_it_waits_for_flow_control_refetches_its_batch(
    consumer: Consumer, channel: Any
) -> None:
    # a rebalance suspends the flow while the delivery waits to hand lists over: the
    # native records and the other topics' records of that fetch are all fetched again
    entered = asyncio.Event()

    async def blocked() -> None:
        entered.set()
        await asyncio.Event().wait()

    consumer.app.flow_control.acquire = blocked  # type: ignore[method-assign]
    batch = records(range(5)) + records([3], "other")
    task = asyncio.ensure_future(consumer._deliver(batch, consumer._refetch_epoch))
    await asyncio.wait_for(entered.wait(), SOON_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert consumer._refetch_from == {TP("in", 0): 0, TP("other", 0): 3}
    assert channel.qsize() == 0


async def test_a_batch_whose_records_are_all_held_still_counts_as_inbound(
    consumer: Consumer, channel: Any
) -> None:
    # the health check reads stream_inbound_time per partition: a partition whose every
    # record an LLM call still holds was read all the same (no false "stream idle")
    monitor = type("Monitor", (), {"stream_inbound_time": {}})()
    consumer.app.monitor = monitor
    agent = _native_batches(Stream(consumer.app), channel, 10)
    await consumer._deliver_native(records(range(3), partition=1), consumer._refetch_epoch)
    batch = await asyncio.wait_for(agent.__anext__(), SOON_S)
    for m in batch.messages:
        m.refcount += 1  # every request's call holds it
    batch.ack()
    assert TP("in", 1) in monitor.stream_inbound_time
    await agent.aclose()


# -- the `getmany` bypass: native partitions taken from the fetch's record map ----------


def fetch_of(*parts: tuple[str, int, range | list[int]]) -> dict[TP, list[Record]]:
    return {TP(t, p): [Record(t, p, o) for o in offsets] for t, p, offsets in parts}


class Conductor:
    """Faust's conductor callback: what the per-record path hands over, in order."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int, int]] = []

    async def __call__(self, message: Any) -> None:
        self.got.append((message.topic, message.partition, message.offset))


def per_record_order(fetch: dict[TP, list[Record]]) -> list[tuple[str, int, int]]:
    """The order Faust's `getmany` yields a record map in (round-robin)."""
    return [(r.topic, r.partition, r.offset) for _, r in DefaultSchedulingStrategy().iterate(fetch)]


async def test_a_fetch_hands_native_partitions_whole_and_other_topics_per_record(
    consumer: Consumer, channel: NativeChannel
) -> None:
    consumer.app.monitor = Monitor()
    consumer.callback = conductor = Conductor()
    others = fetch_of(("other", 0, [5, 6, 7]), ("other", 1, [2]))
    consumer.script = [{**fetch_of(("in", 1, [3, 4]), ("in", 0, range(3))), **others}]
    batch, native = await consumer._fetch()
    # the other topics: Faust's getmany, exactly as it yields them without native topics
    assert [(m.topic, m.partition, m.offset) for _, m in batch] == per_record_order(others)
    # the native partitions: whole, in offset order, as Faust's own messages
    assert {tp: [m.offset for m in ms] for tp, ms in native.items()} == {
        TP("in", 1): [3, 4],
        TP("in", 0): [0, 1, 2],
    }
    message = native[TP("in", 0)][0]
    assert isinstance(message, faust_consumer.ConsumerMessage)
    assert (message.tp, message.key, message.value) == (TP("in", 0), b"k", b"v")
    assert (message.timestamp, message.generation_id) == (1_700_000_000.0, 1)
    # highwater read once per native partition, once per record for the others
    assert consumer.highwaters_read.count(TP("in", 0)) == 1
    assert consumer.highwaters_read.count(TP("other", 0)) == 3
    assert (TP("in", 1), 1000) in consumer.app.monitor.end_offsets
    assert consumer._refetch_from is None  # nothing dropped
    await consumer._deliver(batch, consumer._refetch_epoch, native)
    fetched = await channel.get()
    assert offsets_of(fetched.messages) == [(1, 3), (1, 4), (0, 0), (0, 1), (0, 2)]
    assert conductor.got == per_record_order(others)
    assert consumer._read_offset[TP("in", 0)] == 2
    assert consumer._read_offset[TP("in", 1)] == 4
    assert consumer._read_offset[TP("other", 0)] == 7


async def test_without_native_channels_a_fetch_is_faust_getmany_alone(
    consumer: Consumer,
) -> None:
    NATIVE_CHANNELS.clear()
    consumer.app.monitor = Monitor()
    fetch = fetch_of(("in", 0, range(3)), ("other", 0, [5, 6]))
    consumer.script = [fetch]
    batch, native = await consumer._fetch()
    assert native == {}
    assert [(m.topic, m.partition, m.offset) for _, m in batch] == per_record_order(fetch)


async def test_a_native_partition_paused_while_the_fetch_waited_is_fetched_again(
    consumer: Consumer, channel: NativeChannel
) -> None:
    consumer.app.monitor = Monitor()

    def pause() -> None:  # recovery pauses partitions in Faust's live set
        consumer.active.discard(TP("in", 1))
        consumer.active.discard(TP("other", 0))

    consumer.while_fetching = pause
    consumer.script = [
        fetch_of(("in", 0, [4, 5]), ("in", 1, [8, 9]), ("other", 0, [3]), ("other", 1, [6]))
    ]
    batch, native = await consumer._fetch()
    assert list(native) == [TP("in", 0)]
    assert [(m.topic, m.partition, m.offset) for _, m in batch] == [("other", 1, 6)]
    # from the lowest dropped offset, native and per-record alike; nothing else
    assert consumer._refetch_from == {TP("in", 1): 8, TP("other", 0): 3}
    # a buffered partition is read even when not active, as getmany reads it
    consumer._refetch_from = None
    consumer._buffered_partitions.add(TP("in", 1))
    consumer.script = [fetch_of(("in", 1, [8, 9]))]
    batch, native = await consumer._fetch()
    assert [m.offset for m in native[TP("in", 1)]] == [8, 9]
    assert consumer._refetch_from is None


@pytest.mark.parametrize("how", ["flow stopped", "stopping"])
async def test_a_fetch_whose_flow_stopped_while_it_waited_takes_nothing_and_refetches_all(
    consumer: Consumer, channel: NativeChannel, how: str
) -> None:
    consumer.app.monitor = Monitor()
    seeks: list[str] = []

    async def perform_seek() -> None:  # Faust's getmany seeks when flow is stopped
        seeks.append("seek")

    consumer.perform_seek = perform_seek  # type: ignore[method-assign]

    def stop() -> None:
        if how == "flow stopped":
            consumer.flow_active = False  # a rebalance began (suspend_flow)
        else:
            consumer.should_stop = True

    consumer.while_fetching = stop
    consumer.script = [fetch_of(("in", 0, [4, 5]), ("in", 1, [8]), ("other", 0, [3, 4]))]
    batch, native = await consumer._fetch()
    assert (batch, native) == ([], {})
    assert consumer._refetch_from == {TP("in", 0): 4, TP("in", 1): 8, TP("other", 0): 3}
    assert seeks == (["seek"] if how == "flow stopped" else [])


async def test_a_generation_change_between_fetch_and_agent_refetches_from_the_lowest_offset(
    consumer: Consumer, channel: NativeChannel
) -> None:
    """The records were stamped with the generation of their fetch (`_to_message`); a
    rebalance before the agent takes them: the agent hands none out, they are fetched
    again from the lowest offset, and each is handed once, in order."""
    consumer.app.monitor = Monitor()
    consumer.callback = Conductor()
    agent = _native_batches(Stream(consumer.app), channel, 100)
    consumer.script = [fetch_of(("in", 0, range(10, 14)), ("in", 1, [3, 4]))]
    batch, native = await consumer._fetch()
    await consumer._deliver(batch, consumer._refetch_epoch, native)
    consumer.app.consumer_generation_id = 2
    taking = asyncio.ensure_future(agent.__anext__())
    while consumer._refetch_from is None:
        await asyncio.sleep(0)
    assert consumer._refetch_from == {TP("in", 0): 10, TP("in", 1): 3}
    await consumer._seek_back_to_dropped()
    assert consumer._read_offset[TP("in", 0)] == 10
    consumer.script = [fetch_of(("in", 0, range(10, 14)), ("in", 1, [3, 4]))]
    batch, native = await consumer._fetch()
    await consumer._deliver(batch, consumer._refetch_epoch, native)
    taken = await asyncio.wait_for(taking, SOON_S)
    assert offsets_of(taken) == [(0, 10), (0, 11), (0, 12), (0, 13), (1, 3), (1, 4)]
    assert {m.generation_id for m in taken.messages} == {2}
    await agent.aclose()


async def test_a_bump_between_fetch_and_delivery_refetches_native_and_other_records(
    consumer: Consumer, channel: NativeChannel
) -> None:
    consumer.app.monitor = Monitor()
    consumer.callback = conductor = Conductor()
    epoch = consumer._refetch_epoch
    consumer.script = [fetch_of(("in", 0, range(3)), ("other", 0, [7, 8]))]
    batch, native = await consumer._fetch()
    consumer.refetch([])  # a seek or flow-control clear before the delivery starts
    await consumer._deliver(batch, epoch, native)
    assert channel.qsize() == 0 and conductor.got == []
    assert consumer._refetch_from == {TP("in", 0): 0, TP("other", 0): 7}
    assert consumer._read_offset[TP("in", 0)] is None
    assert consumer._read_offset[TP("other", 0)] is None


async def test_a_cancel_during_a_put_refetches_the_other_topics_of_the_fetch_too(
    consumer: Consumer, channel: NativeChannel
) -> None:
    """A rebalance, stop or crash while the native list waits for room: the other
    topics' records of that fetch were never handed to the conductor either, and the
    position has moved past them (on a partition with no commit yet, a seek to
    committed does not bring them back)."""
    consumer.callback = conductor = Conductor()
    epoch = consumer._refetch_epoch
    await consumer._deliver_native(records(range(0, 5)), epoch)
    await consumer._deliver_native(records(range(5, 10)), epoch)
    delivering = asyncio.ensure_future(
        consumer._deliver(records(range(10, 15)) + records([3, 4], "other"), epoch)
    )
    while channel.putting is None:
        await asyncio.sleep(0)
    delivering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delivering
    assert conductor.got == []
    assert consumer._refetch_from is not None
    assert consumer._refetch_from[TP("other", 0)] == 3


async def test_per_partition_order_holds_across_fetches_of_native_and_other_topics(
    consumer: Consumer, channel: NativeChannel
) -> None:
    consumer.app.monitor = Monitor()
    consumer.callback = conductor = Conductor()
    agent = _native_batches(Stream(consumer.app), channel, 100)
    handed: list[tuple[int, int]] = []
    for start in (0, 4, 8):
        consumer.script = [
            fetch_of(
                ("other", 0, range(start, start + 4)),
                ("in", 0, range(start, start + 4)),
                ("in", 1, range(start, start + 2)),
            )
        ]
        batch, native = await consumer._fetch()
        await consumer._deliver(batch, consumer._refetch_epoch, native)
        taken = await asyncio.wait_for(agent.__anext__(), SOON_S)
        handed += offsets_of(taken)
        taken.ack()
    assert [o for p, o in handed if p == 0] == list(range(12))
    assert [o for p, o in handed if p == 1] == [0, 1, 4, 5, 8, 9]
    assert [o for _, _, o in conductor.got] == list(range(12))
    assert consumer._acked[TP("in", 0)] == list(range(12))
    await agent.aclose()


def test_split_fetch_takes_readable_native_partitions_whole() -> None:
    fetch = fetch_of(("in", 0, [1, 2]), ("in", 1, [5]), ("in", 2, []), ("other", 0, [9]))
    taken, rest = delivery.split_fetch(fetch, {"in"}, lambda tp: tp != TP("in", 1))
    assert taken == {TP("in", 0): fetch[TP("in", 0)]}
    assert rest == {TP("other", 0): fetch[TP("other", 0)]}


class Blocked:
    """An await that does not return until released: where a cancel lands."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def wait(self) -> bool:
        self.entered.set()
        await self.release.wait()
        return True


async def _cancelled_at(blocked: Blocked, delivering: asyncio.Future[Any]) -> None:
    await asyncio.wait_for(blocked.entered.wait(), 5)
    delivering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delivering


@pytest.mark.parametrize("native", [True, False], ids=["native", "conductor"])
async def test_a_cancel_while_a_gap_is_counted_refetches_what_did_not_go_out(
    native: bool, consumer: Consumer
) -> None:
    """A rebalance, stop or crash at Faust's `_add_gap` (it yields to the loop; under
    exactly-once every transaction marker is a gap): the records not yet handed on, of
    this topic and the others of the fetch, were neither delivered nor fetched again,
    and the position had moved past them."""
    NATIVE_CHANNELS.clear()
    if native:
        NATIVE_CHANNELS["in"] = NativeChannel(2)
    try:
        consumer.callback = conductor = Conductor()
        consumer.app.topics.acks_enabled_for = lambda topic: True  # type: ignore[method-assign]
        consumer._read_offset[TP("in", 0)] = 0
        blocked = Blocked()

        async def add_gap(tp: TP, start: int, end: int) -> None:
            await blocked.wait()

        consumer._add_gap = add_gap  # type: ignore[method-assign]
        delivering = asyncio.ensure_future(
            consumer._deliver(records([5, 6]) + records([3, 4], "other"), consumer._refetch_epoch)
        )
        await _cancelled_at(blocked, delivering)
        assert conductor.got == []
        assert consumer._refetch_from == {TP("in", 0): 5, TP("other", 0): 3}
    finally:
        NATIVE_CHANNELS.clear()


@pytest.mark.parametrize("native", [True, False], ids=["native", "conductor"])
async def test_a_cancel_during_a_commit_refetches_what_did_not_go_out(
    native: bool, consumer: Consumer
) -> None:
    """The delivery's commit every `commit_every` acks waits (under exactly-once up to the
    commit window): a cancel there left the fetch's records not yet handed on neither
    delivered nor fetched again."""
    NATIVE_CHANNELS.clear()
    if native:
        NATIVE_CHANNELS["in"] = NativeChannel(2)
    try:
        consumer.callback = conductor = Conductor()
        blocked = Blocked()

        async def commit(*args: Any, **kwargs: Any) -> bool:
            return await blocked.wait()

        consumer.commit = commit  # type: ignore[method-assign]
        consumer._commit_every, consumer._n_acked = 1, 5
        delivering = asyncio.ensure_future(
            consumer._deliver(
                records(range(0, 3)) + records([3, 4], "other"), consumer._refetch_epoch
            )
        )
        await _cancelled_at(blocked, delivering)
        assert conductor.got == []
        assert consumer._refetch_from is not None
        assert consumer._refetch_from[TP("other", 0)] == 3
        # the native list was in its channel; the refetch drained it (a bump of the
        # refetch epoch drains every channel into the same refetch, invariant 3)
        assert consumer._refetch_from[TP("in", 0)] == 0
        if native:
            assert NATIVE_CHANNELS["in"].qsize() == 0
    finally:
        NATIVE_CHANNELS.clear()


async def test_batch_sends_pick_the_partition_the_producers_send_would() -> None:
    """`_partitioner` reads the metadata once per batch and caches key hashes; a record
    must still land where aiokafka's own `send` puts it, with the default partitioner and
    with a custom one, whatever the partitions' leaders."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.structs import PartitionMetadata

    def counting_down(key: bytes | None, every: list[int], available: list[int]) -> int:
        return available[-1] if key is None else every[len(key) % len(every)]

    for custom in (None, counting_down):
        extra = {} if custom is None else {"partitioner": custom}
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", **extra)
        leaders = {"a": [0, 0, -1, 0, 0, 0], "b": [0, 0, 0]}  # a's partition 2 has no leader
        producer._metadata._partitions = {
            topic: {
                p: PartitionMetadata(topic, p, leader, [], [], None) for p, leader in enumerate(ls)
            }
            for topic, ls in leaders.items()
        }
        try:
            partition_of = await processing._partitioner(producer, ["a", "b"])
            keys = [f"agent-{i}".encode() for i in range(200)] + [b"", "Ω".encode(), b"\x00" * 9]
            for topic in leaders:
                for key in keys + keys:  # the second time from the cache
                    assert partition_of(topic, key) == producer._partition(
                        topic, None, None, None, key, None
                    ), (custom, topic, key)
        finally:
            await producer.stop()
