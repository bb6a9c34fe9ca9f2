"""An output the broker refuses must not be lost: the worker commits no further offset and
crashes, and after a restart the input is processed again and its output delivered."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas import AgentMessage, Event
from streams.admin import ensure_topics
from streams.client import Client
from streams.settings import Settings
from tests.support import Worker, read_topic, wait_until

pytestmark = pytest.mark.integration


async def _set_max_message_bytes(settings: Settings, topic: str, value: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC,
                    settings.topic(topic),
                    {"max.message.bytes": str(value)},
                )
            ]
        )
    finally:
        await admin.close()


async def test_refused_output_is_redelivered_after_restart(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(settings_env)
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "agents.security",
        "AGENTSTREAM_SECURITY_ENABLED": "false",
    }
    await ensure_topics(settings)
    # the broker will refuse the forwarded message as too large for its output topic
    await _set_max_message_bytes(settings, "agent.messages.accepted", 1024)
    event = Event.of(
        AgentMessage(message_id="big", sender_id="a1", recipient_id="a2", content="x" * 4000),
        source="test",
    )
    async with Client(settings) as client:
        await client.publish("agent.messages", event)

    worker = Worker(env, tmp_path / "w1.log").start()
    try:
        wait_until(lambda: not worker.alive(), 60, what="worker to crash on the refused output")
        assert "refusing to commit" in worker.tail(400) or "MessageSizeTooLarge" in worker.tail(400)
    finally:
        worker.stop()
    assert (
        await read_topic(
            settings.bootstrap, settings.topic("agent.messages.accepted"), idle=1.0, timeout=5
        )
        == []
    )

    await _set_max_message_bytes(settings, "agent.messages.accepted", 1_000_000)
    worker2 = Worker(env, tmp_path / "w2.log").start()
    try:
        out = await read_topic(
            settings.bootstrap, settings.topic("agent.messages.accepted"), expect=1, timeout=60
        )
        assert [ev.payload.message_id for _, ev in out if ev is not None] == ["big"]
    finally:
        worker2.stop()
