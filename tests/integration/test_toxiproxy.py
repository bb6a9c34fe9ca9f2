"""Kafka behind Toxiproxy: every client connection crosses the proxy, so toxics bite.

Builds Toxiproxy once (cached; needs Go), runs it on a free API port from 28474 and a
single broker on a free block from 29400: broker on P, proxy on P+3, broker advertises
P+3.  Timing assertions are lower bounds only.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from agentstream.infra.kafka import launcher
from agentstream.infra.kafka.cluster import PORTS_PER_NODE, free_port_block
from agentstream.infra.toxiproxy.client import Toxiproxy
from agentstream.infra.toxiproxy.kafka import ProxiedKafka, broker_behind_proxy, stop_behind_proxy
from agentstream.infra.toxiproxy.server import (
    TOXIPROXY_VERSION,
    ServerConfig,
    start_server,
    stop_server,
)

pytestmark = [
    pytest.mark.chaos_infra,
    pytest.mark.timeout(180),
    pytest.mark.xdist_group("own-kafka"),
]


@pytest.fixture(scope="module")
def toxiproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Toxiproxy]:
    port = free_port_block(1, start=28474)
    cfg = ServerConfig(port=port, state_dir=tmp_path_factory.mktemp("toxiproxy"))
    try:
        client = Toxiproxy(start_server(cfg))
        try:
            yield client
        finally:
            client.close()
    finally:
        stop_server(cfg)


@pytest.fixture(scope="module")
def kafka(toxiproxy: Toxiproxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedKafka]:
    base = free_port_block(PORTS_PER_NODE, start=29400)
    proxied = broker_behind_proxy(
        toxiproxy,
        base,
        tmp_path_factory.mktemp("kafka-behind-proxy"),
        version=launcher.BrokerConfig.from_env().version,
    )
    try:
        yield proxied
    finally:
        stop_behind_proxy(proxied)


@pytest.fixture(autouse=True)
def healed(kafka: ProxiedKafka) -> Iterator[None]:
    """Every test starts and ends with the proxy enabled and free of toxics."""
    kafka.heal()
    yield
    kafka.heal()


def _producer(bootstrap: str, **options: object) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **options)  # type: ignore[arg-type]


async def _topic(bootstrap: str) -> str:
    topic = f"toxic-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    return topic


def test_server_api_basics(toxiproxy: Toxiproxy) -> None:
    assert toxiproxy.version().lstrip("v") == TOXIPROXY_VERSION.lstrip("v")
    proxy = toxiproxy.create_proxy(
        "scratch", listen="127.0.0.1:0", upstream="127.0.0.1:9", enabled=False
    )
    try:
        assert not proxy.enabled
        slow = proxy.latency(100, jitter_ms=10)
        proxy.bandwidth(64, stream="upstream")
        proxy.reset_peer(50)
        proxy.timeout(0)
        proxy.slow_close(10)
        types = sorted(t.type for t in proxy.toxics())
        assert types == ["bandwidth", "latency", "reset_peer", "slow_close", "timeout"]
        proxy.remove_toxic(slow)
        assert "latency" not in {t.type for t in proxy.toxics()}
        proxy.clear_toxics()
        assert proxy.toxics() == []
    finally:
        proxy.delete()
    assert "scratch" not in toxiproxy.proxies()


def test_clients_only_ever_see_the_proxy(kafka: ProxiedKafka) -> None:
    async def scenario() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
        await admin.start()
        try:
            brokers = (await admin.describe_cluster())["brokers"]
        finally:
            await admin.close()
        # The broker advertises the proxy's port, not its own.
        assert [(b["host"], b["port"]) for b in brokers] == [
            ("127.0.0.1", kafka.proxy().listen_port)
        ]

        topic = await _topic(kafka.bootstrap)
        producer = _producer(kafka.bootstrap)
        await producer.start()
        try:
            for i in range(5):
                await producer.send_and_wait(topic, f"v{i}".encode())
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest", group_id=None
        )
        await consumer.start()
        values: list[bytes] = []
        try:
            deadline = time.monotonic() + 20
            while len(values) < 5 and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=1000)
                values.extend(r.value for rs in batches.values() for r in rs if r.value)
        finally:
            await consumer.stop()
        assert values == [f"v{i}".encode() for i in range(5)]

    asyncio.run(scenario())


def test_latency_toxic_delays_round_trips(kafka: ProxiedKafka) -> None:
    latency_ms = 400

    async def round_trips(producer: AIOKafkaProducer, topic: str, n: int) -> list[float]:
        times = []
        for i in range(n):
            began = time.monotonic()
            await producer.send_and_wait(topic, f"rt{i}".encode())
            times.append(time.monotonic() - began)
        return times

    async def scenario() -> tuple[float, float]:
        topic = await _topic(kafka.bootstrap)
        producer = _producer(kafka.bootstrap)
        await producer.start()
        try:
            base = statistics.median(await round_trips(producer, topic, 5))
            with kafka.proxy().toxic("latency", {"latency": latency_ms}):
                slow = await round_trips(producer, topic, 3)
        finally:
            await producer.stop()
        return base, min(slow)

    base, slowest_fast = asyncio.run(scenario())
    print(
        f"\nproduce round trip: {base * 1000:.0f} ms plain, >= {slowest_fast * 1000:.0f} ms toxic"
    )
    # Each produce round trip crosses the downstream latency at least once.
    assert slowest_fast >= latency_ms / 1000


def test_disabled_proxy_times_out_then_recovers(kafka: ProxiedKafka) -> None:
    async def scenario() -> float:
        topic = await _topic(kafka.bootstrap)
        producer = _producer(kafka.bootstrap, request_timeout_ms=3000, retry_backoff_ms=200)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"before")
            proxy = kafka.proxy()
            proxy.disable()
            began = time.monotonic()
            with pytest.raises((KafkaError, asyncio.TimeoutError)):
                await asyncio.wait_for(producer.send_and_wait(topic, b"lost"), timeout=30)
            failed_after = time.monotonic() - began
            proxy.enable()
            deadline = time.monotonic() + 30
            while True:  # the producer reconnects by itself; a retry may be needed
                try:
                    await asyncio.wait_for(producer.send_and_wait(topic, b"after"), timeout=10)
                    break
                except (TimeoutError, KafkaError):
                    if time.monotonic() > deadline:
                        raise
        finally:
            await producer.stop()
        return failed_after

    failed_after = asyncio.run(scenario())
    print(f"\nproduce through a disabled proxy failed after {failed_after:.1f}s")
