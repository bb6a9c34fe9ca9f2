"""A corrupt keyring file fails closed: every read through the provider is a
`CredentialsError` (never a KeyError or TypeError past it), nothing is overwritten, and
`KeyCache` counts a failed lookup as an unknown key — logged once, without the secret."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agentstream.agents.security.policy import KeyRequest
from agentstream.agents.security.store import KeyCache
from agentstream.streams.credentials import EncryptedFileKeyring, KeychainCredentialsProvider
from agentstream.streams.errors import CredentialsError
from agentstream.streams.settings import Settings

TOKEN = "tok-QZXJVW-0123456789-corrupt-me"
SIGNING_KEY = b"s" * 32


def _settings(tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "keyring_backend": "encrypted-file",
            "keyring_file": tmp_path / "keyring.json",
            "keyring_password": "master-pw",
            "keyring_service": "agentstream-test",
        }
    )


async def _filled(tmp_path: Path) -> KeychainCredentialsProvider:
    provider = KeychainCredentialsProvider(_settings(tmp_path))
    assert isinstance(provider.backend, EncryptedFileKeyring)
    await provider.write_credentials(7, TOKEN)
    await provider.set_signing_key("agent-1", SIGNING_KEY)
    return provider


def _edit(path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads(path.read_text())
    replaced = change(data)
    path.write_text(json.dumps(data if replaced is None else replaced))


def _entry(data: dict[str, Any], name: str) -> str:
    return next(k for k in data["entries"] if k.endswith("\x00" + name))


def _flip(sealed: str) -> str:
    raw = bytearray(base64.b64decode(sealed))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _swap_token_and_key(d: dict[str, Any]) -> None:
    token, key = _entry(d, "access_token.7"), _entry(d, "signing_key.agent-1")
    d["entries"][token], d["entries"][key] = d["entries"][key], d["entries"][token]


CORRUPTIONS: dict[str, Callable[[Path], object]] = {
    "truncated": lambda p: p.write_text(p.read_text()[:40]),
    "binary garbage": lambda p: p.write_bytes(b"\xff\xfe\x00\x01garbage"),
    "not an object": lambda p: p.write_text("[1, 2, 3]"),
    "salt missing": lambda p: _edit(p, lambda d: d.pop("salt")),
    "salt not base64": lambda p: _edit(p, lambda d: d.update(salt="%%%not-base64%%%")),
    "salt a number": lambda p: _edit(p, lambda d: d.update(salt=12345)),
    "work factor not a number": lambda p: _edit(p, lambda d: d.update(n="lots")),
    "work factor not a power of two": lambda p: _edit(p, lambda d: d.update(n=3)),
    "entries missing": lambda p: _edit(p, lambda d: d.pop("entries")),
    "entries a list": lambda p: _edit(p, lambda d: d.update(entries=["x"])),
    "check missing": lambda p: _edit(p, lambda d: d.pop("check")),
    "entry a number": lambda p: _edit(
        p, lambda d: d["entries"].update({_entry(d, "access_token.7"): 42})
    ),
    "entry a list": lambda p: _edit(
        p, lambda d: d["entries"].update({_entry(d, "access_token.7"): ["a"]})
    ),
    "entry not base64": lambda p: _edit(
        p, lambda d: d["entries"].update({_entry(d, "access_token.7"): "@@@"})
    ),
    "entry too short": lambda p: _edit(
        p, lambda d: d["entries"].update({_entry(d, "access_token.7"): "AAAA"})
    ),
    "entry tampered": lambda p: _edit(
        p,
        lambda d: d["entries"].update(
            {_entry(d, "access_token.7"): _flip(d["entries"][_entry(d, "access_token.7")])}
        ),
    ),
    "entries swapped": lambda p: _edit(p, _swap_token_and_key),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
async def test_a_corrupt_keyring_file_fails_closed(
    tmp_path: Path, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _filled(tmp_path)
    path = tmp_path / "keyring.json"
    CORRUPTIONS[corruption](path)
    corrupt = path.read_bytes()

    reader = KeychainCredentialsProvider(_settings(tmp_path))  # a fresh process
    with pytest.raises(CredentialsError) as caught:
        await reader.get_access_token(7)
    assert TOKEN not in str(caught.value)
    with pytest.raises(CredentialsError):
        await reader.read_credentials()
    # a write does not "repair" the file by replacing what it could not read
    if not corruption.startswith("entr"):
        with pytest.raises(CredentialsError):
            await reader.set_secret("x", "y")
        assert path.read_bytes() == corrupt
    assert TOKEN not in caplog.text


async def test_the_key_cache_counts_a_failed_lookup_as_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the real provider on a corrupted file: no exception out of `view`, the
    token and the key are unknown (the evaluation fails closed), one log line, no secret
    in it; once the file is good again the keys come back after the miss TTL."""
    provider = await _filled(tmp_path)
    path = tmp_path / "keyring.json"
    good = path.read_bytes()
    _edit(path, lambda d: d.pop("salt"))

    async def fetch(request: KeyRequest) -> bytes | str | None:
        if request.kind == "token":
            return await provider.get_access_token(int(request.name))
        return await provider.get_signing_key(request.name)

    now = [100.0]
    cache = KeyCache(fetch, ttl_s=30, miss_ttl_s=5, clock=lambda: now[0])
    wanted = {KeyRequest("token", "7"), KeyRequest("signing", "agent-1")}
    caplog.set_level(logging.DEBUG)
    view = await cache.view(wanted)
    assert view.access_token(7) is None and view.signing_key("agent-1") is None
    failures = [r for r in caplog.records if "keychain lookup failed" in r.getMessage()]
    assert len(failures) == 1 and "CredentialsError" in failures[0].getMessage()
    assert TOKEN not in caplog.text

    await cache.view(wanted)  # a miss is kept for miss_ttl_s: not asked again
    assert cache.fetches == 2
    path.write_bytes(good)
    now[0] += 6
    view = await cache.view(wanted)
    assert view.access_token(7) == TOKEN and view.signing_key("agent-1") == SIGNING_KEY


