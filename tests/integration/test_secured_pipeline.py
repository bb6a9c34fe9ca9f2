"""The pipeline against a secured Kafka (`secured_kafka`: TLS listeners, SCRAM users,
the StandardAuthorizer): end to end over SASL_SSL with SCRAM and over mutual TLS, with
every secret from env variables and a secrets dir (no keyring at all); and each way a
connection can be refused ends a command within seconds with one line naming the cause.

Each test then greps everything the run produced — CLI output, the worker's log, every
record on every topic of its namespace — for the secrets it used."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from agentstream.schemas import AgentMessage, Event
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from agentstream.streams.topics import CATALOGUE
from tests.support import Worker, cli

pytestmark = pytest.mark.integration

N = 20


def _base_env(settings_env: dict[str, str], tmp_path: Path, kafka: Any) -> dict[str, str]:
    """settings_env moved to the secured broker, secrets from env and a dir only."""
    env = {k: v for k, v in settings_env.items() if not k.startswith("AGENTSTREAM_KEYRING_")}
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    env.update(
        {
            "AGENTSTREAM_SECRET_SOURCES": "env,dir",
            "AGENTSTREAM_SECRETS_DIR": str(secrets_dir),
            "AGENTSTREAM_KAFKA_SSL_CAFILE": str(kafka.ca_file),
            "AGENTSTREAM_AGENTS": "security",
            "AGENTSTREAM_SECURITY_DEFAULT_ACTION": "allow",
            # a keyring the chain must never touch: it is not in the sources
            "AGENTSTREAM_KEYRING_BACKEND": "no-such-backend",
            "HOME": str(tmp_path / "home"),
        }
    )
    return env


def _scram_env(env: dict[str, str], kafka: Any, password: str) -> dict[str, str]:
    """SCRAM over TLS, the password in the secrets dir (the `dir` source: this test's
    own clients read it as the worker's do)."""
    (Path(env["AGENTSTREAM_SECRETS_DIR"]) / "kafka.sasl_password").write_text(password + "\n")
    return {
        **env,
        "AGENTSTREAM_KAFKA_BOOTSTRAP": kafka.sasl_ssl_bootstrap,
        "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "AGENTSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "AGENTSTREAM_KAFKA_SASL_USERNAME": "admin",
    }


def _mtls_env(env: dict[str, str], kafka: Any, principal: str = "admin") -> dict[str, str]:
    cert, key = kafka.client_cert(principal)
    return {
        **env,
        "AGENTSTREAM_KAFKA_BOOTSTRAP": kafka.ssl_bootstrap,
        "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
        "AGENTSTREAM_KAFKA_SSL_CERTFILE": str(cert),
        "AGENTSTREAM_KAFKA_SSL_KEYFILE": str(key),
    }


async def _read_all(settings: Settings, *topics: str) -> list[Any]:
    """Every record of these catalogue topics, read over the secured connection."""
    async with AsyncClient(settings) as client:
        return [
            rec async for rec in client.subscribe(list(topics), from_beginning=True, timeout_s=1.5)
        ]


async def _run_pipeline(env: dict[str, str], tmp_path: Path, secret: str) -> None:
    created = cli(env, "topics", "create")
    assert created.returncode == 0, created.stderr + created.stdout
    settings = Settings.from_env(env)
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        ids = [f"m-{i}" for i in range(N)]
        async with AsyncClient(settings) as client:
            for mid in ids:
                msg = AgentMessage(
                    message_id=mid, sender_id="agent-1", recipient_id="agent-2", content="hi"
                )
                await client.publish("agent.messages", Event.of(msg, source="test"))

        async def accepted() -> set[str]:
            records = await _read_all(settings, "agent.messages.accepted")
            return {r.event.payload.message_id for r in records if r.event is not None}

        deadline = time.monotonic() + 60
        got: set[str] = set()
        while got != set(ids):
            if time.monotonic() > deadline:
                rejected = await _read_all(settings, "agent.messages.rejected")
                sample = rejected[0].raw[:400] if rejected else b""
                raise AssertionError(
                    f"accepted {len(got)} of {N}, rejected {len(rejected)}: {sample!r}\n"
                    + worker.task_dump()
                )
            got = await accepted()
            await asyncio.sleep(0.5)
        decisions = await _read_all(settings, "security.decisions")
        assert len(decisions) >= N
        # every record on every topic of this namespace: no secret in any of them
        everything = await _read_all(settings, *CATALOGUE)
        assert len(everything) >= 3 * N  # inputs, accepted, decisions at least
        for rec in everything:
            assert secret.encode() not in (rec.raw or b""), rec.topic
            assert secret.encode() not in (rec.key or b""), rec.topic
    finally:
        worker.stop()
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert secret not in log
    shown = cli(env, "config")
    assert shown.returncode == 0, shown.stderr
    assert secret not in shown.stdout + shown.stderr
    # the worker made its chain key itself, in the only writable source: the secrets dir
    assert (Path(env["AGENTSTREAM_SECRETS_DIR"]) / "chain_key.worker").exists()


async def test_pipeline_end_to_end_over_sasl_ssl_with_scram(
    settings_env: dict[str, str], secured_kafka: Any, tmp_path: Path
) -> None:
    password = secured_kafka.password("admin")
    env = _scram_env(_base_env(settings_env, tmp_path, secured_kafka), secured_kafka, password)
    await _run_pipeline(env, tmp_path, password)


async def test_pipeline_end_to_end_over_mutual_tls(
    settings_env: dict[str, str], secured_kafka: Any, tmp_path: Path
) -> None:
    env = _mtls_env(_base_env(settings_env, tmp_path, secured_kafka), secured_kafka)
    key_text = Path(env["AGENTSTREAM_KAFKA_SSL_KEYFILE"]).read_text()
    secret = key_text.strip().splitlines()[1]  # a line of the private key itself
    await _run_pipeline(env, tmp_path, secret)


def _refused(env: dict[str, str], *args: str) -> tuple[str, float]:
    """Run a command that must fail fast: (its one-line error, seconds it took)."""
    t0 = time.monotonic()
    out = cli(env, *args, timeout=60)
    took = time.monotonic() - t0
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0], took


