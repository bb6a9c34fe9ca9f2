"""Midscene-style adapter: web search enrichment over real HTTP, trimming to budget."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agentstream.agents.llm.adapter import (
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
