"""`event_batches` hands each record of a partition to its agent once per assignment.

Faust's recovery can deliver a stretch of a partition twice in one assignment (the
fetcher runs, then every stream partition is sought back to its committed offset), and
our seek back to records dropped from a queue starts at the lowest dropped offset. The
second copies must be neither processed nor acked: this ran a whole stretch of input
twice after a quick restart.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from agentstream.streams.delivery import STALE_DELIVERIES
from agentstream.streams.processing import event_batches


@dataclass(eq=False)
class Msg:
    topic: str
    partition: int
    offset: int
    generation_id: int
    tracked: bool = False

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)


@dataclass(eq=False)
class Ev:
    message: Msg
    #: the record's bytes (for tests that decode them)
    value: bytes = b""
    acks: list[int] = field(default_factory=list)

    def ack(self) -> bool:
        self.acks.append(self.message.offset)
        return True


class Sensors:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class FlowControl:
    def is_active(self) -> bool:
        return True


class App:
    def __init__(self) -> None:
        self.sensors = Sensors()
        self.flow_control = FlowControl()
        self.consumer_generation_id = 1
        self.topics = type("Topics", (), {"acking_topics": {"in"}})()
        self.consumer = type("Consumer", (), {"unacked": set()})()


class Stream:
    def __init__(self, app: App) -> None:
        self.app = app
        self.channel = type("Channel", (), {"queue": asyncio.Queue()})()
        self.should_stop = False

    async def maybe_start(self) -> bool:
        return False


def events(offsets: list[int], partition: int = 0, generation: int = 1) -> list[Ev]:
    return [Ev(Msg("in", partition, o, generation)) for o in offsets]


async def test_second_copies_are_skipped_until_the_generation_changes() -> None:
    app = App()
    stream = Stream(app)
    first, copies = events([10, 11, 12]), events([10, 11, 12, 13])
    other = events([10, 11], partition=1)
    q = stream.channel.queue
    for ev in first:
        q.put_nowait(ev)
    gen = event_batches(stream, max_batch=100, within_s=0.001)
    try:
        batch = await asyncio.wait_for(gen.__anext__(), 2)
        assert [e.message.offset for e in batch] == [10, 11, 12]
        for ev in [*copies, *other]:
            q.put_nowait(ev)
        batch = await asyncio.wait_for(gen.__anext__(), 2)
        assert [(e.message.partition, e.message.offset) for e in batch] == [
            (0, 13),
            (1, 10),
            (1, 11),
        ]
        # the first copies were acked when the next batch was asked for
        assert [e.acks for e in first] == [[10], [11], [12]]
        # a rebalance: the partition may come back from its committed offset, all again
        app.consumer_generation_id = 2
        for ev in events([10, 11, 12, 13], generation=2):
            q.put_nowait(ev)
        batch = await asyncio.wait_for(gen.__anext__(), 2)
        assert [e.message.offset for e in batch] == [10, 11, 12, 13]
        # second copies were never acked (the originals' acks count), the new record was
        assert [e.acks for e in copies] == [[], [], [], [13]]
    finally:
        await gen.aclose()


async def test_a_record_put_after_a_queue_clear_is_dropped_so_the_records_before_it_count() -> None:
    # 3 and 4 were cleared from the queue while 5 was being delivered; 5 landed after the
    # clear (streams.delivery.RefetchingFlowControl marks it stale) and all three come again.
    # Handed out first, 5 would make the refetched 3 and 4 look like copies.
    stream = Stream(App())
    late = Ev(Msg("in", 0, 5, 1))
    STALE_DELIVERIES.add(late.message)
    refetched = events([3, 4, 5, 6])
    q = stream.channel.queue
    for ev in [late, *refetched]:
        q.put_nowait(ev)
    gen = event_batches(stream, max_batch=100, within_s=0.001)
    try:
        batch = await asyncio.wait_for(gen.__anext__(), 2)
        assert [e.message.offset for e in batch] == [3, 4, 5, 6]
        stream.should_stop = True  # the batch is done: asking for the next one acks it
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(gen.__anext__(), 2)
    finally:
        await gen.aclose()
    # the stale record is neither processed nor acked: its offset counts once, by its copy
    assert late.acks == []
    assert [e.acks for e in refetched] == [[3], [4], [5], [6]]
