"""Run a real single-node Apache Kafka broker on this machine, without Docker.

Why this exists: the pipeline's integration tests and local development need a real
broker (transactions, consumer groups and compaction behave differently in fakes),
but the development machines and CI have Java and Maven and no container engine.  So
the broker is assembled from the official jars on Maven Central and started as a
plain JVM process.

The flow of :func:`start`:

1. ``AGENTSTREAM_KAFKA_BOOTSTRAP`` set?  Then an external cluster is used and nothing
   is started (:func:`external_bootstrap`).
2. Already running (pid file names a live broker process and the port answers a
   Metadata request)?  Return its bootstrap address at once.
3. :func:`fetch_jars`: ``mvn dependency:copy-dependencies`` on ``infra/kafka/pom.xml``
   copies ``org.apache.kafka:kafka_2.13:<version>`` and a logging backend into
   ``~/.cache/agentstream/kafka-<version>/libs`` (``$XDG_CACHE_HOME`` is respected).
   A marker file makes later calls a no-op; a file lock makes parallel calls safe.
4. :func:`write_server_properties`: ``<data_dir>/../server.properties`` is written
   anew from :class:`BrokerConfig` on every start (KRaft combined mode:
   ``process.roles=broker,controller``; settings tuned for one node and fast tests).
5. First use only (no ``meta.properties`` in the data dir): format the storage with a
   fresh cluster id (``kafka.tools.StorageTool format``).  Later starts reuse the log
   dir as is, so topics and records survive stop/start.
6. ``java -cp '<libs>/*' kafka.Kafka server.properties`` runs detached in its own
   session with stdout/stderr appended to the log file, and its pid goes to the pid
   file.
7. :func:`wait_ready` polls with a minimal Kafka protocol Metadata request (stdlib
   ``socket`` + ``struct``) until the broker lists itself; on timeout, or if the JVM
   exits early, the process is killed and :class:`BrokerStartError` carries the tail
   of the log.

:func:`stop` sends SIGTERM (a clean, controlled shutdown flushes the logs), waits, and
falls back to SIGKILL.  :func:`status` reports without changing anything.

Multi-node clusters (for fault injection): :class:`ClusterConfig` describes N
combined broker+controller nodes forming one KRaft quorum (node ids 1..N, four ports
per node from ``base_port``, one folder per node under ``root``, replication factor 3
and ``min.insync.replicas=2`` from :func:`cluster_settings`, heap
:data:`CLUSTER_NODE_HEAP` each).  :func:`start_cluster` / :func:`stop_cluster` manage
them, :func:`kill_node` (SIGKILL by default), :func:`restart_node` and
:func:`node_pid` are the chaos primitives, and ``python -m agentstream.infra.kafka start --nodes
3`` is the shell form.  Who leads a partition or coordinates a group/transaction is
asked over the Kafka protocol in :mod:`infra.kafka.cluster` (needs aiokafka).  With
``ClusterConfig(proxied=True)`` every node advertises a Toxiproxy port to clients
(:mod:`infra.toxiproxy.kafka`).

Secured brokers (TLS, SASL, ACLs) are built on three hooks of :class:`BrokerConfig`:
``extra_settings`` replaces the listener layout, ``format_args`` adds StorageTool
arguments (SCRAM users must exist from the first start) and ``probe_tls`` makes the
readiness probe speak TLS with a client certificate.  :mod:`infra.kafka.secured` uses
them; this module stays free of any security policy.  :func:`tool_command` runs
Kafka's own command-line classes (``kafka.admin.AclCommand`` ...) with the same jars.

Kafka 3.x (slf4j + reload4j, ``log4j.properties``) and 4.x (log4j2,
``log4j2.properties``) are both supported; the Maven profile and logging flags follow
the major version.  Only the standard library is used so that the launcher works
before the project's dependencies are installed.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from agentstream.infra.paths import cache_home, state_home
from agentstream.infra.procs import pid_alive

__all__ = [
    "BROKER_SETTINGS",
    "CLUSTER_NODE_HEAP",
    "DEFAULT_CLUSTER_BASE_PORT",
    "DEFAULT_CLUSTER_DIR",
    "DEFAULT_CLUSTER_NODES",
    "DEFAULT_CONTROLLER_PORT",
    "DEFAULT_HEAP",
    "DEFAULT_HOST",
    "DEFAULT_KAFKA_VERSION",
    "DEFAULT_PORT",
    "DEFAULT_START_TIMEOUT_S",
    "DEFAULT_STATE_DIR",
    "ENV_BOOTSTRAP",
    "ENV_CLUSTER_BASE_PORT",
    "ENV_CLUSTER_DIR",
    "ENV_CONTROLLER_PORT",
    "ENV_DATA_DIR",
    "ENV_HEAP",
    "ENV_LOG_FILE",
    "ENV_NODES",
    "ENV_PORT",
    "ENV_VERSION",
    "NODE_ID",
    "PORTS_PER_NODE",
    "REPLICATION_SETTINGS",
    "BrokerConfig",
    "BrokerInfo",
    "BrokerStartError",
    "ClusterConfig",
    "ClusterMetadata",
    "ProbeTLS",
    "cluster_settings",
    "cluster_status",
    "external_bootstrap",
    "fetch_jars",
    "format_cluster_status",
    "format_status",
    "free_port_block",
    "kafka_cache_dir",
    "kill_node",
    "new_cluster_id",
    "node_pid",
    "probe_metadata",
    "restart_node",
    "server_properties",
    "start",
    "start_cluster",
    "status",
    "stop",
    "stop_cluster",
    "tool_command",
    "wait_ready",
    "write_server_properties",
]

#: Newest Kafka 3.9 patch on Maven Central (checked against maven-metadata.xml).
DEFAULT_KAFKA_VERSION: Final = "3.9.2"
DEFAULT_HOST: Final = "127.0.0.1"
#: Not 9092: a developer's own Kafka on the default port must keep working.
DEFAULT_PORT: Final = 19092
DEFAULT_CONTROLLER_PORT: Final = 19093
DEFAULT_HEAP: Final = "-Xms256m -Xmx1g"
DEFAULT_START_TIMEOUT_S: Final = 90.0
DEFAULT_STOP_TIMEOUT_S: Final = 30.0
#: The single node is broker and controller at once; its id is fixed.
NODE_ID: Final = 1

ENV_VERSION: Final = "AGENTSTREAM_KAFKA_VERSION"
ENV_DATA_DIR: Final = "AGENTSTREAM_KAFKA_DATA_DIR"
ENV_PORT: Final = "AGENTSTREAM_KAFKA_PORT"
ENV_CONTROLLER_PORT: Final = "AGENTSTREAM_KAFKA_CONTROLLER_PORT"
ENV_LOG_FILE: Final = "AGENTSTREAM_KAFKA_LOG_FILE"
ENV_HEAP: Final = "AGENTSTREAM_KAFKA_HEAP"
ENV_BOOTSTRAP: Final = "AGENTSTREAM_KAFKA_BOOTSTRAP"

_HERE: Final = Path(__file__).resolve().parent
POM_FILE: Final = _HERE / "pom.xml"
LOG4J1_CONFIG: Final = _HERE / "log4j.properties"
LOG4J2_CONFIG: Final = _HERE / "log4j2.properties"
#: State folder of the development broker (`infra.paths.state_home`: ``var/`` in a checkout).
DEFAULT_STATE_DIR: Final = state_home() / "kafka"

#: Broker settings that do not depend on ports or paths.  ``docker-compose.kafka.yml``
#: mirrors them as ``KAFKA_*`` variables, and a unit test keeps the two in step.
#: Everything is sized for one node: replication factors and ISR minimums of 1 (the
#: defaults of 3 would leave internal topics unavailable), explicit topic creation
#: (typos must fail loudly instead of creating topics), no rebalance delay (consumer
#: groups in tests join at once) and few internal partitions (faster first start).
BROKER_SETTINGS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "false",
        "group.initial.rebalance.delay.ms": "0",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "log.retention.check.interval.ms": "60000",
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
)

#: Settings that differ per node or per cluster size; tests compare them by name.
REPLICATION_SETTINGS: Final = frozenset(
    {
        "default.replication.factor",
        "min.insync.replicas",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
    }
)

_MARKER_NAME: Final = ".agentstream-complete"
_LOG_ROTATE_BYTES: Final = 20 * 1024 * 1024
_LOG_TAIL_LINES: Final = 40
_MAVEN_TIMEOUT_S: Final = 900.0
_FORMAT_TIMEOUT_S: Final = 120.0
_METADATA_API_KEY: Final = 3
#: Metadata v4 is the oldest version Kafka 4.x still accepts (KIP-896 removed v0-v3)
#: and Kafka 3.x accepts it too; it is not a "flexible" version, so plain struct
#: encoding suffices.
_METADATA_VERSION: Final = 4
_CLIENT_ID: Final = b"agentstream-launcher"
#: Maven colours some lines even in batch mode; error messages should be plain text.
_ANSI_ESCAPE: Final = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class BrokerStartError(RuntimeError):
    """The local broker could not be fetched, formatted or started in time.

    The message includes the reason and, where there is one, the tail of the broker
    log, so that a failing CI run shows why without another round trip.
    """


@dataclass(frozen=True)
class ProbeTLS:
    """How the readiness probe reaches a TLS listener: PEM files of the CA that signed
    the broker and of a client certificate the broker accepts (mutual TLS)."""

    cafile: Path
    certfile: Path
    keyfile: Path

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker's chain and host name."""
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        ctx.load_cert_chain(str(self.certfile), str(self.keyfile))
        return ctx


