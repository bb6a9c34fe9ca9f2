"""A producer choosing the key or the partition of its own monitoring records.

`metrics.samples` is keyed by the series and `comms.records` by the agent id, and a table
entry folded from a record is kept in the changelog partition of that record
(`streams.tables.writer`). A sample of a series put in another partition than the one
its series hashes to writes the *same* window key into a second changelog partition:
the two workers holding the two partitions keep diverging copies, and a worker restoring
both (after a rebalance, or a restart of a worker holding both) keeps whichever it reads
last — the attacker's one-sample window over the series' real one. A communication
record put elsewhere does the same to its agent's counts. Heartbeats were already held
to their partition (`misplaced_heartbeat`); these are held alike, by the fold itself, so
the live worker and a rebuild refuse the same records."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from agentstream.schemas import CommunicationRecord, Event, MetricSample
from agentstream.schemas.errors import InvalidEvent
from agentstream.streams.tables import Origin
from agentstream.streams.tables.monitoring import (
    COMMS,
    METRICS,
    count_key,
    home_partition,
)

PARTITIONS = 4
AT = 1_800_000_000.0


def origin(topic: str, key: str, partition: int, offset: int) -> Origin:
    return Origin(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=AT + offset,
        key=key.encode(),
        partitions=PARTITIONS,
    )


def fold(spec: Any, state: dict[str, Any], payload: Any, at: Origin) -> None:
    assert spec.apply_at is not None
    spec.apply_at(state, Event.of(payload, source="t"), at)


def restore(*partitions: dict[str, Any]) -> dict[str, Any]:
    """One worker restoring the changelog partitions in this order: the last read wins."""
    out: dict[str, Any] = {}
    for state in partitions:
        out.update(state)
    return out


def test_a_sample_put_in_another_partition_cannot_overwrite_its_series_windows() -> None:
    series = "latency"
    home = home_partition(series, PARTITIONS)
    elsewhere = (home + 1) % PARTITIONS
    owner: dict[str, Any] = {}  # the worker holding the series' partition
    for i in range(50):
        s = MetricSample(series=series, timestamp=AT, value=10.0)
        fold(METRICS, owner, s, origin("metrics.samples", series, home, i))
    other: dict[str, Any] = {}  # the worker holding the partition the attacker chose
    forged = MetricSample(series=series, timestamp=AT, value=1e9)
    with pytest.raises(InvalidEvent, match="hashes to partition"):
        fold(METRICS, other, forged, origin("metrics.samples", series, elsewhere, 0))
    assert other == {}
    (window,) = restore(owner, other).values()
    assert (window["count"], window["max"]) == (50, 10.0)


def test_a_sample_under_another_key_is_refused_even_in_its_series_partition() -> None:
    series = "latency"
    home = home_partition(series, PARTITIONS)
    state: dict[str, Any] = {}
    forged = MetricSample(series=series, timestamp=AT, value=1.0)
    with pytest.raises(InvalidEvent, match="key mismatch"):
        fold(METRICS, state, forged, origin("metrics.samples", "mallory", home, 0))
    assert state == {}


def test_a_record_put_in_another_partition_cannot_overwrite_its_agents_counts() -> None:
    agent = "victim"
    home = home_partition(agent, PARTITIONS)
    elsewhere = (home + 1) % PARTITIONS
    at = datetime.fromtimestamp(AT, UTC)

    def rec(rid: str) -> CommunicationRecord:
        return CommunicationRecord(record_id=rid, kind="token", agent_id=agent, recorded_at=at)

    owner: dict[str, Any] = {}
    for i in range(5):
        fold(COMMS, owner, rec(f"r{i}"), origin("comms.records", agent, home, i))
    other: dict[str, Any] = {}
    with pytest.raises(InvalidEvent, match="hashes to partition"):
        fold(COMMS, other, rec("forged"), origin("comms.records", agent, elsewhere, 0))
    with pytest.raises(InvalidEvent, match="key mismatch"):
        fold(COMMS, owner, rec("forged"), origin("comms.records", "mallory", home, 9))
    assert other == {}
    assert restore(owner, other)[count_key(agent)] == {"token": 5}


# -- LLM requests --------------------------------------------------------------------------
class _Calls:
    """The LLM runtime as `_admit` sees it: records which requests would be called."""

    def __init__(self) -> None:
        self.admitted: list[str] = []
        self.cancelled: list[str] = []

    def answered_or_inflight(self, rid: str) -> bool:
        return False

    async def admit(self, inbound: Any) -> None:
        self.admitted.append(inbound.event.payload.request_id)

    async def answer_cancelled_early(self, inbound: Any) -> None:
        raise AssertionError("no cancellation here")

    def cancel(self, rid: str, reason: Any, event: Any) -> None:
        self.cancelled.append(rid)


async def _llm_admit(
    monkeypatch: pytest.MonkeyPatch, topic: str, payload: Any, key: str, partition: int
) -> tuple[_Calls, list[BaseException]]:
    import agentstream.agents.llm.agent as llm_agent
    import agentstream.streams.processing as processing
    from agentstream.streams.processing import Inbound
    from agentstream.streams.settings import get_settings

    calls, dead = _Calls(), []

    async def dead_letter(msg: Any, exc: BaseException, consumer: str) -> None:
        dead.append(exc)

    monkeypatch.setattr(llm_agent, "runtime", lambda: calls)
    monkeypatch.setattr(llm_agent.tables, "table", lambda name: {})
    monkeypatch.setattr(llm_agent.tables, "cancelled", lambda rid, now=None: False)
    monkeypatch.setattr(processing, "_EOS", False)
    monkeypatch.setattr(processing, "dead_letter", dead_letter)
    monkeypatch.setattr(llm_agent, "dead_letter", dead_letter, raising=False)
    msg = SimpleNamespace(
        topic=get_settings().topic(topic),
        partition=partition,
        offset=0,
        timestamp=AT,
        key=key.encode(),
    )
    inbound = Inbound(Event.of(payload, source="t"), msg)
    if topic == "llm.requests":
        await processing.guarded(inbound, llm_agent.CONSUMER, llm_agent._admit)
    else:
        await processing.guarded(inbound, llm_agent.CANCEL_CONSUMER, llm_agent._cancel)
    return calls, dead


def _request(rid: str) -> Any:
    from agentstream.schemas.llm import LLMRequest

    return LLMRequest.model_validate(
        {
            "request_id": rid,
            "agent_id": "a",
            "context": {"messages": [{"role": "user", "content": "hi"}]},
        }
    )


async def test_a_request_put_in_another_partition_is_not_called_a_second_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request is deduplicated by its id in the `llm_responses_done` table, whose entry
    lives in the changelog partition the id hashes to, held by the worker owning that
    partition of `llm.requests`. The same request id put in another partition reached
    another worker, which found no entry and called the provider again: a second final
    response (and a second bill) for one request."""
    from agentstream.streams.settings import get_settings

    n = get_settings().topic_partitions
    rid = "req-1"
    home = home_partition(rid, n)
    calls, dead = await _llm_admit(monkeypatch, "llm.requests", _request(rid), rid, home)
    assert (calls.admitted, dead) == ([rid], [])
    calls, dead = await _llm_admit(monkeypatch, "llm.requests", _request(rid), rid, (home + 1) % n)
    assert calls.admitted == []
    assert len(dead) == 1 and "hashes to partition" in str(dead[0])
    calls, dead = await _llm_admit(monkeypatch, "llm.requests", _request(rid), "mallory", home)
    assert calls.admitted == [] and "key mismatch" in str(dead[0])


