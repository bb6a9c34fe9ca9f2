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
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "BROKER_SETTINGS",
    "DEFAULT_CONTROLLER_PORT",
    "DEFAULT_HEAP",
    "DEFAULT_HOST",
    "DEFAULT_KAFKA_VERSION",
    "DEFAULT_PORT",
    "DEFAULT_START_TIMEOUT_S",
    "DEFAULT_STATE_DIR",
    "ENV_BOOTSTRAP",
    "ENV_CONTROLLER_PORT",
    "ENV_DATA_DIR",
    "ENV_HEAP",
    "ENV_LOG_FILE",
    "ENV_PORT",
    "ENV_VERSION",
    "NODE_ID",
    "REPLICATION_SETTINGS",
    "BrokerConfig",
    "BrokerInfo",
    "BrokerStartError",
    "ClusterMetadata",
    "external_bootstrap",
    "fetch_jars",
    "format_status",
    "kafka_cache_dir",
    "new_cluster_id",
    "probe_metadata",
    "server_properties",
    "start",
    "status",
    "stop",
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
REPO_ROOT: Final = _HERE.parents[1]
POM_FILE: Final = _HERE / "pom.xml"
LOG4J1_CONFIG: Final = _HERE / "log4j.properties"
LOG4J2_CONFIG: Final = _HERE / "log4j2.properties"
#: Gitignored state folder for the development broker.
DEFAULT_STATE_DIR: Final = REPO_ROOT / "var" / "kafka"

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

    def __post_init__(self) -> None:
        """Reject settings Kafka would only fail on later, with a vaguer message."""
        _major(self.version)
        for name, port in (("port", self.port), ("controller_port", self.controller_port)):
            if not 0 < port < 65536:
                raise ValueError(f"{name}={port} is out of the port range 1-65535")
        if self.port == self.controller_port:
            raise ValueError(f"port and controller_port must differ (both {self.port})")
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
        """``host:port`` for clients (the PLAINTEXT listener)."""
        return f"{self.host}:{self.port}"

    @property
    def server_properties_file(self) -> Path:
        """Where the generated broker config lives: next to the data dir."""
        return self.data_dir.parent / "server.properties"

    @property
    def major_version(self) -> int:
        """Kafka major version; it decides the logging stack and Maven profile."""
        return _major(self.version)


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
    """The full broker configuration for ``cfg``, as ``server.properties`` keys."""
    props = {
        "node.id": str(NODE_ID),
        "process.roles": "broker,controller",
        "controller.quorum.voters": f"{NODE_ID}@{cfg.host}:{cfg.controller_port}",
        "listeners": (
            f"PLAINTEXT://{cfg.host}:{cfg.port},CONTROLLER://{cfg.host}:{cfg.controller_port}"
        ),
        "advertised.listeners": f"PLAINTEXT://{cfg.host}:{cfg.port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
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
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base) if base else Path.home() / ".cache"
    return root / "agentstream" / f"kafka-{version}"


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


def probe_metadata(bootstrap: str, timeout: float = 2.0) -> ClusterMetadata:
    """Send one Kafka Metadata (v4, no topics) request and decode the broker list.

    This is the cheapest request proving that the broker has finished starting: it
    answers only once its socket server accepts requests, and lists itself only once
    it has registered with the controller.  Raises ``OSError`` or ``struct.error``
    when the broker is not (yet) answering properly.
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
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
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


def _is_ready(bootstrap: str, timeout: float, node_id: int | None = None) -> bool:
    try:
        meta = probe_metadata(bootstrap, timeout=timeout)
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
) -> bool:
    """Poll ``bootstrap`` with Metadata requests until it lists a broker.

    Returns ``True`` once ready, ``False`` when ``timeout`` seconds pass or when
    ``abort()`` turns true (the launcher passes "the JVM has exited", so a crash is
    reported at once instead of after the full timeout).  ``node_id`` narrows the
    check to one broker.
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if _is_ready(bootstrap, timeout=min(2.0, max(remaining, 0.1)), node_id=node_id):
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
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    proc = Path("/proc") / str(pid)
    if not proc.is_dir():
        return True  # no procfs (macOS): trust the signal check
    stat = _read_text(proc / "stat") or ""
    if stat.rpartition(")")[2].strip().startswith(("Z", "X")):
        return False
    # Guard against pid reuse: the process must still be a Kafka JVM.
    cmdline = (_read_bytes(proc / "cmdline") or b"").split(b"\0")
    return b"kafka.Kafka" in cmdline


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


