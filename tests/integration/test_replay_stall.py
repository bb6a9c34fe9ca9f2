"""A broker that goes away in the middle of a read of history: `replay` and `audit verify`
used to poll for ever, the auditor's command hanging without a word. They now give up
with a `BrokerError` naming the partitions, their positions and stop offsets once
nothing has moved for AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S.

The broker is one of this module's own, on free ports (the shared test broker serves
other tests meanwhile): stopped once the ranges are planned for `replay`, paused
(SIGSTOP: connected, answering nothing) for `audit verify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import agentstream.agents.audit.verify as verify_mod
import agentstream.streams.replay as replay_mod
from agentstream.agents.audit.verify import ChainTrust, verify
from agentstream.infra.kafka import launcher
from agentstream.infra.kafka.launcher import BrokerConfig
from agentstream.streams.errors import BrokerError
from agentstream.streams.replay import collect
from agentstream.streams.settings import Settings
from tests.integration.test_audit_verify import chain

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("own-kafka")]

#: the stall limit of these reads (AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S), seconds
LIMIT = 3.0
#: how long after the limit the error may come: a fetch wait (0.5 s), the grace of a hung
#: step (`streams.replay.STALL_GRACE_S`, 1 s), the consumer's stop, and room for a loaded
#: machine (measured: 0.3 s past the limit)
SLACK = 8.0


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((launcher.DEFAULT_HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerConfig]:
    root: Path = tmp_path_factory.mktemp("stall-kafka")
    port, controller_port = _free_ports(2)
    cfg = BrokerConfig(
        version=BrokerConfig.from_env().version,
        data_dir=root / "data",
        log_file=root / "broker.log",
        pid_file=root / "broker.pid",
        port=port,
        controller_port=controller_port,
        heap="-Xms128m -Xmx512m",
        start_timeout_s=120.0,
    )
    try:
        yield cfg
    finally:
        launcher.stop(cfg, use_external=False)


async def running(cfg: BrokerConfig, topic: str) -> Settings:
    """The broker started (again), `topic` created with two partitions, and settings
    whose reads give up after `LIMIT`."""
    bootstrap = await asyncio.to_thread(launcher.start, cfg, use_external=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    prefix = topic.split(".", 1)[0] + "."
    return Settings.from_env(
        {
            "AGENTSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "AGENTSTREAM_TOPIC_PREFIX": prefix,
            "AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S": str(LIMIT),
        }
    )


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(topic, value, partition=i % 2)
    finally:
        await producer.stop()


def after_planning(
    monkeypatch: pytest.MonkeyPatch, module: Any, fault: Any, marks: list[float]
) -> None:
    """Once `module` has planned its ranges, `fault()` (in a thread) takes the broker
    away; `marks` gets the time it was gone."""
    real = replay_mod.plan_ranges

    async def plan_then_fault(*a: Any, **kw: Any) -> Any:
        ranges = await real(*a, **kw)
        await asyncio.to_thread(fault)
        marks.append(asyncio.get_running_loop().time())
        return ranges

    monkeypatch.setattr(module, "plan_ranges", plan_then_fault)


async def test_replay_gives_up_when_the_broker_stops_mid_read(
    broker: BrokerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"s{uuid.uuid4().hex[:8]}.history"
    settings = await running(broker, topic)
    await produce(settings.bootstrap, topic, [b'{"n": %d}' % i for i in range(40)])
    marks: list[float] = []
    after_planning(
        monkeypatch, replay_mod, lambda: launcher.stop(broker, use_external=False), marks
    )

    with pytest.raises(BrokerError) as caught:
        async with asyncio.timeout(LIMIT + SLACK + 10):  # the old reader never returned
            await collect(settings, topic)
    took = asyncio.get_running_loop().time() - marks[0]
    print(f"\nreplay: BrokerError {took:.1f}s after the broker stopped (limit {LIMIT:g}s)")
    assert took < LIMIT + SLACK, f"the error came {took:.1f}s after the broker stopped"
    text = str(caught.value)
    assert text.startswith(f"replay made no progress for {LIMIT:g}s on ")
    assert f"{topic}:0 at offset 0 of stop 20, {topic}:1 at offset 0 of stop 20:" in text
    assert caught.value.retriable


async def test_verify_gives_up_when_the_broker_answers_nothing(
    broker: BrokerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"s{uuid.uuid4().hex[:8]}.security.decisions"
    settings = await running(broker, topic)
    await produce(settings.bootstrap, topic, chain(10, "d"))
    pid = launcher.status(broker, use_external=False)["pid"]
    assert isinstance(pid, int)
    marks: list[float] = []
    after_planning(monkeypatch, verify_mod, lambda: os.kill(pid, signal.SIGSTOP), marks)
    try:
        with pytest.raises(BrokerError) as caught:
            async with asyncio.timeout(LIMIT + SLACK + 10):
                await verify(
                    settings, ["security.decisions"], trust=ChainTrust(), require_signatures=False
                )
        took = asyncio.get_running_loop().time() - marks[0]
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"\naudit verify: BrokerError {took:.1f}s after the broker paused (limit {LIMIT:g}s)")
    assert took < LIMIT + SLACK, f"the error came {took:.1f}s after the broker paused"
    assert str(caught.value).startswith(
        f"audit verify made no progress for {LIMIT:g}s on {topic}:0 at offset 0 of stop 5:"
    )