@dataclass(frozen=True)
class BrokerConfig:
    """Everything needed to run one local broker; build it with :meth:`from_env`.

    The defaults put all state in the gitignored ``<repo>/var/kafka/`` folder.  A test
    that runs its own broker should set ``data_dir``, ``log_file`` and ``pid_file``
    together (plus free ports), so that it never touches the developer's broker.
    """

    version: str = DEFAULT_KAFKA_VERSION
    data_dir: Path = DEFAULT_STATE_DIR / "data"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    controller_port: int = DEFAULT_CONTROLLER_PORT
    log_file: Path = DEFAULT_STATE_DIR / "broker.log"
    pid_file: Path = DEFAULT_STATE_DIR / "broker.pid"
    heap: str = DEFAULT_HEAP
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    #: Extra or overriding ``server.properties`` entries (tests, experiments).
    extra_settings: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: KRaft node id.  A single broker keeps :data:`NODE_ID`; cluster nodes are 1..n.
    node_id: int = NODE_ID
    #: ``controller.quorum.voters``; ``None`` means this node alone (single node).
    quorum_voters: str | None = None
    #: Port clients are told to use (``advertised.listeners``), when it is not ``port``:
    #: a Toxiproxy listener in front of the broker.  ``None`` advertises ``port``.
    advertised_port: int | None = None
    #: Port of a separate ``INTERNAL`` listener for broker-to-broker traffic
    #: (replication, transaction markers), so that it bypasses a proxy in front of
    #: ``port``.  ``None``: brokers talk to each other over the client listener.
    internal_port: int | None = None
    #: Cluster id for formatting a fresh data dir; ``None`` draws a new one.  All nodes
    #: of one cluster must be formatted with the same id.
    cluster_id: str | None = None
    #: Extra ``kafka.tools.StorageTool format`` arguments, used on the first start only
    #: (e.g. ``--add-scram`` users, which may carry passwords: hence no repr).
    format_args: tuple[str, ...] = field(default=(), repr=False)
    #: Ports of further listeners that ``extra_settings`` declares; checked free
    #: before the broker starts, like ``port`` and ``controller_port``.
    extra_ports: tuple[int, ...] = ()
    #: Set when the ``port`` listener speaks TLS (and wants a client certificate):
    #: readiness and status probes then handshake with these files.
    probe_tls: ProbeTLS | None = None

    def __post_init__(self) -> None:
        """Reject settings Kafka would only fail on later, with a vaguer message."""
        _major(self.version)
        ports = [("port", self.port), ("controller_port", self.controller_port)]
        if self.advertised_port is not None:
            ports.append(("advertised_port", self.advertised_port))
        if self.internal_port is not None:
            ports.append(("internal_port", self.internal_port))
        ports.extend(("extra_ports", p) for p in self.extra_ports)
        for name, port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"{name}={port} is out of the port range 1-65535")
        if self.port == self.controller_port:
            raise ValueError(f"port and controller_port must differ (both {self.port})")
        if self.internal_port in (self.port, self.controller_port):
            raise ValueError(f"internal_port={self.internal_port} must differ from the others")
        if self.extra_ports:
            own = [self.port, self.controller_port, *self.extra_ports]
            if self.internal_port is not None:
                own.append(self.internal_port)
            if len(set(own)) != len(own):
                raise ValueError(f"listener ports must all differ: {sorted(own)}")
        if self.node_id < 0:
            raise ValueError(f"node_id={self.node_id} must not be negative")
        if self.start_timeout_s <= 0:
            raise ValueError("start_timeout_s must be positive")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BrokerConfig:
        """Read the ``AGENTSTREAM_KAFKA_*`` overrides on top of the defaults.

        When only the data dir is moved, the log and pid files move next to it (into
        its parent folder), so that two brokers never share a pid file by accident.
        """
        env = os.environ if environ is None else environ
        version = env.get(ENV_VERSION, "").strip() or DEFAULT_KAFKA_VERSION
        data_env = env.get(ENV_DATA_DIR, "").strip()
        data_dir = Path(data_env).expanduser().resolve() if data_env else DEFAULT_STATE_DIR / "data"
        state_dir = data_dir.parent
        log_env = env.get(ENV_LOG_FILE, "").strip()
        log_file = Path(log_env).expanduser().resolve() if log_env else state_dir / "broker.log"
        return cls(
            version=version,
            data_dir=data_dir,
            port=_env_port(env, ENV_PORT, DEFAULT_PORT),
            controller_port=_env_port(env, ENV_CONTROLLER_PORT, DEFAULT_CONTROLLER_PORT),
            log_file=log_file,
            pid_file=state_dir / "broker.pid",
            heap=env.get(ENV_HEAP, "").strip() or DEFAULT_HEAP,
        )

    @property
    def bootstrap(self) -> str:
        """``host:port`` of the ``port`` listener (PLAINTEXT unless the config says
        otherwise through ``extra_settings``)."""
        return f"{self.host}:{self.port}"

    @property
    def server_properties_file(self) -> Path:
        """Where the generated broker config lives: next to the data dir."""
        return self.data_dir.parent / "server.properties"

    @property
    def major_version(self) -> int:
        """Kafka major version; it decides the logging stack and Maven profile."""
        return _major(self.version)

    def probe_context(self) -> ssl.SSLContext | None:
        """The readiness probe's TLS context (``None``: the probe speaks plaintext)."""
        return None if self.probe_tls is None else self.probe_tls.context()


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{name}={raw!r} is out of the port range 1-65535")
    return port


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    if not head.isdigit():
        raise ValueError(f"unrecognised Kafka version {version!r}")
    return int(head)