@pytest.fixture
def other_ca(tmp_path: Path) -> Any:
    """A CA the broker does not know."""
    from agentstream.infra.kafka import tls

    return tls.make_ca("not-the-brokers-ca")


def test_a_wrong_scram_password_fails_in_seconds_naming_it(
    settings_env: dict[str, str], secured_kafka: Any, tmp_path: Path
) -> None:
    wrong = "wrong-" + secrets.token_urlsafe(12)
    env = _scram_env(
        _base_env(settings_env, tmp_path, secured_kafka),
        secured_kafka,
        secured_kafka.password("admin"),
    )
    env["AGENTSTREAM_SECRET_KAFKA_SASL_PASSWORD"] = wrong  # env comes before dir
    line, took = _refused(env, "topics", "list")
    assert "refused the SASL login of 'admin'" in line, line
    assert took < 15, took
    assert wrong not in line
    # the worker too: it stops at start with the same line, not a retry loop
    t0 = time.monotonic()
    out = cli(env, "worker", timeout=60)
    assert out.returncode != 0
    assert "refused the SASL login" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 20


def test_an_untrusted_broker_certificate_fails_naming_it(
    settings_env: dict[str, str], secured_kafka: Any, tmp_path: Path, other_ca: Any
) -> None:
    from agentstream.infra.kafka import tls

    ca_file = tmp_path / "other-ca.pem"
    tls.write_file(ca_file, other_ca.cert_pem, 0o644)
    env = _scram_env(
        _base_env(settings_env, tmp_path, secured_kafka),
        secured_kafka,
        secured_kafka.password("admin"),
    )
    env["AGENTSTREAM_KAFKA_SSL_CAFILE"] = str(ca_file)
    line, took = _refused(env, "topics", "list")
    assert "certificate is not trusted" in line, line
    assert took < 15


def test_mtls_without_a_certificate_or_with_a_foreign_one_fails_naming_it(
    settings_env: dict[str, str], secured_kafka: Any, tmp_path: Path, other_ca: Any
) -> None:
    from agentstream.infra.kafka import tls

    base = _base_env(settings_env, tmp_path, secured_kafka)
    no_cert = {
        **base,
        "AGENTSTREAM_KAFKA_BOOTSTRAP": secured_kafka.ssl_bootstrap,
        "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
    }
    line, took = _refused(no_cert, "topics", "list")
    assert "requires a client certificate" in line, line
    assert took < 15
    cert, key = tmp_path / "foreign.pem", tmp_path / "foreign.key"
    tls.write_cert_key(tls.make_cert(other_ca, "admin", client=True), cert, key)
    foreign = {
        **no_cert,
        "AGENTSTREAM_KAFKA_SSL_CERTFILE": str(cert),
        "AGENTSTREAM_KAFKA_SSL_KEYFILE": str(key),
    }
    line, took = _refused(foreign, "topics", "list")
    assert "does not accept our client certificate" in line, line
    assert took < 15


def test_plaintext_against_a_tls_listener_fails_fast(
    settings_env: dict[str, str], secured_kafka: Any, tmp_path: Path
) -> None:
    env = {**settings_env, "AGENTSTREAM_KAFKA_BOOTSTRAP": secured_kafka.sasl_ssl_bootstrap}
    env["AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S"] = "5"
    line, took = _refused(env, "topics", "list")
    assert secured_kafka.sasl_ssl_bootstrap in line and "BrokerError" in line, line
    assert took < 20
