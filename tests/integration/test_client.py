"""The sync Client against the real broker: a publish/subscribe round trip (from settings
and from constructor arguments alone), use from inside a running event loop, a record the
broker refuses as PublishError, a subscription abandoned mid-iteration, the unknown-topic
wait bounded by `timeout_s`; and, on the secured broker, a SASL password given as an
argument with none in the credentials chain."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import time
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import MessageSizeTooLargeError

import agentstream.streams.client as streams_client
from agentstream.infra.kafka.secured import SecuredKafka
from agentstream.schemas import AgentMessage, Event
from agentstream.streams.admin import ensure_topics
from agentstream.streams.client import AsyncClient, Client
from agentstream.streams.errors import BrokerAuthError, BrokerError, PublishError
from agentstream.streams.settings import Settings
from tests.support import wait_until

pytestmark = pytest.mark.integration


def _message(i: int, content: str = "hello") -> AgentMessage:
    return AgentMessage(
        message_id=f"m{i}", sender_id="planner-1", recipient_id="coder-2", content=content
    )


@pytest.fixture
async def settings(settings_env: dict[str, str]) -> Settings:
    s = Settings.from_env(settings_env)
    await ensure_topics(s)
    return s


def _round_trip(client: Client) -> None:
    md = client.publish("agent.messages", _message(1))
    assert md.topic == client.settings.topic("agent.messages")
    assert client.publish_many("agent.messages", [_message(2), _message(3)]) == 2
    assert client.publish("agent.messages", _message(4), wait=False).result(timeout=30)
    records = list(
        client.subscribe("agent.messages", from_beginning=True, max_events=4, timeout_s=10)
    )
    assert [r.event.payload.message_id for r in records if r.event is not None] == [
        "m1",
        "m2",
        "m3",
        "m4",
    ]
    assert {r.topic for r in records} == {client.settings.topic("agent.messages")}


def test_sync_round_trip(settings: Settings) -> None:
    with Client(settings, source="test") as client:
        _round_trip(client)


def test_sync_round_trip_from_constructor_arguments_alone(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("AGENTSTREAM_"):
            monkeypatch.delenv(name)
    client = Client(bootstrap=settings.bootstrap, topic_prefix=settings.topic_prefix)
    try:
        _round_trip(client)
    finally:
        client.stop()


async def test_sync_client_inside_a_running_loop(settings: Settings) -> None:
    # as in a Jupyter cell: this coroutine's loop is running, asyncio.run would refuse
    asyncio.get_running_loop()
    with Client(settings, source="test") as client:
        _round_trip(client)


async def _set_max_message_bytes(settings: Settings, topic: str, value: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(value)})]
        )
    finally:
        await admin.close()


async def test_a_record_the_broker_refuses_is_a_publish_error(settings: Settings) -> None:
    topic = settings.topic("agent.messages")
    await _set_max_message_bytes(settings, topic, 1024)
    big = Event.of(_message(1, content="x" * 4000), source="test")
    with Client(settings) as client:
        # the broker applies a topic's new config a moment after AlterConfigs answers:
        # until then the record is taken (under the producer's own limit); after, refused
        deadline = time.monotonic() + 20
        while True:
            try:
                client.publish("agent.messages", big)
            except PublishError as refused:
                err = refused
                break
            assert time.monotonic() < deadline, "the broker never refused the record"
            time.sleep(0.2)
        assert (err.topic, err.key, err.retriable) == (topic, "planner-1", False)
        assert isinstance(err.cause, MessageSizeTooLargeError)
        assert "max.message.bytes" in str(err)
        # the client is still usable: a record within the limit goes through
        assert client.publish("agent.messages", _message(2))


def _loop_tasks(client: Client) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one

    return client._loop().run(count())


def test_an_abandoned_subscription_stops_its_consumer(settings: Settings) -> None:
    with Client(settings) as client:
        client.publish_many("agent.messages", [_message(i) for i in range(5)])
        idle = _loop_tasks(client)
        for i, _rec in enumerate(client.subscribe("agent.messages", from_beginning=True)):
            if i == 0:
                assert _loop_tasks(client) > idle  # the consumer's fetcher and co.
            if i == 1:
                break
        gc.collect()
        wait_until(lambda: _loop_tasks(client) <= idle, 15, what="the consumer to stop")


@pytest.mark.parametrize("timeout_s", [2.0, None])
def test_an_unknown_topic_fails_within_the_timeout(
    settings: Settings, timeout_s: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the default (10 s) made short here: what is measured is that it is used at all
    monkeypatch.setattr(streams_client, "UNKNOWN_TOPIC_TIMEOUT_S", 2.0)
    kw: dict[str, Any] = {} if timeout_s is None else {"timeout_s": timeout_s}
    with Client(settings) as client:
        t0 = time.monotonic()
        with pytest.raises(BrokerError, match=r"topic no\.such\.topic does not exist"):
            next(client.subscribe("no.such.topic", **kw))
        took = time.monotonic() - t0
    assert 2.0 <= took < 8.0, took  # the 2 s given, not the default 10 s


async def test_publishing_to_a_missing_topic_fails_at_once(settings: Settings) -> None:
    """Auto-creation is off: a topic the cluster does not know will not appear, and the
    publish says so after a short look (PUBLISH_UNKNOWN_TOPIC_S), not after aiokafka's
    30 s request timeout. A topic created meanwhile is found."""
    async with AsyncClient(settings) as client:
        t0 = time.monotonic()
        with pytest.raises(PublishError, match=r"no\.such\.topic failed: the topic does not exist"):
            await client.publish_raw("no.such.topic", b"x")
        took = time.monotonic() - t0
        assert streams_client.PUBLISH_UNKNOWN_TOPIC_S <= took < 15.0, took
        assert (await client.publish("agent.messages", _message(1))).offset >= 0


# -- the password as an argument, against the secured broker -------------------------------
def _secured_settings(
    settings_env: dict[str, str], kafka: SecuredKafka, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The test's namespace on the secured broker, as `admin` over mutual TLS (no
    password needed to create its topics); the chain is the env source and has no
    Kafka password, in the environment of this process too."""
    for name in list(os.environ):
        if name.startswith("AGENTSTREAM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AGENTSTREAM_SECRET_SOURCES", "env")
    cert, key = kafka.client_cert("admin")
    return Settings.from_env(
        {
            "AGENTSTREAM_TOPIC_PREFIX": settings_env["AGENTSTREAM_TOPIC_PREFIX"],
            "AGENTSTREAM_TOPIC_PARTITIONS": "2",
            "AGENTSTREAM_SECRET_SOURCES": "env",
            "AGENTSTREAM_KAFKA_BOOTSTRAP": kafka.ssl_bootstrap,
            "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
            "AGENTSTREAM_KAFKA_SSL_CAFILE": str(kafka.ca_file),
            "AGENTSTREAM_KAFKA_SSL_CERTFILE": str(cert),
            "AGENTSTREAM_KAFKA_SSL_KEYFILE": str(key),
        }
    )


