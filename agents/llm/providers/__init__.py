"""LLM providers behind one narrow async interface (`LLMProvider`)."""

from agentstream.agents.llm.providers.base import (
    LLMProvider,
    LLMResult,
    ProviderConfig,
    StreamChunk,
    estimate_tokens,
    estimate_usage,
)

__all__ = [
    "LLMProvider",
    "LLMResult",
    "ProviderConfig",
    "StreamChunk",
    "estimate_tokens",
    "estimate_usage",
]
