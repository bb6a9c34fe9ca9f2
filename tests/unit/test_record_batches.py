"""Stand-ins for what aiokafka cannot parse (`streams.record_batches`): aiokafka's own
fetcher classes fed crafted record batches, no broker."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import pytest
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from agentstream.streams import record_batches
from agentstream.streams.record_batches import (
    BatchUnparseable,
    Unreadable,
    parse_records,
    salvage,
    unreadable,
)

TP = TopicPartition("t", 0)
PLACEHOLDER = b"BADKEY!!"
NOT_UTF8 = b"\xff\xfe" * 4


def _crc(buf: bytearray) -> None:
    struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))


def batch(base: int, n: int, *, bad: Iterable[int] = (), codec: int = 0) -> bytes:
    """A v2 batch of `n` records at `base` (values b"v<offset>"), those at the indexes
    `bad` with a header key that is not UTF-8, the CRC made to match."""
    bad = set(bad)
    b = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i in range(n):
        key = PLACEHOLDER.decode() if i in bad else "ok"
        b.append(i, timestamp=1000 + i, key=b"k", value=b"v%d" % (base + i), headers=[(key, b"h")])
    buf = bytearray(b.build())
    struct.pack_into(">q", buf, 0, base)
    while (at := buf.find(PLACEHOLDER)) > 0:
        buf[at : at + len(PLACEHOLDER)] = NOT_UTF8
    _crc(buf)
    return bytes(buf)


def zstd_flagged(base: int, n: int) -> bytes:
    """An uncompressed batch whose attributes say zstd: what a client without the codec
    (or any decoder) fails on, the CRC recomputed so that only the codec is wrong."""
    buf = bytearray(batch(base, n))
    (attributes,) = struct.unpack_from(">h", buf, 21)
    struct.pack_into(">h", buf, 21, (attributes & ~0x07) | 4)
    _crc(buf)
    return bytes(buf)


def fetch(data: bytes, fetch_offset: int = 0) -> tuple[list[Any], Any]:
    """What aiokafka's fetcher makes of a fetched message set, the hook installed."""
    record_batches.install()
    records = fetcher.PartitionRecords(
        TP, fetcher.MemoryRecords(data), None, fetch_offset, None, None, True, 0
    )
    return list(records), records


def test_a_header_key_that_is_not_utf8_is_a_stand_in_at_its_offset_and_the_rest_goes_on() -> None:
    got, records = fetch(batch(0, 3, bad=[1]) + batch(3, 2))
    assert [r.offset for r in got] == [0, 1, 2, 3, 4]
    assert [unreadable(r.value) is None for r in got] == [True, False, True, True, True]
    stand_in = unreadable(got[1].value)
    assert stand_in is not None
    assert bytes(stand_in) == b"v1" and got[1].key == b"k"
    assert (stand_in.first_offset, stand_in.last_offset) == (1, 1)
    assert "not UTF-8" in stand_in.reason and "record batch 0..2" in stand_in.reason
    assert got[2].value == b"v2" and got[2].headers == (("ok", b"h"),)
    assert got[2].timestamp == 1002
    assert records.next_fetch_offset == 5


def test_every_bad_record_of_a_batch_gets_its_own_stand_in() -> None:
    got, _ = fetch(batch(10, 5, bad=[0, 3, 4]))
    assert [r.offset for r in got] == [10, 11, 12, 13, 14]
    assert [unreadable(r.value) is not None for r in got] == [True, False, False, True, True]


def test_a_fetch_from_inside_the_batch_starts_there() -> None:
    got, _ = fetch(batch(0, 4, bad=[1]), fetch_offset=2)
    assert [(r.offset, unreadable(r.value) is None) for r in got] == [(2, True), (3, True)]


def test_a_batch_that_cannot_be_decoded_is_one_stand_in_at_its_last_offset() -> None:
    raw = zstd_flagged(5, 4)
    got, records = fetch(batch(0, 5) + raw + batch(9, 1))
    assert [r.offset for r in got] == [0, 1, 2, 3, 4, 8, 9]
    stand_in = unreadable(got[5].value)
    assert stand_in is not None
    assert bytes(stand_in) == raw  # the batch as fetched
    assert (stand_in.first_offset, stand_in.last_offset) == (5, 8)
    assert "record batch 5..8 (zstd)" in stand_in.reason
    assert stand_in.describe().startswith("offsets 5..8: ")
    assert got[6].value == b"v9"
    assert records.next_fetch_offset == 10


