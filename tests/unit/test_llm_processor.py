"""AgentProcessor recovery paths with scripted providers (no Kafka, no sleeps beyond ms)."""

from __future__ import annotations

import asyncio
import time

import pytest

from agentstream.agents.llm.processor import AgentProcessor
from agentstream.agents.llm.providers.mock import ScriptedProvider, Step
from agentstream.agents.llm.registry import LLMRegistry
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext, LLMRequest, Usage
from agentstream.streams.errors import (
    ProviderRateLimited,
    ProviderRequestError,
    ProviderServerError,
    ProviderTimeout,
)
from agentstream.streams.resilience import RetryPolicy, Transition


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(
    provider: str = "p", *, stream: bool = True, fallback: list[str] | None = None, rid: str = "r1"
) -> LLMRequest:
    return LLMRequest(
        request_id=rid,
        agent_id="agent-1",
        provider=provider,
        fallback=fallback or [],
        stream=stream,
        context=LLMContext(messages=[ChatMessage(role="user", content="hello there")]),
        config=LLMConfig(model="m"),
    )


def processor(
    *providers: ScriptedProvider,
    clock: Clock | None = None,
    transitions: list[Transition] | None = None,
    **policy: float,
) -> AgentProcessor:
    reg = LLMRegistry(secrets=None)
    for p in providers:
        reg.register_provider(p.name, p)
    pol = RetryPolicy(base_delay_s=0.001, max_delay_s=1.0, rng=lambda: 0.5, **policy)  # type: ignore[arg-type]
    return AgentProcessor(
        reg,
        policy=pol,
        breaker_failures=3,
        breaker_window_s=60,
        breaker_reset_s=10,
        clock=clock or Clock(),
        on_transition=(transitions.append if transitions is not None else None),
    )


async def test_streams_deltas_in_order_and_estimates_missing_usage() -> None:
    p = ScriptedProvider("p", [Step(deltas=["a", "b", "c"])])
    seen: list[tuple[str, str, int]] = []

    async def sink(delta: str, provider: str, attempt: int) -> None:
        seen.append((delta, provider, attempt))

    out = await processor(p).process_request(request(), on_chunk=sink)
    assert out.status == "completed" and out.content == "abc" and out.chunks == 3
    assert seen == [("a", "p", 1), ("b", "p", 1), ("c", "p", 1)]
    assert out.usage is not None and out.usage.estimated and out.usage.prompt_tokens > 0
    assert [a.outcome for a in out.attempts] == ["ok"]


async def test_provider_usage_is_kept_unflagged() -> None:
    usage = Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)
    p = ScriptedProvider("p", [Step(deltas=["x"], usage=usage)])
    out = await processor(p).process_request(request())
    assert out.usage == usage and not out.usage.estimated


async def test_non_streaming_gives_no_chunks() -> None:
    p = ScriptedProvider("p", [Step(deltas=["whole answer"])])
    calls: list[str] = []

    async def sink(delta: str, provider: str, attempt: int) -> None:
        calls.append(delta)

    out = await processor(p).process_request(request(stream=False), on_chunk=sink)
    assert out.content == "whole answer" and not calls and out.chunks == 0


async def test_5xx_retried_then_success_every_attempt_recorded() -> None:
    p = ScriptedProvider(
        "p",
        [
            Step(error=ProviderServerError("HTTP 500", status_code=500)),
            Step(deltas=["a"], error=ProviderServerError("drop")),
            Step(deltas=["ok"]),
        ],
    )
    out = await processor(p).process_request(request())
    assert out.status == "completed" and out.content == "ok"
    assert [(a.attempt, a.outcome) for a in out.attempts] == [(1, "error"), (2, "error"), (3, "ok")]
    assert out.attempts[0].status_code == 500
    assert len(p.calls) == 3


async def test_429_waits_retry_after() -> None:
    p = ScriptedProvider(
        "p", [Step(error=ProviderRateLimited("429", retry_after_s=0.3)), Step(deltas=["ok"])]
    )
    start = time.monotonic()
    out = await processor(p).process_request(request())
    assert time.monotonic() - start >= 0.3
    assert out.status == "completed" and out.attempts[0].retry_after_s == 0.3


async def test_4xx_fails_at_once_with_the_error() -> None:
    p = ScriptedProvider("p", [Step(error=ProviderRequestError("HTTP 400 bad", status_code=400))])
    out = await processor(p).process_request(request())
    assert out.status == "failed" and len(p.calls) == 1
    assert out.error is not None and out.error.error_class == "ProviderRequestError"
    assert not out.error.retriable and "bad" in out.error.message


