"""Progress of the commands that read whole topics, without a broker.

The readers (replay, audit verify, report, rebuild) count into a `Progress` from a fake
consumer whose partitions have expired heads, compacted gaps and trailing transaction
markers; the counter must reach the offset total and never pass it. The bar
(`streams.cli.progress`) is drawn only on a terminal or with --progress, never on stdout:
each command's stdout is byte-identical with and without it.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from click.testing import CliRunner, Result

import agentstream.agents.audit.cli  # noqa: F401  (registers `audit` and `rebuild`)
import agentstream.agents.audit.rebuild as rebuild_mod
import agentstream.agents.audit.report as report_mod
import agentstream.agents.audit.verify as verify_mod
import agentstream.streams.cli.progress as progress_mod
import agentstream.streams.replay as replay_mod
from agentstream.agents.audit.rebuild import changelog_topic, compare_all
from agentstream.agents.audit.report import REPORT_TOPICS, build_report
from agentstream.agents.audit.verify import CHAINED_TOPICS, ChainTrust, verify
from agentstream.schemas import AgentMessage, Event, encode
from agentstream.streams.cli import cli, prepare_run
from agentstream.streams.cli.progress import ProgressBar, is_terminal, run_with_progress
from agentstream.streams.errors import BrokerError
from agentstream.streams.replay import Progress, replay_batches
from agentstream.streams.settings import get_settings
from agentstream.streams.signing import new_private_key, public_b64

T0 = 1_767_225_600_000  # 2026-01-01, in the past of any `--until now`
TABLE = "accepted_by_sender"


class Log:
    """One partition: the offsets [begin, end) of which `records` are still there."""

    def __init__(self, begin: int, end: int, records: list[Any]) -> None:
        self.begin, self.end, self.records = begin, end, records


def message(i: int, sender: str) -> Event[Any]:
    inp = Event.of(
        AgentMessage(message_id=f"m{i}", sender_id=sender, recipient_id="r", content="hi"),
        source=sender,
    )
    return inp.caused(inp.payload, source="enforce_policy")


def partition(topic: str, p: int, begin: int, end: int, skip: set[int], values: Any) -> Log:
    """Records at [begin, end) less `skip` (compacted away, or transaction markers)."""
    records = [
        SimpleNamespace(
            topic=topic,
            partition=p,
            offset=off,
            timestamp=T0 + off * 1000 + p,
            key=f"k{off % 3}".encode(),
            value=values(off),
        )
        for off in range(begin, end)
        if off not in skip
    ]
    return Log(begin, end, records)


def cluster() -> dict[TopicPartition, Log]:
    s = get_settings()
    out: dict[TopicPartition, Log] = {}

    def values(name: str, sender: str) -> Any:
        def value(off: int) -> bytes:
            if off == 7:
                return b"not json"
            if name in ("agent.messages", "agent.messages.accepted"):
                return encode(message(off, sender))
            return orjson.dumps({"offset": off})  # JSON, but no event

        return value

    for name in (*REPORT_TOPICS, *CHAINED_TOPICS):
        topic = s.topic(name)
        # p0: from offset 0, a compacted gap, two trailing transaction markers; p1: its
        # head expired (begins at 5); both hold an undecodable record (offset 7)
        gaps = {4, 5, 10, 11}
        out[TopicPartition(topic, 0)] = partition(topic, 0, 0, 12, gaps, values(name, "a"))
        out[TopicPartition(topic, 1)] = partition(topic, 1, 5, 15, {9}, values(name, "b"))
    accepted = s.topic("agent.messages.accepted")
    out[TopicPartition(accepted, 2)] = partition(accepted, 2, 0, 0, set(), values("", "c"))
    log = changelog_topic(s, TABLE)
    out[TopicPartition(log, 0)] = partition(
        log, 0, 3, 9, {6}, lambda off: orjson.dumps({"n": off}) if off % 4 else None
    )
    return out


def span(logs: dict[TopicPartition, Log], topics: list[str]) -> int:
    return sum(lg.end - lg.begin for tp, lg in logs.items() if tp.topic in topics)


class FakeConsumer:
    """The calls of aiokafka's consumer the readers make, over `Log`s: fetches return at
    most 3 records per partition, a partition's position passes offsets without a
    record (gaps, markers) as Kafka's does, and a fetch below a log's start fails out of
    range (Kafka's answer, which a reader with auto_offset_reset="none" sees)."""

    def __init__(self, logs: dict[TopicPartition, Log], seen: list[tuple[int, int]]) -> None:
        self.logs = logs
        self.seen = seen  # (done, total) of the watched Progress at each fetch
        self.pos: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.watched: Progress | None = None
        self._client = SimpleNamespace(force_metadata_update=self._noop)

    async def _noop(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        parts = {tp.partition for tp in self.logs if tp.topic == topic}
        return parts or None

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.logs[tp].begin for tp in tps}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.logs[tp].end for tp in tps}

    async def offsets_for_times(self, query: dict[TopicPartition, int]) -> dict[Any, Any]:
        return {tp: None for tp in query}  # every record is older than `until`

    def assign(self, tps: list[TopicPartition]) -> None:
        self.pos = {tp: self.pos.get(tp, self.logs[tp].begin) for tp in tps}
        self.paused.clear()

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.pos[tp] = offset

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.pos[tp] = self.logs[tp].begin

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    async def position(self, tp: TopicPartition) -> int:
        return self.pos[tp]

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]:
        if self.watched is not None:
            self.seen.append((self.watched.done, self.watched.total))
        out = {}
        fetched = [tp for tp in tps or tuple(self.pos) if tp in self.pos and tp not in self.paused]
        gone = {tp: self.pos[tp] for tp in fetched if self.pos[tp] < self.logs[tp].begin}
        if gone:
            raise OffsetOutOfRangeError(gone)
        for tp in fetched:
            log = self.logs[tp]
            recs = [r for r in log.records if r.offset >= self.pos[tp]][:3]
            self.pos[tp] = recs[-1].offset + 1 if recs else log.end
            if recs:
                out[tp] = recs
        return out


