"""A worker whose consumer group committed offsets that retention (here: delete-records)
has since removed from the log resumes at the log start, past records it never processed:
it says so in a WARNING naming the partition, the committed offset, the log start and
the count, and counts them in `agentstream_offsets_skipped_total` (docs/monitoring.md).
Before, aiokafka reset the position with an INFO line at most.

The readers of the CLI and the client that fall behind retention mid-run say so too:
`tail` and `subscribe` name the offsets deleted before they read them, `replay` counts
them among its lost offsets. The records are large, so that a fetch holds one or two of
them and the reader, paused after the first, has not fetched what is then deleted."""

from __future__ import annotations

import asyncio
import fcntl
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from agentstream.streams.client import AsyncClient
from agentstream.streams.replay import Gap, Progress, replay
from agentstream.streams.settings import Settings
from tests.support import REPO, Worker, await_until, cli, web_client

pytestmark = pytest.mark.integration


async def test_a_committed_offset_below_the_log_start_is_reported_once(
    settings_env: dict[str, str], ns: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = {**settings_env, "AGENTSTREAM_AGENTS": "comms,health"}  # health serves /metrics
    assert cli(env, "topics", "create").returncode == 0
    topic, group = f"{ns}.comms.records", env["AGENTSTREAM_APP_ID"]
    lost, kept = TopicPartition(topic, 0), TopicPartition(topic, 1)

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for _ in range(10):
            await producer.send_and_wait(topic, b"not an event", key=b"k", partition=0)
        for _ in range(4):
            await producer.send_and_wait(topic, b"not an event", key=b"k", partition=1)
    finally:
        await producer.stop()
    # the group read partition 0 up to 3 and partition 1 to its end, then stopped
    group_consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
    await group_consumer.start()
    try:
        group_consumer.assign([lost, kept])
        await group_consumer.commit({lost: 3, kept: 4})
    finally:
        await group_consumer.stop()
    # meanwhile retention removed 0-7 of partition 0, unread from 3 on, and 0-1 of
    # partition 1, read already: only the first is a loss
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_records({lost: RecordsToDelete(8), kept: RecordsToDelete(2)})
    finally:
        await admin.close()

    log = tmp_path / "worker.log"
    worker = Worker(env, log).start()
    try:
        warning = re.compile(
            rf"WARNING.*{re.escape(topic)}\[0\]: committed offset 3 is below the log start 8: "
            r"5 offset\(s\) removed"
        )
        await await_until(
            lambda: warning.search(log.read_text(errors="replace")),
            60,
            what="the warning about partition 0",
        )

        async def skipped() -> dict[str, float]:
            async with web_client(env) as http:
                text = (await http.get("/metrics")).text
            return {
                m.group(1): float(m.group(2))
                for m in re.finditer(
                    r'^agentstream_offsets_skipped_total\{topic="([^"]+)"\} (\S+)$', text, re.M
                )
            }

        assert await await_until(skipped, 30, what="the counter") == {topic: 5.0}
        # the worker goes on from the log start: it reads 8 and 9 and commits past them
        probe = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
        await probe.start()
        try:

            async def committed_past_the_gap() -> bool:
                return (await probe.committed(lost) or 0) >= 10

            await await_until(committed_past_the_gap, 60, what="a commit after the gap")
        finally:
            await probe.stop()
        text = log.read_text(errors="replace")
        # once for the gap, however often Faust seeks to the committed offsets
        assert len(warning.findall(text)) == 1, text
        assert f"{topic}[1]: committed offset" not in text  # removed after it was read
        assert await skipped() == {topic: 5.0}
    finally:
        worker.stop()


#: a record value that fills most of a fetch (a consumer's default
#: max_partition_fetch_bytes is 1 MiB, replay's 2 MiB)
BIG = b"x" * 700_000


async def _big_records(env: dict[str, str], n: int) -> tuple[str, TopicPartition]:
    """`n` big records on partition 0 of agent.messages: its name, and that partition."""
    settings = Settings.from_env(env)
    assert cli(env, "topics", "create").returncode == 0
    topic = settings.topic("agent.messages")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        for _ in range(n):
            await producer.send_and_wait(topic, BIG, partition=0)
    finally:
        await producer.stop()
    return topic, TopicPartition(topic, 0)


async def _delete_before(bootstrap: str, tp: TopicPartition, offset: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(offset)})
    finally:
        await admin.close()


