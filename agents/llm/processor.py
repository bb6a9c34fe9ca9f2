"""AgentProcessor: one LLM request → one outcome, with retries, circuit breakers,
fallback providers and cancellation. No Kafka here; the agent feeds it requests and
publishes what it reports (`on_chunk` for deltas, the returned `Outcome` for the final
response), so every recovery path is unit-tested in-process.

    for provider, its model in route(request)     (agents/llm/models.py)
        serves no such model?    → attempt "skipped", next provider
        breaker open?            → attempt "circuit_open", next provider
        attempt 1..max_attempts: stream / generate
            ok                   → completed
            cancel event set     → cancelled (partial content, usage so far)
            error                → breaker.record_failure, policy decides retry + delay
    → failed, carrying the last error (never silence)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from agentstream.agents.llm import structured
from agentstream.agents.llm.adapter import MidsceneAdapter, WebSearchService
from agentstream.agents.llm.models import Route, route
from agentstream.agents.llm.providers.base import LLMProvider, estimate_tokens, estimate_usage
from agentstream.agents.llm.registry import LLMRegistry
from agentstream.agents.llm.structured import InvalidResponseFormat
from agentstream.agents.llm.tools import ToolCallAccumulator
from agentstream.schemas.errors import PipelineError
from agentstream.schemas.llm import (
    AttemptRecord,
    ErrorInfo,
    LLMConfig,
    LLMRequest,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from agentstream.streams.errors import (
    CircuitOpen,
    ProviderError,
    ProviderRequestError,
    ProviderTimeout,
)
from agentstream.streams.resilience import CircuitBreaker, RetryPolicy, Transition
from agentstream.streams.resilience.retry import retry_after_of

#: (delta, provider, attempt) → published as an llm.chunk; pieces of tool calls come
#: as the keyword argument `tool_calls` (only when there are some)
ChunkSink = Callable[..., Awaitable[None]]
Status = Literal["completed", "cancelled", "failed", "budget_exceeded"]


@dataclass
class Outcome:
    status: Status
    content: str = ""
    usage: Usage | None = None
    provider: str = ""
    model: str = ""
    attempts: list[AttemptRecord] = field(default_factory=list)
    latency_ms: float = 0.0
    chunks: int = 0
    error: ErrorInfo | None = None
    #: the logical model the request asked for ("" when it named none of them)
    alias: str = ""
    #: completed with a response_format to check: did the content satisfy it
    schema_valid: bool | None = None
    schema_error: str = ""
    #: completed: the answer's complete tool calls
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = ""


@dataclass
class _Partial:
    """What the current attempt produced so far (read when it is cancelled)."""

    parts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    model: str = ""
    tools: ToolCallAccumulator = field(default_factory=ToolCallAccumulator)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = ""

    @property
    def content(self) -> str:
        return "".join(self.parts)


class _Cancelled(Exception):
    pass


class ModelUnavailable(ProviderRequestError):
    """No provider of the chain serves the request's model (each one was skipped)."""


def _redact(exc: BaseException, redact: Callable[[str], str]) -> None:
    """Rewrite `exc`'s message without the provider's secrets (in place: it is ours now),
    before an attempt record or the final response quotes it. Errors from a stream, a
    200 answer or a transport carry whatever the server sent, not only HTTP bodies."""
    text = str(exc)
    clean = redact(text)
    if clean == text:
        return
    if isinstance(exc, PipelineError):
        exc.message = clean
    exc.args = (clean,)


