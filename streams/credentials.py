"""Secrets in the OS keychain (via `keyring`), never in events, settings files or logs.

`KeychainCredentialsProvider` stores, under the service `AGENTSTREAM_KEYRING_SERVICE`:

=========================  ===============================================================
entry (keyring username)   value
=========================  ===============================================================
``credentials.user_id``    the user id of `write_credentials`
``access_token.<user>``    that user's access token (also what `enforce_policy` checks)
``signing_key.<agent>``    base64 HMAC-SHA256 key an agent signs its messages with
``encryption_key.<id>``    base64 AES-256 key of message envelopes naming key id ``<id>``
``<name>``                 generic secrets, e.g. ``llm.openai.api_key``
=========================  ===============================================================

The backend is chosen by `AGENTSTREAM_KEYRING_BACKEND` from an allow-list (`BACKENDS`);
unset means "the OS keychain" (Secret Service, macOS Keychain, Windows Credential
Locker, KWallet). With no acceptable backend the provider fails closed with a
`CredentialsError`: `keyring`'s own choice can be a plaintext file (keyrings.alt) or the
`fail`/`null` backends, and none of those is ever taken unless named explicitly.

All keyring calls run in a thread (`asyncio.to_thread`): backends do file or D-Bus I/O.

The credentials chain
---------------------
Containers have no keychain. `AGENTSTREAM_SECRET_SOURCES` names where an entry is
looked up, in order; the first source that has it wins:

* ``keychain`` — the backend above (the default, and the only source when unset);
* ``env`` — the variable ``AGENTSTREAM_SECRET_<ENTRY>``: the entry upper-cased, every
  character other than A-Z and 0-9 as ``_`` (``kafka.sasl_password`` →
  ``AGENTSTREAM_SECRET_KAFKA_SASL_PASSWORD``);
* ``dir`` — the file ``$AGENTSTREAM_SECRETS_DIR/<entry>`` (Docker and Kubernetes
  secrets), one trailing newline ignored.

An entry none of them has is missing (None): callers fail closed on it. Writes and
deletes go to the first *writable* source of the list (keychain, then dir); env is
read-only. `update_secret` instead changes an entry in the source it is read from (and
refuses when that is env), for entries a change must reach every reader of (the web
token index, the cluster token). Without ``keychain`` in the list no keyring backend is
even resolved, so a container without one starts. Values are never logged: errors name
the entry and the source, never what was read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import importlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError
from pydantic import BaseModel, ConfigDict, SecretStr

from agentstream.streams.errors import CredentialsError, CredentialsNotFound
from agentstream.streams.settings import (
    ALT_ENCRYPTED_FILE,
    ENCRYPTED_FILE,
    KEYRING_BACKENDS,
    OS_BACKENDS,
    PLAINTEXT_FILE,
    Settings,
    get_settings,
    keyring_backend_problem,
)

T = TypeVar("T")

#: everything AGENTSTREAM_KEYRING_BACKEND may name (declared with the settings, which
#: refuse any other name)
BACKENDS = KEYRING_BACKENDS
#: systemd `LoadCredential=` name of the master password of the encrypted file keyring
SYSTEMD_PASSWORD_CREDENTIAL = "agentstream-keyring-password"  # noqa: S105 - a name

USER_ID_ENTRY = "credentials.user_id"


class Credentials(BaseModel):
    model_config = ConfigDict(frozen=True)

    user_id: int
    access_token: SecretStr


def mask(secret: str) -> str:
    """What a human may see of a secret: its length and, for long ones, the last 4."""
    if len(secret) >= 16:
        return f"****{secret[-4:]} ({len(secret)} chars)"
    return f"******** ({len(secret)} chars)"


# -- the encrypted file backend ---------------------------------------------------------
class EncryptedFileKeyring(KeyringBackend):
    """A file keyring for headless servers, built on `cryptography` only.

    One JSON file; each value is sealed with AES-256-GCM under a key derived from the
    master password with scrypt (salt per file), with ``service\\0username`` as associated
    data so entries cannot be swapped. A check value detects a wrong password before
    anything is written. Writes are atomic (temp file + rename, mode 0600) and serialised
    across processes with a lock file.
    """

    priority = 0  # never picked by keyring on its own
    SCRYPT_N = 2**15
    CHECK = b"agentstream keyring check"

    def __init__(self, path: Path, password: str) -> None:
        super().__init__()
        if not password:
            raise CredentialsError("the encrypted file keyring needs a master password")
        self.path = Path(path)
        self._password = password.encode()
        self._aead: AESGCM | None = None
        self._salt: bytes | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<EncryptedFileKeyring at {self.path}>"

    # file handling
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(f"{self.path}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self._read())
        except FileNotFoundError:
            salt = os.urandom(16)
            data = {
                "format": "agentstream-keyring",
                "version": 1,
                "kdf": "scrypt",
                "salt": base64.b64encode(salt).decode(),
                "n": self.SCRYPT_N,
                "entries": {},
            }
            aead = self._cipher(data)
            data["check"] = self._seal(aead, self.CHECK, b"check")
            return data
        except (OSError, ValueError, RecursionError) as exc:
            # a reason of our own words: a decoding error's text quotes bytes of the
            # file, and no error here shows what was read
            raise CredentialsError(
                f"cannot read keyring file {self.path}: {_unreadable(exc)}"
            ) from None
        if not isinstance(data, dict) or data.get("format") != "agentstream-keyring":
            raise CredentialsError(f"{self.path} is not an agentstream keyring file")
        if not isinstance(data.get("entries"), dict) or not isinstance(data.get("salt"), str):
            raise CredentialsError(f"keyring file {self.path} is corrupt")
        try:
            aead = self._cipher(data)
        except Exception as exc:  # a salt or work factor that is not one: fail closed
            raise CredentialsError(
                f"keyring file {self.path} is corrupt ({type(exc).__name__})"
            ) from None
        try:
            ok = self._open(aead, data["check"], b"check") == self.CHECK
        except (InvalidTag, KeyError, ValueError, TypeError, binascii.Error):
            ok = False
        if not ok:
            raise CredentialsError(f"wrong master password for keyring file {self.path}")
        return data

    def _read(self) -> str:
        raw = self.path.read_bytes()
        if not raw.strip():
            # a `touch`, a copy cut short: said as such, not as a JSONDecodeError (and
            # never taken for a new keyring: a write would then replace what was lost)
            what = "holds only white space" if raw else "is empty"
            raise CredentialsError(
                f"keyring file {self.path} {what}, not an agentstream keyring: restore it, "
                "or remove it to start a new one"
            )
        return raw.decode("utf-8")

    def _store(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def _cipher(self, data: dict[str, Any]) -> AESGCM:
        salt = base64.b64decode(data["salt"])
        if self._aead is None or self._salt != salt:
            key = Scrypt(
                salt=salt, length=32, n=int(data.get("n", self.SCRYPT_N)), r=8, p=1
            ).derive(self._password)
            self._aead, self._salt = AESGCM(key), salt
        return self._aead

    @staticmethod
    def _seal(aead: AESGCM, plain: bytes, aad: bytes) -> str:
        nonce = os.urandom(12)
        return base64.b64encode(nonce + aead.encrypt(nonce, plain, aad)).decode()

    @staticmethod
    def _open(aead: AESGCM, sealed: str, aad: bytes) -> bytes:
        raw = base64.b64decode(sealed)
        return aead.decrypt(raw[:12], raw[12:], aad)

    @staticmethod
    def _entry(service: str, username: str) -> str:
        return f"{service}\x00{username}"

    # KeyringBackend
    def get_password(self, service: str, username: str) -> str | None:
        with self._locked():
            data = self._load()
        entry = self._entry(service, username)
        sealed = data["entries"].get(entry)
        if sealed is None:
            return None
        try:
            return self._open(self._cipher(data), sealed, entry.encode()).decode()
        except (InvalidTag, ValueError, TypeError, binascii.Error):
            raise CredentialsError(f"entry {username!r} in {self.path} is corrupt") from None

    def set_password(self, service: str, username: str, password: str) -> None:
        entry = self._entry(service, username)
        with self._locked():
            data = self._load()
            data["entries"][entry] = self._seal(
                self._cipher(data), password.encode(), entry.encode()
            )
            self._store(data)

    def delete_password(self, service: str, username: str) -> None:
        with self._locked():
            data = self._load()
            if data["entries"].pop(self._entry(service, username), None) is None:
                raise PasswordDeleteError("not found")
            self._store(data)


def _unreadable(exc: BaseException) -> str:
    """Why a keyring file could not be read, without quoting any of it."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON (line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start})"
    if isinstance(exc, RecursionError):
        return "not a keyring file: nested too deeply"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


