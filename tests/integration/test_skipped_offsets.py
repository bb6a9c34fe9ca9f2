"""A worker whose consumer group committed offsets that retention (here: delete-records)
has since removed from the log resumes at the log start, past records it never processed:
it says so in a WARNING naming the partition, the committed offset, the log start and
the count, and counts them in `agentstream_offsets_skipped_total` (docs/monitoring.md).
Before, aiokafka reset the position with an INFO line at most."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from tests.support import Worker, await_until, cli, web_client

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