async def test_the_key_cache_survives_any_exception_of_a_fetch() -> None:
    """Whatever escapes a fetch (a backend bug, a KeyError) is a miss for that key
    only; the other keys of the same view are still answered."""

    async def fetch(request: KeyRequest) -> bytes | str | None:
        if request.name == "broken":
            raise KeyError("salt")
        return b"k" * 32

    cache = KeyCache(fetch)
    view = await cache.view({KeyRequest("signing", "broken"), KeyRequest("signing", "fine")})
    assert view.signing_key("broken") is None and view.signing_key("fine") == b"k" * 32


@pytest.mark.parametrize(
    "content",
    [b"\xffsecret-bytes", b'{"format": "agentstream-keyring", "entries": {"tok-sec'],
    ids=["not-utf8", "cut-json"],
)
async def test_an_unreadable_file_is_named_without_what_was_read(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "keyring.json").write_bytes(content)
    provider = KeychainCredentialsProvider(_settings(tmp_path))
    with pytest.raises(CredentialsError) as caught:
        await provider.get_secret("web.tokens")
    text = str(caught.value)
    assert str(tmp_path / "keyring.json") in text
    assert "0xff" not in text and "secret" not in text and "tok-sec" not in text, text
    assert (tmp_path / "keyring.json").read_bytes() == content  # nothing overwritten


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"", "is empty, not an agentstream keyring"),
        (b" \n", "holds only white space, not an agentstream keyring"),
        (b'{"format": "agentstream-keyring", "entries": {', "not JSON (line 1, column 47)"),
        (b"\xff\xfe", "not UTF-8 text (byte 0)"),
        (b"[" * 100_000, "nested too deeply"),
    ],
    ids=["empty", "white-space", "cut-json", "not-utf8", "deep"],
)
async def test_an_unreadable_file_is_said_in_words_not_as_an_exception_name(
    tmp_path: Path, content: bytes, said: str
) -> None:
    """A 0-byte keyring file (a `touch`, a copy cut short) said only "JSONDecodeError"."""
    (tmp_path / "keyring.json").write_bytes(content)
    provider = KeychainCredentialsProvider(_settings(tmp_path))
    with pytest.raises(CredentialsError) as caught:
        await provider.get_secret("web.tokens")
    text = str(caught.value)
    assert str(tmp_path / "keyring.json") in text and said in text, text
    assert "Error" not in text and "\n" not in text, text
    with pytest.raises(CredentialsError):  # never taken for a new keyring and written
        await provider.set_secret("x", "y")
    assert (tmp_path / "keyring.json").read_bytes() == content
