"""The Kafka clients a worker builds carry our settings, not Faust's hard-coded ones.

Faust creates the worker's aiokafka consumer with fetch.max.wait.ms = 1500; with one
fetch per broker in flight that let LLM requests wait up to 1.5 s (see
`streams.delivery.FetchWaitConsumerThread`). These build the clients (never started) from an
app made by `create_app`, as a worker would.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agentstream.streams.app import create_app
from agentstream.streams.settings import Settings, SettingsError


def _settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env(
        {
            "AGENTSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1",
            "AGENTSTREAM_DATA_DIR": str(tmp_path),
            "AGENTSTREAM_APP_ID": "unit-clients",
            **env,
        }
    )


async def test_worker_consumer_uses_the_configured_fetch_wait(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path, AGENTSTREAM_CONSUMER_FETCH_MAX_WAIT_MS="37"))
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    try:
        assert consumer._fetch_max_wait_ms == 37
        # everything else still comes from Faust (group, offsets, assignor)
        assert consumer._group_id == "unit-clients"
        assert consumer._enable_auto_commit is False
    finally:
        await consumer.stop()


def test_worker_transport_decompresses_within_the_configured_limit(tmp_path: Path) -> None:
    from aiokafka.codec import zstd_encode

    from agentstream.streams import record_batches

    limit = 8 * 1024 * 1024
    settings = _settings(
        tmp_path,
        AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES=str(limit),
        AGENTSTREAM_MAX_COMPRESSION_RATIO="1000000",
    )
    app = create_app(settings)
    try:
        assert app.transport is not None  # made as a worker makes it: installs the limits
        assert len(record_batches._decompress(4, zstd_encode(bytes(limit)))) == limit
        with pytest.raises(record_batches.DecompressedTooLarge, match="8,388,608 bytes"):
            record_batches._decompress(4, zstd_encode(bytes(limit + 1)))
        # and the ratio: 1 MiB of zeros is a few dozen bytes of zstd
        record_batches.install(limit, 100)
        with pytest.raises(record_batches.DecompressedTooLarge, match="COMPRESSION_RATIO"):
            record_batches._decompress(4, zstd_encode(bytes(1024 * 1024)))
    finally:
        record_batches.install()  # the default again, for the tests after


def test_fausts_own_environment_variables_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # set for some other program: they must not change the worker (AGENTSTREAM_* only)
    monkeypatch.setenv("BROKER_SESSION_TIMEOUT", "99")
    monkeypatch.setenv("WEB_PORT", "1")
    monkeypatch.setenv("APP_DATADIR", str(tmp_path / "elsewhere"))
    settings = _settings(tmp_path)
    conf = create_app(settings).conf
    assert conf.broker_session_timeout == settings.broker_session_timeout_s != 99
    assert conf.web_port == settings.web_port != 1
    assert str(conf.datadir).startswith(str(tmp_path)) and "elsewhere" not in str(conf.datadir)


async def test_default_fetch_wait_is_latency_friendly(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path))
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    try:
        assert consumer._fetch_max_wait_ms == Settings().consumer_fetch_max_wait_ms == 100
    finally:
        await consumer.stop()


async def test_the_partition_fetch_size_is_the_setting(tmp_path: Path) -> None:
    for size in (None, 2 * 1024 * 1024):
        extra = (
            {} if size is None else {"AGENTSTREAM_CONSUMER_MAX_PARTITION_FETCH_BYTES": str(size)}
        )
        app = create_app(_settings(tmp_path, **extra))
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        try:
            # what aiokafka's consumer hands its fetcher, which asks each partition for it
            want = size or 4 * 1024 * 1024
            assert consumer._max_partition_fetch_bytes == want
        finally:
            await consumer.stop()
    # below a whole batch of Kafka's default max.message.bytes, or past aiokafka's cap on
    # a whole fetch, a value would stall a partition or do nothing: refused
    for bad in (1024 * 1024, 51 * 1024 * 1024):
        with pytest.raises(SettingsError, match="AGENTSTREAM_CONSUMER_MAX_PARTITION_FETCH"):
            _settings(tmp_path, AGENTSTREAM_CONSUMER_MAX_PARTITION_FETCH_BYTES=str(bad))


async def test_worker_producer_is_idempotent_under_both_guarantees(tmp_path: Path) -> None:
    # a produce retried after a lost response (a reset connection) must not be written
    # twice: a duplicate decision breaks the signed chain (`audit verify`: inserted)
    for guarantee in ("at_least_once", "exactly_once"):
        app = create_app(_settings(tmp_path, AGENTSTREAM_PROCESSING_GUARANTEE=guarantee))
        producer = app.producer._new_producer()
        try:
            # aiokafka keeps a producer id and sequence numbers only when idempotent
            assert producer._txn_manager is not None, guarantee
            assert producer._sender._acks == -1  # acks=all, which idempotence needs
        finally:
            await producer.stop()


def test_producer_linger_is_configurable(tmp_path: Path) -> None:
    assert create_app(_settings(tmp_path)).conf.producer_linger == 0.005
    app = create_app(_settings(tmp_path, AGENTSTREAM_PRODUCER_LINGER_MS="0"))
    assert app.conf.producer_linger == 0


def test_advertised_web_url(tmp_path: Path) -> None:
    """Other workers forward key lookups to this URL (streams.web_cluster)."""
    plain = create_app(_settings(tmp_path, AGENTSTREAM_WEB_PORT="7001"))
    assert str(plain.conf.canonical_url) == "http://127.0.0.1:7001"
    wildcard = create_app(
        _settings(tmp_path, AGENTSTREAM_WEB_HOST="0.0.0.0", AGENTSTREAM_WEB_PORT="7002")
    )
    assert str(wildcard.conf.canonical_url) == f"http://{socket.getfqdn()}:7002"
    explicit = create_app(
        _settings(tmp_path, AGENTSTREAM_WEB_ADVERTISED_URL="http://worker-3.internal:8080/")
    )
    assert str(explicit.conf.canonical_url).rstrip("/") == "http://worker-3.internal:8080"


def test_advertised_web_url_is_https_when_the_views_serve_tls(tmp_path: Path) -> None:
    """A worker serving HTTPS must be reached over HTTPS by the others' forwarded
    lookups: Faust's default canonical URL says http."""
    from agentstream.infra.kafka import tls

    pair = tls.make_cert(tls.make_ca(), "worker-1", ["127.0.0.1"])
    cert, key = tmp_path / "web.pem", tmp_path / "web.key"
    tls.write_cert_key(pair, cert, key)
    served = {"AGENTSTREAM_WEB_TLS_CERTFILE": str(cert), "AGENTSTREAM_WEB_TLS_KEYFILE": str(key)}
    app = create_app(_settings(tmp_path, AGENTSTREAM_WEB_PORT="7003", **served))
    assert str(app.conf.canonical_url) == "https://127.0.0.1:7003"
    wildcard = create_app(
        _settings(tmp_path, AGENTSTREAM_WEB_HOST="::", AGENTSTREAM_WEB_PORT="7004", **served)
    )
    assert str(wildcard.conf.canonical_url) == f"https://{socket.getfqdn()}:7004"
