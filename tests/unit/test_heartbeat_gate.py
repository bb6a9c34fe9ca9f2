"""The heartbeat monitor's catch-up gate after a (re)assignment.

Under exactly-once the monitor's own `agent.status` is written in transactions: a
partition ends in a commit marker that no `read_committed` consumer receives. With its
last status record at 10, the marker at 11 and the end at 12, the worker folds 10 and
commits 11; a gate that waited for offset 11 never opened, and the monitor decided
nothing after any restart or rebalance."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

import agentstream.agents.heartbeat.agent as hb
from agentstream.streams.delivery import HANDED_MARKS

ST = hb.STATUS_TOPIC
TP0 = TP(ST, 0)


class Consumer:
    def __init__(self) -> None:
        self._committed_offset: dict[TP, int] = {TP0: 11}
        self.at = 12
        self._handing_over = False
        self.away = False  # the broker does not answer

    async def highwaters(self, *tps: TP) -> dict[TP, int]:
        if self.away:
            raise ConnectionError("broker away")
        return {TP0: 12}

    async def earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        return {TP0: 0}

    async def position(self, tp: TP) -> int:
        if self.away:
            raise ConnectionError("broker away")
        return self.at


class Stream:
    shortlabel = "test-heartbeats"

    def __init__(self) -> None:
        self.channel = SimpleNamespace(queue=asyncio.Queue())


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> tuple[hb.CatchUpGate, Consumer, Stream]:
    done = asyncio.Event()
    done.set()
    consumer = Consumer()
    fake = SimpleNamespace(
        rebalancing=False,
        consumer=consumer,
        tables=SimpleNamespace(recovery=SimpleNamespace(completed=done)),
        assignor=SimpleNamespace(assigned_actives=lambda: {TP0}),
    )
    monkeypatch.setattr(hb, "app", fake)
    gate = hb.CatchUpGate((hb.HEARTBEATS_TOPIC, ST))
    stream = Stream()
    gate.watch(stream)
    HANDED_MARKS[stream.shortlabel] = {TP0: (1, 10)}
    yield gate, consumer, stream
    HANDED_MARKS.pop(stream.shortlabel, None)


async def test_a_partition_ending_in_a_transaction_marker_opens_the_gate(world: Any) -> None:
    gate, _, _ = world
    gate.note(ST, 0, 10)
    assert await gate.check() is False  # read to the end: once more to be sure
    assert await gate.check() is True


async def test_a_record_handed_to_the_agent_and_not_yet_folded_holds_it(world: Any) -> None:
    gate, consumer, _ = world
    consumer._committed_offset = {TP0: 10}
    HANDED_MARKS["test-heartbeats"] = {TP0: (1, 10)}  # the record at 10 is in the batch
    for _ in range(3):
        assert await gate.check() is False
    gate.note(ST, 0, 10)
    await gate.check()
    assert await gate.check() is True


async def test_records_still_to_fetch_or_queued_hold_it(world: Any) -> None:
    gate, consumer, stream = world
    gate.note(ST, 0, 10)
    consumer.at = 11  # the marker at 11 not yet passed: maybe a record
    for _ in range(3):
        assert await gate.check() is False
    consumer.at = 12
    stream.channel.queue.put_nowait("a record on its way to the agent")
    for _ in range(3):
        assert await gate.check() is False
    stream.channel.queue.get_nowait()
    await gate.check()
    assert await gate.check() is True


async def test_the_last_record_folded_opens_it_at_once(world: Any) -> None:
    gate, consumer, _ = world
    consumer._committed_offset = {}
    gate.note(ST, 0, 11)  # at-least-once: no marker, the last record is at 11
    assert await gate.check() is True


async def test_a_broker_error_keeps_it_closed_without_raising(world: Any) -> None:
    # a raise in the timer that calls the gate crashes the worker
    gate, consumer, _ = world
    consumer.away = True
    assert await gate.check() is False  # the end offsets
    consumer.away = False
    gate.note(ST, 0, 10)
    assert await gate.check() is False  # targets built; not yet settled
    consumer.away = True
    for _ in range(2):
        assert await gate.check() is False  # the positions
    consumer.away = False
    await gate.check()
    assert await gate.check() is True


async def test_a_reassignment_during_its_check_drops_what_the_check_found(world: Any) -> None:
    gate, consumer, _ = world
    gate.note(ST, 0, 11)  # folded to the end: it would open at once
    real = consumer.highwaters

    async def slow(*tps: TP) -> dict[TP, int]:
        gate.reset()  # a rebalance while the end offsets are asked
        return await real(*tps)

    consumer.highwaters = slow
    assert await gate.check() is False and gate.targets is None
    consumer.highwaters = real
    assert await gate.check() is True


async def test_a_worker_assigned_no_partition_of_either_topic_opens_it(world: Any) -> None:
    # more workers than partitions: nothing to catch up on, and /ready and the cluster's
    # `deciding` must not say "catching up" for good
    gate, _consumer, _stream = world
    hb.app.assignor.assigned_actives = lambda: {TP("other.topic", 0)}
    assert await gate.check() is True and gate.open
    gate.reset()  # an assignment: closed again until it is caught up on
    hb.app.assignor.assigned_actives = lambda: {TP0}
    assert gate.open is False
    assert await gate.check() is False  # read to the end: once more to be sure
    assert await gate.check() is True


async def test_it_stays_closed_until_the_first_recovery_completes(world: Any) -> None:
    gate, _consumer, _stream = world
    hb.app.tables.recovery.completed = asyncio.Event()
    hb.app.assignor.assigned_actives = set
    assert await gate.check() is False
    hb.app.tables.recovery.completed.set()
    assert await gate.check() is True
