"""`streams.admin`: which topics a metadata answer refuses to describe — what ends a
worker's start at once when its principal may not read one of its topics (asked by name,
the broker says TOPIC_AUTHORIZATION_FAILED; in a listing of every topic it is just left
out, as a topic still being created is)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from aiokafka.protocol.metadata import MetadataResponse_v1

from agentstream.streams.admin import list_topics, undescribable, undescribable_message
from agentstream.streams.errors import BrokerError
from agentstream.streams.kafka_security import new_admin, request_timeout_ms
from agentstream.streams.settings import Settings

NO_ERROR, UNKNOWN_TOPIC, LEADER_NOT_AVAILABLE, TOPIC_AUTHORIZATION_FAILED = 0, 3, 5, 29


def described(*topics: tuple[int, str]) -> list[dict[str, object]]:
    """What `AIOKafkaAdminClient.describe_topics` returns for these (error code, name)."""
    answer = MetadataResponse_v1(
        brokers=[(1, "127.0.0.1", 9092, None)],
        controller_id=1,
        topics=[(err, name, False, []) for err, name in topics],
    )
    return list(answer.to_object()["topics"])


def test_only_the_topics_refused_to_us_are_undescribable() -> None:
    answer = described(
        (TOPIC_AUTHORIZATION_FAILED, "p.llm.requests"),
        (NO_ERROR, "p.agent.messages"),
        (LEADER_NOT_AVAILABLE, "p.just-created"),  # still being created: wait for it
        (UNKNOWN_TOPIC, "p.gone"),
        (TOPIC_AUTHORIZATION_FAILED, "p.comms.records"),
    )
    assert undescribable(answer) == ["p.comms.records", "p.llm.requests"]
    assert undescribable(described((NO_ERROR, "p.x"))) == []


def test_the_message_names_the_principal_the_topics_and_where_to_look() -> None:
    line = undescribable_message("User:worker", ["p.comms.records", "p.llm.requests"])
    assert "\n" not in line
    assert line.startswith("User:worker is not authorized to describe topic(s) ")
    assert "p.comms.records, p.llm.requests" in line
    assert "agentstream acls" in line and "docs/acls.md" in line


@pytest.fixture
def silent_broker() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in accepted:
            conn.close()


def test_the_connect_timeout_governs_a_silent_broker_not_the_admin_timeout(
    silent_broker: int,
) -> None:
    """`topics list` with AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S=40 gave up after the admin
    client's 30 s with "no broker": aiokafka's bootstrap waits for the metadata answer
    only as long as the request timeout. Scaled down: an admin timeout of 1 s, the
    setting 3 s."""
    settings = Settings.from_env(
        {
            "AGENTSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{silent_broker}",
            "AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S": "3",
        }
    )
    started = time.monotonic()
    with pytest.raises(BrokerError) as info:
        asyncio.run(list_topics(settings, timeout_s=1))
    took = time.monotonic() - started
    assert "did not answer within 3s (AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S)" in str(info.value)
    assert took >= 3, took


async def test_no_client_asks_less_time_of_a_request_than_the_connect_timeout() -> None:
    slow = Settings.from_env({"AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S": "50"})
    assert request_timeout_ms(slow, {"request_timeout_ms": 30_000}) == 51_000  # admin, producer
    assert request_timeout_ms(slow, {}) == 51_000  # aiokafka's default, 40 s
    quick = Settings.from_env({"AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S": "3"})
    assert request_timeout_ms(quick, {"request_timeout_ms": 30_000}) == 30_000
    assert request_timeout_ms(quick, {}) == 40_000
    # every client the factories build (`streams.admin`, `streams.client`, the CLI's)
    admin = new_admin(slow, "test", request_timeout_ms=30_000)
    try:
        assert admin._client._request_timeout_ms == 51_000
    finally:
        await admin.close()
