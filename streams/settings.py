"""All configuration, read once from the environment into one frozen object.

Every field maps to ``AGENTSTREAM_<FIELD_NAME_UPPER>``; its description is the
documentation (``agentstream config --markdown`` prints it as the table of
docs/configuration.md, which a test keeps equal, and ``agentstream config`` prints the
effective values with secrets masked).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from agentstream.infra.paths import state_home
from agentstream.schemas.errors import PipelineError
from agentstream.streams.record_batches import (
    DEFAULT_MAX_COMPRESSION_RATIO,
    DEFAULT_MAX_DECOMPRESSED_BATCH_BYTES,
)

ENV_PREFIX = "AGENTSTREAM_"

#: the delivery path's setting (`Settings.delivery`): ``native`` (the default) or
#: ``per-record`` (docs/design/batch-delivery.md)
DELIVERY_VAR = "AGENTSTREAM_DELIVERY"
DeliveryPath = Literal["native", "per-record"]
DELIVERY_PATHS: tuple[DeliveryPath, ...] = get_args(DeliveryPath)
#: the settings a test's or bench's worker takes from its caller (`child_environ`): the
#: ones a whole suite or bench run is measured or checked under
CHILD_SETTINGS = (DELIVERY_VAR, "AGENTSTREAM_CONSUMER_MAX_PARTITION_FETCH_BYTES")


def delivery_path(environ: Mapping[str, str]) -> DeliveryPath:
    """The delivery path a worker started with `environ` runs, as the harnesses that
    start workers (bench, fault-injection suite) record it. The worker itself reads its
    validated `Settings.delivery` (`streams.processing.NATIVE_ENABLED`); a value that is
    neither path is refused there, before the worker starts."""
    return "per-record" if environ.get(DELIVERY_VAR, "") == "per-record" else "native"


def native_delivery(environ: Mapping[str, str]) -> bool:
    """Whether a worker started with `environ` runs the native path (`delivery_path`)."""
    return delivery_path(environ) == "native"


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a test's or bench's worker starts from: the caller's without this
    project's settings (the caller sets those for the child), except `CHILD_SETTINGS`,
    so that a whole suite or bench run can be made on either delivery path or with
    another fetch size."""
    return {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX) or k in CHILD_SETTINGS}


#: the producer's request limit (Faust's `producer_max_request_size`, which `create_app`
#: sets to it): a record a worker writes, key, value and the record batch's own headers
#: together, is at most this large
PRODUCER_MAX_REQUEST_BYTES = 1_000_000
#: Kafka's default `max.message.bytes` of a topic, above the producer's limit: the
#: catalogue's topics are created without one of their own (an operator who lowers it
#: on `pipeline.deadletter` below the producer's makes large dead letters fail: the
#: worker cannot read a topic's limit without DescribeConfigs, docs/events.md)
KAFKA_MAX_MESSAGE_BYTES = 1_048_588
#: what the producer's limit leaves for a record's key and value: the rest is for the
#: record batch's headers (aiokafka's estimate for one record is well below it)
RECORD_OVERHEAD = 1024
#: what a dead letter takes besides its original bytes, at most: the envelope, the
#: coordinates, the reason (8,192 characters, each up to 6 bytes JSON-escaped), the topic
#: and consumer names, and a record key of up to `DEADLETTER_KEY_RESERVE` bytes
DEADLETTER_ROOM = 64 * 1024
#: a record key up to this long is kept whole in a dead letter, before the original
#: bytes take the room left (`streams.processing.fit_dead_letter`)
DEADLETTER_KEY_RESERVE = 4096


