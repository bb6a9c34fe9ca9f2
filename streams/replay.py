"""Replay history by time range, for audits and for notebooks.

    async for rec in replay(settings, ["security.decisions"], since="-2h", until="now"):
        print(rec.offset, rec.event.payload.verdict)

How it reads
------------
* Start offsets come from offsets-for-times on every partition; the stop offset of each
  partition is fixed when the replay starts (the first offset at or after `until`, capped
  by the end offset snapshot), so a replay of a live topic terminates.
* Time ranges are half-open, ``[since, until)``, in every command and view that takes
  one: ``--since 10:00 --until 11:00`` and ``--since 11:00 --until 12:00`` share no
  record and miss none.
* Its own consumer is *assigned* the partitions and seeks: it joins no consumer group and
  commits nothing, so a replay never moves any worker's offsets or triggers a rebalance.
* Partitions are merged in ``(timestamp, partition, offset)`` order with a k-way heap
  merge. Each partition holds at most `buffer` records and is paused while its buffer is
  full, so memory is bounded by partitions x buffer whatever the length of the replay.
* Records are parsed with orjson only; filters work on the parsed dict. The validated
  `Event` (pydantic, with upcasting) is built lazily when `rec.event` is first read — the
  difference is most of the cost of a replay to a file.

When a read ends, and when it gives up
--------------------------------------
* A partition is read through when the consumer's *position* reaches its stop offset,
  not when a record at stop - 1 arrives: the last offsets of a range may hold no record
  ever fetched (a transaction's commit or abort marker, aborted records under
  read_committed, offsets compacted away).
* A read that moves no more — no record fetched, no position moving on the partitions it
  still waits for — for `Settings.kafka_connect_timeout_s` raises a `BrokerError` naming
  those partitions, their positions and stop offsets (`Stall`): a broker gone mid-read,
  or a partition that can no longer reach its stop, ends the command with one line
  instead of hanging it.
* Offsets deleted after the ranges were planned and before the read reached them
  (retention, `delete-records`, a log truncated under it) are never skipped silently.
  The consumer resets no position (``auto_offset_reset="none"``): the fetch fails out of
  range, and the read records a `Gap` — in `Progress.lost`, or as a logged warning
  without a `Progress` — and goes on from the partition's new start. `read_partition`,
  the reader of `audit verify`, reports its gaps the same way.
* A record the Kafka client cannot parse comes as a stand-in (`streams.record_batches`):
  `replay` never yields it but counts it (`Progress.unreadable`) and describes it to its
  caller, `read_partition` hands it on. A batch's stand-in sits at the batch's last
  offset and stands for the offsets from its first one: it belongs to a range its first
  offset is in, however far past the stop the batch ends (`before_stop`), and to any
  time range, since it carries the batch's max timestamp, not its records' times.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import heapq
import logging
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from agentstream.schemas import Event, registry
from agentstream.schemas.errors import SchemaError
from agentstream.streams import record_batches
from agentstream.streams.client import group_less_consumer
from agentstream.streams.errors import BrokerError
from agentstream.streams.record_batches import Unreadable, unreadable
from agentstream.streams.redaction import parse_holds_all, redact_event_dict, redact_raw
from agentstream.streams.settings import Settings
from agentstream.streams.topics import CATALOGUE

log = logging.getLogger(__name__)

#: payload fields that name an agent; `--agent` matches any of them (or the source/key)
AGENT_FIELDS = ("agent_id", "sender_id", "recipient_id", "worker_id")

_RELATIVE = re.compile(r"^([+-])\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TimeParseError(ValueError):
    pass


def parse_time(text: str | datetime | int | float, *, now: datetime | None = None) -> datetime:
    """`now`, relative (`-15m`, `-2h`, `+30s`, `-1d`), ISO-8601, or epoch milliseconds
    (13 digits) → an aware UTC datetime. Naive ISO times are taken as UTC. A time before
    1970 is refused: Kafka's record times start there (and a negative search time is
    an error of the client's, not an empty range). A time beyond the calendar's range is
    a TimeParseError too (a view answered it with a 500)."""
    try:
        dt = _parse_time(text, now)
    except (OverflowError, OSError, ValueError) as exc:
        if isinstance(exc, TimeParseError):
            raise
        raise TimeParseError(f"time {text!r} is out of range") from None
    if dt < _EPOCH:
        raise TimeParseError(f"time {text!r} is before 1970-01-01, where record times start")
    return dt


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _parse_time(text: str | datetime | int | float, now: datetime | None) -> datetime:
    current = now or datetime.now(UTC)
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=UTC)
    if isinstance(text, int | float):
        return datetime.fromtimestamp(text / 1000, UTC)
    s = text.strip()
    if not s:
        raise TimeParseError("empty time")
    if s.lower() == "now":
        return current
    m = _RELATIVE.match(s.lower())
    if m:
        seconds = float(m.group(2)) * _UNITS[m.group(3)]
        return current + timedelta(seconds=seconds if m.group(1) == "+" else -seconds)
    if s.isdigit() and len(s) >= 13:
        return datetime.fromtimestamp(int(s) / 1000, UTC)
    if s.isdigit() and len(s) >= 9:
        raise TimeParseError(
            f"cannot parse time {text!r}: epoch milliseconds have 13 digits (this looks "
            "like seconds: add 000)"
        )
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith(("Z", "z")) else s)
    except ValueError:
        raise TimeParseError(
            f"cannot parse time {text!r}: use ISO-8601, `now`, or -15m / -2h / -1d"
        ) from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def to_ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


class ReplayRecord:
    """One record of a replay. `data` is the parsed JSON (None if unparseable);
    `event` validates it into an `Event` on first access (raises `SchemaError`), as
    history: without the producer limits (`schemas.limits`), so that a record written
    before a bound existed is read as it was accepted then. `checked_event` validates it
    as a worker takes its input in."""

    __slots__ = (
        "_event",
        "data",
        "error",
        "key",
        "offset",
        "partition",
        "timestamp_ms",
        "topic",
        "value",
    )

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        key: bytes | None,
        value: bytes | None,
        data: dict[str, Any] | None,
        error: str | None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp_ms = timestamp_ms
        self.key = key
        self.value = value
        self.data = data
        self.error = error
        self._event: Event[Any] | None = None

    @property
    def event(self) -> Event[Any]:
        if self._event is None:
            if self.data is None:
                raise SchemaError(self.error or "undecodable record")
            self._event = registry.from_dict(self.data, limits=False)
        return self._event

    def checked_event(self) -> Event[Any]:
        """The event as a worker decodes its input, the producer limits included (a
        rebuild folds only what the live fold would take); raises `SchemaError`."""
        if self.data is None:
            raise SchemaError(self.error or "undecodable record")
        return registry.from_dict(self.data)

    def event_or_none(self) -> Event[Any] | None:
        try:
            return self.event
        except SchemaError:
            return None

    @property
    def type(self) -> str | None:
        t = self.data.get("type") if self.data else None
        return t if isinstance(t, str) else None

    def json_line(self, *, show_secrets: bool = False) -> bytes:
        """One JSON line: coordinates plus the event exactly as it is on the wire (the
        raw JSON is embedded without re-encoding), or the error and the value base64.
        Kafka topic names are [a-zA-Z0-9._-] only, so they need no escaping.

        Unless `show_secrets`, secrets are replaced (`streams.redaction`): an event
        holding one, or whose bytes name a member twice (values its dict lacks), is
        re-encoded from its redacted dict, and the bytes of an
        undecodable record are redacted before they are base64-encoded."""
        key = b"null" if self.key is None else orjson.dumps(self.key.decode("utf-8", "replace"))
        head = b'{"topic":"%s","partition":%d,"offset":%d,"timestamp_ms":%d,"key":%s,' % (
            self.topic.encode(),
            self.partition,
            self.offset,
            self.timestamp_ms,
            key,
        )
        body = self.event_json(show_secrets=show_secrets)
        if self.data is not None and self.value is not None:
            return head + b'"event":' + body + b"}\n"
        return head + body[1:] + b"\n"  # {"error": ..., "value_b64": ...} merged in

    def event_json(self, *, show_secrets: bool = False) -> bytes:
        """The event as it is on the wire (re-encoded to redact a secret, to keep it one
        line, or when its parse does not hold every value of its bytes: a member named
        twice), or, for a record that is no event, ``{"error": ..., "value_b64": ...}``."""
        if self.data is not None and self.value is not None:
            shown = self.data if show_secrets else redact_event_dict(self.data)
            wire = self.value.strip()
            if (
                shown is self.data
                and b"\n" not in wire
                and b"\r" not in wire
                and (show_secrets or parse_holds_all(wire, self.data))
            ):
                return wire
            # JSON allows CR and LF between tokens: written as sent, one record would be
            # several output lines, one of them a forged record of the sender's choosing;
            # and bytes that name a member twice hold values the parse dropped and the
            # redaction never saw
            return orjson.dumps(shown)
        value = self.value or b""
        if not show_secrets:
            value = redact_raw(value)
        return orjson.dumps({"error": self.error, "value_b64": base64.b64encode(value).decode()})

    def render(self, fmt: str = "json", *, meta: bool = False, show_secrets: bool = False) -> bytes:
        """The output of `tail` and `replay` for this record (see `OUTPUT_FORMATS`), one
        line (`pretty`: one indented block) ending in a newline. `meta` adds the
        record's topic, partition, offset, timestamp_ms and key."""
        if fmt == "raw":
            value = self.value or b""
            if not show_secrets:
                value = redact_raw(value)
            if not meta:
                return value + b"\n"
            key = b"" if self.key is None else self.key
            head = b"%s\t%d\t%d\t%d\t" % (
                self.topic.encode(),
                self.partition,
                self.offset,
                self.timestamp_ms,
            )
            return head + key + b"\t" + value + b"\n"
        line = self.json_line(show_secrets=show_secrets) if meta else None
        if fmt == "pretty":
            body = (
                orjson.loads(line)
                if line
                else orjson.loads(self.event_json(show_secrets=show_secrets))
            )
            return orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n"
        return line if line is not None else self.event_json(show_secrets=show_secrets) + b"\n"

    def __repr__(self) -> str:
        return f"<ReplayRecord {self.topic}:{self.partition}:{self.offset} {self.type}>"


