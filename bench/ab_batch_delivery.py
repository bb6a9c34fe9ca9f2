"""A/B of the two delivery paths on the core stage's pipeline worker.

Not a stage of ``python -m bench``: a standalone measurement for
docs/design/batch-delivery.md. Each run is the core stage's (c): `bench.passthrough` run
by ``agentstream worker`` over a fresh input of N events (`BenchContext.payloads`),
timed from the first output record to the N-th (`BenchContext.watch_count`). Runs
alternate between the per-record path (A, ``AGENTSTREAM_DELIVERY=per-record``) and the
batch-native one (B, the default), B first in every other pair; Quix Streams
(`bench.peer_quix`) runs before and after the pairs on the same input, for the ratio.
After each run the output topic must hold exactly N records (the input has no bad
events).

    AGENTSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:19792 python -m bench.ab_batch_delivery \
        [--events 200000] [--pairs 3] [--no-quix]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics

from agentstream.streams.kafka_security import new_admin
from agentstream.streams.topics import AGENT_MESSAGES, AGENT_MESSAGES_ACCEPTED
from bench import peers_venv
from bench.ceiling_aiokafka import quix
from bench.context import BenchContext, BenchError, log

TIMEOUT_S = 300.0
SWITCH = "AGENTSTREAM_DELIVERY"


async def pipeline(ctx: BenchContext, native: bool) -> float:
    path = "native" if native else "per-record"
    env = ctx.new_env(AGENTSTREAM_AGENTS="bench.passthrough", **{SWITCH: path})
    await ctx.ensure_topics(env)
    values, keys = ctx.payloads()
    await ctx.produce(ctx.topic(env, AGENT_MESSAGES), values, keys)
    out = ctx.topic(env, AGENT_MESSAGES_ACCEPTED)
    worker = ctx.start_worker(env)
    try:
        eps = (await ctx.watch_count(out, len(values), TIMEOUT_S, worker=worker)).eps
        await asyncio.sleep(1.0)  # a duplicate would show within a commit interval
        count = await ctx.count(out)
        if count != len(values):
            raise BenchError(f"{'B' if native else 'A'}: {count} outputs for {len(values)}")
        committed = await _committed(ctx, env["AGENTSTREAM_APP_ID"], len(values))
        if committed != len(values):
            raise BenchError(f"{'B' if native else 'A'}: {committed} committed of {len(values)}")
        return eps
    finally:
        worker.stop()


async def _committed(ctx: BenchContext, group: str, n: int) -> int:
    """The group's committed input offsets, summed (waits up to 10 s for them to reach n:
    the worker commits every second)."""
    admin = new_admin(ctx.settings, "bench")
    await admin.start()
    try:
        total = 0
        for _ in range(50):
            offsets = await admin.list_consumer_group_offsets(group)
            total = sum(
                meta.offset for tp, meta in offsets.items() if tp.topic.endswith(AGENT_MESSAGES)
            )
            if total >= n:
                break
            await asyncio.sleep(0.2)
        return total
    finally:
        await admin.close()


async def main(events: int, pairs: int, with_quix: bool) -> dict[str, object]:
    bootstrap = os.environ.get("AGENTSTREAM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        raise SystemExit("set AGENTSTREAM_KAFKA_BOOTSTRAP")
    ctx = BenchContext(bootstrap, events=events)
    a: list[float] = []
    b: list[float] = []
    quix_runs: list[float] = []
    try:
        values, keys = ctx.payloads()
        python = peers_venv.ensure(None, log) if with_quix else None
        if python is not None:
            env = ctx.new_env()
            source = ctx.topic(env, "agent.messages")
            await ctx.create_topic(source)
            await ctx.produce(source, values, keys)
            quix_runs.append(await quix(ctx, python, source, events))
            log(f"quix {quix_runs[-1]:,.0f} ev/s")
        for i in range(pairs):
            for native in (i % 2 == 1, i % 2 == 0):
                eps = await pipeline(ctx, native)
                (b if native else a).append(eps)
                log(f"pair {i + 1} {'B native' if native else 'A current'} {eps:,.0f} ev/s")
        if python is not None:
            quix_runs.append(await quix(ctx, python, source, events))
            log(f"quix {quix_runs[-1]:,.0f} ev/s")
    finally:
        await ctx.close()
    result: dict[str, object] = {
        "a_pipeline_eps": [round(x) for x in a],
        "b_native_eps": [round(x) for x in b],
        "b_over_a": [round(y / x, 2) for x, y in zip(a, b, strict=True)],
        "b_over_a_median": round(statistics.median(y / x for x, y in zip(a, b, strict=True)), 2),
    }
    if quix_runs:
        q = statistics.mean(quix_runs)
        result["quix_eps"] = [round(x) for x in quix_runs]
        result["a_vs_quix"] = [round(x / q, 2) for x in a]
        result["b_vs_quix"] = [round(x / q, 2) for x in b]
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--no-quix", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.events, args.pairs, not args.no_quix))))