@pytest.fixture
def fake_kafka(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeConsumer]:
    """Every reader's consumer is one FakeConsumer over `cluster()`; the tables are
    registered (the agents loaded), as a command has them."""
    prepare_run()
    consumer = FakeConsumer(cluster(), [])
    for module in (replay_mod, verify_mod, rebuild_mod):
        monkeypatch.setattr(module, "group_less_consumer", lambda *a, **kw: consumer)
    yield consumer


def check_counted(consumer: FakeConsumer, progress: Progress, expected: int) -> None:
    assert expected > 0
    assert progress.total == expected
    assert progress.done == expected
    assert consumer.seen, "the fake consumer was never read"
    dones = [d for d, _ in consumer.seen]
    assert dones == sorted(dones), "the counter went backwards"
    assert all(d <= t for d, t in consumer.seen), f"counted past the total: {consumer.seen}"
    assert any(0 < d < expected for d in dones), "the counter moved only at the end"


# -- the counter, fed by each reader ----------------------------------------------------------
async def test_replay_counts_every_offset_of_the_total(fake_kafka: FakeConsumer) -> None:
    progress = fake_kafka.watched = Progress()
    topics = ["agent.messages", "llm.responses"]
    rows = [
        rec
        async for batch in replay_batches(get_settings(), topics, progress=progress)
        for rec in batch
    ]
    names = replay_mod.full_topic_names(get_settings(), topics)
    check_counted(fake_kafka, progress, span(fake_kafka.logs, names))
    assert progress.emitted == len(rows) == 2 * (8 + 9)  # records, not offsets


async def test_verify_counts_the_offsets_of_its_ranges(fake_kafka: FakeConsumer) -> None:
    progress = fake_kafka.watched = Progress()
    reports = await verify(
        get_settings(),
        CHAINED_TOPICS,
        trust=ChainTrust(),
        require_signatures=False,
        progress=progress,
    )
    names = replay_mod.full_topic_names(get_settings(), CHAINED_TOPICS)
    check_counted(fake_kafka, progress, span(fake_kafka.logs, names))
    assert sum(r.records for r in reports) == 2 * (8 + 9)


