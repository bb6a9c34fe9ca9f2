"""An output the broker refuses must not be lost: the worker commits no further offset and
crashes, and after a restart the input is processed again and its output delivered."""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from agentstream.schemas import AgentMessage, DeadLetter, Event, registry
from agentstream.streams.admin import ensure_topics
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from tests.support import Worker, await_until, read_topic, wait_until

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
        "AGENTSTREAM_AGENTS": "security",
        "AGENTSTREAM_SECURITY_ENABLED": "false",
    }
    await ensure_topics(settings)
    # the broker will refuse the forwarded message as too large for its output topic
    await _set_max_message_bytes(settings, "agent.messages.accepted", 1024)
    event = Event.of(
        AgentMessage(message_id="big", sender_id="a1", recipient_id="a2", content="x" * 4000),
        source="test",
    )
    async with AsyncClient(settings) as client:
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


def _ids(records: list[tuple[Any, Event[Any] | None]]) -> list[str]:
    """The input id of every output: forwarded messages keep the input's event id (and
    carry it as causation_id); a dead letter names it in its original bytes."""
    out = []
    for _, ev in records:
        if ev is None:
            continue
        if isinstance(ev.payload, DeadLetter):
            original = registry.decode(base64.b64decode(ev.payload.original_b64))
            out.append(str(original.event_id))
        else:
            out.append(ev.causation_id or str(ev.event_id))
    return out


async def _outputs(settings: Settings) -> list[str]:
    ids: list[str] = []
    for topic in ("agent.messages.accepted", "agent.messages.rejected", "pipeline.deadletter"):
        ids += _ids(await read_topic(settings.bootstrap, settings.topic(topic), timeout=10, idle=1))
    return ids


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_a_batch_whose_processing_raised_is_not_lost(
    settings_env: dict[str, str], tmp_path: Path, guarantee: str
) -> None:
    """An exception that escapes `enforce_policy` outside `guarded` (here `_publish`,
    through the test hook AGENTSTREAM_TEST_FAULTS; in production e.g. the chain-head
    lookup's BrokerError) used to ack the batch in `event_batches`' `finally`: its
    inputs were committed without outputs, under both guarantees. Now the batch is not
    acked, the worker commits nothing more and crashes, and after the restart every
    input ends accepted, rejected or dead-lettered (read_committed) — exactly once under
    exactly_once."""
    n = 1000
    base = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "security",
        "AGENTSTREAM_SECURITY_ENABLED": "false",
        "AGENTSTREAM_PROCESSING_GUARANTEE": guarantee,
        "AGENTSTREAM_BATCH_MAX": "50",
        "AGENTSTREAM_BROKER_SESSION_TIMEOUT_S": "10",
    }
    settings = Settings.from_env(base)
    await ensure_topics(settings)
    inputs = [
        Event.of(
            AgentMessage(
                message_id=f"m{i}", sender_id=f"a{i % 5}", recipient_id="b", content=f"{i}"
            ),
            source="test",
        )
        for i in range(n)
    ]
    async with AsyncClient(settings) as client:
        await client.publish_many("agent.messages", inputs)
    want = {str(e.event_id) for e in inputs}

    faulty = Worker(
        {**base, "AGENTSTREAM_TEST_FAULTS": "enforce_policy.publish@3"}, tmp_path / "w1.log"
    )
    faulty.start()
    try:
        # the fixed worker crashes on the fault; the old one went on without the batch
        try:
            await await_until(lambda: not faulty.alive(), 45, what="a crash on the fault")
            crashed = True
        except AssertionError:
            crashed = False
    finally:
        log = faulty.tail(400)
        faulty.stop()
    assert "injected fault at enforce_policy.publish" in log, log
    restarted = Worker(base, tmp_path / "w2.log").start()
    try:
        got: list[str] = []

        async def complete() -> bool:
            got[:] = await _outputs(settings)
            return set(got) >= want

        with contextlib.suppress(AssertionError):  # what is missing is reported below
            await await_until(complete, 90, interval=1, what="every input accounted for")
    finally:
        restarted.stop()
    missing = want - set(got)
    assert not missing, (
        f"{len(missing)} of {n} inputs neither accepted, rejected nor dead-lettered "
        f"(worker crashed on the fault: {crashed}):\n{log[-3000:]}"
    )
    if guarantee == "exactly_once":
        assert len(got) == len(want), (
            f"{len(got) - len(want)} duplicate output(s) under exactly_once"
        )
