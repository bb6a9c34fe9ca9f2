"""At-least-once across a rebalance: a worker commits what it finished before its
partitions move, so their next owner does not process it again.

Faust commits on a revoke only from `wait_empty`, which this app turns off, so the next
owner used to start from the last periodic commit: up to a commit interval's worth of
every member's input processed twice per rebalance (the SIGSTOP chaos scenario, where
one stopped worker causes up to four rebalances, went over its duplicate bound).
Here periodic commits are out of the way (an hour apart, and more records than the
worker finishes), so the only commit that can happen is the revoke's."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from agentstream.streams.settings import Settings
from tests.conftest import _free_port
from tests.integration.test_recovery_crash import (
    Gauge,
    group_offsets,
    input_id,
    messages,
    publish,
    use_env,
)
from tests.support import Worker, await_until, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("fault-injection")]

N = 2000
PARTITIONS = 4


async def end_offsets(settings: Settings, topic: str) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        return {f"{tp.topic}[{tp.partition}]": offset for tp, offset in sorted(ends.items())}
    finally:
        await consumer.stop()


async def test_at_least_once_revoke_commits_what_was_finished(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    base = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "security",
        "AGENTSTREAM_SECURITY_ENABLED": "false",
        "AGENTSTREAM_PROCESSING_GUARANTEE": "at_least_once",
        "AGENTSTREAM_TOPIC_PARTITIONS": str(PARTITIONS),
        "AGENTSTREAM_COMMIT_INTERVAL_S": "3600",
        "AGENTSTREAM_BROKER_SESSION_TIMEOUT_S": "10",
    }
    settings = use_env(base)
    inputs_topic = settings.topic("agent.messages")
    accepted = settings.topic("agent.messages.accepted")
    first = Worker(base, tmp_path / "w1.log").start()
    second = Worker({**base, "AGENTSTREAM_WEB_PORT": str(_free_port())}, tmp_path / "w2.log")
    try:
        inputs = messages(N)
        await publish(settings, inputs)
        async with Gauge(settings.bootstrap, accepted) as gauge:
            await await_until(lambda: gauge.over(N), 120, interval=0.2, what="all forwarded")
        # partitions the senders' keys hash to (an empty one has nothing to commit)
        ends = {k: v for k, v in (await end_offsets(settings, inputs_topic)).items() if v}
        assert sum(ends.values()) == N
        committed = {k: v for k, v in (await group_offsets(settings)).items() if k in ends}
        # nothing committed yet: the revoke's commit below is the only one
        assert not committed, f"committed before the rebalance: {committed}"

        # a second member joins: every partition of the first is revoked
        second.start()

        async def revoke_committed() -> bool:
            now = await group_offsets(settings)
            return all(now.get(k) == v for k, v in ends.items())

        try:
            await await_until(revoke_committed, 60, interval=0.5, what="the revoke's commit")
        except AssertionError:
            raise AssertionError(
                f"committed {await group_offsets(settings)}, ends {ends}\n"
                f"--- w1 ---\n{first.tail(60)}"
            ) from None
        # the second member now owns half the partitions, from those offsets on
        await await_until(
            lambda: "Setting newly assigned partitions" in second.tail(400),
            60,
            interval=0.5,
            what="the second worker's assignment",
        )
        recs = await read_topic(settings.bootstrap, accepted, timeout=10, idle=2.0)
        got = Counter(input_id(ev) for _, ev in recs if ev is not None)
        assert set(got) == {str(e.event_id) for e in inputs}
        dups = sum(c - 1 for c in got.values())
        assert dups == 0, f"{dups} input(s) forwarded again after the rebalance"
    finally:
        second.stop()
        first.stop()
