"""The readers of history (`replay`, `audit verify`) when the broker goes silent under
them, and when the first offsets of a partition are deleted between planning and
reading — without a broker (`tests.unit.test_progress.FakeConsumer`; the same cases on
the real broker are in tests/integration/test_replay.py and test_replay_stall.py).

A silent broker used to hang both readers for ever: they now give up with one
`BrokerError` line after `AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S` without progress. Deleted
offsets used to be skipped silently: `replay` now names them on stderr and exits 3,
`audit verify` lists them and fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from click.testing import CliRunner, Result

import agentstream.agents.audit.cli  # noqa: F401  (registers `audit` and `rebuild`)
import agentstream.agents.audit.rebuild as rebuild_mod
import agentstream.agents.audit.verify as verify_mod
import agentstream.streams.replay as replay_mod
from agentstream.agents.audit.verify import (
    CHAINED_TOPICS,
    ChainTrust,
    PartitionReport,
    summary,
    verify,
)
from agentstream.schemas import encode
from agentstream.streams import record_batches
from agentstream.streams.audit_chain import GENESIS, seal
from agentstream.streams.cli import cli, prepare_run
from agentstream.streams.errors import BrokerError
from agentstream.streams.record_batches import Unreadable
from agentstream.streams.replay import (
    STALL_GRACE_S,
    Gap,
    Progress,
    Stall,
    lost_range,
    replay_batches,
    stall_error,
    start_reader,
    stop_reader,
)
from agentstream.streams.settings import Settings, get_settings
from agentstream.streams.signing import new_private_key, public_b64
from tests.unit.test_audit_verify import decision
from tests.unit.test_progress import T0, FakeConsumer, Log, cluster, message, screen, span

#: the stall limit of these tests (seconds)
LIMIT = 0.3
#: how long past the limit the error may come: the limit, one fetch wait (0.5 s) and the
#: grace of a hung step, with room for a loaded machine
SLACK = 0.5 + STALL_GRACE_S + 3.0
TRUST = ["--trust-key", f"k1={public_b64(new_private_key())}"]


# -- the rules ----------------------------------------------------------------------------------
def test_a_read_is_stalled_once_it_has_not_moved_for_the_limit() -> None:
    watch = Stall(2.0, now=10.0)
    assert not watch.stalled(11.9)
    assert watch.stalled(12.0)
    watch.moved(11.0)
    assert watch.left(12.0) == 1.0 and not watch.stalled(12.0)


def test_a_stall_names_the_partitions_their_positions_and_stops_on_one_line() -> None:
    waiting = {TopicPartition("p.x", i): (5 + i, 9 + i) for i in range(10)}
    text = str(stall_error("replay", waiting, 15.0))
    assert text.startswith("replay made no progress for 15s on p.x:0 at offset 5 of stop 9, ")
    assert "p.x:7 at offset 12 of stop 16 and 2 more partition(s)" in text
    assert "AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S" in text and "\n" not in text
    assert stall_error("replay", waiting, 1).retriable


@pytest.mark.parametrize(
    ("position", "begin", "end", "stop", "expected"),
    [
        (3, 5, 20, 10, (5, 5)),  # [3, 5) deleted: go on at 5
        (3, 12, 20, 10, (10, None)),  # the rest of the range deleted: read through
        (3, 10, 20, 10, (10, None)),
        (15, 0, 12, 20, (20, None)),  # the log was truncated below the position
        (7, 5, 20, 10, None),  # inside the log: another partition's error
        (12, 0, 12, 20, None),  # at the end: a valid fetch position
    ],
)
def test_lost_range(
    position: int, begin: int, end: int, stop: int, expected: tuple[int, int | None] | None
) -> None:
    assert lost_range(position, begin, end, stop) == expected


def test_a_gap_says_which_offsets_are_missing() -> None:
    assert Gap("p.x", 1, 0, 9).describe().startswith("p.x:1 offsets 0-8 (9) were deleted")
    assert Gap("p.x", 1, 4, 5).describe().startswith("p.x:1 offset 4 (1) were deleted")


def test_verify_is_not_ok_when_offsets_were_lost() -> None:
    clean = PartitionReport("t", 0, 9, 11, 2, True, [])
    assert summary([clean])["ok"]
    clean.lost.append(Gap("t", 0, 0, 9))
    result = summary([clean])
    assert not result["ok"]
    assert result["lost"] == [{"topic": "t", "partition": 0, "first": 0, "stop": 9}]


# -- a broker gone silent after planning ----------------------------------------------------------
COMPLAINT = "Failed fetch messages from 1: NodeNotReadyError"


class Silent(FakeConsumer):
    """Plans as the cluster says, then never answers a fetch: each waits out its timeout
    and returns nothing, and no position moves (a broker stopped, or partitioned away).
    Its fetcher, a task started with it as aiokafka's is, complains in aiokafka's log
    every 50 ms meanwhile."""

    async def start(self) -> None:
        async def fetcher() -> None:
            while True:
                await asyncio.sleep(0.05)
                logging.getLogger("aiokafka.consumer.fetcher").error(COMPLAINT)

        self.fetcher = asyncio.get_running_loop().create_task(fetcher())

    async def stop(self) -> None:
        self.fetcher.cancel()

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]:
        await asyncio.sleep(timeout_ms / 1000)
        return {}


def fast() -> Settings:
    return get_settings().model_copy(update={"kafka_connect_timeout_s": LIMIT})


@pytest.fixture
def silent(monkeypatch: pytest.MonkeyPatch) -> Iterator[Silent]:
    prepare_run()
    consumer = Silent(cluster(), [])
    for module in (replay_mod, verify_mod):
        monkeypatch.setattr(module, "group_less_consumer", lambda *a, **kw: consumer)
    yield consumer


async def test_replay_gives_up_on_a_silent_broker(
    silent: Silent, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(BrokerError) as caught:
        async with asyncio.timeout(LIMIT + SLACK + 5):  # the old reader never returned
            async for _ in replay_batches(fast(), ["agent.messages"]):
                pass
    assert loop.time() - began < LIMIT + SLACK
    topic = fast().topic("agent.messages")
    text = str(caught.value)
    assert text.startswith(f"replay made no progress for {LIMIT:g}s on ")
    # p0 is read from offset 0 to 12, p1 (its head expired) from 5 to 15
    assert f"{topic}:0 at offset 0 of stop 12, {topic}:1 at offset 5 of stop 15:" in text
    # the fetcher's complaints were kept for the error, not printed a few times a second
    assert text.endswith(f"; the client's last complaint: {COMPLAINT}")
    assert not [r for r in caplog.records if COMPLAINT in r.getMessage()]


async def test_verify_gives_up_on_a_silent_broker(silent: Silent) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(BrokerError, match="audit verify made no progress") as caught:
        async with asyncio.timeout(LIMIT + SLACK + 5):
            await verify(fast(), CHAINED_TOPICS, trust=ChainTrust(), require_signatures=False)
    assert loop.time() - began < LIMIT + SLACK
    first = fast().topic(CHAINED_TOPICS[0])
    assert f"on {first}:0 at offset 0 of stop 12:" in str(caught.value)


async def test_only_the_readers_own_tasks_have_their_complaints_kept() -> None:
    # a handler on the logger itself: whatever earlier tests did to the logging set-up
    # (levels, propagation, dictConfig disabling loggers), what passes the logger's
    # filters reaches it
    logger = logging.getLogger("aiokafka.consumer.fetcher")
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    saved = (logger.level, logger.disabled)
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    logger.addHandler(handler)
    try:
        consumer = Silent(cluster(), [])
        kept = await start_reader(consumer)  # type: ignore[arg-type]
        try:
            await asyncio.sleep(0.2)
            logger.warning("someone else's")
        finally:
            await consumer.stop()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.disabled = saved[1]
    assert kept == [COMPLAINT]
    assert seen == ["someone else's"]


class Stopping:
    """A consumer whose `stop()` raises CancelledError, as aiokafka's does when its fetcher
    had a request in flight (aio-libs/aiokafka#647), or hangs (`hang`)."""

    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang
        self.closed = False
        self._client = SimpleNamespace(close=self._close)

    async def _close(self) -> None:
        self.closed = True

    async def stop(self) -> None:
        if self.hang:
            await asyncio.Event().wait()
        raise asyncio.CancelledError


async def test_stop_reader_finishes_a_stop_aiokafka_broke_off() -> None:
    consumer = Stopping()
    await stop_reader(consumer)  # type: ignore[arg-type]
    assert consumer.closed  # the step stop() left undone


async def test_stop_reader_is_still_cancellable() -> None:
    consumer = Stopping(hang=True)
    task = asyncio.get_running_loop().create_task(stop_reader(consumer))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not consumer.closed


@pytest.fixture
def short_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S", str(LIMIT))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def invoke(args: list[str]) -> Result:
    result = CliRunner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["replay", "--topics", "agent.messages"], "replay"),
        (["audit", "verify", *TRUST], "audit verify"),
    ],
)
def test_a_stalled_command_ends_with_one_line_and_the_broker_error_status(
    short_limit: None, silent: Silent, args: list[str], what: str
) -> None:
    result = invoke(args)
    assert result.exit_code == 1  # as every BrokerError (docs/cli.md)
    [line] = screen(result.stderr)
    assert line.startswith(f"Error: BrokerError: {what} made no progress for {LIMIT:g}s on ")
    assert result.stdout == ""