def matches(
    rec: ReplayRecord,
    *,
    agent: str | None = None,
    type: str | None = None,
    correlation_id: str | None = None,
) -> bool:
    if agent is None and type is None and correlation_id is None:
        return True
    d = rec.data
    if d is None:
        return False
    if type is not None and d.get("type") != type:
        return False
    if correlation_id is not None and d.get("correlation_id") != correlation_id:
        return False
    if agent is not None:
        payload = d.get("payload")
        names = [d.get("source")]
        if isinstance(payload, dict):
            names += [payload.get(f) for f in AGENT_FIELDS]
        if agent not in names and (rec.key is None or rec.key.decode("utf-8", "replace") != agent):
            return False
    return True


#: what `tail` and `replay` print per record (`ReplayRecord.render`):
#: json   one JSON line: the event as it is on the wire (re-encoded from its redacted
#:        parse when it held a secret, line breaks, or a member named twice), or, for a
#:        record that is no
#:        event, {"error", "value_b64"}; with --meta {"topic", "partition", "offset",
#:        "timestamp_ms", "key", "event" | "error"+"value_b64"}
#: pretty the same JSON, indented
#: raw    the value's bytes as they are on the wire, one record per line; with --meta
#:        preceded by topic, partition, offset, timestamp_ms and key, tab-separated
OUTPUT_FORMATS = ("json", "pretty", "raw")


