"""The LLM stage's load generator: a closed loop that keeps N calls in flight."""

from __future__ import annotations

import asyncio
import time

from bench.stage_llm import closed_loop, pct


async def test_closed_loop_keeps_n_in_flight_and_counts_only_after_warmup() -> None:
    in_flight = 0
    peak = 0
    starts: list[float] = []

    async def call() -> float:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        starts.append(time.monotonic())
        await asyncio.sleep(0.05)
        in_flight -= 1
        return 0.05

    t0 = time.monotonic()
    latencies, rate = await closed_loop(call, 10, stagger_s=0.05, warmup_s=0.2, window_s=0.5)
    assert peak == 10  # never more than N at once, and N reached
    counted = [s for s in starts if 0.2 <= s - t0 < 0.7]
    # every call started in the window is counted, none from the warm-up (this test's
    # clock starts a hair before closed_loop's: a call right at a boundary may differ)
    assert abs(len(latencies) - len(counted)) <= 10
    assert 0 < len(latencies) < len(starts)
    # ten clients, 50 ms calls: ~200 calls/s; a loaded machine only makes it slower
    assert 40 < rate <= 210
    # staggered: the first calls do not all start at the same instant
    assert starts[9] - starts[0] >= 0.03


def test_pct_picks_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert pct(values, 0.5) == 51.0
    assert pct(values, 0.99) == 99.0
    assert pct([3.0], 0.99) == 3.0
