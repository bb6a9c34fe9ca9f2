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
from agentstream.agents.heartbeat.monitor import HeartbeatMonitor, Transition, to_event_payload
from agentstream.schemas import Event, Heartbeat
from agentstream.streams.processing import Inbound

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
        self.monitor = self.new_monitor()
        monkeypatch.setattr(hb, "monitor", self.monitor)
        monkeypatch.setattr(hb, "writer", SimpleNamespace(at=lambda p: self.table))
        monkeypatch.setattr(hb, "_watermark", {})
        monkeypatch.setattr(hb.gate, "open", True)

        async def publish(transitions: list[Transition], cause: Any = None) -> None:
            self.published += transitions

        monkeypatch.setattr(hb, "_publish", publish)

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
        """A heartbeat appended by the broker now (`clock.t`, or `at`), read at the
        partition's next offset (or `offset`: a redelivery)."""
        p = partition if partition is not None else 0
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
        await hb._fold(Inbound(Event.of(hbeat, source=agent), msg))

    def confirm(self) -> list[Transition]:
        """What the worker does next: the published transitions are folded back."""
        done, self.published = self.published, []
        for tr in done:
            self.monitor.record_status(to_event_payload(tr))
        return done

    def check(self) -> list[Transition]:
        self.published += self.monitor.check()
        return self.confirm()


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    return World(monkeypatch)


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
