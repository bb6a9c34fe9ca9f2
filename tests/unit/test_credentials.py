"""KeychainCredentialsProvider on real file keyrings, the backend allow-list (fail closed),
and `agentstream credentials` masking."""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from keyring.backends import fail, null
from keyrings.alt.file import PlaintextKeyring
from pydantic import ValidationError

from agentstream.streams.credentials import (
    EncryptedFileKeyring,
    KeychainCredentialsProvider,
    mask,
    resolve_backend,
)
from agentstream.streams.errors import CredentialsError
from agentstream.streams.settings import Settings, SettingsError, get_settings

TOKEN = "tok-0123456789abcdef-secret"


def _settings(tmp_path: Path, **kw: object) -> Settings:
    values: dict[str, object] = {
        "keyring_backend": "encrypted-file",
        "keyring_file": tmp_path / "keyring.json",
        "keyring_password": "master-pw",
        "keyring_service": "agentstream-test",
    }
    values.update(kw)
    return Settings.model_validate(values)


async def test_encrypted_file_round_trip_without_plaintext_on_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = KeychainCredentialsProvider(_settings(tmp_path))
    assert isinstance(provider.backend, EncryptedFileKeyring)
    assert await provider.read_credentials() is None
    await provider.write_credentials(42, TOKEN)
    await provider.set_signing_key("agent-1", b"s" * 32)
    await provider.set_encryption_key("k1", b"e" * 32)
    await provider.set_secret("llm.openai.api_key", "sk-live-abcdef")

    again = KeychainCredentialsProvider(_settings(tmp_path))  # another process, same file
    creds = await again.read_credentials()
    assert creds is not None and creds.user_id == 42
    assert creds.access_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(creds)
    assert await again.get_access_token(42) == TOKEN
    assert await again.get_signing_key("agent-1") == b"s" * 32
    assert await again.get_encryption_key("k1") == b"e" * 32
    assert await again.get_secret("llm.openai.api_key") == "sk-live-abcdef"
    assert await again.get_signing_key("nobody") is None

    path = tmp_path / "keyring.json"
    text = path.read_text()
    for secret in (TOKEN, "sk-live-abcdef", "c3Nzc3Nz"):  # the last: base64 of the key
        assert secret not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    await again.delete_secret("llm.openai.api_key")
    assert await provider.get_secret("llm.openai.api_key") is None
    await provider.delete_credentials()
    assert await again.read_credentials() is None
    assert await again.get_access_token(42) is None
    assert TOKEN not in caplog.text


async def test_wrong_master_password_fails_closed(tmp_path: Path) -> None:
    await KeychainCredentialsProvider(_settings(tmp_path)).set_secret("x", "y")
    wrong = KeychainCredentialsProvider(_settings(tmp_path, keyring_password="guess"))
    with pytest.raises(CredentialsError, match="wrong master password"):
        await wrong.get_secret("x")
    with pytest.raises(CredentialsError, match="wrong master password"):
        await wrong.set_secret("x", "overwritten")
    assert await KeychainCredentialsProvider(_settings(tmp_path)).get_secret("x") == "y"


def test_master_password_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CredentialsError, match="master password"):
        resolve_backend(_settings(tmp_path, keyring_password=None))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "agentstream-keyring-password").write_text("from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    backend = resolve_backend(_settings(tmp_path, keyring_password=None))
    assert isinstance(backend, EncryptedFileKeyring)
    backend.set_password("svc", "user", "v")
    assert (
        EncryptedFileKeyring(tmp_path / "keyring.json", "from-systemd").get_password("svc", "user")
        == "v"
    )


async def test_plaintext_only_when_named_and_calls_leave_the_event_loop(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, keyring_backend="plaintext-file", keyring_file=tmp_path / "plain.cfg"
    )
    backend = resolve_backend(settings)
    assert isinstance(backend, PlaintextKeyring)
    threads: list[int] = []

    class Recording(PlaintextKeyring):
        def get_password(self, service: str, username: str) -> str | None:
            threads.append(threading.get_ident())
            return super().get_password(service, username)

    recording = Recording()
    recording.file_path = str(tmp_path / "plain.cfg")
    provider = KeychainCredentialsProvider(settings, backend=recording)
    await provider.set_secret("name", "value")
    assert await provider.get_secret("name") == "value"
    assert threads and threading.get_ident() not in threads


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("keyring.backends.fail.Keyring", "not on the allow-list"),
        ("keyring.backends.null.Keyring", "not on the allow-list"),
        ("my.own.Backend", "not on the allow-list"),
        ("keyrings.alt-encrypted", "pycryptodome"),
        ("secretservice", "not available"),
    ],
)
def test_backends_off_the_list_or_unusable_are_refused(
    tmp_path: Path, name: str, error: str
) -> None:
    if name == "secretservice":
        try:
            import keyring.backends.SecretService as ss

            if ss.Keyring.priority > 0:  # pragma: no cover - a desktop with Secret Service
                pytest.skip("this machine has a Secret Service")
        except Exception:
            pass
    # a name off the list is a bad setting (`Settings` refuses it, and a command exits
    # 2 naming the variable); one on it the system cannot provide, a credentials failure
    with pytest.raises(ValidationError if "allow-list" in error else CredentialsError) as info:
        resolve_backend(_settings(tmp_path, keyring_backend=name))
    assert error in str(info.value)


