"""Same-work ceilings on aiokafka, next to Quix Streams in the same invocation.

Not a stage of ``python -m bench``: a standalone measurement for the batch-delivery design
(docs/design/batch-delivery.md). It writes the core stage's events (`BenchContext.payloads`,
keyed and partitioned alike) to a fresh input topic once, then runs, one after the other,
each reading the whole input from the beginning and writing every event to its own topic:

* ``quix_eps``: `bench.peer_quix` in the peers' virtualenv, timed by the harness like the
  peers stage (first output seen → N-th);
* ``send_eps`` (a): aiokafka ``getmany`` → ``encode(registry.decode(value))`` →
  ``producer.send`` per record, the fetched batch's futures awaited before the next fetch;
* ``batch_eps`` (b): the same with ``create_batch``/``send_batch`` per (topic, partition),
  partitions chosen by the worker's partitioner (aiokafka's `DefaultPartitioner`: murmur2);
* ``txn_send_eps``, ``txn_batch_eps`` (c): (a) and (b) with one transaction per fetched
  batch (``transactional_id``, ``send_offsets_to_transaction``, inputs read
  ``read_committed``): one producer, one transaction across all partitions, which is the
  cheapest shape exactly-once can take (Faust runs one producer per source partition).

(a) to (c) are timed from the first fetch to the last output acknowledged (the transaction
variants: to the last transaction committed). The producers are set up like the
worker's (acks=all, idempotent, linger 5 ms, 512 KiB batches). Every rate is also
printed as a ratio to the mean of the Quix runs.

    AGENTSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:19792 python -m bench.ceiling_aiokafka \
        [--events 200000] [--only a,b,c,cb] [--quix-runs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from agentstream.schemas import encode, registry
from agentstream.streams.kafka_security import new_producer
from bench import peers_venv
from bench.context import BenchContext, BenchError, log
from bench.stage_core import _assign_all, _consumer

#: records per fetch, as the core stage's ceiling
MAX_RECORDS = 10_000
TIMEOUT_S = 300.0


def _work(value: bytes) -> bytes:
    return encode(registry.decode(value))


def _producer(ctx: BenchContext, **extra: Any) -> AIOKafkaProducer:
    return new_producer(
        ctx.settings,
        "bench",
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
        **extra,
    )


Produce = Callable[[AIOKafkaProducer, str, dict[Any, list[Any]]], Awaitable[list[Any]]]


async def _per_record(
    producer: AIOKafkaProducer, sink: str, fetched: dict[Any, list[Any]]
) -> list[Any]:
    send = producer.send
    futures = []
    for records in fetched.values():
        for rec in records:
            futures.append(await send(sink, _work(rec.value), key=rec.key))
    return futures


def _batched(partitions: list[int]) -> Produce:
    partitioner = DefaultPartitioner()

    async def produce(
        producer: AIOKafkaProducer, sink: str, fetched: dict[Any, list[Any]]
    ) -> list[Any]:
        batches: dict[int, Any] = {}
        futures = []
        for records in fetched.values():
            for rec in records:
                value = _work(rec.value)
                p = partitioner(rec.key, partitions, partitions)
                batch = batches.get(p)
                if batch is None:
                    batch = batches[p] = producer.create_batch()
                if batch.append(key=rec.key, value=value, timestamp=None) is None:
                    futures.append(await producer.send_batch(batch, sink, partition=p))
                    batch = batches[p] = producer.create_batch()
                    batch.append(key=rec.key, value=value, timestamp=None)
        for p, batch in batches.items():
            if batch.record_count():
                futures.append(await producer.send_batch(batch, sink, partition=p))
        return futures

    return produce


async def loop(
    ctx: BenchContext, source: str, sink: str, n: int, *, batched: bool, txn: bool
) -> float:
    group = f"ceiling-{uuid.uuid4().hex[:8]}"
    consumer = _consumer(
        ctx, group_id=group, isolation_level="read_committed" if txn else "read_uncommitted"
    )
    producer = _producer(ctx, **({"transactional_id": group} if txn else {}))
    await consumer.start()
    await producer.start()
    try:
        await _assign_all(consumer, source)
        partitions = sorted(await producer.partitions_for(sink))
        produce = _batched(partitions) if batched else _per_record
        seen = 0
        t0 = time.monotonic()
        deadline = t0 + TIMEOUT_S
        while seen < n:
            fetched = await consumer.getmany(timeout_ms=200, max_records=MAX_RECORDS)
            if not fetched:
                continue
            if txn:
                async with producer.transaction():
                    await produce(producer, sink, fetched)
                    await producer.send_offsets_to_transaction(
                        {tp: records[-1].offset + 1 for tp, records in fetched.items()}, group
                    )
            else:
                await asyncio.gather(*await produce(producer, sink, fetched))
            seen += sum(len(records) for records in fetched.values())
            if time.monotonic() > deadline:
                raise BenchError(f"{seen} of {n} after {TIMEOUT_S}s")
        return n / max(time.monotonic() - t0, 1e-9)
    finally:
        await producer.stop()
        await consumer.stop()


async def quix(ctx: BenchContext, python: Any, source: str, n: int) -> float:
    env = ctx.new_env()
    sink = ctx.topic(env, "bench.quix.out")
    await ctx.create_topic(sink)
    runner_env = ctx.new_env(BENCH_PEER_IN=source, BENCH_PEER_OUT=sink, BENCH_PEER_EVENTS=str(n))
    runner_env["BENCH_PEER_STATE_DIR"] = f"{runner_env['AGENTSTREAM_DATA_DIR']}/state"
    worker = ctx.start_process(runner_env, "-m", "bench.peer_quix", python=python)
    try:
        return (await ctx.watch_count(sink, n, TIMEOUT_S, worker=worker)).eps
    finally:
        worker.stop()


VARIANTS = {
    "a": ("send_eps", {"batched": False, "txn": False}),
    "b": ("batch_eps", {"batched": True, "txn": False}),
    "c": ("txn_send_eps", {"batched": False, "txn": True}),
    "cb": ("txn_batch_eps", {"batched": True, "txn": True}),
}


async def main(events: int, only: list[str], quix_n: int) -> dict[str, float]:
    bootstrap = os.environ.get("AGENTSTREAM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        raise SystemExit("set AGENTSTREAM_KAFKA_BOOTSTRAP")
    ctx = BenchContext(bootstrap, events=events)
    out: dict[str, float] = {}
    try:
        values, keys = ctx.payloads()
        env = ctx.new_env()
        source = ctx.topic(env, "agent.messages")
        await ctx.create_topic(source)
        await ctx.produce(source, values, keys)
        python = peers_venv.ensure(None, log) if quix_n else None
        quix_runs: list[float] = []
        if python is not None:
            quix_runs.append(await quix(ctx, python, source, events))
            log(f"quix {quix_runs[-1]:,.0f} ev/s")
        for name in only:
            key, kw = VARIANTS[name]
            sink = ctx.topic(env, f"bench.ceiling.{key}")
            await ctx.create_topic(sink)
            out[key] = await loop(ctx, source, sink, events, **kw)
            log(f"{key} {out[key]:,.0f} ev/s")
        if python is not None:
            if quix_n > 1:
                quix_runs.append(await quix(ctx, python, source, events))
                log(f"quix {quix_runs[-1]:,.0f} ev/s")
            out["quix_eps"] = sum(quix_runs) / len(quix_runs)
            out["quix_spread"] = max(quix_runs) / min(quix_runs)
            for name in only:
                key = VARIANTS[name][0]
                out[f"{key.removesuffix('_eps')}_vs_quix"] = out[key] / out["quix_eps"]
    finally:
        await ctx.close()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--only", default="a,b,c,cb")
    parser.add_argument("--quix-runs", type=int, default=2, help="0, 1 (before) or 2 (and after)")
    args = parser.parse_args()
    result = asyncio.run(main(args.events, args.only.split(","), args.quix_runs))
    print(json.dumps({k: round(v, 3) for k, v in result.items()}))
