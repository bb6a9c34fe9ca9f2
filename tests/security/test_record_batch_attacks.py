"""A producer's record batches that the Kafka client may fail to parse, against a worker
on the real broker: every codec Kafka has, a header key that is not UTF-8 (which the
broker accepts), and a compression bomb. Before, the first crashed the worker when a
decoder library was missing, and the second always did, again after every restart (the
offset was never committed): a poison pill that moved from worker to worker; the bomb
was decompressed whole in the worker's memory."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import cramjam
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.record.util import calc_crc32c, encode_varint

from agentstream.schemas import AgentMessage, DeadLetter, Event, encode
from agentstream.streams.admin import ensure_topics
from agentstream.streams.settings import Settings
from tests.support import Worker, cli, read_topic

pytestmark = pytest.mark.integration

CODECS = ("gzip", "snappy", "lz4", "zstd")
#: a header key the test writes and then turns into bytes that are not UTF-8
PLACEHOLDER = "BADKEY!!"
NOT_UTF8 = b"\xff\xfe" * 4


def _event(mid: str) -> Event[AgentMessage]:
    return Event.of(
        AgentMessage(message_id=mid, sender_id="planner-1", recipient_id="coder-2", content=mid),
        source="test",
    )


def _worker_env(settings_env: dict[str, str]) -> dict[str, str]:
    return {
        **settings_env,
        "AGENTSTREAM_AGENTS": "security",
        "AGENTSTREAM_SECURITY_ENABLED": "false",
    }


async def _accepted_ids(settings: Settings, expect: int) -> set[str]:
    accepted = await read_topic(
        settings.bootstrap, settings.topic("agent.messages.accepted"), expect=expect, timeout=60
    )
    # a copy names its input by its causation id (its own event id is derived from the
    # input's coordinates)
    return {str(ev.causation_id) for _, ev in accepted if ev is not None}


async def test_inputs_in_every_codec_are_processed(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(settings_env)
    env = _worker_env(settings_env)
    await ensure_topics(settings)
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        sent: set[str] = set()
        for codec in CODECS:
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.bootstrap, acks="all", compression_type=codec
            )
            await producer.start()
            try:
                for i in range(25):
                    ev = _event(f"{codec}-{i}")
                    sent.add(str(ev.event_id))
                    await producer.send(settings.topic("agent.messages"), encode(ev), key=b"k")
                await producer.flush()
            finally:
                await producer.stop()
        assert await _accepted_ids(settings, len(sent)) == sent, worker.tail()
        assert worker.alive(), worker.tail()
    finally:
        worker.stop()


def _tamper(buffer: bytearray) -> None:
    """Turn every PLACEHOLDER header key of an uncompressed v2 batch into NOT_UTF8 and
    recompute the batch's CRC (CRC-32C from the attributes on, at byte 17): the broker
    then accepts it as any producer's batch."""
    at = buffer.find(PLACEHOLDER.encode())
    assert at > 0
    while at > 0:
        buffer[at : at + len(NOT_UTF8)] = NOT_UTF8
        at = buffer.find(PLACEHOLDER.encode())
    struct.pack_into(">I", buffer, 17, calc_crc32c(bytes(buffer[21:])))


async def _send_batch_with_bad_header(
    producer: AIOKafkaProducer, topic: str, events: list[Event[Any]], bad: int
) -> list[int]:
    """One record batch of `events` on partition 0, the one at index `bad` with a header
    key that is not UTF-8; the offsets the broker gave them."""
    batch = producer.create_batch()
    for i, ev in enumerate(events):
        headers = [(PLACEHOLDER, b"x")] if i == bad else [("ok", b"y")]
        assert batch.append(key=b"k", value=encode(ev), timestamp=None, headers=headers)
    batch.close()
    _tamper(batch._build())
    fut = await producer.send_batch(batch, topic, partition=0)
    base = (await fut).offset  # the broker accepted it
    return [base + i for i in range(len(events))]