def parse_record(topic: str, rec: Any) -> ReplayRecord:
    value = rec.value
    data: dict[str, Any] | None = None
    error: str | None = None
    if value is None:
        error = "empty value (tombstone or null)"
    else:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            error = f"not JSON: {exc}"
        else:
            if isinstance(parsed, dict):
                data = parsed
            else:
                error = f"expected a JSON object, got {type(parsed).__name__}"
    return ReplayRecord(
        topic, rec.partition, rec.offset, rec.timestamp, rec.key, value, data, error
    )


@dataclass(frozen=True, slots=True)
class PartitionRange:
    tp: TopicPartition
    start: int  # first offset to read
    stop: int  # first offset not to read
    #: the partition's first retained offset and end offset when the range was planned
    begin: int = 0
    end: int = 0


@dataclass(frozen=True, slots=True)
class Gap:
    """Offsets [first, stop) of one partition that were deleted after the read planned
    its range and before it reached them (retention, `delete-records`, a log truncated
    under it): their records are missing from what was read."""

    topic: str
    partition: int
    first: int
    stop: int

    @property
    def offsets(self) -> int:
        return self.stop - self.first

    def describe(self) -> str:
        """One line, for the warning of a command (no newline)."""
        last = self.stop - 1
        where = f"offset {self.first}" if last == self.first else f"offsets {self.first}-{last}"
        return (
            f"{self.topic}:{self.partition} {where} ({self.offsets}) were deleted "
            "(retention or delete-records) before they could be read: their records are "
            "missing"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "first": self.first,
            "stop": self.stop,
        }