# -- offsets deleted between planning and reading -----------------------------------------------
def delete_after_planning(
    monkeypatch: pytest.MonkeyPatch,
    module: ModuleType,
    logs: dict[TopicPartition, Log],
    upto: dict[TopicPartition, int],
) -> None:
    """Once `module` has planned its ranges, the partitions of `upto` lose their offsets
    below it (retention, or delete-records)."""
    real = replay_mod.plan_ranges

    async def plan_then_delete(*a: Any, **kw: Any) -> Any:
        ranges = await real(*a, **kw)
        for tp, first in upto.items():
            log = logs[tp]
            log.begin = first
            log.records = [r for r in log.records if r.offset >= first]
        return ranges

    monkeypatch.setattr(module, "plan_ranges", plan_then_delete)


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[TopicPartition, Log]]:
    """The fake cluster; every reader's consumer reads it."""
    prepare_run()
    logs = cluster()
    for module in (replay_mod, verify_mod, rebuild_mod):
        monkeypatch.setattr(module, "group_less_consumer", lambda *a, **kw: FakeConsumer(logs, []))
    yield logs


async def test_replay_reports_offsets_deleted_before_it_read_them(
    monkeypatch: pytest.MonkeyPatch, logs: dict[TopicPartition, Log]
) -> None:
    topic = get_settings().topic("agent.messages")
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    # p0 loses [0, 9) (offsets 0-3, 6-8 held records), p1 all of its range [5, 15)
    planned = span(logs, [topic])
    delete_after_planning(monkeypatch, replay_mod, logs, {p0: 9, p1: 15})
    progress = Progress()
    rows = [
        r
        async for batch in replay_batches(get_settings(), ["agent.messages"], progress=progress)
        for r in batch
    ]
    assert [(r.partition, r.offset) for r in rows] == [(0, 9)]  # 10, 11: markers
    assert progress.lost == [Gap(topic, 0, 0, 9), Gap(topic, 1, 5, 15)]
    assert progress.lost_offsets == 19
    assert progress.done == progress.total == planned  # counted through


