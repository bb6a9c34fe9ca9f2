"""Under exactly-once, `streams.tables.write` / `delete` keep changelog records out of
Faust's producer buffer until `flush_pending` hands them to the producer: Faust's flush
before a commit can return with a record still on its way, which then joins the next
transaction, after its input's offset was committed (streams/tables/writer.py)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import faust
import pytest

from agentstream.streams.tables import delete, write
from agentstream.streams.tables.writer import flush_pending, pending_writes

_ids = itertools.count()


def eos_table(monkeypatch: pytest.MonkeyPatch) -> tuple[faust.App, Any, list[tuple[Any, ...]]]:
    """A table of an exactly-once app seen as inside a worker, whose changelog topic
    records what it is asked to publish (and yields to the loop while doing it, as the
    transaction manager's send does)."""
    app = faust.App(
        f"writer-eos-test-{next(_ids)}",
        broker="kafka://127.0.0.1:1",
        store="memory://",
        processing_guarantee="exactly_once",
    )
    app.in_worker = True
    table = app.Table("t", default=None, key_type=str, partitions=4)
    published: list[tuple[Any, ...]] = []

    async def publish_message(topic: Any, fut: Any, wait: bool = False) -> None:
        await asyncio.sleep(0.01)
        published.append((fut.message.partition, fut.message.key, fut.message.value))

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
