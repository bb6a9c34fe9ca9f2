"""Rebuild a table from its source topics and compare it with the live table.

The rebuild folds every event of the table's source topics, from the oldest retained
record, through the table's own pure fold (`TableSpec.apply`, via `streams.tables.rebuild`)
into a dict. The live state is read from the table's changelog topic
(`<app_id>-<table>-changelog`, latest record per key, tombstones delete), which works
without a running worker. Both sides are read with isolation_level=read_committed, so
records of aborted exactly-once transactions count on neither.

A record the Kafka client cannot parse (`streams.record_batches`), on a source or on the
changelog, is skipped on that side: it is counted (`Progress.unreadable`) and described
to `on_unreadable` (default: a warning in the log), and the command exits 3 — this host
may lack a codec the workers had, so what they folded may be missing from the rebuild.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import TopicPartition

from agentstream.schemas import Event
from agentstream.schemas.errors import InvalidEvent, SchemaError
from agentstream.streams import record_batches
from agentstream.streams.admin import topic_names
from agentstream.streams.client import group_less_consumer, listed_partitions
from agentstream.streams.errors import BrokerError
from agentstream.streams.record_batches import unreadable
from agentstream.streams.replay import Progress, replay
from agentstream.streams.settings import Settings, SettingsError
from agentstream.streams.tables import TABLES, Origin, TableSpec, digest, unexpired

log = logging.getLogger(__name__)

#: what is told of a record the Kafka client cannot parse (its topic, partition, offsets
#: and why, `Unreadable.describe`)
OnUnreadable = Callable[[str], None]


class UnknownTable(LookupError):
    pass


def changelog_topic(settings: Settings, table: str) -> str:
    return changelog_topic_of(settings.app_id, table)


def no_changelog_problem(app_id: str, tables: Iterable[str], listed: set[str]) -> str | None:
    """The one line `rebuild --all` ends with when none of `tables` has its changelog
    among the `listed` topics (None when one has). Tables a worker folds for itself have
    none, so a table without one proves nothing; but with none at all, nothing live was
    compared: the app id is not the workers' (changelogs carry it, not the topic prefix),
    or no worker of it has run. Said before any source topic is read."""
    names = sorted(tables)
    if not names or any(changelog_topic_of(app_id, t) in listed for t in names):
        return None
    return (
        f"AGENTSTREAM_APP_ID={app_id!r}: no table changelog of this app id on the cluster "
        f"(expected topics {app_id}-<table>-changelog, such as "
        f"{changelog_topic_of(app_id, names[0])!r}, which its workers create): set the "
        "workers' app id, or start a worker first; nothing was compared"
    )


def changelog_topic_of(app_id: str, table: str) -> str:
    return f"{app_id}-{table}-changelog"


async def require_a_changelog(settings: Settings, tables: Iterable[str]) -> None:
    """A `SettingsError` (`no_changelog_problem`) when no table of `tables` has a changelog
    on the cluster."""
    problem = no_changelog_problem(settings.app_id, tables, await topic_names(settings))
    if problem is not None:
        raise SettingsError(problem, field="app_id")


def spec_for(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        known = ", ".join(sorted(TABLES)) or "none registered"
        raise UnknownTable(f"unknown table {name!r} (known: {known})") from None


async def source_events(
    settings: Settings,
    spec: TableSpec,
    progress: Progress | None = None,
    on_unreadable: OnUnreadable | None = None,
) -> AsyncIterator[Event[Any]]:
    """The decodable events of the table's sources (`source_records`, without origins)."""
    async for event, _origin in source_records(settings, spec, progress, on_unreadable):
        yield event


