"""The heartbeat agent's fold of `agent.heartbeats` records, without Kafka: what a sender
controls (its clock, the record's key and partition, how many agent ids it invents) and
what it must not be able to do with it. Driven through `agents.heartbeat.agent._fold`,
the function the worker calls for every record; the table is a dict, the clock fake."""

from __future__ import annotations

import logging
import math
import random
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

import agentstream.agents.heartbeat.agent as hb
import agentstream.streams.processing as processing
from agentstream.agents.audit.rebuild import _fold_into
from agentstream.agents.heartbeat.monitor import HeartbeatMonitor, Transition, to_event_payload
from agentstream.schemas import AgentStatusChanged, Event, Heartbeat
from agentstream.streams.app import settings
from agentstream.streams.observability import TABLE_FULL, Throttled
from agentstream.streams.processing import Inbound
from agentstream.streams.tables import Origin, TableSpec, origin_of
from agentstream.streams.tables.llm import partition_of
from agentstream.streams.tables.monitoring import (
    HEARTBEATS,
    TableFull,
    fold_heartbeat,
    fold_sample,
    fold_status,
    heartbeat_index,
    invalidate_indexes,
    make_heartbeat_fold,
)

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class World:
    """The agent's module state around one fold: its table (a dict), its monitor (fake
    clock), what it published and what it dead-lettered."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **bounds: Any) -> None:
        #: the table's bounds (`expire_s`, `max_agents`); none by default
        self.bounds = bounds
        self.clock = Clock()
        self.table: dict[str, Any] = {}
        self.published: list[Transition] = []
        self.dead: list[tuple[Any, BaseException]] = []
        self.offsets: dict[int, int] = {}
        #: every record folded, as a rebuild reads it
        self.log: list[tuple[Event[Any], Origin]] = []
        self.status_offsets = 0
        self.monitor = self.new_monitor()
        monkeypatch.setattr(hb, "monitor", self.monitor)
        monkeypatch.setattr(hb, "writer", SimpleNamespace(at=lambda p: self.table))
        monkeypatch.setattr(hb, "_watermark", {})
        monkeypatch.setattr(hb.gate, "open", True)

        async def publish(transitions: list[Transition], cause: Any = None) -> None:
            self.published += transitions

        async def dead_letter(msg: Any, exc: BaseException, consumer: str) -> None:
            self.dead.append((msg, exc))

        monkeypatch.setattr(hb, "_publish", publish)
        monkeypatch.setattr(processing, "_EOS", False)
        monkeypatch.setattr(processing, "dead_letter", dead_letter)
        if hasattr(hb, "dead_letter"):
            monkeypatch.setattr(hb, "dead_letter", dead_letter)
        if hasattr(hb, "full_warning"):  # a fresh throttle: one warning per test
            monkeypatch.setattr(hb, "full_warning", Throttled(hb.log))

    def new_monitor(self) -> HeartbeatMonitor:
        """A monitor over the same table with an empty memory (a restarted worker)."""
        return HeartbeatMonitor(
            self.table,
            interval_s=5.0,
            timeout_s=15.0,
            max_missed=3,
            clock=self.clock,
            **self.bounds,
        )

    async def beat(
        self,
        agent: str,
        *,
        sent_at: float | None = None,
        seq: int = 0,
        partition: int | None = None,
        offset: int | None = None,
        at: float | None = None,
        key: bytes | None = None,
    ) -> None:
        """A heartbeat appended by the broker now (`clock.t`, or `at`), read at the next
        offset (or `offset`: a redelivery) of its partition (or `partition`), as the
        worker does (`guarded`: what fails is dead-lettered)."""
        p = partition if partition is not None else home(agent)
        if offset is None:
            offset = self.offsets.get(p, 0)
            self.offsets[p] = offset + 1
        hbeat = Heartbeat(
            agent_id=agent,
            sent_at=datetime.fromtimestamp(self.clock.t if sent_at is None else sent_at, UTC),
            sequence=seq,
        )
        msg = SimpleNamespace(
            topic=hb.HEARTBEATS_TOPIC,
            partition=p,
            offset=offset,
            timestamp=self.clock.t if at is None else at,
            key=agent.encode() if key is None else key,
        )
        event = Event.of(hbeat, source=agent)
        self.log.append((event, origin_of(msg, "agent.heartbeats")))
        await hb.guarded(Inbound(event, msg), hb.CONSUMER, hb._fold)

    def confirm(self) -> list[Transition]:
        """What the worker does next: the published transitions are folded back."""
        done, self.published = self.published, []
        for tr in done:
            change = to_event_payload(tr)
            origin = Origin(
                "agent.status",
                home(tr.agent_id),
                self.status_offsets,
                self.clock.t,
                tr.agent_id.encode(),
                settings.topic_partitions,
            )
            self.status_offsets += 1
            self.monitor.record_status(change, origin)
            self.log.append((Event.of(change, source="test"), origin))
        return done

    def rebuilt(self) -> dict[str, Any]:
        """What `agentstream rebuild agent_heartbeats` makes of the records folded."""
        return self.rebuilt_from(self.log)

    def rebuilt_from(self, log: list[tuple[Event[Any], Origin]]) -> dict[str, Any]:
        spec = HEARTBEATS
        if self.bounds:  # the registered spec has the settings' bounds
            spec = TableSpec(
                name="t",
                sources=HEARTBEATS.sources,
                apply_at=make_heartbeat_fold(
                    self.bounds.get("expire_s", math.inf), self.bounds.get("max_agents")
                ),
            )
        state: dict[str, Any] = {}
        _fold_into(state, spec, log)
        return state

    def check(self) -> list[Transition]:
        self.published += self.monitor.check()
        return self.confirm()


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    return World(monkeypatch)


def home(agent: str) -> int:
    """The partition a producer with Kafka's default partitioner puts `agent`'s beats in."""
    return partition_of(agent, settings.topic_partitions)


def in_partition(p: int, n: int, prefix: str = "agent") -> list[str]:
    """`n` agent ids whose heartbeats go to partition `p`."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        if home(f"{prefix}-{i}") == p:
            out.append(f"{prefix}-{i}")
        i += 1
    return out


