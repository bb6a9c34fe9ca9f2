"""The report folds each kind of event into the right agent, ignores repeated deliveries,
and renders self-contained HTML whose SVG bars carry the numbers."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from agentstream.agents.audit.report import ReportBuilder, bar_chart, render_html
from agentstream.agents.security.agent import forward_bytes
from agentstream.schemas import (
    AgentMessage,
    AgentStatusChanged,
    CommunicationRecord,
    Event,
    LLMResponse,
    registry,
)
from agentstream.schemas.llm import Usage
from agentstream.streams.replay import Gap

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def msg(i: int, sender: str, **meta: Any) -> Event[Any]:
    return Event.of(
        AgentMessage(message_id=f"m{i}", sender_id=sender, recipient_id="r", metadata=meta),
        source=sender,
    )


def forwarded(sent: Event[Any], offset: int, **meta: Any) -> Event[Any]:
    """What `enforce_policy` forwards from `sent`, read at `offset` of agent.messages."""
    message = sent.payload.model_copy(update={"metadata": meta}) if meta else sent.payload
    return registry.decode(forward_bytes(sent, message, None, "agent.messages", 0, offset))


class Offsets:
    """The next offset of each topic, as records are written to it."""

    def __init__(self) -> None:
        self.next: dict[str, int] = {}

    def __call__(self, topic: str) -> tuple[int, int]:
        offset = self.next[topic] = self.next.get(topic, -1) + 1
        return 0, offset


def sample() -> ReportBuilder:
    b = ReportBuilder()
    at = Offsets()
    inputs = [msg(i, "alice" if i < 3 else "bob") for i in range(5)]
    for ev in inputs:
        b.add("agent.messages", ev, *at("agent.messages"))
    for i in (0, 1, 3):
        b.add("agent.messages.accepted", forwarded(inputs[i], i), *at("accepted"))
    rejected = forwarded(inputs[2], 2, rejection_reasons=["blocked pattern 'x'", "too large"])
    b.add("agent.messages.rejected", rejected, *at("rejected"))
    # the input decided again after a crash: its copy written again counts once
    b.add("agent.messages.rejected", rejected, *at("rejected"))
    for provider, model, tokens in (
        ("openai", "gpt-x", 10),
        ("openai", "gpt-x", 5),
        ("ollama", "llama", 7),
    ):
        b.add(
            "llm.responses",
            Event.of(
                LLMResponse(
                    request_id=f"q{tokens}",
                    agent_id="bob",
                    status="completed",
                    provider=provider,
                    model=model,
                    usage=Usage(
                        prompt_tokens=tokens, completion_tokens=2 * tokens, total_tokens=3 * tokens
                    ),
                ),
                source="llm",
            ),
            *at("llm.responses"),
        )
    b.add(
        "agent.status",
        Event.of(
            AgentStatusChanged(
                agent_id="alice", previous=None, current="up", reason="first_seen", changed_at=T0
            ),
            source="hb",
        ),
        *at("agent.status"),
    )
    for kind in ("token", "token", "wallet"):
        b.add(
            "comms.records",
            Event.of(
                CommunicationRecord(
                    record_id=f"c-{kind}-{id(kind)}-{b.events}",
                    kind=kind,
                    agent_id="alice",
                    recorded_at=T0,
                ),
                source="comms",
            ),
            *at("comms.records"),
        )
    return b


def test_counts_per_agent() -> None:
    data = sample().result(T0, T0)
    alice, bob = data["agents"]["alice"], data["agents"]["bob"]
    assert alice["messages"] == {
        "sent": 3,
        "accepted": 2,
        "rejected": 1,
        "rejection_reasons": {"blocked pattern 'x'": 1, "too large": 1},
    }
    assert bob["messages"]["sent"] == 2 and bob["messages"]["accepted"] == 1
    assert bob["llm"]["calls"] == 3
    by_model = {(r["provider"], r["model"]): r for r in bob["llm"]["tokens"]}
    assert by_model[("openai", "gpt-x")]["prompt_tokens"] == 15
    assert by_model[("openai", "gpt-x")]["completion_tokens"] == 30
    assert by_model[("ollama", "llama")]["calls"] == 1
    assert alice["status_changes"][0]["to"] == "up"
    assert alice["comms"] == {"token": 2, "wallet": 1}
    assert data["duplicates_ignored"] == 1
    assert data["totals"]["sent"] == 5 and data["totals"]["rejected"] == 1


def test_a_sender_reusing_one_event_id_is_counted_message_by_message() -> None:
    """Every message of a sender reusing one event id (and causation id) counts, with the
    reasons of each rejection: inputs are told apart by their coordinates, forwarded
    copies by the event id the worker derives from them. Before, the report counted them
    as one message sent, one accepted, one rejected with the first rejection's reasons,
    the rest under an unattributed `duplicates_ignored`."""
    reused = uuid4()
    b = ReportBuilder()
    at = Offsets()
    outcomes: list[list[str]] = [[], ["blocked pattern 'x'"], [], ["too large"], ["too large"]]
    for i, reasons in enumerate(outcomes):
        sent = Event.of(
            AgentMessage(message_id=f"m{i}", sender_id="mallory", recipient_id="r"),
            source="mallory",
            event_id=reused,
            causation_id=str(reused),
        )
        partition, offset = at("agent.messages")
        b.add("agent.messages", sent, partition, offset)
        if reasons:
            copy = forwarded(sent, offset, rejection_reasons=reasons)
            b.add("agent.messages.rejected", copy, *at("rejected"))
        else:
            b.add("agent.messages.accepted", forwarded(sent, offset), *at("accepted"))
    # the last input decided again after a crash: one message still
    b.add("agent.messages.rejected", forwarded(sent, 4, rejection_reasons=reasons), *at("rejected"))
    data = b.result(T0, T0)
    assert data["agents"]["mallory"]["messages"] == {
        "sent": 5,
        "accepted": 2,
        "rejected": 3,
        "rejection_reasons": {"too large": 2, "blocked pattern 'x'": 1},
    }
    assert data["duplicates_ignored"] == 1


def test_outputs_of_inputs_sharing_an_event_id_stay_apart() -> None:
    """LLM responses and status changes are told apart by what they are about, too: a
    requester reusing one event id for many requests has each call counted."""
    reused = str(uuid4())
    b = ReportBuilder()
    at = Offsets()
    for rid in ("q1", "q2", "q1"):  # q1's response repeated after a crash
        response = LLMResponse(request_id=rid, agent_id="eve", status="completed")
        b.add("llm.responses", Event.of(response, source="llm", causation_id=reused), *at("r"))
    for agent in ("a1", "a2"):
        change = AgentStatusChanged(
            agent_id=agent, previous=None, current="up", reason="first_seen", changed_at=T0
        )
        b.add("agent.status", Event.of(change, source="hb", causation_id=reused), *at("s"))
    data = b.result(T0, T0)
    assert data["agents"]["eve"]["llm"]["calls"] == 2
    assert data["totals"]["status_changes"] == 2
    assert data["duplicates_ignored"] == 1


def test_html_is_self_contained_with_bars_carrying_values() -> None:
    page = render_html(sample().result(T0, T0))
    assert "<svg" in page and "<script" not in page
    assert not re.search(r"(src|href)=\"https?:", page)
    bars = re.findall(r'data-label="([^"]+)" data-series="([^"]+)" data-value="([^"]+)"', page)
    assert ("alice", "sent", "3") in bars
    assert ("alice", "rejected", "1") in bars
    assert ("openai / gpt-x", "prompt", "15") in bars


def test_empty_chart_says_so() -> None:
    assert "No data" in bar_chart("x", "X", [])


def test_the_report_says_what_it_could_not_count() -> None:
    """Offsets deleted before they could be read and records the Kafka client cannot
    parse are in the report itself, JSON and HTML, above the counts they are missing
    from; a complete report says nothing of it."""
    b = sample()
    assert "Missing from this report" not in render_html(b.result(T0, T0))
    b.lost = [Gap("agent.messages", 0, 0, 9)]
    b.unreadable = ["agent.messages[1] offsets 4..7: <zstd> not available"]
    data = b.result(T0, T0)
    assert data["unreadable_records"] == 1
    assert data["unreadable"] == ["agent.messages[1] offsets 4..7: <zstd> not available"]
    assert data["lost"] == [{"topic": "agent.messages", "partition": 0, "first": 0, "stop": 9}]
    assert data["lost_offsets"] == 9
    page = render_html(data)
    missing = page[page.index('<section class="incomplete"') : page.index('<div class="cards">')]
    assert "9 offset(s) deleted" in missing
    assert "1 record(s) the Kafka client cannot parse" in missing
    assert "agent.messages:0 offsets 0-8 (9) were deleted" in missing
    assert "agent.messages[1] offsets 4..7: &lt;zstd&gt; not available" in missing


def test_an_agent_reusing_one_heartbeat_event_id_has_every_status_change_shown() -> None:
    """The monitor's "up" changes are caused by heartbeats, whose event ids the agent
    chooses: one reusing a single id had every later "up" merged into its first, its
    flapping hidden. A status change is told apart by what the worker wrote in it (its
    time above all); the same change read again, or written again with a new event
    id, still counts once."""
    reused = str(uuid4())
    b = ReportBuilder()
    at = Offsets()
    flaps = [
        (None, "up", "first_seen", 0),
        ("up", "down", "timeout", 20),
        ("down", "up", "heartbeat", 40),
        ("up", "down", "timeout", 60),
        ("down", "up", "heartbeat", 80),
    ]
    for previous, current, reason, s in flaps:
        change = AgentStatusChanged(
            agent_id="flappy",
            previous=previous,
            current=current,
            reason=reason,
            changed_at=T0 + timedelta(seconds=s),
        )
        # "up" after a heartbeat (caused by it), "down" after the monitor's timer
        cause = reused if current == "up" else None
        event = Event.of(change, source="track_heartbeats", causation_id=cause)
        b.add("agent.status", event, *at("agent.status"))
    # the last change written again with a new event id (the same change, once)
    again = Event.of(change, source="track_heartbeats", causation_id=reused)
    b.add("agent.status", again, *at("agent.status"))
    data = b.result(T0, T0)
    shown = [(c["from"], c["to"]) for c in data["agents"]["flappy"]["status_changes"]]
    assert shown == [(None, "up"), ("up", "down"), ("down", "up"), ("up", "down"), ("down", "up")]
    assert data["duplicates_ignored"] == 1


def test_an_agent_reusing_one_request_event_id_and_request_id_has_every_call_counted() -> None:
    """A request id answered once is not called again while the worker remembers it
    (`AGENTSTREAM_LLM_DEDUP_RETENTION_S`); after that, an agent reusing one request's
    event id and request id gets a new call each time, and each is counted with its
    tokens (they were merged into the first). A sealed copy of one response still
    counts once: its seal is where the chain stood, not what it says."""
    reused = str(uuid4())
    b = ReportBuilder()
    at = Offsets()
    responses = []
    for tokens, latency in ((100, 812.5), (4000, 9120.25), (4000, 9033.75)):
        response = LLMResponse(
            request_id="same",
            agent_id="eve",
            status="completed",
            provider="openai",
            model="gpt-x",
            latency_ms=latency,
            usage=Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens),
            hash=f"h{latency}",
            prev_hash="p",
        )
        responses.append(response)
        event = Event.of(response, source="call_llm", causation_id=reused)
        b.add("llm.responses", event, *at("llm.responses"))
    # the last response written again after a crash: new event id, sealed anew
    copy = responses[-1].model_copy(update={"hash": "h-again", "prev_hash": "h9033.75"})
    b.add("llm.responses", Event.of(copy, source="call_llm", causation_id=reused), *at("r"))
    data = b.result(T0, T0)
    llm = data["agents"]["eve"]["llm"]
    assert llm["calls"] == 3
    assert llm["tokens"][0]["total_tokens"] == 8100
    assert data["duplicates_ignored"] == 1


def test_an_event_of_another_topics_type_is_set_aside_not_a_crash() -> None:
    # a hostile producer may publish any type to agent.messages: a Heartbeat there raised
    # AttributeError ('Heartbeat' object has no attribute 'sender_id') out of the report
    from agentstream.schemas import Heartbeat

    b = ReportBuilder()
    hb = Event.of(Heartbeat(agent_id="a", sent_at=T0), source="a")
    for n, topic in enumerate(
        (
            "agent.messages",
            "agent.messages.accepted",
            "agent.messages.rejected",
            "llm.responses",
            "comms.records",
            "agent.status",
        )
    ):
        b.add(topic, hb, 0, n)
    b.add("agent.messages", msg(1, "alice"), 0, 10)
    data = b.result(T0, T0)
    assert data["totals"]["sent"] == 1 and data["events"] == 1
    assert data["off_topic_records"] == 6


def test_an_output_too_deep_to_digest_is_still_counted() -> None:
    # metadata nested past what orjson writes (254 levels) decodes, but output_digest
    # raised ValueError out of the report
    deep: Any = {}
    for _ in range(300):
        deep = {"d": deep}
    raw = {
        "type": "llm.response",
        "schema_version": LLMResponse.VERSION,
        "event_id": str(uuid4()),
        "occurred_at": T0.isoformat(),
        "source": "call_llm",
        "causation_id": "req-event",
        "payload": {
            "request_id": "r1",
            "agent_id": "alice",
            "status": "completed",
            "metadata": deep,
        },
    }
    import json

    ev = registry.decode(json.dumps(raw).encode(), limits=False)
    b = ReportBuilder()
    b.add("llm.responses", ev, 0, 0)
    assert b.result(T0, T0)["totals"]["llm_calls"] == 1
