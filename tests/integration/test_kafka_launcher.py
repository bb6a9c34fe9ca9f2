"""The local broker launcher starts a real Kafka that keeps its data across restarts.

Every broker here runs in a temporary folder on free ports, so these tests never touch
a developer's broker in ``var/kafka``.  A broker that cannot start is a failure, not a
skip: the rest of the integration suite depends on this launcher.

The first tests need no JVM; the ones marked ``integration`` start brokers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agentstream.infra.kafka import launcher
from agentstream.infra.kafka.launcher import BrokerConfig, BrokerStartError


def _free_ports(count: int) -> list[int]:
    """Distinct ports the OS reports free right now (held open until all are picked)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((launcher.DEFAULT_HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _config(
    root: Path, *, heap: str = "-Xms128m -Xmx512m", start_timeout_s: float = 90.0
) -> BrokerConfig:
    port, controller_port = _free_ports(2)
    return BrokerConfig(
        # AGENTSTREAM_KAFKA_VERSION=4.4.0 runs the same tests against Kafka 4.
        version=BrokerConfig.from_env().version,
        data_dir=root / "data",
        log_file=root / "broker.log",
        pid_file=root / "broker.pid",
        port=port,
        controller_port=controller_port,
        heap=heap,
        start_timeout_s=start_timeout_s,
    )


@pytest.fixture(autouse=True)
def no_external(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the launcher's own broker, whatever the shell says."""
    monkeypatch.delenv(launcher.ENV_BOOTSTRAP, raising=False)


@pytest.fixture
def broker_cfg(tmp_path: Path, no_external: None) -> Iterator[BrokerConfig]:
    cfg = _config(tmp_path)
    try:
        yield cfg
    finally:
        launcher.stop(cfg)


# ------------------------------------------------------------------ no JVM needed


def test_cluster_id_is_22_char_base64url() -> None:
    ids = {launcher.new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    for cluster_id in ids:
        assert len(cluster_id) == 22
        # the storage tool would parse a leading "-" as an option (1 in 64 draws)
        assert not cluster_id.startswith("-")
        assert set(cluster_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


def test_config_from_env_overrides_and_defaults(tmp_path: Path) -> None:
    default = BrokerConfig.from_env({})
    assert default.version == launcher.DEFAULT_KAFKA_VERSION
    assert (default.port, default.controller_port) == (19092, 19093)
    assert default.data_dir == launcher.DEFAULT_STATE_DIR / "data"
    assert default.pid_file == launcher.DEFAULT_STATE_DIR / "broker.pid"

    cfg = BrokerConfig.from_env(
        {
            launcher.ENV_VERSION: "4.4.0",
            launcher.ENV_DATA_DIR: str(tmp_path / "d" / "data"),
            launcher.ENV_PORT: "29092",
            launcher.ENV_CONTROLLER_PORT: "29093",
            launcher.ENV_HEAP: "-Xmx2g",
        }
    )
    assert cfg.version == "4.4.0" and cfg.major_version == 4
    assert cfg.bootstrap == "127.0.0.1:29092"
    assert cfg.log_file == tmp_path / "d" / "broker.log"
    assert cfg.pid_file == tmp_path / "d" / "broker.pid"
    assert cfg.server_properties_file == tmp_path / "d" / "server.properties"
    assert cfg.heap == "-Xmx2g"
    with pytest.raises(ValueError, match=launcher.ENV_PORT):
        BrokerConfig.from_env({launcher.ENV_PORT: "kafka"})


def test_external_bootstrap_short_circuits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(launcher.ENV_BOOTSTRAP, "broker.example:9092")
    assert launcher.external_bootstrap() == "broker.example:9092"
    # Nothing is fetched or started, and the config is not even looked at.
    assert launcher.start(BrokerConfig(pid_file=Path("/nonexistent/x.pid"))) == (
        "broker.example:9092"
    )
    assert launcher.stop() is False
    monkeypatch.setenv(launcher.ENV_BOOTSTRAP, "  ")
    assert launcher.external_bootstrap() is None


def test_server_properties_for_kraft_single_node(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    text = launcher.write_server_properties(cfg).read_text(encoding="utf-8")
    props = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == f"1@127.0.0.1:{cfg.controller_port}"
    assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{cfg.port}"
    assert props["log.dirs"] == str(cfg.data_dir)
    assert props["auto.create.topics.enable"] == "false"
    tuned = launcher.server_properties(
        dataclasses.replace(cfg, extra_settings={"num.partitions": "3", "log.cleaner.enable": "x"})
    )
    assert tuned["num.partitions"] == "3" and tuned["log.cleaner.enable"] == "x"


def test_wait_ready_gives_up_on_a_closed_port() -> None:
    # Bound but not listening: connections are refused, and no other process can take
    # the port while the probe runs (a merely "free" port could be grabbed meanwhile).
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1]
        began = time.monotonic()
        assert launcher.wait_ready(f"127.0.0.1:{port}", timeout=0.5) is False
        assert time.monotonic() - began < 5
    assert launcher.status(BrokerConfig(pid_file=Path("/nonexistent/x.pid")))["running"] is False


# ---------------------------------------------------------------- real brokers


async def _create_and_produce(bootstrap: str, topic: str, value: bytes) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, value, key=b"k")
        assert meta.offset == 0
    finally:
        await producer.stop()


async def _topics_and_records(bootstrap: str, topic: str) -> tuple[set[str], list[bytes]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = set(await admin.list_topics())
    finally:
        await admin.close()
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
        while not values and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            values.extend(record.value for records in batches.values() for record in records)
    finally:
        await consumer.stop()
    return topics, values


@pytest.mark.integration
@pytest.mark.xdist_group("own-kafka")
def test_start_produce_restart_keeps_data(broker_cfg: BrokerConfig) -> None:
    cfg = broker_cfg
    topic = f"launcher-{uuid.uuid4().hex[:8]}"
    value = b"survives a restart"

    began = time.monotonic()
    bootstrap = launcher.start(cfg)
    first_start = time.monotonic() - began
    assert bootstrap == cfg.bootstrap
    info = launcher.status(cfg)
    assert info["running"] and info["ready"], info
    assert info["version"] == cfg.version
    assert (cfg.data_dir / "meta.properties").is_file()
    pid = info["pid"]
    assert isinstance(pid, int)

    # Idempotent: a second start finds the running broker and returns at once.
    began = time.monotonic()
    assert launcher.start(cfg) == bootstrap
    assert time.monotonic() - began < 5
    assert launcher.status(cfg)["pid"] == pid

    asyncio.run(_create_and_produce(bootstrap, topic, value))

    assert launcher.stop(cfg) is True
    stopped = launcher.status(cfg)
    assert stopped["running"] is False and stopped["pid"] is None
    assert not cfg.pid_file.exists()
    assert launcher.wait_ready(bootstrap, timeout=0.5) is False
    assert launcher.stop(cfg) is False  # nothing left to stop

    began = time.monotonic()
    assert launcher.start(cfg) == bootstrap
    warm_start = time.monotonic() - began
    assert launcher.status(cfg)["pid"] != pid

    topics, values = asyncio.run(_topics_and_records(bootstrap, topic))
    assert topic in topics
    assert values == [value]

    assert launcher.stop(cfg) is True
    assert launcher.status(cfg)["running"] is False
    print(f"\nKafka {cfg.version}: first start {first_start:.1f}s, warm start {warm_start:.1f}s")


@pytest.mark.integration
@pytest.mark.xdist_group("own-kafka")
def test_start_failure_raises_with_log_tail_and_cleans_up(broker_cfg: BrokerConfig) -> None:
    # A heap far too small for Kafka: the JVM dies at once.  start() must notice the
    # exit instead of waiting out its timeout, and report why.
    cfg = _config(broker_cfg.data_dir.parent, heap="-Xms2m -Xmx2m", start_timeout_s=60)
    began = time.monotonic()
    with pytest.raises(BrokerStartError) as excinfo:
        launcher.start(cfg)
    assert time.monotonic() - began < 45
    message = str(excinfo.value)
    assert "failed to start" in message
    assert "last lines of" in message
    assert not cfg.pid_file.exists()
    assert launcher.status(cfg)["running"] is False


@pytest.mark.integration
@pytest.mark.xdist_group("own-kafka")
def test_start_refuses_a_port_in_use(broker_cfg: BrokerConfig) -> None:
    with socket.socket() as squatter:
        squatter.bind((broker_cfg.host, broker_cfg.port))
        squatter.listen()
        with pytest.raises(BrokerStartError, match="already in use"):
            launcher.start(broker_cfg)
    assert not broker_cfg.pid_file.exists()


@pytest.mark.integration
def test_jar_fetch_is_cached() -> None:
    version = BrokerConfig.from_env().version
    libs = launcher.fetch_jars(version)
    assert any(libs.glob(f"kafka_2.13-{version}.jar"))
    began = time.monotonic()
    assert launcher.fetch_jars(version) == libs
    assert time.monotonic() - began < 1.0
    assert libs.parent == launcher.kafka_cache_dir(version)
    assert os.access(libs, os.R_OK)
