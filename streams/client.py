"""Clients for services that publish to and consume from the pipeline.

`AsyncClient` is for asyncio code, `Client` for everything else (scripts, Jupyter, web
frameworks without an event loop of their own): the same methods, blocking.

    with Client(source="agent-7") as client:
        client.publish("agent.messages", AgentMessage(...))
        for rec in client.subscribe("agent.messages.accepted", from_beginning=True):
            print(rec.event.payload)

    async with AsyncClient(source="agent-7") as client:
        await client.publish("agent.messages", AgentMessage(...))
        async for rec in client.subscribe("agent.messages.accepted", from_beginning=True):
            print(rec.event.payload)

Connection settings come from the environment (`streams.settings`), or from constructor
arguments, which override it (`bootstrap=`, `security_protocol=`, `sasl_password=`, ...).
A password given as an argument is kept in memory only: not in the settings, not in a
repr, not in a log.

Publishing validates the event first (a `SchemaError` never reaches the broker), batches
in the producer, waits for acks from all in-sync replicas and uses the idempotent
producer, so a retried send cannot duplicate a record. A record the broker refuses or does
not acknowledge raises `PublishError` (topic, key, cause, `retriable`); a broker that
cannot be reached or refuses who we are raises `BrokerError` / `BrokerAuthError`. The
CLI's `publish` and `tail` are built on `AsyncClient`; docs/client.md is the user guide.

An `AsyncClient` publishes on a producer of the running event loop: used from one
`asyncio.run` after another, it starts a new one in each (aiokafka's objects work on
their own loop only) and drops the last, which cannot be stopped once its loop ended.
Publishes may run concurrently; the producer's start, renewal and stop are serialised.

`Client` runs an `AsyncClient` on an event loop of its own in a daemon thread, started at
its first use and stopped by `stop()` (or the `with` block, or when the client is
garbage-collected or the interpreter exits): so it also works from code that is itself
running in an event loop, where `asyncio.run` would refuse.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import threading
import time
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from uuid import uuid4

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from pydantic import SecretStr

from agentstream.schemas import Event, Payload, encode, registry
from agentstream.schemas.errors import InvalidEvent, SchemaError
from agentstream.streams import record_batches
from agentstream.streams.errors import BrokerError, PublishError, UnreadableRecord
from agentstream.streams.kafka_security import (
    PASSWORD_ENTRY,
    new_consumer,
    new_producer,
    principal,
)
from agentstream.streams.settings import Settings, SettingsError, get_settings
from agentstream.streams.topics import CATALOGUE

if TYPE_CHECKING:
    from agentstream.streams.replay import Gap

T = TypeVar("T")
log = logging.getLogger(__name__)

#: how long `subscribe` waits for a topic to appear when its `timeout_s` does not say
UNKNOWN_TOPIC_TIMEOUT_S = 10.0
#: how long the first publish to a topic waits for the topic's metadata. Auto-creation is
#: off, so a topic the cluster does not know will not appear by itself: this covers only
#: a topic created a moment ago reaching every broker's metadata (milliseconds), where
#: aiokafka would wait its whole request timeout (30 s) before saying the topic is missing
PUBLISH_UNKNOWN_TOPIC_S = 3.0
#: how long a publish waits for the broker to acknowledge its record (and `stop` for the
#: records accepted before it): the idempotent producer retries a retriable failure
#: forever (aiokafka expires no batch then), so without it an unreachable broker or an
#: unmet min.insync.replicas hung the caller. Java's delivery.timeout.ms default. The
#: record may still be written after the error (at-least-once: consumers deduplicate on
#: the event id).
PUBLISH_DELIVERY_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Received:
    """One record from a subscription: a decoded event, or the reason it is not one — a
    `SchemaError` (not an event, or not a valid one), or `UnreadableRecord` for a record
    the Kafka client could not parse (`streams.record_batches`: `raw` is what could be
    kept of it, the record's value or the raw record batch)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    raw: bytes | None
    event: Event[Any] | None
    error: SchemaError | UnreadableRecord | None


def group_less_consumer(settings: Settings, purpose: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer for reading history (replay, audit, chain heads, policy folds): it joins no
    group and commits nothing, so it disturbs no consumer group, and it reads only committed
    transactions. Connects as the settings say (`streams.kafka_security`)."""
    # earliest: a position retention deleted under the reader (OffsetOutOfRange) moves to
    # the log's start, not its end; at its end the rest of the partition was skipped
    options.setdefault("auto_offset_reset", "earliest")
    return new_consumer(
        settings,
        purpose,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        client_id=f"agentstream-{purpose}-{uuid4().hex[:8]}",
        **options,
    )


async def listed_partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int] | None:
    """`topic`'s partitions by a metadata answer asked now; None when the broker does not
    list it (not created yet). Raises `BrokerError` when no broker answered: aiokafka
    reports that as a False result, not an error, and "no answer" read as "no topic" made
    a reader folding a topic from its beginning return an empty state (a worker's keys
    read as none, so its chain went on past records it could not vouch for)."""
    if not await consumer._client.force_metadata_update():
        raise BrokerError(f"no broker answered a metadata request (for {topic})")
    return consumer.partitions_for_topic(topic) or None


def build_event(topic: str, data: Any, *, source: str, event_type: str | None = None) -> Event[Any]:
    """A JSON object → a validated event for `topic`.

    Accepts a full envelope (has `type` and `payload`) or a bare payload, for which an
    envelope is built; the type comes from `event_type` or, when the topic carries exactly
    one event type, from the catalogue.
    """
    if isinstance(data, dict) and "payload" in data and "type" in data:
        envelope = dict(data)
        envelope.setdefault("schema_version", registry.model(str(data["type"])).VERSION)
        envelope.setdefault("source", source)
        event = registry.from_dict(envelope)
    else:
        if not isinstance(data, dict):
            raise InvalidEvent(f"expected a JSON object, got {type(data).__name__}")
        type_ = event_type or _only_type(topic)
        model = registry.model(type_)
        event = registry.from_dict(
            {"type": type_, "schema_version": model.VERSION, "source": source, "payload": data}
        )
        if not event.correlation_id:
            event = event.model_copy(update={"correlation_id": str(event.event_id)})
    expected = CATALOGUE[_base_name(topic)].events if _base_name(topic) in CATALOGUE else None
    if expected is not None and event.type not in expected:
        raise InvalidEvent(f"event type {event.type!r} does not belong on {topic}")
    return event


def _only_type(topic: str) -> str:
    spec = CATALOGUE.get(_base_name(topic))
    if spec is None or len(spec.events) != 1:
        raise InvalidEvent(f"bare payload on {topic}: say which event type it is (--type)")
    return spec.events[0]


def _base_name(topic: str) -> str:
    prefix = get_settings().topic_prefix
    return topic[len(prefix) :] if prefix and topic.startswith(prefix) else topic


# -- constructor arguments -----------------------------------------------------------
#: constructor argument → the `Settings` field it overrides
ARGUMENT_FIELDS: dict[str, str] = {
    "bootstrap": "kafka_bootstrap",
    "security_protocol": "kafka_security_protocol",
    "sasl_mechanism": "kafka_sasl_mechanism",
    "sasl_username": "kafka_sasl_username",
    "ssl_cafile": "kafka_ssl_cafile",
    "ssl_certfile": "kafka_ssl_certfile",
    "ssl_keyfile": "kafka_ssl_keyfile",
    "ssl_check_hostname": "kafka_ssl_check_hostname",
    "connect_timeout_s": "kafka_connect_timeout_s",
    "topic_prefix": "topic_prefix",
}

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def client_settings(settings: Settings | None = None, **arguments: Any) -> Settings:
    """The settings a client runs with: `settings` (default: the environment's) with the
    constructor arguments that were given (not None) over them. A value the settings
    refuse is a `SettingsError` naming the argument."""
    unknown = set(arguments) - set(ARGUMENT_FIELDS)
    if unknown:
        raise TypeError(f"unexpected client arguments: {', '.join(sorted(unknown))}")
    overrides = {ARGUMENT_FIELDS[k]: v for k, v in arguments.items() if v is not None}
    if not overrides:
        return settings or get_settings()
    try:
        if settings is None:
            return Settings.from_env(**overrides)
        # through from_env (with no environment) for its one-line errors
        current = {name: getattr(settings, name) for name in Settings.model_fields}
        return Settings.from_env({}, **{**current, **overrides})
    except SettingsError as exc:
        raise SettingsError(_argument_names(exc.message), **exc.context) from None


def _argument_names(message: str) -> str:
    """A settings error in the terms of the constructor: `AGENTSTREAM_KAFKA_BOOTSTRAP` →
    `bootstrap (AGENTSTREAM_KAFKA_BOOTSTRAP)` (the value may come from either)."""
    for arg, field in ARGUMENT_FIELDS.items():
        env = Settings.env_name(field)
        message = re.sub(rf"\b{env}=", f"{arg}=", message)
        message = re.sub(rf"\b{env}\b", f"{arg} ({env})", message)
    return message


class _GivenSecrets:
    """A secrets provider for `kafka_security.resolve`: the SASL password given to the
    constructor, and the credentials chain for anything else (a client key's password),
    asked only if needed. The password never enters the settings, which are printed
    (`agentstream config`), hashed as cache keys and handed to every component."""

    def __init__(self, settings: Settings, sasl_password: SecretStr) -> None:
        self._settings = settings
        self._given = {PASSWORD_ENTRY: sasl_password}
        self._chain: Any = None

    def get_secret_sync(self, name: str) -> str | None:
        if name in self._given:
            return self._given[name].get_secret_value()
        if self._chain is None:
            from agentstream.streams.credentials import KeychainCredentialsProvider

            self._chain = KeychainCredentialsProvider(self._settings)
        value: str | None = self._chain.get_secret_sync(name)
        return value

    def __repr__(self) -> str:
        return f"_GivenSecrets({', '.join(f'{k}=**********' for k in self._given)})"


# -- publish errors ----------------------------------------------------------------------
def _publish_error(
    settings: Settings, topic: str, key: str | bytes | None, size: int, cause: BaseException
) -> PublishError:
    if isinstance(cause, TopicAuthorizationFailedError):
        why = (
            f"{principal(settings)} may not write to it (TopicAuthorizationFailedError); "
            "the ACLs each role needs: `agentstream acls`"
        )
    elif isinstance(cause, MessageSizeTooLargeError | RecordTooLargeError):
        why = (
            f"the record ({size} bytes) is larger than the topic's max.message.bytes or "
            f"the producer's max_request_size ({type(cause).__name__})"
        )
    elif isinstance(cause, UnknownTopicOrPartitionError):
        why = "the topic does not exist (`agentstream topics create`; auto-creation is off)"
    elif isinstance(cause, KafkaTimeoutError | TimeoutError):
        why = f"not acknowledged in time ({type(cause).__name__})"
    else:
        why = f"{type(cause).__name__}: {cause}"
    return PublishError(f"publishing to {topic} failed: {why}", topic=topic, key=key, cause=cause)


#: what publish maps to PublishError: every aiokafka error of a send or its delivery
#: (a closed producer included), and timeouts
_REFUSED = (KafkaError, TimeoutError)


def _refused_by_broker(exc: BaseException) -> bool:
    """A delivery the broker answered with an error (the producer is renewed after it),
    not one that timed out: that batch is still being retried, its sequence numbers in
    step, and stopping the producer would wait for it as long as the outage lasts."""
    return not isinstance(exc, KafkaTimeoutError | TimeoutError)


class _Producing:
    """A producer of the client's, and what replacing it needs to know: the event loop it
    runs on (aiokafka's objects work on that loop only), the sends handing it a record
    now (a renewal or stop waits for them: stopped under them, their records were
    refused with ProducerClosed), the records it was handed whose delivery has no outcome
    yet (what dropping it may lose), and whether the broker refused one of its deliveries
    (it is renewed before the next send; a flag of this producer, not the client's, so
    that a late refusal of a replaced one does not renew its successor)."""

    def __init__(self, producer: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.producer = producer
        self.loop = loop
        self.refused = False
        self.unconfirmed = 0
        self._sending = 0
        self._handed_over = asyncio.Event()
        self._handed_over.set()

    def begin_send(self) -> None:
        self._sending += 1
        self._handed_over.clear()

    def end_send(self) -> None:
        self._sending -= 1
        if not self._sending:
            self._handed_over.set()

    def track(self, delivery: asyncio.Future[Any]) -> None:
        self.unconfirmed += 1

        def done(_: asyncio.Future[Any]) -> None:
            self.unconfirmed -= 1

        delivery.add_done_callback(done)

    async def retire(self) -> None:
        """Stop the producer once the sends under way have handed it their records: its
        stop flushes them."""
        await self._handed_over.wait()
        await self.producer.stop()


def sendable(settings: Settings, topic: str, event: Event[Any], key: str | None = None) -> bytes:
    """`event`'s bytes as `AsyncClient.publish` sends them to `topic` under `key` (None:
    the event's own), or `InvalidEvent` for what every consumer would dead-letter (a type
    that does not go on the topic, more than AGENTSTREAM_MAX_EVENT_BYTES, another key on
    a topic whose workers hold records to their own key, `TopicSpec.keyed`): refused
    before it is sent, and by `publish --dry-run` without a broker."""
    spec = CATALOGUE.get(topic)
    if spec is not None and event.type not in spec.events:
        raise InvalidEvent(f"event type {event.type!r} does not belong on {topic}")
    if spec is not None and spec.keyed and key and key != event.key:
        raise InvalidEvent(
            f"{topic} is keyed by the {spec.key} ({event.key!r}): workers refuse a record "
            f"under the key {key!r}"
        )
    try:
        value = encode(event)
    except TypeError as exc:  # orjson's JSONEncodeError too: a value JSON cannot hold
        raise InvalidEvent(f"the event cannot be encoded as JSON: {exc}") from exc
    if len(value) > settings.max_event_bytes:
        raise InvalidEvent(
            f"the event is {len(value)} bytes, more than AGENTSTREAM_MAX_EVENT_BYTES "
            f"({settings.max_event_bytes}): every consumer would dead-letter it"
        )
    return value


class AsyncClient:
    """Publish and subscribe with typed events, in asyncio code. Topic names are
    catalogue names; the settings' topic prefix is applied for you.

    `settings` defaults to the environment's (`AGENTSTREAM_*`); every other argument but
    `source` overrides one of its fields (see `ARGUMENT_FIELDS`), and `sasl_password` is
    the SASL password, used instead of the credentials chain's `kafka.sasl_password`."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        source: str = "agentstream-client",
        bootstrap: str | None = None,
        security_protocol: SecurityProtocol | None = None,
        sasl_mechanism: SaslMechanism | None = None,
        sasl_username: str | None = None,
        sasl_password: str | SecretStr | None = None,
        ssl_cafile: str | Path | None = None,
        ssl_certfile: str | Path | None = None,
        ssl_keyfile: str | Path | None = None,
        ssl_check_hostname: bool | None = None,
        connect_timeout_s: float | None = None,
        topic_prefix: str | None = None,
    ) -> None:
        self.settings = client_settings(
            settings,
            bootstrap=bootstrap,
            security_protocol=security_protocol,
            sasl_mechanism=sasl_mechanism,
            sasl_username=sasl_username,
            ssl_cafile=ssl_cafile,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            ssl_check_hostname=ssl_check_hostname,
            connect_timeout_s=connect_timeout_s,
            topic_prefix=topic_prefix,
        )
        self.source = source
        self._secrets: _GivenSecrets | None = None
        if sasl_password is not None:
            if not self.settings.kafka_security_protocol.startswith("SASL_"):
                # a password that would silently not be sent is a mistake in the caller
                raise SettingsError(
                    "sasl_password is given but security_protocol (AGENTSTREAM_KAFKA_"
                    f"SECURITY_PROTOCOL) is {self.settings.kafka_security_protocol}: "
                    "SASL_SSL (or SASL_PLAINTEXT) sends it",
                    field="kafka_security_protocol",
                )
            secret = (
                sasl_password if isinstance(sasl_password, SecretStr) else SecretStr(sasl_password)
            )
            self._secrets = _GivenSecrets(self.settings, secret)
        self._producing: _Producing | None = None
        self._lock_of: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    @property
    def _producer(self) -> Any:
        """The producer publishes go to (None before the first start and after a stop)."""
        return self._producing.producer if self._producing is not None else None

    def __repr__(self) -> str:
        s = self.settings
        parts = [f"bootstrap={s.bootstrap!r}", f"security_protocol={s.kafka_security_protocol!r}"]
        if s.kafka_security_protocol.startswith("SASL_"):
            parts += [
                f"sasl_mechanism={s.kafka_sasl_mechanism!r}",
                f"sasl_username={s.kafka_sasl_username!r}",
                "sasl_password="
                + ("'**********'" if self._secrets else f"<secret {PASSWORD_ENTRY}>"),
            ]
        if s.topic_prefix:
            parts.append(f"topic_prefix={s.topic_prefix!r}")
        parts.append(f"source={self.source!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _new_producer(self, what: str, **options: Any) -> Any:
        return new_producer(self.settings, what, secrets=self._secrets, **options)

    def _new_consumer(self, what: str, **options: Any) -> Any:
        return new_consumer(self.settings, what, secrets=self._secrets, **options)

    def _lock(self) -> asyncio.Lock:
        """The lock over the producer's start, renewal and stop, of the running loop (an
        asyncio.Lock serves one loop; a client may serve one `asyncio.run` after
        another). Without it a stop during a start returned before the producer it
        started (never stopped then), and a send found none while one was renewed."""
        loop = asyncio.get_running_loop()
        if self._lock_of is None or self._lock_of[0] is not loop:
            self._lock_of = (loop, asyncio.Lock())
        return self._lock_of[1]

    async def start(self) -> None:
        async with self._lock():
            await self._ready()

    async def _ready(self) -> _Producing:
        """The producer to send with, on the running loop: started if there is none,
        renewed after a delivery the broker refused, new in place of one of another
        loop. Called with `_lock` held."""
        loop = asyncio.get_running_loop()
        current = self._producing
        if current is not None and current.loop is not loop:
            self._drop(current)  # raises if another thread's loop runs it: kept then
            current = self._producing = None
        if current is not None and current.refused:
            # A batch the broker refused (too large, not authorized ...) leaves the
            # idempotent producer's sequence numbers for its partition out of step with
            # the broker's: every later record there fails with OutOfOrderSequenceNumber.
            # Java's producer bumps its epoch; aiokafka does not, so: a new producer id.
            self._producing = None
            try:  # flushes what it still holds, bounded like a delivery
                await asyncio.wait_for(current.retire(), PUBLISH_DELIVERY_TIMEOUT_S)
            except TimeoutError:
                log.warning(
                    "the replaced producer did not close within %gs; publishing goes on "
                    "with a new one",
                    PUBLISH_DELIVERY_TIMEOUT_S,
                )
            current = None
        if current is None:
            producer = self._new_producer(
                "publishing",
                acks="all",
                enable_idempotence=True,
                linger_ms=10,
                max_batch_size=256 * 1024,
                request_timeout_ms=30_000,
            )
            await producer.start()  # a BrokerError naming the cause, within the connect timeout
            current = self._producing = _Producing(producer, loop)
        return current

    def _drop(self, other: _Producing) -> None:
        """Let go of the producer of another event loop. aiokafka's objects work on their
        own loop only: once that loop stopped (an earlier `asyncio.run` ended) its
        producer can neither send nor be flushed or stopped from this one, and its
        sockets close when it is collected. A loop still running is another thread's:
        its producer is not ours to take, nor can it serve this loop."""
        if other.loop.is_running():
            raise RuntimeError(
                "this AsyncClient's producer runs on an event loop of another thread: "
                "use one AsyncClient per event loop (or the thread-safe Client)"
            )
        # what aiokafka's finalizer reads: an "Unclosed AIOKafkaProducer" error at
        # collection would report as a leak what is dropped here on purpose
        other.producer._closed = True
        if other.unconfirmed:
            log.warning(
                "dropped the producer of an event loop that has stopped: %d record(s) it "
                "was handed were never confirmed delivered (they may or may not have been "
                "written). Await the publishes, or the client's stop(), before a loop ends",
                other.unconfirmed,
            )
        else:
            log.debug("dropped the producer of an event loop that has stopped")

    async def stop(self) -> None:
        async with self._lock():
            current = self._producing
            if current is None:
                return
            if current.loop is not asyncio.get_running_loop():
                self._drop(current)  # raises if another thread's loop runs it: kept then
                self._producing = None
                return
            self._producing = None
            try:  # flushes what was accepted; bounded (PUBLISH_DELIVERY_TIMEOUT_S)
                await asyncio.wait_for(current.retire(), PUBLISH_DELIVERY_TIMEOUT_S)
            except TimeoutError:
                raise PublishError(
                    f"closing the client: records not acknowledged within "
                    f"{PUBLISH_DELIVERY_TIMEOUT_S:g}s (the broker unreachable?); they may "
                    "or may not have been written",
                    topic="*",
                    cause=TimeoutError(),
                ) from None

    def _full(self, topic: str) -> str:
        return self.settings.topic(topic) if topic in CATALOGUE else topic

    def event(self, payload: Payload, **kw: Any) -> Event[Any]:
        return Event.of(payload, source=kw.pop("source", self.source), **kw)

    async def publish(
        self, topic: str, item: Event[Any] | Payload, *, key: str | None = None, wait: bool = True
    ) -> Any:
        """Send one event (a bare payload gets an envelope). Returns the record metadata
        when `wait`, else the delivery future (which raises `PublishError` the same way)."""
        event = item if isinstance(item, Event) else self.event(item)
        value = sendable(self.settings, topic, event, key)
        key = key or event.key
        return await self._send(topic, value, key.encode(), key, wait)

    async def publish_many(self, topic: str, items: Iterable[Event[Any] | Payload]) -> int:
        """Send many events, batched; returns when all are acknowledged. An event refused
        before it was sent, or a send that failed, stops the sending; a delivery fails
        after the events are handed over (batched, they all are before the first answer),
        so the others may be published anyway. The first error is raised once every event
        sent has an outcome."""
        futures: list[Any] = []
        failed: BaseException | None = None
        for item in items:
            try:
                futures.append(await self.publish(topic, item, wait=False))
            except (SchemaError, PublishError) as exc:
                failed = exc
                break
        if futures:
            try:
                outcomes = await asyncio.wait_for(
                    asyncio.gather(*futures, return_exceptions=True), PUBLISH_DELIVERY_TIMEOUT_S
                )
            except TimeoutError:
                raise PublishError(
                    f"publishing to {self._full(topic)} failed: not acknowledged within "
                    f"{PUBLISH_DELIVERY_TIMEOUT_S:g}s; the events may still be written",
                    topic=self._full(topic),
                    cause=TimeoutError(),
                ) from None
            failed = failed or next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failed is not None:
            raise failed
        return len(futures)

    async def publish_raw(self, topic: str, value: bytes | None, key: bytes | None = None) -> Any:
        """Send bytes as they are (for tests of hostile input and for replays)."""
        return await self._send(topic, value, key, key, wait=True)

    async def _send(
        self, topic: str, value: bytes | None, key: bytes | None, shown_key: Any, wait: bool
    ) -> Any:
        full = self._full(topic)
        size = len(value or b"") + len(key or b"")
        async with self._lock():
            producing = await self._ready()
            # counted before the lock is released: a renewal or stop waits for this send
            # to hand its record over, and this send uses this producer to the end
            producing.begin_send()
        try:
            producer = producing.producer
            if producer.client.cluster.partitions_for_topic(full) is None:
                await self._await_topic(producer, full, shown_key, size)
            try:
                fut = await producer.send(full, value=value, key=key)
            except _REFUSED as exc:
                raise _publish_error(self.settings, full, shown_key, size, exc) from exc
            producing.track(fut)
        finally:
            producing.end_send()
        if not wait:
            return self._delivery(producing, fut, full, shown_key, size)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), PUBLISH_DELIVERY_TIMEOUT_S)
        except _REFUSED as exc:
            if _refused_by_broker(exc):
                producing.refused = True
            raise _publish_error(self.settings, full, shown_key, size, exc) from exc

    async def _await_topic(self, producer: Any, full: str, shown_key: Any, size: int) -> None:
        """Until the producer's metadata knows `full`; a PublishError when it is missing
        after `PUBLISH_UNKNOWN_TOPIC_S` or not ours to write."""
        client = producer.client
        client.add_topic(full)  # metadata is asked for the topics the client tracks
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PUBLISH_UNKNOWN_TOPIC_S
        answered = False  # by any broker: else "missing" would only mean "nobody answered"
        while client.cluster.partitions_for_topic(full) is None:
            if full in client.cluster.unauthorized_topics:
                raise _publish_error(
                    self.settings, full, shown_key, size, TopicAuthorizationFailedError()
                )
            if loop.time() > deadline:
                cause = (
                    UnknownTopicOrPartitionError()
                    if answered
                    else KafkaConnectionError("no broker answered a metadata request")
                )
                raise _publish_error(self.settings, full, shown_key, size, cause)
            try:
                answered = bool(await client.force_metadata_update()) or answered
            except _REFUSED as exc:
                raise _publish_error(self.settings, full, shown_key, size, exc) from exc
            await asyncio.sleep(0.1)

    def _delivery(
        self, producing: _Producing, fut: asyncio.Future[Any], topic: str, key: Any, size: int
    ) -> Any:
        """The delivery future, its error mapped (a callback, not a task per record), and
        failed with a retriable PublishError once `PUBLISH_DELIVERY_TIMEOUT_S` passed as
        a waited publish is: aiokafka's idempotent producer never expires a batch."""
        loop = asyncio.get_running_loop()
        out: asyncio.Future[Any] = loop.create_future()

        def expire() -> None:
            if not out.done():
                out.set_exception(_publish_error(self.settings, topic, key, size, TimeoutError()))

        expiry = loop.call_later(PUBLISH_DELIVERY_TIMEOUT_S, expire)

        def done(f: asyncio.Future[Any]) -> None:
            expiry.cancel()
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif (exc := f.exception()) is not None:
                if _refused_by_broker(exc):
                    producing.refused = True
                err = (
                    _publish_error(self.settings, topic, key, size, exc)
                    if isinstance(exc, _REFUSED)
                    else exc
                )
                out.set_exception(err)
            else:
                out.set_result(f.result())

        fut.add_done_callback(done)
        return out

    async def subscribe(
        self,
        topics: str | Sequence[str],
        *,
        from_beginning: bool = False,
        group_id: str | None = None,
        timeout_s: float | None = None,
        max_events: int | None = None,
        partitions: Sequence[int] | None = None,
        offset: StartOffset | None = None,
        on_lost: Callable[[Gap], None] | None = None,
        until_end: bool = False,
    ) -> AsyncGenerator[Received, None]:
        """Yield records as they arrive. Stops after `max_events`, or `timeout_s`
        without a record, or with `until_end` once every partition is read up to where
        its log ended (its last stable offset) when the subscription began, as kcat's
        ``-e``. A topic that does not exist raises `BrokerError` after `timeout_s`
        (default `UNKNOWN_TOPIC_TIMEOUT_S`).

        A record the Kafka client cannot parse (a header key that is not UTF-8, a codec
        it cannot decode) is yielded with `error` an `UnreadableRecord`, and the
        subscription goes on. Offsets deleted (retention, delete-records) before the
        subscription read them are skipped and named as a `streams.replay.Gap` to
        `on_lost` (default: a logged warning): the position is never moved silently.

        Without `group_id` the consumer is assigned `partitions` (default: all) and
        commits nothing, so no group is disturbed; it starts at `offset` (as kcat's
        ``-o``): ``"beginning"``, ``"end"`` (the default), an absolute offset ``n >= 0``,
        ``-n``, the last n records of each partition, or a datetime, the first record at
        or after it. `from_beginning` is ``offset="beginning"``.

        With `group_id` it joins that consumer group and commits what it has yielded
        (every `GROUP_COMMIT_INTERVAL_S`, and when the iteration ends): the group assigns
        the partitions (`partitions` is refused) and a partition without a committed
        offset starts at ``"beginning"`` or ``"end"`` (`offset`)."""
        names = [topics] if isinstance(topics, str) else list(topics)
        start = check_start_offset("beginning" if from_beginning else offset)
        if group_id is not None and (partitions or start not in ("beginning", "end")):
            raise ValueError(
                "with a consumer group the group assigns partitions and starts at its "
                "committed offsets: only offset='beginning' or 'end' applies"
            )
        if group_id is not None and until_end:
            raise ValueError(
                "until_end reads the partitions assigned to it: not with a consumer group"
            )
        # what the client cannot parse comes as stand-ins, yielded with their error, not
        # as an exception out of every fetch of the partition (the reader stopped there)
        record_batches.install(
            self.settings.max_decompressed_batch_bytes, self.settings.max_compression_ratio
        )
        lost = on_lost or _warn_lost
        consumer = self._new_consumer(
            "subscribing",
            group_id=group_id,
            # commits name what was yielded (`_commit_yielded`): aiokafka's auto-commit
            # committed its position, past a fetched batch the caller never got to (a
            # `break`, `max_events`), which the group's next run then skipped
            enable_auto_commit=False,
            # no position is reset silently (aiokafka logs a reset at INFO at most): a
            # fetch of deleted offsets fails, and `_skip_deleted` names them; a group's
            # partition without a committed offset starts at `start` (`_no_offset`)
            auto_offset_reset="none",
            client_id=f"agentstream-sub-{uuid4().hex[:8]}",
            isolation_level="read_committed",
        )
        await consumer.start()
        #: with a group: per partition, the offset after the last record yielded
        yielded: dict[TopicPartition, int] = {}
        try:
            wait_s = UNKNOWN_TOPIC_TIMEOUT_S if timeout_s is None else timeout_s
            tps = []
            for name in names:
                full = self._full(name)
                # also with a group: subscribing to a missing topic would wait forever
                parts = await _partitions(consumer, full, wait_s)
                if partitions:
                    unknown = sorted(set(partitions) - set(parts))
                    if unknown:
                        raise ValueError(
                            f"{full} has partitions {parts[0]}-{parts[-1]}: no partition "
                            f"{', '.join(map(str, unknown))}"
                        )
                    parts = sorted(set(partitions))
                tps += [TopicPartition(full, p) for p in parts]
            #: with `until_end`: where each partition's log ended as reading began
            ends: dict[TopicPartition, int] | None = None
            if group_id is None:
                consumer.assign(tps)
                await _seek(consumer, tps, start)
                if until_end:
                    # read_committed: the last stable offset, below an open transaction
                    ends = await consumer.end_offsets(tps)
            else:
                consumer.subscribe([self._full(n) for n in names])
            seen = 0
            wait_ms = int((3600 if timeout_s is None else timeout_s) * 1000)
            if ends is not None:
                # a fetch of transaction markers alone moves the position without
                # waking `getmany`: the end is checked at least twice a second
                wait_ms = min(wait_ms, 500)
            committed_at = time.monotonic()
            #: seconds the broker has had for a record since the last batch (not the
            #: caller's time with that batch: a slow reader must not end the read early)
            idle_s = 0.0
            lowered_at = time.monotonic()
            while max_events is None or seen < max_events:
                if ends is not None and await _read_to(consumer, ends):
                    return
                if ends is not None and time.monotonic() - lowered_at >= LOWER_ENDS_EVERY_S:
                    # on a timer, not after an empty fetch: a partition written to all
                    # the time keeps every fetch busy while another waits at a cut
                    asked_at = time.monotonic()
                    await _lower_ends(consumer, ends)
                    lowered_at = time.monotonic()
                    idle_s += lowered_at - asked_at  # the broker's time, as a fetch's
                    if timeout_s is not None and idle_s >= timeout_s:
                        return
                    continue
                if yielded and time.monotonic() - committed_at >= GROUP_COMMIT_INTERVAL_S:
                    await _commit_yielded(consumer, yielded)
                    committed_at = time.monotonic()
                asked_at = time.monotonic()
                try:
                    batch = await consumer.getmany(timeout_ms=wait_ms)
                except OffsetOutOfRangeError as exc:
                    await _skip_deleted(consumer, exc, lost)
                    continue
                except NoOffsetForPartitionError as exc:
                    await _no_offset(consumer, exc, start)
                    continue
                if not batch:
                    idle_s += time.monotonic() - asked_at
                    if timeout_s is not None and (ends is None or idle_s >= timeout_s):
                        return
                    continue
                idle_s = 0.0
                for tp, records in batch.items():
                    for rec in records:
                        if group_id is not None:
                            # handed over at the yield: read, whatever the caller does next
                            yielded[tp] = rec.offset + 1
                        yield _received(tp.topic, rec, self.settings.max_event_bytes)
                        seen += 1
                        if max_events is not None and seen >= max_events:
                            return
        finally:
            try:
                if yielded:
                    await _commit_yielded(consumer, yielded)
            finally:
                await consumer.stop()


#: seconds between a group subscription's commits while it runs (aiokafka's auto-commit
#: interval); it commits once more when the iteration ends
GROUP_COMMIT_INTERVAL_S = 5.0


def _warn_lost(gap: Gap) -> None:
    log.warning("%s", gap.describe())


def resume_out_of_range(position: int, begin: int, end: int) -> tuple[int, int | None]:
    """A live reader's fetch at `position` failed out of range; the partition's log now
    holds [begin, end). Returns where it reads on, and the first offset it did not read
    when offsets [position, that) were deleted unread (None: nothing was lost — the log
    was truncated below the position, so what is past its end is yet to be written, or
    `position` is back in range)."""
    if position < begin:
        return begin, position
    if position > end:
        return end, None
    return position, None


#: how often an `until_end` read asks where its logs end now (`_lower_ends`), and the
#: longest it waits for the answer: during a leader failover aiokafka retries the ask for
#: its whole request timeout (40 s), which a `--timeout` of a few seconds must not wait out
LOWER_ENDS_EVERY_S = 1.0


async def _lower_ends(consumer: Any, ends: dict[TopicPartition, int]) -> None:
    """An `until_end` reader's ends, lowered to where each log ends now: a log's end (the
    last stable offset) only grows, unless the log was cut back (an unclean leader
    election), and then the offsets above the cut are gone, not yet to come. Asked every
    `LOWER_ENDS_EVERY_S` while the read is not done, so a reader waiting at a cut stops
    there, inside the log or past its end (`_skip_deleted` moved it back). A broker that
    cannot answer within that time leaves the ends as they are: the next ask is the
    next chance. (Kafka answers a new leader's ask LEADER_NOT_AVAILABLE, never with an
    end lower than its log's, while its high watermark catches up.)"""
    try:
        async with asyncio.timeout(LOWER_ENDS_EVERY_S):
            now = await consumer.end_offsets(list(ends))
    except (KafkaError, TimeoutError) as exc:
        log.debug("end offsets not available (%r): asked again in a second", exc)
        return
    for tp, end in now.items():
        if tp in ends and end < ends[tp]:
            ends[tp] = end


async def _skip_deleted(
    consumer: Any,
    exc: OffsetOutOfRangeError,
    lost: Callable[[Gap], None],
) -> None:
    """After a fetch failed out of range (``auto_offset_reset="none"``: the position
    stays where it failed, the error names it): each partition goes on at its log's
    start, and what it skipped goes to `lost` as a `Gap`; a position past a log cut
    back goes on at its new end."""
    from agentstream.streams.replay import Gap

    failed: dict[TopicPartition, int] = {}
    if exc.args and isinstance(exc.args[0], dict):
        failed = {tp: off for tp, off in exc.args[0].items() if tp in consumer.assignment()}
    if not failed:
        return
    tps = list(failed)
    begin = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)
    for tp, position in failed.items():
        resume, first = resume_out_of_range(position, begin[tp], end[tp])
        if first is not None:
            lost(Gap(tp.topic, tp.partition, first, resume))
        elif resume != position:
            log.warning(
                "%s[%d]: the log was truncated below offset %d, to end at %d: reading on "
                "from there",
                tp.topic,
                tp.partition,
                position,
                resume,
            )
        consumer.seek(tp, resume)


async def _no_offset(consumer: Any, exc: NoOffsetForPartitionError, start: StartOffset) -> None:
    """A group's partition without a committed offset (``auto_offset_reset="none"``
    resets nothing): it starts at `start`, "beginning" or "end"."""
    tps = [tp for tp in exc.args if isinstance(tp, TopicPartition)]
    tps = [tp for tp in tps if tp in consumer.assignment()]
    if not tps:
        return
    if start == "beginning":
        await consumer.seek_to_beginning(*tps)
    else:
        await consumer.seek_to_end(*tps)


async def _commit_yielded(consumer: Any, yielded: dict[TopicPartition, int]) -> None:
    """Commit what a group subscription has yielded, of the partitions it still holds. A
    commit the group refuses (a rebalance under way) is logged: the partitions' next
    owner reads those records again (at-least-once)."""
    held = consumer.assignment()
    offsets = {tp: off for tp, off in yielded.items() if tp in held}
    if not offsets:
        return
    try:
        await consumer.commit(offsets)
    except KafkaError as exc:
        log.warning("subscription commit refused (%r): its records will be read again", exc)


#: where a subscription starts: "beginning", "end", an offset (>= 0), the last n records
#: of each partition (-n), or the first record at or after a time
StartOffset = str | int | datetime


def check_start_offset(offset: str | int | datetime | None) -> StartOffset:
    """`offset` of `subscribe` as ``"beginning"``, ``"end"``, an int or an aware
    datetime; ValueError otherwise. Strings come from a command line: ``"42"``,
    ``"-10"``, a time as `replay` takes it (ISO-8601, ``-15m``; a number is an offset,
    never a time) or kcat's ``s@<epoch ms>``."""
    if offset is None:
        return "end"
    if isinstance(offset, datetime):
        return offset if offset.tzinfo else offset.replace(tzinfo=UTC)
    if isinstance(offset, int) and not isinstance(offset, bool):
        return offset
    if isinstance(offset, str):
        text = offset.strip().lower()
        if text in ("beginning", "end"):
            return text
        try:
            return int(text)
        except ValueError:
            pass
        from agentstream.streams.replay import TimeParseError, parse_time

        try:
            if text.startswith("s@") and text[2:].isdigit():
                return parse_time(int(text[2:]))
            if text:
                return parse_time(offset)
        except (TimeParseError, ValueError, OverflowError, OSError):
            pass
    raise ValueError(
        f"offset {offset!r}: 'beginning', 'end', an offset n, -n (the last n records of "
        "each partition), or a time (ISO-8601, -15m, s@<epoch ms>)"
    )


async def _read_to(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """Whether every partition's position has reached its offset in `ends` (a
    read_committed consumer's position moves past transaction markers and aborted
    records too)."""
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


async def _seek(consumer: AIOKafkaConsumer, tps: list[TopicPartition], start: StartOffset) -> None:
    if start == "beginning":
        await consumer.seek_to_beginning(*tps)
    elif start == "end":
        await consumer.seek_to_end(*tps)
    elif isinstance(start, datetime):
        ms = int(start.timestamp() * 1000)
        found = await consumer.offsets_for_times({tp: ms for tp in tps})
        end = await consumer.end_offsets(tps)
        for tp in tps:
            hit = found.get(tp)  # None: no record at or after that time yet
            consumer.seek(tp, hit.offset if hit is not None else end[tp])
    else:
        assert isinstance(start, int)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        for tp in tps:
            # -n: the last n records (not below the log start); n: that offset, or the
            # log start if it was deleted (a seek below it would reset to `earliest`
            # anyway, silently)
            wanted = end[tp] + start if start < 0 else start
            consumer.seek(tp, max(begin[tp], wanted))


async def _partitions(consumer: AIOKafkaConsumer, topic: str, timeout_s: float) -> list[int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if loop.time() > deadline:
            raise BrokerError(
                f"topic {topic} does not exist (waited {timeout_s:g}s; "
                "run `agentstream topics create`)"
            )
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)


# -- the sync client ------------------------------------------------------------------
class _LoopThread:
    """An event loop running in a daemon thread, and the way to run coroutines on it
    from other threads. Daemon: a script that forgets `stop()` still exits (its client's
    finalizer stops the loop at exit, after flushing)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.closed = False
        self.subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._thread = threading.Thread(
            target=self._run, name=f"agentstream-client-{uuid4().hex[:6]}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # what is left (a subscription whose iterator was never closed) is ended
            # here, so no consumer outlives the client
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self.closed or self.in_loop_thread:
            coro.close()  # never awaited: no "coroutine was never awaited" warning either
            raise RuntimeError(
                "the client is stopped"
                if self.closed
                else "a sync Client called from its own "
                "event loop would wait for itself: use AsyncClient there"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = self.submit(coro)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # an interrupted caller (Ctrl-C) leaves nothing running on the loop
            raise

    def close(self, final: Coroutine[Any, Any, Any] | None = None) -> None:
        """Close the subscriptions, run `final` (the async client's stop), stop the
        loop and wait for the thread."""
        if self.closed:
            if final is not None:
                final.close()
            return
        if self.in_loop_thread:  # a finalizer run by the garbage collector in the loop
            if final is not None:
                final.close()
            self.closed = True
            self.loop.stop()
            return
        try:
            for sub in list(self.subscriptions):
                sub.close()
            if final is not None:
                self.run(final)
        finally:
            self.closed = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)


def _close_loop(runner: _LoopThread, client: AsyncClient) -> None:
    runner.close(client.stop())


class Subscription(Iterator[Received]):
    """The iterator `Client.subscribe` returns: records as `AsyncClient.subscribe` yields
    them. Its consumer is stopped when the iteration ends, when `close()` is called (or
    the `with` block ends), when the iterator is garbage-collected (a `break` out of a
    `for` loop over `client.subscribe(...)`), or when the client stops."""

    def __init__(self, runner: _LoopThread, records: AsyncIterator[Received]) -> None:
        self._runner = runner
        self._records = records
        self._step: asyncio.Task[Any] | None = None
        self._done = False
        runner.subscriptions.add(self)

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Received:
        if self._done:
            raise StopIteration
        try:
            return self._runner.run(self._next())
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None
        except concurrent.futures.CancelledError:
            if self._done:  # closed from another thread (the client stopped): the end
                raise StopIteration from None
            self.close()
            raise
        except BaseException:
            self.close()  # an error ends the subscription; an interrupt, too
            raise

    async def _next(self) -> Received:
        # `__anext__` is called here, in the loop's thread: the async generator is then
        # known to this loop (shutdown_asyncgens), not to a loop the caller may be in
        self._step = asyncio.current_task()
        return await self._records.__anext__()

    async def _close(self) -> None:
        step = self._step
        if step is not None and not step.done():  # a `next` interrupted, still unwinding
            step.cancel()
            await asyncio.wait([step])
        await self._records.aclose()  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        if not self._runner.closed and not self._runner.in_loop_thread:
            self._runner.run(self._close())

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # a finalizer cannot raise; what it could not close, the client's stop ends
        with contextlib.suppress(Exception):
            self.close()


class Client:
    """`AsyncClient` for code that is not async: the same constructor and methods,
    blocking; `subscribe` returns a plain iterator (`Subscription`).

    The async client runs on an event loop of this client's own, in a daemon thread
    started at the first call; `stop()` (or the end of the `with` block) stops the
    producer, ends open subscriptions and the thread. A stopped client starts again at
    its next call."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        source: str = "agentstream-client",
        bootstrap: str | None = None,
        security_protocol: SecurityProtocol | None = None,
        sasl_mechanism: SaslMechanism | None = None,
        sasl_username: str | None = None,
        sasl_password: str | SecretStr | None = None,
        ssl_cafile: str | Path | None = None,
        ssl_certfile: str | Path | None = None,
        ssl_keyfile: str | Path | None = None,
        ssl_check_hostname: bool | None = None,
        connect_timeout_s: float | None = None,
        topic_prefix: str | None = None,
    ) -> None:
        self._async = AsyncClient(
            settings,
            source=source,
            bootstrap=bootstrap,
            security_protocol=security_protocol,
            sasl_mechanism=sasl_mechanism,
            sasl_username=sasl_username,
            sasl_password=sasl_password,
            ssl_cafile=ssl_cafile,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            ssl_check_hostname=ssl_check_hostname,
            connect_timeout_s=connect_timeout_s,
            topic_prefix=topic_prefix,
        )
        self._runner: _LoopThread | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        return self._async.settings

    @property
    def source(self) -> str:
        return self._async.source

    def __repr__(self) -> str:
        return "Client" + repr(self._async).removeprefix("AsyncClient")

    def _loop(self) -> _LoopThread:
        with self._lock:
            if self._runner is None or self._runner.closed:
                self._runner = _LoopThread()
                # without stop(): stopped when this client is collected or at exit; the
                # callback holds the loop and the async client, not this object
                self._finalizer = weakref.finalize(self, _close_loop, self._runner, self._async)
            return self._runner

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._loop().run(self._async.start())

    def stop(self) -> None:
        with self._lock:
            finalizer, self._finalizer, self._runner = self._finalizer, None, None
        if finalizer is not None:
            finalizer()  # _close_loop, once

    close = stop

    def event(self, payload: Payload, **kw: Any) -> Event[Any]:
        return self._async.event(payload, **kw)

    def publish(
        self, topic: str, item: Event[Any] | Payload, *, key: str | None = None, wait: bool = True
    ) -> Any:
        """Send one event (a bare payload gets an envelope). Returns the record metadata
        when `wait`, else a `concurrent.futures.Future` of it."""
        runner = self._loop()
        if wait:
            return runner.run(self._async.publish(topic, item, key=key))
        delivery = runner.run(self._async.publish(topic, item, key=key, wait=False))
        return runner.submit(_awaited(delivery))

    def publish_many(self, topic: str, items: Iterable[Event[Any] | Payload]) -> int:
        """Send many events, batched; returns when all are acknowledged."""
        # taken here: an iterable may depend on the caller's thread (a generator reading
        # a file, a DB cursor)
        return self._loop().run(self._async.publish_many(topic, list(items)))

    def publish_raw(self, topic: str, value: bytes | None, key: bytes | None = None) -> Any:
        """Send bytes as they are (for tests of hostile input and for replays)."""
        return self._loop().run(self._async.publish_raw(topic, value, key))

    def subscribe(
        self,
        topics: str | Sequence[str],
        *,
        from_beginning: bool = False,
        group_id: str | None = None,
        timeout_s: float | None = None,
        max_events: int | None = None,
        partitions: Sequence[int] | None = None,
        offset: StartOffset | None = None,
        on_lost: Callable[[Gap], None] | None = None,
        until_end: bool = False,
    ) -> Subscription:
        """Records as they arrive, as `AsyncClient.subscribe`; the consumer starts at the
        first `next()` (`on_lost` is called on the client's thread)."""
        records = self._async.subscribe(
            topics,
            from_beginning=from_beginning,
            group_id=group_id,
            timeout_s=timeout_s,
            max_events=max_events,
            partitions=partitions,
            offset=offset,
            on_lost=on_lost,
            until_end=until_end,
        )
        return Subscription(self._loop(), records)


async def _awaited(fut: asyncio.Future[T]) -> T:
    return await fut


def _received(topic: str, rec: Any, max_bytes: int) -> Received:
    stand_in = record_batches.unreadable(rec.value)
    if stand_in is not None:
        return Received(
            topic,
            rec.partition,
            rec.offset,
            rec.timestamp,
            rec.key,
            bytes(stand_in),
            None,
            UnreadableRecord(stand_in.describe()),
        )
    try:
        # a subscriber reads what is on the topic, as it was accepted when written: not
        # held to producer limits that came later (`schemas.limits`)
        event: Event[Any] | None = registry.decode(rec.value, max_bytes=max_bytes, limits=False)
        error: SchemaError | None = None
    except SchemaError as exc:
        event, error = None, exc
    return Received(
        topic, rec.partition, rec.offset, rec.timestamp, rec.key, rec.value, event, error
    )
