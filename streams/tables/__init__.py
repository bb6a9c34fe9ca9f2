"""Tables: the agents' state, and how each table is derived from its source topics.

Every table the agents keep is declared with a `TableSpec` whose `apply` is a *pure fold*
``(state, event) -> None`` over the events of its source topics. The agent uses the same
fold on the live Faust table, and `agentstream rebuild TABLE` replays the source topics
through it into a plain dict — so "rebuild from history" and "live state" cannot drift
apart without the digest comparison showing it.

Domain modules (`streams.tables.security`, `.llm`, `.monitoring` ...) declare their Faust
tables and register their specs here. Live tables are written only through `write`,
`delete` and `TableWriter` (`streams.tables.writer`), which send each changelog record to
the partition of the input being folded (or one derived from the key) instead of the
partition of Faust's "current event", which is wrong inside a batch and absent in a task.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from aiokafka.partitioner import murmur2

from agentstream.schemas import Event
from agentstream.schemas.errors import InvalidEvent
from agentstream.streams.settings import get_settings
from agentstream.streams.tables.writer import TableWriter, delete, write
from agentstream.streams.topics import CATALOGUE

__all__ = [
    "TABLES",
    "Fold",
    "FoldAt",
    "KeyHashPartitioner",
    "Origin",
    "TableSpec",
    "TableWriter",
    "delete",
    "digest",
    "home_partition",
    "key_hash",
    "misplaced",
    "origin_of",
    "rebuild",
    "refuse_misplaced",
    "register",
    "unexpired",
    "write",
]

Fold = Callable[[MutableMapping[str, Any], Event[Any]], None]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a source event's record was read: what a fold may know of the record besides
    the event. The live fold and a rebuild read the same record, so they see the same
    origin."""

    #: the catalogue name of the topic (without the prefix)
    topic: str
    partition: int
    offset: int
    #: the record's Kafka timestamp in seconds: on a catalogue topic the broker's append
    #: time (`LogAppendTime`), a clock no sender sets
    timestamp: float
    #: the record's key as it was sent
    key: bytes | None = None
    #: the topic's partition count (the configured one: a worker refuses to start on
    #: topics with another, `streams.admin.ensure_topics`)
    partitions: int = 1


#: keys longer than this are hashed each time, so that the cache stays small
CACHED_KEY_BYTES = 256


def key_hash(key: bytes | bytearray | memoryview) -> int:
    """murmur2 of a record key as Kafka's default partitioner takes it (its sign bit
    cleared): the key's partition is this modulo the topic's partition count. Cached:
    aiokafka's murmur2 is Python (~2 µs a key, more than the rest of a record's send),
    and the keys of a stream repeat (agent ids, series). The cache holds 16,384 `bytes`
    keys of up to `CACHED_KEY_BYTES` (under 7 MB); any other key, or a longer one, is
    hashed each time (a bytearray or memoryview cannot be a cache key, and aiokafka's
    send takes them)."""
    if type(key) is bytes and len(key) <= CACHED_KEY_BYTES:
        return _cached_hash(key)
    return int(murmur2(key)) & 0x7FFFFFFF


@lru_cache(maxsize=16_384)
def _cached_hash(key: bytes) -> int:
    return int(murmur2(key)) & 0x7FFFFFFF


class KeyHashPartitioner:
    """Kafka's default partitioner as aiokafka's `DefaultPartitioner` is (a key's murmur2
    modulo the partitions; no key: a random available partition), the key's hash from
    `key_hash`. The worker's producers use it (`producer_partitioner` in `streams.app`),
    and through them Faust's `key_partition`: every keyed record a worker sends is
    hashed."""

    def __call__(
        self,
        key: bytes | bytearray | memoryview | None,
        all_partitions: list[int],
        available: list[int],
    ) -> int:
        if key is None:
            return int(random.choice(available or all_partitions))
        return all_partitions[key_hash(key) % len(all_partitions)]


