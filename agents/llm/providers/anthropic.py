"""Anthropic's native Messages API: ``POST {base_url}/v1/messages``.

Headers ``x-api-key`` (the key from the keychain) and ``anthropic-version: 2023-06-01``.
The system prompt is the top-level ``system``; ``max_tokens`` is required (the request's,
else the provider's `max_tokens`, else 4096). Tools are ``{name, description,
input_schema}``; a model's calls come back as ``tool_use`` content blocks, and results
go back as ``tool_result`` blocks of a user message.

Streaming is SSE with named events, each event's data naming its type again:
``message_start`` (model, input tokens), ``content_block_start`` (a text or ``tool_use``
block with id and name), ``content_block_delta`` (``text_delta`` or ``input_json_delta``
fragments), ``content_block_stop``, ``message_delta`` (``stop_reason``, output tokens),
``message_stop``, ``ping``, and ``error`` (mid-stream, e.g. overloaded). Unknown event
types are ignored, as Anthropic's versioning policy asks; a stream that ends without
``message_stop`` is a `ProviderProtocolError`.

`anthropic_body` and `AnthropicStream` are plain functions/state, tested on their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from agentstream.agents.llm import tools
from agentstream.agents.llm.providers._http import HTTPProvider, LineSplitter
from agentstream.agents.llm.providers.base import (
    LLMResult,
    StreamChunk,
    reported_usage,
    token_count,
)
from agentstream.agents.llm.providers.openai import SSEParser
from agentstream.schemas.llm import LLMConfig, LLMContext, NamedToolChoice, ToolCallDelta, Usage
from agentstream.streams.errors import (
    ProviderError,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRequestError,
    ProviderServerError,
)

ANTHROPIC_VERSION = "2023-06-01"
#: sent when neither the request nor the provider gives max_tokens (the API requires it)
DEFAULT_MAX_TOKENS = 4096

#: Anthropic's stop_reason → the OpenAI-style finish_reason every response carries
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "refusal": "content_filter",
}

#: error types of an `error` event or body that the request itself caused
_REQUEST_ERRORS = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
}


def finish_reason(stop_reason: Any) -> str | None:
    if not isinstance(stop_reason, str):
        return None
    return FINISH_REASONS.get(stop_reason, stop_reason)


def anthropic_body(
    provider: str, context: LLMContext, config: LLMConfig, model: str, max_tokens: int, stream: bool
) -> dict[str, Any]:
    """The request as a Messages API body.

    System messages join the system prompt (the API has no system role); consecutive
    messages of one role become one message (tool results following an assistant's calls
    must be one user message); an assistant's calls are `tool_use` blocks, a tool's
    result a `tool_result` block."""
    tools.tool_results_follow_calls(provider, context.messages)
    system = [context.system_prompt] if context.system_prompt else []
    messages: list[dict[str, Any]] = []
    for m in context.messages:
        if m.role == "system":
            system.append(m.content)
            continue
        role = "assistant" if m.role == "assistant" else "user"
        blocks: list[dict[str, Any]] = []
        if m.role == "tool":
            blocks.append(
                {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}
            )
        elif m.content:
            blocks.append({"type": "text", "text": m.content})
        for call in m.tool_calls or ():
            blocks.append(
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.function.name,
                    "input": tools.arguments_object(provider, call),
                }
            )
        if not blocks:
            continue  # an empty turn: the API refuses empty text blocks
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    if not messages:
        raise ProviderRequestError(
            f"{provider}: no user or assistant message to send", provider=provider
        )
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": config.max_tokens or max_tokens,
        "messages": messages,
        "stream": stream,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if config.temperature is not None:
        # Anthropic's range is 0..1, OpenAI's 0..2: clamped rather than refused
        body["temperature"] = min(config.temperature, 1.0)
    if config.top_p is not None:
        body["top_p"] = config.top_p
    if config.stop:
        body["stop_sequences"] = config.stop
    if config.tools:
        body["tools"] = [
            {
                "name": t.function.name,
                **({"description": t.function.description} if t.function.description else {}),
                "input_schema": t.function.parameters or {"type": "object", "properties": {}},
            }
            for t in config.tools
        ]
    choice = config.tool_choice
    if isinstance(choice, NamedToolChoice):
        body["tool_choice"] = {"type": "tool", "name": choice.function.name}
    elif choice is not None and config.tools:
        body["tool_choice"] = {"type": {"required": "any"}.get(choice, choice)}
    return body


def anthropic_usage(data: Any, prompt: int = 0) -> Usage | None:
    """Usage from a `usage` object; input tokens count the cached ones too (Anthropic
    reports cache reads and writes apart from `input_tokens`)."""
    if not isinstance(data, dict):
        return None
    try:
        if "input_tokens" in data:
            prompt = sum(
                token_count(data.get(k))
                for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
            )
    except ValueError:
        return None
    return reported_usage(prompt, data.get("output_tokens"))


def stream_error(provider: str, err: Any) -> ProviderError:
    """An `error` event's (or error body's) error as the matching provider error."""
    kind = err.get("type") if isinstance(err, dict) else None
    message = err.get("message") if isinstance(err, dict) else str(err)
    text = f"{provider}: {kind or 'error'}: {message}"[:2000]
    if kind == "rate_limit_error":
        return ProviderRateLimited(text, provider=provider)
    if kind in _REQUEST_ERRORS:
        return ProviderRequestError(text, provider=provider)
    return ProviderServerError(text, provider=provider)  # overloaded_error, api_error, …


class AnthropicStream:
    """The stream's events (decoded data objects, in order) → `StreamChunk`s.

    Content block indexes count text blocks too; tool calls are numbered 0, 1 … in the
    order their `tool_use` blocks start."""

    __slots__ = ("_blocks", "_calls", "_prompt", "done", "model", "provider")

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self.model: str | None = None
        self._prompt = 0
        #: content block index → tool call index (tool_use blocks only), or -1 for text
        self._blocks: dict[int, int] = {}
        self._calls = 0

    def _error(self, message: str) -> ProviderProtocolError:
        return ProviderProtocolError(f"{self.provider}: {message}", provider=self.provider)

    def feed(self, obj: Any) -> StreamChunk | None:
        if not isinstance(obj, dict):
            raise self._error("SSE data is not an object")
        kind = obj.get("type")
        if kind == "content_block_delta":
            d = obj.get("delta")
            if not isinstance(d, dict):
                raise self._error("content_block_delta without delta")
            if d.get("type") == "text_delta":
                text = d.get("text")
                return StreamChunk(delta=text) if isinstance(text, str) and text else None
            if d.get("type") == "input_json_delta":
                call = self._blocks.get(obj.get("index"))  # type: ignore[arg-type]
                if call is None or call < 0:
                    raise self._error(
                        f"input_json_delta for block {str(obj.get('index'))[:20]} "
                        "that is no tool_use block"
                    )
                part = d.get("partial_json")
                if not isinstance(part, str):
                    raise self._error("input_json_delta without partial_json")
                if not part:
                    return None
                return StreamChunk(
                    tool_calls=[
                        ToolCallDelta.model_construct(index=call, id="", name="", arguments=part)
                    ]
                )
            return None  # thinking/signature/citations deltas: not part of the answer
        if kind == "content_block_start":
            block = obj.get("content_block")
            index = obj.get("index")
            if not isinstance(block, dict) or not isinstance(index, int):
                raise self._error("content_block_start without index or content_block")
            if index in self._blocks:
                raise self._error(f"content block {index} started twice")
            if block.get("type") != "tool_use":
                self._blocks[index] = -1
                text = block.get("text") if block.get("type") == "text" else None
                return StreamChunk(delta=text) if isinstance(text, str) and text else None
            call = self._calls
            piece = tools.delta(self.provider, call, block.get("id"), block.get("name"))
            if not piece.name:
                raise self._error(f"tool_use block {index} has no name")
            self._calls += 1
            self._blocks[index] = call
            # the start carries `input: {}`; the arguments follow as input_json_deltas
            # (none at all for a tool without parameters: then the start's input is them)
            start_input = block.get("input")
            if isinstance(start_input, dict) and start_input:
                piece = piece.model_copy(update={"arguments": orjson.dumps(start_input).decode()})
            return StreamChunk(tool_calls=[piece])
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                self.model = message.get("model") if isinstance(message.get("model"), str) else None
                usage = anthropic_usage(message.get("usage"))
                if usage is not None:
                    self._prompt = usage.prompt_tokens
            return StreamChunk(model=self.model) if self.model else None
        if kind == "message_delta":
            d = obj.get("delta")
            stop = d.get("stop_reason") if isinstance(d, dict) else None
            usage = anthropic_usage(obj.get("usage"), self._prompt)
            if usage is None and stop is None:
                return None
            return StreamChunk(usage=usage, finish_reason=finish_reason(stop))
        if kind == "message_stop":
            self.done = True
            return None
        if kind == "error":
            raise stream_error(self.provider, obj.get("error"))
        return None  # ping, content_block_stop, and types added later: nothing to say

    def tool_calls_started(self) -> int:
        return self._calls


class AnthropicProvider(HTTPProvider):
    def url(self, config: LLMConfig) -> str:
        return f"{self.resolve_base(config.api_endpoint)}/v1/messages"

    def health_url(self) -> str:
        return self.config.base_url.rstrip("/") + "/v1/models"

    def auth_headers(self, config: LLMConfig | None = None) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION, **self.config.headers}
        key = self.api_key() if self.config.requires_key else None
        if key:
            headers["x-api-key"] = key
        return headers

    def body(self, context: LLMContext, config: LLMConfig, stream: bool) -> dict[str, Any]:
        return anthropic_body(
            self.name,
            context,
            config,
            self.model_for(config),
            self.config.max_tokens or DEFAULT_MAX_TOKENS,
            stream,
        )

    async def generate(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> LLMResult:
        await self.pool()
        body = self.body(context, config, False)
        data = await self.post_json(self.url(config), body, self.auth_headers(), timeout_s)
        if isinstance(data, dict) and data.get("type") == "error":
            raise stream_error(self.name, data.get("error"))
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            raise ProviderProtocolError(f"{self.name}: response has no content", provider=self.name)
        text: list[str] = []
        acc = tools.ToolCallAccumulator(self.name)
        calls = 0
        for block in data["content"]:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif block.get("type") == "tool_use":
                acc.add(
                    tools.delta(
                        self.name,
                        calls,
                        block.get("id"),
                        block.get("name"),
                        block.get("input") or {},
                    )
                )
                calls += 1
        return LLMResult(
            content="".join(text),
            usage=anthropic_usage(data.get("usage")),
            model=str(data.get("model") or self.model_for(config)),
            finish_reason=finish_reason(data.get("stop_reason")),
            tool_calls=acc.finish(),
        )

    async def stream(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamChunk]:
        await self.pool()
        body = self.body(context, config, True)
        async with self.open_stream(self.url(config), body, self.auth_headers(), timeout_s) as resp:
            state = AnthropicStream(self.name)
            events = SSEParser()
            splitter = LineSplitter()
            async for raw in resp.aiter_bytes():
                for data in events.feed(splitter.feed(raw)):
                    if state.done:
                        continue  # read to the end so the connection goes back to the pool
                    chunk = state.feed(self._decode(data))
                    if chunk is not None:
                        yield chunk
            for data in events.feed(splitter.end(), end=True):
                if state.done:
                    break
                chunk = state.feed(self._decode(data))
                if chunk is not None:
                    yield chunk
            if not state.done:
                raise ProviderProtocolError(
                    f"{self.name}: stream ended before message_stop", provider=self.name
                )

    def _decode(self, data: bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProviderProtocolError(
                f"{self.name}: malformed SSE data: {data[:120].decode(errors='replace')!r}",
                provider=self.name,
            ) from None
