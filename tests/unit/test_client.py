"""streams.client without Kafka: constructor arguments → settings, the SASL password kept
out of settings, reprs and logs, PublishError and the publish error mapping, the sync
client's thread (start, stop, use from a running loop, abandoned subscriptions), the
unknown-topic wait, and the py.typed markers."""

from __future__ import annotations

import asyncio
import gc
import importlib.resources
import logging
import threading
import time
import tomllib
import types
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    OffsetOutOfRangeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

import agentstream.streams.client as streams_client
import agentstream.streams.errors as streams_errors
from agentstream.schemas import AgentMessage, MetricSample
from agentstream.schemas.errors import InvalidEvent, PipelineError
from agentstream.streams.client import (
    AsyncClient,
    Client,
    Subscription,
    _LoopThread,
    _partitions,
    client_settings,
)
from agentstream.streams.errors import BrokerError, CredentialsError, PublishError
from agentstream.streams.kafka_security import Producer, resolve
from agentstream.streams.settings import Settings, SettingsError
from agentstream.streams.topics import CATALOGUE

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "pw-7f3c-never-printed"


@pytest.fixture(autouse=True)
def _no_agentstream_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test says what its environment holds; the developer's own is not in it."""
    import os

    for name in list(os.environ):
        if name.startswith("AGENTSTREAM_"):
            monkeypatch.delenv(name)
    # a chain that has no Kafka password: only the argument can supply one
    monkeypatch.setenv("AGENTSTREAM_SECRET_SOURCES", "env")


def _message(i: int = 1) -> AgentMessage:
    return AgentMessage(
        message_id=f"m{i}", sender_id="planner-1", recipient_id="coder-2", content="hello"
    )


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("agentstream-client-")]


def _wait(pred: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- constructor arguments → settings ----------------------------------------------------
def test_arguments_become_settings() -> None:
    client = AsyncClient(
        bootstrap="kafka.example.com:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc-planner",
        sasl_password=PASSWORD,
        ssl_cafile="/etc/kafka/ca.pem",
        ssl_certfile="/etc/kafka/client.pem",
        ssl_keyfile="/etc/kafka/client.key",
        ssl_check_hostname=False,
        connect_timeout_s=3,
        topic_prefix="staging.",
    )
    s = client.settings
    assert s.bootstrap == "kafka.example.com:9093"
    assert s.kafka_security_protocol == "SASL_SSL"
    assert s.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert s.kafka_sasl_username == "svc-planner"
    assert s.kafka_ssl_cafile == Path("/etc/kafka/ca.pem")
    assert s.kafka_ssl_certfile == Path("/etc/kafka/client.pem")
    assert s.kafka_ssl_keyfile == Path("/etc/kafka/client.key")
    assert s.kafka_ssl_check_hostname is False
    assert s.kafka_connect_timeout_s == 3
    assert s.topic("agent.messages") == "staging.agent.messages"
    assert Client(bootstrap="kafka.example.com:9093").settings.bootstrap == (
        "kafka.example.com:9093"
    )


def test_arguments_override_the_environment_and_keep_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTSTREAM_KAFKA_BOOTSTRAP", "from-env:9092")
    monkeypatch.setenv("AGENTSTREAM_TOPIC_PREFIX", "envprefix.")
    monkeypatch.setenv("AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S", "7")
    s = AsyncClient(bootstrap="from-arg:9092").settings
    assert s.bootstrap == "from-arg:9092"
    assert (s.topic_prefix, s.kafka_connect_timeout_s) == ("envprefix.", 7)


def test_arguments_override_given_settings_without_changing_them() -> None:
    base = Settings.from_env({"AGENTSTREAM_APP_ID": "mine", "AGENTSTREAM_TOPIC_PREFIX": "a."})
    s = AsyncClient(base, topic_prefix="b.", bootstrap="h:1").settings
    assert (s.app_id, s.topic_prefix, s.bootstrap) == ("mine", "b.", "h:1")
    assert (base.topic_prefix, base.kafka_bootstrap) == ("a.", None)
    assert s.worker_id == base.worker_id  # the rest is the same settings, not new defaults


def test_no_arguments_take_the_settings_as_they_are() -> None:
    base = Settings.from_env({})
    assert AsyncClient(base).settings is base
    assert client_settings(base, bootstrap=None) is base


def test_a_bad_argument_is_a_settings_error_naming_it() -> None:
    with pytest.raises(SettingsError) as exc:
        AsyncClient(bootstrap="h:1", security_protocol="SASL_SSL", sasl_username="u")
    assert "sasl_mechanism" in str(exc.value)
    assert "security_protocol=SASL_SSL" in str(exc.value)
    with pytest.raises(SettingsError, match="connect_timeout_s"):
        AsyncClient(connect_timeout_s=-1)
    with pytest.raises(TypeError):
        client_settings(None, sasl_password=PASSWORD)  # a secret is never a setting


def test_a_password_without_sasl_is_refused() -> None:
    with pytest.raises(SettingsError, match="sasl_password is given"):
        AsyncClient(bootstrap="h:1", security_protocol="SSL", sasl_password=PASSWORD)


# -- the password ------------------------------------------------------------------------
def _sasl_client(cls: Any = AsyncClient) -> Any:
    return cls(
        bootstrap="127.0.0.1:1",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password=PASSWORD,
    )


def test_the_password_is_in_no_settings_and_no_repr() -> None:
    for client in (_sasl_client(), _sasl_client(Client)):
        s = client.settings
        assert PASSWORD not in s.model_dump_json()
        assert PASSWORD not in repr(s)
        assert PASSWORD not in str(s.describe())
        assert PASSWORD not in repr(client)
        assert "sasl_password='**********'" in repr(client)
        assert "sasl_username='svc'" in repr(client)
        inner = client if isinstance(client, AsyncClient) else client._async
        assert PASSWORD not in repr(vars(inner))


async def test_the_password_argument_works_without_the_chain() -> None:
    client = _sasl_client()
    # the chain (env source, no AGENTSTREAM_SECRET_KAFKA_SASL_PASSWORD) has none ...
    with pytest.raises(CredentialsError):
        resolve(client.settings)
    # ... the client connects with the argument
    producer = client._new_producer("publishing")
    await producer.stop()
    security = producer._security
    assert security.password is not None
    assert security.password.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(security)


async def test_the_clients_are_built_with_the_given_password() -> None:
    client = _sasl_client()
    producer = client._new_producer("publishing")
    consumer = client._new_consumer("subscribing", group_id=None)
    try:
        # the factories' classes: the same bounded, cause-naming start, probing with the
        # given password (`_security`) when a start fails
        assert isinstance(producer, Producer)
        assert producer._security.password.get_secret_value() == PASSWORD
        assert producer.client._sasl_plain_password == PASSWORD
        assert producer.client._sasl_plain_username == "svc"
        assert producer.client._security_protocol == "SASL_PLAINTEXT"
        assert consumer._client._sasl_plain_password == PASSWORD
    finally:
        await producer.stop()
        await consumer.stop()


async def test_a_failed_start_names_the_real_protocol_and_never_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = AsyncClient(
        bootstrap=f"127.0.0.1:{port}",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="svc",
        sasl_password=PASSWORD,
        connect_timeout_s=2,
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BrokerError) as exc:
        await client.start()
    assert f"127.0.0.1:{port} (SASL_PLAINTEXT)" in str(exc.value)
    assert PASSWORD not in str(exc.value)
    assert PASSWORD not in caplog.text


# -- PublishError ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cause", "retriable"),
    [
        (TopicAuthorizationFailedError(), False),
        (MessageSizeTooLargeError(), False),
        (UnknownTopicOrPartitionError(), True),
        (NotLeaderForPartitionError(), True),
        (KafkaTimeoutError(), True),
        (TimeoutError(), True),
        (ValueError("x"), False),
        (None, False),
    ],
)
def test_publish_error_is_retriable_as_its_cause(
    cause: BaseException | None, retriable: bool
) -> None:
    err = PublishError("m", topic="t", key="k", cause=cause)
    assert (err.topic, err.key, err.cause, err.retriable) == ("t", "k", cause, retriable)
    assert isinstance(err, PipelineError)
    assert not isinstance(err, BrokerError)  # the connection is fine, the record is not


