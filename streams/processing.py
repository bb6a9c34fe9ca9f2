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

Agent side of the delivery model
--------------------------------
The delivery invariants (when an input offset may be committed, what a flow-control
clear, a seek, a revoke, a stop or a crash does to records in flight, what each
guarantee promises) are numbered in `streams.delivery`; this module keeps its part:

1. A batch is acked only when its agent comes back for the next one: the agent finished
   it (`event_batches`). A batch its agent left by an exception (a bug, a broker error,
   a cancellation) is never acked, so no commit can count its records, whatever outputs
   it sent or did not (delivery 1). Restarting just the agent would not do: the records
   after it in the queue would be processed and acked, and a commit passes over the gap
   when the partition has no committed offset yet, or, under exactly-once, commits its
   partial outputs.
2. Such an *abandoned* batch is processed again from the last committed offset, by this
   worker after a restart or by whoever gets its partitions. `abandon_open_batch`
   decides what it means: a stale batch (exactly-once, taken before a revoke) is
   `BatchAbandoned` and nothing more; one cancelled by the worker's stop is left
   unacked (under exactly-once also `streams.delivery.refuse_commits`); any other stops
   every further offset commit of this worker and crashes it
   (`streams.delivery.processing_failed`, delivery 2), like an output the broker
   refused. At-least-once may then repeat outputs; nothing is lost.
3. Exactly-once: every output of a batch (`emit`, `send_record`, `dead_letter`) goes into
   the transaction of its input's partition (`SOURCE`) that was open when the batch was
   taken, never outside a transaction, and that transaction commits only with the
   batch's offsets, or never. A batch taken before a revoke (or in an earlier consumer
   generation) that is still running, or has not yet entered the commit gate, is
   *stale*: `BatchAbandoned` at its next output, gate entry or table flush
   (`check_batch_current`), and it is not acked (1); its agent is restarted by Faust's
   supervisor (its path for a cancelled agent). What happens to its outputs and
   records is delivery 9.
4. A handler that raises (`guarded`) does not fail its batch: its input is
   dead-lettered (inside the batch, so under exactly-once in its transaction) and the
   batch goes on.
5. `event_batches` hands each record to its agent once per partition and consumer
   generation: a stale delivery (delivery 6) and a copy at or below the partition's
   handed mark (delivery 8) are dropped unacked; records of an old generation or taken
   while flow is suspended go back to the consumer to be fetched again (delivery 5).
6. Mechanics: the agent's batch iterator (`decoded_batches` / `event_batches`) marks the
   batch it handed out in context variables of the agent's task (`_TAKEN`, `_OPEN`);
   `streams.delivery.BatchAgent` calls `abandon_open_batch` when the agent body raises,
   which closes the iterator at once (releasing the commit gate, not acking) and
   applies (2).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, TypeVar
from uuid import UUID, uuid5

from aiokafka.partitioner import DefaultPartitioner

from agentstream.schemas import DeadLetter, Event, encode, registry
from agentstream.schemas.errors import InvalidEvent, PipelineError
from agentstream.streams.app import app, catalogue_topic, settings
from agentstream.streams.delivery import (
    HANDED_MARKS,
    HOLDS,
    NATIVE_CHANNELS,
    STALE_DELIVERIES,
    FetchedList,
    NativeChannel,
    delivery_failed,
    marks_key,
    processing_failed,
    refuse_commits,
)
from agentstream.streams.eos import GATE, SOURCE, transactional_id_for
from agentstream.streams.errors import UnreadableRecord
from agentstream.streams.observability import (
    DEAD_LETTERS,
    EVENTS_IN,
    EVENTS_OUT,
    SEND_FAILURES,
    TABLE_FULL,
    Throttled,
)
from agentstream.streams.record_batches import unreadable
from agentstream.streams.settings import DEADLETTER_KEY_RESERVE, output_limit
from agentstream.streams.tables import KeyHashPartitioner
from agentstream.streams.tables.writer import flush_pending, pending_writes
from agentstream.streams.topics import PIPELINE_DEADLETTER

log = logging.getLogger(__name__)

T = TypeVar("T")


class BatchAbandoned(asyncio.CancelledError):
    """Exactly-once: the batch being processed was taken before its partitions were
    revoked; none of its outputs may leave the transactions of that assignment (see the
    module's delivery model, 3). A cancellation, so that no `except Exception` of a
    handler swallows it and Faust's supervisor restarts the agent as after a rebalance."""


#: the batch the agent of this task has been handed and not finished: (the agent's
#: task, its app, the consumer's revoke count and the consumer generation when taken)
_TAKEN: ContextVar[tuple[asyncio.Task[Any] | None, Any, int, int] | None] = ContextVar(
    "agentstream_batch_taken", default=None
)


class WorkerFroze(RuntimeError):
    """The worker's event loop stood still for longer than the group's session timeout
    (SIGSTOP, a frozen VM or container): its partitions have most likely moved to another
    worker, which continued their hash chains from the topic, while this process still
    holds the old heads, fetched records and batches. Under at-least-once nothing fences
    its producer: whatever it wrote on, before its consumer noticed the rebalance, forked
    the signed chains (`audit verify`: hundreds of records inserted, chaos worker_stop).
    So it writes no further chain record and restarts; nothing it took is acked."""


#: the event loop's last tick (`watch_freezes`; None while nothing watches, as in tests
#: that run agents without a worker) and when a freeze was last noticed
_LAST_TICK: list[float | None] = [None]
_LAST_FREEZE = [0.0]
#: how often `watch_freezes` ticks
FREEZE_TICK_S = 0.5


def _freeze_limit() -> float:
    return float(settings.broker_session_timeout_s)


def _notice_freeze() -> float:
    """When the loop was last seen frozen (0.0: never); a gap since the last tick counts
    even before the watcher's own timer ran again."""
    now, last = time.monotonic(), _LAST_TICK[0]
    if last is not None and now - last > _freeze_limit():
        _LAST_FREEZE[0] = now
        _LAST_TICK[0] = now
    return _LAST_FREEZE[0]


