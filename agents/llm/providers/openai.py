"""OpenAI-compatible chat completions over httpx: OpenAI, Azure OpenAI, vLLM, llama.cpp
server, LM Studio.

* OpenAI and compatible servers: ``POST {base_url}/chat/completions`` with
  ``Authorization: Bearer <key>`` (and ``OpenAI-Organization``).
* Azure: ``POST {base_url}/openai/deployments/{deployment}/chat/completions
  ?api-version={api_version}`` with an ``api-key`` header.

Streaming is Server-Sent Events: ``data: {json}`` events, ending with ``data: [DONE]``;
with ``stream_options.include_usage`` the last event before it carries the usage and no
choices. A stream that ends without ``[DONE]`` or carries malformed JSON is a
`ProviderProtocolError` (retriable), never a silently truncated answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson

from agentstream.agents.llm import tools
from agentstream.agents.llm.providers._http import HTTPProvider, LineSplitter
from agentstream.agents.llm.providers.base import LLMResult, StreamChunk, reported_usage
from agentstream.schemas.llm import LLMConfig, LLMContext, ResponseFormat, Usage
from agentstream.streams.errors import (
    ProviderError,
    ProviderProtocolError,
    ProviderRequestError,
    ProviderServerError,
)

DEFAULT_AZURE_API_VERSION = "2024-06-01"


def parse_usage(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    return reported_usage(
        data.get("prompt_tokens"), data.get("completion_tokens"), data.get("total_tokens")
    )


class OpenAICompatibleProvider(HTTPProvider):
    @property
    def is_azure(self) -> bool:
        return self.config.kind == "azure"

    def endpoint(self, config: LLMConfig) -> tuple[str, dict[str, str] | None]:
        base = self.resolve_base(config.api_endpoint)
        if self.is_azure:
            deployment = self.config.deployment or self.model_for(config)
            if not deployment:
                raise ProviderRequestError(
                    f"{self.name}: no deployment (the request names no model and the "
                    "provider has no `deployment`)",
                    provider=self.name,
                )
            version = config.api_version or self.config.api_version or DEFAULT_AZURE_API_VERSION
            # the deployment may come from the request's model: one path segment, never
            # a way to another path of the endpoint
            return (
                f"{base}/openai/deployments/{quote(deployment, safe='')}/chat/completions",
                {"api-version": version},
            )
        return f"{base}/chat/completions", None

    def auth_headers(self, config: LLMConfig | None = None) -> dict[str, str]:
        headers = dict(self.config.headers)
        key = self.api_key() if self.config.requires_key else None
        if key:
            if self.is_azure:
                headers["api-key"] = key
            else:
                headers["Authorization"] = f"Bearer {key}"
        asked = config.organization if config else None
        if (
            asked
            and asked != self.config.organization
            and asked not in self.config.allowed_organizations
            and not self.is_azure
        ):
            raise ProviderRequestError(
                f"{self.name}: organization {asked!r} is not allowed "
                "(the provider's organization or allowed_organizations)",
                provider=self.name,
            )
        org = asked or self.config.organization
        if org and not self.is_azure:
            headers["OpenAI-Organization"] = org
        return headers

    def health_url(self) -> str:
        if self.is_azure:
            return (
                self.config.base_url.rstrip("/")
                + "/openai/models?api-version="
                + (self.config.api_version or DEFAULT_AZURE_API_VERSION)
            )
        return self.config.base_url.rstrip("/") + "/models"

    def body(self, context: LLMContext, config: LLMConfig, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": tools.openai_messages(context), "stream": stream}
        if not self.is_azure:
            body["model"] = self.model_for(config)
        for field in (
            "temperature",
            "max_tokens",
            "top_p",
            "frequency_penalty",
            "presence_penalty",
            "stop",
        ):
            value = getattr(config, field)
            if value is not None:
                body[field] = value
        if stream and self.config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        fmt = config.response_format
        if fmt is not None:
            body["response_format"] = openai_response_format(fmt)
        body.update(tools.openai_tools(config))
        return body

    async def generate(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> LLMResult:
        await self.pool()
        url, params = self.endpoint(config)
        data = await self.post_json(
            url, self.body(context, config, False), self.auth_headers(config), timeout_s, params
        )
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
            calls = choice["message"].get("tool_calls")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ProviderProtocolError(
                f"{self.name}: response has no choices[0].message", provider=self.name
            ) from None
        return LLMResult(
            content=str(content),
            usage=parse_usage(data.get("usage")),
            model=str(data.get("model") or self.model_for(config)),
            finish_reason=choice.get("finish_reason"),
            tool_calls=tools.openai_message_calls(self.name, calls),
        )

    async def stream(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamChunk]:
        await self.pool()
        url, params = self.endpoint(config)
        async with self.open_stream(
            url, self.body(context, config, True), self.auth_headers(config), timeout_s, params
        ) as resp:
            done = False
            events = SSEParser()
            splitter = LineSplitter()
            async for raw in resp.aiter_bytes():
                for data in events.feed(splitter.feed(raw)):
                    if done:
                        continue  # read to the end so the connection goes back to the pool
                    if data == b"[DONE]":
                        done = True
                        continue
                    chunk = self._chunk(data)
                    if chunk is not None:
                        yield chunk
            for data in events.feed(splitter.end(), end=True):
                if done:
                    break
                if data == b"[DONE]":
                    done = True
                    break
                chunk = self._chunk(data)
                if chunk is not None:
                    yield chunk
            if not done:
                raise ProviderProtocolError(
                    f"{self.name}: stream ended before data: [DONE]", provider=self.name
                )

    def _chunk(self, data: bytes | str) -> StreamChunk | None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProviderProtocolError(
                f"{self.name}: malformed SSE data: {_text(data[:120])!r}", provider=self.name
            ) from None
        if not isinstance(obj, dict):
            raise ProviderProtocolError(
                f"{self.name}: SSE data is not an object", provider=self.name
            )
        if "error" in obj:
            raise _stream_error(self.name, obj["error"])
        delta = ""
        finish = None
        calls = None
        choices = obj.get("choices") or []
        if choices and isinstance(choices[0], dict):
            d = choices[0].get("delta") or {}
            if isinstance(d, dict):
                delta = str(d.get("content") or "")
                if d.get("tool_calls") is not None:
                    calls = tools.openai_deltas(self.name, d["tool_calls"]) or None
            finish = choices[0].get("finish_reason")
        usage = parse_usage(obj.get("usage"))
        if not delta and usage is None and finish is None and calls is None:
            return None
        return StreamChunk(
            delta=delta, usage=usage, finish_reason=finish, model=obj.get("model"), tool_calls=calls
        )


def openai_response_format(fmt: ResponseFormat) -> dict[str, Any]:
    """`response_format` as the chat completions API takes it (its `json_schema` needs a
    name: "response" when the request gave none)."""
    if fmt.json_schema is None:
        return {"type": fmt.type}
    return {"type": fmt.type, "json_schema": {"name": "response", **fmt.json_schema}}


def _text(data: bytes | str) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _stream_error(provider: str, err: Any) -> ProviderError:
    message = err.get("message") if isinstance(err, dict) else str(err)
    return ProviderServerError(f"{provider}: error in stream: {message}", provider=provider)


class SSEParser:
    """The `data` of each SSE event from its lines, as bytes (multi-line data joined by
    newlines, per the spec; comments and other fields ignored). Synchronous, so the
    stream loop adds no generator layer per event."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf: list[bytes] = []

    def feed(self, lines: list[bytes], *, end: bool = False) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf
        for line in lines:
            if not line:
                if buf:
                    out.append(buf[0] if len(buf) == 1 else b"\n".join(buf))
                    buf.clear()
                continue
            if line[:1] == b":":
                continue  # comment / keep-alive
            field, _, value = line.partition(b":")
            if field == b"data":
                buf.append(value[1:] if value[:1] == b" " else value)
        if end and buf:
            out.append(b"\n".join(buf))
            buf.clear()
        return out


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each SSE event (multi-line data joined by newlines, per the spec)."""
    buf: list[str] = []
    async for line in lines:
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            buf.append(value)
    if buf:
        yield "\n".join(buf)