def test_publish_error_retriable_can_be_said() -> None:
    assert (
        PublishError("m", topic="t", cause=KafkaTimeoutError(), retriable=False).retriable is False
    )


def test_the_error_tree_draws_publish_error() -> None:
    assert streams_errors.__doc__ is not None
    assert "├── PublishError" in streams_errors.__doc__
    assert "PublishError" in streams_errors.__all__


class _EveryTopic:
    """The metadata of a cluster that has every topic (the look for a missing topic
    before a first publish is tested against a real broker, tests/integration)."""

    unauthorized_topics: frozenset[str] = frozenset()

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}


class FakeProducer:
    """send() as aiokafka's: raises, or returns a delivery future that fails or succeeds."""

    def __init__(
        self, on_send: BaseException | None = None, on_delivery: BaseException | None = None
    ) -> None:
        self.on_send, self.on_delivery = on_send, on_delivery
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self.stopped = False
        self.client = types.SimpleNamespace(cluster=_EveryTopic())

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any:
        if self.on_send is not None:
            raise self.on_send
        self.sent.append((topic, value, key))
        fut = asyncio.get_running_loop().create_future()
        if self.on_delivery is not None:
            fut.set_exception(self.on_delivery)
        else:
            fut.set_result(f"md-{len(self.sent)}")
        return fut

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


def _with_producer(producer: FakeProducer, **kw: Any) -> AsyncClient:
    """A client whose first producer is `producer`; one it builds anew (after a failed
    delivery) behaves the same. Built by the client's own start (its `_new_producer`
    replaced), each is appended to `client.fakes`."""
    client = AsyncClient(Settings.from_env({"AGENTSTREAM_TOPIC_PREFIX": "p."}), **kw)
    fakes: list[FakeProducer] = []

    def new_producer(what: str, **options: Any) -> FakeProducer:
        made = producer if not fakes else FakeProducer(producer.on_send, producer.on_delivery)
        fakes.append(made)
        return made

    client._new_producer = new_producer  # type: ignore[method-assign]
    client.fakes = fakes  # type: ignore[attr-defined]
    return client


async def test_a_failed_delivery_renews_the_producer() -> None:
    """aiokafka's idempotent producer keeps the sequence numbers of a batch the broker
    refused: later records of that partition would fail with OutOfOrderSequenceNumber."""
    client = _with_producer(FakeProducer(on_delivery=MessageSizeTooLargeError()))
    with pytest.raises(PublishError):
        await client.publish("agent.messages", _message())
    fakes = client.fakes  # type: ignore[attr-defined]
    first = fakes[0]
    assert not first.stopped and len(fakes) == 1  # replaced lazily, at the next send
    first.on_delivery = None  # the broker takes records again
    assert await client.publish("agent.messages", _message()) == "md-1"
    assert first.stopped and len(fakes) == 2  # a new producer (a new producer id)
    assert await client.publish("agent.messages", _message()) == "md-2"
    assert len(fakes) == 2  # nothing failed: kept


async def test_publish_maps_a_refused_send() -> None:
    cause = TopicAuthorizationFailedError()
    client = _with_producer(FakeProducer(on_send=cause))
    with pytest.raises(PublishError) as exc:
        await client.publish("agent.messages", _message(), key="k1")
    err = exc.value
    assert (err.topic, err.key, err.cause, err.retriable) == (
        "p.agent.messages",
        "k1",
        cause,
        False,
    )
    assert err.__cause__ is cause
    assert "User:ANONYMOUS may not write" in str(err)


