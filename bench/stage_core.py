"""The core stage: how fast one pipeline hop is, next to what Python and Faust allow.

All three variants read the same pre-filled input topic (`agent.messages` under one run
prefix), each with its own consumer group, one after the other so that they never share
the CPU:

(a) ``ceiling_eps``: raw aiokafka consumer → orjson decode + encode → aiokafka batch
    producer, in the harness process. Also ``raw_consume_eps``: the consumer alone.
(b) ``naive_faust_eps``: `bench.naive_app`, a one-event-at-a-time Faust agent with
    Faust's default JSON codec, as a Faust worker subprocess.
(c) ``pipeline_eps``: `bench.passthrough` run by ``agentstream worker`` — the pipeline's
    decode/validate/dead-letter path and `emit`.

(b) and (c) are timed from the first output record to the N-th (start-up excluded); (a)
from its first fetch request (partitions already assigned) to the last produced record
acknowledged.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from agentstream.streams.kafka_security import new_consumer, new_producer
from agentstream.streams.topics import AGENT_MESSAGES, AGENT_MESSAGES_ACCEPTED
from bench.context import BenchContext, BenchError, Throughput, cpu_keys, cpu_text, log

NAME = "core"

#: Generous upper bound for one variant; a stalled worker must not hang the run.
STAGE_TIMEOUT_S = 600.0


async def run(ctx: BenchContext) -> dict[str, float]:
    env = ctx.new_env()
    await ctx.ensure_topics(env)
    source = ctx.topic(env, AGENT_MESSAGES)
    values, keys = ctx.payloads()
    log(f"core: producing {len(values)} events of ~{len(values[0])} B to {source}")
    produce_eps = await ctx.produce(source, values, keys)
    log(f"core: produced at {produce_eps:,.0f} ev/s")
    n = len(values)
    out: dict[str, float] = {"produce_eps": produce_eps}

    out["raw_consume_eps"] = await consume_only(ctx, source, n)
    log(f"core: raw consume {out['raw_consume_eps']:,.0f} ev/s")

    ceiling_out = ctx.topic(env, "bench.ceiling.out")
    await ctx.create_topic(ceiling_out)
    out["ceiling_eps"] = await ceiling(ctx, source, ceiling_out, n)
    log(f"core: (a) ceiling {out['ceiling_eps']:,.0f} ev/s")

    naive_out = ctx.topic(env, "bench.naive.out")
    await ctx.create_topic(naive_out)
    naive_env = ctx.new_env(
        AGENTSTREAM_TOPIC_PREFIX=env["AGENTSTREAM_TOPIC_PREFIX"],
        BENCH_NAIVE_IN=source,
        BENCH_NAIVE_OUT=naive_out,
    )
    worker = ctx.start_process(naive_env, "-m", "bench.naive_app", "worker", "--loglevel", "info")
    out["naive_faust_eps"] = (await _timed(ctx, worker, naive_out, n)).eps
    log(f"core: (b) naive Faust {out['naive_faust_eps']:,.0f} ev/s")

    pipe_env = ctx.new_env(
        AGENTSTREAM_TOPIC_PREFIX=env["AGENTSTREAM_TOPIC_PREFIX"],
        AGENTSTREAM_AGENTS="bench.passthrough",
    )
    worker = ctx.start_worker(pipe_env)
    measured = await _timed(ctx, worker, ctx.topic(env, AGENT_MESSAGES_ACCEPTED), n)
    out["pipeline_eps"] = measured.eps
    out.update(cpu_keys("pipeline", measured))
    log(f"core: (c) pipeline {out['pipeline_eps']:,.0f} ev/s{cpu_text(measured)}")
    return out


async def _timed(ctx: BenchContext, worker: Any, topic: str, n: int) -> Throughput:
    try:
        return await ctx.watch_count(topic, n, STAGE_TIMEOUT_S, worker=worker)
    finally:
        worker.stop()


def _consumer(ctx: BenchContext, **extra: Any) -> AIOKafkaConsumer:
    return new_consumer(
        ctx.settings,
        "bench",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
        **extra,
    )


async def _assign_all(consumer: AIOKafkaConsumer, topic: str) -> None:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise BenchError(f"topic {topic} does not exist")
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)


async def consume_only(ctx: BenchContext, topic: str, n: int) -> float:
    """Consume n records and touch nothing: the floor under every consumer."""
    consumer = _consumer(ctx)
    await consumer.start()
    try:
        await _assign_all(consumer, topic)
        seen = 0
        t0 = time.monotonic()
        deadline = t0 + STAGE_TIMEOUT_S
        while seen < n:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            seen += sum(len(records) for records in batch.values())
            if time.monotonic() > deadline:
                raise BenchError(f"consumed {seen} of {n}")
        return n / max(time.monotonic() - t0, 1e-9)
    finally:
        await consumer.stop()


async def ceiling(ctx: BenchContext, source: str, sink: str, n: int) -> float:
    """Consume → orjson.loads → orjson.dumps → produce (same partition, per-partition
    batches, acks=all like the pipeline), until n records are acknowledged."""
    consumer = _consumer(ctx)
    producer = new_producer(
        ctx.settings,
        "bench",
        acks="all",
        linger_ms=5,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    await consumer.start()
    await producer.start()
    loads, dumps = orjson.loads, orjson.dumps
    try:
        await _assign_all(consumer, source)
        await producer.partitions_for(sink)
        seen = 0
        pending = []
        t0 = time.monotonic()
        deadline = t0 + STAGE_TIMEOUT_S
        while seen < n:
            fetched = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for tp, records in fetched.items():
                p = tp.partition
                batch = producer.create_batch()
                for rec in records:
                    value = dumps(loads(rec.value))
                    if batch.append(key=rec.key, value=value, timestamp=None) is None:
                        pending.append(await producer.send_batch(batch, sink, partition=p))
                        batch = producer.create_batch()
                        batch.append(key=rec.key, value=value, timestamp=None)
                if batch.record_count():
                    pending.append(await producer.send_batch(batch, sink, partition=p))
                seen += len(records)
            if time.monotonic() > deadline:
                raise BenchError(f"ceiling: {seen} of {n} after {STAGE_TIMEOUT_S}s")
        for fut in pending:
            await fut
        return n / max(time.monotonic() - t0, 1e-9)
    finally:
        await producer.stop()
        await consumer.stop()
