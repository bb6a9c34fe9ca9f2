"""A catalogue topic created beforehand with another partition count than
AGENTSTREAM_TOPIC_PARTITIONS (by an operator's own tooling, or an older setting) is a
settings mistake, told in one line before a worker starts: the workers place each
sender's replay state by that count, and a verified message homed by it sat in another
partition and was rejected `misrouted`."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support import cli

pytestmark = pytest.mark.integration


async def test_a_topic_with_another_partition_count_stops_the_worker_in_one_line(
    settings_env: dict[str, str], kafka_bootstrap: str
) -> None:
    env = {**settings_env, "AGENTSTREAM_TOPIC_PARTITIONS": "2", "AGENTSTREAM_AGENTS": "security"}
    topic = env["AGENTSTREAM_TOPIC_PREFIX"] + "agent.messages"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()

    for args in (("topics", "create"), ("worker",)):
        res = cli(env, *args, timeout=120)
        assert res.returncode == 2, (args, res.stdout[-2000:], res.stderr[-2000:])
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"topic {topic} has 4 partition(s), not 2" in lines[0], lines
        assert "AGENTSTREAM_TOPIC_PARTITIONS" in lines[0]

    # the setting that matches the topics is accepted (the rest of the catalogue is
    # created with it too)
    env["AGENTSTREAM_TOPIC_PARTITIONS"] = "4"
    res = cli(env, "topics", "create", timeout=120)
    assert res.returncode == 0, res.stderr
