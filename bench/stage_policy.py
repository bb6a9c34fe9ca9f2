"""The enforce_policy stage: 20 policies of 10 patterns each, all fitting every message.

The policies are published to `security.policies` first, the run's messages pre-filled
into `agent.messages`, then a pipeline worker running only `agents.security` is started;
``policy_eps`` is accepted + rejected messages per second from the first output record to
the N-th (start-up excluded). Every message is evaluated against all 200 patterns, its
size and its roles; every 10th carries a blocked credential and is rejected with its
reasons. Each leaves a hash-chained decision on `security.decisions` besides the
forwarded message. The stage fails if the rejected count is not exactly N/10.
"""

from __future__ import annotations

import asyncio
import time

import orjson

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
#: every 10th message is denied (blocked pattern of policy bench-00)
DENY_EVERY = 10


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
    shared, keys = ctx.payloads()
    values = with_denied(shared)
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
    rejected = await ctx.count(ctx.topic(env, AGENT_MESSAGES_REJECTED))
    expected = sum(1 for i in range(n) if i % DENY_EVERY == 0)
    if rejected != expected:
        raise BenchError(f"policy: {rejected} rejected, expected {expected}")
    log(f"policy: {rate:,.0f} ev/s ({rejected} of {n} rejected)")
    return {"policy_eps": rate}


def with_denied(values: list[bytes]) -> list[bytes]:
    """The run's messages, every DENY_EVERY-th carrying a credential a policy blocks, so
    the full evaluation (all reasons) and the rejected path are part of the measurement."""
    out = list(values)
    for i in range(0, len(out), DENY_EVERY):
        data = orjson.loads(out[i])
        payload = data["payload"]
        payload["content"] = "password0: hunter2 " + payload.get("content", "")[19:]
        out[i] = orjson.dumps(data)
    return out


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
