"""enforce_policy's Prometheus metrics, without a broker: the decision-time histogram
observes the time each decision's record carries, by verdict, in its buckets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY

import agentstream.agents.security.agent as agent
from agentstream.agents.security.policy import PolicySet, compiled
from agentstream.schemas import AgentMessage, Event, encode
from agentstream.schemas.security import SecurityPolicy, Verdict
from agentstream.streams.processing import Inbound
from agentstream.streams.topics import AGENT_MESSAGES

HIST = "agentstream_security_decision_seconds"
POLICIES = PolicySet(
    [compiled(SecurityPolicy(policy_id="no-secrets", blocked_patterns=["secret"]))],
    enabled=True,
    default_action=Verdict.ALLOW,
)


def inbound(content: str, offset: int) -> Inbound:
    message = AgentMessage(
        message_id=f"m{offset}", sender_id="alice", recipient_id="bob", content=content
    )
    event = Event.of(message, source="test")
    raw = SimpleNamespace(
        topic=AGENT_MESSAGES, partition=0, offset=offset, key=b"alice", value=encode(event)
    )
    return Inbound(event, raw)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """perf_counter readings decide() gets, in order (it reads it before and after the
    evaluation)."""
    readings: list[float] = []
    monkeypatch.setattr(agent, "time", SimpleNamespace(perf_counter=lambda: readings.pop(0)))
    yield readings
    assert not readings, "decide() read the clock fewer times than the test expects"


def sample(suffix: str, verdict: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(HIST + suffix, {"verdict": verdict, **labels})
    return 0.0 if value is None else value


def snapshot(verdict: str) -> dict[str, float]:
    return {
        "count": sample("_count", verdict),
        "sum": sample("_sum", verdict),
        "le_0.01": sample("_bucket", verdict, le="0.01"),
        "le_0.025": sample("_bucket", verdict, le="0.025"),
    }


def test_each_decision_is_observed_with_the_time_its_record_carries(clock: list[float]) -> None:
    # evaluations of 12.5 ms (allowed) and 4 ms (denied: blocked pattern)
    clock += [100.0, 100.0125, 200.0, 200.004]
    allowed = agent.decide(inbound("hello", 1), POLICIES, agent._NO_KEYS)
    denied = agent.decide(inbound("a secret", 2), POLICIES, agent._NO_KEYS)
    assert allowed.result.verdict is Verdict.ALLOW and denied.result.verdict is Verdict.DENY
    for outcome, seconds in ((allowed, 0.0125), (denied, 0.004)):
        assert outcome.evaluation_s == pytest.approx(seconds)
        # the histogram and security.decisions tell the same time (the record in whole µs)
        assert outcome.decision["payload"]["evaluation_us"] == int(outcome.evaluation_s * 1e6)

    before = {v: snapshot(v) for v in ("allow", "deny")}
    counted_before = {
        v: REGISTRY.get_sample_value("agentstream_security_decisions_total", {"verdict": v}) or 0
        for v in ("allow", "deny")
    }
    slow = replace(allowed, evaluation_s=0.3)  # one more allow, far beyond the alert's 10 ms
    agent._tally([allowed, denied, slow])
    after = {v: snapshot(v) for v in ("allow", "deny")}
    delta: dict[str, dict[str, Any]] = {
        v: {k: after[v][k] - before[v][k] for k in after[v]} for v in after
    }
    assert delta["allow"]["count"] == 2 and delta["deny"]["count"] == 1
    assert delta["allow"]["sum"] == pytest.approx(0.3125)
    assert delta["deny"]["sum"] == pytest.approx(0.004)
    # 12.5 ms is above the 10 ms bucket, 4 ms below it; 300 ms is in neither
    assert (delta["allow"]["le_0.01"], delta["allow"]["le_0.025"]) == (0, 1)
    assert (delta["deny"]["le_0.01"], delta["deny"]["le_0.025"]) == (1, 1)
    # and the decisions counter counts the same decisions
    for verdict, n in (("allow", 2), ("deny", 1)):
        counted = REGISTRY.get_sample_value(
            "agentstream_security_decisions_total", {"verdict": verdict}
        )
        assert counted == counted_before[verdict] + n


def test_both_verdicts_are_exported_before_any_decision() -> None:
    # rate() over a series that appears with its first observation misses that one;
    # the children are bound at import, so both series start at 0
    for verdict in Verdict:
        assert REGISTRY.get_sample_value(HIST + "_count", {"verdict": verdict.value}) is not None