@dataclass(slots=True)
class Progress:
    """How far a read of whole topics has come: a plain counter that the readers update
    (`replay`, and the audit's verify, report and rebuild) and a progress bar only looks
    at (`streams.cli.progress`), so the counting is tested without a terminal.

    `total` is the sum of (stop offset - start offset) over the partitions planned so
    far: an upper bound on the records, since compaction, expired records and transaction
    markers leave offsets without one. Each read adds its partitions once it has fetched
    their end offsets, so one `Progress` can follow several reads in turn (its `total`
    then grows as they start). `done` counts the offsets of `total` consumed (offsets
    deleted before they were read included), `emitted` the records passed on (a replay's
    records after its filters), and `stage` names what is being read when a command
    reads several things in turn. `lost` lists the offsets a `replay` found deleted
    before it could read them (`Gap`): a command reports them, and its output lacks
    their records. `unreadable` counts the records skipped because the Kafka client
    could not parse them: the output lacks those too, and a command exits as for `lost`.
    """

    total: int = 0
    done: int = 0
    emitted: int = 0
    stage: str = ""
    lost: list[Gap] = field(default_factory=list)
    #: records the Kafka client could not parse, skipped (`replay_batches`, and the
    #: changelog read of `agents.audit.rebuild`)
    unreadable: int = 0

    def plan(self, spans: Iterable[int]) -> None:
        """Add the offset spans of partitions about to be read to `total`."""
        self.total += sum(max(0, n) for n in spans)

    def advance(self, n: int) -> None:
        """`n` more offsets of `total` consumed."""
        if n > 0:
            self.done += n

    @property
    def lost_offsets(self) -> int:
        return sum(g.offsets for g in self.lost)


class Stall:
    """When a read last moved, and whether it has stood still for `limit_s`. The clock is
    passed in (`loop.time()`), so the rule is tested without waiting."""

    __slots__ = ("limit_s", "since")

    def __init__(self, limit_s: float, now: float) -> None:
        self.limit_s = limit_s
        self.since = now

    def moved(self, now: float) -> None:
        self.since = now

    def left(self, now: float) -> float:
        return self.limit_s - (now - self.since)

    def stalled(self, now: float) -> bool:
        return self.left(now) <= 0


#: partitions a stall's message names (the rest are counted)
STALL_NAMED = 8
#: seconds one step of a read may overrun its stall limit before it is cut short: a step
#: normally returns within its 0.5 s fetch wait, so only an await that hangs (a position
#: the client waits for, offsets asked of a broker gone) ever reaches it
STALL_GRACE_S = 1.0


def stall_error(
    what: str,
    waiting: Mapping[TopicPartition, tuple[int, int]],
    seconds: float,
    last_complaint: str | None = None,
) -> BrokerError:
    """The error of a read that moved no more for `seconds`: `waiting` is {partition:
    (position, stop offset)} of the partitions it still waited for, `last_complaint` the
    client's last warning (`start_reader`). One line."""
    rows = sorted(waiting.items(), key=lambda kv: (kv[0].topic, kv[0].partition))
    named = ", ".join(
        f"{tp.topic}:{tp.partition} at offset {pos} of stop {stop}"
        for tp, (pos, stop) in rows[:STALL_NAMED]
    )
    if len(rows) > STALL_NAMED:
        named += f" and {len(rows) - STALL_NAMED} more partition(s)"
    # the client's own words, on the same line
    said = f"; the client's last complaint: {' '.join((last_complaint or '').split())}"
    return BrokerError(
        f"{what} made no progress for {seconds:g}s on {named or 'its partitions'}: the "
        "broker does not answer, or these partitions can no longer reach their stop "
        "offsets (AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S sets how long a read waits)"
        + (said if last_complaint else "")
    )


#: the last warning aiokafka logged in the tasks of a history reader (`start_reader`)
_COMPLAINTS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "agentstream_reader_complaints", default=None
)


class _KeepReaderComplaints(logging.Filter):
    """Keeps, instead of printing, the warnings and errors aiokafka logs in the tasks of
    a history reader (`start_reader`): with its broker gone, the fetcher logs a line for
    every fetch it tries (several a second) until the read's stall limit, while the
    read's own `BrokerError` says what happened, the last of those lines included."""

    def filter(self, record: logging.LogRecord) -> bool:
        kept = _COMPLAINTS.get()
        if kept is None or record.levelno < logging.WARNING:
            return True
        kept[:] = [record.getMessage()]
        return False


# logger filters see only the records of their own logger, not of its children
for _name in ("aiokafka", "aiokafka.conn", "aiokafka.consumer.fetcher"):
    logging.getLogger(_name).addFilter(_KeepReaderComplaints())


async def start_reader(consumer: AIOKafkaConsumer) -> list[str]:
    """Start a history reader's consumer in a context of its own: the tasks it starts
    (the fetcher, the connections) inherit it, and the warnings aiokafka logs in them are
    kept in the list returned (the last one) rather than printed, for `stall_error`."""
    kept: list[str] = []
    context = contextvars.copy_context()
    context.run(_COMPLAINTS.set, kept)
    await asyncio.get_running_loop().create_task(consumer.start(), context=context)
    return kept


