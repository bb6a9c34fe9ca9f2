"""The LLM table folds: what the live agent applies and `rebuild` replays."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas import Event
from schemas.llm import (
    BreakerStateChanged,
    LLMCancelRequested,
    LLMResponse,
    Usage,
)
from streams.tables import TABLES, rebuild
from streams.tables import llm as t


def response(rid: str, agent: str = "a1", status: str = "completed", **kw: object) -> Event:
    return Event.of(
        LLMResponse(request_id=rid, agent_id=agent, status=status, provider="p", model="m", **kw),  # type: ignore[arg-type]
        source="test",
    )


def test_specs_registered() -> None:
    for name in ("llm_responses_done", "llm_cancelled", "llm_breakers", "llm_usage"):
        assert name in TABLES


def test_partition_matches_kafka_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(4))
    for key in ("r1", "req-42", "a" * 100, "ünïcode"):
        assert t.partition_of(key, 4) == DefaultPartitioner()(key.encode(), parts, parts)


def test_done_and_cancelled_folds() -> None:
    done = rebuild(t.RESPONSES_DONE, [response("r1"), response("r2", status="failed")])
    assert done["r1"]["status"] == "completed" and done["r2"]["status"] == "failed"
    cancelled = rebuild(
        t.CANCELLED, [Event.of(LLMCancelRequested(request_id="r9", reason="x"), source="t")]
    )
    assert cancelled == {"r9": {"reason": "x"}}


def test_usage_totals_per_agent_provider_model() -> None:
    u = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
    est = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2, estimated=True)
    events = [
        response("r1", usage=u),
        response("r2", usage=est),
        response("r3", agent="a2", status="cancelled"),
    ]
    state = rebuild(t.USAGE, events)
    summary = t.summarise_usage(state.items())
    assert summary["agent"]["a1"] == {
        "requests": 2,
        "completed": 2,
        "prompt_tokens": 11,
        "completion_tokens": 6,
        "total_tokens": 17,
        "estimated_requests": 1,
    }
    assert summary["agent"]["a2"] == {"requests": 1, "cancelled": 1}
    assert summary["provider"]["p"]["requests"] == 3
    assert summary["model"]["p/m"]["total_tokens"] == 17
    assert all(k.split("|")[0].isdigit() for k in state)


def test_breaker_fold_keeps_last_transition() -> None:
    now = datetime.now(UTC)
    evs = [
        Event.of(
            BreakerStateChanged(provider="p", previous=a, current=b, changed_at=now), source="w"
        )
        for a, b in (("closed", "open"), ("open", "half_open"))
    ]
    state = rebuild(t.BREAKERS, evs)
    assert state["p"]["state"] == "half_open" and state["p"]["previous"] == "open"


def test_batched_usage_writes_equal_the_fold_with_one_write_per_key() -> None:
    events = [
        response("r1", usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)),
        response("r2", agent="a2", status="failed"),
        response("r3", usage=Usage(prompt_tokens=1, total_tokens=1, estimated=True)),
        response("r4", status="cancelled", usage=Usage(completion_tokens=2, total_tokens=2)),
    ]
    folded = rebuild(t.USAGE, events)

    class CountingDict(dict[str, object]):
        writes = 0

        def __setitem__(self, key: str, value: object) -> None:
            CountingDict.writes += 1
            super().__setitem__(key, value)

    batched = CountingDict()
    t.add_usage(batched, t.usage_increments([e.payload for e in events[:2]]))
    t.add_usage(batched, t.usage_increments([e.payload for e in events[2:]]))
    assert dict(batched) == dict(folded)
    keys = {k for e in events for k in t.usage_keys(e.payload)}
    assert CountingDict.writes < 3 * len(events)
    assert CountingDict.writes == len(
        {k for e in events[:2] for k in t.usage_keys(e.payload)}
    ) + len({k for e in events[2:] for k in t.usage_keys(e.payload)})
    assert set(batched) == keys
