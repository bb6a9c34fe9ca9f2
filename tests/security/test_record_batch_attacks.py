"""A producer's record batches that the Kafka client may fail to parse, against a worker
on the real broker: every codec Kafka has. Before, a zstd, lz4 or snappy batch crashed
the worker (its decoders were not installed), again after every restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from agentstream.schemas import AgentMessage, Event, encode
from agentstream.streams.admin import ensure_topics
from agentstream.streams.settings import Settings
from tests.support import Worker, read_topic

pytestmark = pytest.mark.integration

CODECS = ("gzip", "snappy", "lz4", "zstd")


def _event(mid: str) -> Event[AgentMessage]:
    return Event.of(
        AgentMessage(message_id=mid, sender_id="planner-1", recipient_id="coder-2", content=mid),
        source="test",
    )


def _worker_env(settings_env: dict[str, str]) -> dict[str, str]:
    return {
        **settings_env,
        "AGENTSTREAM_AGENTS": "security",
        "AGENTSTREAM_SECURITY_ENABLED": "false",
    }


async def _accepted_ids(settings: Settings, expect: int) -> set[str]:
    accepted = await read_topic(
        settings.bootstrap, settings.topic("agent.messages.accepted"), expect=expect, timeout=60
    )
    return {str(ev.event_id) for _, ev in accepted if ev is not None}


async def test_inputs_in_every_codec_are_processed(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(settings_env)
    env = _worker_env(settings_env)
    await ensure_topics(settings)
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        sent: set[str] = set()
        for codec in CODECS:
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.bootstrap, acks="all", compression_type=codec
            )
            await producer.start()
            try:
                for i in range(25):
                    ev = _event(f"{codec}-{i}")
                    sent.add(str(ev.event_id))
                    await producer.send(settings.topic("agent.messages"), encode(ev), key=b"k")
                await producer.flush()
            finally:
                await producer.stop()
        assert await _accepted_ids(settings, len(sent)) == sent, worker.tail()
        assert worker.alive(), worker.tail()
    finally:
        worker.stop()