# --------------------------------------------------------------------------- settings


def external_bootstrap() -> str | None:
    """The external cluster named by ``AGENTSTREAM_KAFKA_BOOTSTRAP``, if any.

    When set, the launcher never starts or stops anything: the user manages Kafka.
    """
    value = os.environ.get(ENV_BOOTSTRAP, "").strip()
    return value or None


def new_cluster_id() -> str:
    """A fresh KRaft cluster id: base64url of 16 random bytes, unpadded (22 chars).

    This is the format ``kafka-storage random-uuid`` prints; generating it here saves
    one JVM start. Like Kafka's own ``Uuid.randomUuid``, an id starting with "-" is
    drawn again: the storage tool's argument parser would read it as an option (about one
    first start in 64 failed with "--cluster-id: expected one argument").
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cluster_id.startswith("-"):
            return cluster_id


def server_properties(cfg: BrokerConfig) -> dict[str, str]:
    """The full broker configuration for ``cfg``, as ``server.properties`` keys.

    With ``cfg.internal_port`` set, a third listener ``INTERNAL`` carries all
    broker-to-broker traffic, and ``PLAINTEXT`` (advertised as ``advertised_port``)
    only the clients: this is how a proxy in front of the client port sees every
    client connection and none of the replication.
    """
    advertised = cfg.advertised_port if cfg.advertised_port is not None else cfg.port
    listeners = [
        f"PLAINTEXT://{cfg.host}:{cfg.port}",
        f"CONTROLLER://{cfg.host}:{cfg.controller_port}",
    ]
    advertised_listeners = [f"PLAINTEXT://{cfg.host}:{advertised}"]
    protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    inter_broker = "PLAINTEXT"
    if cfg.internal_port is not None:
        listeners.append(f"INTERNAL://{cfg.host}:{cfg.internal_port}")
        advertised_listeners.append(f"INTERNAL://{cfg.host}:{cfg.internal_port}")
        protocols.append("INTERNAL:PLAINTEXT")
        inter_broker = "INTERNAL"
    voters = cfg.quorum_voters or f"{cfg.node_id}@{cfg.host}:{cfg.controller_port}"
    props = {
        "node.id": str(cfg.node_id),
        "process.roles": "broker,controller",
        "controller.quorum.voters": voters,
        "listeners": ",".join(listeners),
        "advertised.listeners": ",".join(advertised_listeners),
        "listener.security.protocol.map": ",".join(protocols),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": inter_broker,
        "log.dirs": str(cfg.data_dir),
    }
    props.update(BROKER_SETTINGS)
    props.update(cfg.extra_settings)
    return props


def write_server_properties(cfg: BrokerConfig) -> Path:
    """Write ``server.properties`` for ``cfg`` (always anew, so config edits apply)."""
    path = cfg.server_properties_file
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Generated by infra/kafka/launcher.py on every start; edits are overwritten.",
        *(f"{key}={_escape_property(value)}" for key, value in server_properties(cfg).items()),
    ]
    _atomic_write(path, "\n".join(lines) + "\n")
    return path


def _escape_property(value: str) -> str:
    # java.util.Properties treats backslashes as escapes (Windows-style paths, mainly).
    return value.replace("\\", "\\\\")


# ----------------------------------------------------------------------------- jars


def kafka_cache_dir(version: str) -> Path:
    """``$XDG_CACHE_HOME/agentstream/kafka-<version>`` (default ``~/.cache/...``)."""
    return cache_home() / f"kafka-{version}"


def _maven_profile(version: str) -> str:
    return "kafka4" if _major(version) >= 4 else "kafka3"


def _jar_marker(version: str) -> str:
    # The pom's hash is part of the marker so that editing the pom refetches the jars.
    pom_hash = hashlib.sha256(POM_FILE.read_bytes()).hexdigest()
    return json.dumps({"version": version, "pom_sha256": pom_hash}, sort_keys=True)


def fetch_jars(version: str = DEFAULT_KAFKA_VERSION, *, force: bool = False) -> Path:
    """Make sure the broker's jars are in the cache and return the ``libs`` folder.

    Cheap when cached (one marker file read).  Otherwise Maven copies the dependency
    closure of ``infra/kafka/pom.xml`` into a temporary folder that is renamed into
    place only when complete, so an interrupted download is never mistaken for a
    good one.
    """
    cache = kafka_cache_dir(version)
    libs = cache / "libs"
    marker = cache / _MARKER_NAME
    expected = _jar_marker(version)
    if not force and _read_text(marker) == expected and libs.is_dir():
        return libs
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / ".lock"):
        if not force and _read_text(marker) == expected and libs.is_dir():
            return libs  # another process fetched them while we waited
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerStartError(
                "Maven ('mvn') is not on PATH; it fetches the Kafka jars "
                "(Debian: apt-get install maven)"
            )
        marker.unlink(missing_ok=True)
        staging = cache / f"libs.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            mvn,
            "-B",
            "-q",
            "-Dstyle.color=never",
            "-f",
            str(POM_FILE),
            f"-Dkafka.version={version}",
            f"-P{_maven_profile(version)}",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_MAVEN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise BrokerStartError(
                f"Maven did not fetch Kafka {version} within {_MAVEN_TIMEOUT_S:.0f}s"
            ) from exc
        jars = list(staging.glob("kafka_2.13-*.jar")) if staging.is_dir() else []
        if done.returncode != 0 or not jars:
            shutil.rmtree(staging, ignore_errors=True)
            output = _tail_text(_ANSI_ESCAPE.sub("", done.stdout + done.stderr), _LOG_TAIL_LINES)
            raise BrokerStartError(
                f"Maven could not fetch Kafka {version} (exit {done.returncode}):\n"
                f"$ {shlex.join(cmd)}\n{output}"
            )
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        _atomic_write(marker, expected)
    return libs


def tool_command(cfg: BrokerConfig, main: str, *args: str, heap: str = "-Xmx256m") -> list[str]:
    """The argv that runs one of Kafka's command-line classes with ``cfg``'s jars.

    For example ``tool_command(cfg, "kafka.admin.AclCommand", "--bootstrap-server",
    ..., "--list")``.  Fetches the jars if needed.  Logging is at WARN on stderr (as
    with Kafka's own ``bin/`` scripts), so stdout carries only the tool's output.
    """
    libs = fetch_jars(cfg.version)
    return _java_command(cfg, libs, heap, main, *args, log_config=_tools_log_config(cfg))


_TOOLS_LOG4J1: Final = """\
# Written by infra/kafka/launcher.py: Kafka's command-line tools log warnings to stderr.
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
"""
_TOOLS_LOG4J2: Final = """\
# Written by infra/kafka/launcher.py: Kafka's command-line tools log warnings to stderr.
status = warn
appender.stderr.type = Console
appender.stderr.name = STDERR
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = STDERR
"""


def _tools_log_config(cfg: BrokerConfig) -> Path:
    """The tools' logging config, written once into the jar cache folder (it is not
    worth a file in the repository for each logging stack)."""
    log4j2 = cfg.major_version >= 4
    path = kafka_cache_dir(cfg.version) / (
        "tools-log4j2.properties" if log4j2 else "tools-log4j.properties"
    )
    text = _TOOLS_LOG4J2 if log4j2 else _TOOLS_LOG4J1
    if _read_text(path) != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, text)
    return path


# ------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class BrokerInfo:
    """One broker as listed in a Metadata response."""

    node_id: int
    host: str
    port: int


@dataclass(frozen=True)
class ClusterMetadata:
    """The part of a Metadata response the launcher cares about."""

    cluster_id: str | None
    controller_id: int
    brokers: tuple[BrokerInfo, ...]


def _split_bootstrap(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",", 1)[0].strip()
    host, sep, port = first.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bootstrap address {bootstrap!r} is not host:port")
    return host.strip("[]") or DEFAULT_HOST, int(port)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            raise ConnectionError("broker closed the connection mid-response")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class _Reader:
    """Sequential decoder for the non-flexible Kafka wire types."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, fmt: str) -> Any:
        values = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += struct.calcsize(fmt)
        return values[0]

    def int32(self) -> int:
        value: int = self._take(">i")
        return value

    def nullable_string(self) -> str | None:
        length: int = self._take(">h")
        if length < 0:
            return None
        raw = self._data[self._pos : self._pos + length]
        if len(raw) != length:
            raise struct.error("string runs past the end of the response")
        self._pos += length
        return raw.decode("utf-8")

    def string(self) -> str:
        value = self.nullable_string()
        if value is None:
            raise struct.error("unexpected null string")
        return value


