"""A scripted in-process provider for unit tests of the processor (wire behaviour is
tested against the real loopback HTTP server in tests/llm_server.py).

Each call pops the next step from `script`: an exception to raise (before or after some
deltas), or a list of deltas to stream. The calls it received are kept in `calls`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agentstream.agents.llm.providers.base import (
    LLMProvider,
    LLMResult,
    ProviderConfig,
    StreamChunk,
)
from agentstream.schemas.llm import LLMConfig, LLMContext, Usage


@dataclass
class Step:
    deltas: list[str] = field(default_factory=list)
    error: BaseException | None = None
    usage: Usage | None = None
    #: seconds before each delta (a slow or hanging provider)
    delay_s: float = 0.0


class ScriptedProvider(LLMProvider):
    def __init__(
        self,
        name: str,
        script: list[Step],
        *,
        healthy: bool = True,
        model: str = "mock",
        models: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(
            ProviderConfig(
                name=name, kind="local", model=model, models=models or {}, timeout_s=timeout_s
            )
        )
        self.script = list(script)
        self.calls: list[tuple[LLMContext, LLMConfig]] = []
        #: the timeout each call was given
        self.timeouts: list[float | None] = []
        self.healthy = healthy
        self.initialized = False

    async def initialize(self) -> None:
        self.initialized = True

    def _next(self, context: LLMContext, config: LLMConfig) -> Step:
        self.calls.append((context, config))
        return self.script.pop(0) if self.script else Step(deltas=["ok"])

    async def generate(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> LLMResult:
        step = self._next(context, config)
        self.timeouts.append(timeout_s)
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        if step.error is not None:
            raise step.error
        return LLMResult("".join(step.deltas), step.usage, self.model_for(config), "stop")

    async def stream(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamChunk]:
        step = self._next(context, config)
        self.timeouts.append(timeout_s)
        for delta in step.deltas:
            await asyncio.sleep(step.delay_s)
            yield StreamChunk(delta=delta)
        if step.error is not None:
            raise step.error
        if step.usage is not None:
            yield StreamChunk(usage=step.usage, finish_reason="stop")

    async def check_setup(self) -> bool:
        return self.healthy