async def source_records(
    settings: Settings,
    spec: TableSpec,
    progress: Progress | None = None,
    on_unreadable: OnUnreadable | None = None,
) -> AsyncIterator[tuple[Event[Any], Origin]]:
    """The decodable events of the table's sources, each partition in log order, with
    where each was read (`Origin`: what the live fold knows of the record).

    Records the live agent dead-letters are skipped, so that they reach neither fold:
    those that do not decode (the producer limits included, `ReplayRecord.checked_event`),
    those larger than `max_event_bytes`, and those of a type their topic does not carry
    (a heartbeat on agent.status). What the fold itself refuses (`InvalidEvent`) is
    skipped by `_fold_into`."""
    from agentstream.streams.topics import CATALOGUE

    carried = {
        settings.topic(name): CATALOGUE[name].events for name in spec.sources if name in CATALOGUE
    }
    names = {settings.topic(name): name for name in spec.sources}
    configured = {
        name: (CATALOGUE[name].partitions if name in CATALOGUE else None)
        or settings.topic_partitions
        for name in spec.sources
    }
    # the topics' own counts, not this host's setting: the live worker only runs with
    # the setting equal to them (`ensure_topics`), and an auditor configured otherwise
    # placed agents by another count, refusing most heartbeats as misplaced
    # (asked only for a fold that takes the origin: the others never read the count)
    if spec.apply_at is not None:
        configured |= await topic_partitions(settings, list(spec.sources))
    counts = configured
    async for rec in replay(
        settings,
        list(spec.sources),
        since=None,
        until=None,
        include_invalid=False,
        progress=progress,
        on_unreadable=on_unreadable,
    ):
        if spec.types and rec.type not in spec.types:
            continue
        if rec.type not in carried.get(rec.topic, (rec.type,)):
            continue
        if rec.value is not None and len(rec.value) > settings.max_event_bytes:
            continue
        try:
            event = rec.checked_event()
        except SchemaError:
            continue
        name = names.get(rec.topic, rec.topic)
        yield (
            event,
            Origin(
                topic=name,
                partition=rec.partition,
                offset=rec.offset,
                # what Faust gives the live fold: the record's milliseconds / 1000
                timestamp=rec.timestamp_ms / 1000.0,
                key=rec.key,
                partitions=counts.get(name, settings.topic_partitions),
            ),
        )


async def topic_partitions(settings: Settings, names: list[str]) -> dict[str, int]:
    """The partition count of each existing topic among `names` (catalogue names)."""
    from agentstream.streams.admin import list_topics

    full = {settings.topic(n): n for n in names}
    return {
        full[t.name]: t.partitions
        for t in await list_topics(settings)
        if t.name in full and t.exists and t.partitions
    }


async def rebuild_from_history(
    settings: Settings,
    spec: TableSpec,
    progress: Progress | None = None,
    on_unreadable: OnUnreadable | None = None,
) -> dict[str, Any]:
    """What `streams.tables.rebuild` computes, folded as the events stream in so that
    memory holds the state, not the history."""
    state: dict[str, Any] = {}
    chunk: list[tuple[Event[Any], Origin]] = []
    async for item in source_records(settings, spec, progress, on_unreadable):
        chunk.append(item)
        if len(chunk) >= 1000:
            _fold_into(state, spec, chunk)
            chunk = []
    _fold_into(state, spec, chunk)
    return state


def _fold_into(
    state: dict[str, Any],
    spec: TableSpec,
    events: list[Event[Any]] | list[tuple[Event[Any], Origin]],
) -> None:
    for item in events:
        event, origin = item if isinstance(item, tuple) else (item, None)
        if not spec.types or event.type in spec.types:
            try:
                spec.fold(state, event, origin)
            except InvalidEvent:
                continue  # the live fold refused it too: a dead letter, no table change


