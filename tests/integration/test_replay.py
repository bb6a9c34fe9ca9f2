"""Replay on the real broker: a time range over several topics and partitions comes back
merged in (timestamp, partition, offset) order, within the bounds, filtered, without
joining a consumer group; the CLI writes the same as JSON lines."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from agentstream.schemas import AgentMessage, Event, encode
from agentstream.streams.replay import Progress, collect
from agentstream.streams.settings import Settings
from tests.support import cli

pytestmark = pytest.mark.integration


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