def lost_range(position: int, begin: int, end: int, stop: int) -> tuple[int, int | None] | None:
    """A fetch at `position` failed out of range; the partition's log now holds [begin,
    end) and the read stops at `stop`. Returns (upto, resume): offsets [position, upto)
    are gone, and the read goes on at `resume` (None: nothing is left to read), or None
    when `position` is inside the log (the error was another partition's)."""
    if position < begin:
        upto = min(begin, stop)
        return upto, (begin if begin < stop else None)
    if position > end:  # the log was truncated below the position: the rest is gone
        return stop, None
    return None


async def _skip_deleted(
    consumer: AIOKafkaConsumer, stops: Mapping[TopicPartition, int]
) -> list[tuple[TopicPartition, Gap, int | None]]:
    """After an `OffsetOutOfRangeError`: each partition of `stops` ({tp: stop offset})
    whose position is outside its log now, the `Gap` of its deleted offsets and where it
    resumes (already sought there; None: it is read through). The consumer's position
    stays at the offset that failed (``auto_offset_reset="none"`` resets nothing), so
    the error's own contents are not needed."""
    tps = list(stops)
    begin = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)
    out: list[tuple[TopicPartition, Gap, int | None]] = []
    for tp in tps:
        position = await consumer.position(tp)
        found = lost_range(position, begin[tp], end[tp], stops[tp])
        if found is None:
            continue
        upto, resume = found
        if resume is not None:
            consumer.seek(tp, resume)
        out.append((tp, Gap(tp.topic, tp.partition, position, upto), resume))
    return out


async def stop_reader(consumer: AIOKafkaConsumer) -> None:
    """`consumer.stop()`, safe after the broker went away. aiokafka's `Fetcher.close`
    awaits the fetch tasks it has just cancelled without catching their CancelledError
    (aio-libs/aiokafka#647): with a request in flight — a broker that stopped answering —
    `stop()` raised CancelledError before it closed the client, and that error replaced
    the read's own (the stall's `BrokerError` never reached the command). Unless this task
    itself is being cancelled, the stray CancelledError is dropped and the client closed,
    the one step of `stop()` left undone."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        await consumer._client.close()


def _report_gap(progress: Progress | None) -> Callable[[Gap], None]:
    """Where a replay's gaps go: `progress.lost`, or a logged warning without one."""
    if progress is not None:
        return progress.lost.append
    return lambda gap: log.warning("%s", gap.describe())


def full_topic_names(settings: Settings, topics: Iterable[str]) -> list[str]:
    """Catalogue names get the settings' prefix; anything else is taken literally."""
    out = []
    for t in topics:
        t = t.strip()
        if t:
            out.append(settings.topic(t) if t in CATALOGUE else t)
    return out


def heap_key(raw: Any, source_index: int) -> tuple[int, int, int, int]:
    """Merge order of a fetched record: timestamp, then partition, then offset;
    `source_index` (topic position) breaks the tie between equal partitions of different
    topics."""
    return (raw.timestamp, raw.partition, source_index, raw.offset)


async def replay(
    settings: Settings,
    topics: Sequence[str] | str,
    since: str | datetime | int | None = None,
    until: str | datetime | int | None = "now",
    agent: str | None = None,
    type: str | None = None,
    correlation_id: str | None = None,
    *,
    buffer: int = 2000,
    include_invalid: bool = True,
    progress: Progress | None = None,
    now: datetime | None = None,
    on_unreadable: Callable[[str], None] | None = None,
) -> AsyncIterator[ReplayRecord]:
    """Yield the records of `topics` with timestamps in [since, until), in
    (timestamp, partition, offset) order. `since=None` = from the beginning.

    Undecodable records are yielded (with `.error`) when no filter is set and
    `include_invalid` — an audit wants to see them — and skipped otherwise. A record the
    Kafka client cannot parse (`streams.record_batches`) is skipped, never yielded: it is
    counted (`Progress.unreadable`) and described to `on_unreadable` (default: a
    warning in the log), and the read goes on. A batch's stand-in is reported whenever
    it overlaps the offset range, whatever its timestamp (module docstring).

    Offsets deleted before the read reached them go to `progress.lost` (without a
    `progress`, each is logged as a warning); a read that stops moving for
    `settings.kafka_connect_timeout_s` raises `BrokerError` (module docstring).
    """
    async for batch in replay_batches(
        settings,
        topics,
        since,
        until,
        agent,
        type,
        correlation_id,
        buffer=buffer,
        include_invalid=include_invalid,
        progress=progress,
        now=now,
        on_unreadable=on_unreadable,
    ):
        for rec in batch:
            yield rec


