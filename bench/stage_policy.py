"""The enforce_policy stage: 20 policies of 10 patterns each, all fitting every message.

The policies and the config are published admin-signed to `security.policies`, and every
sender gets an admin-signed identity on `security.identities` (role ``agent``, its own
signing key in an encrypted-file keychain); the run's messages, each HMAC-signed by its
sender with an issue time, are pre-filled into `agent.messages`, then a pipeline worker
running only `agents.security` is started. ``policy_eps`` is accepted + rejected messages
per second from the first output record to the N-th (start-up excluded). So every message
goes through what a production deployment pays for: signature verification against the
sender's identity, roles from the identity, the replay window and the replay table (one
changelog write per message), normalisation of every scanned field, all 200 patterns, its
size and its roles; every 10th carries a blocked credential and is rejected with its
reasons (masked). Each leaves a hash-chained, batch-signed decision on
`security.decisions` besides the forwarded message. The stage fails if the rejected count
is not exactly N/10, or if any message was decided unverified.

``policy_worst_case_us`` is the slowest scan of one evaluation — the union of these
policies' blocked patterns — over content of their `max_message_size`, on the generated
worst-case inputs of `agents.security.patterns.worst_case_scan` (what `policy apply`
measures per policy against its budget).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson

from agentstream.agents.security.crypto import new_key, sign_message
from agentstream.schemas import AgentMessage, Event, encode, registry, utc_now
from agentstream.schemas.security import AgentIdentity, SecurityConfig, SecurityPolicy
from agentstream.streams import signing
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.settings import Settings
from agentstream.streams.topics import (
    AGENT_MESSAGES,
    AGENT_MESSAGES_ACCEPTED,
    AGENT_MESSAGES_REJECTED,
    SECURITY_DECISIONS,
    SECURITY_IDENTITIES,
    SECURITY_POLICIES,
)
from bench.context import (
    SENDERS,
    BenchContext,
    BenchError,
    Throughput,
    Worker,
    cpu_keys,
    cpu_text,
    log,
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


def signed(payload: Any, admin: Any) -> Event[Any]:
    """An event of `payload` signed with the admin key (what `policy apply` publishes)."""
    body = signing.sign_change(payload.TYPE, payload.model_dump(mode="json"), admin, "bench")
    return Event.of(type(payload).model_validate(body), source="bench")


async def run(ctx: BenchContext) -> dict[str, float]:
    admin = signing.new_private_key()
    keyring = ctx.work_dir / f"policy-keyring-{ctx.run_id}.json"
    env = ctx.new_env(
        AGENTSTREAM_AGENTS="security",
        AGENTSTREAM_SECURITY_ADMIN_KEYS=f"bench={signing.public_b64(admin)}",
        AGENTSTREAM_KEYRING_BACKEND="encrypted-file",
        AGENTSTREAM_KEYRING_FILE=str(keyring),
        AGENTSTREAM_KEYRING_PASSWORD=uuid.uuid4().hex,
    )
    await ctx.ensure_topics(env)
    policies = bench_policies()
    # a window the stage cannot outrun: messages are signed before the worker starts
    config = SecurityConfig(enabled=True, default_action="deny", replay_window_s=3600)
    events = [signed(p, admin) for p in [*policies, config]]
    await ctx.produce(
        ctx.topic(env, SECURITY_POLICIES),
        [encode(e) for e in events],
        [e.key.encode() for e in events],
    )
    sender_keys = {f"agent-{i}": new_key() for i in range(SENDERS)}
    provider = KeychainCredentialsProvider(Settings.from_env(env))
    for agent_id, key in sender_keys.items():
        await provider.set_signing_key(agent_id, key)
    grants = [signed(AgentIdentity(agent_id=a, roles=["agent"]), admin) for a in sender_keys]
    await ctx.produce(
        ctx.topic(env, SECURITY_IDENTITIES),
        [encode(e) for e in grants],
        [e.key.encode() for e in grants],
    )
    shared, keys = ctx.payloads()
    values = sign_all(with_denied(shared), sender_keys)
    n = len(values)
    source = ctx.topic(env, AGENT_MESSAGES)
    log(f"policy: {POLICIES} policies x {PATTERNS} patterns; producing {n} events to {source}")
    await ctx.produce(source, values, keys)
    accepted = ctx.topic(env, AGENT_MESSAGES_ACCEPTED)
    rejected_topic = ctx.topic(env, AGENT_MESSAGES_REJECTED)
    worker = ctx.start_worker(env)
    try:
        measured = await _watch_sum(ctx, [accepted, rejected_topic], n, worker)
        if ctx.guarantee == "exactly_once":
            # the end offsets `_watch_sum` read include transaction markers: let the
            # last transactions commit before the worker stops
            await _await_committed(ctx, [accepted, rejected_topic], n, worker)
    finally:
        worker.stop()
    if ctx.guarantee == "exactly_once":
        rejected = await ctx.count_committed(rejected_topic)
    else:
        rejected = await ctx.count(rejected_topic)
    expected = sum(1 for i in range(n) if i % DENY_EVERY == 0)
    if rejected != expected:
        raise BenchError(f"policy: {rejected} rejected, expected {expected}")
    await _check_verified(ctx, ctx.topic(env, SECURITY_DECISIONS))
    log(f"policy: {measured.eps:,.0f} ev/s ({rejected} of {n} rejected){cpu_text(measured)}")
    worst = worst_case_us(policies)
    log(f"policy: worst-case scan at max_message_size {worst:,.0f} us")
    return {
        "policy_eps": measured.eps,
        **cpu_keys("policy", measured),
        "policy_worst_case_us": worst,
    }


def worst_case_us(policies: list[SecurityPolicy]) -> float:
    """The slowest scan of one evaluation over content of the policies' max size: the
    union of every fitting policy's blocked patterns (what a message that violates
    nothing is cleared with), on the generated worst-case inputs."""
    from agentstream.agents.security.patterns import worst_case_scan

    patterns = [x for p in policies for x in p.blocked_patterns]
    size = max(p.max_message_size for p in policies)
    return worst_case_scan(patterns, size, budget_s=10.0).us


def sign_all(values: list[bytes], keys: dict[str, bytes]) -> list[bytes]:
    """Each message signed by its sender (HMAC over the canonical bytes, issue time now),
    as a producer holding its signing key would publish it."""
    now = utc_now()
    out = []
    for value in values:
        data = orjson.loads(value)
        message = AgentMessage.model_validate(data["payload"])
        proof = sign_message(message, keys[message.sender_id], issued_at=now).auth
        assert proof is not None
        data["payload"]["auth"] = proof.model_dump(mode="json", exclude_defaults=True)
        out.append(orjson.dumps(data))
    return out


async def _check_verified(ctx: BenchContext, topic: str, sample: int = 2000) -> None:
    """The first decisions of each partition say their sender was verified: the stage
    measured the signed path, not the anonymous one."""
    from aiokafka import TopicPartition

    from agentstream.streams.client import group_less_consumer

    consumer = group_less_consumer(ctx.settings, "bench-verified", auto_offset_reset="earliest")
    await consumer.start()
    unverified = seen = 0
    try:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        for tp in tps:
            got = 0
            while got < sample:
                batch = await consumer.getmany(tp, timeout_ms=2000, max_records=500)
                records = batch.get(tp, [])
                if not records:
                    break
                for rec in records:
                    got += 1
                    if not getattr(registry.decode(rec.value).payload, "verified", False):
                        unverified += 1
            seen += got
    finally:
        await consumer.stop()
    if unverified or not seen:
        raise BenchError(f"policy: {unverified} of {seen} sampled decisions were unverified")


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


async def _await_committed(ctx: BenchContext, topics: list[str], n: int, worker: object) -> None:
    """Exactly-once: wait until a read_committed reader gets all n decisions' outputs
    (a transaction commits within a commit interval; two minutes is far beyond it)."""
    timeout = 120.0
    deadline = time.monotonic() + timeout
    while True:
        total = 0
        for topic in topics:
            total += await ctx.count_committed(topic)
        if total >= n:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"policy: {total} of {n} decisions committed after {timeout:.0f}s")
        check = getattr(worker, "check_alive", None)
        if check is not None:
            check()
        await asyncio.sleep(0.5)


async def _watch_sum(ctx: BenchContext, topics: list[str], n: int, worker: Worker) -> Throughput:
    """How accepted + rejected grew from the first output record to the n-th."""
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    t_first: float | None = None
    count_first = 0
    cpu_first: float | None = None
    while True:
        total = 0
        for topic in topics:
            total += await ctx.count(topic)
        now = time.monotonic()
        if total > 0 and t_first is None:
            t_first, count_first, cpu_first = now, total, worker.cpu_s()
        if total >= n:
            assert t_first is not None
            return Throughput(n, t_first, count_first, now, cpu_first, worker.cpu_s())
        if now > deadline:
            raise BenchError(f"policy: {total} of {n} messages decided after {STAGE_TIMEOUT_S}s")
        worker.check_alive()
        await asyncio.sleep(0.02)