def test_a_backend_off_the_list_is_a_bad_setting_naming_its_variable() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"AGENTSTREAM_KEYRING_BACKEND": "nosuch"})
    assert info.value.problems == [
        "AGENTSTREAM_KEYRING_BACKEND='nosuch': is not on the allow-list (encrypted-file, "
        "kwallet, libsecret, macos, plaintext-file, secretservice, windows, or their class "
        "paths)"
    ]
    Settings.from_env({"AGENTSTREAM_KEYRING_BACKEND": " keyrings.alt.file.PlaintextKeyring "})
    # not asked where the keychain is no secret source (a container)
    Settings.from_env(
        {"AGENTSTREAM_KEYRING_BACKEND": "nosuch", "AGENTSTREAM_SECRET_SOURCES": "env,dir"}
    )


def test_unset_backend_never_falls_back_to_plaintext(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import keyring.backend

    # what keyring itself would choose on a headless machine with keyrings.alt installed
    monkeypatch.setattr(
        keyring.backend,
        "get_all_keyring",
        lambda: [fail.Keyring(), null.Keyring(), PlaintextKeyring()],
    )
    with pytest.raises(CredentialsError, match=r"no OS keychain.*No plaintext fallback"):
        resolve_backend(_settings(tmp_path, keyring_backend=None))


def test_file_backends_need_a_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="AGENTSTREAM_KEYRING_FILE"):
        resolve_backend(_settings(tmp_path, keyring_file=None))


def test_mask_hides_all_but_the_tail() -> None:
    assert mask(TOKEN) == f"****cret ({len(TOKEN)} chars)"
    assert mask("short") == "******** (5 chars)"


def test_cli_set_get_delete_masks_unless_revealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentstream.streams.cli import cli
    from agentstream.streams.cli import credentials as _commands  # noqa: F401 - registers the group

    for key, value in {
        "AGENTSTREAM_KEYRING_BACKEND": "encrypted-file",
        "AGENTSTREAM_KEYRING_FILE": str(tmp_path / "k.json"),
        "AGENTSTREAM_KEYRING_PASSWORD": "pw",
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        res = runner.invoke(
            cli, ["credentials", "set", "--user-id", "7", "--stdin"], input=TOKEN + "\n"
        )
        assert res.exit_code == 0, res.output
        assert TOKEN not in res.output
        res = runner.invoke(cli, ["credentials", "get"])
        assert res.exit_code == 0 and "user 7: ****cret" in res.output and TOKEN not in res.output
        res = runner.invoke(cli, ["credentials", "get", "--user-id", "7", "--reveal"])
        assert TOKEN in res.output
        res = runner.invoke(cli, ["credentials", "set", "--signing-key", "agent-1", "--generate"])
        assert res.exit_code == 0, res.output
        shown = runner.invoke(cli, ["credentials", "get", "--signing-key", "agent-1"]).output
        revealed = runner.invoke(
            cli, ["credentials", "get", "--signing-key", "agent-1", "--reveal"]
        ).output
        key_b64 = revealed.split(": ", 1)[1].strip()
        assert len(key_b64) == 44 and key_b64 not in shown
        assert (
            runner.invoke(cli, ["credentials", "delete", "--signing-key", "agent-1"]).exit_code == 0
        )
        res = runner.invoke(cli, ["credentials", "delete", "--signing-key", "agent-1"])
        assert res.exit_code == 1 and "not in the keychain" in res.output
        assert runner.invoke(cli, ["credentials", "delete"]).exit_code == 0
        assert "no credentials stored" in runner.invoke(cli, ["credentials", "get"]).output
        res = runner.invoke(cli, ["credentials", "set", "--secret", "a", "--user-id", "1"])
        assert res.exit_code == 2
    finally:
        get_settings.cache_clear()
        os.environ.pop("AGENTSTREAM_KEYRING_PASSWORD", None)