def _covers(read: list[int], gap: Gap, n: int) -> None:
    """What was read and what was said deleted are every offset, once."""
    deleted = list(range(gap.first, gap.stop))
    assert deleted, gap
    assert sorted(read + deleted) == list(range(n)), (read, gap)


async def test_subscribe_names_the_offsets_deleted_before_it_read_them(
    settings_env: dict[str, str],
) -> None:
    settings = Settings.from_env(settings_env)
    topic, tp = await _big_records(settings_env, 6)
    gaps: list[Gap] = []
    read: list[int] = []
    async with AsyncClient(settings) as client:
        records = client.subscribe(
            "agent.messages",
            from_beginning=True,
            partitions=[0],
            until_end=True,
            on_lost=gaps.append,
        )
        try:
            async for rec in records:
                read.append(rec.offset)
                if rec.offset == 0:  # paused here: a fetch ahead at most
                    await _delete_before(settings.bootstrap, tp, 4)
        finally:
            await records.aclose()
    [gap] = gaps
    assert (gap.topic, gap.partition, gap.stop) == (topic, 0, 4)
    assert read[-2:] == [4, 5]
    _covers(read, gap, 6)


async def test_replay_counts_offsets_deleted_under_it_mid_read(
    settings_env: dict[str, str],
) -> None:
    """Covered already: replay's consumer resets no position, at planning or later."""
    settings = Settings.from_env(settings_env)
    topic, tp = await _big_records(settings_env, 8)
    progress = Progress()
    read: list[int] = []
    async for rec in replay(settings, "agent.messages", progress=progress):
        read.append(rec.offset)
        if rec.offset == 0:  # two records a fetch, and one fetch ahead at most
            await _delete_before(settings.bootstrap, tp, 6)
    [gap] = progress.lost
    assert (gap.topic, gap.partition, gap.stop) == (topic, 0, 6)
    _covers(read, gap, 8)
    assert progress.done == progress.total == 8


def _pending(fd: int) -> int:
    """Bytes waiting in the pipe `fd` reads (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


async def test_tail_says_which_offsets_were_deleted_before_it_read_them(
    settings_env: dict[str, str],
) -> None:
    """aiokafka moved a reader that fell behind retention to the log's start (or, from
    `-o end`, to its end) with an INFO log line at most: `tail` skipped them unsaid."""
    settings = Settings.from_env(settings_env)
    topic, tp = await _big_records(settings_env, 6)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "agentstream", "tail", "agent.messages"),
            # --exit: the end it found at the start is still the end after the deletion
            *("-o", "beginning", "-p", "0", "--exit", "--meta"),
        ],
        env=settings_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        # the first record's line is larger than the pipe: tail waits to write it
        await await_until(
            lambda: proc.poll() is not None or _pending(proc.stdout.fileno()) >= 65536,
            60,
            what="tail blocked writing its first record",
        )
        assert proc.poll() is None, proc.communicate()
        await _delete_before(settings.bootstrap, tp, 4)
        out, err = await asyncio.to_thread(proc.communicate, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    said = err.decode(errors="replace")
    read = [int(orjson.loads(line)["offset"]) for line in out.splitlines()]
    found = re.findall(rf"WARNING: {re.escape(topic)}:0 offsets? (\d+)(?:-(\d+))? \(", said)
    assert len(found) == 1, said
    first = int(found[0][0])
    _covers(read, Gap(topic, 0, first, 4), 6)
    assert f"{topic}:0 offset" in said and "were deleted (retention or delete-records)" in said
    assert found[0][1] in ("", "3"), said  # the gap ends at the new log start, 4
    assert read[-2:] == [4, 5], said
    assert proc.returncode == 3, said  # printed, and lacking records
    assert "Traceback" not in said, said
