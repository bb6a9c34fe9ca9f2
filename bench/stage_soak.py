"""The soak stage: does a pipeline worker's memory stay flat over a long run?

The core stage's pipeline (``bench.passthrough`` run by ``agentstream worker``: decode,
validate, dead-letter path, `emit`) over ``--events`` inputs — meant for millions
(``python -m bench --stages soak --events 10000000``). The harness produces the input in
chunks while the worker consumes it, so neither holds the whole run in memory, and
samples the worker's resident set size (psutil) as it goes:

``rss_start_mb``: once the worker has forwarded 5 % of the events (warm: imports, the
first fetches and batches, the producer's buffers and the allocator's arenas are all in
use); ``rss_end_mb``: when the last output arrived; ``rss_max_mb`` over the run;
``rss_growth`` = end / start (computed with the ratios; goal: within ±10 %); ``soak_eps``
the forwarding rate between the two samples.
"""

from __future__ import annotations

import asyncio
import time

import psutil

from agentstream.streams.topics import AGENT_MESSAGES, AGENT_MESSAGES_ACCEPTED
from bench.context import SENDERS, BenchContext, BenchError, Worker, log

NAME = "soak"

#: events produced per chunk: bounded harness memory (~300 B each, plus Python objects)
CHUNK = 100_000
#: a stalled worker must not hang the run: no new output for this long ends it
STALL_TIMEOUT_S = 120.0
#: how often RSS and the output count are read
SAMPLE_S = 2.0
WARM_FRACTION = 0.05


async def run(ctx: BenchContext) -> dict[str, float]:
    env = ctx.new_env(AGENTSTREAM_AGENTS="bench.passthrough")
    await ctx.ensure_topics(env)
    source = ctx.topic(env, AGENT_MESSAGES)
    output = ctx.topic(env, AGENT_MESSAGES_ACCEPTED)
    n = ctx.events
    worker = ctx.start_worker(env)
    producing = asyncio.create_task(_produce(ctx, source, n))
    try:
        out = await _sample(ctx, worker, output, n)
        await producing
    finally:
        if not producing.done():
            producing.cancel()
    log(
        f"soak: {n:,} events at {out['soak_eps']:,.0f} ev/s, worker RSS "
        f"{out['rss_start_mb']:.1f} MB (after {WARM_FRACTION:.0%}) -> "
        f"{out['rss_end_mb']:.1f} MB at the end (max {out['rss_max_mb']:.1f} MB, "
        f"x{out['rss_end_mb'] / out['rss_start_mb']:.3f})"
    )
    return out


async def _produce(ctx: BenchContext, source: str, n: int) -> None:
    sent = 0
    while sent < n:
        size = min(CHUNK, n - sent)
        values = ctx.make_payloads(size)
        keys = [f"agent-{(sent + i) % SENDERS}".encode() for i in range(size)]
        await ctx.produce(source, values, keys)
        sent += size


async def _sample(ctx: BenchContext, worker: Worker, output: str, n: int) -> dict[str, float]:
    assert worker.proc is not None
    proc = psutil.Process(worker.proc.pid)
    warm_at = max(1, int(n * WARM_FRACTION))
    start: tuple[float, int, float] | None = None  # (time, outputs, rss MB)
    rss_max = 0.0
    last_count, last_change = -1, time.monotonic()
    while True:
        worker.check_alive()
        count = await ctx.count(output)
        now = time.monotonic()
        rss = proc.memory_info().rss / 2**20
        rss_max = max(rss_max, rss)
        if count != last_count:
            last_count, last_change = count, now
        elif now - last_change > STALL_TIMEOUT_S:
            raise BenchError(f"soak: {count:,} of {n:,} outputs, none for {STALL_TIMEOUT_S:.0f}s")
        if start is None and count >= warm_at:
            start = (now, count, rss)
            log(f"soak: warm at {count:,} outputs, worker RSS {rss:.1f} MB")
        if count >= n:
            assert start is not None
            elapsed = max(now - start[0], 1e-3)
            return {
                "soak_eps": (count - start[1]) / elapsed,
                "rss_start_mb": start[2],
                "rss_end_mb": rss,
                "rss_max_mb": rss_max,
            }
        await asyncio.sleep(SAMPLE_S)
