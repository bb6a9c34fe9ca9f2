"""A worker fed valid events mixed with undecodable ones forwards every valid one,
dead-letters every bad one with its original bytes and coordinates, and keeps running;
its /metrics times every decision it made, and none of the dead letters."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from agentstream.schemas import AgentMessage, DeadLetter, Event, encode
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from tests.support import Worker, await_until, read_topic, web_client

pytestmark = pytest.mark.integration

BAD_VALUES = [
    b"not json at all",
    b'{"type": "agent.message"',  # truncated JSON
    b"[1, 2, 3]",  # JSON, not an object
    b'{"type": "no.such.event", "schema_version": 1, "source": "x", "payload": {}}',
    b'{"type": "agent.message", "schema_version": 2, "source": "x", "payload": {"sender_id": 5}}',
    b'{"type": "agent.message", "schema_version": 99, "source": "x", "payload": {}}',
    b'{"type": "agent.heartbeat", "schema_version": 1, "source": "x", '
    b'"payload": {"agent_id": "a", "sent_at": "2026-01-01T00:00:00Z"}}',  # wrong topic
    b"\xff\xfe\x00garbage",
    b"x" * 200_000,  # oversized: the worker runs with a 100 kB limit
    b"",
]


async def test_valid_forwarded_and_bad_dead_lettered(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(settings_env)
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "security,health",  # health serves /metrics
        "AGENTSTREAM_SECURITY_ENABLED": "false",
        "AGENTSTREAM_MAX_EVENT_BYTES": "100000",
    }
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        client = AsyncClient(settings)
        await client.start()
        sent_ids: set[str] = set()
        bad_sent: list[tuple[bytes, int, int]] = []
        try:
            for i in range(1000):
                ev = Event.of(
                    AgentMessage(
                        message_id=f"m{i}",
                        sender_id=f"agent-{i % 7}",
                        recipient_id="agent-x",
                        content=f"hello {i}",
                    ),
                    source="test",
                )
                sent_ids.add(str(ev.event_id))
                await client.publish("agent.messages", ev, wait=False)
                if i % 20 == 0:
                    bad = BAD_VALUES[(i // 20) % len(BAD_VALUES)]
                    md = await client.publish_raw("agent.messages", bad, key=b"k")
                    bad_sent.append((bad, md.partition, md.offset))
            await client._producer.flush()  # type: ignore[union-attr]
        finally:
            await client.stop()
        assert len(bad_sent) == 50

        accepted = await read_topic(
            settings.bootstrap, settings.topic("agent.messages.accepted"), expect=1000, timeout=60
        )
        assert worker.alive(), worker.tail()
        # a copy names the input it copies by its causation id (its own event id is
        # derived from the input's coordinates)
        got = {str(ev.causation_id) for _, ev in accepted if ev is not None}
        assert got == sent_ids
        # one observation per decided message: the 1000 valid ones, allowed (security is
        # off), none of the undecodable ones. Observed right after a batch is sent, so
        # possibly a moment after its records can be read.
        async with web_client(env) as http:

            async def timed() -> str:
                prom = (await http.get("/metrics")).text
                done = 'agentstream_security_decision_seconds_count{verdict="allow"} 1000.0'
                return prom if done in prom else ""

            prom = await await_until(timed, 10, 0.2, "1000 decisions timed on /metrics")
        assert 'agentstream_security_decision_seconds_count{verdict="deny"} 0.0' in prom

        letters = await read_topic(
            settings.bootstrap, settings.topic("pipeline.deadletter"), expect=50, timeout=30
        )
        dead = [ev.payload for _, ev in letters if ev is not None]
        assert all(isinstance(d, DeadLetter) for d in dead)
        assert len(dead) == 50
        # a dead letter is an event of the pipeline too: within its 100 kB, the 200 kB
        # original cut to fit (and flagged)
        assert all(len(rec.value) <= 100_000 for rec, _ in letters)
        by_coord = {(d.partition, d.offset): d for d in dead}
        for raw, partition, offset in bad_sent:
            d = by_coord[(partition, offset)]
            assert d.topic == settings.topic("agent.messages")
            assert d.consumer == "enforce_policy"
            assert d.original_size == len(raw)
            kept = base64.b64decode(d.original_b64)
            assert raw.startswith(kept) and d.original_truncated == (len(kept) < len(raw))
            assert d.original_truncated == (len(raw) == 200_000), len(raw)
            assert base64.b64decode(d.key_b64 or "") == b"k" and not d.key_truncated
            assert d.error_class and d.error_message
        assert worker.alive()
        assert encode  # codec used by the client
    finally:
        worker.stop()
