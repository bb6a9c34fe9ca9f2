"""A deterministic offline provider: the same context and config always give the same
answer, streamed word by word, with usage counted the way a tokenizer roughly would.

It lets `agentstream demo` and tests show the whole path with no network and no keys,
and agent builders run their loops offline:

* **Tools.** With `tools` and a `tool_choice` other than `none`, it calls one: the named
  one; otherwise the tool whose name and description share the most words with the last
  message (the first on a tie). Under `auto` (or no choice) it calls a tool only when the
  last message is not a tool's result — a loop that sends the results back gets a text
  answer next, as from a model. The arguments are a value matching the tool's
  `parameters` schema (`agents.llm.examples`), streamed in fragments like OpenAI's;
  the finish reason is `tool_calls`.
* **Structured output.** With `response_format` `json_schema` the answer is a JSON value
  matching the schema (the worker checks it like any provider's); with `json_object`,
  an object holding the text answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import AsyncIterator

import orjson

from agentstream.agents.llm.examples import ExampleTooLarge, example
from agentstream.agents.llm.providers.base import (
    LOCAL_MODEL,
    LLMProvider,
    LLMResult,
    ProviderConfig,
    StreamChunk,
    chat_messages,
    estimate_tokens,
)
from agentstream.schemas.llm import (
    FunctionCall,
    LLMConfig,
    LLMContext,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from agentstream.streams.errors import ProviderRequestError

_PROSE = (
    "the stream carries every event in order while agents fold state into tables and "
    "replay history when a worker restarts so nothing is lost between partitions offsets "
    "commit after the response lands on the broker retries back off breakers open and "
    "close tokens are counted per agent provider and model"
)
_VOCAB = _PROSE.split(" ")

DEFAULT_WORDS = 48
#: characters per streamed fragment of tool arguments and JSON answers
FRAGMENT_CHARS = 24

_WORD = re.compile(r"[a-z0-9]+")


def tool_to_call(context: LLMContext, config: LLMConfig) -> Tool | None:
    """The tool this answer calls, or None for a text answer (module docstring)."""
    tools = config.tools or []
    choice = config.tool_choice
    if not tools or choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        return next(t for t in tools if t.function.name == choice.function.name)
    if choice != "required" and context.messages[-1].role == "tool":
        return None
    asked = set(_WORD.findall(context.messages[-1].content.lower()))

    def overlap(tool: Tool) -> int:
        f = tool.function
        said = f"{f.name.replace('_', ' ').replace('-', ' ')} {f.description or ''}"
        return len(asked & set(_WORD.findall(said.lower())))

    return max(tools, key=overlap)  # max keeps the first of equals


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

    def _seed(self, context: LLMContext, config: LLMConfig) -> str:
        return repr((chat_messages(context), self.model_for(config), config.temperature))

    def tool_call(self, context: LLMContext, config: LLMConfig) -> ToolCall | None:
        tool = tool_to_call(context, config)
        if tool is None:
            return None
        seed = self._seed(context, config) + tool.function.name
        words = _WORD.findall(context.messages[-1].content.lower())
        arguments = _example(tool.function.parameters or {"type": "object"}, seed, words)
        return ToolCall(
            id="call_" + hashlib.sha256(seed.encode()).hexdigest()[:24],
            function=FunctionCall(name=tool.function.name, arguments=_json(arguments)),
            arguments_valid=True,  # JSON written here (the stream's are checked as they add up)
        )

    def text(self, context: LLMContext, config: LLMConfig) -> str:
        words = self.words(context, config)
        fmt = config.response_format
        if fmt is None or fmt.type == "text":
            return " ".join(words)
        if fmt.type == "json_object":
            return _json({"answer": " ".join(words)})
        schema = (fmt.json_schema or {}).get("schema", {})
        return _json(_example(schema, self._seed(context, config), words[2:] or words))

    async def generate(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> LLMResult:
        call = self.tool_call(context, config)
        model = self.model_for(config)
        if call is not None:
            usage = self.usage(context, call.function.arguments)
            return LLMResult("", usage, model, "tool_calls", [call])
        text = self.text(context, config)
        return LLMResult(text, self.usage(context, text), model, "stop")

    async def stream(
        self, context: LLMContext, config: LLMConfig, *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamChunk]:
        call = self.tool_call(context, config)
        if call is not None:
            args = call.function.arguments
            head = ToolCallDelta(index=0, id=call.id, name=call.function.name)
            yield StreamChunk(tool_calls=[head])
            for i in range(0, len(args), FRAGMENT_CHARS):
                await self._pace()
                piece = ToolCallDelta(index=0, arguments=args[i : i + FRAGMENT_CHARS])
                yield StreamChunk(tool_calls=[piece])
            yield StreamChunk(
                usage=self.usage(context, args),
                finish_reason="tool_calls",
                model=self.model_for(config),
            )
            return
        fmt = config.response_format
        if fmt is not None and fmt.type != "text":
            text = self.text(context, config)
            pieces = [text[i : i + FRAGMENT_CHARS] for i in range(0, len(text), FRAGMENT_CHARS)]
        else:
            words = self.words(context, config)
            text = " ".join(words)
            pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        for part in pieces:
            await self._pace()
            yield StreamChunk(delta=part)
        yield StreamChunk(
            usage=self.usage(context, text), finish_reason="stop", model=self.model_for(config)
        )

    async def _pace(self) -> None:
        if self.config.word_delay_s:
            await asyncio.sleep(self.config.word_delay_s)
        else:
            await asyncio.sleep(0)  # a cancellation point, like a real stream


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _example(schema: object, seed: str, words: list[str]) -> object:
    """`example`, its refusal of an oversized schema a request error: not retried (the
    same schema gets the same answer) and not counted against the breaker."""
    try:
        return example(schema, seed, words)
    except ExampleTooLarge as exc:
        raise ProviderRequestError(f"local: {exc}", provider="local") from None
