"""How every Kafka client of the pipeline connects: TLS, SASL, and the secrets they need.

Every client — the Faust worker (`faust_credentials`, handed to `faust.App` as its
broker credentials), `streams.client`, `streams.admin`, the CLI commands and the bench —
is built by the factories here (`new_producer`, `new_consumer`, `new_admin`), so none is
left connecting in plaintext to a secured cluster.

Settings (``AGENTSTREAM_KAFKA_*``, see `streams.settings`): the security protocol, the
SASL mechanism and username, a CA file (unset: the system trust store), a client
certificate and key for mutual TLS, hostname checking. Secrets come from the credentials
chain (`streams.credentials`), never from a setting: the SASL password is the entry
``kafka.sasl_password``, a client key's password ``kafka.ssl_key_password``.

Failing fast, with the cause
----------------------------
aiokafka logs why a bootstrap connection failed and raises a bare "Unable to bootstrap";
a client whose password is wrong or whose CA does not match the broker would leave the
user guessing (or, in a worker, retrying forever). The factories' clients start within
``AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S`` or raise one of:

* `BrokerAuthError` (not retriable) — the broker refused who we are: SASL credentials
  rejected, a mechanism it does not enable, a client certificate it does not accept, or
  its own certificate not trusted by us. The message names which.
* `BrokerError` (retriable) — the broker could not be reached at all.

aiokafka's bootstrap only logs the cause (SASL errors included). So once a start has
failed, the cause is found by probing the first bootstrap address: `probe_tls` (one TLS
handshake with the same SSL context), then `probe_sasl` (one connection through
aiokafka's own SASL handshake, which raises what the broker said).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from pydantic import SecretStr

from agentstream.streams import record_batches
from agentstream.streams.errors import BrokerAuthError, BrokerError, CredentialsError
from agentstream.streams.settings import Settings, SettingsError

T = TypeVar("T")

PASSWORD_ENTRY = "kafka.sasl_password"  # noqa: S105 - an entry name
KEY_PASSWORD_ENTRY = "kafka.ssl_key_password"  # noqa: S105 - an entry name


@dataclass(frozen=True)
class KafkaSecurity:
    """The resolved connection options of one settings object (secrets included: never
    log or print this; its repr masks the password)."""

    protocol: str
    mechanism: str | None = None
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's producer, consumer and admin client."""
        opts: dict[str, Any] = {"security_protocol": self.protocol}
        if self.ssl_context is not None:
            opts["ssl_context"] = self.ssl_context
        if self.uses_sasl:
            assert self.password is not None  # `resolve` refuses SASL without one
            opts.update(
                sasl_mechanism=self.mechanism,
                sasl_plain_username=self.username,
                sasl_plain_password=self.password.get_secret_value(),
            )
        return opts

    def faust_credentials(self) -> Any:
        """The same for `faust.App(broker_credentials=...)` (None: plaintext)."""
        import faust

        if self.uses_sasl:
            assert self.password is not None
            return faust.SASLCredentials(
                username=self.username,
                password=self.password.get_secret_value(),
                ssl_context=self.ssl_context,
                mechanism=self.mechanism,
            )
        if self.uses_tls:
            return faust.SSLCredentials(self.ssl_context)
        return None


def ssl_context(settings: Settings, key_password: str | None = None) -> ssl.SSLContext:
    """The client SSL context of the settings; a bad file is one `SettingsError` line."""
    for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            raise SettingsError(f"{Settings.env_name(name)}: no such file {path}", field=name)
    try:
        ctx = create_ssl_context(cafile=settings.kafka_ssl_cafile)
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(
            f"AGENTSTREAM_KAFKA_SSL_CAFILE: not a PEM CA file ({_ssl_reason(exc)})",
            field="kafka_ssl_cafile",
        ) from None
    if settings.kafka_ssl_certfile is not None:
        try:
            ctx.load_cert_chain(
                settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile, password=key_password
            )
        except (ssl.SSLError, OSError) as exc:
            hint = (
                ""
                if key_password
                else f" (encrypted? its password is the secret {KEY_PASSWORD_ENTRY})"
            )
            raise SettingsError(
                "AGENTSTREAM_KAFKA_SSL_CERTFILE/KEYFILE: cannot load the client certificate "
                f"and key ({_ssl_reason(exc)}){hint}",
                field="kafka_ssl_certfile",
            ) from None
    # Hostname checking off still verifies the chain: it only drops the name match.
    ctx.check_hostname = settings.kafka_ssl_check_hostname
    return ctx