async def watch_freezes() -> None:
    """Tick while the worker runs; after a freeze, crash the worker (`WorkerFroze`)."""
    _LAST_TICK[0] = time.monotonic()
    while True:
        await asyncio.sleep(FREEZE_TICK_S)
        gap = time.monotonic() - (_LAST_TICK[0] or 0.0)
        if _notice_freeze():
            exc = WorkerFroze(f"the event loop stood still for {gap:.1f} s")
            log.error("%s (longer than the session timeout): restarting the worker", exc)
            processing_failed(exc)  # commits nothing more, crashes: a restart rejoins
            return
        _LAST_TICK[0] = time.monotonic()


@app.task
async def _watch_freezes() -> None:
    await watch_freezes()


def check_not_frozen() -> None:
    """Raise `WorkerFroze` once the event loop has stood still for longer than the
    session timeout: no chain record may be written on (the worker is crashing; see
    `watch_freezes`, which may run after the first task to wake up). Called before
    chain records are written (`streams.audit_chain.ChainWriter.head`, `enforce_policy`'s
    sends)."""
    if _notice_freeze():
        raise WorkerFroze("the event loop stood still past the session timeout")


#: the outermost batch iterator of this task's agent, to close it when the agent fails
_OPEN: ContextVar[AsyncGenerator[Any, None] | None] = ContextVar(
    "agentstream_batch_iterator", default=None
)


