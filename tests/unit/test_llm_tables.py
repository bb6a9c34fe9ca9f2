"""The LLM table folds: what the live agent applies and `rebuild` replays."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from agentstream.schemas import Event
from agentstream.schemas.errors import InvalidEvent
from agentstream.schemas.llm import (
    AttemptRecord,
    BreakerStateChanged,
    LLMCancelRequested,
    LLMResponse,
    Usage,
)
from agentstream.streams.tables import TABLES, Origin, rebuild
from agentstream.streams.tables import llm as t


def response(rid: str, agent: str = "a1", status: str = "completed", **kw: object) -> Event:
    return Event.of(
        LLMResponse(request_id=rid, agent_id=agent, status=status, provider="p", model="m", **kw),  # type: ignore[arg-type]
        source="test",
    )


def test_specs_registered() -> None:
    for name in (
        "llm_responses_done",
        "llm_cancelled",
        "llm_breakers",
        "llm_usage",
        "llm_budget_spend",
    ):
        assert name in TABLES


def test_partition_matches_kafka_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(4))
    for key in ("r1", "req-42", "a" * 100, "ünïcode"):
        assert t.partition_of(key, 4) == DefaultPartitioner()(key.encode(), parts, parts)


def test_done_and_cancelled_folds() -> None:
    done = rebuild(t.RESPONSES_DONE, [response("r1"), response("r2", status="failed")])
    assert done["r1"]["status"] == "completed" and done["r2"]["status"] == "failed"
    cancel = Event.of(LLMCancelRequested(request_id="r9", reason="x"), source="t")
    home = t.partition_of("r9", 4)

    def read_at(partition: int, key: bytes = b"r9") -> Origin:
        return Origin("llm.cancellations", partition, 0, 1.0, key, 4)

    cancelled = rebuild(t.CANCELLED, [(cancel, read_at(home))])
    assert cancelled == {"r9": {"reason": "x", "at": int(cancel.occurred_at.timestamp())}}
    # one in another partition, or under another key, is refused there as the live agent
    # refuses it (a dead letter): the rebuild skips it (`_fold_into`)
    with pytest.raises(InvalidEvent, match="hashes to partition"):
        rebuild(t.CANCELLED, [(cancel, read_at((home + 1) % 4))])
    with pytest.raises(InvalidEvent, match="key mismatch"):
        rebuild(t.CANCELLED, [(cancel, read_at(home, b"mallory"))])


def test_entries_are_dated_by_event_time_for_the_retention() -> None:
    old = response("r1").model_copy(update={"occurred_at": datetime(2026, 1, 1, tzinfo=UTC)})
    entry = rebuild(t.RESPONSES_DONE, [old])["r1"]
    assert entry == {"status": "completed", "event_id": str(old.event_id), "at": 1767225600}
    assert t.done_entry(old) == entry  # what the live agent writes
    day = 86400.0
    assert not t.entry_expired(entry, 1767225600 + day - 1, day)
    assert t.entry_expired(entry, 1767225600 + day, day)
    assert not t.entry_expired(entry, 1767225600 + 10 * day, 0)  # 0: kept forever
    # written before entries were dated: age unknown, so it goes (or it would stay forever)
    assert t.entry_expired({"status": "completed"}, 1767225600, day)


def test_expired_keys_scan_owned_entries_oldest_first_and_stop_at_a_young_one() -> None:
    day = 86400.0
    now = 1767225600 + 3 * day
    items = [
        ("legacy-mine", {"status": "completed"}),  # undated (older version): goes
        ("future-mine", {"at": now + 60}),  # a producer's clock a little ahead: passed over
        ("far-future-mine", {"at": now + day}),  # not believed: dated by a sender, it
        # would outlive every retention (a request id cancelled for good)
        ("old-mine-1", {"at": 1767225600}),
        ("old-theirs", {"at": 1767225600}),  # a standby copy: never ours to delete
        ("old-mine-2", {"at": 1767225600 + day}),
        ("young-mine", {"at": now - 60}),
        ("old-after-young", {"at": 1767225600}),  # behind a young one: a later sweep
    ]
    mine = {k for k, _ in items} - {"old-theirs"}
    keys = t.expired_keys(items, now, day, mine.__contains__)
    assert keys == ["legacy-mine", "far-future-mine", "old-mine-1", "old-mine-2"]
    assert t.expired_keys(items, now, day, mine.__contains__, limit=1) == ["legacy-mine"]
    assert t.expired_keys(items, now, 0, mine.__contains__) == []
    # once the young one is gone, the next sweep reaches what was behind it
    gone = {"legacy-mine", "far-future-mine", "old-mine-1", "old-mine-2", "young-mine"}
    rest = [kv for kv in items if kv[0] not in gone]
    assert t.expired_keys(rest, now, day, mine.__contains__) == ["old-after-young"]


def test_rebuild_comparison_leaves_out_what_the_retention_dropped() -> None:
    from agentstream.streams.tables import unexpired

    rebuilt = {"gone": {"at": 100}, "kept": {"at": 10_000}}
    live = {"kept": {"at": 10_000}}  # the worker already deleted "gone"
    spec = t.RESPONSES_DONE
    assert unexpired(spec, rebuilt, 100 + t.retention_s()) == live
    assert unexpired(spec, live, 100 + t.retention_s()) == live
    assert unexpired(t.USAGE, rebuilt, 1e12) == rebuilt  # no retention: untouched


def test_usage_totals_per_agent_provider_model(monkeypatch: Any) -> None:
    names = t.usage_names({"providers": {"p": {"kind": "vllm", "model": "m"}}})
    monkeypatch.setattr(t, "configured_names", lambda: names)
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


def test_budget_spend_fold_equals_the_batched_live_writes(monkeypatch: Any) -> None:
    from agentstream.schemas.llm import AttemptRecord
    from agentstream.streams import llm_budgets

    cfg = llm_budgets.parse(
        {
            "prices": {"p": {"m-sent": {"input": 1.0, "output": 2.0}}},
            "budgets": [{"agent": "*", "window": "1h", "max_tokens": 100}],
        },
        {"p"},
    )
    monkeypatch.setattr(llm_budgets, "configured", lambda: cfg)
    at = datetime(2026, 1, 1, 10, 30, tzinfo=UTC)
    # priced by the model the stage sent, though the provider answered with another name
    ok = [AttemptRecord(provider="p", attempt=1, outcome="ok", model="m-sent")]
    events = [
        response(
            f"r{i}",
            usage=Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
            attempts=ok,
        )
        for i in range(4)
    ] + [response("r9", status="budget_exceeded"), response("r8", status="failed")]
    events = [e.model_copy(update={"occurred_at": at}) for e in events]
    rebuilt = rebuild(t.SPEND, events)
    live: dict[str, Any] = {}
    dated = [(e.payload, int(at.timestamp())) for e in events]
    llm_budgets.add_spend(live, t.spend_increments(dated[:3], n=t.partitions()))
    llm_budgets.add_spend(live, t.spend_increments(dated[3:], n=t.partitions()))
    assert rebuilt == live
    total = llm_budgets.budget_report(cfg, rebuilt.items(), at.timestamp())[0]
    # refused responses spent nothing; the failed one is a request without tokens
    assert (total["requests"], total["spent_tokens"]) == (5, 60)
    assert total["spent_cost_usd"] == 4 * (10 * 1.0 + 5 * 2.0) / 1e6
    assert total["window_start"] == int(datetime(2026, 1, 1, 10, tzinfo=UTC).timestamp())
    assert all(v["until"] == total["window_end"] for v in rebuilt.values())
    assert t.SPEND.expired is not None and t.SPEND.expired(
        next(iter(rebuilt.values())), total["window_end"]
    )


def test_a_cancellation_dated_far_ahead_cancels_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A sender dates its cancellations; one in the year 9999 for a guessable request id
    # (r-1) must not cancel that id's requests, neither now nor for ever.
    now = 1767225600.0
    entries = {
        "r-1": {"reason": "", "at": 253402300799},
        "r-2": {"reason": "", "at": int(now) + 30},  # a clock a little ahead: believed
        "r-3": {"reason": "", "at": int(now) - 10},
    }
    monkeypatch.setattr(t, "table", lambda name: entries)
    assert [rid for rid in ("r-1", "r-2", "r-3", "r-4") if t.cancelled(rid, now)] == ["r-2", "r-3"]


def test_key_hash_is_murmur2_as_the_default_partitioner_takes_it() -> None:
    from aiokafka.partitioner import murmur2

    from agentstream.streams.tables import key_hash

    for key in (b"", b"agent-1", "Ω".encode(), bytes(range(256)), b"x" * 1000):
        for _ in range(2):  # computed, then from the cache (not the longest)
            assert key_hash(key) == murmur2(key) & 0x7FFFFFFF >= 0
    # what aiokafka's send also takes, and a cache cannot hold
    for other in (bytearray(b"agent-1"), memoryview(bytearray(b"agent-1")), memoryview(b"a")):
        assert key_hash(other) == murmur2(other) & 0x7FFFFFFF


def test_key_hash_partitioner_is_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from agentstream.streams.app import app
    from agentstream.streams.tables import KeyHashPartitioner

    assert isinstance(app.conf.producer_partitioner, KeyHashPartitioner)  # the worker's
    ours, kafkas = KeyHashPartitioner(), DefaultPartitioner()
    for n in (1, 3, 4, 12):
        every = list(range(n))
        keys: list[bytes | bytearray] = [f"agent-{i}".encode() for i in range(300)]
        for key in [*keys, b"", "Ω".encode(), b"k" * 300, bytearray(b"agent-7")]:
            assert ours(key, every, every[:1]) == kafkas(key, every, every[:1]), (n, key)
    # no key: a random available partition, or any when none has a leader
    assert {ours(None, [0, 1, 2, 3], [1, 3]) for _ in range(200)} == {1, 3}
    assert {ours(None, [0, 1, 2], []) for _ in range(200)} == {0, 1, 2}


def test_made_up_provider_and_model_names_make_no_usage_keys(monkeypatch: Any) -> None:
    """Usage is kept under the names the providers file declares; any other provider is
    one shared `-`, any other model of a declared provider one shared `other` (as the
    metrics' labels): a request naming a fresh name each time grows nothing."""
    names = t.usage_names({"providers": {"p": {"kind": "vllm", "model": "m"}}})
    monkeypatch.setattr(t, "configured_names", lambda: names)
    made_up = (
        [
            LLMResponse(request_id=f"r{i}", agent_id="a", status="failed", provider=f"zz{i}")
            for i in range(20)
        ]
        + [
            LLMResponse(
                request_id=f"s{i}", agent_id="a", status="completed", provider="p", model=f"zz{i}"
            )
            for i in range(20)
        ]
        + [
            LLMResponse(
                request_id=f"l{i}",
                agent_id="a",
                status="completed",
                provider="local",
                model=f"zz{i}",
            )
            for i in range(20)
        ]
    )
    keys = {k for r in made_up for k in t.usage_keys(r, 4)}
    assert not [k for k in keys if "zz" in k], keys
    summary = t.summarise_usage(t.usage_increments(made_up, 4).items())
    assert set(summary["provider"]) == {"-", "p", "local"}
    assert set(summary["model"]) == {"-/-", "p/other", "local/other"}
    # declared names keep their own counters: the answered model, else the one sent
    sent = [AttemptRecord(provider="p", attempt=1, outcome="ok", model="m")]
    dated = LLMResponse(
        request_id="d", status="completed", provider="p", model="m-2024", attempts=sent
    )
    assert t.usage_keys(dated, 4)[1:] == [
        f"{t.partition_of('d', 4)}|provider|p",
        f"{t.partition_of('d', 4)}|model|p|m",
    ]
    local = LLMResponse(request_id="e", status="completed", provider="local", model="local-echo")
    assert t.usage_keys(local, 4)[2].endswith("|model|local|local-echo")
