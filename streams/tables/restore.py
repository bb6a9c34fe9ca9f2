"""Table recovery in bulk: changelogs read by a dedicated consumer and applied a fetch at
a time, before Faust's per-record recovery takes over for whatever is left.

Faust restores an active table partition by resuming the changelog partition on the
worker's own consumer: every record goes through the delivery loop, the conductor, a
decoded `Event`, the changelog queue and `Recovery._slurp_changelogs`, which checks after
each one whether recovery has ended (a pass over every partition). That is 50-200 µs a
record — a worker with a few million table entries took minutes to come back.

Here, once Faust has asked the broker where each active changelog partition ends
(`Recovery._build_highwaters`) and where its reading starts (`_build_offsets`), a plain
aiokafka consumer (no group; `read_committed` under exactly-once, so it stops at the
same last stable offset Faust's recovery reads up to) fetches those partitions in large
batches. Each fetched batch is decoded with the changelog topic's own schema — what
Faust's conductor would do — and applied with the table's `apply_changelog_batch`, the
call Faust's recovery makes with its buffered events. After each batch the partition's
start offset (`active_offsets`) moves to the last offset applied, so Faust's seek and
`need_recovery` see the work as done; a partition read to its end moves to its end.

Invariants
----------
1. Faust's recovery starts from where this one stopped, never beyond an offset whose
   record was applied: `active_offsets[tp]` is set after the batch holding it was
   applied, in the same synchronous step. Stopped at any await (a rebalance cancels it
   through `Recovery._wait`, a stop, the time budget), the rest is Faust's.
2. Only what Faust would apply is applied: records above the start offset and below the
   end Faust read from the broker (the highwater), decoded by the changelog topic's
   schema, applied per table in offset order within each partition.
3. Anything unexpected — a decode error, a table with an ``on_changelog_event`` callback,
   a store other than memory, a client error — ends the bulk read for that partition
   (or all of them), and Faust's recovery reads what is left record by record.
4. The bulk read has a time budget below Faust's own timeout for the step it runs in
   (`broker_request_timeout`), which covers the whole step, Faust's own start-offset
   lookup included: past it, Faust goes on from the offsets reached. (Past Faust's
   timeout, its recovery would stop for good and the worker stay paused.)
5. A rebalance during the bulk read (`Recovery.on_rebalance` signals a new recovery;
   Faust cancels this step a few loop turns later) ends it at once: nothing more is
   applied and no start offset is noted, least of all for a partition that left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP

log = logging.getLogger(__name__)

#: records a changelog fetch may return; 4 MiB a partition, like the worker's consumer
FETCH_MAX_RECORDS = 20_000
PARTITION_FETCH_BYTES = 4 * 1024 * 1024


class _Record:
    """What `Store.apply_changelog_batch` reads of a Faust changelog event: the decoded
    key and value, and the message's raw value (None: a tombstone) and partition. The
    record is its own message."""

    __slots__ = ("key", "message", "partition", "value")

    def __init__(self, key: Any, value: Any, partition: int) -> None:
        self.key = key
        self.value = value
        self.partition = partition
        self.message = self


class _Raw:
    """A fetched record as the schema's loads_key/loads_value read it."""

    __slots__ = ("key", "value")

    def __init__(self, key: bytes | None, value: bytes | None) -> None:
        self.key = key
        self.value = value


def bulk_capable(table: Any) -> bool:
    """Tables this restore applies to: a memory store (its `apply_changelog_batch` is a
    dict update) and no per-event changelog callback, which only Faust's path calls."""
    from faust.stores.memory import Store

    return isinstance(table.data, Store) and not getattr(table, "_on_changelog_event", None)


def decode_batch(app: Any, table: Any, partition: int, records: list[Any]) -> list[_Record]:
    """Fetched changelog records as the events Faust's conductor would make of them."""
    loads_key, loads_value = _decoders(app, table)
    return [
        _Record(
            loads_key(rec.key),
            None if rec.value is None else loads_value(rec.value),
            partition,
        )
        for rec in records
    ]