async def test_timeouts_retried_a_bounded_number_of_times() -> None:
    p = ScriptedProvider("p", [Step(error=ProviderTimeout("t")) for _ in range(10)])
    out = await processor(p, max_attempts=10, max_timeout_retries=2).process_request(request())
    assert out.status == "failed" and len(p.calls) == 3


async def test_max_attempts_then_failed() -> None:
    p = ScriptedProvider("p", [Step(error=ProviderServerError("500")) for _ in range(10)])
    proc = processor(p, max_attempts=2)
    proc._breaker_args = (100, 60, 10)  # keep the breaker out of this test
    out = await proc.process_request(request())
    assert out.status == "failed" and len(p.calls) == 2
    assert out.error is not None and out.error.retriable


async def test_breaker_opens_fails_fast_half_opens_and_closes() -> None:
    clock, transitions = Clock(), []
    p = ScriptedProvider("p", [Step(error=ProviderServerError("500")) for _ in range(3)])
    proc = processor(p, clock=clock, transitions=transitions, max_attempts=5)
    out = await proc.process_request(request())
    assert out.status == "failed" and len(p.calls) == 3
    assert proc.breaker("p").state == "open"
    fast = await proc.process_request(request(rid="r2"))
    assert fast.status == "failed" and len(p.calls) == 3  # provider not called
    assert fast.attempts[0].outcome == "circuit_open"
    assert fast.error is not None and fast.error.error_class == "CircuitOpen"
    clock.now += 10
    probe = await proc.process_request(request(rid="r3"))
    assert probe.status == "completed" and len(p.calls) == 4
    assert [(t.previous, t.current) for t in transitions] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


async def test_fallback_chain_after_failure_and_when_open() -> None:
    bad = ScriptedProvider("bad", [Step(error=ProviderRequestError("401", status_code=401))])
    good = ScriptedProvider("good", [Step(deltas=["from good"])])
    out = await processor(bad, good).process_request(request("bad", fallback=["good"]))
    assert out.status == "completed" and out.provider == "good"
    assert [(a.provider, a.outcome) for a in out.attempts] == [("bad", "error"), ("good", "ok")]


async def test_cancel_mid_stream_returns_partial_within_a_second() -> None:
    p = ScriptedProvider("p", [Step(deltas=[f"w{i} " for i in range(100)], delay_s=0.05)])
    cancel = asyncio.Event()
    got: list[str] = []

    async def sink(delta: str, provider: str, attempt: int) -> None:
        got.append(delta)
        if len(got) == 3:
            cancel.set()

    start = time.monotonic()
    out = await processor(p).process_request(request(), on_chunk=sink, cancel=cancel)
    assert time.monotonic() - start < 1.0
    assert out.status == "cancelled" and out.content == "".join(got) == "w0 w1 w2 "
    assert out.usage is not None and out.usage.estimated and out.usage.completion_tokens > 0
    assert out.attempts[-1].outcome == "cancelled"


async def test_cancel_before_start_never_calls_provider() -> None:
    p = ScriptedProvider("p", [])
    cancel = asyncio.Event()
    cancel.set()
    out = await processor(p).process_request(request(), cancel=cancel)
    assert out.status == "cancelled" and not p.calls and out.content == ""


async def test_cancel_during_backoff() -> None:
    p = ScriptedProvider("p", [Step(error=ProviderRateLimited("429", retry_after_s=0.9))])
    cancel = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, cancel.set)
    start = time.monotonic()
    out = await processor(p).process_request(request(), cancel=cancel)
    assert out.status == "cancelled" and time.monotonic() - start < 0.6


async def test_unknown_provider_fails_with_error() -> None:
    out = await processor().process_request(request("nope"))
    assert out.status == "failed" and out.error is not None
    assert "unknown provider" in out.error.message


@pytest.mark.parametrize("stream", [True, False])
async def test_local_provider_through_processor(stream: bool) -> None:
    out = await AgentProcessor(LLMRegistry(secrets=None)).process_request(
        request("local", stream=stream)
    )
    assert out.status == "completed" and out.content and out.usage is not None
    assert not out.usage.estimated and out.provider == "local"


# -- logical models ---------------------------------------------------------------------------
def aliased(*providers: ScriptedProvider, default: str | None = "fast") -> AgentProcessor:
    proc = processor(*providers)
    proc.registry.set_aliases(["fast", "smart"], default)
    return proc