def _encrypted_key(settings: Settings) -> bool:
    """Whether the client key is a password-protected PEM (only then is its password
    looked up: an unencrypted key needs no keychain)."""
    try:
        return b"ENCRYPTED" in Path(settings.kafka_ssl_keyfile or "").read_bytes()[:4096]
    except OSError:
        return False  # `ssl_context` reports the missing file


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
    return str(reason or type(exc).__name__)


def resolve(settings: Settings, secrets: Any | None = None) -> KafkaSecurity:
    """Settings + secrets → connection options. `secrets` (a credentials provider, for
    tests) defaults to the chain of the settings; it is asked only for what the
    protocol needs, so a plaintext client never touches the keychain."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return KafkaSecurity(protocol)

    def secret(entry: str) -> str | None:
        nonlocal secrets
        if secrets is None:  # built only when a secret is needed: TLS alone needs none
            from agentstream.streams.credentials import KeychainCredentialsProvider

            secrets = KeychainCredentialsProvider(settings)
        value: str | None = secrets.get_secret_sync(entry)
        return value

    ctx = None
    if protocol in ("SSL", "SASL_SSL"):
        key_password = secret(KEY_PASSWORD_ENTRY) if _encrypted_key(settings) else None
        ctx = ssl_context(settings, key_password)
    password = None
    if protocol.startswith("SASL_"):
        raw = secret(PASSWORD_ENTRY)
        if not raw:
            raise CredentialsError(
                f"AGENTSTREAM_KAFKA_SECURITY_PROTOCOL={protocol} needs the secret "
                f"{PASSWORD_ENTRY} (the SASL password of {settings.kafka_sasl_username}); "
                f"none of the secret sources ({settings.secret_sources}) has it"
            )
        password = SecretStr(raw)
    return KafkaSecurity(
        protocol,
        mechanism=settings.kafka_sasl_mechanism,
        username=settings.kafka_sasl_username,
        password=password,
        ssl_context=ctx,
    )


@lru_cache(maxsize=8)
def security_of(settings: Settings) -> KafkaSecurity:
    """`resolve`, once per settings object: a worker builds clients often (chain heads,
    policy folds) and a keychain read can cost a key derivation."""
    return resolve(settings)


def client_options(settings: Settings, security: KafkaSecurity | None = None) -> dict[str, Any]:
    """bootstrap_servers plus the security options (of `security`, default the settings'
    own: `security_of`), for any aiokafka client."""
    sec = security or security_of(settings)
    return {"bootstrap_servers": settings.bootstrap, **sec.client_options()}


def faust_credentials(settings: Settings) -> Any:
    """Faust broker credentials for the settings, resolved when a client is built.

    `streams.app` creates the app at import, and every CLI command imports it (agent
    commands are found through autodiscovery): resolving here would read the keychain,
    and fail on a missing password, for `agentstream kafka stop` too. The worker reaches
    these only after `ensure_topics` connected with the same settings, so a problem is
    reported there first, as one line.
    """
    import faust
    from faust.types.auth import AuthProtocol, SASLMechanism

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol.startswith("SASL_"):

        class LazySASLCredentials(faust.SASLCredentials):
            @property
            def password(self) -> str:
                sec = security_of(settings)
                assert sec.password is not None
                return sec.password.get_secret_value()

            @property
            def ssl_context(self) -> ssl.SSLContext | None:
                return security_of(settings).ssl_context

        sasl = LazySASLCredentials.__new__(LazySASLCredentials)
        sasl.username = settings.kafka_sasl_username
        sasl.mechanism = SASLMechanism(settings.kafka_sasl_mechanism)
        sasl.protocol = AuthProtocol(protocol)
        return sasl

    class LazySSLCredentials(faust.SSLCredentials):
        @property
        def context(self) -> ssl.SSLContext | None:
            return security_of(settings).ssl_context

    return LazySSLCredentials.__new__(LazySSLCredentials)


# -- failing fast with the cause ---------------------------------------------------------
async def probe_tls(
    settings: Settings, security: KafkaSecurity | None = None, timeout_s: float = 5.0
) -> str | None:
    """One TLS handshake with the clients' SSL context against the first bootstrap
    address: why it fails (None: it does not, or nothing to probe)."""
    sec = security or security_of(settings)
    if sec.ssl_context is None:
        return None
    host, _, port = settings.bootstrap.split(",")[0].strip().rpartition(":")
    host = host.strip("[]")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    except (OSError, TimeoutError):
        # Nothing answers at that address (refused, unreachable, no such host, silent):
        # an outage, not a TLS problem. `connect_error` says so with a retriable
        # BrokerError, as for a plaintext client; a caller retrying on `retriable` must
        # not give up on a cluster that is down because it speaks TLS.
        return None
    try:
        await asyncio.wait_for(writer.start_tls(sec.ssl_context, server_hostname=host), timeout_s)
    except ssl.SSLCertVerificationError as exc:
        writer.close()
        where = settings.kafka_ssl_cafile or "the system trust store"
        return (
            f"the broker's certificate is not trusted ({exc.verify_message}; CA from {where}, "
            f"hostname check {'on' if settings.kafka_ssl_check_hostname else 'off'})"
        )
    except ssl.SSLError as exc:
        writer.close()
        return f"the TLS handshake failed ({_ssl_reason(exc)})"
    except (OSError, TimeoutError) as exc:
        # something accepted the connection but no TLS came of it: a plaintext listener
        # (the wrong protocol for the port) or a proxy that cuts it
        writer.close()
        return f"no TLS connection ({_ssl_reason(exc)})"
    try:
        # Under TLS 1.3 a broker refuses a client certificate (or its absence) after the
        # handshake, with an alert the first read raises; a broker that accepted us just
        # waits for a request, and the read times out.
        await asyncio.wait_for(reader.read(1), 1.0)
    except ssl.SSLError as exc:
        text = str(exc).upper()
        refused = (
            "CERTIFICATE_REQUIRED",
            "BAD_CERTIFICATE",
            "CERTIFICATE_UNKNOWN",
            "UNKNOWN_CA",
            "HANDSHAKE_FAILURE",
        )
        if settings.kafka_ssl_certfile is None and any(x in text for x in refused):
            # we sent none: whatever the alert's name (Java says bad_certificate)
            return "the broker requires a client certificate (AGENTSTREAM_KAFKA_SSL_CERTFILE)"
        if any(x in text for x in refused):
            return (
                "the broker does not accept our client certificate (unknown CA or bad certificate)"
            )
        return f"the broker closed the TLS connection ({_ssl_reason(exc)})"
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
    return None


_SASL_REFUSED = (SaslAuthenticationFailed, AuthenticationFailedError, UnsupportedSaslMechanismError)


#: the broker knows who we are but its ACLs do not let us do this
_NOT_AUTHORIZED = (
    ClusterAuthorizationFailedError,
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)


def principal(settings: Settings) -> str:
    """Who these settings connect as, for messages (the broker may map it further)."""
    if settings.kafka_security_protocol.startswith("SASL_"):
        return f"User:{settings.kafka_sasl_username}"
    if settings.kafka_ssl_certfile is not None:
        return f"the client certificate {settings.kafka_ssl_certfile.name}"
    return "User:ANONYMOUS"


async def probe_sasl(
    settings: Settings, security: KafkaSecurity | None = None, timeout_s: float = 5.0
) -> BaseException | None:
    """One connection with aiokafka's own handshake against the first bootstrap address:
    the SASL error it raises (aiokafka's bootstrap only logs it), or None."""
    from aiokafka.conn import create_conn

    sec = security or security_of(settings)
    host, _, port = settings.bootstrap.split(",")[0].strip().rpartition(":")
    try:
        conn = await asyncio.wait_for(
            create_conn(
                host.strip("[]"),
                int(port),
                ssl_context=sec.ssl_context,
                security_protocol=sec.protocol,
                sasl_mechanism=sec.mechanism,
                sasl_plain_username=sec.username,
                sasl_plain_password=sec.password.get_secret_value() if sec.password else None,
            ),
            timeout_s,
        )
    except (
        SaslAuthenticationFailed,
        AuthenticationFailedError,
        UnsupportedSaslMechanismError,
    ) as e:
        return e
    except (OSError, KafkaError, TimeoutError):
        return None
    conn.close()
    return None


async def connect_error(
    settings: Settings, exc: BaseException, what: str, security: KafkaSecurity | None = None
) -> BrokerError:
    """The one-line error for a client that could not start (see the module doc);
    `security`: the client's own (default: the settings')."""
    where = f"Kafka at {settings.bootstrap} ({settings.kafka_security_protocol})"
    if isinstance(exc, SaslAuthenticationFailed | AuthenticationFailedError):
        return BrokerAuthError(
            f"{what}: {where} refused the SASL login of {settings.kafka_sasl_username!r} "
            f"({settings.kafka_sasl_mechanism}): wrong username or password "
            f"(secret {PASSWORD_ENTRY})"
        )
    if isinstance(exc, _NOT_AUTHORIZED):
        return BrokerAuthError(
            f"{what}: {where}: {principal(settings)} is not authorized "
            f"({type(exc).__name__}); the ACLs each role needs: `agentstream acls`"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return BrokerAuthError(
            f"{what}: {where} does not enable SASL mechanism {settings.kafka_sasl_mechanism}"
        )
    sec = security or security_of(settings)
    tls = await probe_tls(settings, sec)
    if tls is not None:
        return BrokerAuthError(f"{what}: {where}: {tls}")
    if sec.uses_sasl:
        sasl = await probe_sasl(settings, sec)
        if sasl is not None:
            return await connect_error(settings, sasl, what, sec)
    if isinstance(exc, TimeoutError):
        return BrokerError(
            f"{what}: {where} did not answer within {settings.kafka_connect_timeout_s:g}s "
            "(AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S); is the protocol right for that port?"
        )
    # nothing answered: say what to do about it. aiokafka's "Unable to bootstrap from
    # [(host, port, family)]" only repeats the address.
    detail = "" if "Unable to bootstrap" in str(exc) else f" ({exc})"
    hint = (
        "is it running, and is AGENTSTREAM_KAFKA_BOOTSTRAP (the CLI's -b) right?"
        if settings.kafka_bootstrap
        else "start one with 'agentstream kafka start', or name one in "
        "AGENTSTREAM_KAFKA_BOOTSTRAP (the CLI's -b)"
    )
    return BrokerError(
        f"no broker at {settings.bootstrap} ({settings.kafka_security_protocol}){detail} — {hint}"
    )


#: set while `start_client` runs: aiokafka's bootstrap errors are then ours to report
_STARTING: contextvars.ContextVar[bool] = contextvars.ContextVar("_STARTING", default=False)


class _QuietWhileStarting(logging.Filter):
    """Drops aiokafka's "Unable connect to ..." records of a start `start_client` guards:
    its error names the same cause once (a CLI user gets one line, not three)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_STARTING.get() and record.levelno >= logging.WARNING)


for _name in ("aiokafka", "aiokafka.conn"):  # aiokafka.client logs as "aiokafka"
    logging.getLogger(_name).addFilter(_QuietWhileStarting())


async def start_client(
    client: Any, settings: Settings, what: str, security: KafkaSecurity | None = None
) -> None:
    """Start an aiokafka client within the connect timeout, or close it and raise the
    error that names the cause."""
    token = _STARTING.set(True)
    try:
        await asyncio.wait_for(client._start_unguarded(), settings.kafka_connect_timeout_s)
    except (TimeoutError, KafkaConnectionError, KafkaError, OSError) as exc:
        error = await connect_error(settings, exc, what, security)
        with contextlib.suppress(Exception):  # the cause is what the caller needs
            await asyncio.wait_for(_close(client), 5.0)
        raise error from None
    except BaseException:
        # cancelled (Ctrl-C while connecting to a listener that never answers): closed
        # too, or the interrupt ended in "Unclosed AIOKafkaConsumer" and a dump of it
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_close(client), 5.0)
        raise
    finally:
        _STARTING.reset(token)


async def _close(client: Any) -> None:
    if isinstance(client, AIOKafkaAdminClient):
        await client.close()
    else:
        await client.stop()


class _Guarded:
    """`start()` through `start_client`: a bounded start and an error with its cause."""

    _settings: Settings
    _what: str
    _security: KafkaSecurity

    async def start(self) -> None:
        await start_client(self, self._settings, self._what, self._security)

    async def _start_unguarded(self) -> None:
        await super().start()  # type: ignore[misc]


class Producer(_Guarded, AIOKafkaProducer):
    pass


class Consumer(_Guarded, AIOKafkaConsumer):
    pass


class Admin(_Guarded, AIOKafkaAdminClient):
    pass


#: aiokafka's request timeout when none is given (producer, consumer and admin client)
AIOKAFKA_REQUEST_TIMEOUT_MS = 40_000
#: how far a client's request timeout stays above the connect timeout
START_MARGIN_MS = 1_000


def request_timeout_ms(settings: Settings, options: dict[str, Any]) -> int:
    """The request timeout a client is built with: the one asked for (else aiokafka's
    default), but never below the connect timeout. aiokafka's bootstrap waits for the
    first metadata answer no longer than its request timeout, and gives up with "Unable
    to bootstrap" — read as "no broker": a 30 s admin client against a broker that
    accepted and did not answer said so after 30 s with AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S
    at 40. Kept above it, the start's own bound (`start_client`) is what ends the wait,
    at the time the setting says and with its message ("did not answer within ...")."""
    asked = int(options.get("request_timeout_ms", AIOKAFKA_REQUEST_TIMEOUT_MS))
    return max(asked, int(settings.kafka_connect_timeout_s * 1000) + START_MARGIN_MS)


def _guarded(cls: type[T], settings: Settings, what: str, secrets: Any, options: Any) -> T:
    # `secrets`: a provider for `resolve` (e.g. a password given to `streams.client`);
    # the client then connects, and names a failure, with what it resolves to
    sec = security_of(settings) if secrets is None else resolve(settings, secrets)
    options = {**options, "request_timeout_ms": request_timeout_ms(settings, options)}
    client: Any = cls(**client_options(settings, sec), **options)
    client._settings, client._what, client._security = settings, what, sec
    return client


def new_producer(
    settings: Settings, what: str = "producer", *, secrets: Any = None, **options: Any
) -> Producer:
    return _guarded(Producer, settings, what, secrets, options)


def new_consumer(
    settings: Settings, what: str = "consumer", *, secrets: Any = None, **options: Any
) -> Consumer:
    """A consumer connected as the settings say. Every consumer of the process then
    decompresses within the settings' limits and hands on stand-ins for what it cannot
    parse (`streams.record_batches`), whether or not the reader installs that itself:
    one that does not (the rule topics' folds, `llm ask`, the console) would otherwise
    read with aiokafka's decoders, which decompress a batch whole, however large."""
    record_batches.install(settings.max_decompressed_batch_bytes, settings.max_compression_ratio)
    return _guarded(Consumer, settings, what, secrets, options)


def new_admin(
    settings: Settings, what: str = "admin", *, secrets: Any = None, **options: Any
) -> Admin:
    return _guarded(Admin, settings, what, secrets, options)
