"""Shared fixtures. Integration tests run against a real Apache Kafka broker started by the
project's launcher (or the cluster in AGENTSTREAM_KAFKA_BOOTSTRAP); if it cannot start,
they fail — they never skip."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_KAFKA_PORT = int(os.environ.get("AGENTSTREAM_TEST_KAFKA_PORT", "19192"))


#: the repository folders under their own names: importable here (the root is on sys.path)
#: but never ours to import — `agentstream.<name>` is; a test that imported one would run
#: a second copy of our modules (and, for `agents`, shadow the OpenAI Agents SDK)
BARE_NAMES = ("agents", "streams", "schemas", "infra")


@pytest.fixture(autouse=True, scope="session")
def _only_agentstream_imports() -> Iterator[None]:
    yield
    import sys

    bare = [n for n in BARE_NAMES if n in sys.modules]
    assert not bare, f"imported outside `agentstream`: {bare}"


@pytest.fixture(autouse=True)
def _restore_environ() -> Iterator[None]:
    """Some tests point this process at their namespace through AGENTSTREAM_* variables;
    never let that leak into the next test (e.g. a leaked AGENTSTREAM_KAFKA_BOOTSTRAP
    makes the launcher report an external cluster)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    from agentstream.infra.kafka import launcher

    external = launcher.external_bootstrap()
    if external:
        yield external
        return
    cfg = launcher.BrokerConfig.from_env(
        {
            "AGENTSTREAM_KAFKA_PORT": str(TEST_KAFKA_PORT),
            "AGENTSTREAM_KAFKA_CONTROLLER_PORT": str(TEST_KAFKA_PORT + 1),
            "AGENTSTREAM_KAFKA_DATA_DIR": str(REPO / "var" / "test-kafka" / "data"),
            "AGENTSTREAM_KAFKA_LOG_FILE": str(REPO / "var" / "test-kafka" / "broker.log"),
            **{k: v for k, v in os.environ.items() if k == "AGENTSTREAM_KAFKA_VERSION"},
        }
    )
    already_running = launcher.status(cfg)["running"]
    # A failure here is an error in every integration test, by design: no broker, no pass.
    bootstrap = launcher.start(cfg)
    yield bootstrap
    # Stop only a broker this session started: another session may be using it.
    if not already_running and os.environ.get("AGENTSTREAM_TEST_KEEP_BROKER") != "1":
        launcher.stop(cfg)


@pytest.fixture
def ns() -> str:
    """A unique namespace for one test's topics and app id."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings_env(kafka_bootstrap: str, ns: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a worker/CLI subprocess isolated to this test; the test's topics
    (catalogue and changelogs) are deleted afterwards so the broker stays small.

    Its keychain (an encrypted-file keyring in `tmp_path`) holds web view tokens, as an
    operator would create them: read and admin tokens for the test's own HTTP clients
    (`tests.support.web_tokens`, `web_client`), the admin one also as the CLI's
    `web.token`, and a cluster token for the workers' forwarded lookups."""
    from tests.support import with_web_tokens

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTREAM_")}
    env.update(
        {
            "AGENTSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "AGENTSTREAM_TOPIC_PREFIX": f"{ns}.",
            "AGENTSTREAM_APP_ID": f"{ns}-app",
            "AGENTSTREAM_DATA_DIR": str(tmp_path / "worker"),
            "AGENTSTREAM_TOPIC_PARTITIONS": "2",
            "AGENTSTREAM_WEB_PORT": str(_free_port()),
            "AGENTSTREAM_LOG_LEVEL": "INFO",
            "AGENTSTREAM_STANDBY_REPLICAS": "0",
            "PYTHONPATH": str(REPO),
        }
    )
    env = with_web_tokens(env, tmp_path)
    yield env
    asyncio.run(_delete_topics(kafka_bootstrap, ns))


async def _delete_topics(bootstrap: str, ns: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        mine = [t for t in await admin.list_topics() if t.startswith(ns)]
        if mine:
            await admin.delete_topics(mine)
    except Exception as exc:  # cleanup must not turn a passing test red
        print(f"topic cleanup for {ns} failed: {exc!r}")
    finally:
        await admin.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Imported here, not at the top, so that this fixture stays one block of its own.
from agentstream.infra.kafka.secured import SecuredKafka  # noqa: E402


@pytest.fixture(scope="session")
def secured_kafka() -> Iterator[SecuredKafka]:
    """A secured single-node broker for the TLS/SASL/ACL tests (infra/kafka/secured.py):
    mutual TLS on `ssl_bootstrap`, SCRAM-SHA-256/512 on `sasl_ssl_bootstrap`, ACLs enforced,
    no PLAINTEXT listener. Ports from AGENTSTREAM_TEST_KAFKA_PORT + 100 upward, state in
    var/test-kafka-secured/. Like `kafka_bootstrap`, it is stopped at the end unless it
    was already running or AGENTSTREAM_TEST_KEEP_BROKER=1, and a broker that cannot start
    is an error in every test that uses it."""
    kafka = SecuredKafka(REPO / "var" / "test-kafka-secured", port_base=TEST_KAFKA_PORT + 100)
    already_running = kafka.running()
    kafka.start()
    yield kafka
    if not already_running and os.environ.get("AGENTSTREAM_TEST_KEEP_BROKER") != "1":
        kafka.stop()
