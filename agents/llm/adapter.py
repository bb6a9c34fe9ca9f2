"""The Midscene-style adapter: wraps any provider, enriches the context with web search
results, trims what is sent to the model's token budget, and records latency and tokens.

Search is best-effort: a search endpoint that is down or answers garbage degrades the
request to "no search results" (logged and counted), it never fails the LLM call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import Counter, Histogram

from agentstream.agents.llm.providers.base import (
    LLMProvider,
    LLMResult,
    StreamChunk,
    estimate_tokens,
    model_label,
)
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext, Usage
from agentstream.streams.observability import LLM_TOKENS

log = logging.getLogger(__name__)

PROVIDER_LATENCY = Histogram(
    "agentstream_llm_provider_call_seconds",
    "Latency of one provider call (one attempt), by provider and outcome",
    ["provider", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SEARCHES = Counter(
    "agentstream_llm_web_searches_total", "Web searches by the adapter, by outcome", ["outcome"]
)
#: tokens kept free for the answer when the request sets no max_tokens
DEFAULT_ANSWER_RESERVE = 512
#: per-message overhead of chat formats (role markers, separators)
MESSAGE_OVERHEAD = 4
TRIM_MARK = " …[trimmed]"


@dataclass(frozen=True, slots=True)
class SearchResult:
    title: str
    url: str
    snippet: str


class WebSearchService:
    """A JSON search endpoint, SearxNG-style: ``GET {url}?q=...&format=json`` answering
    ``{"results": [{"title", "url", "content"}, ...]}``."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        max_results: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.max_results = max_results
        self._client = httpx.AsyncClient(timeout=timeout_s, transport=transport)

    async def search(self, query: str) -> list[SearchResult]:
        resp = await self._client.get(self.url, params={"q": query, "format": "json"})
        resp.raise_for_status()
        data = resp.json()
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list):
            raise ValueError("search answer has no results list")
        out = []
        for item in results[: self.max_results]:
            if isinstance(item, dict):
                out.append(
                    SearchResult(
                        title=str(item.get("title") or "")[:300],
                        url=str(item.get("url") or "")[:2048],
                        snippet=str(item.get("content") or item.get("snippet") or "")[:2000],
                    )
                )
        return out

    async def aclose(self) -> None:
        await self._client.aclose()


def message_tokens(m: ChatMessage) -> int:
    calls = sum(
        estimate_tokens(c.function.name) + estimate_tokens(c.function.arguments)
        for c in m.tool_calls or ()
    )
    return estimate_tokens(m.content) + calls + MESSAGE_OVERHEAD


def context_tokens(context: LLMContext) -> int:
    total = sum(message_tokens(m) for m in context.messages)
    if context.system_prompt:
        total += estimate_tokens(context.system_prompt) + MESSAGE_OVERHEAD
    return total


def _truncate(text: str, tokens: int) -> str:
    keep = max(0, tokens * 4 - len(TRIM_MARK))
    return text if len(text) <= keep else text[:keep] + TRIM_MARK


def trim_to_budget(context: LLMContext, budget: int) -> LLMContext:
    """Fit the context into `budget` tokens: drop the oldest turns first (never the
    system messages nor the last message), then shorten the longest remaining message.

    Each message is counted once and the total kept as messages are dropped: the context
    is the sender's, and recounting it after every drop made a request of thousands of
    messages block the event loop for seconds (quadratic)."""
    messages = list(context.messages)
    sizes = [message_tokens(m) for m in messages]
    system = (
        estimate_tokens(context.system_prompt) + MESSAGE_OVERHEAD if context.system_prompt else 0
    )
    total = sum(sizes) + system
    if total <= budget:
        return context
    last = len(messages) - 1
    # a tool's result without the call it answers is refused by providers (Anthropic):
    # the results of a dropped turn's calls go with it (unless one is the last message)
    results: dict[str, list[int]] = {}
    for k, m in enumerate(messages[:last]):
        if m.tool_call_id is not None:
            results.setdefault(m.tool_call_id, []).append(k)
    kept = [True] * len(messages)
    for k in range(last):
        if total <= budget:
            break
        if not kept[k] or messages[k].role == "system":
            continue
        kept[k] = False
        total -= sizes[k]
        for call in messages[k].tool_calls or ():
            for j in results.get(call.id, ()):
                if kept[j]:
                    kept[j] = False
                    total -= sizes[j]
    messages = [m for m, keep in zip(messages, kept, strict=True) if keep]
    ctx = context.model_copy(update={"messages": messages})
    excess = context_tokens(ctx) - budget
    if excess > 0:
        longest = max(range(len(messages)), key=lambda k: len(messages[k].content))
        m = messages[longest]
        allowed = max(1, estimate_tokens(m.content) - excess)
        messages[longest] = m.model_copy(update={"content": _truncate(m.content, allowed)})
        ctx = context.model_copy(update={"messages": messages})
    return ctx


def format_results(query: str, results: list[SearchResult]) -> str:
    lines = [f"Web search results for {query!r}:"]
    for n, r in enumerate(results, 1):
        lines.append(f"{n}. {r.title} — {r.url}\n   {r.snippet}")
    return "\n".join(lines)


class MidsceneAdapter(LLMProvider):
    def __init__(self, inner: LLMProvider, *, search: WebSearchService | None = None) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.search = search
        self.last_search: dict[str, Any] = {}

    async def initialize(self) -> None:
        await self.inner.initialize()

    def redact(self, text: str) -> str:
        return self.inner.redact(text)

    async def check_setup(self) -> bool:
        return await self.inner.check_setup()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def prepare(self, context: LLMContext, config: LLMConfig) -> LLMContext:
        if context.web_search_query and self.search is not None:
            try:
                results = await self.search.search(context.web_search_query)
                SEARCHES.labels("ok").inc()
            except Exception as exc:  # best-effort enrichment, see module docstring
                SEARCHES.labels("error").inc()
                log.warning("web search failed, continuing without results: %s", exc)
                results = []
            if results:
                block = ChatMessage(
                    role="system", content=format_results(context.web_search_query, results)
                )
                msgs = [*context.messages[:-1], block, context.messages[-1]]
                context = context.model_copy(update={"messages": msgs})
        reserve = config.max_tokens or DEFAULT_ANSWER_RESERVE
        budget = max(64, self.config.context_window - reserve)
        return trim_to_budget(context, budget)

    def _record(self, started: float, outcome: str, usage: Usage | None, model: str) -> None:
        PROVIDER_LATENCY.labels(self.name, outcome).observe(time.perf_counter() - started)
        if usage is not None:
            label = model_label(self.config, model)
            LLM_TOKENS.labels(self.name, label, "prompt").inc(usage.prompt_tokens)
            LLM_TOKENS.labels(self.name, label, "completion").inc(usage.completion_tokens)

    async def generate(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> LLMResult:
        ctx = await self.prepare(context, config)
        started = time.perf_counter()
        try:
            result = await self.inner.generate(ctx, config, timeout_s=timeout_s)
        except BaseException:
            self._record(started, "error", None, self.model_for(config))
            raise
        self._record(started, "ok", result.usage, result.model or self.model_for(config))
        return result

    async def stream(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamChunk]:
        ctx = await self.prepare(context, config)
        started = time.perf_counter()
        usage: Usage | None = None
        outcome = "error"
        try:
            async for chunk in self.inner.stream(ctx, config, timeout_s=timeout_s):
                if chunk.usage is not None:
                    usage = chunk.usage
                yield chunk
            outcome = "ok"
        finally:
            self._record(started, outcome, usage, self.model_for(config))