def asking(
    model: str | None, provider: str | None = "big", fallback: list[str] | None = None
) -> LLMRequest:
    r = request(provider or "big", fallback=fallback)
    return r.model_copy(
        update={"provider": provider, "config": r.config.model_copy(update={"model": model})}
    )


async def test_fallback_sends_each_provider_its_own_model() -> None:
    big = ScriptedProvider(
        "big",
        [Step(error=ProviderServerError("HTTP 503", status_code=503))],
        model="",
        models={"fast": "gpt-4o-mini", "smart": "gpt-4o"},
    )
    small = ScriptedProvider("small", [Step(deltas=["from small"])], model="llama3.2")
    proc = aliased(big, small)
    proc.policy = RetryPolicy(max_attempts=1)
    out = await proc.process_request(asking("fast", fallback=["small"]))
    assert out.status == "completed" and out.provider == "small" and out.alias == "fast"
    assert [c.model for _, c in big.calls] == ["gpt-4o-mini"]
    assert [c.model for _, c in small.calls] == ["llama3.2"]
    assert out.model == "llama3.2"  # the scripted provider answers with what it was sent
    assert [(a.provider, a.model, a.outcome) for a in out.attempts] == [
        ("big", "gpt-4o-mini", "error"),
        ("small", "llama3.2", "ok"),
    ]


async def test_a_provider_without_the_model_is_skipped_not_called() -> None:
    big = ScriptedProvider("big", [], models={"fast": "gpt-4o-mini", "smart": "gpt-4o"})
    small = ScriptedProvider("small", [], model="llama3.2")
    out = await aliased(big, small).process_request(
        asking("smart", provider="small", fallback=["big"])
    )
    assert out.status == "completed" and out.provider == "big" and out.model == "gpt-4o"
    assert not small.calls
    skipped = out.attempts[0]
    assert (skipped.provider, skipped.outcome, skipped.model) == ("small", "skipped", "")
    assert skipped.error == "small: 'small' serves no model for 'smart'"


async def test_no_provider_serves_the_model_fails_without_calling_any() -> None:
    big = ScriptedProvider("big", [], models={"fast": "gpt-4o-mini", "smart": "gpt-4o"})
    small = ScriptedProvider("small", [], model="llama3.2")
    proc = aliased(big, small)
    out = await proc.process_request(asking("fsat", fallback=["small"]))
    assert out.status == "failed" and not big.calls and not small.calls
    assert [a.outcome for a in out.attempts] == ["skipped", "skipped"]
    assert out.error is not None and out.error.error_class == "ModelUnavailable"
    assert "did you mean 'fast'" in out.error.message and not out.error.retriable
    assert out.provider == "" and out.model == ""  # no provider was asked
    assert not proc.breakers  # nor a breaker made for one


async def test_no_model_asks_for_the_default_alias() -> None:
    big = ScriptedProvider("big", [], models={"fast": "gpt-4o-mini", "smart": "gpt-4o"})
    out = await aliased(big).process_request(asking(None))
    assert out.status == "completed" and out.alias == "fast"
    assert [c.model for _, c in big.calls] == ["gpt-4o-mini"]


async def test_provider_slash_model_heads_the_chain() -> None:
    big = ScriptedProvider("big", [], models={"fast": "gpt-4o-mini", "smart": "gpt-4o"})
    small = ScriptedProvider("small", [], model="llama3.2")
    out = await aliased(big, small).process_request(asking("small/qwen2.5:7b", provider=None))
    assert out.provider == "small" and out.alias == "" and not big.calls
    assert [c.model for _, c in small.calls] == ["qwen2.5:7b"]


async def test_unknown_provider_is_an_error_attempt_without_a_breaker() -> None:
    proc = processor()
    out = await proc.process_request(request("nope"))
    assert [(a.provider, a.outcome) for a in out.attempts] == [("nope", "error")]
    assert out.error is not None and out.error.error_class == "ProviderRequestError"
    assert "nope" not in proc.breakers


async def test_a_provider_over_its_budget_is_skipped_and_never_called() -> None:
    from agentstream.agents.llm.models import Hop, Route

    spent = ScriptedProvider("p", [Step(deltas=["never"])])
    other = ScriptedProvider("q", [Step(deltas=["from q"])])
    proc = processor(spent, other)
    req = request("p", fallback=["q"])
    plan = proc.route(req)
    reason = "budget agent=agent-1 provider=p model=* window=1h: 10 of 10 tokens spent"
    limited = Route((Hop("p", plan.model_of("p"), skip=reason), *plan.hops[1:]), plan.alias)
    out = await proc.process_request(req, plan=limited)
    assert out.status == "completed" and out.provider == "q" and out.content == "from q"
    assert [(a.provider, a.outcome) for a in out.attempts] == [("p", "skipped"), ("q", "ok")]
    assert reason in (out.attempts[0].error or "")
    assert spent.calls == [] and len(other.calls) == 1


