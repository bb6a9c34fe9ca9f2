"""Records aiokafka cannot parse, handed on as stand-ins instead of failing the fetch.

A producer controls every byte of the record batches it writes, and the broker accepts
some that aiokafka then cannot read: a header key that is not UTF-8 (the broker decodes
header keys leniently, aiokafka's parser raises `UnicodeDecodeError`), a codec whose
decoder is missing (`UnsupportedCodecError`), anything else its parser refuses. aiokafka
raises such an error out of `getmany` on every fetch of the partition, without saying
which record it was: a worker crashed on it, restarted from the same uncommitted offset
and crashed again (a poison pill that moved from worker to worker), and every reader of
the topic stopped there.

`install` (once per process; the worker's transport and the CLI's readers) makes the
fetcher hand on, in place of what it cannot parse, a *stand-in*: an ordinary
`ConsumerRecord` whose value is an `Unreadable` (bytes: what could be kept of the
original, with the reason and the offsets it covers), so that each reader decides what
to do with it (`unreadable`): the worker's agents dead-letter it
(`streams.processing.decoded_batches`), the CLI's readers report and skip it.

* A record that does not parse alone (a header key that is not UTF-8, a key or value
  deserializer that raised) is a stand-in at its own offset: its value bytes, its key.
* A batch whose records cannot be found (the codec, a record that does not parse
  structurally) is one stand-in from the first offset not handed on yet to the batch's
  last offset, AT the last offset, its value the raw batch as the broker sent it. The
  offsets before it hold no record the reader will ever see: the consumer counts them
  as done like any offsets without a record (`streams.delivery`, 7), and only together
  with a later acked offset, so that a commit covers the range once the stand-in itself
  is acked (dead-lettered); a crash before that fetches the batch again, and the same
  stand-in (same offset, same dead letter id) comes back.
* The records of the batch that do parse are handed on unchanged, in offset order with
  the stand-ins: aiokafka's parser stops at the first failure, and the rest of the
  batch is parsed here (`salvage`, record format v2).
* A batch whose checksum does not match is left to aiokafka (it raises, as before): that
  is corruption on the way, not a record a producer wrote (the broker checks the CRC).

A compressed batch is decompressed within a limit (`install`'s `max_decompressed_bytes`,
AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES): aiokafka's parsers (the C extension's and the
pure-Python ones, record format v2 and the legacy one) are given decoders that stop
there (`bounded_decode`) instead of aiokafka's own, which decompress the whole batch in
memory. A producer can write a batch of a few kilobytes that decompresses to tens of
gigabytes (zstd reaches 32,000:1, gzip 1,000:1): decompressed whole, it took the reader's
memory, and the worker restarted onto the same batch. A batch may also decompress to no
more than AGENTSTREAM_MAX_COMPRESSION_RATIO times its size (but always to 64 KiB): under
the limit alone, thousands of 3 KB batches of one 60 MiB record each would wait in the
stream's buffer at once (`batch_limit`). Past either it is an unreadable batch like any
other: one stand-in.

The stand-in's type, not a header, marks it: a producer can forge any header but cannot
make a value of a Python type. Nothing is dropped here: every offset of the partition is
either a record, a stand-in, or an offset aiokafka itself skips (control batches,
aborted transactions, compaction).
"""

from __future__ import annotations

import gzip
import io
import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class Unreadable(bytes):
    """The value of a stand-in record: the original bytes that could be kept (a record's
    value, or the whole raw record batch), `reason`, and the offsets it stands for
    (`first_offset`..`last_offset`; the stand-in's own offset is the last)."""

    reason: str
    first_offset: int
    last_offset: int
    #: the bytes are the raw record batch (compressed, if it was), not a record's value
    whole_batch: bool

    def __new__(
        cls,
        raw: bytes,
        *,
        reason: str,
        first_offset: int,
        last_offset: int,
        whole_batch: bool = False,
    ) -> Unreadable:
        self = super().__new__(cls, raw)
        self.reason = reason
        self.first_offset = first_offset
        self.last_offset = last_offset
        self.whole_batch = whole_batch
        return self

    def describe(self) -> str:
        """`offset N` or `offsets A..B`, then the reason."""
        span = (
            f"offset {self.last_offset}"
            if self.first_offset == self.last_offset
            else f"offsets {self.first_offset}..{self.last_offset}"
        )
        return f"{span}: {self.reason}"