def states(trs: list[Transition]) -> list[tuple[str, str]]:
    return [(t.agent_id, t.current) for t in trs]


# -- ordering by the broker's clock -----------------------------------------------------------
async def test_an_agent_whose_clock_was_set_back_stays_up(world: World) -> None:
    # its clock ran an hour ahead, then NTP set it right: the later heartbeats were
    # ignored (not newer by sent_at) and the agent reported down while it kept beating
    await world.beat("a", sent_at=T0 + 3600)
    assert states(world.confirm()) == [("a", "up")]
    for _ in range(6):
        world.clock.t += 5
        await world.beat("a")  # sent_at = the right time, an hour before the first one
        assert world.check() == []
    assert world.table["a"]["last_heartbeat_at"] == world.clock.t
    assert world.table["a"]["sent_at"] == world.clock.t  # kept, as information
    world.clock.t += 16
    assert states(world.check()) == [("a", "down")]
    assert world.rebuilt() == world.table


async def test_a_future_sent_at_keeps_nobody_up_after_a_restart(world: World) -> None:
    # one heartbeat dated a day ahead, then silence: judged by sent_at after a restart
    # (no receive time in memory), the agent stayed up for a day
    await world.beat("a", sent_at=T0 + 86_400)
    assert states(world.confirm()) == [("a", "up")]
    world.clock.t += 30
    world.monitor = world.new_monitor()
    hb.monitor = world.monitor
    assert states(world.check()) == [("a", "down")]