def _scram_client(settings: Settings, kafka: SecuredKafka, password: str) -> Client:
    return Client(
        bootstrap=kafka.sasl_ssl_bootstrap,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="admin",
        sasl_password=password,
        ssl_cafile=kafka.ca_file,
        topic_prefix=settings.topic_prefix,
        connect_timeout_s=10,
    )


async def test_a_password_argument_connects_without_the_chain(
    settings_env: dict[str, str],
    secured_kafka: SecuredKafka,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mtls = _secured_settings(settings_env, secured_kafka, monkeypatch)
    await ensure_topics(mtls)
    password = secured_kafka.password("admin")
    caplog.set_level(logging.DEBUG)
    client = _scram_client(mtls, secured_kafka, password)
    try:
        await asyncio.to_thread(_round_trip, client)
        assert password not in repr(client)
    finally:
        client.stop()
    assert password not in caplog.text


def test_a_wrong_password_argument_is_refused_naming_the_login(
    settings_env: dict[str, str],
    secured_kafka: SecuredKafka,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mtls = _secured_settings(settings_env, secured_kafka, monkeypatch)
    wrong = "wrong-" + secrets.token_urlsafe(12)
    client = _scram_client(mtls, secured_kafka, wrong)
    t0 = time.monotonic()
    try:
        with pytest.raises(BrokerAuthError) as exc:
            client.start()
    finally:
        client.stop()
    assert time.monotonic() - t0 < 15
    assert "refused the SASL login of 'admin'" in str(exc.value)
    assert "(SASL_SSL)" in str(exc.value)
    assert wrong not in str(exc.value)


async def test_a_group_subscription_resumes_after_what_it_yielded(settings: Settings) -> None:
    # aiokafka's auto-commit committed the consumer's position, past the rest of a fetched
    # batch the caller never got (max_events, a break): the group's next run skipped it
    group = f"{settings.app_id}-readers"
    async with AsyncClient(settings) as client:
        await client.publish_many("agent.messages", [_message(i) for i in range(6)])

        async def take(n: int) -> list[str]:
            got = []
            async for rec in client.subscribe(
                "agent.messages", group_id=group, from_beginning=True, timeout_s=10
            ):
                assert rec.event is not None
                got.append(rec.event.payload.message_id)
                if len(got) == n:
                    break
            return got

        first = await take(2)
        rest = []
        # from_beginning: for a partition the first run committed nothing in
        async for rec in client.subscribe(
            "agent.messages", group_id=group, from_beginning=True, max_events=4, timeout_s=10
        ):
            assert rec.event is not None
            rest.append(rec.event.payload.message_id)
        assert len(first) == 2 and sorted(first + rest) == [f"m{i}" for i in range(6)], rest


# -- one AsyncClient, one event loop after another ----------------------------------------
def test_an_async_client_serves_one_asyncio_run_after_another(settings: Settings) -> None:
    """A script or notebook makes one client and calls `asyncio.run` more than once. The
    producer the first run started belongs to its loop, closed by the second run: that
    run handed its record to that producer, which never sent it: it hung until the
    delivery timeout (120 s). Now each run publishes on a
    producer of its own loop, and every record is written once."""
    client = AsyncClient(settings, source="test")

    async def publish(i: int) -> Any:
        # bounded: the old producer could also hang the run
        return await asyncio.wait_for(client.publish("agent.messages", _message(i)), 60)

    first = asyncio.run(publish(1))
    second = asyncio.run(publish(2))  # the first run's loop is closed by now
    assert first.offset >= 0 and second.offset >= 0

    async def read_all() -> list[str]:
        try:
            return [
                rec.event.payload.message_id
                async for rec in client.subscribe(
                    "agent.messages", from_beginning=True, max_events=3, timeout_s=5
                )
                if rec.event is not None
            ]
        finally:
            await client.stop()

    assert asyncio.run(asyncio.wait_for(read_all(), 60)) == ["m1", "m2"]


async def test_publishers_racing_a_refused_batch_each_deliver_once(settings: Settings) -> None:
    """A record over its topic's max.message.bytes, refused by the broker amid concurrent
    publishers: the producer is renewed under them (a new producer id), every other
    record is written exactly once, and each replaced producer is stopped. (The big one
    goes to a topic of its own: a refused batch fails every record in it.)"""
    await _set_max_message_bytes(settings, settings.topic("agent.status"), 1024)
    async with AsyncClient(settings) as client:
        built: list[Any] = [client._producer]
        new_producer = client._new_producer

        def counted(what: str, **options: Any) -> Any:
            built.append(new_producer(what, **options))
            return built[-1]

        client._new_producer = counted  # type: ignore[method-assign]
        await _until_refused(client, "agent.status")

        async def publisher(w: int) -> None:
            for i in range(30):
                if w == 0 and i == 10:
                    with pytest.raises(PublishError, match=r"max\.message\.bytes"):
                        await client.publish_raw("agent.status", b"x" * 4000)
                await client.publish("agent.messages", _message(1000 * (w + 1) + i))

        await asyncio.wait_for(asyncio.gather(*(publisher(w) for w in range(4))), 120)
        running = client._producer
    ids = sorted(
        [
            rec.event.payload.message_id
            async for rec in AsyncClient(settings).subscribe(
                "agent.messages", from_beginning=True, timeout_s=5
            )
            if rec.event is not None
        ]
    )
    assert ids == sorted(f"m{1000 * (w + 1) + i}" for w in range(4) for i in range(30))
    assert len(built) == 3 and running is built[-1]  # renewed after each refusal
    assert all(p._closed for p in built)  # the replaced ones, and the last by the stop


async def _until_refused(client: AsyncClient, topic: str) -> None:
    """Until the broker refuses a record over `topic`'s max.message.bytes: it applies a
    topic's new config a moment after AlterConfigs answers."""
    deadline = time.monotonic() + 20
    while True:
        try:
            await client.publish_raw(topic, b"x" * 4000)
        except PublishError:
            return
        assert time.monotonic() < deadline, "the broker never refused the record"
        await asyncio.sleep(0.2)