def test_the_replay_command_warns_and_exits_3(
    monkeypatch: pytest.MonkeyPatch, logs: dict[TopicPartition, Log], tmp_path: Any
) -> None:
    topic = get_settings().topic("agent.messages")
    delete_after_planning(monkeypatch, replay_mod, logs, {TopicPartition(topic, 0): 9})
    out = tmp_path / "out.jsonl"
    result = invoke(["replay", "--topics", "agent.messages", "--meta", "--out", str(out)])
    assert result.exit_code == 3
    assert screen(result.stderr) == [
        f"WARNING: {topic}:0 offsets 0-8 (9) were deleted (retention or delete-records) "
        "before they could be read: their records are missing",
        f"wrote 10 record(s) to {out}; 9 offset(s) of the range were deleted before they "
        "could be read",
    ]
    assert len(out.read_bytes().splitlines()) == 10  # what was left is written


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["audit", "report", "--format", "json"], {3}),
        (["rebuild", "accepted_by_sender", "--json"], {1, 3}),  # 1 if the tables differ too
    ],
)
def test_report_and_rebuild_warn_too(
    monkeypatch: pytest.MonkeyPatch,
    logs: dict[TopicPartition, Log],
    args: list[str],
    status: set[int],
) -> None:
    topic = get_settings().topic("agent.messages.accepted")
    delete_after_planning(monkeypatch, replay_mod, logs, {TopicPartition(topic, 0): 9})
    result = invoke(args)
    assert result.exit_code in status and result.stdout
    assert screen(result.stderr)[0].startswith(f"WARNING: {topic}:0 offsets 0-8 (9) were")