async def test_a_cancellation_put_in_another_partition_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # it would reach a worker that does not run the request: refused, saying why
    from agentstream.schemas.llm import LLMCancelRequested
    from agentstream.streams.settings import get_settings

    n = get_settings().topic_partitions
    rid = "req-1"
    other = (home_partition(rid, n) + 1) % n
    cancel = LLMCancelRequested(request_id=rid)
    calls, dead = await _llm_admit(monkeypatch, "llm.cancellations", cancel, rid, other)
    assert calls.cancelled == [] and "hashes to partition" in str(dead[0])


async def test_a_misplaced_request_waits_for_no_provider_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # under exactly-once requests are taken once a slot of their provider is free; one
    # that `_admit` refuses takes no slot, so a saturated provider must not hold it (and
    # the commit gate behind it) back
    import asyncio

    import agentstream.agents.llm.agent as llm_agent
    from agentstream.streams.processing import Inbound
    from agentstream.streams.settings import get_settings

    saturated = asyncio.Semaphore(0)
    monkeypatch.setattr(
        llm_agent, "runtime", lambda: SimpleNamespace(slot_for=lambda request: saturated)
    )
    n = get_settings().topic_partitions
    rid = "req-1"

    def inbound(partition: int) -> Inbound:
        msg = SimpleNamespace(
            topic=get_settings().topic("llm.requests"),
            partition=partition,
            offset=0,
            timestamp=AT,
            key=rid.encode(),
        )
        return Inbound(Event.of(_request(rid), source="t"), msg)

    elsewhere = (home_partition(rid, n) + 1) % n
    await asyncio.wait_for(llm_agent._wait_for_slot([inbound(elsewhere)]), 5)
    placed = asyncio.ensure_future(llm_agent._wait_for_slot([inbound(home_partition(rid, n))]))
    await asyncio.sleep(0)
    assert not placed.done()  # a placed one still waits for its slot
    saturated.release()
    await asyncio.wait_for(placed, 5)
