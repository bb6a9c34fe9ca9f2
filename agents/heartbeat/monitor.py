"""HeartbeatMonitor: decides when an agent is up or down. No Kafka, injectable clock.

The state (a mapping agent id → record, see `streams.tables.monitoring`) is folded from
heartbeats AND from the monitor's own `AgentStatusChanged` events. The monitor never
writes a status into the state itself: `check`/`evaluate` return transitions, the agent
publishes them, and the status changes when the event is folded back (`record_status`).
Between publishing and folding, the transition is *pending* (in memory), so it is not
published twice; after a crash the published event is still in the log and gets folded
on restart — which is why it is never published again.

Liveness: an agent is up while its last heartbeat is at most `timeout_s` old and fewer
than `max_missed` intervals passed since it, and down otherwise. A heartbeat's age is
measured from the time the broker appended it to `agent.heartbeats` (its record's
`LogAppendTime`), never from the sender's `sent_at`: a sender's clock, ahead or set
back, changes nothing, and a backlog of old heartbeats read after a restart counts from
when they were written, so replaying history does not make agents flap up and down.
The table's time can still be ahead of the wall clock (a broker's clock that stepped
forward once, `streams.tables.monitoring.advance_clock`): the age is then measured from
the *earlier* of that time and when this process received the heartbeat (or first saw
the entry, after a restart), so a time ahead keeps nobody up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from agentstream.schemas import AgentStatusChanged, Heartbeat
from agentstream.streams.tables import Origin
from agentstream.streams.tables.monitoring import (
    fold_heartbeat,
    fold_heartbeat_record,
    fold_status,
    fold_status_record,
)

State = Literal["up", "down"]
Reason = Literal["first_seen", "heartbeat", "timeout", "missed_beats"]


@dataclass(frozen=True, slots=True)
class Transition:
    agent_id: str
    previous: State | None
    current: State
    reason: Reason
    last_heartbeat_at: float | None
    missed_beats: int
    at: float


@dataclass(frozen=True, slots=True)
class Assessment:
    status: State | None  # None: undetermined (not fresh, not yet known to be silent)
    reason: Reason
    elapsed_s: float | None
    missed_beats: int


class HeartbeatMonitor:
    def __init__(
        self,
        state: MutableMapping[str, Any] | None = None,
        *,
        interval_s: float = 5.0,
        timeout_s: float = 15.0,
        max_missed: int = 3,
        expire_s: float = math.inf,
        max_agents: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0 or max_missed < 1:
            raise ValueError("interval and timeout must be > 0, max_missed >= 1")
        if expire_s <= timeout_s or (max_agents is not None and max_agents < 1):
            raise ValueError("expire_s must be above timeout_s, max_agents >= 1")
        self.state: MutableMapping[str, Any] = state if state is not None else {}
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_missed = max_missed
        #: the table's bounds (`streams.tables.monitoring.fold_heartbeat`)
        self.expire_s = expire_s
        self.max_agents = max_agents
        self.clock = clock
        #: transitions published but not yet folded back: agent id → status
        self.pending: dict[str, State] = {}
        #: agents whose entry expired while their "up" was published but not folded back:
        #: the "down" they are owed, until it is folded back or they beat again (an entry
        #: whose folded status is "up" stays in the table for it instead)
        self.owed: dict[str, dict[str, Any]] = {}
        #: wall-clock time this process received each agent's latest heartbeat (or first
        #: saw an entry dated ahead of it): liveness never trusts a table time ahead of
        #: it. Memory only (no table state, so the table stays a function of the log);
        #: at most one per entry, forgotten with it.
        self.received: dict[str, float] = {}

    # -- folds ------------------------------------------------------------------------
    def record_heartbeat(
        self,
        agent_id: str,
        at: float,
        sequence: int = 0,
        info: dict[str, str] | None = None,
        *,
        offset: int,
        partition: int = 0,
        sent_at: float | None = None,
    ) -> bool:
        """Fold a heartbeat appended at `at` (the broker's time) and read at (`partition`,
        `offset`); False if it is not newer than the last one (a redelivery)."""
        gone: list[tuple[str, dict[str, Any]]] = []
        try:
            return self._received(
                agent_id,
                fold_heartbeat(
                    self.state,
                    agent_id,
                    at=at,
                    partition=partition,
                    offset=offset,
                    sent_at=sent_at,
                    sequence=sequence,
                    info=info,
                    expire_s=self.expire_s,
                    max_agents=self.max_agents,
                    expired=gone,
                ),
            )
        finally:
            self._forget(gone)

    def record(self, payload: Heartbeat, origin: Origin) -> bool:
        """Fold a heartbeat read at `origin`; `InvalidEvent` when its key or partition is
        not its agent id's (`streams.tables.monitoring.misplaced_heartbeat`), `TableFull`
        when it is a new agent in a partition holding `max_agents` already."""
        gone: list[tuple[str, dict[str, Any]]] = []
        try:
            return self._received(
                payload.agent_id,
                fold_heartbeat_record(
                    self.state,
                    payload,
                    origin,
                    expire_s=self.expire_s,
                    max_agents=self.max_agents,
                    expired=gone,
                ),
            )
        finally:
            self._forget(gone)

    def _received(self, agent_id: str, accepted: bool) -> bool:
        if accepted:
            self.received[agent_id] = self.clock()
        return accepted

    def _forget(self, gone: list[tuple[str, dict[str, Any]]]) -> None:
        """Entries the fold expired: nothing of them stays in memory, but a "down" owed
        to one whose "up" was published and not folded back yet. (One whose folded
        status is "up" stays in the table, marked owed, until its "down" is folded:
        `streams.tables.monitoring._expire_entry`.)"""
        for agent_id, rec in gone:
            self.received.pop(agent_id, None)
            pending = self.pending.pop(agent_id, None)
            if pending == "up" and rec.get("status") != "up":
                self.owed[agent_id] = rec

    def record_status(self, change: AgentStatusChanged, origin: Origin | None = None) -> None:
        """Fold a status event read back from `agent.status` (at `origin`)."""
        if origin is not None:
            fold_status_record(self.state, change, origin, expire_s=self.expire_s)
        else:
            fold_status(self.state, change, expire_s=self.expire_s)
        if self.pending.get(change.agent_id) == change.current:
            del self.pending[change.agent_id]
        if change.agent_id in self.owed and change.current == "down":
            del self.owed[change.agent_id]

    # -- decisions --------------------------------------------------------------------
    def assess(self, agent_id: str, now: float | None = None) -> Assessment | None:
        rec = self.state.get(agent_id)
        if rec is None:
            return None
        return self._assess(agent_id, rec, self.clock() if now is None else now)

    def _assess(
        self, agent_id: str, rec: dict[str, Any], now: float, horizon: float | None = None
    ) -> Assessment:
        """Up needs a heartbeat fresh by the wall clock `now`; down needs silence up to
        `horizon` — the time up to which this worker has seen everything on the agent's
        partition (default `now`; earlier while the partition lags, so that a newer
        heartbeat still waiting in the backlog cannot be missed). Between the two the
        status is undetermined (None with reason "heartbeat") and left as it is."""
        last = rec.get("last_heartbeat_at")
        if last is None:
            return Assessment(None, "timeout", None, 0)
        basis = float(last)
        seen = self.received.get(agent_id)
        if seen is None and basis > now:
            # dated ahead, and not received by this process (it restarted): the age
            # counts from now, when it is first seen, rather than from a time to come
            seen = self.received[agent_id] = now
        if seen is not None:
            basis = min(basis, seen)
        elapsed = max(0.0, now - basis)
        missed = math.floor(elapsed / self.interval_s + 1e-9)
        if elapsed <= self.timeout_s and missed < self.max_missed:
            return Assessment("up", "heartbeat", elapsed, missed)
        h_elapsed = elapsed if horizon is None or horizon >= now else horizon - basis
        if not math.isfinite(h_elapsed):
            return Assessment(None, "heartbeat", elapsed, missed)
        h_missed = math.floor(h_elapsed / self.interval_s + 1e-9)
        if h_elapsed > self.timeout_s:
            return Assessment("down", "timeout", elapsed, missed)
        if h_missed >= self.max_missed:
            return Assessment("down", "missed_beats", elapsed, missed)
        return Assessment(None, "heartbeat", elapsed, missed)

    def effective(self, agent_id: str) -> State | None:
        """The status as published: pending transition, else the folded one."""
        pending = self.pending.get(agent_id)
        if pending is not None:
            return pending
        rec = self.state.get(agent_id)
        return rec.get("status") if rec else None

    def evaluate(
        self, agent_id: str, now: float | None = None, *, allow_down: bool = True
    ) -> Transition | None:
        """The transition `agent_id` needs now, if any (marked pending). Right after a
        heartbeat is folded only "up" is decided (`allow_down=False`): the fold may be
        catching up on a backlog, where old means "not read yet", not "silent"."""
        rec = self.state.get(agent_id)
        if rec is None:
            return None
        t = self.clock() if now is None else now
        return self._evaluate(agent_id, rec, t, t if allow_down else -math.inf)

    def _evaluate(
        self, agent_id: str, rec: dict[str, Any], now: float, horizon: float | None = None
    ) -> Transition | None:
        a = self._assess(agent_id, rec, now, horizon)
        if a.status is None:
            return None
        pending = self.pending.get(agent_id)
        current = pending if pending is not None else rec.get("status")
        if a.status == current:
            return None
        if current is None and a.status == "down":
            # never seen alive (only stale heartbeats): nothing went down
            return None
        reason: Reason = a.reason
        if a.status == "up":
            reason = "first_seen" if current is None else "heartbeat"
        self.pending[agent_id] = a.status
        return Transition(
            agent_id=agent_id,
            previous=current,
            current=a.status,
            reason=reason,
            last_heartbeat_at=rec.get("last_heartbeat_at"),
            missed_beats=a.missed_beats,
            at=now,
        )

    def check(
        self,
        now: float | None = None,
        *,
        owned: Callable[[str], bool] | None = None,
        horizon: Callable[[str], float | None] | None = None,
    ) -> list[Transition]:
        """One pass over every agent: O(n) with a few float operations per agent.
        `horizon(agent_id)`: see `_assess` (None = `now`)."""
        t = self.clock() if now is None else now
        if len(self.received) > len(self.state):  # entries left with their partition
            self.received = {k: v for k, v in self.received.items() if k in self.state}
        out: list[Transition] = self._owed_downs(t, owned)
        evaluate = self._evaluate
        for agent_id, rec in list(self.state.items()):
            if rec is None or (owned is not None and not owned(agent_id)):
                continue
            tr = evaluate(agent_id, rec, t, horizon(agent_id) if horizon is not None else None)
            if tr is not None:
                out.append(tr)
        return out

    def _owed_downs(self, now: float, owned: Callable[[str], bool] | None) -> list[Transition]:
        """The "down" of each agent whose entry expired while it was up, still owed: its
        last event on `agent.status` says up. (Folded back, the event changes no table:
        it is dated before what the table keeps.) One that beats again is new: its
        "up" is a first sighting."""
        out = []
        for agent_id, rec in list(self.owed.items()):
            if agent_id in self.state or (owned is not None and not owned(agent_id)):
                del self.owed[agent_id]  # back, or another worker's now
                continue
            if self.pending.get(agent_id) == "down":
                continue  # published, not yet folded back
            last = rec.get("last_heartbeat_at")
            elapsed = max(0.0, now - float(last)) if last is not None else 0.0
            self.pending[agent_id] = "down"
            out.append(
                Transition(
                    agent_id=agent_id,
                    previous="up",
                    current="down",
                    reason="timeout",
                    last_heartbeat_at=last,
                    missed_beats=math.floor(elapsed / self.interval_s + 1e-9),
                    at=now,
                )
            )
        return out

    def cancel(self, transitions: Iterable[Transition]) -> None:
        """Forget pending transitions that could not be published."""
        for tr in transitions:
            if self.pending.get(tr.agent_id) == tr.current:
                del self.pending[tr.agent_id]

    def reset_pending(self) -> None:
        """After a rebalance: what was published is in the log and will be folded."""
        self.pending.clear()

    def counts(self, now: float | None = None) -> dict[str, int]:
        c = {"up": 0, "down": 0}
        for agent_id in list(self.state.keys()):
            st = self.effective(agent_id)
            if st in c:
                c[st] += 1
        return c

    def describe(self, agent_id: str, now: float | None = None) -> dict[str, Any] | None:
        """The view of one agent: folded record plus what the monitor thinks now."""
        rec = self.state.get(agent_id)
        if rec is None:
            return None
        t = self.clock() if now is None else now
        a = self._assess(agent_id, rec, t)
        return {
            "agent_id": agent_id,
            "status": self.effective(agent_id),
            "confirmed_status": rec.get("status"),
            "last_heartbeat_at": rec.get("last_heartbeat_at"),
            "sent_at": rec.get("sent_at"),
            "seconds_since_heartbeat": a.elapsed_s,
            "missed_beats": a.missed_beats,
            "beats": rec.get("beats", 0),
            "sequence": rec.get("sequence", 0),
            "first_seen_at": rec.get("first_seen_at"),
            "status_changed_at": rec.get("status_changed_at"),
            "reason": rec.get("reason"),
            "info": rec.get("info", {}),
            "interval_s": self.interval_s,
            "timeout_s": self.timeout_s,
            "max_missed_beats": self.max_missed,
        }


def to_event_payload(tr: Transition) -> AgentStatusChanged:
    return AgentStatusChanged(
        agent_id=tr.agent_id,
        previous=tr.previous,
        current=tr.current,
        reason=tr.reason,
        last_heartbeat_at=_utc_or_none(tr.last_heartbeat_at),
        missed_beats=tr.missed_beats,
        changed_at=datetime.fromtimestamp(tr.at, UTC),  # this worker's clock
    )


def _utc_or_none(ts: float | None) -> datetime | None:
    """A sender's time as a datetime, or None when it has none in UTC: the schema now
    refuses such times, but a table restored from an older changelog may hold one, and
    the transition must still be published rather than fail every check after a restart."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC)
    except (ValueError, OverflowError, OSError):
        return None
