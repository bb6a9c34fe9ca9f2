"""`streams.tables.write` / `delete` / `TableWriter`: which changelog partition each table
write goes to, with real Faust tables (an app that is never started: the changelog records
wait in the writer's pending queue, where we read them)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import faust
import orjson
import pytest

from agentstream.schemas import AgentMessage, Event
from agentstream.schemas.llm import BreakerStateChanged, LLMCancelRequested, LLMResponse, Usage
from agentstream.streams.tables import TableWriter, delete, write, writer
from agentstream.streams.tables import llm as llm_tables
from agentstream.streams.tables.monitoring import fold_record, fold_sample
from agentstream.streams.tables.security import keys_for

PARTITIONS = 4
_ids = itertools.count()


def _app() -> faust.App:
    return faust.App(f"writer-test-{next(_ids)}", broker="kafka://127.0.0.1:1", store="memory://")


def json_table(app: faust.App, name: str = "t") -> Any:
    """Declared like the monitoring tables (`streams.tables.monitoring._table`)."""
    return app.Table(
        name,
        default=None,
        key_type=str,
        schema=faust.Schema(key_type=str, key_serializer="json", value_serializer="json"),
        partitions=PARTITIONS,
    )


def sent(app: faust.App) -> list[tuple[str, int, bytes, bytes | None]]:
    """(changelog topic, partition, key bytes, value bytes) of every record sent so far."""
    out = []
    assert app.producer.buffer.pending.empty(), "a table record went to Faust's buffer"
    while writer._PENDING:
        msg = writer._PENDING.popleft()[0].message
        key = msg.channel.prepare_key(msg.key, msg.key_serializer, None)[0]
        value = msg.channel.prepare_value(msg.value, msg.value_serializer, None)[0]
        out.append((msg.channel.get_topic_name(), msg.partition, key, value))
    return out


async def test_write_updates_local_data_and_sends_to_the_named_partition() -> None:
    app = _app()
    table = json_table(app)
    write(table, "k", {"n": 1}, partition=3)
    write(table, "k", {"n": 2}, partition=3)
    assert table.data["k"] == {"n": 2}
    assert sent(app) == [
        (f"{app.conf.id}-t-changelog", 3, b'"k"', b'{"n":1}'),
        (f"{app.conf.id}-t-changelog", 3, b'"k"', b'{"n":2}'),
    ]


async def test_delete_sends_a_tombstone_not_json_null() -> None:
    app = _app()
    table = json_table(app)
    write(table, "k", 1, partition=2)
    delete(table, "k", partition=2)
    assert "k" not in table.data
    assert [(p, k, v) for _, p, k, v in sent(app)] == [(2, b'"k"', b"1"), (2, b'"k"', None)]
    with pytest.raises(KeyError):
        delete(table, "k", partition=2)
    assert sent(app) == []


async def test_writer_sends_each_fold_to_its_input_partition() -> None:
    """A batch mixing partitions (what `decoded_batches` yields): every write of a fold goes
    to the partition of the input being folded, deletes (retention) included."""
    from agentstream.schemas import CommunicationRecord

    app = _app()
    writer = TableWriter(json_table(app))

    def rec(rid: str, agent: str, ts: float) -> CommunicationRecord:
        at = datetime.fromtimestamp(ts, UTC)
        return CommunicationRecord(record_id=rid, kind="token", agent_id=agent, recorded_at=at)

    batch = [(1, rec("r1", "a", 10)), (2, rec("r2", "b", 10)), (1, rec("r3", "a", 100))]
    for partition, record in batch:
        fold_record(writer.at(partition), record, retention_s=50)
    records = sent(app)
    by_agent: dict[str, set[int]] = {}
    for _, partition, key, _ in records:
        agent = orjson.loads(key).split("\x1f")[1]
        by_agent.setdefault(agent, set()).add(partition)
    assert by_agent == {"a": {1}, "b": {2}}
    # r1 fell out of a's retention when r3 arrived: its tombstone is in a's partition too
    tombstones = [(p, k) for _, p, k, v in records if v is None]
    assert len(tombstones) == 1 and tombstones[0][0] == 1 and b"r1" in tombstones[0][1]
    # reads see the local data the writes left
    assert writer.get("c\x1fa") == {"token": 1}
    assert len(writer) == len(writer.table.data) and set(writer) == set(writer.keys())


async def test_writer_refuses_a_write_with_no_input_partition() -> None:
    app = _app()
    writer = TableWriter(json_table(app))
    with pytest.raises(RuntimeError, match="no input partition"):
        fold_sample(writer, "s", {}, 1.0, 1.0, interval_s=10, retention_s=100)
    assert sent(app) == [] and len(writer) == 0
    fold_sample(writer.at(0), "s", {}, 1.0, 1.0, interval_s=10, retention_s=100)
    assert {p for _, p, _, _ in sent(app)} == {0}


async def test_raw_keyed_table_keeps_raw_changelog_keys() -> None:
    """`accepted_by_sender`: raw sender ids as changelog keys, the input's partition."""
    from agentstream.agents.audit.activity import apply_accepted

    app = _app()
    table = app.Table("accepted", default=None, key_type=str, partitions=PARTITIONS)
    table.key_serializer = "raw"
    table.changelog_topic = table._new_changelog_topic()
    writer = TableWriter(table)
    msg = AgentMessage(message_id="m1", sender_id="agent-7", recipient_id="r", content="hi")
    apply_accepted(writer.at(2), Event.of(msg, source="t"))
    [(_, partition, key, value)] = sent(app)
    assert key == b"agent-7" and partition == 2
    assert value is not None and b'"last_message_id":"m1"' in value