async def test_publish_maps_a_failed_delivery_waited_or_not() -> None:
    cause = MessageSizeTooLargeError()
    client = _with_producer(FakeProducer(on_delivery=cause))
    with pytest.raises(PublishError, match=r"larger than the topic's max\.message\.bytes"):
        await client.publish("agent.messages", _message())
    fut = await client.publish("agent.messages", _message(), wait=False)
    with pytest.raises(PublishError) as exc:
        await fut
    assert exc.value.cause is cause
    with pytest.raises(PublishError):
        await client.publish_many("agent.messages", [_message(1), _message(2)])
    with pytest.raises(PublishError) as raw:
        await client.publish_raw("no.such", b"x", key=b"rk")
    assert (raw.value.topic, raw.value.key) == ("no.such", b"rk")


async def test_publish_unknown_topic_and_timeouts_are_retriable() -> None:
    client = _with_producer(FakeProducer(on_send=UnknownTopicOrPartitionError()))
    with pytest.raises(PublishError, match="does not exist") as exc:
        await client.publish_raw("no.such", b"x")
    assert exc.value.retriable
    client = _with_producer(FakeProducer(on_delivery=KafkaTimeoutError()))
    with pytest.raises(PublishError, match="not acknowledged in time") as exc:
        await client.publish("agent.messages", _message())
    assert exc.value.retriable


async def test_publish_still_sends_and_returns_metadata() -> None:
    producer = FakeProducer()
    client = _with_producer(producer)
    assert await client.publish("agent.messages", _message(), key="k") == "md-1"
    assert await client.publish_many("agent.messages", [_message(2), _message(3)]) == 2
    assert [(t, k) for t, _, k in producer.sent] == [
        ("p.agent.messages", b"k"),
        ("p.agent.messages", b"planner-1"),  # an AgentMessage's key: its sender
        ("p.agent.messages", b"planner-1"),
    ]


# -- the sync client's thread --------------------------------------------------------------
def _sync_with_producer(producer: FakeProducer) -> Client:
    """A sync client whose every producer is `producer` (built by its own start)."""
    client = Client(Settings.from_env({"AGENTSTREAM_TOPIC_PREFIX": "p."}))
    client._async._new_producer = lambda what, **options: producer  # type: ignore[method-assign]
    return client


def test_sync_client_starts_its_thread_at_first_use_and_stop_ends_it() -> None:
    before = set(_threads())
    producer = FakeProducer()
    client = _sync_with_producer(producer)
    assert set(_threads()) == before  # constructing starts nothing
    assert client.publish("agent.messages", _message()) == "md-1"
    fut = client.publish("agent.messages", _message(2), wait=False)
    assert fut.result(timeout=5) == "md-2"
    assert client.publish_many("agent.messages", iter([_message(3)])) == 1
    (mine,) = set(_threads()) - before
    client.stop()
    assert not mine.is_alive()
    assert producer.stopped
    client.stop()  # twice is fine


def test_sync_client_raises_the_typed_error() -> None:
    client = _sync_with_producer(FakeProducer(on_send=TopicAuthorizationFailedError()))
    try:
        with pytest.raises(PublishError) as exc:
            client.publish("agent.messages", _message())
        assert exc.value.topic == "p.agent.messages"
    finally:
        client.stop()
    client = _sync_with_producer(FakeProducer(on_delivery=MessageSizeTooLargeError()))
    try:
        fut = client.publish("agent.messages", _message(), wait=False)
        with pytest.raises(PublishError):
            fut.result(timeout=5)
    finally:
        client.stop()


async def test_sync_client_works_inside_a_running_loop() -> None:
    # as in Jupyter: the caller's own loop is running; asyncio.run would refuse here
    with _sync_with_producer(FakeProducer()) as client:
        assert client.publish("agent.messages", _message()) == "md-1"


def test_a_dropped_client_stops_its_thread() -> None:
    before = set(_threads())
    client = _sync_with_producer(FakeProducer())
    client.publish("agent.messages", _message())
    (mine,) = set(_threads()) - before
    del client
    gc.collect()
    _wait(lambda: not mine.is_alive(), what="the thread of a collected client to end")


def test_a_stopped_client_starts_again() -> None:
    producer = FakeProducer()
    client = _sync_with_producer(producer)
    client.publish("agent.messages", _message())
    client.stop()
    assert producer.stopped
    producer.stopped = False  # what the client builds next (no broker to start a real one)
    assert client.publish("agent.messages", _message(2)) == "md-2"
    client.stop()