def probe_metadata(
    bootstrap: str, timeout: float = 2.0, *, ssl_context: ssl.SSLContext | None = None
) -> ClusterMetadata:
    """Send one Kafka Metadata (v4, no topics) request and decode the broker list.

    This is the cheapest request proving that the broker has finished starting: it
    answers only once its socket server accepts requests, and lists itself only once
    it has registered with the controller.  With ``ssl_context`` the request goes over
    TLS (an SSL listener; with a client certificate in the context, an authenticated
    one).  Raises ``OSError`` (``ssl.SSLError`` included) or ``struct.error`` when the
    broker is not (yet) answering properly.
    """
    host, port = _split_bootstrap(bootstrap)
    correlation_id = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
    header = struct.pack(
        f">hhih{len(_CLIENT_ID)}s",
        _METADATA_API_KEY,
        _METADATA_VERSION,
        correlation_id,
        len(_CLIENT_ID),
        _CLIENT_ID,
    )
    body = struct.pack(">ib", 0, 0)  # topics: empty array; allow_auto_topic_creation
    request = header + body
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        sock.settimeout(timeout)
        if ssl_context is not None:
            sock = stack.enter_context(ssl_context.wrap_socket(sock, server_hostname=host))
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        if not 8 <= size <= 16 * 1024 * 1024:
            raise struct.error(f"implausible response size {size}")
        payload = _recv_exact(sock, size)
    reader = _Reader(payload)
    if reader.int32() != correlation_id:
        raise struct.error("correlation id mismatch")
    reader.int32()  # throttle_time_ms
    brokers = []
    for _ in range(reader.int32()):
        node_id = reader.int32()
        broker_host = reader.string()
        broker_port = reader.int32()
        reader.nullable_string()  # rack
        brokers.append(BrokerInfo(node_id, broker_host, broker_port))
    cluster_id = reader.nullable_string()
    controller_id = reader.int32()
    return ClusterMetadata(cluster_id, controller_id, tuple(brokers))


