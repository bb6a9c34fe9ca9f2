"""A local 3-node KRaft cluster survives SIGKILL of a partition leader.

The infrastructure of the fault-injection suite (``infra.kafka.cluster``): the cluster
starts, replicates a topic 3 ways, elects a new leader when the old one is killed
with SIGKILL while an ``acks=all`` producer keeps going, and takes the killed node
back.  Runs on its own ports (a free block from 29300) in ``tmp_path``; never touches
the shared test broker.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agentstream.infra.kafka import cluster, launcher
from agentstream.infra.kafka.cluster import ClusterConfig

pytestmark = [
    pytest.mark.chaos_infra,
    pytest.mark.timeout(240),
    pytest.mark.xdist_group("own-kafka"),
]


@pytest.fixture
def cluster_cfg(tmp_path: Path) -> Iterator[ClusterConfig]:
    base = cluster.free_port_block(cluster.PORTS_PER_NODE * 3, start=29300)
    cfg = ClusterConfig(
        nodes=3,
        base_port=base,
        root=tmp_path / "cluster",
        version=launcher.BrokerConfig.from_env().version,
    )
    try:
        yield cfg
    finally:
        cluster.stop_cluster(cfg, timeout=20)


def test_cluster_config_layout(tmp_path: Path) -> None:
    cfg = ClusterConfig(nodes=3, base_port=29500, root=tmp_path)
    assert cfg.node_ids == (1, 2, 3)
    assert cfg.bootstrap == "127.0.0.1:29500,127.0.0.1:29504,127.0.0.1:29508"
    node2 = cfg.broker(2)
    props = launcher.server_properties(node2)
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == (
        "1@127.0.0.1:29501,2@127.0.0.1:29505,3@127.0.0.1:29509"
    )
    assert props["default.replication.factor"] == "3"
    assert props["min.insync.replicas"] == "2"
    assert props["offsets.topic.replication.factor"] == "3"
    assert props["transaction.state.log.replication.factor"] == "3"
    assert props["transaction.state.log.min.isr"] == "2"
    assert node2.data_dir == tmp_path / "node-2" / "data"
    assert node2.pid_file == tmp_path / "node-2" / "broker.pid"
    # Behind a proxy: clients are told the proxy port, brokers replicate directly.
    proxied = launcher.server_properties(
        ClusterConfig(nodes=3, base_port=29500, root=tmp_path, proxied=True).broker(2)
    )
    assert proxied["advertised.listeners"] == (
        "PLAINTEXT://127.0.0.1:29507,INTERNAL://127.0.0.1:29506"
    )
    assert proxied["inter.broker.listener.name"] == "INTERNAL"
    with pytest.raises(ValueError, match="not in this cluster"):
        cfg.broker(4)


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=3)])
    finally:
        await admin.close()


async def _consume_all(bootstrap: str, topic: str, expected: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while len(values) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            values.extend(r.value for records in batches.values() for r in records if r.value)
    finally:
        await consumer.stop()
    return values


async def _scenario(cfg: ClusterConfig, bootstrap: str) -> dict[str, float]:
    timings: dict[str, float] = {}
    topic = f"chaos-{uuid.uuid4().hex[:8]}"
    await _create_topic(bootstrap, topic)
    state = await cluster.wait_for_isr(bootstrap, topic, 0, size=3)
    assert sorted(state.replicas) == [1, 2, 3]

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, request_timeout_ms=15000
    )
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"before-{i}".encode())
        assert await _consume_all(bootstrap, topic, 10) == [
            f"before-{i}".encode() for i in range(10)
        ]

        leader = await cluster.partition_leader(bootstrap, topic, 0)
        pid = cluster.node_pid(cfg, leader)
        assert pid is not None
        began = time.monotonic()
        assert cluster.kill_node(cfg, leader, signal.SIGKILL) == pid
        assert cluster.node_pid(cfg, leader) is None

        # The same producer goes on: its next acks=all writes land on the new leader.
        for i in range(10):
            await producer.send_and_wait(topic, f"after-{i}".encode())
        timings["produce_after_kill_s"] = time.monotonic() - began
        new_leader = await cluster.wait_for_leader(bootstrap, topic, 0, not_in={leader})
        assert new_leader != leader
        timings["failover_s"] = time.monotonic() - began
        assert leader not in await cluster.live_brokers(bootstrap)

        began = time.monotonic()
        new_pid = await asyncio.to_thread(cluster.restart_node, cfg, leader)
        timings["restart_s"] = time.monotonic() - began
        assert new_pid != pid and cluster.node_pid(cfg, leader) == new_pid
        assert leader in await cluster.live_brokers(bootstrap)
        state = await cluster.wait_for_isr(bootstrap, topic, 0, size=3)
        assert leader in state.isr
        timings["rejoin_isr_s"] = time.monotonic() - began

        await producer.send_and_wait(topic, b"after-restart")
    finally:
        await producer.stop()

    expected = [
        *(f"before-{i}".encode() for i in range(10)),
        *(f"after-{i}".encode() for i in range(10)),
        b"after-restart",
    ]
    # Idempotent producer + acks=all + min ISR 2: nothing lost, nothing doubled.
    assert await _consume_all(bootstrap, topic, len(expected)) == expected

    # Coordinator lookups answer with live node ids.
    txn = await cluster.transaction_coordinator(bootstrap, f"txn-{topic}")
    group = await cluster.group_coordinator(bootstrap, f"group-{topic}")
    assert txn in cfg.node_ids and group in cfg.node_ids
    return timings


def test_three_nodes_survive_leader_sigkill(cluster_cfg: ClusterConfig) -> None:
    cfg = cluster_cfg
    began = time.monotonic()
    bootstrap = cluster.start_cluster(cfg)
    started = time.monotonic() - began
    assert bootstrap == cfg.bootstrap
    info = cluster.cluster_status(cfg)
    assert info["ready"], info
    assert len({node["pid"] for node in info["nodes"].values()}) == 3
    # Idempotent: a second start keeps the running nodes.
    assert cluster.start_cluster(cfg) == bootstrap
    assert cluster.cluster_status(cfg)["nodes"] == info["nodes"]

    timings = asyncio.run(_scenario(cfg, bootstrap))

    began = time.monotonic()
    assert cluster.stop_cluster(cfg) is True
    stopped = time.monotonic() - began
    assert all(cluster.node_pid(cfg, n) is None for n in cfg.node_ids)
    assert cluster.stop_cluster(cfg) is False
    print(
        f"\n3-node cluster: start {started:.1f}s, stop {stopped:.1f}s, "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    )
