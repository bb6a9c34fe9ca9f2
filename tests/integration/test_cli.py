"""The CLI against the real broker: topics, publish → tail round trip, validation."""

from __future__ import annotations

import json
import uuid

import pytest

from agentstream.schemas import AgentMessage
from tests.support import cli

pytestmark = pytest.mark.integration


def test_topics_create_is_idempotent_and_listed(settings_env: dict[str, str], ns: str) -> None:
    first = cli(settings_env, "topics", "create")
    assert first.returncode == 0, first.stderr
    from agentstream.streams.topics import CATALOGUE

    assert f"created {len(CATALOGUE)} topic(s)" in first.stdout
    second = cli(settings_env, "topics", "create")
    assert second.returncode == 0, second.stderr
    assert "created 0 topic(s)" in second.stdout
    listing = cli(settings_env, "topics", "list")
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert "2 partitions" in lines[f"{ns}.agent.messages"]
    assert "1 partitions" in lines[f"{ns}.security.policies"]
    assert "compacted" in lines[f"{ns}.security.policies"]
    assert "compacted" in lines[f"{ns}.security.identities"]
    assert "MISSING" not in listing.stdout


def test_publish_validates_each_line_and_tail_round_trips(settings_env: dict[str, str]) -> None:
    assert cli(settings_env, "topics", "create").returncode == 0
    ids = [uuid.uuid4().hex for _ in range(3)]
    lines = [
        # a bare payload: the envelope is built from the topic's one event type
        json.dumps(
            {"message_id": ids[0], "sender_id": "a1", "recipient_id": "a2", "content": "one"}
        ),
        "{not json",
        json.dumps({"message_id": "x", "sender_id": 5, "recipient_id": "a2"}),
        # a full envelope
        json.dumps(
            {
                "type": "agent.message",
                "schema_version": 2,
                "source": "cli-test",
                "payload": {
                    "message_id": ids[1],
                    "sender_id": "a1",
                    "recipient_id": "a3",
                    "content": "two",
                },
            }
        ),
        "",
        json.dumps(
            {
                "type": "agent.heartbeat",
                "schema_version": 1,
                "source": "x",
                "payload": {"agent_id": "a", "sent_at": "2026-01-01T00:00:00Z"},
            }
        ),
        # an old v1 message is upcast before sending
        json.dumps(
            {
                "type": "agent.message",
                "schema_version": 1,
                "source": "legacy",
                "payload": {
                    "message_id": ids[2],
                    "sender_id": "a9",
                    "recipient_id": "a1",
                    "body": "three",
                },
            }
        ),
    ]
    res = cli(settings_env, "publish", "agent.messages", input="\n".join(lines) + "\n")
    assert res.returncode == 1, res.stderr
    assert "line 2: UndecodableEvent" not in res.stderr  # JSON errors are reported as such
    assert "line 2: JSONDecodeError" in res.stderr
    assert "line 3: InvalidEvent" in res.stderr and "payload.sender_id" in res.stderr
    assert "line 6: InvalidEvent" in res.stderr and "does not belong" in res.stderr
    assert "sent 3 event(s)" in res.stderr

    out = cli(
        settings_env,
        "tail",
        "agent.messages",
        "--from-beginning",
        "--max",
        "3",
        "--timeout",
        "20",
        "--meta",
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert all({"topic", "partition", "offset", "timestamp_ms", "key"} <= set(r) for r in records)
    events = [r["event"] for r in records]
    assert sorted(e["payload"]["message_id"] for e in events) == sorted(ids)
    by_id = {e["payload"]["message_id"]: e for e in events}
    assert by_id[ids[0]]["source"] == "agentstream-cli"
    assert by_id[ids[1]]["source"] == "cli-test"
    assert by_id[ids[2]]["schema_version"] == AgentMessage.VERSION  # upcast before sending
    assert by_id[ids[2]]["payload"]["content"] == "three"


def test_tail_offsets_partitions_keys_and_groups(settings_env: dict[str, str], ns: str) -> None:
    """kcat's options: -o beginning|end|N|-N, -p, a key filter, a committing group; and
    tail prints the lines replay writes for the same records."""
    assert cli(settings_env, "topics", "create").returncode == 0
    # 2 partitions; the key decides the partition, so each agent's messages share one
    lines = [
        json.dumps({"message_id": f"m{i}", "sender_id": f"a{i % 5}", "recipient_id": "r"})
        for i in range(10)
    ]
    res = cli(settings_env, "publish", "agent.messages", input="\n".join(lines) + "\n")
    assert res.returncode == 0, res.stderr

    def tail(*args: str) -> list[dict]:
        # --exit: every record there is, then stop (the counts below are exact)
        out = cli(settings_env, "tail", "agent.messages", "--exit", *args)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    every = tail("-o", "beginning", "--meta")
    assert len(every) == 10
    by_partition: dict[int, list[dict]] = {}
    for r in every:
        by_partition.setdefault(r["partition"], []).append(r)
    assert len(by_partition) == 2, "publish keys by sender: both partitions used"
    # -N: the last N records of each partition
    last = tail("-o", "-2", "--meta")
    want = sorted(r["offset"] for rs in by_partition.values() for r in rs[-2:])
    assert len(last) == 4 and sorted(r["offset"] for r in last) == want
    # -p and an absolute offset: that partition only, from that offset on
    part, recs = next(iter(by_partition.items()))
    got = tail("-p", str(part), "-o", str(recs[1]["offset"]), "--meta")
    assert [r["offset"] for r in got] == [r["offset"] for r in recs[1:]]
    assert {r["partition"] for r in got} == {part}
    # --key: only that key's records (the sender id), --max counting what is printed
    key = recs[0]["key"]
    keyed = tail("-o", "beginning", "--key", key, "--max", "2", "--meta")
    assert len(keyed) == 2 and {r["key"] for r in keyed} == {key}
    # a time: in each partition, from the first record stamped at or after it (Kafka's
    # offsets-for-times; the records after it follow, whatever their stamps)
    since = max(r["timestamp_ms"] for r in every)
    want_from_time = []
    for rs in by_partition.values():
        # none stamped that late: the partition starts at its end
        first = next((i for i, r in enumerate(rs) if r["timestamp_ms"] >= since), len(rs))
        want_from_time += [(r["partition"], r["offset"]) for r in rs[first:]]
    from_time = tail("-o", f"s@{since}", "--meta")
    assert sorted((r["partition"], r["offset"]) for r in from_time) == sorted(want_from_time)
    # without --meta: the events alone; raw: the bytes as on the wire. In any order: the
    # two partitions' records interleave as the consumer happens to fetch them
    assert sorted((r["event"] for r in every), key=str) == sorted(tail("-o", "beginning"), key=str)
    raw = cli(
        settings_env,
        "tail",
        "agent.messages",
        "-o",
        "beginning",
        "-e",
        "--format",
        "raw",
    )
    assert sorted(map(json.loads, raw.stdout.splitlines()), key=str) == sorted(
        (r["event"] for r in every), key=str
    )
    # tail and replay print the same line for the same record
    replayed = cli(settings_env, "replay", "--topics", "agent.messages", "--meta")
    assert replayed.returncode == 0, replayed.stderr

    def coordinates(r: dict) -> tuple[int, int]:
        return r["partition"], r["offset"]

    assert sorted(map(json.loads, replayed.stdout.splitlines()), key=coordinates) == sorted(
        every, key=coordinates
    )
    # a group commits what it read: the same group again gets nothing new
    group = f"{ns}-tail"

    def tail_group() -> list[dict]:
        out = cli(
            settings_env, "tail", "agent.messages", "--timeout", "5", "-G", group, "-o", "beginning"
        )
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    assert len(tail_group()) == 10
    assert tail_group() == []


async def test_tail_exit_stops_at_the_end_it_found_past_transaction_markers(
    settings_env: dict[str, str], ns: str, kafka_bootstrap: str
) -> None:
    """--exit (kcat's -e) prints what the topic held when tail started and stops: also on
    a topic whose log ends in transaction markers and an aborted transaction, which a
    read_committed reader's fetch skips without returning a record."""
    from aiokafka import AIOKafkaProducer

    assert cli(settings_env, "topics", "create").returncode == 0
    topic = f"{ns}.agent.messages"
    events = [
        json.dumps({"message_id": f"m{i}", "sender_id": "a1", "recipient_id": "r"})
        for i in range(3)
    ]
    res = cli(settings_env, "publish", "agent.messages", input="\n".join(events) + "\n")
    assert res.returncode == 0, res.stderr
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"{ns}-tail-exit"
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"{}", key=b"a1", partition=0)
            await producer.send_and_wait(topic, b"{}", key=b"a1", partition=1)
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"{}", key=b"a1", partition=0)
        await producer.send_and_wait(topic, b"{}", key=b"a1", partition=1)
        await producer.abort_transaction()
    finally:
        await producer.stop()
    out = cli(settings_env, "tail", "agent.messages", "-o", "beginning", "--exit", timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    # the 3 events and the committed transaction's 2 records (not events: error lines)
    assert len(lines) == 5, out.stdout
    assert sorted(r["payload"]["message_id"] for r in lines if "payload" in r) == [
        "m0",
        "m1",
        "m2",
    ]
    # from the aborted records on: a fetch of them and the abort markers yields no record
    # and wakes no reader, but moves the position to the end
    rest = cli(settings_env, "tail", "agent.messages", "-o", "-2", "--exit", timeout=60)
    assert rest.returncode == 0 and rest.stdout == "", rest.stdout + rest.stderr
    # from the end: nothing, and no wait for what comes next
    from_end = cli(settings_env, "tail", "agent.messages", "--exit", timeout=60)
    assert from_end.returncode == 0 and from_end.stdout == "", from_end.stderr
    refused = cli(settings_env, "tail", "agent.messages", "--exit", "-G", f"{ns}-g")
    assert refused.returncode == 2 and "not with --group" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_tail_times_out_on_an_empty_topic(settings_env: dict[str, str]) -> None:
    assert cli(settings_env, "topics", "create").returncode == 0
    out = cli(settings_env, "tail", "agent.status", "--from-beginning", "--timeout", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_unreachable_broker_is_a_clear_error(settings_env: dict[str, str]) -> None:
    env = {**settings_env, "AGENTSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    res = cli(env, "topics", "create", timeout=90)
    assert res.returncode != 0
    assert "BrokerError" in res.stderr and "127.0.0.1:1" in res.stderr


async def test_rebuild_all_with_no_changelog_of_the_app_id_is_a_settings_mistake(
    settings_env: dict[str, str], ns: str, kafka_bootstrap: str
) -> None:
    """Under an app id no worker ran with (a typo, the settings of another deployment),
    `rebuild --all` found no live table, printed "no changelog topic" for each and exited
    0: a script read that as checked. The changelogs are `<app id>-<table>-changelog`."""
    assert cli(settings_env, "topics", "create").returncode == 0
    out = cli(settings_env, "rebuild", "--all", "--json")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""  # nothing read, nothing to parse as a result
    assert "Traceback" not in out.stderr
    errors = out.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("Error: "), out.stderr
    assert f"AGENTSTREAM_APP_ID='{ns}-app'" in errors[0], errors[0]
    assert f"{ns}-app-<table>-changelog" in errors[0], errors[0]

    # one changelog of that app id is enough: the command compares, as before
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{ns}-app-accepted_by_sender-changelog", 2, 1)])
    finally:
        await admin.close()
    out = cli(settings_env, "rebuild", "--all", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    compared = {row["table"]: row for row in map(json.loads, out.stdout.splitlines())}
    assert compared["accepted_by_sender"]["live_available"] is True
    assert compared["accepted_by_sender"]["equal"] is True  # both empty