async def test_a_redelivered_heartbeat_counts_once(world: World) -> None:
    await world.beat("a", seq=1)
    world.clock.t += 5
    await world.beat("a", seq=2)
    # a crash before the commit: both are read again, as they are in the log
    world.clock.t += 5
    await world.beat("a", seq=1, offset=0, at=T0)
    await world.beat("a", seq=2, offset=1, at=T0 + 5)
    rec = world.table["a"]
    assert (rec["beats"], rec["sequence"], rec["offset"]) == (2, 2, 1)
    assert rec["last_heartbeat_at"] == T0 + 5


# -- the record's key and partition -----------------------------------------------------------
async def test_a_heartbeat_keyed_for_another_agent_is_a_dead_letter(world: World) -> None:
    # keyed "mallory", it sits in mallory's partition, where another worker than the
    # victim's may judge the victim: two monitors of one agent, its status flapping
    await world.beat("victim", key=b"mallory", partition=home("mallory"))
    assert "victim" not in world.table and world.published == []
    ((msg, exc),) = world.dead
    assert msg.key == b"mallory"
    assert "key mismatch" in str(exc) and "'victim'" in str(exc) and "mallory" in str(exc)
    await world.beat("victim")  # its own heartbeats go on as before
    assert world.table["victim"]["beats"] == 1 and len(world.dead) == 1
    world.confirm()
    assert world.rebuilt() == world.table  # the rebuild refuses it too


async def test_a_heartbeat_in_another_partition_than_its_key_is_a_dead_letter(
    world: World,
) -> None:
    # the right key, another partitioner (librdkafka's default) or an explicit partition
    assert settings.topic_partitions > 1
    elsewhere = (home("a") + 1) % settings.topic_partitions
    await world.beat("a", partition=elsewhere)
    assert "a" not in world.table
    ((_msg, exc),) = world.dead
    assert f"partition {elsewhere}" in str(exc) and f"partition {home('a')}" in str(exc)
    assert "murmur2" in str(exc)
    assert world.rebuilt() == world.table == {}


async def test_our_producers_key_heartbeats_by_agent_id() -> None:
    # the SDK (and `agentstream publish`, the demo, which use it) sends an event under
    # its key; aiokafka's default partitioner is murmur2, as the fold checks
    from aiokafka.partitioner import DefaultPartitioner

    beat = Event.of(Heartbeat(agent_id="agent-7", sent_at=datetime.now(UTC)), source="x")
    assert beat.key == "agent-7"
    parts = list(range(settings.topic_partitions))
    assert DefaultPartitioner()(b"agent-7", parts, parts) == home("agent-7")


