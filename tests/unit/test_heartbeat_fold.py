"""The heartbeat agent's fold of `agent.heartbeats` records, without Kafka: what a sender
controls (its clock, the record's key and partition, how many agent ids it invents) and
what it must not be able to do with it. Driven through `agents.heartbeat.agent._fold`,
the function the worker calls for every record; the table is a dict, the clock fake."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

import agentstream.agents.heartbeat.agent as hb
import agentstream.streams.processing as processing
from agentstream.agents.audit.rebuild import _fold_into
from agentstream.agents.heartbeat.monitor import HeartbeatMonitor, Transition, to_event_payload
from agentstream.schemas import Event, Heartbeat
from agentstream.streams.app import settings
from agentstream.streams.processing import Inbound
from agentstream.streams.tables import Origin
from agentstream.streams.tables.llm import partition_of
from agentstream.streams.tables.monitoring import HEARTBEATS

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class World:
    """The agent's module state around one fold: its table (a dict), its monitor (fake
    clock), what it published and what it dead-lettered."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
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

    def new_monitor(self) -> HeartbeatMonitor:
        """A monitor over the same table with an empty memory (a restarted worker)."""
        return HeartbeatMonitor(
            self.table, interval_s=5.0, timeout_s=15.0, max_missed=3, clock=self.clock
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
        self.log.append((event, hb.origin_of(msg, "agent.heartbeats")))
        await hb.guarded(Inbound(event, msg), hb.CONSUMER, hb._fold)

    def confirm(self) -> list[Transition]:
        """What the worker does next: the published transitions are folded back."""
        done, self.published = self.published, []
        for tr in done:
            change = to_event_payload(tr)
            self.monitor.record_status(change)
            origin = Origin(
                "agent.status",
                home(tr.agent_id),
                self.status_offsets,
                self.clock.t,
                tr.agent_id.encode(),
                settings.topic_partitions,
            )
            self.status_offsets += 1
            self.log.append((Event.of(change, source="test"), origin))
        return done

    def rebuilt(self) -> dict[str, Any]:
        """What `agentstream rebuild agent_heartbeats` makes of the records folded."""
        state: dict[str, Any] = {}
        _fold_into(state, HEARTBEATS, self.log)
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