async def test_verify_reports_offsets_deleted_before_it_read_them(
    monkeypatch: pytest.MonkeyPatch, logs: dict[TopicPartition, Log]
) -> None:
    topic = get_settings().topic(CHAINED_TOPICS[0])
    delete_after_planning(monkeypatch, verify_mod, logs, {TopicPartition(topic, 0): 9})
    reports = await verify(
        get_settings(), [CHAINED_TOPICS[0]], trust=ChainTrust(), require_signatures=False
    )
    by_partition = {r.partition: r for r in reports}
    assert by_partition[0].lost == [Gap(topic, 0, 0, 9)]
    assert [by_partition[0].first_offset, by_partition[0].records] == [9, 1]
    assert by_partition[1].lost == []
    assert summary(reports)["lost"] == [{"topic": topic, "partition": 0, "first": 0, "stop": 9}]


def test_the_verify_command_names_the_offsets_it_could_not_check(
    monkeypatch: pytest.MonkeyPatch, logs: dict[TopicPartition, Log]
) -> None:
    topic = get_settings().topic(CHAINED_TOPICS[0])
    delete_after_planning(monkeypatch, verify_mod, logs, {TopicPartition(topic, 0): 9})
    text = invoke(["audit", "verify", "--topics", CHAINED_TOPICS[0], *TRUST])
    assert text.exit_code == 1
    assert f"{topic}:0  1 record(s)  " in text.stdout
    assert "9 offset(s) NOT CHECKED" in text.stdout
    assert "  LOST      offsets 0-8  deleted (retention or delete-records)" in text.stdout


async def test_until_now_is_the_end_of_the_log_whatever_the_timestamps(
    logs: dict[TopicPartition, Log],
) -> None:
    """`now` (every command's default) ends the read at the log's end when it starts: a
    record is not left out for a timestamp at or past this host's clock — the broker's
    append time may run ahead of it (another host, or the same millisecond), and on a
    topic that keeps the producer's clock a sender can date its record ahead."""
    topic = get_settings().topic("agent.messages")
    ahead = logs[TopicPartition(topic, 0)].records[-1]
    ahead.timestamp = 4_102_444_800_000  # 2100-01-01
    rows = [
        r
        async for batch in replay_batches(get_settings(), ["agent.messages"], until="now")
        for r in batch
    ]
    assert (0, ahead.offset) in [(r.partition, r.offset) for r in rows]
    # an explicit end in the past still ends the range by time: [since, until)
    past = [
        r
        async for batch in replay_batches(
            get_settings(), ["agent.messages"], until=ahead.timestamp - 1
        )
        for r in batch
    ]
    assert (0, ahead.offset) not in [(r.partition, r.offset) for r in past]