# -- backend selection ------------------------------------------------------------------
def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__name__}"


def _master_password(settings: Settings) -> str:
    if settings.keyring_password is not None:
        value = settings.keyring_password.get_secret_value()
        if value:
            return value
    creds_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds_dir:
        candidate = Path(creds_dir) / SYSTEMD_PASSWORD_CREDENTIAL
        if candidate.is_file():
            return candidate.read_text().rstrip("\n")
    raise CredentialsError(
        "the encrypted file keyring needs a master password: set AGENTSTREAM_KEYRING_PASSWORD "
        f"or a systemd credential {SYSTEMD_PASSWORD_CREDENTIAL!r} (LoadCredential=)"
    )


def _keyring_file(settings: Settings, name: str) -> Path:
    if settings.keyring_file is None:
        raise CredentialsError(f"keyring backend {name!r} needs AGENTSTREAM_KEYRING_FILE")
    path = Path(settings.keyring_file)
    if path.is_dir():
        # else reads say "not in the keychain" and writes name an IsADirectoryError
        raise CredentialsError(f"AGENTSTREAM_KEYRING_FILE={str(path)!r} is a directory")
    return path


def resolve_backend(settings: Settings) -> KeyringBackend:
    """The backend named by the settings, or the OS keychain; else `CredentialsError`."""
    name = settings.keyring_backend
    if not name:
        return _os_backend()
    path = BACKENDS.get(name.strip())
    if path is None:  # `Settings` refuses such a name: only settings built around it
        raise CredentialsError(f"keyring backend {name!r} {keyring_backend_problem()}")
    if path == ENCRYPTED_FILE:
        return EncryptedFileKeyring(_keyring_file(settings, name), _master_password(settings))
    if path == PLAINTEXT_FILE:
        from keyrings.alt.file import PlaintextKeyring

        plain = PlaintextKeyring()
        plain.file_path = str(_keyring_file(settings, name))
        return plain
    if path == ALT_ENCRYPTED_FILE:
        return _alt_encrypted(settings, name)
    module_name, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
        backend = cls()
        if cls.priority <= 0:  # keyring's signal that the backend cannot work here
            raise RuntimeError("not usable on this system")
    except Exception as exc:
        raise CredentialsError(f"keyring backend {name!r} is not available here: {exc}") from None
    return backend


