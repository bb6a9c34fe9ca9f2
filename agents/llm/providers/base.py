"""The provider interface, shaped like httpx's transports: one small abstract class, a
config, and value types for results and streamed chunks.

    provider = registry.get_provider("openai")
    await provider.initialize()
    result = await provider.generate(context, config)           # whole answer
    async for chunk in provider.stream(context, config):         # deltas, then usage
        ...

`stream` is cancellable: cancelling the consuming task closes the HTTP response at once.
Failures are raised as `streams.errors.ProviderError` subclasses so the retry policy can
read `retriable` and the status code; messages never contain credentials.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agentstream.schemas.llm import LLMConfig, LLMContext, ToolCall, ToolCallDelta, Usage
from agentstream.streams.tables import llm as tables_llm

#: fetches a secret by name (e.g. "llm.openai.api_key"); None when there is none
SecretSource = Callable[[str], Awaitable[str | None]]

#: the built-in `local` provider's model when it is configured with none (defined with
#: the usage table, which counts under it and cannot import the agents)
LOCAL_MODEL = tables_llm.LOCAL_MODEL

ProviderKind = Literal[
    "openai", "azure", "vllm", "llamacpp", "lmstudio", "ollama", "anthropic", "local"
]


class ProviderConfig(BaseModel):
    """One provider as declared in the providers file (never holds a key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    kind: ProviderKind = "openai"
    #: e.g. https://api.openai.com/v1, http://127.0.0.1:8000/v1 (vLLM),
    #: https://<resource>.openai.azure.com (Azure), http://127.0.0.1:11434 (Ollama)
    base_url: str = ""
    #: this provider's default model: sent when a request names no model and no default
    #: alias is set, and for the default alias when `models` names none for it
    model: str = Field(default="", max_length=256)
    #: alias (declared in the file's `aliases`) → this provider's own model for it
    models: dict[str, str] = Field(default_factory=dict)
    #: Azure: the deployment every call goes to; without it, the model a request is
    #: routed to (an alias's entry in `models`) is the deployment
    deployment: str | None = None
    api_version: str | None = None
    organization: str | None = None
    #: other organizations a request's `organization` may name (OpenAI bills the one in
    #: the header: a key of several organizations must not let a request choose freely)
    allowed_organizations: list[str] = Field(default_factory=list)
    #: read `llm.<name>.api_key` from the keychain and send it
    requires_key: bool = False
    #: other origins a request's `api_endpoint` may point at (the key goes with the call)
    allowed_endpoints: list[str] = Field(default_factory=list)
    timeout_s: float | None = Field(default=None, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_concurrency: int | None = Field(default=None, ge=1)
    #: ask OpenAI-compatible servers for usage in the stream (stream_options.include_usage)
    stream_usage: bool = True
    #: tokens the model accepts in total (prompt + completion): the adapter trims to it
    context_window: int = Field(default=8192, ge=256)
    #: Anthropic: max_tokens for requests that give none (its API requires one; 4096)
    max_tokens: int | None = Field(default=None, ge=1)
    headers: dict[str, str] = Field(default_factory=dict)
    #: local provider only: seconds between streamed words (demo visibility)
    word_delay_s: float = Field(default=0.0, ge=0)

    @field_validator("models")
    @classmethod
    def _models_named(cls, models: dict[str, str]) -> dict[str, str]:
        for alias, model in models.items():
            if not model.strip() or len(model) > 256:
                raise ValueError(f"models: {alias!r} maps to {model[:40]!r}, not a model name")
        return models

    @model_validator(mode="after")
    def _one_deployment_or_a_map(self) -> ProviderConfig:
        if self.kind == "azure" and self.deployment and self.models:
            raise ValueError(
                "give either `deployment` (every call goes to it) or `models` (a deployment "
                "per alias), not both"
            )
        return self

    @property
    def default_model(self) -> str:
        """The model this provider is sent when routing gives it its default."""
        if self.model:
            return self.model
        if self.deployment:
            return self.deployment
        return LOCAL_MODEL if self.kind == "local" else ""


@dataclass(slots=True)
class StreamChunk:
    """One streamed piece: a text delta, pieces of tool calls, and/or the usage (which
    often comes last)."""

    delta: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    model: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


@dataclass(slots=True)
class LLMResult:
    content: str
    usage: Usage | None
    model: str
    finish_reason: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


class LLMProvider(ABC):
    """The narrow interface every provider implements."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def model_for(self, config: LLMConfig) -> str:
        """The model to ask for: the request's (the processor routes every request to a
        provider model), else this provider's default (direct calls naming none)."""
        return config.model or self.config.default_model

    async def initialize(self) -> None:  # noqa: B027 - optional hook
        """Open clients, fetch credentials. Idempotent."""

    @abstractmethod
    async def generate(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> LLMResult: ...

    @abstractmethod
    def stream(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamChunk]: ...

    async def check_setup(self) -> bool:
        """Is the provider usable (reachable, credentials present)? Never raises."""
        return True

    def redact(self, text: str) -> str:
        """`text` with this provider's secrets replaced (`***`). The processor passes every
        error a call raised through it before an event quotes it."""
        return text

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release clients."""


def model_label(config: ProviderConfig, model: str | None) -> str:
    """A metric label for a model of this provider: one its configuration names, else
    `other` (a request may name any model; each name would make a series of its own)."""
    if not model:
        return "-"
    return model if model == config.model or model in config.models.values() else "other"


#: the most tokens a provider's count may report: far above any model's context, and far
#: enough below 2**63 (what the usage and spend counters, sums of them, can encode)
MAX_REPORTED_TOKENS = 10**12


def token_count(value: Any) -> int:
    """A token count a provider reported (None or absent: 0). Raises ValueError for one
    that is no count: not a number, not finite (JSON's 1e400 is infinity), negative, or
    over `MAX_REPORTED_TOKENS` (a count of 2**64 could not be encoded in a response)."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise ValueError(f"token count {value!r} is not a number")
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"token count {str(value)[:40]!r} is not a finite number") from None
    if not 0 <= n <= MAX_REPORTED_TOKENS:
        raise ValueError(f"token count {n} is out of range")
    return n


def reported_usage(prompt: Any, completion: Any, total: Any = None) -> Usage | None:
    """Usage from a provider's counts (total: prompt + completion when absent), or None
    when one is no count (`token_count`): the usage is then estimated, as when the
    provider sends none, rather than the answer failing."""
    try:
        p, c = token_count(prompt), token_count(completion)
        t = token_count(total) or p + c
    except ValueError:
        return None
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=t)


def chat_messages(context: LLMContext) -> list[dict[str, Any]]:
    """The context as OpenAI/Ollama-style message dicts, system prompt first."""
    out: list[dict[str, Any]] = []
    if context.system_prompt:
        out.append({"role": "system", "content": context.system_prompt})
    out.extend({"role": m.role, "content": m.content} for m in context.messages)
    return out


def estimate_tokens(text: str) -> int:
    """~4 characters per token: the usual rule of thumb for English BPE tokenizers."""
    return math.ceil(len(text) / 4) if text else 0


def estimate_usage(context: LLMContext, completion: str) -> Usage:
    """Usage estimated from text length, flagged `estimated=True`."""
    prompt = sum(estimate_tokens(m["content"]) + 4 for m in chat_messages(context))
    completion_tokens = estimate_tokens(completion)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion_tokens,
        total_tokens=prompt + completion_tokens,
        estimated=True,
    )