async def test_security_counters_go_to_the_partition_in_their_key() -> None:
    app = _app()
    counts = app.Table("counts", default=int, key_type=str, value_type=int)
    for partition in (0, 3):
        for key in keys_for(partition, "deny", ["blocked_patterns"]):
            write(counts, key, int(counts.data.get(key, 0)) + 1, partition=partition)
    records = sent(app)
    assert len(records) == 4
    assert all(orjson.loads(key).startswith(f"{p}|") for _, p, key, _ in records)


def _llm_table(app: faust.App, name: str) -> Any:
    """What `streams.tables.llm.table` builds, on a throwaway app."""
    cls = llm_tables._table_class()
    return app.tables.add(
        cls(
            app,
            name=name,
            default=None,
            beacon=app.tables.beacon,
            partitions=PARTITIONS,
            help="",
            key_type=str,
        )
    )


async def test_llm_tables_route_by_key_outside_any_stream() -> None:
    """Written from call tasks (no current event): the request id's partition, or the
    partition a usage key starts with."""
    app = _app()
    cancelled = _llm_table(app, llm_tables.CANCELLED.name)
    usage = _llm_table(app, llm_tables.USAGE.name)
    breakers = _llm_table(app, llm_tables.BREAKERS.name)
    event = Event.of(LLMCancelRequested(request_id="req-42", reason="user"), source="t")
    llm_tables.apply_cancel(cancelled, event)
    resp = LLMResponse(
        request_id="req-42", agent_id="a1", status="completed", provider="p", model="m",
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )  # fmt: skip
    llm_tables.add_usage(usage, llm_tables.usage_increments([resp], PARTITIONS))
    change = BreakerStateChanged(
        provider="p", previous="closed", current="open", changed_at=datetime.now(UTC)
    )
    llm_tables.apply_breaker(breakers, Event.of(change, source="t"))
    want = llm_tables.partition_of("req-42", PARTITIONS)
    by_table: dict[str, list[tuple[int, bytes]]] = {}
    for topic, partition, key, _ in sent(app):
        by_table.setdefault(topic.split("-")[-2], []).append((partition, key))
    assert by_table["llm_cancelled"] == [(want, b'"req-42"')]
    assert sorted(p for p, _ in by_table["llm_usage"]) == [want] * 3
    assert all(orjson.loads(key).startswith(f"{want}|") for _, key in by_table["llm_usage"])
    assert by_table["llm_breakers"] == [(llm_tables.partition_of("p", PARTITIONS), b'"p"')]
    assert cancelled.data["req-42"]["reason"] == "user"
    # a plain item assignment (what call_llm does for the dedup table) and a delete
    cancelled["req-7"] = {"reason": "r"}
    del cancelled["req-7"]
    seven = llm_tables.partition_of("req-7", PARTITIONS)
    assert [(p, v) for _, p, _, v in sent(app)] == [(seven, b'{"reason":"r"}'), (seven, None)]