def home_partition(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner puts `key` in (murmur2, as Java's and
    aiokafka's; librdkafka's default, ``consistent_random``, is CRC32 and differs)."""
    return key_hash(key.encode()) % partitions


def misplaced(what: str, key: str, origin: Origin, keyed_by: str) -> str | None:
    """Why the record `what` read at `origin`, whose Kafka key must be `key`, is refused,
    or None.

    `agent.heartbeats` and `comms.records` are keyed by the agent id, `metrics.samples` by
    the series, and a table entry folded from a record is kept in the changelog partition
    of that record (`streams.tables.writer`): all records of one key must be in the
    partition the key hashes to. One sent under another key, or put in another
    partition, writes the same table key into a second changelog partition: two workers
    keep diverging copies of it, and a worker restoring both partitions keeps whichever
    it reads last (an attacker's one-sample window over a series' real one). For a
    heartbeat, a second worker would also judge the same agent (its status flapping
    between the two)."""
    if origin.key != key.encode():
        shown = origin.key[:64] if origin.key is not None else None
        return f"{what} sent with the key {shown!r}: {keyed_by} (key mismatch)"
    home = home_partition(key, origin.partitions)
    if origin.partition != home:
        return (
            f"{what} read from partition {origin.partition}: its key hashes to partition "
            f"{home} (topic has {origin.partitions} partitions: partitions added to it "
            "since the workers started, or a producer whose partitioner is not Kafka's "
            "default, murmur2; set partitioner=murmur2_random on a librdkafka producer)"
        )
    return None


def refuse_misplaced(what: str, key: str, origin: Origin, keyed_by: str, type_: str) -> None:
    """Raise `InvalidEvent` (a fold's refusal: the live worker's dead letter, a rebuild's
    skip) when `misplaced` finds the record misplaced."""
    problem = misplaced(what, key, origin, keyed_by)
    if problem is not None:
        raise InvalidEvent(problem, type=type_)


def origin_of(msg: Any, name: str) -> Origin:
    """The `Origin` of the record `msg` (a Faust message) of catalogue topic `name`: what a
    rebuild reads of it too (`agents.audit.rebuild.source_records`)."""
    return Origin(
        topic=name,
        partition=msg.partition,
        offset=msg.offset,
        timestamp=msg.timestamp,
        key=msg.key,
        partitions=CATALOGUE[name].partitions or get_settings().topic_partitions,
    )


#: a fold that also needs where each record was read (its partition, offset, append time)
FoldAt = Callable[[MutableMapping[str, Any], Event[Any], Origin], None]


@dataclass(frozen=True)
class TableSpec:
    #: Faust table name (its changelog topic is `<app_id>-<name>-changelog`)
    name: str
    #: catalogue topics the table is derived from
    sources: tuple[str, ...]
    #: pure fold applying one source event to the state (or `apply_at`)
    apply: Fold | None = None
    description: str = ""
    #: event types the fold consumes (others on the source topics are ignored)
    types: frozenset[str] = field(default_factory=frozenset)
    #: a retention: ``(value, now) -> True`` when the live table may already have
    #: dropped the entry at epoch time `now`; comparisons with a rebuild leave such
    #: entries out on both sides (the fold keeps everything)
    expired: Callable[[Any, float], bool] | None = None
    #: instead of `apply`: a pure fold of one source event and its record's `Origin`
    apply_at: FoldAt | None = None
    #: what of a value comparisons and checkpoint digests look at (None: all of it), for
    #: values that carry bookkeeping besides the state they describe
    comparable: Callable[[Any], Any] | None = None

    def comparable_items(self, items: Iterable[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """`items` as comparisons with a rebuild and checkpoint digests see them."""
        see = self.comparable
        if see is None:
            return list(items)
        return [(k, see(v)) for k, v in items]

    def __post_init__(self) -> None:
        if (self.apply is None) == (self.apply_at is None):
            raise ValueError(f"table {self.name!r}: give it one fold, apply or apply_at")

    def fold(
        self, state: MutableMapping[str, Any], event: Event[Any], origin: Origin | None = None
    ) -> None:
        """Apply one source event (read at `origin`) to `state`."""
        if self.apply_at is not None:
            if origin is None:
                raise TypeError(f"table {self.name!r}: its fold needs each record's origin")
            self.apply_at(state, event, origin)
        elif self.apply is not None:
            self.apply(state, event)


TABLES: dict[str, TableSpec] = {}


def register(spec: TableSpec) -> TableSpec:
    if spec.name in TABLES and TABLES[spec.name] is not spec:
        raise ValueError(f"table {spec.name!r} declared twice")
    TABLES[spec.name] = spec
    return spec


def digest(items: Iterable[tuple[Any, Any]]) -> str:
    """Order-independent sha256 of a table's items (keys as strings, values as JSON)."""
    h = hashlib.sha256()
    for key, value in sorted(
        ((str(k), orjson.dumps(v, option=orjson.OPT_SORT_KEYS)) for k, v in items),
        key=lambda kv: kv[0],
    ):
        h.update(key.encode())
        h.update(b"\x00")
        h.update(value)
        h.update(b"\x01")
    return h.hexdigest()


def unexpired(spec: TableSpec, state: dict[str, Any], now: float) -> dict[str, Any]:
    """`state` without the entries `spec`'s retention lets go of by `now`."""
    expired = spec.expired
    if expired is None:
        return state
    return {k: v for k, v in state.items() if not expired(v, now)}


def rebuild(
    spec: TableSpec, events: Iterable[Event[Any] | tuple[Event[Any], Origin]]
) -> dict[str, Any]:
    """Fold source events (in log order), each with its record's `Origin` for a table
    whose fold needs it, into a fresh state dict."""
    state: dict[str, Any] = {}
    for item in events:
        event, origin = item if isinstance(item, tuple) else (item, None)
        if not spec.types or event.type in spec.types:
            spec.fold(state, event, origin)
    return state