def _is_ready(
    bootstrap: str,
    timeout: float,
    node_id: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    try:
        meta = probe_metadata(bootstrap, timeout=timeout, ssl_context=ssl_context)
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return False
    if node_id is None:
        return bool(meta.brokers)
    return any(b.node_id == node_id for b in meta.brokers)


def wait_ready(
    bootstrap: str,
    timeout: float,
    *,
    node_id: int | None = None,
    abort: Callable[[], bool] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    """Poll ``bootstrap`` with Metadata requests until it lists a broker.

    Returns ``True`` once ready, ``False`` when ``timeout`` seconds pass or when
    ``abort()`` turns true (the launcher passes "the JVM has exited", so a crash is
    reported at once instead of after the full timeout).  ``node_id`` narrows the
    check to one broker; ``ssl_context`` probes a TLS listener (see
    :func:`probe_metadata`).
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        probe_timeout = min(2.0, max(remaining, 0.1))
        if _is_ready(bootstrap, probe_timeout, node_id=node_id, ssl_context=ssl_context):
            return True
        if abort is not None and abort():
            return False
        time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 2, 0.5)


# -------------------------------------------------------------------------- process

#: Brokers started by this interpreter, so that their exit is reaped (no zombies,
#: no "subprocess still running" warnings) and liveness checks are exact.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _read_pid(pid_file: Path) -> int | None:
    text = _read_text(pid_file)
    if text is None:
        return None
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) Kafka broker process."""
    return pid_alive(pid, _CHILDREN, lambda cmdline: b"kafka.Kafka" in cmdline)


def _running_pid(cfg: BrokerConfig) -> int | None:
    pid = _read_pid(cfg.pid_file)
    if pid is not None and _pid_alive(pid):
        return pid
    return None


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # The broker leads its own session; signalling the group also reaches any child.
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _terminate(pid: int, timeout: float) -> bool:
    """SIGTERM, wait up to ``timeout``, then SIGKILL.  True if it exited cleanly."""
    _signal_group(pid, signal.SIGTERM)
    if _wait_exit(pid, timeout):
        return True
    _signal_group(pid, signal.SIGKILL)
    _wait_exit(pid, 10.0)
    return False


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME", "").strip()
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise BrokerStartError("Java ('java') is not on PATH; Kafka needs Java 17+")
    return found


def _java_command(
    cfg: BrokerConfig,
    libs: Path,
    heap: str,
    main: str,
    *args: str,
    log_config: Path | None = None,
) -> list[str]:
    if cfg.major_version >= 4:
        logging = [f"-Dlog4j2.configurationFile={log_config or LOG4J2_CONFIG}"]
    else:
        logging = [f"-Dlog4j.configuration={(log_config or LOG4J1_CONFIG).as_uri()}"]
    return [
        _java(),
        *shlex.split(heap),
        # The JVM options of Kafka's own kafka-run-class.sh.
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        *logging,
        "-cp",
        f"{libs}{os.sep}*",
        main,
        *args,
    ]


def _format_storage(cfg: BrokerConfig, libs: Path, properties: Path) -> None:
    """Format the log dir once; a formatted dir (``meta.properties``) is kept as is."""
    if (cfg.data_dir / "meta.properties").is_file():
        return
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    cmd = _java_command(
        cfg,
        libs,
        "-Xmx256m",
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cfg.cluster_id or new_cluster_id(),
        "-c",
        str(properties),
        "--ignore-formatted",
        *cfg.format_args,
    )
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_FORMAT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerStartError(f"formatting {cfg.data_dir} timed out") from exc
    if done.returncode != 0 or not (cfg.data_dir / "meta.properties").is_file():
        output = _tail_text(done.stdout + done.stderr, _LOG_TAIL_LINES)
        raise BrokerStartError(
            f"formatting {cfg.data_dir} failed (exit {done.returncode}):\n{output}"
        )


def _rotate_log(log_file: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if log_file.stat().st_size > _LOG_ROTATE_BYTES:
            log_file.replace(log_file.with_name(log_file.name + ".1"))


def _log_tail(log_file: Path, lines: int = _LOG_TAIL_LINES) -> str:
    text = _read_text(log_file, errors="replace")
    return _tail_text(text or "", lines) or "(log is empty)"


def _append_log(log_file: Path, message: str) -> None:
    with contextlib.suppress(OSError), log_file.open("a", encoding="utf-8") as log:
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} agentstream: {message} ===\n")


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _port_in_use(host: str, port: int) -> bool:
    """True if something listens on ``host:port`` (a bind test, before starting Kafka).

    SO_REUSEADDR as Kafka itself uses it: connections the previous broker closed linger
    in TIME_WAIT for a minute and must not count as "in use" on a quick restart.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


# ---------------------------------------------------------------------- public api


def start(cfg: BrokerConfig | None = None, *, use_external: bool = True) -> str:
    """Start the local broker (if needed) and return its bootstrap ``host:port``.

    Idempotent: a running broker is reused.  Returns only once the broker answers a
    Metadata request; otherwise raises :class:`BrokerStartError` (with the log tail)
    after killing the half-started JVM.  With ``AGENTSTREAM_KAFKA_BOOTSTRAP`` set,
    nothing is started and that address is returned, unless ``use_external=False``
    (a broker that must be this one, such as the secured test broker).
    """
    external = external_bootstrap() if use_external else None
    if external is not None:
        return external
    cfg = cfg or BrokerConfig.from_env()
    cfg.pid_file.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cfg.pid_file.with_name(cfg.pid_file.name + ".lock")):
        pid = _running_pid(cfg)
        if pid is not None:
            if wait_ready(
                cfg.bootstrap,
                cfg.start_timeout_s,
                node_id=cfg.node_id,
                ssl_context=cfg.probe_context(),
            ):
                return cfg.bootstrap
            raise BrokerStartError(
                f"broker pid {pid} is running but {cfg.bootstrap} does not answer; "
                f"stop it first.\n--- last lines of {cfg.log_file} ---\n"
                f"{_log_tail(cfg.log_file)}"
            )
        cfg.pid_file.unlink(missing_ok=True)  # stale
        _check_ports_free(cfg)
        libs = fetch_jars(cfg.version)
        properties = write_server_properties(cfg)
        _format_storage(cfg, libs, properties)
        return _launch(cfg, libs, properties)


def _check_ports_free(cfg: BrokerConfig) -> None:
    ports = [cfg.port, cfg.controller_port, *cfg.extra_ports]
    if cfg.internal_port is not None:
        ports.append(cfg.internal_port)
    for port in ports:
        if _port_in_use(cfg.host, port):
            raise BrokerStartError(
                f"{cfg.host}:{port} is already in use by another process; pick other "
                f"ports with {ENV_PORT} / {ENV_CONTROLLER_PORT}, or point "
                f"{ENV_BOOTSTRAP} at an existing cluster"
            )


def _launch(cfg: BrokerConfig, libs: Path, properties: Path) -> str:
    proc = _spawn(cfg, libs, properties)
    try:
        ready = wait_ready(
            cfg.bootstrap,
            cfg.start_timeout_s,
            node_id=cfg.node_id,
            abort=lambda: proc.poll() is not None,
            ssl_context=cfg.probe_context(),
        )
    except BaseException:
        _abandon(cfg, proc)
        raise
    if ready:
        return cfg.bootstrap
    raise _start_failure(cfg, proc)


def _start_failure(cfg: BrokerConfig, proc: subprocess.Popen[bytes]) -> BrokerStartError:
    """Kill a broker that did not come up and describe why (with its log tail)."""
    exited = proc.poll()
    _abandon(cfg, proc)
    reason = (
        f"the JVM exited with code {exited}"
        if exited is not None
        else f"it did not answer on {cfg.bootstrap} within {cfg.start_timeout_s:.0f}s"
    )
    return BrokerStartError(
        f"Kafka {cfg.version} failed to start: {reason}.\n"
        f"--- last lines of {cfg.log_file} ---\n{_log_tail(cfg.log_file)}"
    )


def _spawn(cfg: BrokerConfig, libs: Path, properties: Path) -> subprocess.Popen[bytes]:
    """Start the JVM detached and write its pid file; does not wait for readiness."""
    cfg.log_file.parent.mkdir(parents=True, exist_ok=True)
    _rotate_log(cfg.log_file)
    cmd = _java_command(cfg, libs, cfg.heap, "kafka.Kafka", str(properties))
    _append_log(cfg.log_file, f"starting Kafka {cfg.version}: {shlex.join(cmd)}")
    with cfg.log_file.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cfg.data_dir.parent,
            start_new_session=True,  # outlives this process; not hit by the shell's ^C
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    try:
        _atomic_write(cfg.pid_file, f"{proc.pid}\n")
    except BaseException:
        _abandon(cfg, proc)
        raise
    return proc


def _abandon(cfg: BrokerConfig, proc: subprocess.Popen[bytes]) -> None:
    """Kill a half-started broker and forget it."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    _CHILDREN.pop(proc.pid, None)
    cfg.pid_file.unlink(missing_ok=True)


def stop(
    cfg: BrokerConfig | None = None,
    timeout: float = DEFAULT_STOP_TIMEOUT_S,
    *,
    use_external: bool = True,
) -> bool:
    """Stop the broker this launcher started; True if one was running.

    SIGTERM lets Kafka shut down cleanly (it flushes and closes its logs, so the
    next start skips log recovery); SIGKILL follows after ``timeout`` seconds.  An
    external cluster (``AGENTSTREAM_KAFKA_BOOTSTRAP``) is never touched; with it set,
    nothing is stopped unless ``use_external=False``.
    """
    if use_external and external_bootstrap() is not None:
        return False
    cfg = cfg or BrokerConfig.from_env()
    if not cfg.pid_file.parent.is_dir():
        return False
    with _file_lock(cfg.pid_file.with_name(cfg.pid_file.name + ".lock")):
        pid = _running_pid(cfg)
        if pid is None:
            cfg.pid_file.unlink(missing_ok=True)
            return False
        if not _terminate(pid, timeout):
            _append_log(
                cfg.log_file, f"broker pid {pid} ignored SIGTERM for {timeout:.0f}s; killed"
            )
        _CHILDREN.pop(pid, None)
        cfg.pid_file.unlink(missing_ok=True)
        return True


def status(cfg: BrokerConfig | None = None, *, use_external: bool = True) -> dict[str, Any]:
    """Describe the broker without changing anything.

    Keys: ``running`` (a broker process is alive, or the external cluster answers),
    ``ready`` (it answers Metadata requests), ``bootstrap``, ``pid``, ``version``,
    ``data_dir``, ``log_file``, ``external`` and ``cluster_id`` (when ready).
    ``use_external=False`` describes ``cfg``'s local broker even when
    ``AGENTSTREAM_KAFKA_BOOTSTRAP`` is set.
    """
    external = external_bootstrap() if use_external else None
    if external is not None:
        meta = _try_metadata(external)
        return {
            "running": meta is not None,
            "ready": meta is not None,
            "bootstrap": external,
            "pid": None,
            "version": None,
            "data_dir": None,
            "log_file": None,
            "external": True,
            "cluster_id": meta.cluster_id if meta else None,
        }
    cfg = cfg or BrokerConfig.from_env()
    pid = _running_pid(cfg)
    meta = _try_metadata(cfg.bootstrap, cfg.probe_tls) if pid is not None else None
    return {
        "running": pid is not None,
        "ready": meta is not None and any(b.node_id == cfg.node_id for b in meta.brokers),
        "bootstrap": cfg.bootstrap,
        "pid": pid,
        "version": cfg.version,
        "data_dir": str(cfg.data_dir),
        "log_file": str(cfg.log_file),
        "external": False,
        "cluster_id": meta.cluster_id if meta else None,
    }


def _try_metadata(bootstrap: str, probe_tls: ProbeTLS | None = None) -> ClusterMetadata | None:
    try:
        # The context is made here: missing or broken PEM files mean "not ready".
        ssl_context = None if probe_tls is None else probe_tls.context()
        return probe_metadata(bootstrap, timeout=2.0, ssl_context=ssl_context)
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return None


def format_status(info: Mapping[str, Any]) -> str:
    """One human-readable paragraph for a :func:`status` result (CLI output)."""
    if info.get("external"):
        state = "reachable" if info["running"] else "NOT reachable"
        return f"Using external Kafka cluster at {info['bootstrap']} ({state})."
    if not info["running"]:
        return (
            f"Kafka is not running (would listen on {info['bootstrap']}; "
            f"data in {info['data_dir']})."
        )
    readiness = "ready" if info["ready"] else "starting or unresponsive"
    lines = [
        f"Kafka {info['version']} is running ({readiness}) at {info['bootstrap']}, "
        f"pid {info['pid']}.",
        f"  data: {info['data_dir']}",
        f"  log:  {info['log_file']}",
    ]
    if info.get("cluster_id"):
        lines.append(f"  cluster id: {info['cluster_id']}")
    return "\n".join(lines)


# ------------------------------------------------------------------ multi-node clusters

#: ``python -m agentstream.infra.kafka start --nodes N`` default and environment override.
DEFAULT_CLUSTER_NODES: Final = 3
#: Node ``i`` (1-based) uses ports ``base + 4*(i-1)`` .. ``+3``; see :class:`ClusterConfig`.
#: Far from the single broker's 19092 and the test broker's 19192.
DEFAULT_CLUSTER_BASE_PORT: Final = 29092
DEFAULT_CLUSTER_DIR: Final = state_home() / "kafka-cluster"
#: Heap per cluster node.  Three JVMs share a 2-core machine with the tests; 512 MiB
#: holds a test workload with room to spare (the single broker's 1 GiB is for demos).
CLUSTER_NODE_HEAP: Final = "-Xms256m -Xmx512m"
#: Three JVMs starting at once on two cores are slower than one.
DEFAULT_CLUSTER_START_TIMEOUT_S: Final = 150.0
PORTS_PER_NODE: Final = 4
ENV_NODES: Final = "AGENTSTREAM_KAFKA_NODES"
ENV_CLUSTER_BASE_PORT: Final = "AGENTSTREAM_KAFKA_CLUSTER_BASE_PORT"
ENV_CLUSTER_DIR: Final = "AGENTSTREAM_KAFKA_CLUSTER_DIR"
_CLUSTER_ID_FILE: Final = "cluster.id"


def cluster_settings(nodes: int) -> dict[str, str]:
    """Replication and failure-detection settings for a cluster of ``nodes`` brokers.

    Three or more nodes: replication factor 3 everywhere and ``min.insync.replicas=2``
    (an ``acks=all`` write survives the loss of any one node).  Fewer nodes scale both
    down (RF = nodes, min ISR = RF - 1, at least 1).  Failure detection is quicker
    than Kafka's defaults (session 6 s instead of 9 s) so that a killed leader is
    replaced within seconds, yet slow enough not to fence a node on a busy machine.
    """
    rf = max(1, min(nodes, 3))
    min_isr = max(1, rf - 1)
    return {
        "default.replication.factor": str(rf),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(rf),
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(min_isr),
        "share.coordinator.state.topic.replication.factor": str(rf),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "broker.session.timeout.ms": "6000",
        "broker.heartbeat.interval.ms": "1000",
        "replica.lag.time.max.ms": "10000",
    }


@dataclass(frozen=True)
class ClusterConfig:
    """A local KRaft cluster of ``nodes`` combined broker+controller processes.

    Node ids are ``1..nodes`` (Kafka's own broker ids: what metadata, leader and
    coordinator lookups return, and what :func:`kill_node` takes).  Node ``i`` keeps
    everything in ``<root>/node-<i>/`` (``data/``, ``broker.log``, ``broker.pid``,
    ``server.properties``) and uses four consecutive ports from
    ``base_port + 4*(i-1)``:

    ====  ===================================================================
    +0    client listener ``PLAINTEXT`` (what clients use unless ``proxied``)
    +1    KRaft controller listener
    +2    ``INTERNAL`` broker-to-broker listener (only when ``proxied``)
    +3    Toxiproxy listener in front of +0 (only when ``proxied``): advertised
    ====  ===================================================================

    With ``proxied=True`` every broker advertises its proxy port to clients, so
    that every client connection (bootstrap *and* the per-leader connections that
    follow) passes through Toxiproxy, while replication uses the direct
    ``INTERNAL`` listener.  Creating the proxies is up to the caller
    (:mod:`infra.toxiproxy.kafka` does it).
    """

    nodes: int = DEFAULT_CLUSTER_NODES
    base_port: int = DEFAULT_CLUSTER_BASE_PORT
    root: Path = DEFAULT_CLUSTER_DIR
    host: str = DEFAULT_HOST
    version: str = DEFAULT_KAFKA_VERSION
    heap: str = CLUSTER_NODE_HEAP
    start_timeout_s: float = DEFAULT_CLUSTER_START_TIMEOUT_S
    proxied: bool = False
    #: Extra or overriding ``server.properties`` entries for every node.
    extra_settings: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        """Reject impossible layouts before any process starts."""
        _major(self.version)
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes} must be at least 1")
        last = self.base_port + PORTS_PER_NODE * self.nodes - 1
        if not self.base_port > 0 or last > 65535:
            raise ValueError(f"ports {self.base_port}-{last} are out of the range 1-65535")
        if self.start_timeout_s <= 0:
            raise ValueError("start_timeout_s must be positive")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, nodes: int | None = None
    ) -> ClusterConfig:
        """Defaults plus ``AGENTSTREAM_KAFKA_{NODES,CLUSTER_BASE_PORT,CLUSTER_DIR,VERSION}``.

        ``nodes`` (the CLI's ``--nodes``) wins over ``AGENTSTREAM_KAFKA_NODES``.
        """
        env = os.environ if environ is None else environ
        if nodes is None:
            raw = env.get(ENV_NODES, "").strip()
            try:
                nodes = int(raw) if raw else DEFAULT_CLUSTER_NODES
            except ValueError:
                raise ValueError(f"{ENV_NODES}={raw!r} is not a number") from None
        root_env = env.get(ENV_CLUSTER_DIR, "").strip()
        return cls(
            nodes=nodes,
            base_port=_env_port(env, ENV_CLUSTER_BASE_PORT, DEFAULT_CLUSTER_BASE_PORT),
            root=Path(root_env).expanduser().resolve() if root_env else DEFAULT_CLUSTER_DIR,
            version=env.get(ENV_VERSION, "").strip() or DEFAULT_KAFKA_VERSION,
        )

    @property
    def node_ids(self) -> tuple[int, ...]:
        """``(1, ..., nodes)``."""
        return tuple(range(1, self.nodes + 1))

    def _check(self, node_id: int) -> int:
        if node_id not in self.node_ids:
            raise ValueError(f"node {node_id} is not in this cluster (ids {self.node_ids})")
        return self.base_port + PORTS_PER_NODE * (node_id - 1)

    def port(self, node_id: int) -> int:
        """The broker's own client listener (direct, never proxied)."""
        return self._check(node_id)

    def controller_port(self, node_id: int) -> int:
        """The KRaft controller listener of ``node_id``."""
        return self._check(node_id) + 1

    def internal_port(self, node_id: int) -> int:
        """The broker-to-broker listener of ``node_id`` (used only when ``proxied``)."""
        return self._check(node_id) + 2

    def proxy_port(self, node_id: int) -> int:
        """Where the Toxiproxy proxy for ``node_id`` listens (only when ``proxied``)."""
        return self._check(node_id) + 3

    def client_port(self, node_id: int) -> int:
        """The port ``node_id`` advertises to clients: its proxy port when proxied."""
        return self.proxy_port(node_id) if self.proxied else self.port(node_id)

    def node_dir(self, node_id: int) -> Path:
        """``<root>/node-<id>``: data dir, log, pid file and server.properties."""
        self._check(node_id)
        return self.root / f"node-{node_id}"

    @property
    def quorum_voters(self) -> str:
        """``controller.quorum.voters``: every node is a voter."""
        return ",".join(f"{n}@{self.host}:{self.controller_port(n)}" for n in self.node_ids)

    @property
    def bootstrap(self) -> str:
        """Client bootstrap list (through the proxies when ``proxied``)."""
        return ",".join(f"{self.host}:{self.client_port(n)}" for n in self.node_ids)

    @property
    def direct_bootstrap(self) -> str:
        """Bootstrap list of the brokers' own ports (never through a proxy).

        Note that brokers still *advertise* the proxy ports when ``proxied``, so a
        client bootstrapping here is redirected to the proxies after its first request.
        """
        return ",".join(f"{self.host}:{self.port(n)}" for n in self.node_ids)

    def broker(self, node_id: int, cluster_id: str | None = None) -> BrokerConfig:
        """The :class:`BrokerConfig` of node ``node_id`` (1-based)."""
        node_dir = self.node_dir(node_id)
        return BrokerConfig(
            version=self.version,
            data_dir=node_dir / "data",
            host=self.host,
            port=self.port(node_id),
            controller_port=self.controller_port(node_id),
            log_file=node_dir / "broker.log",
            pid_file=node_dir / "broker.pid",
            heap=self.heap,
            start_timeout_s=self.start_timeout_s,
            extra_settings={**cluster_settings(self.nodes), **self.extra_settings},
            node_id=node_id,
            quorum_voters=self.quorum_voters,
            advertised_port=self.proxy_port(node_id) if self.proxied else None,
            internal_port=self.internal_port(node_id) if self.proxied else None,
            cluster_id=cluster_id,
        )


