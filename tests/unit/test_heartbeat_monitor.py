"""HeartbeatMonitor: transitions with a fake clock, replays, restarts, rebuild parity."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime

import pytest

from agentstream.agents.heartbeat.monitor import HeartbeatMonitor, Transition, to_event_payload
from agentstream.schemas import AgentStatusChanged, Event, Heartbeat
from agentstream.streams.tables import Origin, digest, rebuild
from agentstream.streams.tables.monitoring import HEARTBEATS

#: offsets of the heartbeats partition: every heartbeat folded here is a new record
OFFSETS = itertools.count()


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(clock: Clock, state: dict | None = None, **kw: float) -> HeartbeatMonitor:
    args = {"interval_s": 5.0, "timeout_s": 15.0, "max_missed": 3, **kw}
    return HeartbeatMonitor(state, clock=clock, **args)  # type: ignore[arg-type]


def confirm(m: HeartbeatMonitor, trs: list[Transition]) -> list[Event]:
    """What the agent does: publish, then fold the event read back."""
    events = [Event.of(to_event_payload(t), source="test") for t in trs]
    for ev in events:
        m.record_status(ev.payload)
    return events


def beat(m: HeartbeatMonitor, agent: str, clock: Clock, seq: int) -> bool:
    """A heartbeat appended by the broker now, at the partition's next offset."""
    return m.record_heartbeat(agent, clock.t, seq, offset=next(OFFSETS))


def at(topic: str, offset: int, ts: float, key: str = "") -> Origin:
    return Origin(topic=topic, partition=0, offset=offset, timestamp=ts, key=key.encode())


def test_first_seen_down_and_back_up_once_each() -> None:
    c = Clock()
    m = make(c)
    assert beat(m, "a", c, 0)
    trs = m.check()
    assert [(t.agent_id, t.previous, t.current, t.reason) for t in trs] == [
        ("a", None, "up", "first_seen")
    ]
    confirm(m, trs)
    for seq in range(1, 4):  # beats every interval: stays up, no events
        c.t += 5
        beat(m, "a", c, seq)
        assert m.check() == []
    c.t += 14.9
    assert m.check() == []
    c.t += 0.2  # 15.1 s of silence
    trs = m.check()
    assert [(t.previous, t.current) for t in trs] == [("up", "down")]
    assert trs[0].reason in ("timeout", "missed_beats") and trs[0].missed_beats == 3
    confirm(m, trs)
    c.t += 60
    assert m.check() == []  # still down: nothing new
    beat(m, "a", c, 10)
    trs = m.check()
    assert [(t.previous, t.current, t.reason) for t in trs] == [("down", "up", "heartbeat")]
    confirm(m, trs)
    assert m.check() == []
    assert m.state["a"]["status"] == "up"


def test_pending_transition_not_repeated_before_it_is_read_back() -> None:
    c = Clock()
    m = make(c)
    beat(m, "a", c, 0)
    first = m.check()
    assert len(first) == 1
    # the event is in flight: neither the timer nor a new beat may publish it again
    c.t += 1
    beat(m, "a", c, 1)
    assert m.evaluate("a") is None
    assert m.check() == []
    confirm(m, first)
    assert m.pending == {}
    assert m.check() == []


def test_replayed_and_stale_heartbeats_do_not_flap() -> None:
    c = Clock()
    m = make(c)
    history = []
    for seq in range(5):
        history.append((c.t, seq, seq))
        m.record_heartbeat("a", c.t, seq, offset=seq)
        c.t += 5
    confirm(m, m.check())
    c.t += 30
    confirm(m, m.check())
    assert m.state["a"]["status"] == "down"
    # a consumer replaying the whole history: none of it is newer than what is known
    for appended, seq, offset in history:
        assert not m.record_heartbeat("a", appended, seq, offset=offset)
    assert m.check() == []
    # a newer heartbeat that is itself older than the timeout (appended long before it
    # is read: a backlog) is recorded but does not bring the agent up for an instant
    assert m.record_heartbeat("a", c.t - 20, 99, offset=5)
    assert m.check() == []
    assert m.state["a"]["status"] == "down"


