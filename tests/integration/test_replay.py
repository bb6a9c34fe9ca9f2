"""Replay on the real broker: a time range over several topics and partitions comes back
merged in (timestamp, partition, offset) order, within the bounds, filtered, without
joining a consumer group; the CLI writes the same as JSON lines."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

import agentstream.agents.audit.verify as verify_mod
import agentstream.streams.replay as replay_mod
from agentstream.agents.audit.verify import ChainTrust, summary, verify
from agentstream.schemas import AgentMessage, Event, encode
from agentstream.streams.replay import Progress, collect
from agentstream.streams.settings import Settings
from tests.integration.test_audit_verify import chain
from tests.support import cli

pytestmark = pytest.mark.integration


def message(i: int) -> bytes:
    return encode(
        Event.of(
            AgentMessage(message_id=f"m{i}", sender_id="a", recipient_id="b", content="hi"),
            source="test",
        )
    )


async def test_replay_time_range_merge_filters_and_cli(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(settings_env)
    env = {**settings_env, "AGENTSTREAM_AGENTS": "audit"}
    assert cli(env, "topics", "create").returncode == 0
    rng = random.Random(7)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    sent: list[tuple[int, str, str]] = []  # (timestamp, topic, message id)

    async def send(topic: str, value: bytes, partition: int) -> int:
        # the catalogue topics take the broker's time (LogAppendTime): the record's
        # timestamp is in the answer; the next record waits for the clock to move on, so
        # every record has a timestamp of its own and the range bounds are exact
        meta = await producer.send_and_wait(
            settings.topic(topic), value, key=b"k", partition=partition
        )
        while int(time.time() * 1000) <= meta.timestamp:  # the broker counts whole ms
            await asyncio.sleep(0.0005)
        return int(meta.timestamp)

    try:
        for i in range(400):
            # the topics and partitions in a shuffled order, so that the merge interleaves
            topic = ("agent.messages", "agent.messages.accepted")[rng.randint(0, 1)]
            ev = Event.of(
                AgentMessage(
                    message_id=f"m{i}", sender_id=f"agent-{i % 3}", recipient_id="x", content="hi"
                ),
                source="test",
                correlation_id=f"c{i % 10}",
            )
            sent.append((await send(topic, encode(ev), rng.randint(0, 1)), topic, f"m{i}"))
            if i == 150:  # undecodable bytes within the range
                await send(topic, b"not json", rng.randint(0, 1))
    finally:
        await producer.stop()

    # [since, until): the record at `since` is in, the one at `until` out
    since, until = sent[100][0], sent[300][0]
    progress = Progress()
    recs = await collect(
        settings,
        ["agent.messages", "agent.messages.accepted"],
        since=since,
        until=until,
        progress=progress,
    )
    keys = [(r.timestamp_ms, r.partition, r.offset) for r in recs]
    assert keys == sorted(keys), "not merged in (timestamp, partition, offset) order"
    assert all(since <= r.timestamp_ms < until for r in recs)
    want = sorted(m for ts, _, m in sent if since <= ts < until)
    got = sorted(r.data["payload"]["message_id"] for r in recs if r.data is not None)
    assert got == want and len(want) == 200
    bad = [r for r in recs if r.data is None]
    assert len(bad) == 1 and bad[0].value == b"not json"  # audits see undecodable records
    assert progress.emitted == 201

    only = await collect(
        settings,
        ["agent.messages", "agent.messages.accepted"],
        since=since,
        until=until,
        agent="agent-1",
        type="agent.message",
        correlation_id="c4",
    )
    assert only and all(r.event.payload.sender_id == "agent-1" for r in only)
    assert all(r.event.correlation_id == "c4" for r in only)
    assert len(only) == len(
        [
            1
            for ts, _, m in sent
            if since <= ts < until and int(m[1:]) % 3 == 1 and int(m[1:]) % 10 == 4
        ]
    )

    # the CLI: same records as JSON lines in a file; no consumer group was created
    out = tmp_path / "replay.jsonl"
    iso = lambda ms: datetime.fromtimestamp(ms / 1000, UTC).isoformat()  # noqa: E731
    res = cli(
        env,
        "replay",
        "--topics",
        "agent.messages,agent.messages.accepted",
        "--since",
        iso(since),
        "--until",
        iso(until),
        "--out",
        str(out),
        "--meta",
    )
    assert res.returncode == 0, res.stderr
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [(x["timestamp_ms"], x["partition"], x["offset"]) for x in lines] == keys
    assert sum("error" in x for x in lines) == 1
    assert "\r[" not in res.stderr  # no progress bar when stderr is not a terminal

    res = cli(
        env,
        "replay",
        "--topics",
        "agent.messages",
        "--since",
        "-1h",
        "--type",
        "agent.message",
        "--agent",
        "agent-2",
    )
    rows = [orjson.loads(line) for line in res.stdout.splitlines()]
    assert rows and {r["payload"]["sender_id"] for r in rows} == {"agent-2"}

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        groups = [g[0] for g in await admin.list_consumer_groups()]
    finally:
        await admin.close()
    assert not [g for g in groups if "replay" in g or g.startswith(settings.app_id)]

    bad_time = cli(env, "replay", "--topics", "agent.messages", "--since", "yesterday-ish")
    assert bad_time.returncode == 2 and "cannot parse time" in bad_time.stderr


async def wait_for_stable_ends(bootstrap: str, ends: dict[TopicPartition, int]) -> None:
    """Poll, with a deadline, until each partition's last stable offset is `ends`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    seen: dict[TopicPartition, int] = {}
    try:
        async with asyncio.timeout(30):
            while (seen := await consumer.end_offsets(list(ends))) != ends:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"last stable offsets {seen}, expected {ends}") from None
    finally:
        await consumer.stop()