async def test_report_counts_the_offsets_of_its_topics(fake_kafka: FakeConsumer) -> None:
    progress = fake_kafka.watched = Progress()
    data = await build_report(get_settings(), progress=progress)
    names = replay_mod.full_topic_names(get_settings(), REPORT_TOPICS)
    check_counted(fake_kafka, progress, span(fake_kafka.logs, names))
    assert data["totals"]["sent"] == 7 + 8  # the undecodable records left out


async def test_rebuild_counts_sources_and_changelog(fake_kafka: FakeConsumer) -> None:
    progress = fake_kafka.watched = Progress()
    [result] = await compare_all(get_settings(), [TABLE], progress=progress)
    s = get_settings()
    read = [s.topic("agent.messages.accepted"), changelog_topic(s, TABLE)]
    expected = span(fake_kafka.logs, read)
    check_counted(fake_kafka, progress, expected)
    assert progress.stage == TABLE
    assert result.live_available and result.live_size > 0


def test_the_counter_adds_reads_up() -> None:
    p = Progress()
    p.plan([10, 0, -3])  # an empty or inverted range counts nothing
    p.advance(4)
    p.advance(-2)
    p.plan([5])
    p.advance(11)
    assert (p.done, p.total) == (15, 15)


# -- the bar ----------------------------------------------------------------------------------
def test_is_terminal_only_for_a_tty() -> None:
    leader, follower = os.openpty()
    tty = open(follower, "w", encoding="utf-8")  # noqa: SIM115
    try:
        assert is_terminal(tty)
    finally:
        tty.close()
        os.close(leader)
    assert not is_terminal(tty)  # closed
    r, w = os.pipe()
    with open(w, "w", encoding="utf-8") as pipe:
        assert not is_terminal(pipe)
    os.close(r)
    assert not is_terminal(io.StringIO())


def test_the_bar_shows_read_of_total_written_rate_and_eta() -> None:
    p = Progress()
    out = io.StringIO()
    bar = ProgressBar(p, out, desc="replay", written=True)
    bar.refresh()
    assert out.getvalue().split("\r")[-1].startswith("replay:   0%|")
    assert "| 0/? read, 0 written [" in out.getvalue()  # no total before the plan
    p.plan([40_000])
    p.advance(10_000)
    p.emitted = 7_500
    p.stage = "agent.messages"
    bar.refresh()
    line = out.getvalue().split("\r")[-1]
    assert re.search(r"^replay agent.messages:  25%\|.*\| 10,000/40,000 read, 7,500 written", line)
    assert re.search(r"\[\d\d:\d\d<[\d:?]+, [\d.?]+[kMG]? rec/s\]$", line), line  # ETA, rate
    bar.close()
    assert out.getvalue().endswith("\n")  # the last state stays on its own line


def test_a_bar_that_counted_nothing_is_erased() -> None:
    async def fails() -> None:
        raise BrokerError("no broker at 127.0.0.1:1")

    async def reads(progress: Progress, spans: list[int]) -> None:
        progress.plan(spans)
        progress.advance(sum(spans))

    failed, empty, read = io.StringIO(), io.StringIO(), io.StringIO()
    with pytest.raises(Exception, match="no broker"):
        run_with_progress(fails(), Progress(), True, desc="verify", stream=failed)
    p = Progress()
    run_with_progress(reads(p, [0, 0]), p, True, desc="verify", stream=empty)
    for out in (failed, empty):
        assert "verify:" in out.getvalue()  # it was drawn ...
        assert screen(out.getvalue()) == []  # ... and erased
    p = Progress()
    run_with_progress(reads(p, [3, 4]), p, True, desc="verify", stream=read)
    assert screen(read.getvalue())[-1].startswith("verify: 100%|")


# -- the commands: stdout the same with and without the bar -----------------------------------
KEY = new_private_key()