def _changelog_value(raw: bytes) -> Any:
    """A changelog record's value; one that is not JSON (written by something else than a
    worker) is kept as a marker, so that its key shows as differing rather than the
    command ending in a traceback."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"undecodable_changelog_value": raw[:64].decode("utf-8", "replace")}


def decode_key(raw: bytes | None) -> str:
    if raw is None:
        return ""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
    return value if isinstance(value, str) else raw.decode("utf-8", "replace")


async def read_changelog(
    settings: Settings,
    table: str,
    *,
    timeout_s: float = 30,
    progress: Progress | None = None,
    on_unreadable: OnUnreadable | None = None,
) -> dict[str, Any]:
    """The table as its changelog says: last value per key, None values delete (empty
    when no worker has created the changelog yet). A record the Kafka client cannot
    parse is skipped, counted and told (module docstring)."""
    return await _read_changelog(settings, table, timeout_s, progress, on_unreadable) or {}


async def _read_changelog(
    settings: Settings,
    table: str,
    timeout_s: float,
    progress: Progress | None = None,
    on_unreadable: OnUnreadable | None = None,
) -> dict[str, Any] | None:
    topic = changelog_topic(settings, table)
    # what the client cannot parse comes as a stand-in instead of failing every fetch
    record_batches.install(settings.max_decompressed_batch_bytes, settings.max_compression_ratio)
    consumer = group_less_consumer(settings, "rebuild")
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or await listed_partitions(consumer, topic)
        if not parts:
            return None
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        counted = await consumer.beginning_offsets(tps)  # offsets consumed up to, per tp
        if progress is not None:
            progress.plan(end[tp] - counted[tp] for tp in tps)
        state: dict[str, Any] = {}
        pending = {tp for tp in tps if end[tp] > counted[tp]}
        deadline = time.monotonic() + timeout_s
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=5000)
            for tp, recs in batch.items():
                for rec in recs:
                    if rec.offset >= end[tp]:
                        break
                    stand_in = unreadable(rec.value)
                    if stand_in is not None:
                        # neither a value nor a delete: what the key holds is not known
                        if progress is not None:
                            progress.unreadable += 1
                        told = f"{topic}[{tp.partition}] {stand_in.describe()}"
                        (on_unreadable or _warn_unreadable)(told)
                        continue
                    key = decode_key(rec.key)
                    if rec.value is None:
                        state.pop(key, None)
                    else:
                        state[key] = _changelog_value(rec.value)
            for tp in list(pending):
                position = min(await consumer.position(tp), end[tp])
                if progress is not None:
                    progress.advance(position - counted[tp])
                counted[tp] = max(counted[tp], position)
                if position >= end[tp]:
                    pending.discard(tp)
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic} took longer than {timeout_s}s")
        return state
    finally:
        await consumer.stop()


def _warn_unreadable(text: str) -> None:
    log.warning("skipped a changelog record the Kafka client cannot parse: %s", text)


@dataclass
class Comparison:
    table: str
    rebuilt_digest: str
    live_digest: str
    rebuilt_size: int
    live_size: int
    #: False when the table has no changelog topic (nothing live to compare with)
    live_available: bool = True
    differing_keys: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.rebuilt_digest == self.live_digest

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "equal": self.equal,
            "rebuilt_digest": self.rebuilt_digest,
            "live_digest": self.live_digest,
            "rebuilt_size": self.rebuilt_size,
            "live_size": self.live_size,
            # without it a table with no changelog read as compared (and "equal" against
            # an empty live table); the chaos checker reads it to skip such tables
            "live_available": self.live_available,
            "differing_keys": self.differing_keys,
        }


def diff_keys(a: dict[str, Any], b: dict[str, Any], limit: int = 20) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k)][:limit]


async def compare(
    settings: Settings,
    name: str,
    progress: Progress | None = None,
    on_unreadable: OnUnreadable | None = None,
) -> Comparison:
    """Rebuild table `name` and compare it with its changelog; `progress` counts the
    offsets of both reads (its `stage` names the table) and the records of either the
    Kafka client cannot parse, each described to `on_unreadable`."""
    spec = spec_for(name)
    if progress is not None:
        progress.stage = name
    rebuilt = await rebuild_from_history(settings, spec, progress, on_unreadable)
    found = await _read_changelog(settings, name, 30, progress, on_unreadable)
    live = found or {}
    # a table with a retention: what the worker may already have deleted is left out
    # on both sides (the same clock for both)
    now = time.time()
    rebuilt, live = unexpired(spec, rebuilt, now), unexpired(spec, live, now)
    rebuilt = dict(spec.comparable_items(rebuilt.items()))
    live = dict(spec.comparable_items(live.items()))
    return Comparison(
        table=name,
        rebuilt_digest=digest(rebuilt.items()),
        live_digest=digest(live.items()),
        rebuilt_size=len(rebuilt),
        live_size=len(live),
        live_available=found is not None,
        differing_keys=diff_keys(rebuilt, live) if found is not None else [],
    )


async def compare_all(
    settings: Settings,
    names: Iterable[str] | None = None,
    *,
    progress: Progress | None = None,
    on_unreadable: OnUnreadable | None = None,
) -> list[Comparison]:
    """`compare` for each table of `names` (None: every registered table), in turn: with
    `progress`, the total grows as each table's reads start."""
    return [await compare(settings, n, progress, on_unreadable) for n in (names or sorted(TABLES))]