async def replay_batches(
    settings: Settings,
    topics: Sequence[str] | str,
    since: str | datetime | int | None = None,
    until: str | datetime | int | None = "now",
    agent: str | None = None,
    type: str | None = None,
    correlation_id: str | None = None,
    *,
    buffer: int = 2000,
    include_invalid: bool = True,
    progress: Progress | None = None,
    now: datetime | None = None,
    on_unreadable: Callable[[str], None] | None = None,
) -> AsyncIterator[list[ReplayRecord]]:
    """`replay` in runs of records (same order): one async step per run instead of one
    per record, which is what a replay to a file spends most of its time on."""
    # what the client cannot parse comes as stand-ins, skipped below, not as an error
    # that would end the read at that record
    record_batches.install(settings.max_decompressed_batch_bytes, settings.max_compression_ratio)
    report = on_unreadable or _warn_unreadable
    names = full_topic_names(settings, [topics] if isinstance(topics, str) else topics)
    if not names:
        raise ValueError("no topics to replay")
    since_ms = to_ms(parse_time(since, now=now)) if since is not None else None
    until_ms = to_ms(parse_time(until, now=now)) if until is not None else None
    if since_ms is not None and until_ms is not None and until_ms < since_ms:
        raise ValueError("--until is before --since")
    lo = since_ms if since_ms is not None else -(2**63)
    # `now` (every command's default) is the log's end when the read starts
    # (`plan_ranges`), not a time: no record is left out for a timestamp at or past this
    # host's clock. The broker's append time may run ahead of it (another host, or the
    # same millisecond), and on a topic that keeps the producer's clock a sender can
    # date its record ahead (tests/security/test_timestamp_attacks.py).
    until_now = until is None or (isinstance(until, str) and until.strip().lower() == "now")
    hi = 2**63 if until_now or until_ms is None else until_ms
    filtered = agent is not None or type is not None or correlation_id is not None
    keep_invalid = include_invalid and not filtered
    consumer = group_less_consumer(
        settings,
        "replay",
        max_partition_fetch_bytes=2 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
        # offsets deleted under the read fail the fetch instead of moving it silently to
        # the log's new start (`_skip_deleted` reports them)
        auto_offset_reset="none",
    )
    # a BrokerError naming the cause, within the connect timeout
    complaints = await start_reader(consumer)
    try:
        ranges = await plan_ranges(consumer, names, since_ms, until_ms)
        if progress is not None:
            progress.plan(r.stop - r.start for r in ranges)
        active = [r for r in ranges if r.stop > r.start]
        if not active:
            return
        consumer.assign([r.tp for r in active])
        for r in active:
            consumer.seek(r.tp, r.start)
        topic_index = {n: i for i, n in enumerate(names)}
        stop = {r.tp: r.stop for r in active}
        bufs: dict[TopicPartition, deque[Any]] = {r.tp: deque() for r in active}
        needy = set(stop)  # partitions whose next record must be fetched before merging
        heap: list[tuple[tuple[int, int, int, int], TopicPartition]] = []
        last_pos = {r.tp: r.start for r in active}
        lost = _report_gap(progress)
        loop = asyncio.get_running_loop()
        stall_s = settings.kafka_connect_timeout_s
        watch = Stall(stall_s, loop.time())
        while True:
            if needy:
                moved = False
                try:
                    async with asyncio.timeout(watch.left(loop.time()) + STALL_GRACE_S):
                        moved = await _fill(
                            consumer, needy, bufs, stop, last_pos, buffer, progress, lost
                        )
                except TimeoutError:
                    pass  # an await hung past the limit: stalled, below
                if moved:
                    watch.moved(loop.time())
                elif watch.stalled(loop.time()):
                    waiting = {tp: (last_pos[tp], stop[tp]) for tp in needy if tp in stop}
                    said = complaints[-1] if complaints else None
                    raise stall_error("replay", waiting, stall_s, said)
                for tp in list(needy):
                    if bufs[tp]:
                        heapq.heappush(heap, (heap_key(bufs[tp][0], topic_index[tp.topic]), tp))
                        needy.discard(tp)
                    elif tp not in stop:  # finished
                        needy.discard(tp)
                if needy:
                    continue
            if not heap:
                return
            _, tp = heapq.heappop(heap)
            buf = bufs[tp]
            part, ti, topic = tp.partition, topic_index[tp.topic], tp.topic
            # Emit the run of this partition that sorts before every other partition's
            # head: one heap operation per run, not per record.
            limit = heap[0][0] if heap else None
            run: list[ReplayRecord] = []
            while buf:
                raw = buf[0]
                if limit is not None:
                    ts = raw.timestamp
                    if ts > limit[0] or (ts == limit[0] and (ts, part, ti, raw.offset) > limit):
                        break
                buf.popleft()
                stand_in = unreadable(raw.value)
                if stand_in is not None:
                    # before the time filter: a batch's stand-in carries the batch's
                    # max timestamp, not its records' (`stand_in_in_time`)
                    if stand_in_in_time(stand_in, raw.timestamp, lo, hi):
                        if progress is not None:
                            progress.unreadable += 1
                        report(f"{topic}[{part}] {stand_in.describe()}")
                    continue
                if raw.timestamp < lo or raw.timestamp >= hi:
                    continue
                rec = parse_record(topic, raw)
                if rec.data is None and not keep_invalid:
                    continue
                if filtered and not matches(
                    rec, agent=agent, type=type, correlation_id=correlation_id
                ):
                    continue
                run.append(rec)
            if buf:
                raw = buf[0]
                heapq.heappush(heap, (heap_key(raw, ti), tp))
            elif tp in stop:
                needy.add(tp)
            if run:
                if progress is not None:
                    progress.emitted += len(run)
                yield run
                # the time the caller took with the run is no stall of the read
                watch.moved(loop.time())
    finally:
        await stop_reader(consumer)


