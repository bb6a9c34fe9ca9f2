"""docker-compose.kafka.yml must describe the same broker as infra/kafka/launcher.py.

Developers with Docker use the compose file, everyone else (and CI) the launcher; a
setting changed in only one of them (say auto topic creation, or the port) would make
the pipeline behave differently depending on who runs it.  Expected values are
imported from the launcher, so these tests fail as soon as the two drift apart.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import yaml

from agentstream.infra.kafka import launcher

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.kafka.yml"
REPLICATED = ("kafka-1", "kafka-2", "kafka-3")
#: the brokers of the profile "cluster" (workers in containers; tests/unit/test_container_files.py)
CLUSTER = ("cluster-kafka-1", "cluster-kafka-2", "cluster-kafka-3")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _service(name: str) -> dict[str, Any]:
    service = _compose()["services"][name]
    assert isinstance(service, dict)
    return service


def _env_to_property(name: str) -> str:
    """Invert the apache/kafka image's mapping (KAFKA_ prefix, . -> _, _ -> __, - -> ___)."""
    body = name.removeprefix("KAFKA_").lower()
    return (
        body.replace("___", "\0")
        .replace("__", "\1")
        .replace("_", ".")
        .replace("\0", "-")
        .replace("\1", "_")
    )


def _properties(service: str) -> dict[str, str]:
    """The broker properties a service's KAFKA_* variables produce."""
    env = _service(service)["environment"]
    assert isinstance(env, dict), "environment must be a mapping"
    return {
        _env_to_property(key): value
        for key, value in env.items()
        if key.startswith("KAFKA_") and key != "KAFKA_HEAP_OPTS"
    }


def _listener_ports(value: str) -> dict[str, int]:
    return {name: int(port) for name, port in re.findall(r"([A-Z_]+)://[^:,]*:(\d+)", value)}


def test_env_name_mapping_matches_the_image_convention() -> None:
    assert _env_to_property("KAFKA_AUTO_CREATE_TOPICS_ENABLE") == "auto.create.topics.enable"
    assert _env_to_property("KAFKA_LISTENER_NAME_X__Y___Z") == "listener.name.x_y-z"


def test_every_environment_value_is_a_string() -> None:
    # Compose rejects YAML booleans in `environment`, and an unquoted 1 vs "1" would
    # make the comparisons below silently type-dependent.
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            assert isinstance(value, str), f"{name}: {key} must be a quoted string"


def test_single_node_uses_the_launcher_version_and_port() -> None:
    kafka = _service("kafka")
    assert kafka["image"] == f"apache/kafka:{launcher.DEFAULT_KAFKA_VERSION}"
    assert "profiles" not in kafka, "the single node must start without a profile"
    port = launcher.DEFAULT_PORT
    assert kafka["ports"] == [f"{launcher.DEFAULT_HOST}:{port}:{port}"]
    props = _properties("kafka")
    assert _listener_ports(props["listeners"])["PLAINTEXT"] == port
    assert _listener_ports(props["listeners"])["CONTROLLER"] == launcher.DEFAULT_CONTROLLER_PORT
    assert f"PLAINTEXT://{launcher.DEFAULT_HOST}:{port}" in props["advertised.listeners"].split(",")


def test_single_node_settings_equal_the_launcher_settings() -> None:
    props = _properties("kafka")
    for key, value in launcher.BROKER_SETTINGS.items():
        assert props.get(key) == value, f"{key}: compose {props.get(key)!r}, launcher {value!r}"
    # The launcher's own server.properties agrees on the KRaft topology as well.
    local = launcher.server_properties(launcher.BrokerConfig())
    for key in ("node.id", "process.roles", "controller.listener.names"):
        assert props[key] == local[key], key
    voters = props["controller.quorum.voters"]
    assert voters == f"{launcher.NODE_ID}@kafka:{launcher.DEFAULT_CONTROLLER_PORT}"


def test_single_node_spells_out_the_important_defaults() -> None:
    # Redundant with the loop above on purpose: these are the settings the pipeline's
    # tests rely on, named so that a failure says what broke.
    props = _properties("kafka")
    assert props["auto.create.topics.enable"] == "false"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    for key in launcher.REPLICATION_SETTINGS:
        assert props[key] == "1", key


def test_cluster_ids_are_valid_kraft_ids() -> None:
    ids = {_service(name)["environment"]["CLUSTER_ID"] for name in ("kafka", *REPLICATED, *CLUSTER)}
    assert len(ids) == 3, "one id for the single node, one per cluster of 3 brokers"
    for cluster_id in ids:
        assert len(cluster_id) == 22
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
    assert len(launcher.new_cluster_id()) == 22


