"""Rebuild helpers, the audit table's fold, and checkpoint snapshots — no Kafka."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest

from agentstream.agents.audit.activity import SPEC, apply_accepted
from agentstream.agents.audit.checkpoints import snapshot
from agentstream.agents.audit.rebuild import _fold_into, decode_key, diff_keys
from agentstream.schemas import AgentMessage, Event
from agentstream.streams.app import settings
from agentstream.streams.tables import digest, rebuild

TP = namedtuple("TP", "topic partition")


def accepted(i: int, sender: str) -> Event[Any]:
    inp = Event.of(
        AgentMessage(
            message_id=f"m{i}", sender_id=sender, recipient_id="r", content="x" * (i % 13)
        ),
        source=sender,
    )
    return inp.caused(inp.payload, source="enforce_policy")


EVENTS = [accepted(i, f"agent-{i % 3}") for i in range(40)]


def test_fold_is_idempotent_under_redelivery_of_a_suffix() -> None:
    """What a crash does: the events since the last commit are applied again."""
    once = rebuild(SPEC, EVENTS)
    state = rebuild(SPEC, EVENTS)
    for ev in EVENTS[25:]:
        apply_accepted(state, ev)
    assert state == once
    assert digest(state.items()) == digest(once.items())
    assert once["agent-1"]["last_message_id"] == "m37"
    assert once["agent-1"]["last_input_id"] == EVENTS[37].causation_id
    assert once["agent-0"]["largest_content_bytes"] == 12


def test_streamed_fold_equals_rebuild() -> None:
    state: dict[str, Any] = {}
    for start in range(0, len(EVENTS), 7):
        _fold_into(state, SPEC, EVENTS[start : start + 7])
    assert state == rebuild(SPEC, EVENTS)


def test_changelog_keys_decode_raw_or_json() -> None:
    assert decode_key(b"agent-1") == "agent-1"
    assert decode_key(b'"agent-1"') == "agent-1"
    assert decode_key(b"123") == "123"
    assert decode_key(None) == ""


def test_diff_keys() -> None:
    assert diff_keys({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}) == ["b", "c", "d"]


def test_snapshot_digests_tables_and_keeps_only_source_offsets() -> None:
    table = rebuild(SPEC, EVENTS)
    src = settings.topic("agent.messages.accepted")
    assigned = [TP(src, 0), TP(src, 1), TP(settings.topic("agent.messages"), 0)]
    committed = {assigned[0]: 17, assigned[1]: None, assigned[2]: 99}
    cp = snapshot(
        {"accepted_by_sender": table}, assigned, committed, reason="periodic", worker_id="w1"
    )
    assert cp.tables == {"accepted_by_sender": digest(table.items())}
    assert cp.sizes == {"accepted_by_sender": 3}
    assert cp.offsets == {f"{src}:0": 17}
    assert cp.worker_id == "w1" and cp.reason == "periodic"


def test_a_changelog_value_that_is_not_json_is_a_differing_key_not_a_traceback() -> None:
    from agentstream.agents.audit.rebuild import _changelog_value

    assert _changelog_value(b'{"n": 1}') == {"n": 1}
    marker = _changelog_value(b"\x00not json")
    assert isinstance(marker, dict) and "undecodable_changelog_value" in marker


async def test_rebuild_skips_what_the_live_agents_dead_letter(monkeypatch: Any) -> None:
    """The rebuild folded a heartbeat found on agent.status (track_heartbeats dead-letters
    it) and events over max_event_bytes (the live decoder refuses them): a false NO."""
    import orjson

    from agentstream.agents.audit import rebuild as rebuild_module
    from agentstream.schemas import AgentStatusChanged, Heartbeat, encode
    from agentstream.streams.replay import ReplayRecord
    from agentstream.streams.tables.monitoring import HEARTBEATS

    beat = Event.of(Heartbeat(agent_id="ghost", sent_at="2026-01-01T00:00:00Z"), source="t")
    status = Event.of(
        AgentStatusChanged(
            agent_id="a",
            previous=None,
            current="up",
            reason="first_seen",
            changed_at="2026-01-01T00:00:00Z",
        ),
        source="t",
    )

    def rec(topic: str, event: Event[Any], pad: int = 0) -> ReplayRecord:
        value = encode(event) + b" " * pad
        return ReplayRecord(
            settings.topic(topic), 1, 7, 1_234_567, b"k", value, orjson.loads(value), None
        )

    records = [
        rec("agent.status", beat),  # misplaced
        rec("agent.heartbeats", beat, pad=settings.max_event_bytes),  # too large
        rec("agent.status", status),  # in place
    ]

    async def replay(*args: Any, **kwargs: Any) -> Any:
        for r in records:
            yield r

    async def counts(_settings: Any, names: list[str]) -> dict[str, int]:
        return {}  # the broker did not list them: the configured counts

    monkeypatch.setattr(rebuild_module, "replay", replay)
    monkeypatch.setattr(rebuild_module, "topic_partitions", counts)
    got = [e async for e in rebuild_module.source_events(settings, HEARTBEATS)]
    assert [e.type for e in got] == [AgentStatusChanged.TYPE]
    # with what the live fold knows of each record (`streams.tables.origin_of`)
    ((_, origin),) = [x async for x in rebuild_module.source_records(settings, HEARTBEATS)]
    assert (origin.topic, origin.partition, origin.offset, origin.key) == (
        "agent.status",
        1,
        7,
        b"k",
    )
    assert origin.timestamp == 1_234_567 / 1000.0
    assert origin.partitions == settings.topic_partitions


def test_a_checkpoint_preview_is_reused_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    # GET /checkpoints asks every worker, and each preview digests every table on the
    # event loop: a reader polling it stalled processing on all of them
    from agentstream.agents.audit import checkpoints

    made: list[int] = []

    def snapshot_now() -> object:
        made.append(1)
        return object()

    monkeypatch.setattr(checkpoints, "_snapshot_now", snapshot_now)
    monkeypatch.setattr(checkpoints, "_previewed", [])
    first = checkpoints._preview()
    assert checkpoints._preview() is first and len(made) == 1
    monkeypatch.setattr(checkpoints, "PREVIEW_REUSE_S", 0.0)
    assert checkpoints._preview() is not first and len(made) == 2


async def test_no_periodic_checkpoint_while_the_tables_are_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # taken mid-restore, its digests are of half-empty tables: no rebuild matches them
    from agentstream.agents.audit import checkpoints

    written: list[str] = []

    async def write_checkpoint(reason: str = "on_demand") -> None:
        written.append(reason)

    monkeypatch.setattr(checkpoints, "write_checkpoint", write_checkpoint)
    monkeypatch.setattr(checkpoints, "is_restoring", lambda: True)
    await checkpoints.take_periodic_checkpoint()
    assert written == []
    monkeypatch.setattr(checkpoints, "is_restoring", lambda: False)
    await checkpoints.take_periodic_checkpoint()
    assert written == ["periodic"]


def test_the_json_comparison_says_whether_there_was_a_live_table() -> None:
    # `rebuild --json` of a table with no changelog read "equal": false against an empty
    # live table, with nothing saying there was none to compare with
    from agentstream.agents.audit.rebuild import Comparison

    none = Comparison("t", "d1", "d0", 3, 0, live_available=False).to_dict()
    assert none["live_available"] is False
    assert Comparison("t", "d1", "d1", 3, 3).to_dict()["live_available"] is True


def test_rebuild_all_needs_one_changelog_of_the_app_id() -> None:
    # with none, nothing live was compared: a wrong app id (or no worker yet) exited 0
    from agentstream.agents.audit.rebuild import no_changelog_problem

    tables = ["security_policies", "accepted_by_sender"]
    line = no_changelog_problem("prod", tables, {"other-accepted_by_sender-changelog", "x"})
    assert line is not None and "\n" not in line
    assert line.startswith("AGENTSTREAM_APP_ID='prod': ")
    assert "prod-<table>-changelog" in line and "'prod-accepted_by_sender-changelog'" in line
    # a table a worker folds for itself has no changelog: one other table's is enough
    assert no_changelog_problem("prod", tables, {"prod-accepted_by_sender-changelog"}) is None
    assert no_changelog_problem("prod", [], set()) is None


async def test_the_rebuild_places_agents_by_the_topics_partition_count(monkeypatch: Any) -> None:
    """An auditor host whose AGENTSTREAM_TOPIC_PARTITIONS differs from the topic's count
    refused most heartbeats as misplaced (its own count): it folds by the topic's."""
    import orjson

    from agentstream.agents.audit import rebuild as rebuild_module
    from agentstream.schemas import Heartbeat, encode
    from agentstream.streams.replay import ReplayRecord
    from agentstream.streams.tables.monitoring import HEARTBEATS, home_partition

    real = settings.topic_partitions * 2 + 1
    agents = [f"agent-{i}" for i in range(20)]
    records = []
    for i, a in enumerate(agents):
        value = encode(Event.of(Heartbeat(agent_id=a, sent_at="2026-01-01T00:00:00Z"), source="t"))
        records.append(
            ReplayRecord(
                settings.topic("agent.heartbeats"),
                home_partition(a, real),
                i,
                1_234_567 + i,
                a.encode(),
                value,
                orjson.loads(value),
                None,
            )
        )

    async def replay(*args: Any, **kwargs: Any) -> Any:
        for r in records:
            yield r

    async def counts(_settings: Any, names: list[str]) -> dict[str, int]:
        return {n: real for n in names}

    monkeypatch.setattr(rebuild_module, "replay", replay)
    monkeypatch.setattr(rebuild_module, "topic_partitions", counts)
    state = await rebuild_module.rebuild_from_history(settings, HEARTBEATS)
    assert sorted(state) == sorted(agents)
