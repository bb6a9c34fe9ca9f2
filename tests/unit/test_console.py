"""The console snapshot builder (`streams.console`): pure functions over the views'
answers, the workers' counters and the topic tails."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from agentstream.streams import console
from agentstream.streams.console import Sample, Tail


def sample(at: float, **workers: dict[str, dict[str, float]]) -> Sample:
    return Sample(at=at, counters={url: {"m": c} for url, c in workers.items()})


def test_rates_sum_workers_over_the_window() -> None:
    history = [
        sample(0, a={"allow": 10}, b={"allow": 0}),
        sample(2, a={"allow": 20}, b={"allow": 4}),
        sample(4, a={"allow": 30}, b={"allow": 10}),
    ]
    assert console.rates(history, "m") == {"allow": (20 + 10) / 4}
    # only the samples within the window count
    assert console.rates(history, "m", window_s=2) == {"allow": (10 + 6) / 2}


def test_a_restarted_worker_counts_its_new_value_and_a_new_one_nothing() -> None:
    history = [sample(0, a={"deny": 100}), sample(5, a={"deny": 5}, b={"deny": 50})]
    # a restarted from 0 and counted 5 since; b joined: its 50 are not growth in 5 s
    assert console.rates(history, "m") == {"deny": 1.0}


def test_rates_need_two_samples() -> None:
    assert console.rates([sample(0, a={"x": 1})], "m") == {}
    assert console.rates([], "m") == {}


def test_quantile_interpolates_inside_buckets() -> None:
    le = ["0.1", "1", "+Inf"]
    assert console.quantile(0.5, le, [50, 100, 100]) == pytest.approx(0.1)
    assert console.quantile(0.75, le, [50, 100, 100]) == pytest.approx(0.55)
    # beyond the last finite bound: that bound (as Prometheus does)
    assert console.quantile(0.99, le, [0, 0, 10]) == 1.0
    assert console.quantile(0.5, le, [0, 0, 0]) is None


def test_read_counters_and_latency_from_a_registry() -> None:
    reg = CollectorRegistry()
    c = Counter("agentstream_security_decisions_total", "d", ["verdict"], registry=reg)
    c.labels("allow").inc(3)
    h = Histogram(
        "agentstream_llm_latency_seconds", "l", ["provider"], buckets=(0.1, 1), registry=reg
    )
    h.labels("local").observe(0.05)
    h.labels("local").observe(0.5)
    got = console.read_counters(reg.collect())
    assert got["counters"]["agentstream_security_decisions"] == {"allow": 3.0}
    lat = got["latency"]["local"]
    assert lat["le"] == ["0.1", "1.0", "+Inf"] and lat["counts"] == [1.0, 2.0, 2.0]
    assert lat["count"] == 2.0


def test_latency_uses_the_recent_window_else_everything() -> None:
    def lat(at: float, counts: list[float]) -> Sample:
        h = {"le": ["0.1", "1", "+Inf"], "counts": counts}
        return Sample(at=at, counters={}, latency={"w": {"p": h}})

    recent = console.latency([lat(0, [100, 100, 100]), lat(2, [100, 110, 110])])
    # the 10 requests of the last two seconds were all between 0.1 and 1 s
    assert recent["p"]["window"] == "recent" and recent["p"]["count"] == 10
    assert 0.1 < recent["p"]["p50"] <= 1
    idle = console.latency([lat(0, [100, 100, 100]), lat(2, [100, 100, 100])])
    assert idle["p"]["window"] == "all" and idle["p"]["p50"] < 0.1


def item(at: float, payload: dict[str, Any], offset: int = 0) -> dict[str, Any]:
    return {"at": at, "partition": 0, "offset": offset, "payload": payload}


def dead(at: float, original: bytes, **kw: Any) -> dict[str, Any]:
    payload = {
        "original_b64": base64.b64encode(original).decode(),
        "topic": "p.agent.messages",
        "partition": 1,
        "offset": 7,
        "timestamp_ms": int(at * 1000) - 3,
        "error_class": "UndecodableEvent",
        "error_message": "not JSON",
        "consumer": "enforce_policy",
        **kw,
    }
    return item(at, payload, offset=int(at))


def test_dead_letters_are_redacted_filtered_and_replayable() -> None:
    tail = Tail(
        dead_letters=[
            dead(100, b'{"token": "hunter2", "x'),
            dead(200, b"plain", error_class="SchemaError", topic="p.llm.requests"),
        ]
    )
    newest, oldest = console.dead_letters(tail, "p.")
    assert newest["reason"] == "SchemaError" and newest["topic"] == "llm.requests"
    assert "hunter2" not in oldest["original"] and "[REDACTED]" in oldest["original"]
    assert oldest["replay"] == (
        "agentstream replay --topics p.agent.messages --since 99997 --until 99998 --meta"
    )
    assert [d["id"] for d in console.dead_letters(tail, "p.", reason="SchemaError")] == ["0:200"]
    assert [d["id"] for d in console.dead_letters(tail, "p.", topic="agent.messages")] == ["0:100"]
    assert [d["id"] for d in console.dead_letters(tail, "p.", since_ms=150_000)] == ["0:200"]
    assert [d["id"] for d in console.dead_letters(tail, "p.", until_ms=150_000)] == ["0:100"]


def test_a_topic_name_is_quoted_for_the_shell() -> None:
    cmd = console.replay_command({"topic": "a b;rm -rf x", "timestamp_ms": 5}, 9)
    assert cmd == "agentstream replay --topics 'a b;rm -rf x' --since 5 --until 6 --meta"


def test_original_bytes_not_utf8_and_cut() -> None:
    text, size, cut = console.original_text(base64.b64encode(b"\xff" + b"a" * 10).decode(), 4)
    assert text == "\\xff" and size == 11 and cut


DECISION_VIEW = {
    "counts": {"deny": {"*": 5, "blocked_patterns": 4, "security_level": 1}, "allow": {"*": 9}}
}
POLICIES_VIEW = {
    "ready": True,
    "enabled": True,
    "default_action": "allow",
    "policies": [{"policy_id": "no-pw", "version": 2, "level": "standard", "broken": None}],
}


def build(**kw: Any) -> dict[str, Any]:
    deny = {
        "message_id": "m1",
        "sender_id": "a",
        "recipient_id": "b",
        "verdict": "deny",
        "rules": ["blocked_patterns"],
        "reasons": [
            "blocked_patterns: matched 'hunter2' in content [policy no-pw v2]",
            "max_message_size: content is 9 bytes, limit 8 [policy no-pw v2]",
        ],
        "policies": {"no-pw": 2},
    }
    args: dict[str, Any] = {
        "now": 1000.0,
        "self_url": "http://w1",
        "prefix": "p.",
        "workers": {
            "answers": [
                [
                    "http://w1",
                    {"lag": {"p.agent.messages:1": 3}, "probes": {"llm": {"in_flight": 2}}},
                ],
                ["http://w2", {"lag": {}, "probes": {"llm": {"in_flight": 1}}}],
            ],
            "missing": [],
        },
        "views": {
            "/agents/status": (
                200,
                {
                    "counts": {"up": 1, "down": 1},
                    "agents": [
                        {
                            "agent_id": "a",
                            "status": "up",
                            "timeout_s": 4,
                            "info": {"password": "x"},
                        },
                        {"agent_id": "b", "status": "down", "timeout_s": 4},
                    ],
                },
            ),
            "/security/decisions/": (200, DECISION_VIEW),
            "/llm/breakers": (
                200,
                {"breakers": {"local": {"live": {"state": "open", "failures": 3}}}},
            ),
            "/llm/usage": (200, {"agent": {"a": {"total_tokens": 7}}, "provider": {}, "model": {}}),
            "/security/policies/": (200, POLICIES_VIEW),
        },
        "tail": Tail(
            status=[
                item(
                    990, {"agent_id": "b", "previous": "up", "current": "down", "reason": "timeout"}
                )
            ],
            decisions=[item(995, deny)],
            checkpoints=[item(900, {"worker_id": "w1", "taken_at": "1970-01-01T00:15:00Z"})],
        ),
        "history": [
            Sample(0, {"http://w1": {"agentstream_security_decisions": {"allow": 0}}}),
            Sample(10, {"http://w1": {"agentstream_security_decisions": {"allow": 50}}}),
        ],
        "patterns": {"no-pw": {"blocked_patterns": ["hunter2"], "allowed_patterns": []}},
    }
    args.update(kw)
    return console.build(**args)


def test_the_snapshot_gathers_every_section() -> None:
    doc = build()
    assert doc["partial"] is False and doc["problems"] == {}
    assert doc["agents"]["counts"] == {"up": 1, "down": 1}
    assert doc["agents"]["detection_delay_s"] == 4
    assert "info" not in doc["agents"]["list"][0]  # what an agent reports is not shown
    assert doc["agents"]["timeline"][0]["current"] == "down"
    assert doc["messages"]["accepted_per_s"] == 5.0
    assert doc["messages"]["top_rules"] == [["blocked_patterns", 4], ["security_level", 1]]
    assert doc["messages"]["top_policies"] == [["no-pw", 1]]
    assert doc["llm"]["in_flight"] == 3
    assert doc["llm"]["breakers"]["local"]["state"] == "open"
    assert doc["pipeline"]["lag"] == [
        {"topic": "agent.messages", "partition": 1, "lag": 3, "worker": "http://w1"}
    ]
    assert doc["pipeline"]["checkpoints"][0]["age_s"] == 100.0
    assert doc["policies"]["policies"][0]["blocked_patterns"] == ["hunter2"]


def test_a_read_token_sees_no_pattern() -> None:
    doc = console.for_read(build())
    assert "hunter2" not in str(doc)
    assert doc["messages"]["recent"][0]["reasons"] == [
        f"blocked_patterns: {console.HIDDEN_REASON} [policy no-pw v2]",
        "max_message_size: content is 9 bytes, limit 8 [policy no-pw v2]",
    ]
    assert doc["policies"]["patterns_shown"] is False
    assert "blocked_patterns" not in doc["policies"]["policies"][0]


def test_a_broken_policys_error_is_hidden_from_read() -> None:
    got = console.read_reason("invalid_policy: bad regex '(unclosed' [policy p-1 v3]")
    assert got == f"invalid_policy: {console.HIDDEN_BROKEN} [policy p-1 v3]"


def test_a_view_that_does_not_answer_is_a_problem_not_a_failure() -> None:
    views = {"/agents/status": (503, {"error": "rebalancing"})}
    doc = build(views=views)
    assert doc["partial"] is True
    assert doc["problems"]["/agents/status"].startswith("HTTP 503: rebalancing")
    assert doc["problems"]["/llm/usage"] == "not asked"
    assert doc["agents"]["list"] == []


def test_a_partial_answer_says_why() -> None:
    # a worker restoring its tables, a partition owned by nobody: the reasons, not "partial: "
    status = {
        "counts": {"up": 0, "down": 0},
        "agents": [],
        "partial": True,
        "missing": [{"worker": "http://w2", "error": "HTTP 503: restoring"}],
        "restoring": ["http://w1"],
        "unowned_partitions": [3],
    }
    doc = build(views={"/agents/status": (200, status)})
    assert doc["problems"]["/agents/status"] == (
        "partial: http://w2: HTTP 503: restoring; http://w1: restoring its tables; "
        "partitions [3] owned by no worker"
    )
    only = build(
        views={"/agents/status": (200, {**status, "missing": [], "unowned_partitions": []})}
    )
    assert only["problems"]["/agents/status"] == "partial: http://w1: restoring its tables"


def test_probes_report_their_own_failure() -> None:
    console.register_probe("t-broken", lambda: 1 / 0)
    try:
        assert console.run_probes()["t-broken"] == {"error": "ZeroDivisionError: division by zero"}
    finally:
        del console.PROBES["t-broken"]


BAD_SHARES = {
    "lag-key": {"lag": {"t:x": 1}},
    "lag-value": {"lag": {"p.agent.messages:1": "many"}},
    "lag-list": {"lag": [1, 2]},
    "probes": {"lag": {}, "probes": {"llm": [1]}},
    "counters": {"lag": {}, "counters": {"agentstream_dead_letters": 3}},
    "latency": {"lag": {}, "latency": {"local": {"le": ["1"], "counts": "1"}}},
    "a-list": [1, 2],
    "a-string": "ok",
    "latency-bound": {"lag": {}, "latency": {"local": {"le": ["x"], "counts": [1]}}},
}


@pytest.mark.parametrize("share", BAD_SHARES.values(), ids=BAD_SHARES.keys())
def test_a_malformed_peer_share_is_a_problem_not_a_frozen_console(share: Any) -> None:
    answers = [
        ["http://w1", {"lag": {"p.agent.messages:1": 3}, "probes": {"llm": {"in_flight": 2}}}],
        ["http://w2", share],
    ]
    doc = build(workers={"answers": answers, "missing": []})
    assert doc["partial"] is True
    assert "malformed" in doc["problems"]["worker http://w2"]
    # the rest of the frame is there, the good worker's share included
    assert doc["pipeline"]["lag"] == [
        {"topic": "agent.messages", "partition": 1, "lag": 3, "worker": "http://w1"}
    ]
    assert doc["llm"]["in_flight"] == 2 and doc["agents"]["counts"] == {"up": 1, "down": 1}
    assert console.share_problem(answers[0][1]) is None
