"""Partition-correct writes to Faust tables: `write`, `delete` and the `TableWriter` mapping.

Faust sends a table write's changelog record to the partition of the *current event*,
assuming one event at a time inside stream iteration. Our agents fold batches
(`streams.processing.decoded_batches`), where Faust's current event is just the last one
Faust handed out, and some tables are written from tasks and timers, where there is none.
A record in the wrong changelog partition is restored by the wrong worker after a
rebalance, and under exactly-once it joins the transaction of another source partition.

So every table write goes through `write` / `delete`: the local data is updated and the
changelog record goes to the partition the caller names —

* for a table co-partitioned with its source (same partition count, the table's entries
  only ever written while folding records of one source partition): the partition of the
  input record being folded. Folds take a `TableWriter` set to it with
  ``writer.at(message.partition)``; the security counters pass it to `write` directly.
* for a table written outside any input (the LLM tables, written by call tasks): a
  partition derived from the key (`streams.tables.llm`'s table class routes its
  ``table[key] = value`` through `write` that way).

Writes bypass Faust's ``Table.__setitem__`` and with it Faust's own table sensors; reads
go straight to the local data. Neither matters for the memory store these tables use.

A changelog record must reach the producer before the offset of the input it folds is
committed. Faust hands table records to the producer from a buffer task, and the flush
before a commit (`ProducerBuffer.flush`) returns when the buffer is empty — with the
record that task took last still on its way to the producer, or after 0.1 s without
progress with records still buffered. Such a record is not covered by the commit that
follows: after a kill -9 the input's offset is committed and its table update is gone.
Under exactly-once it lands in the *next* transaction (seen as a decision counter short
by one batch after a crash); under at-least-once the producer flush the commit waits for
does not include it (seen as a survivor's table one batch behind its rebuild after the
other worker was killed, with every input offset committed).

So the records are kept here instead of in Faust's buffer, in write order, and handed to
the producer by `flush_pending`, which returns only when every one of them is in the
producer (under exactly-once: in its transaction):

* each batch calls it before it is acked (`streams.processing.decoded_batches`; under
  exactly-once before it leaves the commit gate);
* every commit calls it first: the exactly-once gate's commit window (`streams.eos`),
  and under at-least-once `BatchDeliveryConsumer._commit_offsets`, right before Faust's
  producer flush, which then waits for these records' delivery too;
* under at-least-once every write also schedules a flush, so a record written outside
  any batch (a timer, an LLM call task) goes out as soon as Faust's buffer would have
  sent it; inside a batch the batch's own flush may take it first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections import deque
from collections.abc import ItemsView, Iterator, KeysView, MutableMapping
from typing import Any

from agentstream.streams.settings import RECORD_OVERHEAD

log = logging.getLogger(__name__)

#: changelog records written, not yet handed to the producer, each with the batch that
#: wrote it (`streams.processing`'s token; None outside a batch)
_PENDING: deque[Any] = deque()
#: one flush at a time, per event loop (a worker has one; tests run several in turn)
_FLUSHING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def write(table: Any, key: Any, value: Any, *, partition: int) -> None:
    """Set `key` to `value` in the Faust table's local data and send the changelog record
    to `partition`.

    The record is serialised first, and the table changes only if that works and the
    record fits the producer's limit: else the write raises (`ProcessingError` when too
    large, the encoder's error when it refuses the value) with the table as it was, in
    the handler of the input that asked for it, whose dead letter it becomes. Found later,
    at the flush, such a record stayed at the head of the pending queue and no agent of
    the worker committed again; and a value in the live table that never reached its
    changelog made live and rebuild differ.

    Exactly-once, a batch taken before a revoke changes no table (`_refuse_abandoned`)."""
    _refuse_abandoned(table)
    topic = table.changelog_topic
    raw_key = topic.prepare_key(key, table.key_serializer, None)[0]
    raw_value = topic.prepare_value(value, table.value_serializer, None)[0]
    size = len(raw_key or b"") + len(raw_value or b"")
    # what a changelog record's key and value may take together: the producer's request
    # limit less room for the record batch's own headers
    limit = table.app.conf.producer_max_request_size - RECORD_OVERHEAD
    if size > limit:
        from agentstream.streams.errors import ProcessingError

        raise ProcessingError(
            f"table {table.name}: a changelog record of {size} bytes is too large (at most "
            f"{limit}, the producer's request limit): the input that made it is refused"
        )
    table.data[key] = value
    note_partition(table, key, partition)
    _send(table, partition, raw_key, raw_value, key_serializer="raw", value_serializer="raw")


def _refuse_abandoned(table: Any) -> None:
    """Exactly-once: raise `BatchAbandoned` when the writing task's batch was taken before
    a revoke. Its changelog record would be dropped at the flush (`flush_pending`), but
    the change to the table in memory would stay, after the revoke emptied the tables
    for the rebalance's recovery (`streams.delivery.forget_uncommitted_folds`) or after
    that recovery wrote the committed value back: counted twice once the input is
    folded again, or a key nothing committed."""
    hooks = _batch_hooks()
    if hooks.abandoned(hooks.written_by()):
        raise hooks.BatchAbandoned(
            f"table {table.name}: a write of a batch taken before a revoke (abandoned)"
        )


def note_partition(table: Any, key: Any, partition: int | None) -> None:
    """The memory store drops, when a recovery completes, the keys of partitions this
    worker no longer holds, but only keys it saw in a restore (`_key_partition`): a key
    written live stayed after its partition moved away (memory kept for good, stale
    windows served by whole-table views). So the live write notes its partition too."""
    known = getattr(table.data, "_key_partition", None)
    if known is None:
        return
    if partition is None:
        known.pop(key, None)
    else:
        known[key] = partition


def delete(table: Any, key: Any, *, partition: int) -> None:
    """Remove `key` from the local data (KeyError when absent, like ``del``) and send its
    tombstone to `partition`."""
    _refuse_abandoned(table)
    del table.data[key]
    note_partition(table, key, None)
    # a tombstone is a null value, which the table's JSON serializer would write as "null"
    _send(table, partition, key, None, value_serializer="raw")


def _send(table: Any, partition: int, key: Any, value: Any, **serializers: Any) -> None:
    # what Table.send_changelog builds, kept for `flush_pending` instead of Faust's buffer,
    # with the batch that wrote it (see `flush_pending`)
    _PENDING.append(
        (
            table.changelog_topic.as_future_message(
                key=key,
                value=value,
                partition=partition,
                key_serializer=serializers.get("key_serializer", table.key_serializer),
                value_serializer=serializers.get("value_serializer", table.value_serializer),
                callback=table._on_changelog_sent,
                eager_partitioning=True,
            ),
            _batch_hooks().written_by(),
        )
    )
    if not getattr(table.app, "in_transaction", False):
        _schedule_flush()


#: at-least-once: the flush scheduled by a write, while it has not run yet
_SCHEDULED: list[asyncio.Task[None]] = []


def _schedule_flush() -> None:
    """At-least-once: hand the pending records over soon, as Faust's buffer task would,
    without waiting for the next batch end or commit (a timer's write may have neither
    for a while). One flush at a time is scheduled; a write while it runs is taken by
    its loop (`flush_pending` empties the queue) or by the next one."""
    if _SCHEDULED and not _SCHEDULED[0].done():
        return
    try:
        task = asyncio.get_running_loop().create_task(flush_pending())
    except RuntimeError:  # no loop (a script folding into a table): the next flush takes it
        return
    _SCHEDULED[:] = [task]
    task.add_done_callback(_flush_done)


def _flush_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # the records stay pending: the next batch end or commit hands them over or fails
        # the same way where it is seen (the commit then does not happen)
        log.warning("handing table changelog records to the producer failed: %r", task.exception())


def pending_writes() -> int:
    """Changelog records written and not yet handed to the producer."""
    return len(_PENDING)


async def flush_pending() -> None:
    """Hand every pending changelog record to the producer, in write order; returns once
    each is in its partition's open transaction (not yet delivered). Concurrent callers
    wait for each other, so none returns while a record another one took is still on its
    way."""
    loop = asyncio.get_running_loop()
    lock = _FLUSHING.get(loop)
    if lock is None:
        lock = _FLUSHING[loop] = asyncio.Lock()
    abandoned = _batch_hooks().abandoned
    async with lock:
        while _PENDING:
            fut, batch = _PENDING[0]
            if abandoned(batch):
                # exactly-once: written by a batch taken before a revoke, abandoned
                # unacked; its inputs are folded again by their partitions' owners, so
                # the record joins no transaction (in the next one it would count twice)
                _PENDING.popleft()
                log.info("dropping a table record of a batch abandoned at a revoke")
                continue
            channel = fut.message.channel
            sent = await channel.publish_message(fut, wait=False)
            _PENDING.popleft()
            # a refused record is a refused output (delivery invariant 2): Faust's own
            # callback only logs it, and the commit's producer flush waits for the send
            # to end, not to succeed, so the input's offset was committed without it
            _watch(sent, channel.get_topic_name())


@functools.cache
def _batch_hooks() -> Any:
    """`streams.processing` (which imports this module): `written_by()` names the batch
    of the task writing, `abandoned(batch)` whether exactly-once abandoned it."""
    from agentstream.streams import processing

    return processing


def _watch(sent: Any, topic: str) -> None:
    from agentstream.streams.processing import watch_delivery  # imports this module

    watch_delivery(sent, topic)


class TableWriter(MutableMapping[str, Any]):
    """A Faust table as the plain mapping a fold takes (see `streams.tables.TableSpec`):
    reads from the local data, writes through `write` / `delete` to the changelog
    partition of the input record being folded — set it with `at` before each fold."""

    __slots__ = ("partition", "table")

    def __init__(self, table: Any) -> None:
        self.table = table
        #: changelog partition of the writes: the input record's partition
        self.partition: int | None = None

    def at(self, partition: int) -> TableWriter:
        """Send the following writes to `partition`; returns self, to pass to a fold."""
        self.partition = partition
        return self

    def _target(self) -> int:
        if self.partition is None:
            # no silent default: a guessed partition is lost on the next rebalance
            raise RuntimeError(f"table {self.table.name!r} written with no input partition set")
        return self.partition

    def __getitem__(self, key: str) -> Any:
        return self.table.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.table.data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.table.data

    def __setitem__(self, key: str, value: Any) -> None:
        write(self.table, key, value, partition=self._target())

    def __delitem__(self, key: str) -> None:
        delete(self.table, key, partition=self._target())

    def __iter__(self) -> Iterator[str]:
        return iter(self.table.data)

    def __len__(self) -> int:
        return len(self.table.data)

    def items(self) -> ItemsView[str, Any]:
        return self.table.data.items()

    def keys(self) -> KeysView[str]:
        return self.table.data.keys()
