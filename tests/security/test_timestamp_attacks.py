"""A hostile sender against the audit trail through the one field of a Kafka record it
sets without any check: the record's timestamp. Replays and `audit verify` select by
time; with the producer's clock (CreateTime) a sender could date its records so that a
time range leaves out its own records, or cuts a partition short and leaves out other
senders' records after it. The catalogue topics take the broker's append time instead
(`message.timestamp.type=LogAppendTime`), so a record's time is when it was written."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agentstream.schemas import AgentMessage, Event, encode
from agentstream.streams import replay as replay_module
from agentstream.streams.admin import timestamp_types
from agentstream.streams.replay import collect
from agentstream.streams.settings import Settings
from agentstream.streams.topics import AGENT_MESSAGES, CATALOGUE
from tests.support import cli

pytestmark = pytest.mark.integration

YEAR_MS = 365 * 86_400_000


def _message(mid: str, sender: str) -> bytes:
    return encode(
        Event.of(
            AgentMessage(message_id=mid, sender_id=sender, recipient_id="boss", content="hi"),
            source=sender,
        )
    )


def _ids(records: list[replay_module.ReplayRecord]) -> list[str]:
    return [r.data["payload"]["message_id"] for r in records if r.data is not None]


async def test_a_sender_cannot_date_its_records_out_of_a_replay(
    settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings.from_env(settings_env)
    assert cli(settings_env, "topics", "create").returncode == 0
    topic = settings.topic(AGENT_MESSAGES)
    now_ms = int(time.time() * 1000)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        # one partition, so that the forged records sit between honest ones
        await producer.send_and_wait(topic, _message("a", "honest-1"), partition=0)
        # dated a year ahead: past any `until`, so left out of every range ...
        await producer.send_and_wait(
            topic, _message("f", "mallory"), partition=0, timestamp_ms=now_ms + YEAR_MS
        )
        # ... and dated in 1970: before any `since`
        await producer.send_and_wait(topic, _message("p", "mallory"), partition=0, timestamp_ms=1)
        meta = await producer.send_and_wait(topic, _message("b", "honest-2"), partition=0)
    finally:
        await producer.stop()

    # the defaults (the whole retained log up to now) show every record
    assert sorted(_ids(await collect(settings, [AGENT_MESSAGES]))) == ["a", "b", "f", "p"]
    # a range starting before the first record shows them too
    since = datetime.fromtimestamp((now_ms - 60_000) / 1000, UTC)
    assert sorted(_ids(await collect(settings, [AGENT_MESSAGES], since=since))) == [
        "a",
        "b",
        "f",
        "p",
    ]

    # A range that ended in the past is cut by the time index. With the producer's clock,
    # the record dated a year ahead ended the partition's range at its offset, so the
    # honest record written after it was left out: one record hid another sender's.
    until_ms = meta.timestamp + 1
    while time.time() * 1000 <= until_ms:
        await asyncio.sleep(0.01)
    monkeypatch.setattr(replay_module, "UNTIL_NOW_SLACK_MS", 0)  # `until` counts as past
    got = _ids(await collect(settings, [AGENT_MESSAGES], since=since, until=until_ms))
    assert sorted(got) == ["a", "b", "f", "p"]
    # their times are the broker's, in log order
    recs = await collect(settings, [AGENT_MESSAGES])
    stamps = [r.timestamp_ms for r in recs]
    assert stamps == sorted(stamps) and abs(stamps[0] - now_ms) < 60_000


async def test_catalogue_topics_take_the_broker_time_and_old_topics_are_named(
    settings_env: dict[str, str],
) -> None:
    settings = Settings.from_env(settings_env)
    # an existing topic made by other means, with the producer's clock
    old = settings.topic(AGENT_MESSAGES)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(old, num_partitions=settings.topic_partitions, replication_factor=1)]
        )
    finally:
        await admin.close()

    res = cli(settings_env, "topics", "create")
    assert res.returncode == 0, res.stderr
    assert old in res.stderr and "CreateTime" in res.stderr, res.stderr
    assert "message.timestamp.type=LogAppendTime" in res.stderr  # what to run about it

    types = await timestamp_types(settings, [settings.topic(n) for n in CATALOGUE])
    assert types.pop(old) == "CreateTime"
    assert set(types.values()) == {"LogAppendTime"}, types

    listed = cli(settings_env, "topics", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith(old + " "))
    assert "CreateTime" in line
    assert not any(
        "CreateTime" in x for x in listed.stdout.splitlines() if not x.startswith(old + " ")
    )
