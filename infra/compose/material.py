"""Everything the compose profile ``cluster`` mounts, made on the host before ``up``.

    python -m agentstream.infra.compose init  [--dir var/compose]  # make what is missing
    python -m agentstream.infra.compose check [--dir var/compose]  # valid, readable in containers

``init`` never replaces a file that exists.

Layout (``var/`` is ignored by git and by the image build)::

    var/compose/                    0700
      ca-key.pem                    0600  the private CA's key: never mounted, only `init` reads it
      operator.env                        the host CLI's settings for this cluster (no secret)
      secrets/                      0700  one file per compose secret (`COMPOSE_SECRETS`)
        kafka-ca.pem                      the CA certificate: brokers' trust store, clients' CA file
        kafka-keystore-N.p12              broker N's key and certificate chain (PKCS#12)
        kafka-keystore-password           the key stores' password
        kafka-broker-password             SCRAM user `broker` (brokers among themselves)
        kafka-worker-password             SCRAM user `worker` (every worker's kafka.sasl_password)
        kafka.sasl_password               SCRAM user `operator` (the host CLI, via operator.env)
        chain_key.worker-N                worker N's chain key (base64 Ed25519 seed)
        web.cluster_token                 what workers send each other on forwarded lookups
        web.tokens                        the web token index    } `agentstream web token
        prometheus_token                  Prometheus' read token } create`, see docs/deploy.md
        grafana-admin-password            Grafana's admin password

Secret files are named after the credentials-chain entry they hold wherever a program
reads them by entry (``kafka.sasl_password``, ``chain_key.worker-1``, ``web.tokens``), so
the same directory is the host CLI's ``dir`` secret source (operator.env) and
``agentstream web token create`` writes the index where compose mounts it from.

Why the mounted files are mode 0644 inside 0700 directories: compose without Swarm
bind-mounts each secret file as it is, so the containers' own users (brokers uid 1000,
workers 10001, Prometheus 65534, Grafana 472) can only read it through its "other" bits;
the 0700 directories keep the host's other users out. `check` restores those modes after
`agentstream web token create` (the credentials chain writes its files 0600).

Why PKCS#12 key stores rather than PEM files: the apache/kafka image's start script
requires a key store file plus password files as soon as a listener uses TLS, and Kafka
refuses a key store password on a PEM key store.

Why `init` never replaces a file: the brokers hash the SCRAM passwords into their
metadata log when their storage is first formatted, and a new CA or key store password
would lock out running brokers. To start over: ``docker compose ... down -v`` and remove
var/compose.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from agentstream.infra.kafka import tls
from agentstream.streams.signing import (
    SigningError,
    new_private_key,
    private_from_b64,
    private_to_b64,
)

DEFAULT_DIR = Path("var") / "compose"
SECRETS = "secrets"
CA_KEY_FILE = "ca-key.pem"
OPERATOR_ENV_FILE = "operator.env"

#: the profile's brokers (service and host names) and workers, as in docker-compose.kafka.yml
BROKERS = ("cluster-kafka-1", "cluster-kafka-2", "cluster-kafka-3")
WORKERS = ("worker-1", "worker-2", "worker-3")
#: the brokers' listener for containers on the compose network (workers, each other)
INTERNAL_PORT = 29092
#: host ports of the brokers' EXTERNAL listeners (127.0.0.1 only: the host CLI)
EXTERNAL_PORTS = (19097, 19098, 19099)
#: host port of worker-1's web views (127.0.0.1 only: the host CLI's worker calls)
OPERATOR_WEB_PORT = 6067
#: topics the workers create: divisible by 2 and 3 workers, replicated on every broker
TOPIC_PARTITIONS = 6
TOPIC_REPLICATION = 3

SCRAM_MECHANISM = "SCRAM-SHA-512"
#: SCRAM users, created when a broker formats its storage (kafka-broker.sh)
SCRAM_USERS = ("broker", "worker", "operator")
OPERATOR = "operator"
WORKER = "worker"

CA_FILE = "kafka-ca.pem"
KEYSTORE_PASSWORD_FILE = "kafka-keystore-password"  # noqa: S105 - a file name
WEB_TOKENS_FILE = "web.tokens"
CLUSTER_TOKEN_FILE = "web.cluster_token"  # noqa: S105 - a file name
PROMETHEUS_TOKEN_FILE = "prometheus_token"  # noqa: S105 - a file name
GRAFANA_PASSWORD_FILE = "grafana-admin-password"  # noqa: S105 - a file name

CA_DAYS = 3650
CERT_DAYS = 825
#: `check` fails on a broker certificate that expires sooner than this
RENEW_BEFORE = dt.timedelta(days=14)
#: what a SCRAM password may contain: nothing that `kafka-storage format --add-scram`
#: (`[name=...,password=...]`) or a quoted JAAS option would parse differently
_SCRAM_PASSWORD = re.compile(r"[A-Za-z0-9_.~-]{16,}")
#: what a bearer token may contain (RFC 6750 b64token), as the workers check it
_BEARER = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_CLUSTER_TOKEN_CHARS = 32


def keystore_file(broker_index: int) -> str:
    return f"kafka-keystore-{broker_index}.p12"


def scram_password_file(user: str) -> str:
    # the operator's is read by the host CLI as the entry kafka.sasl_password
    return "kafka.sasl_password" if user == OPERATOR else f"kafka-{user}-password"


def chain_key_file(worker: str) -> str:
    return f"chain_key.{worker}"


#: compose secret name -> its file in var/compose/secrets; docker-compose.kafka.yml
#: declares exactly these (tests/unit/test_container_files.py)
COMPOSE_SECRETS: dict[str, str] = {
    "kafka_ca": CA_FILE,
    "kafka_keystore_password": KEYSTORE_PASSWORD_FILE,
    **{f"kafka_keystore_{i}": keystore_file(i) for i in range(1, len(BROKERS) + 1)},
    **{f"kafka_{user}_password": scram_password_file(user) for user in SCRAM_USERS},
    **{f"chain_key_{w.replace('-', '_')}": chain_key_file(w) for w in WORKERS},
    "web_tokens": WEB_TOKENS_FILE,
    "web_cluster_token": CLUSTER_TOKEN_FILE,
    "prometheus_token": PROMETHEUS_TOKEN_FILE,
    "grafana_admin_password": GRAFANA_PASSWORD_FILE,
}
#: made by `agentstream web token create`, not by `init`
MADE_BY_OPERATOR = (WEB_TOKENS_FILE, PROMETHEUS_TOKEN_FILE)


class MaterialError(Exception):
    """The directory holds something `init` must not build on."""


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    #: files whose mode `check` changed
    fixed: list[str] = field(default_factory=list)


# -- files ------------------------------------------------------------------------------
def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file (never replace one), with exactly `mode` whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def read_secret(path: Path) -> str:
    """A secret file's value as the workers' `dir` source reads it (one newline dropped)."""
    text = path.read_text(encoding="utf-8")
    return text.removesuffix("\n").removesuffix("\r")


# -- certificates (the same as the local secured broker's: infra/kafka/tls.py) ----------
def make_ca(
    cn: str = "agentstream compose cluster CA",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    pair = tls.make_ca(cn, days=CA_DAYS)
    return pair.key, pair.cert


def broker_names(host: str) -> list[str]:
    """What a broker's certificate names: its compose host name for the containers, and
    localhost / 127.0.0.1 for the host CLI (EXTERNAL listener) and its own healthcheck."""
    return [host, "localhost", "127.0.0.1"]


def make_broker_cert(
    host: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    # serverAuth and clientAuth: a broker presents the same certificate to the other
    # controllers (the CONTROLLER listener requires client certificates)
    pair = tls.make_cert(tls.CertKey(ca_cert, ca_key), host, broker_names(host), days=CERT_DAYS)
    return pair.key, pair.cert


def keystore_bytes(
    host: str,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    password: str,
) -> bytes:
    """PKCS#12 with PBES2/AES-256 and an HMAC-SHA256 MAC, which Java reads (11.0.12+)."""
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(100_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.encode())
    )
    return pkcs12.serialize_key_and_certificates(host.encode(), key, cert, [ca_cert], encryption)