def test_replicated_profile_has_three_consistent_brokers() -> None:
    services = [_service(name) for name in REPLICATED]
    node_ids = []
    host_ports = []
    for name, service in zip(REPLICATED, services, strict=True):
        assert service["profiles"] == ["replicated"]
        assert service["image"] == f"apache/kafka:{launcher.DEFAULT_KAFKA_VERSION}"
        props = _properties(name)
        node_ids.append(props["node.id"])
        port = _listener_ports(props["listeners"])["PLAINTEXT"]
        assert service["ports"] == [f"{launcher.DEFAULT_HOST}:{port}:{port}"]
        assert f"PLAINTEXT://{launcher.DEFAULT_HOST}:{port}" in props["advertised.listeners"]
        host_ports.append(port)
        assert props["controller.quorum.voters"] == (
            "1@kafka-1:19093,2@kafka-2:19093,3@kafka-3:19093"
        )
        for key, value in launcher.BROKER_SETTINGS.items():
            if key not in launcher.REPLICATION_SETTINGS:
                assert props[key] == value, f"{name}: {key}"
        assert props["default.replication.factor"] == "3"
        assert props["offsets.topic.replication.factor"] == "3"
        assert props["transaction.state.log.replication.factor"] == "3"
        assert props["min.insync.replicas"] == "2"
        assert props["transaction.state.log.min.isr"] == "2"
    assert sorted(node_ids) == ["1", "2", "3"]
    assert len(set(host_ports)) == 3
    assert launcher.DEFAULT_PORT not in host_ports
    assert launcher.DEFAULT_CONTROLLER_PORT not in host_ports


def test_monitoring_profile_mounts_the_project_config() -> None:
    prometheus = _service("prometheus")
    grafana = _service("grafana")
    assert prometheus["profiles"] == ["monitoring"]
    assert grafana["profiles"] == ["monitoring"]
    assert any(
        v.startswith("./infra/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml")
        for v in prometheus["volumes"]
    )
    mounts = [v.split(":")[0] for v in grafana["volumes"]]
    assert "./infra/grafana/provisioning" in mounts
    assert "./infra/grafana/dashboards" in mounts


def test_named_volumes_are_declared() -> None:
    compose = _compose()
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"


def test_cluster_profile_brokers_have_the_replicated_settings_and_tls_on_every_listener() -> None:
    replicated = _properties("kafka-1")
    node_ids = []
    host_ports = []
    for name in CLUSTER:
        service = _service(name)
        assert service["profiles"] == ["cluster"]
        assert service["image"] == f"apache/kafka:{launcher.DEFAULT_KAFKA_VERSION}"
        assert service["hostname"] == name
        props = _properties(name)
        node_ids.append(props["node.id"])
        # what the replicated profile sets (RF 3, min ISR 2, the launcher's settings) holds
        for key in (*launcher.BROKER_SETTINGS, "default.replication.factor", "process.roles"):
            assert props[key] == replicated[key], f"{name}: {key}"
        voters = ",".join(f"{i}@{broker}:19093" for i, broker in enumerate(CLUSTER, 1))
        assert props["controller.quorum.voters"] == voters
        # no plaintext anywhere: SCRAM over TLS, controllers with client certificates
        protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
        assert set(_listener_ports(props["listeners"])) == set(protocols), name
        assert set(protocols.values()) <= {"SSL", "SASL_SSL"}, f"{name}: {protocols}"
        assert protocols[props["inter.broker.listener.name"]] == "SASL_SSL"
        controller = props["controller.listener.names"]
        assert protocols[controller] == "SSL"
        assert props[f"listener.name.{controller.lower()}.ssl.client.auth"] == "required"
        mechanisms = props["sasl.enabled.mechanisms"].split(",")
        assert mechanisms == ["SCRAM-SHA-512"], "SCRAM only: PLAIN would send passwords"
        assert props["sasl.mechanism.inter.broker.protocol"] in mechanisms
        # containers use INTERNAL by the service name; the host CLI EXTERNAL on loopback
        advertised = dict(
            (listener, address)
            for listener, address in re.findall(
                r"([A-Z_]+)://([^,]+)", props["advertised.listeners"]
            )
        )
        internal = props["inter.broker.listener.name"]
        assert advertised[internal] == f"{name}:{_listener_ports(props['listeners'])[internal]}"
        (external,) = set(advertised) - {internal}
        port = _listener_ports(props["listeners"])[external]
        assert advertised[external] == f"{launcher.DEFAULT_HOST}:{port}"
        assert service["ports"] == [f"{launcher.DEFAULT_HOST}:{port}:{port}"]
        host_ports.append(port)
    assert sorted(node_ids) == ["1", "2", "3"]
    assert len(set(host_ports)) == 3


def test_published_host_ports_do_not_clash() -> None:
    # profiles may run side by side (single node + cluster, monitoring + cluster)
    published = [
        port.rsplit(":", 1)[0]
        for service in _compose()["services"].values()
        for port in service.get("ports", [])
    ]
    assert len(published) == len(set(published)), published