def _warn_unreadable(text: str) -> None:
    log.warning("skipped a record the Kafka client cannot parse: %s", text)


def before_stop(record: Any, stop: int) -> bool:
    """Whether the fetched `record` belongs to a range that ends at `stop`. A batch's
    stand-in (`streams.record_batches`) sits at the batch's last offset but stands for
    the offsets from its first one: one that starts before `stop` holds offsets of the
    range, however far past it the batch ends (an `until` inside the batch), and is
    kept so that the reader reports it rather than dropping it unsaid."""
    if record.offset < stop:
        return True
    stand_in = unreadable(record.value)
    return stand_in is not None and stand_in.first_offset < stop


def stand_in_in_time(stand_in: Unreadable, timestamp: int, lo: int, hi: int) -> bool:
    """Whether a stand-in met within a read's offset range is in its time range
    [lo, hi): a record's stand-in carries the record's own timestamp and is filtered as
    the record would be; a batch's carries the batch's max timestamp, which says nothing
    of when its records were written, so it is always in (its offsets are the range's)."""
    return stand_in.whole_batch or lo <= timestamp < hi


async def _fill(
    consumer: AIOKafkaConsumer,
    needy: set[TopicPartition],
    bufs: dict[TopicPartition, deque[Any]],
    stop: dict[TopicPartition, int],
    last_pos: dict[TopicPartition, int],
    buffer: int,
    progress: Progress | None,
    lost: Callable[[Gap], None],
) -> bool:
    """Fetch for the partitions that ran dry. The others are not paused: aiokafka keeps
    at most one fetch response per partition in hand, which bounds memory already, and
    pausing would make it drop and fetch again what it had prefetched.

    Returns whether the read moved: a record fetched, a position moved, a partition read
    through, or deleted offsets skipped (`lost`)."""
    wanted = [tp for tp in needy if tp in stop]
    if not wanted:
        return True
    # Top up every partition with room, not only the dry ones, so that the fetcher
    # always has the next request in flight for each (it fetches for what is drained).
    room = [tp for tp in stop if len(bufs[tp]) < buffer]
    try:
        batch = await consumer.getmany(*room, timeout_ms=500, max_records=buffer * len(room))
    except OffsetOutOfRangeError:
        # raised only when no partition's records were drained before it: none is lost
        skipped = await _skip_deleted(consumer, {tp: stop[tp] for tp in room})
        for tp, gap, resume in skipped:
            lost(gap)
            if progress is not None:
                progress.advance(gap.stop - last_pos[tp])
            last_pos[tp] = gap.stop
            if resume is None:
                del stop[tp]
                consumer.pause(tp)
        return bool(skipped)
    moved = False
    for tp, records in batch.items():
        end = stop.get(tp)
        if end is None or not records:
            continue
        moved = True
        dq = bufs[tp]
        if records[-1].offset < end:
            dq.extend(records)
        else:
            dq.extend(r for r in records if before_stop(r, end))
        pos = records[-1].offset + 1
        if progress is not None:
            progress.advance(min(pos, end) - last_pos[tp])
        last_pos[tp] = pos
        if pos >= end:
            del stop[tp]
            consumer.pause(tp)
    # A range can end in transaction markers or aborted records that yield nothing (or
    # compacted offsets): the position moves past them without a record, and it is the
    # position reaching the stop offset that ends the partition.
    for tp in wanted:
        if tp in stop and not batch.get(tp):
            pos = await consumer.position(tp)
            if pos > last_pos[tp]:
                moved = True
                if progress is not None:
                    progress.advance(min(pos, stop[tp]) - last_pos[tp])
                last_pos[tp] = min(pos, stop[tp])
            if pos >= stop[tp]:
                del stop[tp]
                consumer.pause(tp)
    return moved