def unreadable(value: object) -> Unreadable | None:
    """The `Unreadable` a stand-in record carries as its value, else None."""
    return value if isinstance(value, Unreadable) else None


# -- the record format v2 (KIP-98), parsed leniently -------------------------------------

#: baseOffset int64, batchLength int32, partitionLeaderEpoch int32, magic int8, crc uint32,
#: attributes int16, lastOffsetDelta int32, firstTimestamp int64, maxTimestamp int64,
#: producerId int64, producerEpoch int16, baseSequence int32, recordCount int32
_HEADER = struct.Struct(">qiibIhiqqqhii")
_CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}
_LOG_APPEND_TIME = 1


class BatchUnparseable(ValueError):
    """The rest of a record batch cannot be split into records."""


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record of a batch as `salvage` found it: header keys as bytes."""

    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[bytes, bytes | None], ...]


@dataclass(frozen=True, slots=True)
class BatchInfo:
    base_offset: int
    last_offset: int
    magic: int
    codec: int
    timestamp_type: int
    first_timestamp: int
    max_timestamp: int

    @property
    def codec_name(self) -> str:
        return _CODECS.get(self.codec, f"codec {self.codec}")


def batch_info(raw: bytes) -> BatchInfo:
    """The header fields of a record batch (`raw`: the whole batch, as fetched). A
    legacy message set (magic 0 or 1) has no such header: only its first offset is read,
    and it counts as one offset."""
    if len(raw) < 17:
        raise BatchUnparseable(f"record batch of {len(raw)} bytes")
    base, _length, _epoch, magic = struct.unpack_from(">qiib", raw)
    if magic < 2 or len(raw) < _HEADER.size:
        return BatchInfo(base, base, magic, -1, 0, -1, -1)
    (_, _, _, _, _, attributes, last_delta, first_ts, max_ts, *_rest) = _HEADER.unpack_from(raw)
    return BatchInfo(
        base_offset=base,
        last_offset=base + last_delta,
        magic=magic,
        codec=attributes & 0x07,
        timestamp_type=(attributes >> 3) & 1,
        first_timestamp=first_ts,
        max_timestamp=max_ts,
    )


def _decompress(codec: int, data: bytes) -> bytes:
    if codec == 0:
        return data
    if codec not in _BOUNDED:
        raise BatchUnparseable(f"unknown compression codec {codec}")
    return bounded_decode(codec, data, _limit[0], _ratio[0])


# -- decompression within a limit ------------------------------------------------------

#: the setting that bounds what one record batch may decompress to (`Settings`)
MAX_DECOMPRESSED_VARIABLE = "AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES"
#: its default: a batch is at most max.message.bytes (1 MiB) compressed, and JSON events
#: compress far less than 64:1 (docs/configuration.md)
DEFAULT_MAX_DECOMPRESSED_BATCH_BYTES = 64 * 1024 * 1024
#: the setting that bounds what one record batch may decompress to relative to its size
MAX_RATIO_VARIABLE = "AGENTSTREAM_MAX_COMPRESSION_RATIO"
#: its default: repetitive JSON events compress 11:1 (snappy) to 35:1 (gzip) in a full
#: batch, far less in a small one (docs/configuration.md)
DEFAULT_MAX_COMPRESSION_RATIO = 100
#: what any batch may decompress to whatever its size: a batch of one small event is
#: never refused for its ratio. It also bounds what the smallest batches (~70 bytes) can
#: make a reader hold: 16,384 buffered records of at most this size, 1 GiB, where without
#: the ratio they could each be the whole limit (a 60 MiB record in 3 KB of zstd)
RATIO_FLOOR = 64 * 1024
#: the process's limit and ratio, set by `install` (lists: one value each, shared with
#: the decoders)
_limit = [DEFAULT_MAX_DECOMPRESSED_BATCH_BYTES]
_ratio = [DEFAULT_MAX_COMPRESSION_RATIO]
#: cramjam's message when the output does not fit the buffer given to `decompress_into`
#: (a contract, tests/unit/test_upgrade_contracts.py): told apart from corrupt data
_BUFFER_FULL = "failed to write whole buffer"
#: the first buffer a zstd or lz4 batch is decompressed into, at least, and its growth
_FIRST_BUFFER = 64 * 1024
_GROWTH = 4
#: the xerial snappy framing's header (marker, "SNAPPY", version 1, compatible 1), as
#: aiokafka's `snappy_decode` recognises it
_XERIAL_HEADER = b"\x82SNAPPY\x00" + struct.pack("!ii", 1, 1)


class DecompressedTooLarge(BatchUnparseable):
    """A compressed record batch decompresses to more than the limit: it is not
    decompressed further. `why` names the setting that made the limit."""

    def __init__(self, codec: str, limit: int, why: str = MAX_DECOMPRESSED_VARIABLE) -> None:
        super().__init__(f"{codec} batch decompresses to more than {limit:,} bytes ({why})")
        self.codec = codec
        self.limit = limit


def batch_limit(compressed: int, limit: int, ratio: int | None) -> tuple[int, str]:
    """What a batch of `compressed` bytes may decompress to, and the setting that says
    so: `limit`, or less, `ratio` times its size (at least `RATIO_FLOOR`). The limit
    alone bounds one batch; the ratio bounds what many small batches can make a reader
    hold at once (each record waits in the stream's buffer until it is processed)."""
    if ratio is None:
        return limit, MAX_DECOMPRESSED_VARIABLE
    by_ratio = max(RATIO_FLOOR, ratio * compressed)
    if by_ratio < limit:
        return by_ratio, (
            f"{ratio} times the batch's {compressed:,} bytes of compressed records: "
            f"{MAX_RATIO_VARIABLE}"
        )
    return limit, MAX_DECOMPRESSED_VARIABLE


def _gzip_bounded(data: bytes, limit: int) -> bytes:
    """aiokafka's `gzip_decode` (`gzip.GzipFile.read`) within `limit`: the same reader,
    asked for one byte past the limit. It decompresses in bounded steps and reads every
    member of the stream, skipping zero padding, in time linear in the input (a loop
    over members that sliced off what was left took minutes for 4 MiB of empty
    members)."""
    with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as reader:
        out = reader.read(limit + 1)
    if len(out) > limit:
        raise DecompressedTooLarge("gzip", limit)
    return out


def _snappy_bounded(data: bytes, limit: int) -> bytes:
    """aiokafka's `snappy_decode` within `limit`: the xerial framing (a header, then
    blocks each with its length) or one raw block. Snappy cannot exceed about 21:1, so a
    1 MiB batch stays small anyway (a check after decoding would do); but a raw block
    states its decompressed length up front, which the decoder sizes its output by, so
    each block's stated length is checked against what is left before it is decoded."""
    import cramjam

    view = memoryview(data)
    if len(view) > len(_XERIAL_HEADER) and view[: len(_XERIAL_HEADER)] == _XERIAL_HEADER:
        blocks = []
        pos = len(_XERIAL_HEADER)
        while pos < len(view):
            (size,) = struct.unpack_from("!i", view, pos)
            pos += 4
            if size < 0 or pos + size > len(view):
                raise BatchUnparseable(f"snappy block of {size} bytes past the batch's end")
            blocks.append(view[pos : pos + size])
            pos += size
    else:
        blocks = [view]
    out = bytearray()
    for block in blocks:
        if cramjam.snappy.decompress_raw_len(block) > limit - len(out):
            raise DecompressedTooLarge("snappy", limit)
        out += cramjam.snappy.decompress_raw(block)
    return bytes(out)


def _framed_bounded(codec: str, data: bytes, limit: int) -> bytes:
    """A zstd or lz4 frame (or frames) decompressed into a buffer that grows `_GROWTH`
    times while it is too small, up to `limit`: cramjam writes into a given buffer
    without allocating the output itself, and says so when it does not fit."""
    import cramjam

    decompress_into = (
        cramjam.zstd.decompress_into if codec == "zstd" else cramjam.lz4.decompress_into
    )
    size = min(limit, max(_FIRST_BUFFER, 8 * len(data)))
    while True:
        buffer = bytearray(size)
        try:
            n = decompress_into(data, buffer)
        except cramjam.DecompressionError as exc:
            if _BUFFER_FULL not in str(exc):
                raise
            if size >= limit:
                raise DecompressedTooLarge(codec, limit) from None
            size = min(limit, size * _GROWTH)
            del buffer  # before the next one: never two buffers held at once
            continue
        # the output is copied once more: a batch read to the limit holds twice it, for
        # as long as the copy takes (docs/configuration.md)
        return bytes(memoryview(buffer)[:n])


def _zstd_bounded(data: bytes, limit: int) -> bytes:
    return _framed_bounded("zstd", data, limit)


def _lz4_bounded(data: bytes, limit: int) -> bytes:
    return _framed_bounded("lz4", data, limit)


_BOUNDED: dict[int, Callable[[bytes, int], bytes]] = {
    1: _gzip_bounded,
    2: _snappy_bounded,
    3: _lz4_bounded,
    4: _zstd_bounded,
}


def bounded_decode(codec: int, data: Any, limit: int, ratio: int | None = None) -> bytes:
    """`data` of the codec `codec` (1 gzip .. 4 zstd) decompressed, as aiokafka's
    decoders do, but never past `limit` bytes, nor past `ratio` times its size (with
    its floor, `batch_limit`): `DecompressedTooLarge` then; corrupt data (or a codec
    whose library is missing) is `BatchUnparseable`."""
    raw = bytes(data)
    allowed, why = batch_limit(len(raw), limit, ratio)
    try:
        return _BOUNDED[codec](raw, allowed)
    except DecompressedTooLarge as exc:
        raise DecompressedTooLarge(exc.codec, allowed, why) from None
    except BatchUnparseable:
        raise
    except Exception as exc:  # a missing library, corrupt data
        raise BatchUnparseable(
            f"cannot decompress ({_CODECS[codec]}): {type(exc).__name__}: {exc}"
        ) from exc


def _aiokafka_decoder(codec: int) -> Callable[[Any], bytes]:
    """A stand-in for aiokafka's decoder of `codec`, within the process's limit."""

    def decode(data: Any) -> bytes:
        return bounded_decode(codec, data, _limit[0], _ratio[0])

    decode.__name__ = f"bounded_{_CODECS[codec]}_decode"
    decode._agentstream_bounded = True  # type: ignore[attr-defined]
    return decode


#: the module globals aiokafka's record parsers call (C extension and pure Python)
_DECODER_GLOBALS = {"gzip_decode": 1, "snappy_decode": 2, "lz4_decode": 3, "zstd_decode": 4}
_PARSER_MODULES = (
    "aiokafka.record.default_records",
    "aiokafka.record._crecords.default_records",
    "aiokafka.record.legacy_records",
    "aiokafka.record._crecords.legacy_records",
)


def _bound_parsers() -> None:
    """Give aiokafka's record parsers the bounded decoders: each looks its decoder up as
    a global of its module at each call (the C extension too, a contract tested in
    tests/unit/test_record_batches.py)."""
    import importlib

    for name in _PARSER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # aiokafka built without its C extension
            continue
        for attribute, codec in _DECODER_GLOBALS.items():
            if hasattr(module, attribute):
                setattr(module, attribute, _aiokafka_decoder(codec))


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint (at most 10 bytes) at `pos`: (value, next position)."""
    result = shift = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise BatchUnparseable("record ends inside a varint")
        b = buf[pos + i]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos + i + 1
        shift += 7
    raise BatchUnparseable("varint longer than 10 bytes")


def _bytes(buf: bytes, pos: int, end: int) -> tuple[bytes | None, int]:
    n, pos = _varint(buf, pos)
    if n < 0:
        return None, pos
    if pos + n > end:
        raise BatchUnparseable("field runs past its record")
    return bytes(buf[pos : pos + n]), pos + n


def parse_records(raw: bytes) -> Iterator[RawRecord]:
    """The records of the v2 record batch `raw`, in order, header keys as bytes; raises
    `BatchUnparseable` where the rest cannot be split into records (a codec that cannot
    be decoded, a record whose fields do not add up to its length)."""
    info = batch_info(raw)
    if info.magic != 2 or len(raw) < _HEADER.size:
        raise BatchUnparseable(f"record batch of magic {info.magic}: not parsed here")
    body = _decompress(info.codec, bytes(raw[_HEADER.size :]))
    pos = 0
    while pos < len(body):
        length, pos = _varint(body, pos)
        end = pos + length
        if length < 0 or end > len(body):
            raise BatchUnparseable(f"record length {length} past the batch's end")
        pos += 1  # attributes (unused)
        ts_delta, pos = _varint(body, pos)
        offset_delta, pos = _varint(body, pos)
        key, pos = _bytes(body, pos, end)
        value, pos = _bytes(body, pos, end)
        count, pos = _varint(body, pos)
        if count < 0:
            raise BatchUnparseable(f"negative header count {count}")
        headers: list[tuple[bytes, bytes | None]] = []
        for _ in range(count):
            h_key, pos = _bytes(body, pos, end)
            if h_key is None:
                raise BatchUnparseable("header key of negative length")
            h_value, pos = _bytes(body, pos, end)
            headers.append((h_key, h_value))
        if pos != end:
            raise BatchUnparseable(f"record of {length} bytes holds {length + pos - end}")
        timestamp = (
            info.max_timestamp
            if info.timestamp_type == _LOG_APPEND_TIME
            else info.first_timestamp + ts_delta
        )
        yield RawRecord(
            info.base_offset + offset_delta,
            timestamp,
            info.timestamp_type,
            key,
            value,
            tuple(headers),
        )


def _undecodable_header(record: RawRecord) -> str | None:
    for key, _ in record.headers:
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            return f"header key {key[:64]!r} is not UTF-8"
    return None


@dataclass(frozen=True, slots=True)
class Salvaged:
    """What `salvage` found at one offset: a record that parses (`record`, header keys
    decodable) or a stand-in (`record` is what is known of it, `stand_in` its value)."""

    record: RawRecord
    stand_in: Unreadable | None = None


def salvage(raw: bytes, from_offset: int, error: BaseException) -> Iterator[Salvaged]:
    """The records of the batch `raw` at or after `from_offset`, after aiokafka failed on
    it with `error`: those that parse, a stand-in for each that does not alone, and one
    stand-in (at the batch's last offset, its value `raw`) for the rest of the batch from
    where it cannot be split into records."""
    info = batch_info(raw)
    where = f"record batch {info.base_offset}..{info.last_offset} ({info.codec_name})"
    cause = f"{type(error).__name__}: {error}"
    first = max(from_offset, info.base_offset)
    try:
        if isinstance(error, DecompressedTooLarge):
            # refused before any of its records: decompressing it again says nothing new
            raise error
        for record in parse_records(raw):
            if record.offset < first:
                continue  # handed on before aiokafka's parser failed
            first = record.offset + 1
            bad = _undecodable_header(record)
            if bad is None:
                yield Salvaged(record)
                continue
            stand_in = Unreadable(
                record.value or b"",
                reason=f"{bad} ({where})",
                first_offset=record.offset,
                last_offset=record.offset,
            )
            yield Salvaged(record, stand_in)
    except BatchUnparseable as exc:
        if first > info.last_offset:
            return
        reason = f"{where} unreadable from offset {first}: {exc}"
        if exc is not error:
            reason += f"; the client: {cause}"
        stand_in = Unreadable(
            raw, reason=reason, first_offset=first, last_offset=info.last_offset, whole_batch=True
        )
        record = RawRecord(
            info.last_offset, info.max_timestamp, info.timestamp_type, None, None, ()
        )
        yield Salvaged(record, stand_in)


# -- the hook in aiokafka's fetcher ------------------------------------------------------


def _memory_records_class() -> type:
    from aiokafka.record.memory_records import MemoryRecords

    class RawMemoryRecords(MemoryRecords):
        """aiokafka's fetched message set, keeping its bytes: `current` is the batch
        `next_batch` returned last, with where it lies in `raw`."""

        def __init__(self, data: bytes) -> None:
            super().__init__(data)
            self.raw = data
            self._at = 0
            self.current: tuple[Any, int, int] | None = None

        def next_batch(self, *args: Any) -> Any:
            self.current = None
            batch = super().next_batch(*args)
            if batch is not None:
                start = self._at
                (length,) = struct.unpack_from(">i", self.raw, start + 8)
                self._at = start + 12 + length
                self.current = (batch, start, self._at)
            return batch

    return RawMemoryRecords


def _stand_in_record(tp: Any, record: RawRecord, stand_in: Unreadable) -> Any:
    from aiokafka.structs import ConsumerRecord

    return ConsumerRecord(
        tp.topic,
        tp.partition,
        record.offset,
        record.timestamp,
        record.timestamp_type,
        record.key,
        stand_in,
        None,
        len(record.key) if record.key is not None else -1,
        len(stand_in),
        (),
    )


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A salvaged record as aiokafka's `PartitionRecords._consumer_record` reads one."""

    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    checksum: None = None


def _salvaged_records(partition_records: Any, raw: bytes, error: BaseException) -> Iterator[Any]:
    """`salvage` as aiokafka's consumer records, moving `next_fetch_offset` along."""
    tp = partition_records._tp
    for found in salvage(raw, partition_records.next_fetch_offset, error):
        record, stand_in = found.record, found.stand_in
        if stand_in is None:
            parsed = _Parsed(
                record.offset,
                record.timestamp,
                record.timestamp_type,
                record.key,
                record.value,
                tuple((k.decode("utf-8"), v) for k, v in record.headers),
            )
            try:
                out = partition_records._consumer_record(tp, parsed)
            except Exception as exc:  # the consumer's key or value deserializer
                stand_in = Unreadable(
                    record.value or b"",
                    reason=f"not deserializable: {type(exc).__name__}: {exc}",
                    first_offset=record.offset,
                    last_offset=record.offset,
                )
            else:
                partition_records.next_fetch_offset = record.offset + 1
                yield out
                continue
        log.warning(
            "%s[%d] %s: handed on as an unreadable stand-in",
            tp.topic,
            tp.partition,
            stand_in.describe(),
        )
        partition_records.next_fetch_offset = record.offset + 1
        yield _stand_in_record(tp, record, stand_in)


def _crc_valid(batch: Any) -> bool:
    try:
        return bool(batch.validate_crc())
    except Exception:  # a legacy batch without a CRC check: not the reason it failed
        return True


def _tolerant_unpack(original: Callable[[Any], Iterator[Any]]) -> Callable[[Any], Iterator[Any]]:
    def _unpack_records(self: Any) -> Iterator[Any]:
        records = self._records
        while True:
            try:
                yield from original(self)
                return
            except Exception as exc:
                current = getattr(records, "current", None)
                if current is None:
                    raise  # not inside a batch (the message set itself), or not ours
                batch, start, end = current
                records.current = None
                if not _crc_valid(batch):
                    raise  # corrupted on the way: aiokafka's error, as before
                if getattr(batch, "is_control_batch", False):
                    # the broker writes these (commit and abort markers): salvaged, an abort
                    # marker would be handed on as data and its producer's later committed
                    # batches skipped as aborted; a failure here is not a producer's doing
                    raise
                yield from _salvaged_records(self, bytes(records.raw[start:end]), exc)
                self.next_fetch_offset = max(self.next_fetch_offset, batch.next_offset)
                # and on with the next batch: aiokafka's generator is restarted, its state
                # (the message set's position, aborted producers) lives on `self`

    _unpack_records._agentstream_tolerant = True  # type: ignore[attr-defined]
    _unpack_records.__wrapped__ = original  # type: ignore[attr-defined]
    return _unpack_records


def install(
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BATCH_BYTES,
    max_ratio: int = DEFAULT_MAX_COMPRESSION_RATIO,
) -> None:
    """Make every aiokafka consumer of this process hand on stand-ins for what it cannot
    parse, and decompress no batch past `max_decompressed_bytes` nor past `max_ratio`
    times its size (`batch_limit`; module docstring). Idempotent; the limits are the
    process's, the last call's."""
    from aiokafka.consumer import fetcher

    if max_decompressed_bytes < 1:
        raise ValueError(f"max_decompressed_bytes must be positive, not {max_decompressed_bytes}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be positive, not {max_ratio}")
    _limit[0] = max_decompressed_bytes
    _ratio[0] = max_ratio
    if getattr(fetcher.PartitionRecords._unpack_records, "_agentstream_tolerant", False):
        return
    _bound_parsers()
    fetcher.MemoryRecords = _memory_records_class()
    fetcher.PartitionRecords._unpack_records = _tolerant_unpack(
        fetcher.PartitionRecords._unpack_records
    )
