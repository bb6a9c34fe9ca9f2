"""``python -m agentstream.infra.kafka start|stop|status|fetch``: manage the local Kafka broker.

A thin shell over :mod:`infra.kafka.launcher`; settings come from the
``AGENTSTREAM_KAFKA_*`` environment variables.  ``--nodes N`` (or
``AGENTSTREAM_KAFKA_NODES=N``) with N > 1 manages a local N-node KRaft cluster
instead (:class:`~infra.kafka.launcher.ClusterConfig`: ports from
``AGENTSTREAM_KAFKA_CLUSTER_BASE_PORT``, default 29092, state in
``AGENTSTREAM_KAFKA_CLUSTER_DIR``, default ``var/kafka-cluster``); pass the same
``--nodes`` to ``stop`` and ``status``.  ``--secured`` manages a single broker that
authenticates every client instead (:class:`~infra.kafka.secured.SecuredKafka`: mutual
TLS and SCRAM over SASL_SSL, ACLs enforced; ports from
``AGENTSTREAM_KAFKA_SECURED_PORT``, default 19392, state in ``<state>/kafka-secured``:
see `infra.paths`).
Exit codes, as the ``agentstream`` command's (``agentstream kafka`` runs this): 0 success,
1 a broker that could not start (``Error: BrokerStartError: <why>``), 2 a usage or
configuration mistake (a bad ``AGENTSTREAM_KAFKA_*`` value, ``--secured`` with
``--nodes``: ``Error: <what>``), 3 for ``status`` when the broker is not running (the
LSB convention, so scripts can test it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from agentstream.infra.kafka import launcher
from agentstream.infra.paths import state_home

ENV_SECURED_PORT = "AGENTSTREAM_KAFKA_SECURED_PORT"
#: Between the test broker's 19192 and the cluster's 29092; the test secured broker
#: takes 19292-19294.
DEFAULT_SECURED_PORT = 19392
DEFAULT_SECURED_DIR = state_home() / "kafka-secured"
#: the most nodes a local cluster may have (each a JVM and 4 ports on this machine)
MAX_NODES = 9


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run one command; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m agentstream.infra.kafka",
        description="Run a local single-node Apache Kafka broker (KRaft) without Docker.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start_parser = sub.add_parser("start", help="start the broker (fetching jars on first use)")
    stop_parser = sub.add_parser("stop", help="stop the broker started by 'start'")
    status_parser = sub.add_parser("status", help="show whether the broker runs")
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    for command_parser in (start_parser, stop_parser, status_parser):
        command_parser.add_argument(
            "--nodes",
            type=int,
            default=None,
            help=f"N > 1: a local N-node KRaft cluster (default: ${launcher.ENV_NODES} or 1)",
        )
        command_parser.add_argument(
            "--secured",
            action="store_true",
            help="a broker with mutual TLS, SCRAM over SASL_SSL and ACLs (no PLAINTEXT)",
        )
    sub.add_parser("fetch", help="only download the Kafka jars into the cache")
    args = parser.parse_args(argv)

    try:
        if getattr(args, "secured", False):
            if args.nodes not in (None, 1):
                raise ValueError("--secured runs a single broker: drop --nodes")
            return _secured_command(args.command, as_json=getattr(args, "json", False))
        cluster = _cluster(getattr(args, "nodes", None))
        if cluster is not None:
            return _cluster_command(args.command, cluster, as_json=getattr(args, "json", False))
        if args.command == "start":
            return _start()
        if args.command == "stop":
            return _stop()
        if args.command == "fetch":
            cfg = launcher.BrokerConfig.from_env()
            libs = launcher.fetch_jars(cfg.version)
            print(f"Kafka {cfg.version} jars are in {libs}")
            return 0
        info = launcher.status()
        print(json.dumps(info, indent=2) if args.json else launcher.format_status(info))
        return 0 if info["running"] else 3
    except launcher.BrokerStartError as exc:
        print(f"Error: BrokerStartError: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad AGENTSTREAM_KAFKA_* value or option: the user's to fix
        print(f"Error: {exc}", file=sys.stderr)
        return 2


def _cluster(nodes: int | None) -> launcher.ClusterConfig | None:
    """The cluster to manage, or ``None`` for the single broker (N = 1)."""
    if nodes is None:
        raw = os.environ.get(launcher.ENV_NODES, "").strip()
        try:
            nodes = int(raw) if raw else 1
        except ValueError:
            raise ValueError(f"{launcher.ENV_NODES}={raw!r} is not a number") from None
    if not 1 <= nodes <= MAX_NODES:  # as `agentstream kafka --nodes` (click.IntRange)
        raise ValueError(f"{nodes} nodes: a local cluster has 1 to {MAX_NODES}")
    if nodes == 1:
        return None
    return launcher.ClusterConfig.from_env(nodes=nodes)


def _cluster_command(command: str, cluster: launcher.ClusterConfig, *, as_json: bool) -> int:
    if command == "start":
        print(
            f"Starting a {cluster.nodes}-node Kafka {cluster.version} cluster at "
            f"{cluster.bootstrap} (state: {cluster.root}) ..."
        )
        began = time.monotonic()
        bootstrap = launcher.start_cluster(cluster)
        print(f"Kafka cluster is ready at {bootstrap} after {time.monotonic() - began:.1f}s.")
        return 0
    if command == "stop":
        if launcher.stop_cluster(cluster):
            print(f"Kafka cluster at {cluster.bootstrap} stopped.")
        else:
            print("Kafka cluster was not running.")
        return 0
    info = launcher.cluster_status(cluster)
    print(json.dumps(info, indent=2) if as_json else launcher.format_cluster_status(info))
    return 0 if info["running"] else 3


def _secured_command(command: str, *, as_json: bool) -> int:
    # Imported here: the plaintext commands must work without `cryptography`.
    from agentstream.infra.kafka.secured import SecuredKafka

    port = launcher._env_port(os.environ, ENV_SECURED_PORT, DEFAULT_SECURED_PORT)
    kafka = SecuredKafka(DEFAULT_SECURED_DIR, port_base=port)
    if command == "stop":
        was_running = kafka.running()
        kafka.stop()
        print("Secured Kafka stopped." if was_running else "Secured Kafka was not running.")
        return 0
    if command == "start":
        print(f"Starting secured Kafka {kafka.version} (log: {kafka.log_file}) ...")
        began = time.monotonic()
        kafka.start()
        print(f"Secured Kafka is ready after {time.monotonic() - began:.1f}s.")
    info = {
        "running": kafka.running(),
        "ssl_bootstrap": kafka.ssl_bootstrap,
        "sasl_ssl_bootstrap": kafka.sasl_ssl_bootstrap,
        "ca_file": str(kafka.ca_file),
        "password_file": str(kafka.password_file),
        "client_certs": str(kafka.tls_dir / "clients"),
        "log_file": str(kafka.log_file),
    }
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(
            f"Secured Kafka is {'running' if info['running'] else 'not running'}.\n"
            f"  mutual TLS (SSL):           {info['ssl_bootstrap']}\n"
            f"  SCRAM-SHA-256/512 SASL_SSL: {info['sasl_ssl_bootstrap']}\n"
            f"  CA: {info['ca_file']}\n"
            f"  SCRAM passwords (0600): {info['password_file']}\n"
            f"  client certificates: {info['client_certs']}\n"
            f"  log: {info['log_file']}"
        )
    return 0 if info["running"] else 3


def _start() -> int:
    external = launcher.external_bootstrap()
    if external is not None:
        print(f"Using external Kafka cluster at {external} ({launcher.ENV_BOOTSTRAP} is set).")
        print("Nothing to start.")
        return 0
    cfg = launcher.BrokerConfig.from_env()
    already = launcher.status(cfg)
    if already["running"]:
        print(f"Kafka {cfg.version} is already running at {cfg.bootstrap} (pid {already['pid']}).")
        launcher.start(cfg)  # waits until it answers, if it is still starting
        return 0
    print(f"Starting Kafka {cfg.version} at {cfg.bootstrap} (log: {cfg.log_file}) ...")
    began = time.monotonic()
    bootstrap = launcher.start(cfg)
    print(f"Kafka is ready at {bootstrap} after {time.monotonic() - began:.1f}s.")
    return 0


def _stop() -> int:
    external = launcher.external_bootstrap()
    if external is not None:
        print(f"Using external Kafka cluster at {external}; not stopping it.")
        return 0
    cfg = launcher.BrokerConfig.from_env()
    if launcher.stop(cfg):
        print(f"Kafka at {cfg.bootstrap} stopped.")
    else:
        print("Kafka was not running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