async def test_request_ids_never_name_a_partition() -> None:
    """Request ids are user input: one shaped like a usage key ("<p>|...") is hashed like
    any other id, even when <p> is beyond the partition count (it once crashed the send)."""
    app = _app()
    cancelled = _llm_table(app, llm_tables.CANCELLED.name)
    usage = _llm_table(app, llm_tables.USAGE.name)
    for rid in ("0|x", f"{PARTITIONS + 3}|agent|x", "1|"):
        cancelled[rid] = {"reason": "r"}
    assert [p for _, p, _, _ in sent(app)] == [
        llm_tables.partition_of(rid, PARTITIONS)
        for rid in ("0|x", f"{PARTITIONS + 3}|agent|x", "1|")
    ]
    usage[f"{PARTITIONS + 3}|agent|x"] = {"total_tokens": 1}  # out of range: hashed
    usage["1|agent|x"] = {"total_tokens": 1}
    *_, (_, beyond, _, _), (_, one, _, _) = sent(app)
    assert beyond == llm_tables.partition_of(f"{PARTITIONS + 3}|agent|x", PARTITIONS)
    assert one == 1


async def test_a_record_too_large_for_the_producer_is_refused_before_the_table_changes() -> None:
    # A 660 KB label value became a ~2 MB changelog record (the key holds the labels,
    # JSON-encoded twice): aiokafka refused it at every flush, which never got past it,
    # so no agent of the worker committed again. Refused in `write`, inside the input's
    # handler, it is that input's dead letter and the table keeps its state.
    from agentstream.streams.errors import ProcessingError

    app = _app()
    table = json_table(app)
    write(table, "k", {"n": 1}, partition=1)
    huge = "x" * app.conf.producer_max_request_size
    with pytest.raises(ProcessingError, match="too large"):
        write(table, "k", {"n": huge}, partition=1)
    with pytest.raises(ProcessingError, match="too large"):
        write(table, huge, 1, partition=1)
    assert table.data["k"] == {"n": 1} and huge not in table.data
    assert [v for *_, v in sent(app)] == [b'{"n":1}']


async def test_a_value_the_serializer_refuses_leaves_the_table_unchanged() -> None:
    # nested deeper than the changelog's JSON encoder goes: the live table took the value
    # and the changelog never did (live and rebuild differed, GET views failed)
    app = _app()
    table = json_table(app)
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    with pytest.raises(Exception):  # noqa: B017 - whatever the encoder raises
        write(table, "k", deep, partition=0)
    assert "k" not in table.data
    assert sent(app) == []


async def test_keys_written_live_leave_with_their_partition() -> None:
    """When a recovery completes the memory store drops the keys of partitions this
    worker no longer holds, but only those it saw in a restore: a key written live
    stayed for good after its partition moved to another worker (memory, and stale
    entries served by the views that read the whole local table)."""
    from faust.types import TP

    app = _app()
    table = json_table(app)
    write(table, "kept", {"n": 1}, partition=0)
    write(table, "moved", {"n": 2}, partition=3)
    write(table, "gone", {"n": 3}, partition=3)
    delete(table, "gone", partition=3)
    sent(app)
    changelog = f"{app.conf.id}-t-changelog"
    await table.data.on_recovery_completed({TP(changelog, 0)}, set())
    assert dict(table.data.data) == {"kept": {"n": 1}}
