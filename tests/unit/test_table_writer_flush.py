"""`streams.tables.write` / `delete` keep changelog records out of Faust's producer buffer
until `flush_pending` hands them to the producer, and every commit calls it first:
Faust's flush before a commit can return with a record still on its way, which the
commit then does not cover — under exactly-once it joins the next transaction, under
at-least-once the producer flush does not wait for it; either way a kill -9 after the
commit loses the input's table update (streams/tables/writer.py)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import faust
import pytest
from faust.types import TP

from agentstream.streams.delivery import new_transport
from agentstream.streams.tables import delete, write, writer
from agentstream.streams.tables.writer import flush_pending, pending_writes

_ids = itertools.count()


@pytest.fixture(autouse=True)
def _no_pending_left() -> Iterator[None]:
    yield
    writer._PENDING.clear()
    for task in writer._SCHEDULED:
        task.cancel()


def eos_table(
    monkeypatch: pytest.MonkeyPatch, guarantee: str = "exactly_once"
) -> tuple[faust.App, Any, list[tuple[Any, ...]]]:
    """A table of an app seen as inside a worker, whose changelog topic records what it
    is asked to publish (and yields to the loop while doing it, as the producer's send
    does)."""
    app = faust.App(
        f"writer-flush-test-{next(_ids)}",
        broker="kafka://127.0.0.1:1",
        store="memory://",
        processing_guarantee=guarantee,
    )
    app.in_worker = True
    table = app.Table("t", default=None, key_type=str, partitions=4)
    published: list[tuple[Any, ...]] = []

    async def publish_message(topic: Any, fut: Any, wait: bool = False) -> Any:
        await asyncio.sleep(0.01)
        published.append((fut.message.partition, fut.message.key, fut.message.value))
        sent: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sent.set_result(None)  # delivered
        return sent

    monkeypatch.setattr(type(table.changelog_topic), "publish_message", publish_message)
    return app, table, published


async def test_writes_wait_for_flush_pending_not_in_fausts_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, table, published = eos_table(monkeypatch)
    assert app.in_transaction
    write(table, "a", 1, partition=2)
    write(table, "b", 2, partition=0)
    delete(table, "a", partition=2)
    assert table.data == {"b": 2}
    assert app.producer.buffer.pending.empty()
    assert pending_writes() == 3
    await flush_pending()
    assert pending_writes() == 0
    assert published == [(2, b'"a"', b"1"), (0, b'"b"', b"2"), (2, b'"a"', None)]


async def test_a_flush_returns_only_when_every_record_is_handed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second flusher (the commit window) must not return while the first (a batch)
    still has a record on its way to the producer — Faust's buffer flush does."""
    _, table, published = eos_table(monkeypatch)
    for i in range(3):
        write(table, f"k{i}", i, partition=1)
    first = asyncio.create_task(flush_pending())
    await asyncio.sleep(0.005)  # the first record is on its way
    await flush_pending()
    assert len(published) == 3
    await first


async def test_at_least_once_writes_wait_outside_fausts_buffer_and_flush_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A timer's or a call task's write, with no batch end or commit to come soon, is
    handed over by the flush it schedules."""
    app, table, published = eos_table(monkeypatch, "at_least_once")
    assert not app.in_transaction
    write(table, "a", 1, partition=3)
    write(table, "b", 2, partition=1)
    assert app.producer.buffer.pending.empty()
    assert pending_writes() == 2
    scheduled = writer._SCHEDULED[0]
    await asyncio.wait_for(scheduled, 5)
    assert published == [(3, b'"a"', b"1"), (1, b'"b"', b"2")]
    assert pending_writes() == 0


async def test_at_least_once_commit_hands_table_records_over_before_the_producer_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The consumer's commit (`BatchDeliveryConsumer._commit_offsets`) runs Faust's
    producer flush and offset commit only once every table record written before it is
    in the producer: with Faust's buffer, the flush returned with the last record still
    on its way, and the offsets were committed without it."""
    app, table, published = eos_table(monkeypatch, "at_least_once")
    tp = TP("in", 0)

    async def rebalanced(tps: Any) -> None:
        return None

    consumer = new_transport(app).create_consumer(
        callback=rebalanced, on_partitions_revoked=rebalanced, on_partitions_assigned=rebalanced
    )
    monkeypatch.setattr(consumer, "assignment", lambda: {tp})
    seen: dict[str, int] = {}

    async def producer_flush() -> None:
        seen["published at producer flush"] = len(published)

    async def commit(offsets: Any) -> bool:
        seen["published at offset commit"] = len(published)
        return True

    monkeypatch.setattr(app.producer, "flush", producer_flush)
    monkeypatch.setattr(consumer, "_commit", commit)
    for i in range(5):
        write(table, f"k{i}", i, partition=0)
    # the flush the writes scheduled is under way, its first record on its way
    await asyncio.sleep(0.005)
    assert not writer._SCHEDULED[0].done()
    assert published == []
    assert await consumer._commit_offsets({tp: 10})
    assert seen == {"published at producer flush": 5, "published at offset commit": 5}