# -- bounds: expiry and a cap, by the partition's append clock -------------------------------
async def test_invented_agent_ids_fill_a_partition_up_to_its_bound_and_no_further(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a sender inventing an agent id per heartbeat grew the table (memory, changelog,
    # restore time, the check's scan) without bound
    world = World(monkeypatch, max_agents=50)
    await world.beat("victim")
    assert states(world.confirm()) == [("victim", "up")]
    refused_before = TABLE_FULL.labels("agent_heartbeats")._value.get()
    with caplog.at_level(logging.WARNING, logger=hb.log.name):
        for i in range(10_000):
            await world.beat(f"x{i}")
            if i % 1000 == 999:  # the victim keeps beating through the flood
                world.clock.t += 5
                await world.beat("victim")
                world.check()
    per_partition: dict[int, int] = {}
    for rec in world.table.values():
        per_partition[rec["partition"]] = per_partition.get(rec["partition"], 0) + 1
    assert max(per_partition.values()) == 50
    assert len(world.table) <= 50 * settings.topic_partitions
    # what was refused is a dead letter saying why, counted and warned about once
    assert len(world.dead) == 10_001 - len(world.table)
    assert all(isinstance(exc, TableFull) for _, exc in world.dead)
    assert "table full" in str(world.dead[0][1])
    assert "AGENTSTREAM_HEARTBEAT_MAX_AGENTS_PER_PARTITION" in str(world.dead[0][1])
    refused = TABLE_FULL.labels("agent_heartbeats")._value.get() - refused_before
    assert refused == len(world.dead)
    warned = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    # the agents it held are judged as before: the flood cannot push the victim out
    assert world.table["victim"]["beats"] == 11
    world.clock.t += 10
    assert "victim" not in {a for a, _ in states(world.check())}
    assert world.rebuilt() == world.table


async def test_an_agent_gone_for_good_leaves_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(monkeypatch, expire_s=1000.0)
    gone, alive = in_partition(0, 2)
    (elsewhere,) = in_partition(1, 1)
    for agent in (gone, alive, elsewhere):
        await world.beat(agent)
    world.confirm()
    downs = []
    while world.clock.t < T0 + 1100:
        world.clock.t += 5
        await world.beat(alive)
        downs += world.check()
    # published down long before, then removed by partition 0's clock (its newest
    # append time), from the table (a tombstone) and from the monitor's memory
    assert {(t.agent_id, t.current) for t in downs} == {(gone, "down"), (elsewhere, "down")}
    assert gone not in world.table and alive in world.table
    assert gone not in world.monitor.pending and gone not in world.monitor.owed
    # partition 1 got no record since: its clock did not move, nothing of it expires
    assert world.table[elsewhere]["status"] == "down"
    # a rebuild equals it, whichever way it merges the two topics
    beats = [x for x in world.log if isinstance(x[0].payload, Heartbeat)]
    changes = [x for x in world.log if not isinstance(x[0].payload, Heartbeat)]
    assert world.rebuilt() == world.table
    assert world.rebuilt_from(beats + changes) == world.table
    assert world.rebuilt_from(changes + beats) == world.table


async def test_an_agent_up_when_its_entry_expires_is_published_down_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the worker was away for longer than the expiry: the agent's "down" was never
    # decided, and its last event on agent.status says "up"
    world = World(monkeypatch, expire_s=1000.0)
    a, b = in_partition(0, 2)
    await world.beat(a)
    assert states(world.confirm()) == [(a, "up")]
    world.clock.t += 2000
    world.monitor = world.new_monitor()  # restarted
    hb.monitor = world.monitor
    # the first records of the partition since: its clock catches up (a tenth of the
    # expiry per record, `advance_clock`) and a's entry expires
    for _ in range(20):
        await world.beat(b)
    # kept in the table for its owed "down", outside the bound's count
    assert world.table[a]["owed_since"] is not None
    assert heartbeat_index(world.table).agents(0) == 1
    assert states(world.confirm()) == [(b, "up")]
    # a crash (or a rebalance) before the next check does not lose it: it is table state
    world.monitor = world.new_monitor()
    hb.monitor = world.monitor
    trs = world.check()
    assert states(trs) == [(a, "down")]
    (down,) = [t for t in trs if t.agent_id == a]
    assert (down.previous, down.reason, down.last_heartbeat_at) == ("up", "timeout", T0)
    assert a not in world.table  # folded back, the entry goes
    world.clock.t += 5
    await world.beat(b)
    assert world.check() == [] and world.monitor.owed == {}
    # back again, it is a new agent
    await world.beat(a)
    (back,) = world.confirm()
    assert (back.agent_id, back.previous, back.current, back.reason) == (
        a,
        None,
        "up",
        "first_seen",
    )
    beats = [x for x in world.log if isinstance(x[0].payload, Heartbeat)]
    changes = [x for x in world.log if not isinstance(x[0].payload, Heartbeat)]
    assert world.rebuilt() == world.table
    assert world.rebuilt_from(beats + changes) == world.table
    assert world.rebuilt_from(changes + beats) == world.table


def test_the_fold_never_scans_the_table() -> None:
    # per heartbeat the bounds cost O(1) amortized: no pass over the table's entries
    class Watched(dict[str, Any]):
        scans = 0

        def __iter__(self) -> Any:
            Watched.scans += 1
            return super().__iter__()

        def items(self) -> Any:
            Watched.scans += 1
            return super().items()

        def keys(self) -> Any:
            Watched.scans += 1
            return super().keys()

        def values(self) -> Any:
            Watched.scans += 1
            return super().values()

    state = Watched()
    for i in range(20_000):
        fold_heartbeat(
            state, f"a{i % 5000}", at=T0 + i, partition=0, offset=i, expire_s=100.0, max_agents=4000
        )
    assert Watched.scans <= 1  # the index, built once from the (empty) table
    # a beat a second, 5,000 agents round-robin: each seen every 5,000 s, kept 100 s
    assert len(state) == 101


@pytest.mark.parametrize("seed", [7, 8, 9])
async def test_a_rebuild_equals_the_table_however_it_merges_the_partitions(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # Agents come, fall silent, go for good, come back after their entry expired, and a
    # new one is refused in a full partition; the worker restarts (its indexes rebuilt
    # from the table). A rebuild keeps each partition's order but may merge the
    # partitions of the two topics any way (their brokers' clocks apart).
    rng = random.Random(seed)
    world = World(monkeypatch, expire_s=300.0, max_agents=6)
    agents = in_partition(0, 8) + in_partition(1, 8)
    quiet: dict[str, float] = {}
    for step in range(400):
        if step == 200:
            invalidate_indexes(world.table)  # restored from the changelog
            world.monitor = world.new_monitor()
            hb.monitor = world.monitor
        world.clock.t += 5
        for agent in agents:
            if quiet.get(agent, 0) > world.clock.t:
                continue
            if rng.random() < 0.01:  # silent for a while: down, or gone for good
                quiet[agent] = world.clock.t + rng.choice([30.0, 200.0, 400.0, 10_000.0])
                continue
            if rng.random() < 0.7:
                await world.beat(agent)
        world.check()
    # the story happened: refusals, agents down, entries expired
    assert world.dead and any(getattr(e.payload, "current", "") == "down" for e, _ in world.log)
    assert len(world.table) < len(agents)
    streams: dict[tuple[str, int], list[tuple[Event[Any], Origin]]] = {}
    for item in world.log:
        streams.setdefault((item[1].topic, item[1].partition), []).append(item)
    for _merge in range(20):
        queues = [list(q) for q in streams.values()]
        merged = []
        while any(queues):
            q = rng.choice([q for q in queues if q])
            merged.append(q.pop(0))
        assert world.rebuilt_from(merged) == world.table


def test_a_throttled_warning_says_how_many_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock(0.0)
    warn = Throttled(logging.getLogger("t.throttled"), every_s=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.throttled"):
        assert warn.warning("full: %s", "a")
        assert not warn.warning("full: %s", "b") and not warn.warning("full: %s", "c")
        clock.t = 61.0
        assert warn.warning("full: %s", "d")
    assert [r.getMessage() for r in caplog.records] == [
        "full: a",
        "full: d (2 more since the last such warning)",
    ]


# -- one record dated ahead (a broker's clock stepping forward once, CreateTime) ------------
DAY = 86400.0


def test_one_heartbeat_dated_days_ahead_neither_expires_the_partition_nor_keeps_it_up() -> None:
    """A broker's clock steps 8 days forward for one append and is set right: before,
    the partition's clock jumped there, every agent of it expired at once (false
    "gone"), and every later heartbeat was dated 8 days ahead, so a dead agent stayed up
    until the wall clock got there."""
    wall = [T0]
    state: dict[str, Any] = {}
    m = HeartbeatMonitor(
        state, interval_s=5, timeout_s=15, max_missed=3, expire_s=7 * DAY, clock=lambda: wall[0]
    )
    offset = iter(range(1, 10_000))
    for a in "ABC":
        m.record_heartbeat(a, T0, offset=next(offset))
    m.record_heartbeat("D", T0 + 8 * DAY, offset=next(offset))
    assert {"A", "B", "C", "D"} <= set(state)  # nobody expired
    for i in range(1, 100):
        wall[0] = T0 + 5 * i
        m.record_heartbeat("A", T0 + 5 * i, offset=next(offset))
    m.record_heartbeat("B", T0 + 500, offset=next(offset))
    assert m.assess("A", wall[0]).status == "up"
    wall[0] = T0 + 3 * DAY  # B silent for 3 days
    assert m.assess("B", wall[0]).status == "down"
    # a restarted monitor (no receipt times) over the same table: B is not kept up
    # by a table time ahead of the wall clock either
    again = HeartbeatMonitor(
        state, interval_s=5, timeout_s=15, max_missed=3, expire_s=7 * DAY, clock=lambda: wall[0]
    )
    wall[0] = T0 + 600
    assert again.assess("B", wall[0]).status == "up"  # seen now: its heartbeat counts once
    wall[0] = T0 + 700
    assert again.assess("B", wall[0]).status == "down"


def test_a_partition_clock_moves_a_step_per_record_and_follows_a_clock_that_moved() -> None:
    from agentstream.streams.tables.monitoring import CLOCK_STEP

    expire = 7 * DAY
    state: dict[str, Any] = {}
    fold_heartbeat(state, "a", at=T0, partition=0, offset=1, expire_s=expire)
    fold_heartbeat(state, "b", at=T0 + 30 * DAY, partition=0, offset=2, expire_s=expire)
    assert "a" in state
    assert heartbeat_index(state).clock[0] == T0 + expire * CLOCK_STEP
    # the broker's clock really moved: the records that keep coming move the clock on
    # (a step each: 30 days in 43 records)
    for i in range(3, 60):
        fold_heartbeat(state, "b", at=T0 + 30 * DAY + i, partition=0, offset=i, expire_s=expire)
    assert state["b"]["last_heartbeat_at"] == T0 + 30 * DAY + 59
    assert "a" not in state  # and a is expired by it


def test_one_sample_dated_ahead_does_not_drop_the_partitions_series() -> None:
    state: dict[str, Any] = {}
    kw: dict[str, Any] = {"interval_s": 10, "retention_s": 3600, "partition": 0}
    for i in range(10):
        fold_sample(state, "cpu", {}, T0 + 10 * i, 1.0, at=T0 + 10 * i, **kw)
    fold_sample(state, "mem", {}, T0 + 100, 1.0, at=T0 + 30 * DAY, **kw)
    assert any(k.startswith("cpu") for k in state)
    # and the clock is not pinned: a series that stops reporting still expires
    for i in range(1, 2000):
        fold_sample(state, "mem", {}, T0 + 100 + 10 * i, 1.0, at=T0 + 100 + 10 * i, **kw)
    assert not any(k.startswith("cpu") for k in state)


def test_an_agent_owed_its_down_that_beats_again_is_new() -> None:
    state: dict[str, Any] = {}
    fold_heartbeat(state, "a", at=T0, partition=0, offset=1, expire_s=1000)
    up = AgentStatusChanged(
        agent_id="a",
        previous=None,
        current="up",
        reason="first_seen",
        last_heartbeat_at=datetime.fromtimestamp(T0, UTC),
        changed_at=datetime.fromtimestamp(T0, UTC),
    )
    fold_status(state, up, partition=0, expire_s=1000)
    for i in range(20):
        fold_heartbeat(state, "b", at=T0 + 2000 + i, partition=0, offset=2 + i, expire_s=1000)
    assert state["a"]["owed_since"] is not None and state["a"]["status"] == "up"
    fold_heartbeat(state, "a", at=T0 + 2100, partition=0, offset=50, expire_s=1000)
    assert state["a"]["beats"] == 1 and state["a"]["status"] is None
    assert "owed_since" not in state["a"]
