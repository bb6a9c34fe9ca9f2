"""The secured test broker (infra/kafka/secured.py) lets in exactly who it should.

Against the session's `secured_kafka` broker, with plain aiokafka clients: SCRAM-SHA-256
and -512 over SASL_SSL and client certificates over mutual TLS work; a wrong password,
an unknown mechanism, a certificate of another CA, no certificate, and plaintext are
refused, promptly; ACLs are enforced (a user without ACLs may do nothing, Kafka's own
AclCommand grants rights, and a certificate's CN is its principal). One test runs a
broker of its own to check the lifecycle: a cold start, a restart that keeps users and
certificates, and a user added to a formatted broker.

The first tests need no JVM; the ones marked ``integration`` use brokers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import stat
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from agentstream.infra.kafka import launcher, tls
from agentstream.infra.kafka.launcher import BrokerStartError
from agentstream.infra.kafka.secured import BROKER_PRINCIPAL, SecuredKafka

#: A refused client must learn it within this many seconds, never hang.
REFUSAL_BOUND_S = 10.0


def _sasl(kafka: SecuredKafka, user: str, mechanism: str, password: str | None = None) -> dict:
    return {
        "bootstrap_servers": kafka.sasl_ssl_bootstrap,
        "security_protocol": "SASL_SSL",
        "ssl_context": create_ssl_context(cafile=kafka.ca_file),
        "sasl_mechanism": mechanism,
        "sasl_plain_username": user,
        "sasl_plain_password": kafka.password(user) if password is None else password,
    }


def _mtls(kafka: SecuredKafka, principal: str) -> dict:
    cert, key = kafka.client_cert(principal)
    return {
        "bootstrap_servers": kafka.ssl_bootstrap,
        "security_protocol": "SSL",
        "ssl_context": create_ssl_context(cafile=kafka.ca_file, certfile=cert, keyfile=key),
    }


def _properties(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


async def _produce(opts: dict, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(**opts, request_timeout_ms=10000)
    await asyncio.wait_for(producer.start(), 20)
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, value), 20)
    finally:
        await producer.stop()


async def _consume_one(opts: dict, topic: str, value: bytes) -> None:
    """Read partition 0 from the start (no group: a group would need its own ACL) until
    ``value`` shows up."""
    consumer = AIOKafkaConsumer(**opts, enable_auto_commit=False, request_timeout_ms=10000)
    await asyncio.wait_for(consumer.start(), 20)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=1000)
            if any(r.value == value for r in batches.get(tp, [])):
                return
        raise AssertionError(f"{value!r} never arrived on {topic}")
    finally:
        await consumer.stop()


async def _refused(opts: dict) -> tuple[BaseException, float]:
    """Start a producer that must be refused; the error and how long it took."""
    producer = AIOKafkaProducer(**opts, request_timeout_ms=5000)
    began = time.monotonic()
    try:
        await asyncio.wait_for(producer.start(), REFUSAL_BOUND_S)
    except (KafkaConnectionError, TimeoutError) as exc:
        return exc, time.monotonic() - began
    finally:
        await producer.stop()
    raise AssertionError(f"{opts['bootstrap_servers']} let the client in")


def _acl(kafka: SecuredKafka, *args: str) -> str:
    """Run Kafka's own AclCommand as admin (SASL_SSL) and return its stdout."""
    argv = kafka.java_class_command(
        "kafka.admin.AclCommand",
        "--bootstrap-server",
        kafka.sasl_ssl_bootstrap,
        "--command-config",
        str(kafka.admin_command_config()),
        *args,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
async def topic(secured_kafka: SecuredKafka) -> AsyncIterator[str]:
    """A fresh topic made by admin (SCRAM-SHA-512), deleted afterwards."""
    name = f"secured-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(**_sasl(secured_kafka, "admin", "SCRAM-SHA-512"))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1)])
        yield name
    finally:
        with contextlib.suppress(Exception):  # cleanup must not hide the test's result
            await admin.delete_topics([name])
        await admin.close()


# ------------------------------------------------------------------ no JVM needed


def test_no_listener_is_plaintext_and_only_admin_and_broker_are_super(tmp_path: Path) -> None:
    kafka = SecuredKafka(tmp_path, port_base=29492)
    props = launcher.server_properties(kafka.config)
    protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
    assert protocols == {"MTLS": "SSL", "SASL_SSL": "SASL_SSL", "CONTROLLER": "SSL"}
    named = {entry.split("://")[0] for entry in props["listeners"].split(",")}
    assert named == set(protocols)
    assert props["inter.broker.listener.name"] == "MTLS"
    assert props["listener.name.mtls.ssl.client.auth"] == "required"
    assert props["listener.name.controller.ssl.client.auth"] == "required"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-256,SCRAM-SHA-512"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert set(props["super.users"].split(";")) == {"User:admin", f"User:{BROKER_PRINCIPAL}"}
    assert props["ssl.principal.mapping.rules"] == "RULE:^CN=([^,]+).*$/$1/,DEFAULT"


def test_names_that_could_become_super_users_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        SecuredKafka(tmp_path, port_base=29492, users=("worker", BROKER_PRINCIPAL))
    kafka = SecuredKafka(tmp_path, port_base=29492)
    for bad in (BROKER_PRINCIPAL, "a,CN=admin", "x]", ""):
        with pytest.raises(ValueError):
            kafka.client_cert(bad)


@pytest.mark.xdist_group("own-kafka")  # free_port_block(start=39092), as own_broker
def test_busy_port_is_a_clear_start_error(tmp_path: Path) -> None:
    base = launcher.free_port_block(3, start=39092)
    with socket.socket() as busy:
        # As the launcher's own check does: a port left in TIME_WAIT is free.
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind((launcher.DEFAULT_HOST, base + 1))  # the SASL_SSL listener's port
        busy.listen()
        sasl_port = base + 1
        kafka = SecuredKafka(tmp_path / "k", port_base=base)
        with pytest.raises(BrokerStartError, match=f"{sasl_port} is already in use"):
            kafka.start()
    assert not kafka.running()


def test_cli_reports_a_secured_broker_that_is_not_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from agentstream.infra.kafka import __main__ as cli

    monkeypatch.setattr(cli, "DEFAULT_SECURED_DIR", tmp_path / "secured")
    monkeypatch.setenv(cli.ENV_SECURED_PORT, "29492")
    assert cli.main(["status", "--secured", "--json"]) == 3  # LSB "not running"
    info = json.loads(capsys.readouterr().out)
    assert info["running"] is False
    assert info["ssl_bootstrap"] == "127.0.0.1:29492"
    assert info["sasl_ssl_bootstrap"] == "127.0.0.1:29493"
    assert not (tmp_path / "secured").exists(), "status must not create anything"
    assert cli.main(["start", "--secured", "--nodes", "3"]) == 2  # a usage mistake
    assert capsys.readouterr().err == "Error: --secured runs a single broker: drop --nodes\n"


# ------------------------------------------------------------ the session's broker


@pytest.mark.integration
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256"])
async def test_admin_round_trip_over_sasl_ssl(
    secured_kafka: SecuredKafka, topic: str, mechanism: str
) -> None:
    opts = _sasl(secured_kafka, "admin", mechanism)
    value = f"sasl {mechanism}".encode()
    await _produce(opts, topic, value)
    await _consume_one(opts, topic, value)


@pytest.mark.integration
async def test_admin_round_trip_over_mutual_tls(secured_kafka: SecuredKafka, topic: str) -> None:
    opts = _mtls(secured_kafka, "admin")
    await _produce(opts, topic, b"mtls")
    await _consume_one(opts, topic, b"mtls")


@pytest.mark.integration
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256"])
async def test_wrong_password_is_refused_at_once(
    secured_kafka: SecuredKafka, mechanism: str
) -> None:
    host, port = secured_kafka.sasl_ssl_bootstrap.split(":")
    began = time.monotonic()
    # One connection shows the broker's verdict; aiokafka's bootstrap only logs it.
    with pytest.raises(SaslAuthenticationFailed):
        await asyncio.wait_for(
            create_conn(
                host,
                int(port),
                security_protocol="SASL_SSL",
                ssl_context=create_ssl_context(cafile=secured_kafka.ca_file),
                sasl_mechanism=mechanism,
                sasl_plain_username="worker",
                sasl_plain_password=secured_kafka.password("worker") + "x",
            ),
            REFUSAL_BOUND_S,
        )
    assert time.monotonic() - began < 5
    exc, took = await _refused(
        _sasl(secured_kafka, "admin", mechanism, password=secured_kafka.password("worker"))
    )
    assert isinstance(exc, KafkaConnectionError), exc
    print(f"wrong {mechanism} password: direct refusal and client refusal in {took:.2f}s")


@pytest.mark.integration
async def test_plain_mechanism_is_not_enabled(secured_kafka: SecuredKafka) -> None:
    host, port = secured_kafka.sasl_ssl_bootstrap.split(":")
    with pytest.raises(UnsupportedSaslMechanismError):
        await asyncio.wait_for(
            create_conn(
                host,
                int(port),
                security_protocol="SASL_SSL",
                ssl_context=create_ssl_context(cafile=secured_kafka.ca_file),
                sasl_mechanism="PLAIN",
                sasl_plain_username="admin",
                sasl_plain_password=secured_kafka.password("admin"),
            ),
            REFUSAL_BOUND_S,
        )


@pytest.mark.integration
async def test_client_cert_of_another_ca_is_refused(
    secured_kafka: SecuredKafka, tmp_path: Path
) -> None:
    # Same subject as the real CA and CN=admin: only the signature tells them apart.
    real_ca = tls.load_cert_key(secured_kafka.ca_file, secured_kafka.tls_dir / "ca.key")
    impostor = tls.make_cert(tls.make_ca(real_ca.common_name), "admin", client=True)
    cert, key = tmp_path / "impostor.pem", tmp_path / "impostor.key"
    tls.write_cert_key(impostor, cert, key)
    ctx = create_ssl_context(cafile=secured_kafka.ca_file, certfile=cert, keyfile=key)
    with pytest.raises(ssl.SSLError, match=r"(?i)certificate.unknown|unknown.ca|bad.certificate"):
        launcher.probe_metadata(secured_kafka.ssl_bootstrap, timeout=5, ssl_context=ctx)
    exc, took = await _refused(
        {"bootstrap_servers": secured_kafka.ssl_bootstrap, "security_protocol": "SSL"}
        | {"ssl_context": ctx}
    )
    assert took < REFUSAL_BOUND_S, exc


@pytest.mark.integration
async def test_mutual_tls_listener_refuses_a_client_without_cert(
    secured_kafka: SecuredKafka,
) -> None:
    ctx = create_ssl_context(cafile=secured_kafka.ca_file)
    with pytest.raises(ssl.SSLError, match=r"(?i)certificate.required|bad.certificate"):
        launcher.probe_metadata(secured_kafka.ssl_bootstrap, timeout=5, ssl_context=ctx)
    await _refused(
        {"bootstrap_servers": secured_kafka.ssl_bootstrap, "security_protocol": "SSL"}
        | {"ssl_context": ctx}
    )
    # The same context is enough for the broker's identity: TLS itself works.
    admin = _mtls(secured_kafka, "admin")["ssl_context"]
    meta = launcher.probe_metadata(secured_kafka.ssl_bootstrap, timeout=5, ssl_context=admin)
    assert [b.port for b in meta.brokers] == [secured_kafka.mtls_port]


@pytest.mark.integration
async def test_no_port_answers_plaintext(secured_kafka: SecuredKafka) -> None:
    """A raw plaintext Metadata request gets no answer on any of the broker's ports,
    controller included, and an aiokafka PLAINTEXT client is refused promptly."""
    for port in range(secured_kafka.mtls_port, secured_kafka.mtls_port + 3):
        began = time.monotonic()
        with pytest.raises((OSError, struct.error)):
            launcher.probe_metadata(f"127.0.0.1:{port}", timeout=5)
        assert time.monotonic() - began < 5, f"port {port} kept a plaintext client waiting"
    for bootstrap in (secured_kafka.ssl_bootstrap, secured_kafka.sasl_ssl_bootstrap):
        await _refused({"bootstrap_servers": bootstrap, "security_protocol": "PLAINTEXT"})


@pytest.mark.integration
async def test_acls_decide_and_a_certificate_cn_is_its_principal(
    secured_kafka: SecuredKafka, topic: str
) -> None:
    """worker may do nothing until AclCommand grants it; then it may write over SASL_SSL
    and, as CN=worker, over mutual TLS; producer (another user) still may not."""
    sasl_worker = _sasl(secured_kafka, "worker", "SCRAM-SHA-256")
    mtls_worker = _mtls(secured_kafka, "worker")
    for opts in (sasl_worker, mtls_worker):
        with pytest.raises(TopicAuthorizationFailedError):
            await _produce(opts, topic, b"denied")
    try:
        out = _acl(
            secured_kafka,
            "--add",
            "--allow-principal",
            "User:worker",
            "--operation",
            "Write",
            "--operation",
            "Describe",
            "--topic",
            topic,
        )
        assert "User:worker" in out
        await _produce(sasl_worker, topic, b"granted over sasl")
        await _produce(mtls_worker, topic, b"granted over mtls")
        with pytest.raises(TopicAuthorizationFailedError):
            await _produce(_sasl(secured_kafka, "producer", "SCRAM-SHA-512"), topic, b"no")
    finally:
        _acl(secured_kafka, "--remove", "--force", "--topic", topic)
    await _consume_one(_sasl(secured_kafka, "admin", "SCRAM-SHA-512"), topic, b"granted over mtls")


@pytest.mark.integration
def test_secrets_are_private_and_start_is_idempotent(
    secured_kafka: SecuredKafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = [
        secured_kafka.password_file,
        secured_kafka.admin_command_config(),
        secured_kafka.tls_dir / "ca.key",
        secured_kafka.client_cert("worker")[1],
    ]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(secured_kafka.tls_dir.stat().st_mode) == 0o700
    users = json.loads(secured_kafka.password_file.read_text())
    assert set(users) >= {"admin", "worker", "producer", "auditor", "operator"}
    assert len(set(users.values())) == len(users)
    config = _properties(secured_kafka.admin_command_config())
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert 'username="admin"' in config["sasl.jaas.config"]
    assert config["ssl.truststore.location"] == str(secured_kafka.ca_file)

    pid = launcher.status(secured_kafka.config, use_external=False)["pid"]
    # The plaintext cluster named here is not this broker: start() must not be fooled.
    monkeypatch.setenv(launcher.ENV_BOOTSTRAP, "127.0.0.1:1")
    assert secured_kafka.running()
    began = time.monotonic()
    secured_kafka.start()
    assert time.monotonic() - began < 10, "a running broker must be reused, not restarted"
    assert launcher.status(secured_kafka.config, use_external=False)["pid"] == pid


# ------------------------------------------------------------- a broker of its own


@pytest.fixture
def own_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SecuredKafka]:
    monkeypatch.delenv(launcher.ENV_BOOTSTRAP, raising=False)
    base = launcher.free_port_block(3, start=39092)
    kafka = SecuredKafka(tmp_path / "secured", port_base=base)
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.mark.integration
@pytest.mark.xdist_group("own-kafka")
async def test_restart_keeps_users_and_certs_and_adds_new_users(own_broker: SecuredKafka) -> None:
    began = time.monotonic()
    own_broker.start()
    cold = time.monotonic() - began
    ca = own_broker.ca_file.read_bytes()
    password = own_broker.password("auditor")
    own_broker.stop()
    assert not own_broker.running()

    grown = SecuredKafka(
        own_broker.root, port_base=own_broker.mtls_port, users=(*own_broker.users, "late")
    )
    began = time.monotonic()
    grown.start()
    warm = time.monotonic() - began
    print(f"secured broker: cold start {cold:.1f}s, restart adding a user {warm:.1f}s")
    assert own_broker.ca_file.read_bytes() == ca
    assert grown.password("auditor") == password

    async def logs_in(user: str, mechanism: str) -> None:
        admin = AIOKafkaAdminClient(**_sasl(grown, user, mechanism), request_timeout_ms=10000)
        await asyncio.wait_for(admin.start(), 20)
        await admin.close()

    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
        await logs_in("auditor", mechanism)  # made at format time, kept across the restart
        await logs_in("late", mechanism)  # made on the running broker