# -- init -------------------------------------------------------------------------------
def operator_env(root: Path) -> str:
    """Shell lines (no secret) that point the host CLI at the profile's brokers."""
    secrets_dir = (root / SECRETS).resolve()
    values = {
        "AGENTSTREAM_KAFKA_BOOTSTRAP": ",".join(f"127.0.0.1:{p}" for p in EXTERNAL_PORTS),
        "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "AGENTSTREAM_KAFKA_SASL_MECHANISM": SCRAM_MECHANISM,
        "AGENTSTREAM_KAFKA_SASL_USERNAME": OPERATOR,
        "AGENTSTREAM_KAFKA_SSL_CAFILE": str(secrets_dir / CA_FILE),
        # dir first: `web token create` writes the index where compose mounts it from;
        # the admin key stays in the keychain (found there, as the dir has none)
        "AGENTSTREAM_SECRET_SOURCES": "dir,keychain",
        "AGENTSTREAM_SECRETS_DIR": str(secrets_dir),
        "AGENTSTREAM_TOPIC_PARTITIONS": str(TOPIC_PARTITIONS),
        "AGENTSTREAM_TOPIC_REPLICATION": str(TOPIC_REPLICATION),
        "AGENTSTREAM_WEB_PORT": str(OPERATOR_WEB_PORT),
    }
    lines = [
        "# The host CLI against the compose profile `cluster` (docs/deploy.md):",
        f"#   . {root / OPERATOR_ENV_FILE}",
        *(f"export {name}={shlex.quote(value)}" for name, value in values.items()),
    ]
    return "\n".join(lines) + "\n"