COMMANDS: dict[str, list[str]] = {
    "replay": ["replay", "--topics", "agent.messages,comms.records"],
    "verify": ["audit", "verify", "--json", "--trust-key", f"k1={public_b64(KEY)}"],
    "verify-text": ["audit", "verify", "--trust-key", f"k1={public_b64(KEY)}"],
    "report-json": ["audit", "report", "--format", "json", "--until", "2026-06-01T00:00:00Z"],
    "report-html": ["audit", "report", "--until", "2026-06-01T00:00:00Z"],
    "rebuild": ["rebuild", TABLE, "--json"],
}


class FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz: Any = None) -> FrozenDatetime:
        return cls(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each command run reads the same records with a consumer of its own; a report's
    `generated_at` is fixed."""
    monkeypatch.setattr(report_mod, "datetime", FrozenDatetime)
    logs = cluster()

    def consumer(*a: Any, **kw: Any) -> FakeConsumer:
        return FakeConsumer(logs, [])

    for module in (replay_mod, verify_mod, rebuild_mod):
        monkeypatch.setattr(module, "group_less_consumer", consumer)
    yield


def invoke(args: list[str]) -> Result:
    result = CliRunner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def screen(text: str) -> list[str]:
    """The non-blank lines a terminal shows of `text`: a carriage return goes back to
    the start of the line, and what follows overwrites it."""
    shown = []
    for line in text.split("\n"):
        cells: list[str] = []
        for part in line.split("\r"):
            cells[: len(part)] = part
        if "".join(cells).strip():
            shown.append("".join(cells).rstrip())
    return shown


def drawn(stderr: str) -> bool:
    return bool(re.search(r"\d+%\|.*\| \S+/\S+ read", stderr))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_stdout_is_the_same_with_and_without_the_bar(commands: None, name: str) -> None:
    args = COMMANDS[name]
    plain = invoke(args)  # CliRunner's stderr is no terminal: no bar
    forced = invoke([*args, "--progress"])
    off = invoke([*args, "--no-progress"])
    assert plain.stdout_bytes, "the command wrote nothing to stdout"
    assert forced.stdout_bytes == plain.stdout_bytes == off.stdout_bytes
    assert forced.exit_code == plain.exit_code == off.exit_code
    assert not drawn(plain.stderr) and not drawn(off.stderr)
    assert drawn(forced.stderr), forced.stderr
    assert "100%" in forced.stderr  # every offset counted
    assert not drawn(forced.stdout)


@pytest.mark.parametrize("name", ["verify", "report-json"])
def test_the_bar_is_drawn_by_default_on_a_terminal(
    commands: None, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(progress_mod, "is_terminal", lambda stream: True)
    assert drawn(invoke(COMMANDS[name]).stderr)
    assert not drawn(invoke([*COMMANDS[name], "--no-progress"]).stderr)


def test_a_report_file_is_the_same_with_and_without_the_bar(commands: None, tmp_path: Path) -> None:
    with_bar, without = tmp_path / "a.json", tmp_path / "b.json"
    until = ["--until", "2026-06-01T00:00:00Z"]
    assert drawn(invoke(["audit", "report", *until, "--out", str(with_bar), "--progress"]).stderr)
    invoke(["audit", "report", *until, "--out", str(without)])
    assert with_bar.read_bytes() == without.read_bytes()
    assert orjson.loads(with_bar.read_bytes())["totals"]["sent"] == 15


def test_a_broker_error_under_the_bar_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_broker(*a: Any, **kw: Any) -> Any:
        raise BrokerError("no broker answering at 127.0.0.1:1")

    monkeypatch.setattr(replay_mod, "group_less_consumer", no_broker)
    result = CliRunner().invoke(cli, ["audit", "report", "--format", "json", "--progress"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "report:" in result.stderr  # the bar was drawn, then erased:
    assert screen(result.stderr) == ["Error: BrokerError: no broker answering at 127.0.0.1:1"]
    assert result.stdout == ""
