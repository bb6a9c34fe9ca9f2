"""Every table written from a batch lands in the changelog partition of the input it was
folded from (`streams.tables.write`), on the real broker: the security counters, the audit
table, the metric windows, the comms records and the heartbeats — and each still equals
its rebuild from history. A metric sample or communication record a producer put in
another partition than its key hashes to, or under another key, is refused (a dead
letter): it would have put its key in a second changelog partition."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from agentstream.schemas import (
    AgentMessage,
    CommunicationRecord,
    Event,
    Heartbeat,
    MetricSample,
    encode,
)
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from agentstream.streams.tables.llm import partition_of
from agentstream.streams.tables.monitoring import SEP
from agentstream.streams.tables.security import counter_value
from tests.support import Worker, await_until, read_topic

pytestmark = pytest.mark.integration

PARTITIONS = 4
NAMES = [f"x{i}" for i in range(8)]  # senders, series, comms agents and heartbeat agents
STRAY = "stray"  # a sender whose message a producer put on a partition its key does not hash to
TABLES = (
    "accepted_by_sender",
    "security_decision_counts",
    "metric_windows",
    "comms_records",
    "agent_heartbeats",
)


def _key(raw: bytes | None, table: str) -> str:
    assert raw is not None
    return raw.decode() if table == "accepted_by_sender" else str(orjson.loads(raw))


def _latest(records: list[tuple[Any, Any]], table: str) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for rec, _ in records:
        key = _key(rec.key, table)
        if rec.value is None:
            state.pop(key, None)
        else:
            state[key] = orjson.loads(rec.value)
    return state


async def test_changelog_partition_is_the_input_partition(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": ("security,audit,metrics,comms,heartbeat"),
        "AGENTSTREAM_TOPIC_PARTITIONS": str(PARTITIONS),
        "AGENTSTREAM_SECURITY_ENABLED": "false",
        "AGENTSTREAM_CHECKPOINT_INTERVAL_S": "3600",
    }
    settings = Settings.from_env(env)
    worker = Worker(env, tmp_path / "worker.log")
    await asyncio.to_thread(worker.start)
    try:
        now = time.time()
        async with AsyncClient(settings, source="test") as client:
            await client.publish_many(
                "agent.messages",
                [
                    AgentMessage(message_id=f"m{i}", sender_id=n, recipient_id="r", content="hi")
                    for i in range(3)
                    for n in NAMES
                ],
            )
            samples = [
                MetricSample(series=n, timestamp=now + i, value=1.0)
                for i in range(3)
                for n in NAMES
            ]
            await client.publish_many("metrics.samples", samples)
            at = datetime.now(UTC)
            records = [
                CommunicationRecord(record_id=f"{n}-{i}", kind="token", agent_id=n, recorded_at=at)
                for i in range(2)
                for n in NAMES
            ]
            await client.publish_many("comms.records", records)
            await client.publish_many(
                "agent.heartbeats", [Heartbeat(agent_id=n, sent_at=at, sequence=1) for n in NAMES]
            )
        stray_partition = (partition_of(STRAY, PARTITIONS) + 1) % PARTITIONS
        # a sample of a series and a record of an agent in partitions their keys do not
        # hash to, and one under another key: each would put its series' (agent's) key
        # in a second changelog partition; refused, dead letters saying why
        victim = NAMES[0]
        elsewhere = (partition_of(victim, PARTITIONS) + 1) % PARTITIONS
        forged: list[tuple[str, Any, str, int]] = [
            (
                "metrics.samples",
                MetricSample(series=victim, timestamp=now, value=1e9),
                victim,
                elsewhere,
            ),
            (
                "comms.records",
                CommunicationRecord(
                    record_id="forged", kind="token", agent_id=victim, recorded_at=at
                ),
                victim,
                elsewhere,
            ),
            (
                "comms.records",
                CommunicationRecord(
                    record_id="forged-key", kind="token", agent_id=victim, recorded_at=at
                ),
                "mallory",
                partition_of(victim, PARTITIONS),
            ),
        ]
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
        await producer.start()
        try:
            msg = AgentMessage(message_id="s1", sender_id=STRAY, recipient_id="r", content="x")
            await producer.send_and_wait(
                settings.topic("agent.messages"),
                encode(Event.of(msg, source=STRAY)),
                key=STRAY.encode(),
                partition=stray_partition,
            )
            for topic, payload, key, partition in forged:
                await producer.send_and_wait(
                    settings.topic(topic),
                    encode(Event.of(payload, source="mallory")),
                    key=key.encode(),
                    partition=partition,
                )
        finally:
            await producer.stop()
        n_messages = 3 * len(NAMES) + 1

        async def refused() -> list[Any]:
            letters = await read_topic(settings.bootstrap, settings.topic("pipeline.deadletter"))
            got = [e.payload for _, e in letters if e is not None]
            return got if len(got) >= len(forged) else []

        letters = await await_until(refused, 30, 0.5, "the forged records dead-lettered")
        assert sorted((d.topic, d.partition) for d in letters) == sorted(
            (settings.topic(topic), partition) for topic, _, _, partition in forged
        )
        reasons = sorted(d.error_message for d in letters)
        assert ["hashes to partition" in r for r in reasons].count(True) == 2, reasons
        assert ["key mismatch" in r for r in reasons].count(True) == 1, reasons

        async def changelogs() -> dict[str, list[tuple[Any, Any]]]:
            out = {
                t: await read_topic(
                    settings.bootstrap, f"{settings.app_id}-{t}-changelog", idle=0.5
                )
                for t in TABLES
            }
            states = {t: _latest(recs, t) for t, recs in out.items()}
            done = (
                set(states["accepted_by_sender"]) == {*NAMES, STRAY}
                and sum(
                    counter_value(v)[0]
                    for k, v in states["security_decision_counts"].items()
                    if "|*" in k
                )
                == n_messages
                and {k.split(SEP)[0] for k in states["metric_windows"]} == set(NAMES)
                and {k for k in states["comms_records"] if k.startswith("c")}
                == {f"c{SEP}{n}" for n in NAMES}
                and set(states["agent_heartbeats"]) == set(NAMES)
            )
            return out if done else {}

        logs = await await_until(changelogs, 60, 0.5, "every table's changelog complete")

        # where each key's input records are: the partitions of its source records
        sources = {
            "accepted_by_sender": "agent.messages.accepted",
            "metric_windows": "metrics.samples",
            "comms_records": "comms.records",
            "agent_heartbeats": "agent.heartbeats",
        }
        inputs: dict[str, dict[str, set[int]]] = {}
        for table, topic in sources.items():
            where: dict[str, set[int]] = defaultdict(set)
            for rec, _ in await read_topic(settings.bootstrap, settings.topic(topic), idle=0.5):
                where[rec.key.decode()].add(rec.partition)
            inputs[table] = where
        assert inputs["accepted_by_sender"][STRAY] == {stray_partition}

        def owner(table: str, key: str) -> str:
            if table == "metric_windows":
                return key.split(SEP)[0]
            if table == "comms_records":
                return key.split(SEP)[1]
            return key

        assert inputs["metric_windows"][victim] == {partition_of(victim, PARTITIONS), elsewhere}

        for table, records in logs.items():
            assert records, table
            for rec, _ in records:
                key = _key(rec.key, table)
                if table == "security_decision_counts":
                    # the counters of one partition's messages, in that partition
                    assert int(key.split("|")[0]) == rec.partition, key
                    continue
                if table in ("metric_windows", "comms_records"):
                    # only in the partition the key hashes to: the forged ones added none
                    want = partition_of(owner(table, key), PARTITIONS)
                    assert rec.partition == want, (table, key)
                    if key.startswith(victim):
                        assert orjson.loads(rec.value)["max"] == 1.0, "the forged sample"
                    continue
                assert inputs[table][owner(table, key)] == {rec.partition}, (table, key)
        # keyed records: the partition of the input is the one the key hashes to (what the
        # audit table's producer-side partitioner chose before the input partition did)
        used = set()
        for name in NAMES:
            want = partition_of(name, PARTITIONS)
            used.add(want)
            assert inputs["accepted_by_sender"][name] == {want}
        assert len(used) > 1, "every name hashed to one partition: the test proves little"

        import agentstream.agents.audit.activity
        import agentstream.streams.tables.security  # noqa: F401
        from agentstream.agents.audit.rebuild import compare_all

        last: list[Any] = []

        async def equal() -> bool:
            last[:] = await compare_all(settings, TABLES)
            return all(c.live_available and c.equal for c in last)

        try:
            await await_until(equal, 30, 0.5, "every table equal to its rebuild")
        except AssertionError:
            raise AssertionError([c.to_dict() for c in last if not c.equal]) from None
        assert worker.alive(), worker.tail()
    finally:
        await asyncio.to_thread(worker.stop)