class Records:
    """An async generator of records whose end (the consumer's stop) is observable."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    async def gen(self) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                i += 1
                await asyncio.sleep(0)
                yield i
        finally:
            self.closed.set()


def test_an_abandoned_subscription_stops_its_consumer() -> None:
    runner = _LoopThread()
    try:
        records = Records()
        for i in Subscription(runner, records.gen()):  # type: ignore[arg-type]
            if i == 2:
                break
        gc.collect()
        _wait(records.closed.is_set, what="the abandoned subscription to close")
    finally:
        runner.close()


def test_a_subscription_kept_open_ends_with_the_client() -> None:
    client = Client(Settings.from_env({}))
    records = Records()
    sub = Subscription(client._loop(), records.gen())  # type: ignore[arg-type]
    assert next(sub) == 1
    client.stop()
    assert records.closed.is_set()
    with pytest.raises(StopIteration):
        next(sub)


def test_a_subscription_ends_with_its_with_block() -> None:
    runner = _LoopThread()
    try:
        records = Records()
        with Subscription(runner, records.gen()) as sub:  # type: ignore[arg-type]
            assert next(sub) == 1
        assert records.closed.is_set()
    finally:
        runner.close()


def test_the_sync_subscribe_is_a_plain_iterator(monkeypatch: pytest.MonkeyPatch) -> None:
    records = Records()
    client = Client(Settings.from_env({}))
    seen: dict[str, Any] = {}

    def subscribe(topics: Any, **kw: Any) -> AsyncIterator[int]:
        seen.update(kw, topics=topics)
        return records.gen()

    monkeypatch.setattr(client._async, "subscribe", subscribe)
    try:
        sub = client.subscribe(
            "agent.messages",
            from_beginning=True,
            timeout_s=2,
            max_events=3,
            partitions=[1],
            until_end=True,
        )
        assert isinstance(sub, Iterator)
        assert [next(sub), next(sub)] == [1, 2]
        assert seen == {
            "topics": "agent.messages",
            "from_beginning": True,
            "group_id": None,
            "timeout_s": 2,
            "max_events": 3,
            "partitions": [1],
            "offset": None,
            "on_lost": None,
            "until_end": True,
        }
    finally:
        client.stop()


def test_the_loop_refuses_to_wait_for_itself() -> None:
    runner = _LoopThread()
    try:

        async def inner() -> None:
            runner.run(asyncio.sleep(0))

        with pytest.raises(RuntimeError, match="its own event loop"):
            runner.run(inner())
    finally:
        runner.close()


# -- the unknown-topic wait ---------------------------------------------------------------
class NoTopicConsumer:
    def __init__(self) -> None:
        class _Client:
            async def force_metadata_update(self) -> None:
                return None

        self._client = _Client()

    def partitions_for_topic(self, topic: str) -> None:
        return None


async def test_an_unknown_topic_fails_after_the_given_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(BrokerError, match=r"topic p\.nope does not exist"):
        await _partitions(NoTopicConsumer(), "p.nope", 0.3)
    assert 0.3 <= time.monotonic() - t0 < 2


# -- py.typed ------------------------------------------------------------------------------
def test_the_package_ships_py_typed() -> None:
    # PEP 561: one marker at the top of the package covers its subpackages
    assert importlib.resources.files("agentstream").joinpath("py.typed").is_file()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_data = config["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["agentstream"]


def test_a_subscription_waiting_in_another_thread_ends_when_the_client_stops() -> None:
    client = Client(Settings.from_env({}))
    closed = threading.Event()

    async def waiting() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()  # a consumer with nothing to read
            yield 2
        finally:
            closed.set()

    sub = Subscription(client._loop(), waiting())  # type: ignore[arg-type]
    assert next(sub) == 1
    outcome: list[Any] = []

    def iterate() -> None:
        outcome.append(list(sub))

    reader = threading.Thread(target=iterate)
    reader.start()
    _wait(lambda: sub._step is not None and not sub._step.done(), what="the reader to wait")
    client.stop()
    reader.join(10)
    assert outcome == [[]]  # the iteration ended, no CancelledError in the reader
    assert closed.is_set()


class _HangingProducer(FakeProducer):
    """A broker that never answers: the idempotent producer retries for ever."""

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any:
        self.sent.append((topic, value, key))
        return asyncio.get_running_loop().create_future()  # never done


class _SecondSendRefused(FakeProducer):
    """The first record's delivery comes later; the second send is refused."""

    first: asyncio.Future[Any]

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any:
        self.sent.append((topic, value, key))
        if len(self.sent) == 2:
            raise KafkaTimeoutError()  # the send buffer stayed full
        self.first = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, self.first.set_result, "md-1")
        return self.first