# -- records the Kafka client cannot parse (stand-ins, `streams.record_batches`) ------------------
BAD_KEY = "header key b'\\xff\\xfe' is not UTF-8"


class Timed(FakeConsumer):
    """A FakeConsumer that answers offsets-for-times from `answers` ({time: offset})."""

    def __init__(self, logs: dict[TopicPartition, Log], answers: dict[int, int]) -> None:
        super().__init__(logs, [])
        self.answers = answers

    async def offsets_for_times(self, query: dict[TopicPartition, int]) -> dict[Any, Any]:
        return {
            tp: SimpleNamespace(offset=self.answers[ms]) if ms in self.answers else None
            for tp, ms in query.items()
        }


def record(topic: str, offset: int, timestamp: int, value: bytes) -> Any:
    return SimpleNamespace(
        topic=topic, partition=0, offset=offset, timestamp=timestamp, key=b"k", value=value
    )


def batch_stand_in(topic: str, first: int, last: int, timestamp: int) -> Any:
    """What the fetcher hands on for a batch it cannot decode: one record at the batch's
    last offset, stamped with the batch's max timestamp, standing for first..last."""
    value = Unreadable(
        b"raw batch",
        reason="cannot decompress (zstd)",
        first_offset=first,
        last_offset=last,
        whole_batch=True,
    )
    return record(topic, last, timestamp, value)


def record_stand_in(topic: str, offset: int, timestamp: int) -> Any:
    value = Unreadable(b"{}", reason=BAD_KEY, first_offset=offset, last_offset=offset)
    return record(topic, offset, timestamp, value)


def one_partition(topic: str, end: int, records: list[Any]) -> dict[TopicPartition, Log]:
    return {TopicPartition(topic, 0): Log(0, end, records)}


def messages(topic: str, offsets: range, at: Any = lambda off: T0 + off * 1000) -> list[Any]:
    return [record(topic, off, at(off), encode(message(off, "a"))) for off in offsets]


async def replayed(
    monkeypatch: pytest.MonkeyPatch,
    consumer: FakeConsumer,
    since: int | None = None,
    until: int | str = "now",
) -> tuple[list[int], Progress, list[str]]:
    monkeypatch.setattr(replay_mod, "group_less_consumer", lambda *a, **kw: consumer)
    progress, said = Progress(), []
    offsets = [
        r.offset
        async for batch in replay_batches(
            get_settings(),
            ["agent.messages"],
            since,
            until,
            progress=progress,
            on_unreadable=said.append,
        )
        for r in batch
    ]
    return offsets, progress, said