def test_missed_beats_with_a_long_timeout() -> None:
    c = Clock()
    m = make(c, interval_s=1.0, timeout_s=100.0, max_missed=3)
    beat(m, "a", c, 0)
    confirm(m, m.check())
    c.t += 2.9
    assert m.check() == []
    c.t += 0.2
    trs = m.check()
    assert [(t.current, t.reason, t.missed_beats) for t in trs] == [("down", "missed_beats", 3)]


def test_only_stale_heartbeats_never_count_as_up() -> None:
    c = Clock()
    m = make(c)
    m.record_heartbeat("ghost", c.t - 3600, 0, offset=next(OFFSETS))
    assert m.check() == []
    assert m.effective("ghost") is None


def test_clock_ahead_sender_judged_by_append_time() -> None:
    c = Clock()
    m = make(c)
    # its clock runs an hour ahead: the broker's append time is what counts
    m.record_heartbeat("fast", c.t, 0, offset=next(OFFSETS), sent_at=c.t + 3600)
    confirm(m, m.check())
    c.t += 16
    trs = m.check()
    assert [(t.current) for t in trs] == ["down"]


def test_restart_over_the_same_table_publishes_nothing_twice() -> None:
    """The table (changelog) survives; pending and receive times do not."""
    c = Clock()
    table: dict = {}
    m = make(c, table)
    log: list[Event] = []
    beat(m, "a", c, 0)
    beat(m, "b", c, 0)
    log += confirm(m, m.check())
    c.t += 5
    beat(m, "a", c, 1)
    c.t += 12
    # crash right after publishing b's "down": the event is in the log, not in the table
    crashed = m.check()
    assert [(t.agent_id, t.current) for t in crashed] == [("b", "down")]
    published = [Event.of(to_event_payload(t), source="test") for t in crashed]
    log += published
    m2 = make(c, table)  # restart: same table, empty memory
    for ev in published:  # the agent folds the status backlog before deciding
        m2.record_status(ev.payload)
    assert m2.check() == []
    c.t += 10
    trs = m2.check()
    assert [(t.agent_id, t.previous, t.current) for t in trs] == [("a", "up", "down")]
    log += confirm(m2, trs)
    per_agent: dict[str, list[str]] = {}
    for ev in log:
        per_agent.setdefault(ev.payload.agent_id, []).append(ev.payload.current)
    assert per_agent == {"a": ["up", "down"], "b": ["up", "down"]}


def test_rebuild_from_both_topics_reproduces_the_live_table() -> None:
    c = Clock()
    live: dict = {}
    m = make(c, live)
    source: list[tuple[Event, Origin]] = []
    offsets = itertools.count()
    for step in range(40):
        for i in range(5):
            if i == 3 and 10 <= step < 20:
                continue  # agent-3 falls silent for a while
            if i == 4 and step > 5:
                continue  # agent-4 never comes back
            hb = Heartbeat(
                agent_id=f"agent-{i}", sent_at=datetime.fromtimestamp(c.t, UTC), sequence=step
            )
            ev = Event.of(hb, source="agent")
            origin = at("agent.heartbeats", next(offsets), c.t, hb.agent_id)
            source.append((ev, origin))
            m.record(hb, origin)
        source += [
            (e, at("agent.status", next(offsets), c.t, e.payload.agent_id))
            for e in confirm(m, m.check())
        ]
        c.t += 5
    # redelivered heartbeats (at-least-once) must not change anything; status events
    # keep their order in their own partition, so they are not replayed out of order here
    source += [(e, o) for e, o in source[:40] if isinstance(e.payload, Heartbeat)]
    rebuilt = rebuild(HEARTBEATS, source)
    assert digest(rebuilt.items()) == digest(live.items())
    statuses = [e.payload for e, _ in source if isinstance(e.payload, AgentStatusChanged)]
    assert [(s.agent_id, s.current) for s in statuses if s.agent_id == "agent-3"] == [
        ("agent-3", "up"),
        ("agent-3", "down"),
        ("agent-3", "up"),
    ]
    assert live["agent-4"]["status"] == "down"


