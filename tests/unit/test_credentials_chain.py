"""The credentials chain: keychain, env variables and a secrets dir, in the configured order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agentstream.streams.credentials import (
    KeychainCredentialsProvider,
    secret_env_name,
)
from agentstream.streams.errors import CredentialsError
from agentstream.streams.settings import Settings, SettingsError


def _provider(tmp_path: Path, sources: str, **env: str) -> KeychainCredentialsProvider:
    settings = Settings.from_env(
        {
            "AGENTSTREAM_SECRET_SOURCES": sources,
            "AGENTSTREAM_SECRETS_DIR": str(tmp_path / "secrets"),
            "AGENTSTREAM_KEYRING_BACKEND": "plaintext-file",
            "AGENTSTREAM_KEYRING_FILE": str(tmp_path / "keyring.cfg"),
        }
    )
    return KeychainCredentialsProvider(settings)


def _get(provider: KeychainCredentialsProvider, entry: str) -> str | None:
    return asyncio.run(provider.get_secret(entry))


def test_env_names_upper_case_the_entry_with_underscores() -> None:
    assert secret_env_name("kafka.sasl_password") == "AGENTSTREAM_SECRET_KAFKA_SASL_PASSWORD"
    assert secret_env_name("access_token.7") == "AGENTSTREAM_SECRET_ACCESS_TOKEN_7"
    assert secret_env_name("llm.open-ai.api_key") == "AGENTSTREAM_SECRET_LLM_OPEN_AI_API_KEY"


def test_env_source_reads_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSTREAM_SECRET_KAFKA_SASL_PASSWORD", "s3cret")
    provider = _provider(tmp_path, "env")
    assert _get(provider, "kafka.sasl_password") == "s3cret"
    assert _get(provider, "kafka.other") is None
    monkeypatch.setenv("AGENTSTREAM_SECRET_KAFKA_OTHER", "")
    assert _get(provider, "kafka.other") is None  # an empty variable is no secret


def test_dir_source_reads_one_file_per_entry(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "kafka.sasl_password").write_text("from-file\n")
    (secrets / "crlf").write_text("windows\r\n")
    (secrets / "two-lines").write_text("a\nb\n\n")
    provider = _provider(tmp_path, "dir")
    assert _get(provider, "kafka.sasl_password") == "from-file"  # the newline is not in it
    assert _get(provider, "crlf") == "windows"
    assert _get(provider, "two-lines") == "a\nb\n"  # only one trailing newline goes
    assert _get(provider, "missing") is None


@pytest.mark.parametrize(
    "entry", ["../keyring.cfg", "a/b", "/etc/passwd", ".hidden", "x/../../y", "..", "a..b"]
)
def test_dir_source_refuses_entries_that_are_paths(tmp_path: Path, entry: str) -> None:
    (tmp_path / "keyring.cfg").write_text("outside the secrets dir")
    provider = _provider(tmp_path, "dir")
    with pytest.raises(CredentialsError, match="cannot be a file"):
        _get(provider, entry)


def test_sources_are_asked_in_the_configured_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "token").write_text("from-dir")
    monkeypatch.setenv("AGENTSTREAM_SECRET_TOKEN", "from-env")
    assert _get(_provider(tmp_path, "env,dir"), "token") == "from-env"
    assert _get(_provider(tmp_path, "dir,env"), "token") == "from-dir"
    keychain_first = _provider(tmp_path, "keychain,env,dir")
    assert _get(keychain_first, "token") == "from-env"  # not in the keychain: next source
    asyncio.run(keychain_first.set_secret("token", "from-keychain"))
    assert _get(keychain_first, "token") == "from-keychain"
    assert _get(_provider(tmp_path, "env,keychain"), "token") == "from-env"


def test_without_keychain_no_keyring_backend_is_resolved(tmp_path: Path) -> None:
    """A container has no keychain: naming a backend that cannot work must not matter
    when the chain does not use the keychain."""
    bad = {"AGENTSTREAM_KEYRING_BACKEND": "no-such-backend"}
    with pytest.raises(SettingsError, match="AGENTSTREAM_KEYRING_BACKEND='no-such-backend'"):
        Settings.from_env({**bad})  # the keychain is a source: a bad setting
    unusable = {"AGENTSTREAM_KEYRING_BACKEND": "encrypted-file"}  # without its file
    with pytest.raises(CredentialsError, match="AGENTSTREAM_KEYRING_FILE"):
        KeychainCredentialsProvider(Settings.from_env({**unusable}))
    provider = KeychainCredentialsProvider(
        Settings.from_env({**bad, "AGENTSTREAM_SECRET_SOURCES": "env,dir"})
    )
    assert provider.backend is None
    assert provider.backend_name == "env > dir"


def test_writes_go_to_the_first_writable_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = _provider(tmp_path, "env,dir")
    asyncio.run(provider.set_secret("web.tokens", '{"tokens": {}}'))
    written = tmp_path / "secrets" / "web.tokens"
    assert written.read_text() == '{"tokens": {}}'
    assert written.stat().st_mode & 0o077 == 0  # only the owner reads a secret file
    assert _get(provider, "web.tokens") == '{"tokens": {}}'
    asyncio.run(provider.delete_secret("web.tokens"))
    assert not written.exists()
    env_only = _provider(tmp_path, "env")
    with pytest.raises(CredentialsError, match="no writable secret source"):
        asyncio.run(env_only.set_secret("x", "y"))


def test_missing_secrets_fail_closed(tmp_path: Path) -> None:
    provider = _provider(tmp_path, "env,dir")
    assert asyncio.run(provider.read_credentials()) is None
    assert asyncio.run(provider.get_signing_key("agent-1")) is None
    assert provider.get_secret_sync("kafka.sasl_password") is None


def test_an_unreadable_secret_file_fails_closed_without_its_text(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    (secrets / "token").mkdir(parents=True)  # a directory where a file should be
    provider = _provider(tmp_path, "dir")
    with pytest.raises(CredentialsError, match="is a directory"):
        _get(provider, "token")
    (secrets / "binary").write_bytes(b"\xff\xfe secret \x80")
    with pytest.raises(CredentialsError) as info:
        _get(provider, "binary")
    assert "secret" not in str(info.value).replace("secret source", "")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("env,vault", "a comma-separated order of keychain, env, dir"),
        ("env,env", "each at most once"),
        (" , ", "a comma-separated order"),
    ],
)
def test_bad_source_lists_are_one_line_setting_errors(value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"AGENTSTREAM_SECRET_SOURCES": value})


def test_write_target_names_the_source_a_write_goes_to(tmp_path: Path) -> None:
    assert _provider(tmp_path, "env,dir").write_target == f"the secrets dir {tmp_path / 'secrets'}"
    assert _provider(tmp_path, "env,keychain,dir").write_target.startswith("keychain ")
    with pytest.raises(CredentialsError, match="no writable secret source"):
        _ = _provider(tmp_path, "env").write_target
