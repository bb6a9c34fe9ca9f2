"""Stand-ins for what aiokafka cannot parse (`streams.record_batches`): aiokafka's own
fetcher classes fed crafted record batches, no broker."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cramjam
import pytest
from aiokafka import codec as codecs
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from agentstream.streams import record_batches
from agentstream.streams.record_batches import (
    DEFAULT_MAX_COMPRESSION_RATIO,
    DEFAULT_MAX_DECOMPRESSED_BATCH_BYTES,
    RATIO_FLOOR,
    BatchUnparseable,
    DecompressedTooLarge,
    Unreadable,
    batch_limit,
    bounded_decode,
    parse_records,
    salvage,
    unreadable,
)
from tests.support import REPO

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


MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _default_limit() -> Iterator[None]:
    yield
    record_batches.install()  # a test's own limit is not the next test's


def fetch(
    data: bytes,
    fetch_offset: int = 0,
    *,
    limit: int = DEFAULT_MAX_DECOMPRESSED_BATCH_BYTES,
    ratio: int = DEFAULT_MAX_COMPRESSION_RATIO,
) -> tuple[list[Any], Any]:
    """What aiokafka's fetcher makes of a fetched message set, the hook installed."""
    record_batches.install(max_decompressed_bytes=limit, max_ratio=ratio)
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


# -- decompression within a limit -------------------------------------------------------