def test_owned_filter_limits_the_check() -> None:
    c = Clock()
    m = make(c)
    for a in ("x", "y"):
        beat(m, a, c, 0)
    trs = m.check(owned=lambda agent: agent == "x")
    assert [t.agent_id for t in trs] == ["x"]


def test_check_of_10000_agents_is_cheap() -> None:
    c = Clock()
    m = make(c)
    for i in range(10_000):
        m.record_heartbeat(f"agent-{i}", c.t, 0, offset=i)
    confirm(m, m.check())
    c.t += 1
    started = time.perf_counter()
    assert m.check() == []
    elapsed = time.perf_counter() - started
    # one pass must be a small fraction of the 5 s interval even on a shared machine
    assert elapsed < 0.5, elapsed
    c.t += 20
    assert len(m.check()) == 10_000


def test_invalid_configuration_rejected() -> None:
    with pytest.raises(ValueError):
        HeartbeatMonitor(interval_s=0)


def test_lagging_partition_defers_down_but_not_up() -> None:
    c = Clock()
    m = make(c)
    beat(m, "a", c, 0)
    confirm(m, m.check())
    c.t += 20
    # the stream has only seen its partition up to 2 s after a's last beat: a newer beat
    # may be waiting unread, so a is not declared down yet
    assert m.check(horizon=lambda agent: c.t - 18) == []
    assert m.check(horizon=lambda agent: c.t - 4) != []
    # right after a fold, only "up" is decided
    m2 = make(c)
    m2.record_heartbeat("b", c.t, 0, offset=0)
    confirm(m2, [t for t in [m2.evaluate("b", allow_down=False)] if t])
    c.t += 30
    m2.record_heartbeat("b", c.t - 25, 1, offset=1)  # an old beat read late
    assert m2.evaluate("b", allow_down=False) is None
    assert m2.effective("b") == "up"


def test_rebuild_order_across_topics_does_not_matter() -> None:
    """A rebuild merges the two topics by timestamp, and the live worker reads them as
    they come: the status event caused by heartbeats may be folded before them (two
    brokers' clocks a little apart), in the rebuild or live."""
    c = Clock()
    live: dict = {}
    m = make(c, live)
    beats = []
    for seq in range(3):
        hb = Heartbeat(agent_id="a", sent_at=datetime.fromtimestamp(c.t, UTC), sequence=seq)
        origin = at("agent.heartbeats", seq, c.t, "a")
        m.record(hb, origin)
        beats.append((Event.of(hb, source="a"), origin))
        c.t += 1
    (status,) = confirm(m, m.check())
    st = (status, at("agent.status", 0, c.t, "a"))
    for order in ([*beats, st], [st, *beats], [beats[0], st, *beats[1:]]):
        assert digest(rebuild(HEARTBEATS, order).items()) == digest(live.items()), order


def test_a_transition_with_a_time_not_in_utc_is_still_published() -> None:
    # a heartbeat table restored from an older changelog may hold such a time: the
    # transition built from it must not fail (it did, on every check, after restarts)
    from agentstream.agents.heartbeat.monitor import Transition, to_event_payload

    tr = Transition("a", "up", "down", "timeout", 253402351199.0, 3, 1767225600.0)
    payload = to_event_payload(tr)
    assert payload.last_heartbeat_at is None and payload.current == "down"


def test_a_record_dated_ahead_moves_the_watermark_only_to_now() -> None:
    from agentstream.agents.heartbeat.agent import advance_watermark

    marks: dict[int, float] = {}
    advance_watermark(marks, 0, 100.0, now=150.0)
    advance_watermark(marks, 0, 253402300799.0, now=160.0)  # a producer's clock in 9999
    assert marks == {0: 160.0}
    advance_watermark(marks, 0, 155.0, now=170.0)  # older than the mark: no move
    advance_watermark(marks, 1, None, now=170.0)
    assert marks == {0: 160.0}