class _Batches(AsyncIterator[T]):
    """An agent's batch iterator (`event_batches`, `decoded_batches`): the generator, plus
    a note in the agent task's context of which generator holds its open batch."""

    __slots__ = ("_gen",)

    def __init__(self, gen: AsyncGenerator[T, None]) -> None:
        self._gen = gen

    def __aiter__(self) -> _Batches[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._gen.__anext__()
        _OPEN.set(self._gen)  # set after any inner iterator: the outermost one wins
        return item

    async def aclose(self) -> None:
        await self._gen.aclose()


def _own_batch() -> tuple[asyncio.Task[Any] | None, Any, int, int] | None:
    """The open batch of the agent running in this task (None in other tasks, such as
    the LLM calls an agent starts, which inherit its context)."""
    taken = _TAKEN.get()
    if taken is None or taken[0] is not asyncio.current_task():
        return None
    return taken


def check_not_rebalanced() -> None:
    """Raise `BatchAbandoned` when this task's batch (or the batch that started this
    task: an LLM call) was taken before a rebalance, under either guarantee: for the
    writers of the signed chains, whose partitions may have another writer since
    (`streams.audit_chain.ChainWriter.head`). Under at-least-once the batch is then
    not acked, and its records are processed again by their partitions' owners."""
    if taken_before_rebalance():
        raise BatchAbandoned("taken before a rebalance: the chain's partition may have moved")


def taken_before_rebalance() -> bool:
    """Whether this task's batch (or the batch that started this task) was taken before
    a rebalance; False outside a batch."""
    taken = _TAKEN.get()
    return taken is not None and _stale(taken)


def check_batch_current() -> None:
    """Exactly-once: raise `BatchAbandoned` when this task's open batch was taken before
    a revoke (streams.delivery.BatchDeliveryConsumer.on_partitions_revoked)."""
    if not _EOS:
        return
    taken = _own_batch()
    if taken is not None and _stale(taken):
        raise BatchAbandoned("the batch was taken before its partitions were revoked")


def _stale(taken: tuple[asyncio.Task[Any] | None, Any, int, int]) -> bool:
    """Taken before the last revoke (`BatchDeliveryConsumer._revokes`), or in an earlier
    consumer generation (between that revoke's count and Faust suspending the flow)."""
    _, app_, revokes, generation = taken
    return (
        getattr(app_.consumer, "_revokes", 0) != revokes
        or app_.consumer_generation_id != generation
    )


def written_by() -> Any:
    """The batch the calling task holds (its `_TAKEN` token, None outside a batch): the
    table writer tags each changelog record with it."""
    return _TAKEN.get()


def abandoned(taken: Any) -> bool:
    """Exactly-once: whether the batch `taken` was taken before a revoke, so that
    nothing it wrote may join a transaction (`streams.tables.writer.flush_pending`)."""
    return _EOS and taken is not None and _stale(taken)


async def abandon_open_batch(exc: BaseException, *, stopping: bool) -> None:
    """The agent of this task left its batch by `exc` (called by `streams.delivery.BatchAgent`
    before Faust's supervisor sees the exception): close the batch iterator now, without
    acking the batch, and decide what the unfinished batch means (module docstring, 2).
    """
    gen, taken = _OPEN.get(), _own_batch()
    _OPEN.set(None)
    _TAKEN.set(None)
    if gen is not None:
        try:
            await gen.aclose()  # releases the commit gate; the batch is not acked
        except Exception:
            log.exception("closing an abandoned batch iterator failed")
    if taken is None:
        return  # no batch in hand: nothing taken from the queue is lost, Faust restarts it
    if _EOS and _stale(taken):
        # whatever it failed of (its producer stopped under it, say): taken before a
        # revoke, its outputs are in ended transactions and its records go to the owner
        exc = BatchAbandoned(f"taken before a revoke: {exc!r}")
    if isinstance(exc, BatchAbandoned):
        log.info("abandoned a batch taken before a rebalance; its records are processed again")
        return
    if stopping and isinstance(exc, asyncio.CancelledError):
        if _EOS:
            # part of its outputs may be in the open transactions: commit none of them
            refuse_commits(exc)
        return
    log.error("an agent failed with a batch in hand (not acked, crashing the worker): %r", exc)
    processing_failed(exc)


def parse_faults(spec: str) -> dict[str, int | float]:
    """``point@n`` → int n (a call number); ``point@Ts`` → float T (seconds)."""
    faults: dict[str, int | float] = {}
    for item in spec.split(","):
        name, _, when = (part.strip() for part in item.partition("@"))
        if not name:
            continue
        if when.isdigit():
            faults[name] = int(when)
        elif when.endswith("s"):
            with contextlib.suppress(ValueError):
                faults[name] = float(when[:-1])
    return faults


#: Test hook, off by default: ``AGENTSTREAM_TEST_FAULTS=point@n,...`` makes the n-th call
#: of `fault_point(point)` raise `InjectedFault` (once); ``point@Ts`` makes the first call
#: at least T seconds after that point's first call raise (independent of how many
#: records a batch holds, so of the delivery path). For the delivery and fault-injection
#: tests only (tests/integration/test_delivery_failure.py, tests/chaos/raises.py); not
#: a setting.
_FAULTS: dict[str, int | float] = parse_faults(os.environ.get("AGENTSTREAM_TEST_FAULTS", ""))
_FAULT_CALLS: dict[str, int] = {}
#: a timed fault's point → when it was first called (monotonic seconds)
_FAULT_FIRST: dict[str, float] = {}
#: points whose fault already fired (each fires once)
_FAULT_FIRED: set[str] = set()


class InjectedFault(RuntimeError):
    """Raised by `fault_point` when ``AGENTSTREAM_TEST_FAULTS`` asks for it."""


#: Test hook, off by default: ``AGENTSTREAM_TEST_DELAYS=point@seconds,...`` makes every
#: `delay_point(point)` sleep that long (slow agents, for rebalance tests):
#: ``send_record`` each output sent one by one, ``send_batch`` each exactly-once batch's
#: outputs, inside the commit gate, before the check that a revoke abandoned it.
_DELAYS: dict[str, float] = {
    name.strip(): float(s)
    for name, _, s in (
        item.partition("@") for item in os.environ.get("AGENTSTREAM_TEST_DELAYS", "").split(",")
    )
    if name.strip() and s.strip()
}


async def delay_point(name: str) -> None:
    """A place a test can make slow (see `_DELAYS`)."""
    delay = _DELAYS.get(name)
    if delay:
        if delay >= 1.0:  # a test waits for it to begin (test_eos_rebalance)
            log.info("test delay at %s: %.1f s", name, delay)
        await asyncio.sleep(delay)


def fault_point(name: str) -> None:
    """A place a test can make fail (see `_FAULTS`); costs one dict lookup otherwise."""
    if not _FAULTS or name not in _FAULTS or name in _FAULT_FIRED:
        return
    calls = _FAULT_CALLS[name] = _FAULT_CALLS.get(name, 0) + 1
    when = _FAULTS[name]
    if isinstance(when, float):
        now = time.monotonic()
        first = _FAULT_FIRST.setdefault(name, now)
        if now - first < when:
            return
    elif calls != when:
        return
    _FAULT_FIRED.add(name)
    raise InjectedFault(f"injected fault at {name} (call {calls})")


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


def hold(message: Any) -> None:
    """Keep `message` unacked past its batch (an LLM call holds its request until the
    final response is out): no commit passes its offset until `release` (delivery 1)."""
    HOLDS.hold(message)


def release(message: Any, consumer: Any) -> bool:
    """Ack a record `hold` kept; True when that made its offset committable."""
    return HOLDS.release(message, consumer)


@dataclass(slots=True)
class Inbound:
    """A decoded event together with where it came from."""

    event: Event[Any]
    message: Any  # faust.types.Message: topic, partition, offset, key, value, timestamp
    #: the JSON object `event` was validated from, when it came at its current schema
    #: version (`registry.parse`): the caller's to change, e.g. to forward it
    data: dict[str, Any] | None = None

    @property
    def origin(self) -> str:
        m = self.message
        return f"{m.topic}:{m.partition}:{m.offset}"


def decoded_batches(
    stream: Any,
    *,
    consumer: str,
    accept: Iterable[str] | None = None,
    max_batch: int | None = None,
    within_s: float | None = None,
    prepare: Callable[[list[Inbound]], Awaitable[None]] | None = None,
    keep_json: bool = False,
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
    `keep_json` keeps, on each `Inbound`, the JSON object its event was validated from
    (`Inbound.data`), for a consumer that forwards inputs unchanged; others leave it
    off, since holding every input's object until its batch ends costs the collector.

    A batch is acked when the caller asks for the next one, never when the caller leaves
    it by an exception (the module's delivery model).
    """
    return _Batches(
        _decoded_batches(
            stream,
            consumer,
            frozenset(accept) if accept is not None else None,
            max_batch or settings.batch_max,
            within_s or settings.batch_within_s,
            prepare,
            keep_json,
        )
    )


async def _decoded_batches(
    stream: Any,
    consumer: str,
    accepted: frozenset[str] | None,
    max_batch: int,
    within_s: float,
    prepare: Callable[[list[Inbound]], Awaitable[None]] | None,
    keep_json: bool,
) -> AsyncGenerator[list[Inbound], None]:
    limit = settings.max_event_bytes
    channel = _native_channel(stream)
    batches: AsyncGenerator[Any, None] = (
        _native_batches(stream, channel, max_batch)
        if channel is not None
        else _event_batches(stream, max_batch, within_s)
    )
    # closed together with this generator: an abandoned batch is not acked, and its
    # iterator must not wait for the garbage collector to say so
    async with contextlib.aclosing(batches):
        async for events in batches:
            good: list[Inbound] = []
            bad: list[tuple[Any, PipelineError]] = []
            topic_name = ""
            native = events if isinstance(events, NativeBatch) else None
            pairs = (
                [(m, m.value) for m in native.messages]
                if native is not None
                else [(ev.message, ev.value) for ev in events]
            )
            for msg, value in pairs:
                topic_name = msg.topic
                # the raw codec hands the message's value on as it is; the message's
                # own is what the dead letter carries
                stand_in = unreadable(value) or unreadable(getattr(msg, "value", None))
                if stand_in is not None:
                    # what the Kafka client could not parse (delivery 15): a dead letter
                    # like any undecodable record, acked with its batch
                    bad.append((msg, UnreadableRecord(stand_in.describe())))
                    continue
                try:
                    decoded, data = registry.parse(value, max_bytes=limit)
                    if accepted is not None and decoded.type not in accepted:
                        raise InvalidEvent(
                            f"event type {decoded.type!r} does not belong on {msg.topic}",
                            type=decoded.type,
                        )
                except PipelineError as exc:
                    bad.append((msg, exc))
                    continue
                good.append(Inbound(decoded, msg, data if keep_json else None))
            if good and prepare is not None:
                try:
                    await prepare(good)
                except Exception:  # an optimisation: the batch still does what it needs
                    log.exception("%s: preparing a batch of %d failed", consumer, len(good))
            if _EOS:
                # held until the caller asks for the next batch: `event_batches` then acks
                # this one before any other task runs, so no commit sees its outputs unacked
                await GATE.enter()
            try:
                # a revoke while the batch waited for the gate: abandoned before it starts
                check_batch_current()
                for msg, reason in bad:  # dead letters are outputs: inside the gate
                    await dead_letter(msg, reason, consumer)
                if pairs:
                    EVENTS_IN.labels(topic_name, consumer).inc(len(pairs))
                if good:
                    yield good
                if native is not None:
                    # its outputs, held until now, into the producer (under exactly-once
                    # into their inputs' transactions, while the batch holds the gate)
                    await native.send()
                if pending_writes():
                    # the batch's table updates into the producer before it is acked;
                    # under exactly-once into their transactions while it still holds
                    # the gate: the next commit, which commits its offsets, has them
                    if _EOS:
                        check_batch_current()
                    await flush_pending()
                if native is not None:
                    native.ack()  # inside the gate: no commit sees its outputs unacked
            finally:
                if _EOS:
                    GATE.leave()


def event_batches(stream: Any, max_batch: int, within_s: float) -> AsyncIterator[list[Any]]:
    """Faust events of an agent's stream in batches of up to `max_batch`, waiting at most
    `within_s` after the first one to fill a batch; each batch is acked once the caller
    asks for the next one, like `take_events` — but not when the caller leaves it by an
    exception or closes the iterator (the module's delivery model, 1), nor, under
    exactly-once, when its partitions were revoked meanwhile (3).

    Per event this keeps what Faust's stream iterator does: skip events of a stale
    consumer generation or while flow is suspended (rebalance), track the message for
    commit, and call the stream sensors — but without one loop turn per event. Unlike
    Faust, a skipped event is not acked but handed back to the consumer to be fetched
    again: its offset in the acked set could otherwise be committed before the record
    is processed (and with no committed offset yet, nothing would fetch it again).
    """
    return _Batches(_event_batches(stream, max_batch, within_s))


async def _event_batches(
    stream: Any, max_batch: int, within_s: float
) -> AsyncGenerator[list[Any], None]:
    app_ = stream.app
    queue = stream.channel.queue
    sensors = app_.sensors
    acking_topics = app_.topics.acking_topics
    consumer = app_.consumer
    unacked = app_.consumer.unacked
    refetch = getattr(consumer, "refetch", None)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    #: per partition: (consumer generation, highest offset handed to this agent). Within
    #: one assignment a partition can be delivered twice from the same offset: Faust's
    #: recovery seeks every stream partition back to its committed offset after the
    #: fetcher already ran (and resets its own read offsets), and our seek back to
    #: records dropped from a queue starts at the lowest dropped offset, which can be a
    #: second copy of a record this agent already processed. Seen as an entire stretch
    #: of input forwarded twice after a quick restart (tests/integration/
    #: test_security_accounting.py). Records at or below the mark are such copies.
    handed: dict[Any, tuple[int, int]] = {}
    mark_key = marks_key(stream)
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
            # from here until the caller finishes it, the batch is this agent's: an
            # exception leaves it unacked (`abandon_open_batch`)
            active = app_.flow_control.is_active()
            generation = app_.consumer_generation_id
            taken = (task, app_, getattr(consumer, "_revokes", 0), generation)
            _TAKEN.set(taken)
            events: list[Any] = []
            states: list[Any] = []
            skipped: list[Any] = []
            # almost always empty: looked at once per batch, not per event
            stale = STALE_DELIVERIES if STALE_DELIVERIES else ()
            copies = 0
            for ev in raw:
                msg = ev.message
                if stale and msg in stale:
                    # put in the queue after a clear that dropped records before it: it
                    # is fetched again with them (streams.delivery.RefetchingFlowControl)
                    continue
                if not active or msg.generation_id != generation:
                    skipped.append(ev)
                    continue
                mark = handed.get(msg.tp)
                if mark is not None and mark[0] == generation and msg.offset <= mark[1]:
                    # a second copy: the first was handed out (and is or was acked) in
                    # this assignment; neither processed nor acked again (an ack here
                    # could count the offset done while the first is still in progress)
                    copies += 1
                    continue
                handed[msg.tp] = (generation, msg.offset)
                if msg.topic in acking_topics and not msg.tracked:
                    msg.tracked = True
                    unacked.add(msg)
                    sensors.on_message_in(msg.tp, msg.offset, msg)
                states.append(sensors.on_stream_event_in(msg.tp, msg.offset, stream, ev))
                events.append(ev)
            if copies:
                log.info(
                    "%s: %d record(s) handed out before in this generation skipped",
                    mark_key,
                    copies,
                )
            if skipped and refetch is not None:
                refetch([ev.message for ev in skipped])
                skipped = []
            if events:
                # Not in a `finally`: a batch is done only when the caller comes back for
                # the next one. Left by an exception (GeneratorExit here) it is not acked.
                yield events
                if _EOS and _stale(taken):
                    # Taken before a revoke: whatever it sent is in the revoked
                    # transactions, which are not committed; the next owner of its
                    # partitions processes it (module docstring, 3).
                    log.info("not acking a batch of %d taken before a revoke", len(events))
                else:
                    for ev, state in zip(events, states, strict=True):
                        msg = ev.message
                        last = ev.ack()
                        sensors.on_stream_event_out(msg.tp, msg.offset, stream, ev, state)
                        if last:
                            sensors.on_message_out(msg.tp, msg.offset, msg)
            _TAKEN.set(None)
            for ev in skipped:
                if ev.ack():
                    sensors.on_message_out(ev.message.tp, ev.message.offset, ev.message)
    finally:
        if HANDED_MARKS.get(mark_key) is handed:  # a restarted agent may have its own now
            HANDED_MARKS.pop(mark_key, None)
        if started:
            await stream.stop()
            stream.service_reset()


# -- batch-native delivery (docs/design/batch-delivery.md) --------------------------------
# The default (AGENTSTREAM_DELIVERY=native): the consumer hands an agent's topic's
# fetched records to it as lists (`streams.delivery.NATIVE_CHANNELS`), without the
# conductor, Faust `Event`s, per-event sensors or `Event.ack`; the batch's `emit`s are
# kept in an outbox and produced per (topic, partition) with `send_batch` before the
# batch is acked, under exactly-once into the transaction of the input partition each
# was emitted for. Which agents stay per record, and why, is in the design note.

#: the native path is on (`AGENTSTREAM_DELIVERY`, the worker's validated settings):
#: an agent's `decoded_batches` takes its topic's fetched records as lists
NATIVE_ENABLED = settings.delivery == "native"
#: (the agent's task, its outbox) while a native batch is out: `emit` appends to it
_OUTBOX: ContextVar[
    tuple[asyncio.Task[Any] | None, list[tuple[str, bytes, bytes, str, tuple[str, int] | None]]]
    | None
] = ContextVar("agentstream_outbox", default=None)
#: native channels' capacity, in fetched batches (backpressure on the consumer)
NATIVE_QUEUE_BATCHES = 2


def _native_channel(stream: Any) -> NativeChannel | None:
    """The native channel of the one topic `stream` reads, or None for the conductor
    path: for a stream of several topics, for a topic another agent reads too (each
    would need every record; the consumer diverts a native topic's records to its one
    channel), and for an agent of several instances (`concurrency`). Agents are all
    defined before the first one iterates (autodiscovery at import), so the count is
    complete."""
    if not NATIVE_ENABLED:
        return None
    topics: tuple[str, ...] = tuple(getattr(stream.channel, "topics", None) or ())
    if len(topics) != 1:
        if topics:
            log.info("%s: a stream of %d topics: per-record delivery", topics, len(topics))
        return None
    name = topics[0]
    readers = [
        agent
        for agent in getattr(stream.app, "agents", {}).values()
        if name in (getattr(getattr(agent, "channel", None), "topics", None) or ())
    ]
    if len(readers) > 1:
        log.warning("%s is read by %d agents: per-record delivery", name, len(readers))
        return None
    if readers and int(getattr(readers[0], "concurrency", 1) or 1) > 1:
        # a channel hands a list to one taker and tracks the one list it holds
        log.warning("%s is read by an agent with concurrency > 1: per-record delivery", name)
        return None
    channel = NATIVE_CHANNELS.get(name)
    if channel is None:
        channel = NATIVE_CHANNELS[name] = NativeChannel(NATIVE_QUEUE_BATCHES)
        log.info("batch-native delivery for %s", name)
        _refetch_conducted(stream)
    return channel


def _refetch_conducted(stream: Any) -> None:
    """Records of a topic fetched before its agent first asked for a native batch went
    the conductor's way, into the stream's queue, which the native agent never reads
    (an agent may do seconds of start-up work first: `enforce_policy` loads its
    policies and chain keys). They are taken out and fetched again, as a flow-control
    clear does (delivery 5, 6); the refetch's epoch bump stops a delivery of that topic
    under way, whose record then landing in the queue is refetched by it too. Emptying
    the queue also frees a delivery blocked on it while full."""
    queue = getattr(stream.channel, "queue", None)
    dropped: list[Any] = []
    while queue is not None and not queue.empty():
        message = getattr(queue.get_nowait(), "message", None)
        if message is not None:
            dropped.append(message)
    if dropped:
        log.info(
            "%d record(s) delivered before the native channel existed: refetched", len(dropped)
        )
        stream.app.consumer.refetch(dropped)


class NativeBatch:
    """A batch of fetched records handed to a native agent (`_native_batches`), with the
    outputs its `emit`s kept back (the outbox: name, key, value, catalogue topic, and
    under exactly-once the input partition `SOURCE` named). `_decoded_batches` finishes
    it inside the commit gate: `send` the outbox, the table records, then `ack`; a batch
    left by an exception is neither sent nor acked (delivery 1, 2)."""

    __slots__ = ("app", "messages", "outbox", "taken")

    def __init__(self, app_: Any, messages: list[Any], taken: Any) -> None:
        self.app = app_
        self.messages = messages
        self.outbox: list[tuple[str, bytes, bytes, str, tuple[str, int] | None]] = []
        #: `_TAKEN` when it was handed out (exactly-once: stale after a revoke)
        self.taken = taken

    async def send(self) -> None:
        outbox, self.outbox = self.outbox, []
        if not outbox:
            return
        if _EOS:
            check_batch_current()  # taken before a revoke: none of it is sent
            await _send_outbox_in_transactions(outbox)
        else:
            await _send_outbox(outbox)

    def ack(self) -> None:
        if _EOS and _stale(self.taken):
            # its outputs are in ended transactions: the next owner processes it
            log.info("not acking a batch of %d taken before a revoke", len(self.messages))
            return
        _ack_all(self.app, self.app.consumer, self.messages)


async def _next_list(channel: NativeChannel, app_: Any) -> FetchedList | None:
    """`channel`'s next list, or None once the worker stops or crashes. An agent whose
    body raised is restarted by Faust's supervisor even while the worker stops; its new
    actor, waiting on an empty channel nothing fills any more, held the worker's stop
    forever (the stop waits for every actor), where it must exit for its supervisor to
    restart it."""
    queued = channel.get_nowait()
    if queued is not None:
        return queued
    ending = (app_._stopped, app_._crashed)  # mode Service: set as the stop begins
    if any(ev.is_set() for ev in ending):
        return None
    getting = asyncio.ensure_future(channel.get())
    waiters = [asyncio.ensure_future(ev.wait()) for ev in ending]
    try:
        await asyncio.wait([getting, *waiters], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        if not getting.done():
            getting.cancel()  # Queue.get gives up its place: no list is taken
    if not getting.done():
        await asyncio.wait([getting])  # the cancel lands, or returns a list taken first
    return None if getting.cancelled() else getting.result()


async def _native_batches(
    stream: Any, channel: NativeChannel, max_batch: int
) -> AsyncGenerator[NativeBatch, None]:
    """Batches of at most `max_batch` records from the lists in `channel`; the caller
    sends and acks each (`NativeBatch`) before it comes back for the next. A list a
    refetch drained (`NativeChannel.drain`) is left where the drain found it: its
    records not yet taken are fetched again, none is handed out twice or out of order.
    Per record, as `_event_batches`: an old generation or flow stopped refetches it, a
    copy at or below the partition's handed mark is skipped (delivery 8)."""
    app_ = stream.app
    consumer = app_.consumer
    refetch = consumer.refetch
    flow_control = app_.flow_control
    task = asyncio.current_task()
    handed: dict[Any, tuple[int, int]] = {}
    mark_key = marks_key(stream)
    HANDED_MARKS[mark_key] = handed
    started = await stream.maybe_start()
    try:
        while not stream.should_stop:
            fetched = await _next_list(channel, app_)
            if fetched is None:
                break
            try:
                messages = fetched.messages
                while not fetched.stale and fetched.taken < len(messages):
                    chunk = messages[fetched.taken : fetched.taken + max_batch]
                    fetched.taken += len(chunk)
                    active = flow_control.is_active()
                    generation = app_.consumer_generation_id
                    taken = (task, app_, getattr(consumer, "_revokes", 0), generation)
                    _TAKEN.set(taken)
                    events: list[Any] = []
                    skipped: list[Any] = []
                    for msg in chunk:
                        if not active or msg.generation_id != generation:
                            skipped.append(msg)
                            continue
                        mark = handed.get(msg.tp)
                        if mark is not None and mark[0] == generation and msg.offset <= mark[1]:
                            continue
                        handed[msg.tp] = (generation, msg.offset)
                        # the batch's hold, as the conductor's per stream: a task that
                        # holds it longer (an LLM call: `incref`, later `ack`) acks it
                        msg.refcount += 1
                        events.append(msg)
                    if skipped:
                        refetch(skipped)  # drains this list's rest too: the loop ends
                    if events:
                        batch = NativeBatch(app_, events, taken)
                        _OUTBOX.set((task, batch.outbox))
                        yield batch
                        _OUTBOX.set(None)
                    _TAKEN.set(None)
            finally:
                channel.release(fetched)
                if not fetched.stale and fetched.taken < len(fetched.messages):
                    # left mid-list (the generator closed): the rest was never taken
                    fetched.stale = True
                    refetch(fetched.untaken())
    finally:
        _OUTBOX.set(None)
        if HANDED_MARKS.get(mark_key) is handed:
            HANDED_MARKS.pop(mark_key, None)
        if started:
            await stream.stop()
            stream.service_reset()


def _ack_all(app_: Any, consumer: Any, messages: list[Any]) -> None:
    """`Message.ack` for a whole batch under one lock: the batch's hold is released
    (`_native_batches` took one per record, as the conductor does per stream), and a
    record no other task holds gets `Consumer.ack`'s bookkeeping; one still held (an LLM
    call's request until its final response is out) is acked by its holder. Then the
    one sensor value the consumer's health check reads (`stream_inbound_time`), once per
    partition."""
    from faust.types.tuples import ack_lock
    from mode.utils.futures import notify

    committed = consumer._committed_offset
    acked_index = consumer._acked_index
    acked = consumer._acked
    acks_enabled_for = app_.topics.acks_enabled_for
    counts_ack = consumer.counts_ack
    n = 0
    tps: set[Any] = set()
    with ack_lock:
        for msg in messages:
            if msg.acked:
                continue
            tp = msg.tp
            tps.add(tp)  # read, whether or not a holder keeps it unacked (health check)
            held = msg.refcount = max(msg.refcount - 1, 0)
            if held:
                continue
            msg.acked = True
            if not acks_enabled_for(msg.topic) or not counts_ack(msg):
                continue
            offset = msg.offset
            c = committed[tp]
            if c is None or offset >= c:
                index = acked_index[tp]
                if offset not in index:
                    index.add(offset)
                    acked[tp].append(offset)
                    n += 1
        consumer._n_acked += n
    notify(consumer._waiting_for_ack)
    monitor = app_.monitor
    if monitor is not None and monitor.stream_inbound_time is not None:
        now = time.monotonic()
        for tp in tps:
            monitor.stream_inbound_time[tp] = now


#: an outbox entry: topic name, key, value, catalogue topic, the input partition it was
#: emitted for (`SOURCE`, exactly-once only)
Output = tuple[str, bytes, bytes, str, tuple[str, int] | None]


async def _send_outbox(outbox: list[Output]) -> None:
    """Produce a batch's outputs per (topic, partition) with aiokafka's batch API; the
    partition is the one `Producer.send` would pick (aiokafka's partitioner of the
    worker's producer). Faust's flush before a commit covers these batches."""
    producer = (await _producer())._ensure_producer()
    partition_of = await _partitioner(producer, {entry[0] for entry in outbox})
    by_tp: dict[tuple[str, int, str], list[tuple[bytes, bytes]]] = {}
    for name, key, value, topic, _ in outbox:
        by_tp.setdefault((name, partition_of(name, key), topic), []).append((key, value))
    for (name, p, topic), records in by_tp.items():
        await send_record_batches(producer, name, p, records, topic)
        _events_out(topic).inc(len(records))


async def _send_outbox_in_transactions(outbox: list[Output]) -> None:
    """Exactly-once: a batch's outputs into the transaction of the input partition each
    was emitted for (`SOURCE`), as record batches per (transaction, topic, partition),
    each transaction's under Faust's lock for it (its commit takes the same lock). An
    output emitted with no `SOURCE` takes Faust's own path, as `send_record` sends it.
    Called inside the commit gate after `check_batch_current`: a batch taken before a
    revoke sends none of its outputs."""
    manager = await _producer()  # the transaction manager
    groups: dict[tuple[str, int] | None, list[Output]] = {}
    for entry in outbox:
        groups.setdefault(entry[4], []).append(entry)
    # every transaction first: a batch that cannot send all its outputs sends none
    transactions = await source_transactions([s for s in groups if s is not None])
    for source, entries in groups.items():
        if source is None:
            for name, key, value, topic, _ in entries:
                fut = await manager.send(name, key, value, None, None, None)
                fut.add_done_callback(partial(_delivered, topic))
                _events_out(topic).inc()
            continue
        transaction = transactions[source]
        partition_of = await _partitioner(transaction[1], {entry[0] for entry in entries})
        by_tp: dict[tuple[str, int, str], list[tuple[bytes, bytes]]] = {}
        for name, key, value, topic, _ in entries:
            by_tp.setdefault((name, partition_of(name, key), topic), []).append((key, value))
        await send_in_transaction(transaction, by_tp)
        for (_, _, topic), records in by_tp.items():
            _events_out(topic).inc(len(records))


#: (transactional id, its aiokafka producer): an input partition's open transaction
Transaction = tuple[str, Any]


async def source_transactions(
    sources: Iterable[tuple[str, int]],
) -> dict[tuple[str, int], Transaction]:
    """Exactly-once: the open transaction of each input partition in `sources` (the one
    that commits its offsets), all looked up before anything is sent. Raises
    `BatchAbandoned` for a batch taken before a revoke and `_missing_transaction` when
    a transaction is gone (revoked): outputs sent outside it would be duplicated by the
    partition's next owner. Call with the batch inside the commit gate."""
    if _DELAYS:
        await delay_point("send_batch")  # a long batch, for the rebalance tests
    check_batch_current()
    manager = await _producer()  # the transaction manager
    found: dict[tuple[str, int], Transaction] = {}
    for source in sources:
        tid = _source_transaction(manager, source, warn=False)
        if tid is None:
            raise _missing_transaction(source)
        found[source] = (tid, manager.producer._transaction_producers[tid])
    return found


async def send_in_transaction(
    transaction: Transaction, records: Mapping[tuple[str, int, str], list[tuple[bytes, bytes]]]
) -> list[asyncio.Future[Any]]:
    """Record batches into `transaction` (`source_transactions`), `records` keyed by
    (topic name, partition, label for metrics and logs), under Faust's lock for that
    transaction (its commit takes the same one). A batch taken before a revoke that
    happened since the lookup raises `BatchAbandoned` here, before sending."""
    check_batch_current()
    tid, producer = transaction
    manager = await _producer()
    futures: list[asyncio.Future[Any]] = []
    async with manager.producer._trn_locks[tid]:
        for (name, partition, label), items in records.items():
            futures += await send_record_batches(producer, name, partition, items, label)
    return futures


async def _partitioner(producer: Any, names: Iterable[str]) -> Callable[[str, bytes], int]:
    """The partition aiokafka's `Producer.send` would pick for a key of each topic in
    `names`, as `producer._partition` computes it: the producer's partitioner over the
    topic's partitions. The metadata is made sure of and read once per call (per batch:
    a transaction's producer is replaced after a fence, and knows only its own); aiokafka's
    default partitioner is replaced by `KeyHashPartitioner`, its twin with cached key
    hashes."""
    metadata = producer._metadata
    parts: dict[str, tuple[list[int], list[int]]] = {}
    for name in names:
        await producer.partitions_for(name)  # waits for the topic's metadata
        parts[name] = (
            list(metadata.partitions_for_topic(name)),
            list(metadata.available_partitions_for_topic(name)),
        )
    partitioner = producer._partitioner
    if type(partitioner) is DefaultPartitioner:
        partitioner = KeyHashPartitioner()  # the same partitions, key hashes cached

    def partition_of(name: str, key: bytes) -> int:
        every, available = parts[name]
        p: int = partitioner(key, every, available)
        return p

    return partition_of


async def send_record_batches(
    producer: Any, name: str, partition: int, records: list[tuple[bytes, bytes]], label: str
) -> list[asyncio.Future[Any]]:
    """(key, value) records to one partition of topic `name` as aiokafka record batches
    (Faust's per-record send costs more than most stages' work on a record), in order.
    Each batch's future is watched (`watch_delivery`, `label` naming the topic in the
    metrics and logs): a refused output crashes the worker before any commit. Returns
    the futures, for a caller that awaits its outputs' acks."""
    futures: list[asyncio.Future[Any]] = []
    batch = producer.create_batch()
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:
            futures.append(await producer.send_batch(batch, name, partition=partition))
            watch_delivery(futures[-1], label)
            batch = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"a record of {len(value)} bytes does not fit a batch")
    if batch.record_count():
        futures.append(await producer.send_batch(batch, name, partition=partition))
        watch_delivery(futures[-1], label)
    return futures


async def dead_letter(message: Any, exc: BaseException, consumer: str) -> None:
    """Publish a DeadLetter carrying the original bytes (redacted if the consumer asked
    for it, see `redact_dead_letters`) and the record's coordinates."""
    letter = dead_letter_of(message, exc, consumer)
    event = dead_letter_event(letter)
    size = len(encode(event))
    if size > output_limit(settings.max_event_bytes, len(event.key.encode())):
        # The last line (`dead_letter_of` fits the bytes to the limit): one the producer
        # refused crashed the worker, and again on the same record after every restart.
        log.error(
            "the dead letter of %s:%s:%s is %d bytes, too large: sent without its bytes",
            message.topic,
            message.partition,
            message.offset,
            size,
        )
        letter = withheld(letter)
        event = dead_letter_event(letter)
    error_class = letter.error_class
    DEAD_LETTERS.labels(message.topic, consumer, error_class).inc()
    log.warning(  # the reason quotes the input (%r: its line breaks stay on this line)
        "dead-lettered %s:%s:%s (%s) in %s: %r",
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
            await emit(PIPELINE_DEADLETTER, event)
        finally:
            SOURCE.reset(token)
        return
    await emit(PIPELINE_DEADLETTER, event)


async def refuse_table_full(
    message: Any, exc: BaseException, consumer: str, table: str, what: str, warning: Throttled
) -> None:
    """A record refused because it would add a key to a full partition of a monitoring
    table (`TableFull`): what a sender chose, so a dead letter, counted per table, with a
    throttled warning (`what`: the records refused, e.g. "heartbeats of new agent ids"),
    not the traceback `guarded` logs for a failure of ours."""
    TABLE_FULL.labels(table).inc()
    warning.warning("%s: %s are refused (dead letters): %s", table, what, exc)
    await dead_letter(message, exc, consumer)


#: the namespace of dead letters' event ids (`dead_letter_event`); never change it
DEAD_LETTER_IDS = UUID("5d0c8a0e-7f4b-4c61-9a52-6e3f1d2b8c47")


def dead_letter_event(letter: DeadLetter) -> Event[DeadLetter]:
    """The event a dead letter is published as. Its id is derived from the consumer and
    the record's coordinates (UUIDv5), not drawn: a record dead-lettered again after a
    crash (at-least-once) is the same event, which consumers deduplicating on the event
    id, and `audit report`, count once. A bad record has no event id of its own to be
    the causation id (it may not even be JSON)."""
    name = f"{letter.consumer}\n{letter.topic}\n{letter.partition}\n{letter.offset}"
    return Event.of(letter, source=letter.consumer, event_id=uuid5(DEAD_LETTER_IDS, name))


#: what a dead letter's fitting keeps back for its envelope, whose time is written anew
#: when it is sent (with or without microseconds)
_ENVELOPE_SLACK = 64


def dead_letter_of(message: Any, exc: BaseException, consumer: str) -> DeadLetter:
    """The DeadLetter `dead_letter` publishes for `message` (a Faust message or anything
    with its topic, partition, offset, key, value and timestamp).

    The original bytes (at most `deadletter_max_original_bytes`) and the key are cut to
    what the dead letter has room for (`fit_dead_letter`), each flagged when cut: in
    base64, next to a reason and names a sender partly chooses, they made dead letters
    larger than the producer sends, and the worker crashed on the record after every
    restart."""
    value = message.value
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    else:
        raw = str(value).encode() if value is not None else b""
    is_withheld = False
    redact = _REDACTORS.get(consumer)
    stand_in = unreadable(value)
    if redact is not None and stand_in is not None and stand_in.whole_batch:
        # a raw record batch, compressed if it was: the redactor cannot see inside it, so
        # a secret in it would pass; the coordinates and the reason still lead to it
        is_withheld = True
    elif redact is not None:
        try:
            raw = bytes(redact(raw))
        except Exception:
            # no bytes rather than possibly a secret; the coordinates still lead to them
            log.exception("%s: redacting a dead letter failed, its bytes are left out", consumer)
            is_withheld = True
    size = len(raw)
    if is_withheld:
        raw = b""
    key = bytes(message.key) if isinstance(message.key, bytes | bytearray) else None
    error_class = type(exc).__name__
    bare = DeadLetter(
        original_b64="",
        original_size=size,
        key_b64="" if key is not None else None,
        key_size=len(key) if key is not None else None,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
        error_class=error_class,
        error_message=str(exc)[:8192] or error_class,
        consumer=consumer,
        retriable=bool(getattr(exc, "retriable", False)),
    )
    event = dead_letter_event(bare)
    room = (
        output_limit(settings.max_event_bytes, len(event.key.encode()))
        - len(encode(event))
        - _ENVELOPE_SLACK
    )
    kept, kept_key = fit_dead_letter(
        len(raw),
        len(key) if key is not None else None,
        room,
        settings.deadletter_max_original_bytes,
    )
    return bare.model_copy(
        update={
            "original_b64": base64.b64encode(raw[:kept]).decode(),
            "original_truncated": is_withheld or kept < size,
            "key_b64": base64.b64encode(key[:kept_key]).decode() if key is not None else None,
            "key_truncated": key is not None and kept_key < len(key),
        }
    )


def fit_dead_letter(original: int, key: int | None, room: int, cap: int) -> tuple[int, int]:
    """How many of a bad record's `original` bytes and `key` bytes its dead letter keeps,
    with `room` characters of base64 for both: a key of up to `DEADLETTER_KEY_RESERVE`
    bytes whole first (it names the record's sender), then the original up to `cap`,
    then as much of a longer key as the room left holds."""
    key = key or 0
    first = key if key <= DEADLETTER_KEY_RESERVE else 0  # a longer one is cut anyway
    kept = min(original, cap, _b64_fits(room - _b64_size(first)))
    return kept, min(key, _b64_fits(room - _b64_size(kept)))


def _b64_size(n: int) -> int:
    """Characters of the base64 of `n` bytes."""
    return (n + 2) // 3 * 4


def _b64_fits(chars: int) -> int:
    """The most bytes whose base64 takes at most `chars` characters."""
    return max(0, chars) // 4 * 3


def withheld(letter: DeadLetter) -> DeadLetter:
    """`letter` without the original bytes and the key (both flagged): the form a dead
    letter too large to send goes out in. Its coordinates still lead to the record."""
    return letter.model_copy(
        update={
            "original_b64": "",
            "original_truncated": True,
            "key_b64": None,
            "key_truncated": letter.key_size is not None,
        }
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
    if NATIVE_ENABLED:
        box = _OUTBOX.get()
        if box is not None and box[0] is asyncio.current_task():
            box[1].append((name, record_key, encode(event), topic, SOURCE.get() if _EOS else None))
            return
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
    this worker does not consume (see streams/eos.py). A record sent with no input being
    processed (a timer's) goes out at-least-once, in no transaction (delivery 12): in
    the destination partition's it became visible only when that partition's input next
    committed, which for a quiet partition was never (the heartbeat monitor's "down"
    transitions), and the broker aborted it at the transaction timeout.
    """
    if _DELAYS:
        await delay_point("send_record")
    producer = await _producer()
    if _EOS:
        source = SOURCE.get()
        if source is None:
            # the transaction manager's driver producer, with no transactional id: its
            # plain (non-transactional) aiokafka producer
            return await producer.producer.send(topic, key, value, partition, None, None)
        own = _own_batch() is not None
        if own:
            # taken before a revoke: its outputs must stay in the revoked transactions
            check_batch_current()
        tid = _source_transaction(producer, source, warn=not own)
        if tid is not None:
            return await producer.producer.send(
                topic, key, value, partition, None, None, transactional_id=tid
            )
        if own:
            raise _missing_transaction(source)
    return await producer.send(topic, key, value, partition, None, None)


def _missing_transaction(source: tuple[str, int]) -> BaseException:
    """What an agent's own output meets when its input's transaction is gone: it would
    be duplicated by whoever processes the input again outside it, so it is never sent
    that way. During a rebalance the batch is abandoned; otherwise it is a bug."""
    if getattr(app, "rebalancing", False):
        return BatchAbandoned("no open transaction during a rebalance")
    return RuntimeError(
        f"no open transaction for {source[0]}:{source[1]}, although no rebalance "
        "happened since the batch was taken"
    )


def _source_transaction(manager: Any, source: tuple[str, int], *, warn: bool = True) -> str | None:
    """The open transaction of the source partition, if this worker holds one (not after
    the partition was revoked). An agent's own batch then is abandoned (`send_record`);
    a record sent by another task (an LLM call holding its request's offset, which is
    at-least-once) takes Faust's own path."""
    topic, partition = source
    try:
        group = app.assignor.group_for_topic(topic)
    except KeyError:
        return None
    tid = transactional_id_for(app.conf.id, group, partition)
    producers = getattr(getattr(manager, "producer", None), "_transaction_producers", None)
    if producers is None or tid not in producers:
        if warn:
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
    "BatchAbandoned",
    "Inbound",
    "WorkerFroze",
    "abandon_open_batch",
    "app",
    "check_batch_current",
    "check_not_frozen",
    "check_not_rebalanced",
    "dead_letter",
    "dead_letter_of",
    "decoded_batches",
    "emit",
    "event_batches",
    "fault_point",
    "guarded",
    "redact_dead_letters",
    "send_in_transaction",
    "send_record",
    "send_record_batches",
    "source_transactions",
    "watch_delivery",
]