async def test_a_publish_the_broker_never_acknowledges_fails_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiokafka expires no batch of an idempotent producer: an unreachable broker hung
    `publish` and `stop` for good. Now a retriable PublishError after the timeout."""
    from agentstream.streams import client as client_module

    monkeypatch.setattr(client_module, "PUBLISH_DELIVERY_TIMEOUT_S", 0.05)
    client = _with_producer(_HangingProducer())
    with pytest.raises(PublishError) as caught:
        await asyncio.wait_for(client.publish("agent.messages", _message()), 5)
    assert caught.value.retriable
    many = _with_producer(_HangingProducer())
    with pytest.raises(PublishError):
        await asyncio.wait_for(many.publish_many("agent.messages", [_message()]), 5)


async def test_publish_many_stops_at_the_first_refusal_and_waits_for_the_rest() -> None:
    """A send refused in the middle raised at once, the events before it still in
    flight and those after it sent or not: now nothing after it is sent, and the error
    comes once the events before it have an outcome."""
    producer = _SecondSendRefused()
    client = _with_producer(producer)
    with pytest.raises(PublishError):
        await client.publish_many("agent.messages", [_message(1), _message(2), _message(3)])
    assert producer.first.done()  # the event before it has its outcome
    assert len(producer.sent) == 2  # the third never sent


async def test_an_event_json_cannot_hold_is_an_invalid_event_and_nothing_is_sent() -> None:
    producer = FakeProducer()
    client = _with_producer(producer)
    message = _message().model_copy(update={"metadata": {"n": 2**70}})
    with pytest.raises(InvalidEvent):
        await client.publish("agent.messages", message)
    with pytest.raises(InvalidEvent):
        await client.publish_many("agent.messages", [_message(), message, _message()])
    assert len(producer.sent) == 1  # only the event before it


async def test_what_every_consumer_would_dead_letter_is_refused_before_it_is_sent() -> None:
    """An event larger than AGENTSTREAM_MAX_EVENT_BYTES (below the producer's own limit),
    or of a type its catalogue topic does not carry, was reported as published and then
    dead-lettered by every consumer. Now an InvalidEvent, and nothing is sent."""
    producer = FakeProducer()
    client = _with_producer(producer)
    big = _message().model_copy(update={"content": "x" * client.settings.max_event_bytes})
    with pytest.raises(InvalidEvent, match="MAX_EVENT_BYTES"):
        await client.publish("agent.messages", big)
    with pytest.raises(InvalidEvent, match=r"does not belong on llm\.requests"):
        await client.publish("llm.requests", _message())
    assert producer.sent == []


async def test_a_key_the_workers_would_refuse_is_refused_before_it_is_sent() -> None:
    """On the topics whose workers hold a record to its event's own key
    (`TopicSpec.keyed`: heartbeats, metric samples, comms records, LLM requests and
    cancellations) `publish(key=...)` with another key was acknowledged, then
    dead-lettered by every worker. Elsewhere the key stays the caller's."""
    producer = FakeProducer()
    client = _with_producer(producer)
    sample = MetricSample(series="cpu", timestamp=1.0, value=1.0)
    with pytest.raises(InvalidEvent, match=r"metrics\.samples is keyed by the series name"):
        await client.publish("metrics.samples", sample, key="host-1")
    assert producer.sent == []
    await client.publish("metrics.samples", sample, key="cpu")  # its own: as without
    await client.publish("agent.messages", _message(), key="anything")
    assert [k for _, _, k in producer.sent] == [b"cpu", b"anything"]
    keyed = {name for name, spec in CATALOGUE.items() if spec.keyed}
    assert keyed == {
        "agent.heartbeats",
        "metrics.samples",
        "comms.records",
        "llm.requests",
        "llm.cancellations",
    }


class StuckProducer(FakeProducer):
    """A broker that never acknowledges (an unmet min.insync.replicas, a leader away):
    deliveries never complete, and stop() waits for them as aiokafka's does."""

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any:
        self.sent.append((topic, value, key))
        return asyncio.get_running_loop().create_future()

    async def stop(self) -> None:
        await asyncio.Event().wait()


async def test_a_delivery_timeout_keeps_the_producer_so_the_retry_does_not_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a timed-out batch is still being retried, its sequence numbers in step: renewing
    # the producer stopped it first, which waited for that batch as long as the outage
    monkeypatch.setattr(streams_client, "PUBLISH_DELIVERY_TIMEOUT_S", 0.2)
    client = _with_producer(StuckProducer())
    for _ in range(2):
        with pytest.raises(PublishError, match="not acknowledged in time") as exc:
            await asyncio.wait_for(client.publish("agent.messages", _message()), 5)
        assert exc.value.retriable
    assert len(client.fakes) == 1  # type: ignore[attr-defined]


async def test_an_unwaited_delivery_fails_in_time_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams_client, "PUBLISH_DELIVERY_TIMEOUT_S", 0.2)
    client = _with_producer(StuckProducer())
    fut = await client.publish("agent.messages", _message(), wait=False)
    with pytest.raises(PublishError, match="not acknowledged in time") as exc:
        await asyncio.wait_for(fut, 5)
    assert exc.value.retriable


async def test_a_producer_that_will_not_close_is_replaced_all_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # refused by the broker, the producer is renewed at the next send: closing the old
    # one is bounded like a delivery
    monkeypatch.setattr(streams_client, "PUBLISH_DELIVERY_TIMEOUT_S", 0.2)
    client = _with_producer(FakeProducer(on_delivery=MessageSizeTooLargeError()))
    with pytest.raises(PublishError):
        await client.publish("agent.messages", _message())
    first = client.fakes[0]  # type: ignore[attr-defined]
    first.on_delivery = None  # what the next producer is built with: it delivers

    async def never() -> None:
        await asyncio.Event().wait()

    first.stop = never
    assert await asyncio.wait_for(client.publish("agent.messages", _message()), 5) == "md-1"
    assert len(client.fakes) == 2  # type: ignore[attr-defined]


async def test_a_first_publish_nobody_answers_is_not_a_missing_topic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aiokafka reports a metadata request no broker answered as False, not an error: read
    # as "the topic does not exist", a retry loop reading `retriable` gave up on an outage
    monkeypatch.setattr(streams_client, "PUBLISH_UNKNOWN_TOPIC_S", 0.3)
    producer = FakeProducer()

    class Unanswered:
        unauthorized_topics: frozenset[str] = frozenset()

        def partitions_for_topic(self, topic: str) -> None:
            return None

    async def no_answer() -> bool:
        return False

    producer.client = types.SimpleNamespace(
        cluster=Unanswered(), add_topic=lambda t: None, force_metadata_update=no_answer
    )
    client = _with_producer(producer)
    with pytest.raises(PublishError, match="no broker answered") as exc:
        await client.publish("agent.messages", _message())
    assert exc.value.retriable and "does not exist" not in str(exc.value)


# -- the producer's start, renewal and stop under concurrent calls ------------------------
class GatedProducer(FakeProducer):
    """A producer whose slow steps wait, as aiokafka's do for a broker: each step named in
    `hold` until its event is set: "send" to the topic "slow.send" (a full batch waiting
    to drain), "metadata" (the first look for the topic "slow.meta"), "start", "stop"
    (flushing). Stopped, it refuses sends as aiokafka's does (ProducerClosed); the broker
    refuses every record sent to "refused"."""

    def __init__(self, hold: dict[str, asyncio.Event]) -> None:
        super().__init__()
        self.hold = hold
        self.waiting = 0
        self.started = self.stop_done = False
        self.known = {"slow.send", "refused", "other"}
        self.unauthorized_topics: frozenset[str] = frozenset()
        self.client = types.SimpleNamespace(
            cluster=self, add_topic=lambda t: None, force_metadata_update=self._metadata
        )

    async def _held(self, step: str) -> None:
        if step in self.hold:
            self.waiting += 1
            await self.hold[step].wait()
            self.waiting -= 1

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {0} if topic in self.known else None

    async def _metadata(self) -> bool:
        await self._held("metadata")
        self.known.add("slow.meta")
        return True

    async def start(self) -> None:
        await self._held("start")
        self.started = True

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any:
        if topic == "slow.send":
            await self._held("send")
        if self.stopped:
            from aiokafka.errors import ProducerClosed

            raise ProducerClosed()
        self.on_delivery = MessageSizeTooLargeError() if topic == "refused" else None
        return await super().send(topic, value, key)

    async def stop(self) -> None:
        self.stopped = True  # at once, as aiokafka's: a send after it is refused
        await self._held("stop")
        self.stop_done = True