def _decoders(app: Any, table: Any) -> tuple[Any, Any]:
    """The changelog topic schema's key and value decoding as two functions of the raw
    bytes. Faust's path (schema -> registry -> codec lookup -> payload preparation) costs
    ~10 µs a record, most of the restore's time; for the codecs and types our tables
    use the same result is computed directly (`tests/unit/test_table_restore.py` checks
    it against Faust's own decoding for every table), anything else takes Faust's path."""
    schema = table.changelog_topic.schema
    registry = app.serializers

    def key_by_faust(raw: bytes | None) -> Any:
        return schema.loads_key(app, _Raw(raw, None), loads=registry.loads_key)

    def value_by_faust(raw: bytes | None) -> Any:
        return schema.loads_value(app, _Raw(None, raw), loads=registry.loads_value)

    return (
        _direct(schema.key_serializer or registry.key_serializer, schema.key_type, registry)
        or key_by_faust,
        _direct(schema.value_serializer or registry.value_serializer, schema.value_type, registry)
        or value_by_faust,
    )


def _direct(serializer: Any, typ: Any, registry: Any) -> Any:
    """Faust's `loads(typ, raw, serializer)` for a plain codec name and type, or None."""
    from faust.serializers import codecs
    from faust.utils import json as faust_json
    from mode.utils.compat import want_str

    if not isinstance(serializer, str):
        return None
    codec = codecs.get_codec(serializer)
    if type(codec) is codecs.raw and typ is str:
        return want_str
    if type(codec) is not codecs.json or faust_json.orjson is None:
        return None
    # Faust's json codec is orjson's loads of the text, then `_prepare_payload(typ, ...)`
    loads = orjson.loads
    if typ is None:
        reconstruct = registry.Model._maybe_reconstruct
        return lambda raw: reconstruct(loads(raw))
    if typ is str:
        return lambda raw: want_str(loads(raw))
    if typ is int:
        return lambda raw: int(want_str(loads(raw)))
    return None


async def restore_in_bulk(
    recovery: Any,
    tps: set[TP],
    offsets: Any,
    highwaters: Any,
    *,
    budget_s: float,
) -> int:
    """Read the active changelog partitions `tps` from `offsets[tp] + 1` up to
    `highwaters[tp]` (the last offset, Faust's meaning) into their tables; returns the
    number of records applied. `offsets` is updated as records are applied."""
    app = recovery.app
    todo = {
        tp: recovery.tp_to_table[tp]
        for tp in tps
        if tp in recovery.tp_to_table
        and highwaters.get(tp) is not None
        and highwaters[tp] >= 0
        and (offsets.get(tp) if offsets.get(tp) is not None else -1) < highwaters[tp]
        and bulk_capable(recovery.tp_to_table[tp])
    }
    if not todo:
        return 0
    from agentstream.streams.kafka_security import new_consumer

    settings = app.agentstream_settings
    consumer = new_consumer(
        settings,
        "table restore consumer",
        enable_auto_commit=False,
        isolation_level="read_committed" if app.in_transaction else "read_uncommitted",
        max_partition_fetch_bytes=PARTITION_FETCH_BYTES,
        fetch_max_bytes=len(todo) * PARTITION_FETCH_BYTES,
        auto_offset_reset="earliest",
    )
    applied = 0
    started = time.monotonic()
    deadline = started + budget_s
    # Faust's end offsets, read once: a rebalance (`Recovery.on_rebalance`) drops a
    # revoked partition's entry, and its Counter then reads 0 for it
    lasts = {tp: highwaters[tp] for tp in todo}
    rebalanced = recovery.signal_recovery_start.is_set

    def gone(tp: TP) -> bool:
        # a rebalance since this restore started: Faust cancels it a few loop turns
        # later, and meanwhile nothing more may be applied or noted (invariant 5)
        return rebalanced() or tp not in recovery.active_tps

    try:
        await consumer.start()
        ktps = {tp: _kafka_tp(tp) for tp in todo}
        consumer.assign(list(ktps.values()))
        for tp, ktp in ktps.items():
            start = offsets.get(tp)
            consumer.seek(ktp, 0 if start is None or start < 0 else start + 1)
        by_ktp = {ktp: tp for tp, ktp in ktps.items()}
        while todo and time.monotonic() < deadline:
            fetched = await consumer.getmany(
                *[ktps[tp] for tp in todo],
                timeout_ms=200,
                max_records=FETCH_MAX_RECORDS,
            )
            if rebalanced():
                break
            for ktp, records in fetched.items():
                tp = by_ktp[ktp]
                table = todo.get(tp)
                if table is None:
                    continue
                if gone(tp):
                    del todo[tp]
                    continue
                last = lasts[tp]
                wanted = [r for r in records if r.offset <= last]
                if not wanted:
                    continue
                try:
                    batch = decode_batch(app, table, tp.partition, wanted)
                except Exception as exc:
                    # Faust's path decides what to do with it (invariant 3)
                    log.warning(
                        "bulk restore of %s stopped at a record it cannot decode: %r", tp, exc
                    )
                    del todo[tp]
                    continue
                table.apply_changelog_batch(batch)
                offsets[tp] = wanted[-1].offset
                applied += len(batch)
            for tp in list(todo):
                # Read to its end: under read_committed the last records may be
                # transaction markers or aborted records, never returned; the position
                # moves past them all the same.
                position = await consumer.position(ktps[tp])
                if gone(tp):
                    del todo[tp]
                elif position > lasts[tp]:
                    offsets[tp] = lasts[tp]
                    del todo[tp]
        if todo:
            log.info(
                "bulk restore: time budget of %.0f s spent, %d partition(s) left to "
                "Faust's recovery",
                budget_s,
                len(todo),
            )
    finally:
        await consumer.stop()
    elapsed = time.monotonic() - started
    if applied:
        log.info(
            "bulk restore: %d changelog record(s) applied in %.2f s (%.0f/s)",
            applied,
            elapsed,
            applied / max(elapsed, 1e-6),
        )
    return applied


