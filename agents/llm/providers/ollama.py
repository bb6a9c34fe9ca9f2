"""Ollama's native chat API: ``POST {base_url}/api/chat``.

Streaming is NDJSON: one JSON object per line with ``message.content`` deltas; the last
has ``"done": true`` and the token counts (``prompt_eval_count``, ``eval_count``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from agentstream.agents.llm import tools
from agentstream.agents.llm.providers._http import HTTPProvider, LineSplitter
from agentstream.agents.llm.providers.base import LLMResult, StreamChunk, reported_usage
from agentstream.schemas.llm import LLMConfig, LLMContext, Usage
from agentstream.streams.errors import ProviderProtocolError, ProviderServerError

_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "num_predict",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "stop": "stop",
}


def ollama_usage(obj: dict[str, Any]) -> Usage | None:
    if "prompt_eval_count" not in obj and "eval_count" not in obj:
        return None
    return reported_usage(obj.get("prompt_eval_count"), obj.get("eval_count"))


class OllamaProvider(HTTPProvider):
    def url(self, config: LLMConfig) -> str:
        return f"{self.resolve_base(config.api_endpoint)}/api/chat"

    def health_url(self) -> str:
        return self.config.base_url.rstrip("/") + "/api/tags"

    def auth_headers(self) -> dict[str, str]:
        headers = dict(self.config.headers)
        key = self.api_key() if self.config.requires_key else None
        if key:  # Ollama behind an authenticating proxy
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def body(self, context: LLMContext, config: LLMConfig, stream: bool) -> dict[str, Any]:
        options = {
            target: getattr(config, field)
            for field, target in _OPTIONS.items()
            if getattr(config, field) is not None
        }
        body: dict[str, Any] = {
            "model": self.model_for(config),
            "messages": tools.ollama_messages(self.name, context),
            "stream": stream,
        }
        if options:
            body["options"] = options
        fmt = config.response_format
        if fmt is not None and fmt.type != "text":
            # Ollama's `format`: the JSON Schema itself, or "json" for any JSON
            body["format"] = fmt.json_schema["schema"] if fmt.json_schema else "json"
        if config.tools and config.tool_choice != "none":
            # Ollama has no tool_choice: `none` is honoured by sending no tools, the others
            # leave the choice to the model
            body["tools"] = [t.model_dump(exclude_none=True) for t in config.tools]
        return body

    async def generate(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> LLMResult:
        await self.pool()
        data = await self.post_json(
            self.url(config), self.body(context, config, False), self.auth_headers(), timeout_s
        )
        if not isinstance(data, dict) or not isinstance(data.get("message"), dict):
            raise ProviderProtocolError(f"{self.name}: response has no message", provider=self.name)
        if "error" in data:
            raise ProviderServerError(f"{self.name}: {data['error']}", provider=self.name)
        acc = tools.ToolCallAccumulator(self.name)
        for piece in tools.ollama_deltas(self.name, data["message"].get("tool_calls") or [], 0):
            acc.add(piece)
        calls = acc.finish()
        return LLMResult(
            content=str(data["message"].get("content") or ""),
            usage=ollama_usage(data),
            model=str(data.get("model") or self.model_for(config)),
            finish_reason=_finish(data.get("done_reason"), bool(calls)),
            tool_calls=calls,
        )

    async def stream(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamChunk]:
        await self.pool()
        async with self.open_stream(
            self.url(config), self.body(context, config, True), self.auth_headers(), timeout_s
        ) as resp:
            done = False
            splitter = LineSplitter()
            calls = [0]  # tool calls so far: Ollama sends each whole, numbered here
            async for raw in resp.aiter_bytes():
                for line in splitter.feed(raw):
                    if not done and line.strip():
                        chunk, done = self._line(line, calls)
                        if chunk is not None:
                            yield chunk
                    # after done: read to the end, the connection is reused
            for line in splitter.end():
                if not done and line.strip():
                    chunk, done = self._line(line, calls)
                    if chunk is not None:
                        yield chunk
            if not done:
                raise ProviderProtocolError(
                    f"{self.name}: stream ended before done: true", provider=self.name
                )

    def _line(self, line: bytes, calls: list[int]) -> tuple[StreamChunk | None, bool]:
        """One NDJSON line → (chunk or None, done)."""
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ProviderProtocolError(
                f"{self.name}: malformed NDJSON line: {line[:120].decode(errors='replace')!r}",
                provider=self.name,
            ) from None
        if not isinstance(obj, dict):
            raise ProviderProtocolError(
                f"{self.name}: NDJSON line is not an object", provider=self.name
            )
        if "error" in obj:
            raise ProviderServerError(f"{self.name}: {obj['error']}", provider=self.name)
        message = obj.get("message")
        delta = str(message.get("content") or "") if isinstance(message, dict) else ""
        pieces = None
        if isinstance(message, dict) and message.get("tool_calls"):
            pieces = tools.ollama_deltas(self.name, message["tool_calls"], calls[0])
            calls[0] += len(pieces)
        if obj.get("done"):
            chunk = StreamChunk(
                delta=delta,
                usage=ollama_usage(obj),
                finish_reason=_finish(obj.get("done_reason"), calls[0] > 0),
                model=obj.get("model"),
                tool_calls=pieces,
            )
            return chunk, True
        if not delta and not pieces:
            return None, False
        return StreamChunk(delta=delta, model=obj.get("model"), tool_calls=pieces), False


def _finish(done_reason: object, called: bool) -> str:
    """Ollama says `stop` also when the model called tools: `tool_calls` then, as the
    other providers say."""
    reason = done_reason if isinstance(done_reason, str) and done_reason else "stop"
    return "tool_calls" if called and reason == "stop" else reason
