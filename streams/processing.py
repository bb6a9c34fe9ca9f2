"""How every agent consumes and produces: raw bytes in, typed events out, dead letters for
whatever cannot be decoded or processed.

Faust acks (and later commits) an event as soon as the agent moves past it, and by
default skips values it cannot deserialize without a trace. So agents read raw bytes and
go through `decoded_batches`, which sends a `DeadLetter` for each bad record *before* the
batch is acknowledged; in at-least-once mode Faust flushes the producer before it
commits offsets, so a dead letter is on the broker before its source offset is committed.

Agents take events in batches (`stream.take_events`): per-event overhead in Faust is the
main cost of a pipeline stage, and batching is what keeps it several times faster than a
naive one-event-at-a-time agent (see `bench/`).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from schemas import DeadLetter, Event, encode, registry
from schemas.errors import InvalidEvent, PipelineError
from streams.app import app, catalogue_topic, settings
from streams.observability import DEAD_LETTERS, EVENTS_IN, EVENTS_OUT
from streams.topics import PIPELINE_DEADLETTER

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Inbound:
    """A decoded event together with where it came from."""

    event: Event[Any]
    message: Any  # faust.types.Message: topic, partition, offset, key, value, timestamp

    @property
    def origin(self) -> str:
        m = self.message
        return f"{m.topic}:{m.partition}:{m.offset}"


async def decoded_batches(
    stream: Any,
    *,
    consumer: str,
    accept: Iterable[str] | None = None,
    max_batch: int | None = None,
    within_s: float | None = None,
) -> AsyncIterator[list[Inbound]]:
    """Yield batches of decoded events; dead-letter everything else.

    `accept` restricts the event types this consumer handles; another type on its topic
    is a dead letter (UnknownEventType would be wrong: the type exists, it's misplaced).
    """
    accepted = frozenset(accept) if accept is not None else None
    limit = settings.max_event_bytes
    async for events in stream.take_events(
        max_batch or settings.batch_max, within=within_s or settings.batch_within_s
    ):
        good: list[Inbound] = []
        topic_name = ""
        for ev in events:
            msg = ev.message
            topic_name = msg.topic
            try:
                decoded = registry.decode(ev.value, max_bytes=limit)
                if accepted is not None and decoded.type not in accepted:
                    raise InvalidEvent(
                        f"event type {decoded.type!r} does not belong on {msg.topic}",
                        type=decoded.type,
                    )
            except PipelineError as exc:
                await dead_letter(msg, exc, consumer)
                continue
            good.append(Inbound(decoded, msg))
        if events:
            EVENTS_IN.labels(topic_name, consumer).inc(len(events))
        if good:
            yield good


async def dead_letter(message: Any, exc: BaseException, consumer: str) -> None:
    """Publish a DeadLetter carrying the original bytes and the record's coordinates."""
    raw = message.value if isinstance(message.value, bytes | bytearray) else b""
    if message.value is not None and not isinstance(message.value, bytes | bytearray):
        raw = str(message.value).encode()
    cap = settings.deadletter_max_original_bytes
    truncated = len(raw) > cap
    key = message.key if isinstance(message.key, bytes | bytearray) else None
    error_class = type(exc).__name__
    retriable = bool(getattr(exc, "retriable", False))
    letter = DeadLetter(
        original_b64=base64.b64encode(raw[:cap]).decode(),
        original_size=len(raw),
        original_truncated=truncated,
        key_b64=base64.b64encode(key).decode() if key is not None else None,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
        error_class=error_class,
        error_message=str(exc)[:8192] or error_class,
        consumer=consumer,
        retriable=retriable,
    )
    DEAD_LETTERS.labels(message.topic, consumer, error_class).inc()
    log.warning(
        "dead-lettered %s:%s:%s (%s) in %s: %s",
        message.topic,
        message.partition,
        message.offset,
        error_class,
        consumer,
        str(exc)[:200],
    )
    await emit(PIPELINE_DEADLETTER, Event.of(letter, source=consumer))


async def emit(topic: str, event: Event[Any], *, key: str | None = None) -> None:
    """Publish an event to a catalogue topic (keyed per the catalogue's convention)."""
    await catalogue_topic(topic).send(
        key=(key if key is not None else event.key).encode(), value=encode(event)
    )
    EVENTS_OUT.labels(topic).inc()


async def guarded(
    inbound: Inbound, consumer: str, handler: Callable[[Inbound], Awaitable[None]]
) -> bool:
    """Run `handler`; on an unexpected error dead-letter the input instead of crashing the
    agent (Faust would ack it and move on without a trace). Returns True on success."""
    try:
        await handler(inbound)
    except Exception as exc:  # a bug or bad data in one event must not stop the stream
        log.exception("%s failed on %s", consumer, inbound.origin)
        await dead_letter(inbound.message, exc, consumer)
        return False
    return True


__all__ = ["Inbound", "app", "dead_letter", "decoded_batches", "emit", "guarded"]
