"""A small async client for services that publish to and consume from the pipeline.

    async with Client() as client:
        await client.publish("agent.messages", AgentMessage(...), source="agent-7")
        async for rec in client.subscribe("agent.messages.accepted", from_beginning=True):
            print(rec.event.payload)

Publishing validates the event first (a `SchemaError` never reaches the broker), batches
in the producer, waits for acks from all in-sync replicas and uses the idempotent
producer, so a retried send cannot duplicate a record. The CLI's `publish` and `tail` are
built on this class.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import Event, Payload, encode, registry
from schemas.errors import InvalidEvent, SchemaError
from streams.errors import BrokerError
from streams.kafka_security import new_consumer, new_producer
from streams.settings import Settings, get_settings
from streams.topics import CATALOGUE


@dataclass(frozen=True, slots=True)
class Received:
    """One record from a subscription: a decoded event, or the reason it is not one."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    raw: bytes | None
    event: Event[Any] | None
    error: SchemaError | None


def group_less_consumer(settings: Settings, purpose: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer for reading history (replay, audit, chain heads, policy folds): it joins no
    group and commits nothing, so it disturbs no consumer group, and it reads only committed
    transactions. Connects as the settings say (`streams.kafka_security`)."""
    return new_consumer(
        settings,
        purpose,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        client_id=f"agentstream-{purpose}-{uuid4().hex[:8]}",
        **options,
    )


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


class Client:
    """Publish and subscribe with typed events. Topic names are catalogue names; the
    settings' topic prefix is applied for you."""

    def __init__(self, settings: Settings | None = None, *, source: str = "agentstream-client"):
        self.settings = settings or get_settings()
        self.source = source
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = new_producer(
            self.settings,
            "publishing",
            acks="all",
            enable_idempotence=True,
            linger_ms=10,
            max_batch_size=256 * 1024,
            request_timeout_ms=30_000,
        )
        await producer.start()  # a BrokerError naming the cause, within the connect timeout
        self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    def _full(self, topic: str) -> str:
        return self.settings.topic(topic) if topic in CATALOGUE else topic

    def event(self, payload: Payload, **kw: Any) -> Event[Any]:
        return Event.of(payload, source=kw.pop("source", self.source), **kw)

    async def publish(
        self, topic: str, item: Event[Any] | Payload, *, key: str | None = None, wait: bool = True
    ) -> Any:
        """Send one event (a bare payload gets an envelope). Returns the record metadata
        when `wait`, else the delivery future."""
        if self._producer is None:
            await self.start()
        assert self._producer is not None
        event = item if isinstance(item, Event) else self.event(item)
        fut = await self._producer.send(
            self._full(topic), value=encode(event), key=(key or event.key).encode()
        )
        return await fut if wait else fut

    async def publish_many(self, topic: str, items: Iterable[Event[Any] | Payload]) -> int:
        """Send many events, batched; returns when all are acknowledged."""
        futures = [await self.publish(topic, item, wait=False) for item in items]
        if futures:
            await asyncio.gather(*futures)
        return len(futures)

    async def publish_raw(self, topic: str, value: bytes | None, key: bytes | None = None) -> Any:
        """Send bytes as they are (for tests of hostile input and for replays)."""
        if self._producer is None:
            await self.start()
        assert self._producer is not None
        return await (await self._producer.send(self._full(topic), value=value, key=key))

    async def subscribe(
        self,
        topics: str | Sequence[str],
        *,
        from_beginning: bool = False,
        group_id: str | None = None,
        timeout_s: float | None = None,
        max_events: int | None = None,
    ) -> AsyncIterator[Received]:
        """Yield records as they arrive. Without `group_id` nothing is committed and no
        group is disturbed. Stops after `max_events`, or `timeout_s` without a record."""
        names = [topics] if isinstance(topics, str) else list(topics)
        consumer = new_consumer(
            self.settings,
            "subscribing",
            group_id=group_id,
            enable_auto_commit=group_id is not None,
            auto_offset_reset="earliest" if from_beginning else "latest",
            client_id=f"agentstream-sub-{uuid4().hex[:8]}",
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            if group_id is None:
                tps = []
                for name in names:
                    full = self._full(name)
                    parts = await _partitions(consumer, full)
                    tps += [TopicPartition(full, p) for p in parts]
                consumer.assign(tps)
                if from_beginning:
                    await consumer.seek_to_beginning(*tps)
                else:
                    await consumer.seek_to_end(*tps)
            else:
                consumer.subscribe([self._full(n) for n in names])
            seen = 0
            while max_events is None or seen < max_events:
                batch = await consumer.getmany(timeout_ms=int((timeout_s or 3600) * 1000))
                if not batch:
                    if timeout_s is not None:
                        return
                    continue
                for tp, records in batch.items():
                    for rec in records:
                        yield _received(tp.topic, rec, self.settings.max_event_bytes)
                        seen += 1
                        if max_events is not None and seen >= max_events:
                            return
        finally:
            await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if loop.time() > deadline:
            raise BrokerError(f"topic {topic} does not exist (run `agentstream topics create`)")
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)


def _received(topic: str, rec: Any, max_bytes: int) -> Received:
    try:
        event: Event[Any] | None = registry.decode(rec.value, max_bytes=max_bytes)
        error: SchemaError | None = None
    except SchemaError as exc:
        event, error = None, exc
    return Received(
        topic, rec.partition, rec.offset, rec.timestamp, rec.key, rec.value, event, error
    )