def _os_backend() -> KeyringBackend:
    import keyring.backend

    candidates = [
        b
        for b in keyring.backend.get_all_keyring()
        if _class_path(b) in OS_BACKENDS and b.priority > 0
    ]
    if not candidates:
        raise CredentialsError(
            "no OS keychain is available (Secret Service, macOS Keychain, Windows Credential "
            "Locker, KWallet); on a headless server set AGENTSTREAM_KEYRING_BACKEND=encrypted-file "
            "with AGENTSTREAM_KEYRING_FILE and a master password. No plaintext fallback is used."
        )
    return max(candidates, key=lambda b: b.priority)


def _alt_encrypted(settings: Settings, name: str) -> KeyringBackend:
    try:
        from keyrings.alt.file import EncryptedKeyring

        EncryptedKeyring._get_crypto_impl()
    except ImportError:
        raise CredentialsError(
            f"keyring backend {name!r} needs pycryptodome; use 'encrypted-file' instead"
        ) from None
    backend = EncryptedKeyring()
    backend.file_path = str(_keyring_file(settings, name))
    backend.keyring_key = _master_password(settings)
    reference = ("keyring-setting", "password reference", "password reference value")
    try:
        if backend._check_file():
            if backend.get_password(*reference[:2]) != reference[2]:
                raise ValueError
        else:
            backend.set_password(*reference)
            backend._write_config_value("keyring-setting", "scheme", backend.scheme)
            backend._write_config_value("keyring-setting", "version", backend.version)
    except (AssertionError, ValueError, UnicodeDecodeError):
        raise CredentialsError(f"wrong master password for {backend.file_path}") from None
    return backend