@pytest.mark.parametrize("stream", [True, False])
async def test_a_call_gets_the_operators_timeout_which_a_request_may_only_shorten(
    stream: bool,
) -> None:
    # docs/llm.md: a provider's `timeout_s`, else AGENTSTREAM_LLM_TIMEOUT_S; a request's
    # own `timeout_s` shortens it, never lengthens it (an hour-long call would hold a
    # slot, or the breaker's one half-open probe, that long)
    tuned = ScriptedProvider("tuned", [Step(deltas=["a"])] * 3, timeout_s=7.0)
    plain = ScriptedProvider("plain", [Step(deltas=["a"])])
    proc = AgentProcessor(LLMRegistry(secrets=None), timeout_s=60.0)
    proc.registry.register_provider("tuned", tuned)
    proc.registry.register_provider("plain", plain)
    await proc.process_request(request("tuned", stream=stream))
    for rid, own in (("r2", 3.0), ("r3", 3600.0)):
        asked = request("tuned", stream=stream, rid=rid).model_copy(update={"timeout_s": own})
        await proc.process_request(asked)
    await proc.process_request(request("plain", stream=stream, rid="r4"))
    assert tuned.timeouts == [7.0, 3.0, 7.0]
    assert plain.timeouts == [60.0]


async def test_a_requests_own_short_timeout_neither_opens_the_breaker_nor_retries() -> None:
    # A hostile sender with timeout_s 0.001 on every provider must not open the breakers
    # the other agents use; the operator's own timeout still counts.
    p = ScriptedProvider("p", [Step(error=ProviderTimeout("slow", provider="p"))] * 20)
    proc = processor(p)  # breaker: 3 failures
    for i in range(5):
        short = request("p", rid=f"s{i}").model_copy(update={"timeout_s": 0.001})
        out = await proc.process_request(short)
        assert out.status == "failed"
        assert len(out.attempts) == 1, "a timeout the request chose is not retried"
    assert proc.breaker("p").state == "closed"
    out = await proc.process_request(request("p", rid="op"))  # the operator's timeout
    assert proc.breaker("p").state == "open", out.attempts


async def test_timeouts_of_at_least_half_the_operators_still_count() -> None:
    # requests that all shorten the timeout a little must not keep a hung provider's
    # breaker closed for everyone
    p = ScriptedProvider("p", [Step(error=ProviderTimeout("hung", provider="p"))] * 20)
    proc = processor(p)  # operator 60 s, breaker: 3 failures
    for i in range(3):
        asked = request("p", rid=f"h{i}").model_copy(update={"timeout_s": 30.0})
        await proc.process_request(asked)
        if proc.breaker("p").state == "open":
            break
    assert proc.breaker("p").state == "open"


async def test_every_error_a_provider_raises_is_redacted_before_it_is_recorded() -> None:
    # Errors from a stream, a 200 answer or a transport carry whatever the server sent:
    # the processor passes each through the provider's `redact` before an attempt or the
    # final response (both on llm.responses) quotes it.
    class Echoing(ScriptedProvider):
        def redact(self, text: str) -> str:
            return text.replace("sk-live-42", "***")

    p = Echoing(
        "p", [Step(error=ProviderServerError("upstream said sk-live-42", provider="p"))] * 3
    )
    out = await processor(p).process_request(request("p"))
    assert out.status == "failed"
    texts = [a.error or "" for a in out.attempts] + [out.error.message if out.error else ""]
    assert texts and all("sk-live-42" not in t for t in texts), texts
    assert any("***" in t for t in texts)


async def test_an_unknown_providers_name_is_not_the_responses_provider() -> None:
    """The final response names the provider that was asked: a name the request made up
    was asked nothing (else each made-up name became a usage counter of its own)."""
    out = await processor().process_request(request("zz"))
    assert out.status == "failed" and out.provider == "" and out.model == ""
    p = ScriptedProvider("p", [Step(error=ProviderServerError("HTTP 503", status_code=503))])
    proc = processor(p)
    proc.policy = RetryPolicy(max_attempts=1)
    out = await proc.process_request(request("p", fallback=["zz"]))
    assert out.status == "failed" and out.provider == "p"