def _java_command(cfg: BrokerConfig, libs: Path, heap: str, main: str, *args: str) -> list[str]:
    if cfg.major_version >= 4:
        logging = [f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}"]
    else:
        logging = [f"-Dlog4j.configuration={LOG4J1_CONFIG.as_uri()}"]
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
        new_cluster_id(),
        "-c",
        str(properties),
        "--ignore-formatted",
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


def start(cfg: BrokerConfig | None = None) -> str:
    """Start the local broker (if needed) and return its bootstrap ``host:port``.

    Idempotent: a running broker is reused.  Returns only once the broker answers a
    Metadata request; otherwise raises :class:`BrokerStartError` (with the log tail)
    after killing the half-started JVM.  With ``AGENTSTREAM_KAFKA_BOOTSTRAP`` set,
    nothing is started and that address is returned.
    """
    external = external_bootstrap()
    if external is not None:
        return external
    cfg = cfg or BrokerConfig.from_env()
    cfg.pid_file.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cfg.pid_file.with_name(cfg.pid_file.name + ".lock")):
        pid = _running_pid(cfg)
        if pid is not None:
            if wait_ready(cfg.bootstrap, cfg.start_timeout_s, node_id=NODE_ID):
                return cfg.bootstrap
            raise BrokerStartError(
                f"broker pid {pid} is running but {cfg.bootstrap} does not answer; "
                f"stop it first.\n--- last lines of {cfg.log_file} ---\n"
                f"{_log_tail(cfg.log_file)}"
            )
        cfg.pid_file.unlink(missing_ok=True)  # stale
        for port in (cfg.port, cfg.controller_port):
            if _port_in_use(cfg.host, port):
                raise BrokerStartError(
                    f"{cfg.host}:{port} is already in use by another process; pick other "
                    f"ports with {ENV_PORT} / {ENV_CONTROLLER_PORT}, or point "
                    f"{ENV_BOOTSTRAP} at an existing cluster"
                )
        libs = fetch_jars(cfg.version)
        properties = write_server_properties(cfg)
        _format_storage(cfg, libs, properties)
        return _launch(cfg, libs, properties)


def _launch(cfg: BrokerConfig, libs: Path, properties: Path) -> str:
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
        ready = wait_ready(
            cfg.bootstrap,
            cfg.start_timeout_s,
            node_id=NODE_ID,
            abort=lambda: proc.poll() is not None,
        )
    except BaseException:
        _abandon(cfg, proc)
        raise
    if ready:
        return cfg.bootstrap
    exited = proc.poll()
    _abandon(cfg, proc)
    reason = (
        f"the JVM exited with code {exited}"
        if exited is not None
        else f"it did not answer on {cfg.bootstrap} within {cfg.start_timeout_s:.0f}s"
    )
    raise BrokerStartError(
        f"Kafka {cfg.version} failed to start: {reason}.\n"
        f"--- last lines of {cfg.log_file} ---\n{_log_tail(cfg.log_file)}"
    )


def _abandon(cfg: BrokerConfig, proc: subprocess.Popen[bytes]) -> None:
    """Kill a half-started broker and forget it."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    _CHILDREN.pop(proc.pid, None)
    cfg.pid_file.unlink(missing_ok=True)


def stop(cfg: BrokerConfig | None = None, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
    """Stop the broker this launcher started; True if one was running.

    SIGTERM lets Kafka shut down cleanly (it flushes and closes its logs, so the
    next start skips log recovery); SIGKILL follows after ``timeout`` seconds.  An
    external cluster (``AGENTSTREAM_KAFKA_BOOTSTRAP``) is never touched.
    """
    if external_bootstrap() is not None:
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


def status(cfg: BrokerConfig | None = None) -> dict[str, Any]:
    """Describe the broker without changing anything.

    Keys: ``running`` (a broker process is alive, or the external cluster answers),
    ``ready`` (it answers Metadata requests), ``bootstrap``, ``pid``, ``version``,
    ``data_dir``, ``log_file``, ``external`` and ``cluster_id`` (when ready).
    """
    external = external_bootstrap()
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
    meta = _try_metadata(cfg.bootstrap) if pid is not None else None
    return {
        "running": pid is not None,
        "ready": meta is not None and any(b.node_id == NODE_ID for b in meta.brokers),
        "bootstrap": cfg.bootstrap,
        "pid": pid,
        "version": cfg.version,
        "data_dir": str(cfg.data_dir),
        "log_file": str(cfg.log_file),
        "external": False,
        "cluster_id": meta.cluster_id if meta else None,
    }


def _try_metadata(bootstrap: str) -> ClusterMetadata | None:
    try:
        return probe_metadata(bootstrap, timeout=2.0)
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


# -------------------------------------------------------------------------- helpers


def _read_text(path: Path, errors: str = "strict") -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors=errors)
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
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
