"""A worker joins its group only once the broker lists every topic it subscribes to
(`streams.delivery.await_topics_listed`): a topic created while it waits is waited for,
one that never comes is given up on at the deadline — against a real broker."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaClient
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agentstream.streams.delivery import await_topics_listed, unlisted_topics

pytestmark = pytest.mark.integration


async def test_waits_for_a_topic_created_meanwhile_and_gives_up_on_one_never_created(
    kafka_bootstrap: str, ns: str
) -> None:
    late, never = f"{ns}.late", f"{ns}.never"
    client = AIOKafkaClient(bootstrap_servers=kafka_bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await client.bootstrap()
    await admin.start()
    try:

        async def create_later() -> float:
            await asyncio.sleep(1.5)
            await admin.create_topics([NewTopic(late, num_partitions=3, replication_factor=1)])
            return time.monotonic()

        creating = asyncio.create_task(create_later())
        started = time.monotonic()
        assert await await_topics_listed(client, {late}, wait_s=30) == []
        created_at = await creating
        assert time.monotonic() >= created_at > started + 1.4  # it did wait for it
        cluster = await client.fetch_all_metadata()
        assert cluster.partitions_for_topic(late) == {0, 1, 2}
        assert unlisted_topics(cluster, {late}) == []

        # never created: given up on at the deadline, named, and not created by asking
        started = time.monotonic()
        assert await await_topics_listed(client, {late, never}, wait_s=2) == [never]
        assert 2 <= time.monotonic() - started < 10
        assert never not in await admin.list_topics()
    finally:
        await admin.delete_topics([late])
        await admin.close()
        await client.close()
