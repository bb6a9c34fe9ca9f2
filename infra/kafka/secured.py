"""A local single-node Kafka broker that authenticates every connection and authorizes
with ACLs: the test bed for the pipeline's TLS, SASL and ACL support.

Listeners (``port_base`` + offset, all on 127.0.0.1):

====  ==============  =========  ==================================================
+0    ``MTLS``        SSL        mutual TLS (``ssl.client.auth=required``); clients
                                 present a certificate of the CA, ``CN=<name>``
                                 becomes ``User:<name>``.  Also inter-broker.
+1    ``SASL_SSL``    SASL_SSL   SCRAM-SHA-256 and SCRAM-SHA-512 over TLS (server
                                 authentication only).
+2    ``CONTROLLER``  SSL        the KRaft controller; mutual TLS as well.
====  ==============  =========  ==================================================

There is no PLAINTEXT listener, so no connection is ever the ``ANONYMOUS`` principal.
The broker talks to itself (controller and inter-broker traffic) with its own
certificate, ``CN=agentstream-broker``.

Authorization: the ``StandardAuthorizer`` with ``allow.everyone.if.no.acl.found=false``;
the super users are ``User:admin`` (over either listener) and the broker's principal.
Everyone else (``worker``, ``producer``, ``auditor``, ``operator`` by default) may do
nothing until ACLs say so; add them with Kafka's own tool::

    kafka = SecuredKafka(Path("var/k"), port_base=19292)
    kafka.start()
    subprocess.run(kafka.java_class_command(
        "kafka.admin.AclCommand", "--bootstrap-server", kafka.sasl_ssl_bootstrap,
        "--command-config", str(kafka.admin_command_config()),
        "--add", "--allow-principal", "User:worker", "--operation", "Read",
        "--topic", "orders"), check=True)

Files under ``data_dir`` (created 0700; keys and secrets 0600):

* ``tls/ca.pem`` (:attr:`SecuredKafka.ca_file`) and ``tls/ca.key``; the broker's
  ``tls/broker.pem``/``broker.key`` (SANs 127.0.0.1 and localhost) and
  ``tls/broker-keystore.pem`` (key + chain, Kafka's PEM key store);
  ``tls/clients/<principal>.pem``/``.key`` from :meth:`SecuredKafka.client_cert`.
* ``scram-users.json``: the SCRAM password of every user, drawn at random.
* ``data/`` (the log dir), ``server.properties``, ``broker.log``, ``broker.pid``.

SCRAM users are written into the metadata log when the storage is formatted (first
start), so they exist before any client connects.  A user added to ``users`` later
is created on the running broker with ``kafka.admin.ConfigCommand``.  Passwords pass
the JVM's command line during that moment: this is a broker for local tests, not for
shared machines.

Readiness is checked twice: the launcher polls a Metadata request over mutual TLS
(with ``admin``'s certificate), then one SASL_SSL login as ``admin`` (SCRAM-SHA-512)
must succeed; a failure is a :class:`~infra.kafka.launcher.BrokerStartError` with the
tail of the broker log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature

from agentstream.infra.kafka import launcher, tls
from agentstream.infra.kafka.launcher import BrokerConfig, BrokerStartError, ProbeTLS

__all__ = [
    "BROKER_PRINCIPAL",
    "DEFAULT_USERS",
    "PORTS",
    "SCRAM_MECHANISMS",
    "SecuredKafka",
]

DEFAULT_USERS: Final = ("admin", "worker", "producer", "auditor", "operator")
#: The CN of the broker's own certificate; a super user, as the broker must be.
BROKER_PRINCIPAL: Final = "agentstream-broker"
SCRAM_MECHANISMS: Final = ("SCRAM-SHA-256", "SCRAM-SHA-512")
#: Listener ports used from ``port_base``.
PORTS: Final = 3
_ADMIN: Final = "admin"
_HEAP: Final = "-Xms128m -Xmx512m"
#: Names that survive the StorageTool's ``[name=...,password=...]`` syntax, the
#: principal mapping rule and a file name.
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SASL_CHECK_TIMEOUT_S: Final = 30.0
_TOOL_TIMEOUT_S: Final = 120.0
_SCRAM_MODULE: Final = "org.apache.kafka.common.security.scram.ScramLoginModule"


def _check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r}: use 1-64 of A-Z a-z 0-9 . _ - (not first)")
    if name == BROKER_PRINCIPAL:
        # Whoever holds it would be a super user: only the broker's own certificate.
        raise ValueError(f"{kind} {name!r} is reserved for the broker")
    return name


def _prop(value: str) -> str:
    # java.util.Properties reads backslashes as escapes.
    return value.replace("\\", "\\\\")


class SecuredKafka:
    """One secured single-node broker whose state lives in ``data_dir``.

    ``port_base`` .. ``port_base + 2`` are its listeners (see the module docstring).
    ``users`` are the SCRAM users; ``admin`` is always one of them.  Construction
    touches nothing on disk; :meth:`start` and :meth:`client_cert` create what is
    missing and reuse what exists (the CA, certificates and passwords of an earlier
    run stay valid, so a kept broker keeps working across test sessions).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port_base: int,
        users: Sequence[str] = DEFAULT_USERS,
        version: str | None = None,
        heap: str = _HEAP,
        start_timeout_s: float = launcher.DEFAULT_START_TIMEOUT_S,
    ) -> None:
        """Describe the broker; ``version`` defaults to ``AGENTSTREAM_KAFKA_VERSION``."""
        if isinstance(users, str):
            raise TypeError("users must be a sequence of names, not one string")
        self.root = Path(data_dir).resolve()
        self.users: tuple[str, ...] = tuple(
            dict.fromkeys(_check_name("user", u) for u in (_ADMIN, *users))
        )
        self.version = version or BrokerConfig.from_env().version
        self.heap = heap
        self.start_timeout_s = start_timeout_s
        self.host = launcher.DEFAULT_HOST
        self.mtls_port = port_base
        self.sasl_ssl_port = port_base + 1
        self.controller_port = port_base + 2
        if not 0 < port_base <= 65535 - PORTS:
            raise ValueError(f"port_base={port_base} leaves no room for {PORTS} ports")
        self.tls_dir = self.root / "tls"
        self.ca_file = self.tls_dir / "ca.pem"
        self._ca_key = self.tls_dir / "ca.key"
        self._broker_cert = self.tls_dir / "broker.pem"
        self._broker_key = self.tls_dir / "broker.key"
        self._keystore = self.tls_dir / "broker-keystore.pem"
        self.password_file = self.root / "scram-users.json"
        self.log_file = self.root / "broker.log"

    # ------------------------------------------------------------------ addresses

    @property
    def ssl_bootstrap(self) -> str:
        """``host:port`` of the mutual-TLS listener (``security_protocol="SSL"``)."""
        return f"{self.host}:{self.mtls_port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        """``host:port`` of the SASL_SSL listener (SCRAM-SHA-256 and -512)."""
        return f"{self.host}:{self.sasl_ssl_port}"

    @property
    def broker_principal(self) -> str:
        """The broker's own principal, ``User:agentstream-broker``."""
        return f"User:{BROKER_PRINCIPAL}"

    @property
    def config(self) -> BrokerConfig:
        """The launcher's view of this broker, for ``launcher.status`` and
        ``launcher.server_properties``.  It carries no SCRAM users: start the broker
        with :meth:`start`, never with ``launcher.start(config)``."""
        return self._config({})

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the broker, or reuse it if it already runs from this ``data_dir``.

        Returns once it answers over mutual TLS and accepts ``admin``'s SCRAM login;
        raises :class:`BrokerStartError` (with the log tail) otherwise.  A broker this
        call started and that then fails the login check is stopped again.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        with launcher._file_lock(self.root / "secured.lock"):
            self._ensure_tls()
            admin_cert, admin_key = self.client_cert(_ADMIN)
            stored = self._stored_passwords()
            formatted = (self.root / "data" / "meta.properties").is_file()
            new = [u for u in self.users if u not in stored]
            passwords = {**stored, **{u: secrets.token_urlsafe(24) for u in new}}
            if not formatted:
                # Formatting registers exactly the users in the file: write it first.
                self._write_passwords(passwords)
            cfg = self._config(passwords, probe=ProbeTLS(self.ca_file, admin_cert, admin_key))
            # AGENTSTREAM_KAFKA_BOOTSTRAP names the plaintext cluster of the other
            # tests; this broker is always the local one.
            was_running = launcher.status(cfg, use_external=False)["running"]
            launcher.start(cfg, use_external=False)
            try:
                if formatted and new:
                    self._add_scram_users(cfg, {u: passwords[u] for u in new})
                    self._write_passwords(passwords)
                self._check_sasl_login(passwords[_ADMIN])
            except BaseException:
                if not was_running:
                    launcher.stop(cfg, use_external=False)
                raise

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); its data, users and certs stay."""
        launcher.stop(self.config, use_external=False)

    def running(self) -> bool:
        """Whether a broker process of this ``data_dir`` is alive."""
        return bool(launcher.status(self.config, use_external=False)["running"])

    # ---------------------------------------------------------------- credentials

    def password(self, user: str) -> str:
        """The SCRAM password of ``user`` (valid for both mechanisms)."""
        if user not in self.users:
            raise KeyError(f"{user!r} is not one of this broker's users {self.users}")
        stored = self._stored_passwords()
        if user not in stored:
            raise KeyError(f"no password for {user!r} yet: start() the broker first")
        return stored[user]

    def client_cert(self, principal: str) -> tuple[Path, Path]:
        """``(cert PEM, key PEM)`` for ``CN=principal``, signed by the broker's CA.

        Made on first use and kept under ``tls/clients/``; a cached certificate that
        the current CA did not sign (the CA was replaced) is made anew.
        """
        _check_name("principal", principal)
        ca = self._ensure_tls()
        cert_file, key_file = self._client_paths(principal)
        # Processes sharing this broker (parallel test workers) ask for the same principal
        # at once: one checks and writes at a time, so nobody reads a certificate next to
        # the key of another or replaces a pair someone just got. Not `secured.lock`:
        # start() holds that one while it calls this.
        with launcher._file_lock(cert_file.parent / ".lock"):
            try:
                cached = tls.load_cert_key(cert_file, key_file)
                cached.cert.verify_directly_issued_by(ca.cert)
                if cached.common_name == principal:
                    return cert_file, key_file
            except (OSError, ValueError, TypeError, InvalidSignature):
                pass  # missing, unreadable or from another CA: replace it
            tls.write_cert_key(tls.make_cert(ca, principal, client=True), cert_file, key_file)
        return cert_file, key_file

    def admin_command_config(self) -> Path:
        """A client ``.properties`` file for Kafka's CLI classes: ``admin`` over SASL_SSL
        with SCRAM-SHA-512, trusting :attr:`ca_file` (mode 0600: it holds the password).

        Pass it as ``--command-config`` with ``--bootstrap-server``
        :attr:`sasl_ssl_bootstrap`.
        """
        path = self.root / "admin-client.properties"
        jaas = f'{_SCRAM_MODULE} required username="{_ADMIN}" password="{self.password(_ADMIN)}";'
        lines = [
            "# Written by infra/kafka/secured.py: User:admin over SASL_SSL (SCRAM-SHA-512).",
            "security.protocol=SASL_SSL",
            "sasl.mechanism=SCRAM-SHA-512",
            f"sasl.jaas.config={jaas}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={_prop(str(self.ca_file))}",
        ]
        tls.write_file(path, ("\n".join(lines) + "\n").encode())
        return path

    def java_class_command(self, main: str, *args: str) -> list[str]:
        """The argv that runs Kafka CLI class ``main`` (e.g. ``kafka.admin.AclCommand``)
        with the broker's jars; logs go to stderr at WARN, output to stdout."""
        return launcher.tool_command(self.config, main, *args)

    # ------------------------------------------------------------------- internals

    def _config(self, passwords: dict[str, str], *, probe: ProbeTLS | None = None) -> BrokerConfig:
        scram = [
            f"--add-scram={mechanism}=[name={user},password={password}]"
            for user, password in passwords.items()
            for mechanism in SCRAM_MECHANISMS
        ]
        if probe is None:
            probe = ProbeTLS(self.ca_file, *self._client_paths(_ADMIN))
        return BrokerConfig(
            version=self.version,
            data_dir=self.root / "data",
            host=self.host,
            port=self.mtls_port,
            controller_port=self.controller_port,
            log_file=self.log_file,
            pid_file=self.root / "broker.pid",
            heap=self.heap,
            start_timeout_s=self.start_timeout_s,
            extra_settings=self._settings(),
            format_args=tuple(scram),
            extra_ports=(self.sasl_ssl_port,),
            probe_tls=probe,
        )

    def _client_paths(self, principal: str) -> tuple[Path, Path]:
        clients = self.tls_dir / "clients"
        return clients / f"{principal}.pem", clients / f"{principal}.key"

    def _settings(self) -> dict[str, str]:
        """Listeners, TLS, SASL and the authorizer, on top of the launcher's defaults."""
        host = self.host
        settings = {
            "listeners": (
                f"MTLS://{host}:{self.mtls_port},SASL_SSL://{host}:{self.sasl_ssl_port},"
                f"CONTROLLER://{host}:{self.controller_port}"
            ),
            "advertised.listeners": (
                f"MTLS://{host}:{self.mtls_port},SASL_SSL://{host}:{self.sasl_ssl_port}"
            ),
            "listener.security.protocol.map": "MTLS:SSL,SASL_SSL:SASL_SSL,CONTROLLER:SSL",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "MTLS",
            # One key store and trust store for every listener, both PEM (no keytool).
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self._keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
            # Per listener, since a broker-wide ssl.client.auth does not apply to
            # SASL_SSL listeners (KIP-684) and explicit is easier to audit.
            "listener.name.mtls.ssl.client.auth": "required",
            "listener.name.controller.ssl.client.auth": "required",
            "listener.name.sasl_ssl.ssl.client.auth": "none",
            "ssl.principal.mapping.rules": "RULE:^CN=([^,]+).*$/$1/,DEFAULT",
            "sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:{_ADMIN};User:{BROKER_PRINCIPAL}",
        }
        for mechanism in SCRAM_MECHANISMS:
            # The broker side of SCRAM needs a login module, without credentials.
            key = f"listener.name.sasl_ssl.{mechanism.lower()}.sasl.jaas.config"
            settings[key] = f"{_SCRAM_MODULE} required;"
        return settings

    def _ensure_tls(self) -> tls.CertKey:
        """The CA (made once) and a broker certificate and key store signed by it."""
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.tls_dir, 0o700)
        try:
            ca = tls.load_cert_key(self.ca_file, self._ca_key)
        except (OSError, ValueError):
            ca = tls.make_ca()
            tls.write_cert_key(ca, self.ca_file, self._ca_key)
        try:
            broker = tls.load_cert_key(self._broker_cert, self._broker_key)
            broker.cert.verify_directly_issued_by(ca.cert)
        except (OSError, ValueError, TypeError, InvalidSignature):
            broker = tls.make_cert(ca, BROKER_PRINCIPAL, [self.host, "localhost"])
            tls.write_cert_key(broker, self._broker_cert, self._broker_key)
        # Kafka's PEM key store: the PKCS#8 key, then the chain (leaf, CA).  Compared
        # and rewritten on every call, so a damaged one never keeps the broker down.
        keystore = broker.key_pem + broker.cert_pem + ca.cert_pem
        try:
            current = self._keystore.read_bytes()
        except OSError:
            current = b""
        if current != keystore:
            tls.write_file(self._keystore, keystore)
        return ca

    def _stored_passwords(self) -> dict[str, str]:
        try:
            data = json.loads(self.password_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise BrokerStartError(f"{self.password_file} is unreadable: {exc}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise BrokerStartError(f"{self.password_file} is not a JSON object of strings")
        return data

    def _write_passwords(self, passwords: dict[str, str]) -> None:
        text = json.dumps(passwords, indent=2, sort_keys=True) + "\n"
        tls.write_file(self.password_file, text.encode())

    def _add_scram_users(self, cfg: BrokerConfig, passwords: dict[str, str]) -> None:
        """Create SCRAM users on the running broker, as ``admin`` over mutual TLS (so it
        works even when ``admin``'s own password is what is missing)."""
        cert, key = self.client_cert(_ADMIN)
        keystore = self.tls_dir / "clients" / f"{_ADMIN}-keystore.pem"
        tls.write_file(keystore, key.read_bytes() + cert.read_bytes())
        props = self.tls_dir / "clients" / f"{_ADMIN}-mtls.properties"
        lines = [
            "security.protocol=SSL",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={_prop(str(keystore))}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={_prop(str(self.ca_file))}",
        ]
        tls.write_file(props, ("\n".join(lines) + "\n").encode())
        for user, password in passwords.items():
            # One mechanism per call: Kafka refuses two credentials of one user in a
            # single AlterUserScramCredentials request.
            for mechanism in SCRAM_MECHANISMS:
                argv = launcher.tool_command(
                    cfg,
                    "kafka.admin.ConfigCommand",
                    "--bootstrap-server",
                    self.ssl_bootstrap,
                    "--command-config",
                    str(props),
                    "--alter",
                    "--add-config",
                    f"{mechanism}=[password={password}]",
                    "--entity-type",
                    "users",
                    "--entity-name",
                    user,
                )
                done = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=_TOOL_TIMEOUT_S,
                    check=False,
                )
                if done.returncode != 0:
                    # The tool echoes its arguments on failure: keep the password out.
                    output = (done.stdout + done.stderr).replace(password, "***")
                    raise BrokerStartError(
                        f"creating SCRAM user {user!r} ({mechanism}) failed "
                        f"(exit {done.returncode}):\n{output.strip()[-4000:]}"
                    )

    def _check_sasl_login(self, admin_password: str) -> None:
        """One SCRAM-SHA-512 login as ``admin`` on the SASL_SSL listener, retried until
        a deadline; runs its own event loop in a thread so that callers inside a
        running loop (async fixtures) can call :meth:`start` too."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            error = pool.submit(asyncio.run, self._sasl_login(admin_password)).result()
        if error is not None:
            raise BrokerStartError(
                f"the secured broker runs, but admin cannot log in over SASL_SSL at "
                f"{self.sasl_ssl_bootstrap} within {_SASL_CHECK_TIMEOUT_S:.0f}s: {error}\n"
                f"--- last lines of {self.log_file} ---\n{launcher._log_tail(self.log_file)}"
            )

    async def _sasl_login(self, admin_password: str) -> str | None:
        from aiokafka.admin import AIOKafkaAdminClient
        from aiokafka.helpers import create_ssl_context

        deadline = time.monotonic() + _SASL_CHECK_TIMEOUT_S
        error = "no attempt"
        while time.monotonic() < deadline:
            client = AIOKafkaAdminClient(
                bootstrap_servers=self.sasl_ssl_bootstrap,
                security_protocol="SASL_SSL",
                ssl_context=create_ssl_context(cafile=self.ca_file),
                sasl_mechanism="SCRAM-SHA-512",
                sasl_plain_username=_ADMIN,
                sasl_plain_password=admin_password,
                request_timeout_ms=5000,
            )
            try:
                await asyncio.wait_for(client.start(), 10.0)
                await asyncio.wait_for(client.describe_cluster(), 10.0)
                return None
            except Exception as exc:  # any failure is retried until the deadline
                error = f"{type(exc).__name__}: {exc}"
            finally:
                await client.close()
            await asyncio.sleep(0.5)
        return error