async def test_a_changelog_record_the_broker_refuses_stops_every_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At-least-once: Faust's callback for a changelog send only logs a failure, and the
    producer flush before a commit waits for the send to end, not to succeed: the input
    was committed without its table update. A refused record is a refused output."""
    from agentstream.streams import processing

    _, table, _ = eos_table(monkeypatch, "at_least_once")
    refused: list[asyncio.Future[Any]] = []

    async def publish_message(topic: Any, fut: Any, wait: bool = False) -> Any:
        sent: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refused.append(sent)
        return sent

    monkeypatch.setattr(type(table.changelog_topic), "publish_message", publish_message)
    crashed: list[BaseException] = []
    monkeypatch.setattr(processing, "delivery_failed", crashed.append)
    write(table, "a", 1, partition=1)
    await flush_pending()
    assert len(refused) == 1 and crashed == []
    refused[0].set_exception(RuntimeError("record too large for the changelog topic"))
    await asyncio.sleep(0)
    assert [str(e) for e in crashed] == ["record too large for the changelog topic"]


def stale_batch_world(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[Any], Any, Any, Any]:
    """Exactly-once, one input queued on a stream whose consumer counts revokes:
    (table, what its changelog published, app, stream, the input)."""
    from agentstream.streams import processing
    from tests.unit.test_decoded_batches import Gate, message
    from tests.unit.test_event_batches import App, Ev, Msg, Stream

    _, table, published = eos_table(monkeypatch)
    monkeypatch.setattr(processing, "_EOS", True)
    monkeypatch.setattr(processing, "GATE", Gate([]))
    monkeypatch.setattr(processing, "processing_failed", lambda exc: None)
    app = App()
    app.consumer._revokes = 0
    stream = Stream(app)
    ev = Ev(Msg("in", 0, 0, 1), message(0))
    stream.channel.queue.put_nowait(ev)
    return table, published, app, stream, ev


async def test_a_batch_abandoned_at_a_revoke_sends_no_table_record_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exactly-once: a batch taken before a revoke is abandoned unacked at its flush, and
    its inputs are folded again by their partitions' owners. The record it wrote stayed
    queued and went into the next transaction with the next flush: the fold counted
    twice in the changelog (or, the partition gone, the send failed and crashed)."""
    from agentstream.streams.processing import (
        BatchAbandoned,
        abandon_open_batch,
        decoded_batches,
    )

    table, published, app, stream, ev = stale_batch_world(monkeypatch)

    async def agent() -> None:
        try:
            async for _ in decoded_batches(stream, consumer="c", max_batch=10, within_s=0.01):
                write(table, "count", 1, partition=0)  # the batch's fold
                app.consumer._revokes += 1  # a revoke whose wait ran out: the batch is stale
        except BaseException as exc:
            await abandon_open_batch(exc, stopping=False)
            raise

    with pytest.raises(BatchAbandoned):
        await asyncio.wait_for(asyncio.create_task(agent()), 2)
    assert ev.acks == []  # its owner processes it again
    write(table, "other", 2, partition=1)  # outside any batch: kept
    await flush_pending()  # the next batch's, or the next commit window's
    assert published == [(1, b'"other"', b"2")] and pending_writes() == 0


async def test_a_batch_abandoned_at_a_revoke_changes_no_table_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exactly-once: a write by a batch taken before a revoke raises `BatchAbandoned` with
    the table as it was. Its changelog record would be dropped at the flush, but the
    value in memory stayed: after the revoke emptied the tables for the rebalance's
    recovery, a key nothing committed, or the input counted twice once folded again."""
    from agentstream.streams.processing import BatchAbandoned, decoded_batches

    table, _, app, stream, _ = stale_batch_world(monkeypatch)
    seen: list[str] = []

    async def agent() -> None:
        async for _ in decoded_batches(stream, consumer="c", max_batch=10, within_s=0.01):
            write(table, "before", 1, partition=0)  # before the revoke: in memory
            app.consumer._revokes += 1  # a revoke: the batch is stale from here on
            try:
                write(table, "after", 1, partition=0)
            except BatchAbandoned:
                seen.append("refused")
                raise
            delete(table, "before", partition=0)  # never reached

    with pytest.raises(BatchAbandoned):
        await asyncio.wait_for(asyncio.create_task(agent()), 2)
    assert seen == ["refused"]
    assert "after" not in table.data and table.data["before"] == 1
