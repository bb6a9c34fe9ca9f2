"""Certificates for a local secured Kafka broker: a private CA, server and client certs.

Pure generation with ``cryptography`` (no ``openssl`` or ``keytool`` processes), so it
is fast, unit-testable and the same on every machine.  :mod:`infra.kafka.secured`
uses it to give the test broker a CA, a broker certificate and one client certificate
per principal.

Choices, and why:

* **EC P-256 keys**: generated in microseconds (RSA-2048 takes tens of milliseconds
  per key), and accepted by Python's ``ssl`` and by Kafka's PEM key store, which reads
  PKCS#8 keys of any of RSA, DSA and EC.
* **PKCS#8, unencrypted** key files, mode 0600: Kafka's PEM key store only reads
  PKCS#8, and a password for a key that sits next to its password file would protect
  nothing.
* **The subject is only ``CN=<name>``**: Kafka maps a client certificate to a
  principal with ``ssl.principal.mapping.rules``; the broker uses
  ``RULE:^CN=([^,]+).*$/$1/`` so that ``CN=worker`` is ``User:worker``.
* **Server certificates also allow client authentication**: the broker connects to its
  own controller and inter-broker listeners with the same certificate, and Java
  rejects a client certificate whose extended key usage lacks ``clientAuth``.
* **One hour of back-dating**: a certificate made just now must already be valid for
  a JVM whose clock is a little behind.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_DAYS",
    "CERT_DAYS",
    "CertKey",
    "load_cert_key",
    "make_ca",
    "make_cert",
    "write_cert_key",
    "write_file",
]

#: Long enough that a kept test broker never sees its CA expire.
CA_DAYS: Final = 3650
CERT_DAYS: Final = 825
_BACKDATE: Final = dt.timedelta(hours=1)


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The certificate alone, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM (the form Kafka's PEM store reads)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def common_name(self) -> str:
        """The subject's CN."""
        value = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return value.decode() if isinstance(value, bytes) else value


def _name(cn: str) -> x509.Name:
    if not cn or "," in cn or "=" in cn:
        # The principal mapping rule cuts the CN at the first comma; "=" would make the
        # RFC 2253 subject ambiguous.  Neither is a sensible principal name.
        raise ValueError(f"common name {cn!r} must be non-empty, without ',' or '='")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def make_ca(cn: str = "agentstream local Kafka CA", *, days: int = CA_DAYS) -> CertKey:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = _new_key()
    name = _name(cn)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert, key)


def make_cert(
    ca: CertKey,
    cn: str,
    sans: Sequence[str] = (),
    *,
    client: bool = False,
    days: int = CERT_DAYS,
) -> CertKey:
    """An end-entity certificate for ``CN=cn`` signed by ``ca``.

    ``sans`` are subject alternative names; entries that parse as IP addresses become
    IP SANs, the rest DNS names (a TLS client checking ``127.0.0.1`` needs an IP SAN).
    ``client=True`` makes a client-only certificate (extended key usage
    ``clientAuth``); otherwise it is a server certificate that may also act as a
    client (``serverAuth`` and ``clientAuth``; see the module docstring).
    """
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if not client:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False
        )
    return CertKey(builder.sign(ca.key, hashes.SHA256()), key)


def write_cert_key(pair: CertKey, cert_file: Path, key_file: Path) -> None:
    """Write the certificate (mode 0644) and the key (mode 0600) as PEM files.

    Each file is written under a temporary name and renamed into place, so a reader
    never sees half a file, and the key file is created 0600 from the start (never
    briefly readable by others).  The key is written first: a certificate on disk
    always has its key next to it.
    """
    write_file(key_file, pair.key_pem, 0o600)
    write_file(cert_file, pair.cert_pem, 0o644)


def write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` atomically into a file created with exactly ``mode`` (default
    0600: secrets are never readable by others, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # the umask may have narrowed it; 0600 must stay 0600 exactly
    finally:
        os.close(fd)
    tmp.replace(path)


def load_cert_key(cert_file: Path, key_file: Path) -> CertKey:
    """Read a pair written by :func:`write_cert_key`."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_file} does not hold an EC private key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ValueError(f"{key_file} is not the key of {cert_file}")
    return CertKey(cert, key)
