"""The enforce_policy stage: 20 policies of 10 patterns each, all fitting every message.

The policies are published to `security.policies` first, the run's messages pre-filled
into `agent.messages`, then a pipeline worker running only `agents.security` is started;
``policy_eps`` is accepted + rejected messages per second from the first output record to
the N-th (start-up excluded). Every message is evaluated against all 200 patterns (RE2,
one union scan per pattern list), its size and its roles, and leaves a hash-chained
decision on `security.decisions` besides the forwarded message.
"""

from __future__ import annotations

import asyncio
import time

from bench.context import BenchContext, BenchError, log
from schemas import Event, encode
from schemas.security import SecurityConfig, SecurityPolicy
from streams.topics import (
    AGENT_MESSAGES,
    AGENT_MESSAGES_ACCEPTED,
    AGENT_MESSAGES_REJECTED,
    SECURITY_POLICIES,
)

NAME = "policy"
POLICIES = 20
PATTERNS = 10
STAGE_TIMEOUT_S = 600.0


def bench_policies() -> list[SecurityPolicy]:
    """Realistic-looking patterns: credentials, keys, identifiers, with classes and
    repetitions (none matches the bench payload, so every list is scanned in full)."""
    out = []
    for i in range(POLICIES):
        blocked = [
            rf"(?i)password{i}\s*[:=]\s*\S+",
            rf"sk-{i}[A-Za-z0-9]{{20,}}",
            rf"AKIA{i}[0-9A-Z]{{16}}",
            rf"(?i)secret[_-]?key{i}",
            rf"\b\d{{3}}-\d{{2}}-{i:04d}\b",
            rf"(?i)bearer{i}\s+[a-z0-9._-]{{10,}}",
            rf"-----BEGIN {i} PRIVATE KEY-----",
            rf"(?i)(drop|truncate)\s+table{i}",
            rf"(a+)+b{i}$",
            rf"(?i)confidential-{i}-[a-f0-9]{{8}}",
        ][:PATTERNS]
        out.append(
            SecurityPolicy(
                policy_id=f"bench-{i:02d}",
                level="standard",
                blocked_patterns=blocked,
                max_message_size=64 * 1024,
                allowed_roles=[] if i % 2 else ["agent"],
            )
        )
    return out


async def run(ctx: BenchContext) -> dict[str, float]:
    env = ctx.new_env(AGENTSTREAM_AGENTS="agents.security")
    await ctx.ensure_topics(env)
    policies = bench_policies()
    events = [Event.of(p, source="bench") for p in policies]
    events.append(Event.of(SecurityConfig(enabled=True, default_action="deny"), source="bench"))
    await ctx.produce(
        ctx.topic(env, SECURITY_POLICIES),
        [encode(e) for e in events],
        [e.key.encode() for e in events],
    )
    values, keys = ctx.payloads()
    n = len(values)
    source = ctx.topic(env, AGENT_MESSAGES)
    log(f"policy: {POLICIES} policies x {PATTERNS} patterns; producing {n} events to {source}")
    await ctx.produce(source, values, keys)
    worker = ctx.start_worker(env)
    try:
        rate = await _watch_sum(
            ctx,
            [ctx.topic(env, AGENT_MESSAGES_ACCEPTED), ctx.topic(env, AGENT_MESSAGES_REJECTED)],
            n,
            worker,
        )
    finally:
        worker.stop()
    log(f"policy: {rate:,.0f} ev/s")
    return {"policy_eps": rate}


async def _watch_sum(ctx: BenchContext, topics: list[str], n: int, worker: object) -> float:
    """Rate of accepted + rejected from the first output record to the n-th."""
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    t_first: float | None = None
    count_first = 0
    while True:
        total = 0
        for topic in topics:
            total += await ctx.count(topic)
        now = time.monotonic()
        if total > 0 and t_first is None:
            t_first, count_first = now, total
        if total >= n:
            assert t_first is not None
            span, done = now - t_first, n - count_first
            if span <= 0 or done <= 0:
                raise BenchError("output grew too fast to time: raise --events")
            return done / span
        if now > deadline:
            raise BenchError(f"policy: {total} of {n} messages decided after {STAGE_TIMEOUT_S}s")
        check = getattr(worker, "check_alive", None)
        if check is not None:
            check()
        await asyncio.sleep(0.02)