ClusterLike = ClusterConfig | int


def free_port_block(
    count: int,
    start: int = DEFAULT_CLUSTER_BASE_PORT,
    *,
    host: str = DEFAULT_HOST,
    stop: int = 40000,
) -> int:
    """First port ``p >= start`` such that ``p .. p+count-1`` are all free right now.

    For tests and chaos runs that need a cluster layout (``count =
    PORTS_PER_NODE * nodes``) without colliding with another run on the machine.
    Free "right now" only: another process may still take a port before it is used.
    """
    port = start
    while port + count <= stop:
        busy = next((p for p in range(port, port + count) if _port_in_use(host, p)), None)
        if busy is None:
            return port
        port = busy + 1
    raise BrokerStartError(f"no {count} consecutive free ports between {start} and {stop}")


def _as_cluster(
    cluster: ClusterLike, base_port: int | None = None, data_dir: Path | None = None
) -> ClusterConfig:
    if isinstance(cluster, ClusterConfig):
        if base_port is not None or data_dir is not None:
            raise TypeError("pass base_port/data_dir only with a node count, not a ClusterConfig")
        return cluster
    return ClusterConfig(
        nodes=cluster,
        base_port=DEFAULT_CLUSTER_BASE_PORT if base_port is None else base_port,
        root=DEFAULT_CLUSTER_DIR if data_dir is None else Path(data_dir),
    )