# -- the provider -----------------------------------------------------------------------
#: prefix of the `env` secret source's variables
SECRET_ENV_PREFIX = "AGENTSTREAM_SECRET_"  # noqa: S105 - a name
#: what an entry name may be in the `dir` source: no separators, no dot-files, no `..`
_ENTRY_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@=+-]*")


def secret_env_name(entry: str) -> str:
    """The `env` source's variable for an entry (`kafka.sasl_password` →
    `AGENTSTREAM_SECRET_KAFKA_SASL_PASSWORD`)."""
    return SECRET_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", entry.upper())


class SecretSource:
    """One place secrets are read from (and maybe written to); all calls are blocking."""

    name = ""
    writable = False

    def get(self, entry: str) -> str | None:
        raise NotImplementedError

    def set(self, entry: str, value: str) -> None:
        raise CredentialsError(f"the {self.name} secret source is read-only")

    def delete(self, entry: str) -> None:
        raise CredentialsError(f"the {self.name} secret source is read-only")


class KeychainSource(SecretSource):
    name = "keychain"
    writable = True

    def __init__(self, backend: KeyringBackend, service: str) -> None:
        self.backend, self.service = backend, service

    def get(self, entry: str) -> str | None:
        return self.backend.get_password(self.service, entry)

    def set(self, entry: str, value: str) -> None:
        self.backend.set_password(self.service, entry, value)

    def delete(self, entry: str) -> None:
        try:
            self.backend.delete_password(self.service, entry)
        except PasswordDeleteError:
            raise CredentialsNotFound(f"no entry {entry!r} in the keychain") from None


class EnvSource(SecretSource):
    """`AGENTSTREAM_SECRET_<ENTRY>` variables, read when asked (never cached)."""

    name = "env"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = environ

    def get(self, entry: str) -> str | None:
        env = os.environ if self.environ is None else self.environ
        value = env.get(secret_env_name(entry))
        return value or None  # an empty variable is no secret


