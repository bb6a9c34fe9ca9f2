"""Certificates for the secured test broker (infra/kafka/tls.py): the chain verifies in a
real TLS handshake, names and usages are what Kafka and the clients need, keys stay
private on disk."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentstream.infra.kafka import tls


@pytest.fixture(scope="module")
def ca() -> tls.CertKey:
    return tls.make_ca()


@pytest.fixture(scope="module")
def server(ca: tls.CertKey) -> tls.CertKey:
    return tls.make_cert(ca, "agentstream-broker", ["127.0.0.1", "localhost"])


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Files must get their mode from the code, not from a strict umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _files(tmp_path: Path, name: str, pair: tls.CertKey) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    tls.write_cert_key(pair, cert, key)
    return cert, key


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> ssl.SSLObject:
    """A complete TLS handshake in memory (no sockets); returns the server's side.

    A post-handshake rejection (TLS 1.3 sends the client certificate verdict after the
    client has finished) surfaces in the last round, so the loop runs until both sides
    are done and one more exchange has happened.
    """
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", srv)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), f"handshake did not finish: {done}"
    return srv


def _server_ctx(tmp_path: Path, ca: tls.CertKey, server: tls.CertKey) -> ssl.SSLContext:
    cert, key = _files(tmp_path, "server", server)
    ca_file, _ = _files(tmp_path, "ca", ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as on the broker's MTLS listener
    return ctx


def _client_ctx(tmp_path: Path, ca: tls.CertKey, client: tls.CertKey | None) -> ssl.SSLContext:
    ca_file, _ = _files(tmp_path, "client-ca", ca)
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        ctx.load_cert_chain(*_files(tmp_path, "client", client))
    return ctx


def test_ca_is_a_ca_that_signs_only_leaves(ca: tls.CertKey) -> None:
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ca.cert.verify_directly_issued_by(ca.cert)  # self-signed


def test_server_cert_names_usages_and_chain(ca: tls.CertKey, server: tls.CertKey) -> None:
    server.cert.verify_directly_issued_by(ca.cert)
    assert server.common_name == "agentstream-broker"
    assert server.cert.subject == x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "agentstream-broker")]
    )
    sans = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # 127.0.0.1 must be an IP SAN: a TLS client connecting to an IP never matches DNS names.
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    usages = server.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # The broker also connects to its own controller with this certificate.
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not server.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_client_cert_is_client_only(ca: tls.CertKey) -> None:
    client = tls.make_cert(ca, "worker", client=True)
    client.cert.verify_directly_issued_by(ca.cert)
    assert client.common_name == "worker"
    usages = client.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        client.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_cert_of_another_ca_with_the_same_name_does_not_verify(ca: tls.CertKey) -> None:
    impostor_ca = tls.make_ca(ca.common_name)
    impostor = tls.make_cert(impostor_ca, "admin", client=True)
    with pytest.raises(InvalidSignature):
        impostor.cert.verify_directly_issued_by(ca.cert)


def test_mutual_tls_handshake_with_hostname_checks(
    tmp_path: Path, ca: tls.CertKey, server: tls.CertKey
) -> None:
    client = tls.make_cert(ca, "admin", client=True)
    for hostname in ("127.0.0.1", "localhost"):
        srv = _handshake(
            _server_ctx(tmp_path, ca, server), _client_ctx(tmp_path, ca, client), hostname
        )
        peer = srv.getpeercert()
        assert peer is not None
        assert peer["subject"] == ((("commonName", "admin"),),)


def test_handshake_fails_for_a_name_not_in_the_sans(
    tmp_path: Path, ca: tls.CertKey, server: tls.CertKey
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(_server_ctx(tmp_path, ca, server), _client_ctx(tmp_path, ca, None), "127.0.0.2")


def test_server_refuses_a_client_cert_of_another_ca(
    tmp_path: Path, ca: tls.CertKey, server: tls.CertKey
) -> None:
    other = tls.make_cert(tls.make_ca(), "admin", client=True)
    with pytest.raises(ssl.SSLError):
        _handshake(_server_ctx(tmp_path, ca, server), _client_ctx(tmp_path, ca, other), "localhost")


def test_client_refuses_a_server_of_another_ca(tmp_path: Path, ca: tls.CertKey) -> None:
    other_ca = tls.make_ca()
    other_server = tls.make_cert(other_ca, "agentstream-broker", ["127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(
            _server_ctx(tmp_path, other_ca, other_server),
            _client_ctx(tmp_path, ca, None),
            "127.0.0.1",
        )


@pytest.mark.usefixtures("permissive_umask")
def test_key_files_are_private_and_written_whole(tmp_path: Path, ca: tls.CertKey) -> None:
    pair = tls.make_cert(ca, "worker", client=True)
    cert, key = tmp_path / "certs" / "worker.pem", tmp_path / "certs" / "worker.key"
    tls.write_cert_key(pair, cert, key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert sorted(p.name for p in cert.parent.iterdir()) == ["worker.key", "worker.pem"]
    # Rewriting an existing (even world-readable) file leaves it 0600 again.
    key.chmod(0o644)
    tls.write_file(key, pair.key_pem)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_load_round_trip_and_mismatched_key(tmp_path: Path, ca: tls.CertKey) -> None:
    pair = tls.make_cert(ca, "auditor", client=True)
    cert, key = _files(tmp_path, "auditor", pair)
    loaded = tls.load_cert_key(cert, key)
    assert loaded.cert == pair.cert
    assert loaded.key_pem == pair.key_pem
    other_cert, _ = _files(tmp_path, "other", tls.make_cert(ca, "other", client=True))
    with pytest.raises(ValueError, match="is not the key of"):
        tls.load_cert_key(other_cert, key)


@pytest.mark.parametrize("cn", ["", "CN=admin", "admin,O=evil"])
def test_common_names_that_would_confuse_the_principal_rule_are_refused(
    ca: tls.CertKey, cn: str
) -> None:
    with pytest.raises(ValueError, match="common name"):
        tls.make_cert(ca, cn, client=True)


def test_leaf_never_outlives_its_ca() -> None:
    short_ca = tls.make_ca(days=10)
    leaf = tls.make_cert(short_ca, "worker", client=True, days=400)
    assert leaf.cert.not_valid_after_utc <= short_ca.cert.not_valid_after_utc