def _cluster_id(cluster: ClusterConfig) -> str:
    """The cluster's id: remembered in ``<root>/cluster.id``, else taken from a node's
    ``meta.properties``, else drawn anew (first start)."""
    id_file = cluster.root / _CLUSTER_ID_FILE
    known = (_read_text(id_file) or "").strip()
    if not known:
        for node_id in cluster.node_ids:
            meta = _read_text(cluster.node_dir(node_id) / "data" / "meta.properties") or ""
            found = re.search(r"^cluster\.id=(\S+)", meta, re.MULTILINE)
            if found:
                known = found.group(1)
                break
    if not known:
        known = new_cluster_id()
    cluster.root.mkdir(parents=True, exist_ok=True)
    _atomic_write(id_file, known + "\n")
    return known


def start_cluster(
    cluster: ClusterLike = DEFAULT_CLUSTER_NODES,
    base_port: int | None = None,
    data_dir: Path | None = None,
) -> str:
    """Start every node of a local KRaft cluster and return the client bootstrap list.

    ``start_cluster(3, 29092, Path("var/c"))`` and
    ``start_cluster(ClusterConfig(nodes=3, base_port=29092, root=Path("var/c")))`` are
    the same; use the :class:`ClusterConfig` form (and keep it) to reach the other
    cluster functions.  Idempotent: running nodes are kept, missing ones started.
    Data dirs are formatted on first use with one shared cluster id.  Returns once
    every node lists itself in its Metadata (the quorum has formed and all brokers
    are registered and unfenced); on failure every node this call started is killed
    and :class:`BrokerStartError` carries the failing node's log tail.
    ``AGENTSTREAM_KAFKA_BOOTSTRAP`` is ignored: a cluster is always local.
    """
    cfg = _as_cluster(cluster, base_port, data_dir)
    cfg.root.mkdir(parents=True, exist_ok=True)
    with _file_lock(cfg.root / "cluster.lock"):
        cluster_id = _cluster_id(cfg)
        libs = fetch_jars(cfg.version)
        todo: list[tuple[BrokerConfig, Path]] = []
        for node_id in cfg.node_ids:
            node = cfg.broker(node_id, cluster_id)
            if _running_pid(node) is not None:
                continue
            node.pid_file.unlink(missing_ok=True)  # stale
            _check_ports_free(node)
            todo.append((node, write_server_properties(node)))
        # One JVM per format: run them side by side.
        with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
            for future in [pool.submit(_format_storage, n, libs, p) for n, p in todo]:
                future.result()
        spawned: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for node, properties in todo:
                spawned[node.node_id] = _spawn(node, libs, properties)
            deadline = time.monotonic() + cfg.start_timeout_s
            for node_id in cfg.node_ids:
                node = cfg.broker(node_id, cluster_id)
                proc = spawned.get(node_id)
                ready = wait_ready(
                    node.bootstrap,
                    max(deadline - time.monotonic(), 0.1),
                    node_id=node_id,
                    abort=None if proc is None else _exited(proc),
                )
                if not ready:
                    if proc is None:
                        raise BrokerStartError(
                            f"node {node_id} runs but does not answer on {node.bootstrap}; "
                            f"stop the cluster first.\n--- last lines of {node.log_file} ---\n"
                            f"{_log_tail(node.log_file)}"
                        )
                    raise _start_failure(node, proc)
        except BaseException:
            for node_id, proc in spawned.items():
                _abandon(cfg.broker(node_id), proc)
            raise
    return cfg.bootstrap


