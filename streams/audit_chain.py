"""Tamper-evident audit trails: every sealed record carries the sha256 of the previous
record in the same partition (`prev_hash`) and its own (`hash`).

    hash = sha256(canonical JSON of the whole event, with payload.hash = "")

so altering any field, deleting, inserting or reordering records breaks the chain, which
`agentstream audit verify` reports. A chained topic has exactly one writer per partition:
agents emit the sealed record to the *same partition number* as their input record (the
input and output topics have the same partition count), and only the worker that owns an
input partition writes to that output partition.

The last hash of a partition is read back from the topic itself the first time a worker
writes to it (and again after every rebalance), so a crash — even kill -9 — never needs
state that could be lost: the chain continues from what is actually on the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from aiokafka import TopicPartition

from schemas import Event, encode, registry
from schemas.errors import SchemaError
from streams.client import group_less_consumer
from streams.errors import BrokerError

log = logging.getLogger(__name__)

GENESIS = "0" * 64


def compute_hash(event: Event[Any]) -> str:
    data = event.model_dump(mode="json")
    data["payload"]["hash"] = ""
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def seal(event: Event[Any], prev_hash: str) -> Event[Any]:
    """A copy of `event` with `prev_hash` set and `hash` computed."""
    payload = event.payload.model_copy(update={"prev_hash": prev_hash, "hash": ""})
    unsealed = event.model_copy(update={"payload": payload})
    digest = compute_hash(unsealed)
    return unsealed.model_copy(update={"payload": payload.model_copy(update={"hash": digest})})


async def last_hash(bootstrap: str, topic: str, partition: int, lookback: int = 64) -> str:
    """The `hash` of the newest sealed record in a partition (GENESIS when it has none).

    Reads the last `lookback` offsets, and further back, eight times as far each round,
    while they hold no sealed record, down to the partition's first retained offset.
    Under exactly-once a crash leaves aborted transactions (and their commit markers) at
    the end of the log, which a read-committed reader skips: a worker killed with more
    than `lookback` records in flight would otherwise find nothing, restart the chain at
    GENESIS and break it for `verify`. A partition that stops answering raises
    `BrokerError` rather than return an older head, which would fork the chain.
    """
    consumer = group_less_consumer(bootstrap, "chain-head", auto_offset_reset="earliest")
    await consumer.start()
    try:
        # bounded as a whole: a chain writer waits for this with its partition locked
        async with asyncio.timeout(HEAD_TIMEOUT_S):
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            first = (await consumer.beginning_offsets([tp]))[tp]
            start = end
            while start > first:
                start, stop = max(first, start - lookback), start
                newest = await _newest_hash(consumer, tp, start, stop)
                if newest is not None:
                    return newest
                lookback *= 8
            return GENESIS
    except TimeoutError:
        raise BrokerError(
            f"reading the chain head of {topic}[{partition}] took over {HEAD_TIMEOUT_S:g}s"
        ) from None
    finally:
        await consumer.stop()


#: seconds a chain-head lookup may take in all
HEAD_TIMEOUT_S = 60.0


#: seconds a chain-head read may go without its position moving before it gives up
STALL_S = 10.0


async def _newest_hash(consumer: Any, tp: TopicPartition, start: int, stop: int) -> str | None:
    """The hash of the newest sealed record at offsets [start, stop), if any."""
    consumer.seek(tp, start)
    newest = None
    loop = asyncio.get_running_loop()
    position = start
    moved = loop.time()
    # short polls: a transaction marker ends the range under exactly-once, and reading
    # past it returns no record, only a new position
    while (now_at := await consumer.position(tp)) < stop:
        if now_at != position:
            position, moved = now_at, loop.time()
        elif loop.time() - moved > STALL_S:
            raise BrokerError(
                f"reading the chain head of {tp.topic}[{tp.partition}] made no progress "
                f"for {STALL_S:g}s at offset {position}"
            )
        batch = await consumer.getmany(tp, timeout_ms=100)
        for rec in batch.get(tp, []):
            if rec.offset >= stop:
                return newest
            try:
                ev = registry.decode(rec.value)
            except SchemaError:
                continue
            h = getattr(ev.payload, "hash", "")
            if h:
                newest = h
    return newest


@dataclass
class ChainHead:
    """The hash of the newest record of one partition's chain (see `ChainWriter.head`)."""

    hash: str


class ChainWriter:
    """Seals and sends records of one chained catalogue topic, one lock per partition."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._last: dict[int, str] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def reset(self) -> None:
        """Forget cached heads (on rebalance another worker may have written since)."""
        self._last.clear()

    @contextlib.asynccontextmanager
    async def head(self, partition: int) -> AsyncIterator[ChainHead]:
        """Hold `partition`'s lock with its current head. Seal and send records in order
        inside the block, setting `head.hash` to each sealed record's hash; the last one
        becomes the partition's head when the block exits normally."""
        from streams.app import settings

        lock = self._locks.setdefault(partition, asyncio.Lock())
        async with lock:
            prev = self._last.get(partition)
            if prev is None:
                prev = await last_hash(settings.bootstrap, settings.topic(self.topic), partition)
            head = ChainHead(prev)
            yield head
            self._last[partition] = head.hash

    async def emit(self, event: Event[Any], partition: int) -> Event[Any]:
        from streams.app import catalogue_topic, settings
        from streams.observability import EVENTS_OUT
        from streams.processing import _EOS, _delivered, _producer, send_record

        catalogue_topic(self.topic)  # unknown names fail here
        # The producer Topic.send would use, fetched before taking the lock: getting it
        # through `app.maybe_start_producer()` (as Topic.send does) can yield to the
        # loop, and every record queued on this partition's lock waited for that — tens
        # of ms per response with 200 LLM calls in flight (bench/stage_llm.py).
        producer = await _producer()
        async with self.head(partition) as head:
            sealed = seal(event, head.hash)
            if _EOS:
                # in the transaction of the input being processed (streams/eos.py)
                fut = await send_record(
                    settings.topic(self.topic), sealed.key.encode(), encode(sealed), partition
                )
            else:
                fut = await producer.send(
                    settings.topic(self.topic),
                    sealed.key.encode(),
                    encode(sealed),
                    partition,
                    None,
                    None,
                )
            fut.add_done_callback(partial(_delivered, self.topic))
            head.hash = sealed.payload.hash
            EVENTS_OUT.labels(self.topic).inc()
            return sealed


_WRITERS: dict[str, ChainWriter] = {}


def chain_writer(topic: str) -> ChainWriter:
    """The process-wide writer for a chained topic; heads are forgotten on rebalance."""
    writer = _WRITERS.get(topic)
    if writer is None:
        writer = _WRITERS[topic] = ChainWriter(topic)
        if len(_WRITERS) == 1:
            _connect_rebalance_reset()
    return writer


def _connect_rebalance_reset() -> None:
    from streams.app import app

    @app.on_partitions_revoked.connect
    async def _forget_heads(app: Any, revoked: Any, **kwargs: Any) -> None:
        for writer in _WRITERS.values():
            writer.reset()