async def test_ranges_ending_on_transaction_markers_are_read_through(
    settings_env: dict[str, str],
) -> None:
    """The last offset of a range can hold no record ever fetched: a transaction's commit
    or abort marker, or aborted records under read_committed. A read ends when the
    consumer's position reaches the stop offset, not when a record at stop - 1 arrives
    (that never comes, and the read would wait for ever, or until its stall limit)."""
    settings = Settings.from_env(settings_env)
    env = {**settings_env, "AGENTSTREAM_AGENTS": "audit"}
    assert cli(env, "topics", "create").returncode == 0
    messages, decisions = settings.topic("agent.messages"), settings.topic("security.decisions")
    sealed = chain(3, "a") + chain(3, "b")  # a chain per partition
    plain = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    txn = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap, transactional_id=f"{settings.app_id}-markers"
    )
    await plain.start()
    await txn.start()
    try:
        # partition 0 of each: records in a committed transaction, its marker last
        async with txn.transaction():
            for i in range(5):
                await txn.send(messages, message(i), partition=0)
            for value in sealed[:3]:
                await txn.send(decisions, value, partition=0)
        # partition 1 of each: committed records, then an aborted transaction and its marker
        for i in range(5, 8):
            await plain.send_and_wait(messages, message(i), partition=1)
        for value in sealed[3:]:
            await plain.send_and_wait(decisions, value, partition=1)
        await txn.begin_transaction()
        for i in range(8, 12):
            await txn.send(messages, message(i), partition=1)
        await txn.send(decisions, sealed[0], partition=1)
        await txn.abort_transaction()
    finally:
        await txn.stop()
        await plain.stop()
    # Ending a transaction returns once its coordinator has logged the decision; the
    # markers reach the partitions a moment later, and until then a read_committed
    # reader's end of the log (the last stable offset) stays before the transaction. A
    # read planned in that moment is right to stop there, so wait for the markers.
    await wait_for_stable_ends(
        settings.bootstrap, {TopicPartition(messages, 0): 6, TopicPartition(messages, 1): 8}
    )
    await wait_for_stable_ends(
        settings.bootstrap, {TopicPartition(decisions, 0): 4, TopicPartition(decisions, 1): 5}
    )

    async with asyncio.timeout(60):  # each read ends at once, far within its stall limit
        progress = Progress()
        recs = await collect(settings, "agent.messages", progress=progress)
        reports = await verify(
            settings, ["security.decisions"], trust=ChainTrust(), require_signatures=False
        )
    assert sorted(r.data["payload"]["message_id"] for r in recs if r.data) == [
        f"m{i}" for i in range(8)
    ]
    assert progress.done == progress.total == 6 + 8  # 5 records + marker, 3 + 4 + marker
    assert [(r.partition, r.records, r.findings) for r in reports] == [(0, 3, []), (1, 3, [])]
    res = cli(env, "replay", "--topics", "agent.messages", timeout=60)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 8, res.stderr


async def test_records_deleted_between_planning_and_reading_are_reported(
    settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention or `delete-records` removing the start of a partition after the read
    planned its range used to move the reader silently to the new log start: the replay
    lacked those records without a word, and `audit verify` of a range whose start was
    not anchored passed. Both now report the deleted offsets."""
    settings = Settings.from_env(settings_env)
    env = {**settings_env, "AGENTSTREAM_AGENTS": "audit"}
    assert cli(env, "topics", "create").returncode == 0
    messages, decisions = settings.topic("agent.messages"), settings.topic("security.decisions")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait(messages, message(i), partition=i % 2)
        for value in chain(8, "d"):
            await producer.send_and_wait(decisions, value, partition=0)
    finally:
        await producer.stop()

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        # retention took offset 0 of the chain before the walk: its start is not anchored,
        # so nothing but the reader can tell that more went missing under it
        await admin.delete_records({TopicPartition(decisions, 0): RecordsToDelete(1)})

        def deleting(module: Any, tp: TopicPartition, before: int) -> None:
            real = replay_mod.plan_ranges

            async def plan_then_delete(*a: Any, **kw: Any) -> Any:
                ranges = await real(*a, **kw)
                await admin.delete_records({tp: RecordsToDelete(before)})
                return ranges

            monkeypatch.setattr(module, "plan_ranges", plan_then_delete)

        deleting(replay_mod, TopicPartition(messages, 0), 4)
        progress = Progress()
        recs = await collect(settings, "agent.messages", progress=progress)
        deleting(verify_mod, TopicPartition(decisions, 0), 5)
        reports = await verify(
            settings, ["security.decisions"], trust=ChainTrust(), require_signatures=False
        )
    finally:
        await admin.close()

    # verify: offsets 1-4 were never checked, so the walk did not pass (it did: the chain
    # from offset 5 on is intact, and its start is not anchored)
    result = summary(reports)
    assert not result["ok"]
    assert result["lost"] == [{"topic": decisions, "partition": 0, "first": 1, "stop": 5}]
    [p0, p1] = reports
    assert (p0.first_offset, p0.records, p0.anchored, p0.findings) == (5, 3, False, [])
    assert p1.lost == []

    # replay: what is left is read, the rest named
    assert sorted((r.partition, r.offset) for r in recs) == [
        *((0, o) for o in range(4, 10)),
        *((1, o) for o in range(10)),
    ]
    assert [g.to_dict() for g in progress.lost] == [
        {"topic": messages, "partition": 0, "first": 0, "stop": 4}
    ]
    assert progress.done == progress.total == 20