async def test_a_header_key_that_is_not_utf8_is_dead_lettered_and_the_worker_goes_on(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(settings_env)
    env = _worker_env(settings_env)
    topic = settings.topic("agent.messages")
    await ensure_topics(settings)
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
        await producer.start()
        try:
            before = [_event(f"before-{i}") for i in range(10)]
            for ev in before:
                await producer.send_and_wait(topic, encode(ev), key=b"k", partition=0)
            batch = [_event(f"batch-{i}") for i in range(12)]
            offsets = await _send_batch_with_bad_header(producer, topic, batch, bad=5)
            after = [_event(f"after-{i}") for i in range(10)]
            for ev in after:
                await producer.send_and_wait(topic, encode(ev), key=b"k", partition=0)
        finally:
            await producer.stop()
        good = [ev for ev in (*before, *batch, *after) if ev is not batch[5]]
        want = {str(ev.event_id) for ev in good}
        assert await _accepted_ids(settings, len(want)) == want, worker.tail()

        letters = await read_topic(
            settings.bootstrap, settings.topic("pipeline.deadletter"), expect=1, timeout=30
        )
        dead = [ev.payload for _, ev in letters if ev is not None]
        assert len(dead) == 1, dead
        letter = dead[0]
        assert isinstance(letter, DeadLetter)
        assert (letter.topic, letter.partition, letter.offset) == (topic, 0, offsets[5])
        assert letter.consumer == "enforce_policy"
        assert letter.error_class == "UnreadableRecord"
        assert "not UTF-8" in letter.error_message
        assert base64.b64decode(letter.original_b64) == encode(batch[5])
        assert worker.alive(), worker.tail()

        # the commit covers the bad record: a restarted worker neither crashes on it nor
        # dead-letters it again, and goes on with the partition
        for restart in range(2):
            worker.stop()
            assert not worker.stop_killed
            worker.start()
            later = _event(f"restart-{restart}")
            producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
            await producer.start()
            try:
                await producer.send_and_wait(topic, encode(later), key=b"k", partition=0)
            finally:
                await producer.stop()
            want.add(str(later.event_id))
            assert await _accepted_ids(settings, len(want)) >= want, worker.tail()
            again = await read_topic(
                settings.bootstrap, settings.topic("pipeline.deadletter"), timeout=10
            )
            assert len(again) == 1
            assert worker.alive(), worker.tail()
        assert "Drain messages raised" not in (tmp_path / "worker.log").read_text()
    finally:
        worker.stop()


async def test_replay_reports_and_skips_a_record_it_cannot_parse(
    settings_env: dict[str, str],
) -> None:
    settings = Settings.from_env(settings_env)
    topic = settings.topic("agent.messages")
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        batch = [_event(f"batch-{i}") for i in range(6)]
        offsets = await _send_batch_with_bad_header(producer, topic, batch, bad=2)
        after = _event("after")
        await producer.send_and_wait(topic, encode(after), key=b"k", partition=0)
    finally:
        await producer.stop()

    done = cli(settings_env, "replay", "--topics", "agent.messages", "--since", "-1h")
    assert done.returncode == 3, done.stderr  # written, and lacking a record of the range
    replayed = [json.loads(line)["event_id"] for line in done.stdout.splitlines()]
    good = [ev for ev in (*batch, after) if ev is not batch[2]]
    assert replayed == [str(ev.event_id) for ev in good]
    assert (
        f"replay: skipped a record the Kafka client cannot parse: {topic}[0] "
        f"offset {offsets[2]}: header key" in done.stderr
    ), done.stderr
    assert "skipped 1 record(s) the Kafka client cannot parse" in done.stderr

    # the activity report lacks it too, and says so in itself
    done = cli(settings_env, "audit", "report", "--format", "json", "--since", "-1h")
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert report["totals"]["sent"] == len(good)
    assert report["unreadable_records"] == 1
    [said] = report["unreadable"]
    assert said.startswith(f"{topic}[0] offset {offsets[2]}: header key"), said
    assert f"audit report: skipped a record the Kafka client cannot parse: {said}" in done.stderr


async def test_tail_and_subscribe_report_a_record_they_cannot_parse_and_go_on(
    settings_env: dict[str, str],
) -> None:
    """They read without the stand-ins `replay` and the worker use: the record ended
    `tail` with a UnicodeDecodeError traceback, and `subscribe` raised it on every
    fetch of the partition."""
    from agentstream.streams.client import AsyncClient
    from agentstream.streams.errors import UnreadableRecord

    settings = Settings.from_env(settings_env)
    topic = settings.topic("agent.messages")
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        batch = [_event(f"batch-{i}") for i in range(6)]
        offsets = await _send_batch_with_bad_header(producer, topic, batch, bad=2)
        after = _event("after")
        await producer.send_and_wait(topic, encode(after), key=b"k", partition=0)
    finally:
        await producer.stop()
    good = [str(ev.event_id) for ev in (*batch, after) if ev is not batch[2]]

    async with AsyncClient(settings) as client:
        got = [
            rec
            async for rec in client.subscribe(
                "agent.messages", from_beginning=True, partitions=[0], max_events=7
            )
        ]
    assert [r.offset for r in got] == [*offsets, offsets[-1] + 1]
    bad = got[2]
    assert bad.event is None and isinstance(bad.error, UnreadableRecord), bad
    assert str(bad.error).startswith(f"offset {offsets[2]}: header key"), bad.error
    assert [str(r.event.event_id) for r in got if r.event is not None] == good

    done = cli(settings_env, "tail", "agent.messages", "-o", "beginning", "-p", "0", "--exit")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 3, done.stderr  # printed, and lacking a record
    assert [json.loads(line)["event_id"] for line in done.stdout.splitlines()] == good
    assert (
        f"tail: skipped a record the Kafka client cannot parse: {topic}[0] "
        f"offset {offsets[2]}: header key" in done.stderr
    ), done.stderr
    assert "skipped 1 record(s) the Kafka client cannot parse" in done.stderr


MiB = 1024 * 1024


def _varint(value: int) -> bytes:
    out = bytearray()
    encode_varint(value, out.append)
    return bytes(out)


def _zstd_bomb_records(value_size: int) -> bytes:
    """The compressed records of a v2 batch holding one record whose value is
    `value_size` zero bytes: a valid batch the broker accepts (it checks the records
    streaming), made without holding the zeros (200 MiB is about 6 KB of zstd)."""
    fields = b"\x00" + _varint(0) + _varint(0) + _varint(-1) + _varint(value_size)
    length = len(fields) + value_size + len(_varint(0))
    compressor = cramjam.zstd.Compressor(level=3)
    compressor.compress(_varint(length) + fields)
    chunk = bytes(MiB)
    for _ in range(value_size // MiB):
        compressor.compress(chunk)
    compressor.compress(bytes(value_size % MiB) + _varint(0))  # and no headers
    return bytes(compressor.finish())


async def _send_bomb(producer: AIOKafkaProducer, topic: str, records: bytes) -> int:
    """One zstd record batch on partition 0 whose compressed records are `records`,
    its length, codec and CRC made to match; the offset the broker gave it."""
    batch = producer.create_batch()
    assert batch.append(key=None, value=b"placeholder", timestamp=None, headers=[])
    batch.close()
    buffer = batch._build()  # the bytes `send_batch` sends, changed in place
    buffer[61:] = records  # after the v2 batch header
    struct.pack_into(">i", buffer, 8, len(buffer) - 12)  # batchLength
    (attributes,) = struct.unpack_from(">h", buffer, 21)
    struct.pack_into(">h", buffer, 21, (attributes & ~0x07) | 4)  # zstd
    struct.pack_into(">I", buffer, 17, calc_crc32c(bytes(buffer[21:])))
    fut = await producer.send_batch(batch, topic, partition=0)
    return int((await fut).offset)


def _peak_rss(pid: int) -> int:
    """The process's peak resident set so far (Linux: VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_a_compression_bomb_is_dead_lettered_within_the_limit_and_the_worker_goes_on(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    """200 MiB of zeros in one record of a 6 KB zstd batch, between good messages, to a
    worker limited to 8 MiB (and no ratio to speak of): the batch is one dead letter
    naming the limit, the worker never holds the 200 MiB, and the messages after it are
    processed. A reader of history at the defaults refuses it for its ratio."""
    import psutil

    settings = Settings.from_env(settings_env)
    env = {
        **_worker_env(settings_env),
        "AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES": str(8 * MiB),
        "AGENTSTREAM_MAX_COMPRESSION_RATIO": "1000000",
    }
    topic = settings.topic("agent.messages")
    await ensure_topics(settings)
    records = _zstd_bomb_records(200 * MiB)
    assert len(records) < 10_000
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        assert worker.proc is not None
        pid = worker.proc.pid
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
        await producer.start()
        try:
            before = [_event(f"before-{i}") for i in range(5)]
            for ev in before:
                await producer.send_and_wait(topic, encode(ev), key=b"k", partition=0)
            want = {str(ev.event_id) for ev in before}
            assert await _accepted_ids(settings, len(want)) == want, worker.tail()
            # the worker at work, before the bomb: its peak from here must stay far below
            peak_before = _peak_rss(pid)
            rss_before = psutil.Process(pid).memory_info().rss
            bomb_offset = await _send_bomb(producer, topic, records)
            after = [_event(f"after-{i}") for i in range(5)]
            for ev in after:
                await producer.send_and_wait(topic, encode(ev), key=b"k", partition=0)
        finally:
            await producer.stop()
        want |= {str(ev.event_id) for ev in after}
        assert await _accepted_ids(settings, len(want)) == want, worker.tail()

        letters = await read_topic(
            settings.bootstrap, settings.topic("pipeline.deadletter"), expect=1, timeout=30
        )
        # the worker never held the bomb (nor gave back memory it had held)
        assert worker.alive(), worker.tail()
        grown = _peak_rss(pid) - peak_before
        now = psutil.Process(pid).memory_info().rss
        assert grown < 64 * MiB, f"peak RSS grew {grown / MiB:.0f} MiB"
        assert now - rss_before < 64 * MiB, f"RSS grew {(now - rss_before) / MiB:.0f} MiB"

        dead = [ev.payload for _, ev in letters if ev is not None]
        assert len(dead) == 1, dead
        letter = dead[0]
        assert isinstance(letter, DeadLetter)
        assert (letter.topic, letter.partition, letter.offset) == (topic, 0, bomb_offset)
        assert letter.error_class == "UnreadableRecord"
        assert (
            "zstd batch decompresses to more than 8,388,608 bytes "
            "(AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES)" in letter.error_message
        ), letter.error_message
        # the raw batch as fetched (header and compressed records), never decompressed:
        # enforce_policy's redactor cannot see inside it, so its bytes are withheld
        assert letter.original_size == 61 + len(records)
        assert letter.original_truncated and letter.original_b64 == ""
    finally:
        worker.stop()

    # a reader of history at the defaults (64 MiB, 100:1) reports and skips it the same
    # way, refused for its ratio: 100 times the compressed records, far under 64 MiB
    by_ratio = 100 * len(records)
    done = cli(settings_env, "replay", "--topics", "agent.messages", "--since", "-1h")
    assert done.returncode == 3, done.stderr  # written, and lacking a record of the range
    replayed = [json.loads(line)["event_id"] for line in done.stdout.splitlines()]
    assert replayed == [str(ev.event_id) for ev in (*before, *after)]
    assert (
        f"{topic}[0] offset {bomb_offset}: record batch {bomb_offset}..{bomb_offset} (zstd) "
        "unreadable from offset "
        f"{bomb_offset}: zstd batch decompresses to more than {by_ratio:,} bytes (100 times "
        f"the batch's {len(records):,} bytes of compressed records: "
        "AGENTSTREAM_MAX_COMPRESSION_RATIO)" in done.stderr
    ), done.stderr
