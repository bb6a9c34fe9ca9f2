"""Who does what in a (local) Kafka cluster: the lookups a fault-injection run needs.

A chaos test kills *the* leader of a partition, *the* transaction coordinator of a
producer or *the* group coordinator of a consumer group; this module finds those
nodes by asking the cluster over the Kafka protocol (Metadata and FindCoordinator
requests through aiokafka's admin client), never by parsing broker logs.

Every lookup is a coroutine taking a bootstrap list (``ClusterConfig.bootstrap``)
and retrying transient errors (a node just killed, a coordinator being elected)
until ``timeout_s`` seconds pass, then raising :class:`LookupTimeout` with the last
error.  Node ids are Kafka broker ids, the ones :func:`kill_node` takes.

The process-level primitives live in :mod:`infra.kafka.launcher` (standard library
only) and are re-exported here, so a chaos runner needs one import::

    from agentstream.infra.kafka import cluster

    cfg = cluster.ClusterConfig(nodes=3, base_port=29092, root=tmp_path)
    bootstrap = cluster.start_cluster(cfg)
    leader = await cluster.partition_leader(bootstrap, "orders", 0)
    cluster.kill_node(cfg, leader)                       # SIGKILL, waits for exit
    new = await cluster.wait_for_leader(bootstrap, "orders", 0, not_in={leader})
    await asyncio.to_thread(cluster.restart_node, cfg, leader)
    await cluster.wait_for_isr(bootstrap, "orders", 0, size=3)
    cluster.stop_cluster(cfg)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from agentstream.infra.kafka.launcher import (
    PORTS_PER_NODE,
    ClusterConfig,
    cluster_settings,
    cluster_status,
    free_port_block,
    kill_node,
    node_pid,
    restart_node,
    start_cluster,
    stop_cluster,
)

__all__ = [
    "PORTS_PER_NODE",
    "ClusterConfig",
    "LookupTimeout",
    "PartitionState",
    "cluster_settings",
    "cluster_status",
    "describe_partition",
    "free_port_block",
    "group_coordinator",
    "kill_node",
    "live_brokers",
    "node_pid",
    "partition_leader",
    "restart_node",
    "start_cluster",
    "stop_cluster",
    "transaction_coordinator",
    "wait_for_broker",
    "wait_for_isr",
    "wait_for_leader",
]

DEFAULT_LOOKUP_TIMEOUT_S: Final = 30.0
_COORDINATOR_GROUP: Final = 0
_COORDINATOR_TRANSACTION: Final = 1
#: Short client timeouts: a request to a node that was just killed must fail fast
#: and be retried against another node, not hang for aiokafka's 40 s default.
_REQUEST_TIMEOUT_MS: Final = 5000

T = TypeVar("T")


class LookupTimeout(TimeoutError):
    """The cluster did not give a usable answer within the timeout."""


@dataclass(frozen=True)
class PartitionState:
    """One partition as the cluster's metadata describes it (``leader`` -1: none)."""

    topic: str
    partition: int
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@contextlib.asynccontextmanager
async def _admin(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=_REQUEST_TIMEOUT_MS,
        metadata_max_age_ms=1000,
        client_id="agentstream-cluster-lookup",
    )
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def _retry(
    what: str,
    bootstrap: str,
    attempt: Callable[[AIOKafkaAdminClient], Awaitable[T | None]],
    timeout_s: float,
) -> T:
    """Run ``attempt`` with a fresh admin client until it returns non-``None``."""
    deadline = time.monotonic() + timeout_s
    last: object = "no answer"
    delay = 0.1
    while True:
        try:
            async with _admin(bootstrap) as admin:
                while True:
                    result = await attempt(admin)
                    if result is not None:
                        return result
                    last = "condition not met yet"
                    if time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
        except (TimeoutError, KafkaError, OSError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise LookupTimeout(f"{what}: no answer from {bootstrap} in {timeout_s:.0f}s: {last}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


def _partition_state(
    topic_meta: dict[str, Any], topic: str, partition: int
) -> PartitionState | None:
    if topic_meta.get("topic") != topic or topic_meta.get("error_code"):
        return None
    for part in topic_meta.get("partitions", ()):
        if part["partition"] == partition:
            return PartitionState(
                topic=topic_meta["topic"],
                partition=partition,
                leader=int(part["leader"]),
                replicas=tuple(part["replicas"]),
                isr=tuple(part["isr"]),
            )
    return None


async def describe_partition(
    bootstrap: str,
    topic: str,
    partition: int = 0,
    *,
    timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S,
) -> PartitionState:
    """Leader, replicas and in-sync replicas of one partition (a Metadata request)."""

    async def attempt(admin: AIOKafkaAdminClient) -> PartitionState | None:
        for topic_meta in await admin.describe_topics([topic]):
            state = _partition_state(topic_meta, topic, partition)
            if state is not None:
                return state
        return None

    return await _retry(f"describe {topic}-{partition}", bootstrap, attempt, timeout_s)


async def partition_leader(
    bootstrap: str,
    topic: str,
    partition: int = 0,
    *,
    timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S,
) -> int:
    """The node id leading ``topic``-``partition`` (waits while it has no leader)."""
    return await wait_for_leader(bootstrap, topic, partition, timeout_s=timeout_s)


async def wait_for_leader(
    bootstrap: str,
    topic: str,
    partition: int = 0,
    *,
    not_in: Collection[int] = (),
    timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S,
) -> int:
    """Wait until the partition has a leader that is not in ``not_in``; return it.

    After killing leader ``L``, ``wait_for_leader(..., not_in={L})`` returns the
    newly elected one (the controller moves leadership once it fences ``L``, within
    the ``broker.session.timeout.ms`` of :func:`cluster_settings`).
    """
    excluded = set(not_in)

    async def attempt(admin: AIOKafkaAdminClient) -> int | None:
        for topic_meta in await admin.describe_topics([topic]):
            state = _partition_state(topic_meta, topic, partition)
            if state is not None and state.leader >= 0 and state.leader not in excluded:
                return state.leader
        return None

    return await _retry(f"leader of {topic}-{partition}", bootstrap, attempt, timeout_s)


async def wait_for_isr(
    bootstrap: str,
    topic: str,
    partition: int = 0,
    *,
    size: int | None = None,
    timeout_s: float = 60.0,
) -> PartitionState:
    """Wait until the partition's ISR holds ``size`` replicas (default: all of them).

    Use it after :func:`restart_node` to know the restarted node has caught up.
    """

    async def attempt(admin: AIOKafkaAdminClient) -> PartitionState | None:
        for topic_meta in await admin.describe_topics([topic]):
            state = _partition_state(topic_meta, topic, partition)
            if state is not None:
                wanted = len(state.replicas) if size is None else size
                if len(state.isr) >= wanted and state.leader >= 0:
                    return state
        return None

    return await _retry(f"ISR of {topic}-{partition}", bootstrap, attempt, timeout_s)


async def live_brokers(bootstrap: str, *, timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S) -> set[int]:
    """Node ids the cluster's metadata lists as alive (registered and unfenced)."""

    async def attempt(admin: AIOKafkaAdminClient) -> set[int] | None:
        info = await admin.describe_cluster()
        return {int(b["node_id"]) for b in info["brokers"]}

    return await _retry("live brokers", bootstrap, attempt, timeout_s)


async def wait_for_broker(
    bootstrap: str,
    node_id: int,
    *,
    present: bool = True,
    timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S,
) -> None:
    """Wait until metadata lists ``node_id`` (``present=False``: no longer lists it,
    i.e. the controller has fenced a killed node)."""

    async def attempt(admin: AIOKafkaAdminClient) -> bool | None:
        info = await admin.describe_cluster()
        listed = any(int(b["node_id"]) == node_id for b in info["brokers"])
        return True if listed == present else None

    await _retry(
        f"broker {node_id} {'listed' if present else 'gone'}", bootstrap, attempt, timeout_s
    )


async def _coordinator(
    bootstrap: str, key: str, coordinator_type: int, what: str, timeout_s: float
) -> int:
    async def attempt(admin: AIOKafkaAdminClient) -> int | None:
        # aiokafka's find_coordinator raises on an error code; we want to retry the
        # transient ones (COORDINATOR_NOT_AVAILABLE while __transaction_state or
        # __consumer_offsets is created or its leader moves), so raise → retry.
        try:
            return int(await admin.find_coordinator(key, coordinator_type))
        except KafkaError:
            if time.monotonic() >= deadline:
                raise
            return None

    deadline = time.monotonic() + timeout_s
    return await _retry(what, bootstrap, attempt, timeout_s)


async def transaction_coordinator(
    bootstrap: str, transactional_id: str, *, timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S
) -> int:
    """Node id of the transaction coordinator for ``transactional_id``
    (FindCoordinator, key type TRANSACTION: the leader of its ``__transaction_state``
    partition).  The first call for a cluster may create that topic."""
    return await _coordinator(
        bootstrap,
        transactional_id,
        _COORDINATOR_TRANSACTION,
        f"transaction coordinator of {transactional_id!r}",
        timeout_s,
    )


async def group_coordinator(
    bootstrap: str, group_id: str, *, timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S
) -> int:
    """Node id of the group coordinator for consumer group ``group_id``
    (FindCoordinator, key type GROUP: the leader of its ``__consumer_offsets``
    partition)."""
    return await _coordinator(
        bootstrap, group_id, _COORDINATOR_GROUP, f"group coordinator of {group_id!r}", timeout_s
    )