def init(root: Path = DEFAULT_DIR) -> list[str]:
    """Make every missing file of `root` (see the module doc); return the names made.

    Raises `MaterialError` rather than build on a half: a CA certificate without its key,
    key stores without their password or CA."""
    secrets_dir = root / SECRETS
    _mkdir(root)
    _mkdir(secrets_dir)
    made: list[str] = []

    def new(path: Path, data: bytes, mode: int = 0o644) -> None:
        _create(path, data, mode)
        made.append(str(path.relative_to(root)))

    ca_cert_path, ca_key_path = secrets_dir / CA_FILE, root / CA_KEY_FILE
    password_path = secrets_dir / KEYSTORE_PASSWORD_FILE
    stores = [secrets_dir / keystore_file(i) for i in range(1, len(BROKERS) + 1)]
    if ca_cert_path.exists() != ca_key_path.exists():
        raise MaterialError(
            f"{ca_cert_path} and {ca_key_path} go together; remove the one left (and every "
            "kafka-keystore-*.p12) to make a new CA"
        )
    existing_stores = [p.name for p in stores if p.exists()]
    if existing_stores and not (ca_cert_path.exists() and password_path.exists()):
        raise MaterialError(
            f"{', '.join(existing_stores)} exist but their CA or password file does not; "
            "remove them to issue new ones"
        )
    if ca_cert_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise MaterialError(f"{ca_key_path} is not the EC key init makes")
        ca_key = loaded
    else:
        ca_key, ca_cert = make_ca()
        new(
            ca_key_path,
            ca_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            mode=0o600,
        )
        new(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    if not password_path.exists():
        new(password_path, secrets.token_hex(24).encode())
    password = read_secret(password_path)
    for host, path in zip(BROKERS, stores, strict=True):
        if not path.exists():
            key, cert = make_broker_cert(host, ca_key, ca_cert)
            new(path, keystore_bytes(host, key, cert, ca_cert, password))
    for user in SCRAM_USERS:
        path = secrets_dir / scram_password_file(user)
        if not path.exists():
            new(path, secrets.token_hex(32).encode())
    for worker in WORKERS:
        path = secrets_dir / chain_key_file(worker)
        if not path.exists():
            new(path, private_to_b64(new_private_key()).encode())
    for name, value in (
        (CLUSTER_TOKEN_FILE, secrets.token_urlsafe(32)),
        (GRAFANA_PASSWORD_FILE, secrets.token_urlsafe(24)),
    ):
        if not (secrets_dir / name).exists():
            new(secrets_dir / name, value.encode())
    if not (root / OPERATOR_ENV_FILE).exists():
        new(root / OPERATOR_ENV_FILE, operator_env(root).encode())
    return made


# -- check ------------------------------------------------------------------------------
def _names_in(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


def _check_keystores(secrets_dir: Path, now: dt.datetime, problems: list[str]) -> None:
    try:
        ca = x509.load_pem_x509_certificate((secrets_dir / CA_FILE).read_bytes())
        password = read_secret(secrets_dir / KEYSTORE_PASSWORD_FILE).encode()
    except (OSError, ValueError) as exc:
        problems.append(f"the CA or the key store password cannot be read: {exc}")
        return
    for i, host in enumerate(BROKERS, 1):
        name = keystore_file(i)
        try:
            key, cert, _chain = pkcs12.load_key_and_certificates(
                (secrets_dir / name).read_bytes(), password
            )
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: cannot be opened with {KEYSTORE_PASSWORD_FILE}: {exc}")
            continue
        if key is None or cert is None:
            problems.append(f"{name}: holds no key and certificate")
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError) as exc:
            problems.append(f"{name}: not issued by {CA_FILE} ({exc})")
        missing = set(broker_names(host)) - _names_in(cert)
        if missing:
            problems.append(f"{name}: its certificate does not name {sorted(missing)}")
        if cert.not_valid_after_utc - now < RENEW_BEFORE:
            problems.append(
                f"{name}: its certificate expires {cert.not_valid_after_utc:%Y-%m-%d}; "
                "remove it and run init to issue a new one"
            )


def _check_values(secrets_dir: Path, problems: list[str]) -> None:
    for user in SCRAM_USERS:
        name = scram_password_file(user)
        if not _SCRAM_PASSWORD.fullmatch(read_secret(secrets_dir / name)):
            problems.append(
                f"{name}: a SCRAM password here is at least 16 of A-Z a-z 0-9 _ . ~ - "
                "(kafka-storage format --add-scram would misread others)"
            )
    for worker in WORKERS:
        name = chain_key_file(worker)
        try:
            private_from_b64(read_secret(secrets_dir / name))
        except SigningError as exc:
            problems.append(f"{name}: {exc}")
    cluster = read_secret(secrets_dir / CLUSTER_TOKEN_FILE)
    if len(cluster) < MIN_CLUSTER_TOKEN_CHARS or not _BEARER.fullmatch(cluster):
        problems.append(
            f"{CLUSTER_TOKEN_FILE}: at least {MIN_CLUSTER_TOKEN_CHARS} characters of "
            "A-Z a-z 0-9 - . _ ~ + /"
        )
    prometheus = read_secret(secrets_dir / PROMETHEUS_TOKEN_FILE)
    if not prometheus or not _BEARER.fullmatch(prometheus):
        problems.append(f"{PROMETHEUS_TOKEN_FILE}: one token value on one line")
    try:
        index = json.loads(read_secret(secrets_dir / WEB_TOKENS_FILE))
        hashes_ = {t["sha256"] for t in index["tokens"]}
        if index.get("format") != "agentstream-web-tokens":
            raise ValueError("not an agentstream web token index")
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"{WEB_TOKENS_FILE}: not a web token index ({exc})")
    else:
        if hashlib.sha256(prometheus.encode()).hexdigest() not in hashes_:
            problems.append(
                f"{PROMETHEUS_TOKEN_FILE}: not a token of {WEB_TOKENS_FILE} (revoked, or "
                "created against another index)"
            )
    if not read_secret(secrets_dir / GRAFANA_PASSWORD_FILE):
        problems.append(f"{GRAFANA_PASSWORD_FILE}: empty")


