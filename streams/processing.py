"""How every agent consumes and produces: raw bytes in, typed events out, dead letters for
whatever cannot be decoded or processed.

Faust acks (and later commits) an event as soon as the agent moves past it, and by
default skips values it cannot deserialize without a trace. So agents read raw bytes and
go through `decoded_batches`, which sends a `DeadLetter` for each bad record *before* the
batch is acknowledged; in at-least-once mode Faust flushes the producer before it
commits offsets, so a dead letter is on the broker before its source offset is committed.

Agents take events in batches (`event_batches`): per-event overhead in Faust is the main
cost of a pipeline stage, and batching is what keeps it several times faster than a
naive one-event-at-a-time agent (see `bench/` and docs/bench.md). `event_batches` drains
the agent's channel queue in bulk instead of iterating the stream event by event (as
`take_events` does), and `emit` hands records straight to the Faust producer instead of
going through `Topic.send`'s per-message future and sensor bookkeeping.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

from schemas import DeadLetter, Event, encode, registry
from schemas.errors import InvalidEvent, PipelineError
from streams.app import (
    HANDED_MARKS,
    STALE_DELIVERIES,
    app,
    catalogue_topic,
    delivery_failed,
    settings,
)
from streams.eos import GATE, SOURCE, transactional_id_for
from streams.observability import DEAD_LETTERS, EVENTS_IN, EVENTS_OUT, SEND_FAILURES
from streams.tables.writer import flush_pending, pending_writes
from streams.topics import PIPELINE_DEADLETTER

log = logging.getLogger(__name__)


#: turns a dead letter's original bytes into what it may carry (secrets blanked)
Redactor = Callable[[bytes], bytes]

#: consumer name → its redactor (`redact_dead_letters`)
_REDACTORS: dict[str, Redactor] = {}


def redact_dead_letters(consumer: str, redact: Redactor) -> None:
    """Have every dead letter of `consumer` carry ``redact(original bytes)`` instead of the
    original bytes, for consumers whose input holds secrets (access tokens).

    Per consumer rather than per call, so that no path can forget it: records that do
    not decode (`decoded_batches`), handlers that raise (`guarded`) and direct
    `dead_letter` calls are all redacted alike. The coordinates (topic, partition,
    offset) still point at the original record."""
    _REDACTORS[consumer] = redact


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
    prepare: Callable[[list[Inbound]], Awaitable[None]] | None = None,
) -> AsyncIterator[list[Inbound]]:
    """Yield batches of decoded events; dead-letter everything else.

    `accept` restricts the event types this consumer handles; another type on its topic
    is a dead letter (UnknownEventType would be wrong: the type exists, it's misplaced).
    `prepare` runs on each batch's decoded events before the batch takes the
    exactly-once commit gate: for I/O the batch needs that produces nothing (keychain
    lookups), which would otherwise hold every commit of the worker back while it waits.
    The batch's records are not acked before the gate, so no commit can count them yet.
    An error in `prepare` is logged and the batch goes on (it must not lose the batch's
    dead letters, which are sent inside the gate).
    """
    accepted = frozenset(accept) if accept is not None else None
    limit = settings.max_event_bytes
    async for events in event_batches(
        stream, max_batch or settings.batch_max, within_s or settings.batch_within_s
    ):
        good: list[Inbound] = []
        bad: list[tuple[Any, PipelineError]] = []
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
                bad.append((msg, exc))
                continue
            good.append(Inbound(decoded, msg))
        if good and prepare is not None:
            try:
                await prepare(good)
            except Exception:  # an optimisation: the batch still does what it needs itself
                log.exception("%s: preparing a batch of %d failed", consumer, len(good))
        if _EOS:
            # held until the caller asks for the next batch: `event_batches` then acks
            # this one before any other task runs, so no commit sees its outputs unacked
            await GATE.enter()
        try:
            for msg, reason in bad:  # dead letters are outputs: inside the gate
                await dead_letter(msg, reason, consumer)
            if events:
                EVENTS_IN.labels(topic_name, consumer).inc(len(events))
            if good:
                yield good
            if _EOS and pending_writes():
                # the batch's table updates into their transactions while it still holds
                # the gate: the next commit, which commits its offsets, then has them too
                await flush_pending()
        finally:
            if _EOS:
                GATE.leave()


async def event_batches(stream: Any, max_batch: int, within_s: float) -> AsyncIterator[list[Any]]:
    """Faust events of an agent's stream in batches of up to `max_batch`, waiting at most
    `within_s` after the first one to fill a batch; each batch is acked once the caller
    asks for the next one (or stops), like `take_events`.

    Per event this keeps what Faust's stream iterator does: skip events of a stale
    consumer generation or while flow is suspended (rebalance), track the message for
    commit, and call the stream sensors — but without one loop turn per event. Unlike
    Faust, a skipped event is not acked but handed back to the consumer to be fetched
    again: its offset in the acked set could otherwise be committed before the record
    is processed (and with no committed offset yet, nothing would fetch it again).
    """
    app_ = stream.app
    queue = stream.channel.queue
    sensors = app_.sensors
    acking_topics = app_.topics.acking_topics
    unacked = app_.consumer.unacked
    refetch = getattr(app_.consumer, "refetch", None)
    loop = asyncio.get_running_loop()
    #: per partition: (consumer generation, highest offset handed to this agent). Within
    #: one assignment a partition can be delivered twice from the same offset: Faust's
    #: recovery seeks every stream partition back to its committed offset after the
    #: fetcher already ran (and resets its own read offsets), and our seek back to
    #: records dropped from a queue starts at the lowest dropped offset, which can be a
    #: second copy of a record this agent already processed. Seen as an entire stretch
    #: of input forwarded twice after a quick restart (tests/integration/
    #: test_security_accounting.py). Records at or below the mark are such copies.
    handed: dict[Any, tuple[int, int]] = {}
    mark_key = str(getattr(stream, "shortlabel", None) or id(stream))
    HANDED_MARKS[mark_key] = handed
    started = await stream.maybe_start()
    try:
        while not stream.should_stop:
            try:
                raw = [await queue.get()]
            except StopAsyncIteration:
                # Faust ends a stopping agent's stream this way; inside an async generator
                # it would surface as RuntimeError, read as a crash, and the supervisor
                # would restart the agent mid-shutdown (the worker then hangs on SIGTERM).
                return
            deadline = loop.time() + within_s
            while len(raw) < max_batch:
                if not queue.empty():
                    raw.append(queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    raw.append(await asyncio.wait_for(queue.get(), remaining))
                except (TimeoutError, StopAsyncIteration):
                    break
            events: list[Any] = []
            states: list[Any] = []
            skipped: list[Any] = []
            active = app_.flow_control.is_active()
            generation = app_.consumer_generation_id
            # almost always empty: looked at once per batch, not per event
            stale = STALE_DELIVERIES if STALE_DELIVERIES else ()
            for ev in raw:
                msg = ev.message
                if stale and msg in stale:
                    # put in the queue after a clear that dropped records before it: it
                    # is fetched again with them (streams.app.RefetchingFlowControl)
                    continue
                if not active or msg.generation_id != generation:
                    skipped.append(ev)
                    continue
                mark = handed.get(msg.tp)
                if mark is not None and mark[0] == generation and msg.offset <= mark[1]:
                    # a second copy: the first was handed out (and is or was acked) in
                    # this assignment; neither processed nor acked again (an ack here
                    # could count the offset done while the first is still in progress)
                    continue
                handed[msg.tp] = (generation, msg.offset)
                if msg.topic in acking_topics and not msg.tracked:
                    msg.tracked = True
                    unacked.add(msg)
                    sensors.on_message_in(msg.tp, msg.offset, msg)
                states.append(sensors.on_stream_event_in(msg.tp, msg.offset, stream, ev))
                events.append(ev)
            if skipped and refetch is not None:
                refetch([ev.message for ev in skipped])
                skipped = []
            try:
                if events:
                    yield events
            finally:
                for ev, state in zip(events, states, strict=True):
                    msg = ev.message
                    last = ev.ack()
                    sensors.on_stream_event_out(msg.tp, msg.offset, stream, ev, state)
                    if last:
                        sensors.on_message_out(msg.tp, msg.offset, msg)
                for ev in skipped:
                    if ev.ack():
                        sensors.on_message_out(ev.message.tp, ev.message.offset, ev.message)
    finally:
        HANDED_MARKS.pop(mark_key, None)
        if started:
            await stream.stop()
            stream.service_reset()


async def dead_letter(message: Any, exc: BaseException, consumer: str) -> None:
    """Publish a DeadLetter carrying the original bytes (redacted if the consumer asked
    for it, see `redact_dead_letters`) and the record's coordinates."""
    letter = dead_letter_of(message, exc, consumer)
    error_class = letter.error_class
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
    if _EOS and isinstance(message.partition, int):
        # in the transaction that commits the bad record's offset
        token = SOURCE.set((message.topic, message.partition))
        try:
            await emit(PIPELINE_DEADLETTER, Event.of(letter, source=consumer))
        finally:
            SOURCE.reset(token)
        return
    await emit(PIPELINE_DEADLETTER, Event.of(letter, source=consumer))


def dead_letter_of(message: Any, exc: BaseException, consumer: str) -> DeadLetter:
    """The DeadLetter `dead_letter` publishes for `message` (a Faust message or anything
    with its topic, partition, offset, key, value and timestamp)."""
    value = message.value
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    else:
        raw = str(value).encode() if value is not None else b""
    withheld = False
    redact = _REDACTORS.get(consumer)
    if redact is not None:
        try:
            raw = bytes(redact(raw))
        except Exception:
            # no bytes rather than possibly a secret; the coordinates still lead to them
            log.exception("%s: redacting a dead letter failed, its bytes are left out", consumer)
            withheld = True
    size = len(raw)
    cap = settings.deadletter_max_original_bytes
    truncated = withheld or size > cap
    if withheld:
        raw = b""
    key = message.key if isinstance(message.key, bytes | bytearray) else None
    error_class = type(exc).__name__
    return DeadLetter(
        original_b64=base64.b64encode(raw[:cap]).decode(),
        original_size=size,
        original_truncated=truncated,
        key_b64=base64.b64encode(key).decode() if key is not None else None,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
        error_class=error_class,
        error_message=str(exc)[:8192] or error_class,
        consumer=consumer,
        retriable=bool(getattr(exc, "retriable", False)),
    )


async def emit(topic: str, event: Event[Any], *, key: str | None = None) -> None:
    """Publish an event to a catalogue topic (keyed per the catalogue's convention).

    Goes to the producer `Topic.send` would use (`app.maybe_start_producer()`, the
    transaction manager under exactly_once), so Faust's flush-before-commit still covers
    it; a delivery failure is logged and counted instead of vanishing in a future. Under
    exactly_once it joins the transaction of the input being processed (`SOURCE`).
    """
    catalogue_topic(topic)  # unknown names fail here, as before
    name = settings.topic(topic)
    record_key = (key if key is not None else event.key).encode()
    if _EOS:
        fut = await send_record(name, record_key, encode(event))
    else:
        producer = await _producer()
        fut = await producer.send(name, record_key, encode(event), None, None, None)
    fut.add_done_callback(partial(_delivered, topic))
    _events_out(topic).inc()


_EOS = settings.processing_guarantee == "exactly_once"


async def send_record(
    topic: str, key: bytes | None, value: bytes, partition: int | None = None
) -> Any:
    """Hand one record to the producer; returns its delivery future.

    Under exactly_once, while an input is being processed (`SOURCE` set), the record goes
    into the transaction that will commit that input's offset, whatever its destination.
    Faust alone would pick the destination partition's transaction, or none for a topic
    this worker does not consume (see streams/eos.py).
    """
    producer = await _producer()
    if _EOS:
        source = SOURCE.get()
        tid = _source_transaction(producer, source) if source is not None else None
        if tid is not None:
            return await producer.producer.send(
                topic, key, value, partition, None, None, transactional_id=tid
            )
    return await producer.send(topic, key, value, partition, None, None)


def _source_transaction(manager: Any, source: tuple[str, int]) -> str | None:
    """The open transaction of the source partition, if this worker holds one (not after
    the partition was revoked: the record then takes Faust's own path)."""
    topic, partition = source
    try:
        group = app.assignor.group_for_topic(topic)
    except KeyError:
        return None
    tid = transactional_id_for(app.conf.id, group, partition)
    producers = getattr(getattr(manager, "producer", None), "_transaction_producers", None)
    if producers is None or tid not in producers:
        log.warning("no open transaction %s for %s:%s", tid, topic, partition)
        return None
    return tid


_started_producer: list[Any] = []


async def _producer() -> Any:
    """`app.maybe_start_producer()` costs ~9 µs a call (a third of a passthrough's
    per-event budget); outside exactly-once the producer is one object, started once."""
    if settings.processing_guarantee == "exactly_once":
        return await app.maybe_start_producer()  # the transaction manager, in a worker
    producer = app.producer
    if not _started_producer or _started_producer[0] is not producer:
        await producer.maybe_start()
        _started_producer[:] = [producer]
    return producer


@cache
def _events_out(topic: str) -> Any:
    return EVENTS_OUT.labels(topic)


def watch_delivery(fut: asyncio.Future[Any], topic: str) -> None:
    """Treat a failed delivery of `fut` like one of `emit`'s: count, log, stop committing
    and crash the worker. For agents that hand record batches to the producer themselves."""
    fut.add_done_callback(partial(_delivered, topic))


def _delivered(topic: str, fut: asyncio.Future[Any]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        SEND_FAILURES.labels(topic).inc()
        log.error("publishing to %s failed: %r", topic, exc)
        delivery_failed(exc)


async def guarded(
    inbound: Inbound, consumer: str, handler: Callable[[Inbound], Awaitable[None]]
) -> bool:
    """Run `handler`; on an unexpected error dead-letter the input instead of crashing the
    agent (Faust would ack it and move on without a trace). Returns True on success."""
    token = SOURCE.set((inbound.message.topic, inbound.message.partition)) if _EOS else None
    try:
        await handler(inbound)
    except Exception as exc:  # a bug or bad data in one event must not stop the stream
        log.exception("%s failed on %s", consumer, inbound.origin)
        await dead_letter(inbound.message, exc, consumer)
        return False
    finally:
        if token is not None:
            SOURCE.reset(token)
    return True


__all__ = [
    "Inbound",
    "app",
    "dead_letter",
    "dead_letter_of",
    "decoded_batches",
    "emit",
    "event_batches",
    "guarded",
    "redact_dead_letters",
    "send_record",
    "watch_delivery",
]
