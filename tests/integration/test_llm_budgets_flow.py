"""Budgets through Kafka against the loopback LLM server: an agent that has spent its
token budget is refused `budget_exceeded` with no HTTP call, another agent is not; a
provider's cost budget skips that provider for the fallback, then refuses; `/llm/usage`
shows spend against each budget and `/metrics` counts the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from agentstream.schemas import Event
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext, LLMRequest
from tests.integration import test_llm_flow as flow
from tests.llm_server import LLMServer
from tests.support import await_until, web_tokens, web_url

pytestmark = pytest.mark.integration

#: loopback replies: 7 prompt tokens + 4 words = 11 tokens
TOKENS = 11


def ask(rid: str, agent: str, fallback: list[str] | None = None) -> Event[Any]:
    return Event.of(
        LLMRequest(
            request_id=rid,
            agent_id=agent,
            provider="loop",
            fallback=fallback or [],
            context=LLMContext(messages=[ChatMessage(role="user", content=f"hello {rid}")]),
            config=LLMConfig(model="loop-model", max_tokens=16),
        ),
        source="test",
    )


def budget_row(env: dict[str, str], agent: str, provider: str = "*") -> dict[str, Any]:
    rows = flow.view(env, "/llm/usage")["budgets"]
    return next(r for r in rows if r["agent"] == agent and r["provider"] == provider)


async def spend_reaches(
    env: dict[str, str], worker: Any, agent: str, provider: str, field: str, want: int
) -> dict[str, Any]:
    """The budget row once `field` is `want`; on timeout, the last row seen and the
    worker's log (a spend counted twice or never is told apart from a slow one)."""
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        last.clear()
        last.update(budget_row(env, agent, provider))
        return dict(last) if last[field] == want else None

    try:
        return await await_until(reached, 20, what=f"{agent}'s {field} at {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last row {last}\n{worker.tail(120)}") from None


async def test_budgets_refuse_in_stream(settings_env: dict[str, str], tmp_path: Path) -> None:
    server = LLMServer().start()
    providers = tmp_path / "providers.yaml"
    # 30-day windows: a test run does not straddle one's boundary (it would reset spend)
    providers.write_text(
        "providers:\n"
        f"  loop: {{kind: vllm, base_url: '{server.url}/v1'}}\n"
        "prices:\n"
        "  loop: {loop-model: {input: 1000, output: 1000}}\n"  # $0.011 per reply
        "budgets:\n"
        "  - {agent: '*', window: 30d, max_tokens: 1000}\n"
        f"  - {{agent: thrifty, window: 30d, max_tokens: {3 * TOKENS - 3}}}\n"
        "  - {agent: pricey, provider: loop, window: 30d, max_cost_usd: 0.02}\n"
    )
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "llm,health",  # health serves /metrics
        "AGENTSTREAM_LLM_PROVIDERS_FILE": str(providers),
    }
    _, _port, topics, worker, client = await flow.start_llm_worker(env, tmp_path)
    try:
        # -- a token budget: three calls spend it (the third goes past it: check-then-spend)
        for rid in ("t1", "t2", "t3"):
            await client.publish("llm.requests", ask(rid, "thrifty"))
            assert (await topics.response(rid)).status == "completed"
        row = await spend_reaches(env, worker, "thrifty", "*", "spent_tokens", 3 * TOKENS)
        assert row["max_tokens"] == 3 * TOKENS - 3 and row["remaining_tokens"] == 0
        assert row["exceeded"] and row["window"] == "30d" and row["requests"] == 3
        calls_before = len(server.requests)
        await client.publish("llm.requests", ask("t4", "thrifty"))
        t4 = await topics.response("t4")
        assert t4.status == "budget_exceeded" and not t4.attempts and t4.usage is None
        assert t4.error is not None and t4.error.error_class == "BudgetExceeded"
        assert "budget agent=thrifty provider=* model=* window=30d: 33 of 30 tokens" in (
            t4.error.message
        )
        assert flow.seen_for(server, "t4") == 0 and len(server.requests) == calls_before

        # -- another agent has its own (the default) budget, untouched by thrifty's ----------
        await client.publish("llm.requests", ask("g1", "generous"))
        assert (await topics.response("g1")).status == "completed"
        assert flow.seen_for(server, "g1") == 1

        # -- a provider's cost budget: the provider is skipped for the fallback, then refused
        for rid in ("p1", "p2"):
            await client.publish("llm.requests", ask(rid, "pricey"))
            assert (await topics.response(rid)).status == "completed"
        cost = await spend_reaches(env, worker, "pricey", "loop", "requests", 2)
        assert cost["spent_cost_usd"] == pytest.approx(2 * TOKENS * 1000 / 1e6)
        assert cost["exceeded"] and cost["remaining_cost_usd"] == 0
        await client.publish("llm.requests", ask("p3", "pricey", fallback=["local"]))
        p3 = await topics.response("p3")
        assert p3.status == "completed" and p3.provider == "local"
        assert [(a.provider, a.outcome) for a in p3.attempts] == [
            ("loop", "skipped"),
            ("local", "ok"),
        ]
        assert "provider=loop model=* window=30d: $0.0220 of $0.02 spent" in (
            p3.attempts[0].error or ""
        )
        await client.publish("llm.requests", ask("p4", "pricey"))
        p4 = await topics.response("p4")
        assert p4.status == "budget_exceeded" and p4.provider == "loop"
        assert flow.seen_for(server, "p3") == 0 and flow.seen_for(server, "p4") == 0

        # -- the view: spend against every budget; the refusals counted --------------------
        await spend_reaches(env, worker, "generous", "*", "spent_tokens", TOKENS)
        usage = flow.view(env, "/llm/usage")
        assert usage["agent"]["thrifty"]["budget_exceeded"] == 1
        default = {r["agent"]: r for r in usage["budgets"] if r["budget_agent"] == "*"}
        # thrifty's own budget replaces the default; pricey's local answer is unpriced
        assert set(default) == {"generous", "pricey"}
        assert default["pricey"]["unpriced_requests"] == 1
        assert default["generous"]["remaining_tokens"] == 1000 - TOKENS
        metrics = httpx.get(
            web_url(env) + "/metrics", headers=web_tokens(env).headers("read"), timeout=5
        ).text
        assert 'agentstream_llm_budget_denied_total{limit="tokens",window="30d"} 1.0' in metrics
        assert 'agentstream_llm_budget_denied_total{limit="cost",window="30d"} 1.0' in metrics
        assert worker.alive(), worker.tail()
    finally:
        await topics.stop()
        await client.stop()
        worker.stop()
        server.stop()