def _gated_client(hold: dict[str, asyncio.Event]) -> tuple[AsyncClient, list[GatedProducer]]:
    client = AsyncClient(Settings.from_env({}))
    built: list[GatedProducer] = []

    def new_producer(what: str, **options: Any) -> GatedProducer:
        built.append(GatedProducer(hold))
        return built[-1]

    client._new_producer = new_producer  # type: ignore[method-assign]
    return client, built


async def _until(pred: Callable[[], Any], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not pred():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("held_in", ["send", "metadata"])
async def test_a_renewal_lets_the_sends_under_way_finish(held_in: str) -> None:
    """A publish refused by the broker renews the producer at the next send. A publish
    still handing its record to the old producer failed: waiting for a full batch to
    drain, the producer was stopped under it (ProducerClosed); waiting for a new topic's
    metadata, it found no producer at all while the old one was flushing (AttributeError
    on None). Now the renewal waits for it: its record goes out once, on the old
    producer, and the next one on the new."""
    go, flushed = asyncio.Event(), asyncio.Event()
    client, built = _gated_client({held_in: go, "stop": flushed})
    held = asyncio.create_task(client.publish_raw(f"slow.{held_in[:4]}", b"held"))
    await _until(lambda: built and built[0].waiting == 1, "the held send")
    with pytest.raises(PublishError):
        await client.publish_raw("refused", b"too big")  # renewed at the next send
    after = asyncio.create_task(client.publish_raw("other", b"after"))
    await _until(lambda: client._producer is None or after.done(), "the renewal to begin")
    go.set()
    await _until(held.done, "the held publish")  # before the old producer's flush ends
    flushed.set()
    outcomes = await asyncio.wait_for(asyncio.gather(held, after, return_exceptions=True), 5)
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    first, second = built  # one new producer, no more
    assert sorted(v for _, v, _ in first.sent) == [b"held", b"too big"]
    assert [v for _, v, _ in second.sent] == [b"after"]
    assert first.stop_done and not second.stopped
    await client.stop()
    assert second.stop_done


async def test_a_stop_during_the_start_stops_what_was_started() -> None:
    """`stop()` while a publish is starting the producer found none and returned; the
    producer started just after ran on, never stopped (its connections and tasks)."""
    gate = asyncio.Event()
    client, built = _gated_client({"start": gate})
    publishing = asyncio.create_task(client.publish_raw("other", b"x"))
    await _until(lambda: built and built[0].waiting == 1, "the start")
    stopping = asyncio.create_task(client.stop())
    await asyncio.sleep(0)  # its first step, while the producer is starting
    gate.set()
    md, _ = await asyncio.wait_for(asyncio.gather(publishing, stopping), 5)
    assert md == "md-1"  # published before the stop, and flushed by it
    assert [p.stop_done for p in built] == [True]


async def test_a_second_stop_returns_once_the_producer_is_stopped() -> None:
    """It returned at once, while the first one still flushed the producer."""
    gate = asyncio.Event()
    client, built = _gated_client({"stop": gate})
    await client.start()
    first = asyncio.create_task(client.stop())
    await _until(lambda: built[0].waiting == 1, "the first stop to flush")

    async def stop() -> bool:
        await client.stop()
        return built[0].stop_done

    second = asyncio.create_task(stop())
    await asyncio.sleep(0)  # its first step: returned, or waiting for the first stop
    gate.set()
    _, stopped_when_it_returned = await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert stopped_when_it_returned


class LateRefusal(FakeProducer):
    """Deliveries wait for the test to settle them (`pending`)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[asyncio.Future[Any]] = []

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any:
        self.sent.append((topic, value, key))
        self.pending.append(asyncio.get_running_loop().create_future())
        return self.pending[-1]


async def test_a_late_refusal_of_a_replaced_producer_does_not_renew_its_successor() -> None:
    client = AsyncClient(Settings.from_env({}))
    built: list[LateRefusal] = []

    def new_producer(what: str, **options: Any) -> LateRefusal:
        built.append(LateRefusal())
        return built[-1]

    client._new_producer = new_producer  # type: ignore[method-assign]
    late = await client.publish("agent.messages", _message(1), wait=False)
    refused = asyncio.create_task(client.publish("agent.messages", _message(2)))
    await _until(lambda: len(built[0].pending) == 2, "the second send")
    built[0].pending[1].set_exception(MessageSizeTooLargeError())
    with pytest.raises(PublishError):
        await refused
    renewing = asyncio.create_task(client.publish("agent.messages", _message(3)))
    await _until(lambda: len(built) == 2 and built[1].pending, "the renewal")
    # the replaced producer's last delivery is refused after all (its stop gave up)
    built[0].pending[0].set_exception(MessageSizeTooLargeError())
    with pytest.raises(PublishError):
        await late
    built[1].pending[0].set_result("md")
    assert await renewing == "md"
    fourth = asyncio.create_task(client.publish("agent.messages", _message(4)))
    await _until(lambda: sum(len(p.pending) for p in built) == 4, "the fourth send")
    assert len(built) == 2  # the successor's sequence numbers are in step: kept
    built[-1].pending[-1].set_result("md")
    await fourth


# -- one AsyncClient, one event loop after another ----------------------------------------
def test_each_asyncio_run_publishes_on_a_producer_of_its_own_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The producer a first `asyncio.run` started belongs to its loop, closed when the
    run ends: the next run's publish went to it and never completed. Now a run whose
    loop is not the producer's starts a new one, and says so in a warning if the one it
    drops still held records whose delivery nobody confirmed."""
    monkeypatch.setattr(streams_client, "PUBLISH_DELIVERY_TIMEOUT_S", 2.0)
    client = AsyncClient(Settings.from_env({}))
    built: list[FakeProducer] = []

    def new_producer(what: str, **options: Any) -> FakeProducer:
        # the first never delivers: its loop ends with one record unconfirmed
        built.append(_HangingProducer() if not built else FakeProducer())
        return built[-1]

    client._new_producer = new_producer  # type: ignore[method-assign]

    async def unconfirmed() -> None:
        await client.publish("agent.messages", _message(1), wait=False)

    asyncio.run(unconfirmed())
    caplog.set_level(logging.INFO, logger=streams_client.__name__)
    assert asyncio.run(client.publish("agent.messages", _message(2))) == "md-1"
    assert len(built) == 2 and built[0]._closed  # type: ignore[attr-defined]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 record" in warning.getMessage()
    caplog.clear()

    async def publish_and_stop() -> Any:
        try:
            return await client.publish("agent.messages", _message(3))
        finally:
            await client.stop()

    # every delivery confirmed: a new producer again, and no warning
    assert asyncio.run(publish_and_stop()) == "md-1"
    assert len(built) == 3 and built[2].stopped
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_producer_of_a_loop_running_in_another_thread_is_left_to_it() -> None:
    """Two loops at once (threads) sharing one AsyncClient: the producer cannot serve
    both, and replacing it would pull it from under the other. A RuntimeError says so."""
    runner = _LoopThread()
    client = _with_producer(FakeProducer())
    try:
        runner.run(client.start())
        with pytest.raises(RuntimeError, match="another thread"):
            await client.publish("agent.messages", _message())
        assert client.fakes == [client.fakes[0]] and not client.fakes[0].sent  # type: ignore[attr-defined]
        runner.run(client.stop())
        assert client.fakes[0].stopped  # type: ignore[attr-defined]
    finally:
        runner.close()


def test_a_live_reader_out_of_range_goes_on_at_the_log_start_naming_what_it_lost() -> None:
    from agentstream.streams.client import resume_out_of_range

    assert resume_out_of_range(3, 8, 20) == (8, 3)  # [3, 8) deleted unread
    assert resume_out_of_range(25, 8, 20) == (20, None)  # truncated below it: nothing lost
    assert resume_out_of_range(9, 8, 20) == (9, None)  # back in range (a leader change)


def test_a_stand_in_is_received_with_its_error() -> None:
    from aiokafka.structs import ConsumerRecord

    from agentstream.streams.client import _received
    from agentstream.streams.errors import UnreadableRecord
    from agentstream.streams.record_batches import Unreadable

    stand_in = Unreadable(
        b"{}", reason="header key b'\\xff' is not UTF-8", first_offset=7, last_offset=7
    )
    rec = ConsumerRecord("t", 1, 7, 1000, 0, b"k", stand_in, None, 1, 2, ())
    got = _received("t", rec, 1_000_000)
    assert (got.offset, got.key, got.raw, got.event) == (7, b"k", b"{}", None)
    assert isinstance(got.error, UnreadableRecord)
    assert str(got.error) == "offset 7: header key b'\\xff' is not UTF-8"
    assert type(got.raw) is bytes  # not the stand-in itself


class Trickle:
    """A consumer of one partition holding offsets 0-2 whose broker answers a fetch with
    the next record 0.6 s after it was asked: longer than `until_end`'s 500 ms poll, so
    an empty fetch comes before each record."""

    def __init__(self) -> None:
        self.pos, self.ready_at = 0, None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def assign(self, tps: list[Any]) -> None:
        self.tp = tps[0]

    async def seek_to_beginning(self, *tps: Any) -> None:
        self.pos = 0

    async def end_offsets(self, tps: list[Any]) -> dict[Any, int]:
        return {tp: 3 for tp in tps}

    async def position(self, tp: Any) -> int:
        return self.pos

    async def getmany(self, timeout_ms: int = 0, **kw: Any) -> dict[Any, list[Any]]:
        if self.ready_at is None:
            self.ready_at = time.monotonic() + 0.6  # asked now
        await asyncio.sleep(min(timeout_ms / 1000, max(self.ready_at - time.monotonic(), 0)))
        if self.pos >= 3 or time.monotonic() < self.ready_at:
            return {}
        rec = types.SimpleNamespace(
            offset=self.pos, partition=0, timestamp=0, key=None, value=b"{}", headers=()
        )
        self.pos, self.ready_at = self.pos + 1, None
        return {self.tp: [rec]}


async def test_until_end_with_a_timeout_does_not_count_the_readers_time() -> None:
    """`timeout_s` is the broker's silence: a reader slower than it with each record
    still gets every record up to the end (the subscription used to count the reader's
    time too, end after the first record, and the CLI exit 0 as if it had them all)."""
    client = AsyncClient(Settings.from_env({}))
    consumer = Trickle()
    client._new_consumer = lambda *a, **kw: consumer  # type: ignore[method-assign]
    offsets = []
    async with asyncio.timeout(30):
        async for rec in client.subscribe(
            "agent.messages", offset="beginning", timeout_s=1.0, until_end=True
        ):
            offsets.append(rec.offset)
            await asyncio.sleep(1.2)  # slower than timeout_s
    assert offsets == [0, 1, 2]
    # and once at the end it stops without waiting out a timeout
    consumer.pos, began = 0, time.monotonic()
    async with asyncio.timeout(30):
        got = [
            r.offset
            async for r in client.subscribe("agent.messages", offset="beginning", until_end=True)
        ]
    assert got == [0, 1, 2] and time.monotonic() - began < 5


class CutBack(Trickle):
    """A consumer of one partition whose log holds offsets 0-5 when reading begins and is
    cut back (an unclean leader election) to end at `cut_to` once offset 1 was fetched,
    with nothing written after: the records past the cut are gone, not yet to come."""

    def __init__(self, cut_to: int) -> None:
        self.pos, self.end, self.cut_to = 0, 6, cut_to

    def assignment(self) -> set[Any]:
        return {self.tp}

    async def seek_to_beginning(self, *tps: Any) -> None:
        self.pos = 0

    def seek(self, tp: Any, offset: int) -> None:
        self.pos = offset

    async def beginning_offsets(self, tps: list[Any]) -> dict[Any, int]:
        return {tp: 0 for tp in tps}

    async def end_offsets(self, tps: list[Any]) -> dict[Any, int]:
        return {tp: self.end for tp in tps}

    async def position(self, tp: Any) -> int:
        return self.pos

    async def getmany(self, timeout_ms: int = 0, **kw: Any) -> dict[Any, list[Any]]:
        if self.pos > self.end:  # what the broker answers a fetch past the log's end
            raise OffsetOutOfRangeError({self.tp: self.pos})
        if self.pos == self.end:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        rec = types.SimpleNamespace(
            offset=self.pos, partition=0, timestamp=0, key=None, value=b"{}", headers=()
        )
        self.pos += 1
        if rec.offset == 1:
            self.end = self.cut_to
        return {self.tp: [rec]}


@pytest.mark.parametrize(("cut_to", "read"), [(3, [0, 1, 2]), (1, [0, 1])])
async def test_until_end_stops_at_a_log_cut_back_below_the_end_it_found(
    cut_to: int, read: list[int]
) -> None:
    """The end `until_end` found (6) is gone after the cut: the read stops where the log
    now ends, whether the position is still inside it (3: nothing fails, the fetches come
    back empty) or past it (1: a fetch fails out of range)."""
    client = AsyncClient(Settings.from_env({}))
    client._new_consumer = lambda *a, **kw: CutBack(cut_to)  # type: ignore[method-assign]
    async with asyncio.timeout(10):
        got = [
            r.offset
            async for r in client.subscribe("agent.messages", offset="beginning", until_end=True)
        ]
    assert got == read


class CutBackBeside(CutBack):
    """`CutBack`'s partition 0 (cut to end at 3) beside a partition 1 that gets a new
    record for every fetch, forever: no fetch comes back empty."""

    def __init__(self) -> None:
        super().__init__(3)
        self.busy = 0

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1}

    def assign(self, tps: list[Any]) -> None:
        self.tp, self.other = sorted(tps, key=lambda tp: tp.partition)

    def assignment(self) -> set[Any]:
        return {self.tp, self.other}

    async def seek_to_beginning(self, *tps: Any) -> None:
        self.pos = self.busy = 0

    async def end_offsets(self, tps: list[Any]) -> dict[Any, int]:
        ends = {self.tp: self.end, self.other: self.busy}
        return {tp: ends[tp] for tp in tps}

    async def position(self, tp: Any) -> int:
        return self.pos if tp == self.tp else self.busy

    async def getmany(self, timeout_ms: int = 0, **kw: Any) -> dict[Any, list[Any]]:
        await asyncio.sleep(0.01)
        got = {}
        if self.pos < self.end:
            got = await super().getmany(timeout_ms)
        rec = types.SimpleNamespace(
            offset=self.busy, partition=1, timestamp=0, key=None, value=b"{}", headers=()
        )
        self.busy += 1
        return {**got, self.other: [rec]}