def test_a_refetch_of_an_undecodable_batch_makes_the_same_stand_in_from_where_it_starts() -> None:
    raw = zstd_flagged(5, 4)
    got, _ = fetch(raw, fetch_offset=7)
    assert [r.offset for r in got] == [8]
    stand_in = unreadable(got[0].value)
    assert stand_in is not None and (stand_in.first_offset, stand_in.last_offset) == (7, 8)


def test_a_batch_stand_in_says_it_holds_the_whole_batch() -> None:
    got, _ = fetch(zstd_flagged(5, 4))
    stand_in = unreadable(got[0].value)
    assert stand_in is not None and stand_in.whole_batch
    one, _ = fetch(batch(0, 3, bad=[1]))
    record_stand_in = unreadable(one[1].value)
    assert record_stand_in is not None and not record_stand_in.whole_batch


def test_a_control_batch_that_fails_is_not_salvaged() -> None:
    """Commit and abort markers are the broker's: handed on as data, an abort marker
    would be a record, and its producer's later committed batches skipped as aborted."""

    class Control:
        is_control_batch = True

        def validate_crc(self) -> bool:
            return True

    class Failing:
        def __init__(self) -> None:
            self._records = type("Raw", (), {"current": (Control(), 0, 0), "raw": b""})()

    def original(self: Any) -> Any:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        yield  # a generator, as aiokafka's

    unpack = record_batches._tolerant_unpack(original)
    with pytest.raises(UnicodeDecodeError):
        list(unpack(Failing()))


def test_a_batch_whose_crc_does_not_match_still_fails_as_before() -> None:
    buf = bytearray(batch(0, 2, bad=[1]))
    buf[-1] ^= 0xFF  # corrupted after the CRC was computed: not what a producer wrote
    with pytest.raises(CorruptRecordException):
        fetch(bytes(buf))


def test_a_deserializer_that_raises_makes_a_stand_in_too() -> None:
    record_batches.install()

    def value(v: bytes) -> str:
        if v == b"v1":
            raise ValueError("no")
        return v.decode()

    records = fetcher.PartitionRecords(
        TP, fetcher.MemoryRecords(batch(0, 3)), None, 0, None, value, True, 0
    )
    got = list(records)
    assert [r.value for r in got][::2] == ["v0", "v2"]
    stand_in = unreadable(got[1].value)
    assert stand_in is not None and "not deserializable" in stand_in.reason


def test_records_aiokafka_parses_are_untouched() -> None:
    got, _ = fetch(batch(0, 3) + batch(3, 3, codec=1))  # gzip
    assert [r.value for r in got] == [b"v%d" % i for i in range(6)]
    assert all(type(r.value) is bytes for r in got)


def test_parse_records_reads_what_aiokafka_writes() -> None:
    got = list(parse_records(batch(7, 3, bad=[2])))
    assert [(r.offset, r.key, r.value, r.timestamp) for r in got] == [
        (7, b"k", b"v7", 1000),
        (8, b"k", b"v8", 1001),
        (9, b"k", b"v9", 1002),
    ]
    assert got[2].headers == ((NOT_UTF8, b"h"),)


def test_parse_records_refuses_a_record_that_runs_past_its_length() -> None:
    buf = bytearray(batch(0, 2))
    buf[61] = 0x7E  # the first record's length varint: 63, far past the batch's end
    with pytest.raises(BatchUnparseable):
        list(parse_records(bytes(buf)))


def test_salvage_stands_in_for_the_rest_once_records_cannot_be_found() -> None:
    buf = bytearray(batch(0, 3))
    # the second record's length varint made huge: records 1 and 2 cannot be split
    first_len = buf[61] // 2  # zigzag, one byte
    buf[61 + 1 + first_len] = 0x7E
    found = list(salvage(bytes(buf), 0, ValueError("boom")))
    assert [(f.record.offset, f.stand_in is None) for f in found] == [(0, True), (2, False)]
    stand_in = found[1].stand_in
    assert stand_in is not None and (stand_in.first_offset, stand_in.last_offset) == (1, 2)
    assert "ValueError: boom" in stand_in.reason


def test_only_the_type_marks_a_stand_in() -> None:
    assert unreadable(b"anything") is None
    value = Unreadable(b"x", reason="r", first_offset=3, last_offset=3)
    assert unreadable(value) is value and value == b"x"
    assert value.describe() == "offset 3: r"