def zeros_zstd(n: int) -> bytes:
    """One zstd frame of `n` zero bytes, made without holding them (a bomb: 200 MiB is
    about 6 KB)."""
    compressor = cramjam.zstd.Compressor(level=3)
    chunk = bytes(MiB)
    for _ in range(n // MiB):
        compressor.compress(chunk)
    compressor.compress(bytes(n % MiB))
    return bytes(compressor.finish())


def compressed_batch(base: int, codec: int, body: bytes, n: int = 1) -> bytes:
    """A v2 batch of `n` records at `base` whose compressed records are `body` (any
    bytes a producer chose), the length and CRC made to match: what the broker accepts."""
    head = bytearray(batch(base, n)[:61])
    (attributes,) = struct.unpack_from(">h", head, 21)
    struct.pack_into(">h", head, 21, (attributes & ~0x07) | codec)
    buf = head + body
    struct.pack_into(">i", buf, 8, len(buf) - 12)
    _crc(buf)
    return bytes(buf)


def json_events(n: int, seed: int = 1) -> bytes:
    """What a batch of events looks like decompressed, roughly: JSON, some of it
    random (so that it does not compress to nothing)."""
    rng = random.Random(seed)
    events = [
        {
            "type": "agent.message",
            "sender": "planner",
            "recipient": "executor",
            "correlation_id": f"run-{rng.randrange(8)}",
            "sequence": i,
            "body": rng.choice(["ok", "retry later", "tool call: search", "done"]),
        }
        for i in range(n)
    ]
    return json.dumps(events).encode()


def _gzip_members(*parts: bytes) -> bytes:
    return codecs.gzip_encode(parts[0]) + b"\0\0" + b"".join(map(codecs.gzip_encode, parts[1:]))


PAYLOAD = json_events(3000)  # about 330 KB, more than 8 times what it compresses to
ENCODINGS = {
    "gzip": (1, codecs.gzip_encode(PAYLOAD)),
    "gzip, several members, zero padding between": (1, _gzip_members(PAYLOAD, b"x", PAYLOAD)),
    "snappy, xerial framing": (2, codecs.snappy_encode(PAYLOAD)),
    "snappy, one raw block": (2, codecs.snappy_encode(PAYLOAD, xerial_compatible=False)),
    "lz4": (3, codecs.lz4_encode(PAYLOAD)),
    "zstd": (4, codecs.zstd_encode(PAYLOAD)),
    "zstd, two frames": (4, codecs.zstd_encode(PAYLOAD) + codecs.zstd_encode(b"tail")),
}
AIOKAFKA_DECODERS = {
    1: codecs.gzip_decode,
    2: codecs.snappy_decode,
    3: codecs.lz4_decode,
    4: codecs.zstd_decode,
}


@pytest.mark.parametrize("name", ENCODINGS)
def test_bounded_decoders_give_what_aiokafkas_give(name: str) -> None:
    codec, data = ENCODINGS[name]
    expected = AIOKAFKA_DECODERS[codec](data)
    if codec in (3, 4):  # the buffer had to grow
        assert len(expected) > 8 * len(data)
    assert bounded_decode(codec, data, DEFAULT_MAX_DECOMPRESSED_BATCH_BYTES) == expected
    # a full batch of events is far within the default ratio
    limits = (DEFAULT_MAX_DECOMPRESSED_BATCH_BYTES, DEFAULT_MAX_COMPRESSION_RATIO)
    assert bounded_decode(codec, data, *limits) == expected
    # exactly the limit is within it; one byte less is not
    assert bounded_decode(codec, data, len(expected)) == expected
    with pytest.raises(DecompressedTooLarge) as too_large:
        bounded_decode(codec, data, len(expected) - 1)
    assert too_large.value.limit == len(expected) - 1


@pytest.mark.parametrize("codec", [1, 2, 3, 4])
def test_corrupt_data_is_unparseable_not_too_large(codec: int) -> None:
    _, good = next(v for v in ENCODINGS.values() if v[0] == codec)
    for bad in (b"not compressed at all", good[: len(good) // 2]):
        with pytest.raises(BatchUnparseable) as error:
            bounded_decode(codec, bad, DEFAULT_MAX_DECOMPRESSED_BATCH_BYTES)
        assert not isinstance(error.value, DecompressedTooLarge), (codec, error.value)


@pytest.mark.parametrize("codec", [1, 3, 4])
def test_a_bomb_stops_at_the_limit_saying_the_codec_the_limit_and_the_setting(codec: int) -> None:
    zeros = bytes(4 * MiB)
    data = {1: codecs.gzip_encode, 3: codecs.lz4_encode, 4: codecs.zstd_encode}[codec](zeros)
    with pytest.raises(DecompressedTooLarge) as error:
        bounded_decode(codec, data, MiB)
    name = record_batches._CODECS[codec]
    assert str(error.value) == (
        f"{name} batch decompresses to more than 1,048,576 bytes "
        "(AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES)"
    )


def test_a_snappy_block_is_refused_by_the_length_it_states_before_it_is_decoded() -> None:
    # a raw block stating 2 GiB and holding nothing: the decoder would allocate it first
    stated = bytearray()
    n = 2**31
    while n >= 0x80:
        stated.append(n & 0x7F | 0x80)
        n >>= 7
    stated.append(n)
    with pytest.raises(DecompressedTooLarge):
        bounded_decode(2, bytes(stated) + b"\x00", 64 * MiB)


@pytest.mark.parametrize(
    ("ratio", "refused_at"),
    [
        (10**9, "16,777,216 bytes (AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES)"),
        (
            DEFAULT_MAX_COMPRESSION_RATIO,
            "{:,} bytes (100 times the batch's {:,} bytes of compressed records: "
            "AGENTSTREAM_MAX_COMPRESSION_RATIO)",
        ),
    ],
)
def test_a_compression_bomb_is_one_stand_in_and_never_decompressed_past_the_limit(
    ratio: int, refused_at: str
) -> None:
    """200 MiB of zeros in about 6 KB of zstd, between good batches: aiokafka's own
    decoder holds all of it (twice over) before it parses a record. Refused at the
    limit, or sooner at 100 times its size."""
    body = zeros_zstd(200 * MiB)
    bomb = compressed_batch(2, 4, body)
    assert len(bomb) < 10_000
    data = batch(0, 2) + bomb + batch(3, 1)
    tracemalloc.start()
    try:
        got, records = fetch(data, limit=16 * MiB, ratio=ratio)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * MiB, f"{peak / MiB:.0f} MiB allocated"
    assert [r.offset for r in got] == [0, 1, 2, 3]
    assert [got[i].value for i in (0, 1, 3)] == [b"v0", b"v1", b"v3"]
    stand_in = unreadable(got[2].value)
    assert stand_in is not None and stand_in.whole_batch and bytes(stand_in) == bomb
    assert stand_in.reason == (
        "record batch 2..2 (zstd) unreadable from offset 2: zstd batch decompresses to "
        "more than " + refused_at.format(100 * len(body), len(body))
    )
    assert records.next_fetch_offset == 4


def test_batch_limit_is_the_ratio_times_the_size_floored_and_capped() -> None:
    names = ("AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES", "AGENTSTREAM_MAX_COMPRESSION_RATIO")
    limit = 64 * MiB
    assert batch_limit(70, limit, None) == (limit, names[0])
    # a small batch may always reach the floor, whatever its ratio
    assert batch_limit(70, limit, 100) == (
        RATIO_FLOOR,
        f"100 times the batch's 70 bytes of compressed records: {names[1]}",
    )
    got, why = batch_limit(100_000, limit, 100)
    assert got == 10_000_000 and why.endswith(names[1])
    # the limit wins where the ratio allows more
    assert batch_limit(MiB, limit, 100) == (limit, names[0])
    assert batch_limit(MiB, limit, 64) == (limit, names[0])


def zeros_record_zstd(value_size: int) -> bytes:
    """The zstd-compressed records of a batch of one record at offset delta 0 whose
    value is `value_size` zero bytes: a record that parses once decompressed."""
    fields = b"\x00\x00\x00\x01" + _zigzag(value_size)  # attrs, ts, offset, no key
    length = len(fields) + value_size + 1
    compressor = cramjam.zstd.Compressor(level=3)
    compressor.compress(_zigzag(length) + fields)
    chunk = bytes(MiB)
    for _ in range(value_size // MiB):
        compressor.compress(chunk)
    compressor.compress(bytes(value_size % MiB) + b"\x00")  # and no headers
    return bytes(compressor.finish())


def _zigzag(value: int) -> bytes:
    out = bytearray()
    v = (value << 1) ^ (value >> 63)
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def test_many_small_bombs_under_the_limit_are_refused_by_their_ratio() -> None:
    """Batches of one 4 MiB record in ~200 bytes of zstd, each far under the 64 MiB
    limit: read whole, a fetch of 40 of them holds 160 MiB of records at once (they wait
    in the stream's buffer), from 8 KB of input. The ratio refuses each one."""
    body = zeros_record_zstd(4 * MiB)
    assert len(body) < 1_000
    bombs = b"".join(compressed_batch(i, 4, body) for i in range(40))
    # the same body read within the limit alone is a 4 MiB record
    got, _ = fetch(compressed_batch(0, 4, body), ratio=10**9)
    assert unreadable(got[0].value) is None and len(got[0].value) == 4 * MiB
    del got
    tracemalloc.start()
    try:
        got, records = fetch(bombs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"{peak / MiB:.0f} MiB allocated"
    assert [r.offset for r in got] == list(range(40))
    assert all(unreadable(r.value) is not None for r in got)
    assert "AGENTSTREAM_MAX_COMPRESSION_RATIO" in unreadable(got[0].value).reason
    assert records.next_fetch_offset == 40


def test_a_batch_of_exactly_the_limit_is_read_as_before() -> None:
    records = batch(0, 3)[61:]
    raw = compressed_batch(0, 4, codecs.zstd_encode(records), n=3)
    got, _ = fetch(raw, limit=len(records))
    assert [(r.value, unreadable(r.value)) for r in got] == [
        (b"v0", None),
        (b"v1", None),
        (b"v2", None),
    ]


@pytest.mark.parametrize("codec", [1, 2, 3, 4])
def test_the_pure_python_parser_is_bounded_too(codec: int) -> None:
    from aiokafka.record.default_records import _DefaultRecordBatchPy

    record_batches.install(max_decompressed_bytes=MiB)
    encode = {
        1: codecs.gzip_encode,
        2: codecs.snappy_encode,
        3: codecs.lz4_encode,
        4: codecs.zstd_encode,
    }[codec]
    raw = compressed_batch(0, codec, encode(bytes(2 * MiB)))
    with pytest.raises(DecompressedTooLarge):
        list(_DefaultRecordBatchPy(bytearray(raw)))


def test_every_aiokafka_parser_calls_the_bounded_decoders() -> None:
    """aiokafka's parsers (the C extension's too) look their decoders up as module
    globals at each call: the bounded ones are what they find."""
    import importlib

    record_batches.install()
    for name in record_batches._PARSER_MODULES:
        module = importlib.import_module(name)
        decoders = [g for g in ("gzip_decode", "snappy_decode", "lz4_decode", "zstd_decode")]
        found = [g for g in decoders if hasattr(module, g)]
        assert len(found) >= 3, (name, found)
        assert all(getattr(getattr(module, g), "_agentstream_bounded", False) for g in found)


def test_every_consumer_the_project_makes_decompresses_within_the_settings_limits(
    tmp_path: Path,
) -> None:
    """In a fresh process (as a CLI command is), a consumer from `new_consumer` alone
    (the rule topics' folds, `llm ask` and the console make theirs so) finds aiokafka's
    parsers bounded by the settings' limits."""
    script = """
import asyncio
from agentstream.streams.kafka_security import new_consumer
from agentstream.streams.settings import Settings
from agentstream.streams import record_batches
from tests.support import REPO
import aiokafka.record._crecords.default_records as c

async def main():
    settings = Settings.from_env({
        "AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES": "1048576",
        "AGENTSTREAM_MAX_COMPRESSION_RATIO": "7",
    })
    new_consumer(settings, "test", group_id=None)
    print(getattr(c.zstd_decode, "_agentstream_bounded", False),
          record_batches._limit[0], record_batches._ratio[0])

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTREAM_")}
    env.update(HOME=str(tmp_path), AGENTSTREAM_STATE_DIR=str(tmp_path / "state"))
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "1048576", "7"]