class DirSource(SecretSource):
    """One file per entry (`/run/secrets/<entry>`), as Docker and Kubernetes mount them."""

    name = "dir"
    writable = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _file(self, entry: str) -> Path:
        # an entry is a file name, never a path: `../x` or `a/b` would read elsewhere
        if not _ENTRY_FILE.fullmatch(entry) or ".." in entry:
            raise CredentialsError(f"entry {entry!r} cannot be a file in the secrets dir")
        return self.path / entry

    def get(self, entry: str) -> str | None:
        try:
            text = self._file(entry).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise CredentialsError(f"secrets dir entry {entry!r} is a directory") from None
        except NotADirectoryError:  # made a file since the settings were checked
            raise CredentialsError(
                f"AGENTSTREAM_SECRETS_DIR={str(self.path)!r} is not a directory"
            ) from None
        text = text[:-1] if text.endswith("\n") else text
        text = text[:-1] if text.endswith("\r") else text
        return text or None

    def set(self, entry: str, value: str) -> None:
        target = self._file(entry)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = target.with_name(f".{entry}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(value)
        os.replace(tmp, target)

    def delete(self, entry: str) -> None:
        try:
            self._file(entry).unlink()
        except FileNotFoundError:
            raise CredentialsNotFound(f"no entry {entry!r} in {self.path}") from None


def secret_sources(
    settings: Settings, *, backend: KeyringBackend | None = None
) -> list[SecretSource]:
    """The chain AGENTSTREAM_SECRET_SOURCES names, in its order. The keyring backend is
    resolved only when `keychain` is in it (a container has none to resolve)."""
    out: list[SecretSource] = []
    for name in settings.secret_source_list:
        if name == "keychain":
            out.append(
                KeychainSource(
                    backend if backend is not None else resolve_backend(settings),
                    settings.keyring_service,
                )
            )
        elif name == "env":
            out.append(EnvSource())
        elif name == "dir":
            out.append(DirSource(settings.secrets_dir))
    return out


class KeychainCredentialsProvider:
    """Async access to the pipeline's secrets through the credentials chain (see the
    module doc); the name stays from when the keychain was the only source."""

    def __init__(self, settings: Settings | None = None, *, backend: KeyringBackend | None = None):
        self.settings = settings or get_settings()
        self.service = self.settings.keyring_service
        self.sources = secret_sources(self.settings, backend=backend)
        keychains = [s for s in self.sources if isinstance(s, KeychainSource)]
        #: the keyring backend, when the chain has one
        self.backend: KeyringBackend | None = keychains[0].backend if keychains else None

    @property
    def backend_name(self) -> str:
        names = [
            _class_path(s.backend) if isinstance(s, KeychainSource) else s.name
            for s in self.sources
        ]
        return " > ".join(names)

    def _source_name(self, source: SecretSource) -> str:
        if isinstance(source, KeychainSource):
            return f"keychain {_class_path(source.backend)}"
        return f"secret source {source.name}"

    async def _call(self, source: SecretSource, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except CredentialsError:
            raise
        except Exception as exc:
            # Whatever a source raises on a corrupt or unreadable store (KeyringError,
            # OSError, KeyError, ValueError, InvalidTag, a JSON error...) fails closed as
            # a CredentialsError. Only the type is reported: an exception's text could
            # quote what it read.
            raise CredentialsError(
                f"{self._source_name(source)} failed: {type(exc).__name__}"
            ) from None

    @property
    def write_target(self) -> str:
        """Where `set_*` stores an entry (the first writable source), for messages."""
        source = self._writable()
        if isinstance(source, DirSource):
            return f"the secrets dir {source.path}"
        return self._source_name(source)

    def _writable(self) -> SecretSource:
        for source in self.sources:
            if source.writable:
                return source
        raise CredentialsError(
            f"no writable secret source in AGENTSTREAM_SECRET_SOURCES="
            f"{self.settings.secret_sources!r} (keychain or dir)"
        )

    async def _get(self, entry: str) -> str | None:
        for source in self.sources:
            value = await self._call(source, source.get, entry)
            if value is not None:
                return value
        return None

    def get_secret_sync(self, name: str) -> str | None:
        """`get_secret` for code that builds clients outside an event loop."""
        found = self.locate(name)
        return found[1] if found else None

    def locate(self, name: str) -> tuple[str, str] | None:
        """(source name, value) of the first source that has the entry (blocking)."""
        found = self._find(name)
        return (found[0].name, found[1]) if found else None

    def _find(self, entry: str) -> tuple[SecretSource, str] | None:
        """The first source that has the entry, and its value: the one a read answers
        from (blocking)."""
        for source in self.sources:
            try:
                value = source.get(entry)
            except CredentialsError:
                raise
            except Exception as exc:  # as `_call`: the type only
                raise CredentialsError(
                    f"{self._source_name(source)} failed: {type(exc).__name__}"
                ) from None
            if value is not None:
                return source, value
        return None

    async def _set(self, entry: str, value: str) -> None:
        if not value:
            raise CredentialsError(f"refusing to store an empty value for {entry!r}")
        source = self._writable()
        await self._call(source, source.set, entry, value)

    def _holder(self, entry: str) -> SecretSource | None:
        """The source a read of the entry answers from (blocking; as `locate`)."""
        found = self._find(entry)
        return found[0] if found else None

    def _update(self, entry: str, value: str) -> str:
        # A value written to the first writable source would be shadowed by a read-only
        # source (env) that holds the entry ahead of it, and a source further down that
        # holds it would keep the old value for a process that reads only that one: so
        # the change goes where the entry is read from, and is read back.
        if not value:
            raise CredentialsError(f"refusing to store an empty value for {entry!r}")
        holder = self._holder(entry)
        if holder is None:
            holder = self._writable()
        elif not holder.writable:
            where = f" ({secret_env_name(entry)})" if isinstance(holder, EnvSource) else ""
            raise CredentialsError(
                f"secret {entry} is read from the {holder.name} secret source{where}, "
                "which is read-only: change it there, or unset it to manage it here; "
                "nothing was changed"
            )
        try:
            holder.set(entry, value)
        except CredentialsError:
            raise
        except Exception as exc:
            raise CredentialsError(
                f"{self._source_name(holder)} failed: {type(exc).__name__}"
            ) from None
        found = self.locate(entry)
        if found is None or found[1] != value:
            # another writer in between, or a source that did not keep it
            raise CredentialsError(
                f"secret {entry} was written to the {holder.name} secret source but reads "
                f"back {'missing' if found is None else 'different, from ' + found[0]}: "
                "check the sources and retry"
            )
        return holder.name

    async def update_secret(self, name: str, value: str) -> str:
        """Change an entry where it is read from: the first source that has it (the first
        writable one when none has), refusing when that one is read-only (env), then
        read it back through the chain. Returns the source's name. Unlike `set_secret`
        (which stores to the first writable source) a reader of the chain is sure to see
        the new value."""
        return await asyncio.to_thread(self._update, name, value)

    async def _delete(self, entry: str, *, missing_ok: bool = True) -> None:
        source = self._writable()
        try:
            await self._call(source, source.delete, entry)
        except CredentialsNotFound:
            if not missing_ok:
                raise

    # user credentials
    async def read_credentials(self) -> Credentials | None:
        raw_id = await self._get(USER_ID_ENTRY)
        if raw_id is None:
            return None
        try:
            user_id = int(raw_id)
        except ValueError:
            raise CredentialsError(f"keychain entry {USER_ID_ENTRY!r} is not an integer") from None
        token = await self.get_access_token(user_id)
        if token is None:
            return None
        return Credentials(user_id=user_id, access_token=SecretStr(token))

    async def write_credentials(self, user_id: int, access_token: str | SecretStr) -> None:
        token = (
            access_token.get_secret_value() if isinstance(access_token, SecretStr) else access_token
        )
        await self._set(f"access_token.{int(user_id)}", token)
        await self._set(USER_ID_ENTRY, str(int(user_id)))

    async def delete_credentials(self) -> None:
        raw_id = await self._get(USER_ID_ENTRY)
        if raw_id is not None:
            with contextlib.suppress(ValueError):
                await self._delete(f"access_token.{int(raw_id)}")
        await self._delete(USER_ID_ENTRY)

    async def get_access_token(self, user_id: int) -> str | None:
        return await self._get(f"access_token.{int(user_id)}")

    # keys
    async def get_signing_key(self, agent_id: str) -> bytes | None:
        return await self._get_key(f"signing_key.{agent_id}")

    async def set_signing_key(self, agent_id: str, key: bytes) -> None:
        await self._set(f"signing_key.{agent_id}", base64.b64encode(key).decode())

    async def delete_signing_key(self, agent_id: str) -> None:
        await self._delete(f"signing_key.{agent_id}")

    async def get_encryption_key(self, key_id: str) -> bytes | None:
        return await self._get_key(f"encryption_key.{key_id}")

    async def set_encryption_key(self, key_id: str, key: bytes) -> None:
        if len(key) != 32:
            raise CredentialsError("an encryption key must be 32 bytes (AES-256)")
        await self._set(f"encryption_key.{key_id}", base64.b64encode(key).decode())

    async def delete_encryption_key(self, key_id: str) -> None:
        await self._delete(f"encryption_key.{key_id}")

    async def _get_key(self, entry: str) -> bytes | None:
        raw = await self._get(entry)
        if raw is None:
            return None
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise CredentialsError(f"keychain entry {entry!r} is not base64") from None

    # generic secrets
    async def get_secret(self, name: str) -> str | None:
        return await self._get(name)

    async def set_secret(self, name: str, value: str) -> None:
        await self._set(name, value)

    async def delete_secret(self, name: str) -> None:
        await self._delete(name)


__all__ = [
    "BACKENDS",
    "Credentials",
    "CredentialsError",
    "CredentialsNotFound",
    "EncryptedFileKeyring",
    "KeychainCredentialsProvider",
    "SecretSource",
    "mask",
    "resolve_backend",
    "secret_env_name",
    "secret_sources",
]