def _kafka_tp(tp: TP) -> Any:
    from aiokafka import TopicPartition

    return TopicPartition(tp.topic, tp.partition)


class BulkRestoringRecovery(Recovery):
    """Faust's recovery, with the active changelog partitions first restored in bulk
    (module docstring) once their start offsets are built."""

    async def _build_offsets(self, consumer: Any, tps: Any, destination: Any, title: str) -> None:
        # Faust waits for this whole step at most broker_request_timeout (`_wait`; past
        # it its recovery stops for good): the bulk read gets half of it, less what
        # Faust's own start-offset lookup took, and is cut off at that, whatever it
        # waits for (invariant 4); what is left is read by Faust's own path.
        started = time.monotonic()
        await super()._build_offsets(consumer, tps, destination, title)
        if title != "active" or not tps:
            return
        budget = float(self.app.conf.broker_request_timeout) / 2 - (time.monotonic() - started)
        if budget < 1.0:
            self.log.info("bulk restore skipped: the start offsets took %.0f s", budget)
            return
        try:
            await asyncio.wait_for(
                restore_in_bulk(
                    self, set(tps), destination, self.active_highwaters, budget_s=budget
                ),
                # the loop's own deadline, plus the consumer's start and stop
                timeout=budget + min(10.0, budget / 2),
            )
        except TimeoutError:
            self.log.warning("bulk restore cut off after %.0f s; Faust's recovery goes on", budget)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Faust's recovery reads the rest (invariant 3)
            self.log.warning("bulk restore failed, Faust's recovery goes on: %r", exc)


class BulkRestoringTableManager(TableManager):
    """Faust's table manager, its recovery a `BulkRestoringRecovery`."""

    @property
    def recovery(self) -> Recovery:
        current: Recovery | None = self._recovery  # type: ignore[has-type]
        if current is None:
            current = self._recovery = BulkRestoringRecovery(
                self.app, self, beacon=self.beacon, loop=self.loop
            )
        return current


__all__ = ["BulkRestoringRecovery", "BulkRestoringTableManager", "restore_in_bulk"]