def _exited(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: proc.poll() is not None


def stop_cluster(cluster: ClusterLike, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
    """Stop every node (SIGTERM to all at once, SIGKILL after ``timeout``).

    True if any node was running.  Data dirs are kept: a later :func:`start_cluster`
    finds the same topics and records.
    """
    cfg = _as_cluster(cluster)
    if not cfg.root.is_dir():
        return False
    with _file_lock(cfg.root / "cluster.lock"):
        pids: dict[int, int] = {}
        for node_id in cfg.node_ids:
            node = cfg.broker(node_id)
            pid = _running_pid(node)
            if pid is None:
                node.pid_file.unlink(missing_ok=True)
            else:
                pids[node_id] = pid
                _signal_group(pid, signal.SIGCONT)  # a paused node cannot shut down
                _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node_id, pid in pids.items():
            node = cfg.broker(node_id)
            if not _wait_exit(pid, max(deadline - time.monotonic(), 0.0)):
                _signal_group(pid, signal.SIGKILL)
                _wait_exit(pid, 10.0)
                _append_log(node.log_file, f"node {node_id} ignored SIGTERM; killed")
            _CHILDREN.pop(pid, None)
            node.pid_file.unlink(missing_ok=True)
    return bool(pids)


def node_pid(cluster: ClusterLike, node_id: int) -> int | None:
    """The pid of node ``node_id``'s JVM, or ``None`` when it is not running."""
    return _running_pid(_as_cluster(cluster).broker(node_id))


def kill_node(
    cluster: ClusterLike,
    node_id: int,
    sig: signal.Signals = signal.SIGKILL,
    timeout: float = DEFAULT_STOP_TIMEOUT_S,
) -> int | None:
    """Send ``sig`` to node ``node_id``'s process group; returns the pid, or ``None``
    when the node was not running.

    For SIGKILL, SIGTERM and SIGINT it waits until the process is gone (a SIGTERM
    that is ignored for ``timeout`` seconds is followed by SIGKILL) and removes the
    pid file, so :func:`restart_node` can follow at once.  Other signals return
    immediately: ``SIGSTOP`` freezes the node (a "hung broker": sockets stay open,
    nothing answers) and ``SIGCONT`` resumes it.  Takes no lock, so it may be called
    while another thread waits in :func:`restart_node`.
    """
    node = _as_cluster(cluster).broker(node_id)
    pid = _running_pid(node)
    if pid is None:
        return None
    if sig not in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        _signal_group(pid, sig)
        return pid
    if sig != signal.SIGKILL:
        _signal_group(pid, signal.SIGCONT)  # a stopped JVM cannot handle SIGTERM
    _signal_group(pid, sig)
    if not _wait_exit(pid, timeout if sig != signal.SIGKILL else 10.0):
        _signal_group(pid, signal.SIGKILL)
        _wait_exit(pid, 10.0)
    _append_log(node.log_file, f"node {node_id} (pid {pid}) sent {sig.name}")
    _CHILDREN.pop(pid, None)
    node.pid_file.unlink(missing_ok=True)
    return pid


def restart_node(cluster: ClusterLike, node_id: int, timeout: float | None = None) -> int:
    """(Re)start node ``node_id`` and return its new pid once it has rejoined.

    A running node is first stopped with SIGTERM; a killed one is simply started.
    Its data dir is reused (a wiped one is formatted again with the cluster's id).
    Returns when the node answers Metadata listing itself, i.e. it has caught up
    with the metadata log and the controller has unfenced it; partition replicas may
    still be catching up (see :func:`infra.kafka.cluster.wait_for_isr`).  Raises
    :class:`BrokerStartError` with the log tail when it does not rejoin within
    ``timeout`` (default: the cluster's ``start_timeout_s``).  Blocking; from async
    code call it with ``await asyncio.to_thread(restart_node, cfg, i)``.
    """
    cfg = _as_cluster(cluster)
    if node_pid(cfg, node_id) is not None:
        kill_node(cfg, node_id, signal.SIGTERM)
    with _file_lock(cfg.root / "cluster.lock"):
        node = cfg.broker(node_id, _cluster_id(cfg))
        node.pid_file.unlink(missing_ok=True)
        _check_ports_free(node)
        libs = fetch_jars(cfg.version)
        properties = write_server_properties(node)
        _format_storage(node, libs, properties)
        proc = _spawn(node, libs, properties)
    try:
        ready = wait_ready(
            node.bootstrap,
            cfg.start_timeout_s if timeout is None else timeout,
            node_id=node_id,
            abort=lambda: proc.poll() is not None,
        )
    except BaseException:
        _abandon(node, proc)
        raise
    if not ready:
        raise _start_failure(node, proc)
    return proc.pid


def cluster_status(cluster: ClusterLike) -> dict[str, Any]:
    """Describe every node without changing anything.

    Keys: ``bootstrap``, ``running`` (any node alive), ``ready`` (every node alive
    and listed by its own Metadata), ``cluster_id`` and ``nodes``: node id → dict
    with ``pid``, ``ready``, ``port``, ``client_port``, ``log_file``, ``data_dir``.
    """
    cfg = _as_cluster(cluster)
    nodes: dict[int, dict[str, Any]] = {}
    cluster_id = None
    for node_id in cfg.node_ids:
        node = cfg.broker(node_id)
        pid = _running_pid(node)
        meta = _try_metadata(node.bootstrap) if pid is not None else None
        if meta is not None:
            cluster_id = cluster_id or meta.cluster_id
        nodes[node_id] = {
            "pid": pid,
            "ready": meta is not None and any(b.node_id == node_id for b in meta.brokers),
            "port": node.port,
            "client_port": cfg.client_port(node_id),
            "log_file": str(node.log_file),
            "data_dir": str(node.data_dir),
        }
    return {
        "bootstrap": cfg.bootstrap,
        "version": cfg.version,
        "running": any(n["pid"] is not None for n in nodes.values()),
        "ready": all(n["ready"] for n in nodes.values()),
        "cluster_id": cluster_id,
        "nodes": nodes,
    }


def format_cluster_status(info: Mapping[str, Any]) -> str:
    """Human-readable lines for a :func:`cluster_status` result (CLI output)."""
    nodes: Mapping[int, Mapping[str, Any]] = info["nodes"]
    if not info["running"]:
        return f"Kafka cluster is not running (would serve {info['bootstrap']})."
    state = "ready" if info["ready"] else "partly running or unresponsive"
    lines = [
        f"Kafka {info['version']} cluster ({len(nodes)} nodes, {state}) at {info['bootstrap']}"
    ]
    for node_id, node in nodes.items():
        if node["pid"] is None:
            lines.append(f"  node {node_id}: not running (log: {node['log_file']})")
        else:
            readiness = "ready" if node["ready"] else "not answering"
            lines.append(
                f"  node {node_id}: pid {node['pid']}, {readiness}, port {node['port']}, "
                f"log {node['log_file']}"
            )
    if info.get("cluster_id"):
        lines.append(f"  cluster id: {info['cluster_id']}")
    return "\n".join(lines)


# -------------------------------------------------------------------------- helpers


def _read_text(path: Path, errors: str = "strict") -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors=errors)
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: serialises fetches and start/stop across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
