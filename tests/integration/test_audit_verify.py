"""`agentstream audit verify` on the real broker: a chain forged with aiokafka — one
record altered, one deleted, two reordered, one inserted — is reported record by record
with the right kind; the intact partition is reported clean."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from agentstream.schemas import Event, PolicyDecision, encode, registry
from agentstream.schemas.security import Verdict
from agentstream.streams.audit_chain import GENESIS, last_hash, seal
from agentstream.streams.settings import Settings
from agentstream.streams.topics import SECURITY_DECISIONS
from tests.support import cli

pytestmark = pytest.mark.integration


def chain(n: int, tag: str) -> list[bytes]:
    out, prev = [], GENESIS
    for i in range(n):
        ev = seal(
            Event.of(
                PolicyDecision(
                    message_id=f"{tag}{i}",
                    message_event_id=f"e{i}",
                    sender_id="agent-1",
                    verdict=Verdict.ALLOW,
                    reasons=[f"r{i}"],
                    evaluated_at=datetime.now(UTC),
                    evaluation_us=i,
                ),
                source="enforce_policy",
            ),
            prev,
        )
        prev = ev.payload.hash
        out.append(encode(ev))
    return out


async def test_forged_chain_reports_each_kind(settings_env: dict[str, str], tmp_path: Path) -> None:
    settings = Settings.from_env(settings_env)
    env = {**settings_env, "AGENTSTREAM_AGENTS": "audit"}
    assert cli(env, "topics", "create").returncode == 0

    good = chain(6, "g")
    bad = chain(12, "b")
    forged = list(bad)
    forged[1] = forged[1].replace(b'"verdict":"allow"', b'"verdict":"deny"')  # altered @1
    del forged[3]  # deleted: b3 gone, b4 lands at offset 3
    forged[4], forged[5] = forged[5], forged[4]  # reordered: b6 before b5, at offset 4
    intruder = seal(
        Event.of(
            PolicyDecision(
                message_id="forged",
                message_event_id="x",
                sender_id="agent-1",
                verdict=Verdict.ALLOW,
                evaluated_at=datetime.now(UTC),
                evaluation_us=0,
            ),
            source="enforce_policy",
        ),
        json.loads(forged[6])["payload"]["hash"],
    )
    forged.insert(7, encode(intruder))  # inserted after b7, at offset 7

    topic = settings.topic("security.decisions")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        for i, value in enumerate(good):
            meta = await producer.send_and_wait(topic, value, key=b"agent-1", partition=0)
            if i == 2:  # a range can start after the first three (the broker's clock)
                while int(time.time() * 1000) <= meta.timestamp:  # the broker counts whole ms
                    await asyncio.sleep(0.0005)
            elif i == 3:
                mid_partition = datetime.fromtimestamp(meta.timestamp / 1000, UTC).isoformat()
        for value in forged:
            await producer.send_and_wait(topic, value, key=b"agent-1", partition=1)
    finally:
        await producer.stop()

    res = cli(env, "audit", "verify", "--topics", "security.decisions", "--json")
    assert res.returncode == 1, res.stderr  # findings → exit 1
    result = json.loads(res.stdout)
    found = sorted((f["partition"], f["offset"], f["kind"]) for f in result["findings"])
    assert found == [(1, 1, "altered"), (1, 3, "deleted"), (1, 4, "reordered"), (1, 7, "inserted")]
    assert result["counts"] == {
        "altered": 1,
        "deleted": 1,
        "inserted": 1,
        "reordered": 1,
        # a chain written before signing existed, and no chain key trusted: no signature
        # is required
        "forged": 0,
        "unsigned": 0,
    }
    assert result["require_signatures"] is False
    assert result["records"] == len(good) + len(forged)

    # the text report names them too; the intact partition alone verifies clean
    text = cli(env, "audit", "verify", "--topics", "security.decisions")
    assert "ALTERED" in text.stdout and "INSERTED" in text.stdout
    assert f"{topic}:0  6 record(s)  ok" in text.stdout

    # a time range that starts mid-partition anchors on the record before it
    res = cli(
        env, "audit", "verify", "--topics", "security.decisions", "--since", mid_partition, "--json"
    )
    result = json.loads(res.stdout)
    assert len(result["findings"]) == 4
    assert result["records"] == len(good) - 3 + len(forged)  # partition 0 from its 4th


async def test_chain_head_found_behind_a_long_aborted_transaction(
    settings_env: dict[str, str],
) -> None:
    """A worker killed under exactly-once leaves an aborted transaction at the end of
    the partition. The next writer must continue the chain from the last committed
    sealed record, however many aborted records follow it."""
    settings = Settings.from_env(settings_env)
    assert cli(settings_env, "topics", "create").returncode == 0
    topic = settings.topic(SECURITY_DECISIONS)
    committed = chain(3, "c")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
    await producer.start()
    try:
        for value in committed:
            await producer.send_and_wait(topic, value, partition=1)
    finally:
        await producer.stop()
    head = registry.decode(committed[-1]).payload.hash
    assert await last_hash(settings, topic, 1) == head

    zombie = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap, transactional_id=f"{settings.app_id}-zombie"
    )
    await zombie.start()
    try:
        await zombie.begin_transaction()
        for value in chain(150, "z"):  # more than the first lookback of 64
            await zombie.send(topic, value, partition=1)
        await zombie.abort_transaction()
    finally:
        await zombie.stop()
    assert await last_hash(settings, topic, 1) == head

    # retention deleted the older records: the search must stop at the log start, not
    # seek below it (out of range, the reader would jump to the end and find nothing)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topic, 1): RecordsToDelete(2)})
    finally:
        await admin.close()
    assert await last_hash(settings, topic, 1) == head
    assert await last_hash(settings, topic, 0) == GENESIS  # empty partition
