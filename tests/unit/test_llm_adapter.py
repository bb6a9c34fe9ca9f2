"""Midscene-style adapter: web search enrichment over real HTTP, trimming to budget."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agentstream.agents.llm.adapter import (
    TRIM_MARK,
    MidsceneAdapter,
    WebSearchService,
    context_tokens,
    trim_to_budget,
)
from agentstream.agents.llm.providers.base import ProviderConfig
from agentstream.agents.llm.providers.local import LocalProvider
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext
from tests.llm_server import LLMServer


@pytest.fixture(scope="module")
def server() -> Iterator[LLMServer]:
    with LLMServer() as srv:
        yield srv


def ctx(*contents: str, query: str | None = None) -> LLMContext:
    return LLMContext(
        messages=[ChatMessage(role="user", content=c) for c in contents],
        web_search_query=query,
        system_prompt="sys",
    )


async def test_search_results_are_added_before_the_last_message(server: LLMServer) -> None:
    search = WebSearchService(server.url + "/search")
    adapter = MidsceneAdapter(LocalProvider(), search=search)
    prepared = await adapter.prepare(
        ctx("earlier", "question", query="kafka faust"), LLMConfig(model="m")
    )
    await search.aclose()
    assert [m.role for m in prepared.messages] == ["user", "system", "user"]
    block = prepared.messages[1].content
    assert "About kafka" in block and "https://example.org/faust" in block
    assert server.requests[-1].query == {"q": "kafka faust", "format": "json"}


async def test_search_failure_degrades_to_no_results(server: LLMServer) -> None:
    search = WebSearchService(server.url + "/search")
    adapter = MidsceneAdapter(LocalProvider(), search=search)
    prepared = await adapter.prepare(ctx("q", query="fail"), LLMConfig(model="m"))
    result = await adapter.generate(ctx("q", query="fail"), LLMConfig(model="m"))
    await search.aclose()
    assert [m.content for m in prepared.messages] == ["q"]
    assert result.content


def test_trim_drops_oldest_turns_then_shortens() -> None:
    long_ctx = ctx(*(f"turn {i} " + "x" * 400 for i in range(10)), "final question")
    trimmed = trim_to_budget(long_ctx, 300)
    assert context_tokens(trimmed) <= 300
    assert trimmed.messages[-1].content == "final question"
    assert len(trimmed.messages) < 11
    huge = ctx("y" * 40_000)
    cut = trim_to_budget(huge, 500)
    assert context_tokens(cut) <= 500 and cut.messages[0].content.endswith("[trimmed]")
    small = ctx("hi")
    assert trim_to_budget(small, 500) is small


async def test_adapter_trims_to_the_provider_context_window() -> None:
    adapter = MidsceneAdapter(
        LocalProvider(ProviderConfig(name="l", kind="local", context_window=1024))
    )
    prepared = await adapter.prepare(ctx("z" * 20_000), LLMConfig(model="m", max_tokens=24))
    assert context_tokens(prepared) <= 1000


def _trim_reference(context: LLMContext, budget: int) -> list[ChatMessage]:
    """The trimming rule written the obvious (quadratic) way: drop the oldest message that
    is neither a system message nor the last, with the results of its tool calls, until
    the context fits."""
    from agentstream.agents.llm.adapter import context_tokens

    messages = list(context.messages)
    i = 0
    while context_tokens(context.model_copy(update={"messages": messages})) > budget:
        while i < len(messages) - 1 and messages[i].role == "system":
            i += 1
        if i >= len(messages) - 1:
            break
        dropped = messages.pop(i)
        ids = {c.id for c in dropped.tool_calls or ()}
        if ids:
            messages = [
                m
                for k, m in enumerate(messages)
                if m.tool_call_id not in ids or k == len(messages) - 1
            ]
    return messages


def _conversation(draw: Any) -> LLMContext:
    from hypothesis import strategies as st

    from agentstream.schemas.llm import FunctionCall, ToolCall

    n = draw(st.integers(1, 25))
    messages: list[ChatMessage] = []
    for k in range(n):
        kind = draw(st.sampled_from(["system", "user", "assistant", "call", "result"]))
        text = "w " * draw(st.integers(0, 60))
        if kind == "call":
            calls = [
                ToolCall(id=f"c{k}-{j}", function=FunctionCall(name="f", arguments="{}"))
                for j in range(draw(st.integers(1, 2)))
            ]
            messages.append(ChatMessage(role="assistant", content=text, tool_calls=calls))
        elif kind == "result":
            earlier = [c.id for m in messages for c in m.tool_calls or ()] or ["none"]
            call_id = draw(st.sampled_from(earlier))
            messages.append(ChatMessage(role="tool", content=text, tool_call_id=call_id))
        else:
            messages.append(ChatMessage(role=kind, content=text))
    return LLMContext(messages=messages)


def test_trimming_drops_what_the_rule_drops() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(st.data(), st.integers(1, 400))
    def check(data: Any, budget: int) -> None:
        context = _conversation(data.draw)
        trimmed = trim_to_budget(context, budget)
        kept = _trim_reference(context, budget)
        # the same messages survive (the longest may then be shortened to fit)
        assert [m.role for m in trimmed.messages] == [m.role for m in kept]
        for got, want in zip(trimmed.messages, kept, strict=True):
            assert got.tool_call_id == want.tool_call_id
            assert want.content.startswith(got.content.removesuffix(TRIM_MARK))

    check()


def test_trimming_counts_each_message_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hostile request of thousands of messages recounted after every drop blocked the
    # event loop for seconds (quadratic); the count must stay linear in the messages.
    from agentstream.agents.llm import adapter

    calls = 0
    real = adapter.message_tokens

    def counted(m: ChatMessage) -> int:
        nonlocal calls
        calls += 1
        return real(m)

    monkeypatch.setattr(adapter, "message_tokens", counted)
    context = LLMContext(
        messages=[ChatMessage(role="user", content="x" * 400) for _ in range(1000)]
    )
    trimmed = trim_to_budget(context, 500)
    assert len(trimmed.messages) < 10
    assert calls <= 3 * len(context.messages), calls