def check(root: Path = DEFAULT_DIR, *, now: dt.datetime | None = None) -> Report:
    """Every file compose mounts: present, valid, and readable by the containers' users
    (mode 0644 in 0700 directories: modes are fixed and reported in `Report.fixed`)."""
    report = Report()
    secrets_dir = root / SECRETS
    missing = [f for f in COMPOSE_SECRETS.values() if not (secrets_dir / f).is_file()]
    for name in missing:
        how = (
            "`agentstream web token create`, see docs/deploy.md"
            if name in MADE_BY_OPERATOR
            else "`python -m agentstream.infra.compose init`"
        )
        report.problems.append(f"{secrets_dir / name} is missing: made by {how}")
    for directory in (root, secrets_dir):
        if directory.is_dir() and stat.S_IMODE(directory.stat().st_mode) != 0o700:
            os.chmod(directory, 0o700)
            report.fixed.append(f"{directory}: 0700")
    for name in COMPOSE_SECRETS.values():
        path = secrets_dir / name
        if path.is_file() and stat.S_IMODE(path.stat().st_mode) != 0o644:
            os.chmod(path, 0o644)
            report.fixed.append(f"{path}: 0644")
    if missing:
        return report
    _check_keystores(secrets_dir, now or dt.datetime.now(dt.UTC), report.problems)
    _check_values(secrets_dir, report.problems)
    return report


__all__ = [
    "BROKERS",
    "COMPOSE_SECRETS",
    "DEFAULT_DIR",
    "SCRAM_USERS",
    "WORKERS",
    "MaterialError",
    "Report",
    "check",
    "init",
    "read_secret",
]
