"""The report folds each kind of event into the right agent, ignores repeated deliveries,
and renders self-contained HTML whose SVG bars carry the numbers."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from agentstream.agents.audit.report import ReportBuilder, bar_chart, render_html
from agentstream.schemas import (
    AgentMessage,
    AgentStatusChanged,
    CommunicationRecord,
    Event,
    LLMResponse,
)
from agentstream.schemas.llm import Usage

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def msg(i: int, sender: str, **meta: Any) -> Event[Any]:
    return Event.of(
        AgentMessage(message_id=f"m{i}", sender_id=sender, recipient_id="r", metadata=meta),
        source=sender,
    )


def sample() -> ReportBuilder:
    b = ReportBuilder()
    inputs = [msg(i, "alice" if i < 3 else "bob") for i in range(5)]
    for ev in inputs:
        b.add("agent.messages", ev)
    for ev in inputs[:2] + inputs[3:4]:
        b.add("agent.messages.accepted", ev.caused(ev.payload, source="enforce_policy"))
    rejected = inputs[2].caused(
        msg(2, "alice", rejection_reasons=["blocked pattern 'x'", "too large"]).payload,
        source="enforce_policy",
    )
    b.add("agent.messages.rejected", rejected)
    b.add("agent.messages.rejected", rejected)  # a repeated delivery counts once
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
        )
    b.add(
        "agent.status",
        Event.of(
            AgentStatusChanged(
                agent_id="alice", previous=None, current="up", reason="first_seen", changed_at=T0
            ),
            source="hb",
        ),
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
