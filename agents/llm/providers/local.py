"""A deterministic offline provider: the same context and config always give the same
answer, streamed word by word, with usage counted the way a tokenizer roughly would.

It lets `agentstream demo` and tests show the whole path with no network and no keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator

from agentstream.agents.llm.providers.base import (
    LOCAL_MODEL,
    LLMProvider,
    LLMResult,
    ProviderConfig,
    StreamChunk,
    chat_messages,
    estimate_tokens,
)
from agentstream.schemas.llm import LLMConfig, LLMContext, Usage

_PROSE = (
    "the stream carries every event in order while agents fold state into tables and "
    "replay history when a worker restarts so nothing is lost between partitions offsets "
    "commit after the response lands on the broker retries back off breakers open and "
    "close tokens are counted per agent provider and model"
)
_VOCAB = _PROSE.split(" ")

DEFAULT_WORDS = 48


class LocalProvider(LLMProvider):
    def __init__(self, config: ProviderConfig | None = None) -> None:
        super().__init__(config or ProviderConfig(name="local", kind="local", model=LOCAL_MODEL))

    def words(self, context: LLMContext, config: LLMConfig) -> list[str]:
        model = self.model_for(config)
        seed_src = repr((chat_messages(context), model, config.temperature, config.stop))
        seed = int.from_bytes(hashlib.sha256(seed_src.encode()).digest()[:8], "big")
        rng = random.Random(seed)
        last_user = next(
            (m.content for m in reversed(context.messages) if m.role == "user"),
            context.messages[-1].content,
        )
        topic = " ".join(last_user.split()[:8])
        limit = config.max_tokens or DEFAULT_WORDS
        n = min(limit, DEFAULT_WORDS)
        words = [f"[{model}]", "re:", *topic.split()] + [rng.choice(_VOCAB) for _ in range(n)]
        words = words[: max(1, limit)]
        if config.stop:
            text = " ".join(words)
            for stop in config.stop:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            words = text.split() or words[:1]
        return words

    def usage(self, context: LLMContext, completion: str) -> Usage:
        prompt = sum(estimate_tokens(m["content"]) + 4 for m in chat_messages(context)) + 3
        completion_tokens = max(1, round(len(completion.split()) * 1.3))
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion_tokens,
            total_tokens=prompt + completion_tokens,
        )

    async def generate(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> LLMResult:
        text = " ".join(self.words(context, config))
        return LLMResult(text, self.usage(context, text), self.model_for(config), "stop")

    async def stream(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamChunk]:
        words = self.words(context, config)
        for i, word in enumerate(words):
            if self.config.word_delay_s:
                await asyncio.sleep(self.config.word_delay_s)
            else:
                await asyncio.sleep(0)  # a cancellation point, like a real stream
            yield StreamChunk(delta=word if i == 0 else " " + word)
        text = " ".join(words)
        yield StreamChunk(
            usage=self.usage(context, text), finish_reason="stop", model=self.model_for(config)
        )
