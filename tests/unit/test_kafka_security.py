"""streams.kafka_security: settings + secrets → client options, without a broker."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import faust
import pytest

from agentstream.streams.errors import CredentialsError
from agentstream.streams.kafka_security import (
    KEY_PASSWORD_ENTRY,
    PASSWORD_ENTRY,
    client_options,
    resolve,
)
from agentstream.streams.settings import Settings, SettingsError
from tests.tls_files import self_signed


class Secrets:
    """A credentials provider with fixed entries that records what was asked."""

    def __init__(self, **entries: str) -> None:
        self.entries = {k.replace("__", "."): v for k, v in entries.items()}
        self.asked: list[str] = []

    def get_secret_sync(self, name: str) -> str | None:
        self.asked.append(name)
        return self.entries.get(name)


def _pem_pair(tmp: Path, password: bytes | None = None) -> tuple[Path, Path]:
    """A self-signed certificate and its key (encrypted with `password` when given)."""
    return self_signed(tmp, ("client",), password=password)


def _settings(**env: str) -> Settings:
    return Settings.from_env({f"AGENTSTREAM_{k.upper()}": v for k, v in env.items()})


def test_plaintext_never_asks_for_a_secret() -> None:
    secrets = Secrets()
    sec = resolve(_settings(), secrets)
    assert sec.client_options() == {"security_protocol": "PLAINTEXT"}
    assert sec.faust_credentials() is None
    assert secrets.asked == []


def test_sasl_ssl_takes_the_password_from_the_chain(tmp_path: Path) -> None:
    ca, _ = _pem_pair(tmp_path)
    settings = _settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="worker",
        kafka_ssl_cafile=str(ca),
    )
    sec = resolve(settings, Secrets(kafka__sasl_password="pw-1"))
    opts = sec.client_options()
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("worker", "pw-1")
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    assert opts["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert opts["ssl_context"].check_hostname
    assert "pw-1" not in repr(sec)
    creds = sec.faust_credentials()
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.protocol.value == "SASL_SSL"
    assert creds.mechanism.value == "SCRAM-SHA-512"
    assert creds.password == "pw-1"


def test_sasl_without_the_password_fails_closed_naming_the_entry() -> None:
    settings = _settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="worker",
        secret_sources="env",
    )
    with pytest.raises(CredentialsError) as info:
        resolve(settings, Secrets())
    assert PASSWORD_ENTRY in str(info.value)
    assert "env" in str(info.value)


def test_mtls_loads_an_encrypted_key_with_its_password_from_the_chain(tmp_path: Path) -> None:
    cert, key = _pem_pair(tmp_path, password=b"key-pw")
    settings = _settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(cert),
        kafka_ssl_certfile=str(cert),
        kafka_ssl_keyfile=str(key),
    )
    secrets = Secrets(kafka__ssl_key_password="key-pw")
    sec = resolve(settings, secrets)
    assert isinstance(sec.faust_credentials(), faust.SSLCredentials)
    assert secrets.asked == [KEY_PASSWORD_ENTRY]  # no SASL: its password is never read
    with pytest.raises(SettingsError, match="cannot load the client certificate") as info:
        resolve(settings, Secrets(kafka__ssl_key_password="wrong"))
    assert "wrong" not in str(info.value)
    with pytest.raises(SettingsError, match=KEY_PASSWORD_ENTRY.replace(".", r"\.")):
        resolve(settings, Secrets())  # encrypted key, no password: say where it goes


def test_an_unencrypted_key_asks_for_no_password(tmp_path: Path) -> None:
    cert, key = _pem_pair(tmp_path)
    settings = _settings(
        kafka_security_protocol="SSL", kafka_ssl_certfile=str(cert), kafka_ssl_keyfile=str(key)
    )
    secrets = Secrets()
    resolve(settings, secrets)
    assert secrets.asked == []


@pytest.mark.parametrize("name", ["kafka_ssl_cafile", "kafka_ssl_certfile"])
def test_a_missing_file_is_one_setting_error(tmp_path: Path, name: str) -> None:
    cert, key = _pem_pair(tmp_path)
    files = {
        "kafka_ssl_cafile": str(cert),
        "kafka_ssl_certfile": str(cert),
        "kafka_ssl_keyfile": str(key),
    }
    files[name] = str(tmp_path / "nope.pem")
    settings = _settings(kafka_security_protocol="SSL", **files)
    with pytest.raises(SettingsError, match=f"{Settings.env_name(name)}: no such file"):
        resolve(settings, Secrets())


def test_a_ca_file_that_is_no_pem_is_one_setting_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(SettingsError, match="AGENTSTREAM_KAFKA_SSL_CAFILE: not a PEM CA file"):
        resolve(_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(bad)), Secrets())


def test_hostname_check_can_be_turned_off_but_the_chain_is_still_verified() -> None:
    settings = _settings(kafka_security_protocol="SSL", kafka_ssl_check_hostname="false")
    ctx: Any = resolve(settings, Secrets()).ssl_context
    assert ctx.check_hostname is False
    assert ctx.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "AGENTSTREAM_KAFKA_SASL_MECHANISM is required"),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "PLAIN"},
            "AGENTSTREAM_KAFKA_SASL_USERNAME is required",
        ),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "AGENTSTREAM_KAFKA_SASL_MECHANISM"),
        ({"kafka_ssl_keyfile": "/k.pem"}, "go together"),
        ({"kafka_security_protocol": "TLS"}, "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL"),
    ],
)
def test_inconsistent_settings_are_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        _settings(**env)


def test_client_options_carry_the_bootstrap_and_the_security(tmp_path: Path) -> None:
    settings = _settings(kafka_bootstrap="b1:9093,b2:9093", kafka_security_protocol="SSL")
    opts = client_options(settings)
    assert opts["bootstrap_servers"] == "b1:9093,b2:9093"
    assert opts["security_protocol"] == "SSL"


def test_faust_credentials_resolve_only_when_a_client_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every CLI command imports the app: a missing password must not break
    `agentstream kafka stop`; the worker's clients get the password when built."""
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from agentstream.streams.app import create_app
    from agentstream.streams.kafka_security import faust_credentials, security_of

    cert, _ = _pem_pair(tmp_path)
    settings = _settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="worker",
        kafka_ssl_cafile=str(cert),
        secret_sources="env",
        data_dir=str(tmp_path / "worker"),
    )
    security_of.cache_clear()
    app = create_app(settings)  # no password anywhere yet: still fine
    creds = app.conf.broker_credentials
    with pytest.raises(CredentialsError, match=r"kafka\.sasl_password"):
        credentials_to_aiokafka_auth(creds)
    monkeypatch.setenv("AGENTSTREAM_SECRET_KAFKA_SASL_PASSWORD", "pw-2")
    auth = credentials_to_aiokafka_auth(faust_credentials(settings))
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("worker", "pw-2")
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    assert "pw-2" not in repr(creds)
    mtls = _settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(cert))
    auth = credentials_to_aiokafka_auth(faust_credentials(mtls))
    assert auth["security_protocol"] == "SSL"
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    security_of.cache_clear()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
async def test_nothing_listening_over_tls_is_retriable_not_an_auth_error(protocol: str) -> None:
    # A cluster that is down is a retriable BrokerError under every protocol: a caller
    # that retries on `retriable` (a worker, a client) must not give up on an outage
    # because the client happens to speak TLS (it got BrokerAuthError "no TLS connection").
    from aiokafka.errors import KafkaConnectionError

    from agentstream.streams.errors import BrokerAuthError, BrokerError
    from agentstream.streams.kafka_security import connect_error

    env = {"kafka_security_protocol": protocol, "kafka_bootstrap": f"127.0.0.1:{_closed_port()}"}
    if protocol == "SASL_SSL":
        env |= {"kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": "u"}
    settings = _settings(**env)
    sec = resolve(settings, Secrets(kafka__sasl_password="p"))
    err = await connect_error(settings, KafkaConnectionError("Unable to bootstrap"), "x", sec)
    assert type(err) is BrokerError and not isinstance(err, BrokerAuthError), err
    assert err.retriable
    assert f"no broker at {settings.bootstrap} ({protocol})" in str(err)