def deadletter_original_max(max_event_bytes: int) -> int:
    """The most original bytes a dead letter can always carry: in base64 (4/3 of them)
    next to its other fields (`DEADLETTER_ROOM`), it must be an event its readers take
    (`max_event_bytes`) and a record the producer sends."""
    return max(0, (output_limit(max_event_bytes) - DEADLETTER_ROOM) // 4 * 3)


def output_limit(max_event_bytes: int, key_bytes: int = 0) -> int:
    """The most bytes an event a worker writes under a record key of `key_bytes` may
    take: what its readers take (`max_event_bytes`), and with its key what the producer
    sends and a topic of Kafka's default limit stores, less the record batch's headers."""
    sent = min(PRODUCER_MAX_REQUEST_BYTES, KAFKA_MAX_MESSAGE_BYTES) - RECORD_OVERHEAD
    return min(max_event_bytes, sent - key_bytes)


#: the keyring backends AGENTSTREAM_KEYRING_BACKEND may name (`streams.credentials`
#: builds them): here, so that a name off the list is a bad setting like any other, said
#: before a command runs (exit 2), not a credentials failure once the keychain is asked
ENCRYPTED_FILE = "agentstream.streams.credentials.EncryptedFileKeyring"
PLAINTEXT_FILE = "keyrings.alt.file.PlaintextKeyring"
ALT_ENCRYPTED_FILE = "keyrings.alt.file.EncryptedKeyring"

#: the OS keychains: what "unset" may pick, in keyring's priority order
OS_BACKENDS = (
    "keyring.backends.SecretService.Keyring",
    "keyring.backends.libsecret.Keyring",
    "keyring.backends.kwallet.DBusKeyring",
    "keyring.backends.macOS.Keyring",
    "keyring.backends.Windows.WinVaultKeyring",
)
#: everything AGENTSTREAM_KEYRING_BACKEND may name (short aliases or class paths)
KEYRING_BACKENDS: dict[str, str] = {
    "secretservice": OS_BACKENDS[0],
    "libsecret": OS_BACKENDS[1],
    "kwallet": OS_BACKENDS[2],
    "macos": OS_BACKENDS[3],
    "windows": OS_BACKENDS[4],
    "encrypted-file": ENCRYPTED_FILE,
    "keyrings.alt-encrypted": ALT_ENCRYPTED_FILE,
    "plaintext-file": PLAINTEXT_FILE,
    **{path: path for path in (*OS_BACKENDS, ENCRYPTED_FILE, ALT_ENCRYPTED_FILE, PLAINTEXT_FILE)},
}


def keyring_backend_problem() -> str:
    """What is wrong with a keyring backend name off `KEYRING_BACKENDS`."""
    allowed = ", ".join(sorted(k for k in KEYRING_BACKENDS if "." not in k))
    return f"is not on the allow-list ({allowed}, or their class paths)"


#: what AGENTSTREAM_SECRET_SOURCES may name
SECRET_SOURCES = ("keychain", "env", "dir")
#: the agent packages of this distribution, which AGENTSTREAM_AGENTS may name by their
#: short name (`security`); a unit test keeps it equal to the subpackages of `agents/`
BUILTIN_AGENTS = ("audit", "comms", "health", "heartbeat", "llm", "metrics", "security", "system")


class SettingsError(PipelineError):
    """Environment variables hold values the settings cannot accept: the message has one
    line per problem (`problems`), each naming its variable."""

    @property
    def problems(self) -> list[str]:
        """One line per problem; a message of several lines (a parser's excerpt) is one."""
        found = self.context.get("problems")
        if found:
            return list(found)
        return ["; ".join(x.strip() for x in self.message.splitlines() if x.strip())]


def not_a_directory(path: Path) -> Path | None:
    """The first of `path` and its parents that exists, when it is no directory: what
    stops `path` from being a directory, or being made one (None: nothing does)."""
    try:
        for candidate in (path, *path.parents):
            if candidate.exists():
                return None if candidate.is_dir() else candidate
    except OSError:  # not ours to judge (a permission): said when it is used
        return None
    return None


def _directory_problem(variable: str, value: str | Path, path: Path) -> str | None:
    """`VARIABLE='value': not a directory` when `path` (what `value` names) cannot be a
    directory, naming the file in its way when that is a parent."""
    blocker = not_a_directory(path)
    if blocker is None:
        return None
    what = "not a directory" if blocker == path else f"{blocker} is not a directory"
    return f"{variable}={str(value)!r}: {what}"


def state_dir_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """AGENTSTREAM_STATE_DIR (read by `infra.paths`, not a field: the Kafka launcher
    reads it without settings) naming a file: every command that writes state said
    "[Errno 20] Not a directory: '<it>/worker'", naming no variable."""
    env = os.environ if environ is None else environ
    raw = env.get("AGENTSTREAM_STATE_DIR", "").strip()
    if not raw:
        return None
    return _directory_problem("AGENTSTREAM_STATE_DIR", raw, Path(raw).expanduser())


def _bootstrap_ok(bootstrap: str) -> bool:
    """Whether every entry of a bootstrap list is HOST:PORT with a port in 1-65535 and a
    host name the resolver can take (an empty or over-long label, as in `kafka..local`,
    made the connect fail with an IDNA traceback)."""
    entries = [e.strip() for e in bootstrap.split(",")]
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return False
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            return False  # a bare IPv6 address: its port is ambiguous
        if not host.startswith("[") and not _host_name_ok(host):
            return False
    return bool(entries)


def _host_name_ok(host: str) -> bool:
    """What `socket.getaddrinfo` takes: encodable with IDNA, no empty label, each label at
    most 63 characters."""
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        return False
    labels = encoded.rstrip(b".").split(b".")
    return len(encoded) <= 253 and all(0 < len(label) <= 63 for label in labels)


def url_host(host: str) -> str:
    """`host` as a URL's host: an IPv6 literal in brackets (`[::1]`, `[fe80::1%eth0]`).
    Unbracketed, `http://::1:6066` is no URL: its port "1:6066" broke every command."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def worker_root(url: object, *, scheme: str) -> str | None:
    """`url` as the root of a worker's web views, ``scheme://host:port``, or None when it
    is not one: a path, query, fragment or user info, a port that is no port, or another
    scheme than `scheme`. Workers call each other's roots with the cluster token, and no
    other URL (`streams.web_cluster.peer_root`); a worker's own advertised URL is checked
    the same way, so that what it advertises is what the others accept."""
    from yarl import URL

    text = str(url).rstrip("/")
    if "#" in text or "?" in text:
        return None
    try:
        u = URL(text)
        port = u.port
    except (TypeError, ValueError):
        return None
    if (
        u.scheme != scheme
        or not u.host
        or port is None
        or not 0 < port < 65536
        or u.user is not None
        or u.password is not None
        or u.path not in ("", "/")
    ):
        return None
    host = f"[{u.host}]" if ":" in u.host else u.host
    return f"{u.scheme}://{host}:{port}"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- Kafka and the Faust app -------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        default=None,
        description="host:port of an existing Kafka cluster. Unset: the local broker "
        "started by `agentstream kafka start` (127.0.0.1:$AGENTSTREAM_KAFKA_PORT).",
    )
    kafka_port: int = Field(default=19092, ge=1, le=65535, description="Port of the local broker.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description="How every Kafka client (worker, CLI, admin, bench) connects: Kafka's "
        "security.protocol. SSL: TLS (add a client certificate for mTLS); SASL_SSL: "
        "username/password over TLS; SASL_PLAINTEXT: without TLS (testing only).",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None,
        description="SASL mechanism (Kafka's sasl.mechanism); required with SASL_SSL / "
        "SASL_PLAINTEXT. The password is the secret `kafka.sasl_password` from the "
        "credentials chain (AGENTSTREAM_SECRET_SOURCES), never a setting.",
    )
    kafka_sasl_username: str | None = Field(
        default=None, description="SASL username; required with SASL_SSL / SASL_PLAINTEXT."
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None,
        description="PEM file of the CA(s) that signed the brokers' certificates. Unset: the "
        "system trust store (managed services with public certificates).",
    )
    kafka_ssl_certfile: Path | None = Field(
        default=None,
        description="PEM client certificate (chain) for mutual TLS; with "
        "AGENTSTREAM_KAFKA_SSL_KEYFILE. Its key's password, if any, is the secret "
        "`kafka.ssl_key_password`.",
    )
    kafka_ssl_keyfile: Path | None = Field(
        default=None, description="PEM private key of AGENTSTREAM_KAFKA_SSL_CERTFILE."
    )
    kafka_ssl_check_hostname: bool = Field(
        default=True,
        description="Check that a broker's certificate names the host connected to. Turn "
        "off only for brokers reached by an address their certificate does not name.",
    )
    kafka_connect_timeout_s: float = Field(
        default=15.0,
        gt=0,
        le=300.0,
        description="How long a CLI command or client waits for the cluster (connection, "
        "TLS and SASL handshakes, metadata) before it gives up with the cause, and how long "
        "a read of history (replay, audit verify) may go without progress before it gives "
        "up naming the partitions it waits for.",
    )
    app_id: str = Field(
        default="agentstream",
        description="Faust app id: consumer group and prefix of table changelog topics.",
    )
    agents: str = Field(
        default="all",
        description="Comma-separated agents this worker runs (Faust autodiscovery): `all`, "
        "short names of the built-in ones (`security,llm` to split stages over "
        "deployments) or module paths of your own; empty = none.",
    )
    topic_prefix: str = Field(
        default="",
        description="Prefix for every catalogue topic (e.g. `staging.`), to run several "
        "isolated pipelines on one cluster.",
    )
    topic_partitions: int = Field(
        default=4,
        ge=1,
        description="Partitions of the catalogue topics: new ones are created with it, and "
        "existing ones must have it (a worker, `topics create` and `demo` refuse to start "
        "otherwise): tables and each sender's home partition follow it. Topics cannot be "
        "resized in place without moving keys.",
    )
    topic_replication: int = Field(
        default=1, ge=1, description="Replication factor for new topics."
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once",
        description="Faust processing guarantee. exactly_once uses Kafka transactions.",
    )
    delivery: DeliveryPath = Field(
        default="native",
        description="How a worker hands an agent its input. native: the records of each "
        "fetch as lists, straight from the consumer, for an agent that alone reads one "
        "topic (the others stay per record); per-record: one Faust event each, through "
        "Faust's conductor: in the bench about half the native rate on a passthrough and "
        "~10 % less on the policy stage (docs/design/batch-delivery.md).",
    )
    worker_id: str = Field(
        default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}",
        description="Identifies this worker in events it emits (stats, checkpoints).",
    )
    data_dir: Path = Field(
        default_factory=lambda: state_home() / "worker",
        description="Worker state directory (Faust tables' local data, logs); default "
        "`<state>/worker`, where `<state>` is AGENTSTREAM_STATE_DIR, `var/` in a source "
        "checkout, else `$XDG_STATE_HOME/agentstream`.",
    )
    web_host: str = Field(default="127.0.0.1", description="Bind address of the web views.")
    web_port: int = Field(
        default=6066, ge=1, le=65535, description="Port of the web views (/health, /metrics ...)."
    )
    web_enabled: bool = Field(default=True, description="Serve the web views.")
    web_auth: Literal["token", "off"] = Field(
        default="token",
        description="token: every web view but /health (and /ready with "
        "AGENTSTREAM_WEB_READY_PUBLIC) needs `Authorization: Bearer <token>`, a token made "
        "by `agentstream web token create` with scope read or admin (non-GET requests need "
        "admin). off: no authentication (only behind a proxy that does it).",
    )
    web_ready_public: bool = Field(
        default=True,
        description="Answer /ready without a token (orchestrators' readiness probes).",
    )
    web_tls_certfile: Path | None = Field(
        default=None,
        description="PEM certificate (chain) to serve the web views over HTTPS; with "
        "AGENTSTREAM_WEB_TLS_KEYFILE. Unset: plain HTTP.",
    )
    web_tls_keyfile: Path | None = Field(
        default=None, description="PEM private key of AGENTSTREAM_WEB_TLS_CERTFILE."
    )
    web_advertised_url: str | None = Field(
        default=None,
        description="URL the other workers reach this worker's web views at (forwarded "
        "key lookups, cluster-wide views; Faust's canonical_url): scheme://host:port, no "
        "path. Unset: "
        "http://<web_host>:<web_port> (https:// with AGENTSTREAM_WEB_TLS_CERTFILE), with "
        "this machine's host name when web_host is 0.0.0.0 or ::.",
    )
    batch_max: int = Field(
        default=1000, ge=1, description="Max events an agent takes from its stream at once."
    )
    batch_within_s: float = Field(
        default=0.02, gt=0, description="Max seconds an agent waits to fill a batch."
    )
    producer_linger_ms: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="How long the producer waits to fill a batch before sending (Kafka's "
        "linger.ms): throughput against latency. Every hop through the broker can wait this "
        "long; LLM-serving workers are latency-bound and do better with 0-1.",
    )
    consumer_fetch_max_wait_ms: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Longest a fetch waits at the broker for new records (Kafka's "
        "fetch.max.wait.ms). aiokafka keeps one fetch per broker in flight, so a partition "
        "left out of it waits up to this long for its next records; Faust's own 1500 made "
        "LLM requests wait up to 1.5 s.",
    )
    consumer_max_partition_fetch_bytes: int = Field(
        default=4 * 1024 * 1024,
        # at least a whole record batch of a topic's default max.message.bytes: a larger
        # batch comes back only from a fetch's first partition; at most aiokafka's cap on
        # a whole fetch (fetch_max_bytes, 50 MiB), past which a larger value does nothing
        ge=KAFKA_MAX_MESSAGE_BYTES,
        le=50 * 1024 * 1024,
        description="Most bytes one fetch of the worker's consumer takes from a partition, "
        "for its input and changelog topics (Kafka's max.partition.fetch.bytes; table "
        "restore, replay, tail and the client library keep their own). Larger keeps a "
        "worker with a backlog busy between fetches; on the native delivery path each "
        "topic's channel holds up to four fetches, so memory grows with it: in the bench "
        "fetches of ~1 MiB (the least allowed: a batch of Kafka's default max.message.bytes) "
        "cut the pipeline worker's RSS from ~480 to ~330 MB for 3-8 % less throughput.",
    )
    broker_session_timeout_s: float = Field(
        default=10.0,
        ge=6.0,
        le=300.0,
        description="How long the group waits for a silent worker before its partitions "
        "move to the others (Kafka's session.timeout.ms; the broker's "
        "group.min.session.timeout.ms, 6 s by default, is the floor): a kill -9'ed worker's "
        "partitions stall about this long unless it comes back with the same "
        "AGENTSTREAM_GROUP_INSTANCE_ID. Lower fails over faster; a worker whose heartbeats "
        "stop this long (swapping, a stopped VM) is then taken out of the group. Faust's "
        "default is 60.",
    )
    broker_heartbeat_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=100.0,
        description="How often each worker heartbeats to the group (Kafka's "
        "heartbeat.interval.ms): members notice a rebalance at their next heartbeat. Keep "
        "it well under a third of AGENTSTREAM_BROKER_SESSION_TIMEOUT_S.",
    )
    commit_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=3600.0,
        description="How often a worker commits the input offsets of finished batches "
        "(Faust's broker_commit_interval; Kafka Streams' commit.interval.ms). Under "
        "at-least-once, a crash processes again what was finished since the last commit: "
        "up to this long's worth of input. A worker also commits when 10,000 records were "
        "finished since, and before its partitions move to another worker. Under "
        "exactly-once each commit ends a transaction: longer means larger transactions "
        "and outputs visible to read_committed readers later.",
    )
    group_instance_id: str | None = Field(
        default=None,
        description="Static group membership (Kafka's group.instance.id): a worker "
        "restarted with the same id gets its partitions back at once, without a rebalance "
        "and without waiting out the session timeout. Must be unique per worker and stable "
        "across its restarts (e.g. the pod or host name plus a slot); a second worker with "
        "the same id fences the first out. Stopping such a worker does not leave the group "
        "either: its partitions move after the session timeout. Unset: dynamic membership.",
    )
    max_event_bytes: int = Field(
        default=1_000_000, ge=1024, description="Events larger than this are dead-lettered."
    )
    deadletter_max_original_bytes: int = Field(
        default=700_000,
        ge=0,
        description="Original bytes kept in a dead letter; beyond this, or beyond what the "
        "dead letter has room for, they are truncated and the dead letter says so (the "
        "source offset still points at the full record). In base64 (4/3 of them), with up "
        "to 64 KiB of its other fields, they must fit AGENTSTREAM_MAX_EVENT_BYTES and the "
        "producer's 1,000,000-byte requests: a value set above that is refused at start, "
        "the default is lowered to it.",
    )
    max_decompressed_batch_bytes: int = Field(
        default=DEFAULT_MAX_DECOMPRESSED_BATCH_BYTES,
        gt=0,
        description="Most bytes a compressed record batch may decompress to when the worker "
        "or a CLI reader fetches it; a batch beyond it (a compression bomb: a few KB of "
        "zstd can hold gigabytes) is not decompressed further and is an unreadable batch "
        "(dead-lettered by the worker, reported and skipped by the CLI). At the default, a "
        "batch of Kafka's 1 MiB max.message.bytes is refused only if it compresses better "
        "than 64:1; even repetitive JSON events compress about 30:1. Raise it for topics "
        "with a larger max.message.bytes.",
    )
    max_compression_ratio: int = Field(
        default=DEFAULT_MAX_COMPRESSION_RATIO,
        gt=0,
        description="Most times its own size a compressed record batch may decompress to "
        "(any batch may reach 64 KiB) when the worker or a CLI reader fetches it; beyond it "
        "the batch is unreadable, as past AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES. The "
        "decompressed-bytes limit bounds one batch; this bounds what many small batches "
        "can make a reader hold at once, since each of their records waits in a stream "
        "buffer of up to 16,384 records: without it, 3 KB of zstd can be a 60 MiB record. "
        "Full batches of events (each with its own id and time) compress 11:1 (snappy) to "
        "35:1 (gzip); a batch of one event copied hundreds of times reaches 145:1 with zstd "
        "and is refused at the default.",
    )
    event_loop: Literal["asyncio", "uvloop"] = Field(
        default="asyncio",
        description="Event loop of the worker: uvloop (libuv) costs less per socket read and "
        "callback; LLM-serving workers, bound by their event loop, gain most (docs/llm.md).",
    )
    log_level: str = Field(default="WARNING", description="Log level of the worker.")
    log_file: Path | None = Field(
        default=None, description="Also log to this file (rotated by size and age)."
    )
    log_max_bytes: int = Field(default=10_000_000, description="Rotate the log file at this size.")
    log_max_age_s: float = Field(default=86_400, description="Rotate the log file at this age.")
    log_backups: int = Field(default=5, ge=0, description="Compressed rotated log files kept.")

    # -- security ------------------------------------------------------------------------
    security_enabled: bool = Field(
        default=True, description="Initial security switch until a config event is published."
    )
    security_default_action: Literal["allow", "deny"] = Field(
        default="deny", description="Initial default action until a config event is published."
    )
    security_admin_keys: str = Field(
        default="",
        description="Admin public keys whose signature a rule change (policy, config, "
        "identity, worker key) must carry to be applied: `id=base64,...` (Ed25519, as "
        "printed by `agentstream admin keygen`). Unset: no change is applied (fail closed).",
    )
    security_admin_key_id: str = Field(
        default="admin",
        description="The admin key the CLI signs rule changes with (private key in the "
        "keychain entry `admin_key.<id>`).",
    )
    chain_key_id: str = Field(
        default="worker",
        description="The key this worker signs hash chains with (private key in the keychain "
        "entry `chain_key.<id>`; public key on security.worker_keys).",
    )
    secret_sources: str = Field(
        default="keychain",
        description="Where secrets are looked up, in this order (comma-separated): "
        "`keychain` (the OS keychain or AGENTSTREAM_KEYRING_BACKEND), `env` (variables "
        "AGENTSTREAM_SECRET_<ENTRY>, the entry name upper-cased with every other character "
        "as `_`), `dir` (one file per entry in AGENTSTREAM_SECRETS_DIR, e.g. Docker or "
        "Kubernetes secrets). A secret found in none of them is missing: fail closed.",
    )
    secrets_dir: Path = Field(
        default=Path("/run/secrets"),
        description="The `dir` secret source: the file `<dir>/<entry>` holds the secret "
        "(one trailing newline ignored).",
    )
    keyring_service: str = Field(
        default="agentstream", description="Service name under which secrets live in the keychain."
    )
    keyring_backend: str | None = Field(
        default=None,
        description="Keyring backend class (must be on the allow-list); unset = the OS default.",
    )
    keyring_file: Path | None = Field(
        default=None, description="Path of the file for file-based keyring backends."
    )
    keyring_password: SecretStr | None = Field(
        default=None, description="Master password of an encrypted file keyring (secret)."
    )

    # -- LLM -------------------------------------------------------------------------------
    llm_providers_file: Path | None = Field(
        default=None, description="YAML/JSON file declaring providers (see docs/llm.md)."
    )
    llm_default_provider: str = Field(
        default="local", description="Provider used when a request names none."
    )
    llm_max_concurrency: int = Field(default=64, ge=1, description="In-flight calls per provider.")
    llm_max_attempts: int = Field(default=4, ge=1, description="Attempts per provider and request.")
    llm_backoff_base_s: float = Field(default=0.2, gt=0, description="First retry delay.")
    llm_backoff_max_s: float = Field(default=10.0, gt=0, description="Largest retry delay.")
    llm_timeout_s: float = Field(default=60.0, gt=0, description="Per-attempt HTTP timeout.")
    llm_breaker_failures: int = Field(default=5, ge=1, description="Failures that open a breaker.")
    llm_breaker_window_s: float = Field(
        default=30.0, gt=0, description="Window for counting failures."
    )
    llm_breaker_reset_s: float = Field(default=15.0, gt=0, description="Open time before a probe.")
    llm_chunk_coalesce_ms: float = Field(
        default=5.0,
        ge=0,
        le=1000,
        description="Deltas of one request arriving within this many ms of the last llm.chunk "
        "sent are merged into the next one (0: one chunk event per delta).",
    )
    llm_dedup_retention_s: float = Field(
        default=86400.0,
        ge=0,
        description="How long a request id stays in the llm_responses_done / llm_cancelled "
        "tables after its response or cancellation (event time): a redelivery or a "
        "republished request within it is not called again. 0: kept forever (the tables "
        "then grow with every request).",
    )
    web_search_url: str | None = Field(
        default=None, description="JSON web search endpoint (e.g. SearxNG /search) for the adapter."
    )

    # -- monitoring ----------------------------------------------------------------------
    heartbeat_interval_s: float = Field(default=5.0, gt=0, description="Heartbeat check interval.")
    heartbeat_timeout_s: float = Field(
        default=15.0, gt=0, description="Silence that marks an agent down."
    )
    heartbeat_max_missed: int = Field(
        default=3, ge=1, description="Missed intervals that mark it down."
    )
    heartbeat_expire_s: float = Field(
        default=7 * 86400.0,
        gt=0,
        description=(
            "An agent with no heartbeat for this long (by its partition's newest append "
            "time) is removed from the agent table; at least 10 times the timeout plus "
            "the interval."
        ),
    )
    heartbeat_max_agents_per_partition: int = Field(
        default=100_000,
        ge=1,
        description=(
            "Agents the agent table holds per partition of agent.heartbeats: a heartbeat "
            "of a new agent id beyond it is refused (a dead letter)."
        ),
    )
    metrics_collection_interval_s: float = Field(
        default=10.0, gt=0, description="Metrics window size."
    )
    metrics_retention_s: float = Field(
        default=3600.0, gt=0, description="How long metric windows are kept."
    )
    metrics_export_max_series: int = Field(
        default=1000,
        ge=0,
        description=(
            "At most this many series and label sets in `agentstream_series_last_value` "
            "on a worker's `/metrics` (the rest are counted in "
            "`agentstream_series_export_dropped`)."
        ),
    )
    metrics_max_series_per_partition: int = Field(
        default=10_000,
        ge=1,
        description=(
            "Series and label sets the metrics table holds per partition of "
            "metrics.samples: a sample of a new one beyond it is refused (a dead letter)."
        ),
    )
    system_monitoring_interval_s: float = Field(
        default=15.0, gt=0, description="SystemStats period."
    )
    comms_retention_s: float = Field(
        default=7 * 86400.0, gt=0, description="Comms records retention."
    )
    comms_max_agents_per_partition: int = Field(
        default=100_000,
        ge=1,
        description=(
            "Agents the comms table holds per partition of comms.records: a record of a "
            "new agent id beyond it is refused (a dead letter)."
        ),
    )
    ready_max_lag: int = Field(
        default=10_000, ge=0, description="Consumer lag above which /ready fails."
    )

    # -- recovery / audit ----------------------------------------------------------------
    checkpoint_interval_s: float = Field(
        default=60.0, gt=0, description="Periodic checkpoint period."
    )
    standby_replicas: int = Field(default=1, ge=0, description="Faust table standby replicas.")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        # one clear line at start, not a handshake failure minutes later; every rule
        # broken is told at once (`from_env` makes each line its own problem)
        problems: list[str] = []
        if self.kafka_security_protocol.startswith("SASL_"):
            for name in ("kafka_sasl_mechanism", "kafka_sasl_username"):
                if not getattr(self, name):
                    problems.append(
                        f"{self.env_name(name)} is required with "
                        f"AGENTSTREAM_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}"
                    )
        for cert, key, what in (
            ("kafka_ssl_certfile", "kafka_ssl_keyfile", "a client certificate"),
            ("web_tls_certfile", "web_tls_keyfile", "the web server's certificate"),
        ):
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                problems.append(
                    f"{self.env_name(cert)} and {self.env_name(key)} go together ({what} "
                    "and its key)"
                )
        try:
            agent_modules(self.agents)
        except ValueError as exc:
            problems.append(f"AGENTSTREAM_AGENTS={self.agents!r}: {exc}")
        sources = self.secret_source_list
        bad = [x for x in sources if x not in SECRET_SOURCES]
        if bad or not sources or len(set(sources)) != len(sources):
            problems.append(
                f"AGENTSTREAM_SECRET_SOURCES={self.secret_sources!r}: a comma-separated "
                f"order of {', '.join(SECRET_SOURCES)}, each at most once"
            )
        keychain = "keychain" in self.secret_source_list
        if (
            keychain
            and self.keyring_backend
            and self.keyring_backend.strip() not in KEYRING_BACKENDS
        ):
            # else every command using the keychain failed with a CredentialsError, exit
            # 1; without the keychain among the sources the backend is never resolved
            # (a container's setting left from elsewhere does not matter)
            problems.append(
                f"AGENTSTREAM_KEYRING_BACKEND={self.keyring_backend!r}: {keyring_backend_problem()}"
            )
        state = state_dir_problem()
        if state is not None:
            problems.append(state)
        data = _directory_problem("AGENTSTREAM_DATA_DIR", self.data_dir, self.data_dir)
        if data is not None and (state is None or "data_dir" in self.model_fields_set):
            # else "the app cannot be built ...: [Errno 17] File exists" (or 20, Not a
            # directory) naming no setting; below a bad state dir, that one is the cause
            problems.append(data)
        if "dir" in self.secret_source_list:
            # else "secret source dir failed: NotADirectoryError" on every secret
            secrets = _directory_problem(
                "AGENTSTREAM_SECRETS_DIR", self.secrets_dir, self.secrets_dir
            )
            if secrets is not None:
                problems.append(secrets)
        if self.kafka_bootstrap is not None and not _bootstrap_ok(self.kafka_bootstrap):
            # else a raw ValueError deep in a client (TLS and SASL probes read the port)
            problems.append(
                f"AGENTSTREAM_KAFKA_BOOTSTRAP={self.kafka_bootstrap!r}: comma-separated "
                "HOST:PORT pairs, each host a valid name (no empty label, none over 63 "
                "characters) and each port a number from 1 to 65535 (IPv6: [ADDRESS]:PORT)"
            )
        if "deadletter_max_original_bytes" in self.model_fields_set:
            # a dead letter is fitted to what its readers take and the producer sends:
            # a cap it can never reach would be cut without a word
            most = deadletter_original_max(self.max_event_bytes)
            if self.deadletter_max_original_bytes > most:
                problems.append(
                    "AGENTSTREAM_DEADLETTER_MAX_ORIGINAL_BYTES="
                    f"{self.deadletter_max_original_bytes}: a dead letter carries the "
                    "original bytes in base64 (4/3 of them) next to up to 64 KiB of other "
                    f"fields, and must fit AGENTSTREAM_MAX_EVENT_BYTES={self.max_event_bytes} "
                    f"and the producer's {PRODUCER_MAX_REQUEST_BYTES}-byte requests: set it "
                    f"to at most {most}"
                )
        floor = 10 * (self.heartbeat_timeout_s + self.heartbeat_interval_s)
        if self.heartbeat_expire_s < floor:
            # an agent must be published down (timeout, plus a check) long before its
            # entry goes, or it would go without its "down" ever being decided
            problems.append(
                f"AGENTSTREAM_HEARTBEAT_EXPIRE_S={self.heartbeat_expire_s:g}: at least 10 "
                "times AGENTSTREAM_HEARTBEAT_TIMEOUT_S plus AGENTSTREAM_HEARTBEAT_INTERVAL_S "
                f"({floor:g})"
            )
        if self.web_advertised_url is not None:
            scheme = "https" if self.web_tls_certfile else "http"
            if worker_root(self.web_advertised_url, scheme=scheme) is None:
                problems.append(
                    f"AGENTSTREAM_WEB_ADVERTISED_URL={self.web_advertised_url!r}: "
                    f"{scheme}://HOST:PORT, the root of this worker's views (no path, "
                    "query or user; https with AGENTSTREAM_WEB_TLS_CERTFILE): the other "
                    "workers call no other URL"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def agent_modules(self) -> list[str]:
        """The modules Faust's autodiscovery imports for AGENTSTREAM_AGENTS."""
        return agent_modules(self.agents)

    @property
    def secret_source_list(self) -> list[str]:
        return [x.strip() for x in self.secret_sources.split(",") if x.strip()]

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @classmethod
    def env_name(cls, field: str) -> str:
        return ENV_PREFIX + field.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """The settings of `environ` (default: the process environment), or one
        `SettingsError` listing every problem, one line per variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(cls.env_name(name))
            if raw is not None and raw != "":
                values[name] = raw
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems, fields = cls._problems(values, exc)
        raise SettingsError("\n".join(problems), field=fields[0], problems=problems) from None

    @classmethod
    def _problems(cls, values: dict[str, Any], exc: ValidationError) -> tuple[list[str], list[str]]:
        """Every problem of `values`, one line each, and the fields they concern ("?" for
        a rule across fields).

        Pydantic checks the rules across fields (`_consistent`) only once every field is
        valid, so the fields found bad are dropped and the rest validated again: a user
        fixing one variable should not discover the next one only on the next run."""
        problems: list[str] = []
        fields: list[str] = []
        pending = dict(values)
        error: ValidationError | None = exc
        while error is not None:
            errors = error.errors(include_url=False)
            bad = [e for e in errors if e["loc"]]
            if not bad:  # rules across fields: `_consistent`'s lines
                for e in errors:
                    for line in str(e["msg"]).removeprefix("Value error, ").splitlines():
                        # a rule about a variable already reported bad says nothing new
                        if not any(cls.env_name(f) in line for f in fields):
                            problems.append(line)
                            fields.append("?")
                break
            for e in bad:
                field = str(e["loc"][0])
                if field in fields:  # one line per variable
                    continue
                fields.append(field)
                problems.append(cls._field_problem(field, pending.pop(field, None), e["msg"]))
            try:
                cls.model_validate(pending)
                error = None
            except ValidationError as again:
                error = again
        return problems, fields

    @classmethod
    def _field_problem(cls, field: str, raw: Any, msg: str) -> str:
        info = cls.model_fields.get(field)
        secret = info is not None and "SecretStr" in str(info.annotation)
        shown = "" if secret or raw is None else f"={str(raw)[:80]!r}"
        return f"{cls.env_name(field)}{shown}: {msg}"

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, effective value, description); secrets masked."""
        rows = []
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            shown = (
                "**********"
                if isinstance(value, SecretStr)
                else ("" if value is None else str(value))
            )
            rows.append((self.env_name(name), shown, info.description or ""))
        return rows


def agent_modules(raw: str) -> list[str]:
    """Module paths of an AGENTSTREAM_AGENTS value: `all` is every built-in agent,
    a short name one of them, anything else a module path of the user's. ValueError for a
    path under the top-level name `agents`: that is the OpenAI Agents SDK's import name
    (ours is `agentstream.agents`), and importing it would load the wrong package."""
    modules: list[str] = []
    for name in (x.strip() for x in raw.split(",")):
        if not name:
            continue
        if name == "all":
            modules.append("agentstream.agents")
        elif name in BUILTIN_AGENTS:
            modules.append(f"agentstream.agents.{name}")
        elif name.split(".")[0] == "agents":
            short = name.split(".")[1] if name.count(".") == 1 else ""
            hint = f"`{short}`" if short in BUILTIN_AGENTS else "`all` or a short name"
            raise ValueError(
                f"{name!r} is not an agentstream module (the built-in agents are "
                f"`agentstream.agents.*`): write {hint}"
            )
        elif "." not in name and importlib.util.find_spec(name) is None:
            # a top-level name is looked up without importing anything: a typo of a
            # built-in's name is told here, not as an ImportError in the worker's start
            close = difflib.get_close_matches(name, BUILTIN_AGENTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"no agent or module {name!r} (built-in: all, {', '.join(BUILTIN_AGENTS)}){hint}"
            )
        else:
            modules.append(name)
    return modules


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; tests build their own with `from_env`)."""
    return Settings.from_env()
