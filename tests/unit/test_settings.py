"""Settings: environment parsing, validation errors, masking, and README documentation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agentstream.streams.settings import Settings, SettingsError

README = Path(__file__).resolve().parents[2] / "README.md"


def test_reads_prefixed_environment() -> None:
    s = Settings.from_env(
        {
            "AGENTSTREAM_WEB_PORT": "7001",
            "AGENTSTREAM_TOPIC_PREFIX": "stg.",
            "AGENTSTREAM_SECURITY_ENABLED": "false",
            "UNRELATED": "x",
        }
    )
    assert s.web_port == 7001
    assert s.security_enabled is False
    assert s.topic("agent.messages") == "stg.agent.messages"


def test_bootstrap_defaults_to_local_broker_port() -> None:
    assert Settings.from_env({"AGENTSTREAM_KAFKA_PORT": "12345"}).bootstrap == "127.0.0.1:12345"
    assert Settings.from_env({"AGENTSTREAM_KAFKA_BOOTSTRAP": "k:9"}).bootstrap == "k:9"


def test_invalid_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="AGENTSTREAM_TOPIC_PARTITIONS"):
        Settings.from_env({"AGENTSTREAM_TOPIC_PARTITIONS": "0"})
    with pytest.raises(SettingsError, match="AGENTSTREAM_PROCESSING_GUARANTEE"):
        Settings.from_env({"AGENTSTREAM_PROCESSING_GUARANTEE": "maybe_once"})


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(Exception, match="frozen"):
        s.web_port = 1  # type: ignore[misc]


def test_secrets_are_masked_everywhere() -> None:
    s = Settings.from_env({"AGENTSTREAM_KEYRING_PASSWORD": "hunter2-very-secret"})
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.describe())
    assert s.keyring_password is not None
    assert s.keyring_password.get_secret_value() == "hunter2-very-secret"


def test_every_variable_is_documented_in_readme() -> None:
    documented = set(re.findall(r"`(AGENTSTREAM_[A-Z0-9_]+)`", README.read_text()))
    missing = [
        Settings.env_name(f)
        for f in Settings.model_fields
        if Settings.env_name(f) not in documented
    ]
    assert not missing, f"README configuration table lacks {missing}"


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"AGENTSTREAM_TOPIC_PARTITIONS": "zero", "AGENTSTREAM_WEB_PORT": "http"})
    lines = str(info.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("AGENTSTREAM_TOPIC_PARTITIONS='zero': ")
    assert lines[1].startswith("AGENTSTREAM_WEB_PORT='http': ")
    assert info.value.problems == lines
    assert info.value.context["field"] == "topic_partitions"


def test_rules_across_fields_are_reported_with_the_bad_fields() -> None:
    # pydantic checks `_consistent` only once every field is valid: still one run
    # tells the user both the bad value and the missing username
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "AGENTSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "AGENTSTREAM_TOPIC_PARTITIONS": "0",
                "AGENTSTREAM_SECRET_SOURCES": "vault",
            }
        )
    lines = info.value.problems
    assert [line.split("=")[0].split(" ")[0] for line in lines] == [
        "AGENTSTREAM_TOPIC_PARTITIONS",
        "AGENTSTREAM_KAFKA_SASL_USERNAME",
        "AGENTSTREAM_SECRET_SOURCES",
    ], lines


def test_a_rule_about_a_variable_already_reported_is_not_repeated() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "AGENTSTREAM_KAFKA_SASL_MECHANISM": "SCRAM",
                "AGENTSTREAM_KAFKA_SASL_USERNAME": "me",
            }
        )
    assert info.value.problems == [
        "AGENTSTREAM_KAFKA_SASL_MECHANISM='SCRAM': Input should be 'PLAIN', "
        "'SCRAM-SHA-256' or 'SCRAM-SHA-512'"
    ]


def test_a_secret_value_is_never_echoed_in_an_error() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"AGENTSTREAM_TOPIC_PARTITIONS": "0"}, keyring_password=5)
    assert "AGENTSTREAM_KEYRING_PASSWORD:" in str(info.value)
    assert "5" not in str(info.value).split("AGENTSTREAM_KEYRING_PASSWORD")[1]