def error_info(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(
        error_class=type(exc).__name__,
        message=str(exc)[:2000] or type(exc).__name__,
        retriable=bool(getattr(exc, "retriable", False)),
    )


async def _race(aw: Awaitable[object], cancel: asyncio.Event | None) -> object:
    """Await `aw` unless `cancel` is set first; then cancel it and raise _Cancelled."""
    task = asyncio.ensure_future(aw)
    if cancel is None:
        return await task
    waiter = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _Cancelled


class AgentProcessor:
    def __init__(
        self,
        registry: LLMRegistry,
        *,
        policy: RetryPolicy | None = None,
        default_provider: str = "local",
        timeout_s: float = 60.0,
        breaker_failures: int = 5,
        breaker_window_s: float = 30.0,
        breaker_reset_s: float = 15.0,
        on_transition: Callable[[Transition], None] | None = None,
        search: WebSearchService | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.policy = policy or RetryPolicy()
        self.default_provider = default_provider
        self.timeout_s = timeout_s
        self._breaker_args = (breaker_failures, breaker_window_s, breaker_reset_s)
        self._on_transition = on_transition
        self._search = search
        self._clock = clock
        self.breakers: dict[str, CircuitBreaker] = {}
        self._adapters: dict[str, MidsceneAdapter] = {}

    def breaker(self, provider: str) -> CircuitBreaker:
        b = self.breakers.get(provider)
        if b is None:
            failures, window, reset = self._breaker_args
            b = self.breakers[provider] = CircuitBreaker(
                provider,
                failure_threshold=failures,
                window_s=window,
                reset_timeout_s=reset,
                clock=self._clock,
                on_transition=self._on_transition,
            )
        return b

    def _operator_timeout(self, name: str) -> float:
        """The provider's `timeout_s` (providers file: a slow self-hosted model), else
        AGENTSTREAM_LLM_TIMEOUT_S."""
        return self.provider(name).config.timeout_s or self.timeout_s

    def _timeout(self, name: str, request: LLMRequest) -> float:
        """A call's timeout: the operator's, which a request may shorten, never lengthen
        (a request's `timeout_s` of an hour would hold a slot, or the breaker's single
        half-open probe, that long)."""
        operator = self._operator_timeout(name)
        return min(request.timeout_s, operator) if request.timeout_s else operator

    def _shortened(self, name: str, request: LLMRequest) -> bool:
        """Did the request cut the operator's timeout to less than half?"""
        operator = self._operator_timeout(name)
        return request.timeout_s is not None and request.timeout_s < operator / 2

    def provider(self, name: str) -> LLMProvider:
        adapter = self._adapters.get(name)
        if adapter is None:
            adapter = self._adapters[name] = MidsceneAdapter(
                self.registry.get_provider(name), search=self._search
            )
        return adapter

    def route(self, request: LLMRequest) -> Route:
        """Which model each provider of the request's chain is sent (`models.route`)."""
        return route(
            self.registry.catalog,
            model=request.config.model,
            provider=request.provider,
            fallback=request.fallback,
            default_provider=self.default_provider,
        )

    async def process_request(
        self,
        request: LLMRequest,
        *,
        on_chunk: ChunkSink | None = None,
        cancel: asyncio.Event | None = None,
        plan: Route | None = None,
    ) -> Outcome:
        """`plan`: the route to take instead of `route(request)` (the runtime's, with the
        providers whose budget is spent skipped)."""
        started = time.perf_counter()
        attempts: list[AttemptRecord] = []
        last_error: BaseException | None = None
        chunks = 0
        plan = plan or self.route(request)

        async def sink(
            delta: str, provider: str, attempt: int, tool_calls: list[ToolCallDelta] | None = None
        ) -> None:
            nonlocal chunks
            chunks += 1
            if on_chunk is not None:
                if tool_calls:
                    await on_chunk(delta, provider, attempt, tool_calls=tool_calls)
                else:
                    await on_chunk(delta, provider, attempt)

        def done(status: Status, **kw: object) -> Outcome:
            return Outcome(
                status,
                attempts=attempts,
                chunks=chunks,
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
                alias=plan.alias,
                **kw,  # type: ignore[arg-type]
            )

        fmt = request.config.response_format
        try:
            structured.prepare(fmt)  # a schema that cannot be checked: no call at all
        except InvalidResponseFormat as exc:
            return done("failed", provider="", model="", error=error_info(exc))

        for hop in plan.hops:
            name, model = hop.provider, hop.model
            if cancel is not None and cancel.is_set():
                return done("cancelled", provider=name, model=model, usage=Usage(estimated=True))
            if hop.skip:
                # not called: no breaker, no slot; an unknown provider is the request's
                # mistake (an error, as when it was looked up), a model it does not serve
                # is the configuration's answer (skipped)
                last_error = (
                    ModelUnavailable(f"{name}: {hop.skip}", provider=name)
                    if hop.known
                    else ProviderRequestError(hop.skip, provider=name)
                )
                attempts.append(
                    AttemptRecord(
                        provider=name,
                        attempt=len(attempts) + 1,
                        outcome="skipped" if hop.known else "error",
                        error=str(last_error)[:2000],
                    )
                )
                continue
            config = request.config
            if config.model != model:
                config = config.model_copy(update={"model": model})
            breaker = self.breaker(name)
            timeouts = 0
            for n in range(1, self.policy.max_attempts + 1):
                if not breaker.allow():
                    last_error = CircuitOpen(
                        f"{name}: circuit open, retry in {breaker.retry_in_s():.1f}s",
                        provider=name,
                    )
                    attempts.append(
                        AttemptRecord(
                            provider=name,
                            attempt=len(attempts) + 1,
                            outcome="circuit_open",
                            model=model,
                            error=str(last_error),
                        )
                    )
                    break
                number = len(attempts) + 1
                partial = _Partial(tools=ToolCallAccumulator(name))
                t0 = time.perf_counter()
                try:
                    await _race(self._attempt(name, request, config, number, partial, sink), cancel)
                except _Cancelled:
                    breaker.release()
                    attempts.append(
                        AttemptRecord(
                            provider=name,
                            attempt=number,
                            outcome="cancelled",
                            model=model,
                            latency_ms=_ms(t0),
                        )
                    )
                    content = partial.content
                    usage = partial.usage or _estimated_partial(request, content)
                    return done(
                        "cancelled",
                        content=content,
                        usage=usage,
                        provider=name,
                        model=partial.model or model,
                        tool_calls=_calls_so_far(partial),
                    )
                except Exception as exc:
                    _redact(exc, self.provider(name).redact)
                    last_error = exc
                    retry_after = retry_after_of(exc)
                    attempts.append(
                        AttemptRecord(
                            provider=name,
                            attempt=number,
                            outcome="error",
                            model=model,
                            error=f"{type(exc).__name__}: {exc}"[:2000],
                            status_code=getattr(exc, "status_code", None),
                            latency_ms=_ms(t0),
                            retry_after_s=retry_after,
                        )
                    )
                    # A timeout the request chose far shorter than the operator's says
                    # nothing about the provider: not a breaker failure (else any sender
                    # could open every provider's breaker with timeout_s 0.001), and not
                    # retried. One of at least half the operator's still counts: requests
                    # that all shorten it a little must not keep a hung provider's breaker
                    # closed.
                    own_timeout = isinstance(exc, ProviderTimeout) and self._shortened(
                        name, request
                    )
                    if isinstance(exc, ProviderError) and exc.retriable and not own_timeout:
                        breaker.record_failure(type(exc).__name__)
                    else:
                        breaker.release()
                    if isinstance(exc, ProviderTimeout):
                        timeouts += 1
                    decision = self.policy.decide(exc, n, timeouts)
                    if own_timeout or not decision.retry or breaker.state == "open":
                        break
                    from agentstream.streams.observability import LLM_RETRIES

                    LLM_RETRIES.labels(name, decision.reason or type(exc).__name__).inc()
                    try:
                        await _race(asyncio.sleep(decision.delay_s), cancel)
                    except _Cancelled:
                        return done(
                            "cancelled",
                            provider=name,
                            model=model,
                            usage=_estimated_partial(request, ""),
                        )
                    continue
                breaker.record_success()
                attempts.append(
                    AttemptRecord(
                        provider=name, attempt=number, outcome="ok", model=model, latency_ms=_ms(t0)
                    )
                )
                content = partial.content
                usage = partial.usage or estimate_usage(request.context, content)
                verdict = structured.check(fmt, content)
                return done(
                    "completed",
                    content=content,
                    usage=usage,
                    provider=name,
                    model=partial.model or model,
                    schema_valid=verdict.valid if verdict else None,
                    schema_error=verdict.error if verdict else "",
                    tool_calls=partial.tool_calls,
                    finish_reason=partial.finish_reason,
                )
        err = last_error or CircuitOpen("no provider available")
        # the provider that was last asked (skipped ones were not, nor names the request
        # made up): usage counts the failure against it, not against a provider that was
        # never called — nor under a name of the request's choosing
        unknown = {h.provider for h in plan.hops if not h.known}
        tried = next(
            (a for a in reversed(attempts) if a.outcome != "skipped" and a.provider not in unknown),
            None,
        )
        return done(
            "failed",
            provider=tried.provider if tried else "",
            model=tried.model if tried else "",
            error=error_info(err),
        )

    async def _attempt(
        self,
        name: str,
        request: LLMRequest,
        config: LLMConfig,
        number: int,
        partial: _Partial,
        sink: ChunkSink,
    ) -> None:
        provider = self.provider(name)
        timeout = self._timeout(name, request)
        if not request.stream:
            result = await provider.generate(request.context, config, timeout_s=timeout)
            partial.parts.append(result.content)
            partial.usage = result.usage
            partial.model = result.model
            partial.tool_calls = result.tool_calls
            partial.finish_reason = result.finish_reason or ""
            return
        await self.call_with_streaming(provider, request, number, partial, sink, timeout, config)

    async def call_with_streaming(
        self,
        provider: LLMProvider,
        request: LLMRequest,
        number: int,
        partial: _Partial,
        sink: ChunkSink,
        timeout_s: float,
        config: LLMConfig | None = None,
    ) -> None:
        config = config or request.config
        async for chunk in provider.stream(request.context, config, timeout_s=timeout_s):
            if chunk.model and not partial.model:
                partial.model = chunk.model
            if chunk.usage is not None:
                partial.usage = chunk.usage
            if chunk.finish_reason:
                partial.finish_reason = chunk.finish_reason
            if chunk.tool_calls:
                for piece in chunk.tool_calls:
                    partial.tools.add(piece)
                if chunk.delta:
                    partial.parts.append(chunk.delta)
                await sink(chunk.delta, provider.name, number, chunk.tool_calls)
            elif chunk.delta:
                partial.parts.append(chunk.delta)
                await sink(chunk.delta, provider.name, number)
        # inside the attempt: a call that cannot be completed (no name) fails it, and
        # the retry policy decides as for any malformed stream
        partial.tool_calls = partial.tools.finish()


def _calls_so_far(partial: _Partial) -> list[ToolCall]:
    """The tool calls of an attempt cut short, as far as they were streamed (their chunks
    are out already): the last one's arguments are usually unfinished
    (`arguments_valid` false). A piece that never got its call's name is left out — no
    consumer could call it — rather than failing the cancellation."""
    return partial.tools.finish(skip_unnamed=True)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _estimated_partial(request: LLMRequest, content: str) -> Usage:
    usage = estimate_usage(request.context, content)
    if not content:
        return usage.model_copy(
            update={"completion_tokens": 0, "total_tokens": usage.prompt_tokens}
        )
    return usage.model_copy(update={"completion_tokens": estimate_tokens(content)})
