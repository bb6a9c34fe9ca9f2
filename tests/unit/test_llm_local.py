"""The offline `local` provider with tools and structured output: an agent loop (call a
tool, send its result back, read a structured answer) runs with no model at all, the
same request always gets the same answer, and the worker's own checks accept it."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from agentstream.agents.llm.processor import AgentProcessor
from agentstream.agents.llm.providers.base import ProviderConfig, StreamChunk
from agentstream.agents.llm.providers.local import LocalProvider, tool_to_call
from agentstream.agents.llm.registry import LLMRegistry
from agentstream.agents.llm.tools import ToolCallAccumulator
from agentstream.schemas.llm import (
    ChatMessage,
    FunctionSpec,
    LLMConfig,
    LLMContext,
    LLMRequest,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
)
from agentstream.streams.resilience import RetryPolicy

WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    Tool(function=FunctionSpec(name="search_web", description="Search the web for pages")),
    Tool(
        function=FunctionSpec(
            name="get_weather",
            description="The weather forecast of a city",
            parameters=WEATHER_ARGS,
        )
    ),
]
ANSWER = {
    "type": "object",
    "properties": {"summary": {"type": "string"}, "temperature": {"type": "number"}},
    "required": ["summary", "temperature"],
}


def ctx(*messages: ChatMessage) -> LLMContext:
    return LLMContext(messages=list(messages))


USER = ChatMessage(role="user", content="What will the weather be in Oslo this week?")


def test_the_tool_whose_words_match_the_question_is_called() -> None:
    tool = tool_to_call(ctx(USER), LLMConfig(tools=TOOLS))
    assert tool is not None and tool.function.name == "get_weather"
    other = ChatMessage(role="user", content="search the web for kafka pages")
    assert tool_to_call(ctx(other), LLMConfig(tools=TOOLS)).function.name == "search_web"  # type: ignore[union-attr]


def test_tool_choice_decides_whether_and_which_tool() -> None:
    result = ChatMessage(role="tool", tool_call_id="c1", content='{"temp": 3}')
    call = ToolCall(id="c1", function={"name": "get_weather", "arguments": "{}"})  # type: ignore[arg-type]
    answered = ctx(USER, ChatMessage(role="assistant", tool_calls=[call]), result)
    named = NamedToolChoice(function=NamedFunction(name="search_web"))
    assert tool_to_call(ctx(USER), LLMConfig(tools=TOOLS, tool_choice="none")) is None
    assert tool_to_call(ctx(USER), LLMConfig(tools=TOOLS, tool_choice=named)).function.name == (  # type: ignore[union-attr]
        "search_web"
    )
    # auto: once the results are back, the answer is text — the loop ends
    assert tool_to_call(answered, LLMConfig(tools=TOOLS)) is None
    assert tool_to_call(answered, LLMConfig(tools=TOOLS, tool_choice="auto")) is None
    # required (or a named tool) always calls, as OpenAI's models must
    assert tool_to_call(answered, LLMConfig(tools=TOOLS, tool_choice="required")) is not None
    assert tool_to_call(answered, LLMConfig(tools=TOOLS, tool_choice=named)) is not None
    assert tool_to_call(ctx(USER), LLMConfig()) is None


async def _streamed(p: LocalProvider, context: LLMContext, config: LLMConfig) -> list[StreamChunk]:
    return [c async for c in p.stream(context, config)]


async def test_a_tool_call_streams_in_fragments_that_add_up_to_the_whole_call() -> None:
    p = LocalProvider()
    config = LLMConfig(tools=TOOLS)
    whole = await p.generate(ctx(USER), config)
    assert whole.finish_reason == "tool_calls" and whole.content == ""
    [call] = whole.tool_calls
    args = orjson.loads(call.function.arguments)
    assert Draft202012Validator(WEATHER_ARGS).is_valid(args), args
    chunks = await _streamed(p, ctx(USER), config)
    acc = ToolCallAccumulator("local")
    for chunk in chunks:
        for piece in chunk.tool_calls or ():
            acc.add(piece)
    [streamed] = acc.finish()
    assert (streamed.id, streamed.function) == (call.id, call.function)
    assert streamed.arguments_valid
    assert len([c for c in chunks if c.tool_calls]) > 2  # the arguments came in pieces
    assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].usage is not None
    # deterministic: the same request, the same call
    assert (await p.generate(ctx(USER), config)).tool_calls == whole.tool_calls
    other = ChatMessage(role="user", content="And the weather in Lima for a few days?")
    assert (await p.generate(ctx(other), config)).tool_calls[0].id != call.id


@pytest.mark.parametrize("stream", [True, False])
async def test_structured_answers_match_their_schema_through_the_processor(stream: bool) -> None:
    fmt = ResponseFormat(type="json_schema", json_schema={"name": "answer", "schema": ANSWER})
    outcome = await _process(LLMConfig(response_format=fmt), stream)
    assert outcome.status == "completed" and outcome.schema_valid is True, outcome
    assert Draft202012Validator(ANSWER).is_valid(orjson.loads(outcome.content))
    obj = await _process(LLMConfig(response_format=ResponseFormat(type="json_object")), stream)
    assert obj.schema_valid is True and isinstance(orjson.loads(obj.content), dict)


@pytest.mark.parametrize("stream", [True, False])
async def test_tool_calls_reach_the_outcome_through_the_processor(stream: bool) -> None:
    outcome = await _process(LLMConfig(tools=TOOLS), stream)
    assert outcome.finish_reason == "tool_calls"
    [call] = outcome.tool_calls
    assert call.function.name == "get_weather" and call.arguments_valid


async def _process(config: LLMConfig, stream: bool) -> Any:
    proc = AgentProcessor(
        LLMRegistry(secrets=None),
        policy=RetryPolicy(base_delay_s=0.001, max_delay_s=0.01),
        breaker_failures=3,
        breaker_window_s=60,
        breaker_reset_s=10,
    )
    request = LLMRequest(
        request_id="r-local",
        agent_id="agent-1",
        provider="local",
        stream=stream,
        context=ctx(USER),
        config=config,
    )

    async def on_chunk(*args: Any, **kwargs: Any) -> None:
        return None

    return await proc.process_request(request, on_chunk=on_chunk)


async def test_a_call_cancelled_mid_stream_keeps_the_tool_call_streamed_so_far() -> None:
    """The chunks already carried the call's first pieces; the final (cancelled) response
    must carry them too — cut off, so `arguments_valid` is false — not drop them."""
    slow = LocalProvider(ProviderConfig(name="slow", kind="local", word_delay_s=0.02))
    reg = LLMRegistry(secrets=None)
    reg.register_provider("slow", slow)
    proc = AgentProcessor(
        reg,
        policy=RetryPolicy(base_delay_s=0.001, max_delay_s=0.01),
        breaker_failures=3,
        breaker_window_s=60,
        breaker_reset_s=10,
    )
    cancel = asyncio.Event()
    pieces: list[Any] = []

    async def on_chunk(delta: str, provider: str, attempt: int, **kw: Any) -> None:
        pieces.extend(kw.get("tool_calls") or ())
        if len(pieces) == 2:  # the call's name, then a first fragment of its arguments
            cancel.set()

    request = LLMRequest(
        request_id="r-cut",
        agent_id="agent-1",
        provider="slow",
        context=ctx(USER),
        config=LLMConfig(tools=TOOLS),
    )
    out = await proc.process_request(request, on_chunk=on_chunk, cancel=cancel)
    assert out.status == "cancelled"
    [call] = out.tool_calls
    assert call.function.name == "get_weather" and call.id == pieces[0].id
    assert call.function.arguments == "".join(p.arguments for p in pieces)
    assert call.function.arguments and call.arguments_valid is False
