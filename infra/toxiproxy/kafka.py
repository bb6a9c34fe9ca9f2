"""Kafka behind Toxiproxy: every client connection goes through a proxy.

The problem: a Kafka client uses its bootstrap address only for the first Metadata
request, then connects to the addresses the brokers *advertise*.  Bootstrapping
through a proxy in front of an ordinary broker would therefore bypass the proxy
after one request, and toxics would affect almost nothing.

The fix: each broker advertises its proxy's address.  A
:class:`~infra.kafka.launcher.ClusterConfig` with ``proxied=True`` gives node ``i``
a client listener on ``port(i)`` advertised as ``proxy_port(i)``, plus a separate
``INTERNAL`` listener (``internal_port(i)``) for replication and transaction
markers, which never passes through a proxy.  :func:`start_behind_proxy` creates one
Toxiproxy proxy per node, ``proxy_port(i)`` → ``port(i)``, then starts the brokers;
clients use :attr:`ProxiedKafka.bootstrap` and every connection they make, to any
broker, crosses a proxy that can be given toxics or disabled.

Example (one broker; ``nodes=3`` works the same way, one proxy per node)::

    with kafka_behind_proxy(tp, ClusterConfig(nodes=1, base_port=29200, root=tmp)) as kafka:
        produce(kafka.bootstrap)              # 127.0.0.1:29203 → proxy → broker 29200
        with kafka.proxy().toxic("latency", {"latency": 500}):
            ...                               # every request now takes +500 ms
        with kafka.proxy().disabled():
            ...                               # clients see connection refused
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agentstream.infra.kafka.launcher import ClusterConfig, start_cluster, stop_cluster
from agentstream.infra.toxiproxy.client import Proxy, Toxiproxy

__all__ = [
    "ProxiedKafka",
    "broker_behind_proxy",
    "create_proxies",
    "kafka_behind_proxy",
    "proxy_name",
    "start_behind_proxy",
    "stop_behind_proxy",
]


@dataclass
class ProxiedKafka:
    """A running cluster whose client traffic flows through Toxiproxy."""

    cluster: ClusterConfig
    toxiproxy: Toxiproxy
    #: Node id → its proxy.
    proxies: dict[int, Proxy]

    @property
    def bootstrap(self) -> str:
        """Client bootstrap list: the proxies' addresses."""
        return self.cluster.bootstrap

    def proxy(self, node_id: int = 1) -> Proxy:
        """The proxy in front of node ``node_id`` (the only one for a single broker)."""
        return self.proxies[node_id]

    def heal(self) -> None:
        """Enable every proxy of this cluster and remove all their toxics."""
        for proxy in self.proxies.values():
            proxy.clear_toxics()
            if not proxy.enabled:
                proxy.enable()


def proxy_name(cluster: ClusterConfig, node_id: int) -> str:
    """Unique per cluster layout: ``kafka-<base_port>-node<id>``."""
    return f"kafka-{cluster.base_port}-node{node_id}"


def create_proxies(toxiproxy: Toxiproxy, cluster: ClusterConfig) -> dict[int, Proxy]:
    """One proxy per node, ``proxy_port(i)`` → ``port(i)`` (stale ones replaced)."""
    if not cluster.proxied:
        raise ValueError("the cluster must be built with ClusterConfig(proxied=True)")
    host = cluster.host
    return {
        node_id: toxiproxy.create_proxy(
            proxy_name(cluster, node_id),
            listen=f"{host}:{cluster.proxy_port(node_id)}",
            upstream=f"{host}:{cluster.port(node_id)}",
        )
        for node_id in cluster.node_ids
    }


def start_behind_proxy(toxiproxy: Toxiproxy, cluster: ClusterConfig) -> ProxiedKafka:
    """Create the proxies, start the cluster (``proxied`` is forced on) and return
    the handle.  On a start failure the proxies are deleted again."""
    if not cluster.proxied:
        cluster = dataclasses.replace(cluster, proxied=True)
    proxies = create_proxies(toxiproxy, cluster)
    try:
        start_cluster(cluster)
    except BaseException:
        for proxy in proxies.values():
            proxy.delete()
        raise
    return ProxiedKafka(cluster, toxiproxy, proxies)


def broker_behind_proxy(
    toxiproxy: Toxiproxy, base_port: int, root: Path, **cluster_options: object
) -> ProxiedKafka:
    """A single broker behind one proxy: broker on ``base_port`` (P), controller on
    P+1, internal listener on P+2, proxy on P+3 (Q), advertised address Q.
    ``bootstrap`` is ``127.0.0.1:Q``; ``proxy()`` is the proxy for toxics."""
    cluster = ClusterConfig(
        nodes=1,
        base_port=base_port,
        root=root,
        proxied=True,
        **cluster_options,  # type: ignore[arg-type]
    )
    return start_behind_proxy(toxiproxy, cluster)


def stop_behind_proxy(kafka: ProxiedKafka) -> None:
    """Stop the brokers and delete their proxies (best effort for the proxies: the
    Toxiproxy server may already be gone)."""
    try:
        with contextlib.suppress(Exception):
            kafka.heal()  # a disabled proxy is harmless, but a paused toxic is noise
        stop_cluster(kafka.cluster)
    finally:
        for proxy in kafka.proxies.values():
            with contextlib.suppress(Exception):
                proxy.delete()


@contextlib.contextmanager
def kafka_behind_proxy(toxiproxy: Toxiproxy, cluster: ClusterConfig) -> Iterator[ProxiedKafka]:
    """:func:`start_behind_proxy` … :func:`stop_behind_proxy`, even on failure."""
    kafka = start_behind_proxy(toxiproxy, cluster)
    try:
        yield kafka
    finally:
        stop_behind_proxy(kafka)