async def test_until_end_stops_at_a_cut_back_log_beside_a_busy_partition() -> None:
    """A partition written to all the time keeps every fetch busy: the cut beside it is
    still seen, and the read ends."""
    client = AsyncClient(Settings.from_env({}))
    client._new_consumer = lambda *a, **kw: CutBackBeside()  # type: ignore[method-assign]
    async with asyncio.timeout(10):
        got = [
            (r.partition, r.offset)
            async for r in client.subscribe("agent.messages", offset="beginning", until_end=True)
        ]
    assert [o for p, o in got if p == 0] == [0, 1, 2]


class Failover(Trickle):
    """A partition whose log ends at 3, though no fetch brings a record (the leader is
    gone), and whose broker cannot say where the log ends: after the first answer each
    ask takes 30 s to fail."""

    async def end_offsets(self, tps: list[Any]) -> dict[Any, int]:
        if getattr(self, "asked", False):
            await asyncio.sleep(30)
            raise KafkaTimeoutError()
        self.asked = True
        return await super().end_offsets(tps)

    async def getmany(self, timeout_ms: int = 0, **kw: Any) -> dict[Any, list[Any]]:
        await asyncio.sleep(timeout_ms / 1000)
        return {}


async def test_until_end_keeps_its_timeout_while_the_end_cannot_be_asked() -> None:
    """`timeout_s` is the broker's silence, asking for the end included: the read ends
    after about that long, not after the ask's own timeout."""
    client = AsyncClient(Settings.from_env({}))
    client._new_consumer = lambda *a, **kw: Failover()  # type: ignore[method-assign]
    began = time.monotonic()
    async with asyncio.timeout(60):
        got = [
            r.offset
            async for r in client.subscribe(
                "agent.messages", offset="beginning", until_end=True, timeout_s=2.0
            )
        ]
    assert got == [] and time.monotonic() - began < 6