async def test_a_batch_stand_in_across_the_stop_offset_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--until` falls inside a batch the client cannot decode (offsets 4-7): the range
    stops at offset 6, the batch's stand-in sits at 7 and is stamped with the batch's
    max timestamp, past `until`. It used to be dropped as past the stop (and past
    `until`), neither counted nor said: offsets 4 and 5 of the range went missing
    unsaid."""
    prepare_run()
    topic = get_settings().topic("agent.messages")
    until = T0 + 5_500
    log = [*messages(topic, range(4)), batch_stand_in(topic, 4, 7, T0 + 60_000)]
    log += messages(topic, range(8, 10))
    consumer = Timed(one_partition(topic, 10, log), {until: 6})
    offsets, progress, said = await replayed(monkeypatch, consumer, until=until)
    assert offsets == [0, 1, 2, 3]
    assert progress.unreadable == 1
    assert said == [f"{topic}[0] offsets 4..7: cannot decompress (zstd)"]
    assert progress.done == progress.total == 6


async def test_a_stand_in_is_reported_whatever_its_batch_timestamp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch stand-in inside the offset range whose max timestamp is before `since`
    (the producer's clock, CreateTime) is reported: it says nothing of its records'
    times. A record's stand-in carries the record's own time and is filtered as the
    record would be."""
    prepare_run()
    topic = get_settings().topic("agent.messages")
    since = T0 + 2_000
    log = [*messages(topic, range(4)), batch_stand_in(topic, 4, 7, T0 + 500)]
    log += [record_stand_in(topic, 8, T0 + 100), record_stand_in(topic, 9, T0 + 9_000)]
    log += messages(topic, range(10, 12))
    consumer = Timed(one_partition(topic, 12, log), {since: 2})
    offsets, progress, said = await replayed(monkeypatch, consumer, since=since)
    assert offsets == [2, 3, 10, 11]
    assert said == [
        f"{topic}[0] offsets 4..7: cannot decompress (zstd)",
        f"{topic}[0] offset 9: {BAD_KEY}",
    ]
    assert progress.unreadable == 2


def sealed_decisions(topic: str, offsets: range) -> list[Any]:
    prev, out = GENESIS, []
    for off in offsets:
        ev = seal(decision(off), prev)
        prev = ev.payload.hash
        out.append(record(topic, off, T0 + off * 1000, encode(ev)))
    return out


async def test_verify_checks_a_batch_stand_in_across_the_stop_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`audit verify`'s reader (`read_partition`) keeps a batch's stand-in that starts
    before the stop offset too: it used to be cut off as past the stop, and the
    offsets of the range it stands for were never checked nor reported."""
    prepare_run()
    topic = get_settings().topic(CHAINED_TOPICS[0])
    until = T0 + 5_500
    log = [*sealed_decisions(topic, range(4)), batch_stand_in(topic, 4, 7, T0 + 60_000)]
    consumer = Timed(one_partition(topic, 8, log), {until: 6})
    monkeypatch.setattr(verify_mod, "group_less_consumer", lambda *a, **kw: consumer)
    [report] = await verify(
        get_settings(),
        [CHAINED_TOPICS[0]],
        until=until,
        trust=ChainTrust(),
        require_signatures=False,
    )
    assert [(f.kind, f.offset) for f in report.findings] == [("altered", 7)]
    assert "offsets 4..7: cannot decompress (zstd)" in report.findings[0].detail


async def test_verify_has_the_client_hand_on_what_it_cannot_parse(
    monkeypatch: pytest.MonkeyPatch, logs: dict[TopicPartition, Log]
) -> None:
    """Without the stand-ins, the first record of a chained partition the client cannot
    parse failed every fetch of it: the walk ended there, in an error, and the rest of
    the partition was never checked."""
    installed: list[tuple[int, ...]] = []
    monkeypatch.setattr(record_batches, "install", lambda *limits: installed.append(limits))
    await verify(get_settings(), [CHAINED_TOPICS[0]], trust=ChainTrust(), require_signatures=False)
    # with the settings' decompression limits
    settings = get_settings()
    assert installed == [(settings.max_decompressed_batch_bytes, settings.max_compression_ratio)]


def unparseable(logs: dict[TopicPartition, Log], *names: str, offset: int = 8) -> list[str]:
    """Make the record at `offset` of partition 0 of each topic of `names` one the
    client cannot parse (a header key that is not UTF-8): what it is described as."""
    said = []
    for name in names:
        topic = get_settings().topic(name)
        for rec in logs[TopicPartition(topic, 0)].records:
            if rec.offset == offset:
                rec.value = Unreadable(
                    rec.value, reason=BAD_KEY, first_offset=offset, last_offset=offset
                )
        said.append(f"{topic}[0] offset {offset}: {BAD_KEY}")
    return said


@pytest.mark.parametrize(
    ("args", "command", "names", "status"),
    [
        (["replay", "--topics", "agent.messages"], "replay", ["agent.messages"], {3}),
        (
            ["audit", "report", "--format", "json"],
            "audit report",
            ["agent.messages", "agent.messages.accepted"],
            {3},
        ),
        # 1 when the tables differ too (they do here: the fake changelog holds no table)
        (["rebuild", "accepted_by_sender", "--json"], "rebuild", ["agent.messages.accepted"], {1}),
    ],
)
def test_every_history_command_names_what_it_cannot_parse(
    logs: dict[TopicPartition, Log],
    args: list[str],
    command: str,
    names: list[str],
    status: set[int],
) -> None:
    """A line on stderr per record the Kafka client cannot parse, as the read meets it,
    and their count after it; the output is written, and the command exits 3 as when
    records were deleted: its output exists and lacks records of the range. `audit
    report` used to leave them to the log and exit 0, `replay` exited 0."""
    said = unparseable(logs, *names)
    result = invoke(args)
    assert result.exit_code in status and result.stdout
    lines = screen(result.stderr)
    prefix = f"{command}: skipped a record the Kafka client cannot parse: "
    assert [line.removeprefix(prefix) for line in lines if line.startswith(prefix)] == said
    assert lines[-1] == f"skipped {len(said)} record(s) the Kafka client cannot parse"


def test_the_report_itself_says_what_it_could_not_count(
    monkeypatch: pytest.MonkeyPatch, logs: dict[TopicPartition, Log]
) -> None:
    accepted = get_settings().topic("agent.messages.accepted")
    delete_after_planning(monkeypatch, replay_mod, logs, {TopicPartition(accepted, 0): 3})
    said = unparseable(logs, "agent.messages")
    result = invoke(["audit", "report", "--format", "json"])
    assert result.exit_code == 3
    data = json.loads(result.stdout)
    assert data["unreadable_records"] == 1 and data["unreadable"] == said
    assert data["lost"] == [{"topic": accepted, "partition": 0, "first": 0, "stop": 3}]
    assert data["lost_offsets"] == 3


def test_rebuild_exits_3_when_equal_tables_lack_what_could_not_be_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prepare_run()

    async def compare_all(settings: Any, names: Any, *, progress: Progress, **kw: Any) -> Any:
        progress.unreadable += 1
        kw["on_unreadable"]("t[0] offset 8: why")
        return [rebuild_mod.Comparison("accepted_by_sender", "d", "d", 1, 1)]

    monkeypatch.setattr(rebuild_mod, "compare_all", compare_all)
    result = invoke(["rebuild", "accepted_by_sender", "--json"])
    assert result.exit_code == 3
    assert screen(result.stderr) == [
        "rebuild: skipped a record the Kafka client cannot parse: t[0] offset 8: why",
        "skipped 1 record(s) the Kafka client cannot parse",
    ]


async def test_rebuild_reads_a_changelog_past_what_it_cannot_parse(
    logs: dict[TopicPartition, Log],
) -> None:
    """A changelog record the client cannot parse is neither a value nor a delete of its
    key: skipped, counted and said (it used to be folded as a value)."""
    topic = rebuild_mod.changelog_topic(get_settings(), "accepted_by_sender")
    # k1: deleted at offset 4, set at 7 by a record whose header key is not UTF-8
    [rec] = [r for r in logs[TopicPartition(topic, 0)].records if r.offset == 7]
    rec.value = Unreadable(rec.value, reason=BAD_KEY, first_offset=7, last_offset=7)
    progress, said = Progress(), []
    state = await rebuild_mod.read_changelog(
        get_settings(), "accepted_by_sender", progress=progress, on_unreadable=said.append
    )
    assert state == {"k0": {"n": 3}}  # k1 is not set by what was not read
    assert said == [f"{topic}[0] offset 7: {BAD_KEY}"]
    assert progress.unreadable == 1