async def read_partition(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    start: int,
    stop: int,
    *,
    stall_s: float,
    what: str,
    progress: Progress | None = None,
    lost: Callable[[Gap], None] | None = None,
    complaints: Sequence[str] = (),
    max_records: int = 2000,
) -> AsyncGenerator[list[Any], None]:
    """The fetched records of [start, stop) of one partition, in offset order and in
    runs, with the consumer assigned to it alone (`audit verify` reads partition by
    partition). The consumer must reset no position (``auto_offset_reset="none"``).

    It ends when the consumer's position reaches `stop` (see the module docstring);
    `progress` is advanced by the offsets consumed. Offsets deleted before they were
    read go to `lost` as a `Gap` (ignored without it) and the read goes on from the
    log's new start; no record and no position moving for `stall_s` raise `BrokerError`
    (`what` names the reader in its message, with the last of `complaints`, what
    `start_reader` kept)."""
    if stop <= start:
        return
    consumer.assign([tp])
    consumer.seek(tp, start)
    loop = asyncio.get_running_loop()
    watch = Stall(stall_s, loop.time())
    counted = start  # offsets of [start, stop) consumed
    while True:
        records: list[Any] = []
        position = counted
        done = False
        try:
            async with asyncio.timeout(watch.left(loop.time()) + STALL_GRACE_S):
                try:
                    batch = await consumer.getmany(tp, timeout_ms=500, max_records=max_records)
                except OffsetOutOfRangeError:
                    for _tp, gap, resume in await _skip_deleted(consumer, {tp: stop}):
                        if lost is not None:
                            lost(gap)
                        position, done = gap.stop, resume is None
                else:
                    fetched = batch.get(tp, [])
                    records = [r for r in fetched if before_stop(r, stop)]
                    if len(records) < len(fetched):
                        position = stop  # fetched past the stop
                    else:
                        position = await consumer.position(tp)
        except TimeoutError:
            pass  # an await hung past the limit: stalled, below
        moved = bool(records) or position > counted
        if progress is not None and position > counted:
            progress.advance(min(position, stop) - counted)
        counted = max(counted, min(position, stop))
        if records:
            yield records
        if done or counted >= stop:
            return
        if moved:
            watch.moved(loop.time())  # after the yield: the caller's time is no stall
        elif watch.stalled(loop.time()):
            said = complaints[-1] if complaints else None
            raise stall_error(what, {tp: (counted, stop)}, stall_s, said)


#: an `until` less than this long ago counts as now (see `plan_ranges`)
UNTIL_NOW_SLACK_MS = 60_000


async def plan_ranges(
    consumer: AIOKafkaConsumer, topics: Sequence[str], since_ms: int | None, until_ms: int | None
) -> list[PartitionRange]:
    """Per partition: [first offset at/after since, first offset at/after until) ∩
    [begin, end). An `until` not in the past (`now`, the default of the commands,
    parsed when the command started: within `UNTIL_NOW_SLACK_MS`) is the end read here:
    on a topic that keeps the producer's clock (CreateTime: the catalogue's take the
    broker's, `streams.topics.TopicSpec.configs`), a record dated ahead would otherwise
    end the range at it, leaving every later record of the partition out (a forged chain
    record hidden from `audit verify` that way)."""
    tps: list[TopicPartition] = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise BrokerError(f"topic {topic} does not exist")
        tps += [TopicPartition(topic, p) for p in sorted(parts)]
    begin = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)
    starts = dict(begin)
    if since_ms is not None:
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            ot = found.get(tp)
            starts[tp] = ot.offset if ot is not None else end[tp]
    stops = dict(end)
    if until_ms is not None and until_ms < time.time() * 1000 - UNTIL_NOW_SLACK_MS:
        found = await consumer.offsets_for_times({tp: until_ms for tp in tps})
        for tp in tps:
            ot = found.get(tp)
            if ot is not None:
                stops[tp] = min(stops[tp], ot.offset)
    return [
        PartitionRange(tp, max(starts[tp], begin[tp]), stops[tp], begin[tp], end[tp]) for tp in tps
    ]


async def collect(settings: Settings, topics: Sequence[str] | str, **kw: Any) -> list[ReplayRecord]:
    """The whole replay as a list (for notebooks and small ranges)."""
    return [rec async for rec in replay(settings, topics, **kw)]


__all__ = [
    "Gap",
    "Progress",
    "ReplayRecord",
    "TimeParseError",
    "collect",
    "heap_key",
    "matches",
    "parse_time",
    "read_partition",
    "replay",
    "start_reader",
    "stop_reader",
]
